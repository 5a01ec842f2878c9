"""What every pruning schedule checks at construction (regkern.prune.base):
an optimizer whose step ignores what the schedule writes is refused, and so is
a schedule that found nothing to prune; a refused schedule writes nothing."""
import copy

import pytest
import torch

import regkern
from regkern.prune import (ADMMPruner, GReg1, GReg2, OneShotL1, PolarizationPruner, Slimming,
                           SparseTraining)
from prune_models import BACKEND, TinyResNet, TinyVGG, example_inputs, make, sgd, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def everything(model, optimizer):
    """Parameters, buffers, optimizer state and param groups, copied."""
    return copy.deepcopy({"model": model.state_dict(), "params": [p.detach() for p in model.parameters()],
                          "state": {id(p): dict(st) for p, st in optimizer.state.items()},
                          "groups": [{k: (list(map(id, v)) if k == "params" else v) for k, v in g.items()}
                                     for g in optimizer.param_groups]})


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if key == "model":
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        elif key == "params":
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        elif key == "state":
            assert a.keys() == b.keys()
            for pid in a:
                assert a[pid].keys() == b[pid].keys()
                for name, x in a[pid].items():
                    y = b[pid][name]
                    assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name
        else:
            assert a == b


def trained(optimizer_factory, cls=TinyVGG):
    """A model and its optimizer after one step (momentum and other state exist)."""
    model = make(cls)
    opt = optimizer_factory(model)
    train_step(model, opt, None, 0)
    return model, opt


def torch_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)


def rda(model):
    return regkern.RDA(model.parameters(), lr=0.02, lam=1e-3, backend=BACKEND)


def sas(model):
    return regkern.SASADMM(model.parameters(), M=2)


X = example_inputs()
REFUSED = [  # (schedule, optimizer, what the message names)
    (lambda m, o: GReg1(m, o, X, ratios=0.5), torch_sgd, r"GReg1 works through the penalty state\['lam'\].*torch\.optim\.sgd\.SGD.*regkern\.SGD, regkern\.Adam or regkern\.AdamW$"),
    (lambda m, o: GReg2(m, o, X, ratios=0.5), rda, r"GReg2 .*regkern\.optim\.rda\.RDA.*regkern\.SGD, regkern\.Adam or regkern\.AdamW$"),
    (lambda m, o: GReg1(m, o, ratios=0.5, mode="weight"), sas, r"GReg1 .*SASADMM.*regkern\.SGD, regkern\.Adam or regkern\.AdamW$"),
    (lambda m, o: OneShotL1(m, o, ratios=0.5, mode="weight"), torch_sgd, r"OneShotL1 works through the masks"),
    (lambda m, o: OneShotL1(m, o, ratios=0.5, mode="weight"), sas, r"masks.*regkern\.SGD, regkern\.Adam, regkern\.AdamW or regkern\.RDA$"),
    (lambda m, o: Slimming(m, o, X, steps=3), torch_sgd, r"Slimming works through the L1 coefficients"),
    (lambda m, o: Slimming(m, o, X, steps=3), rda, r"Slimming .*RDA"),
    (lambda m, o: PolarizationPruner(m, o, X, steps=3, bn_init=0.5), torch_sgd, r"regkern\.Polarization param group"),
    (lambda m, o: PolarizationPruner(m, o, X, steps=3), sas, r"PolarizationPruner works through .*SASADMM"),
    (lambda m, o: SparseTraining(m, o, steps=3), torch_sgd, r"ProxL1 or regkern\.GroupLasso.*regkern\.SGD, regkern\.Adam, regkern\.AdamW or regkern\.RDA$"),
    (lambda m, o: SparseTraining(m, o, steps=3), sas, r"SparseTraining works through .*SASADMM"),
    (lambda m, o: ADMMPruner(m, o, ratios=0.5, steps=4), torch_sgd, r"ADMMPruner .*regkern\.SGD, regkern\.Adam, regkern\.AdamW or regkern\.SASADMM$"),
    (lambda m, o: ADMMPruner(m, o, ratios=0.5, steps=4), rda, r"regkern\.ADMM param group or the ADMM iteration"),
]


