"""Attention heads (and transformer MLP neurons) as prunable units.

Reference for every slicing test: the same model with the removed units'
rows and columns zeroed ("masked"). A removed head then contributes nothing
(its v rows and o columns are zero), so the sliced model must compute the
same function, and one optimizer step after slicing must equal the masked
model's step on the kept entries.
"""
import copy
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models_attention import GQAttention, RMSNorm, SelfAttention, TinyLlama, TinyViT, repeat_kv
from regkern import SGD, RowL2
from regkern.attention import Heads, claimed_modules, head_groups
from regkern.groups import find_groups, group_scores, set_group_lambda
from regkern.slicing import slice_model


def vit(fused=False):
    model = TinyViT(fused=fused)
    inner = (("inner_dim", 8),)  # 8 channels per head
    if fused:
        specs = [Heads(qkv=b.attn.qkv, o=b.attn.proj, extra_attributes=inner) for b in model.blocks]
    else:
        specs = [Heads(q=f"blocks.{i}.attn.q", k=f"blocks.{i}.attn.k", v=f"blocks.{i}.attn.v",
                       o=f"blocks.{i}.attn.proj", num_heads=4, module=model.blocks[i].attn, extra_attributes=inner)
                 for i in range(len(model.blocks))]
    return model, torch.randn(2, 5, 12), specs


def llama(num_kv_heads=4):
    model = TinyLlama(num_heads=8, num_kv_heads=num_kv_heads)
    specs = [Heads(q=layer.self_attn.q_proj, k=layer.self_attn.k_proj, v=layer.self_attn.v_proj,
                   o=layer.self_attn.o_proj) for layer in model.layers]
    return model, torch.randint(0, 50, (2, 7)), specs


CASES = {
    "vit": lambda: vit(fused=False),
    "vit_fused_qkv": lambda: vit(fused=True),
    "llama_gqa": lambda: llama(num_kv_heads=4),
    "llama_gqa_2kv": lambda: llama(num_kv_heads=2),
    "llama_mha": lambda: llama(num_kv_heads=8),
    "llama_mqa": lambda: llama(num_kv_heads=1),  # one kv head: the units are the 8 query heads
}
MLP_PRODUCERS = ("fc1.weight", "gate_proj.weight", "up_proj.weight")


def pick_groups(model, x, specs):
    """find_groups with heads: the head groups and the MLP neuron groups."""
    groups = find_groups(model, x, heads=specs)
    names = {g.name for g in head_groups(model, specs)}
    heads = [g for g in groups if g.name in names]
    mlp = [g for g in groups if g.name not in names
           and any(m.name.endswith(MLP_PRODUCERS) for m in g.by_role("producer"))]
    assert len(heads) == len(specs) and len(mlp) == len(specs)
    return groups, heads, mlp


