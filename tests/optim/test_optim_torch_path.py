"""The torch-op step of regkern.SGD (complex parameters, sparse gradients,
differentiable=True): torch.optim.SGD's bits without regularizer state, the
reference's math with it, and refusals that change nothing."""
from __future__ import annotations

import copy

import pytest
import torch

import regkern
from regkern.optim.torch_path import check_sgd_with_torch_ops, sgd_with_torch_ops
from regkern.reference.sgd import sgd_step
from regkern.regularizers import ADMM, Clamp, GroupLasso, ProxL1

pytestmark = pytest.mark.usefixtures("one_thread")




TORCH_CASES = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True),
    dict(weight_decay=0.05, maximize=True),
]


def group_of(params, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
             differentiable=False, regularizer=None):
    return dict(params=params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                nesterov=nesterov, maximize=maximize, foreach=None, differentiable=differentiable, fused=None,
                regularizer=regularizer)


def assert_same(a, b):
    a, b = a.detach(), b.detach()
    if a.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    assert a.dtype == b.dtype and torch.equal(a, b)


def complex_grads(params, step):
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(100 * step + i)
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def sparse_embedding_grad(emb, step):
    gen = torch.Generator().manual_seed(step)
    emb.zero_grad()
    idx = torch.randint(0, emb.num_embeddings, (5,), generator=gen)  # repeats: an uncoalesced gradient
    (emb(idx) * torch.randn(5, emb.embedding_dim, generator=gen)).sum().backward()


@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_complex_matches_torch_bit_for_bit(case, lr_tensor):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.complex64) for s in [(4, 3), (5,), (2, 3, 2)]]
    expected = [p.clone() for p in params]
    lr = torch.tensor(0.1) if lr_tensor else 0.1
    group = group_of(params, lr=lr, **case)
    states = [{} for _ in params]
    opt = torch.optim.SGD(expected, lr=lr, foreach=False, **case)
    for step in range(4):
        complex_grads(params, step)
        complex_grads(expected, step)
        sgd_with_torch_ops(params, states, group, None)
        opt.step()
    for p, e, st in zip(params, expected, states):
        assert_same(p, e)
        assert st.keys() == opt.state[e].keys()  # momentum_buffer exactly when torch writes one
        if "momentum_buffer" in st:
            assert_same(st["momentum_buffer"], opt.state[e]["momentum_buffer"])


@pytest.mark.parametrize("case", [c for c in TORCH_CASES if not c.get("weight_decay")], ids=str)
def test_sparse_gradients_match_torch_bit_for_bit(case):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(7, 3, sparse=True)
    twin = copy.deepcopy(emb)
    group = group_of([emb.weight], **case)
    state = {}
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, foreach=False, **case)
    for step in range(4):
        sparse_embedding_grad(emb, step)
        sparse_embedding_grad(twin, step)
        assert emb.weight.grad.is_sparse
        sgd_with_torch_ops([emb.weight], [state], group, None)
        opt.step()
    assert_same(emb.weight, twin.weight)
    assert state.keys() == opt.state[twin.weight].keys()
    if "momentum_buffer" in state:
        assert state["momentum_buffer"].is_sparse
        assert_same(state["momentum_buffer"], opt.state[twin.weight]["momentum_buffer"])


def run_refused(params, states, group, error, match=None):
    """The call raises ``error`` and leaves parameters, gradients and states as they were."""
    before = copy.deepcopy(([p.detach().clone() for p in params], [p.grad for p in params], states))
    with pytest.raises(error, match=match):
        check_sgd_with_torch_ops(params, states, group)
    with pytest.raises(error, match=match):
        sgd_with_torch_ops(params, states, group, None)
    for p, old in zip(params, before[0]):
        assert_same(p, old)
    for p, old in zip(params, before[1]):
        assert (p.grad is None) == (old is None)
        if old is not None:
            assert_same(p.grad, old)
    for st, old in zip(states, before[2]):
        assert st.keys() == old.keys()
        for key in st:
            assert_same(st[key], old[key])


def torch_refusal(emb, **options):
    opt = torch.optim.SGD(copy.deepcopy(emb).parameters(), foreach=False, **options)
    p = opt.param_groups[0]["params"][0]
    p.grad = emb.weight.grad.clone()
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001  (the type is what the test compares)
        return type(e)
    return None


