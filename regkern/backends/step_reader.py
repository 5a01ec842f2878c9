"""The C++ step reader: a cached plan's per-step checks of its param group
(same parameters, same storage, gradients of the recorded shape, dtype and
layout) and the patch of the gradients' addresses into its metadata tables,
in one C++ call instead of six torch attribute reads per tensor in Python.

It is compiled against the installed torch (``torch.utils.cpp_extension``),
because reading tensors directly needs torch's headers and ABI, which the
ahead-of-time extension ``regkern._C`` deliberately does without. The first
use builds it once (about 20 s; one line on stderr says so) into
``$REGKERN_CACHE`` (default ``~/.cache/regkern``), under a name that carries
the Python, torch's version and a digest of torch's build, so another Python
or torch gets its own build. ``REGKERN_STEP_READER=0`` turns it off. When it
cannot be built, steps make the same checks in Python (about 0.1 ms more per
step of a ResNet-56) and a warning says so, once per process.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
import threading
import warnings
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_reader.cpp")
_lock = threading.Lock()
_module: Any = None
_failed: Optional[str] = None


def enabled() -> bool:
    """Whether steps use the reader (``REGKERN_STEP_READER`` is not ``0``)."""
    return os.environ.get("REGKERN_STEP_READER", "1") != "0"


def _name() -> str:
    """The extension's name: torch's version, and a digest of the source, of
    the torch it is built against and of the Python it is built for."""
    digest = hashlib.sha256()
    with open(_SOURCE, "rb") as f:
        digest.update(f.read())
    digest.update(f"{torch.__version__} {torch.version.git_version} {torch._C._GLIBCXX_USE_CXX11_ABI} "
                  f"{sysconfig.get_config_var('EXT_SUFFIX')}".encode())
    tag = re.sub(r"[^0-9a-zA-Z]", "_", f"{sys.implementation.cache_tag}_{torch.__version__}")
    return f"regkern_step_reader_{tag}_{digest.hexdigest()[:16]}"


def load() -> Any:
    """The compiled module, built on first use; None when it is turned off or
    cannot be built (then a warning, once per process)."""
    global _module, _failed
    if not enabled():
        return None
    if _module is None and _failed is None:
        with _lock:
            if _module is None and _failed is None:
                try:
                    _module = _build()
                except Exception as err:  # no compiler, no ninja, headers that do not match, ...
                    lines = str(err).strip().splitlines()
                    _failed = f"{type(err).__name__}: {lines[-1] if lines else ''}"
                    warnings.warn(f"regkern: the C++ step reader could not be built ({_failed}); optimizer steps "
                                  "check their tensors in Python instead (about 0.1 ms more per step of a "
                                  "ResNet-56's 167 tensors). Set REGKERN_STEP_READER=0 to skip the build.",
                                  stacklevel=4)
    return _module


def _build() -> Any:
    """Import the built library, building it first where it is missing or
    does not import (left broken by a killed build, say). A build runs in the
    folder ``build`` under an OS file lock, which a killed process releases,
    and the finished library is moved into place in one rename: a process
    never imports a half-written library nor waits on a dead one. (Called
    once per process: torch renames a second build of one name.)"""
    name = _name()
    directory = os.path.join(os.environ.get("REGKERN_CACHE", os.path.expanduser("~/.cache/regkern")), name)
    library = os.path.join(directory, f"{name}.so")
    module = _imported(name, library)
    if module is not None:
        return module
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process's build: wait for it
        module = _imported(name, library)  # built while this process waited
        if module is not None:
            return module
        if os.path.exists(library):
            os.remove(library)  # does not import
        from torch.utils import cpp_extension
        print(f"regkern: building the C++ step reader for torch {torch.__version__} in {directory} (once, about "
              "20 s; REGKERN_STEP_READER=0 skips it)", file=sys.stderr, flush=True)
        build = os.path.join(directory, "build")
        shutil.rmtree(build, ignore_errors=True)  # what a killed build left
        os.makedirs(build)
        try:
            module = cpp_extension.load(name, [_SOURCE], build_directory=build, extra_cflags=["-O2"], verbose=False)
            os.replace(os.path.join(build, f"{name}.so"), library)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return module


def _imported(name: str, library: str) -> Any:
    """The module in ``library``; None where it is missing or does not import."""
    if not os.path.exists(library):
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    try:
        module = importlib.util.module_from_spec(spec)  # (an extension module is loaded here)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def make_reader(group_params: Sequence[Tensor], params: Sequence[Tensor], plan) -> Any:
    """A reader for ``plan`` (a ``TablePlan`` over ``params``, the members of
    ``group_params`` that had gradients), or None where the Python path must
    run: the reader is off or unbuilt, the group is not a list of plain
    tensors, or the plan has tensors outside its tables (the reference's).
    The caller keeps ``group_params``' members alive while the reader lives
    (it refers to them without references of its own), and calls
    ``release()`` once the kernels ran. A later read of a group that is no
    longer a list of those members returns False."""
    if plan.slow_index or not plan.params or type(group_params) is not list or not all(
            type(p) in (Tensor, torch.nn.Parameter) for p in group_params):
        return None
    module = load()
    if module is None:
        return None
    cells: List[int] = [0] * len(params)
    for launch in plan.launches:
        table = launch.table
        base, width = table.data_ptr(), table.shape[1]
        for row, i in enumerate(launch.pick(range(len(params)))):
            cells[i] = base + (row * width + plan.grad_column) * table.element_size()
    if not all(cells):
        return None
    stepped = {id(p) for p in params}
    return module.StepReader(group_params, [id(p) in stepped for p in group_params], cells, plan.strides is None)
