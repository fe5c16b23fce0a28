"""The feed-forward and the attention projections as fused oneDNN calls for bfloat16 inference on CPU.

`F.linear` on CPU first copies the broadcast bias into the output and then accumulates the product onto it, and an
activation after it is one more pass over the output. oneDNN's fused linear (the kernel that torch.compile's CPU
backend emits for Linear + GELU) adds the bias and applies the GELU to the float32 accumulator while it writes the
output: one pass instead of three. It is used only where it computes what the module would (a plain `nn.Linear`
whose weights have the input's dtype, no hooks, no autograd); everything else runs the module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward

# GELU's `approximate` -> oneDNN's GELU algorithm
_GELU_ALGORITHMS = {"none": "none", "tanh": "tanh"}


def _onednn_linear():
    """oneDNN's fused linear op, or None where this torch build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def unhooked(module: nn.Module) -> bool:
    """No forward hooks of torch's or of diffusers' (layerwise casting, group offloading) on the module itself."""
    return not (module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_diffusers_hook"))


def fused_linear_applies(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether `layers` may run as oneDNN calls on `x`: bfloat16 on CPU, outside autograd, each layer a plain
    `nn.Linear` (not a LoRA or other wrapper) with bfloat16 weights on the CPU and no hooks."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or torch.is_grad_enabled() or _onednn_linear() is None:
        return False
    for layer in layers:
        if type(layer) is not nn.Linear or not unhooked(layer):
            return False
        for param in (layer.weight, layer.bias):
            if param is not None and (param.dtype != x.dtype or param.device.type != "cpu"):
                return False
    return True


def linear_projections(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """`layer(x)` for each of `layers` (e.g. an attention's query, key and value projections): as one fused oneDNN
    call over their concatenated weights where it applies, the outputs then being views of its result; each module
    otherwise. One call reads x once and adds the biases as it writes, where `F.linear` copies each bias into its
    output first."""
    if not fused_linear_applies(x, *layers) or any(
        (layer.bias is None) != (layers[0].bias is None) for layer in layers
    ):
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers]) if len(layers) > 1 else layers[0].weight
    bias = None
    if layers[0].bias is not None:
        bias = torch.cat([layer.bias for layer in layers]) if len(layers) > 1 else layers[0].bias
    out = _onednn_linear()(x, weight, bias, "none", [], "")
    return tuple(out.split([layer.out_features for layer in layers], dim=-1))


def feed_forward(ffn: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """`ffn(x)` for diffusers' GELU FeedForward (projection + GELU, dropout, projection), its two products as fused
    oneDNN calls where they apply (inference, where dropout is the identity); any other form runs the module."""
    project_in, project_out = ffn.net[0], ffn.net[-1]
    if (
        type(project_in) is not GELU
        or project_in.approximate not in _GELU_ALGORITHMS
        or len(ffn.net) != 3
        or (ffn.training and ffn.net[1].p > 0)  # dropout that would drop something
        or not (unhooked(ffn) and unhooked(project_in))
        or not fused_linear_applies(x, project_in.proj, project_out)
    ):
        return ffn(x)
    onednn_linear, up = _onednn_linear(), project_in.proj
    hidden = onednn_linear(x, up.weight, up.bias, "gelu", [], _GELU_ALGORITHMS[project_in.approximate])
    return onednn_linear(hidden, project_out.weight, project_out.bias, "none", [], "")
