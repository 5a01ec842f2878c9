"""slice_model and count_flops: a sliced model computes what the masked model
computes, its optimizer keeps training as the masked one does, and bad
removals change nothing."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regkern
from regkern.groups import Group, Member, find_groups
from regkern.slicing import kept_indices, slice_model
from regkern.flops import count_flops, count_params

from models import (CNNS, ConvBNConv, GroupNormNet, ResNeXtLike, TransposedNet, image_batch, mask_units,
                    random_removals, resnet_basic, restrict)
from optim_helpers import CPU_BACKENDS

X = image_batch(4)
Y = torch.arange(4) % 3


pytestmark = pytest.mark.usefixtures("one_thread")


def loss_of(model, x=X):
    out = model(x)
    return F.cross_entropy(out, Y % out.shape[1])


def sgd(model, backend=None, **kw):
    """regkern.SGD with momentum, weight decay and RowL2 (random lam per row,
    row norms tracked) on weights; biases and norms plain."""
    weights = [p for n, p in model.named_parameters() if p.dim() > 1]
    others = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = regkern.SGD([{"params": weights, "regularizer": regkern.RowL2(track_norms=True)}, {"params": others}],
                      lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    for p in weights:
        opt.state[p]["lam"].copy_(torch.rand(p.shape[0], generator=gen) * 0.1)
    return opt


def train_step(model, opt, x=X):
    model.train()
    opt.zero_grad()
    loss_of(model, x).backward()
    opt.step()


def twins(ctor, make_opt, steps=1, seed=0):
    """A model and an identical copy, each with its optimizer, trained ``steps`` steps."""
    torch.manual_seed(seed)
    a = ctor()
    b = copy.deepcopy(a)
    opt_a, opt_b = make_opt(a), make_opt(b)
    for _ in range(steps):
        train_step(a, opt_a)
        train_step(b, opt_b)
    return a, opt_a, b, opt_b


def assert_kept_equal(sliced, masked, kept, opt_sliced=None, opt_masked=None, keys=()):
    """Every parameter (and the listed state) of ``sliced`` equals ``masked`` on the kept entries."""
    masked_params = dict(masked.named_parameters())
    for name, p in sliced.named_parameters():
        ref = masked_params[name]
        cuts = kept.get(name, {})
        assert p.shape == restrict(ref.detach(), cuts).shape, name
        torch.testing.assert_close(p.detach(), restrict(ref.detach(), cuts), rtol=1e-5, atol=1e-5, msg=name)
        for key in keys:
            if opt_sliced is None or key not in opt_sliced.state[p]:
                continue
            mine, theirs = opt_sliced.state[p][key], opt_masked.state[ref][key]
            if key == "row_norms":  # L1 and L2 of the rows (mean |W| divides by the row length)
                mine, theirs = mine[:, :2], restrict(theirs, {0: cuts[0]} if 0 in cuts else {})[:, :2]
            elif mine.shape != p.shape and key in ("lam",):
                theirs = restrict(theirs, {0: cuts[0]} if 0 in cuts else {})
            else:
                theirs = restrict(theirs, cuts)
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")


def slice_and_mask(a, opt_a, b, opt_b, **find):
    groups = find_groups(a, X, ignore=["fc"], **find)
    removals = random_removals(groups)
    kept = kept_indices(a, removals)
    summary = slice_model(a, removals, opt_a, example_inputs=X)
    mask_units(b, removals, opt_b)
    return groups, removals, kept, summary


def check_module_shapes(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels
            assert m.bias is None or m.bias.shape[0] == m.out_channels
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features)
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape[0] == m.running_mean.shape[0] == m.running_var.shape[0] == m.num_features


# --------------------------------------------------------------------------- count_flops

def test_count_flops_matches_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                          nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
    x = torch.randn(2, 3, 8, 8)
    # conv1: 2 * 4*8*8 outputs * 3*3*3; conv2: 2 * 6*3*3 outputs * 4*3*3; linear: 2 * 5 * 54
    expected = 2 * 4 * 64 * 27 + 2 * 6 * 9 * 36 + 2 * 5 * 54
    model.train()
    before = model[1].running_mean.clone()
    assert count_flops(model, x) == expected
    assert model.training and torch.equal(model[1].running_mean, before)
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_count_flops_depthwise_matmul_and_attention():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, groups=4)
            self.mha = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x, t):
            y = self.dw(x)
            z = t @ t.transpose(1, 2)
            a = F.scaled_dot_product_attention(t, t, t)
            return y.sum() + z.sum() + a.sum() + self.mha(t, t, t)[0].sum()

    x, t = torch.randn(1, 4, 5, 5), torch.randn(2, 7, 6)
    dw = 4 * 3 * 3 * 9
    mm = 2 * 7 * 7 * 6
    sdpa = 2 * 7 * 7 * (6 + 6)
    mha = 2 * (3 * 7 * 6 * 6 + 2 * 7 * 7 * 6 + 7 * 6 * 6)
    assert count_flops(M(), (x, t)) == dw + mm + sdpa + mha


# --------------------------------------------------------------------------- sliced == masked

# grouped convs (ResNeXt / RegNet) and transposed convs slice like the rest
SLICEABLE = {**CNNS, "resnext": ResNeXtLike, "transposed": TransposedNet}


@pytest.mark.parametrize("name", sorted(SLICEABLE))
def test_sliced_output_equals_masked_output_and_next_step(name):
    a, opt_a, b, opt_b = twins(SLICEABLE[name], sgd)
    groups, removals, kept, summary = slice_and_mask(a, opt_a, b, opt_b)
    assert groups
    check_module_shapes(a)
    for mode in ("train", "eval"):
        getattr(a, mode)()
        getattr(b, mode)()
        with torch.no_grad():
            torch.testing.assert_close(a(X), b(X), rtol=1e-5, atol=1e-5)
    # every parameter shrank where its groups lost units; the optimizer still holds them
    assert summary.params_after == count_params(a) < summary.params_before == count_params(b)
    assert summary.macs_after == count_flops(a, X) < summary.macs_before == count_flops(b, X)
    held = {id(p) for g in opt_a.param_groups for p in g["params"]}
    assert all(id(p) in held for p in a.parameters())
    # one more step (momentum, weight decay, RowL2) on both: equal on the kept entries
    train_step(a, opt_a)
    train_step(b, opt_b)
    assert_kept_equal(a, b, kept, opt_a, opt_b, keys=("momentum_buffer", "lam", "row_norms"))


def test_residual_rule_model_still_slices():
    a, opt_a, b, opt_b = twins(resnet_basic, sgd)
    groups, removals, kept, _ = slice_and_mask(a, opt_a, b, opt_b, residual_rule=True)
    assert {g.name for g in groups} == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"}
    train_step(a, opt_a)
    train_step(b, opt_b)
    assert_kept_equal(a, b, kept, opt_a, opt_b, keys=("momentum_buffer",))


def test_summary_reports_layers_and_str():
    torch.manual_seed(0)
    model = ConvBNConv()
    groups = find_groups(model, X, ignore=["fc"])
    conv1 = next(g for g in groups if g.name == "conv1")
    summary = slice_model(model, {conv1: [0, 2]}, example_inputs=X)
    cuts = {(c.name, c.dim): (c.kept, c.total) for c in summary.layers}
    assert cuts[("conv1.weight", 0)] == (4, 6) and cuts[("conv2.weight", 1)] == (4, 6)
    assert cuts[("bn.weight", 0)] == (4, 6)
    assert model.bn.running_mean.shape == (4,) and model.bn.num_features == 4
    assert model.conv1.out_channels == 4 and model.conv2.in_channels == 4
    text = str(summary)
    assert "params" in text and "MACs" in text and "conv2.weight" in text and "4/6" in text
    no_macs = slice_model(model, {find_groups(model, X, ignore=["fc"])[0]: [0]})
    assert no_macs.macs_before is None and "MACs" not in str(no_macs)


def test_grad_and_every_state_kind_are_sliced():
    torch.manual_seed(0)
    model = ConvBNConv()
    opt = regkern.SGD([{"params": [model.conv1.weight],
                        "regularizer": [regkern.RowL2(track_norms=True, columns=True), regkern.L1(1e-4)]},
                       {"params": [model.conv2.weight], "regularizer": [regkern.ElementL2(), regkern.RowL2(columns=True)]},
                       {"params": [model.bn.weight], "regularizer": regkern.Polarization()},
                       {"params": [model.conv1.bias, model.bn.bias, model.conv2.bias, model.fc.weight, model.fc.bias]}],
                      lr=0.01, momentum=0.9)
    train_step(model, opt)
    loss_of(model).backward()  # leave gradients in place
    opt.state[model.conv2.weight]["mask"] = torch.rand(model.conv2.weight.shape) > 0.1
    opt.state[model.conv2.weight]["lam"].uniform_()
    opt.state[model.conv2.weight]["lam_cols"].uniform_()
    opt.state[model.conv1.weight]["mask"] = torch.ones(6, dtype=torch.bool)
    polar = opt.state[model.bn.weight]["polar"]
    before = {k: v.clone() for k, v in opt.state[model.conv2.weight].items()}
    group = next(g for g in find_groups(model, X, ignore=["fc"]) if g.name == "conv1")
    slice_model(model, {group: [1, 4]}, opt)
    keep = torch.tensor([0, 2, 3, 5])
    st = opt.state[model.conv2.weight]
    assert torch.equal(st["momentum_buffer"], before["momentum_buffer"][:, keep])
    assert torch.equal(st["mask"], before["mask"][:, keep])
    assert torch.equal(st["lam_cols"], before["lam_cols"][keep])
    assert torch.equal(st["lam"], before["lam"][:, keep])  # per element
    assert model.conv2.weight.grad.shape == model.conv2.weight.shape
    st1 = opt.state[model.conv1.weight]
    assert st1["lam"].shape == (4,) and st1["mask"].shape == (4,) and st1["row_norms"].shape == (4, 3)
    assert st1["l1"].shape == (4,) and st1["lam_cols"].shape == (3,)
    assert opt.state[model.bn.weight]["polar"] is polar and polar.shape == (4,)
    train_step(model, opt)  # the cached plans see the new storage


def test_training_goes_on_while_the_last_loss_is_still_alive():
    """A training loop keeps its last loss (and so its autograd graph, which
    holds the parameters' gradient accumulators) while it prunes."""
    torch.manual_seed(0)
    model = resnet_basic()
    opt = sgd(model)
    loss = loss_of(model)
    loss.backward()
    opt.step()
    slice_model(model, random_removals(find_groups(model, X, ignore=["fc"])), opt)
    train_step(model, opt)
    assert loss.grad_fn is not None


# --------------------------------------------------------------------------- optimizers keep training

def _conv_opts():
    return {
        "sgd": lambda m, backend=None: sgd(m, backend=backend),
        "rda": lambda m: regkern.RDA(m.parameters(), lr=0.05, lam=1e-3),
        "sasadmm": lambda m: regkern.SASADMM(m.parameters(), beta=0.5, lam=1e-3, M=2, k0=2),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    }


@pytest.mark.parametrize("kind", ["sgd", "rda", "sasadmm", "adam"])
def test_optimizer_continues_after_slicing_like_the_masked_one(kind):
    make = _conv_opts()[kind]
    a, opt_a, b, opt_b = twins(resnet_basic, make, steps=2)
    _, _, kept, _ = slice_and_mask(a, opt_a, b, opt_b)
    for _ in range(3):  # SAS-ADMM crosses an outer iteration
        train_step(a, opt_a)
        train_step(b, opt_b)
    keys = {"sgd": ("momentum_buffer",), "rda": ("gbar", "w0"), "sasadmm": ("w", "w_breve", "z", "u", "anchor"),
            "adam": ("exp_avg", "exp_avg_sq")}[kind]
    assert_kept_equal(a, b, kept, opt_a, opt_b, keys=keys)


@pytest.mark.parametrize("kind", ["sgd", "rda", "sasadmm"])
def test_state_dict_of_sliced_optimizer_loads_into_a_fresh_one(kind):
    make = _conv_opts()[kind]
    torch.manual_seed(0)
    model = resnet_basic()
    opt = make(model)
    train_step(model, opt)
    slice_model(model, random_removals(find_groups(model, X, ignore=["fc"])), opt)
    train_step(model, opt)
    twin = copy.deepcopy(model)
    fresh = make(twin)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # (a live state_dict shares its tensors)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    train_step(model, opt)
    train_step(twin, fresh)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sgd_backends_rebuild_their_plans_after_slicing(backend):
    make = lambda m: sgd(m, backend=backend)  # noqa: E731
    a, opt_a, b, opt_b = twins(ConvBNConv, make)
    _, _, kept, _ = slice_and_mask(a, opt_a, b, opt_b)
    train_step(a, opt_a)
    train_step(b, opt_b)
    assert_kept_equal(a, b, kept, opt_a, opt_b, keys=("momentum_buffer", "row_norms"))


# --------------------------------------------------------------------------- attributes of groups

class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)
        self.pieces = 3  # units of 2 rows each

    def forward(self, x):
        return self.out(self.proj(x).reshape(x.shape[0], self.pieces, 2).reshape(x.shape[0], -1))


