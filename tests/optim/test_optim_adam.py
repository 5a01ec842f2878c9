"""regkern.Adam / regkern.AdamW: torch's Adam and AdamW on every backend, the
regularizers in both couplings (docs/adam.md), checkpoints both ways, AMP,
closures, schedulers, bad input."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import regkern
from optim_helpers import CPU_BACKENDS, fake_grads, make_params, twin

PAIRS = [(torch.optim.Adam, regkern.Adam), (torch.optim.AdamW, regkern.AdamW)]
SHAPES = [(6, 3, 3, 3), (6,), (10, 37), (1,), (33,), ()]


def _assert_same(actual, expected, backend):
    """Bit for bit on the CPU backends; Triton's IEEE square root may differ
    from torch's CPU one by an ulp, which moves an update by an ulp."""
    if backend == "triton":
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(actual, expected)


def _run(opt, params, steps, start=0, scheduler=None):
    for t in range(start, start + steps):
        fake_grads(params, t)
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad,maximize,weight_decay,beta1",  # fp32: torch bit for bit (Triton: to an ulp)
                         [(False, False, 0.0, 0.9), (True, False, 0.1, 0.9), (False, True, 0.1, 0.9),
                          (True, True, 0.0, 0.3), (False, False, 0.05, 0.0)])
def test_fp32_equals_torch(backend, pair, amsgrad, maximize, weight_decay, beta1):
    torch_cls, cls = pair
    ours = make_params(shapes=SHAPES)
    theirs = twin(ours)
    kw = dict(lr=0.01, betas=(beta1, 0.99), weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    a = torch_cls(theirs, foreach=False, **kw)
    b = cls(ours, backend=backend, **kw)
    for t in range(20):
        fake_grads(theirs, t)
        fake_grads(ours, t)
        a.step()
        b.step()
    for p, q in zip(theirs, ours):
        _assert_same(q, p, backend)
        assert torch.equal(a.state[p]["step"], b.state[q]["step"].cpu())
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            _assert_same(b.state[q][key].cpu(), a.state[p][key], backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=["Adam", "AdamW"])
def test_tensor_lr_and_scheduler_match_torch(backend, pair):
    torch_cls, cls = pair
    ours = make_params(shapes=SHAPES)
    theirs = twin(ours)
    a = torch_cls(theirs, lr=torch.tensor(0.02), weight_decay=0.1)
    b = cls(ours, lr=torch.tensor(0.02), weight_decay=0.1, backend=backend)
    sa = torch.optim.lr_scheduler.StepLR(a, step_size=5, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, step_size=5, gamma=0.5)
    for t in range(20):
        fake_grads(theirs, t)
        fake_grads(ours, t)
        a.step(), b.step(), sa.step(), sb.step()
    for p, q in zip(theirs, ours):
        # torch divides a tensor lr by the bias correction in fp32, regkern in float64
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torch_fused_tolerance(backend, dtype):
    ours = make_params(dtype, shapes=SHAPES)
    fused, foreach = twin(ours), twin(ours)
    opts = [torch.optim.AdamW(fused, lr=0.01, fused=True), torch.optim.AdamW(foreach, lr=0.01, foreach=True),
            regkern.AdamW(ours, lr=0.01, backend=backend)]
    for t in range(20):
        for params, opt in zip((fused, foreach, ours), opts):
            fake_grads(params, t)
            opt.step()
    for f, e, q in zip(fused, foreach, ours):
        # torch's foreach step computes in the storage dtype (fp16 may underflow to NaN);
        # regkern in fp32, rounded once, like torch's fused step
        spread = torch.nan_to_num((f.float() - e.float()).abs(), nan=0.0).max().item()
        ulps = 4 * torch.finfo(dtype).eps * f.float().abs().max().item()
        assert (q.float() - f.float()).abs().max().item() <= max(2 * spread, ulps)


@pytest.mark.parametrize("pair", PAIRS, ids=["Adam", "AdamW"])
def test_checkpoints_load_both_ways_and_continue_identically(pair):
    torch_cls, cls = pair
    base = make_params(shapes=SHAPES)
    # torch -> regkern
    theirs, ours = twin(base), twin(base)
    a = torch_cls(theirs, lr=0.01, amsgrad=True, weight_decay=0.1, foreach=False)
    _run(a, theirs, 5)
    with torch.no_grad():
        for p, q in zip(theirs, ours):
            q.copy_(p)
    b = cls(ours, lr=0.01, amsgrad=True, weight_decay=0.1)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # a live state_dict shares its tensors
    _run(a, theirs, 5, start=5)
    _run(b, ours, 5, start=5)
    assert all(torch.equal(p, q) for p, q in zip(theirs, ours))
    # regkern -> torch
    c = torch_cls(theirs, lr=0.01, amsgrad=True, weight_decay=0.1, foreach=False)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    _run(c, theirs, 5, start=10)
    _run(b, ours, 5, start=10)
    assert all(torch.equal(p, q) for p, q in zip(theirs, ours))


def test_closure_hooks_and_grad_scaler():
    params = make_params(shapes=SHAPES)
    plain = twin(params)
    opt = regkern.Adam(params, lr=0.01)
    ref = regkern.Adam(plain, lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))

    def closure():
        fake_grads(params, 0)
        return torch.tensor(3.0)
    assert float(opt.step(closure)) == 3.0 and calls == ["pre", "post"]
    fake_grads(plain, 0)
    ref.step()
    assert all(torch.equal(p, q) for p, q in zip(params, plain))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.zeros(()))  # the scale is created by the first scale() call
    for t in range(1, 4):
        fake_grads(params, t, scale=scaler.get_scale() if t != 2 else float("inf"))
        scaler.step(opt)
        scaler.update()
        if t != 2:  # the overflow step changes nothing, the step count included
            fake_grads(plain, t)
            ref.step()
    for p, q in zip(params, plain):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert torch.equal(opt.state[p]["step"], ref.state[q]["step"])


