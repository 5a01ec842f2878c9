"""Polarization pruning on a residual network: the official scope (every
BatchNorm inside each block, the block's last one included and re-expanded
into the residual width), the clamp of every BatchNorm, the FLOPs gate, and
resuming a cut with expansions."""
import copy

import pytest
import torch
import torch.nn.functional as F

import regkern
from models import image_batch, resnet_basic, resnet_bottleneck
from regkern.prune import PolarizationPruner, Slimming
from regkern.prune.expand import ChannelExpand, attach_expand
from prune_models import roundtrip, same_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

INNER = ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]
ENDS = ["layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2"]
OUTSIDE = ["bn1", "layer2.0.downsample.1"]  # stem and downsample: write the residual stream itself


def make(seed=0):
    torch.manual_seed(seed)
    return resnet_basic()


def opt_for(model, lr=0.05):
    return regkern.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, backend="reference")


def step(model, opt, sched, i):
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    del loss
    opt.step()
    if sched is not None:
        sched.step()


def norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


def example():
    return image_batch(2, 8)


def test_official_scope_regularizes_every_block_batchnorm_and_clamps_the_rest():
    model = make()
    opt = opt_for(model)
    s = PolarizationPruner(model, opt, example(), steps=2, lam=1e-2)
    assert [u.name for u in s.units] == [INNER[0], ENDS[0], INNER[1], ENDS[1], INNER[2], ENDS[2]]
    assert [u.expand for u in s.units] == [None, "layer1.0.bn2", None, "layer1.1.bn2", None, "layer2.0.bn2"]
    bn = norms(model)
    polar = [bn[n.replace("conv", "bn")].weight for n in INNER + ENDS]
    assert {id(p) for p in s.group["params"]} == {id(p) for p in polar}
    assert s.clamp_group["regularizer"] == regkern.Clamp(0.0, 1.0)
    assert {id(p) for p in s.clamp_group["params"]} == {id(bn[n].weight) for n in OUTSIDE}
    with torch.no_grad():  # out-of-range scales everywhere: the step brings every one back to [0, 1]
        for m in bn.values():
            m.weight.copy_(torch.linspace(-0.5, 1.5, m.num_features))
    step(model, opt, s, 0)
    for name, m in bn.items():
        w = m.weight.detach()
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0, name
    assert float(bn["bn1"].weight.detach().max()) == 1.0 and float(bn["bn1"].weight.detach().min()) == 0.0

    model = make()
    keep = PolarizationPruner(model, opt_for(model), example(), steps=2, residual="keep", clamp_all=False)
    assert [u.name for u in keep.units] == INNER and keep.clamp_group is None

    model = make()
    opt = opt_for(model)
    with pytest.raises(ValueError, match="residual='expand' .* needs residual_rule=True"):
        PolarizationPruner(model, opt, example(), steps=1, residual_rule=False)
    with pytest.raises(ValueError, match="residual must be one of"):
        PolarizationPruner(model, opt, example(), steps=1, residual="prune")
    bad = regkern.SGD([{"params": [norms(model)["bn1"].weight], "regularizer": regkern.Clamp(0.0, 2.0)},
                       {"params": [p for p in model.parameters() if p is not norms(model)["bn1"].weight]}],
                      lr=0.1, backend="reference")
    with pytest.raises(ValueError, match=r"clamps to \[0.0, 2.0\]"):
        PolarizationPruner(model, bad, example(), steps=1)


def polarized(seed=0):
    """A model after 3 steps of strong polarization, with every third scale of
    each regularized BatchNorm set to 0 (so each layer has a valley to cut at)."""
    model = make(seed)
    opt = opt_for(model)
    s = PolarizationPruner(model, opt, example(), steps=3, lam=1e-2, bn_init=0.5)
    for i in range(3):
        step(model, opt, s, i)
    with torch.no_grad():
        for u in s.units:
            u.scales[0][1][1::3] = 0.0
    return model, opt, s