def _pieces_group(model):
    idx = torch.arange(6).reshape(3, 2)
    return Group("pieces", 3, [Member("proj.weight", 0, idx, "producer"), Member("proj.bias", 0, idx, "row"),
                               Member("out.weight", 1, idx, "column")],
                 attributes=[("", "pieces", 1)]).bind(model)


def test_group_attributes_drop_with_the_units():
    model = Counted()
    x = torch.randn(5, 4)
    masked = copy.deepcopy(model)
    group = _pieces_group(model)
    mask_units(masked, {group: [1]})
    slice_model(model, {group: [1]})
    assert model.pieces == 2 and model.proj.out_features == 4 and model.out.in_features == 4
    torch.testing.assert_close(model(x), masked(x))


# --------------------------------------------------------------------------- bad input: nothing changes

def _snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), repr(model), [p for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def _assert_same(before, model, opt):
    state, text, params, grads, opt_state = before
    assert repr(model) == text
    assert all(p is q for p, q in zip(params, model.parameters()))
    now = model.state_dict()
    assert state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)
    for g, p in zip(grads, model.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    new_opt = opt.state_dict()
    for key, entry in opt_state["state"].items():
        for name, value in entry.items():
            other = new_opt["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.fixture
def trained():
    torch.manual_seed(0)
    model = resnet_basic()
    opt = sgd(model)
    train_step(model, opt)
    loss_of(model).backward()
    groups = find_groups(model, X, ignore=["fc"])
    return model, opt, groups


def _bad_cases(model, groups):
    g0, g1 = groups[0], groups[1]
    other = resnet_basic()
    foreign = find_groups(other, X, ignore=["fc"])[0]
    return {
        "all units": ({g0: list(range(g0.units))}, "all"),
        "out of range": ({g0: [0, g0.units]}, "lie in"),
        "negative": ({g0: [-1]}, "lie in"),
        "duplicated": ({g0: [1, 1]}, "repeated"),
        "float units": ({g0: torch.tensor([0.0])}, "integers"),
        "group listed twice": ([(g0, [0]), (g0, [1])], "twice"),
        "another model": ({g1: [0], foreign: [0]}, "another model"),
        "not a group": ({"conv1": [0]}, "Group"),
    }


@pytest.mark.parametrize("case", ["all units", "out of range", "negative", "duplicated", "float units",
                                  "group listed twice", "another model", "not a group"])
def test_bad_removals_raise_and_change_nothing(trained, case):
    model, opt, groups = trained
    removals, message = _bad_cases(model, groups)[case]
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=message):
        slice_model(model, removals, opt, example_inputs=X)
    _assert_same(before, model, opt)


def test_unknown_state_shape_raises_and_changes_nothing(trained):
    model, opt, groups = trained
    p = model.conv1.weight
    opt.state[p]["mystery"] = torch.zeros(3)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="mystery"):
        slice_model(model, {groups[1]: [0], groups[0]: [2]}, opt)
    _assert_same(before, model, opt)
    del opt.state[p]["mystery"]
    opt.state[p]["extra"] = torch.zeros_like(p)  # an unknown entry of W's shape is cut along
    slice_model(model, {groups[0]: [2]}, opt)
    assert opt.state[p]["extra"].shape == p.shape


