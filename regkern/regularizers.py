"""What a param group asks for: plain data, no kernels.

A regularizer is set per param group (``{"params": ..., "regularizer":
RowL2()}``, or a list of them, e.g. ``[RowL2(), Clamp(0, 1)]``). It creates
the per-parameter optimizer state that the fused step reads (``lam``,
``row_norms``, ``l1``, ``prox_lam``, ``polar``, ``admm_target``, ...) and
names the group-level constants of the step (which proximal map, clamp
bounds, ADMM's rho); schedules and users then write the state tensors in
place. In ``state_dict`` a regularizer is stored as a plain dict so
checkpoints load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Dict, List, Sequence, Union

import torch
from torch import Tensor

from regkern.reference.sgd import PROX_GROUP, PROX_L1
from regkern.sharding import is_dtensor, local_tensor, row_state, sum_over_shards, whole
from regkern.terms import STATE_BY_KEY


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """Base class: a named, frozen set of options with a dict round-trip."""

    kind: ClassVar[str] = ""
    registry: ClassVar[Dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Regularizer.registry[cls.kind] = cls

    def __post_init__(self) -> None:
        """Refuse options that cannot be stepped, in one sentence, at construction."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{type(self).__name__}({field.name}={value!r}): {field.name} must be True or False")
            elif not _is_number(value):
                raise ValueError(f"{type(self).__name__}({field.name}={value!r}): {field.name} must be a number")
            elif math.isnan(value):
                raise ValueError(f"{type(self).__name__}({field.name}=nan): {field.name} must be a number, not NaN")
        self._check()

    def _check(self) -> None:
        """Further checks of a regularizer's numbers (fields are already numbers or bools)."""

    def _finite_nonnegative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{type(self).__name__}({name}={value!r}): {name} must be finite and >= 0")

    def state_layouts(self, param: Tensor) -> Dict[str, str]:
        """The state entries ``init_state`` creates for ``param``: key -> layout
        (each key and layout declared in ``regkern.terms``)."""
        return {}

    def init_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        """Add this regularizer's tensors to a parameter's optimizer state
        (missing entries only)."""
        for key, layout in self.state_layouts(param).items():
            if key not in state:
                state[key] = self._new_state(key, layout, param)

    def _new_state(self, key: str, layout: str, param: Tensor) -> Tensor:
        """A fresh ``key`` entry for ``param``: fp32 zeros in ``layout``."""
        return new_state(key, layout, param)

    def init_group(self, params: Sequence[Tensor], states: Sequence[Dict[str, Any]]) -> None:
        """Add this regularizer's state for a whole param group (at construction
        and again after ``load_state_dict``: keep what is there)."""
        for p, state in zip(params, states):
            self.init_state(p, state)

    def step_options(self) -> Dict[str, Any]:
        """Group-level constants of the fused step: ``prox_kind``, ``clamp``, ``admm_rho``."""
        return {}

    def before_step(self, params: Sequence[Tensor], states: Sequence[Dict[str, Any]]) -> None:
        """Refresh state that depends on the whole group, once per step, before it."""

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
    """Per-row L2 penalty ``d += lam[r] * W[r]`` (docs/sgd.md, growing regularization).

    Each parameter of the group gets ``state["lam"]``, an fp32 vector of
    length ``W.shape[0]`` (zeros; any sign allowed) on the parameter's device.
    With ``track_norms=True`` it also gets ``state["row_norms"]``, an fp32
    ``[R, 3]`` tensor that every step fills with the L1 norm, L2 norm and
    mean |W| of each updated row (docs/sgd.md), at no extra pass over memory.
    With ``columns=True`` each parameter with at least 2 dimensions also gets
    ``state["lam_cols"]``, fp32 zeros ``[W.shape[1]]``: ``d += lam_cols[c] *
    W[:, c, ...]`` (the input channels a pruned producer removes from its
    consumers).
    """

    kind: ClassVar[str] = "row_l2"
    track_norms: bool = False
    columns: bool = False

    def state_layouts(self, param: Tensor) -> Dict[str, str]:
        layouts = {"lam": "row"}
        if self.track_norms:
            layouts["row_norms"] = "row3"
        if self.columns and param.dim() >= 2:
            layouts["lam_cols"] = "column"
        return layouts


