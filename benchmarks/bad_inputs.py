"""Bad-input harness (issue 14): how each command and API reacts to one broken input, before and after hardening.

Run it with the interpreter whose `cascade_vsr` is to be measured; the label names the JSON it writes:

    /work/wt-before/.venv/bin/python benchmarks/bad_inputs.py --label before
    .venv/bin/python benchmarks/bad_inputs.py --label after
    .venv/bin/python benchmarks/bad_inputs.py --label after --only mp- --area cli-train --list

Every case breaks one thing in an otherwise valid, tiny invocation and runs in its own subprocess (a CLI call
`python -m cascade_vsr.cli ...`, or this script with `--child ID` for an API call) in its own temporary folder,
with the environment as it is (HF_HUB_OFFLINE and friends are neither set nor cleared). Each outcome is one class:

- clear: fails fast with a clear error. CLI: nonzero exit, no traceback in stderr, and stderr's last non-empty
  line names the case's keyword (an option, a field, a path). API: ValueError / TypeError / FileNotFoundError /
  KeyError whose message names the keyword.
- handled: succeeds, and the case's post-check finds the bad input dealt with correctly (counted with clear).
- raw: fails with a traceback, an unexpected exception type or a message that does not name the keyword.
- silent: succeeds although the input is bad, or the post-check finds a silently wrong result.
- crash-after-compute: fails only after the heavy work (the case's output marker, time threshold or leftovers on
  disk: a `.tmp` folder, a half-written output, a dataset that refuses the corrected re-run).
- hang: still running at the case's timeout, killed.

Shared fixtures are built once per run with the code under test (in `--fixtures DIR`, a temporary folder by
default): a 4-clip pixel-space pair dataset made by `make-pairs` from the real bigbuckbunny.mp4, a tiny stage
trained 2 steps by `train` (configs/tiny.yaml's settings, embedded below) with its checkpoints and export, and small
PNG frame folders of the same clip. The shipped demo model is used as it is. The table (counts per class and
per area, then one row per case) is printed and written with every record to
benchmarks/results/bad_inputs_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
CLASSES = ("clear", "handled", "raw", "silent", "crash-after-compute", "hang", "skipped")
EXPECTED_TYPES = (ValueError, TypeError, FileNotFoundError, KeyError)
TRACEBACK = "Traceback (most recent call last)"
TQDM = r"\|\s*\d+/\d+ \["  # a progress bar: work had started

# configs/tiny.yaml's stage, trained 2 steps (embedded so that the cases do not follow edits of the file)
TINY = {
    "num_latent_frames": 2,
    "crop_size": [8, 12],
    "latent_channels": 48,
    "latent_space": "space_to_depth",
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "ffn_dim": 64,
    "text_dim": 16,
    "patch_size": [1, 1, 1],
    "condition_residual_std": 0.06,
    "upsampler_hidden_channels": 16,
    "upsampler_num_blocks": 1,
    "train_batch_size": 2,
    "max_train_steps": 2,
    "learning_rate": 3.0e-4,
    "lr_warmup_steps": 1,
    "use_ema": False,
    "noise_aug_min": 0.0,
    "noise_aug_max": 0.1,
    "timestep_sampler": "uniform",
    "checkpointing_steps": 100,
    "report_to": "none",
    "sampling_num_inference_steps": 2,
    "sampling_noise_frame_correlation": 1.0,
}


# ------------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    id: str
    area: str
    origin: str  # "issue" (named in issue 14) or "own"
    keyword: tuple[str, ...]  # any of these (case-insensitive) in the error message
    args: Callable[[Path, dict], list[str]] | None = None  # CLI: words after `cascade-vsr`
    func: Callable[[Context], Any] | None = None  # API: runs in the child; returns observations (JSON)
    setup: Callable[[Path, dict], None] | None = None  # prepares files in the case folder (parent)
    check: Callable[[Path, dict, dict], str | None] | None = None  # (tmp, fixtures, outcome) -> class or None
    timeout: float = 120.0
    compute_marker: str | None = None  # regex in the output that shows the heavy work ran
    compute_seconds: float | None = None  # a failure later than this (plus the import time) is after compute
    needs: tuple[str, ...] = ()  # fixtures: "pairs", "run"
    note: str = ""


CASES: list[Case] = []


def cli(id, area, args, keyword, origin="own", **options):
    keyword = (keyword,) if isinstance(keyword, str) else tuple(keyword)
    CASES.append(Case(id, area, origin, keyword, args=args, **options))


def api(id, area, keyword, origin="own", **options):
    """Decorator: the function is the API case's body (run in the child)."""
    keyword = (keyword,) if isinstance(keyword, str) else tuple(keyword)

    def register(func):
        CASES.append(Case(id, area, origin, keyword, func=func, **options))
        return func

    return register


# ----------------------------------------------------------------------------------------------- helpers


def write_config(path: Path, fx: dict, tmp: Path, **changes) -> Path:
    """The tiny training config (JSON text, which YAML reads) with `changes`; a value None drops the field."""
    config = {"data_dir": fx["pairs"], "output_dir": str(tmp / "run"), **TINY}
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=1))
    return path


def copy_pairs(tmp: Path, fx: dict) -> Path:
    target = tmp / "pairs"
    shutil.copytree(fx["pairs"], target)
    return target


