"""find_groups on sequence models: what the residual rule counts as a residual
join, and the warning for layers the trace did not reach."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regkern.groups import find_groups

from models import ConvBNConv, image_batch, resnet_basic

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))  # (batch, seq, features)


def producers(groups):
    return {g.name: sorted(m.name.rsplit(".", 1)[0] for m in g.by_role("producer")) for g in groups}


def no_warnings(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return find_groups(*args, **kwargs)


def unreached_warnings(*args, **kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        find_groups(*args, **kwargs)
    return [str(w.message) for w in record if "did not reach" in str(w.message)]


# --------------------------------------------------------------------------- residual joins

class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        out = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class PreLNBlock(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim=16, hidden=24, heads=2):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(dim), SelfAttention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.blocks = nn.Sequential(PreLNBlock(), PreLNBlock())
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def test_residual_rule_keeps_mlp_neurons_on_sequence_inputs():
    """Linear on (batch, seq, features) adds its bias after a matmul: that is no residual join."""
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4))
    kept = producers(find_groups(model, SEQ, ignore=["4"], residual_rule=True))
    assert kept == {"0": ["0"], "2": ["2"]}
    assert [g.units for g in find_groups(model, SEQ, ignore=["4"], residual_rule=True)] == [16, 12]


def test_residual_rule_on_a_pre_ln_transformer():
    model = TinyTransformer()
    everything = producers(find_groups(model, SEQ, ignore=["head"]))
    stream = ["blocks.0.attn.proj", "blocks.0.fc2", "blocks.1.attn.proj", "blocks.1.fc2", "embed"]
    assert everything["embed"] == stream  # the residual adds join the stream's producers
    kept = producers(find_groups(model, SEQ, ignore=["head"], residual_rule=True))
    # the stream's width is joined by residual adds and keeps its channels; the MLP neurons
    # and the attention heads (found from the modules' head counts) stay prunable
    assert "embed" not in kept
    assert not {p for names in kept.values() for p in names} & set(stream)
    assert kept["blocks.0.fc1"] == ["blocks.0.fc1"] and kept["blocks.1.fc1"] == ["blocks.1.fc1"]
    for block in ("blocks.0", "blocks.1"):
        assert kept[f"{block}.attn"] == [f"{block}.attn.{p}" for p in "kqv"]


class Affine(nn.Module):
    """x * gamma + beta with parameters of its own (a bias add written by hand)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.gamma + self.beta


class BiasAdds(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.affine, self.fc2 = nn.Linear(6, 10), Affine(10), nn.Linear(10, 3)
        self.register_buffer("offset", torch.linspace(0, 1, 10))

    def forward(self, x):
        h = self.affine(self.fc1(x)) + 0.5            # a scalar
        h = h - self.offset                             # a buffer
        h = h + torch.ones(10, device=x.device)         # a constant tensor
        h = h + (x.sum(-1, keepdim=True) > 0).float()   # a mask computed from the inputs
        return self.fc2(F.relu(h))


@pytest.mark.parametrize("x", [SEQ, SEQ[:, 0]], ids=["3d", "2d"])
def test_adds_of_parameters_and_constants_are_no_residual_joins(x):
    model = BiasAdds()
    kept = producers(find_groups(model, x, ignore=["fc2"], residual_rule=True))
    assert kept == {"fc1": ["fc1"]}


def test_parallel_branches_on_the_same_input_join():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(8, 10), nn.Linear(8, 10), nn.Linear(10, 2)

        def forward(self, x):
            h = F.relu(self.stem(x))
            return self.out(self.a(h) + F.relu(self.b(h)))

    model = TwoBranches()
    assert set(producers(find_groups(model, SEQ, ignore=["out"]))) == {"stem", "a"}
    assert producers(find_groups(model, SEQ, ignore=["out"], residual_rule=True)) == {"stem": ["stem"]}


def test_tiny_bert_keeps_its_intermediate_neurons():
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    kept = producers(find_groups(model, {"input_ids": ids}, residual_rule=True))
    for layer in range(2):
        assert kept[f"encoder.layer.{layer}.intermediate.dense"] == [f"encoder.layer.{layer}.intermediate.dense"]
    stream = {"embeddings.word_embeddings"} | {f"encoder.layer.{i}.{p}.dense" for i in range(2)
                                              for p in ("attention.output", "output")}
    assert not {p for names in kept.values() for p in names} & stream


# --------------------------------------------------------------------------- layers the trace left out

class NumpyRoundTrip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.fc = nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = torch.from_numpy(h.detach().numpy() * 0.5)
        return self.fc(self.conv2(h).mean((2, 3)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.pos, self.neg, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.stem(x)
        h = self.pos(h) if x.sum() > 0 else self.neg(h)
        return self.out(F.relu(h))


def test_numpy_round_trip_warns_naming_the_layers_left_out():
    model = NumpyRoundTrip()
    with pytest.warns(UserWarning, match="did not reach") as record:
        groups = find_groups(model, image_batch(2), ignore=["fc"])
    messages = [str(w.message) for w in record if "did not reach" in str(w.message)]
    assert len(messages) == 1
    assert "'conv1'" in messages[0] and "'bn'" in messages[0] and "ignore=" in messages[0]
    assert "'conv2'" not in messages[0] and "'fc'" not in messages[0]
    assert [g.name for g in groups] == ["conv2"]
    # naming them in ignore says they are meant to stay: no warning
    no_warnings(model, image_batch(2), ignore=["fc", "conv1", "bn"])


def test_a_data_dependent_branch_warns_naming_the_skipped_layer():
    model = Branchy()
    with pytest.warns(UserWarning, match="did not reach") as record:
        find_groups(model, -SEQ.abs(), ignore=["out"])
    message = " ".join(str(w.message) for w in record)
    assert "'pos'" in message and "'neg'" not in message and "'stem'" not in message
    with pytest.warns(UserWarning, match="'neg'"):
        find_groups(model, SEQ.abs(), ignore=["out"])


def test_fully_traced_models_do_not_warn():
    no_warnings(ConvBNConv(), image_batch(2), ignore=["fc"])
    no_warnings(resnet_basic(), image_batch(2), ignore=["fc"], residual_rule=True)
    no_warnings(TinyTransformer(), SEQ, ignore=["head"])
    mha = nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), nn.Linear(16, 2))
    # its out_proj is called inside nn.MultiheadAttention, which the trace reaches
    # (regkern cannot slice nn.MultiheadAttention and says so in another warning)
    assert unreached_warnings(mha.eval(), SEQ, ignore=["2"]) == []


def test_a_residual_add_onto_the_raw_input_is_a_join():
    """y = x + c2(relu(c1(x))): c2's output channels are x's channels, which cannot be cut."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return x + self.c2(torch.relu(self.c1(x)))

    x = torch.randn(2, 4, 6, 6)
    names = set(producers(find_groups(Block(), x, residual_rule=True)))
    assert names == {"c1"}
