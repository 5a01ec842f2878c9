"""Training and evaluation loops of the demo: plain minibatch SGD over
in-memory tensors, a tqdm bar per phase, a callback after every optimizer
step (where pruning schedules advance) and a deterministic batch order."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

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


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, *, epochs: float, batch_size: int,
          generator: torch.Generator, device: torch.device, desc: str, lr: Optional[Callable[[int], float]] = None,
          on_step: Optional[Callable[[int], None]] = None, stop: Optional[Callable[[], bool]] = None,
          quiet: bool = False) -> int:
    """Train for ``epochs`` (fractions allowed) with cross-entropy; after each
    optimizer step call ``on_step(step)`` (1-based); end early once ``stop()``
    is true. ``lr(step)`` (0-based), when given, sets every group's learning
    rate before the step. Returns the number of steps taken."""
    n = len(data.y_train)
    total = int(round(epochs * steps_per_epoch(data, batch_size)))
    model.train()
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
                if lr is not None:
                    value = lr(step)
                    for group in optimizer.param_groups:
                        if "lr" in group:  # (SAS-ADMM has no learning rate)
                            group["lr"] = value
                loss = F.cross_entropy(model(x), y)
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