@pytest.mark.parametrize("options, error", [
    (dict(lr=0.1, weight_decay=0.01), RuntimeError),
    (dict(lr=0.1, momentum=0.9, weight_decay=0.01), RuntimeError),
    (dict(lr=torch.tensor(0.1, requires_grad=True)), NotImplementedError),
], ids=["weight_decay", "momentum_weight_decay", "lr_requires_grad"])
def test_sparse_gradients_refused_like_torch(options, error):
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(3, 2))
    dense.grad = torch.randn(3, 2)
    emb = torch.nn.Embedding(7, 3, sparse=True)
    sparse_embedding_grad(emb, 0)
    assert torch_refusal(emb, **options) is error
    # the dense parameter comes first: nothing at all may be written
    params = [dense, emb.weight]
    run_refused(params, [{}, {}], group_of(params, **options), error, match="sparse gradient")


def test_sparse_momentum_buffer_with_dense_gradient_refused():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(7, 3, sparse=True)
    state = {}
    group = group_of([emb.weight], momentum=0.9)
    sparse_embedding_grad(emb, 0)
    sgd_with_torch_ops([emb.weight], [state], group, None)
    emb.weight.grad = torch.randn(7, 3)
    run_refused([emb.weight], [state], group, RuntimeError, match="sparse momentum buffer")


def test_momentum_buffer_written_only_with_momentum_and_kept_across_steps():
    p = torch.randn(3, 2, dtype=torch.complex64)
    state = {}
    complex_grads([p], 0)
    sgd_with_torch_ops([p], [state], group_of([p]), None)
    assert state == {}
    sgd_with_torch_ops([p], [state], group_of([p], momentum=0.5), None)
    buf = state["momentum_buffer"]
    sgd_with_torch_ops([p], [state], group_of([p], momentum=0.5), None)
    assert state["momentum_buffer"] is buf  # updated in place, as torch does


@pytest.mark.parametrize("kind", ["complex", "sparse"])
def test_grad_scale_divides_the_gradients_first(kind):
    scale = torch.tensor(1024.0)
    torch.manual_seed(0)
    if kind == "complex":
        p = torch.randn(4, 3, dtype=torch.complex64)
        complex_grads([p], 0)
        p.grad = p.grad * scale
    else:
        emb = torch.nn.Embedding(7, 3, sparse=True)
        sparse_embedding_grad(emb, 0)
        p = emb.weight
        p.grad = p.grad * scale
    expected = p.detach().clone().requires_grad_(p.requires_grad)
    expected.grad = p.grad / scale
    scaled_grad = p.grad.clone()
    state = {}
    sgd_with_torch_ops([p], [state], group_of([p], momentum=0.9), scale)
    torch.optim.SGD([expected], lr=0.1, momentum=0.9, foreach=False).step()
    assert_same(p, expected)
    assert_same(p.grad, scaled_grad)  # the gradient itself is left as it was


# --- differentiable=True -------------------------------------------------

def hyper_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    leaf = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    return dict(w0=leaf(5, 4), g1=leaf(5, 4), g2=leaf(5, 4), buf0=leaf(5, 4),
                lr=torch.tensor(0.1, dtype=dtype, requires_grad=True))


def two_steps(step, x, options):
    """Two differentiable steps from w0 (gradients g1, g2, momentum buffer
    buf0) and a loss of the result; ``step(p, state, lr)`` steps once."""
    p = x["w0"].clone()
    state = {"momentum_buffer": x["buf0"].clone()} if options.get("momentum") else {}
    for g in (x["g1"], x["g2"]):
        p.grad = g
        # a fresh buffer per step: SGD updates it in place, and autograd
        # saved the previous one (torch.optim.SGD needs this too)
        state = step(p, {k: v.clone() for k, v in state.items()}, x["lr"])
    loss = (p * p).sum() + p.sum()
    if "momentum_buffer" in state:
        loss = loss + (state["momentum_buffer"] ** 2).sum()
    return loss


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_differentiable_hypergradients_match_torch(case):
    x = hyper_inputs()

    def torch_step(p, state, lr):
        opt = torch.optim.SGD([p], lr=lr, differentiable=True, foreach=False, **case)
        opt.state[p].update(state)
        opt.step()
        return dict(opt.state[p])

    def ours(p, state, lr):
        with torch.no_grad():  # regkern.SGD.step runs under no_grad; the path turns autograd on
            sgd_with_torch_ops([p], [state], group_of([p], lr=lr, differentiable=True, **case), None)
        return state

    wrt = [x["lr"], x["w0"], x["g1"], x["g2"]] + ([x["buf0"]] if case.get("momentum") else [])
    expected = torch.autograd.grad(two_steps(torch_step, x, case), wrt)
    actual = torch.autograd.grad(two_steps(ours, x, case), wrt)
    for a, e in zip(actual, expected):
        assert_same(a, e)


