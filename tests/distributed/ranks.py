"""Run a function on 2 local ranks (gloo, 127.0.0.1) and collect what each
returns, plus the small models, schedules and data-parallel training step
shared by the tests of tests/distributed (no tests here).

Each rank is a spawned process with one thread, kept for the session (the
``ranks`` fixture of conftest.py); its process group is torn down when the session ends or
a job fails. Every job is bounded by a timeout, and a rank that raises
fails the test with that rank's traceback.
"""
from __future__ import annotations

import datetime
import io
import multiprocessing
import queue
import socket
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.nn.functional as F
from torch import nn

import regkern

BACKEND = "reference"
MAX_STEPS = 40  # a run goes on until the cut, then 3 fine-tuning steps


WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, jobs, results) -> None:
    """A rank's loop: run each ``(fn, args)`` from ``jobs`` until ``None``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            fn, args = job
            try:
                value = io.BytesIO()  # as bytes: tensors must not outlive this process in shared memory
                torch.save(fn(rank, world, *args), value)
                results.put((rank, True, value.getvalue()))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class Ranks:
    """``world`` spawned processes in one gloo process group, kept between
    jobs (a process start costs seconds); a job that fails on any rank
    closes them, and the next job starts fresh ones."""

    def __init__(self, world: int = WORLD) -> None:
        self.world = world
        self.procs: List[Any] = []

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(self.world)]
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(rank, self.world, port, self.jobs[rank], self.results),
                                  daemon=True) for rank in range(self.world)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, *args: Any, timeout: float = 90.0) -> List[Any]:
        """``fn(rank, world, *args)`` on every rank; the values by rank (they
        must pickle). ``fn`` must be a module-level function."""
        if not self.procs or any(not p.is_alive() for p in self.procs):
            self.close()
            self._start()
        for q in self.jobs:
            q.put((fn, args))
        got, deadline = {}, time.monotonic() + timeout
        try:
            while len(got) < self.world:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"ranks {sorted(set(range(self.world)) - set(got))} did not finish "
                                         f"in {timeout:.0f} s")
                try:
                    rank, ok, value = self.results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                    if dead and self.results.empty():
                        raise AssertionError(f"rank(s) {dead} died (exit codes {[self.procs[r].exitcode for r in dead]})")
                    continue
                if not ok:
                    raise AssertionError(f"rank {rank} raised:\n{value}")
                got[rank] = value
        except BaseException:
            self.close(force=True)
            raise
        return [torch.load(io.BytesIO(got[r]), weights_only=False) for r in range(self.world)]

    def close(self, force: bool = False) -> None:
        for p, q in zip(self.procs, getattr(self, "jobs", [])):
            if p.is_alive() and not force:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 1)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []


# -- a deterministic data-parallel training loop --------------------------------------

def global_batch(i: int, n: int = 8, classes: int = 4, shape=(3, 6, 6)):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s equal share of a global batch."""
    return t.chunk(world)[rank]


def train_step(model, optimizer, schedule, i: int, rank: int = 0, world: int = 1) -> None:
    """One step on rank ``rank``'s share of global batch ``i`` (the whole
    batch when ``world`` is 1); the loss graph is dropped before the
    schedule runs."""
    x, y = global_batch(i)
    loss = F.cross_entropy(model(shard(x, rank, world)), shard(y, rank, world))
    optimizer.zero_grad()
    loss.backward()
    del loss
    optimizer.step()
    if schedule is not None:
        schedule.step()


class Net(nn.Module):
    """Two convolutions and a classifier, no BatchNorm (exact data parallelism)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(12, 4)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class BNNet(Net):
    """Net with BatchNorm after each convolution (trained in eval mode: the
    batch statistics of a rank's share would differ from the global batch's)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        with torch.no_grad():  # scales under the fixed threshold 0.01: channels to cut
            self.features[1].weight[[1, 5]] = 1e-4




def skip_without_fsdp2() -> None:
    """Skip the calling test module when this torch lacks torch.distributed or FSDP2's fully_shard."""
    import pytest

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available", allow_module_level=True)
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)


class OddNet(Net):
    """Net with odd widths: FSDP2 splits their rows unevenly over 2 ranks (4 and 3, 6 and 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.ReLU(), nn.Conv2d(7, 11, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(11, 4)


def fully_sharded(model, world: int):
    """``model`` under FSDP2: ``fully_shard`` on every layer with parameters, then on the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.features:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sgd(model):
    return regkern.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, backend=BACKEND)


