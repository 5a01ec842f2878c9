"""The optimizer-state entries and step options of the fused SGD step, declared once.

Each ``StateEntry`` says what one per-parameter state tensor is: its key,
the shapes it may take for a parameter ``W`` (its layouts), whether its dtype
is fixed or follows ``W``, the keyword of ``reference.sgd_step`` it feeds,
the kernel term that needs it, and whether it is a coefficient checked finite
before a step. Each ``StepOption`` does the same for a group-level constant
that a regularizer's ``step_options`` names. The lists that checkpoint
loading, slicing, backend routing, the coefficient checks and the torch-op
path use are derived below; nothing else spells them.

Layouts: ``"row"`` ``[R]`` (R = W.shape[0], 1 for a scalar), ``"row3"``
``[R, 3]``, ``"column"`` ``[W.shape[1]]``, ``"element"`` W's shape, ``"shared"``
one fixed-shape tensor shared by a whole param group (``shape``), ``"scalar"``
one 0-d tensor per parameter (a step count).

The optimizers' own state (Adam's moments, RDA's running mean, SAS-ADMM's
iterates) is declared here too, family by family (``FAMILY_STATE``), with
the same fields; their checkpoint rules derive from it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

from regkern.reference.sgd import PROX_NONE

LAYOUTS = ("row", "row3", "column", "element", "shared", "scalar")

# when a step uses an entry: added to the gradient, applied to W after the
# update, written after the step, or read only through another entry or option
GRADIENT, UPDATE, OUTPUT = "gradient", "update", "output"

# finite checks: "always" (every backend refuses NaN / inf before writing;
# W-sized element layouts are not read), "table" (only the C++ table check
# reads it: polar's lam and t)
FINITE_ALWAYS, FINITE_TABLE = "always", "table"


@dataclasses.dataclass(frozen=True)
class StateEntry:
    key: str                            # optimizer-state key
    layouts: Tuple[str, ...]
    dtype: Optional[torch.dtype]        # None: the parameter's dtype
    keyword: Optional[str] = None       # reference.sgd_step / SGDPlan keyword; None: the step does not read it
    term: Optional[str] = None          # kernel term (SGD_TERMS name) that needs it; None: every fast backend reads it
    phase: Optional[str] = None         # GRADIENT, UPDATE, OUTPUT or None
    finite: Optional[str] = None        # FINITE_ALWAYS, FINITE_TABLE or None
    column: Optional[str] = None        # its pointer column of the SGD table (backend.SGD_FIELDS)
    shape: Tuple[int, ...] = ()         # the shape of a "shared" entry
    absent: Any = None                  # the keyword's value for a parameter without it


@dataclasses.dataclass(frozen=True)
class StepOption:
    option: str                         # step_options key
    keyword: str                        # reference.sgd_step keyword (one value per parameter)
    term: str
    absent: Any                         # value when no regularizer of the group names it
    phase: Optional[str] = None


SGD_STATE = (
    StateEntry("lam", ("row", "element"), torch.float32, "lams", phase=GRADIENT, finite=FINITE_ALWAYS, column="LAM"),
    StateEntry("lam_cols", ("column",), torch.float32, "lam_cols", phase=GRADIENT, finite=FINITE_ALWAYS,
               column="LAM_COLS"),
    StateEntry("mask", ("row", "element"), torch.bool, "masks", phase=UPDATE, column="MASK"),
    StateEntry("row_norms", ("row3",), torch.float32, "norms", phase=OUTPUT, column="NORMS"),
    StateEntry("l1", ("row",), torch.float32, "l1s", "l1", GRADIENT, FINITE_ALWAYS, "L1"),
    StateEntry("prox_lam", ("row",), torch.float32, "prox_lams", "prox", None, FINITE_ALWAYS, "PROX_LAM"),
    StateEntry("polar", ("shared",), torch.float32, "polars", "polar", GRADIENT, FINITE_TABLE, "POLAR", shape=(4,)),
    StateEntry("admm_target", ("element",), None, "admm_targets", "admm", GRADIENT, column="ADMM_TARGET"),
    # kept by regkern.admm.update, not read by the step
    StateEntry("admm_z", ("element",), torch.float32),
    StateEntry("admm_u", ("element",), torch.float32),
)

SGD_OPTIONS = (
    StepOption("admm_rho", "admm_rhos", "admm", 0.0),
    StepOption("prox_kind", "prox_kinds", "prox", PROX_NONE, UPDATE),
    StepOption("clamp", "clamps", "clamp", None, UPDATE),
)

# The optimizers' own per-parameter state, by family (dtype None: the parameter's;
# float32: fp32 for fp32/bf16/fp16 parameters, float64 for float64 ones).
_STEP = StateEntry("step", ("scalar",), torch.float32)
FAMILY_STATE: Dict[str, Tuple[StateEntry, ...]] = {
    "sgd": (StateEntry("momentum_buffer", ("element",), None),),
    "adam": (StateEntry("exp_avg", ("element",), None), StateEntry("exp_avg_sq", ("element",), None),
             StateEntry("max_exp_avg_sq", ("element",), None), _STEP),
    "rda": (StateEntry("gbar", ("element",), torch.float32), StateEntry("w0", ("element",), torch.float32), _STEP),
    "sas_admm": tuple(StateEntry(key, ("element",), torch.float32)
                      for key in ("w", "w_breve", "z", "u", "anchor", "w_avg"))
    # the outer and inner iteration counters, Python ints
    + (StateEntry("k", ("scalar",), None), StateEntry("t", ("scalar",), None)),
}

STATE_BY_KEY: Dict[str, StateEntry] = {e.key: e for e in SGD_STATE}

# --- derived ---------------------------------------------------------------------

# entries loaded with their saved dtype (torch would cast them to the parameter's)
FIXED_DTYPE_STATE = tuple(e.key for e in SGD_STATE if e.dtype is not None)


def fixed_dtype_state(family: str, regularized: bool = True) -> Tuple[str, ...]:
    """The state keys a family's optimizer loads with their saved dtype: its
    own fixed-dtype entries, and the regularizer terms' when it takes them."""
    own = tuple(e.key for e in FAMILY_STATE[family] if e.dtype is not None)
    return (FIXED_DTYPE_STATE if regularized else ()) + tuple(k for k in own if k not in FIXED_DTYPE_STATE)

