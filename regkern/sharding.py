"""DTensor (FSDP2) support: kernels step local shards, row state is sharded like rows.

A DTensor parameter is stepped on its local shard; its per-row state (lambda,
masks, row norms) is a DTensor too, sharded along rows exactly as the
parameter's first dimension, so each rank's kernel sees matching local rows
and users index it with global row numbers.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from regkern.reference.sgd import num_rows


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local_tensor(t):
    """The local shard of a DTensor, or the tensor itself (None stays None)."""
    return t.to_local() if t is not None and is_dtensor(t) else t


def row_state(param: Tensor, trailing: Tuple[int, ...] = (), dtype=torch.float32, fill=0) -> Tensor:
    """A per-row state tensor ``[R, *trailing]`` for ``param``, filled with ``fill``."""
    local = local_tensor(param)
    value = torch.full((num_rows(local), *trailing), fill, dtype=dtype, device=local.device)
    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import DTensor, Replicate, Shard

    # Rows are sharded where the parameter's dim 0 is; any other placement
    # leaves every rank all rows.
    placements = [p if isinstance(p, Shard) and p.dim == 0 else Replicate() for p in param.placements]
    shape = (num_rows(param), *trailing)
    stride = tuple(int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape)))
    return DTensor.from_local(value, param.device_mesh, placements, shape=shape, stride=stride)
