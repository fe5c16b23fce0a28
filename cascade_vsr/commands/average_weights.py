"""`cascade-vsr average-weights STAGE STAGE [...] --output OUT`: the weight average of stages fine-tuned from one
model (a model soup), written as a stage folder that loads and samples like any of them."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Average the weights of stages fine-tuned from one model (a model soup) into a new stage folder."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stages", nargs="+", type=Path, metavar="STAGE", help="stage folders of one architecture")
    parser.add_argument("--output", "-o", type=Path, required=True, help="the averaged stage folder")
    parser.add_argument(
        "--weights", type=float, nargs="+", default=None, help="mixing weights, one per stage, summing to 1 (uniform)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from cascade_vsr.training.averaging import average_stages

    components = average_stages(args.stages, args.output, args.weights, args.overwrite)
    print(f"{args.output}: the average of {len(args.stages)} stages ({', '.join(components)})")
    return 0
