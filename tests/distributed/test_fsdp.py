"""Pruning under FSDP2 (``fully_shard``, 2 gloo ranks, rows split unevenly):
every schedule's run equals the single-process run on the same global
batch. A structured cut of the sharded model is made by masks (the shapes
stay); the full weights loaded into a plain copy and cut with the
schedule's plan equal the single-process model that was sliced."""
import copy

import pytest
import torch

from ranks import MAX_STEPS, BNNet, OddNet, build, close_params, fully_sharded, train_step

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)


SCHEDULES = {"greg1": OddNet, "polarization": BNNet, "rda": OddNet, "proxl1": OddNet, "admm": OddNet,
             "greg1_adam": OddNet, "greg2_adamw": OddNet, "greg1_weight": OddNet, "slimming": BNNet,
             "admm_rows": OddNet, "oneshot": OddNet}
CUT = ("greg1", "polarization", "greg1_adam", "greg2_adamw", "slimming", "oneshot")  # structured: masked cuts


def full_copy(model, like):
    """A plain copy of ``like`` holding the sharded ``model``'s whole weights
    (torch's full state dict: a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = copy.deepcopy(like)
    plain.load_state_dict(weights)
    return plain


def _run(name, rank, world):
    from torch.distributed.tensor import DTensor

    from regkern.export import apply_plan

    torch.manual_seed(0)
    model = SCHEDULES[name]().eval()
    initial = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    fully_sharded(model, world)
    opt, schedule = build(name, model, model)
    ref_opt, ref_schedule = build(name, ref, ref)
    summary, end = None, MAX_STEPS
    for i in range(MAX_STEPS):
        if i == end:
            break
        train_step(model, opt, schedule, i, rank, world)
        train_step(ref, ref_opt, ref_schedule, i)
        if schedule.done and not schedule.pruned:
            summary = schedule.prune()
            ref_summary = ref_schedule.prune()
            end = i + 4
    assert schedule.pruned, name
    plain = full_copy(model, initial)
    masked = summary.slice is not None and summary.slice.masked
    if masked:
        assert schedule.plan is summary.slice.plan
        assert summary.slice.params_after == ref_summary.slice.params_after
        apply_plan(plain, schedule.plan)
    sharded = isinstance(model.features[0].weight, DTensor)
    return {"close": close_params(plain, ref), "masked": masked, "sharded": sharded,
            "layers": summary.layers == ref_summary.layers,
            "params": [p.detach().clone() for p in plain.parameters()]}


def _every_schedule(rank, world):
    return {name: _run(name, rank, world) for name in SCHEDULES}


def test_every_schedule_under_fsdp2_equals_the_single_process_run(ranks):
    by_rank = ranks.run(_every_schedule, timeout=300)
    for name in SCHEDULES:
        a, b = by_rank[0][name], by_rank[1][name]
        assert a["sharded"] and a["close"] and b["close"] and a["layers"], (name, a)
        assert a["masked"] == (name in CUT), name
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])), name