# -- regularizers (docs/adam.md) ---------------------------------------------------

def _expected(w, g, m, v, t, lr, lam, coupled, decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    """One step of docs/adam.md in float64 (row lambda ``lam``)."""
    w, g, m, v = (x.double() for x in (w, g, m, v))
    r = lam.double().reshape(-1, *([1] * (w.dim() - 1))) * w
    h = g + r if coupled else g
    w1 = w * (1 - lr * decay)
    if not coupled:
        w1 = w1 - lr * r
    m = b1 * m + (1 - b1) * h
    v = b2 * v + (1 - b2) * h * h
    return w1 - lr / (1 - b1 ** t) * m / (v.sqrt() / (1 - b2 ** t) ** 0.5 + eps), m, v


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("coupling", ["decoupled", "coupled"])
def test_row_l2_follows_the_documented_math(backend, coupling):
    w = torch.nn.Parameter(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)))
    opt = regkern.AdamW([w], lr=0.01, weight_decay=0.05, regularizer=regkern.RowL2(), coupling=coupling,
                        backend=backend)
    lam = torch.linspace(0.0, 2.0, 8)
    opt.state[w]["lam"].copy_(lam)
    m = torch.zeros(8, 5, dtype=torch.float64)
    v = torch.zeros_like(m)
    expect = w.detach().double()
    for t in range(1, 6):
        g = torch.randn(8, 5, generator=torch.Generator().manual_seed(t))
        w.grad = g.clone()
        expect, m, v = _expected(expect, g, m, v, t, 0.01, lam, coupling == "coupled", decay=0.05)
        opt.step()
        torch.testing.assert_close(w.detach().double(), expect, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_coupled_equals_penalty_in_the_gradient_with_torch_adam(backend):
    ours = make_params(shapes=[(10, 37), (6, 3, 3, 3)])
    theirs = twin(ours)
    lams = [torch.rand(p.shape[0]) for p in ours]
    b = regkern.Adam(ours, lr=0.01, regularizer=regkern.RowL2(), coupling="coupled", backend=backend)
    for q, lam in zip(ours, lams):
        b.state[q]["lam"].copy_(lam)
    a = torch.optim.Adam(theirs, lr=0.01, foreach=False)
    for t in range(10):
        fake_grads(theirs, t)
        fake_grads(ours, t)
        with torch.no_grad():
            for p, lam in zip(theirs, lams):
                p.grad += (p.reshape(p.shape[0], -1) * lam[:, None]).reshape(p.shape)
        a.step()
        b.step()
    for p, q in zip(theirs, ours):
        _assert_same(q, p, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decoupled_penalty_shrinks_at_the_rate_lr_times_lam(backend):
    # with zero gradients the moments stay 0 and the update is W *= 1 - lr * lam (to rounding)
    w = torch.nn.Parameter(torch.ones(4, 6))
    opt = regkern.Adam([w], lr=0.1, regularizer=regkern.RowL2(), backend=backend)
    opt.state[w]["lam"].copy_(torch.tensor([0.0, 1.0, 2.0, 5.0]))
    for _ in range(3):
        w.grad = torch.zeros_like(w)
        opt.step()
    expect = torch.tensor([1.0, 0.9, 0.8, 0.5]) ** 3
    torch.testing.assert_close(w.detach()[:, 0], expect, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masks_zero_weights_and_moments_prox_gives_exact_zeros(backend):
    w = torch.nn.Parameter(torch.randn(6, 9, generator=torch.Generator().manual_seed(3)))
    u = torch.nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(4)) * 0.01)
    opt = regkern.AdamW([{"params": [w]}, {"params": [u], "regularizer": regkern.ProxL1(1.0)}], lr=0.01,
                        amsgrad=True, backend=backend)
    for t in range(3):
        fake_grads([w, u], t)
        opt.step()
    opt.state[w]["mask"] = torch.tensor([True, False, True, True, False, True])
    fake_grads([w, u], 3)
    opt.step()
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert opt.state[w][key][1].abs().sum() == 0 and opt.state[w][key][0].abs().sum() > 0
    assert w[1].abs().sum() == 0 and w[4].abs().sum() == 0
    assert (u == 0).float().mean() > 0.5  # soft threshold lr * 1.0 on weights of size 0.01


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reg", [regkern.L1(0.01), regkern.GroupLasso(0.1), regkern.ElementL2(),
                                 regkern.RowL2(track_norms=True, columns=True),
                                 regkern.Polarization(lam=1e-3, t=1.2), regkern.Clamp(-0.5, 0.5),
                                 [regkern.RowL2(), regkern.ProxL1(0.05), regkern.Clamp(-0.4, 0.4)]],
                         ids=["L1", "GroupLasso", "ElementL2", "RowL2-columns", "Polarization", "Clamp", "mixed"])
