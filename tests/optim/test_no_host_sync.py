"""A steady-state step on the Triton backend reads nothing back from the device.

On a GPU every read of a device tensor's value by the host (``.item()``,
``bool()``, ``float()``, ``.tolist()``, ``.cpu()``...) waits for the device.
Here the Triton kernels run in the interpreter on CPU tensors, so the test
records those reads instead: every tensor that would live on the GPU
(parameters, gradients, optimizer state, GradScaler's ``found_inf`` and
``grad_scale``) is watched, and a read of one outside a kernel's own
execution fails the test. GradScaler's overflow flag is then honoured by the
kernels, on the device."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import regkern

pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    """Records host reads of the watched tensors (outside kernel execution),
    known by their storage: views of them (a state vector's row) count too."""

    def __init__(self, watched):
        super().__init__()
        self.watch(watched)
        self.reads = []
        self.in_kernel = 0

    def watch(self, tensors):
        """Watch these live tensors (and no others: a freed storage may be reused by a temporary)."""
        self.storages = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (not self.in_kernel and func in READS and args and isinstance(args[0], torch.Tensor)
                and args[0].numel() and args[0].untyped_storage().data_ptr() in self.storages):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def recorder(monkeypatch):
    """A factory of HostReads modes that pause while the interpreter runs a kernel."""
    modes = []
    run = interpreter.InterpretedFunction.run

    def paused_run(self, *args, **kwargs):
        for mode in modes:
            mode.in_kernel += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            for mode in modes:
                mode.in_kernel -= 1
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", paused_run)

    def make(watched):
        modes.append(HostReads(watched))
        return modes[-1]
    return make


def _model_and_optimizer(family):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(4, 3, 2)),
              torch.nn.Parameter(torch.randn(6))]
    if family == "sgd":
        opt = regkern.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, regularizer=regkern.RowL2(),
                          backend="triton")
    else:
        opt = regkern.AdamW(params, lr=0.01, weight_decay=1e-2, regularizer=regkern.RowL2(),
                            coupling="decoupled" if family == "adamw" else "coupled", backend="triton")
    for p in params[:2]:
        opt.state[p]["lam"].fill_(0.1)
        opt.state[p]["mask"] = torch.ones(p.shape[0], dtype=torch.bool)
    return params, opt


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("family", ["sgd", "adam", "adamw"])
def test_steady_state_step_reads_nothing_from_the_device(family, recorder):
    params, opt = _model_and_optimizer(family)
    grad_scale, found_inf = torch.tensor(2.0), torch.tensor(0.0)
    opt.grad_scale, opt.found_inf = grad_scale, found_inf  # as GradScaler hands them to the step
    for t in range(2):  # the first steps build plans and create state
        _grads(params, t)
        opt.step()
    device_tensors = params + [grad_scale, found_inf] + [
        v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    reads = recorder(device_tensors)
    with reads:
        for t in range(2, 4):
            _grads(params, t)  # new gradient tensors, as after zero_grad(set_to_none=True)
            reads.watch(device_tensors + [p.grad for p in params])
            opt.step()
    assert reads.reads == [], f"the step read device tensors on the host: {reads.reads}"


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_an_overflow_step_is_skipped_by_the_kernels(family, recorder):
    params, opt = _model_and_optimizer(family)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    for t in range(2):
        _grads(params, t)
        opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                    for i, p in enumerate(params)}
    opt.found_inf.fill_(1.0)  # GradScaler found inf or NaN in the gradients
    _grads(params, 9)
    params[0].grad[0, 0] = float("inf")
    reads = recorder([opt.found_inf])
    with reads:
        opt.step()
    assert reads.reads == []
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for i, p in enumerate(params):
        for key, value in state_before[i].items():
            assert torch.equal(opt.state[p][key], value), f"state[{key!r}] of parameter {i} changed"
    opt.found_inf.fill_(0.0)
    opt.step()  # the next clean step steps
    assert not torch.equal(params[1], before[1])


