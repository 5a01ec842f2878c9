"""Step-time benchmark of the fused GReg SGD step against plain PyTorch.

``python -m regkern bench`` builds, for each shape set (see ``shapes.py``),
the parameters of a real network with random gradients and per-row lambdas,
and times one optimizer step per row of the table:

- ``regkern``: ``regkern.SGD`` with ``RowL2`` on every conv/linear weight;
- ``a``: the official GReg loop ``grad += lam[:, None, ...] * W``, then
  ``torch.optim.SGD(foreach=True)``; ``b``: the same loop, ``fused=True``;
- ``c``: ``torch.compile`` of the whole GReg step over the tensor lists;
- ``d``: ``torch.optim.SGD(fused=True)`` without the regularizer;
- ``floor``: the bytes the regkern step must move (read W, grad, buf, lam;
  write W, buf) at the bandwidth of ``dst.copy_(src)`` measured in the same
  run; ``floor-rmw``: the same bytes at the bandwidth of an in-place
  ``x += y``, which, like the step, writes lines it has just read (a copy
  into another buffer pays for write-allocate, so on CPUs it can be slower
  per byte than the step itself).

Every row starts from copies of the same tensors, so all do identical work.
A row is a function ``prepare(case, ctx) -> Prepared`` registered with
``@row(key, label)``: it builds its optimizer (or buffers) from ``case`` and
returns the call to time and a factor to scale its time by. Rows are timed in
turn over a few rounds, so noise on a shared machine falls on all rows alike.

Each regularizer has a table of its own per shape set: ``suite(key, ...)``
registers it (``--regularizers``) with the ``Case`` it runs on, and
``@row(key, label, regularizer=...)`` its rows. The rows above form the
``rowl2`` table; ``regularizers.py`` adds ProxL1, GroupLasso, L1,
Polarization and ADMM, ``rda.py`` the RDA optimizer.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from regkern.bench.shapes import SHAPE_SETS, ParamShape, shape_set

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("auto", "cpp", "triton", "reference")


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Stats:
    """Step times in seconds over ``n`` repeats."""
    median: float
    q1: float
    q3: float
    min: float
    n: int

    @staticmethod
    def of(samples: Sequence[float]) -> "Stats":
        s = sorted(samples)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return Stats(statistics.median(s), q1, q3, s[0], len(s))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, repeat: Optional[int] = None,
            target_s: float = 1.0, warmup: int = 2, max_repeat: int = 5000) -> List[float]:
    """Seconds per call of ``fn()``: ``repeat`` samples after ``warmup`` calls.

    ``repeat=None`` takes one sample, then as many more as fit in about
    ``target_s``. CPU: ``time.perf_counter`` around each call; CUDA: a pair of
    CUDA events around each call, synchronised after the last.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if repeat is not None:
        return _timed_calls(fn, device, repeat)
    samples = _timed_calls(fn, device, 1)
    more = int(min(target_s / max(samples[0], 1e-7), max_repeat)) - 1
    return samples + (_timed_calls(fn, device, more) if more > 0 else [])


def _timed_calls(fn: Callable[[], object], device: torch.device, n: int) -> List[float]:
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def time_fn(fn: Callable[[], object], device: torch.device, **kwargs) -> Stats:
    """``Stats`` of ``measure(fn, device, **kwargs)``."""
    return Stats.of(measure(fn, device, **kwargs))


# --------------------------------------------------------------------------- the work

class Case:
    """The master tensors of one shape set: every row copies them."""

    def __init__(self, name: str, shapes: List[ParamShape], dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> None:
        self.name, self.shapes, self.dtype, self.device = name, shapes, dtype, device
        gen = torch.Generator().manual_seed(seed)

        def rand(shape, scale):
            return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

        self.weights = [rand(s.shape, 0.05) for s in shapes]
        self.grads = [rand(s.shape, 0.01) for s in shapes]
        # Non-zero per-row lambda (GReg values lie around 1e-4 .. 1e-2), fp32.
        self.lams: List[Optional[Tensor]] = [
            (torch.rand(s.shape[0], generator=gen) * 1e-3 + 1e-5).to(device) if s.regularized else None
            for s in shapes]
        self.reg = [i for i, s in enumerate(shapes) if s.regularized]
        self.plain = [i for i, s in enumerate(shapes) if not s.regularized]

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.weights)

    @property
    def working_set_bytes(self) -> int:
        """W, grad and momentum buffer."""
        return 3 * sum(w.numel() * w.element_size() for w in self.weights)

    @property
    def floor_bytes(self) -> int:
        """Bytes a fused GReg step must move: read W, grad, buf, lam; write W, buf."""
        total = 5 * sum(w.numel() * w.element_size() for w in self.weights)
        return total + sum(lam.numel() * 4 for lam in self.lams if lam is not None)

    def fresh_params(self) -> List[torch.nn.Parameter]:
        """New parameters (copies of the masters) with copies of the gradients."""
        params = []
        for w, g in zip(self.weights, self.grads):
            p = torch.nn.Parameter(w.clone())
            p.grad = g.clone()
            params.append(p)
        return params

    def lam_views(self) -> List[Optional[Tensor]]:
        """Each lambda shaped ``[R, 1, ...]`` to broadcast over its weight."""
        return [None if lam is None else lam.view(-1, *([1] * (w.dim() - 1)))
                for lam, w in zip(self.lams, self.weights)]

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"{self.name} ({self.device.type}, {dt}): {len(self.weights)} tensors, "
                f"{self.numel / 1e6:.2f}M params, {len(self.reg)} RowL2 weights; "
                f"a fused step moves {self.floor_bytes / 1e6:.1f} MB")


