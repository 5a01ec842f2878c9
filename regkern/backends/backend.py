"""The three ways regkern steps tensors, as objects: ``CppBackend`` (CPU
tensors, the C++ extension ``regkern._C``), ``TritonBackend`` (CUDA tensors,
the kernels of ``regkern.kernels``) and ``ReferenceBackend`` (anything, the
pure-torch ``regkern.reference``). ``choose_backend`` picks one per device.

A plan (``regkern.backends.dispatch.TablePlan`` and the families built on it)
asks its backend what differs between them instead of testing its name: the
terms its kernels compute, how launches are grouped, what is checked once and
what per step, whether reading a device value would stall the device, and how
a launch is made. The families name their kernels the same way on both fast
backends: ``<family>_step`` (``sgd``, ``adam``, ``rda``, ``sas_admm``) and the
ADMM passes ``admm_scores`` / ``admm_zu``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

BACKENDS = ("cpp", "triton", "reference")

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_warned_fallbacks = set()


def load_cpp():
    """The C++ extension, or None when it was not built."""
    try:
        import regkern._C as _C
    except ImportError:
        return None
    return _C


def load_triton(family: str = "sgd"):
    """The Triton kernels of ``family`` (a module of ``regkern.kernels``), or
    None when triton is not installed."""
    try:
        return importlib.import_module(f"regkern.kernels.{TritonBackend.MODULES.get(family, family)}")
    except ImportError:
        return None


class Backend:
    """A way of stepping a plan's tensors. The class attributes say how it
    differs from the others; ``ReferenceBackend`` runs no kernels at all."""

    name = ""
    #: runs fused kernels; a plan of a backend without them steps every tensor with the reference
    fast = False
    #: one call steps the tensors of every storage dtype (else one launch per dtype)
    one_call = True
    #: each call checks its whole table, coefficient vectors included (else the
    #: table is checked once, when the plan is built, and vectors by the plan)
    checks_each_call = False
    #: reading a device value on the host waits for the device: GradScaler's
    #: ``found_inf`` is then read by the kernels, never by the host
    reads_stall = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __repr__(self) -> str:
        return f"<regkern {self.name} backend on {self.device}>"

    def __str__(self) -> str:
        return self.name

    def kernels(self, family: str):
        """The module whose functions run ``family``'s kernels (None: no kernels)."""
        return None

    def terms(self, family: str) -> set:
        """The regularizer terms ``family``'s kernels compute (the plan steps
        tensors with other terms by the reference)."""
        return set(getattr(self.kernels(family), f"{family.upper()}_TERMS", ()))

    def launch_groups(self, index: Sequence[int], dtypes: Sequence[torch.dtype]) -> Dict[Optional[torch.dtype], List[int]]:
        """The tensors ``index`` split into launches: ``{storage dtype or None: indices}``."""
        if self.one_call:
            return {None: list(index)}
        return {dtype: [i for i in index if dtypes[i] == dtype] for dtype in FAST_DTYPES}

    def skips(self, found_inf: Optional[Tensor]) -> bool:
        """Whether the host skips a step because GradScaler found inf or NaN
        (where reading ``found_inf`` would stall the device, the kernels skip instead)."""
        return found_inf is not None and not self.reads_stall and bool(found_inf.item())

    def prepare(self, family: str, launch, build_units: Callable[[Tensor], Tensor], *check_args) -> None:
        """Make ``launch`` ready to run, once per plan: its work list, and the
        table check (``check``) of a backend that does not check on each call."""

    def check(self, family: str, launch, *args) -> None:
        """Raise ``ValueError`` where ``family``'s kernel would refuse
        ``launch``'s table (``args``: the step options the check depends on); writes nothing."""

    def run(self, family: str, launch, kernel: Optional[str] = None, **options) -> None:
        """One call of ``kernel`` (default ``<family>_step``) over ``launch``'s
        table with the step's ``options`` (by the names the kernels take)."""
        raise RuntimeError(f"the {self.name} backend runs no kernels")


class ReferenceBackend(Backend):
    name = "reference"


class CppBackend(Backend):
    """One C++ call per plan over a table in CPU memory, on torch's CPU thread count."""

    name = "cpp"
    fast = True
    checks_each_call = True

    def kernels(self, family: str):
        return load_cpp()

    def check(self, family: str, launch, *args) -> None:
        table = launch.table
        getattr(load_cpp(), f"check_{family}_table")(table.data_ptr(), table.shape[0], table.shape[1], *args)

    def run(self, family: str, launch, kernel: Optional[str] = None, **options) -> None:
        table = launch.table
        options.pop("found_inf", None)  # read by ``skips`` before any call
        if "grad_scale" in options:
            options["grad_scale"] = 1.0 if options["grad_scale"] is None else float(options["grad_scale"])
        if "lr" in options:
            options["lr"] = float(options["lr"])
        getattr(load_cpp(), kernel or f"{family}_step")(table.data_ptr(), table.shape[0], table.shape[1],
                                                        num_threads=torch.get_num_threads(), **options)


