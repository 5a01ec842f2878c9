"""state_dict helpers shared by regkern's optimizers.

torch's ``Optimizer.load_state_dict`` casts every floating-point state tensor
to its parameter's dtype: an fp32 lambda or running mean would be rounded to
bf16, a bool mask turned into floats. regkern's optimizers name the entries
whose dtype is fixed and load them as saved.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import Tensor

Restore = Callable[[str, Any, Tensor], Any]


def plain_state(saved: Dict[str, Any]) -> Dict[str, Any]:
    """``saved`` with each parameter's state as a plain dict (picklable under
    ``torch.load(weights_only=True)``)."""
    saved["state"] = {key: dict(entry) if isinstance(entry, dict) else entry for key, entry in saved["state"].items()}
    return saved


def to_param_device(name: str, value: Any, param: Tensor) -> Any:
    return value.to(device=param.device).clone() if isinstance(value, Tensor) else value


def load_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: Dict[str, Any],
                        fixed: Iterable[str], load: Callable[[Dict[str, Any]], None],
                        restore: Optional[Restore] = None) -> None:
    """Load ``state_dict`` with ``load`` (torch's ``load_state_dict``), then put
    back the ``fixed`` entries with their saved dtype, on the parameter's device
    (or as ``restore(name, value, param)`` makes them)."""
    fixed = set(fixed)
    restore = restore or to_param_device
    state_dict = dict(state_dict)
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # entries of parameters only (torch's state may hold any other key and value, loaded as is)
    known = set(ids)
    of_params = {key: entry for key, entry in state_dict["state"].items() if key in known and isinstance(entry, dict)}
    kept = {key: {k: v for k, v in entry.items() if k in fixed} for key, entry in of_params.items()}
    state_dict["state"] = {**state_dict["state"],
                           **{key: {k: v for k, v in entry.items() if k not in fixed} for key, entry in of_params.items()}}
    load(state_dict)
    by_id = dict(zip(ids, params))
    for key, entries in kept.items():
        param = by_id[key]
        for name, value in entries.items():
            optimizer.state[param][name] = restore(name, value, param)
