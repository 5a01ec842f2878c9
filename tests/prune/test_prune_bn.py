"""Network slimming and polarization pruning (regkern.prune, docs/schedules.md): the
penalty state, the percentile / valley thresholds, pruning through coupled
groups, Algorithm 1's search, resuming, and bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regkern
from regkern.prune import PolarizationPruner, Slimming, polarization_search, search_threshold
from prune_models import (TinyVGG, example_inputs, make, same_tensors, sgd,  # noqa: F401
                               snapshot, train_step)

pytestmark = pytest.mark.usefixtures("one_thread")


def bns(model):
    return [model.features[1], model.features[4]]


def official_threshold(values: np.ndarray):
    """The official ``search_threshold(weight, alg="grad")`` loop, as an oracle:
    the valley bin's left edge."""
    hist_y, hist_x = np.histogram(values, bins=100, range=(0, 1))
    hist_y_diff = np.diff(hist_y)
    for i in range(len(hist_y_diff) - 1):
        if hist_y_diff[i] <= 0 <= hist_y_diff[i + 1]:
            return hist_x[i + 1]
    return None


def unimodal_scales() -> torch.Tensor:
    """2550 values whose 100-bin histogram rises strictly to its top, then falls: no valley."""
    counts = [i + 1 for i in range(50)] + [100 - i for i in range(50, 100)]
    return torch.cat([torch.full((c,), (i + 0.5) / 100) for i, c in enumerate(counts)])


