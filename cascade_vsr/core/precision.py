"""The dtype a stage runs in when the user leaves it to the library."""

from __future__ import annotations

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str, device: str) -> str:
    """`--dtype auto` -> bfloat16 on a CUDA GPU that supports it and on a CPU with AMX tiles (there its matrix
    products and attention run about 2x faster than in float32), float32 elsewhere; other names pass through."""
    import torch  # here, so that command lines import this module before torch

    if name != "auto":
        return name
    kind = torch.device(device).type
    if kind == "cuda":
        native = torch.cuda.is_bf16_supported()
    elif kind == "cpu":
        native = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    else:
        native = False
    return "bfloat16" if native else "float32"