def manifest(root: Path) -> list[dict]:
    path = Path(root) / "manifest.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_manifest(root: Path, records: list[dict]) -> None:
    (Path(root) / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def edit_latents(root: Path, index: int, edit: Callable) -> str:
    """Rewrite clip `index`'s latents.safetensors with `edit(tensors)` (metadata kept); returns the clip id."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    record = manifest(root)[index]
    path = Path(root) / record["latents"]
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(edit(tensors), str(path), metadata=metadata)
    return record["id"]


def nonfinite_weights(folder: Path) -> bool:
    from safetensors.torch import load_file

    files = list(Path(folder).rglob("*.safetensors"))
    return any(not t.isfinite().all() for f in files for t in load_file(str(f)).values() if t.is_floating_point())


def leftovers(root: Path) -> list[str]:
    """Temporary or partial files under `root`."""
    if not Path(root).exists():
        return []
    names = [p for p in Path(root).rglob("*") if re.search(r"\.tmp|\.partial|tmp[-_]", p.name)]
    return [str(p.relative_to(root)) for p in names]


def run_cli(words: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cascade_vsr.cli", *words], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def output_text(outcome: dict) -> str:
    return outcome.get("stdout", "") + outcome.get("stderr", "")


# ------------------------------------------------------------------------------------- cli-make-pairs


def mp_base(tmp: Path, fx: dict, *extra: str, drop: tuple[str, ...] = (), video: str | None = None) -> list[str]:
    """A valid tiny make-pairs call (6 clips of 2 frames at 64x96 in pixel space), then `extra`."""
    options = {
        "--output-dir": [str(tmp / "out")],
        "--num-frames": ["2"],
        "--hr-size": ["64", "96"],
        "--lr-scale": ["0.5"],
        "--upstream": ["space_to_depth"],
        "--degradations": ["classic1=1,none=1"],
        "--frame-range": ["0", "12"],
    }
    words = ["make-pairs", video or fx["video"]]
    for name, values in options.items():
        if name not in drop and name not in extra:
            words += [name, *values]
    return words + ["--no-quality-filter", *extra]


def clips_written(expected: int):
    """Post-check: success is `handled` only when exactly `expected` clips were written (else silent)."""

    def check(tmp: Path, fx: dict, outcome: dict) -> str | None:
        if not outcome["ok"]:
            return None
        count = len(manifest(tmp / "out"))
        outcome["observed"] = f"{count} clips written"
        return "handled" if count == expected else "silent"

    return check


def corrected_rerun(tmp: Path, fx: dict, outcome: dict) -> str | None:
    """A failure that left a `.tmp` folder or a dataset that refuses the corrected re-run is after compute."""
    if outcome["ok"]:
        return None
    left = leftovers(tmp / "out")
    rerun = run_cli(mp_base(tmp, fx), tmp) if (tmp / "out").exists() else None
    refused = rerun is not None and rerun.returncode != 0
    outcome["observed"] = f"leftovers {left[:3]}; corrected re-run " + (
        "not needed" if rerun is None else "refused" if refused else "accepted"
    )
    return "crash-after-compute" if left or refused else None


def mp(id, extra, keyword, origin="own", **options):
    cli(id, "cli-make-pairs", lambda tmp, fx: mp_base(tmp, fx, *extra), keyword, origin, **options)


mp("mp-max-clips-neg", ["--max-clips-per-video", "-1"], "--max-clips-per-video", "issue", check=clips_written(-1))
mp("mp-max-clips-zero", ["--max-clips-per-video", "0"], "--max-clips-per-video", "issue", check=clips_written(-1))
mp("mp-clip-step-neg", ["--clip-step", "-2"], "--clip-step", "issue", check=clips_written(-1))
mp("mp-clip-step-zero", ["--clip-step", "0"], "--clip-step", "issue", check=clips_written(-1))
mp("mp-crf-100", ["--crf", "100"], "--crf", "issue", check=corrected_rerun, compute_marker=TQDM)
mp("mp-crf-neg5", ["--crf", "-5"], "--crf", "issue", check=corrected_rerun, compute_marker=TQDM)
mp("mp-sdedit-steps-0", ["--sdedit-steps", "0"], "--sdedit-steps", "issue")
mp("mp-preview-neg", ["--preview", "-1"], "--preview", "issue")
cli(
    "mp-text-embeds-no-upstream",
    "cli-make-pairs",
    lambda tmp, fx: mp_base(tmp, fx, "--text-embeds", drop=("--upstream",)),
    ("--text-embeds", "--upstream"),
    "issue",
)


def smaller_source(tmp: Path, fx: dict, outcome: dict) -> str | None:
    """carphone (176x144) at --hr-size 192 320: handled when the clips are rejected (logged), silent if made."""
    if not outcome["ok"]:
        return None
    written = len(manifest(tmp / "out"))
    rejected = (tmp / "out" / "rejected.jsonl").is_file()
    outcome["observed"] = f"{written} clips written, rejected.jsonl {'present' if rejected else 'absent'}"
    return "handled" if written == 0 and rejected else "silent"


cli(
    "mp-source-smaller-than-hr",
    "cli-make-pairs",
    lambda tmp, fx: mp_base(tmp, fx, "--hr-size", "192", "320", video=fx["carphone"]),
    ("--hr-size", "smaller"),
    "issue",
    check=smaller_source,
)
cli(
    "mp-output-dir-proc",
    "cli-make-pairs",
    lambda tmp, fx: mp_base(tmp, fx, "--output-dir", "/proc/x"),
    "/proc/x",
    "issue",
)
mp("mp-num-frames-0", ["--num-frames", "0"], "--num-frames")
mp("mp-num-frames-1", ["--num-frames", "1"], "--num-frames")
mp("mp-stride-0", ["--stride", "0"], "--stride")
mp("mp-stride-huge", ["--stride", "100000"], "--stride", check=clips_written(-1))
mp("mp-hr-size-0", ["--hr-size", "0", "0"], "--hr-size")
mp("mp-hr-size-odd", ["--hr-size", "65", "96"], "--hr-size")
mp("mp-lr-scale-0", ["--lr-scale", "0"], "--lr-scale")
mp("mp-lr-scale-1.5", ["--lr-scale", "1.5"], "--lr-scale")
mp("mp-lr-scale-nan", ["--lr-scale", "nan"], "--lr-scale")
mp("mp-degradations-bad-weight", ["--degradations", "classic1=abc"], "--degradations")
mp("mp-degradations-unknown", ["--degradations", "bogus=1"], "--degradations")
mp("mp-degradations-negative", ["--degradations", "classic1=-1,none=1"], "--degradations")
mp("mp-degradations-all-zero", ["--degradations", "classic1=0"], "--degradations")
mp("mp-degradations-nan", ["--degradations", "classic1=nan"], "--degradations")
mp("mp-classic-options-list", ["--classic-options", "[1, 2]"], "--classic-options")
mp("mp-classic-options-unknown", ["--classic-options", '{"bogus": 1}'], ("--classic-options", "bogus"))
mp("mp-classic-options-not-json", ["--classic-options", "not json"], "--classic-options")
mp("mp-still-fraction-2", ["--still-fraction", "2"], "--still-fraction")
mp("mp-still-noise-nan", ["--still-noise", "nan"], "--still-noise")
mp("mp-alpha-reversed", ["--alpha", "0.5", "0.3"], "--alpha")
mp("mp-alpha-nan", ["--alpha", "nan", "nan"], "--alpha")
mp("mp-frame-range-reversed", ["--frame-range", "10", "5"], "--frame-range")
mp("mp-frame-range-past-end", ["--frame-range", "100000", "100010"], "--frame-range", check=clips_written(-1))
mp("mp-upstream-missing", ["--upstream", "./nope"], ("--upstream", "nope"))
mp("mp-num-workers-neg", ["--num-workers", "-1"], "--num-workers")
mp("mp-quality-score-bad", ["--quality-score", "no_such_module:score"], ("--quality-score", "no_such_module"))
mp("mp-seed-neg", ["--seed", "-1"], "--seed")
mp("mp-min-quality-score-nan", ["--min-quality-score", "nan"], "--min-quality-score")
cli(
    "mp-input-missing",
    "cli-make-pairs",
    lambda tmp, fx: mp_base(tmp, fx, video=str(tmp / "nope.mp4")),
    "nope.mp4",
)


def corrupt_video(tmp: Path, fx: dict) -> None:
    (tmp / "bad.mp4").write_bytes(os.urandom(4096))


cli(
    "mp-input-corrupted",
    "cli-make-pairs",
    lambda tmp, fx: mp_base(tmp, fx, video=str(tmp / "bad.mp4")),
    "bad.mp4",
    setup=corrupt_video,
)


def output_is_file(tmp: Path, fx: dict) -> None:
    (tmp / "out").write_text("a file, not a folder")


cli("mp-output-dir-is-file", "cli-make-pairs", lambda tmp, fx: mp_base(tmp, fx), "out", setup=output_is_file)


def broken_dataset_json(tmp: Path, fx: dict) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "dataset.json").write_text("{not json")


cli(
    "mp-dataset-json-corrupted",
    "cli-make-pairs",
    lambda tmp, fx: mp_base(tmp, fx),
    "dataset.json",
    setup=broken_dataset_json,
)


# ------------------------------------------------------------------------------------------- cli-train


def train_args(tmp: Path, fx: dict) -> list[str]:
    return ["train", "--config", str(tmp / "config.yaml")]


def config_setup(**changes):
    def setup(tmp: Path, fx: dict) -> None:
        write_config(tmp / "config.yaml", fx, tmp, **changes)

    return setup


def exported_nonfinite(tmp: Path, fx: dict, outcome: dict) -> str | None:
    """Trained on non-finite data: silent when it exits 0 (worst: non-finite weights exported), after compute
    when it fails but left an export with non-finite weights."""
    export = tmp / "run" / "export"
    bad = export.is_dir() and nonfinite_weights(export)
    outcome["observed"] = (
        "export has non-finite weights" if bad else f"export {'finite' if export.is_dir() else 'absent'}"
    )
    if outcome["ok"]:
        return "silent"
    return "crash-after-compute" if bad else None


def tr(id, keyword, origin="own", setup=None, check=None, **changes):
    cli(
        id,
        "cli-train",
        train_args,
        keyword,
        origin,
        setup=setup or config_setup(**changes),
        check=check,
        needs=("pairs",),
    )


def nonfinite_latents(value: float):
    def setup(tmp: Path, fx: dict) -> None:
        root = copy_pairs(tmp, fx)

        def edit(tensors):
            return {k: (v.fill_(value) if k in ("lr_latents", "hr_latents") else v) for k, v in tensors.items()}

        edit_latents(root, 1, edit)
        write_config(tmp / "config.yaml", fx, tmp, data_dir=str(root), max_train_steps=6)

    return setup


tr("tr-latents-nan", ("non-finite", "nan", "not finite"), "issue", setup=nonfinite_latents(float("nan")),
   check=exported_nonfinite)  # fmt: skip
tr("tr-latents-inf", ("non-finite", "inf", "not finite"), "issue", setup=nonfinite_latents(float("inf")),
   check=exported_nonfinite)  # fmt: skip


def truncated_latents(tmp: Path, fx: dict) -> None:
    root = copy_pairs(tmp, fx)
    path = root / manifest(root)[1]["latents"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    write_config(tmp / "config.yaml", fx, tmp, data_dir=str(root))


tr("tr-latents-truncated", ("latents.safetensors", "-0000002"), "issue", setup=truncated_latents)
tr("tr-crop-size-int", "crop_size", "issue", crop_size=4)


def raw_config(text: str):
    def setup(tmp: Path, fx: dict) -> None:
        (tmp / "config.yaml").write_text(text)

    return setup


tr("tr-config-empty", "config", "issue", setup=raw_config(""))
tr("tr-config-list", "config", "issue", setup=raw_config("- data_dir: pairs\n- num_layers: 2\n"))


def copy_run(tmp: Path, fx: dict) -> Path:
    target = tmp / "run"
    shutil.copytree(fx["run"], target)
    return target


def resume_setup(**changes):
    def setup(tmp: Path, fx: dict) -> None:
        copy_run(tmp, fx)
        write_config(tmp / "config.yaml", fx, tmp, resume_from_checkpoint="latest", max_train_steps=3, **changes)

    return setup


cli("tr-resume-other-num-layers", "cli-train", train_args, "num_layers", "issue",
    setup=resume_setup(num_layers=3), needs=("pairs", "run"))  # fmt: skip
cli("tr-pretrained-nope", "cli-train", train_args, ("./nope", "nope"), "issue",
    setup=config_setup(pretrained_model_name_or_path="./nope"), needs=("pairs",), timeout=60)  # fmt: skip


def manifest_path(kind: str):
    def setup(tmp: Path, fx: dict) -> None:
        root = copy_pairs(tmp, fx)
        records = manifest(root)
        elsewhere = tmp / "elsewhere"
        shutil.copytree(root / "clips" / records[0]["id"], elsewhere / records[0]["id"])
        target = elsewhere / records[0]["id"] / "latents.safetensors"
        records[0]["latents"] = str(target) if kind == "absolute" else os.path.relpath(target, root)
        write_manifest(root, records)
        shutil.rmtree(root / "clips" / records[0]["id"])  # only the outside copy exists
        write_config(tmp / "config.yaml", fx, tmp, data_dir=str(root))

    return setup


tr("tr-manifest-absolute-path", ("outside", "elsewhere", "absolute"), "issue", setup=manifest_path("absolute"))
tr("tr-manifest-dotdot-path", ("outside", "elsewhere", ".."), "issue", setup=manifest_path("relative"))


class Payload:
    """A pickle that, when loaded, writes the marker file: proof that loading a checkpoint executed code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


# the files of registered objects, which accelerate's load_state unpickles without restriction (full pickle)
ACCELERATE_PICKLES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl")


def planted_pickle(tmp: Path, fx: dict) -> None:
    """A payload under the names accelerate's load_state unpickles without restriction, whether the checkpoint has
    those files or not."""
    import torch

    run = copy_run(tmp, fx)
    checkpoint = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    for name in ACCELERATE_PICKLES:
        torch.save(Payload(str(tmp / "MARKER")), checkpoint / name)
    write_config(tmp / "config.yaml", fx, tmp, resume_from_checkpoint="latest", max_train_steps=3)


def marker_check(tmp: Path, fx: dict, outcome: dict) -> str | None:
    ran = (tmp / "MARKER").exists()
    outcome["observed"] = "planted code ran" if ran else "planted code did not run"
    if ran:
        return "silent"
    return "clear" if not outcome["ok"] else "handled"


cli("tr-resume-planted-pickle", "cli-train", train_args, ("pickle", "checkpoint"), "issue",
    setup=planted_pickle, check=marker_check, needs=("pairs", "run"))  # fmt: skip


def string_number(tmp: Path, fx: dict) -> None:
    """YAML reads `1e-4` (no dot) as a string: a number that arrives as text."""
    path = write_config(tmp / "config.json", fx, tmp, learning_rate=None, max_train_steps=None)
    config = json.loads(path.read_text())
    lines = [f"{key}: {json.dumps(value)}" for key, value in config.items()]
    (tmp / "config.yaml").write_text("\n".join(lines) + '\nlearning_rate: 1e-4\nmax_train_steps: "2"\n')


def converted_numbers(tmp: Path, fx: dict, outcome: dict) -> str | None:
    """Handled when the run used the numbers the strings spell (argparse converts string defaults)."""
    if not outcome["ok"]:
        return None
    config = json.loads((tmp / "run" / "config.json").read_text())
    used = (config.get("learning_rate"), config.get("max_train_steps"))
    outcome["observed"] = f"run used learning_rate, max_train_steps = {used!r}"
    return "handled" if used == (1e-4, 2) else "silent"


tr(
    "tr-numbers-as-strings",
    ("learning_rate", "max_train_steps"),
    "issue",
    setup=string_number,
    check=converted_numbers,
)
tr("tr-data-dir-missing", ("data_dir", "nope"), data_dir="./nope")
tr("tr-max-train-steps-0", "max_train_steps", max_train_steps=0)
tr("tr-learning-rate-nan", "learning_rate", learning_rate=float("nan"))
tr("tr-learning-rate-neg", "learning_rate", learning_rate=-1.0)
tr("tr-noise-aug-reversed", "noise_aug", noise_aug_min=0.8, noise_aug_max=0.2)
tr("tr-crop-size-zero", "crop_size", crop_size=[0, 0])
tr("tr-crop-size-too-large", "crop_size", crop_size=[64, 64])
tr("tr-crop-size-three", "crop_size", crop_size=[8, 12, 4])
tr("tr-num-latent-frames-0", "num_latent_frames", num_latent_frames=0)
tr("tr-num-latent-frames-99", "num_latent_frames", num_latent_frames=99)
tr("tr-unknown-key", "bogus_key", bogus_key=1)
tr("tr-latent-channels-mismatch", "latent_channels", latent_channels=16)
tr("tr-batch-larger-than-dataset", ("train_batch_size", "clips"), train_batch_size=8)
tr("tr-max-grad-norm-inf", "max_grad_norm", max_grad_norm=float("inf"))
tr("tr-ema-decay-1", "ema_decay", use_ema=True, ema_decay=1.0)
tr("tr-timestep-curve-missing", ("timestep_curve", "nope.json"), timestep_sampler="detail_aware",
   timestep_curve="./nope.json")  # fmt: skip
tr("tr-resume-missing", "resume_from_checkpoint", resume_from_checkpoint="./nope")
tr("tr-attention-mode-bogus", "attention_mode", attention_mode="bogus")
tr("tr-mixed-precision-fp8", "mixed_precision", mixed_precision="fp8")
tr("tr-text-dropout-2", "text_dropout", text_dropout=2.0)
tr("tr-gradient-accumulation-neg", "gradient_accumulation_steps", gradient_accumulation_steps=-1)
tr("tr-num-layers-0", "num_layers", num_layers=0)
tr("tr-yaml-syntax-error", "config.yaml", setup=raw_config("data_dir: [unclosed\nnum_layers: : 2\n"))
cli("tr-config-missing", "cli-train", lambda tmp, fx: ["train", "--config", str(tmp / "nope.yaml")], "nope.yaml")
cli("tr-override-not-a-number", "cli-train", lambda tmp, fx: [*train_args(tmp, fx), "--", "--max_train_steps", "abc"],
    "max_train_steps", setup=config_setup(), needs=("pairs",))  # fmt: skip


def manifest_garbage_line(tmp: Path, fx: dict) -> None:
    root = copy_pairs(tmp, fx)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    lines.insert(1, "{this is not json")
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    write_config(tmp / "config.yaml", fx, tmp, data_dir=str(root))


tr("tr-manifest-garbage-line", ("manifest", "line 2"), setup=manifest_garbage_line)


def latents_missing(tmp: Path, fx: dict) -> None:
    root = copy_pairs(tmp, fx)
    (root / manifest(root)[2]["latents"]).unlink()
    write_config(tmp / "config.yaml", fx, tmp, data_dir=str(root))


tr("tr-latents-missing", ("latents.safetensors", "-0000004"), setup=latents_missing)


def latents_wrong_channels(tmp: Path, fx: dict) -> None:
    root = copy_pairs(tmp, fx)
    edit_latents(root, 1, lambda t: {k: (v[:16].contiguous() if v.ndim >= 4 else v) for k, v in t.items()})
    write_config(tmp / "config.yaml", fx, tmp, data_dir=str(root))


tr("tr-latents-wrong-channels", ("channels", "-0000002", "latent"), setup=latents_wrong_channels)


# ----------------------------------------------------------------------------------------- cli-upscale


def up_base(tmp: Path, fx: dict, *extra: str, model: str | None = None) -> list[str]:
    """A valid tiny upscale call (4 frames 32x48 -> 2x with the demo model, 1 step, 1 run), then `extra`."""
    words = ["upscale", fx["lr_frames"], "--output", str(tmp / "out.mp4"), "--num-inference-steps", "1"]
    words += ["--self-ensemble", "1", "--chunk-frames", "4", "--chunk-overlap", "1"]
    if "--scale" not in extra and "--size" not in extra:
        words += ["--scale", "2"]
    return words + (["--model", model] if model else []) + list(extra)


def up(id, extra, keyword, origin="own", **options):
    cli(id, "cli-upscale", lambda tmp, fx: up_base(tmp, fx, *extra), keyword, origin, **options)


up("up-device-cuda7", ["--device", "cuda:7"], "cuda:7", "issue", compute_marker=r"Loading pipeline components")
up("up-scale-0", ["--scale", "0"], "--scale")
up("up-scale-nan", ["--scale", "nan"], "--scale")
up("up-scale-inf", ["--scale", "inf"], "--scale")
up("up-size-0", ["--size", "0", "0"], "--size")
up("up-crf-neg", ["--crf", "-1"], "--crf", compute_marker=TQDM)
up("up-crf-100", ["--crf", "100"], "--crf", compute_marker=TQDM)
up("up-chunk-frames-0", ["--chunk-frames", "0"], "--chunk-frames")
up("up-chunk-overlap-too-big", ["--chunk-overlap", "8"], "--chunk-overlap")
up("up-tile-0", ["--tile", "0"], "--tile")
up("up-tile-overlap-neg", ["--tile", "16", "--tile-overlap", "-1"], "--tile-overlap")
up("up-steps-0", ["--num-inference-steps", "0"], "--num-inference-steps")
up("up-noise-aug-2", ["--noise-aug-strength", "2"], "--noise-aug-strength")
up("up-noise-frame-correlation-nan", ["--noise-frame-correlation", "nan"], "--noise-frame-correlation")
up("up-guidance-nan", ["--guidance-scale", "nan"], "--guidance-scale")
up("up-self-ensemble-9", ["--self-ensemble", "9"], "--self-ensemble")
up("up-codec-bogus", ["--codec", "bogus"], ("--codec", "bogus"), compute_marker=TQDM)
up("up-pix-fmt-bogus", ["--pix-fmt", "bogus"], ("--pix-fmt", "bogus"), compute_marker=TQDM)
up("up-bitrate-neg", ["--bitrate", "-1"], "--bitrate", compute_marker=TQDM)
up("up-reference-missing", ["--reference", "./nope.mp4"], ("--reference", "nope.mp4"), compute_marker=TQDM)
up("up-output-proc", ["--output", "/proc/x/out.mp4"], "/proc/x", compute_marker=TQDM)
cli("up-model-nope", "cli-upscale", lambda tmp, fx: up_base(tmp, fx, model="./nope"), ("./nope", "--model"),
    timeout=60)  # fmt: skip
cli("up-input-missing", "cli-upscale", lambda tmp, fx: [*up_base(tmp, fx)[:1], str(tmp / "nope.mp4"),
    *up_base(tmp, fx)[2:]], "nope.mp4")  # fmt: skip
cli("up-input-corrupted", "cli-upscale", lambda tmp, fx: [*up_base(tmp, fx)[:1], str(tmp / "bad.mp4"),
    *up_base(tmp, fx)[2:]], "bad.mp4", setup=corrupt_video)  # fmt: skip


def existing_output(tmp: Path, fx: dict) -> None:
    (tmp / "out.mp4").write_bytes(b"an earlier result")


def kept_output(tmp: Path, fx: dict, outcome: dict) -> str | None:
    if (tmp / "out.mp4").read_bytes() != b"an earlier result":
        outcome["observed"] = "existing output replaced"
        return "silent"
    return "handled" if outcome["ok"] else None


up("up-output-exists", [], "--overwrite", setup=existing_output, check=kept_output)


def pickle_bin_model(tmp: Path, fx: dict) -> None:
    """A copy of the trained export whose transformer weights are a torch.save pickle (.bin)."""
    import torch
    from safetensors.torch import load_file

    model = tmp / "model"
    shutil.copytree(Path(fx["run"]) / "export", model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()


cli("up-model-pickle-bin", "cli-upscale", lambda tmp, fx: up_base(tmp, fx, model=str(tmp / "model")),
    "safetensors", "issue", setup=pickle_bin_model, needs=("run",))  # fmt: skip


# --------------------------------------------------------------------------------------------- cli-demo


def demo_base(tmp: Path, fx: dict, *extra: str) -> list[str]:
    """The cheapest demo: carphone only, 64x64, 1 step, 1 run, 4 frames, then `extra`."""
    words = ["demo", "--output-dir", str(tmp / "demo"), "--clips", "carphone", "--hr-size", "64", "64"]
    words += ["--num-inference-steps", "1", "--self-ensemble", "1", "--crop-size", "16", "--zoom", "1", "--device"]
    words += ["cpu"]
    given = set(extra)
    if "--num-frames" not in given:
        words += ["--num-frames", "4"]
    if "--device" in given:
        words = words[: words.index("--device")] + words[words.index("--device") + 2 :]
    return words + list(extra)


def recorded_frames(tmp: Path, fx: dict, outcome: dict) -> str | None:
    """metrics.json must record the frames that were used."""
    if not outcome["ok"]:
        return None
    metrics = json.loads((tmp / "demo" / "metrics.json").read_text())
    first, last = metrics["clips"]["carphone"]["frames"]
    recorded = metrics["settings"]["num_frames"]
    outcome["observed"] = f"used {last - first} frames, metrics.json records {recorded}"
    return "handled" if recorded == last - first else "silent"


def dm(id, extra, keyword, origin="own", **options):
    cli(id, "cli-demo", lambda tmp, fx: demo_base(tmp, fx, *extra), keyword, origin, **options)


dm("demo-num-frames-100000", ["--num-frames", "100000"], "--num-frames", "issue", check=recorded_frames, timeout=240)
dm("demo-hr-size-60", ["--hr-size", "60", "60"], "--hr-size")
dm("demo-noise-aug-nan", ["--noise-aug-strength", "nan"], "--noise-aug-strength")
dm("demo-model-nope", ["--model", "./nope"], ("./nope", "--model"), timeout=60)
dm("demo-device-cuda7", ["--device", "cuda:7"], "cuda:7", compute_marker=r"Loading pipeline components")
dm("demo-crop-size-1000", ["--crop-size", "1000"], "--crop-size", check=None, compute_marker=TQDM)
dm("demo-output-dir-proc", ["--output-dir", "/proc/x"], "/proc/x", compute_marker=TQDM)
dm("demo-num-frames-1", ["--num-frames", "1"], "--num-frames")


# ----------------------------------------------------------------------------------------- cli-evaluate


def ev(id, words, keyword, origin="own", **options):
    cli(id, "cli-evaluate", lambda tmp, fx: ["evaluate", *words(tmp, fx)], keyword, origin, **options)


ev("ev-gt-missing", lambda tmp, fx: [fx["hr_frames"], str(tmp / "nope")], "nope")
ev("ev-size-mismatch", lambda tmp, fx: [fx["lr_frames"], fx["hr_frames"]], ("size", "shape"))
ev("ev-scale-0", lambda tmp, fx: [fx["hr_frames"], fx["hr_frames"], "--baseline", "bicubic", "--scale", "0"],
   "--scale")  # fmt: skip
ev("ev-num-frames-0", lambda tmp, fx: [fx["hr_frames"], fx["hr_frames"], "--num-frames", "0"], "--num-frames")
ev("ev-json-proc", lambda tmp, fx: [fx["hr_frames"], fx["hr_frames"], "--json", "/proc/x.json"], "/proc/x")
ev("ev-lr-missing", lambda tmp, fx: [fx["hr_frames"], fx["hr_frames"], "--baseline", "bicubic", "--lr",
   str(tmp / "nope")], ("--lr", "nope"))  # fmt: skip


def fewer_frames(tmp: Path, fx: dict) -> None:
    shutil.copytree(fx["hr_frames"], tmp / "short")
    sorted((tmp / "short").glob("*.png"))[-1].unlink()


ev("ev-frame-count-mismatch", lambda tmp, fx: [str(tmp / "short"), fx["hr_frames"]], "frames", setup=fewer_frames)


def one_frame(tmp: Path, fx: dict) -> None:
    (tmp / "one").mkdir()
    shutil.copy(sorted(Path(fx["hr_frames"]).glob("*.png"))[0], tmp / "one")


ev("ev-single-frame", lambda tmp, fx: [str(tmp / "one"), str(tmp / "one")], "frame", setup=one_frame)


# ---------------------------------------------------------------------------------------- cli-calibrate


def cal_base(tmp: Path, fx: dict, *extra: str) -> list[str]:
    words = ["calibrate-sampler", "--model", str(Path(fx["run"]) / "export"), "--data", fx["pairs"]]
    words += ["--output", str(tmp / "curve.json"), "--num-clips", "4", "--num-steps", "8"]
    return words + list(extra)


def cal(id, extra, keyword, origin="own", **options):
    cli(id, "cli-calibrate", lambda tmp, fx: cal_base(tmp, fx, *extra), keyword, origin, needs=("pairs", "run"),
        **options)  # fmt: skip


def make_dir(name: str):
    def setup(tmp: Path, fx: dict) -> None:
        (tmp / name).mkdir()

    return setup


cal("cal-model-nope", ["--model", "./nope"], ("./nope", "--model"), "issue", timeout=60)
cal("cal-output-is-dir", ["--output", "curve_dir"], ("--output", "curve_dir"), "issue", setup=make_dir("curve_dir"),
    compute_marker=TQDM, compute_seconds=3)  # fmt: skip
cal("cal-num-steps-0", ["--num-steps", "0"], "--num-steps")
cal("cal-cutoff-2", ["--cutoff", "2"], "--cutoff")
cal("cal-floor-neg", ["--floor", "-1"], "--floor")
cal("cal-noise-level-nan", ["--noise-level", "nan"], "--noise-level")
cal("cal-num-clips-0", ["--num-clips", "0"], "--num-clips")
cal("cal-data-missing", ["--data", "./nope"], ("--data", "nope"))


# ------------------------------------------------------------------------------------------- API cases


class Context:
    """What an API case's body gets in the child: its folder, the fixtures and small real inputs."""

    def __init__(self, tmp: Path, fx: dict):
        self.tmp, self.fx = tmp, fx

    def pipe(self, path: str | None = None):
        from cascade_vsr import CascadeVSRPipeline, demo_model_path

        pipe = CascadeVSRPipeline.from_pretrained(path or demo_model_path())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def frames(self, height: int = 16, width: int = 24, num_frames: int = 2):
        """Real uint8 frames (T, H, W, 3) of bigbuckbunny.mp4."""
        import cv2
        import numpy as np

        cap = cv2.VideoCapture(self.fx["video"])
        cap.set(cv2.CAP_PROP_POS_FRAMES, 100)
        frames = []
        for _ in range(num_frames):
            _, frame = cap.read()
            frames.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (width, height), cv2.INTER_AREA))
        return np.stack(frames)

    def video(self, batch: int = 1, **size):
        """Float (B, T, 3, H, W) in [0, 1] of real frames."""
        import torch

        frames = torch.from_numpy(self.frames(**size)).permute(0, 3, 1, 2).float() / 255
        return frames[None].repeat(batch, 1, 1, 1, 1)

    def call(self, pipe=None, **kwargs):
        """One cheap pipeline call: 2x, 1 step, 1 run, numpy output; returns output statistics."""
        import numpy as np
        import torch

        kwargs = {"scale": 2, "num_inference_steps": 1, "self_ensemble": 1, "output_type": "np", **kwargs}
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        if "video" not in kwargs and "lr_latents" not in kwargs:
            kwargs["video"] = self.video()
        out = np.asarray((pipe or self.pipe())(**kwargs).frames, dtype=np.float64)
        finite = np.isfinite(out)
        return {
            "shape": list(out.shape),
            "finite": bool(finite.all()),
            "mean": float(out[finite].mean()) if finite.any() else None,
            "saturated": float((out[finite] >= 0.999).mean()) if finite.any() else None,
        }


