"""`cascade-vsr distill --config CONFIG [-- --name value ...]`: progressive distillation down to one step."""

from __future__ import annotations

import argparse

HELP = (
    "Distill a trained stage to one step in rounds (each student samples in half its teacher's steps); "
    "then `train` with `objective: adversarial` post-trains it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="Training settings (see configs/); `pretrained_model_name_or_path` is the teacher and "
        "`distill_teacher_steps` its step count (a power of two).",
    )
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="Overrides of config fields after `--`, as for `train`."
    )


def run(args: argparse.Namespace) -> int:
    from cascade_vsr.training.config import load_config
    from cascade_vsr.training.distill import distill

    overrides = [a for a in args.overrides if a != "--"] if args.overrides else []
    model_config, data_config, train_config = load_config(args.config, [*overrides, "--objective", "distill"])
    summary = distill(model_config, data_config, train_config)
    for item in summary["rounds"]:
        student_steps = max(item["teacher_steps"] // 2, 1)  # a one-step teacher's self-ensemble: 1 -> 1
        print(f"{item['teacher_steps']} -> {student_steps} steps: trained {item['steps']} steps")
    print(f"one-step export: {summary['export_dir']}")
    return 0
