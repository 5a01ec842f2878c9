"""Sparse training with exact zeros (RDA, proximal L1, group lasso), then the
zeros frozen into masks for fine-tuning."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from regkern.masks import apply_mask
from regkern.optim.features import require_reads
from regkern.prune.base import PruneSummary, Schedule, drop_regularizer, param_names, regularizers_of
from regkern.prune.greg import _check_int
from regkern.sharding import whole


def check_mask_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> None:
    """``optimizer`` can keep masks on ``params``: its step reads
    ``state["mask"]`` (regkern.SGD, regkern.RDA; any other would let the pruned
    weights grow back) and it holds every one of them."""
    require_reads(optimizer, ("mask",), "install_masks")
    owned = {p for g in optimizer.param_groups for p in g["params"]}
    missing = [tuple(p.shape) for p in params if p not in owned]
    if missing:
        raise ValueError(f"the fine-tuning optimizer does not hold the masked parameter(s) of shape "
                         f"{missing[:3]}; build it over model.parameters()")


def install_masks(optimizer: torch.optim.Optimizer, masks: Dict[nn.Parameter, Tensor]) -> None:
    """Put each mask (bool, ``[R]`` rows or W-shaped) into ``optimizer``'s state
    for its parameter (and zero what it masks); the fused step of regkern.SGD /
    regkern.RDA keeps those weights exact zeros. The optimizer must be one of
    those and hold every parameter (checked before anything is written)."""
    check_mask_optimizer(optimizer, masks)
    for p, keep in masks.items():
        apply_mask(optimizer, p, keep.to(p.device))


class SparseTraining(Schedule):
    """Sparse training for ``steps`` optimizer steps (phase ``"train"``), then
    ``prune()`` reads the sparsity from the exact zeros and freezes it into
    ``state["mask"]``: an element mask, or a row mask for row sparsity
    (``regkern.GroupLasso``, or ``regkern.RDA(group=True)``).

    The optimizer is a ``regkern.RDA`` (param groups with ``lam > 0`` are the
    sparse ones) or a ``regkern.SGD`` whose sparse groups carry
    ``regkern.ProxL1`` / ``regkern.GroupLasso``. For fine-tuning with the same
    SGD the proximal regularizer is taken off those groups (the masks keep the
    zeros); an RDA keeps its L1 term, since dropping it would move every
    kept weight at once. ``prune(finetune_optimizer=opt)`` also installs the
    masks into another optimizer (e.g. a regkern.SGD for fine-tuning after
    RDA).
    """

    method = "SparseTraining"
    drives = ("prox", "rda")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, steps: int) -> None:
        super().__init__(model, optimizer)
        _check_int(steps, "steps (sparse-training steps before pruning)", 0)
        from regkern.optim import RDA
        from regkern.regularizers import GroupLasso, ProxL1

        names = param_names(model)
        self.sparse: List[Tuple[str, nn.Parameter, bool]] = []  # (name, param, rows)
        for g in optimizer.param_groups:
            if isinstance(optimizer, RDA):
                sparse, rows = float(g["lam"]) > 0, bool(g["group"])
            else:
                regs = regularizers_of(g) if "regularizer" in g else []
                sparse = any(isinstance(r, ProxL1) for r in regs)
                rows = any(isinstance(r, GroupLasso) for r in regs)
            if sparse:
                for p in g["params"]:
                    if p not in names:
                        raise ValueError("the optimizer holds a parameter that is not in the model")
                    self.sparse.append((names[p], p, rows and p.dim() > 0))
        if not self.sparse:
            raise ValueError("SparseTraining found no sparsifying param group: use regkern.RDA with lam > 0, or "
                             "regkern.SGD with a regkern.ProxL1() or regkern.GroupLasso() group")
        self.steps = steps
        self.masks: Dict[str, Tensor] = {}
        self._phase = "train"
        self._done = steps == 0

    def _advance(self) -> None:
        if self.iteration >= self.steps:
            self._done = True

    def sparsity(self) -> Dict[str, Tuple[int, int]]:
        """``{parameter: (non-zero, total)}`` now, counted in rows for row sparsity."""
        out = {}
        for name, p, rows in self.sparse:
            keep = self._keep(p, rows)
            out[name] = (int(keep.sum()), keep.numel())
        return out

    @staticmethod
    def _keep(p: Tensor, rows: bool) -> Tensor:
        w = whole(p).detach()
        return w.reshape(w.shape[0], -1).ne(0).any(dim=1) if rows else w.ne(0)

    def _prune(self, finetune_optimizer: Optional[torch.optim.Optimizer] = None) -> PruneSummary:
        from regkern.optim import RDA
        from regkern.regularizers import ProxL1

        keeps = {p: self._keep(p, rows) for _, p, rows in self.sparse}
        if finetune_optimizer is not None and finetune_optimizer is not self.optimizer:
            install_masks(finetune_optimizer, keeps)  # checks first
        for p, keep in keeps.items():
            apply_mask(self.optimizer, p, keep)
        notes = []
        if isinstance(self.optimizer, RDA):
            notes.append("RDA keeps its L1 term while fine-tuning (the masks freeze the zeros it found)")
        else:
            sparse_ids = {id(p) for _, p, _ in self.sparse}
            for g in self.optimizer.param_groups:
                if any(id(p) in sparse_ids for p in g["params"]):
                    drop_regularizer(g, ProxL1)
                    for p in g["params"]:
                        if "prox_lam" in self.optimizer.state.get(p, {}):
                            del self.optimizer.state[p]["prox_lam"]
        self.masks = {name: keeps[p].cpu() for name, p, _ in self.sparse}
        layers = {name: (int(keeps[p].sum()), keeps[p].numel()) for name, p, _ in self.sparse}
        return PruneSummary(self.method, False, layers, None, notes)

    def _extra_state(self) -> Dict[str, Any]:
        return {"params": [n for n, _, _ in self.sparse], "masks": dict(self.masks)}

    def _check_extra(self, state: Dict[str, Any]) -> None:
        if state.get("params") != [n for n, _, _ in self.sparse]:
            raise ValueError("this SparseTraining state_dict was saved for other parameters; build the schedule "
                             "with the same model and optimizer groups")

    def _reapply(self, state: Dict[str, Any]) -> None:
        # masks come back with the optimizer state; the regularizer change with its param_groups
        from regkern.optim import RDA
        from regkern.regularizers import ProxL1

        if not isinstance(self.optimizer, RDA):
            sparse_ids = {id(p) for _, p, _ in self.sparse}
            for g in self.optimizer.param_groups:
                if any(id(p) in sparse_ids for p in g["params"]):
                    drop_regularizer(g, ProxL1)

    def _load_extra(self, state: Dict[str, Any]) -> None:
        self.masks = dict(state.get("masks") or {})
