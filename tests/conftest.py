"""Session setup shared by the test modules.

The test folders mirror the package (``backends/``: every kernel family on
every backend; ``optim/``; ``prune/``; ``groups/``: groups, heads and
slicing); the helpers they share (models, optimizer fixtures, kernel cases)
live here at the top and are importable from every folder.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without a GPU the Triton kernels run on CPU tensors in triton's interpreter,
# which must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_sessionstart(session):
    """Build the C++ step reader (about 20 s on a fresh machine) before any
    test runs, not inside the first test that steps, which may have a time
    limit (a multi-process test, a subprocess running a README snippet)."""
    from regkern.backends import step_reader
    if step_reader.enabled():
        step_reader.load()


@pytest.fixture(autouse=True, scope="session")
def triton_interpreter_rounds_bf16_to_nearest_even():
    """Under TRITON_INTERPRET=1, triton 3.x converts fp32 to bf16 by truncation;
    GPUs round to nearest even (cvt.rn.bf16.f32), like torch. Make the
    interpreter round like the hardware so CPU runs of the Triton kernels
    check what a GPU computes."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        yield
        return
    cast = InterpreterBuilder.cast_impl

    def cast_rne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = np.where(np.isnan(src.data), (bits >> 16) | 0x40, rounded)  # NaN stays NaN
            return TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    InterpreterBuilder.cast_impl = cast_rne
    yield
    InterpreterBuilder.cast_impl = cast


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors and models: with more threads the OpenMP workers mostly
    spin, badly so on a loaded 2-core machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
