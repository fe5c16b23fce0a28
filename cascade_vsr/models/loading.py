"""`from_pretrained` for this package's models: the source is checked before diffusers looks for it."""

from __future__ import annotations

import os
from typing import Any

from cascade_vsr.core.validation import safe_loading_kwargs


class SafeLoadingMixin:
    """A mistyped local folder is an immediate FileNotFoundError naming it (not a Hub lookup that retries and then
    blames the network), and only safetensors weights load. Put it before `ModelMixin` in the bases."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        kwargs = safe_loading_kwargs(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
