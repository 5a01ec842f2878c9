"""The pruning schedules drive regkern.Adam / regkern.AdamW as they drive
regkern.SGD (docs/adam.md, docs/schedules.md): the penalty reaches the rows
it names, the cut slices exp_avg, exp_avg_sq, max_exp_avg_sq with the
weights, and the same optimizer keeps training."""
import pytest
import torch

import regkern
from regkern.prune import ADMMPruner, GReg1, GReg2, PolarizationPruner, Slimming, SparseTraining
from prune_models import BACKEND, TinyVGG, example_inputs, make, train_step

pytestmark = pytest.mark.usefixtures("one_thread")
X = example_inputs()


def adamw(model, **kwargs):
    return regkern.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4, amsgrad=True, backend=BACKEND, **kwargs)


def _moments_follow_weights(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert st[key].shape == p.shape, key


def _run(model, opt, schedule, steps, start=0):
    for i in range(start, start + steps):
        train_step(model, opt, schedule, i)


@pytest.mark.parametrize("coupling", ["decoupled", "coupled"])
def test_greg1_with_adamw_shrinks_the_picked_rows_and_cuts_with_the_moments(coupling):
    model = make(TinyVGG)
    opt = adamw(model)
    for group in opt.param_groups:
        group["coupling"] = coupling
    s = GReg1(model, opt, X, ratios=0.5, Ku=2, Ks=3, delta=0.5, tau=2.0)
    unit = s.units[0]
    w = model.get_submodule(unit.name).weight
    _run(model, opt, s, 12)
    assert s.done
    norms = w.detach().reshape(w.shape[0], -1).norm(dim=1)
    # the decoupled penalty shrinks each penalized row at the rate lr * lam whatever its gradients
    assert norms[unit.pruned].max() < norms[~unit.pruned].min()
    before = {name: p.shape for name, p in model.named_parameters()}
    summary = s.prune()
    assert summary.layers[unit.name][0] == unit.n_prune
    assert model.get_submodule(unit.name).weight.shape[0] == before[unit.name + ".weight"][0] - unit.n_prune
    _moments_follow_weights(opt)
    _run(model, opt, None, 2, start=20)  # the same optimizer continues after the cut


def test_greg2_slimming_polarization_sparse_and_admm_drive_adamw():
    model = make(TinyVGG)
    opt = adamw(model)
    s = GReg2(model, opt, X, ratios=0.5, Ku=1, delta=0.5)
    _run(model, opt, s, 3)
    assert any(opt.state[p].get("lam") is not None and opt.state[p]["lam"].abs().sum() > 0
               for p in model.parameters())

    model = make(TinyVGG)
    opt = adamw(model)
    s = Slimming(model, opt, X, lam=1e-2, steps=3, percent=0.5)
    _run(model, opt, s, 3)
    s.prune()
    _moments_follow_weights(opt)
    _run(model, opt, None, 1, start=10)

    model = make(TinyVGG)
    opt = adamw(model)
    s = PolarizationPruner(model, opt, X, steps=3, lam=1e-3, t=1.2)
    _run(model, opt, s, 3)
    s.prune()
    _moments_follow_weights(opt)
    _run(model, opt, None, 1, start=10)

    model = make(TinyVGG)
    conv = model.features[0].weight
    opt = regkern.AdamW([{"params": [conv], "regularizer": regkern.GroupLasso(5.0)},
                         {"params": [p for p in model.parameters() if p is not conv]}], lr=1e-2, backend=BACKEND)
    s = SparseTraining(model, opt, steps=3)
    _run(model, opt, s, 3)
    s.prune()
    zero_rows = (conv.detach().reshape(conv.shape[0], -1).abs().sum(1) == 0).sum()
    assert zero_rows > 0  # group lasso's proximal map zeroes whole filters under Adam too

    model = make(TinyVGG)
    opt = adamw(model)
    s = ADMMPruner(model, opt, ratios=0.5, steps=4, K=2, rho=1e-2)
    _run(model, opt, s, 4)
    s.prune()
    _run(model, opt, None, 1, start=10)
