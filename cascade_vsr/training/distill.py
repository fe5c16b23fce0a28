"""Progressive distillation in rounds (Salimans & Ho 2022; SeedVR2 section 3.3): the student of each round, which
samples in half its teacher's steps, is the teacher of the next, down to one step.

Round k trains `objective: distill` with `distill_teacher_steps` N / 2**k from the previous round's export, in
`<output_dir>/steps-<N>-to-<N/2>/` (a one-step teacher's self-ensemble: one round, `steps-1-to-1/`); the last
round's export is copied to `<output_dir>/export/`. A round whose export exists is done and skipped, so rerunning the
same command (with `resume_from_checkpoint: latest`) continues where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from cascade_vsr.training.checkpoint import complete_checkpoints
from cascade_vsr.training.config import DataConfig, ModelConfig, TrainConfig


def distillation_rounds(teacher_steps: int) -> list[int]:
    """The teacher step counts of the rounds: N, N/2, ..., 2 (N a power of two); a one-step teacher (distilling
    its self-ensemble) is one round, [1]."""
    if teacher_steps == 1:
        return [1]
    if teacher_steps < 2 or teacher_steps & (teacher_steps - 1):
        raise ValueError(
            f"`distill_teacher_steps` must be a power of two >= 2 for rounds down to 1, got {teacher_steps}"
        )
    rounds = []
    while teacher_steps >= 2:
        rounds.append(teacher_steps)
        teacher_steps //= 2
    return rounds


def distill(model_config: ModelConfig, data_config: DataConfig, train_config: TrainConfig) -> dict:
    """Run every round from `distill_teacher_steps` down to a one-step student; returns the rounds' summaries and
    the final export folder."""
    from cascade_vsr.training.trainer import train

    rounds = distillation_rounds(train_config.distill_teacher_steps)
    if model_config.pretrained_model_name_or_path is None:
        raise ValueError("`pretrained_model_name_or_path` must name the teacher (a trained stage) for distillation")
    output_dir = Path(train_config.output_dir)
    teacher = model_config.pretrained_model_name_or_path
    summaries = []
    for steps in rounds:
        round_dir = output_dir / f"steps-{steps}-to-{max(steps // 2, 1)}"
        export = round_dir / "export"
        if not (export / "model_index.json").is_file():
            resume = train_config.resume_from_checkpoint
            if resume == "latest" and not complete_checkpoints(round_dir / "checkpoints"):
                resume = None  # this round has not started
            summary = train(
                dataclasses.replace(model_config, pretrained_model_name_or_path=str(teacher)),
                data_config,
                dataclasses.replace(
                    train_config,
                    objective="distill",
                    distill_teacher_steps=steps,
                    output_dir=str(round_dir),
                    resume_from_checkpoint=resume,
                ),
            )
            summaries.append({"teacher_steps": steps, "steps": summary["steps"], "final_loss": summary["losses"][-1:]})
        teacher = export
    final = output_dir / "export"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(teacher, final)
    return {"rounds": summaries, "export_dir": str(final)}