def removals_for(heads, mlp):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i, g in enumerate(heads):
        out.append((g, sorted(torch.randperm(g.units, generator=gen)[:1 + i % (g.units - 1)].tolist())))
    for g in mlp:
        out.append((g, sorted(torch.randperm(g.units, generator=gen)[:g.units // 3].tolist())))
    return out


def mask_(model, removals):
    """Zero every removed unit's slice of every member, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for group, units in removals:
            for m in group.members:
                params[m.name].index_fill_(m.dim, m.index[units].reshape(-1), 0.0)


def kept_taker(removals):
    """``take(name, tensor, dims)``: the entries of a full-size tensor that slicing keeps."""
    removed = defaultdict(lambda: defaultdict(set))
    for group, units in removals:
        for m in group.members:
            removed[m.name][m.dim].update(m.index[units].reshape(-1).tolist())

    def take(name, t, dims=(0, 1)):
        for dim, gone in removed[name].items():
            if dim in dims:
                keep = torch.tensor([i for i in range(t.shape[dim]) if i not in gone])
                t = t.index_select(dim, keep)
        return t
    return take


@pytest.mark.parametrize("case", sorted(CASES))
def test_find_groups_mlp_and_heads_do_not_overlap(case):
    torch.manual_seed(0)
    model, x, specs = CASES[case]()
    groups, heads, mlp = pick_groups(model, x, specs)
    for g in mlp:  # fc1 rows (+bias) -> fc2 columns; gate + up rows -> down columns
        roles = {(m.name.rsplit(".", 2)[-2], m.dim, m.role) for m in g.members}
        if "fc1" in {r[0] for r in roles}:
            assert roles == {("fc1", 0, "producer"), ("fc1", 0, "row"), ("fc2", 1, "column")}
        else:
            assert roles == {("gate_proj", 0, "producer"), ("up_proj", 0, "producer"), ("down_proj", 1, "column")}
        assert g.units == g.members[0].index.shape[0] and g.members[0].index.shape[1] == 1
    head_slices = {(m.name, m.dim) for g in heads for m in g.members}
    for g in groups:
        if g not in heads:
            assert not head_slices & {(m.name, m.dim) for m in g.members}, g.name
    claimed = {id(m) for m in claimed_modules(model, specs)}
    assert len(claimed) == sum(3 if s.qkv is None else 1 for s in specs)


def test_head_group_layout_gqa():
    torch.manual_seed(0)
    model, x, specs = llama(num_kv_heads=2)
    g = head_groups(model, specs[:1], x)[0]
    assert g.name == "layers.0.self_attn" and g.units == 2
    assert g.attributes == [("layers.0.self_attn", "num_heads", 4), ("layers.0.self_attn", "num_kv_heads", 1)]
    by_name = {m.name.split(".")[-2]: m for m in g.members}
    assert [(m.dim, m.role) for m in by_name.values()] == [(0, "producer")] * 3 + [(1, "column")]
    assert torch.equal(by_name["q_proj"].index[1], torch.arange(32, 64))  # q heads 4..7, head_dim 8
    assert torch.equal(by_name["k_proj"].index[1], torch.arange(8, 16))
    assert torch.equal(by_name["v_proj"].index[1], torch.arange(8, 16))
    assert torch.equal(by_name["o_proj"].index, by_name["q_proj"].index)
    q, k, v = (model.get_submodule(f"layers.0.self_attn.{n}_proj").weight for n in "qkv")
    l2 = (q[32:].pow(2).sum() + k[8:].pow(2).sum() + v[8:].pow(2).sum()).sqrt()
    assert torch.allclose(group_scores(model, [g], kind="l2")[0][1], l2)


def test_head_group_layout_fused_qkv():
    model, x, specs = vit(fused=True)
    g = head_groups(model, specs, x)[1]
    qkv = g.members[0]
    assert (qkv.name, g.units) == ("blocks.1.attn.qkv.weight", 4)
    assert g.attributes == [("blocks.1.attn", "num_heads", 1), ("blocks.1.attn", "inner_dim", 8)]
    assert torch.equal(qkv.index[2], torch.cat([torch.arange(16, 24), torch.arange(48, 56), torch.arange(80, 88)]))
    assert [m.role for m in g.members] == ["producer", "row", "column"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_slicing_heads_and_neurons_matches_masked_model(case):
    torch.manual_seed(0)
    model, x, specs = CASES[case]()
    _, heads, mlp = pick_groups(model, x, specs)
    removals = removals_for(heads, mlp)
    masked = copy.deepcopy(model)
    mask_(masked, removals)
    before = {n: p.shape for n, p in model.named_parameters()}
    slice_model(model, removals)
    with torch.no_grad():
        out, ref = model(x), masked(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    take = kept_taker(removals)
    for name, p in model.named_parameters():
        assert p.shape == take(name, torch.empty(before[name])).shape, name
    for g, units in removals[:len(heads)]:  # head counts follow: n_rep query heads per kv group
        attn, ref_attn = model.get_submodule(g.name), masked.get_submodule(g.name)
        kv = getattr(ref_attn, "num_kv_heads", ref_attn.num_heads)
        n_rep = 1 if kv == 1 else ref_attn.num_heads // kv  # one kv head: a unit is one query head
        assert attn.num_heads == ref_attn.num_heads - len(units) * n_rep
        if hasattr(ref_attn, "num_kv_heads"):
            assert attn.num_kv_heads == (1 if kv == 1 else ref_attn.num_kv_heads - len(units))
        if hasattr(ref_attn, "inner_dim"):
            assert attn.inner_dim == ref_attn.inner_dim - len(units) * 8


@pytest.mark.parametrize("case", ["vit", "vit_fused_qkv", "llama_gqa"])
def test_sgd_step_after_slicing_matches_masked_step(case):
    torch.manual_seed(0)
    model, x, specs = CASES[case]()
    _, heads, mlp = pick_groups(model, x, specs)
    removals = removals_for(heads, mlp)
    head_rows = {m.name for g in heads for m in g.by_role("producer")}

    def optimizer_for(net):
        rows = [p for n, p in net.named_parameters() if n in head_rows]
        rest = [p for n, p in net.named_parameters() if n not in head_rows]
        return SGD([{"params": rows, "regularizer": RowL2()}, {"params": rest}], lr=0.05, momentum=0.9,
                   weight_decay=1e-3)

    def train_step(net, opt):
        opt.zero_grad()
        net(x).float().pow(2).mean().backward()
        opt.step()

    opt = optimizer_for(model)
    gen = torch.Generator().manual_seed(2)
    for g in heads:  # one lambda per head (or kv group), on its q/k/v rows
        set_group_lambda(opt, g, torch.rand(g.units, generator=gen))
    train_step(model, opt)  # momentum buffers now hold something
    masked = copy.deepcopy(model)
    opt_masked = optimizer_for(masked)
    opt_masked.load_state_dict(copy.deepcopy(opt.state_dict()))  # no tensors shared with opt
    mask_(masked, removals)
    slice_model(model, removals, optimizer=opt)
    train_step(model, opt)
    train_step(masked, opt_masked)

    take = kept_taker(removals)
    masked_params = dict(masked.named_parameters())
    for name, p in model.named_parameters():
        ref = masked_params[name]
        assert torch.allclose(p, take(name, ref.detach()), atol=1e-6, rtol=1e-5), name
        buf, ref_buf = opt.state[p]["momentum_buffer"], opt_masked.state[ref]["momentum_buffer"]
        assert torch.allclose(buf, take(name, ref_buf), atol=1e-6, rtol=1e-5), name
        if name in head_rows:
            assert torch.equal(opt.state[p]["lam"], take(name, opt_masked.state[ref]["lam"], dims=(0,)))


# ----------------------------------------------------------------------------- bad specs


def bad(model, spec, match, x=None):
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        head_groups(model, [spec], x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_specs_raise_clear_errors():
    model, x, _ = vit()
    a = "blocks.0.attn."
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "nope", o=a + "proj"), "names no module")
    bad(model, Heads(q=a + "q", k=a + "k", o=a + "proj"), "missing")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v"), "o .* required")
    bad(model, Heads(qkv=a + "q", q=a + "q", k=a + "k", v=a + "v", o=a + "proj"), "either qkv or q/k/v")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o="blocks.0.norm1"), "must be nn.Linear or transformers. Conv1D")
    bad(model, Heads(q=a + "q", k=a + "q", v=a + "v", o=a + "proj"), "same Linear")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", num_heads=8), "num_heads=8 but .*is 4")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", num_heads=3, heads_attr=None),
        "not a multiple of num_heads=3")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", head_dim=4), "head_dim=4 but")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", heads_attr="n_heads"), "no attribute 'n_heads'")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", num_kv_heads=2), "grouped-query .* no attribute")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", num_kv_heads=3, kv_heads_attr=None),
        "does not divide")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", num_kv_heads=2, kv_heads_attr=None),
        "k has 32 rows")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", extra_attributes=(("dim", 8),)),
        "no int attribute 'dim'")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", extra_attributes=(("num_heads", 1),)),
        "named twice")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj", extra_attributes=("inner_dim", 8)),
        "must be \\(attribute, per_unit\\)")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o=nn.Linear(32, 32)), "not a submodule")
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o="blocks.1.attn.proj"), "'blocks' .* no attribute 'num_heads'")
    # shapes fit, but o belongs to another block: only the dependency graph can tell
    bad(model, Heads(q=a + "q", k=a + "k", v=a + "v", o="blocks.1.attn.proj", module=a[:-1]), "does not feed", x)
    with pytest.raises(ValueError, match="also in"):
        head_groups(model, [Heads(q=a + "q", k=a + "k", v=a + "v", o=a + "proj")] * 2)
    with pytest.raises(ValueError, match="sequence of them"):
        head_groups(model, "blocks.0.attn")
    fused, _, _ = vit(fused=True)
    bad(fused, Heads(qkv="blocks.0.attn.qkv", o="blocks.0.attn.proj", num_kv_heads=2, kv_heads_attr=None),
        "o has 32 input columns, expected num_heads \\* head_dim = 4 \\* 12")
    gqa, _, _ = llama(num_kv_heads=4)
    s = "layers.0.self_attn."
    bad(gqa, Heads(q=s + "q_proj", k=s + "k_proj", v=s + "v_proj", o=s + "o_proj", num_kv_heads=2),
        "num_kv_heads=2 but")
    bad(gqa, Heads(q=s + "q_proj", k=s + "k_proj", v=s + "v_proj", o=s + "o_proj", kv_heads_attr=None, num_kv_heads=8),
        "k has 32 rows")


def test_layout_check_catches_wrong_head_counts_and_can_be_skipped():
    # 8 heads of 8 reading 4 kv heads; the spec says 16 heads of 4 reading 8 kv heads: every shape fits,
    # but q head 0 (rows 0..7) reads kv rows 0..7, which the spec splits over two units
    model, x, specs = llama(num_kv_heads=4)
    wrong = dict(specs[0].__dict__, num_heads=16, num_kv_heads=8, heads_attr=None, kv_heads_attr=None)
    with pytest.raises(ValueError, match="changed .* input outside that kv group's columns"):
        head_groups(model, [Heads(**wrong)], x)
    assert head_groups(model, [Heads(**dict(wrong, trace_check=False))], x)[0].units == 8


class PerHeadQKV(SelfAttention):
    """GPT-NeoX layout: the fused qkv rows are [q_h; k_h; v_h] per head, not [q; k; v]."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, 3, self.head_dim).unbind(3)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class GatedOutput(GQAttention):
    """SDPA output times a sigmoid gate computed from x: o's input also depends on ``self.gate``."""

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1) * torch.sigmoid(self.gate(x)))


def test_graph_check_catches_unnamed_gate():
    model, x, specs = llama(num_kv_heads=4)
    attn = model.layers[0].self_attn
    attn.__class__ = GatedOutput
    attn.gate = nn.Linear(32, 64, bias=False)
    bad(model, specs[0], r"input also depends on \['layers.0.self_attn.gate'\]", x)


class SdpaGQA(GQAttention):
    """Grouped-query attention through SDPA's enable_gqa (no repeat_kv in the graph)."""

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def test_layout_check_catches_per_head_fused_qkv():
    model, x, specs = vit(fused=True)
    model.blocks[0].attn.__class__ = PerHeadQKV
    bad(model, specs[0], "outside that head's columns", x)
    with pytest.raises(ValueError, match="outside that head's columns"):
        find_groups(model, x, heads=specs)
    assert len(head_groups(model, specs[1:], x)) == 1


def test_sdpa_enable_gqa_passes_and_slices():
    torch.manual_seed(0)
    model, x, specs = llama(num_kv_heads=4)
    for layer in model.layers:
        layer.self_attn.__class__ = SdpaGQA
    groups = head_groups(model, specs, x)
    removals = [(groups[0], [1, 2]), (groups[1], [0])]
    masked = copy.deepcopy(model)
    mask_(masked, removals)
    slice_model(model, removals)
    assert model.layers[0].self_attn.num_heads == 4 and model.layers[0].self_attn.num_kv_heads == 2
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5, rtol=0)


class SubLN(SelfAttention):
    """A LayerNorm over all heads' channels before the output projection (not sliceable by a head group)."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.inner_norm(out))


class QKNorm(GQAttention):
    """Per-head RMSNorm of q and k over head_dim (Qwen3 / OLMo-2 style): shared by all heads."""

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        n_rep = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def test_graph_check_catches_norm_over_all_heads():
    model, x, specs = vit()
    attn = model.blocks[0].attn
    attn.__class__ = SubLN
    attn.inner_norm = nn.LayerNorm(32)
    bad(model, specs[0], r"passes through \['blocks.0.attn.inner_norm.bias', 'blocks.0.attn.inner_norm.weight'\]", x)


def test_qk_norm_over_head_dim_is_shared_and_slices():
    torch.manual_seed(0)
    model, x, specs = llama(num_kv_heads=2)
    for layer in model.layers:
        attn = layer.self_attn
        attn.__class__ = QKNorm
        attn.q_norm, attn.k_norm = RMSNorm(8), RMSNorm(8)
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    groups = head_groups(model, specs, x)
    removals = [(groups[0], [0]), (groups[1], [1])]
    masked = copy.deepcopy(model)
    mask_(masked, removals)
    slice_model(model, removals)
    assert model.layers[1].self_attn.num_heads == 4 and model.layers[1].self_attn.q_norm.weight.shape == (8,)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5, rtol=0)


def test_checks_leave_model_untouched():
    model, x, specs = llama(num_kv_heads=4)
    model.train()
    model.layers[1].eval()
    state = copy.deepcopy(model.state_dict())
    head_groups(model, specs, x)
    assert model.training and model.layers[0].training and not model.layers[1].training
    assert not model.layers[1].self_attn.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- heads found by find_groups


@pytest.mark.parametrize("case", ["llama_gqa_2kv", "llama_mqa", "vit_fused_qkv"])
def test_find_groups_finds_the_heads_the_specs_name(case):
    """Without heads=, the head groups are the ones the hand-written specs give
    (on grouped-query attention the trace used to never return)."""
    torch.manual_seed(0)
    model, x, specs = CASES[case]()
    found = {g.name: g for g in find_groups(model, x)}
    given = {g.name: g for g in find_groups(model, x, heads=specs)}
    assert found.keys() == given.keys()
    for name, g in given.items():
        mine = found[name]
        assert (mine.units, mine.attributes) == (g.units, g.attributes)
        assert [(m.name, m.dim, m.role) for m in mine.members] == [(m.name, m.dim, m.role) for m in g.members]
        assert all(torch.equal(m.index, n.index) for m, n in zip(mine.members, g.members))


class NoHeadCount(nn.Module):
    """Attention whose head count lives only in its forward (4 heads, no attribute, no config)."""

    def __init__(self, dim=32):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, 4, d // 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def test_attention_without_a_known_head_count_is_refused_not_cut_by_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), NoHeadCount(), nn.Linear(32, 5))
    x = torch.randn(2, 5, 12)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"does not cut attention channel by channel .* the attention in '1' "
                                         r"\(1.q, 1.k, 1.v -> 1.out\): its head size is unknown"):
        find_groups(model, x, ignore=["2"])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # kept whole, its projections leave the attention out of every group
    groups = find_groups(model, x, ignore=["2", "1.q", "1.k", "1.v"])
    assert not {m.name for g in groups for m in g.by_role("producer")} & {"1.q.weight", "1.k.weight", "1.v.weight"}
    # given, its heads are units
    heads = find_groups(model, x, ignore=["2"], heads=[Heads(q="1.q", k="1.k", v="1.v", o="1.out", num_heads=4,
                                                              heads_attr=None, kv_heads_attr=None)])
    assert heads[-1].name == "1" and heads[-1].units == 4


def test_a_dependency_walk_that_does_not_end_stops_naming_its_root(monkeypatch):
    import regkern.groups as groups_module

    model, x, _ = llama(num_kv_heads=2)
    monkeypatch.setattr(groups_module, "GROUPING_STEPS_PER_DEPENDENCY", 0)  # every walk is too long
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"stopped grouping the channels of '[\w.]+': torch-pruning's dependency "
                                         r"walk from it passed 0 steps without ending"):
        find_groups(model, x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class FusedKV(nn.Module):
    """Keys and values from one Linear (its first and second halves): not a layout heads can split."""

    def __init__(self, dim=32):
        super().__init__()
        self.num_heads = 4
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        k, v = self.kv(x).chunk(2, dim=-1)
        q, k, v = (t.view(b, n, 4, d // 4).transpose(1, 2) for t in (self.q(x), k, v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def test_keys_and_values_from_one_layer_are_refused():
    model = nn.Sequential(nn.Linear(12, 32), FusedKV(), nn.Linear(32, 5))
    with pytest.raises(ValueError, match=r"an attention with two of q, k, v from one layer \(1.q, 1.kv, 1.kv -> 1.out\)"):
        find_groups(model, torch.randn(2, 5, 12), ignore=["2"])
