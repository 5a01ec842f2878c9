"""regkern.SGD is a drop-in torch.optim.SGD, and RowL2 is the official GReg loop."""
import copy
import io
import itertools
import warnings

import pytest
import torch

import regkern
from optim_helpers import (CPU_BACKENDS, assert_params_close, assert_unchanged, fake_grads,
                           make_params, snapshot, train, twin)

CONFIGS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.5], [False, True], [0.0, 1e-2], [False, True])
    if not (n and (m == 0 or d != 0))
]


def config_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_torch_sgd_fp32(backend, impl, config):
    params = make_params()
    expected = twin(params)
    opt = regkern.SGD(params, lr=0.05, backend=backend, **config)
    ref = torch.optim.SGD(expected, lr=0.05, **{impl: True}, **config)
    train(opt, params, 20)
    train(ref, expected, 20)
    assert_params_close(params, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[-1], dict(momentum=0.9, dampening=0.5, weight_decay=1e-2)],
                         ids=config_id)
def test_matches_torch_sgd_fp64(backend, impl, config):
    params = make_params(torch.float64)
    expected = twin(params)
    opt = regkern.SGD(params, lr=0.05, backend=backend, **config)
    ref = torch.optim.SGD(expected, lr=0.05, **{impl: True}, **config)
    train(opt, params, 20)
    train(ref, expected, 20)
    assert_params_close(params, expected, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS[::3] + [CONFIGS[-1]], ids=config_id)
def test_matches_torch_sgd_reduced_precision(backend, dtype, config):
    """bf16/fp16 storage: close to torch's foreach SGD, and at least as close
    to the float64 trajectory (regkern rounds once per step, torch per op).
    torch 2.13's CPU fused SGD leaves most bf16/fp16 elements un-updated, so
    it is not a reference here."""
    params = make_params(dtype)
    expected, exact = twin(params), [torch.nn.Parameter(p.detach().double()) for p in params]
    opt = regkern.SGD(params, lr=0.05, backend=backend, **config)
    ref = torch.optim.SGD(expected, lr=0.05, foreach=True, **config)
    truth = torch.optim.SGD(exact, lr=0.05, foreach=True, **config)
    for t in range(20):
        fake_grads(exact, t, maximize=config["maximize"])  # one gradient for all three
        for o, ps in ((opt, params), (ref, expected), (truth, exact)):
            for p, e in zip(ps, exact):
                p.grad = e.grad.to(p.dtype)
            o.step()
    assert_params_close(params, expected, dtype)
    error = max((p.double() - e).abs().max().item() for p, e in zip(params, exact))
    torch_error = max((p.double() - e).abs().max().item() for p, e in zip(expected, exact))
    assert error <= 1.25 * torch_error + torch.finfo(dtype).eps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_lr(backend):
    params = make_params()
    expected = twin(params)
    opt = regkern.SGD(params, lr=torch.tensor(0.05), momentum=0.9, backend=backend)
    ref = torch.optim.SGD(expected, lr=torch.tensor(0.05), momentum=0.9, fused=True)
    for o in (opt, ref):
        o.param_groups[0]["lr"].fill_(0.02)  # a tensor lr changed in place is honoured
    train(opt, params, 10)
    train(ref, expected, 10)
    assert_params_close(params, expected)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=30),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda t: 0.95),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, factor=0.3, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8)], milestones=[3]),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, factor=0.3, total_iters=3),
         torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8)]),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS) + ["ReduceLROnPlateau"])
