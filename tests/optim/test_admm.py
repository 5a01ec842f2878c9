"""ADMM pruning (``docs/admm.md``): the projection and Z/U steps of classic ADMM
(``regkern.admm``) and the SAS-ADMM optimizer (``regkern.optim.sas_admm``).

Both ADMMs must reach the lasso solution computed independently (scikit-learn,
float64) on a convex problem; SAS-ADMM must follow the official ``sasPrun``
loop (transcribed below) step for step and resume from a state_dict exactly.
"""
import copy
import io
import math

import numpy as np
import pytest
import torch

from regkern.admm import admm_update, kept_count, project
from regkern.optim.sas_admm import SASADMM, sas_schedule


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- projection

@pytest.mark.parametrize("shape", [(50,), (8, 3, 3), (7, 5), ()])
def test_project_keeps_exactly_k_largest(shape):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen)
    n = w.numel()
    for k in range(n + 1):
        out = project(w, k=k)
        assert out.shape == w.shape and out is not w
        kept = out != 0
        assert int(kept.sum()) == k
        assert torch.equal(out[kept], w[kept])  # kept values untouched
        if 0 < k < n:
            assert w[kept].abs().min() > w[~kept].abs().max()


def test_project_ties_are_broken_by_index():
    w = torch.tensor([1.0, -2.0, 1.0, 1.0, 0.5, -1.0, 1.0])
    out = project(w, k=3)
    # -2 first, then the two lowest-index entries of magnitude 1
    assert torch.equal(out, torch.tensor([1.0, -2.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    assert int((project(torch.ones(100), k=37) != 0).sum()) == 37
    assert torch.equal(project(torch.zeros(10), k=4), torch.zeros(10))  # all tied at 0
    rows = torch.ones(6, 4)
    rows[4] = 3.0
    out = project(rows, k=3, rows=True)
    assert torch.equal((out != 0).all(dim=1), torch.tensor([True, True, False, False, True, False]))


@pytest.mark.parametrize("shape", [(12, 4, 3, 3), (10, 7), (9,)])
def test_project_rows_keeps_exactly_k_rows(shape):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=gen)
    norms = w.reshape(shape[0], -1).norm(dim=1)
    for k in range(shape[0] + 1):
        out = project(w, k=k, rows=True)
        flat = out.reshape(shape[0], -1)
        alive = (flat != 0).any(dim=1)
        assert int(alive.sum()) == k
        assert torch.equal(flat[alive], w.reshape(shape[0], -1)[alive])  # whole rows kept as they were
        assert torch.equal(flat[~alive], torch.zeros_like(flat[~alive]))  # whole rows zeroed
        if 0 < k < shape[0]:
            assert norms[alive].min() > norms[~alive].max()


def test_project_in_place_and_non_contiguous():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=gen)
    w = base.t()  # [10, 6], non-contiguous
    expect = project(w.contiguous(), k=7)
    assert project(w, k=7, out=w) is w
    assert torch.equal(w, expect) and torch.equal(base.t(), expect)
    w = torch.randn(6, 10, generator=gen).t()
    expect = project(w.contiguous(), k=4, rows=True)
    project(w, k=4, rows=True, out=w)
    assert torch.equal(w, expect)
    # zeros are +0 (masked writes, not multiplications by 0)
    out = project(-torch.arange(1.0, 6.0), k=2)
    assert not torch.signbit(out[out == 0]).any()


def test_ratio_counts_like_the_official_percentile():
    """Official per-layer rule: |w| < np.percentile(|w|, 100 * ratio) is pruned."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        n = int(rng.integers(1, 400))
        ratio = float(rng.choice([rng.random(), round(float(rng.random()), 2), 0.85, 0.5, 0.0, 1.0]))
        position = ratio * (n - 1)
        if abs(position - round(position)) < 1e-6 and ratio not in (0.0, 1.0):
            continue  # numpy's own rounding decides these; regkern counts the exact value
        mags = np.abs(rng.standard_normal(n))
        pruned = int((mags < np.percentile(mags, 100 * ratio)).sum())
        keep = kept_count(n, ratio=ratio)
        assert keep == n - pruned, (n, ratio)
        out = project(torch.from_numpy(mags), ratio=ratio)
        assert int((out != 0).sum()) == keep
        checked += 1
    assert checked > 2000
    assert kept_count(100, ratio=0.85) == 15 and kept_count(16, ratio=0.5, ) == 8
    assert kept_count(10, ratio=1.0) == 1 and kept_count(10, ratio=0.0) == 10


# ---------------------------------------------------------- bad input

BAD_PROJECT = [
    (dict(k=11), "k=11 is out of range"),
    (dict(k=-1), "out of range"),
    (dict(k=2.5), "k must be an int"),
    (dict(k=True), "k must be an int"),
    (dict(ratio=1.5), "ratio=1.5 is out of range"),
    (dict(ratio=-0.1), "out of range"),
    (dict(), "exactly one of k"),
    (dict(k=3, ratio=0.5), "exactly one of k"),
    (dict(k=6, rows=True), "between 0 and 5"),
]


@pytest.mark.parametrize("kwargs,message", BAD_PROJECT)
def test_project_refuses_bad_input(kwargs, message):
    w = torch.randn(5, 2)
    before = w.clone()
    with pytest.raises(ValueError, match=message):
        project(w, out=w, **kwargs)
    assert torch.equal(w, before)


def test_project_refuses_bad_tensors():
    with pytest.raises(ValueError, match="floating-point"):
        project(torch.arange(5), k=2)
    with pytest.raises(ValueError, match="out has shape"):
        project(torch.randn(5), k=2, out=torch.empty(4))


def _admm_state(shape=(6, 4), dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(shape, generator=gen).to(dtype)
    z = torch.randn(shape, generator=gen)
    u = torch.randn(shape, generator=gen) * 0.1
    target = torch.zeros(shape, dtype=dtype)  # an output; zeros so that "unchanged" compares (empty memory may hold NaN)
    return w, z, u, target


BAD_UPDATE = [
    (lambda w, z, u, t: dict(z=torch.zeros(6, 5)), dict(k=3), "z has shape"),
    (lambda w, z, u, t: dict(u=torch.zeros(24)), dict(k=3), "u has shape"),
    (lambda w, z, u, t: dict(target=torch.zeros(4, 6)), dict(k=3), "target has shape"),
    (lambda w, z, u, t: dict(u=u.double()), dict(k=3), "share a dtype"),
    (lambda w, z, u, t: {}, dict(k=25), "k=25 is out of range"),
    (lambda w, z, u, t: {}, dict(k=7, rows=True), "k=7 is out of range"),
    (lambda w, z, u, t: {}, dict(ratio=2.0), "ratio=2.0"),
    (lambda w, z, u, t: {}, dict(), "exactly one of k"),
    (lambda w, z, u, t: {}, dict(prox="l2"), "prox must be one of"),
    (lambda w, z, u, t: {}, dict(prox="l1", lam=0.1), "needs lam and rho"),
    (lambda w, z, u, t: {}, dict(prox="l1", lam=-0.1, rho=1.0), "lam >= 0 and rho > 0"),
    (lambda w, z, u, t: {}, dict(prox="l1", lam=0.1, rho=0.0), "lam >= 0 and rho > 0"),
    (lambda w, z, u, t: {}, dict(prox="l1", lam=0.1, rho=1.0, k=3), "not k, ratio or rows"),
    (lambda w, z, u, t: {}, dict(k=3, lam=0.1), "lam is for prox='l1'"),
]


@pytest.mark.parametrize("swap,kwargs,message", BAD_UPDATE)
def test_admm_update_refuses_bad_input_and_writes_nothing(swap, kwargs, message):
    w, z, u, target = _admm_state()
    tensors = dict(w=w, z=z, u=u, target=target)
    tensors.update(swap(w, z, u, target))
    before = {name: t.clone() for name, t in tensors.items()}
    with pytest.raises(ValueError, match=message):
        admm_update(tensors["w"], tensors["z"], tensors["u"], tensors["target"], **kwargs)
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), name


# ---------------------------------------------------------- classic ADMM steps

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["topk", "rows", "l1"])
def test_admm_update_formulas(dtype, mode):
    w, z, u, target = _admm_state(dtype=dtype)
    u0 = u.clone()
    zp, up, tp = z.data_ptr(), u.data_ptr(), target.data_ptr()
    x = w.float() + u0
    if mode == "topk":
        admm_update(w, z, u, target, k=9)
        z_expect = project(x, k=9)
        assert int((z != 0).sum()) == 9
    elif mode == "rows":
        admm_update(w, z, u, target, ratio=0.5, rows=True)
        z_expect = project(x, ratio=0.5, rows=True)
        assert int((z != 0).any(dim=1).sum()) == kept_count(6, ratio=0.5)
    else:
        admm_update(w, z, u, target, prox="l1", lam=0.3, rho=0.5)
        z_expect = torch.sign(x) * (x.abs() - 0.6).clamp_min(0)
        assert (z == 0).sum() == (x.abs() <= 0.6).sum()
    assert (z.data_ptr(), u.data_ptr(), target.data_ptr()) == (zp, up, tp)  # in place
    torch.testing.assert_close(z, z_expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(u, u0 + w.float() - z, rtol=0, atol=1e-6)
    assert target.dtype == dtype
    assert torch.equal(target, (z - u).to(dtype))


def _lasso_problem(n=120, d=24, lam=0.08, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=gen, dtype=torch.float64)
    truth = torch.zeros(d, dtype=torch.float64)
    truth[:5] = torch.randn(5, generator=gen, dtype=torch.float64) * 2
    b = A @ truth + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    sklearn_linear = pytest.importorskip("sklearn.linear_model")  # test extra: scikit-learn
    lasso = sklearn_linear.Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=200_000)
    solution = torch.from_numpy(lasso.fit(A.numpy(), b.numpy()).coef_.copy())
    assert 0 < int((solution != 0).sum()) < d  # a genuinely sparse solution
    return A, b, lam, solution


def _grad(A, b, w):
    return A.T @ (A @ w - b) / A.shape[0]  # f(W) = ||AW - b||^2 / (2n), sklearn's lasso loss


def test_classic_admm_reaches_the_lasso_solution():
    A, b, lam, solution = _lasso_problem()
    rho = 1.0
    L = float(torch.linalg.eigvalsh(A.T @ A / A.shape[0]).max())
    lr = 1.0 / (L + rho)
    w = torch.zeros(A.shape[1], dtype=torch.float64)
    z, u, target = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
    gaps = []
    for _ in range(150):
        for _ in range(20):  # W-step: gradient descent on f + rho/2 ||W - Z + U||^2
            w -= lr * (_grad(A, b, w) + rho * (w - target))
        admm_update(w, z, u, target, prox="l1", lam=lam, rho=rho)
        gaps.append(float((w - z).norm()))
    torch.testing.assert_close(z, solution, rtol=0, atol=1e-8)
    assert torch.equal(z != 0, solution != 0)  # exact zeros where the lasso has them
    assert gaps[-1] < 1e-9 and gaps[-1] < 1e-3 * gaps[0]


def test_classic_admm_topk_ends_k_sparse():
    A, b, _, _ = _lasso_problem()
    rho = 1.0
    w = torch.zeros(A.shape[1], dtype=torch.float64)
    z, u, target = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
    for _ in range(60):
        for _ in range(20):
            w -= 0.3 * (_grad(A, b, w) + rho * (w - target))
        admm_update(w, z, u, target, k=5)
        assert int((z != 0).sum()) == 5
    assert float((w - z).norm()) < 1e-6
    assert torch.equal(z != 0, torch.arange(A.shape[1]) < 5)  # the planted support


@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
def test_classic_admm_through_regkern_sgd(backend_name):
    """The W-step in the fused SGD kernel (regkern.ADMM(rho): d += rho (W - target)),
    the Z/U-steps by admm_update on the optimizer's own state, in place."""
    import regkern
    A, b, lam, solution = _lasso_problem()
    A32, b32, rho = A.float(), b.float(), 1.0
    p = torch.nn.Parameter(torch.zeros(A.shape[1]))
    opt = regkern.SGD([{"params": [p], "regularizer": regkern.ADMM(rho)}], lr=0.3, backend=backend_name)
    st = opt.state[p]
    for _ in range(150):
        for _ in range(20):
            p.grad = A32.T @ (A32 @ p.detach() - b32) / A.shape[0]
            opt.step()
        admm_update(p.detach(), st["admm_z"], st["admm_u"], st["admm_target"], prox="l1", lam=lam, rho=rho)
    torch.testing.assert_close(st["admm_z"].double(), solution, rtol=0, atol=1e-5)
    assert torch.equal(st["admm_z"] != 0, solution != 0)
    torch.testing.assert_close(st["admm_target"], st["admm_z"] - st["admm_u"], rtol=0, atol=0)


# ---------------------------------------------------------- SAS-ADMM

def test_sas_schedule_is_the_official_one():
    assert sas_schedule(1, 50, 50, 1.1, 25) == (50, 1 / 25)
    assert sas_schedule(49, 50, 50, 1.1, 25) == (50, 1 / 25)
    m, eta = sas_schedule(50, 50, 50, 1.1, 25)
    assert m == 50 and eta == pytest.approx(1 / 25)
    m, eta = sas_schedule(100, 50, 50, 1.1, 25)
    assert m == math.ceil(50 / 50 ** 1.1 * 100 ** 1.1) == 108
    assert eta == pytest.approx(50 * 51 / (25 * 108 * 109))


def _soft(x, tau):  # the official Soft()
    tmp = x.abs() - tau
    return torch.sign(x) * (tmp + tmp.abs()) / 2


def official_sas(w0, grad_at, **kwargs):
    """``(W_hat of every step, W, Z, U)`` of :func:`official_sas_run`."""
    run = official_sas_run(w0, grad_at, **kwargs)
    return run["hats"], run["W"], run["Z"], run["U"]


def official_sas_run(w0, grad_at, *, beta, lam, M, k0, q, v, max_iter, r=0.9, s=1.09, last=None):
    """The loop of sasPrun in the official sas.py, transcribed (rho = beta),
    with its ergodic average W_ag of W over outer iterations last..max_iter
    (``last=None``: beyond max_iter, so W_ag = W)."""
    last = max_iter + 1 if last is None else last
    rho, M_k, eta_k, c = beta, M, 1 / v, M / k0 ** q
    W = w0.clone()
    Z, U, W_breve = W.clone(), torch.zeros_like(W), W.clone()
    diff_WZ = W - Z
    erg_i = 1
    hats = []
    for i in range(1, max_iter + 1):
        rho_Wold_h = rho * W + (U - beta * diff_WZ)
        if i >= k0:
            M_k = math.ceil(c * i ** q)
            eta_k = M * (M + 1) / (v * M_k * (M_k + 1))
        const_eta_k = 2 / eta_k
        for t in range(1, M_k + 1):
            beta_t = 2 / (t + 1)
            gamma_t = const_eta_k / t
            tempt_bW = (1 - beta_t) * W
            W_hat = beta_t * W_breve + tempt_bW
            d_t = grad_at(W_hat, len(hats))
            hats.append(W_hat)
            W_breve = (gamma_t * W_breve + rho_Wold_h - d_t) / (gamma_t + rho)
            W = beta_t * W_breve + tempt_bW
        U_mid = U - r * beta * (W - Z)
        Z = _soft(W - U_mid / beta, lam / beta)
        diff_WZ = W - Z
        U = U_mid - s * beta * diff_WZ
        if i > last:
            erg_i = erg_i + 1
            alpha_i = 1 / erg_i
            W_ag = (1 - alpha_i) * W_ag + alpha_i * W
        else:
            W_ag = W
    return {"hats": hats, "W": W, "Z": Z, "U": U, "W_ag": W_ag, "erg_i": erg_i}


def _minibatch_grad(A, b, batch=16):
    n = A.shape[0]

    def grad_at(w, step):
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(step))[:batch]
        return A[rows].T @ (A[rows] @ w - b[rows]) / batch
    return grad_at


