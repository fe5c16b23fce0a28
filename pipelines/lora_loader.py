"""LoRA loading and saving for `CascadeVSRPipeline`, on diffusers' `LoraBaseMixin`.

Only the transformer takes adapters. `LoraBaseMixin` provides fusing, adapter selection (`set_adapters`,
`disable_lora`, `enable_lora`, `delete_adapters`, `unload_lora_weights`) and the file writing; this mixin adds what
diffusers leaves to each pipeline family: reading a state dict, loading it into the transformer and saving one.

Saving a trained adapter (e.g. from the trainer)::

    from peft.utils import get_peft_model_state_dict

    CascadeVSRPipeline.save_lora_weights(
        save_directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer),  # the adapter's weights only
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),  # rank, alpha, targets
    )
    pipe.load_lora_weights(save_directory)  # later, into any pipeline of the same model
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA
from diffusers.utils import logging
from diffusers.utils.peft_utils import require_peft_backend

logger = logging.get_logger(__name__)

TRANSFORMER_NAME = "transformer"


class CascadeVSRLoraLoaderMixin(LoraBaseMixin):
    r"""
    Load LoRA layers into the [`CascadeVSRTransformer3DModel`] of a [`CascadeVSRPipeline`].

    The checkpoints are diffusers' format: keys `transformer.<module>.lora_A.weight` / `lora_B.weight` (e.g.
    `transformer.blocks.0.attn1.to_q.lora_A.weight`), optionally with the adapter's `LoraConfig` as metadata.
    """

    _lora_loadable_modules = [TRANSFORMER_NAME]
    transformer_name = TRANSFORMER_NAME

    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor], **kwargs: Any
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict | None]:
        r"""
        The LoRA state dict of a folder, a file, a Hub repo or an in-memory dict, as saved by `save_lora_weights`.

        Args:
            pretrained_model_name_or_path_or_dict: Folder (with `weight_name`, or the one LoRA file in it), Hub id,
                or a state dict.
            weight_name (`str`, *optional*), subfolder (`str`, *optional*), use_safetensors (`bool`, *optional*),
            local_files_only, cache_dir, force_download, proxies, token, revision: as in diffusers' loaders.
            return_lora_metadata (`bool`): Also return the adapter metadata saved with the weights (or None).
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        # No preference: safetensors first, a pickle file only if there is no safetensors one.
        allow_pickle = use_safetensors is None
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=allow_pickle,
        )
        if any("dora_scale" in key for key in state_dict):
            logger.warning("DoRA checkpoints are not supported: the `dora_scale` entries are ignored.")
            state_dict = {k: v for k, v in state_dict.items() if "dora_scale" not in k}
        return (state_dict, metadata) if return_lora_metadata else state_dict

    @require_peft_backend
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        r"""
        Load a LoRA checkpoint into `self.transformer` as the adapter `adapter_name` (default: diffusers' next free
        `default_<n>`), which becomes active.

        Args:
            pretrained_model_name_or_path_or_dict: What `lora_state_dict` reads (a given dict is not modified).
            adapter_name (`str`, *optional*): Name of the new adapter (for `set_adapters`, `delete_adapters`).
            hotswap (`bool`): Replace the weights of the already loaded adapter `adapter_name` in place.
            low_cpu_mem_usage (`bool`, *optional*): Create the LoRA layers on the meta device first (faster).
            kwargs: The file options of `lora_state_dict`.
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not all("lora" in key for key in state_dict):
            raise ValueError(
                "`pretrained_model_name_or_path_or_dict` is not a LoRA checkpoint: every key must contain 'lora' "
                "(e.g. 'transformer.blocks.0.attn1.to_q.lora_A.weight')"
            )
        self.load_lora_into_transformer(
            state_dict,
            transformer=getattr(self, self.transformer_name),
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict: dict[str, torch.Tensor],
        transformer: torch.nn.Module,
        adapter_name: str | None = None,
        _pipeline: Any = None,
        low_cpu_mem_usage: bool = False,
        hotswap: bool = False,
        metadata: dict | None = None,
    ) -> None:
        """Load the `transformer.`-prefixed entries of `state_dict` into `transformer` (`load_lora_adapter`)."""
        transformer.load_lora_adapter(
            state_dict,
            prefix=cls.transformer_name,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        r"""
        Save the transformer's LoRA weights to `save_directory` (`pytorch_lora_weights.safetensors` by default).

        Args:
            transformer_lora_layers: The adapter's state dict without the adapter name, e.g.
                `peft.utils.get_peft_model_state_dict(transformer)`.
            transformer_lora_adapter_metadata (`dict`, *optional*): The adapter's `LoraConfig` as a dict
                (`transformer.peft_config[name].to_dict()`); saved with the weights so that a load restores its rank
                and `lora_alpha` (without it, alpha = rank is assumed).
            is_main_process, weight_name, save_function, safe_serialization: as in diffusers' loaders.
        """
        if not transformer_lora_layers:
            raise ValueError("`transformer_lora_layers` must be a non-empty LoRA state dict of the transformer")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] = [TRANSFORMER_NAME],  # noqa: B006 (diffusers' signature)
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Merge the active adapters (or `adapter_names`), times `lora_scale`, into the transformer's weights."""
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] = [TRANSFORMER_NAME], **kwargs: Any) -> None:  # noqa: B006
        """Undo `fuse_lora`: the base weights come back and the adapters act as separate layers again."""
        super().unfuse_lora(components=components, **kwargs)
