"""Pruning under DistributedDataParallel (2 gloo ranks): every schedule's run,
cut included, equals the single-process run on the same global batch; the
wrapper is rebuilt in place by prune() and slice_model; ranks whose picks
differ are refused on every rank before anything changes."""
import copy

import pytest
import torch

from ranks import BNNet, Net, X, beside_reference, build, close_params, sgd, train_step

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


SCHEDULES = {"greg1": Net, "polarization": BNNet, "rda": Net, "proxl1": Net, "admm": Net, "greg1_adam": Net}


def _run(name, rank, world, give_wrapper):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = SCHEDULES[name]().eval()
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    schedule, summary, _, _ = beside_reference(name, ddp, model, ref, rank, world, given=ddp if give_wrapper else model)
    assert schedule.model is model
    cut = summary.slice is not None
    # the same wrapper goes on: its reducer covers the sliced parameters
    assert ddp.module is model
    return {"close": close_params(model, ref), "cut": cut,
            "params": [p.detach().clone() for p in model.parameters()]}


def _every_schedule(rank, world):
    return {name: _run(name, rank, world, give_wrapper=(i % 2 == 0)) for i, name in enumerate(SCHEDULES)}


def test_every_schedule_under_ddp_equals_the_single_process_run(ranks):
    by_rank = ranks.run(_every_schedule, timeout=150)
    for name in SCHEDULES:
        a, b = by_rank[0][name], by_rank[1][name]
        assert a["close"] and b["close"], name
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])), name
    assert by_rank[0]["greg1"]["cut"] and by_rank[0]["polarization"]["cut"]


def _slice_and_refuse(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from regkern.groups import find_groups
    from regkern.prune import OneShotL1
    from regkern.slicing import slice_model

    out = {}
    # slice_model on the wrapper and on the module inside it: the wrapper is rebuilt
    for on_wrapper in (True, False):
        torch.manual_seed(0)
        model = Net()
        ref = copy.deepcopy(model)
        ddp = DDP(model)
        opt, ref_opt = sgd(model), sgd(ref)
        for i in range(2):
            train_step(ddp, opt, None, i, rank, world)
            train_step(ref, ref_opt, None, i)
        target = ddp if on_wrapper else model
        groups = [g for g in find_groups(target, X) if g.units == 8]
        ref_groups = [g for g in find_groups(ref, X) if g.units == 8]
        slice_model(target, {groups[0]: [1, 4, 6]}, optimizer=opt)
        slice_model(ref, {ref_groups[0]: [1, 4, 6]}, optimizer=ref_opt)
        for i in range(2, 5):
            train_step(ddp, opt, None, i, rank, world)
            train_step(ref, ref_opt, None, i)
        out[on_wrapper] = close_params(model, ref) and model.features[0].weight.shape[0] == 5

    # ranks whose parameters diverged pick different rows: refused on every rank, nothing changed
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model)
    opt = sgd(model)
    schedule = OneShotL1(ddp, opt, X, ratios=0.5)
    if rank == 1:
        with torch.no_grad():
            model.features[0].weight[0].mul_(100.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"^the ranks chose different units to slice \(rank\(s\) \[1\] differ"):
        schedule.prune()
    out["refused"] = (not schedule.pruned and model.state_dict().keys() == before.keys()
                      and all(torch.equal(model.state_dict()[k], v) for k, v in before.items()))

    # masks frozen from exact zeros that only rank 1 has: refused before any mask is written
    from regkern.prune import SparseTraining

    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model)
    opt, schedule = build("proxl1", ddp, model)
    assert isinstance(schedule, SparseTraining)
    for i in range(3):
        train_step(ddp, opt, schedule, i, rank, world)
    if rank == 1:
        with torch.no_grad():
            w = model.features[0].weight
            w.view(-1)[w.view(-1).ne(0).nonzero()[0]] = 0.0
    with pytest.raises(RuntimeError, match=r"^the ranks chose different masks \(rank\(s\) \[1\] differ"):
        schedule.prune()
    out["masks refused"] = not schedule.pruned and all(p not in opt.state or "mask" not in opt.state[p]
                                                       for p in model.parameters())
    return out


def test_slice_model_rebuilds_the_wrapper_and_diverged_ranks_are_refused(ranks):
    for out in ranks.run(_slice_and_refuse):
        assert out == {True: True, False: True, "refused": True, "masks refused": True}


def _demo_training(rank, world):
    from regkern.demo.data import Dataset
    from regkern.demo.train import train
    from regkern.prune import GReg1

    g = torch.Generator().manual_seed(5)
    data = Dataset("toy", torch.randn(64, 3, 6, 6, generator=g), torch.randint(0, 4, (64,), generator=g),
                   torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g), 4, augment=True)
    models = []
    for parallel in (True, False):
        torch.manual_seed(0)
        model = Net()
        opt = sgd(model)
        schedule = GReg1(model, opt, X, ratios=0.5, Ku=2, Ks=2, delta=0.5, tau=2.0)
        if not parallel:  # the single-process run: no process group, the whole batch
            from regkern.demo import train as train_mod

            ranks_of = train_mod._ranks
            train_mod._ranks = lambda: (0, 1)
        try:
            train(model, opt, data, epochs=4, batch_size=16, generator=torch.Generator().manual_seed(1),
                  device=torch.device("cpu"), desc="toy", on_step=lambda _: schedule.step(),
                  stop=lambda: schedule.done, quiet=True)
            schedule.prune()
            train(model, opt, data, epochs=1, batch_size=16, generator=torch.Generator().manual_seed(2),
                  device=torch.device("cpu"), desc="toy", quiet=True)
        finally:
            if not parallel:
                train_mod._ranks = ranks_of
        models.append(model)
    return close_params(*models) and models[0].features[0].weight.shape[0] == 4


def test_the_demo_trains_data_parallel_like_one_process(ranks):
    """What ``torchrun --nproc-per-node 2 -m regkern demo`` runs: each rank its
    share of every (augmented) batch, the schedule's cut in between."""
    assert ranks.run(_demo_training) == [True, True]