def test_differentiable_complex_matches_torch():
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(3, 2, generator=gen, dtype=torch.complex128, requires_grad=True)
    g = torch.randn(3, 2, generator=gen, dtype=torch.complex128, requires_grad=True)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    buf0 = torch.randn(3, 2, generator=gen, dtype=torch.complex128, requires_grad=True)
    options = dict(lr=lr, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)
    results = []
    for ours in (False, True):
        p = w0.clone()
        p.grad = g
        state = {"momentum_buffer": buf0.clone()}
        if ours:
            sgd_with_torch_ops([p], [state], group_of([p], differentiable=True, **options), None)
        else:
            opt = torch.optim.SGD([p], differentiable=True, foreach=False, **options)
            opt.state[p].update(state)
            opt.step()
            state = opt.state[p]
        loss = p.abs().square().sum() + state["momentum_buffer"].abs().sum()
        results.append(torch.autograd.grad(loss, [lr, w0, g, buf0]))
    for a, e in zip(*results):
        assert_same(a, e)


def test_without_differentiable_autograd_records_nothing():
    leaf = torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))
    leaf.grad = torch.randn(2, dtype=torch.complex64)
    with torch.enable_grad():  # like torch.optim.SGD: no autograd unless differentiable=True
        sgd_with_torch_ops([leaf], [{}], group_of([leaf], momentum=0.9), None)
    assert leaf.grad_fn is None


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_differentiable_sparse_gradient_matches_torch(momentum):
    w0 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    values = torch.randn(4, 3, dtype=torch.float64)
    grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 1, 0]]), values, (6, 3), check_invariants=True)
    results = []
    for ours in (False, True):
        p, state = w0.clone(), {}
        for _ in range(2):
            p.grad = grad
            if ours:
                sgd_with_torch_ops([p], [state], group_of([p], momentum=momentum, maximize=True, differentiable=True), None)
            else:
                opt = torch.optim.SGD([p], lr=0.1, momentum=momentum, maximize=True, differentiable=True, foreach=False)
                opt.state[p].update(state)
                opt.step()
                state = dict(opt.state[p])
        results.append((p.detach(), torch.autograd.grad((p * p).sum(), w0)))
    assert_same(results[0][0], results[1][0])
    assert_same(results[0][1][0], results[1][1][0])


def test_differentiable_leaf_refused():
    leaf = torch.nn.Parameter(torch.randn(3))
    leaf.grad = torch.randn(3)
    other = torch.nn.Parameter(leaf.detach().clone())
    other.grad = leaf.grad.clone()
    with pytest.raises(RuntimeError, match="leaf"):
        torch.optim.SGD([other], lr=0.1, differentiable=True).step()
    run_refused([leaf], [{}], group_of([leaf], differentiable=True), RuntimeError, match="leaf")