@dataclasses.dataclass
class Context:
    """Run-wide settings a row may need."""
    backend: Optional[str] = None      # regkern backend of the current regkern row
    repeat: Optional[int] = None       # timed calls per row (None: about target_s seconds)
    target_s: float = 1.0
    rounds: int = 3                    # rows are timed in turn, this many times over
    compile_timeout_s: float = 300.0


@dataclasses.dataclass
class Prepared:
    """What a row hands the runner: the call to time and what a call stands for."""
    step: Callable[[], object]
    scale: float = 1.0  # the row's time is ``scale`` times the time of ``step``
    note: str = ""
    keep: object = None  # references that must stay alive while timing


class Unavailable(Exception):
    """A row that cannot run here (printed in the table, not raised)."""


@dataclasses.dataclass
class Row:
    key: str
    label: str
    prepare: Callable[[Case, Context], Prepared]
    per_backend: bool = False  # one table line per requested regkern backend
    regularizer: str = "rowl2"  # the table (a key of SUITES) the row belongs to


ROWS: List[Row] = []
BASELINE = "regkern"


def row(key: str, label: str, per_backend: bool = False, regularizer: str = "rowl2"):
    """Register ``prepare(case, ctx) -> Prepared`` as a row of a regularizer's table."""
    def register(fn: Callable[[Case, Context], Prepared]):
        ROWS.append(Row(key, label, fn, per_backend, regularizer))
        return fn
    return register


@dataclasses.dataclass
class Suite:
    """A regularizer's table: its rows run, per shape set, on ``case(base)``,
    the shape set's ``Case`` seen by that regularizer (regularized set, plain
    rest, floor bytes); ``None`` when the set has nothing to regularize."""
    key: str
    help: str
    case: Callable[[Case], Optional[Case]]
    shapes: Optional[Sequence[str]] = None  # default shape sets (None: all)


SUITES: Dict[str, Suite] = {}


def suite(key: str, help: str, case: Callable[[Case], Optional[Case]] = lambda case: case,
          shapes: Optional[Sequence[str]] = None) -> Suite:
    """Register a regularizer's table (a ``--regularizers`` choice)."""
    SUITES[key] = Suite(key, help, case, shapes)
    return SUITES[key]


suite("rowl2", "per-row L2 penalty (GReg) on conv/linear weights")


def _greg_loop(case: Case, params: Sequence[Tensor]) -> Callable[[], None]:
    """The official GReg penalty: ``grad += lam[:, None, ...] * W`` per weight."""
    pairs = [(params[i], lam) for i, lam in enumerate(case.lam_views()) if lam is not None]

    @torch.no_grad()
    def add_penalty() -> None:
        for p, lam in pairs:
            p.grad.add_(lam * p)
    return add_penalty


@row("regkern", "regkern.SGD + RowL2 (fused)", per_backend=True)
def regkern_sgd(case: Case, ctx: Context) -> Prepared:
    try:
        import regkern
        sgd, row_l2 = regkern.SGD, regkern.RowL2
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"regkern.SGD not importable ({e})") from None
    params = case.fresh_params()
    groups = [{"params": [params[i] for i in case.reg], "regularizer": row_l2()}]
    if case.plain:
        groups.append({"params": [params[i] for i in case.plain]})
    opt = sgd(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=ctx.backend)
    for i in case.reg:
        opt.state[params[i]]["lam"].copy_(case.lams[i])
    note = ""
    with contextlib.suppress(Exception):  # which kernel actually ran (auto picks by device)
        from regkern.backend import choose_backend
        note = f"backend {choose_backend(case.device, ctx.backend)}"
    return Prepared(step=opt.step, note=note, keep=(params, opt))


