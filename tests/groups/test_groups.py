"""find_groups, group_scores and set_group_lambda."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regkern
from regkern.groups import Group, Member, _check_disjoint, find_groups, group_scores, set_group_lambda

from models import ConcatNet, ConvBNConv, MobileNetV2Like, VGG, image_batch, resnet_basic, resnet_bottleneck
from optim_helpers import CPU_BACKENDS

X = image_batch(2)


pytestmark = pytest.mark.usefixtures("one_thread")


def by_name(groups):
    return {g.name: g for g in groups}


def members(group):
    return {(m.name, m.dim): m for m in group.members}


def producers(groups):
    return {m.name.rsplit(".", 1)[0] for g in groups for m in g.by_role("producer")}


# --------------------------------------------------------------------------- structure

def test_conv_bn_conv_group_lists_every_slice():
    model = ConvBNConv()
    groups = by_name(find_groups(model, X, ignore=["fc"]))
    assert set(groups) == {"conv1", "conv2"}
    g = groups["conv1"]
    assert g.units == 6
    roles = {(m.name, m.dim): m.role for m in g.members}
    assert roles == {("conv1.weight", 0): "producer", ("conv1.bias", 0): "row", ("bn.weight", 0): "row",
                     ("bn.bias", 0): "row", ("conv2.weight", 1): "column"}
    for m in g.members:
        assert torch.equal(m.index, torch.arange(6).reshape(6, 1))
    assert {b.name for b in g.buffers} == {"bn.running_mean", "bn.running_var"}
    assert set(members(groups["conv2"])) == {("conv2.weight", 0), ("conv2.bias", 0), ("fc.weight", 1)}
    # the classifier's outputs are never a unit; without ignore it is
    assert "fc" not in groups and "fc" in by_name(find_groups(model, X))
    assert g.tensors["conv1.weight"] is model.conv1.weight


def test_flatten_gives_each_channel_its_columns():
    model = VGG()
    last = by_name(find_groups(model, X, ignore=[model.fc]))["features.10"]
    cols = members(last)[("hidden.weight", 1)]
    assert cols.role == "column" and cols.index.shape == (12, 16)
    assert torch.equal(cols.index, torch.arange(12 * 16).reshape(12, 16))


def test_concatenation_columns_sit_at_their_offsets():
    groups = by_name(find_groups(ConcatNet(), X, ignore=["fc"]))
    left, right = groups["left.0"], groups["right.0"]
    for consumer in ("mix.0.weight", "side.weight"):
        assert torch.equal(members(left)[(consumer, 1)].index.reshape(-1), torch.arange(6))
        assert torch.equal(members(right)[(consumer, 1)].index.reshape(-1), 6 + torch.arange(4))
    # concat -> pool 2x2 -> flatten -> fc: 4 columns per channel, side's after mix's 8 * 4
    assert torch.equal(members(groups["mix.0"])[("fc.weight", 1)].index, torch.arange(32).reshape(8, 4))
    assert torch.equal(members(groups["side"])[("fc.weight", 1)].index, 32 + torch.arange(20).reshape(5, 4))


def test_depthwise_conv_follows_its_channels():
    groups = by_name(find_groups(MobileNetV2Like(), X, ignore=["fc"]))
    expand = groups["block1.expand.0"]
    assert members(expand)[("block1.depthwise.0.weight", 0)].role == "row"
    assert ("block1.project.0.weight", 1) in members(expand)
    assert not any(name.startswith("block1.depthwise") for name in groups)


def test_residual_add_joins_producers_and_the_rule_drops_them():
    model = resnet_basic()
    groups = find_groups(model, X, ignore=["fc"])
    stem = by_name(groups)["conv1"]
    assert {m.name for m in stem.by_role("producer")} == {"conv1.weight", "layer1.0.conv2.weight",
                                                          "layer1.1.conv2.weight"}
    stage2 = by_name(groups)["layer2.0.conv2"]
    assert {m.name for m in stage2.by_role("producer")} == {"layer2.0.conv2.weight", "layer2.0.downsample.0.weight"}
    kept = find_groups(model, X, ignore=["fc"], residual_rule=True)
    assert producers(kept) == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"}


def test_residual_rule_bottleneck_and_inverted_residual():
    kept = producers(find_groups(resnet_bottleneck(), X, ignore=["fc"], residual_rule=True))
    assert kept == {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                    "layer2.0.conv1", "layer2.0.conv2"}
    kept = producers(find_groups(MobileNetV2Like(), X, ignore=["fc"], residual_rule=True))
    # block1 has a residual add: its projection (and the stem feeding the add) keep their channels
    assert kept == {"block1.expand.0", "block2.expand.0", "block2.project.0", "head.0"}


def test_find_groups_leaves_the_model_as_it_was():
    model = resnet_basic()
    model.train()
    model.layer1.eval()
    state = copy.deepcopy(model.state_dict())
    find_groups(model, X, ignore=["fc"])
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_ignore_and_untraceable_models_raise():
    model = ConvBNConv()
    with pytest.raises(ValueError, match="no module named"):
        find_groups(model, X, ignore=["nope"])
    with pytest.raises(ValueError, match="not part of the model"):
        find_groups(model, X, ignore=[nn.Linear(2, 2)])

    class Rotary(nn.Module):  # chunk + cat on the last dim: torch-pruning 1.6 fails inside
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            a, b = self.lin(x).chunk(2, -1)
            return self.out(torch.cat([-b, a], -1))

    rotary = Rotary()
    rotary.train()
    with pytest.raises(ValueError, match="could not trace"):
        find_groups(rotary, torch.randn(2, 8))
    assert rotary.training
    with pytest.raises(ValueError, match="could not trace"):
        find_groups(model, torch.randn(2, 5, 16, 16))  # wrong input channels


def test_grouped_convolutions_cut_the_same_position_of_every_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = {g.name: g for g in find_groups(model, X, ignore=["6"])}
    assert sorted(groups) == ["0", "2", "4"]
    pairs = torch.tensor([[0, 4], [1, 5], [2, 6], [3, 7]])  # channel p of each of the 2 groups of 4
    # conv 0's channels feed the grouped conv, whose input columns (4 per group) are shared by its groups
    assert groups["0"].units == 4
    assert {(n, d, m.role) for (n, d), m in members(groups["0"]).items()} == \
        {("0.weight", 0, "producer"), ("0.bias", 0, "row"), ("2.weight", 1, "column")}
    index = {m.name: m.index for m in groups["0"].members}
    assert torch.equal(index["0.weight"], pairs) and torch.equal(index["2.weight"], torch.arange(4).reshape(4, 1))
    # the grouped conv's own outputs: the same position of both groups of rows
    assert groups["2"].units == 4
    index = {(m.name, m.dim): m.index for m in groups["2"].members}
    assert torch.equal(index[("2.weight", 0)], pairs) and torch.equal(index[("4.weight", 1)], pairs)
    assert groups["4"].units == 6


def test_overlapping_groups_are_refused():
    model = ConvBNConv()
    idx = torch.arange(6).reshape(6, 1)
    a = Group("a", 6, [Member("conv1.weight", 0, idx, "producer")]).bind(model)
    b = Group("b", 3, [Member("conv1.weight", 0, idx[::2].reshape(3, 1), "producer")]).bind(model)
    with pytest.raises(ValueError, match="both claim"):
        _check_disjoint(model, [a, b])
    with pytest.raises(ValueError, match="lie in"):
        Group("c", 6, [Member("conv1.weight", 0, idx + 1, "producer")]).bind(model)
    with pytest.raises(ValueError, match="no parameter"):
        Group("d", 6, [Member("conv9.weight", 0, idx, "producer")]).bind(model)


# --------------------------------------------------------------------------- scores

def direct_scores(model, group, kind, scope):
    """Scores from unit masks over each member's whole tensor (another route than slicing)."""
    params = dict(model.named_parameters())
    chosen = group.by_role("producer") if scope == "producer" else group.members
    l1 = torch.zeros(group.units, dtype=torch.float64)
    sq = torch.zeros(group.units, dtype=torch.float64)
    count = 0
    for m in chosen:
        w = params[m.name].detach().double()
        for u in range(group.units):
            mask = torch.zeros(w.shape[m.dim], dtype=torch.float64)
            mask[m.index[u]] = 1
            shaped = mask.reshape([-1 if d == m.dim else 1 for d in range(w.dim())])
            l1[u] += (w.abs() * shaped).sum()
            sq[u] += (w.square() * shaped).sum()
        count += m.index.shape[1] * w.numel() // w.shape[m.dim]
    return {"l1": l1, "l2": sq.sqrt(), "mean_abs": l1 / count}[kind].float()