def output_check(expect_mean: float | None = None):
    """Post-check of a pipeline call: handled only when the output is finite and (if given) near the input mean."""

    def check(tmp: Path, fx: dict, outcome: dict) -> str | None:
        if not outcome["ok"]:
            return None
        obs = outcome.get("obs") or {}
        outcome["observed"] = json.dumps(obs)
        good = obs.get("finite") and (expect_mean is None or abs((obs.get("mean") or 9) - expect_mean) < 0.05)
        return "handled" if good and obs.get("legit") else "silent"

    return check


@api("pipe-latents-nan", "pipeline", ("latents", "nan", "finite"), "issue", check=output_check())
def _(ctx):
    import torch

    return ctx.call(latents=torch.full((1, 48, 2, 8, 12), float("nan")))


@api("pipe-guidance-nan", "pipeline", ("guidance_scale",), "issue", check=output_check())
def _(ctx):
    return ctx.call(guidance_scale=float("nan"))


@api("pipe-generators-3-for-batch-2", "pipeline", ("generator",), "issue", check=output_check())
def _(ctx):
    import torch

    return ctx.call(video=ctx.video(batch=2), generator=[torch.Generator().manual_seed(i) for i in range(3)])


@api("pipe-video-floats-0-255", "pipeline", ("video", "[0, 1]"), "issue", check=output_check())
def _(ctx):
    return ctx.call(video=ctx.video() * 255)