def _loop_then(fused: bool):
    def prepare(case: Case, ctx: Context) -> Prepared:
        params = case.fresh_params()
        flag = {"fused": True} if fused else {"foreach": True}
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **flag)
        add_penalty = _greg_loop(case, params)

        def step() -> None:
            add_penalty()
            opt.step()
        return Prepared(step=step, keep=(params, opt))
    return prepare


loop_foreach = row("a", "(a) loop grad+=lam*W, SGD foreach")(_loop_then(fused=False))
loop_fused = row("b", "(b) loop grad+=lam*W, SGD fused")(_loop_then(fused=True))


def greg_step_math(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor],
                   lams: List[Optional[Tensor]], lr: float, momentum: float, weight_decay: float) -> None:
    """The whole GReg step in plain torch ops (fp32 math), for ``torch.compile``."""
    for w, g, buf, lam in zip(params, grads, bufs, lams):
        w32 = w.float()
        d = g.float() + weight_decay * w32
        if lam is not None:
            d = d + lam * w32
        b = momentum * buf.float() + d
        buf.copy_(b)
        w.copy_(w32 - lr * b)


class _Alarm:
    """Raise ``TimeoutError`` after ``seconds`` (main thread on Unix only)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.armed:
            def on_alarm(signum, frame):
                raise TimeoutError(f"compile took more than {self.seconds:.0f} s")
            self.previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


@row("c", "(c) torch.compile GReg step")
def compiled_step(case: Case, ctx: Context) -> Prepared:
    return prepare_compiled(case, ctx, greg_step_math, case.lam_views())


def prepare_compiled(case: Case, ctx: Context, math: Callable[..., None], per_tensor: list) -> Prepared:
    """A row timing ``torch.compile(math, fullgraph=True)`` called as
    ``math(params, grads, bufs, per_tensor, LR, MOMENTUM, WEIGHT_DECAY)`` on
    copies of the case's tensors (``bufs`` start at zero). Static shapes: a
    training run compiles for its one network, whereas by default a second
    shape set in this process would recompile with symbolic sizes."""
    params = [p.detach() for p in case.fresh_params()]
    grads = [g.clone() for g in case.grads]
    bufs = [torch.zeros_like(w) for w in params]
    fn = torch.compile(math, fullgraph=True, dynamic=False)

    def step() -> None:
        fn(params, grads, bufs, per_tensor, LR, MOMENTUM, WEIGHT_DECAY)
    t0 = time.perf_counter()
    try:
        with _Alarm(ctx.compile_timeout_s):
            step()
            synchronize(case.device)
    except TimeoutError as e:
        torch._dynamo.reset()
        raise Unavailable(str(e)) from None
    except Exception as e:  # noqa: BLE001  (any compiler failure becomes a table note)
        torch._dynamo.reset()
        raise Unavailable(f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}") from None
    compile_s = time.perf_counter() - t0
    return Prepared(step=step, note=f"compile {compile_s:.1f} s", keep=(params, grads, bufs, per_tensor, fn))


@row("d", "(d) SGD fused, no regularizer")
def torch_fused(case: Case, ctx: Context) -> Prepared:
    params = case.fresh_params()
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
    return Prepared(step=opt.step, keep=(params, opt))


@row("floor", "(e) memory floor, copy")
def memory_floor(case: Case, ctx: Context) -> Prepared:
    """``floor_bytes`` at the bandwidth of ``dst.copy_(src)``, src and dst
    together as large as the step's working set (W, grad, buf), so that the
    copy and the step see the same caches."""
    n = max(case.working_set_bytes // 2, 1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=case.device)
    dst = torch.empty_like(src)
    moved = 2 * src.nbytes  # read src, write dst
    return Prepared(step=lambda: dst.copy_(src), scale=case.floor_bytes / moved,
                    note=f"copy {src.nbytes / 2**20:.0f} MiB", keep=(src, dst))


@row("floor-rmw", "(e2) memory floor, x += y")
def memory_floor_in_place(case: Case, ctx: Context) -> Prepared:
    """``floor_bytes`` at the bandwidth of ``x.add_(y)``: like the step it
    updates in place (a written line was just read, no write-allocate), which
    a copy into a separate buffer does not."""
    n = max(case.working_set_bytes // 2, 1 << 20) // 4
    x = torch.ones(n, dtype=torch.float32, device=case.device)
    y = torch.ones_like(x)
    moved = 3 * x.nbytes  # read x, y; write x
    return Prepared(step=lambda: x.add_(y, alpha=1e-30), scale=case.floor_bytes / moved,
                    note=f"x += y on 2 x {x.nbytes / 2**20:.0f} MiB", keep=(x, y))


# --------------------------------------------------------------------------- running

@dataclasses.dataclass
class Result:
    key: str
    label: str
    stats: Optional[Stats]
    note: str = ""


@dataclasses.dataclass
class Table:
    title: str
    floor_bytes: int
    results: List[Result]
    shapes: str = ""
    regularizer: str = "rowl2"

    def baseline(self) -> Optional[Result]:
        return next((r for r in self.results if r.key == BASELINE and r.stats), None)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, ctx: Context, keys: Optional[Sequence[str]] = None,
             backends: Sequence[Optional[str]] = (None,), log: Callable[[str], None] = lambda s: None,
             regularizer: str = "rowl2") -> Table:
    """Prepare every row of ``regularizer``'s table (``case`` is the one its
    suite made), then time them in turn ``ctx.rounds`` times over, so that a
    burst of noise on a shared machine hits all rows alike."""
    results, prepared = [], []
    for r in ROWS:
        if r.regularizer != regularizer or (keys is not None and r.key not in keys):
            continue
        for backend in (backends if r.per_backend else (None,)):
            label = f"{r.label} [{backend or 'auto'}]" if r.per_backend else r.label
            log(f"  {case.name}: preparing {label}")
            p, note = None, ""
            try:
                p = r.prepare(case, dataclasses.replace(ctx, backend=backend))
                note = p.note
            except Unavailable as e:
                note = str(e)
            except Exception as e:  # noqa: BLE001  (a failing row must not stop the others)
                note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
            results.append(Result(r.key, label, None, note))
            prepared.append(p)
    samples: List[List[float]] = [[] for _ in prepared]
    rounds = max(1, ctx.rounds)
    repeat = None if ctx.repeat is None else max(1, ctx.repeat // rounds)
    for i in range(rounds):
        for k, (p, result) in enumerate(zip(prepared, results)):
            if p is None:
                continue
            log(f"  {case.name}: round {i + 1}/{rounds}: {result.label}")
            try:
                samples[k] += [t * p.scale for t in measure(
                    p.step, case.device, repeat=repeat, target_s=ctx.target_s / rounds, warmup=1 if i else 2)]
            except Exception as e:  # noqa: BLE001
                result.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
                prepared[k] = None
                samples[k] = []
    for result, xs in zip(results, samples):
        if xs:
            result.stats = Stats.of(xs)
    for result in results:
        if result.key.startswith("floor") and result.stats is not None:  # state the bandwidth too
            result.note += f" at {case.floor_bytes / result.stats.median / 1e9:.1f} GB/s"
    del prepared
    _release(case.device)
    return Table(case.describe(), case.floor_bytes, results, case.name, regularizer)


def format_table(table: Table) -> str:
    """One table: times in ms, effective GB/s at the fused step's traffic, ratio to regkern."""
    base = table.baseline()
    head = ("row", "median ms", "IQR ms", "min ms", "GB/s", "vs regkern", "note")
    lines = []
    for r in table.results:
        if r.stats is None:
            lines.append((r.label, "-", "-", "-", "-", "-", r.note))
            continue
        s = r.stats
        if base is None or r is base:
            ratio = "1.00x" if r is base else "-"
        elif r.key.startswith("floor"):
            ratio = f"{100 * s.median / base.stats.median:.0f}% of floor"
        else:
            ratio = f"{s.median / base.stats.median:.2f}x"
        lines.append((r.label, f"{s.median * 1e3:.3f}", f"{s.q1 * 1e3:.3f}-{s.q3 * 1e3:.3f}",
                      f"{s.min * 1e3:.3f}", f"{table.floor_bytes / s.median / 1e9:.1f}", ratio,
                      f"{r.note} (n={s.n})".strip()))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 6) else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [f"== {table.title}", fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line).rstrip() for line in lines]
    return "\n".join(out)