def new_state(key: str, layout: str, param: Tensor) -> Tensor:
    """Zeros for state entry ``key`` of ``param`` in one of its declared
    layouts (regkern.terms), on the parameter's device; a DTensor parameter
    gets a DTensor laid out like it."""
    entry = STATE_BY_KEY[key]
    if layout not in entry.layouts or entry.dtype != torch.float32:
        raise ValueError(f"state[{key!r}] is not declared as a float32 {layout!r} entry")
    if layout == "row":
        return row_state(param)
    if layout == "row3":
        return row_state(param, (3,))
    if layout == "column":
        return _column_state(param)
    if layout == "element":
        return torch.zeros_like(param.detach(), dtype=torch.float32, memory_format=torch.contiguous_format)
    raise ValueError(f"state[{key!r}]: no zeros are made for layout {layout!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _column_state(param: Tensor) -> Tensor:
    """fp32 zeros ``[W.shape[1]]`` for ``param``'s columns. A DTensor gets a
    DTensor laid out like the parameter's dim 1: sharded where dim 1 is,
    else whole on every rank (FSDP shards dim 0, so usually replicated)."""
    local = local_tensor(param)
    value = torch.zeros(local.shape[1], dtype=torch.float32, device=local.device)
    if local is param:
        return value
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Shard(0) if isinstance(p, Shard) and p.dim == 1 else Replicate() for p in param.placements]
    return DTensor.from_local(value, param.device_mesh, placements, shape=(param.shape[1],), stride=(1,))


@dataclasses.dataclass(frozen=True)
class ElementL2(Regularizer):
    """Per-element L2 penalty ``d += lam * W`` (GReg's unstructured "weight" mode).

    Each parameter of the group gets ``state["lam"]``, fp32 zeros of the
    parameter's shape (a DTensor parameter: sharded like it); schedules raise
    the entries of the weights they drive to zero.
    """

    kind: ClassVar[str] = "element_l2"

    def state_layouts(self, param: Tensor) -> Dict[str, str]:
        return {"lam": "element"}


@dataclasses.dataclass(frozen=True)
class ColumnL2(Regularizer):
    """Per-input-column L2 penalty ``d += lam_cols[c] * W[:, c, ...]`` alone
    (pruning input features or input channels: grow the entries of the
    columns to remove). Each parameter with at least 2 dimensions gets
    ``state["lam_cols"]``, fp32 zeros ``[W.shape[1]]``; others get nothing.
    """

    kind: ClassVar[str] = "column_l2"

    def state_layouts(self, param: Tensor) -> Dict[str, str]:
        return {"lam_cols": "column"} if param.dim() >= 2 else {}


def _per_row(param: Tensor, lam: Union[float, Tensor]) -> Tensor:
    """An fp32 per-row vector from a scalar or a per-row tensor."""
    value = row_state(param)
    local = local_tensor(value)
    local.copy_(torch.as_tensor(lam, dtype=torch.float32).expand(local.shape) if not isinstance(lam, Tensor)
                or lam.dim() == 0 else lam.to(local.device, torch.float32))
    return value


@dataclasses.dataclass(frozen=True)
class L1(Regularizer):
    """The L1 subgradient ``d += lam * sign(W)`` (network slimming on BN scales).

    ``state["l1"]``: fp32 per-row coefficients, filled with ``lam``.
    """

    kind: ClassVar[str] = "l1"
    lam: float = 1e-4

    def _check(self) -> None:
        self._finite_nonnegative("lam")

    def state_layouts(self, param: Tensor) -> Dict[str, str]:
        return {"l1": "row"}

    def _new_state(self, key: str, layout: str, param: Tensor) -> Tensor:
        return _per_row(param, self.lam)


