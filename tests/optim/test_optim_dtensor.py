"""DTensor (FSDP2-style) parameters are stepped on their local shards."""
import pytest
import torch

import regkern
from optim_helpers import assert_params_close

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Shard, distribute_tensor  # noqa: E402


@pytest.fixture(scope="module")
def mesh():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_dtensor_parameters_step_like_plain_ones(mesh):
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(8, 3, 3, generator=gen), torch.randn(8, generator=gen)]
    params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    opts = [regkern.SGD([{"params": ps, "regularizer": regkern.RowL2()}], lr=0.1, momentum=0.9, weight_decay=1e-3)
            for ps in (params, plain)]
    lam = opts[0].state[params[0]]["lam"]
    assert isinstance(lam, DTensor) and lam.placements == (Shard(0),) and lam.shape == (8,)
    values = torch.zeros(8)
    values[2:5] = 0.5
    lam.copy_(distribute_tensor(values, mesh, lam.placements))  # written by global rows
    opts[1].state[plain[0]]["lam"].copy_(values)
    for t in range(5):
        grads = [torch.randn(f.shape, generator=gen) for f in full]
        for p, q, g in zip(params, plain, grads):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            q.grad = g.clone()
        for opt in opts:
            opt.step()
    assert isinstance(opts[0].state[params[0]]["momentum_buffer"], DTensor)
    assert_params_close([p.full_tensor() for p in params], plain)