@api("pipe-video-uint8", "pipeline", ("video", "uint8"), "issue", check=output_check())
def _(ctx):
    """uint8 is documented as divided by 255: legit when the output matches the float input's."""
    import numpy as np
    import torch

    pipe = ctx.pipe()
    video = ctx.video()
    reference = ctx.call(pipe, video=video)
    obs = ctx.call(pipe, video=(video * 255).round().to(torch.uint8))
    obs["legit"] = bool(obs["finite"] and np.isclose(obs["mean"], reference["mean"], atol=0.01))
    obs["float_input_mean"] = reference["mean"]
    return obs


@api("pipe-scale-nan", "pipeline", "scale", "issue", check=output_check())
def _(ctx):
    return ctx.call(scale=float("nan"))


@api("pipe-scale-inf", "pipeline", "scale", "issue", check=output_check())
def _(ctx):
    return ctx.call(scale=float("inf"))


@api("pipe-scale-string", "pipeline", "scale", "issue", check=output_check())
def _(ctx):
    return ctx.call(scale="2")


@api("pipe-video-negative-stride", "pipeline", ("video", "stride"), "issue", check=output_check())
def _(ctx):
    """np.flip of the frames (negative strides): legit when it equals the flipped copy's output."""
    import numpy as np

    pipe = ctx.pipe()
    array = ctx.video().numpy()
    reference = ctx.call(pipe, video=np.ascontiguousarray(array[:, :, :, ::-1]))
    obs = ctx.call(pipe, video=np.flip(array, axis=3))
    obs["legit"] = bool(obs["finite"] and np.isclose(obs["mean"], reference["mean"], atol=1e-6))
    return obs


