"""The README's examples run as written."""
import pathlib
import re

import torch
from torch import nn

import regkern

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def block_with(text: str) -> str:
    """The one README python block that contains ``text``."""
    found = [b for b in python_blocks() if text in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {text!r}"
    return found[0]


def run(code: str, scope: dict) -> dict:
    exec(compile(code, str(README), "exec"), scope)
    return scope


def test_greg1_loop_example_runs_as_pasted():
    code = python_blocks()[0]
    assert code.startswith("import torch, regkern")  # nothing to set up before it
    scope = run(code, {})
    model, pruner, optimizer = scope["model"], scope["pruner"], scope["optimizer"]
    assert pruner.pruned and model[0].out_channels == 8 and model[3].out_channels == 8
    assert optimizer.state[model[0].weight]["momentum_buffer"].shape == (8, 3, 3, 3)


def test_usage_example_runs():
    scope = run(python_blocks()[1], {})
    opt, conv = scope["opt"], scope["conv"]
    assert opt.state[conv]["lam"][[2, 5, 7]].eq(1e-4).all()
    norms = opt.state[conv]["row_norms"]
    torch.testing.assert_close(norms[:, 2], conv.detach().abs().mean(dim=(1, 2, 3)))


def test_groups_and_slicing_example_runs():
    scope = run(block_with("summary = regkern.slice_model"), {})
    model, summary = scope["model"], scope["summary"]
    assert (model[0].out_channels, model[3].out_channels, model[8].in_features) == (8, 16, 16)
    assert summary.params_after < summary.params_before


def test_adamw_example_runs():
    scope = run(block_with("layer = torch.nn.Linear(64, 32)"), {})
    opt, layer = scope["opt"], scope["layer"]
    norms = opt.state[layer.weight]["row_norms"][:, 1]
    assert norms[:8].max() < 0.5 * norms[8:].min()  # the penalized rows shrank at lr * lam per step
    assert opt.state[layer.weight]["exp_avg"].shape == (32, 64)


def test_hugging_face_export_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves to ./llama-pruned
    scope = run(block_with("export.save_pruned(model, \"llama-pruned\")"), {})
    assert scope["reloaded"].config.num_key_value_heads == 2
    assert scope["reloaded"].config.intermediate_size == 24


def test_hugging_face_greg_recipe_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves to ./llama-greg
    scope = run(block_with("regkern.prune.GReg1(model, opt, batches[0]"), {})
    attention = scope["model"].model.layers[0].self_attn
    assert attention.k_proj.out_features == 8 and scope["model"].model.layers[0].mlp.up_proj.out_features == 24
    reloaded = scope["export"].load_pruned("llama-greg")
    x = scope["batches"][0]
    assert torch.equal(reloaded(x).logits, scope["model"](x).logits)