@pytest.mark.parametrize("coupling", ["decoupled", "coupled"])
def test_every_regularizer_matches_the_reference(backend, reg, coupling):
    shapes = [(12,), (8, 5)] if isinstance(reg, regkern.Polarization) else [(8, 5), (4, 3, 2, 2)]
    ours = make_params(shapes=shapes)
    ref = twin(ours)
    a = regkern.AdamW(ref, lr=0.01, regularizer=copy.deepcopy(reg), coupling=coupling, backend="reference")
    b = regkern.AdamW(ours, lr=0.01, regularizer=copy.deepcopy(reg), coupling=coupling, backend=backend)
    for opt in (a, b):  # the same random L2 coefficients in both
        gen = torch.Generator().manual_seed(7)
        for p in opt.param_groups[0]["params"]:
            for key in ("lam", "lam_cols"):
                if key in opt.state[p]:
                    opt.state[p][key].copy_(torch.rand(opt.state[p][key].shape, generator=gen))
    for t in range(5):
        fake_grads(ref, t)
        fake_grads(ours, t)
        a.step()
        b.step()
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        if "row_norms" in b.state[q]:
            torch.testing.assert_close(b.state[q]["row_norms"], a.state[p]["row_norms"], rtol=1e-6, atol=1e-7)


def test_state_dict_keeps_regularizer_and_coupling():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = regkern.AdamW([w], regularizer=regkern.RowL2(), coupling="coupled")
    fake_grads([w], 0)
    opt.step()
    saved = opt.state_dict()
    other = regkern.AdamW([torch.nn.Parameter(w.detach().clone())])
    other.load_state_dict(saved)
    assert other.param_groups[0]["coupling"] == "coupled"
    assert isinstance(other.param_groups[0]["regularizer"], regkern.RowL2)
    assert other.state[other.param_groups[0]["params"][0]]["lam"].dtype == torch.float32


def test_complex_parameters_take_torch_adam():
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    zt = torch.nn.Parameter(z.detach().clone())
    a, b = torch.optim.Adam([zt], lr=0.01, foreach=False), regkern.Adam([z], lr=0.01)
    for t in range(3):
        g = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(t))
        z.grad, zt.grad = g.clone(), g.clone()
        a.step(), b.step()
    assert torch.equal(z, zt)


# -- bad input ---------------------------------------------------------------------

def _snapshot(opt):
    return copy.deepcopy({"params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
                          "state": {id(k): {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                                    for k, s in opt.state.items()}})


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])) and a["state"].keys() == b["state"].keys() \
        and all(torch.equal(a["state"][k][n], b["state"][k][n]) if torch.is_tensor(a["state"][k][n])
                else a["state"][k][n] == b["state"][k][n] for k in a["state"] for n in a["state"][k])


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "learning rate"), (dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
    (dict(betas=(0.9, float("nan"))), "beta parameter at index 1"), (dict(eps=-1e-8), "epsilon"),
    (dict(weight_decay=float("inf")), "weight_decay"), (dict(coupling="both"), "coupling"),
])
def test_bad_options_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        regkern.AdamW([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("change", ["lr", "betas", "coupling", "lam", "grad"])
def test_a_refused_step_changes_nothing(backend, change):
    params = make_params(shapes=[(6, 4), (5,)])
    opt = regkern.AdamW([{"params": params[:1], "regularizer": regkern.RowL2()}, {"params": params[1:]}],
                        lr=0.01, backend=backend)
    fake_grads(params, 0)
    opt.step()
    fake_grads(params, 1)
    if change == "lr":
        opt.param_groups[1]["lr"] = float("nan")
    elif change == "betas":
        opt.param_groups[1]["betas"] = (0.9, 1.5)
    elif change == "coupling":
        opt.param_groups[1]["coupling"] = "sideways"
    elif change == "lam":
        opt.state[params[0]]["lam"][2] = float("inf")
    else:
        params[1].grad = torch.randn(5).to_sparse()
    before = _snapshot(opt)
    with pytest.raises(ValueError):
        opt.step()
    assert _same(before, _snapshot(opt))


def test_schedulers_and_every_option_of_torch_are_accepted():
    w = torch.nn.Parameter(torch.randn(3))
    for opts in itertools.product([None, True, False], [False, True]):
        regkern.AdamW([w], foreach=opts[0], capturable=opts[1])
    with pytest.raises(RuntimeError, match="differentiable"):
        regkern.Adam([w], fused=True, differentiable=True)
