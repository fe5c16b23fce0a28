"""Training throughput on this machine: steps/second of the tiny test config (through `train`, fp32) and of the
default ~1B config (one optimizer step of CascadeVSRTrainModule + AdamW, bf16 weights and optimizer states to fit
in CPU memory, batch 1, a small latent, gradient checkpointing). Also records the loss curve of the learning
recipe of tests/test_training_learn.py. Writes benchmarks/results/training.json.

    PYTHONPATH=. python benchmarks/training.py [--skip-default]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D  # noqa: E402
from cascade_vsr.training.config import load_config  # noqa: E402
from cascade_vsr.training.trainer import CascadeVSRTrainModule, train  # noqa: E402
from tests._pairs import build_pairs  # noqa: E402
from tests._recipes import LEARN_ARGS, LEARN_DATA, tiny_args  # noqa: E402


def tiny_run(root: Path, work: Path, steps: int) -> dict:
    """The learning recipe: steps/second and the loss curve."""
    summary = train(*load_config(None, tiny_args(root, work / "tiny", steps, *LEARN_ARGS)))
    return {"steps_per_second": summary["steps_per_second"], "losses": [round(x, 4) for x in summary["losses"]]}


def default_step(dtype: torch.dtype, size: tuple[int, int, int]) -> dict:
    """One AdamW step of the default (~1B) configuration on a (T, h, w) LR latent upsampled 2x."""
    torch.manual_seed(0)
    start = time.perf_counter()
    module = CascadeVSRTrainModule(LatentUpsampler3D(), CascadeVSRTransformer3DModel()).to(dtype)
    module.upsampler.enable_gradient_checkpointing()
    module.transformer.enable_gradient_checkpointing()
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in module.parameters())
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-5)
    frames, height, width = size
    lr = torch.randn(1, 16, frames, height, width, dtype=dtype)
    hr = torch.randn(1, 16, frames, 2 * height, 2 * width, dtype=dtype)
    times = []
    for _ in range(2):  # the first step allocates the optimizer states
        start = time.perf_counter()
        loss = module(
            hr, lr, torch.randn_like(hr), torch.tensor([0.5]), torch.randn_like(hr), torch.tensor([0.4]),
            torch.tensor([True]),
        )  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "parameters": params,
        "dtype": str(dtype).replace("torch.", ""),
        "lr_latent": [16, *size],
        "hr_latent": [16, frames, 2 * height, 2 * width],
        "build_seconds": round(build_s, 2),
        "first_step_seconds": round(times[0], 2),
        "step_seconds": round(times[1], 2),
        "steps_per_second": round(1 / times[1], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-steps", type=int, default=200, help="Steps of the learning recipe (its test: 200).")
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/training.json"))
    args = parser.parse_args()

    results = {
        "note": "2 CPU cores shared with other jobs (timings under contention)",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        root = build_pairs(work / "pairs", **LEARN_DATA)
        run = tiny_run(root, work, args.tiny_steps)
        results["tiny"] = {
            "config": "tests/_recipes.py LEARN_ARGS (batch 4, 8x16 HR latent crops, 48 channels)",
            "dtype": "float32",
            "steps": args.tiny_steps,
            "steps_per_second": round(run["steps_per_second"], 3),
            "loss_curve": run["losses"],
        }
    if not args.skip_default:
        results["default"] = default_step(torch.bfloat16, (1, 16, 16))
    print(f"{'config':<10} {'dtype':<10} {'steps/s':>10}")
    print(f"{'tiny':<10} {'float32':<10} {results['tiny']['steps_per_second']:>10}")
    if "default" in results:
        print(f"{'default':<10} {results['default']['dtype']:<10} {results['default']['steps_per_second']:>10}")
    path = Path(args.output)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    previous.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
