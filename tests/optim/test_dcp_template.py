"""torch.distributed.checkpoint's own flow resumes a regkern optimizer.

The flow: fresh model and optimizer, ``get_state_dict`` as the template,
``dcp.load`` into it, ``set_state_dict``. On a fresh optimizer torch takes one
step at lr 0 on zero gradients to create the state the template needs, but
only when ``optimizer.state`` is falsy: regkern's state holds the
regularizers' entries from construction, so it counts as empty until a step
was taken (``TrackedState``). Without that the template lacked the momentum
and the resumed run lost it without a word."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import regkern


def _build(family):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    if family == "sgd":
        opt = regkern.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                          regularizer=regkern.RowL2(track_norms=True))
    else:
        opt = regkern.AdamW(model.parameters(), lr=0.01, regularizer=regkern.RowL2(track_norms=True))
    for p in model.parameters():
        opt.state[p]["lam"].fill_(0.05)
    return model, opt


def _train(model, opt, steps, start):
    for t in range(start, start + steps):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("family", ["sgd", "adamw"])
def test_torch_dcp_flow_resumes_bit_identically(family, tmp_path):
    model, opt = _build(family)
    _train(model, opt, 3, 0)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    _train(model, opt, 3, 3)  # the run goes on

    fresh, fresh_opt = _build(family)
    assert not fresh_opt.state  # no step yet, though lam exists
    template_model, template_optim = get_state_dict(fresh, fresh_opt)
    made = {k for entry in template_optim["state"].values() for k in entry}
    assert {"momentum_buffer"} <= made if family == "sgd" else {"exp_avg", "exp_avg_sq", "step"} <= made
    state = {"model": template_model, "optim": template_optim}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert fresh_opt.state
    _train(fresh, fresh_opt, 3, 3)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, fresh_opt.state[q][key]), key
