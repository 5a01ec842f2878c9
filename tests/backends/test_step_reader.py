"""The C++ step reader (regkern.backends.step_reader): steady steps are read
in C++, every change of the group, the storage or the gradients hands the
step back to Python, and a run gives bit for bit what the Python path gives,
errors included."""
import dataclasses
import gc
import inspect
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch

import regkern
from regkern.backends import step_reader
from regkern.backends.dispatch import GRADS_IN_TABLES
from regkern.regularizers import Regularizer
from optim_helpers import fake_grads, make_params

OPTIMIZERS = {
    "sgd": lambda groups: regkern.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda groups: regkern.AdamW(groups, lr=0.01),
    "rda": lambda groups: regkern.RDA(groups, lr=0.1, lam=1e-3),
    "sas_admm": lambda groups: regkern.SASADMM(groups),
}


def _groups(params, family):
    regularizer = {"regularizer": regkern.RowL2(track_norms=True)} if family in ("sgd", "adamw") else {}
    return [{"params": params[:4], **regularizer}, {"params": params[4:]}]


def _stepped_sgd(steps=3):
    """An SGD past its first steps (its plans carry readers), and its parameters."""
    params = make_params()
    opt = OPTIMIZERS["sgd"](_groups(params, "sgd"))
    for t in range(steps):
        fake_grads(params, t)
        opt.step()
    return opt, params


def test_steady_steps_are_read_in_cpp():
    opt, params = _stepped_sgd()
    fake_grads(params, 3)
    for index, group in enumerate(opt.param_groups):
        cached, grads = opt._prepare(index, group)
        assert cached.reader is not None and grads is GRADS_IN_TABLES


def _scenario(family):
    """Steps through every change the reader must notice; returns the
    parameters after each step and the error of each refused step."""
    params = make_params(seed=3)
    opt = OPTIMIZERS[family](_groups(params, family))
    record = []
    for t in range(9):
        fake_grads(params, t)
        if t == 2:
            params[1].grad = None  # not stepped this time
        if t == 3:  # a gradient laid out unlike its parameter (copied)
            g = params[0].grad
            params[0].grad = torch.empty_strided(g.shape, tuple(reversed(g.stride()))).copy_(g)
        if t == 4:
            params[3].data = params[3].data.clone()  # new storage
        if t == 5:
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 2))]})
        if t >= 5:
            opt.param_groups[-1]["params"][0].grad = torch.full((3, 2), 0.5 + t)
        if t == 7:
            params[2].grad.data = params[2].grad.data.double()  # a gradient that cannot be stepped
        versions = [p._version for p in params]
        try:
            opt.step()
            error = None
        except ValueError as err:
            error = str(err)
        stepped = [p.grad is not None and error is None for p in params]
        assert [p._version for p in params] == [v + s for v, s in zip(versions, stepped)]
        record.append((error, [p.detach().clone() for g in opt.param_groups for p in g["params"]]))
    return record