@api("pipe-steps-0", "pipeline", "num_inference_steps", check=output_check())
def _(ctx):
    return ctx.call(num_inference_steps=0)


@api("pipe-steps-float", "pipeline", "num_inference_steps", check=output_check())
def _(ctx):
    return ctx.call(num_inference_steps=1.5)


@api("pipe-steps-string", "pipeline", "num_inference_steps", check=output_check())
def _(ctx):
    return ctx.call(num_inference_steps="1")


@api("pipe-noise-aug-nan", "pipeline", "noise_aug_strength", check=output_check())
def _(ctx):
    return ctx.call(noise_aug_strength=float("nan"))


@api("pipe-noise-frame-correlation-2", "pipeline", "noise_frame_correlation", check=output_check())
def _(ctx):
    return ctx.call(noise_frame_correlation=2.0)


@api("pipe-video-4d", "pipeline", "video", check=output_check())
def _(ctx):
    return ctx.call(video=ctx.video()[0])


@api("pipe-video-nan", "pipeline", ("video", "nan", "finite"), check=output_check())
def _(ctx):
    video = ctx.video()
    video[0, 0, 0, 0, 0] = float("nan")
    return ctx.call(video=video)


@api("pipe-video-4-channels", "pipeline", ("video", "channel"), check=output_check())
def _(ctx):
    import torch

    video = ctx.video()
    return ctx.call(video=torch.cat([video, video[:, :, :1]], dim=2))


@api("pipe-height-0", "pipeline", "height", check=output_check())
def _(ctx):
    return ctx.call(scale=None, height=0, width=48)