@dataclasses.dataclass(frozen=True)
class ProxL1(Regularizer):
    """Proximal L1 after the SGD update: ``W = sign(W) max(|W| - lr lam_r, 0)`` (docs/regularizers.md).

    ``state["prox_lam"]``: fp32 per-row lambdas, filled with ``lam``; the
    result holds exact zeros.
    """

    kind: ClassVar[str] = "prox_l1"
    lam: float = 1e-4

    def _check(self) -> None:
        self._finite_nonnegative("lam")

    def state_layouts(self, param: Tensor) -> Dict[str, str]:
        return {"prox_lam": "row"}

    def _new_state(self, key: str, layout: str, param: Tensor) -> Tensor:
        return _per_row(param, self.lam)

    def step_options(self) -> Dict[str, Any]:
        return {"prox_kind": PROX_L1}


@dataclasses.dataclass(frozen=True)
class GroupLasso(ProxL1):
    """Group lasso on rows after the SGD update (docs/regularizers.md):
    ``W_r *= max(0, 1 - lr lam_r sqrt(n_r) / ||W_r||)``; whole rows become exact zeros."""

    kind: ClassVar[str] = "group_lasso"

    def step_options(self) -> Dict[str, Any]:
        return {"prox_kind": PROX_GROUP}


@dataclasses.dataclass(frozen=True)
class Clamp(Regularizer):
    """Clamp every weight of the group to ``[lo, hi]`` after the step."""

    kind: ClassVar[str] = "clamp"
    lo: float = 0.0
    hi: float = 1.0

    def _check(self) -> None:
        if not self.lo <= self.hi:
            raise ValueError(f"Clamp needs lo <= hi, got lo={self.lo}, hi={self.hi}")

    def step_options(self) -> Dict[str, Any]:
        return {"clamp": (float(self.lo), float(self.hi))}


@dataclasses.dataclass(frozen=True)
class Polarization(Regularizer):
    """The polarization regularizer on BatchNorm scales (docs/regularizers.md).

    The param group is the polarization set. Before each step the mean ``m``
    of all its values and the mean ``s`` of ``sign(gamma - m)`` are computed
    (one small reduction), then the fused step adds
    ``lam * (t sign(gamma) - sign(gamma - m) + s)`` to the gradient and clamps
    every scale to ``[0, a]``. ``state["polar"]`` holds ``(lam, t, m, s)``.
    """

    kind: ClassVar[str] = "polarization"
    lam: float = 5e-5
    t: float = 1.4
    a: float = 1.0

    def _check(self) -> None:
        self._finite_nonnegative("lam")
        if not math.isfinite(self.t):
            raise ValueError(f"Polarization(t={self.t!r}): t must be finite (the recipes use 1.2 to 1.5)")
        if not (math.isfinite(self.a) and self.a > 0):
            raise ValueError(f"Polarization(a={self.a!r}): a, the upper clamp of the scales, must be finite and > 0")

    def state_layouts(self, param: Tensor) -> Dict[str, str]:
        return {"polar": "shared"}

    def init_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        """Nothing per parameter: ``init_group`` shares one ``polar`` over the set."""

    def init_group(self, params: Sequence[Tensor], states: Sequence[Dict[str, Any]]) -> None:
        # also after load_state_dict, which loads one copy per parameter: share one again
        if not params:
            return
        polar = torch.tensor([self.lam, self.t, 0.0, 0.0], dtype=torch.float32,
                             device=local_tensor(params[0]).device)
        for state in states:
            state["polar"] = polar  # one tensor shared by the whole set

    def step_options(self) -> Dict[str, Any]:
        return {"clamp": (0.0, float(self.a))}

    def before_step(self, params: Sequence[Tensor], states: Sequence[Dict[str, Any]]) -> None:
        """``m`` and ``s`` of the set into ``polar[2:]``: one concatenation of
        the scales (a few KB: the copy is cheap, a torch op per tensor is
        not), its mean, then the mean of ``sign(gamma - m)`` computed in place."""
        if not params:
            return
        polar = states[0]["polar"]
        sharded = any(map(is_dtensor, params))
        with torch.no_grad():
            tensors = [local_tensor(p) for p in params] if sharded else params
            if not all(t.dim() == 1 for t in tensors):
                tensors = [t.reshape(-1) for t in tensors]
            values = torch.cat(tensors)
            if values.dtype != torch.float32:
                values = values.float()
            if not sharded:
                m = values.mean()
                torch.stack([m, values.sub_(m).sign_().mean()], out=polar[2:])
                return
            # sharded scales: the means are over the whole set, summed across the ranks
            sums = sum_over_shards(torch.stack([values.sum(), values.new_tensor(float(values.numel()))]), params)
            m = sums[0] / sums[1]
            signs = sum_over_shards(values.sub_(m).sign_().sum().reshape(1), params)
            torch.stack([m, signs[0] / sums[1]], out=polar[2:])

    def value(self, params: Sequence[Tensor]) -> Tensor:
        """``R(gamma) = lam * sum(t |gamma| - |gamma - mean(gamma)|)`` over the set
        (sharded scales are gathered: call it on every rank)."""
        values = torch.cat([whole(p).detach().reshape(-1) for p in params]).double()
        return self.lam * (self.t * values.abs() - (values - values.mean()).abs()).sum()


