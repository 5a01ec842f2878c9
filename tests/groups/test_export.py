"""regkern.export: a sliced Hugging Face model saved and reloaded computes
exactly what it computed before (torch.equal), its config holds the new
sizes, a pruning plan re-applies the cut to a freshly built model, and bad
input is refused with one sentence and changes nothing.

Tiny models from configs, random weights; nothing is downloaded.
"""
import copy
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import regkern  # noqa: E402
from regkern import export  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=32, use_cache=False)


def llama():
    """A GQA Llama (8 query heads, 4 kv groups of head_dim 4), its inputs and groups by kind."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    x = torch.randint(0, 64, (2, 7))
    return model, x, llama_groups(model, x)


def llama_groups(model, x):
    """{"hidden": [...], "attention": [...], "mlp": [...]}; the forward reads no head counts."""
    specs = [regkern.Heads(q=layer.self_attn.q_proj, k=layer.self_attn.k_proj, v=layer.self_attn.v_proj,
                           o=layer.self_attn.o_proj, num_heads=layer.self_attn.q_proj.out_features // 4,
                           num_kv_heads=layer.self_attn.k_proj.out_features // 4, heads_attr=None, kv_heads_attr=None)
             for layer in model.model.layers]
    groups = regkern.find_groups(model, {"input_ids": x}, heads=specs, ignore=[model.lm_head])
    kinds = {"hidden": [], "attention": [], "mlp": []}
    for g in groups:
        kinds["attention" if g.name.endswith("self_attn") else "mlp" if ".mlp." in g.name else "hidden"].append(g)
    return kinds


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def per_layer_removals(kinds):
    """Different widths per layer: layer 0 loses 1 kv group and 12 neurons, layer 1 two and 16;
    the residual stream loses 8 of 32 channels."""
    return ([(kinds["hidden"][0], list(range(0, 32, 4)))]
            + [(g, list(range(i + 1))) for i, g in enumerate(kinds["attention"])]
            + [(g, list(range(0, 48, 4 - i))) for i, g in enumerate(kinds["mlp"])])


def test_llama_per_layer_widths_round_trip(tmp_path):
    model, x, kinds = llama()
    removals = per_layer_removals(kinds)
    regkern.slice_model(model, removals)
    ref = logits(model, x)

    update = export.save_pruned(model, tmp_path)
    # The residual width is the same everywhere and goes into the config; the
    # head and neuron counts differ between layers and go to the per-layer config.
    assert update.written == {"hidden_size": (32, 24)} and model.config.hidden_size == 24
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 4)
    assert not update.stock_loadable
    record = json.loads((tmp_path / export.LAYERS_FILE).read_text())
    assert record["modules"] == update.layers
    assert record["modules"]["model.layers.1.self_attn.k_proj"] == {"shapes": {"weight": [8, 24]},
                                                                      "attributes": {"out_features": 8}}
    loaded = export.load_pruned(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert torch.equal(logits(loaded.eval(), x), ref)


def test_tied_embeddings_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True)).eval()
    x = torch.randint(0, 64, (2, 7))
    kinds = llama_groups(model, x)
    regkern.slice_model(model, [(kinds["hidden"][0], [0, 1, 2, 3])] + [(g, [0, 1]) for g in kinds["mlp"]])
    ref = logits(model, x)
    update = export.save_pruned(model, tmp_path)
    # 28 channels are not a multiple of the 8 heads, which LlamaConfig requires: the width stays per layer.
    assert update.written == {"intermediate_size": (48, 46)} and update.layers["model.embed_tokens"]["shapes"] == {
        "weight": [64, 28]}
    loaded = export.load_pruned(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, x), ref)


def test_llama_uniform_widths_load_with_stock_from_pretrained(tmp_path):
    model, x, kinds = llama()
    removals = export.uniform_removals(model, per_layer_removals(kinds))
    kept = {g.name: g.units - len(units) for g, units in removals}
    assert [kept[g.name] for g in kinds["attention"]] == [2, 2]  # mean of 3 and 2 kv groups, rounded to even
    assert [kept[g.name] for g in kinds["mlp"]] == [34, 34]      # mean of 36 and 32 neurons
    regkern.slice_model(model, removals)
    ref = logits(model, x)

    update = export.save_pruned(model, tmp_path)
    assert update.stock_loadable and update.layers == {} and "stock from_pretrained works" in str(update)
    assert torch.equal(logits(model, x), ref)  # the modules share the config object: they compute as before
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    assert {f: getattr(model.config, f) for f in sizes} == dict(zip(sizes, (24, 34, 4, 2, 4)))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {f: saved[f] for f in sizes} == dict(zip(sizes, (24, 34, 4, 2, 4)))
    assert torch.equal(logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval(), x), ref)
    assert torch.equal(logits(export.load_pruned(tmp_path).eval(), x), ref)


def test_uniform_removals_picks_the_lowest_scores():
    model, _, kinds = llama()
    groups = kinds["mlp"]
    scores = [torch.arange(48.0).flip(0), torch.arange(48.0)]
    out = export.uniform_removals(model, [(groups[0], [0, 1]), (groups[1], [0, 1, 2, 3])], scores=scores)
    assert out == [(groups[0], [45, 46, 47]), (groups[1], [0, 1, 2])]
    with pytest.raises(ValueError, match="scores has 1 entries for 2 groups"):
        export.uniform_removals(model, [(groups[0], [0]), (groups[1], [0])], scores=scores[:1])


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 6))}
    specs = [regkern.Heads(q=layer.attention.self.query, k=layer.attention.self.key, v=layer.attention.self.value,
                           o=layer.attention.output.dense, module=layer.attention.self,
                           heads_attr="num_attention_heads", kv_heads_attr=None,
                           extra_attributes=(("all_head_size", 8),)) for layer in model.encoder.layer]
    groups = regkern.find_groups(model, x, heads=specs)
    return model, x, groups


def test_bert_heads_and_intermediate_round_trip(tmp_path):
    model, x, groups = bert()
    removals = [(g, [1]) for g in groups if g.name.endswith("attention.self")]
    removals += [(g, list(range(0, 48, 4))) for g in groups if g.name.endswith("intermediate.dense")]
    assert len(removals) == 4
    regkern.slice_model(model, removals)
    with torch.no_grad():
        ref = model(**x).last_hidden_state

    update = export.save_pruned(model, tmp_path)
    assert update.written == {"intermediate_size": (48, 36)} and model.config.intermediate_size == 36
    # BERT's head size is hidden_size / num_attention_heads: 3 heads of 8 need the per-layer config.
    assert update.layers["encoder.layer.0.attention.self"] == {"attributes": {"num_attention_heads": 3,
                                                                              "all_head_size": 24}}
    loaded = export.load_pruned(tmp_path).eval()
    assert loaded.encoder.layer[1].attention.self.num_attention_heads == 3
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, ref)


def resnet():
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    model = transformers.ResNetModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, {g.name: g for g in regkern.find_groups(model, x)}


def test_resnet_channels_round_trip(tmp_path):
    model, x, groups = resnet()
    # Stage 2's output (residual) channels 16 -> 12 and its bottleneck 4 -> 3:
    # the sizes of hidden_sizes[1] = 12, so the stock config is exact. Stage 1's
    # bottleneck 2 -> 1 is not (its output stays 8), so it needs the per-layer config.
    stage2 = "encoder.stages.1.layers.0."
    removals = [(groups[stage2 + "shortcut.convolution"], [0, 5, 6, 9]),
                (groups[stage2 + "layer.0.convolution"], [2]), (groups[stage2 + "layer.1.convolution"], [0]),
                (groups["encoder.stages.0.layers.0.layer.0.convolution"], [1])]
    regkern.slice_model(model, removals)
    with torch.no_grad():
        ref = model(x).last_hidden_state

    update = export.save_pruned(model, tmp_path / "mixed")
    assert update.written == {"hidden_sizes[1]": (16, 12)} and model.config.hidden_sizes == [8, 12]
    assert set(update.layers) == {"encoder.stages.0.layers.0.layer.0.convolution",
                                  "encoder.stages.0.layers.0.layer.0.normalization",
                                  "encoder.stages.0.layers.0.layer.1.convolution"}
    with torch.no_grad():
        assert torch.equal(export.load_pruned(tmp_path / "mixed").eval()(x).last_hidden_state, ref)


def test_resnet_uniform_cut_loads_with_stock_from_pretrained(tmp_path):
    model, x, groups = resnet()
    stage2 = "encoder.stages.1.layers.0."
    removals = [(groups[stage2 + "shortcut.convolution"], [0, 5, 6, 9]),
                (groups[stage2 + "layer.0.convolution"], [2]), (groups[stage2 + "layer.1.convolution"], [0])]
    regkern.slice_model(model, removals)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    update = export.save_pruned(model, tmp_path)
    assert update.stock_loadable and model.config.hidden_sizes == [8, 12]
    with torch.no_grad():
        assert torch.equal(transformers.ResNetModel.from_pretrained(tmp_path).eval()(x).last_hidden_state, ref)


def test_convnext_round_trip(tmp_path):
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    model = transformers.ConvNextModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = regkern.find_groups(model, x)
    regkern.slice_model(model, [(g, list(range(0, g.units, 3))) for g in groups])
    with torch.no_grad():
        ref = model(x).last_hidden_state
    export.save_pruned(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(export.load_pruned(tmp_path).eval()(x).last_hidden_state, ref)


def test_plan_reapplies_the_cut_to_a_fresh_model(tmp_path):
    model, x, kinds = llama()
    original = copy.deepcopy(model.state_dict())
    removals = per_layer_removals(kinds)
    plan = export.make_plan(model, removals)
    regkern.slice_model(model, removals)
    # A second round on the sliced model; its plan is relative to the unpruned model.
    kinds = llama_groups(model, x)
    second = [(kinds["attention"][0], [0]), (kinds["mlp"][1], [1, 2])]
    plan = export.make_plan(model, second, previous=plan)
    regkern.slice_model(model, second)
    ref = logits(model, x)
    export.save_plan(plan, tmp_path / "plan.json")

    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["format"] == "regkern-plan" and saved["model_class"] == "LlamaForCausalLM"
    k_proj = saved["tensors"]["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj["shape"] == [16, 32] and k_proj["kept"]["0"] == list(range(8, 16))  # kv groups 2 and 3 of 4 kept
    assert k_proj["kept"]["1"] == [c for c in range(32) if c % 4]

    # On the unpruned weights, the plan keeps exactly what the two slices kept.
    fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    fresh.load_state_dict(original)
    export.apply_plan(fresh, tmp_path / "plan.json")
    assert torch.equal(logits(fresh, x), ref)
    # A freshly initialized model takes the structure, then the pruned weights.
    fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    export.apply_plan(fresh, saved)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, x), ref)


def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    model, x, kinds = llama()
    plan = export.make_plan(model, [(kinds["mlp"][0], [0, 1])])
    bert_model = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=4, intermediate_size=48))
    before = copy.deepcopy(bert_model.state_dict())
    with pytest.raises(ValueError, match="was made for a LlamaForCausalLM, not a BertModel"):
        export.apply_plan(bert_model, plan)
    assert all(torch.equal(before[k], v) for k, v in bert_model.state_dict().items())

    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"cuts model.layers.0.mlp.gate_proj.weight of shape \[48, 32\], but the "
                                         r"model has shape \[40, 32\]"):
        export.apply_plan(other, plan)
    assert other.model.layers[0].mlp.gate_proj.weight.shape == (40, 32)
    with pytest.raises(ValueError, match="is not a regkern pruning plan"):
        export.apply_plan(other, {"tensors": {}})

    model.save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="has no regkern_layers.json; it was not saved by regkern.export.save_pruned"):
        export.load_pruned(tmp_path / "stock")
    with pytest.raises(ValueError, match="needs a Hugging Face transformers model"):
        export.save_pruned(nn.Sequential(nn.Linear(2, 2)), tmp_path / "plain")
    assert not os.path.exists(tmp_path / "plain")
    export.save_pruned(model, tmp_path / "regkern")
    with pytest.raises(ValueError, match="not an Auto class"):
        export.load_pruned(tmp_path / "regkern", model_class=transformers.AutoModelForCausalLM)
    (tmp_path / "regkern" / export.LAYERS_FILE).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a per-layer config written by regkern"):
        export.load_pruned(tmp_path / "regkern")
    damaged = copy.deepcopy(plan)
    damaged["tensors"]["model.layers.0.mlp.up_proj.weight"]["kept"]["0"] = [3, 1]
    fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    with pytest.raises(ValueError, match="kept entries must be increasing indices in \\[0, 48\\)"):
        export.apply_plan(fresh, damaged)
    assert fresh.model.layers[0].mlp.gate_proj.weight.shape == (48, 32)  # checked before the first cut
    damaged = copy.deepcopy(plan)  # a damaged head count is refused before any cut, too
    damaged["attributes"] = {"model.layers.0.self_attn": {"num_key_value_groups": 0}}
    with pytest.raises(ValueError, match="num_key_value_groups to 0; it must be a positive integer"):
        export.apply_plan(fresh, damaged)
    assert fresh.model.layers[0].mlp.gate_proj.weight.shape == (48, 32)
    for expansions, what in (([1, 2], r"has expansions of type list, not a mapping"),
                             ({"model.norm": {"kept": [0], "width": 32}}, r"re-expands model\.norm, which is not a "
                                                                           r"BatchNorm of the recorded width"),
                             ({"model.norm": [0, 1]}, r"re-expands model\.norm")):
        damaged = copy.deepcopy(plan)
        damaged["expansions"] = expansions
        with pytest.raises(ValueError, match=what):
            export.apply_plan(fresh, damaged)
        assert fresh.model.layers[0].mlp.gate_proj.weight.shape == (48, 32)
