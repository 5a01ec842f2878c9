"""Pruning runs across processes: DistributedDataParallel and rank agreement.

A structured cut replaces the storage of the parameters it slices (the
Parameter objects stay). A ``DistributedDataParallel`` wrapper built before
the cut still all-reduces the old bucket layout, so regkern rebuilds it in
place: :func:`rebuild_ddp` runs DDP's constructor again on the same wrapper
object, with the options it was built with (and its communication hooks),
over the sliced module. The training loop keeps its ``ddp_model`` reference
and its optimizer; every rank must make the same call, as for any DDP
construction.

:func:`regkern.slicing.slice_model` and every schedule's ``prune()`` do this
by themselves, whether they were handed the wrapper or the module inside it.
Before they cut or freeze masks, the ranks compare a digest of what they
are about to remove (:func:`agree`): different picks (parameters that
diverged across ranks) raise on every rank before anything is written.
:func:`release_ddp` retires a wrapper a loop no longer uses (e.g. before
the pruned model is sharded with FSDP2's ``fully_shard``).

Distributed checkpoints: :func:`checkpoint_state` is what every rank hands
``torch.distributed.checkpoint.save`` (model, optimizer, schedule), and
:func:`load_checkpoint` resumes fresh objects from it, before or after the
cut, with every optimizer state entry (momentum, Adam's moments, ``lam``,
masks, ``row_norms``, RDA and ADMM state).
"""
from __future__ import annotations

import contextlib
import contextvars
import gc
import hashlib
from typing import Any, Iterator, List, Optional

import torch
from torch import Tensor, nn


def _ddp_type():
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # a torch built without distributed support
        return None
    return DistributedDataParallel


def is_ddp(module: Any) -> bool:
    """Whether ``module`` is a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    kind = _ddp_type()
    return kind is not None and isinstance(module, kind)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper, or ``module`` itself."""
    return module.module if is_ddp(module) else module


def wrappers_of(module: nn.Module) -> List[nn.Module]:
    """The live DDP wrappers holding ``module`` (``module`` itself when it is one)."""
    if is_ddp(module):
        return [module]
    kind = _ddp_type()
    import torch.distributed as dist

    if kind is None or not dist.is_initialized():  # no process group: no wrapper can be live
        return []
    return [o for o in gc.get_objects() if issubclass(type(o), kind) and o.module is module]


