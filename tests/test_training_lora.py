"""A LoRA adapter trained by the trainer, exported, loaded into the pipeline: the output changes as trained."""

from __future__ import annotations

import pytest
import torch

from cascade_vsr import CascadeVSRPipeline
from cascade_vsr.training.config import load_config
from cascade_vsr.training.trainer import train

from ._recipes import tiny_args
from .test_training_run import SMALL

PIXEL_SPACE = ["--latent_space", "space_to_depth", "--patch_size", "1", "1", "1", "--use_ema", "false"]


def sample(pipe: CascadeVSRPipeline) -> torch.Tensor:
    video = torch.rand(1, 2, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    return pipe(
        video=video, scale=2, num_inference_steps=2, self_ensemble=1, generator=generator, output_type="pt"
    ).frames


def test_lora_trained_by_the_trainer_loads_into_the_pipeline(pairs, tmp_path):
    base = train(*load_config(None, tiny_args(pairs, tmp_path / "base", 4, *SMALL, *PIXEL_SPACE)))["export_dir"]
    lora_args = ["--pretrained_model_name_or_path", base, "--lora_rank", "4", "--learning_rate", "5e-2"]
    summary = train(*load_config(None, tiny_args(pairs, tmp_path / "lora", 6, *SMALL, *PIXEL_SPACE, *lora_args)))

    trained = summary["model"].transformer
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)  # only the adapter trained
    assert any(".to_out.0.lora_A" in n for n in names) and any(".to_q.lora_B" in n for n in names)

    pipe = CascadeVSRPipeline.from_pretrained(base)
    before = sample(pipe)
    pipe.load_lora_weights(summary["export_dir"])
    with_lora = sample(pipe)
    assert (with_lora - before).abs().max() > 1e-3  # the adapter changes the output ...

    as_trained = CascadeVSRPipeline.from_pretrained(base, transformer=trained.eval())
    torch.testing.assert_close(with_lora, sample(as_trained), atol=1e-5, rtol=1e-4)  # ... as it was trained
    pipe.disable_lora()
    torch.testing.assert_close(sample(pipe), before)


def test_lora_needs_a_base_model(pairs):
    with pytest.raises(ValueError, match="`lora_rank` adapts a trained stage"):
        load_config(None, tiny_args(pairs, "out", 1, "--lora_rank", "4"))
    with pytest.raises(ValueError, match="`lora_rank` must be >= 1"):
        load_config(None, tiny_args(pairs, "out", 1, "--lora_rank", "0", "--pretrained_model_name_or_path", "x"))
