"""Running a user's model on its example inputs, as tracing, layout checks
and MAC counts do: the inputs in any of the forms ``example_inputs`` takes,
and the model's train/eval flags left as they were."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from regkern.sharding import unsharded


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(**x)`` for a dict, ``model(*x)`` for a tuple or list, else ``model(x)``."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit (whatever ran inside).
    A model sharded by FSDP2 holds its whole parameters inside
    (:func:`regkern.sharding.unsharded`): the forward passes run here see
    the tensors ``named_parameters()`` gives, and the model is sharded again
    on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with unsharded(model):
            yield
    finally:
        for m, training in modes:
            m.training = training


def run_in_eval(model: nn.Module, example_inputs: Any) -> Any:
    """One forward pass in eval mode without autograd (BatchNorm statistics
    do not move), the model's flags restored afterwards."""
    with modes_kept(model), torch.no_grad():
        model.eval()
        return call_model(model, example_inputs)
