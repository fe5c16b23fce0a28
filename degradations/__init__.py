"""Training-pair synthesis for cascade-vsr: flow-based, model-guided and classic degradations, quality filters
and the pair-dataset builder (`build_dataset`, what `cascade-vsr make-pairs` runs; the folder format is
`cascade_vsr.pair_dataset`'s).

Installed as `cascade_vsr.degradations`; names are imported lazily (the model-guided part pulls in diffusers).
"""

from __future__ import annotations

from cascade_vsr._lazy import lazy_exports

_EXPORTS = {
    "FlowBasedDegradation": "cascade_vsr.degradations.flow_based",
    "FlowDegradationConfig": "cascade_vsr.degradations.flow_based",
    "ClassicDegradation": "cascade_vsr.degradations.classic",
    "ClassicDegradationConfig": "cascade_vsr.degradations.classic",
    "ModelGuidedDegradation": "cascade_vsr.degradations.model_guided",
    "ModelGuidedDegradationConfig": "cascade_vsr.degradations.model_guided",
    "QualityFilter": "cascade_vsr.degradations.quality",
    "QualityFilterConfig": "cascade_vsr.degradations.quality",
    "PairSettings": "cascade_vsr.degradations.pair_settings",
    "ClipSynthesizer": "cascade_vsr.degradations.pair_synthesis",
    "build_dataset": "cascade_vsr.degradations.make_pairs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
