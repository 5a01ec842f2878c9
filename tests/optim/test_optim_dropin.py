"""regkern's optimizers behave as torch.optim's in what a user touches:
state, checkpoints of older torch versions, hooks, tensor lr shapes, the
regularizer argument, layouts, and bad options refused at every step."""
import copy
import math
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import regkern
from regkern import reference
from optim_helpers import CPU_BACKENDS, assert_params_close, assert_unchanged, fake_grads, make_params, snapshot, twin

pytestmark = pytest.mark.usefixtures("one_thread")


def test_state_takes_any_key_and_value_as_torch_does():
    params = make_params(shapes=[(4, 3)])
    opt = regkern.SGD([{"params": params, "regularizer": regkern.RowL2()}], lr=0.1, momentum=0.9)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("count", o.state.get("count", 0) + 1))
    saved = opt.state_dict()
    assert saved["state"]["count"] == 1
    fake_grads(params, 0)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.state["count"] == 2
    fake_grads(params, 1)
    opt.step()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_a_momentum_free_step_keeps_state_as_torch_does(backend_name):
    params = make_params(shapes=[(4, 3), (5,)])
    expected = twin(params)
    opt = regkern.SGD(params, lr=0.1, backend=backend_name)
    ref = torch.optim.SGD(expected, lr=0.1)
    for o, ps in ((opt, params), (ref, expected)):
        fake_grads(ps, 0)
        o.step()
    assert opt.state_dict()["state"] == ref.state_dict()["state"] == {}