def test_pruned_resnet_equals_the_masked_one_and_keeps_training():
    model, opt, s = polarized()
    assert s.done
    thresholds = s.thresholds()
    masked = copy.deepcopy(model)
    bn = norms(masked)
    removed = {}
    with torch.no_grad():  # the masked model: gamma and beta of every removed channel zeroed
        for u in s.units:
            norm = bn[u.scales[0][0].rsplit(".", 1)[0]]
            drop = norm.weight.abs() <= thresholds[u.name]
            removed[u.name] = drop
            norm.weight[drop] = 0.0
            norm.bias[drop] = 0.0
    end = model.layer1[0]
    kept_rows = (~removed["layer1.0.conv2"]).nonzero().flatten()
    kept_cols = (~removed["layer1.0.conv1"]).nonzero().flatten()  # conv2's inputs: conv1's channels
    momentum = opt.state[end.conv2.weight]["momentum_buffer"][kept_rows][:, kept_cols].clone()
    expect_flops = s.remaining_flops()

    summary = s.prune()
    assert summary.layers == {n: (int((~d).sum()), d.numel()) for n, d in removed.items()}
    assert all(0 < kept < total for kept, total in summary.layers.values())  # every layer, block ends too, lost some
    assert end.conv2.out_channels == end.bn2.num_features == len(kept_rows) < 8
    assert isinstance(end.bn2.channel_expand, ChannelExpand)
    assert torch.equal(end.bn2.channel_expand.index, kept_rows)
    assert torch.equal(opt.state[end.conv2.weight]["momentum_buffer"], momentum)
    assert 1.0 - summary.flops_reduction == pytest.approx(expect_flops)
    assert summary.slice.macs_after < summary.slice.macs_before
    model.eval(), masked.eval()
    x = image_batch(4, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)
    assert s.regularizer is None and s.clamp_group["regularizer"] is None  # fine-tuning: no penalty, no clamp
    model.train()
    with torch.no_grad():
        model.bn1.weight[0] = 3.0  # no clamp while fine-tuning (the optimizer's cached step must know)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(3, 6):
        step(model, opt, s, i)
    assert float(model.bn1.weight.detach()[0]) > 2.0
    assert s.phase == "finetune"
    for n, p in model.named_parameters():
        assert p.shape == before[n].shape and torch.isfinite(p).all(), n
        buf = opt.state[p].get("momentum_buffer")
        assert buf is None or buf.shape == p.shape, n
    assert not torch.equal(end.conv2.weight, before["layer1.0.conv2.weight"])


def test_resume_redoes_the_cut_with_its_expansions():
    def run(state=None, stop=None):
        model = make()
        opt = opt_for(model)
        s = PolarizationPruner(model, opt, example(), steps=3, lam=1.0, t=1.0)
        with torch.no_grad():
            for u in s.units:
                u.scales[0][1].uniform_(0, 1, generator=torch.Generator().manual_seed(len(u.name)))
        if state is not None:
            s.load_state_dict(state["schedule"])
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        for i in range(s.iteration + 1, 6):
            step(model, opt, s, i)
            if s.done and not s.pruned:
                s.prune(force=True)
            if i == stop:
                break
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": s.state_dict()}

    ref = roundtrip(run())
    assert ref["schedule"]["pruned"] and any(k.endswith("channel_expand.index") for k in ref["model"])
    got = roundtrip(run(state=roundtrip(run(stop=4))))
    assert same_tensors(got["model"], ref["model"])
    for k, v in ref["optimizer"]["state"].items():
        assert same_tensors(got["optimizer"]["state"][k], v), k


def test_flops_gate_stops_the_penalty_at_the_remaining_target():
    model = make()
    opt = opt_for(model, lr=0.0)  # the scales only move by hand and by the clamp
    s = PolarizationPruner(model, opt, example(), steps=4, lam=1e-2, target_flops=0.8, gate_every=2)
    step(model, opt, s, 1)
    assert s.flops_ratio is None  # no check yet
    step(model, opt, s, 2)
    assert s.flops_ratio == pytest.approx(1.0) and s.gated_at is None  # no valley yet: nothing would go
    assert s.regularizer.lam == 1e-2
    with torch.no_grad():
        for u in s.units:
            u.scales[0][1][::2] = 0.0
    remaining = s.remaining_flops()
    assert remaining < 0.8 and model.layer1[0].conv1.out_channels == 8  # measured on a copy
    step(model, opt, s, 3)
    assert s.gated_at is None  # checked every 2 steps
    step(model, opt, s, 4)
    assert s.gated_at == 4 and s.flops_ratio == pytest.approx(remaining)
    assert s.regularizer == regkern.Polarization(0.0, 1.4, 1.0)
    assert float(opt.state[s.group["params"][0]]["polar"][0]) == 0.0
    state = roundtrip(s.state_dict())
    assert state["gated_at"] == 4
    summary = s.prune()
    assert 1.0 - summary.flops_reduction == pytest.approx(remaining)
    with pytest.raises(ValueError, match="already pruned"):
        s.remaining_flops()
    with pytest.raises(ValueError, match="target_flops is the fraction of the model's MACs that should remain"):
        model = make()
        PolarizationPruner(model, opt_for(model), example(), steps=1, target_flops=1.5)


