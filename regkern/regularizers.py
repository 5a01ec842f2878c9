"""What a param group asks for: plain data, no kernels.

A regularizer is set per param group (``{"params": ..., "regularizer":
RowL2()}``). It only creates the per-parameter optimizer state that the fused
step reads (``lam``, ``row_norms``); schedules and users then write those
tensors in place. In ``state_dict`` a regularizer is stored as a plain dict so
checkpoints load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional

from torch import Tensor

from regkern.sharding import row_state


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """Base class: a named, frozen set of options with a dict round-trip."""

    kind: ClassVar[str] = ""
    registry: ClassVar[Dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Regularizer.registry[cls.kind] = cls

    def init_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        """Add this regularizer's tensors to a parameter's optimizer state."""

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: Dict[str, Any]) -> "Regularizer":
        options = dict(data)
        kind = options.pop("kind", None)
        if kind not in Regularizer.registry:
            raise ValueError(f"unknown regularizer kind {kind!r}; known: {sorted(Regularizer.registry)}")
        return Regularizer.registry[kind](**options)


@dataclasses.dataclass(frozen=True)
class RowL2(Regularizer):
    """Per-row L2 penalty ``d += lam[r] * W[r]`` (SPEC 2, growing regularization).

    Each parameter of the group gets ``state["lam"]``, an fp32 vector of
    length ``W.shape[0]`` (zeros; any sign allowed) on the parameter's device.
    With ``track_norms=True`` it also gets ``state["row_norms"]``, an fp32
    ``[R, 3]`` tensor that every step fills with the L1 norm, L2 norm and
    mean |W| of each updated row (SPEC 7), at no extra pass over memory.
    """

    kind: ClassVar[str] = "row_l2"
    track_norms: bool = False

    def init_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        if "lam" not in state:
            state["lam"] = row_state(param)
        if self.track_norms and "row_norms" not in state:
            state["row_norms"] = row_state(param, (3,))


def as_regularizer(value: Any) -> Optional[Regularizer]:
    """Accept a regularizer, its dict form (from a state_dict) or None."""
    if value is None or isinstance(value, Regularizer):
        return value
    if isinstance(value, dict):
        return Regularizer.from_dict(value)
    raise TypeError(f"a param group's 'regularizer' must be a regkern regularizer such as regkern.RowL2(), got {value!r}")