def test_lr_schedulers(name):
    params = make_params()
    expected = twin(params)
    opt = regkern.SGD(params, lr=0.05, momentum=0.9)
    ref = torch.optim.SGD(expected, lr=0.05, momentum=0.9, foreach=True)
    histories = []
    for o, ps in ((opt, params), (ref, expected)):
        sched = (torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5)
                 if name == "ReduceLROnPlateau" else SCHEDULERS[name](o))
        history = []
        for t in range(12):
            fake_grads(ps, t)
            o.step()
            # a flat metric for the plateau scheduler: the lr is cut every other step
            sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()
            history += [o.param_groups[0]["lr"], o.param_groups[0]["momentum"]]
        histories.append(history)
    assert histories[0] == pytest.approx(histories[1])
    assert len(set(histories[0][::2])) > 1  # the lr did change
    assert_params_close(params, expected)


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_gives_same_trajectory(backend, dtype):
    def build(ps):
        opt = regkern.SGD([{"params": ps[:4], "regularizer": regkern.RowL2(track_norms=True)},
                           {"params": ps[4:], "lr": 0.02}], lr=0.05, momentum=0.9, weight_decay=1e-3,
                          backend=backend)
        for i, p in enumerate(ps[:4]):
            opt.state[p]["lam"].copy_(torch.linspace(-1e-2, 1e-1 * (i + 1), p.shape[0]))
        opt.state[ps[0]]["mask"] = torch.arange(ps[0].shape[0]) % 3 != 0
        return opt

    params = make_params(dtype)
    resumed = twin(params)
    opt = build(params)
    train(opt, params, 10)
    saved_params = [p.detach().clone() for p in params]
    saved_state = roundtrip(opt.state_dict())
    train(opt, params, 10, start=10)

    for p, s in zip(resumed, saved_params):
        p.data.copy_(s)
    opt2 = build(resumed)
    opt2.state[resumed[0]]["lam"].zero_()  # must be overwritten by the checkpoint
    opt2.load_state_dict(saved_state)
    assert opt2.state[resumed[1]]["lam"].dtype == torch.float32
    assert opt2.state[resumed[0]]["mask"].dtype == torch.bool
    assert isinstance(opt2.param_groups[0]["regularizer"], regkern.RowL2)
    train(opt2, resumed, 10, start=10)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    torch.testing.assert_close(opt.state[params[0]]["row_norms"], opt2.state[resumed[0]]["row_norms"])


def test_torch_sgd_state_dict_loads():
    """A torch.optim.SGD checkpoint continues in regkern.SGD (same state layout)."""
    params = make_params()
    expected = twin(params)
    ref = torch.optim.SGD(expected, lr=0.05, momentum=0.9)
    train(ref, expected, 5)
    for p, e in zip(params, expected):
        p.data.copy_(e)
    opt = regkern.SGD(params, lr=0.05, momentum=0.9)
    opt.load_state_dict(roundtrip(ref.state_dict()))
    train(ref, expected, 5, start=5)
    train(opt, params, 5, start=5)
    assert_params_close(params, expected)


