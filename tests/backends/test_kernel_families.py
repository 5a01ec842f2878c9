"""One harness for every kernel family on every backend.

A family joins by describing itself once (``FAMILIES``): how to make a set of
tensors and state for some parameter shapes and a storage dtype, how its
functional fused step runs on a chosen backend, how its reference runs, and
which tensors it writes. The harness then checks, for each backend that can
step CPU tensors here (C++; Triton under TRITON_INTERPRET=1; the reference
itself), several steps on shapes that cover the edge cases (0-d, empty,
one row, rows longer than a kernel block, a 4-d conv weight) in fp32, bf16
and fp16: the C++ kernels bit for bit (row norms, summed in another order
than torch's, to a few ulps), Triton within the rounding the family's own
test file documents. The detailed contracts (every term, ISA variant,
thread split, refusal) stay in each family's test file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List

import pytest
import torch

from optim_helpers import CPU_BACKENDS
from regkern import reference
from regkern.backends.sgd import sgd_step
from regkern.backends.adam import adam_step
from regkern.backends.admm import admm_zu_step, sas_admm_step
from regkern.backends.rda import rda_step
from regkern.reference.admm import sas_coefficients

SHAPES = [(), (0,), (1, 7), (5, 3, 3, 3), (3, 1500), (33,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclasses.dataclass
class Family:
    name: str
    make: Callable[[List[tuple], torch.dtype, torch.Generator], Dict[str, Any]]
    fused: Callable[[Dict[str, Any], int, str], None]       # (inputs, step number from 1, backend)
    reference: Callable[[Dict[str, Any], int], None]
    written: List[str]                                       # the input lists the step writes
    triton_rtol: float = 1e-6                                # fp32; low precision: one storage ulp


def _randn(shapes, dtype, gen, scale=1.0):
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


def _rows(shapes):
    return [s[0] if s else 1 for s in shapes]


def _grads(inputs, t):
    gen = torch.Generator().manual_seed(100 + t)
    return [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p in inputs["params"]]


def _sgd_make(shapes, dtype, gen):
    return {"params": _randn(shapes, dtype, gen), "bufs": [torch.zeros(s).to(dtype) for s in shapes],
            "lams": [torch.rand(r, generator=gen) for r in _rows(shapes)],
            "masks": [torch.rand(r, generator=gen) > 0.2 for r in _rows(shapes)],
            "norms": [torch.zeros(r, 3) for r in _rows(shapes)]}


def _sgd_kwargs(inputs, t):
    return dict(lr=0.05, momentum=0.9, weight_decay=1e-3, first_step=t == 1, lams=inputs["lams"],
                masks=inputs["masks"], norms=inputs["norms"])


def _adam_make(shapes, dtype, gen):
    zeros = lambda: [torch.zeros(s).to(dtype) for s in shapes]  # noqa: E731
    return {"params": _randn(shapes, dtype, gen), "m": zeros(), "v": zeros(), "vmax": zeros(),
            "steps": [torch.tensor(0.0) for _ in shapes], "lams": [torch.rand(r, generator=gen) for r in _rows(shapes)],
            "masks": [torch.rand(r, generator=gen) > 0.2 for r in _rows(shapes)],
            "norms": [torch.zeros(r, 3) for r in _rows(shapes)]}


def _adam_args(inputs):
    return (inputs["params"], None, inputs["m"], inputs["v"], inputs["vmax"], inputs["steps"])


def _adam_kwargs(inputs):
    return dict(lr=1e-2, decay=1e-2, amsgrad=True, lams=inputs["lams"], masks=inputs["masks"], norms=inputs["norms"])


def _rda_make(shapes, dtype, gen):
    params = _randn(shapes, dtype, gen)
    return {"params": params, "gbars": [torch.zeros(s) for s in shapes], "w0s": [p.float() for p in params]}


def _zu_make(shapes, dtype, gen):
    params = _randn(shapes, dtype, gen)
    return {"params": params, "zs": [torch.zeros(s) for s in shapes], "us": _randn(shapes, torch.float32, gen, 0.1),
            "targets": [torch.zeros(s).to(dtype) for s in shapes]}


def _zu_keep(inputs):
    return [max(p.numel() // 2, 0) for p in inputs["params"]]


def _sas_make(shapes, dtype, gen):
    params = _randn(shapes, dtype, gen)
    state = lambda: [p.float().clone() for p in params]  # noqa: E731
    return {"params": params, "ws": state(), "w_breves": state(), "anchors": state(), "zs": state(),
            "us": [torch.zeros(s) for s in shapes]}


def _sas_coefficients(t):
    return sas_coefficients(t, 2, 0.1, beta=0.04, lam=1e-4, r=0.9, s=1.09, rho=0.04)


def _sas_args(inputs, grads):
    return (inputs["params"], grads, inputs["ws"], inputs["w_breves"], inputs["anchors"], inputs["zs"], inputs["us"])


FAMILIES = [
    Family("sgd", _sgd_make,
           lambda x, t, b: sgd_step(x["params"], _grads(x, t), x["bufs"], backend=b, **_sgd_kwargs(x, t)),
           lambda x, t: reference.sgd_step(x["params"], _grads(x, t), x["bufs"], **_sgd_kwargs(x, t)),
           ["params", "bufs", "norms"]),
    Family("adam", _adam_make,
           lambda x, t, b: adam_step(*_adam_args(x)[:1], _grads(x, t), *_adam_args(x)[2:], backend=b, **_adam_kwargs(x)),
           lambda x, t: reference.adam_step(*_adam_args(x)[:1], _grads(x, t), *_adam_args(x)[2:], **_adam_kwargs(x)),
           ["params", "m", "v", "vmax", "steps", "norms"]),
    Family("rda", _rda_make,
           lambda x, t, b: rda_step(x["params"], _grads(x, t), x["gbars"], x["w0s"], step=t, gamma=10.0, lams=1e-2,
                                    backend=b),
           lambda x, t: reference.rda_step(x["params"], _grads(x, t), x["gbars"], x["w0s"], step=t, gamma=10.0,
                                           lams=1e-2),
           ["params", "gbars"]),
    Family("admm_zu", _zu_make,
           lambda x, t, b: admm_zu_step(x["params"], x["zs"], x["us"], x["targets"], keep=_zu_keep(x), backend=b),
           lambda x, t: reference.admm_zu_step(x["params"], x["zs"], x["us"], x["targets"], keep=_zu_keep(x)),
           ["zs", "us", "targets"]),
    Family("sas_admm", _sas_make,
           lambda x, t, b: sas_admm_step(*_sas_args(x, _grads(x, t)), coefficients=_sas_coefficients(t), backend=b),
           lambda x, t: reference.sas_admm_step(*_sas_args(x, _grads(x, t)), coefficients=_sas_coefficients(t)),
           ["params", "ws", "w_breves", "anchors", "zs", "us"]),
]


def _copy(inputs):
    return {k: [t.clone() for t in v] for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_matches_its_reference(family, backend, dtype):
    made = family.make(SHAPES, dtype, torch.Generator().manual_seed(0))
    fused, ref = _copy(made), _copy(made)
    for t in range(1, 4):
        family.fused(fused, t, backend)
        family.reference(ref, t)
    for key in family.written:
        for i, (a, b) in enumerate(zip(fused[key], ref[key])):
            where = f"{family.name} {key}[{i}] {tuple(b.shape)}"
            if backend != "triton" and key != "norms":
                assert torch.equal(a, b), where
            else:  # Triton's IEEE sqrt; row norms summed in another order than torch's: a few ulps
                eps = family.triton_rtol if b.dtype == torch.float32 else torch.finfo(b.dtype).eps
                scale = b.float().abs().max().item() if b.numel() else 0.0
                torch.testing.assert_close(a.float(), b.float(), rtol=eps, atol=2 * eps * scale + 1e-7, msg=where)