def test_sas_admm_follows_the_official_loop():
    A, b, lam, _ = _lasso_problem()
    grad_at = _minibatch_grad(A, b)
    hyper = dict(beta=0.5, lam=lam, M=4, k0=3, q=1.1, v=2.0)
    max_iter = 7  # crosses k0: M_k = 4, 4, 4, 6, 8, 9, 11
    gen = torch.Generator().manual_seed(9)
    w0 = torch.randn(A.shape[1], generator=gen, dtype=torch.float64)
    hats, W, Z, U = official_sas(w0, grad_at, max_iter=max_iter, **hyper)
    assert len(hats) == 4 * 3 + 6 + 8 + 9 + 11
    p = torch.nn.Parameter(w0.clone())
    opt = SASADMM([p], **hyper)
    for step, hat in enumerate(hats):
        torch.testing.assert_close(p.detach(), hat, rtol=1e-12, atol=1e-12)  # what the forward pass sees
        p.grad = grad_at(p.detach(), step)
        opt.step()
    st = opt.state[p]
    assert (st["k"], st["t"]) == (max_iter + 1, 1)
    for mine, theirs in ((st["w"], W), (st["z"], Z), (st["u"], U)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert torch.equal(st["z"] == 0, Z == 0)


def test_sas_admm_reaches_the_lasso_solution():
    A, b, lam, solution = _lasso_problem()
    p = torch.nn.Parameter(torch.zeros(A.shape[1], dtype=torch.float64))
    opt = SASADMM([p], beta=1.0, lam=lam, M=20, k0=10 ** 6, v=1.0)
    gaps = []
    for _ in range(150):  # 150 outer iterations, full gradients
        for _ in range(20):
            p.grad = _grad(A, b, p.detach())
            opt.step()
        gaps.append(float((opt.state[p]["w"] - opt.state[p]["z"]).norm()))
    st = opt.state[p]
    assert st["k"] == 151 and st["t"] == 1
    torch.testing.assert_close(st["z"], solution, rtol=0, atol=1e-9)
    assert torch.equal(st["z"] != 0, solution != 0)  # exact zeros where the lasso has them
    assert gaps[-1] < 1e-9 and gaps[-1] < 1e-6 * gaps[0]
    opt.write_params("z")
    assert torch.equal(p.detach(), st["z"])


def test_sas_admm_official_defaults_reach_the_lasso_solution():
    """beta=0.04, r=0.9, s=1.09, v=25, M=50 (the official values, rho = beta;
    k0 out of reach so M_k stays 50), full gradients: slower, same answer."""
    A, b, lam, solution = _lasso_problem()
    p = torch.nn.Parameter(torch.zeros(A.shape[1], dtype=torch.float64))
    opt = SASADMM([p], lam=lam, k0=10 ** 6)
    assert opt.defaults == dict(beta=0.04, lam=lam, r=0.9, s=1.09, rho=None, M=50, k0=10 ** 6, q=1.1, v=25.0,
                                average_from=170)
    for _ in range(150 * 50):
        p.grad = _grad(A, b, p.detach())
        opt.step()
    st = opt.state[p]
    torch.testing.assert_close(st["z"], solution, rtol=0, atol=1e-4)
    assert torch.equal(st["z"] != 0, solution != 0)
    assert float((st["w"] - st["z"]).norm()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sas_admm_resumes_from_state_dict(dtype):
    shapes = [(6, 3, 3), (6,), (4, 5)]
    hyper = dict(beta=0.3, lam=0.05, M=3, k0=2, q=1.5, v=4.0)

    def make():
        g = torch.Generator().manual_seed(6)
        return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]

    def run(params, opt, start, steps):
        for step in range(start, start + steps):
            for i, p in enumerate(params):
                g = torch.Generator().manual_seed(100 * step + i)
                p.grad = (0.5 * p.detach().float() + torch.randn(p.shape, generator=g)).to(dtype)
            opt.step()

    params = make()
    opt = SASADMM([{"params": params[:2]}, {"params": params[2:], "lam": 0.0, "rho": 0.1}], **hyper)
    run(params, opt, 0, 8)  # k = 3 (M_2 = M_3 = 3): in the middle of an outer iteration
    assert opt.state[params[0]]["t"] != 1
    buffer = io.BytesIO()
    torch.save((opt.state_dict(), [p.detach().clone() for p in params]), buffer)
    run(params, opt, 8, 20)
    buffer.seek(0)
    saved, values = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(v) for v in values]
    opt2 = SASADMM([{"params": resumed[:2]}, {"params": resumed[2:], "lam": 0.0, "rho": 0.1}], **hyper)
    opt2.load_state_dict(copy.deepcopy(saved))
    assert opt2.state[resumed[0]]["w"].dtype == torch.float32  # fp32 state kept fp32
    run(resumed, opt2, 8, 20)
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())
        for name in ("w", "w_breve", "z", "u", "anchor", "k", "t"):
            x, y = opt.state[a][name], opt2.state[b][name]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_sas_admm_low_precision_parameter_sees_rounded_w_hat():
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(32, generator=gen).to(torch.bfloat16))
    opt = SASADMM([p], beta=0.5, lam=0.1, M=3, v=2.0)
    for step in range(7):
        p.grad = torch.randn(32, generator=gen).to(torch.bfloat16)
        opt.step()
        st = opt.state[p]
        b_next = 2.0 / (st["t"] + 1)
        assert st["w"].dtype == torch.float32
        w_hat = b_next * st["w_breve"] + (1.0 - b_next) * st["w"]  # fp32, as the kernels compute it
        assert torch.equal(p.detach(), w_hat.to(torch.bfloat16))


