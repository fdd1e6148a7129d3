"""The installed package imports from outside the source tree (with or without Triton), a regular wheel has
the mapped layout, and the interpreter's bf16 tl.dot fix ships in the package."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_from_outside_the_source_tree(tmp_path):
    code = (
        "import msn_fast, msn_fast.kernels as k, msn_fast.dataloading as d, importlib.util as u;"
        "print(k.__name__, d.__name__);"
        # another distribution may own these names (transformers 5.25 installs Hugging Face's `kernels`): ours must not
        "import os; ours = {os.path.dirname(k.__file__), os.path.dirname(d.__file__)};"
        "found = [s.origin for s in (u.find_spec('kernels'), u.find_spec('dataloading')) if s is not None];"
        "assert not [f for f in found if os.path.dirname(f or '') in ours], ('generic top-level names', found);"
        "assert callable(k.attention) and callable(k.prototype_cross_entropy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["msn_fast.kernels", "msn_fast.dataloading"]


def _modules_loaded_by(imports: str, forbidden: tuple[str, ...], cwd: Path) -> str:
    """Which of `forbidden` a fresh interpreter has in sys.modules after `import <imports>` (printed as a list)."""
    code = f"import sys; import {imports}; print([m for m in {forbidden!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_kernels_import_without_the_rest(tmp_path):
    """msn_fast.kernels needs only torch and triton: importing it must not pull in sklearn, PIL or torchvision."""
    assert _modules_loaded_by("msn_fast.kernels", ("sklearn", "PIL", "torchvision", "msn_fast.dataloading"),
                              tmp_path) == "[]"


def test_config_imports_no_image_library(tmp_path):
    """msn_fast.config (and so the model and the weight export) takes ViewRecipe from dataloading's stdlib-only
    recipe module: no PIL, torchvision or loader comes with it."""
    assert _modules_loaded_by("msn_fast.config, msn_fast.model",
                              ("PIL", "torchvision", "sklearn", "msn_fast.dataloading.loader"), tmp_path) == "[]"


def test_regular_wheel_layout(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("msn_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "msn_fast/kernels/attention.py" in names and "msn_fast/dataloading/loader.py" in names
    assert "msn_fast/train.py" in names
    assert not any(n.startswith(("kernels/", "dataloading/", "tests/", "bench/")) for n in names)


# Each snippet runs in a fresh interpreter (no conftest): `import triton` then fails as on macOS/Windows,
# so a kernel module that imports Triton eagerly again fails these tests.
NO_TRITON = "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"


def _run(code: str, cwd: Path, interpret: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", **({"TRITON_INTERPRET": "1"} if interpret else {}))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_without_triton_every_op_runs_on_torch_and_triton_is_a_clear_error(tmp_path):
    code = NO_TRITON + """
import importlib, torch, msn_fast, msn_fast.kernels as K, msn_fast.loss as L
assert sys.modules["triton"] is None and not K._utils.triton_available()
q = torch.randn(2, 2, 13, 32, requires_grad=True)
anchor, target, protos = torch.randn(6, 8, requires_grad=True), torch.randn(3, 8), torch.randn(5, 8)
targets = torch.rand(3, 5).softmax(-1)
images, weight, idx = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 4, 4), torch.tensor([0, 3])
calls = {
    "attention": lambda b: K.attention(q, q, q, backend=b).sum(),
    "prototype_cross_entropy": lambda b: sum(t.sum() for t in K.prototype_cross_entropy(
        anchor, protos, targets, num_views=2, backend=b)),
    "msn_loss": lambda b: L.msn_loss(anchor, target, protos, num_views=2, sinkhorn_iters=1, backend=b)[0],
    "embed_kept_patches": lambda b: K.embed_kept_patches(images, weight, keep_idx=idx, backend=b).sum(),
    "gather_tokens": lambda b: K.gather_tokens(torch.randn(2, 4, 8), idx, backend=b).sum(),
}
needs = {"msn_loss": "prototype_cross_entropy"}  # the objective's error names the op that needs Triton
for name, call in calls.items():
    for backend in ("auto", "torch"):
        out = call(backend)
        assert torch.isfinite(out), (name, backend)
        if out.requires_grad:
            out.backward()
    try:
        call("triton")
    except RuntimeError as e:
        assert str(e) == f"msn_fast.kernels: {needs.get(name, name)} needs Triton, which is not installed " \
            "(pip install triton; Linux only); use backend='torch'", str(e)
    else:
        raise AssertionError(f"{name}: backend='triton' ran without Triton")