def test_an_older_torch_checkpoint_loads_and_steps():
    params = make_params(shapes=[(4, 3), (5,)])
    expected = twin(params)
    ref = torch.optim.SGD(expected, lr=0.1, momentum=0.9, weight_decay=1e-3)
    fake_grads(expected, 0)
    ref.step()
    old = copy.deepcopy(ref.state_dict())
    for group in old["param_groups"]:  # what torch 1.x saved: none of the newer options
        for key in ("nesterov", "maximize", "foreach", "differentiable", "fused"):
            group.pop(key)
    opt = regkern.SGD(params, lr=0.5)
    with torch.no_grad():
        for p, e in zip(params, expected):
            p.copy_(e)
    opt.load_state_dict(old)
    group = opt.param_groups[0]
    assert (group["nesterov"], group["maximize"], group["foreach"], group["differentiable"], group["fused"],
            group["regularizer"]) == (False, False, None, False, False, None)
    for o, ps in ((opt, params), (ref, expected)):  # ref goes on with its own state
        fake_grads(ps, 1)
        o.step()
    assert_params_close(params, expected)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_lr_of_any_one_element_shape(backend_name, dtype):
    if dtype == torch.float64 and backend_name != "cpp":
        pytest.skip("float64 takes the reference path on every backend: covered once")
    params = make_params(dtype=dtype, shapes=[(4, 3), (5,), ()])
    expected = twin(params)
    opt = regkern.SGD(params, lr=torch.full((1, 1), 0.1, dtype=torch.float64), momentum=0.9, backend=backend_name)
    ref = torch.optim.SGD(expected, lr=torch.full((1, 1), 0.1, dtype=torch.float64), momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float64: the reference path says so
        for t in range(3):
            for o, ps in ((opt, params), (ref, expected)):
                fake_grads(ps, t)
                o.step()
    assert [p.shape for p in params] == [e.shape for e in expected]
    assert_params_close(params, expected, dtype)


def test_regularizer_is_a_constructor_argument():
    params = make_params(shapes=[(4, 3), (6, 2)])
    opt = regkern.SGD([{"params": params[:1]}, {"params": params[1:], "regularizer": None}],
                      lr=0.1, regularizer=regkern.RowL2(track_norms=True))
    assert opt.defaults["regularizer"] == regkern.RowL2(track_norms=True)
    assert opt.param_groups[0]["regularizer"] == regkern.RowL2(track_norms=True)
    assert "lam" in opt.state[params[0]] and params[1] not in opt.state
    with pytest.raises(TypeError, match="regularizer"):
        regkern.SGD(params, lr=0.1, regularizer="l2")


def _hook_log(opt):
    log = []
    opt.register_step_pre_hook(lambda o, args, kwargs: log.append("step pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: log.append("step post"))
    opt.register_state_dict_pre_hook(lambda o: log.append("save pre"))

    def save_post(o, saved):
        log.append("save post")
        saved["extra"] = [g.get("regularizer") for g in saved["param_groups"]]
        return saved
    opt.register_state_dict_post_hook(save_post)

    def load_pre(o, saved):
        log.append("load pre")
        saved = dict(saved)
        saved.pop("extra")
        return saved
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: log.append("load post"))
    return log


def test_hooks_run_where_torch_runs_them():
    params = make_params(shapes=[(4, 3)])
    opt = regkern.SGD([{"params": params, "regularizer": regkern.RowL2()}], lr=0.1, momentum=0.9)
    log = _hook_log(opt)
    fake_grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    # the post-hook sees the final, plain form: the regularizer as a dict
    assert saved["extra"] == [{"kind": "row_l2", "track_norms": False, "columns": False}]
    opt.load_state_dict(saved)
    assert log == ["step pre", "step post", "save pre", "save post", "load pre", "load post"]
    # the same order as torch's own optimizer
    ref = torch.optim.SGD(twin(params), lr=0.1, momentum=0.9)
    ref_log = _hook_log(ref)
    fake_grads(ref.param_groups[0]["params"], 0)
    ref.step()
    ref.load_state_dict(ref.state_dict())
    assert ref_log == log


@pytest.mark.parametrize("make", [
    lambda ps: regkern.RDA(ps, lr=0.1, lam=1e-3),
    lambda ps: regkern.SASADMM(ps),
])
def test_hooks_of_the_other_optimizers(make):
    params = make_params(shapes=[(4, 3)])
    opt = make(params)
    log = _hook_log(opt)
    fake_grads(params, 0)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert log == ["step pre", "step post", "save pre", "save post", "load pre", "load post"]


def _step_hooks(opt, log):
    """Step hooks of every kind; the instance pre-hook swaps in a closure that logs."""
    def pre(o, args, kwargs):
        log.append("pre")
        return args[:1], {"closure": lambda: log.append("closure") or 1.5}
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: log.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: log.append("global post")),
               opt.register_step_pre_hook(pre),
               opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", sorted(kwargs))))]
    return handles


@pytest.mark.parametrize("subclass", [False, True])
def test_step_hooks_run_once_as_in_torch(subclass):
    """regkern runs torch's step hooks itself (no profiler range unless a
    profiler records); a subclass with its own step is wrapped by torch, and
    the hooks still run once (torch runs them twice for a subclass of its
    SGD once a plain SGD exists: its SGD.step is then wrapped too)."""
    class Mine(regkern.SGD):
        def step(self, closure=None):
            log.append("mine")
            return super().step(closure)
    logs = []
    for make in (Mine if subclass else regkern.SGD, torch.optim.SGD):
        log = []
        params = make_params(shapes=[(4, 3)])
        opt = make(params, lr=0.1)
        handles = _step_hooks(opt, log)
        try:
            fake_grads(params, 0)
            assert opt.step() == 1.5
        finally:
            for handle in handles:
                handle.remove()
        logs.append(log)
    expected = ["global pre", "pre", "mine", "closure", ("post", ["closure"]), "global post"]
    assert logs[0] == (expected if subclass else logs[1])
    assert logs[1] == [e for e in expected if e != "mine"]


def test_a_profiler_sees_the_step():
    params = make_params(shapes=[(4, 3)])
    opt = regkern.SGD(params, lr=0.1)
    fake_grads(params, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#SGD.step" in {e.name for e in prof.events()}


@pytest.mark.parametrize("backend_name", ["cpp", "triton"] if "triton" in CPU_BACKENDS else ["cpp"])
def test_channels_last_weights_take_the_fast_kernels(backend_name, monkeypatch):
    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(6, 4, 3, 3)), torch.nn.Parameter(torch.randn(6))]
    last = [torch.nn.Parameter(dense[0].detach().to(memory_format=torch.channels_last)),
            torch.nn.Parameter(dense[1].detach().clone())]
    assert not last[0].is_contiguous()
    opts = [regkern.SGD([{"params": ps, "regularizer": [regkern.RowL2(track_norms=True), regkern.ProxL1(1e-2)]}],
                        lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend_name) for ps in (dense, last)]
    for opt, ps in zip(opts, (dense, last)):
        opt.state[ps[0]]["lam"].copy_(torch.linspace(0, 0.5, 6))
        opt.state[ps[0]]["mask"] = torch.tensor([True, True, False, True, True, True])

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference was used")
    monkeypatch.setattr(reference, "sgd_step", no_reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        for t in range(4):
            for opt, ps in zip(opts, (dense, last)):
                fake_grads(ps, t)
                if ps is last:
                    ps[0].grad = ps[0].grad.contiguous(memory_format=torch.channels_last)
                opt.step()
    assert last[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(dense, last):
        assert torch.equal(a.detach(), b.detach())
    # row sums are taken in memory order: the same numbers, summed in another order
    torch.testing.assert_close(opts[0].state[dense[0]]["row_norms"], opts[1].state[last[0]]["row_norms"],
                               rtol=1e-6, atol=0)
    assert torch.equal(opts[0].state[dense[0]]["momentum_buffer"], opts[1].state[last[0]]["momentum_buffer"])


def test_a_channels_last_weight_with_a_contiguous_gradient_is_still_right():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(5, 3, 2, 2).to(memory_format=torch.channels_last))
    expected = twin([w])
    opt = regkern.SGD([w], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(expected, lr=0.1, momentum=0.9)
    for t in range(3):
        fake_grads([w], t)
        w.grad = w.grad.contiguous()
        fake_grads(expected, t)
        opt.step()
        ref.step()
    assert_params_close([w], expected)


def test_a_slower_path_warns_once_naming_the_parameter():
    model = torch.nn.Linear(3, 4).double()
    opt = regkern.SGD(model.named_parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"parameter 'weight' is stepped by the pure-torch reference .*float64"):
        model(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    transposed = torch.nn.Parameter(torch.randn(6, 4).t())
    opt = regkern.SGD([{"params": [transposed], "regularizer": regkern.RowL2()}], lr=0.1)
    transposed.grad = torch.ones(4, 6)
    with pytest.warns(UserWarning, match=r"parameter 0 of param group 0 \(float32 \(4, 6\)\).*rows W\[r\] are not whole blocks"):
        opt.step()


BAD_OPTIONS = [("lr", math.nan, "learning rate"), ("lr", math.inf, "learning rate"), ("lr", -0.1, "learning rate"),
               ("momentum", math.nan, "momentum"), ("momentum", -0.5, "momentum"),
               ("weight_decay", math.inf, "weight_decay"), ("weight_decay", -1.0, "weight_decay"),
               ("dampening", math.nan, "dampening"), ("dampening", -1.0, "dampening"),
               ("lr", torch.tensor([0.1, 0.2]), "1-element")]


@pytest.mark.parametrize("key,value,match", BAD_OPTIONS, ids=[f"{k}={v}" for k, v, _ in BAD_OPTIONS])
def test_bad_options_are_refused_at_construction(key, value, match):
    with pytest.raises(ValueError, match=match):
        regkern.SGD(make_params(shapes=[(3,)]), **{"lr": 0.1, key: value})


@pytest.mark.parametrize("key,value,match", BAD_OPTIONS, ids=[f"{k}={v}" for k, v, _ in BAD_OPTIONS])
def test_bad_options_set_later_are_refused_at_the_step_and_change_nothing(key, value, match):
    params = make_params(shapes=[(4, 3), (5,)])
    opt = regkern.SGD([{"params": params[:1], "regularizer": regkern.RowL2()}, {"params": params[1:]}],
                      lr=0.1, momentum=0.9)
    for t in range(2):
        fake_grads(params, t)
        opt.step()
    opt.param_groups[1][key] = value  # by hand or by a scheduler; the first group is fine
    fake_grads(params, 2)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"{match}.*param group 1"):
        opt.step()
    assert_unchanged(before, opt, params)


def test_a_scheduler_that_makes_lr_nan_is_caught():
    params = make_params(shapes=[(3,)])
    opt = regkern.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: math.nan if epoch >= 2 else 1.0)
    for t in range(2):
        fake_grads(params, t)
        opt.step()
        scheduler.step()
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()


@pytest.mark.parametrize("make,bad_group", [
    (lambda ps: regkern.SGD(ps[:1], lr=0.1), {"lr": math.nan}),
    (lambda ps: regkern.SGD(ps[:1], lr=0.1), {"regularizer": "l1"}),
    (lambda ps: regkern.SGD(ps[:1], lr=0.1), {"momentum": -1.0}),
    (lambda ps: regkern.RDA(ps[:1], lr=0.1), {"lam": math.inf}),
    (lambda ps: regkern.RDA(ps[:1], lr=0.1), {"group": "rows"}),
    (lambda ps: regkern.SASADMM(ps[:1]), {"beta": -1.0}),
], ids=["sgd-lr", "sgd-regularizer", "sgd-momentum", "rda-lam", "rda-group", "sasadmm-beta"])
def test_add_param_group_is_atomic(make, bad_group):
    params = make_params(shapes=[(4, 3), (5,)])
    opt = make(params)
    groups_before = len(opt.param_groups)
    with pytest.raises((ValueError, TypeError)):
        opt.add_param_group({"params": params[1:], **bad_group})
    assert len(opt.param_groups) == groups_before and params[1] not in opt.state
    fake_grads(params, 0)
    opt.step()  # later steps are not broken by a half-added group


def test_a_refused_group_creates_no_state():
    params = make_params(shapes=[(4, 3), (5,)])
    opt = regkern.SGD(params[:1], lr=0.1)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": params[1:], "regularizer": regkern.RowL2(), "lr": -1.0})
    assert params[1] not in opt.state


def test_row_norms_describe_the_current_weights_only():
    params = make_params(shapes=[(4, 3), (5,)])
    model_like = {"w": params[0]}
    opt = regkern.SGD([{"params": params, "regularizer": regkern.RowL2(track_norms=True)}], lr=0.1)
    assert opt.current_row_norms(params[0]) is None  # never stepped
    fake_grads(params, 0)
    opt.step()
    assert opt.current_row_norms(params[0]) is opt.state[params[0]]["row_norms"]
    with torch.no_grad():
        model_like["w"][1].mul_(3)  # an in-place edit
    assert opt.current_row_norms(params[0]) is None
    assert opt.current_row_norms(params[1]) is not None
    fake_grads(params, 1)
    opt.step()
    assert opt.current_row_norms(params[0]) is not None
    with torch.no_grad():
        params[1].copy_(torch.zeros(5))  # what model.load_state_dict does
    assert opt.current_row_norms(params[1]) is None


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_a_group_regularizer_changed_between_steps_takes_effect(backend_name):
    params = make_params(shapes=[(4, 3)])
    opt = regkern.SGD([{"params": params, "regularizer": regkern.Clamp(-0.01, 0.01)}], lr=0.1, backend=backend_name)
    fake_grads(params, 0)
    opt.step()
    assert params[0].abs().max() <= 0.01
    opt.param_groups[0]["regularizer"] = None  # as a schedule does after its cut
    fake_grads(params, 1)
    opt.step()
    assert params[0].abs().max() > 0.01


def test_sasadmm_steps_under_a_gradscaler_on_the_unscaled_gradient():
    torch.manual_seed(0)
    params = make_params(shapes=[(4, 3), (5,)])
    expected = twin(params)
    opt, ref = regkern.SASADMM(params, M=2, k0=2), regkern.SASADMM(expected, M=2, k0=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(5)
    for t in range(5):
        for ps in (params, expected):
            for p in ps:
                p.grad = None
        loss = (params[0].sum(1) @ torch.randn(4, generator=torch.Generator().manual_seed(t)) + params[1] @ x) ** 2
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        (((expected[0].sum(1) @ torch.randn(4, generator=torch.Generator().manual_seed(t))) + expected[1] @ x) ** 2).backward()
        ref.step()
    assert_params_close(params, expected)


NON_FINITE = [("lam", 2, math.nan), ("lam", 0, math.inf), ("lam_cols", 1, -math.inf), ("l1", 3, math.nan),
              ("prox_lam", 0, math.nan)]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("key,row,value", NON_FINITE, ids=[f"{k}-{v}" for k, _, v in NON_FINITE])
def test_non_finite_coefficients_are_refused_before_any_group_is_written(backend_name, key, row, value):
    params = make_params(shapes=[(5,), (6, 4), (6,)])
    regs = [regkern.RowL2(columns=True), regkern.L1(1e-3), regkern.ProxL1(1e-3)]
    # the first group steps before the broken one: it must not be written either
    opt = regkern.SGD([{"params": params[:1]}, {"params": params[1:2], "regularizer": regs}, {"params": params[2:]}],
                      lr=0.1, momentum=0.9, backend=backend_name)
    for t in range(2):
        fake_grads(params, t)
        opt.step()
    opt.state[params[1]][key][row] = value  # in place, as a schedule writes
    fake_grads(params, 2)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"non-finite value in state\['{key}'\]"):
        opt.step()
    assert_unchanged(before, opt, params)
    opt.state[params[1]][key][row] = 0.0  # mended: the next step goes through
    opt.step()


def test_non_finite_coefficients_on_the_torch_path_are_refused():
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    opt = regkern.SGD([{"params": [p], "regularizer": regkern.RowL2()}], lr=0.1)
    opt.state[p]["lam"][1] = math.nan
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"non-finite value in state\['lam'\]"):
        opt.step()
    assert torch.equal(before, p.detach())


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: regkern.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: regkern.RDA(ps, lr=0.1), lambda ps: regkern.SASADMM(ps)],
                         ids=["torch", "sgd", "rda", "sasadmm"])
