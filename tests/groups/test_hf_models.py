"""Hugging Face transformers models, built from tiny configs (random weights,
nothing downloaded), grouped and sliced with no ``heads=`` argument.

Every model keeps its default config where it matters (the key/value cache
on, SDPA attention, biases); dropout is off so that two copies compute the
same function. The reference for slicing is the masked model (the removed
units' slices zeroed): the sliced model computes the same outputs, and the
next optimizer step (regkern.SGD, regkern.AdamW) equals the masked step on
the kept entries.
"""
import copy
import io
import warnings

import pytest
import torch

from models import mask_units, restrict
from regkern import SGD, AdamW, RowL2
from regkern.groups import Group, Member, find_groups
from regkern.slicing import kept_indices, slice_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _lm(family, kv_heads=2, **extra):
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32, **extra)
    return model_class(config), {"input_ids": torch.randint(0, 64, (2, 6))}


def _images(size=32):
    return {"pixel_values": torch.randn(2, 3, size, size)}


def gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 64, (2, 6))}


def bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config), {"input_ids": torch.randint(0, 64, (2, 6))}


def vit():
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=48, num_labels=5)
    return transformers.ViTForImageClassification(config), _images(16)


def resnet():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck",
                                       num_labels=5)
    return transformers.ResNetForImageClassification(config), _images()


def mobilenet_v2():
    config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=5,
                                            classifier_dropout_prob=0.0)
    return transformers.MobileNetV2ForImageClassification(config), _images()


def convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5)
    return transformers.ConvNextForImageClassification(config), _images()


MODELS = {
    "llama_gqa": lambda: _lm("llama", attention_bias=True),
    "llama_mqa_tied": lambda: _lm("llama", kv_heads=1, tie_word_embeddings=True),
    "qwen2_gqa": lambda: _lm("qwen2"),
    "mistral_mqa": lambda: _lm("mistral", kv_heads=1),
    "gpt2": gpt2,
    "bert": bert,
    "vit": vit,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "convnext": convnext,
}
ATTENTION = {"llama_gqa": (2, 2), "llama_mqa_tied": (4, 4), "qwen2_gqa": (2, 2), "mistral_mqa": (4, 4),
             "gpt2": (4, 4), "bert": (4, 4), "vit": (4, 4)}  # units of each layer's head group, both layers
OUTPUT_LAYERS = ("lm_head", "classifier", "classifier.1", "pooler.dense")


