"""The harness of ``python -m regkern bench``: timing, cases, the row and
suite registries, the runner, the tables and the machine line.

A *suite* is a table per shape set: ``suite(key, help, case, shapes)``
registers one (a ``--regularizers`` choice) with the ``Case`` its rows run on
(``case(base)``: the shape set's masters as that table sees them, or ``None``
when the set has nothing for it). A *row* is a function ``prepare(case, ctx)
-> Prepared`` registered with ``@row(key, label, regularizer=...)``: it builds
its optimizer (or buffers) from ``case`` and returns the call to time and a
factor to scale its time by. Every row starts from copies of the same master
tensors, so all rows of a table do identical work. ``run_case`` prepares a
table's rows and times them in turn over a few rounds, so noise on a shared
machine falls on all rows alike; ``format_table`` prints it.

The suites live in their own modules, each importing only this one (and
``shapes``): ``sgd`` (RowL2, the GReg table), ``regularizers`` (ProxL1,
GroupLasso, L1, Polarization, ADMM, the ADMM Z/U update, SAS-ADMM), ``rda``
and ``adam``; ``cli`` imports them all and holds the command line. Also here,
because several suites share them: the SGD settings (``LR``, ``MOMENTUM``,
``WEIGHT_DECAY``), ``RegularizerCase`` (a shape set as one regularizer's table
sees it), the GReg penalty loop, the ``torch.compile`` helper
(``prepare_compiled``), and the rows (d) ``sgd_fused`` and the memory floors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
import platform
import shlex
import signal
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from regkern.bench.shapes import ParamShape

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("auto", "cpp", "triton", "reference")
BN_INIT = 0.5                      # BN scales start at 0.5 (slimming and polarization recipes)


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


# --------------------------------------------------------------------------- a regularizer's view of a case

class RegularizerCase(Case):
    """A shape set's ``Case`` as one regularizer's table sees it: the same
    master tensors (BN scales reset to about 0.5 for the BN regularizers),
    ``reg`` the indices of the regularized set, ``plain`` the rest, and
    ``floor_bytes`` the traffic of its fused step."""

    def __init__(self, base: Case, regularizer: str, what: str, reg: List[int], set_name: str,
                 extra_bytes: int, bn: bool = False) -> None:
        self.__dict__.update(base.__dict__)  # shares the masters, allocates nothing
        self.regularizer, self.what, self.set_name = regularizer, what, set_name
        self.reg = reg
        chosen = set(reg)
        self.plain = [i for i in range(len(self.shapes)) if i not in chosen]
        self.extra_bytes = extra_bytes
        if bn:
            gen = torch.Generator().manual_seed(1)
            self.weights = list(self.weights)
            for i in reg:
                w = self.weights[i]
                self.weights[i] = (BN_INIT + 0.1 * torch.randn(w.shape, generator=gen)).to(w)

    @property
    def floor_bytes(self) -> int:
        """Read W, grad, buf; write W, buf; plus the regularizer's own reads."""
        return 5 * sum(w.numel() * w.element_size() for w in self.weights) + self.extra_bytes

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        values = sum(self.weights[i].numel() for i in self.reg)
        return (f"{self.name}, {self.what} ({self.device.type}, {dt}): {len(self.weights)} tensors, "
                f"{self.numel / 1e6:.2f}M params; regularized: {len(self.reg)} {self.set_name} "
                f"({values:,} values), {len(self.plain)} tensors plain; "
                f"a fused step moves {self.floor_bytes / 1e6:.1f} MB")


# --------------------------------------------------------------------------- shared by several suites

def greg_loop(case: Case, params: Sequence[Tensor]) -> Callable[[], None]:
    """The official GReg penalty: ``grad += lam[:, None, ...] * W`` per weight."""
    pairs = [(params[i], lam) for i, lam in enumerate(case.lam_views()) if lam is not None]

    @torch.no_grad()
    def add_penalty() -> None:
        for p, lam in pairs:
            p.grad.add_(lam * p)
    return add_penalty


def _routing(opt) -> Optional[str]:
    """Which backend stepped how many tensors, from the optimizer's plans
    (after a step; None when regkern's internals differ from what this expects)."""
    try:
        counts = {}
        for cached in opt._plans.values():
            plan = cached.plan
            slow = len(plan.slow_index)
            if slow:
                counts["reference"] = counts.get("reference", 0) + slow
            if len(plan.params) > slow:
                counts[plan.backend.name] = counts.get(plan.backend.name, 0) + len(plan.params) - slow
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    except Exception:  # noqa: BLE001
        return None


def backend_note(case: Case, ctx: Context, opt, terms: Sequence[str]) -> str:
    """The note of a regkern row: the backend chosen, the ``terms`` it lacks
    (their tensors go to the reference), and where the tensors went."""
    from regkern.backends.backend import choose_backend
    chosen = choose_backend(case.device, ctx.backend)
    missing = sorted(set(terms) - chosen.terms("sgd")) if chosen.fast else []
    note = f"backend {chosen}"
    if missing:
        note += f" (lacks {', '.join(missing)}: {case.set_name} on reference)"
    routed = _routing(opt)
    return f"{note}; tensors: {routed}" if routed else note


class Alarm:
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
        with Alarm(ctx.compile_timeout_s):
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


def sgd_fused(case: Case, ctx: Context) -> Prepared:
    """Row (d) of the SGD tables: ``torch.optim.SGD(fused=True)`` without a regularizer."""
    params = case.fresh_params()
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
    return Prepared(step=opt.step, keep=(params, opt))


def memory_floor(case: Case, ctx: Context) -> Prepared:
    """Row (e): ``floor_bytes`` at the bandwidth of ``dst.copy_(src)``, src and dst
    together as large as the step's working set (W, grad, buf), so that the
    copy and the step see the same caches."""
    n = max(case.working_set_bytes // 2, 1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=case.device)
    dst = torch.empty_like(src)
    moved = 2 * src.nbytes  # read src, write dst
    return Prepared(step=lambda: dst.copy_(src), scale=case.floor_bytes / moved,
                    note=f"copy {src.nbytes / 2**20:.0f} MiB", keep=(src, dst))


def memory_floor_in_place(case: Case, ctx: Context) -> Prepared:
    """Row (e2): ``floor_bytes`` at the bandwidth of ``x.add_(y)``: like the step it
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


def release(device: torch.device) -> None:
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
    release(case.device)
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
        from regkern.backends.backend import load_cpp
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