def machine_info(argv: Sequence[str]) -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    isa = "regkern._C not built"
    with contextlib.suppress(Exception):
        from regkern.backend import load_cpp
        cpp = load_cpp()
        if cpp is not None:
            isa = cpp.isa() if hasattr(cpp, "isa") else "regkern._C has no isa()"
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "regkern", *argv]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "isa": isa,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_machine(info: Dict[str, object]) -> str:
    lines = [f"regkern bench, {info['date']}",
             f"command: {info['command']}",
             f"machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), "
             f"torch threads {info['torch_threads']}, ISA: {info['isa']}, load average {info['load_average']}"]
    if "gpu" in info:
        lines.append(f"gpu: {info['gpu']}")
    lines.append(f"torch {info['torch']}, python {info['python']}")
    lines.append(f"step: lr {LR}, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY} on every parameter; rowl2: "
                 "per-row lam in [1e-5, 1e-3] on conv/linear weights; other regularizers: as in the table title, "
                 "on the set it names; median of n steps after warm-up; "
                 "GB/s = fused-step bytes / time; vs regkern = time / regkern time")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def _csv(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m regkern bench``."""
    parser.add_argument("--shapes", type=_csv(list(SHAPE_SETS)), default=None,
                        help=f"comma-separated shape sets: {', '.join(SHAPE_SETS)} (default: all for "
                             "rowl2, " + _default_shapes_help() + " for the other regularizers)")
    parser.add_argument("--regularizers", type=_csv(list(SUITES)), default=list(SUITES), metavar="LIST",
                        help="comma-separated regularizers, one table each per shape set (default: all): "
                             + "; ".join(f"{s.key} = {s.help}" for s in SUITES.values())
                             + ". The BatchNorm ones skip shape sets without BatchNorm (vit-b, tensor*)")
    parser.add_argument("--backend", type=_csv(BACKENDS), default=["auto"],
                        help="regkern backend(s), comma-separated; one regkern row each, the first is "
                             "the baseline of the ratios (default: auto = C++ on CPU, Triton on CUDA)")
    keys = list(dict.fromkeys(r.key for r in ROWS))
    parser.add_argument("--rows", type=_csv(keys), default=None, metavar="LIST",
                        help=f"rows to run in each table (default: all): {', '.join(keys)}. regkern is the "
                             "baseline; a = what users run today (the official loop, or the regularizer "
                             "as separate torch ops or an autograd loss term) with torch.optim.SGD(foreach); "
                             "b = GReg loop with SGD fused (rowl2); c = torch.compile of the same math "
                             "(rowl2, prox-l1, group-lasso, rda); d = SGD fused without regularizer; floor, "
                             "floor-rmw = the bytes of that regularizer's fused step at copy and x += y bandwidth")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="storage dtype of parameters, gradients and momentum (default: fp32)")
    parser.add_argument("--device", type=_csv(["cpu", "cuda"]), default=None,
                        help="devices (default: cpu, and cuda when a GPU is present)")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="torch.set_num_threads(T) first (default: torch's own choice)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="timed steps per row, over all rounds (default: adaptive, about --seconds per row)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="target seconds per row when --repeat is not given (default: 1.0)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="time the rows in turn this many times over (default: 3)")
    parser.add_argument("--compile-timeout", type=float, default=300.0, metavar="S",
                        help="give up on torch.compile (rows c) after S seconds (default: 300)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write machine info and every row's times (seconds) as JSON")


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(argv)
    print(format_machine(info), flush=True)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    backends = [None if b == "auto" else b for b in args.backend]
    ctx = Context(repeat=args.repeat, target_s=args.seconds, rounds=args.rounds,
                  compile_timeout_s=args.compile_timeout)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if sys.stderr.isatty() else (lambda s: None)
    suites = [SUITES[key] for key in args.regularizers]
    plan = [(name, [s for s in suites if args.shapes or s.shapes is None or name in s.shapes])
            for name in (args.shapes or SHAPE_SETS)]
    tables = []
    for device_name in devices:
        device = torch.device(device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("\n(cuda asked for but no CUDA device is present: skipped)")
            continue
        for name, wanted in plan:
            if not wanted:
                continue
            base = Case(name, shape_set(name), DTYPES[args.dtype], device)
            for s in wanted:
                case = s.case(base)
                if case is None:
                    print(f"\n({s.key} on {name}: the shape set has nothing it acts on, e.g. no BatchNorm "
                          "scales; skipped)", flush=True)
                    continue
                table = run_case(case, ctx, args.rows, backends, log, regularizer=s.key)
                del case
                _release(device)
                print("\n" + format_table(table), flush=True)
                tables.append(table)
            del base
            _release(device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "tables": [dataclasses.asdict(t) for t in tables]}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def _default_shapes_help() -> str:
    sets = sorted({x for s in SUITES.values() if s.shapes for x in s.shapes}, key=list(SHAPE_SETS).index)
    return ",".join(sets) or "all"


# The other regularizers' tables register themselves on import.
from regkern.bench import regularizers as _regularizers  # noqa: E402,F401
from regkern.bench import rda as _rda  # noqa: E402,F401
