"""cascade-vsr: latent-cascaded video super-resolution (SimpleGVR) for text-to-video pipelines.

The public API is imported lazily, so `import cascade_vsr` stays cheap (no torch / diffusers import
until a name is used). The code lies in floors, each importing only the floors below it:
`core` <- `models` <- `pipelines` <- `degradations`, `pair_dataset`, `training` <- `commands` (CLI, demo).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "CascadeVSRPipeline",
    "CascadeVSRPipelineOutput",
    "CascadeVSRTransformer3DModel",
    "LatentUpsampler3D",
    "SpaceToDepthAutoencoder",
    "demo_model_path",
]


def demo_model_path(one_step: bool = False) -> Path:
    """The folder of a demo model, which ships with the package (the package data of `cascade_vsr.demo_model`, or
    of `cascade_vsr.demo_one_step_model`): `CascadeVSRPipeline.from_pretrained(demo_model_path())` is a working
    pixel-space stage with its own settings; `one_step=True` gives its one-step version (distilled and
    adversarially post-trained, demo/README.md)."""
    spec = importlib.util.find_spec("cascade_vsr.demo_one_step_model" if one_step else "cascade_vsr.demo_model")
    return Path(next(iter(spec.submodule_search_locations)))


__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "LatentUpsampler3D": "cascade_vsr.models.upsampler",
        "CascadeVSRTransformer3DModel": "cascade_vsr.models.transformer",
        "SpaceToDepthAutoencoder": "cascade_vsr.models.space_to_depth",
        "CascadeVSRPipeline": "cascade_vsr.pipelines.pipeline_cascade_vsr",
        "CascadeVSRPipelineOutput": "cascade_vsr.pipelines.pipeline_cascade_vsr",
    },
)

if TYPE_CHECKING:
    from cascade_vsr.models.space_to_depth import SpaceToDepthAutoencoder
    from cascade_vsr.models.transformer import CascadeVSRTransformer3DModel
    from cascade_vsr.models.upsampler import LatentUpsampler3D
    from cascade_vsr.pipelines.pipeline_cascade_vsr import CascadeVSRPipeline, CascadeVSRPipelineOutput