def test_stale_group_after_slicing_raises(trained):
    model, opt, groups = trained
    slice_model(model, {groups[0]: [0]}, opt)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="find_groups again"):
        slice_model(model, {groups[0]: [1]}, opt)
    _assert_same(before, model, opt)
    fresh = find_groups(model, X, ignore=["fc"])
    slice_model(model, {fresh[0]: [1]}, opt)
    train_step(model, opt)


def test_group_norm_slices_like_a_model_built_narrower():
    """A masked channel still counts in its GroupNorm group's statistics, so
    the reference is the same network built with the kept widths and loaded
    with the kept entries of the weights and of the optimizer state."""
    torch.manual_seed(0)
    model = GroupNormNet()
    opt = sgd(model)
    train_step(model, opt)
    groups = find_groups(model, X, ignore=["fc"])
    assert [g.units for g in groups] == [4, 2]  # conv2: 2 conv groups of 6 channels and 3 GroupNorm groups of 4
    removals = {groups[0]: [1], groups[1]: [0]}
    kept = kept_indices(model, removals)
    narrow = GroupNormNet(widths=(6, 6))
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), narrow.parameters()):
            q.copy_(restrict(p, kept.get(name, {})))
    narrow_opt = sgd(narrow)
    for (name, p), q in zip(model.named_parameters(), narrow.parameters()):
        cuts = kept.get(name, {})
        for key, value in opt.state[p].items():  # W-shaped, or per row (lam)
            narrow_opt.state[q][key] = restrict(value, cuts if value.shape == p.shape else
                                                {d: k for d, k in cuts.items() if d == 0}).clone()
    slice_model(model, removals, opt)
    assert (model.gn1.num_channels, model.gn1.num_groups, model.gn2.num_channels, model.gn2.num_groups) == (6, 2, 6, 3)
    assert (model.conv2.in_channels, model.conv2.out_channels, model.conv2.groups) == (6, 6, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(X), narrow(X), rtol=0, atol=0)
    train_step(model, opt)
    train_step(narrow, narrow_opt)
    for p, q in zip(model.parameters(), narrow.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], narrow_opt.state[q]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7)