@pytest.mark.parametrize("kind", ["l1", "l2", "mean_abs"])
@pytest.mark.parametrize("scope", ["producer", "group"])
def test_group_scores_match_a_direct_computation(kind, scope):
    torch.manual_seed(0)
    model = VGG()
    groups = find_groups(model, X, ignore=["fc"])
    for group, score in zip(groups, group_scores(model, groups, kind, scope)):
        assert score.dtype == torch.float32 and score.shape == (group.units,)
        torch.testing.assert_close(score, direct_scores(model, group, kind, scope), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["l1", "l2", "mean_abs"])
def test_group_scores_read_row_norms_after_a_step(kind):
    torch.manual_seed(0)
    model = resnet_basic()
    opt = regkern.SGD([{"params": model.parameters(), "regularizer": regkern.RowL2(track_norms=True)}],
                      lr=0.1, momentum=0.9)
    groups = find_groups(model, X, ignore=["fc"])
    untouched = group_scores(model, groups, kind, "group", optimizer=opt)  # zeros: never stepped, W is read
    for g, s in zip(groups, untouched):
        torch.testing.assert_close(s, direct_scores(model, g, kind, "group"), rtol=1e-5, atol=1e-7)
    F.cross_entropy(model(X), torch.tensor([1, 2])).backward()
    opt.step()
    for scope in ("producer", "group"):
        for g, s in zip(groups, group_scores(model, groups, kind, scope, optimizer=opt)):
            torch.testing.assert_close(s, direct_scores(model, g, kind, scope), rtol=1e-5, atol=1e-6)
    # they are really read: doubling one producer's norms doubles its scores (l1, l2)
    group = by_name(groups)["layer1.0.conv1"]
    opt.state[model.layer1[0].conv1.weight]["row_norms"].mul_(2)
    doubled = group_scores(model, [group], kind, "producer", optimizer=opt)[0]
    torch.testing.assert_close(doubled, 2 * direct_scores(model, group, kind, "producer"), rtol=1e-5, atol=1e-6)


