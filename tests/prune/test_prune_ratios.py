"""Per-layer ratio specs of regkern.prune (float, per-stage list, index-range
string, dict; skip / ignore) and their errors."""
import pytest

from regkern.prune import layer_ratios, parse_ratio_string, pruned_count
from regkern.prune.ratios import layer_stages
from prune_models import TinyVGG, make

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET_LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "fc"]


def test_float_applies_to_every_layer_but_the_output_layer():
    assert layer_ratios(make(), 0.5) == {**{n: 0.5 for n in RESNET_LAYERS[:-1]}, "fc": 0.0}
    assert layer_ratios(make(), 0.5, ignore=())["fc"] == 0.5


def test_per_stage_list_follows_the_official_resnet_stages():
    assert layer_stages(RESNET_LAYERS) == [0, 1, 1, 2, 2, 3]
    out = layer_ratios(make(), [0.1, 0.2, 0.3, 0.4], ignore=())
    assert out == {"conv1": 0.1, "layer1.0.conv1": 0.2, "layer1.0.conv2": 0.2, "layer2.0.conv1": 0.3,
                   "layer2.0.conv2": 0.3, "fc": 0.4}
    assert layer_ratios(make(), "[0, 0.2, 0.3, 0]") == layer_ratios(make(), [0, 0.2, 0.3, 0])


def test_index_range_string_counts_conv_and_linear_layers_in_model_order():
    out = layer_ratios(make(), "[0:0, 1-3:0.3, 4:0.5]")
    assert out == {"conv1": 0.0, "layer1.0.conv1": 0.3, "layer1.0.conv2": 0.3, "layer2.0.conv1": 0.3,
                   "layer2.0.conv2": 0.5, "fc": 0.0}
    vgg = layer_ratios(make(TinyVGG), "0-1:0.25", ignore=())  # brackets optional, unlisted -> 0
    assert vgg == {"features.0": 0.25, "features.3": 0.25, "classifier": 0.0}
    assert parse_ratio_string("[2:0.5, 0-1:0.25,]", 3) == {0: 0.25, 1: 0.25, 2: 0.5}


def test_dict_skip_and_ignore():
    out = layer_ratios(make(), {"layer1.0.conv1": 0.5, "fc": 0.3}, ignore=())
    assert out["layer1.0.conv1"] == 0.5 and out["fc"] == 0.3 and out["conv1"] == 0.0
    out = layer_ratios(make(), 0.5, skip=["layer1", 0])  # a module prefix and an index
    assert [n for n, r in out.items() if r > 0] == ["layer2.0.conv1", "layer2.0.conv2"]
    out = layer_ratios(make(), 0.5, ignore=["layer2.0.conv2"])
    assert out["layer2.0.conv2"] == 0.0 and out["fc"] == 0.5


def test_pruned_count_is_the_official_rule():
    assert pruned_count(8, 0.5) == 4
    assert pruned_count(10, 0.3) == 3          # 0.3 * 10 is exactly 3.0 in floating point
    assert pruned_count(100, 0.07) == 8        # 0.07 * 100 is 7.000000000000001: the official ceil gives 8
    assert pruned_count(100, 0.55) == 56       # 55.00000000000001
    assert pruned_count(10, 0.31) == 4         # ceil
    assert pruned_count(4, 0.99) == 3          # never every row
    assert pruned_count(1, 0.9) == 0 and pruned_count(8, 0.0) == 0


@pytest.mark.parametrize("ratios, match", [
    (1.0, "out of range"),
    (-0.1, "out of range"),
    ([0.1, 1.5, 0.2, 0.0], "out of range"),
    ({"layer1.0.conv1": 2.0}, "out of range"),
    ({"layer9.conv": 0.5}, "not a conv/linear layer"),
    ([0.1, 0.2], "per-stage ratio list has 2 entries"),
    ("[0:0.5, 3-1:0.2]", "ends before it starts"),
    ("[0-:0.3]", "not a layer index"),
    ("[0:0.5, 1:abc]", "not a number"),
    ("[0:0.5:1]", "not 'index:ratio'"),
    ("[0:0.5", "unbalanced brackets"),
    ("[7:0.5]", "names layer 7"),
    ("[]", "lists no ratios"),
    ("0.5", None),  # a one-stage list: fine for a one-stage model only
    (True, "must be a float"),
    (object(), "must be a float"),
])
def test_bad_ratio_specs_are_refused(ratios, match):
    model = make()
    if match is None:
        with pytest.raises(ValueError, match="per-stage ratio list has 1 entries"):
            layer_ratios(model, ratios)
        return
    with pytest.raises(ValueError, match=match):
        layer_ratios(model, ratios)


@pytest.mark.parametrize("kwargs, match", [
    (dict(skip=["layer7"]), "no conv/linear layer is named 'layer7'"),
    (dict(skip=[17]), "layer index 17 is out of range"),
    (dict(ignore=["nope"]), "no conv/linear layer is named 'nope'"),
    (dict(skip=[1.5]), "by name or index"),
])
def test_unknown_layers_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer_ratios(make(), 0.5, **kwargs)
