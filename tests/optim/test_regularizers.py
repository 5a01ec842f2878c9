"""The regularizers of the seed papers through regkern.SGD, against their mathematics."""
import io
import itertools
import math

import pytest
import torch

import regkern
from optim_helpers import CPU_BACKENDS, assert_params_close, fake_grads, make_params, twin

LR = 0.1


def sgd_then(params, regularizer, backend, steps=5, **sgd):
    opt = regkern.SGD([{"params": params, "regularizer": regularizer}], lr=LR, backend=backend, **sgd)
    for t in range(steps):
        fake_grads(params, t)
        opt.step()
    return opt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prox_l1_is_the_soft_threshold_of_the_sgd_iterate(backend):
    params = make_params(shapes=[(8, 3, 3, 3), (5, 7), (9,)])
    expected = twin(params)
    lam = 0.3
    sgd_then(params, regkern.ProxL1(lam), backend, momentum=0.9, weight_decay=1e-3)
    ref = torch.optim.SGD(expected, lr=LR, momentum=0.9, weight_decay=1e-3)
    for t in range(5):
        fake_grads(expected, t)
        ref.step()
        with torch.no_grad():
            for p in expected:
                p.copy_(p.sign() * (p.abs() - LR * lam).clamp_min(0))
    assert_params_close(params, expected)
    for p, e in zip(params, expected):
        assert (p == 0).sum() == (e == 0).sum() > 0  # exact zeros, not 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_lasso_shrinks_whole_rows(backend):
    params = make_params(shapes=[(8, 4, 3, 3), (6, 10)], seed=3)
    expected = twin(params)
    lam = 2.0
    sgd_then(params, regkern.GroupLasso(lam), backend)
    ref = torch.optim.SGD(expected, lr=LR)
    for t in range(5):
        fake_grads(expected, t)
        ref.step()
        with torch.no_grad():
            for p in expected:
                rows = p.view(p.shape[0], -1)
                norm = rows.norm(dim=1, keepdim=True)
                scale = (1 - LR * lam * math.sqrt(rows.shape[1]) / norm).clamp_min(0)
                rows.copy_(torch.where(norm > 0, rows * scale, torch.zeros_like(rows)))
    torch.testing.assert_close(params[0].detach(), expected[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[1].detach(), expected[1].detach(), rtol=1e-5, atol=1e-6)
    zero_rows = [int((p.detach().reshape(p.shape[0], -1).abs().sum(1) == 0).sum()) for p in params]
    assert sum(zero_rows) > 0
    for p in params:  # rows are either exactly zero or entirely alive
        rows = p.detach().reshape(p.shape[0], -1)
        assert ((rows == 0).all(1) | (rows != 0).all(1)).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_l1_subgradient_is_the_slimming_loop(backend):
    params = make_params(shapes=[(16,), (16,), (4, 6)])
    expected = twin(params)
    sgd_then(params, regkern.L1(1e-2), backend, momentum=0.9)
    ref = torch.optim.SGD(expected, lr=LR, momentum=0.9)
    for t in range(5):
        fake_grads(expected, t)
        for p in expected:
            p.grad.add_(1e-2 * torch.sign(p.detach()))  # network slimming's updateBN
        ref.step()
    assert_params_close(params, expected)


def polarization_float64(values, grads_per_step, lam, t, a, lr, momentum):
    """docs/regularizers.md in float64: the subgradient through the mean, then the clamp."""
    w = [v.double().clone() for v in values]
    bufs = [None] * len(w)
    for grads in grads_per_step:
        flat = torch.cat([x.reshape(-1) for x in w])
        m = flat.mean()
        s = (flat - m).sign().mean()
        for i, (x, g) in enumerate(zip(w, grads)):
            d = g.double() + lam * (t * x.sign() - (x - m).sign() + s)
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
            w[i] = (x - lr * bufs[i]).clamp(0, a)
    return w


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_polarization_matches_float64_spec_over_100_steps(backend):
    gen = torch.Generator().manual_seed(0)
    shapes = [(16,), (32,), (8,)]  # a set spread over three BatchNorm layers
    params = [torch.nn.Parameter(torch.rand(s, generator=gen) * 0.6 + 0.2) for s in shapes]
    start = [p.detach().clone() for p in params]
    lam, t, a = 1e-2, 1.2, 0.9
    opt = regkern.SGD([{"params": params, "regularizer": regkern.Polarization(lam, t, a)}], lr=LR,
                      momentum=0.9, backend=backend)
    all_grads = []
    for step in range(100):
        grads = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
        all_grads.append(grads)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = polarization_float64(start, all_grads, lam, t, a, LR, 0.9)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=2e-5)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    assert flat.min() >= 0 and flat.max() <= a
    polar = opt.state[params[0]]["polar"]
    assert all(opt.state[p]["polar"] is polar for p in params)
    assert polar[0] == pytest.approx(lam) and polar[1] == pytest.approx(t)