def test_group_scores_refuse_bad_arguments():
    model = ConvBNConv()
    groups = find_groups(model, X, ignore=["fc"])
    with pytest.raises(ValueError, match="kind"):
        group_scores(model, groups, "l3")
    with pytest.raises(ValueError, match="scope"):
        group_scores(model, groups, "l1", "rows")
    with pytest.raises(ValueError, match="another model"):
        group_scores(ConvBNConv(), groups)


# --------------------------------------------------------------------------- lambdas

def _conv_model_and_opt(columns=True, element=False):
    torch.manual_seed(0)
    model = ConvBNConv()
    reg = regkern.ElementL2() if element else regkern.RowL2(columns=columns)
    opt = regkern.SGD([{"params": model.parameters(), "regularizer": reg}], lr=0.1)
    group = by_name(find_groups(model, X, ignore=["fc"]))["conv1"]
    return model, opt, group


def test_set_group_lambda_scopes():
    model, opt, group = _conv_model_and_opt()
    values = torch.arange(1.0, 7.0)
    lam = lambda p: opt.state[p]["lam"]  # noqa: E731
    set_group_lambda(opt, group, values, scope="producer")
    assert torch.equal(lam(model.conv1.weight), values)
    assert not lam(model.conv1.bias).any() and not lam(model.bn.weight).any()
    set_group_lambda(opt, group, values * 2, scope="rows")
    for p in (model.conv1.weight, model.conv1.bias, model.bn.weight, model.bn.bias):
        assert torch.equal(lam(p), values * 2)
    assert not opt.state[model.conv2.weight]["lam_cols"].any()
    set_group_lambda(opt, group, 0.5, scope="group")
    assert torch.equal(opt.state[model.conv2.weight]["lam_cols"], torch.full((6,), 0.5))
    assert not lam(model.conv2.weight).any()  # conv2's rows belong to another group


