"""The README's usage example runs as written."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    opt, conv = scope["opt"], scope["conv"]
    assert opt.state[conv]["lam"][[2, 5, 7]].eq(1e-4).all()
    norms = opt.state[conv]["row_norms"]
    torch.testing.assert_close(norms[:, 2], conv.detach().abs().mean(dim=(1, 2, 3)))
