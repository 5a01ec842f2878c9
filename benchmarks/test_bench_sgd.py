"""Micro-benchmarks (pytest-benchmark) of one optimizer step: regkern's fused
GReg step against torch.optim.SGD, on a few parameter shape sets; and, for
each other regularizer (ProxL1, GroupLasso, L1 and Polarization on BatchNorm
scales, ADMM, the RDA optimizer), regkern's fused step against what users run
today (row (a) of its ``python -m regkern bench`` table).

They measure and never assert a time. Run::

    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=min,median,iqr,rounds

``python -m regkern bench`` prints the same comparison as ratio tables, with
torch.compile and the memory floor (too slow to compile here).
"""
from __future__ import annotations

import functools

import pytest
import torch

from regkern.bench import cli  # noqa: F401  (imports every suite module: bench.SUITES lists all tables)
from regkern.bench import harness as bench
from regkern.bench import sgd
from regkern.bench.shapes import shape_set

SHAPES = ["resnet56", "resnet50", "tensor16m"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _torch_sgd(flag: str):
    """torch.optim.SGD without the penalty (``foreach`` or ``fused``)."""
    def prepare(case, ctx):
        params = case.fresh_params()
        opt = torch.optim.SGD(params, lr=bench.LR, momentum=bench.MOMENTUM,
                              weight_decay=bench.WEIGHT_DECAY, **{flag: True})
        return bench.Prepared(step=opt.step, keep=(params, opt))
    return prepare


ROWS = {
    "regkern": sgd.regkern_sgd,                          # fused step with RowL2
    "loop+foreach": sgd.loop_foreach,                    # official grad += lam*W, then foreach
    "loop+fused": sgd.loop_fused,                        # official grad += lam*W, then fused
    "torch-foreach": _torch_sgd("foreach"),              # no penalty
    "torch-fused": _torch_sgd("fused"),                  # no penalty
}


@functools.lru_cache(maxsize=1)
def _case(shapes: str, dtype: str) -> bench.Case:
    return bench.Case(shapes, shape_set(shapes), DTYPES[dtype], torch.device("cpu"))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("impl", list(ROWS))
def test_sgd_step(benchmark, impl, shapes, dtype):
    case = _case(shapes, dtype)
    try:
        prepared = ROWS[impl](case, bench.Context())
    except bench.Unavailable as e:
        pytest.skip(str(e))
    for _ in range(3):  # warm-up: momentum buffers, metadata caches
        prepared.step()
    benchmark.group = f"sgd-step {shapes} {dtype}"
    benchmark.extra_info["floor_bytes"] = case.floor_bytes
    benchmark.extra_info["params"] = case.numel
    benchmark(prepared.step)


REGULARIZERS = [key for key in bench.SUITES if key != "rowl2"]
REG_IMPLS = {"regkern": "regkern", "official": "a"}  # test id -> row key of the regularizer's table


@functools.lru_cache(maxsize=1)
def _reg_case(regularizer: str, shapes: str, dtype: str) -> bench.Case:
    return bench.SUITES[regularizer].case(_case(shapes, dtype))


@pytest.mark.parametrize("impl", list(REG_IMPLS))  # innermost: the cached cases are reused
@pytest.mark.parametrize("regularizer", REGULARIZERS)
@pytest.mark.parametrize("dtype", ["fp32"])
@pytest.mark.parametrize("shapes", ["resnet56", "resnet50"])
def test_regularizer_step(benchmark, shapes, dtype, regularizer, impl):
    case = _reg_case(regularizer, shapes, dtype)
    prepare = next(r.prepare for r in bench.ROWS if r.regularizer == regularizer and r.key == REG_IMPLS[impl])
    try:
        prepared = prepare(case, bench.Context())
    except bench.Unavailable as e:
        pytest.skip(str(e))
    for _ in range(3):
        prepared.step()
    benchmark.group = f"{regularizer}-step {shapes} {dtype}"
    benchmark.extra_info["floor_bytes"] = case.floor_bytes
    benchmark.extra_info["note"] = prepared.note
    benchmark(prepared.step)


def test_rda_rows_match_regkern():
    """Row (a) of the rda table (RDA as torch ops) lands where regkern.RDA does."""
    from regkern.bench import rda
    case = _reg_case("rda", "resnet56", "fp32")
    ctx = bench.Context()
    try:
        fused = rda.regkern_rda(case, ctx)  # prepare takes the first step
    except bench.Unavailable as e:
        pytest.skip(str(e))
    loop = rda.loop_rda(case, ctx)
    loop.step()
    for _ in range(2):
        fused.step()
        loop.step()
    for p, q in zip(fused.keep[0], loop.keep[0]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