@api("pipe-scale-and-height", "pipeline", ("scale", "height"), check=output_check())
def _(ctx):
    return ctx.call(scale=2, height=32, width=48)


@api("pipe-video-and-latents", "pipeline", ("video", "lr_latents"), check=output_check())
def _(ctx):
    import torch

    return ctx.call(video=ctx.video(), lr_latents=torch.zeros(1, 48, 2, 4, 6))


@api("pipe-no-input", "pipeline", ("video", "lr_latents"), check=output_check())
def _(ctx):
    return ctx.pipe()(scale=2, num_inference_steps=1).frames.shape


@api("pipe-self-ensemble-9", "pipeline", "self_ensemble", check=output_check())
def _(ctx):
    return ctx.call(self_ensemble=9)


@api("pipe-color-fix-bogus", "pipeline", "color_fix", check=output_check())
def _(ctx):
    return ctx.call(color_fix="bogus")


@api("pipe-output-type-bogus", "pipeline", "output_type", check=output_check())
def _(ctx):
    return ctx.call(output_type="bogus")


@api("pipe-sigmas-nan", "pipeline", "sigmas", check=output_check())
def _(ctx):
    return ctx.call(num_inference_steps=None, sigmas=[float("nan")])


@api("pipe-decode-chunk-size-0", "pipeline", "decode_chunk_size", check=output_check())
def _(ctx):
    return ctx.call(decode_chunk_size=0)


@api("pipe-lr-latents-wrong-channels", "pipeline", ("lr_latents", "channel"), check=output_check())
def _(ctx):
    import torch

    return ctx.call(lr_latents=torch.zeros(1, 16, 2, 4, 6), output_type="latent")


@api("pipe-latents-wrong-shape", "pipeline", "latents", check=output_check())
def _(ctx):
    import torch

    return ctx.call(latents=torch.zeros(1, 48, 2, 5, 5))


@api("pipe-generator-seed-neg", "pipeline", ("seed", "generator"), "issue", check=output_check())
def _(ctx):
    """seed=-1: torch.Generator().manual_seed(-1) is a valid generator, so this one is `handled` when it runs."""
    import torch

    obs = ctx.call(generator=torch.Generator().manual_seed(-1))
    obs["legit"] = obs["finite"]
    return obs


# -------------------------------------------------------------------------------------------- degradations


def degradation_check(tmp: Path, fx: dict, outcome: dict) -> str | None:
    if not outcome["ok"]:
        return None
    obs = outcome.get("obs") or {}
    outcome["observed"] = json.dumps(obs)
    return "handled" if obs.get("legit") else "silent"


@api("deg-flow-under-12px", "degradations", ("frames", "12", "size", "small"), "issue", check=degradation_check)
def _(ctx):
    from cascade_vsr.core.optical_flow import compute_flow

    flow = compute_flow(ctx.frames(height=8, width=8, num_frames=3))
    return {"shape": list(flow.shape)}