def test_closure_returns_loss_and_steps():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt = regkern.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        for m, o in ((model, opt), (ref_model, ref)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                return loss
            loss = o.step(closure)
        assert isinstance(loss, torch.Tensor)
    assert_params_close(list(model.parameters()), list(ref_model.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_param_groups_with_different_hyperparameters(backend):
    params = make_params()
    expected = twin(params)
    groups = lambda ps: [dict(params=ps[:3], lr=0.1, momentum=0.9, nesterov=True),
                         dict(params=ps[3:6], weight_decay=0.1, dampening=0.2, momentum=0.5),
                         dict(params=ps[6:], maximize=True)]
    opt = regkern.SGD(groups(params), lr=0.01, backend=backend)
    ref = torch.optim.SGD(groups(expected), lr=0.01, foreach=True)
    train(opt, params, 15)
    train(ref, expected, 15)
    assert_params_close(params, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_params_without_grad_are_skipped(backend):
    params = make_params()
    expected = twin(params)
    opt = regkern.SGD(params, lr=0.05, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(expected, lr=0.05, momentum=0.9)
    for t in range(6):
        for ps, o in ((params, opt), (expected, ref)):
            fake_grads(ps, t)
            ps[1].grad = None
            if t < 3:
                ps[4].grad = None  # gets its first momentum step late
            o.step()
    assert_params_close(params, expected)
    assert "momentum_buffer" not in opt.state[params[1]]
    torch.testing.assert_close(params[1], make_params()[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_l2_equals_official_loop(backend, dtype):
    """RowL2 computes what the official GReg code does: grad += lam[:, None] * W, then SGD."""
    params = make_params(dtype)
    expected = twin(params)
    weights = [p for p in params if p.dim() > 1]
    opt = regkern.SGD([{"params": weights, "regularizer": regkern.RowL2()},
                       {"params": [p for p in params if p.dim() <= 1]}],
                      lr=0.05, momentum=0.9, weight_decay=5e-4, backend=backend)
    lams = {}
    for i, p in enumerate(weights):
        lam = opt.state[p]["lam"]
        assert lam.dtype == torch.float32 and lam.shape == (p.shape[0],) and not lam.any()
        lam.copy_(torch.linspace(-0.5, 2.0, p.shape[0]) * (i + 1))
        lams[i] = lam.clone()
    ref = torch.optim.SGD(expected, lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=True)
    ref_weights = [p for p in expected if p.dim() > 1]
    for t in range(20):
        fake_grads(params, t)
        opt.step()
        fake_grads(expected, t)
        for i, p in enumerate(ref_weights):
            view = (-1,) + (1,) * (p.dim() - 1)
            p.grad = (p.grad.float() + lams[i].view(view) * p.detach().float()).to(dtype)
        ref.step()
    # the official loop rounds the regularized gradient to the storage dtype; regkern does not
    assert_params_close(params, expected, dtype if dtype == torch.float32 else torch.bfloat16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_norms_and_masks(backend):
    params = make_params(shapes=[(6, 4, 3, 3), (6,), (5, 7)])
    opt = regkern.SGD([{"params": params, "regularizer": regkern.RowL2(track_norms=True)}],
                      lr=0.1, momentum=0.9, backend=backend)
    opt.state[params[0]]["mask"] = torch.tensor([True, False, True, True, False, True])
    opt.state[params[2]]["mask"] = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    train(opt, params, 3)
    assert not params[0][1].any() and not params[0][4].any()
    assert not opt.state[params[0]]["momentum_buffer"][1].any()
    assert not params[2][~opt.state[params[2]]["mask"]].any()
    for p in params:
        rows = p.detach().reshape(p.shape[0], -1)
        norms = opt.state[p]["row_norms"]
        torch.testing.assert_close(norms[:, 0], rows.abs().sum(1))
        torch.testing.assert_close(norms[:, 1], rows.norm(dim=1))
        torch.testing.assert_close(norms[:, 2], rows.abs().mean(1))


def test_grad_scaler_fp16_matches_unscaled_torch_and_skips_overflow():
    params = make_params(torch.float16)
    expected = twin(params)
    opt = regkern.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref = torch.optim.SGD(expected, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)
    scaler.scale(torch.zeros(()))  # the scale is created by the first scale() call
    for t in range(12):
        fake_grads(params, t, scale=scaler.get_scale())
        if t == 5:
            params[2].grad[0] = float("inf")
            before = snapshot(opt, params)
        scaler.step(opt)
        scaler.update()
        if t == 5:
            assert_unchanged(before, opt, params)
            continue
        fake_grads(expected, t)  # torch's reference gets the unscaled gradients
        ref.step()
    assert scaler.get_scale() == 256.0 * 2 ** 2 / 2 * 2  # grew twice, halved once, grew again
    assert_params_close(params, expected, torch.float16)


def test_grad_scaler_regularizer_acts_on_unscaled_gradient():
    params = make_params(torch.float16, shapes=[(8, 3, 3, 3), (5, 8)])
    expected = twin(params)
    groups = lambda ps: [{"params": ps, "regularizer": regkern.RowL2()}]
    opt = regkern.SGD(groups(params), lr=0.05, momentum=0.9)
    plain = regkern.SGD(groups(expected), lr=0.05, momentum=0.9)
    for o, ps in ((opt, params), (plain, expected)):
        for p in ps:
            o.state[p]["lam"].fill_(0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.zeros(()))
    for t in range(5):
        fake_grads(params, t, scale=scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        fake_grads(expected, t)
        plain.step()
    assert_params_close(params, expected, torch.float16)


def test_first_step_skipped_by_overflow_leaves_no_state():
    params = make_params(torch.float16)
    opt = regkern.SGD(params, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**15)
    scaler.scale(torch.zeros(()))
    before = snapshot(opt, params)
    fake_grads(params, 0, scale=2.0**15)  # fp16 overflow
    params[0].grad.fill_(float("nan"))
    scaler.step(opt)
    scaler.update()
    assert_unchanged(before, opt, params)
    assert scaler.get_scale() < 2.0**15
