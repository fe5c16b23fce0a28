"""The `cascade-vsr` command line.

Each sub-command lives in its own module, which exposes `HELP`, `add_arguments(parser)` and `run(args)`
and keeps its heavy imports inside `run`, so that `cascade-vsr --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cascade_vsr.core.allocator import keep_freed_memory

# sub-command -> module implementing it
COMMANDS = {
    "demo": "cascade_vsr.commands.demo",
    "make-pairs": "cascade_vsr.commands.make_pairs",
    "train": "cascade_vsr.commands.train",
    "distill": "cascade_vsr.commands.distill",
    "average-weights": "cascade_vsr.commands.average_weights",
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
    """Run a sub-command; errors propagate as exceptions (for tests and scripts that call it)."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


# Errors that mean "the input was wrong": our own argument checks raise ValueError, missing files raise
# FileNotFoundError. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


def console_main(argv: list[str] | None = None) -> int:
    """The `cascade-vsr` command: a user error prints one line `cascade-vsr COMMAND: error: ...` and exits 2, as
    argparse does; `--debug` (or CASCADE_VSR_DEBUG=1) shows its traceback instead. glibc keeps freed buffers for
    reuse (`core.allocator`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CASCADE_VSR_DEBUG", "") not in ("", "0")
    argv = [word for word in argv if word != "--debug"]
    keep_freed_memory()
    try:
        return main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        command = next((word for word in argv if word in COMMANDS), None)
        prefix = f"cascade-vsr {command}" if command else "cascade-vsr"
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