@api("deg-flow-based-under-12px", "degradations", ("frames", "12", "size", "small"), check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import FlowBasedDegradation

    out = FlowBasedDegradation()(ctx.frames(height=8, width=8, num_frames=3), seed=0)
    return {"shape": list(out.shape)}


@api("deg-classic-negative-stride", "degradations", ("frames", "stride"), "issue", check=degradation_check)
def _(ctx):
    """np.flip frames: legit when the result equals that of the contiguous copy."""
    import numpy as np

    from cascade_vsr.degradations import ClassicDegradation

    frames = ctx.frames(height=32, width=48, num_frames=3)
    degradation = ClassicDegradation(order=1)
    out = degradation(np.flip(frames, axis=2), seed=0)
    reference = degradation(np.ascontiguousarray(frames[:, :, ::-1]), seed=0)
    return {"legit": bool(np.array_equal(out, reference))}


@api("deg-flow-negative-stride", "degradations", ("frames", "stride"), "issue", check=degradation_check)
def _(ctx):
    import numpy as np

    from cascade_vsr.degradations import FlowBasedDegradation

    frames = ctx.frames(height=32, width=48, num_frames=3)
    degradation = FlowBasedDegradation()
    out = degradation(np.flip(frames, axis=0), seed=0)
    reference = degradation(np.ascontiguousarray(frames[::-1]), seed=0)
    return {"legit": bool(np.array_equal(out, reference))}


@api("deg-classic-seed-neg", "degradations", "seed", "issue", check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import ClassicDegradation

    out = ClassicDegradation(order=1)(ctx.frames(height=32, width=48, num_frames=3), seed=-1)
    return {"shape": list(out.shape)}


@api("deg-settings-seed-neg", "degradations", "seed", "issue", check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import PairSettings

    settings = PairSettings.from_options(hr_size=(64, 96), upstream="space_to_depth", seed=-1)
    return {"seed": settings.seed}


@api("deg-settings-strings", "degradations", ("crf", "num_frames"), "issue", check=degradation_check)
def _(ctx):
    """Numbers passed as strings: num_frames="2" fails late or compares str to int."""
    from cascade_vsr.degradations import PairSettings

    settings = PairSettings.from_options(hr_size=("64", "96"), num_frames="2", crf="12", upstream="space_to_depth")
    return {"num_frames": repr(settings.num_frames), "crf": repr(settings.crf)}


@api("deg-settings-crf-string", "degradations", "crf", check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import PairSettings

    settings = PairSettings.from_options(hr_size=(64, 96), crf="12", upstream="space_to_depth")
    return {"crf": repr(settings.crf)}


@api("deg-settings-num-frames-float", "degradations", "num_frames", check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import PairSettings

    settings = PairSettings.from_options(hr_size=(64, 96), num_frames=2.5, upstream="space_to_depth")
    return {"num_frames": repr(settings.num_frames)}


@api("deg-settings-lr-scale-inf", "degradations", "lr_scale", check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import PairSettings

    return {"lr": PairSettings.from_options(hr_size=(64, 96), lr_scale=float("inf")).lr_size}


@api("deg-classic-float-frames", "degradations", ("frames", "uint8", "dtype"), check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import ClassicDegradation

    frames = ctx.frames(height=32, width=48, num_frames=3).astype("float32") / 255
    out = ClassicDegradation(order=1)(frames, seed=0)
    return {"dtype": str(out.dtype), "max": float(out.max())}


@api("deg-classic-4-channels", "degradations", ("frames", "channel", "3"), check=degradation_check)
def _(ctx):
    import numpy as np

    from cascade_vsr.degradations import ClassicDegradation

    frames = ctx.frames(height=32, width=48, num_frames=3)
    out = ClassicDegradation(order=1)(np.concatenate([frames, frames[..., :1]], axis=-1), seed=0)
    return {"shape": list(out.shape)}


@api("deg-classic-3d-frames", "degradations", ("frames", "(T, H, W, 3)", "dim"), check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import ClassicDegradation

    out = ClassicDegradation(order=1)(ctx.frames(height=32, width=48, num_frames=1)[0], seed=0)
    return {"shape": list(out.shape)}


@api("deg-flow-single-frame", "degradations", ("frames", "2"), check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import FlowBasedDegradation

    out = FlowBasedDegradation()(ctx.frames(height=32, width=48, num_frames=1), seed=0)
    return {"shape": list(out.shape)}


@api("deg-classic-config-reversed-range", "degradations", "gaussian_sigma", check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations.classic import ClassicDegradationConfig

    ClassicDegradationConfig(gaussian_sigma=(3.0, 1.0))
    return {}


@api("deg-classic-config-nan", "degradations", "gaussian_sigma", check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations.classic import ClassicDegradationConfig

    ClassicDegradationConfig(gaussian_sigma=(float("nan"), 1.0))
    return {}


@api("deg-quality-filter-empty", "degradations", "frames", check=degradation_check)
def _(ctx):
    import numpy as np

    from cascade_vsr.degradations import QualityFilter

    report = QualityFilter()(np.zeros((0, 32, 48, 3), np.uint8))
    return {"report": repr(report)}


@api("deg-build-dataset-max-clips-neg", "degradations", "max_clips_per_video", check=degradation_check)
def _(ctx):
    from cascade_vsr.degradations import PairSettings, build_dataset

    settings = PairSettings.from_options(
        hr_size=(64, 96), num_frames=2, frame_range=(0, 12), upstream="space_to_depth",
        degradations="none=1", max_clips_per_video=-1, quality_filter=False,
    )  # fmt: skip
    return build_dataset([ctx.fx["video"]], ctx.tmp / "out", settings)


@api("deg-build-dataset-inputs-string", "degradations", "inputs", check=degradation_check)
def _(ctx):
    """inputs= a single path string instead of a list: iterating it gives characters."""
    from cascade_vsr.degradations import PairSettings, build_dataset

    settings = PairSettings.from_options(
        hr_size=(64, 96), num_frames=2, frame_range=(0, 4), upstream="space_to_depth",
        degradations="none=1", quality_filter=False,
    )  # fmt: skip
    return build_dataset(ctx.fx["video"], ctx.tmp / "out", settings)


# ------------------------------------------------------------------------------------------ model / training


@api("model-upsampler-from-pretrained-nope", "model", ("./nope", "nope"), "issue", timeout=60)
def _(ctx):
    from cascade_vsr import LatentUpsampler3D

    LatentUpsampler3D.from_pretrained("./nope")


@api("model-transformer-from-pretrained-nope", "model", ("./nope", "nope"), timeout=60)
def _(ctx):
    from cascade_vsr import CascadeVSRTransformer3DModel

    CascadeVSRTransformer3DModel.from_pretrained("./nope", subfolder="transformer")


@api("model-transformer-pickle-bin", "model", "safetensors", "issue", setup=pickle_bin_model, needs=("run",))
def _(ctx):
    from cascade_vsr import CascadeVSRTransformer3DModel

    CascadeVSRTransformer3DModel.from_pretrained(str(ctx.tmp / "model"), subfolder="transformer")
    return {"loaded": True}


@api("model-pipeline-pickle-bin", "model", "safetensors", setup=pickle_bin_model, needs=("run",))
def _(ctx):
    ctx.pipe(str(ctx.tmp / "model"))
    return {"loaded": True}


@api("model-pipeline-from-pretrained-nope", "model", ("./nope", "nope"), timeout=60)
def _(ctx):
    ctx.pipe("./nope")


@api("model-upsampler-wrong-channels", "model", ("lr_latents", "channel"))
def _(ctx):
    import torch

    from cascade_vsr import LatentUpsampler3D

    LatentUpsampler3D(latent_channels=16, hidden_channels=16, num_blocks=1)(torch.zeros(1, 8, 1, 4, 4), size=(8, 8))


@api("model-upsampler-size-0", "model", "size")
def _(ctx):
    import torch

    from cascade_vsr import LatentUpsampler3D

    LatentUpsampler3D(latent_channels=16, hidden_channels=16, num_blocks=1)(torch.zeros(1, 16, 1, 4, 4), size=(0, 0))


@api("model-upsampler-size-nan", "model", "size")
def _(ctx):
    import torch

    from cascade_vsr import LatentUpsampler3D

    up = LatentUpsampler3D(latent_channels=16, hidden_channels=16, num_blocks=1)
    return {"shape": list(up(torch.zeros(1, 16, 1, 4, 4), size=(float("nan"), 8)).shape)}


def tiny_transformer(**changes):
    from cascade_vsr import CascadeVSRTransformer3DModel

    config = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, ffn_dim=16, text_dim=16)
    return CascadeVSRTransformer3DModel(**{**config, **changes})


@api("model-transformer-heads-0", "model", "num_attention_heads")
def _(ctx):
    tiny_transformer(num_attention_heads=0)


@api("model-transformer-attention-mode-bogus", "model", "attention_mode")
def _(ctx):
    tiny_transformer(attention_mode="bogus")


@api("model-transformer-wrong-channels", "model", ("channel", "hidden_states"))
def _(ctx):
    import torch

    model = tiny_transformer()
    x = torch.zeros(1, 8, 1, 4, 4)
    model(x, x, timestep=torch.tensor([500.0]), noise_aug_level=0.3)


@api("model-transformer-timestep-nan", "model", "timestep", check=degradation_check)
def _(ctx):
    import torch

    model = tiny_transformer()
    x = torch.zeros(1, 16, 1, 4, 4)
    out = model(x, x, timestep=torch.tensor([float("nan")]), noise_aug_level=0.3).sample
    return {"finite": bool(out.isfinite().all())}


@api("train-read-pair-dataset-missing", "training", ("data_dir", "nope"))
def _(ctx):
    from cascade_vsr.pair_dataset import read_pair_dataset

    read_pair_dataset(ctx.tmp / "nope")


@api("train-read-pair-dataset-newer-version", "training", ("version", "dataset.json"), check=degradation_check)
def _(ctx):
    from cascade_vsr.pair_dataset import read_pair_dataset

    root = ctx.tmp / "pairs"
    shutil.copytree(ctx.fx["pairs"], root)
    record = json.loads((root / "dataset.json").read_text())
    record["version"] = 999
    (root / "dataset.json").write_text(json.dumps(record))
    return {"clips": len(read_pair_dataset(root))}


@api("train-load-config-list", "training", "config", "issue")
def _(ctx):
    from cascade_vsr.training.config import load_config

    (ctx.tmp / "c.yaml").write_text("- a\n- b\n")
    load_config(ctx.tmp / "c.yaml")


@api("train-load-config-crop-size-string", "training", "crop_size", check=degradation_check)
def _(ctx):
    from cascade_vsr.training.config import load_config

    path = write_config(ctx.tmp / "c.json", ctx.fx, ctx.tmp, crop_size="8 12")
    return {"crop_size": repr(load_config(path)[1].crop_size)}


@api("train-timestep-curve-corrupted", "training", ("timestep_curve", "curve.json"), needs=("pairs",))
def _(ctx):
    """A corrupted curve JSON: the error should name the field or the file, before the model is built."""
    from cascade_vsr.training.config import load_config
    from cascade_vsr.training.trainer import train

    (ctx.tmp / "curve.json").write_text("{not json")
    path = write_config(ctx.tmp / "c.json", ctx.fx, ctx.tmp, timestep_sampler="detail_aware",
                        timestep_curve=str(ctx.tmp / "curve.json"))  # fmt: skip
    train(*load_config(path))


# --------------------------------------------------------------------------------------------- fixtures


def build_fixtures(folder: Path, needed: set[str]) -> dict:
    """Sample videos, frame folders, and (if needed) the tiny pair dataset and trained run; built once."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    code = "from cascade_vsr.core.video import sample_video_path as s; print(s('bigbuckbunny.mp4')); "
    code += "print(s('carphone_pristine.mp4'))"
    video, carphone = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    start = time.perf_counter()  # the import time of a command that loads a model: what a fast failure costs
    subprocess.run([sys.executable, "-c", "import torch, transformers, diffusers, cascade_vsr.pipelines"], check=True)
    fx = {"video": video, "carphone": carphone, "errors": {}, "startup_seconds": time.perf_counter() - start}
    cap = cv2.VideoCapture(video)
    cap.set(cv2.CAP_PROP_POS_FRAMES, 100)
    for name in ("hr_frames", "lr_frames"):
        (folder / name).mkdir(exist_ok=True)
        fx[name] = str(folder / name)
    for index in range(4):
        _, frame = cap.read()
        hr = cv2.resize(frame, (96, 64), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / "hr_frames" / f"{index:04d}.png"), hr)
        cv2.imwrite(str(folder / "lr_frames" / f"{index:04d}.png"), cv2.resize(hr, (48, 32), cv2.INTER_AREA))
    if needed & {"pairs", "run"}:
        pairs = folder / "pairs"
        if not (pairs / "manifest.jsonl").is_file() or len(manifest(pairs)) < 4:
            words = mp_base(folder, fx, "--frame-range", "0", "40", "--max-clips-per-video", "4", "--output-dir")
            result = run_cli([*words, str(pairs)], folder, timeout=300)
            if result.returncode:
                fx["errors"]["pairs"] = result.stderr.strip().splitlines()[-1:]
        fx["pairs"] = str(pairs)
    if "run" in needed and "pairs" not in fx["errors"]:
        run = folder / "run"
        if not (run / "export" / "model_index.json").is_file():
            config = write_config(folder / "run.yaml", fx, folder, checkpointing_steps=1)
            result = run_cli(["train", "--config", str(config)], folder, timeout=300)
            if result.returncode:
                fx["errors"]["run"] = result.stderr.strip().splitlines()[-1:]
        fx["run"] = str(run)
    return fx


# ------------------------------------------------------------------------------------------------ running


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def classify(case: Case, outcome: dict, tmp: Path, fx: dict) -> str:
    if outcome.get("timed_out"):
        return "hang"
    if case.check is not None:
        forced = case.check(tmp, fx, outcome)
        if forced:
            return forced
    if outcome["ok"]:
        return "silent"
    after = case.compute_seconds is not None and outcome["seconds"] > case.compute_seconds + fx["startup_seconds"]
    if case.compute_marker and re.search(case.compute_marker, output_text(outcome)):
        after = True
    if after:
        return "crash-after-compute"
    message = outcome["error"].lower()
    named = any(word.lower() in message for word in case.keyword)
    if case.args is not None:  # CLI
        return "clear" if named and TRACEBACK not in outcome["stderr"] else "raw"
    return "clear" if named and outcome.get("expected_type") else "raw"


def run_case(case: Case, fx: dict, fixtures_file: Path, keep: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bad_{case.id}_"))
    record = {"id": case.id, "area": case.area, "origin": case.origin, "keyword": list(case.keyword)}
    missing = [name for name in case.needs if name not in fx or name in fx["errors"]]
    if missing:
        return {**record, "class": "skipped", "seconds": 0.0, "error": f"fixture {missing} not built"}
    try:
        if case.setup:
            case.setup(tmp, fx)
        if case.args is not None:
            command = [sys.executable, "-m", "cascade_vsr.cli", *case.args(tmp, fx)]
        else:
            command = [
                sys.executable,
                str(HERE),
                "--child",
                case.id,
                "--tmp",
                str(tmp),
                "--fixtures",
                str(fixtures_file),
            ]
    except Exception as error:  # the harness itself failed to prepare the case
        return {**record, "class": "skipped", "seconds": 0.0, "error": f"setup: {type(error).__name__}: {error}"}
    start = time.perf_counter()
    with open(tmp / "_stdout", "w") as out, open(tmp / "_stderr", "w") as err:
        process = subprocess.Popen(command, cwd=tmp, stdout=out, stderr=err, start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=case.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)  # the case's own process group only
            process.wait()
    seconds = time.perf_counter() - start
    outcome = {
        "rc": process.returncode,
        "timed_out": timed_out,
        "seconds": seconds,
        "stdout": (tmp / "_stdout").read_text(errors="replace")[-20000:],
        "stderr": (tmp / "_stderr").read_text(errors="replace")[-20000:],
    }
    if case.args is not None:
        outcome["ok"] = process.returncode == 0 and not timed_out
        outcome["error"] = last_line(outcome["stderr"]) if not outcome["ok"] else ""
    else:
        result = json.loads((tmp / "_result.json").read_text()) if (tmp / "_result.json").is_file() else None
        if result is None:  # the child died without a result (crash, kill)
            result = {"ok": False, "error": f"child exited {process.returncode}: {last_line(outcome['stderr'])}"}
        outcome.update(result)
        outcome["ok"] = bool(result["ok"]) and not timed_out
    try:
        klass = classify(case, outcome, tmp, fx)
    except Exception as error:
        klass, outcome["observed"] = "raw", f"post-check failed: {type(error).__name__}: {error}"
    record.update(
        {
            "class": klass,
            "seconds": round(seconds, 2),
            "rc": outcome["rc"],
            "error": outcome.get("error", "")[:400],
            "observed": outcome.get("observed", ""),
            "traceback_in_stderr": TRACEBACK in outcome["stderr"],
        }
    )
    if case.args is not None:
        record["argv"] = [str(word) for word in command[3:]]
    if keep:
        record["folder"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def child(case_id: str, tmp: Path, fixtures_file: Path) -> int:
    """Run one API case in this process and write its result as JSON (what failed, with which type and message)."""
    case = next(case for case in CASES if case.id == case_id)
    fx = json.loads(fixtures_file.read_text())
    result: dict = {"ok": True}
    try:
        obs = case.func(Context(tmp, fx))
        result["obs"] = json.loads(json.dumps(obs, default=str)) if isinstance(obs, dict) else {"value": repr(obs)}
    except BaseException as error:  # noqa: BLE001 (record everything, SystemExit and KeyboardInterrupt too)
        message = str(error).strip().splitlines()
        result = {
            "ok": False,
            "exc_type": f"{type(error).__module__}.{type(error).__qualname__}",
            "expected_type": isinstance(error, EXPECTED_TYPES),
            "error": f"{type(error).__name__}: {message[0] if message else ''}",
            "message": str(error)[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    (tmp / "_result.json").write_text(json.dumps(result))
    return 0


def table(records: list[dict], label: str, seconds: float) -> str:
    lines = [f"bad inputs, {label}: {len(records)} cases in {seconds:.0f} s"]
    counts = Counter(r["class"] for r in records)
    lines.append("  " + ", ".join(f"{k} {counts[k]}" for k in CLASSES if counts[k]))
    for origin in ("issue", "own"):
        sub = Counter(r["class"] for r in records if r["origin"] == origin)
        lines.append(f"  {origin}: " + ", ".join(f"{k} {sub[k]}" for k in CLASSES if sub[k]))
    lines.append("")
    lines.append(f"{'area':16} " + " ".join(f"{k:>8.8}" for k in CLASSES))
    for area in sorted({r["area"] for r in records}):
        sub = Counter(r["class"] for r in records if r["area"] == area)
        lines.append(f"{area:16} " + " ".join(f"{sub[k]:>8}" for k in CLASSES))
    lines.append("")
    lines.append(f"{'id':40} {'area':15} {'origin':6} {'class':20} {'s':>6}  error / observed")
    for r in records:
        detail = r["error"] or r.get("observed", "")
        if r["error"] and r.get("observed"):
            detail += f" [{r['observed']}]"
        lines.append(
            f"{r['id']:40} {r['area']:15} {r['origin']:6} {r['class']:20} {r['seconds']:6.1f}  {detail[:160]}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="run", help="names the JSON: benchmarks/results/bad_inputs_LABEL.json")
    parser.add_argument("--only", nargs="*", default=None, help="run only the cases whose id contains one of these")
    parser.add_argument("--area", nargs="*", default=None, help="run only these areas")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1: the machine is shared)")
    parser.add_argument("--fixtures", type=Path, default=None, help="fixture folder (reused if built; default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep each case's folder (its path is in the JSON)")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tmp, args.fixtures)

    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    cases = [
        case
        for case in CASES
        if (args.only is None or any(word in case.id for word in args.only))
        and (args.area is None or case.area in args.area)
    ]
    if args.list:
        for case in cases:
            print(f"{case.id:40} {case.area:15} {case.origin:6} {'cli' if case.args else 'api'}  {case.keyword}")
        print(f"{len(cases)} cases")
        return 0
    start = time.perf_counter()
    fixtures = args.fixtures or Path(tempfile.mkdtemp(prefix="bad_inputs_fixtures_"))
    fx = build_fixtures(fixtures.resolve(), {name for case in cases for name in case.needs})
    fixtures_file = fixtures / "fixtures.json"
    fixtures_file.write_text(json.dumps(fx))
    build_seconds = time.perf_counter() - start
    print(f"fixtures in {fixtures} ({build_seconds:.0f} s){'; errors: ' + str(fx['errors']) if fx['errors'] else ''}")

    records: list[dict] = []
    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_case, case, fx, fixtures_file, args.keep) for case in cases]
            for future in futures:
                records.append(future.result())
                print(f"  {records[-1]['id']}: {records[-1]['class']} ({records[-1]['seconds']} s)", flush=True)
    else:
        for case in cases:
            records.append(run_case(case, fx, fixtures_file, args.keep))
            print(f"  {records[-1]['id']}: {records[-1]['class']} ({records[-1]['seconds']} s)", flush=True)
    seconds = time.perf_counter() - start
    print()
    print(table(records, args.label, seconds))

    import cascade_vsr

    summary = {
        "label": args.label,
        "python": sys.executable,
        "cascade_vsr": str(Path(cascade_vsr.__file__).resolve().parent),
        "env": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE") if k in os.environ},
        "seconds": round(seconds, 1),
        "fixture_seconds": round(build_seconds, 1),
        "fixture_errors": fx["errors"],
        "startup_seconds": round(fx["startup_seconds"], 2),
        "counts": dict(Counter(r["class"] for r in records)),
        "counts_by_origin": {
            o: dict(Counter(r["class"] for r in records if r["origin"] == o)) for o in ("issue", "own")
        },
        "counts_by_area": {
            area: dict(Counter(r["class"] for r in records if r["area"] == area))
            for area in sorted({r["area"] for r in records})
        },
        "cases": records,
    }
    output = args.output or RESULTS / f"bad_inputs_{args.label}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
