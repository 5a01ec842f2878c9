"""Shared fixtures for optimizer tests: backends, twin parameters, gradients."""
from __future__ import annotations

import copy
import os

import torch

from regkern.backends.backend import load_cpp

# Every backend that can step CPU tensors here. The C++ extension is part of
# the install: its absence is a failure, not a skip.
CPU_BACKENDS = ["cpp", "reference"]
if os.environ.get("TRITON_INTERPRET") == "1":
    CPU_BACKENDS.append("triton")

SHAPES = [(16, 3, 3, 3), (16,), (16,), (10, 16), (10,), (7, 5), (1,), (33,)]


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def twin(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def fake_grads(params, step, scale=1.0, maximize=False):
    """Deterministic gradients that depend on W mildly (a contraction, so
    one-ulp differences between implementations do not grow over steps)."""
    pull = -0.2 if maximize else 0.2
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(1000 * step + i)
        noise = torch.randn(p.shape, generator=gen)
        p.grad = ((pull * p.detach().double() + 0.5 * noise.double()) * scale).to(p.dtype)


def train(opt, params, steps, start=0, scheduler=None):
    for t in range(start, start + steps):
        fake_grads(params, t, maximize=opt.param_groups[0]["maximize"])
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_params_close(actual, expected, dtype=torch.float32):
    # fp32: rounding only. bf16/fp16: torch's foreach SGD rounds after each op
    # (lr * grad, mu * buf, ...), regkern once per step; the differences
    # accumulate through the momentum buffer to a few ulps at the values'
    # magnitude (about 1 here).
    eps = torch.finfo(dtype).eps
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else \
        dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=8 * eps, atol=8 * eps)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e.detach(), **tol)


def snapshot(opt, params):
    return copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))


def assert_unchanged(before, opt, params):
    old_params, old_state = before
    for a, b in zip(old_params, params):
        assert torch.equal(a, b.detach())
    new_state = opt.state_dict()
    assert old_state["state"].keys() == new_state["state"].keys()
    for key, entry in old_state["state"].items():
        assert entry.keys() == new_state["state"][key].keys()
        for name, value in entry.items():
            other = new_state["state"][key][name]
            if isinstance(value, torch.Tensor):
                assert (value.shape, value.dtype, value.device) == (other.shape, other.dtype, other.device)
                assert value.device.type == "meta" or torch.equal(value, other) or (  # NaN == NaN here
                    value.is_floating_point() and torch.allclose(value, other, rtol=0, atol=0, equal_nan=True))
            else:
                assert value == other
