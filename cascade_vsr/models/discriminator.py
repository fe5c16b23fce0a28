"""The discriminator of adversarial post-training (SeedVR2 after APT): the stage's own transformer as its trunk,
initialised from the trained weights, plus cross-attention-only blocks at several depths that read the trunk's
tokens and produce one logit each. The tokens they read are also the features of the feature-matching loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from cascade_vsr.models.loading import SafeLoadingMixin
from cascade_vsr.models.transformer import CascadeVSRTransformer3DModel

# SeedVR2 reads blocks 16, 26 and 36 of its 36-block trunk.
DEFAULT_HEAD_DEPTHS = (16 / 36, 26 / 36, 1.0)


def default_head_layers(num_layers: int) -> tuple[int, ...]:
    """The 1-based trunk blocks whose outputs the heads read, at SeedVR2's relative depths."""
    return tuple(sorted({max(1, round(num_layers * depth)) for depth in DEFAULT_HEAD_DEPTHS}))


@dataclass
class CascadeVSRDiscriminatorOutput(BaseOutput):
    """`logits` (B, heads); `features`: the trunk's tokens (B, L, D) at each head's depth."""

    logits: torch.Tensor
    features: tuple[torch.Tensor, ...]


class DiscriminatorHead(nn.Module):
    """A cross-attention-only block: learned query tokens attend to the trunk's tokens, then a linear logit."""

    def __init__(self, dim: int, num_heads: int, num_queries: int = 1, eps: float = 1e-6):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * dim**-0.5)
        self.norm_tokens = nn.LayerNorm(dim, eps=eps)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        keys = self.norm_tokens(tokens)
        attended, _ = self.attention(queries, keys, keys, need_weights=False)
        return self.proj(self.norm_out(queries + attended)).mean(dim=(1, 2))


class CascadeVSRDiscriminator(SafeLoadingMixin, ModelMixin, ConfigMixin):
    """D(x, c): a clean (or lightly noised) HR latent clip `x` and its condition `c` -> one logit per head.

    Args:
        transformer: The trunk's config (a `CascadeVSRTransformer3DModel` config dict).
        head_layers: 1-based trunk blocks read by the heads (default: SeedVR2's relative depths).
        num_queries: Learned query tokens per head.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, transformer: dict, head_layers: tuple[int, ...] | None = None, num_queries: int = 1):
        super().__init__()
        self.trunk = CascadeVSRTransformer3DModel(**transformer)
        num_layers = self.trunk.config.num_layers
        head_layers = tuple(head_layers) if head_layers is not None else default_head_layers(num_layers)
        if not head_layers or any(not 1 <= layer <= num_layers for layer in head_layers):
            raise ValueError(f"`head_layers` must be trunk blocks in 1..{num_layers}, got {head_layers}")
        if num_queries < 1:
            raise ValueError(f"`num_queries` must be positive, got {num_queries}")
        self.head_layers = head_layers
        dim = self.trunk.config.num_attention_heads * self.trunk.config.attention_head_dim
        self.heads = nn.ModuleList(
            DiscriminatorHead(dim, self.trunk.config.num_attention_heads, num_queries) for _ in head_layers
        )
        # What no logit depends on stays frozen: the blocks after the deepest head, the output projection, and
        # the null text embedding (the discriminator reads the generator's text conditioning as given).
        unused = [*self.trunk.blocks[max(head_layers) :], self.trunk.norm_out, self.trunk.proj_out]
        for module in unused:
            module.requires_grad_(False)
        self.trunk.scale_shift_table.requires_grad_(False)
        self.trunk.null_text_embedding.requires_grad_(False)

    @classmethod
    def from_transformer(
        cls,
        transformer: CascadeVSRTransformer3DModel,
        head_layers: tuple[int, ...] | None = None,
        num_queries: int = 1,
    ) -> CascadeVSRDiscriminator:
        """A discriminator whose trunk starts as a copy of `transformer` (its config and weights)."""
        config = {key: value for key, value in transformer.config.items() if not key.startswith("_")}
        discriminator = cls(transformer=config, head_layers=head_layers, num_queries=num_queries)
        discriminator.trunk.load_state_dict(transformer.state_dict())
        parameter = next(transformer.parameters())
        discriminator = discriminator.to(parameter.device)
        return discriminator if parameter.dtype == torch.float32 else discriminator.to(parameter.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        condition: torch.Tensor,
        timestep: torch.Tensor | float,
        noise_aug_level: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> CascadeVSRDiscriminatorOutput | tuple:
        captured: dict[int, torch.Tensor] = {}
        handles = [
            self.trunk.blocks[layer - 1].register_forward_hook(
                lambda module, args, output, layer=layer: captured.__setitem__(layer, output)
            )
            for layer in self.head_layers
        ]
        try:
            self.trunk(
                sample,
                condition,
                timestep=timestep,
                noise_aug_level=noise_aug_level,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
            )
        finally:
            for handle in handles:
                handle.remove()
        features = tuple(captured[layer] for layer in self.head_layers)
        logits = torch.stack([head(tokens) for head, tokens in zip(self.heads, features)], dim=1)
        if not return_dict:
            return logits, features
        return CascadeVSRDiscriminatorOutput(logits=logits, features=features)
