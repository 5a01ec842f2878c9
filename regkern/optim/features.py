"""What each regkern optimizer's step acts on, for the code that writes
optimizer state for it to act on (pruning schedules, masks): a writer names
the features it works through and refuses an optimizer whose step reads
none of them, since it would have no effect."""
from __future__ import annotations

from typing import Sequence

import torch

# What a schedule can work through, and which optimizer's step acts on it. A
# schedule names the features it needs in ``Schedule.drives``; the optimizer
# must act on at least one of them, or the schedule would change nothing.
FEATURES = {
    "lam": "the penalty state['lam']",
    "l1": "the L1 coefficients state['l1']",
    "polar": "a regkern.Polarization param group",
    "prox": "a regkern.ProxL1 or regkern.GroupLasso param group",
    "admm": "a regkern.ADMM param group",
    "rda": "the L1 term of regkern.RDA",
    "sas_admm": "the ADMM iteration of regkern.SASADMM",
    "mask": "the masks state['mask']",
}
READERS = {  # regkern.optim class name -> what its step acts on
    "SGD": frozenset({"lam", "l1", "polar", "prox", "admm", "mask"}),
    "Adam": frozenset({"lam", "l1", "polar", "prox", "admm", "mask"}),  # AdamW too (a subclass)
    "RDA": frozenset({"rda", "mask"}),
    "SASADMM": frozenset({"sas_admm"}),
}


def optimizer_reads(optimizer: torch.optim.Optimizer) -> frozenset:
    """The features (keys of :data:`FEATURES`) that ``optimizer``'s step acts on:
    none for an optimizer outside regkern (it ignores regkern's state)."""
    import regkern.optim  # looked up when called: any module of regkern.optim may import this one

    for name, reads in READERS.items():
        if isinstance(optimizer, getattr(regkern.optim, name)):
            return reads
    return frozenset()


def require_reads(optimizer: torch.optim.Optimizer, drives: Sequence[str], method: str) -> None:
    """Refuse ``optimizer`` when its step acts on none of ``drives`` (nothing
    is written: call it before the schedule touches the optimizer)."""
    if not drives or optimizer_reads(optimizer) & set(drives):
        return
    kind = type(optimizer)
    what = " or ".join(FEATURES[d] for d in drives)
    names = [f"regkern.{n}" for name, reads in READERS.items() if reads & set(drives)
             for n in ((name, "AdamW") if name == "Adam" else (name,))]
    use = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    raise ValueError(f"{method} works through {what}, which the step of {kind.__module__}.{kind.__qualname__} "
                     f"does not read (it would have no effect); build the optimizer as {use}")