def test_sas_admm_skips_parameters_without_gradients():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    before = b.detach().clone()
    opt = SASADMM([a, b], M=2)
    a.grad = torch.randn(4)
    opt.step()
    opt.step()
    assert opt.state[a]["k"] == 2 and b not in opt.state and torch.equal(b.detach(), before)


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta=0.0), "beta"), (dict(beta=float("nan")), "beta"), (dict(lam=-1.0), "lam"),
    (dict(M=0), "M must be an int"), (dict(M=2.5), "M must be an int"), (dict(k0=0), "k0"),
    (dict(v=0.0), "v must be > 0"), (dict(q=-1.0), "q must be > 0"), (dict(rho=-0.1), "rho"),
    (dict(r=float("inf")), "r must be a finite"),
])
def test_sas_admm_refuses_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SASADMM([torch.nn.Parameter(torch.randn(3))], **kwargs)
    with pytest.raises(ValueError, match=message):
        SASADMM([{"params": [torch.nn.Parameter(torch.randn(3))], **kwargs}])


def test_sas_admm_refuses_bad_parameters_and_gradients():
    with pytest.raises(ValueError, match="floating-point"):
        SASADMM([torch.nn.Parameter(torch.arange(3), requires_grad=False)])
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    opt = SASADMM([a, b])
    a.grad = torch.randn(4, 3)
    b.grad = torch.randn(5).to_sparse()
    before = a.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(a.detach(), before) and not opt.state  # nothing written