def test_uneven_cuts_of_grouped_convs_and_group_norms_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.GroupNorm(2, 8))
    opt = sgd(model)
    loss = model(X).square().mean()
    loss.backward()
    opt.step()
    before = _snapshot(model, opt)
    idx = torch.arange(8).reshape(8, 1)
    group = Group("g", 8, [Member("1.weight", 0, idx, "producer"), Member("1.bias", 0, idx, "row")]).bind(model)
    with pytest.raises(ValueError, match=r"leave its 2 groups unequal \(7 output and 8 input channels\)"):
        slice_model(model, {group: [0]}, opt)
    gn = Group("gn", 8, [Member("2.weight", 0, idx, "row"), Member("2.bias", 0, idx, "row")]).bind(model)
    with pytest.raises(ValueError, match="7 channels cannot form its 2 equal groups"):
        slice_model(model, {gn: [0]}, opt)
    _assert_same(before, model, opt)


@pytest.mark.parametrize("layer", ["grouped conv", "groupnorm"])
def test_a_cut_that_leaves_groups_unequal_is_refused(layer):
    """Removing two channels of one group (not the same position in every
    group) would move later channels into another group: refused, nothing changed."""
    torch.manual_seed(0)
    second = nn.Conv2d(8, 8, 3, groups=2) if layer == "grouped conv" else nn.GroupNorm(2, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), second)
    idx = torch.arange(8).reshape(8, 1)
    owner = "1" if layer == "grouped conv" else "0"
    members = [Member(f"{owner}.weight", 0, idx, "producer"), Member(f"{owner}.bias", 0, idx, "row")]
    if layer == "groupnorm":
        members += [Member("1.weight", 0, idx, "row"), Member("1.bias", 0, idx, "row")]
    group = Group("g", 8, members).bind(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="groups unequal|equal groups"):
        slice_model(model, {group: [0, 1]})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    slice_model(model, {group: [0, 4]})  # the same position in both groups is cut
    assert model[1].weight.shape[0] == 6
