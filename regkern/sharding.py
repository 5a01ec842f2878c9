"""DTensor (FSDP2) support: kernels step local shards, row state is sharded like rows.

A DTensor parameter is stepped on its local shard; its per-row state (lambda,
masks, row norms) is a DTensor too, sharded along rows exactly as the
parameter's first dimension, so each rank's kernel sees matching local rows
and users index it with global row numbers.

The schedules decide on whole tensors: :func:`whole` gathers a DTensor (a
collective: every rank calls it, and every rank then takes the same
decision from the same values), :func:`write_whole` stores a whole value
into a DTensor (each rank keeps its own shard, no communication), and
:func:`edited` joins the two for writes by global index.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence, Tuple

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


def whole(t):
    """``t``'s whole value: a DTensor gathered from every rank (a collective:
    call it on every rank), any other tensor as it is (None stays None)."""
    if t is None or not is_dtensor(t):
        return t
    return t.detach().full_tensor()


def own_shard(like: Tensor, value: Tensor) -> Tensor:
    """This rank's part of the whole-valued ``value``, laid out as ``like``'s
    local shard (``value`` itself when ``like`` is not a DTensor; every rank
    holds the same ``value``: nothing is communicated)."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.detach().to(like.to_local().device), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def write_whole(target: Tensor, value: Tensor) -> None:
    """Copy the whole-valued ``value`` into ``target`` in place; a DTensor
    ``target`` keeps its own shard of it (:func:`own_shard`)."""
    local_tensor(target).copy_(own_shard(target, value))


@contextlib.contextmanager
def edited(t: Tensor) -> Iterator[Tensor]:
    """Edit ``t`` by global indices: yields ``t`` itself, or for a DTensor
    its whole value (gathered: a collective), written back on exit."""
    if not is_dtensor(t):
        yield t
        return
    value = whole(t)
    yield value
    write_whole(t, value)


def on_every_rank(flag: bool, like: Tensor) -> bool:
    """Whether ``flag`` holds on every rank holding a shard of ``like`` (a
    DTensor: one small all-reduce per mesh dimension, a collective), so that
    the ranks take the same branch before a collective; ``flag`` itself for
    any other tensor."""
    if not is_dtensor(like):
        return flag
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=like.to_local().device)
    for mesh_dim in range(like.device_mesh.ndim):
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=like.device_mesh.get_group(mesh_dim))
    return bool(value.item())


def sum_over_shards(value: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``value``, a sum over the local shards of ``params`` (all laid out
    alike), summed over the ranks that hold other shards (an all-reduce over
    each mesh dimension they are sharded along; in place, returned). Plain
    parameters: ``value`` as it is."""
    sharded = [p for p in params if is_dtensor(p)]
    if not sharded:
        return value
    first = sharded[0]
    if len(sharded) != len(params) or any(p.device_mesh != first.device_mesh or p.placements != first.placements
                                          for p in sharded):
        raise ValueError("the parameters of this set are not all sharded alike (DTensors on one mesh with the same "
                         "placements); shard them with one fully_shard call or keep them in separate sets")
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    for mesh_dim, placement in enumerate(first.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(value, group=first.device_mesh.get_group(mesh_dim))
    return value


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def fsdp_modules(model) -> list:
    """The modules of ``model`` that FSDP2's ``fully_shard`` manages."""
    kind = _fsdp_module_type()
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


def user_class(module) -> type:
    """The class a user built ``module`` from: FSDP2's ``fully_shard`` swaps
    in a subclass of it (named ``FSDP<name>``)."""
    kind, fsdp = type(module), _fsdp_module_type()
    if fsdp is not None and isinstance(module, fsdp):
        kind = next(base for base in kind.__bases__ if not issubclass(base, fsdp))
    return kind


def is_sharded(model) -> bool:
    """Whether any parameter of ``model`` is a DTensor (e.g. sharded by FSDP2)."""
    return any(is_dtensor(p) for p in model.parameters())


# ids of the FSDP2 modules an enclosing ``unsharded`` holds whole
_HELD: contextvars.ContextVar = contextvars.ContextVar("regkern_unsharded", default=frozenset())


@contextlib.contextmanager
def unsharded(model) -> Iterator[None]:
    """Inside, the FSDP2 modules of ``model`` hold their whole parameters as
    plain tensors, through forward passes too (a trace then sees one tensor
    per parameter, the one ``named_parameters()`` gives); sharded again on
    exit with the resharding settings they had (FSDP2's first-forward setup
    is run first, so the root keeps its own), and, when a forward inside
    raised, with FSDP2's iteration state reset. Collective (call it on every
    rank); nested uses hold the parameters once. A model without FSDP2
    modules is left as it is."""
    held = _HELD.get()
    modules = [m for m in fsdp_modules(model) if id(m) not in held]
    if not modules:
        yield
        return
    states = [m._get_fsdp_state() for m in modules]
    if not all(hasattr(st, name) for st in states
               for name in ("_lazy_init", "_is_root", "_fsdp_param_groups", "_auto_reshard_after_forward")):
        raise ValueError("regkern traces a model sharded by FSDP2 through FSDP2's per-module state, which this "
                         "torch's FSDP2 does not have (regkern is tested with torch 2.13); find the groups and "
                         "build the schedule with a torch of that line")
    for st in states:  # the setup a first forward makes (which state is the root), before anything is saved
        if st._is_root is None:
            st._lazy_init()
    groups = [g for st in states for g in st._fsdp_param_groups]
    after_forward = [g.post_forward_mesh_info for g in groups]
    automatic = [st._auto_reshard_after_forward for st in states]
    token = _HELD.set(held | {id(m) for m in modules})
    failed = False
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
        for m in modules:
            m.unshard()
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for g, info in zip(groups, after_forward):  # the settings as they were
            g.post_forward_mesh_info = info
        for st, auto in zip(states, automatic):
            st._auto_reshard_after_forward = auto
        for m, st in zip(modules, states):
            if failed and st._is_root:  # a forward that raised left FSDP2 mid-iteration
                m.reset_iter_state()
        for m in modules:
            m.reshard()
        _HELD.reset(token)