def ddp_options(wrapper: nn.Module) -> dict:
    """The constructor arguments ``wrapper`` was built with (``ValueError``
    for options regkern cannot carry over to a rebuilt wrapper)."""
    if getattr(wrapper, "_delay_all_reduce_params", None) or getattr(wrapper, "parameters_to_ignore", None):
        raise ValueError("this DistributedDataParallel wrapper ignores or delays some parameters "
                         "(delay_all_reduce_named_params, _set_params_and_buffers_to_ignore_for_model), which regkern "
                         "cannot carry over to the sliced model; rebuild the wrapper yourself after slicing its .module")
    options = dict(device_ids=wrapper.device_ids, output_device=wrapper.output_device, dim=wrapper.dim,
                   process_group=wrapper.process_group, find_unused_parameters=wrapper.find_unused_parameters,
                   gradient_as_bucket_view=wrapper.gradient_as_bucket_view, static_graph=wrapper.static_graph,
                   mixed_precision=wrapper.mixed_precision)
    for name in ("skip_all_reduce_unused_params", "batched_grad_copy"):
        if hasattr(wrapper, name):
            options[name] = getattr(wrapper, name)
    if hasattr(wrapper, "forward_sync_buffers"):
        options["forward_sync_buffers"] = wrapper.forward_sync_buffers
    else:
        options["broadcast_buffers"] = wrapper.broadcast_buffers
    config = getattr(wrapper, "_bucket_config", None)
    caps = tuple(getattr(config, "per_bucket_bytes_caps", ()) or ())
    if caps:
        options["bucket_cap_mb_list"] = [c // (1024 * 1024) for c in caps]
    else:
        options["bucket_cap_mb"] = wrapper.bucket_bytes_cap / (1024 * 1024)
    return options


def rebuild_ddp(wrapper: nn.Module, options: Optional[dict] = None) -> nn.Module:
    """Rebuild a DDP wrapper in place over its (sliced) module: same options,
    same communication hooks, a new reducer over the new parameter shapes;
    returns ``wrapper``. ``options``: what :func:`ddp_options` returned for it
    (read before the module changed). Collective: call it on every rank. The parameters
    are broadcast from rank 0 as at construction (they are equal already)."""
    if not is_ddp(wrapper):
        raise ValueError(f"rebuild_ddp needs a DistributedDataParallel wrapper, got {type(wrapper).__name__}")
    options = ddp_options(wrapper) if options is None else options
    hooks = list(getattr(wrapper, "_comm_hooks", ()))
    module = wrapper.module
    # The old reducer holds hooks on the parameters' gradient accumulators:
    # drop it (and its logger) before the new one is built so it never fires.
    for name in ("logger", "reducer"):
        if hasattr(wrapper, name):
            delattr(wrapper, name)
    gc.collect()
    type(wrapper).__init__(wrapper, module, **options)
    for hook, state in hooks:
        wrapper.register_comm_hook(state, hook)
    return wrapper


def release_ddp(wrapper: nn.Module) -> None:
    """Retire a DDP wrapper that is no longer used: its reducer's hooks on the
    parameters go now, not whenever the garbage collector finds it, so a
    later wrapper or a plain step over the same module is not disturbed."""
    if not is_ddp(wrapper):
        raise ValueError(f"release_ddp needs a DistributedDataParallel wrapper, got {type(wrapper).__name__}")
    for name in ("logger", "reducer"):
        if hasattr(wrapper, name):
            delattr(wrapper, name)
    wrapper.module = nn.Identity()  # no longer found as the module's wrapper
    gc.collect()


# -- agreement across ranks ---------------------------------------------------------

_GROUP: contextvars.ContextVar = contextvars.ContextVar("regkern_agreement_group", default=None)


def distributed_group(model: nn.Module):
    """The process groups a model trains over: its live DDP wrapper's group,
    or for DTensor (FSDP2) parameters the groups of their device mesh, one
    per mesh dimension; None for a model that is not trained across processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    wrappers = wrappers_of(model)
    if wrappers:
        return wrappers[0].process_group
    from regkern.sharding import is_dtensor

    mesh = next((p.device_mesh for p in model.parameters() if is_dtensor(p)), None)
    if mesh is None:
        return None
    return [mesh.get_group(dim) for dim in range(mesh.ndim)]


@contextlib.contextmanager
def agreement(group) -> Iterator[None]:
    """Inside, :func:`agree_here` compares decisions across the ranks of
    ``group`` (a process group, a list of them: each in turn, or None: no check)."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def _digest(payload: Any) -> int:
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for item in x:
                feed(item)
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
        else:
            h.update(repr(x).encode())

    feed(payload)
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def agree(group, what: str, payload: Any) -> None:
    """Raise ``RuntimeError`` on every rank of ``group`` unless all of them
    pass an equal ``payload`` (tensors, numbers, strings, lists, dicts).
    Collective: every rank must call it."""
    import torch.distributed as dist

    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([_digest(payload)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    values = [int(t.item()) for t in every]
    if len(set(values)) > 1:
        differ = [r for r, v in enumerate(values) if v != values[0]]
        raise RuntimeError(f"the ranks chose different {what} (rank(s) {differ} differ from rank 0): their "
                           "parameters or schedule state diverged, so nothing was changed; make every rank train "
                           "the same model (DDP broadcasts it at construction) and call step() and prune() on every rank")


def agree_here(what: str, payload: Any) -> None:
    """:func:`agree` over the group set by :func:`agreement` (nothing outside one)."""
    group = _GROUP.get()
    for one in group if isinstance(group, list) else [group] if group is not None else []:
        agree(one, what, payload)


# -- torch.distributed.checkpoint -----------------------------------------------------

def _schedule_blob(schedule) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(schedule.state_dict(), buf)
    return buf.getvalue()


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, schedule=None, options=None) -> dict:
    """What to hand ``torch.distributed.checkpoint.save`` on every rank:
    ``{"model", "optim"}`` from torch's ``get_state_dict`` (``options``: its
    ``StateDictOptions``) and, with a pruning ``schedule``, ``"schedule"``
    (its state_dict as one opaque entry, identical on every rank). Read it
    back with :func:`load_checkpoint`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    if schedule is not None:
        state["schedule"] = _schedule_blob(schedule)
    return state


def _load_target(meta, param: Tensor):
    """An empty tensor a checkpoint entry described by ``meta`` loads into:
    sharded like the parameter's rows when the parameter is a DTensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from regkern.sharding import is_dtensor, row_state

    if not isinstance(meta, TensorStorageMetadata):
        return None
    shape, dtype = tuple(meta.size), meta.properties.dtype
    if not is_dtensor(param):
        return torch.empty(shape, dtype=dtype, device=param.device)
    if shape == tuple(param.shape):
        return torch.empty_like(param.detach(), dtype=dtype)  # a DTensor laid out like the parameter
    if shape and shape[0] == param.shape[0]:
        return row_state(param, shape[1:], dtype=dtype)
    return torch.empty(shape, dtype=dtype, device=param.to_local().device)


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id=None, schedule=None,
                    options=None, storage_reader=None) -> None:
    """Resume from a ``torch.distributed.checkpoint`` written from
    :func:`checkpoint_state`, on every rank, into a freshly built model,
    optimizer and schedule (wrapped and sharded as when it was saved): the
    schedule first (a saved structured cut is redone, a DDP wrapper rebuilt),
    then torch's ``set_state_dict`` loads the model and the optimizer over a
    template that holds every state entry the checkpoint has, so momentum,
    Adam's moments, ``lam``, masks, ``row_norms``, RDA and ADMM state all
    come back (entries the checkpoint lacks stay absent). A checkpoint that
    does not match raises ``ValueError``: a schedule passed for a checkpoint
    saved without one (or the reverse) before anything is read, optimizer
    state of a parameter this model lacks before the model and optimizer
    are loaded (build fresh objects as when it was saved, and load again).
    The optimizer's step-created entries come from torch's own template
    step (lr 0, zero gradients), which ``get_state_dict`` takes for an
    optimizer that has not stepped yet (``regkern.optim.tracked_state``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(checkpoint_id)
    meta = reader.read_metadata().state_dict_metadata
    saved = set(meta)
    has_schedule = "schedule" in saved
    if (schedule is not None) != has_schedule:
        raise ValueError("this checkpoint holds a pruning schedule's state; pass that schedule" if has_schedule else
                         "this checkpoint holds no schedule state; it was saved without one (pass schedule=None)")
    if schedule is not None:
        import io

        blob = {"schedule": b""}
        dcp.load(blob, storage_reader=reader)
        schedule.load_state_dict(torch.load(io.BytesIO(blob["schedule"]), weights_only=True))
    plain = unwrap(model)
    model_sd, optim_sd = get_state_dict(plain, optimizer, options=options)
    flat, _ = flatten_state_dict({"optim": {"state": optim_sd["state"]}})
    params = dict(plain.named_parameters())
    for key in sorted(k for k in saved if k.startswith("optim.state.") and k not in flat):
        # entries a schedule or a cut wrote (lam, masks, ADMM targets): an empty tensor to load into
        fqn, name = key[len("optim.state."):].rsplit(".", 1)
        if fqn not in params:
            raise ValueError(f"the checkpoint holds optimizer state {key!r} of a parameter this model does not have; "
                             "build the model, optimizer and schedule as when the checkpoint was saved")
        optim_sd["state"].setdefault(fqn, {})[name] = _load_target(meta[key], params[fqn])
    # entries a step creates but the checkpoint lacks (saved before any step) stay absent, as saved
    for fqn, entries in optim_sd["state"].items():
        for key in [k for k in entries if f"optim.state.{fqn}.{k}" not in saved]:
            del entries[key]
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=reader)
    set_state_dict(plain, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