@pytest.mark.parametrize("n,t", [(6, 1.0), (8, 1.2), (9, 0.4), (7, 1.8), (10, -1.0)])
def test_polarization_theorem_3_2_on_the_reported_value(n, t):
    """Over the vertices of [0, a]^n the regularizer is smallest at
    floor(n rho) or floor(n rho) + 1 entries equal to a, rho = 1/2 - t/4."""
    a = 0.7
    reg = regkern.Polarization(lam=1.0, t=t, a=a)
    values = {}
    for vertex in itertools.product([0.0, a], repeat=n):
        ones = sum(v == a for v in vertex)
        value = float(reg.value([torch.tensor(vertex)]))
        values[ones] = min(values.get(ones, math.inf), value)
    rho = 0.5 - t / 4
    best = min(values.values())
    minimisers = {k for k, v in values.items() if v <= best + 1e-12}
    assert minimisers <= {math.floor(n * rho), math.floor(n * rho) + 1}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clamp_alone_and_with_masks(backend):
    params = make_params(shapes=[(6, 5)])
    opt = regkern.SGD([{"params": params, "regularizer": [regkern.RowL2(), regkern.Clamp(-0.2, 0.3)]}],
                      lr=LR, backend=backend)
    opt.state[params[0]]["mask"] = torch.tensor([True, True, False, True, False, True])
    for t in range(3):
        fake_grads(params, t)
        opt.step()
    w = params[0].detach()
    assert w.min() >= -0.2 and w.max() <= 0.3
    assert not w[2].any() and not w[4].any()  # the clamp's lower bound does not revive pruned rows


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_column_l2_shrinks_the_input_columns_it_names(backend):
    params = make_params(shapes=[(6, 5), (4, 5, 3, 3), (7,)])
    plain = twin(params)
    opt = sgd_then(params, regkern.ColumnL2(), backend, steps=0)
    assert "lam_cols" not in opt.state[params[2]] and opt.state[params[1]]["lam_cols"].shape == (5,)
    for p in params[:2]:
        opt.state[p]["lam_cols"][[1, 3]] = 2.0
    ref = regkern.SGD(plain, lr=LR, backend=backend)
    for t in range(3):
        fake_grads(params, t)
        fake_grads(plain, t)
        opt.step()
        with torch.no_grad():  # d += lam_cols[c] * W[:, c] is W[:, c] *= 1 - lr * 2 beside the plain step
            before = [q.detach().clone() for q in plain]
        ref.step()
        with torch.no_grad():
            for q, b in zip(plain[:2], before[:2]):
                q[:, [1, 3]] -= LR * 2.0 * b[:, [1, 3]]
    assert_params_close(params, plain)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_admm_term_pulls_toward_z_minus_u(backend):
    params = make_params(shapes=[(5, 4), (7,)])
    expected = twin(params)
    rho = 0.5
    opt = regkern.SGD([{"params": params, "regularizer": regkern.ADMM(rho)}], lr=LR, momentum=0.9,
                      backend=backend)
    targets = []
    for i, p in enumerate(params):
        state = opt.state[p]
        assert torch.equal(state["admm_z"], p.detach()) and not state["admm_u"].any()
        state["admm_target"].copy_(torch.full_like(p, 0.1 * (i + 1)))
        targets.append(state["admm_target"].clone())
    ref = torch.optim.SGD(expected, lr=LR, momentum=0.9)
    for t in range(5):
        fake_grads(params, t)
        opt.step()
        fake_grads(expected, t)
        for p, target in zip(expected, targets):
            p.grad.add_(rho * (p.detach() - target))
        ref.step()
    assert_params_close(params, expected)


def test_regularizers_round_trip_through_state_dict():
    params = make_params(shapes=[(6,), (6,), (4, 3)])
    groups = lambda ps: [{"params": ps[:2], "regularizer": regkern.Polarization(1e-3, 1.3)},
                         {"params": ps[2:], "regularizer": [regkern.RowL2(), regkern.ProxL1(1e-3), regkern.Clamp(-1, 1)]}]
    opt = regkern.SGD(groups(params), lr=LR, momentum=0.9)
    for t in range(3):
        fake_grads(params, t)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = twin(params)
    opt2 = regkern.SGD(groups(resumed), lr=LR, momentum=0.9)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert isinstance(opt2.param_groups[1]["regularizer"][1], regkern.ProxL1)
    assert opt2.state[resumed[0]]["polar"].dtype == torch.float32
    for t in range(3, 6):
        fake_grads(params, t)
        fake_grads(resumed, t)
        opt.step()
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_conflicting_regularizers_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        regkern.SGD([{"params": make_params(shapes=[(3,)]), "regularizer": [regkern.ProxL1(), regkern.GroupLasso()]}], lr=LR)
    with pytest.raises(ValueError, match="lo <= hi"):
        regkern.Clamp(1.0, 0.0)


@pytest.mark.parametrize("make,match", [
    (lambda: regkern.ProxL1(-1), "lam must be finite and >= 0"),
    (lambda: regkern.L1(float("nan")), "not NaN"),
    (lambda: regkern.GroupLasso(float("inf")), "lam must be finite"),
    (lambda: regkern.ADMM(rho=-1), "rho must be finite and >= 0"),
    (lambda: regkern.Polarization(t=float("nan")), "not NaN"),
    (lambda: regkern.Polarization(lam=-1e-4), "lam must be finite"),
    (lambda: regkern.Polarization(a=0.0), "a, the upper clamp"),
    (lambda: regkern.Clamp(0.0, float("nan")), "not NaN"),
    (lambda: regkern.Clamp(1.0, 0.0), "lo <= hi"),
    (lambda: regkern.RowL2(track_norms="yes"), "True or False"),
    (lambda: regkern.L1(lam="1e-4"), "must be a number"),
])
def test_bad_regularizer_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_regularizer_in_a_state_dict_is_refused_and_loads_nothing():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = regkern.SGD([{"params": [p], "regularizer": regkern.ProxL1(1e-3)}], lr=0.1)
    saved = opt.state_dict()
    saved["param_groups"][0]["regularizer"] = {"kind": "prox_l1", "lam": -1.0}
    before = opt.state_dict()
    with pytest.raises(ValueError, match="lam must be finite"):
        opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == before["param_groups"]
