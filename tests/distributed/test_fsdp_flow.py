"""FSDP2 after the cut (2 gloo ranks): regularize and prune under
DistributedDataParallel (the model really gets smaller), then shard the
pruned model with fully_shard and fine-tune it with a new regkern
optimizer, equal to the single-process run."""
import copy

import torch

from ranks import Net, build, close_params, sgd, skip_without_fsdp2, train_step

skip_without_fsdp2()


def _flow(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    from regkern.distributed import release_ddp

    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    opt, schedule = build("greg1", ddp, model)
    ref_opt, ref_schedule = build("greg1", ref, ref)
    i = 0
    while not schedule.pruned:
        train_step(ddp, opt, schedule, i, rank, world)
        train_step(ref, ref_opt, ref_schedule, i)
        i += 1
        if schedule.done:
            schedule.prune()
            ref_schedule.prune()
    release_ddp(ddp)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.features:
        if isinstance(layer, torch.nn.Conv2d):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = isinstance(model.features[0].weight, DTensor)
    fine, ref_fine = sgd(model), sgd(ref)
    for j in range(i, i + 3):
        train_step(model, fine, None, j, rank, world)
        train_step(ref, ref_fine, None, j)
    full = copy.deepcopy(ref)
    with torch.no_grad():
        for (name, p), q in zip(full.named_parameters(), model.parameters()):
            p.copy_(q.full_tensor() if isinstance(q, DTensor) else q)
    return {"sharded": sharded, "close": close_params(full, ref)}


def test_prune_under_ddp_then_fine_tune_under_fsdp2(ranks):
    for out in ranks.run(_flow):
        assert out == {"sharded": True, "close": True}