@pytest.mark.parametrize("build,optimizer,message", REFUSED)
def test_an_optimizer_that_ignores_the_schedule_is_refused_and_nothing_is_written(build, optimizer, message):
    model, opt = trained(optimizer)
    before = everything(model, opt)
    with pytest.raises(ValueError, match=message) as caught:
        build(model, opt)
    assert str(caught.value).count(". ") == 0  # one sentence
    assert_same(before, everything(model, opt))


@pytest.mark.parametrize("optimizer", [torch_sgd, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), sgd, rda])
def test_one_shot_l1_in_filter_mode_takes_any_optimizer(optimizer):
    """Its cut removes rows from the model and every optimizer state tensor;
    nothing is left for the step to read."""
    model, opt = trained(optimizer)
    s = OneShotL1(model, opt, X, ratios=0.5)
    summary = s.prune()
    assert summary.layers["features.0"] == (4, 8)
    train_step(model, opt, None, 1)  # the sliced optimizer keeps training


@pytest.mark.parametrize("build,message", [
    (lambda m, o: GReg1(m, o, X, ratios=0.0), "every layer has ratio 0"),
    (lambda m, o: GReg2(m, o, X, ratios=0.5, skip=["features.0", "features.3"]), "every layer has ratio 0"),
    (lambda m, o: OneShotL1(m, o, X, ratios=0.5, ignore=["features.0", "features.3", "classifier"]),
     "every layer has ratio 0"),
    (lambda m, o: GReg1(m, o, ratios={"features.0": 0.0}, mode="weight"), "every layer has ratio 0"),
    (lambda m, o: ADMMPruner(m, o, ratios=0.0, steps=3), "every layer has ratio 0"),
])
def test_a_schedule_with_nothing_to_prune_says_so_and_writes_nothing(build, message):
    model, opt = trained(sgd)
    before = everything(model, opt)
    with pytest.raises(ValueError, match=message) as caught:
        build(model, opt)
    assert str(caught.value).count(". ") == 0
    assert_same(before, everything(model, opt))


def test_layers_without_a_removable_unit_are_named():
    """In TinyResNet the stem conv and each block's second conv feed residual
    adds: with the blocks' first convs skipped no group is left to prune."""
    model, opt = trained(sgd, TinyResNet)
    before = everything(model, opt)
    skip = ["layer1.0.conv1", "layer2.0.conv1"]
    for cls in (GReg1, GReg2, OneShotL1):
        with pytest.raises(ValueError, match=r"nothing to prune: the layer\(s\) with a ratio above 0 \(conv1, "
                                             r"layer1\.0\.conv2, layer2\.0\.conv2\) have no unit .*residual add"):
            cls(model, opt, X, ratios=0.5, skip=skip)
    assert_same(before, everything(model, opt))
    GReg1(model, opt, X, ratios=0.5, skip=skip[:1])  # one prunable group is enough


def test_a_custom_schedule_declares_what_it_drives():
    class Nudge(regkern.prune.Schedule):
        method = "Nudge"
        drives = ("l1",)

        def _prune(self):
            raise AssertionError

    model = make(TinyVGG)
    with pytest.raises(ValueError, match="Nudge works through the L1 coefficients"):
        Nudge(model, torch_sgd(model))
    assert Nudge(model, sgd(model)).iteration == 0

    class Anything(Nudge):
        method = "Anything"
        drives = ()

    assert Anything(model, torch_sgd(model)).iteration == 0


def test_weight_mode_layers_of_one_weight_have_nothing_to_prune():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1, bias=False), torch.nn.Flatten(), torch.nn.Linear(36, 2))
    opt = sgd(model)
    with pytest.raises(ValueError, match=r"GReg1 has nothing to prune: every layer has ratio 0"):
        GReg1(model, opt, ratios=0.5, mode="weight", ignore=["0", "2"])
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.Flatten(), torch.nn.Linear(36, 2))
    opt = sgd(model)
    before = everything(model, opt)
    with pytest.raises(ValueError, match=r"the layer\(s\) with a ratio above 0 \(0\) have no unit .*single weight"):
        OneShotL1(model, opt, ratios=0.5, mode="weight")
    assert_same(before, everything(model, opt))


def test_slimming_with_nothing_to_prune_is_refused_before_writing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 2))
    opt = regkern.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        regkern.prune.Slimming(model, opt, torch.randn(2, 3, 8, 8), steps=10, percent=0)
    assert not any("l1" in opt.state[p] for p in model.parameters() if p in opt.state)
