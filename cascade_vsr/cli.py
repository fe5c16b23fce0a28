"""The `cascade-vsr` command line.

Each sub-command lives in its own module, which exposes `HELP`, `add_arguments(parser)` and `run(args)`
and keeps its heavy imports inside `run`, so that `cascade-vsr --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module implementing it
COMMANDS = {
    "demo": "cascade_vsr.commands.demo",
    "make-pairs": "cascade_vsr.commands.make_pairs",
    "train": "cascade_vsr.commands.train",
    "calibrate-sampler": "cascade_vsr.commands.calibrate_sampler",
    "evaluate": "cascade_vsr.commands.evaluate",
    "upscale": "cascade_vsr.commands.upscale",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade-vsr", description="Latent-cascaded video super-resolution for text-to-video pipelines."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