def test_set_group_lambda_element_lam_fills_rows():
    model, opt, group = _conv_model_and_opt(element=True)
    set_group_lambda(opt, group, torch.arange(6.0), scope="producer")
    expected = torch.arange(6.0).reshape(6, 1, 1, 1).expand_as(model.conv1.weight)
    assert torch.equal(opt.state[model.conv1.weight]["lam"], expected)


def test_set_group_lambda_errors_write_nothing():
    model, opt, group = _conv_model_and_opt(columns=False)
    before = {k: v.clone() for k, v in opt.state[model.conv1.weight].items()}
    with pytest.raises(ValueError, match="lam_cols"):
        set_group_lambda(opt, group, 1.0, scope="group")  # conv2 has no column lambdas
    assert torch.equal(opt.state[model.conv1.weight]["lam"], before["lam"])
    with pytest.raises(ValueError, match="one value per unit"):
        set_group_lambda(opt, group, torch.ones(5))
    with pytest.raises(ValueError, match="finite"):
        set_group_lambda(opt, group, float("nan"))
    with pytest.raises(ValueError, match="scope"):
        set_group_lambda(opt, group, 1.0, scope="columns")
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="RowL2"):
        set_group_lambda(plain, group, 1.0)
    unbound = Group(group.name, group.units, group.members)
    with pytest.raises(ValueError, match="not bound"):
        set_group_lambda(opt, unbound, 1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_coupled_regularization_through_sgd_is_the_explicit_math(backend):
    """d = g + lam_row[r] W + lam_col[c] W on every member of a conv -> bn -> conv group."""
    torch.manual_seed(0)
    model = ConvBNConv()
    opt = regkern.SGD([{"params": model.parameters(), "regularizer": regkern.RowL2(columns=True)}],
                      lr=0.1, momentum=0.9, backend=backend)
    groups = find_groups(model, X, ignore=["fc"])
    for g, values in zip(groups, (torch.linspace(0.1, 0.6, 6), torch.linspace(-0.05, 0.2, 4))):
        set_group_lambda(opt, g, values, scope="group")
    params = list(model.parameters())
    bufs = [None] * len(params)
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(model(X), torch.tensor([0, 2])).backward()
        expected = []
        for i, p in enumerate(params):
            w, st = p.detach().double(), opt.state[p]
            lam_row = st["lam"].double().reshape([-1] + [1] * (w.dim() - 1))
            d = p.grad.double() + lam_row * w
            if "lam_cols" in st:
                d = d + st["lam_cols"].double().reshape([1, -1] + [1] * (w.dim() - 2)) * w
            bufs[i] = d if bufs[i] is None else 0.9 * bufs[i] + d
            expected.append(w - 0.1 * bufs[i])
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e.float(), rtol=1e-5, atol=1e-6)
    assert opt.state[model.conv2.weight]["lam_cols"].any() and opt.state[model.fc.weight]["lam_cols"].any()


def test_group_scores_read_w_once_the_weights_changed_after_the_step():
    """Row norms written by a step describe the weights of that step only:
    after model.load_state_dict or an in-place edit the scores come from W."""
    torch.manual_seed(0)
    model = resnet_basic()
    opt = regkern.SGD([{"params": model.parameters(), "regularizer": regkern.RowL2(track_norms=True)}],
                      lr=0.1, momentum=0.9)
    groups = find_groups(model, X, ignore=["fc"])
    group = by_name(groups)["layer1.0.conv1"]
    F.cross_entropy(model(X), torch.tensor([1, 2])).backward()
    opt.step()
    other = resnet_basic()
    model.load_state_dict(other.state_dict())  # other weights, other ranking
    score = group_scores(model, [group], "l1", "producer", optimizer=opt)[0]
    torch.testing.assert_close(score, direct_scores(model, group, "l1", "producer"), rtol=1e-5, atol=1e-6)
    conv = model.layer1[0].conv1.weight
    with torch.no_grad():
        conv[0].mul_(100)  # an in-place edit
    score = group_scores(model, [group], "l1", "producer", optimizer=opt)[0]
    torch.testing.assert_close(score, direct_scores(model, group, "l1", "producer"), rtol=1e-5, atol=1e-6)