def test_slimming_can_expand_too_and_attach_expand_composes():
    model = make()
    opt = opt_for(model)
    s = Slimming(model, opt, example(), steps=0, percent=0.3, residual="expand")
    assert [u.name for u in s.units] == [INNER[0], ENDS[0], INNER[1], ENDS[1], INNER[2], ENDS[2]]
    s.prune()
    assert model.layer2[0].bn2.num_features < 16
    x = image_batch(2, 8, seed=5)
    model.eval()
    assert model(x).shape == (2, 10)

    norm = torch.nn.BatchNorm2d(3)
    attach_expand(norm, torch.tensor([0, 2, 5]), 6)
    attach_expand(norm, torch.tensor([1, 2]), 6)  # a second cut keeps positions 2 and 5
    assert torch.equal(norm.channel_expand.index, torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="distinct channel positions"):
        ChannelExpand(torch.tensor([0, 0]), 4)


def test_bottleneck_ends_are_the_last_convs_not_the_downsample():
    """A downsample conv reads the same tensor as the block's first conv: it
    is no branch end, though it also feeds the residual add."""
    torch.manual_seed(0)
    model = resnet_bottleneck()
    opt = opt_for(model)
    s = PolarizationPruner(model, opt, image_batch(2, 8), steps=0)
    assert [u.expand for u in s.units if u.expand] == ["layer1.0.bn3", "layer1.1.bn3", "layer2.0.bn3"]
    # the stem's output enters no residual add here (layer1.0 has a downsample): an ordinary prunable layer
    assert s.units[0].name == "conv1" and s.units[0].expand is None
    assert {id(p) for p in s.clamp_group["params"]} == {
        id(m.weight) for n, m in norms(model).items() if n in ("layer1.0.downsample.1", "layer2.0.downsample.1")}
    with torch.no_grad():
        for u in s.units:
            u.scales[0][1].uniform_(0.3, 1.0)
            u.scales[0][1][::3] = 0.0
        for m in norms(model).values():
            m.bias.uniform_(-0.5, 0.5)
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for u in s.units:
            drop = u.gamma() == 0
            params[u.scales[0][0]][drop] = 0.0
            params[u.scales[0][0].replace(".weight", ".bias")][drop] = 0.0
    s.prune()
    assert model.layer1[0].conv3.out_channels == model.layer1[0].bn3.num_features == 10
    assert model.layer1[0].downsample[0].out_channels == 16
    model.eval(), masked.eval()
    x = image_batch(3, 8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("bn_weight_decay,expected", [(0.0, 0.0), (None, 5e-4), (1e-4, 1e-4)])
def test_polarized_and_clamped_scales_weight_decay(bn_weight_decay, expected):
    """Official: no weight decay on BatchNorm scales unless asked for."""
    torch.manual_seed(0)
    model = resnet_basic()
    opt = regkern.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pruner = PolarizationPruner(model, opt, image_batch(), steps=2, bn_weight_decay=bn_weight_decay)
    assert pruner.group["weight_decay"] == expected and pruner.clamp_group["weight_decay"] == expected
    assert opt.param_groups[0]["weight_decay"] == 5e-4


def test_a_refused_polarization_pruner_leaves_the_param_groups_as_they_were():
    torch.manual_seed(0)
    model = resnet_basic()
    bn = model.bn1.weight  # a BatchNorm outside the polarization set, in a Clamp group that disagrees
    opt = regkern.SGD([{"params": [p for p in model.parameters() if p is not bn], "weight_decay": 1e-4},
                       {"params": [bn], "regularizer": regkern.Clamp(0.0, 2.0)}], lr=0.1)
    before = [(list(map(id, g["params"])), g["regularizer"], g["weight_decay"]) for g in opt.param_groups]
    keys = {p: set(opt.state[p]) for p in model.parameters() if p in opt.state}
    with pytest.raises(ValueError, match="Clamp group clamps to"):
        PolarizationPruner(model, opt, image_batch(), steps=2, a=1.0)
    assert [(list(map(id, g["params"])), g["regularizer"], g["weight_decay"]) for g in opt.param_groups] == before
    assert {p: set(opt.state[p]) for p in model.parameters() if p in opt.state} == keys
