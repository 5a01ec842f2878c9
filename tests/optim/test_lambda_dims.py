"""Lambdas along other dimensions through regkern.SGD: ElementL2 (a lambda per
weight, ``state["lam"]`` of W's shape) and RowL2(columns=True) (a lambda per
column, ``state["lam_cols"]``, indexing dim 1), on every CPU backend."""
import io

import pytest
import torch

import regkern
from optim_helpers import CPU_BACKENDS, assert_params_close, assert_unchanged, fake_grads, make_params, snapshot, train, twin

SHAPES = [(6, 4, 3, 3), (6,), (5, 4), (3, 5, 2), (7,), (1, 1)]


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def penalty_reference(params, lams, lam_cols, steps, **sgd):
    """The penalty as the official codes add it: grad += lam * W (row lam
    broadcast over the row, element lam as is) + lam_cols * W (over dim 1),
    then torch.optim.SGD."""
    opt = torch.optim.SGD(params, foreach=True, **sgd)
    for t in range(steps):
        fake_grads(params, t)
        with torch.no_grad():
            for p, lam, cols in zip(params, lams, lam_cols):
                w = p.detach().float()
                extra = torch.zeros_like(w)
                if lam is not None:
                    extra += w * (lam if lam.shape == p.shape else lam.view((-1,) + (1,) * (p.dim() - 1)))
                if cols is not None:
                    extra += w * cols.view((1, -1) + (1,) * (p.dim() - 2))
                p.grad += extra.to(p.dtype)
        opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_and_column_lambdas_are_the_official_penalty(backend):
    params = make_params(shapes=SHAPES)
    expected = twin(params)
    opt = regkern.SGD([{"params": params[:3], "regularizer": regkern.RowL2(columns=True)},
                       {"params": params[3:], "regularizer": regkern.ElementL2()}],
                      lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
    lams, cols = [], []
    gen = torch.Generator().manual_seed(1)
    for i, p in enumerate(params):
        state = opt.state[p]
        lam = state["lam"]
        assert lam.dtype == torch.float32 and not lam.any()
        assert lam.shape == ((p.shape[0],) if i < 3 else p.shape)
        lam.uniform_(0, 0.5, generator=gen)
        lams.append(lam.clone())
        if i < 3 and p.dim() >= 2:
            assert state["lam_cols"].shape == (p.shape[1],) and state["lam_cols"].dtype == torch.float32
            state["lam_cols"].uniform_(0, 0.5, generator=gen)
            cols.append(state["lam_cols"].clone())
        else:
            assert "lam_cols" not in state  # vectors have no columns; ElementL2 makes none
            cols.append(None)
    no_cols = twin(params)
    train(opt, params, 6)
    penalty_reference(expected, lams, cols, 6, lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert_params_close(params, expected)
    penalty_reference(no_cols, lams, [None] * len(cols), 6, lr=0.1, momentum=0.9, weight_decay=1e-3)
    for i in range(3):  # the column lambdas act
        assert (params[i] - no_cols[i]).abs().max() > 1e-2 or cols[i] is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_dict_round_trip_keeps_lambdas(backend):
    def build(ps):
        opt = regkern.SGD([{"params": ps[:3], "regularizer": [regkern.RowL2(columns=True, track_norms=True)]},
                           {"params": ps[3:], "regularizer": regkern.ElementL2()}],
                          lr=0.05, momentum=0.9, backend=backend)
        for i, p in enumerate(ps):
            opt.state[p]["lam"].fill_(0.01 * (i + 1))
            if "lam_cols" in opt.state[p]:
                opt.state[p]["lam_cols"].copy_(torch.linspace(0.0, 0.3, p.shape[1]))
        return opt

    params = make_params(torch.bfloat16, shapes=SHAPES)
    resumed = twin(params)
    opt = build(params)
    train(opt, params, 4)
    saved_params = [p.detach().clone() for p in params]
    saved = roundtrip(opt.state_dict())
    assert saved["param_groups"][0]["regularizer"] == [{"kind": "row_l2", "track_norms": True, "columns": True}]
    assert saved["param_groups"][1]["regularizer"] == {"kind": "element_l2"}
    train(opt, params, 4, start=4)

    for p, s in zip(resumed, saved_params):
        p.data.copy_(s)
    opt2 = build(resumed)
    for p in resumed:  # must come back from the checkpoint
        opt2.state[p]["lam"].zero_()
        if "lam_cols" in opt2.state[p]:
            opt2.state[p]["lam_cols"].zero_()
    opt2.load_state_dict(saved)
    assert isinstance(opt2.param_groups[0]["regularizer"][0], regkern.RowL2)
    assert opt2.param_groups[0]["regularizer"][0].columns
    assert isinstance(opt2.param_groups[1]["regularizer"], regkern.ElementL2)
    for p, q in zip(params, resumed):
        for name in ("lam", "lam_cols"):
            if name in opt.state[p]:
                assert opt2.state[q][name].dtype == torch.float32  # not cast to the bf16 parameter
                assert torch.equal(opt2.state[q][name], opt.state[p][name])
    train(opt2, resumed, 4, start=4)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


BREAKERS = {
    "lam_cols too short": (0, "lam_cols", lambda p: torch.zeros(p.shape[1] - 1), "length 4"),
    "lam_cols too long": (2, "lam_cols", lambda p: torch.zeros(p.shape[1] + 3), "length 4"),
    "lam_cols dtype": (0, "lam_cols", lambda p: torch.zeros(p.shape[1], dtype=torch.float64), "float32"),
    "lam_cols device": (0, "lam_cols", lambda p: torch.zeros(p.shape[1], device="meta"), "on cpu"),
    "lam_cols on a vector": (1, "lam_cols", lambda p: torch.zeros(1), "2 dimensions"),
    "element lam shape": (3, "lam", lambda p: torch.zeros(p.shape[0], p.shape[1] + 1), r"\(3, 5, 2\)"),
    "element lam dtype": (3, "lam", lambda p: torch.zeros(p.shape, dtype=torch.bfloat16), "float32"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("what", sorted(BREAKERS))
def test_bad_lambdas_are_refused_and_change_nothing(backend, what):
    params = make_params(shapes=SHAPES)
    opt = regkern.SGD([{"params": params[:3], "regularizer": regkern.RowL2(columns=True)},
                       {"params": params[3:], "regularizer": regkern.ElementL2()}],
                      lr=0.1, momentum=0.9, backend=backend)
    for p in params:
        opt.state[p]["lam"].fill_(0.1)
    for t in range(2):  # momentum buffers exist and the plan is cached
        fake_grads(params, t)
        opt.step()
    fake_grads(params, 2)
    index, name, make, message = BREAKERS[what]
    opt.state[params[index]][name] = make(params[index])
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_unchanged(before, opt, params)


def test_dtensor_lambdas_are_laid_out_like_the_parameter():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(8, 4, 3, generator=gen), torch.randn(6, 5, generator=gen)]
        params = [torch.nn.Parameter(distribute_tensor(full[0].clone(), mesh, [Shard(0)])),
                  torch.nn.Parameter(distribute_tensor(full[1].clone(), mesh, [Shard(0)]))]
        plain = [torch.nn.Parameter(t.clone()) for t in full]
        opts = [regkern.SGD([{"params": ps[:1], "regularizer": regkern.RowL2(columns=True)},
                             {"params": ps[1:], "regularizer": regkern.ElementL2()}], lr=0.1, momentum=0.9)
                for ps in (params, plain)]
        cols = opts[0].state[params[0]]["lam_cols"]
        assert isinstance(cols, DTensor) and cols.placements == (Replicate(),) and cols.shape == (4,)
        element = opts[0].state[params[1]]["lam"]
        assert isinstance(element, DTensor) and element.placements == (Shard(0),) and element.shape == (6, 5)
        values = torch.tensor([0.0, 0.4, 0.0, 0.2])
        cols.copy_(distribute_tensor(values, mesh, cols.placements))
        opts[1].state[plain[0]]["lam_cols"].copy_(values)
        grid = torch.rand(6, 5, generator=gen)
        element.copy_(distribute_tensor(grid, mesh, element.placements))
        opts[1].state[plain[1]]["lam"].copy_(grid)
        for t in range(3):
            grads = [torch.randn(f.shape, generator=gen) for f in full]
            for p, q, g in zip(params, plain, grads):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                q.grad = g.clone()
            for opt in opts:
                opt.step()
        assert_params_close([p.full_tensor() for p in params], plain)
    finally:
        if created:
            dist.destroy_process_group()
