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
