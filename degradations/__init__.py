"""Training-pair synthesis for cascade-vsr: flow-based, model-guided and classic degradations, quality filters
and the pair-dataset builder (`cascade-vsr make-pairs`)."""

from __future__ import annotations

import importlib

# public name -> module that defines it (imported lazily: the model-guided part pulls in diffusers)
_LAZY_IMPORTS = {
    "FlowBasedDegradation": "degradations.flow_based",
    "FlowDegradationConfig": "degradations.flow_based",
    "compute_flow": "degradations.flow_based",
    "ClassicDegradation": "degradations.classic",
    "ClassicDegradationConfig": "degradations.classic",
    "ModelGuidedDegradation": "degradations.model_guided",
    "ModelGuidedDegradationConfig": "degradations.model_guided",
    "QualityFilter": "degradations.quality",
    "QualityFilterConfig": "degradations.quality",
}

__all__ = sorted(_LAZY_IMPORTS)


def __getattr__(name: str):
    if name in _LAZY_IMPORTS:
        value = getattr(importlib.import_module(_LAZY_IMPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'degradations' has no attribute {name!r}")
