"""`cascade-vsr train --config CONFIG [--name value ...]`: train or resume a stage (see configs/)."""

from __future__ import annotations

import argparse

HELP = "Train the upsampler and transformer on a pair dataset (launch with `accelerate launch` for DDP / FSDP)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="A JSON or YAML file of training settings (see configs/).")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="Overrides of config fields after `--`, e.g. `-- --max_train_steps 10 --learning_rate 1e-4`.",
    )


def run(args: argparse.Namespace) -> int:
    from cascade_vsr.training.config import load_config
    from cascade_vsr.training.trainer import train

    overrides = [a for a in args.overrides if a != "--"] if args.overrides else []
    summary = train(*load_config(args.config, overrides))
    print(f"trained {summary['steps']} steps; export: {summary['export_dir']}")
    return 0