assert torch.isfinite(L.sinkhorn(torch.rand(4, 6).softmax(-1), iters=2)).all()
try:  # a launcher called directly reaches a stand-in kernel
    importlib.import_module("msn_fast.kernels.attention").attention_fwd(q.detach(), q.detach(), q.detach())
except RuntimeError as e:
    assert "attention_fwd needs Triton, which is not installed" in str(e), str(e)
else:
    raise AssertionError("a stand-in kernel launched")
print("ok")
"""
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok"]


def test_without_triton_the_trainer_runs(tmp_path):
    args = ["--vit.dim", "32", "--vit.depth", "2", "--vit.heads", "2", "--head.hidden_dim", "64", "--head.out_dim",
            "32", "--head.num_prototypes", "32", "--data.batch_size", "8", "--data.num_workers", "0",
            "--data.global_size", "16", "--data.focal_size", "8", "--data.num_focal", "2", "--vit.img_size", "16",
            "--optim.epochs", "1", "--run.eval_lowshot", "false", "--run.max_steps", "2",
            "--run.out_dir", str(tmp_path / "run")]  # fmt: skip
    code = NO_TRITON + f"import msn_fast.train; sys.exit(msn_fast.train.main({args!r}))"
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 1


BF16_ATTENTION = """
import torch
from msn_fast.kernels import attention, attention_ref
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 13, 32, generator=g) for _ in range(3))
ref = attention_ref(q.double(), k.double(), v.double())
got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="triton")
plain = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="eager")
err, err_plain = ((x.double() - ref).abs().max().item() for x in (got, plain))
bound = 2 * err_plain + 1e-2 * max(1.0, ref.abs().max().item())  # the flash-attention rule (tests/conftest.py)
assert err <= bound, f"bf16 interpreter attention error {err:.3e} > {bound:.3e}"
print("ok")
"""


def test_bf16_under_the_interpreter_without_the_test_suite(tmp_path):
    """The package itself fixes the interpreter's bf16 tl.dot (it multiplies bit patterns otherwise):
    a fresh process with TRITON_INTERPRET=1 and no conftest gets a bf16 attention within bf16 tolerance."""
    pytest.importorskip("triton")
    out = _run(BF16_ATTENTION, tmp_path, interpret=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok"]


def test_bf16_under_an_interpreter_the_fix_cannot_patch_is_a_clear_error(tmp_path):
    pytest.importorskip("triton")
    code = """
import torch, triton.runtime.interpreter as interpreter
interpreter.InterpreterBuilder = type("InterpreterBuilder", (), {})  # a Triton whose internals moved
from msn_fast.kernels import attention
q = torch.randn(1, 1, 5, 32, dtype=torch.bfloat16)
try:
    attention(q, q, q, backend="triton")
except RuntimeError as e:
    assert "bf16 under the Triton interpreter" in str(e), str(e)
    print("ok")
"""
    out = _run(code, tmp_path, interpret=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok"]


def test_the_source_folders_imported_as_top_level_packages_are_inert():
    """From the repository root, `import kernels` finds our kernels/ folder (transformers probes Hugging Face's
    `kernels` library that way). It must stay an empty module without __file__ (read as not installed), and
    the custom ops registered by msn_fast.kernels must keep calling msn_fast's launchers."""
    code = """
import importlib, torch
from msn_fast.kernels import attention
am = importlib.import_module("msn_fast.kernels.attention")
import os, kernels, dataloading
for m in (kernels, dataloading):  # empty, or another distribution's package, never our folder
    assert m.__file__ is None or os.path.dirname(m.__file__) != os.path.abspath(m.__name__), m.__file__
assert not hasattr(dataloading, "build_loader")
calls, real = [], am.attention_fwd
am.attention_fwd = lambda *a: (calls.append(1), real(*a))[1]
q = torch.randn(1, 1, 5, 32)
attention(q, q, q, backend="triton")
assert calls == [1], calls
"""
    out = _run(code, cwd=Path(__file__).resolve().parents[1], interpret=True)
    assert out.returncode == 0, out.stderr[-2000:]
