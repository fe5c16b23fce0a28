import subprocess
import sys


def test_import_is_lazy_and_exports_the_public_api():
    code = (
        "import sys, cascade_vsr; assert 'torch' not in sys.modules, 'import pulled torch';"
        "from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D;"
        "assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_commands():
    result = subprocess.run(
        [sys.executable, "-m", "cascade_vsr.cli", "--help"], check=True, capture_output=True, text=True
    )
    assert "demo" in result.stdout


def test_a_user_error_prints_one_line_and_exits_2_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "cascade_vsr.cli", "evaluate", str(tmp_path / "sr"), str(tmp_path / "gt")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cascade-vsr evaluate: error: `source` {str(tmp_path / 'sr')!r} is not a video file, a folder of PNG / JPEG "
        "frames or a glob of them"
    ]
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
