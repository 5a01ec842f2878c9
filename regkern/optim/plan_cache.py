"""The per-group plan cache shared by regkern's fused optimizers.

A plan (validated metadata of a group's parameters and state) is reused
while the parameters that have gradients, their storage and the state are the
same; each step then only checks the gradients.
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import Any, Callable, Dict, List, Tuple

from torch import Tensor

from regkern.sharding import local_tensor


def prepare_group(plans: Dict[int, Any], index: int, group_params: List[Tensor],
                  fits: Callable[[Any, List[Tensor]], bool],
                  build: Callable[[List[Tensor]], Any]) -> Tuple[Any, List[Tensor]]:
    """The group's cached plan (rebuilt with ``build`` unless ``fits``) and its
    checked local gradients; parameters without a gradient are left out."""
    params = group_params
    grads = [p.grad for p in params]
    if not all(map(operator.is_not, grads, repeat(None))):
        params = [p for p, g in zip(params, grads) if g is not None]
        grads = [g for g in grads if g is not None]
    cached = plans.get(index)
    fresh = cached is None or not fits(cached, params)
    if fresh:
        cached = plans[index] = build(params)
    if cached.sharded:
        grads = [local_tensor(g) for g in grads]
    try:
        return cached, cached.plan.checked_grads(grads)
    except ValueError:
        if fresh:
            raise
    # e.g. a parameter resized in place through .data: check against a new plan
    cached = plans[index] = build(params)
    return cached, cached.plan.checked_grads(grads)