# slicing: per-row entries are cut along W's rows, per-column along dim 1, shared ones never
ROW_STATE = tuple(e.key for e in SGD_STATE if {"row", "row3"} & set(e.layouts))
COLUMN_STATE = tuple(e.key for e in SGD_STATE if "column" in e.layouts)
SHARED_STATE = tuple(e.key for e in SGD_STATE if "shared" in e.layouts)

# what the optimizer hands its plan: state key -> keyword, option -> (keyword, absent)
STEP_STATE = {e.key: e.keyword for e in SGD_STATE if e.keyword is not None}
STEP_OPTIONS = {o.option: (o.keyword, o.absent) for o in SGD_OPTIONS}

# routing: kernel term -> the keywords that carry it; keyword -> its value when absent
TERM_KEYWORDS: Dict[str, Tuple[str, ...]] = {}
for _item in SGD_STATE + SGD_OPTIONS:
    if _item.term is not None:
        TERM_KEYWORDS[_item.term] = TERM_KEYWORDS.get(_item.term, ()) + (_item.keyword,)
TERM_ABSENT = {item.keyword: item.absent for item in SGD_STATE + SGD_OPTIONS if item.term is not None}
# keywords outside SGDPlan's positional lists that every fast backend computes (no routing)
POSITIONAL_KEYWORDS = ("lams", "masks", "norms")
CORE_ABSENT = {e.keyword: e.absent for e in SGD_STATE
               if e.keyword is not None and e.term is None and e.keyword not in POSITIONAL_KEYWORDS}

# coefficients checked finite before every step, and the C++ table columns whose refusal names one
FINITE_STATE = tuple(e.key for e in SGD_STATE if e.finite == FINITE_ALWAYS)
COEFFICIENT_KEYS = {e.column: e.key for e in SGD_STATE if e.finite is not None}

# the torch-op path: state added to the gradient; what acts on W after the update
GRADIENT_STATE = tuple(e.key for e in SGD_STATE if e.phase == GRADIENT)
UPDATE_STATE = tuple(e.key for e in SGD_STATE if e.phase == UPDATE)
UPDATE_OPTIONS = {o.option: o.absent for o in SGD_OPTIONS if o.phase == UPDATE}


def layout_shape(layout: str, shape: Tuple[int, ...], entry: Optional[StateEntry] = None) -> Tuple[int, ...]:
    """The shape of a ``layout`` entry for a parameter of ``shape`` (``column``:
    parameters with at least 2 dimensions only)."""
    rows = shape[0] if shape else 1
    if layout == "row":
        return (rows,)
    if layout == "row3":
        return (rows, 3)
    if layout == "column":
        if len(shape) < 2:
            raise ValueError(f"a parameter of shape {tuple(shape)} has no columns")
        return (shape[1],)
    if layout == "element":
        return tuple(shape)
    if layout == "shared":
        return tuple(entry.shape) if entry is not None else ()
    if layout == "scalar":
        return ()
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def entry_dtype(key: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of state entry ``key`` for a parameter of ``param_dtype``."""
    dtype = STATE_BY_KEY[key].dtype
    return param_dtype if dtype is None else dtype
