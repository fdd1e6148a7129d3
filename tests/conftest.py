"""Test configuration: Triton interpreter on CPU machines, seeds, tolerances, the `gpu` marker.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a
function is decorated), so it is set here, at the top, on machines without CUDA.
"""

import logging
import os
import re

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The kernels' first-use self-check (msn_fast.kernels.selfcheck) is off in the tests, which compare every
# kernel against its reference themselves; tests/kernels/test_selfcheck.py turns it on.
os.environ.setdefault("MSN_FAST_SELFCHECK", "0")

# after the env; LOWP_FLOOR is re-exported to the kernel tests
from msn_fast.kernels.selfcheck import LOWP_FLOOR, ROUNDING_K, flash_rule_bound, rounding_bound  # noqa: E402, F401

DEVICE = "cuda" if HAS_CUDA else "cpu"

# ---- tolerance policy (every comparison in tests/ uses one of these) -----------------------------
#
# 1. Never bit-exact between two computation paths (grad vs no-grad, fused vs eager, compiled vs
#    eager, 1 vs 2 threads): the BLAS and the CPU choose the summation order. Bit-exact is kept only
#    where the same code runs twice on the same inputs (a poisoned buffer, a state-dict copy).
# 2. Against an fp64 reference, an fp32/fp64 result is judged by a rounding model: a sum of n terms
#    computed in a dtype with unit roundoff u = eps/2 is off by at most about sqrt(n)·u·Σ|terms|
#    (the probabilistic bound of Higham & Mary, SIAM J. Sci. Comput. 2019), so
#        |got - ref| <= ROUNDING_K · eps · sqrt(n) · scale
#    with `scale` the magnitude the sums run over (max |ref| unless a test says otherwise) and
#    ROUNDING_K the number of chained reductions allowed for (a few matmuls, a softmax).
# 3. 16-bit results (and fp32 results of long GPU sums) follow the flash-attention rule:
#        err(kernel) <= 2 · err(plain torch at the same dtype) + floor,
#    the floor being LOWP_FLOOR x max(1, max|ref|) for 16-bit (at least one ulp of the largest value:
#    the interpreter truncates fp32 -> 16-bit stores where a GPU rounds) and the rounding bound of (2)
#    for fp32, so it scales with the magnitude of the values.
# 4. Ill-conditioned cases (a peaked softmax) compare with fp64 at a bound derived for that case
#    next to the test (tests/kernels/test_attention.py: _fp32_bounds).
# ROUNDING_K, LOWP_FLOOR and rounding_bound come from msn_fast.kernels.selfcheck (the kernels' self-check
# judges with the same rule).


def assert_rounding_close(got, ref, dtype: torch.dtype, n: int, name: str = "", scale: float | None = None,
                          k: float = ROUNDING_K) -> None:
    """|got - ref| <= rounding_bound(dtype, n, scale) elementwise, scale defaulting to max |ref| (>= tiny).

    Use for two paths that compute the same sums (`ref` may be the other path, not fp64).
    """
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref.double().abs().max().item() if scale is None else scale
    bound = rounding_bound(dtype, n, max(scale, torch.finfo(dtype).tiny), k)
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    assert err <= bound, f"{name}: error {err:.3e} > rounding bound {bound:.3e} ({dtype}, n={n}, scale={scale:.3e})"


