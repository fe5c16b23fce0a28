"""cascade-vsr: latent-cascaded video super-resolution (SimpleGVR) for text-to-video pipelines.

The public API is imported lazily, so `import cascade_vsr` stays cheap (no torch / diffusers import
until a name is used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_IMPORTS = {
    "LatentUpsampler3D": "cascade_vsr.upsampler",
    "CascadeVSRTransformer3DModel": "cascade_vsr.transformer",
    "CascadeVSRPipeline": "pipelines.pipeline_cascade_vsr",
    "CascadeVSRPipelineOutput": "pipelines.pipeline_cascade_vsr",
    "SpaceToDepthAutoencoder": "cascade_vsr.space_to_depth",
}

__all__ = [
    "CascadeVSRPipeline",
    "CascadeVSRPipelineOutput",
    "CascadeVSRTransformer3DModel",
    "LatentUpsampler3D",
    "SpaceToDepthAutoencoder",
]

if TYPE_CHECKING:
    from pipelines.pipeline_cascade_vsr import CascadeVSRPipeline, CascadeVSRPipelineOutput

    from .space_to_depth import SpaceToDepthAutoencoder
    from .transformer import CascadeVSRTransformer3DModel
    from .upsampler import LatentUpsampler3D


def __getattr__(name: str):
    if name in _LAZY_IMPORTS:
        value = getattr(importlib.import_module(_LAZY_IMPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cascade_vsr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
