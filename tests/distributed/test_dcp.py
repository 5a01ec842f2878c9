"""torch.distributed.checkpoint round trip of a data-parallel pruning run (2
gloo ranks, under DistributedDataParallel and under FSDP2): model, optimizer
(momentum, Adam's moments, lam, masks, row_norms, RDA and ADMM state) and
schedule, saved mid-regularization and after the cut, resume into fresh
objects and continue bit for bit."""
import pytest
import torch

from ranks import MAX_STEPS, Net, OddNet, build, fully_sharded, train_step

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

CASES = ("greg1", "greg1_adam", "rda", "admm")


def _fresh(name, wrap, world):
    """Model, the module the loop calls (a DDP wrapper or the FSDP2 model), optimizer, schedule."""
    torch.manual_seed(0)
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = Net()
        target = DDP(model)
    else:
        model = target = fully_sharded(OddNet(), world)
    opt, schedule = build(name, target, model)
    return model, target, opt, schedule


def _local(v):
    return v.to_local() if hasattr(v, "to_local") else v


def _state(model, opt):
    return {"model": {k: _local(v).clone() for k, v in model.state_dict().items()},
            "optim": {i: {k: _local(v).clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in opt.state_dict()["state"].items()}}


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _resume(rank, world, root, wrap):
    import torch.distributed.checkpoint as dcp

    from regkern.distributed import checkpoint_state, load_checkpoint

    out = {}
    for name in CASES:
        model, ddp, opt, schedule = _fresh(name, wrap, world)
        saves, end, i = {}, MAX_STEPS, 0
        while i < end:
            train_step(ddp, opt, schedule, i, rank, world)
            i += 1
            if i == 2:
                saves["before"] = i
                dcp.save(checkpoint_state(ddp, opt, schedule), checkpoint_id=f"{root}/{name}-before")
            if schedule.done and not schedule.pruned:
                schedule.prune()
                end = i + 3
                saves["after"] = i
                dcp.save(checkpoint_state(ddp, opt, schedule), checkpoint_id=f"{root}/{name}-after")
        final = _state(model, opt)
        keys = {k for s in opt.state.values() for k in s}
        for when, start in saves.items():
            model2, ddp2, opt2, schedule2 = _fresh(name, wrap, world)
            load_checkpoint(ddp2, opt2, f"{root}/{name}-{when}", schedule=schedule2)
            j, end2 = start, end
            while j < end2:
                train_step(ddp2, opt2, schedule2, j, rank, world)
                j += 1
                if schedule2.done and not schedule2.pruned:
                    schedule2.prune()
            out[f"{name}-{when}"] = _equal(final, _state(model2, opt2)) and schedule2.pruned
        out[f"{name}-keys"] = sorted(keys)
        out[f"{name}-plan"] = schedule.plan is not None and schedule2.plan == schedule.plan
    if wrap == "ddp":  # a checkpoint with schedule state loaded without the schedule: one sentence, nothing read
        model, ddp, opt, schedule = _fresh("greg1", wrap, world)
        before = _state(model, opt)
        with pytest.raises(ValueError, match=r"^this checkpoint holds a pruning schedule's state; pass that schedule$"):
            load_checkpoint(ddp, opt, f"{root}/greg1-before")
        out["refused"] = _equal(before, _state(model, opt)) and schedule.iteration == 0
    return out


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_dcp_resume_before_and_after_the_cut_continues_bit_for_bit(ranks, tmp_path, wrap):
    for out in ranks.run(_resume, str(tmp_path), wrap, timeout=150):
        for name in CASES:
            assert out[f"{name}-before"] and out[f"{name}-after"], (name, out)
        assert {"momentum_buffer", "lam", "row_norms"} <= set(out["greg1-keys"]), out["greg1-keys"]
        assert {"exp_avg", "exp_avg_sq", "lam"} <= set(out["greg1_adam-keys"]), out["greg1_adam-keys"]
        assert "mask" in out["rda-keys"] and "mask" in out["admm-keys"], (out["rda-keys"], out["admm-keys"])
        if wrap == "fsdp2":  # the masked cut: masks, and the plan that cuts a plain copy
            assert "mask" in out["greg1-keys"] and out["greg1-plan"], out
        else:
            assert out["refused"]