def convs_apart(model, regularizer):
    ws = [model.features[0].weight, model.features[2].weight]
    rest = [p for p in model.parameters() if all(p is not w for w in ws)]
    return regkern.SGD([{"params": ws, "regularizer": regularizer}, {"params": rest}], lr=0.05, momentum=0.9,
                       backend=BACKEND)


def build(name, target, model):
    """Optimizer and schedule ``name`` for ``model``; the schedule is handed ``target``
    (the DDP wrapper or the module inside it)."""
    from regkern.prune import ADMMPruner, GReg1, GReg2, OneShotL1, PolarizationPruner, Slimming, SparseTraining

    if name == "greg1":
        opt = sgd(model)
        return opt, GReg1(target, opt, X, ratios=0.5, Ku=2, Ks=2, delta=0.5, tau=2.0)
    if name == "polarization":
        opt = sgd(model)
        return opt, PolarizationPruner(target, opt, X, steps=3, lam=1e-3, t=1.2, no_valley="fixed")
    if name == "rda":
        opt = regkern.RDA(model.parameters(), lr=0.05, lam=2e-2, backend=BACKEND)
        return opt, SparseTraining(target, opt, steps=3)
    if name == "proxl1":
        opt = convs_apart(model, regkern.ProxL1(lam=0.4))
        return opt, SparseTraining(target, opt, steps=3)
    if name == "greg1_adam":
        opt = regkern.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4, backend=BACKEND)
        return opt, GReg1(target, opt, X, ratios=0.5, Ku=2, Ks=2, delta=0.5, tau=2.0)
    if name == "admm":
        opt = sgd(model)
        return opt, ADMMPruner(target, opt, ratios=0.5, steps=4, K=2, rho=1e-2)
    if name == "admm_rows":
        opt = sgd(model)
        return opt, ADMMPruner(target, opt, ratios=0.5, steps=4, K=2, rho=1e-2, structured=True)
    if name == "greg2_adamw":
        opt = regkern.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, backend=BACKEND)
        return opt, GReg2(target, opt, X, ratios=0.5, Ku=1, Ks=2, delta=0.5, delta_pick=0.02, pick_ceiling=0.05,
                          tau=2.0)
    if name == "greg1_group":  # lam on rows and lam_cols on the consumers' columns
        opt = sgd(model)
        return opt, GReg1(target, opt, X, ratios=0.5, Ku=2, Ks=2, delta=0.5, tau=2.0, scope="group")
    if name == "greg2_weight":
        opt = sgd(model)
        return opt, GReg2(target, opt, ratios=0.5, mode="weight", Ku=1, Ks=2, delta=0.5, delta_pick=0.02,
                          pick_ceiling=0.05, tau=2.0)
    if name == "admm_sas":  # SAS-ADMM outer iterations, then the element masks
        opt = regkern.SASADMM(model.parameters(), beta=0.04, lam=1e-3, M=2, k0=2, backend=BACKEND)
        return opt, ADMMPruner(target, opt, ratios=0.5, outer_iterations=2)
    if name == "greg1_weight":
        opt = sgd(model)
        return opt, GReg1(target, opt, ratios=0.5, mode="weight", Ku=2, Ks=2, delta=0.5, tau=2.0)
    if name == "slimming":
        opt = sgd(model)
        return opt, Slimming(target, opt, X, lam=1e-3, steps=3, percent=0.3)
    if name == "oneshot":
        opt = sgd(model)
        return opt, OneShotL1(target, opt, X, ratios=0.5)
    raise AssertionError(name)


def beside_reference(name, loop, model, ref, rank: int, world: int, given=None):
    """Schedule ``name`` trained data-parallel (the loop calls ``loop``, which
    holds ``model``; the schedule is handed ``given``, by default ``loop``)
    and in one process (on ``ref``) side by side, each on its share of the
    same global batches, until the cut and 3 steps after it; returns the two
    schedules and their prune() summaries."""
    opt, schedule = build(name, loop if given is None else given, model)
    ref_opt, ref_schedule = build(name, ref, ref)
    summary = ref_summary = None
    end = MAX_STEPS
    for i in range(MAX_STEPS):
        if i == end:
            break
        train_step(loop, opt, schedule, i, rank, world)
        train_step(ref, ref_opt, ref_schedule, i)
        if schedule.done and not schedule.pruned:
            summary = schedule.prune()
            ref_summary = ref_schedule.prune()
            end = i + 4
    assert schedule.pruned, name
    return schedule, summary, ref_schedule, ref_summary


def close_params(a, b, atol: float = 1e-5) -> bool:
    a, b = dict(a.named_parameters()), dict(b.named_parameters())
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=1e-4, atol=atol) for k in a)




X = global_batch(999)[0][:2]