def test_a_backward_through_weights_the_step_changed_is_refused_as_torch_does(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))  # layer 2 saves its weight
    opt = make(list(model.parameters()))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    loss = model(torch.randn(4, 3)).square().sum()
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_parameter_reshaped_on_the_same_storage_gets_a_new_plan():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = regkern.SGD([{"params": [w], "regularizer": regkern.RowL2()}], lr=0.1)
    w.grad = torch.ones(4, 3)
    opt.step()
    w.data = w.data.view(3, 4)  # same storage, another shape: the old lam no longer fits
    w.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="lambda"):
        opt.step()


def test_a_refused_load_state_dict_changes_nothing():
    params = make_params(shapes=[(4, 3)])
    opt = regkern.SGD(params, lr=0.1, momentum=0.9)
    fake_grads(params, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = math.nan
    saved["state"][0]["momentum_buffer"].fill_(7.0)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="learning rate"):
        opt.load_state_dict(saved)
    assert_unchanged(before, opt, params)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_a_regularizer_set_on_a_group_by_hand_gets_its_state(backend_name):
    params = make_params(shapes=[(4, 3)])
    opt = regkern.SGD(params, lr=0.1, backend=backend_name)
    fake_grads(params, 0)
    opt.step()
    opt.param_groups[0]["regularizer"] = regkern.ProxL1(10.0)  # threshold lr * lam = 1: most weights go to 0
    fake_grads(params, 1)
    opt.step()
    assert "prox_lam" in opt.state[params[0]] and (params[0] == 0).float().mean() > 0.5


@pytest.mark.parametrize("backend_name", [b for b in CPU_BACKENDS if b != "triton"])
def test_a_non_finite_coefficient_written_through_data_is_refused(backend_name):
    params = make_params(shapes=[(5,), (6, 4)])
    opt = regkern.SGD([{"params": params[:1]}, {"params": params[1:], "regularizer": regkern.RowL2()}],
                      lr=0.1, momentum=0.9, backend=backend_name)
    fake_grads(params, 0)
    opt.step()
    opt.state[params[1]]["lam"].data[3] = math.nan  # no version counter sees this write
    fake_grads(params, 1)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"non-finite value in state\['lam'\]"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("make", [lambda ps: regkern.RDA(ps, lr=0.1), lambda ps: regkern.SASADMM(ps)],
                         ids=["rda", "sasadmm"])
def test_the_other_optimizers_name_a_parameter_on_a_slower_path(make):
    model = torch.nn.Linear(3, 4).double()
    opt = make(model.named_parameters())
    model(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    with pytest.warns(UserWarning, match=r"parameter 'weight' is stepped by the pure-torch reference .*float64"):
        opt.step()