REG_STATES = {
    "row_l2": lambda w: dict(lam=torch.rand(w.shape[0], dtype=torch.float32)),
    "element_l2": lambda w: dict(lam=torch.rand(w.shape, dtype=torch.float32)),
    "columns": lambda w: dict(lam_cols=torch.rand(w.shape[1], dtype=torch.float32)),
    "l1": lambda w: dict(l1=torch.full((w.shape[0],), 0.05)),
    "polar": lambda w: dict(polar=torch.tensor([0.05, 1.2, 0.1, -0.2])),
    "admm": lambda w: dict(admm_target=(0.5 * w).detach().clone()),
    "mask_rows": lambda w: dict(mask=torch.tensor([True, False] * (w.shape[0] // 2) + [True] * (w.shape[0] % 2))),
    "mask_elements": lambda w: dict(mask=torch.rand(w.shape) > 0.3),
    "prox_l1": lambda w: dict(prox_lam=torch.tensor([0.0, 5.0, 0.5, 20.0, 0.1, 1.0, 3.0][:w.shape[0]])),
    "group_lasso": lambda w: dict(prox_lam=torch.tensor([0.0, 5.0, 0.5, 20.0, 0.1, 1.0, 3.0][:w.shape[0]])),
    "norms": lambda w: dict(row_norms=torch.zeros(w.shape[0], 3)),
}
REG_GROUPS = {"admm": ADMM(rho=0.3), "prox_l1": ProxL1(), "group_lasso": GroupLasso(),
              "clamp": Clamp(-0.6, 0.7), "polar": Clamp(-0.6, 0.7)}


def reference_step_(w, buf, grad, first, state, group, norms=None):
    """The reference step on ``w`` and ``buf`` in place (it keeps float64)."""
    options = regkern.regularizers.step_options(group["regularizer"])
    sgd_step([w], [grad], [buf], lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
             nesterov=group["nesterov"], weight_decay=group["weight_decay"], maximize=group["maximize"],
             first_step=first, lams=[state.get("lam")], lam_cols=[state.get("lam_cols")],
             masks=[state.get("mask")], l1s=[state.get("l1")], polars=[state.get("polar")],
             admm_targets=[state.get("admm_target")], admm_rhos=[options.get("admm_rho", 0.0)],
             prox_kinds=[options.get("prox_kind", 0)], prox_lams=[state.get("prox_lam")],
             clamps=[options.get("clamp")], norms=[norms])


@pytest.mark.parametrize("differentiable", [False, True])
@pytest.mark.parametrize("name", [*REG_STATES, "clamp"])
def test_regularizer_state_follows_the_reference(name, differentiable):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    state = REG_STATES.get(name, lambda w: {})(w)
    group = group_of([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                     differentiable=differentiable, regularizer=REG_GROUPS.get(name))
    expected, expected_buf = w.clone(), torch.empty_like(w)
    expected_norms = torch.zeros(5, 3) if "row_norms" in state else None
    for step in range(3):
        grad = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        reference_step_(expected, expected_buf, grad, step == 0, state, group, expected_norms)
        w.grad = grad
        sgd_with_torch_ops([w], [state], group, None)
        torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["momentum_buffer"], expected_buf, rtol=1e-12, atol=1e-12)
        if expected_norms is not None:
            torch.testing.assert_close(state["row_norms"], expected_norms)
    if name in ("prox_l1", "group_lasso", "mask_rows", "mask_elements"):
        assert (w == 0).any()


@pytest.mark.parametrize("name", ["row_l2", "element_l2", "l1", "polar", "admm", "mask_rows", "prox_l1",
                                  "group_lasso", "clamp"])
def test_differentiable_regularized_step_gradchecks(name):
    """Autograd through the regularized step is the derivative of the step."""
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    state0 = REG_STATES.get(name, lambda w: {})(w0)
    regularizer = REG_GROUPS.get(name)

    def step(lr, w, grad, buf):
        p = w.clone()
        p.grad = grad
        # an existing buffer: torch's first momentum step detaches the gradient
        state = {**{k: v.clone() for k, v in state0.items()}, "momentum_buffer": buf.clone()}
        sgd_with_torch_ops([p], [state], group_of([p], lr=lr, momentum=0.9, differentiable=True,
                                                  regularizer=regularizer), None)
        return p, state["momentum_buffer"]

    leaf = lambda: torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    inputs = (torch.tensor(0.1, dtype=torch.float64, requires_grad=True), w0.clone().requires_grad_(), leaf(), leaf())
    assert torch.autograd.gradcheck(step, inputs, fast_mode=True)


# --- complex parameters with regularizer state ---------------------------

@pytest.mark.parametrize("name", ["row_l2", "element_l2", "columns", "admm", "mask_rows", "mask_elements"])
def test_complex_linear_terms_match_the_real_view(name):
    """lam * W, lam_cols * W, rho * (W - target) and masks act on the real and
    imaginary parts alike: the step equals the reference on torch.view_as_real."""
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(4, 3, generator=gen, dtype=torch.complex128)
    state = REG_STATES[name](w)
    real_state = {}
    for key, value in state.items():
        if value.shape == w.shape and key != "admm_target":  # per element: the same value for both parts
            value = value[..., None].expand(*w.shape, 2).contiguous()
        real_state[key] = torch.view_as_real(value) if value.is_complex() else value
    group = group_of([w], lr=0.1, momentum=0.9, weight_decay=0.01, regularizer=REG_GROUPS.get(name))
    real = torch.view_as_real(w).clone()
    real_buf = torch.empty_like(real)
    for step in range(3):
        grad = torch.randn(4, 3, generator=gen, dtype=torch.complex128)
        w.grad = grad
        sgd_with_torch_ops([w], [state], group, None)
        reference_step_(real, real_buf, torch.view_as_real(grad), step == 0, real_state, group)
        torch.testing.assert_close(torch.view_as_real(w), real, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.view_as_real(state["momentum_buffer"]), real_buf, rtol=1e-12, atol=1e-12)


def test_complex_row_norms_use_the_modulus():
    w = torch.tensor([[3 + 4j, 0j], [1j, -1 + 0j]], dtype=torch.complex64)
    state = {"row_norms": torch.zeros(2, 3)}
    w.grad = torch.zeros_like(w)
    sgd_with_torch_ops([w], [state], group_of([w]), None)
    torch.testing.assert_close(state["row_norms"], torch.tensor([[5.0, 5.0, 2.5], [2.0, 2 ** 0.5, 1.0]]))


@pytest.mark.parametrize("name, regularizer", [
    ("l1", None), ("polar", Clamp(0.0, 1.0)), ("prox_l1", ProxL1(lam=0.3)), ("group_lasso", GroupLasso(lam=0.2)),
    ("clamp", Clamp(-1.0, 1.0))])
def test_complex_order_terms_refused(name, regularizer):
    w = torch.randn(4, 3, dtype=torch.complex64)
    ok = torch.randn(2, 3, dtype=torch.complex64)  # stepped first if anything were written
    complex_grads([ok, w], 0)
    states = [{}, REG_STATES.get(name, lambda w: {})(w)]
    run_refused([ok, w], states, group_of([ok, w], momentum=0.9, regularizer=regularizer), ValueError,
                match="complex")


# --- sparse gradients with regularizer state -----------------------------

@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("names", [("mask_rows",), ("prox_l1",), ("group_lasso", "mask_elements"), ("clamp",),
                                   ("norms", "mask_rows")], ids=str)
def test_sparse_gradient_with_terms_on_w(names, momentum):
    """Masks, proximal maps, clamps and row norms act on the whole W; the
    result is the reference's step with the dense gradient."""
    torch.manual_seed(17)
    emb = torch.nn.Embedding(6, 4, sparse=True, dtype=torch.float64)
    state = {}
    for name in names:
        state.update(REG_STATES.get(name, lambda w: {})(emb.weight))
    regularizer = [REG_GROUPS[n] for n in names if n in REG_GROUPS] or None
    group = group_of([emb.weight], momentum=momentum, regularizer=regularizer)
    expected, expected_buf = emb.weight.detach().clone(), torch.empty(6, 4, dtype=torch.float64)
    for step in range(3):
        sparse_embedding_grad(emb, step)
        expected_norms = torch.zeros(6, 3) if "row_norms" in state else None
        reference_step_(expected, expected_buf, emb.weight.grad.to_dense(), step == 0, state, group, expected_norms)
        sgd_with_torch_ops([emb.weight], [state], group, None)
        torch.testing.assert_close(emb.weight.detach(), expected, rtol=1e-12, atol=1e-12)
        if momentum:
            assert state["momentum_buffer"].is_sparse
            torch.testing.assert_close(state["momentum_buffer"].to_dense(), expected_buf, rtol=1e-12, atol=1e-12)
        if expected_norms is not None:
            torch.testing.assert_close(state["row_norms"], expected_norms)


@pytest.mark.parametrize("name, regularizer", [
    ("row_l2", None), ("element_l2", None), ("columns", None), ("l1", None), ("polar", None), ("admm", ADMM(rho=0.1))])
def test_sparse_gradient_terms_refused(name, regularizer):
    torch.manual_seed(19)
    dense = torch.randn(3, 2)
    dense.grad = torch.randn(3, 2)
    emb = torch.nn.Embedding(6, 4, sparse=True)
    sparse_embedding_grad(emb, 0)
    states = [{}, REG_STATES[name](emb.weight.detach())]
    params = [dense, emb.weight]
    run_refused(params, states, group_of(params, momentum=0.9, regularizer=regularizer), ValueError,
                match="sparse gradient")


@pytest.mark.parametrize("key, value", [
    ("lam", torch.zeros(5)), ("lam", torch.zeros(4, dtype=torch.float64)), ("lam_cols", torch.zeros(2)),
    ("mask", torch.ones(4)), ("row_norms", torch.zeros(4, 2)), ("l1", torch.zeros(3)),
    ("momentum_buffer", torch.zeros(4, 3)), ("admm_target", torch.zeros(4, 3))])
def test_state_that_does_not_fit_is_refused(key, value):
    w = torch.randn(4, 3, dtype=torch.complex64)
    complex_grads([w], 0)
    run_refused([w], [{key: value}], group_of([w], momentum=0.9, regularizer=ADMM(rho=0.1)), ValueError,
                match="parameter 0 of its param group")


def test_parameter_without_gradient_refused():
    w, v = torch.randn(2, dtype=torch.complex64), torch.randn(2, dtype=torch.complex64)
    w.grad = torch.ones_like(w)
    run_refused([w, v], [{}, {}], group_of([w, v]), ValueError, match="parameter 1 of its param group .* no gradient")


def test_proximal_map_without_lambda_refused():
    w = torch.randn(4, 3)
    w.grad = torch.randn(4, 3)
    run_refused([w], [{}], group_of([w], regularizer=ProxL1()), ValueError, match="proximal lambda")


# --- end to end through regkern.SGD (needs its routing) -------------------

@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_regkern_sgd_complex_model_matches_torch(case):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, dtype=torch.complex64)
    twin = copy.deepcopy(model)
    ours = regkern.SGD(model.parameters(), lr=0.05, **case)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.05, foreach=False, **case)
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).abs().square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_same(a, b)