def assert_within(got, ref, bound, name: str = "") -> None:
    """|got - ref| <= bound elementwise (`bound` a tensor of ref's shape); the worst element is reported."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref.double()).abs()
    i = (err / bound).argmax()
    assert (err <= bound).all(), (f"{name}: error {err.flatten()[i]:.3e} > bound {bound.flatten()[i]:.3e} "
                                  f"at flat index {i.item()}")


def assert_sum_bound(got, ref, abs_ref, dtype: torch.dtype, n: int, name: str = "", k: float = ROUNDING_K) -> None:
    """Rule (2) elementwise for (multi)linear ops: |got - ref| <= k·eps·sqrt(n)·abs_ref, where abs_ref
    is the fp64 reference run on the absolute values of every input (so abs_ref = Σ|terms| of each
    output element exactly) and n the longest reduction. A tiny floor covers exact zeros."""
    bound = rounding_bound(dtype, n, 1.0, k) * abs_ref.double() + torch.finfo(dtype).tiny
    assert_within(got, ref, bound, f"{name} ({dtype}, n={n})")


def assert_flash_rule(got, ref, plain, dtype: torch.dtype, n: int, name: str = "") -> None:
    """Rule (3): err(got) <= 2 err(plain) + floor, errors measured against the fp64 `ref` (the bound is
    msn_fast.kernels.selfcheck.flash_rule_bound, what the kernels' self-check uses)."""
    ref64 = ref.double()
    err = (got.double() - ref64).abs().max().item()
    bound = flash_rule_bound(ref64, plain, dtype, n)
    assert err <= bound, f"{name}: kernel error {err:.3e} > 2 x torch {dtype} error + floor = {bound:.3e}"


# ---- seeds --------------------------------------------------------------------------------------
# MSN_TEST_SEED=<int> reruns the suite with other random inputs (the seed fixture below and
# tests that build their own generators read it via seeded()). Default 0.
try:
    TEST_SEED = int(os.environ.get("MSN_TEST_SEED", "0"))
except ValueError:
    raise pytest.UsageError(f"MSN_TEST_SEED must be an integer, got {os.environ['MSN_TEST_SEED']!r}") from None


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def raises_one_line(exc: type[BaseException], match: str, fn) -> None:
    """fn() raises exc whose message matches `match` and is a single line."""
    with pytest.raises(exc, match=match) as err:
        fn()
    assert "\n" not in str(err.value), str(err.value)


# The bad scalars every prototype-loss entry point refuses by name (msn_fast.loss.msn_loss adds its own):
# case -> (argument, value, rule in the message). Each gave NaN (torch) or a ZeroDivisionError (Triton).
BAD_TAU_AND_VIEWS = {
    "tau_zero": ("tau", 0.0, "finite number > 0"),
    "tau_negative": ("tau", -0.1, "finite number > 0"),
    "tau_nan": ("tau", float("nan"), "finite number > 0"),
    "tau_inf": ("tau", float("inf"), "finite number > 0"),
    "views_zero": ("num_views", 0, "integer >= 1"),
    "views_float": ("num_views", 2.0, "integer >= 1"),
}


def raises_bad_scalar(op: str, case: tuple, call) -> None:
    """call(**{name: value}) raises the one-line ValueError `<op>: <name> must be a(n) <rule>; got <value>`, for a
    case (name, value, rule) of a table such as BAD_TAU_AND_VIEWS."""
    name, value, rule = case
    raises_one_line(ValueError, rf"{op}: {name} must be an? {rule}; got {re.escape(repr(value))}$",
                    lambda: call(**{name: value}))


def raises_bad_shapes(op: str, shapes: tuple, match: str, call) -> None:
    """call(*tensors of these shapes) raises a one-line ValueError `<op>: <match>`."""
    tensors = [torch.randn(s, dtype=torch.float64, device=DEVICE) for s in shapes]
    raises_one_line(ValueError, f"{op}: " + match, lambda: call(*tensors))


def seeded(offset: int = 0) -> int:
    """A seed for a test's own generator that changes with MSN_TEST_SEED (offset tells draws apart)."""
    return TEST_SEED * 100_003 + offset


def pytest_report_header(config):
    return f"MSN_TEST_SEED={TEST_SEED} (set the environment variable to rerun with other random inputs)"


# The interpreter's bf16 tl.dot fix lives in the package (msn_fast.kernels._utils,
# install_interpreter_bf16_dot_fix): it installs itself when the kernels are imported under
# TRITON_INTERPRET=1 (set above, before any test imports them), so users get it too.


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); runs in bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(seeded())
    yield


@pytest.fixture(autouse=True)
def _restore_msn_fast_logging():
    """Undo what an in-process `train.main` does to the "msn_fast" logger (its own handlers, a log file,
    propagate=False), so a later test's caplog sees the records whatever ran before it and pytest version
    (whether pytest attaches its capture handlers to non-propagating loggers differs between versions)."""
    logger = logging.getLogger("msn_fast")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for h in logger.handlers:
        if h not in handlers:
            h.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


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