class TritonBackend(Backend):
    """One Triton launch per storage dtype. Tables are built and patched on
    the CPU; a launch's copy on the device is refreshed only when the CPU
    table changed, from pinned memory without waiting for the device."""

    name = "triton"
    fast = True
    one_call = False
    reads_stall = True
    #: the module of ``regkern.kernels`` of each family, and its table check
    MODULES = {"sas_admm": "admm", "admm": "admm"}
    CHECKS = {"sas_admm": "check_sas_table", "admm": "check_zu_table"}

    def kernels(self, family: str):
        return load_triton(family)

    def check(self, family: str, launch, *args) -> None:
        getattr(load_triton(family), self.CHECKS.get(family, "check_table"))(launch.table, launch.dtype, *args)

    def prepare(self, family: str, launch, build_units, *check_args) -> None:
        self.check(family, launch, *check_args)  # once, on the CPU table: a device table is not read back per step
        launch.units = build_units(launch.table).to(self.device)

    def device_table(self, launch) -> Tensor:
        """``launch``'s table on the device, brought up to date with its CPU table."""
        table = launch.table
        if self.device.type == "cpu":  # the interpreter reads the CPU table itself
            return table
        if launch.device_table is not None and torch.equal(table, launch.sent):
            return launch.device_table
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("regkern: a step captured in a CUDA graph must find the same parameters, state and "
                               "gradient tensors as the step before it; take a few steps before the capture and "
                               "keep the .grad tensors between steps (zero_grad(set_to_none=False))")
        if launch.device_table is None:
            launch.device_table = table.to(self.device)
        else:
            # through a fresh pinned buffer: torch's pinned allocator keeps it
            # until the copy ran, so the CPU table may be patched again at once
            launch.device_table.copy_(table.pin_memory(), non_blocking=True)
        launch.sent = table.clone()
        return launch.device_table

    def run(self, family: str, launch, kernel: Optional[str] = None, **options) -> None:
        run = getattr(load_triton(family), kernel or f"{family}_step")
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            if launch.stream is not None and launch.stream != stream and not torch.cuda.is_current_stream_capturing():
                # the last launch, on another stream, may still read the device table: no overwrite before it
                # ends (a captured step rewrites no table, see device_table, and may not wait on outside work)
                stream.wait_stream(launch.stream)
            launch.stream = stream
        table = self.device_table(launch)
        if self.device.type == "cuda" and self.device.index not in (None, torch.cuda.current_device()):
            with torch.cuda.device(self.device):
                run(table, launch.dtype, units=launch.units, **options)
        else:
            run(table, launch.dtype, units=launch.units, **options)


_BY_NAME = {cls.name: cls for cls in (CppBackend, TritonBackend, ReferenceBackend)}


def _warn_fallback(device: torch.device, why: str) -> None:
    key = (device.type, why)
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        warnings.warn(f"regkern: {why}; {device.type} tensors are stepped by the pure-torch reference (slower).", stacklevel=4)


def _backend_name(device: torch.device, requested: Optional[str]) -> str:
    name = requested or os.environ.get("REGKERN_BACKEND") or "auto"
    if name == "auto":
        if device.type == "cpu":
            if load_cpp() is not None:
                return "cpp"
            _warn_fallback(device, "the C++ extension regkern._C is not built (reinstall with `pip install -e .`)")
        elif device.type == "cuda":
            if load_triton() is not None:
                return "triton"
            _warn_fallback(device, "triton is not installed")
        else:
            _warn_fallback(device, f"no fused kernel exists for {device.type} tensors")
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown regkern backend {name!r}; choose one of {BACKENDS} or 'auto'")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"the cpp backend steps CPU tensors only, not {device.type} tensors")
    if name == "cpp" and load_cpp() is None:
        raise RuntimeError("the cpp backend was asked for but regkern._C is not built; reinstall with `pip install -e .`")
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            raise ValueError(f"the triton backend steps CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type} tensors")
        if load_triton() is None:
            raise RuntimeError("the triton backend was asked for but triton is not installed")
    return name


def choose_backend(device: torch.device, requested: Optional[str] = None) -> Backend:
    """The backend for tensors on ``device``: forced by ``requested`` (a name
    of ``BACKENDS``) or the ``REGKERN_BACKEND`` variable, else C++ on CPU,
    Triton on CUDA, the reference elsewhere (with a one-time warning, as when
    the native backend is not installed)."""
    return _BY_NAME[_backend_name(device, requested)](device)
