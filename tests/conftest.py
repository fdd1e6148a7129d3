"""Test configuration: Triton interpreter on CPU machines, seeds, tolerances, the `gpu` marker.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a
function is decorated), so it is set here, at the top, on machines without CUDA.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"

# One table of tolerances (atol, rtol) for kernel-vs-reference checks. Low-precision dtypes use the
# flash-attention rule instead: kernel error <= 2 x plain-torch error at that dtype + LOWP_FLOOR.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}
LOWP_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _install_interpreter_bf16_dot_shim() -> None:
    """The interpreter multiplies bf16 bit patterns in tl.dot (triton#11584); convert to fp32 first.

    Test-only: on a GPU tl.dot handles bf16 natively. The shim upcasts bf16 operands exactly
    (bf16 is the top half of an fp32), so the kernel's own accumulation in fp32 is what is tested.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
    except Exception:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_msn_bf16_shim", False):
        return
    original = builder.create_dot

    def _up(t):
        data = t.data
        if getattr(t.dtype, "name", "") == "bf16" or str(getattr(t, "dtype", "")) == "bf16":
            f32 = (data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(f32, interpreter.tl.float32)
        return t

    def create_dot(self, a, b, c, *args, **kwargs):
        return original(self, _up(a), _up(b), c, *args, **kwargs)

    builder.create_dot = create_dot
    builder._msn_bf16_shim = True


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _install_interpreter_bf16_dot_shim()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); runs in bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _install_interpreter_masked_load_poison() -> None:
    """Opt-in (fixture `poison_masked_loads`): masked-off lanes of a float `tl.load` without `other=`
    read NaN instead of the interpreter's zeros.

    On a GPU those lanes are undefined, so a kernel that lets them reach a dot or a sum is wrong
    there while it passes here; with the poison it fails here too.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
    except Exception:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_msn_poison_installed", False):
        return
    original = builder.create_masked_load

    def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
        dtype = ptrs.get_element_ty()
        if other is None and builder._msn_poison_on and dtype.is_floating():
            if dtype == interpreter.tl.bfloat16:  # stored as uint16 bit patterns
                fill = np.full(ptrs.data.shape, 0x7FC0, dtype=np.uint16)
            else:
                fill = np.full(ptrs.data.shape, np.nan, dtype=interpreter._get_np_dtype(dtype))
            other = interpreter.TensorHandle(fill, dtype)
        return original(self, ptrs, mask, other, *args, **kwargs)

    builder.create_masked_load = create_masked_load
    builder._msn_poison_on = False
    builder._msn_poison_installed = True


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _install_interpreter_masked_load_poison()


@pytest.fixture
def poison_masked_loads():
    """Use in a kernel test module (e.g. `pytestmark = pytest.mark.usefixtures("poison_masked_loads")`)."""
    try:
        from triton.runtime import interpreter
    except Exception:
        yield
        return
    builder = interpreter.InterpreterBuilder
    if not getattr(builder, "_msn_poison_installed", False):
        yield
        return
    builder._msn_poison_on = True
    try:
        yield
    finally:
        builder._msn_poison_on = False