def build(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    return model, x, [n for n, _ in model.named_modules() if n in OUTPUT_LAYERS]


def output(model, x):
    out = model(**x)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def train_step(model, opt, x):
    # eval mode: in train mode a BatchNorm cancels the bias before it, whose gradient is then float
    # noise that Adam's normalization blows up differently in two models that sum in another order
    model.eval()
    opt.zero_grad()
    output(model, x).pow(2).mean().backward()
    opt.step()


HEAD_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn"}
MLP_PRODUCERS = ("fc1.weight", "gate_proj.weight", "c_fc.weight", "intermediate.dense.weight", "pwconv1.weight")


def is_head_group(group):
    return any(m.name.split(".")[-2] in HEAD_PROJECTIONS for m in group.by_role("producer"))


def prunable(name, groups):
    """The groups a test removes units of: heads and MLP neurons of the
    transformers (their residual width passes through RMS/LayerNorms, where a
    masked channel is not a removed one), every group of the convnets but
    ConvNeXt's (LayerNorm over the channels): its MLP neurons."""
    if name in ("resnet", "mobilenet_v2"):
        return groups
    return [g for g in groups if is_head_group(g) or any(m.name.endswith(MLP_PRODUCERS) for m in g.by_role("producer"))]


def removals_of(groups, seed=0):
    """Half of each group's units (groups of one unit keep it)."""
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(g.units, generator=gen)[:g.units // 2].sort().values for g in groups if g.units > 1}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_find_groups_needs_no_heads_and_never_cuts_attention_by_channel(name):
    model, x, ignore = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out: the cls-token concat, the cache, Conv1D all traced
        groups = find_groups(model, x, ignore=ignore)
    heads = [g for g in groups if is_head_group(g)]
    assert [g.units for g in heads] == list(ATTENTION.get(name, ()))
    for g in heads:  # one unit: head_dim rows of each projection (a kv group with GQA)
        assert {m.dim for m in g.by_role("producer")} <= {0, 1} and all(m.index.shape[1] % 8 == 0 for m in g.members)
    if name == "vit":  # the residual width goes through the cls-token concatenation, position table included
        width = [g for g in groups if any(m.name == "vit.embeddings.cls_token" for m in g.members)]
        assert len(width) == 1 and width[0].units == 32
        assert {"vit.embeddings.position_embeddings", "classifier.weight"} <= {m.name for m in width[0].members}


def _optimizers():
    return {
        "sgd": lambda m: SGD([{"params": [p for p in m.parameters() if p.dim() > 1], "regularizer": RowL2()},
                              {"params": [p for p in m.parameters() if p.dim() <= 1]}],
                             lr=0.005, momentum=0.9, weight_decay=1e-3),
        "adamw": lambda m: AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2),
    }


def _assert_kept_equal(sliced, masked, kept, opt_sliced, opt_masked, label):
    masked_params = dict(masked.named_parameters())
    for name, p in sliced.named_parameters():
        ref, cuts = masked_params[name], kept.get(name, {})
        # sliced convs and matmuls sum in another order: float32 noise grows with the weights
        torch.testing.assert_close(p.detach(), restrict(ref.detach(), cuts), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{label}: {name}: {m}")
        for key, value in opt_sliced.state[p].items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                torch.testing.assert_close(value, restrict(opt_masked.state[ref][key], cuts), rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{label}: {name} {key}: {m}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sliced_model_matches_the_masked_one_and_keeps_training(name):
    base, x, ignore = build(name)
    groups = prunable(name, find_groups(base, x, ignore=ignore))
    assert groups
    for kind, make in _optimizers().items():
        model = copy.deepcopy(base)
        opt = make(model)
        train_step(model, opt, x)  # momentum / moments hold something
        masked = copy.deepcopy(model)
        opt_masked = make(masked)
        opt_masked.load_state_dict(copy.deepcopy(opt.state_dict()))
        removals = {copy.copy(g).bind(model): units for g, units in removals_of(groups).items()}
        kept = kept_indices(model, removals)
        mask_units(masked, removals, opt_masked)
        slice_model(model, removals, optimizer=opt)
        for mode in ("train", "eval"):
            model.train(mode == "train")
            masked.train(mode == "train")
            with torch.no_grad():
                torch.testing.assert_close(output(model, x), output(masked, x), rtol=1e-5, atol=1e-5,
                                           msg=f"{name} {mode}")
        train_step(model, opt, x)
        train_step(masked, opt_masked, x)
        _assert_kept_equal(model, masked, kept, opt, opt_masked, f"{name} {kind}")

        # the sliced optimizer's state_dict loads into a fresh optimizer, which then steps alike
        twin = copy.deepcopy(model)
        fresh = make(twin)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        train_step(model, opt, x)
        train_step(twin, fresh, x)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_mqa", "gpt2", "bert", "vit", "resnet"])
def test_a_second_pruning_round(name):
    model, x, ignore = build(name)
    opt = _optimizers()["adamw"](model)
    for round_ in range(2):
        groups = prunable(name, find_groups(model, x, ignore=ignore))
        heads = [g for g in groups if is_head_group(g)]
        removals = removals_of(groups, seed=round_)
        masked = copy.deepcopy(model)
        mask_units(masked, removals)
        slice_model(model, removals, optimizer=opt)
        model.eval()
        masked.eval()
        with torch.no_grad():
            torch.testing.assert_close(output(model, x), output(masked, x), rtol=1e-5, atol=1e-5)
        train_step(model, opt, x)
        if name == "llama_gqa":  # round 1: one of two kv groups; round 2: query heads inside the last one
            assert [g.units for g in heads] == [2, 2]  # kv groups, then the query heads of the one left
            attn = model.model.layers[0].self_attn
            assert attn.k_proj.out_features == 8 and attn.num_key_value_groups == (2 if round_ == 0 else 1)
            assert attn.q_proj.out_features == (16 if round_ == 0 else 8)


@pytest.mark.parametrize("name", ["gpt2", "llama_mqa_tied"])
def test_tied_embeddings_are_one_tensor_under_both_names(name):
    model, x, ignore = build(name)
    embedding = model.get_input_embeddings()
    first = next(n for n, p in model.named_parameters() if p is embedding.weight)
    assert model.lm_head.weight is embedding.weight
    groups = find_groups(model, x, ignore=ignore)
    width = [g for g in groups if any(m.name == first and m.dim == 1 for m in g.members)]
    assert len(width) == 1 and "lm_head.weight" not in {m.name for m in width[0].members}
    slice_model(model, {width[0]: [0, 5]})  # cut once, and both layers follow
    assert embedding.weight.shape == (64, 30) and embedding.embedding_dim == model.lm_head.in_features == 30
    assert output(model, x).shape == (2, 6, 64)
    # a group may name the tied tensor by any of its names
    columns = Group("by_head", 30, [Member("lm_head.weight", 1, torch.arange(30).reshape(30, 1), "column")])
    columns.bind(model)
    kept = kept_indices(model, {columns: [3]})
    assert list(kept) == [first] and torch.equal(kept[first][1], torch.tensor([i for i in range(30) if i != 3]))


def test_vit_width_is_cut_through_the_cls_token_concatenation():
    """The residual width runs through the patch conv, the class token, the
    position table, every block and the classifier: the sliced ViT is a ViT
    built 24 wide holding the kept entries."""
    model, x, _ = build("vit")
    groups = find_groups(model, x, ignore=["classifier"])
    width = next(g for g in groups if any(m.name == "vit.embeddings.cls_token" for m in g.members))
    removals = {width: list(range(0, 32, 4))}
    kept = kept_indices(model, removals)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    slice_model(model, removals)
    narrow_config = copy.deepcopy(model.config)
    narrow_config.hidden_size, narrow_config.head_dim = 24, 8
    narrow = transformers.ViTForImageClassification(narrow_config)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), restrict(before[name], kept.get(name, {})), rtol=0, atol=0)
    narrow.load_state_dict(model.state_dict())
    model.eval()
    narrow.eval()
    with torch.no_grad():
        torch.testing.assert_close(output(model, x), output(narrow, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_pruned_model_is_saved_and_reloaded(name, tmp_path):
    """save_pruned then load_pruned gives back the pruned model: the same
    modules, the same tensors bit for bit, hence the same outputs (compared
    with a tolerance only because oneDNN may pick another conv algorithm for
    another model object)."""
    from regkern import export
    model, x, ignore = build(name)
    groups = prunable(name, find_groups(model, x, ignore=ignore))
    slice_model(model, removals_of(groups))
    model.eval()
    export.save_pruned(model, tmp_path / name)
    reloaded = export.load_pruned(tmp_path / name).eval()
    assert [repr(m) for m in reloaded.modules()] == [repr(m) for m in model.modules()]
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved), name
    with torch.no_grad():
        torch.testing.assert_close(output(reloaded, x), output(model, x), rtol=1e-6, atol=1e-7, msg=name)
