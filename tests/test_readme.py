"""The README's examples run as written."""
import pathlib
import re

import torch
from torch import nn

import regkern

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run(code: str, scope: dict) -> dict:
    exec(compile(code, str(README), "exec"), scope)
    return scope


def test_greg1_loop_example_prunes_and_keeps_training():
    code = python_blocks()[0]
    # The README shows the official timetable, which needs thousands of steps;
    # the same lines run here with a fast one.
    assert "ratios=0.5)" in code
    code = code.replace("ratios=0.5)", "ratios=0.5, Ku=1, delta=0.05, Ks=3)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    scope = run(code, {"regkern": regkern, "model": model, "example_inputs": batches[0][0],
                       "loader": batches * 20, "criterion": nn.functional.cross_entropy})
    assert scope["pruner"].pruned and model[0].out_channels == 4
    assert scope["optimizer"].state[model[0].weight]["momentum_buffer"].shape == (4, 3, 3, 3)


def test_usage_example_runs():
    scope = run(python_blocks()[1], {})
    opt, conv = scope["opt"], scope["conv"]
    assert opt.state[conv]["lam"][[2, 5, 7]].eq(1e-4).all()
    norms = opt.state[conv]["row_norms"]
    torch.testing.assert_close(norms[:, 2], conv.detach().abs().mean(dim=(1, 2, 3)))


def test_groups_and_slicing_example_runs():
    scope = run(python_blocks()[2], {})
    model, summary = scope["model"], scope["summary"]
    assert (model[0].out_channels, model[3].out_channels, model[8].in_features) == (8, 16, 16)
    assert summary.params_after < summary.params_before