def test_search_threshold_matches_the_official_loop():
    assert search_threshold(torch.tensor([0.0] * 5 + [0.9] * 5)) == pytest.approx(0.01)
    assert search_threshold(torch.tensor([0.005, 0.012, 0.013, 0.3, 0.5])) == pytest.approx(0.02)
    assert search_threshold(unimodal_scales()) is None
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(4, 300, (1,), generator=gen))
        low = torch.rand(n // 2, generator=gen) * 0.1 * (trial % 3)
        high = 0.3 + 0.7 * torch.rand(n - n // 2, generator=gen)
        values = torch.cat([low, high])
        want = official_threshold(values.numpy())
        got = search_threshold(values)
        assert got == (None if want is None else float(want)), trial


def test_valley_threshold_is_the_left_edge_and_the_valley_bin_is_kept():
    """A hand-built histogram: 5 scales in bin 0, 2 in bin 1 (the valley), 3 in
    bin 2, 6 near 0.8. The threshold is bin 1's left edge 0.01, so the
    valley's two channels stay (a right-edge threshold, 0.02, would cut them)."""
    scales = [0.005] * 5 + [0.015] * 2 + [0.025] * 3 + [0.8] * 6
    values = torch.tensor(scales)
    hist = np.histogram(values.numpy(), bins=100, range=(0, 1))[0]
    assert hist[:3].tolist() == [5, 2, 3] and hist[80] == 6
    assert search_threshold(values) == pytest.approx(0.01)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = regkern.SGD(model.parameters(), lr=0.01, backend="reference")
    s = PolarizationPruner(model, opt, torch.randn(4, 4), steps=0)
    with torch.no_grad():
        model[1].weight.copy_(values)
    summary = s.prune()
    assert summary.layers == {"0": (11, 16)} and summary.thresholds == {"0": pytest.approx(0.01)}
    assert sorted(model[1].weight.detach().tolist()) == pytest.approx([0.015] * 2 + [0.025] * 3 + [0.8] * 6)


def test_slimming_l1_state_and_global_percentile():
    model, x = make(TinyVGG), example_inputs()
    opt = sgd(model)
    s = Slimming(model, opt, x, lam=1e-2, steps=3, percent=0.5)
    assert [u.name for u in s.units] == ["features.0", "features.3"]
    for bn in bns(model):
        assert torch.equal(opt.state[bn.weight]["l1"], torch.full((bn.num_features,), 1e-2))
    assert s.phase == "train"
    for i in range(1, 4):
        train_step(model, opt, s, i)
        assert s.done == (i >= 3)
    gammas = torch.cat([bn.weight.detach().abs() for bn in bns(model)])
    removed = torch.sort(gammas, stable=True).indices[:11]  # at or below sorted[int(0.5 * 20)]: 11 channels
    expect = {"features.0": 8 - int((removed < 8).sum()), "features.3": 12 - int((removed >= 8).sum())}
    survivors = [bn.weight.detach()[[i for i in range(bn.num_features) if i + off not in removed.tolist()]]
                 for bn, off in zip(bns(model), (0, 8))]
    summary = s.prune()
    assert {n: k for n, (k, _) in summary.layers.items()} == expect
    for bn, kept in zip(bns(model), survivors):
        assert torch.equal(bn.weight.detach(), kept)
        assert not opt.state[bn.weight]["l1"].any()  # fine-tuning without L1
    train_step(model, opt, s, 4)
    assert s.phase == "finetune"


def test_slimming_global_cut_is_the_official_percentile():
    """Official: thre = sorted[int(N * percent)], keep |gamma| > thre. With 20
    distinct scales and percent 0.25 that removes 6 channels (not 5), and a
    tie at the threshold goes too."""
    model = make(TinyVGG)
    opt = sgd(model)
    layer0 = torch.tensor([0.30, 0.05, 0.90, 0.15, 0.60, 0.01, 0.45, 0.75])
    layer1 = torch.tensor([0.02, 0.50, 0.10, 0.85, 0.20, 0.35, 0.95, 0.03, 0.65, 0.25, 0.40, 0.80])
    with torch.no_grad():
        bns(model)[0].weight.copy_(layer0)
        bns(model)[1].weight.copy_(-layer1)  # |gamma| decides
    summary = Slimming(model, opt, example_inputs(), steps=0, percent=0.25).prune()
    # sorted: 0.01 0.02 0.03 0.05 0.10 0.15 | 0.20 ...; int(20 * 0.25) = 5 -> threshold 0.15
    assert summary.thresholds == {"features.0": pytest.approx(0.15), "features.3": pytest.approx(0.15)}
    assert summary.layers == {"features.0": (5, 8), "features.3": (9, 12)}
    assert bns(model)[0].weight.detach().tolist() == pytest.approx([0.30, 0.90, 0.60, 0.45, 0.75])

    model = make(TinyVGG)
    opt = sgd(model)
    with torch.no_grad():
        bns(model)[0].weight.copy_(layer0)
        bns(model)[1].weight.copy_(torch.where(layer1 == 0.20, torch.tensor(0.15), layer1))  # a tie at 0.15
    summary = Slimming(model, opt, example_inputs(), steps=0, percent=0.25).prune()
    assert summary.layers == {"features.0": (5, 8), "features.3": (8, 12)}


def test_slimming_per_layer_and_a_layer_left_with_one_channel():
    model = make(TinyVGG)
    opt = sgd(model)
    s = Slimming(model, opt, example_inputs(), steps=0, percent=0.5, scope="layer")
    assert s.done
    assert s.prune().layers == {"features.0": (4, 8), "features.3": (6, 12)}

    model = make(TinyVGG)
    opt = sgd(model)
    with torch.no_grad():
        bns(model)[0].weight.copy_(torch.linspace(0.01, 0.02, 8))
        bns(model)[1].weight.copy_(torch.linspace(0.5, 1.0, 12))
    s = Slimming(model, opt, example_inputs(), steps=0, percent=0.6)  # 13 smallest: all of layer 0 and 5 more
    summary = s.prune()
    assert summary.layers == {"features.0": (1, 8), "features.3": (7, 12)}
    assert "features.0" in summary.notes[0] and "largest is kept" in summary.notes[0]
    assert float(bns(model)[0].weight.detach()) == pytest.approx(0.02)


def test_polarization_group_training_and_valley_cut():
    model, x = make(TinyVGG), example_inputs()
    opt = sgd(model)
    s = PolarizationPruner(model, opt, x, steps=2, bn_init=0.5)
    group = opt.param_groups[-1]
    assert len(opt.param_groups) == 2 and s.group is group
    assert isinstance(group["regularizer"], regkern.Polarization)
    assert (group["regularizer"].lam, group["regularizer"].t, group["regularizer"].a) == (5e-5, 1.4, 1.0)
    assert [p for p in group["params"]] == [bn.weight for bn in bns(model)]
    assert not any(p is bn.weight for p in opt.param_groups[0]["params"] for bn in bns(model))
    assert all(torch.equal(bn.weight.detach(), torch.full((bn.num_features,), 0.5)) for bn in bns(model))
    assert opt.state[bns(model)[0].weight]["polar"] is opt.state[bns(model)[1].weight]["polar"]
    for i in range(1, 3):
        train_step(model, opt, s, i)
    assert s.done and all(bool(((bn.weight >= 0) & (bn.weight <= 1)).all()) for bn in bns(model))
    with torch.no_grad():  # a polarized layer and a layer with every scale at 0.5
        bns(model)[0].weight.copy_(torch.tensor([0.0, 0.0, 0.003, 0.8, 0.9, 0.7, 0.0, 0.6]))
        bns(model)[1].weight.fill_(0.5)
    assert s.thresholds() == {"features.0": pytest.approx(0.01), "features.3": pytest.approx(0.01)}
    summary = s.prune()
    assert summary.layers == {"features.0": (4, 8), "features.3": (12, 12)}
    assert summary.thresholds == {"features.0": pytest.approx(0.01), "features.3": pytest.approx(0.01)}
    assert torch.equal(bns(model)[0].weight.detach(), torch.tensor([0.8, 0.9, 0.7, 0.6]))
    assert model.features[0].out_channels == 4 and model.features[3].in_channels == 4
    assert s.group["regularizer"] is None and all("polar" not in opt.state[bn.weight] for bn in bns(model))
    train_step(model, opt, s, 3)


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 2550), nn.BatchNorm1d(2550), nn.Linear(2550, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("no_valley", ["keep", "fixed", "error"])
def test_polarization_without_a_valley_says_so(no_valley):
    torch.manual_seed(0)
    model, x = Wide(), torch.randn(4, 6)
    opt = regkern.SGD(model.parameters(), lr=0.01, backend="reference")
    s = PolarizationPruner(model, opt, x, steps=0, no_valley=no_valley)
    with torch.no_grad():
        model.bn.weight.copy_(unimodal_scales())
    assert s.thresholds() == {"fc1": None}
    if no_valley == "error":
        with pytest.raises(ValueError, match="no valley .* fc1"):
            s.prune()
        assert model.fc1.out_features == 2550 and not s.pruned
        return
    summary = s.prune()
    assert "no valley" in summary.notes[0] and "fc1" in summary.notes[0]
    if no_valley == "keep":
        assert "kept whole" in summary.notes[0] and model.fc1.out_features == 2550
    else:
        assert "fixed threshold 0.01" in summary.notes[0] and model.fc1.out_features == 2549  # the 0.005 scale


def test_polarization_uses_an_existing_set_and_refuses_bad_input():
    model, x = make(TinyVGG), example_inputs()
    scales = [bn.weight for bn in bns(model)]
    rest = [p for p in model.parameters() if all(p is not q for q in scales)]
    opt = regkern.SGD([{"params": rest}, {"params": scales, "regularizer": regkern.Polarization(3e-5, 1.5)}],
                      lr=0.01, backend="reference")
    s = PolarizationPruner(model, opt, x, steps=1)
    assert len(opt.param_groups) == 2 and s.regularizer == regkern.Polarization(3e-5, 1.5)
    with pytest.raises(ValueError, match="t=1.5, but t=1.2 was given"):
        PolarizationPruner(model, opt, x, steps=1, t=1.2)
    with pytest.raises(ValueError, match="no_valley"):
        PolarizationPruner(model, opt, x, steps=1, no_valley="skip")
    with pytest.raises(ValueError, match="steps"):
        PolarizationPruner(model, opt, x, steps=-1)
    with pytest.raises(ValueError, match="no conv/linear layer is named"):
        PolarizationPruner(model, opt, x, steps=1, layers=["features.9"])
    with pytest.raises(ValueError, match="percent"):
        Slimming(model, opt, x, steps=1, percent=1.0)
    with pytest.raises(ValueError, match="found no prunable conv/linear layer followed by a BatchNorm"):
        Slimming(model, opt, x, steps=1, layers=["classifier"])


def test_algorithm_1_search():
    def flops(lam, t):  # more lam, more t: more FLOPs removed
        return min(1.0, lam / 2e-4 * t / 1.4)

    r = polarization_search(flops, 0.5)
    assert r.converged and [(lam, t) for lam, t, _ in r.trials] == [(1e-4, 1.2), (1e-4, 1.3)]
    assert r.flops_reduction == pytest.approx(0.5 * 1.3 / 1.4)
    r = polarization_search(flops, 0.9)  # binary search on lam first: 1e-4, 1.5e-4, 1.75e-4, 1.875e-4
    assert r.converged and [lam for lam, _, _ in r.trials] == pytest.approx([1e-4, 1.5e-4, 1.75e-4, 1.875e-4, 1.875e-4])
    assert (r.lam, r.t) == (pytest.approx(1.875e-4), pytest.approx(1.3))

    r = polarization_search(lambda lam, t: 0.44 if t < 1.25 else 0.57, 0.5)  # t would go back and forth
    assert not r.converged and "oscillates" in r.message and (r.t, r.flops_reduction) == (1.2, 0.44)
    r = polarization_search(lambda lam, t: 0.1, 0.5, max_trials=4)
    assert not r.converged and len(r.trials) == 4 and "lam" in r.message
    def short_run(lam, t):  # Algorithm 1 on real (tiny) training runs
        model = make(TinyVGG)
        with torch.no_grad():
            for bn in bns(model):
                bn.weight.uniform_(0, 1, generator=torch.Generator().manual_seed(bn.num_features))
        opt = sgd(model, lr=0.05)
        s = PolarizationPruner(model, opt, example_inputs(), steps=3, lam=lam * 1e4, t=t)
        for i in range(1, 4):
            train_step(model, opt, s, i)
        return s.prune().flops_reduction

    r = polarization_search(short_run, 0.3, delta=0.05, max_trials=3)
    assert len(r.trials) <= 3 and all(0.0 <= f < 1.0 for _, _, f in r.trials)
    assert r.trials[0][:2] == (1e-4, 1.2) and r.trials[0][2] > 0  # lam 1.0 prunes something in 3 steps
    with pytest.raises(ValueError, match="target"):
        polarization_search(flops, 1.5)
    with pytest.raises(ValueError, match="lam_range"):
        polarization_search(flops, 0.5, lam_range=(1e-4, 0.0))
    with pytest.raises(ValueError, match="callable"):
        polarization_search(None, 0.5)


@pytest.mark.parametrize("cls, kwargs", [(PolarizationPruner, dict(steps=3, lam=1.0, t=1.0)),
                                         (Slimming, dict(steps=3, lam=1e-2, percent=0.4))])
def test_resume_reproduces_the_run(cls, kwargs):
    def run(stop=None, state=None):
        model = make(TinyVGG)
        with torch.no_grad():  # spread scales; a strong polarization drives the low ones to 0 in 3 steps
            for bn in bns(model):
                bn.weight.uniform_(0, 1, generator=torch.Generator().manual_seed(bn.num_features))
        opt = sgd(model, lr=0.05)
        s = cls(model, opt, example_inputs(), **kwargs)
        if state is not None:
            s.load_state_dict(state["schedule"])
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        for i in range(s.iteration + 1, 7):
            train_step(model, opt, s, i)
            if s.done and not s.pruned:
                s.prune(force=True)
            if i == stop:
                return snapshot(model, opt, s)
        return snapshot(model, opt, s)

    ref = run()
    assert ref["schedule"]["pruned"] and ref["schedule"]["removals"]
    for stop in (2, 5):  # before and after the cut
        got = run(state=run(stop=stop))
        assert same_tensors(got["model"], ref["model"]), stop
        assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
        for k, v in ref["optimizer"]["state"].items():
            assert same_tensors(got["optimizer"]["state"][k], v), (stop, k)
