"""Training and evaluation loops of the demo: plain minibatch SGD over
in-memory tensors, a tqdm bar per phase, a callback after every optimizer
step (where pruning schedules advance) and a deterministic batch order.

Started by ``torchrun --nproc-per-node N -m regkern demo``, the demo trains
data-parallel: every rank draws the same batches (same generator), takes its
share of each (``DistributedDataParallel`` averages the gradients), and
evaluates the whole test set; rank 0 alone prints and writes the report."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from regkern.demo.data import Dataset


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """One epoch of shuffled index batches (the last, short batch is dropped
    when it is smaller than half a batch: tiny BatchNorm batches only add noise)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < max(2, batch_size // 2) and start > 0:
            return
        yield idx


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """The CIFAR augmentation of the papers: a random crop of the image padded
    by ``pad`` pixels and a random horizontal flip, per image."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    return sum(1 for _ in batch_indices(len(data.y_train), batch_size, torch.Generator().manual_seed(0)))


def cosine_lr(base: float, total: int, floor: float = 0.0) -> Callable[[int], float]:
    """Cosine decay from ``base`` to ``floor`` over ``total`` steps."""
    return lambda step: floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def data_parallel_rank(device: str) -> Tuple[int, int]:
    """``(rank, world size)``: a run launched by ``torchrun`` with more than one
    process joins the process group (gloo on CPU, NCCL on CUDA); otherwise ``(0, 1)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _ranks() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_quietly(run: Callable[..., Any], args: argparse.Namespace, settings: Any, dataset: Dataset) -> Any:
    """``run`` on a rank other than 0: the same training (every collective
    matches rank 0's), nothing printed, files written to a temporary folder
    that is removed afterwards."""
    out = tempfile.mkdtemp(prefix="regkern-demo-rank")
    quiet_args = argparse.Namespace(**{**vars(args), "out": out, "quiet_rank": True})
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            return run(quiet_args, dataclasses.replace(settings, quiet=True), dataset)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """The learning rate of every param group that has one (SAS-ADMM's have none)."""
    for group in optimizer.param_groups:
        if "lr" in group:
            group["lr"] = value


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, *, epochs: float, batch_size: int,
          generator: torch.Generator, device: torch.device, desc: str, lr: Optional[Callable[[int], float]] = None,
          on_step: Optional[Callable[[int], None]] = None, stop: Optional[Callable[[], bool]] = None,
          quiet: bool = False) -> int:
    """Train for ``epochs`` (fractions allowed) with cross-entropy; after each
    optimizer step call ``on_step(step)`` (1-based); end early once ``stop()``
    is true. ``lr(step)`` (0-based), when given, sets every group's learning
    rate before the step. In a data-parallel run each rank trains on its
    share of every batch through a ``DistributedDataParallel`` wrapper that
    lives for this call. Returns the number of steps taken."""
    n = len(data.y_train)
    total = int(round(epochs * steps_per_epoch(data, batch_size)))
    model.train()
    rank, world = _ranks()
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    try:
        return _loop(net, optimizer, data, n, total, rank, world, batch_size=batch_size, generator=generator,
                     device=device, desc=desc, lr=lr, on_step=on_step, stop=stop, quiet=quiet)
    finally:
        if net is not model:
            from regkern.distributed import release_ddp

            release_ddp(net)


def _loop(net, optimizer, data, n, total, rank, world, *, batch_size, generator, device, desc, lr, on_step, stop,
          quiet) -> int:
    """The steps of :func:`train` through ``net`` (the model or its DDP wrapper)."""
    step = 0
    with tqdm(total=total, desc=desc, unit="step", leave=False, disable=quiet, dynamic_ncols=True) as bar:
        while step < total and not (stop is not None and stop()):
            for idx in batch_indices(n, batch_size, generator):
                if step >= total or (stop is not None and stop()):
                    break
                x = data.x_train[idx]
                if data.augment:
                    x = augment(x, generator)
                x, y = x.to(device, non_blocking=True), data.y_train[idx].to(device, non_blocking=True)
                if world > 1:  # this rank's share (the augmentation drew for the whole batch on every rank)
                    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
                if lr is not None:
                    set_lr(optimizer, lr(step))
                loss = F.cross_entropy(net(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if on_step is not None:
                    on_step(step)
                bar.update(1)
                if step % 10 == 0 or step == total:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return step


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 1000) -> float:
    """Top-1 test accuracy in percent (BatchNorm in eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data.y_test), batch_size):
        x = data.x_test[start:start + batch_size].to(device)
        y = data.y_test[start:start + batch_size].to(device)
        correct += (model(x).argmax(1) == y).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(len(data.y_test), 1)
