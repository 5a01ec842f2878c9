"""Bad input gets one clear sentence and changes nothing; odd layouts still step."""
import warnings

import pytest
import torch

import regkern
from regkern.backends import backend
from optim_helpers import CPU_BACKENDS, assert_params_close, assert_unchanged, fake_grads, make_params, snapshot, twin


def stepped_once(backend_name, **kwargs):
    params = make_params()
    opt = regkern.SGD([{"params": params[:4], "regularizer": regkern.RowL2()}, {"params": params[4:]}],
                      lr=0.1, momentum=0.9, backend=backend_name, **kwargs)
    for t in range(3):  # momentum buffers exist and the step's plan is cached
        fake_grads(params, t)
        opt.step()
    fake_grads(params, 3)
    return params, opt


BREAKERS = {
    "lambda too short": (lambda ps, opt: opt.state[ps[0]].__setitem__("lam", torch.zeros(3)), "lambda"),
    "lambda dtype": (lambda ps, opt: opt.state[ps[0]].__setitem__("lam", torch.zeros(16, dtype=torch.float64)), "float32 vector of length 16"),
    "lambda device": (lambda ps, opt: opt.state[ps[0]].__setitem__("lam", torch.zeros(16, device="meta")), "on cpu"),
    "mask shape": (lambda ps, opt: opt.state[ps[3]].__setitem__("mask", torch.ones(3, dtype=torch.bool)), "mask"),
    "mask dtype": (lambda ps, opt: opt.state[ps[3]].__setitem__("mask", torch.ones(10)), "bool"),
    "row norms shape": (lambda ps, opt: opt.state[ps[0]].__setitem__("row_norms", torch.zeros(16)), "row-norm"),
    "gradient shape": (lambda ps, opt: setattr(ps[5].grad, "data", torch.zeros(5, 7)), "gradient of"),
}


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("what", sorted(BREAKERS))
def test_bad_input_is_refused_and_changes_nothing(backend_name, what):
    params, opt = stepped_once(backend_name)
    breaker, message = BREAKERS[what]
    try:
        breaker(params, opt)
    except RuntimeError:
        pytest.skip("torch refuses this assignment itself")
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_unchanged(before, opt, params)


def test_devices_mixed_in_one_group_are_refused():
    cpu = torch.nn.Parameter(torch.randn(4, 3))
    meta = torch.nn.Parameter(torch.randn(4, 3, device="meta"))
    opt = regkern.SGD([cpu, meta], lr=0.1)
    cpu.grad, meta.grad = torch.randn(4, 3), torch.randn(4, 3, device="meta")
    before = cpu.detach().clone()
    with pytest.raises(ValueError, match="own param group"):
        opt.step()
    assert torch.equal(before, cpu.detach())


def test_bad_constructor_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    for kwargs, match in [(dict(lr=-1.0), "learning rate"), (dict(momentum=-0.1), "momentum"),
                          (dict(weight_decay=-1.0), "weight_decay"), (dict(nesterov=True), "Nesterov")]:
        with pytest.raises(ValueError, match=match):
            regkern.SGD(p, **{"lr": 0.1, **kwargs})
    with pytest.raises(TypeError, match="regularizer"):
        regkern.SGD([{"params": p, "regularizer": "l2"}], lr=0.1)
    with pytest.raises(ValueError, match="unknown regkern backend"):
        p[0].grad = torch.ones(3)
        regkern.SGD(p, lr=0.1, backend="cuda-graphs").step()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_non_contiguous_parameters_are_stepped_correctly(backend_name):
    base = torch.randn(12, 8)
    transposed = torch.nn.Parameter(base.t())  # a non-contiguous leaf
    channels_last = torch.nn.Parameter(torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last))
    params = [transposed, channels_last, torch.nn.Parameter(torch.randn(5))]
    expected = twin(params)
    opt = regkern.SGD([{"params": params, "regularizer": regkern.RowL2()}], lr=0.1, momentum=0.9,
                      weight_decay=1e-2, backend=backend_name)
    for p in params:
        opt.state[p]["lam"].uniform_(0, 0.5, generator=torch.Generator().manual_seed(1))
    lams = [opt.state[p]["lam"].clone() for p in params]
    ref = torch.optim.SGD(expected, lr=0.1, momentum=0.9, weight_decay=1e-2)
    for t in range(5):
        fake_grads(params, t)
        fake_grads(expected, t)
        for p, lam in zip(expected, lams):
            p.grad += lam.view((-1,) + (1,) * (p.dim() - 1)) * p.detach()
        opt.step()
        ref.step()
    assert_params_close(params, expected)
    assert not transposed.is_contiguous()


def test_backend_forced_by_environment(monkeypatch):
    monkeypatch.setenv("REGKERN_BACKEND", "reference")
    assert backend.choose_backend(torch.device("cpu")).name == "reference"
    monkeypatch.setenv("REGKERN_BACKEND", "cpp")
    assert backend.choose_backend(torch.device("cpu")).name == "cpp"
    assert backend.choose_backend(torch.device("cpu"), "reference").name == "reference"  # the argument wins
    with pytest.raises(ValueError, match="CPU tensors only"):
        backend.choose_backend(torch.device("meta"), "cpp")


def test_default_backends_by_device(monkeypatch):
    monkeypatch.delenv("REGKERN_BACKEND", raising=False)
    assert backend.choose_backend(torch.device("cpu")).name == "cpp"


def test_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("REGKERN_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_warned_fallbacks", set())
    with pytest.warns(UserWarning, match="pure-torch reference"):
        assert backend.choose_backend(torch.device("meta")).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.choose_backend(torch.device("meta")).name == "reference"


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_state_and_storage_changes_between_steps_take_effect(backend_name):
    """The cached step plan follows in-place writes, new state tensors, new
    parameter storage and gradients that come and go."""
    params = make_params(shapes=[(6, 4), (6,), (3, 5)])
    expected = twin(params)
    opt = regkern.SGD([{"params": params, "regularizer": regkern.RowL2()}], lr=0.1, momentum=0.9,
                      backend=backend_name)
    ref = regkern.SGD([{"params": expected, "regularizer": regkern.RowL2()}], lr=0.1, momentum=0.9,
                      backend="reference")
    changes = {
        2: lambda o, ps: o.state[ps[0]]["lam"].fill_(0.5),                       # in place
        4: lambda o, ps: o.state[ps[2]].__setitem__("mask", torch.tensor([True, False, True])),
        6: lambda o, ps: setattr(ps[1], "data", ps[1].detach() * 2),             # new storage
        8: lambda o, ps: o.state[ps[0]].__setitem__("lam", torch.full((6,), -0.2)),
    }
    for t in range(10):
        for o, ps in ((opt, params), (ref, expected)):
            if t in changes:
                changes[t](o, ps)
            fake_grads(ps, t)
            if t == 5:
                ps[1].grad = None
            o.step()
    assert_params_close(params, expected)
    assert not params[2][1].any()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_non_contiguous_gradient_is_stepped_correctly(backend_name):
    params = make_params(shapes=[(4, 6)])
    expected = twin(params)
    opt = regkern.SGD(params, lr=0.1, momentum=0.9, backend=backend_name)
    ref = torch.optim.SGD(expected, lr=0.1, momentum=0.9)
    for t in range(3):
        grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(t)).t()
        params[0].grad, expected[0].grad = grad, grad.clone()
        opt.step()
        ref.step()
    assert not params[0].grad.is_contiguous()
    assert_params_close(params, expected)