@pytest.mark.parametrize("case", [c for c in TORCH_CASES if not c.get("weight_decay")], ids=str)
def test_regkern_sgd_sparse_embedding_matches_torch(case):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(7, 3, sparse=True)
    linear = torch.nn.Linear(3, 2)  # dense, on the fused path, in the same group
    model = torch.nn.ModuleList([emb, linear])
    twin = copy.deepcopy(model)
    ours = regkern.SGD(model.parameters(), lr=0.1, **case)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.1, foreach=False, **case)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        idx, weights, x = torch.randint(0, 7, (5,), generator=gen), torch.randn(5, 3, generator=gen), torch.randn(4, 3, generator=gen)
        for (e, lin), opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            # the embedding's gradient does not depend on the linear layer, so
            # it stays bit-identical while the fused step rounds differently
            ((e(idx) * weights).sum() + lin(x).square().sum()).backward()
            opt.step()
    assert_same(emb.weight, twin[0].weight)
    for a, b in zip(linear.parameters(), twin[1].parameters()):
        torch.testing.assert_close(a, b)  # fused kernel against torch: rounding only


def test_regkern_sgd_refusal_on_the_torch_path_changes_nothing():
    """A refused torch-op parameter stops the whole step: the dense
    parameters (fused kernels, stepped in the same call) stay as they were."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    emb = torch.nn.Embedding(7, 3, sparse=True)
    opt = regkern.SGD([{"params": linear.parameters()}, {"params": emb.parameters()}], lr=0.1, momentum=0.9,
                      weight_decay=0.01)
    linear(torch.randn(4, 3)).sum().backward()
    sparse_embedding_grad(emb, 0)
    before = [p.detach().clone() for p in (*linear.parameters(), emb.weight)]
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    for p, old in zip((*linear.parameters(), emb.weight), before):
        assert_same(p, old)
    assert all("momentum_buffer" not in opt.state[p] for p in (*linear.parameters(), emb.weight))


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_regkern_sgd_differentiable_matches_torch(case):
    x = hyper_inputs()

    def step_with(cls):
        def step(p, state, lr):
            opt = cls([p], lr=lr, differentiable=True, **case)
            opt.state[p].update(state)
            opt.step()
            return dict(opt.state[p])
        return step

    wrt = [x["lr"], x["w0"], x["g1"], x["g2"]] + ([x["buf0"]] if case.get("momentum") else [])
    expected = torch.autograd.grad(two_steps(step_with(torch.optim.SGD), x, case), wrt)
    actual = torch.autograd.grad(two_steps(step_with(regkern.SGD), x, case), wrt)
    for a, e in zip(actual, expected):
        assert_same(a, e)


def test_regkern_sgd_complex_row_l2_mask_and_norms():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    opt = regkern.SGD([{"params": [w], "regularizer": regkern.RowL2(track_norms=True)}], lr=0.1, momentum=0.9)
    opt.state[w]["lam"].copy_(torch.tensor([0.0, 0.5, 1.0, 2.0]))
    opt.state[w]["mask"] = torch.tensor([True, True, False, True])
    copy_w = w.detach().clone()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    for step in range(2):
        complex_grads([w], step)
        copy_w.grad = w.grad.clone()
        opt.step()
        sgd_with_torch_ops([copy_w], [state], group_of([copy_w], momentum=0.9), None)
    assert_same(w, copy_w)
    assert_same(opt.state[w]["row_norms"], state["row_norms"])
    assert (w[2] == 0).all()
