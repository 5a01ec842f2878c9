"""The ergodic average of W kept by regkern.SASADMM (the official final
weights ``W_ag``): against the official loop transcribed in test_admm.py, bit
for bit against the official formula, through state_dict, and with the fused
step's plan left alone."""
import copy
import io

import pytest
import torch

from regkern.optim.sas_admm import SASADMM
from test_admm import _lasso_problem, _minibatch_grad, official_sas_run

pytestmark = pytest.mark.usefixtures("one_thread")

HYPER = dict(beta=0.5, M=4, k0=3, q=1.1, v=2.0)  # M_k = 4, 4, 4, 6, 8, 9, 11


def _run_official(last, max_iter=7, dtype=torch.float64):
    A, b, lam, _ = _lasso_problem()
    grad_at = _minibatch_grad(A, b)
    w0 = torch.randn(A.shape[1], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    run = official_sas_run(w0, grad_at, lam=lam, max_iter=max_iter, last=last, **HYPER)
    p = torch.nn.Parameter(w0.to(dtype))
    opt = SASADMM([p], lam=lam, average_from=last, **HYPER)
    for step in range(len(run["hats"])):
        p.grad = grad_at(p.detach().double(), step).to(dtype)
        opt.step()
    return run, p, opt


@pytest.mark.parametrize("last", [4, 1, 7])
def test_the_average_follows_the_official_loop(last):
    run, p, opt = _run_official(last)
    st = opt.state[p]
    assert st["k"] == 8 and st["w_avg_count"] == run["erg_i"] == 8 - last
    torch.testing.assert_close(st["w_avg"], run["W_ag"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["w"], run["W"], rtol=1e-12, atol=1e-12)
    assert not torch.equal(st["w_avg"], st["w"]) or last == 7
    opt.write_params()  # the default: the official final weights
    assert torch.equal(p.detach(), st["w_avg"])
    opt.write_params("w")
    assert torch.equal(p.detach(), st["w"])


def test_before_average_from_the_average_is_w():
    run, p, opt = _run_official(last=8)  # the official W_ag = W
    st = opt.state[p]
    assert "w_avg" not in st and "w_avg_count" not in st
    torch.testing.assert_close(run["W_ag"], st["w"], rtol=1e-12, atol=1e-12)
    opt.write_params("average")
    assert torch.equal(p.detach(), st["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_average_is_the_official_formula_bit_for_bit(dtype):
    """The official update W_ag = (1 - a) * W_ag + a * W (fp32, as the state),
    applied to the W the optimizer ends each outer iteration with."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(5, 3, 3), (7,), (33, 4)]]
    opt = SASADMM(params, beta=0.3, lam=0.05, M=2, k0=2, q=1.5, v=4.0, average_from=2)
    expect, seen = {}, {}
    for step in range(30):
        for p in params:
            p.grad = (0.5 * p.detach().float() + torch.randn(p.shape, generator=gen)).to(dtype)
        k_before = [opt.state[p]["k"] if p in opt.state else 1 for p in params]
        opt.step()
        for i, (p, k) in enumerate(zip(params, k_before)):
            st = opt.state[p]
            if st["k"] == k:
                continue
            W = st["w"]  # outer iteration k ended
            if k > 2:
                seen[i] += 1
                a = 1 / seen[i]
                expect[i] = (1 - a) * expect[i] + a * W
            elif k == 2:
                seen[i], expect[i] = 1, W.clone()
    assert all(n >= 3 for n in seen.values())
    for i, p in enumerate(params):
        st = opt.state[p]
        assert st["w_avg"].dtype == torch.float32 and st["w_avg_count"] == seen[i]
        assert torch.equal(st["w_avg"], expect[i])


def test_the_average_leaves_the_fused_plan_alone():
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = SASADMM(params, M=2, k0=100, average_from=2)

    def step():
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()

    step()
    step()
    plan = opt._plans[0]
    for _ in range(6):  # the average is made at the end of outer iteration 2, then folded twice
        step()
    assert opt._plans[0] is plan and opt.state[params[0]]["w_avg_count"] == 3


def test_the_average_resumes_from_a_state_dict_bit_for_bit():
    shapes = [(6, 3, 3), (6,), (4, 5)]
    hyper = dict(beta=0.3, lam=0.05, M=2, k0=2, q=1.5, v=4.0)

    def make():
        g = torch.Generator().manual_seed(6)
        return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]

    def build(params):
        return SASADMM([{"params": params[:2], "average_from": 2}, {"params": params[2:], "average_from": 3}],
                       **hyper)

    def run(params, opt, start, steps):
        for step in range(start, start + steps):
            for i, p in enumerate(params):
                g = torch.Generator().manual_seed(100 * step + i)
                p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=g)
            opt.step()

    params = make()
    opt = build(params)
    run(params, opt, 0, 9)
    assert opt.state[params[0]]["w_avg_count"] >= 2 and opt.state[params[0]]["t"] != 1
    buffer = io.BytesIO()
    torch.save((opt.state_dict(), [p.detach().clone() for p in params]), buffer)
    run(params, opt, 9, 20)
    buffer.seek(0)
    saved, values = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(v) for v in values]
    opt2 = build(resumed)
    opt2.load_state_dict(copy.deepcopy(saved))
    run(resumed, opt2, 9, 20)
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())
        for name in ("w", "w_breve", "z", "u", "anchor", "k", "t", "w_avg", "w_avg_count"):
            x, y = opt.state[a][name], opt2.state[b][name]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name
    # a state saved before average_from existed loads with the default
    old = copy.deepcopy(saved)
    for g in old["param_groups"]:
        del g["average_from"]
    fresh = [torch.nn.Parameter(v.clone()) for v in values]
    opt3 = SASADMM([{"params": fresh[:2]}, {"params": fresh[2:]}], **hyper)
    opt3.load_state_dict(old)
    assert [g["average_from"] for g in opt3.param_groups] == [170, 170]


def test_average_from_none_keeps_nothing_and_raising_it_drops_the_average():
    p = torch.nn.Parameter(torch.randn(8))
    opt = SASADMM([p], M=1, k0=100, average_from=None)
    for _ in range(3):
        p.grad = torch.randn(8)
        opt.step()
    assert "w_avg" not in opt.state[p]
    opt.param_groups[0]["average_from"] = 1
    p.grad = torch.randn(8)
    opt.step()  # ends outer iteration 4 >= 1 with no average yet: it starts here
    assert opt.state[p]["w_avg_count"] == 1 and torch.equal(opt.state[p]["w_avg"], opt.state[p]["w"])
    opt.param_groups[0]["average_from"] = 10
    p.grad = torch.randn(8)
    opt.step()  # outer iteration 5 < 10: the official W_ag is W again
    assert "w_avg" not in opt.state[p]


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "170"])
def test_bad_average_from_is_refused(value):
    with pytest.raises(ValueError, match="average_from"):
        SASADMM([torch.nn.Parameter(torch.randn(3))], average_from=value)
    opt = SASADMM([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="which must be 'average'"):
        opt.write_params("avg")


def test_dtensor_parameters_average_like_plain_ones():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(6, 3, generator=gen), torch.randn(5, generator=gen)]
        sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        plain = [torch.nn.Parameter(t.clone()) for t in full]
        opts = [SASADMM(ps, M=2, k0=100, average_from=2) for ps in (sharded, plain)]
        for _ in range(9):
            grads = [torch.randn(t.shape, generator=gen) for t in full]
            for p, g in zip(sharded, grads):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            for p, g in zip(plain, grads):
                p.grad = g.clone()
            for opt in opts:
                opt.step()
        for a, b in zip(sharded, plain):
            x, y = opts[0].state[a], opts[1].state[b]
            assert isinstance(x["w_avg"], DTensor) and x["w_avg_count"] == y["w_avg_count"] == 3
            assert torch.equal(x["w_avg"].full_tensor(), y["w_avg"])
        for opt in opts:
            opt.write_params()
        assert all(torch.equal(a.full_tensor(), b.detach()) for a, b in zip(sharded, plain))
    finally:
        if started:
            dist.destroy_process_group()
