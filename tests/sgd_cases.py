"""Random cases for the `sgd` kernel family, shared by the backend tests.

A case is a set of tensors plus options; `run` applies one backend to a deep
copy, so the same case can be stepped by the reference and a fast backend and
compared with `assert_same`.
"""
from __future__ import annotations

import copy
import dataclasses
import random
from typing import Callable, List, Optional

import torch

from regkern.reference.sgd import num_rows

# Shapes that stress the chunking: empty, 0-d, 1-element rows, odd and
# non-power-of-two rows, BatchNorm vectors, linear and conv weights.
SHAPES = [
    (), (0,), (0, 3), (1,), (7,), (64,), (1, 1), (5, 1), (3, 17), (33, 129),
    (16, 3, 3, 3), (8, 5, 3, 3), (2, 1000), (1, 4099), (257, 9),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) for a fast backend against the reference: fp32 differs by
# operation order only; bf16 / fp16 may round one ulp apart.
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}


@dataclasses.dataclass
class Case:
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    bufs: List[Optional[torch.Tensor]]
    lams: List[Optional[torch.Tensor]]
    masks: List[Optional[torch.Tensor]]
    norms: List[Optional[torch.Tensor]]
    first_step: List[bool]
    options: dict

    def clone(self) -> "Case":
        return copy.deepcopy(self)


def make_case(
    rng: random.Random,
    shapes,
    dtype: torch.dtype,
    device: str = "cpu",
    *,
    momentum: Optional[float] = None,
    with_lam: Optional[bool] = None,
    with_mask: Optional[bool] = None,
    with_norms: Optional[bool] = None,
    **forced_options,
) -> Case:
    """A random case over `shapes`; unspecified options are drawn from `rng`."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    momentum = rng.choice([0.0, 0.9]) if momentum is None else momentum
    options = dict(
        lr=rng.choice([0.1, 0.01, 1.0]),
        momentum=momentum,
        dampening=rng.choice([0.0, 0.3]) if momentum else 0.0,
        weight_decay=rng.choice([0.0, 5e-4, 0.1]),
        maximize=rng.random() < 0.3,
    )
    options["nesterov"] = bool(momentum) and options["dampening"] == 0 and rng.random() < 0.5
    if rng.random() < 0.3:
        options["grad_scale"] = torch.tensor(rng.choice([2.0, 1024.0, 0.5]), device=device)
    options.update(forced_options)

    def rand(shape, dt=dtype):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dt)

    case = Case([], [], [], [], [], [], [], options)
    for shape in shapes:
        w = rand(shape)
        rows = num_rows(w)
        case.params.append(w)
        scale = options.get("grad_scale")
        case.grads.append(rand(shape) * (float(scale) if scale is not None else 1.0))
        first = rng.random() < 0.5 if momentum else False
        case.first_step.append(first)
        case.bufs.append(rand(shape) if momentum else None)
        use_lam = rng.random() < 0.7 if with_lam is None else with_lam
        case.lams.append(rand((rows,), torch.float32) if use_lam else None)
        use_mask = rng.random() < 0.4 if with_mask is None else with_mask
        if use_mask:
            mask_shape = rng.choice([(rows,), tuple(w.shape)])
            case.masks.append((torch.rand(mask_shape, generator=gen) < 0.6).to(device))
        else:
            case.masks.append(None)
        use_norms = rng.random() < 0.5 if with_norms is None else with_norms
        case.norms.append(torch.full((rows, 3), float("nan"), device=device) if use_norms else None)
    return case


def run(step: Callable, case: Case) -> Case:
    """Apply `step` (a function with reference.sgd_step's signature) to a copy."""
    out = case.clone()
    step(out.params, out.grads, out.bufs, lams=out.lams, masks=out.masks,
         norms=out.norms, first_step=out.first_step, **out.options)
    return out


def assert_same(actual: Case, expected: Case) -> None:
    for i, (a, e) in enumerate(zip(actual.params, expected.params)):
        rtol, atol = TOLERANCE[e.dtype]
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        if e.dtype is not torch.float32 and e.numel():
            # one-ulp rounding differences are allowed, but only rarely
            differ = int((a != e).sum())
            assert differ <= max(2, 0.02 * e.numel()), f"param {i}: {differ} rounding differences"
    for i, (a, e) in enumerate(zip(actual.bufs, expected.bufs)):
        if e is not None:
            rtol, atol = TOLERANCE[e.dtype]
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"buf {i}: {m}")
    for i, (a, e) in enumerate(zip(actual.norms, expected.norms)):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"norms {i}: {m}")
    for i, (a, e) in enumerate(zip(actual.grads, expected.grads)):
        assert torch.equal(a, e), f"grad {i} was modified"