@dataclasses.dataclass(frozen=True)
class ADMM(Regularizer):
    """The ADMM W-step penalty ``d += rho * (W - Z + U)`` (docs/admm.md).

    State: ``admm_z`` and ``admm_u`` (fp32, ``Z = W`` and ``U = 0`` at the
    start) and ``admm_target = Z - U`` in W's dtype, which the fused step
    reads; ``regkern.admm.update(optimizer, ratio=...)`` refreshes all three, for
    every ADMM parameter in one fused pass, every K steps.
    """

    kind: ClassVar[str] = "admm"
    rho: float = 1e-3

    def _check(self) -> None:
        self._finite_nonnegative("rho")

    def state_layouts(self, param: Tensor) -> Dict[str, str]:
        return {"admm_z": "element", "admm_u": "element", "admm_target": "element"}

    def init_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        # all three together: Z = W, U = 0, target = Z - U in W's dtype
        if "admm_z" not in state:
            state["admm_z"] = param.detach().float().clone()
            state["admm_u"] = torch.zeros_like(state["admm_z"])
            state["admm_target"] = param.detach().clone()

    def step_options(self) -> Dict[str, Any]:
        return {"admm_rho": float(self.rho)}


Regularizers = Union[None, Regularizer, List[Regularizer]]


def as_regularizer(value: Any) -> Regularizers:
    """Accept a regularizer, a list of them, their dict forms (from a
    state_dict) or None."""
    if value is None or isinstance(value, Regularizer):
        return value
    if isinstance(value, dict):
        return Regularizer.from_dict(value)
    if isinstance(value, (list, tuple)):
        regs = [as_regularizer(v) for v in value]
        if any(r is None or isinstance(r, list) for r in regs):
            raise TypeError(f"a list of regularizers may only hold regularizers, got {value!r}")
        step_options(regs)  # refuses conflicting options
        return regs
    raise TypeError(f"a param group's 'regularizer' must be a regkern regularizer such as regkern.RowL2(), got {value!r}")


def regularizer_list(value: Regularizers) -> List[Regularizer]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def step_options(value: Regularizers) -> Dict[str, Any]:
    """The merged group-level step options of a group's regularizers."""
    merged: Dict[str, Any] = {}
    for reg in regularizer_list(value):
        for key, option in reg.step_options().items():
            if key in merged and merged[key] != option:
                raise ValueError(f"regularizers of one param group disagree on {key}: {merged[key]} and {option}")
            merged[key] = option
    return merged


def to_saved(value: Regularizers):
    """The plain-data form of a group's regularizers for state_dict."""
    if isinstance(value, list):
        return [r.to_dict() for r in value]
    return None if value is None else value.to_dict()
