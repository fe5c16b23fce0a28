"""The package's structure: one installed top-level name, and imports that never reach a higher floor."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed module prefix -> source folder (pyproject.toml's package-dir)
SOURCES = {
    "cascade_vsr": ROOT / "cascade_vsr",
    "cascade_vsr.pipelines": ROOT / "pipelines",
    "cascade_vsr.degradations": ROOT / "degradations",
}
# module prefix -> floor; the longest matching prefix decides (README, "Layout")
FLOORS = {
    "cascade_vsr._lazy": 0,
    "cascade_vsr.core": 1,
    "cascade_vsr.models": 2,
    "cascade_vsr.pipelines": 3,
    "cascade_vsr.degradations": 4,
    "cascade_vsr.pair_dataset": 4,
    "cascade_vsr.training": 4,
    "cascade_vsr.commands": 5,
    "cascade_vsr.cli": 5,
}
# the package root only re-exports lazily, and the testing helpers are for tests, notebooks and examples
UNFLOORED = {"cascade_vsr", "cascade_vsr.testing"}


def floor_of(module: str) -> int | None:
    matches = [prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")]
    return FLOORS[max(matches, key=len)] if matches else None


def library_modules() -> dict[str, Path]:
    modules = {}
    for prefix, folder in sorted(SOURCES.items(), key=lambda item: -len(item[0])):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            modules.setdefault(name, path)
    return modules


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module `path` imports, at any depth of the file (lazy imports inside functions count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def test_every_library_module_has_a_floor():
    missing = [name for name in library_modules() if name not in UNFLOORED and floor_of(name) is None]
    assert not missing, f"modules without a floor (add them to FLOORS and to the README's layout): {missing}"


def test_no_module_imports_a_higher_floor():
    modules = library_modules()
    upward = []
    for name, path in modules.items():
        floor = floor_of(name)
        for target in imported_modules(path, name):
            if target == "cascade_vsr.testing" and name not in UNFLOORED:
                upward.append(f"{name} -> {target} (test helpers)")
            target_floor = floor_of(target) if target.startswith("cascade_vsr") else None
            if floor is not None and target_floor is not None and target_floor > floor:
                upward.append(f"{name} (floor {floor}) -> {target} (floor {target_floor})")
    assert not upward, "imports from a higher floor:\n" + "\n".join(sorted(upward))


def test_floor_rule_catches_an_upward_import(tmp_path):
    """The check itself: a core module that imports the pipeline is reported."""
    path = tmp_path / "probe.py"
    path.write_text(
        "def f():\n    from cascade_vsr.pipelines.adapters import get_adapter\n    from ..models import upsampler\n"
    )
    targets = imported_modules(path, "cascade_vsr.core.probe")
    assert "cascade_vsr.pipelines.adapters" in targets and "cascade_vsr.models.upsampler" in targets
    assert floor_of("cascade_vsr.core.probe") == 1 and floor_of("cascade_vsr.pipelines.adapters") == 3


def test_no_code_imports_the_bare_folder_names():
    """pipelines/ and degradations/ install inside cascade_vsr; ruff's banned-api (TID251) enforces this for the
    Python files, this test also covers the notebooks."""
    offenders = []
    for path in [*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("*/**/*.py")]:
        if ".venv" in path.parts:
            continue
        for line in path.read_text().splitlines():
            words = line.strip().strip('"').replace("\\n", "").split()
            if (
                len(words) >= 2
                and words[0] in ("import", "from")
                and words[1].split(".")[0] in ("pipelines", "degradations")
            ):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders


def test_wheel_installs_one_top_level_name(tmp_path):
    """Build the wheel from a copy of this checkout's sources (setuptools writes build/ next to them) and read what
    it installs."""
    source = tmp_path / "source"
    for name in (
        "pyproject.toml",
        "README.md",
        "cascade_vsr",
        "pipelines",
        "degradations",
        "demo/model",
        "demo/one_step_model",
    ):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cascade_vsr-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    roots = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert roots == {"cascade_vsr"} and top_level == ["cascade_vsr"]
    for expected in (
        "cascade_vsr/pipelines/pipeline_cascade_vsr.py",
        "cascade_vsr/degradations/make_pairs.py",
        "cascade_vsr/demo_model/model_index.json",
        "cascade_vsr/demo_model/transformer/diffusion_pytorch_model.safetensors",
        "cascade_vsr/demo_model/vae/config.json",
        "cascade_vsr/demo_one_step_model/model_index.json",
        "cascade_vsr/demo_one_step_model/transformer/diffusion_pytorch_model.safetensors",
    ):
        assert expected in names, expected
    assert not any("testing_utils" in name or name.startswith("tests/") for name in names)