def test_first_momentum_step_reads_the_overflow_flag_on_the_host():
    """The first step creates momentum buffers that only a taken step fills:
    the host reads found_inf then (one wait), so a skipped first step leaves no buffer behind."""
    params, opt = _model_and_optimizer("sgd")
    _grads(params, 0)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all("momentum_buffer" not in opt.state[p] for p in params)


def test_device_tables_are_sent_only_when_they_change(monkeypatch):
    """A launch's table goes to the device once; later steps send it again
    (from pinned memory, without waiting) only when a patch changed it."""
    from regkern.backends.backend import TritonBackend
    from regkern.backends.dispatch import _Launch
    backend = TritonBackend(torch.device("meta"))  # a device that is not the host
    launch = _Launch(torch.float32, None, torch.arange(12).reshape(3, 4))
    sent = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: sent.append(self.clone()) or self)
    first = backend.device_table(launch)
    assert first.device.type == "meta" and first.shape == (3, 4)
    assert backend.device_table(launch) is first and sent == []  # unchanged: nothing sent
    launch.columns[1, 2] = 99  # a step patches a gradient address
    assert backend.device_table(launch) is first and len(sent) == 1 and sent[0][1, 2] == 99
    assert backend.device_table(launch) is first and len(sent) == 1


def test_a_group_without_gradients_does_not_bring_host_reads_back(recorder):
    params, opt = _model_and_optimizer("sgd")
    frozen = torch.nn.Parameter(torch.randn(3, 3))  # never gets a gradient
    opt.add_param_group({"params": [frozen]})
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    for t in range(2):
        _grads(params, t)
        opt.step()
    reads = recorder([opt.found_inf])
    with reads:
        _grads(params, 2)
        opt.step()
    assert reads.reads == []


def test_adam_first_step_reads_the_overflow_flag_on_the_host():
    """New moments are saved only after a step taken, as on the host-read path."""
    params, opt = _model_and_optimizer("adam")
    _grads(params, 0)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    assert all("exp_avg" not in opt.state[p] and "step" not in opt.state[p] for p in params)


def test_row_norms_stay_stale_after_a_step_the_kernels_may_have_skipped():
    """Row norms written before an in-place edit of the weights do not become
    current through a step the kernels skipped, though the host never read its overflow flag."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = regkern.SGD([w], lr=0.05, momentum=0.9, regularizer=regkern.RowL2(track_norms=True), backend="triton")
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    for t in range(2):
        _grads([w], t)
        opt.step()
    assert opt.current_row_norms(w) is not None
    with torch.no_grad():
        w[0].zero_()  # the norms no longer describe W
    assert opt.current_row_norms(w) is None
    opt.found_inf.fill_(1.0)
    _grads([w], 5)
    opt.step()  # skipped on the device
    assert opt.current_row_norms(w) is None
    opt.found_inf.fill_(0.0)
    opt.step()  # taken: it wrote the norms (known from found_inf when the norms are asked for)
    torch.testing.assert_close(opt.current_row_norms(w)[:, 1], w.detach().norm(dim=1))


def test_an_overflow_step_with_a_polarization_hook_changes_no_state():
    torch.manual_seed(0)
    scales = [torch.nn.Parameter(torch.rand(8)), torch.nn.Parameter(torch.rand(4))]
    opt = regkern.SGD(scales, lr=0.1, momentum=0.9, regularizer=regkern.Polarization(lam=1e-3), backend="triton")
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    for t in range(2):
        _grads(scales, t)
        opt.step()
    with torch.no_grad():
        scales[0][0] = 0.9  # moves the set mean the hook computes
    state = {i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
             for i, p in enumerate(scales)}
    opt.found_inf.fill_(1.0)
    _grads(scales, 3)
    opt.step()
    for i, p in enumerate(scales):
        for key, value in state[i].items():
            assert torch.equal(opt.state[p][key], value), f"state[{key!r}] changed on an overflow step"
