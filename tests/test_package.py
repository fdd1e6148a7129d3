"""The installed package imports from outside the source tree, and a regular wheel has the mapped layout."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_from_outside_the_source_tree(tmp_path):
    code = (
        "import msn_fast, msn_fast.kernels as k, msn_fast.dataloading as d, importlib.util as u;"
        "print(k.__name__, d.__name__);"
        "assert u.find_spec('kernels') is None and u.find_spec('dataloading') is None, 'generic top-level names';"
        "assert callable(k.attention) and callable(k.msn_prototype_loss)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["msn_fast.kernels", "msn_fast.dataloading"]


def test_kernels_import_without_the_rest(tmp_path):
    """msn_fast.kernels needs only torch and triton: importing it must not pull in sklearn, PIL or torchvision."""
    code = (
        "import sys; import msn_fast.kernels;"
        "bad = [m for m in ('sklearn', 'PIL', 'torchvision', 'msn_fast.dataloading') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_regular_wheel_layout(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("msn_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "msn_fast/kernels/attention.py" in names and "msn_fast/dataloading/loader.py" in names
    assert "msn_fast/train.py" in names
    assert not any(n.startswith(("kernels/", "dataloading/", "tests/", "bench/")) for n in names)