@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
def test_a_run_is_what_the_python_path_gives(family, monkeypatch):
    read = _scenario(family)
    monkeypatch.setenv("REGKERN_STEP_READER", "0")
    python = _scenario(family)
    assert [e for e, _ in read] == [e for e, _ in python]
    assert sum(e is not None for e, _ in read) == 1
    for (_, a), (_, b) in zip(read, python):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_step_read_in_cpp_advances_versions_for_autograd():
    opt, params = _stepped_sgd()
    saved = (params[0] ** 2).sum()  # saves W for its backward
    fake_grads(params, 3)
    opt.step()
    assert opt._plans[0].reader is not None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_a_reader_that_cannot_be_built_warns_once_and_python_steps(monkeypatch):
    def no_compiler():
        raise RuntimeError("c++: command not found")
    monkeypatch.setattr(step_reader, "_module", None)
    monkeypatch.setattr(step_reader, "_failed", None)
    monkeypatch.setattr(step_reader, "_build", no_compiler)
    params = make_params()
    opt = OPTIMIZERS["sgd"](_groups(params, "sgd"))
    with pytest.warns(UserWarning, match=r"step reader could not be built \(RuntimeError: c\+\+: command not found\)"):
        for t in range(3):
            fake_grads(params, t)
            opt.step()
    assert all(cached.reader is None for cached in opt._plans.values())
    other = OPTIMIZERS["adamw"](_groups(make_params(), "adamw"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(2):
            fake_grads(other.param_groups[0]["params"] + other.param_groups[1]["params"], t)
            other.step()


def test_a_built_reader_is_loaded_without_a_build_step():
    assert step_reader.load() is not None  # built here if it was not
    code = "import regkern.backends.step_reader as r, sys; sys.exit(r.load() is None)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert "building" not in done.stderr


@dataclasses.dataclass(frozen=True)
class _ClipOutOfPlace(Regularizer):
    """A regularizer whose per-step hook replaces each gradient after the
    step has read them: the step still uses the gradients it read."""
    kind = "clip_out_of_place"

    def before_step(self, params, states):
        for p in params:
            p.grad = p.grad.clamp(-1.0, 1.0)  # the gradient read by the step has no other reference now


@pytest.mark.parametrize("reader", ["1", "0"])
def test_gradients_replaced_after_the_read_stay_alive_for_the_kernels(reader, monkeypatch):
    monkeypatch.setenv("REGKERN_STEP_READER", reader)
    params = [torch.nn.Parameter(torch.zeros(1024, 1024)) for _ in range(2)]  # 4 MB: freed memory is unmapped
    opt = regkern.SGD([{"params": params, "regularizer": _ClipOutOfPlace()}], lr=1.0)
    for t in range(4):
        for p in params:
            p.grad = torch.full_like(p, 5.0)
        before = [p.detach().clone() for p in params]
        opt.step()
        assert all(torch.equal(b - p.detach(), torch.full_like(p, 5.0)) for b, p in zip(before, params))
    assert (opt._plans[0].reader is not None) == (reader == "1")


def test_an_optimizer_in_a_cycle_with_its_parameters_is_collected():
    def run():
        model = torch.nn.Linear(8, 8)
        opt = regkern.SGD(model.parameters(), lr=0.1)
        model.weight.owner = opt  # a cycle: parameter -> optimizer -> plan -> reader -> parameter
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        assert opt._plans[0].reader is not None
        return weakref.ref(model.weight), weakref.ref(opt)
    param, opt = run()
    gc.collect()
    assert param() is None and opt() is None


def test_a_group_that_is_no_longer_a_list_takes_the_python_path():
    opt, params = _stepped_sgd()
    opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])
    before = [p.detach().clone() for p in params]
    fake_grads(params, 3)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


def test_the_step_keeps_torchs_signature():
    ours = inspect.signature(OPTIMIZERS["sgd"](make_params()).step).parameters
    torchs = inspect.signature(torch.optim.SGD(make_params(), lr=0.1).step).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in torchs.values()]


def test_builds_are_kept_apart_by_python_and_torch():
    name = step_reader._name()
    assert name.startswith(f"regkern_step_reader_{sys.implementation.cache_tag.replace('-', '_')}_")
    assert name.isidentifier()


def test_a_broken_library_is_rebuilt_once_by_concurrent_first_uses(tmp_path):
    """What a killed build may leave (a truncated library, a build folder) is
    built again, once for two processes starting together (the other waits
    on the lock and imports it), and lands in one rename (new processes:
    torch builds one name once per process)."""
    name = step_reader._name()
    (tmp_path / name / "build").mkdir(parents=True)
    (tmp_path / name / f"{name}.so").write_bytes(b"\x7fELF truncated")
    code = "import regkern.backends.step_reader as r; assert hasattr(r._build(), 'StepReader')"
    env = {**os.environ, "REGKERN_CACHE": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    errs = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errs
    assert sum("building the C++ step reader" in err for err in errs) == 1
    assert sorted(os.listdir(tmp_path / name)) == ["build.lock", f"{name}.so"]


@pytest.mark.parametrize("reader", ["1", "0"])
def test_an_inference_tensor_parameter_steps_alike_on_both_paths(reader, monkeypatch):
    """Version counters are advanced as torch.autograd.graph.increment_version
    does it: an inference tensor has none and is skipped, on both paths."""
    monkeypatch.setenv("REGKERN_STEP_READER", reader)
    with torch.inference_mode():
        p = torch.ones(4, 3)
    opt = regkern.SGD([p], lr=0.1, momentum=0.9)
    for t in range(3):
        p.grad = torch.full((4, 3), 0.5 + t)
        opt.step()
    assert torch.allclose(p, torch.full((4, 3), 1 - 0.1 * (0.5 + (1.5 + 0.9 * 0.5) + (2.5 + 0.9 * (1.5 + 0.9 * 0.5)))))


def test_a_reader_follows_a_group_that_gains_a_member_without_a_gradient():
    opt, params = _stepped_sgd()
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.randn(3)))  # no gradient: the plan still fits
    for t in range(3, 5):
        fake_grads(params, t)
        opt.step()
    fake_grads(params, 5)
    cached, grads = opt._prepare(0, opt.param_groups[0])
    assert grads is GRADS_IN_TABLES
