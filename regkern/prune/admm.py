"""ADMM pruning (``docs/admm.md``): the ADMM phase, the final per-layer projection, and
masked retraining.

Classic (Zhang et al. 2018): ``regkern.SGD`` with a ``regkern.ADMM(rho)`` param
group (its fused step adds ``rho * (W - Z + U)``); every ``K`` steps this
schedule runs the Z/U update of :mod:`regkern.admm` (``Z = Proj(W + U)``,
``U += W - Z``). SAS-ADMM (Yuan et al. 2024): ``regkern.SASADMM`` runs the
whole ADMM itself; this schedule counts its outer iterations. Then ``prune()``
projects each layer (keep the top magnitudes, or the top rows by L2 norm with
``structured=True``) and freezes the result into ``state["mask"]``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from regkern.prune.base import (PruneSummary, Schedule, check_in_optimizer, drop_regularizer, ensure_group,
                                group_of, nothing_to_prune, regularizers_of)
from regkern.prune.greg import _check_int, _check_pos
from regkern.prune.ratios import RatioSpec, layer_ratios, prunable_layers
from regkern.masks import apply_mask
from regkern.prune.sparse import check_mask_optimizer, install_masks
from regkern.sharding import local_tensor, own_shard, whole, write_whole


class ADMMPruner(Schedule):
    """ADMM phase -> final projection -> masked retraining.

    Args:
        model, optimizer: a ``regkern.SGD`` (classic ADMM) or ``regkern.SASADMM``.
        ratios: per-layer fraction of weights (rows) to prune, in the forms of
            :mod:`regkern.prune.ratios` (default ignore: the output layer; the
            official SAS-ADMM recipe is ``ratios=0.85``: 85th percentile on every
            conv, classifier kept). Counted as :func:`regkern.admm.kept_count`
            (the official percentile rule).
        steps: classic: length of the ADMM phase in optimizer steps.
        K: classic: steps between Z/U updates (default 100).
        rho: classic: the penalty of a new ADMM group (default 1e-3; when the
            optimizer has none, the chosen weights move into one with the
            hyper-parameters of their group; create LR schedulers after the
            schedule). An optimizer that has an ADMM group keeps its rho; a
            different ``rho`` given here is refused. SAS-ADMM takes neither
            ``K`` nor ``rho``: the optimizer's ``beta`` and ``rho`` rule it.
        structured: project whole rows (``W[r]``, by L2 norm) instead of weights.
        outer_iterations: SAS-ADMM: length of the ADMM phase in outer iterations.

    Classic: at construction ``Z = Proj(W)``, ``U = 0`` (the usual start). Phases:
    ``"admm"`` -> (done) -> ``"finetune"``. ``prune(finetune_optimizer=None,
    use=None)``: classic projects W itself (``use="z"``: the projected ``Z``),
    masks it and takes the ADMM regularizer and state off for retraining with
    the same optimizer. SAS-ADMM first writes the official final weights into
    the parameters: the ergodic average of ``W`` over the outer iterations
    from the optimizer's ``average_from`` on (``use="average"``, the default;
    the last ``W`` when the run stopped before ``average_from``: the summary
    notes which), or ``use="w"`` (the last ``W``) or ``"z"`` (the sparse
    ``Z``); then it projects and masks. SASADMM does not read masks, so pass
    the retraining optimizer (a regkern.SGD) as ``finetune_optimizer`` or call
    :meth:`install_masks` on it later.

    Where this differs from the official code, on purpose:

    * SAS-ADMM: ties at the percentile are broken by index so that exactly
      ``kept_count`` weights survive (the official ``|w| < percentile`` keeps
      every tied weight); the official run holds only the conv weights and the
      classifier weight in the ADMM (build the SASADMM over those).
    * Classic: the official code (LeNet-5 on MNIST) uses ``rho=1e-4``, a Z/U
      update every 5000 Adam steps for 30 updates, prunes the output layer
      too, and retrains with a fresh Adam. The defaults here (``rho=1e-3``,
      ``K=100``, output layer ignored) are a start for short SGD runs, since
      those numbers belong to that recipe; pass ``rho=1e-4, K=5000,
      steps=150000, ignore=()`` to follow it. Retraining goes on with the same
      optimizer (its momentum of the kept weights carries over); pass a fresh
      ``finetune_optimizer`` to start from zero momentum as the official code does.
    """

    method = "ADMMPruner"
    drives = ("admm", "sas_admm")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ratios: RatioSpec = 0.5, *,
                 steps: Optional[int] = None, K: Optional[int] = None, rho: Optional[float] = None,
                 structured: bool = False,
                 outer_iterations: Optional[int] = None, skip: Sequence = (),
                 ignore: Optional[Sequence] = None) -> None:
        super().__init__(model, optimizer)
        from regkern.optim import SASADMM
        from regkern.regularizers import ADMM

        self.sas = isinstance(optimizer, SASADMM)
        if self.sas:
            _check_int(outer_iterations, "outer_iterations (SAS-ADMM outer iterations before pruning)", 1)
            if steps is not None:
                raise ValueError("with regkern.SASADMM the ADMM phase is counted in outer_iterations, not steps")
            if K is not None or rho is not None:
                raise ValueError("K and rho are for classic ADMM; regkern.SASADMM runs its own ADMM (set beta and "
                                 "rho on the optimizer)")
        else:
            _check_int(steps, "steps (optimizer steps of the ADMM phase)", 0)
            K = 100 if K is None else K
            _check_int(K, "K (steps between Z/U updates)", 1)
            if rho is not None:
                _check_pos(rho, "rho")
            if outer_iterations is not None:
                raise ValueError("outer_iterations is for regkern.SASADMM; classic ADMM takes steps and K")
            held = [r for g in optimizer.param_groups for r in regularizers_of(g) if isinstance(r, ADMM)]
            if held and rho is not None and float(rho) != held[0].rho:
                raise ValueError(f"the optimizer's ADMM group has rho={held[0].rho}, but rho={rho} was given; "
                                 "give one or the other")
            rho = 1e-3 if rho is None else float(rho)
        if not isinstance(structured, bool):
            raise ValueError(f"structured must be True or False, got {structured!r}")
        by_layer = layer_ratios(model, ratios, skip=skip, ignore=ignore)
        self.layers: List[Tuple[str, nn.Parameter, float]] = [
            (name, m.weight, by_layer[name]) for name, m in prunable_layers(model) if by_layer[name] > 0]
        if not self.layers:
            raise ValueError(nothing_to_prune(self.method, by_layer))
        self.steps, self.K, self.structured = steps, K, structured
        self.outer_iterations = outer_iterations
        named = [(n + ".weight", p) for n, p, _ in self.layers]
        check_in_optimizer(optimizer, named)
        self.masks: Dict[str, Tensor] = {}
        self._phase = "admm"
        if not self.sas:
            ensure_group(optimizer, named, ADMM, lambda: ADMM(rho=float(rho)), self.method)
            from regkern.admm import project

            for _, p, ratio in self.layers:  # Z = Proj(W), U = 0
                st = optimizer.state[p]
                write_whole(st["admm_z"], project(whole(p).to(st["admm_z"].dtype), ratio=ratio, rows=self.structured))
                st["admm_u"].zero_()
                st["admm_target"].copy_(st["admm_z"])
            self._done = steps == 0

    @property
    def group(self):
        """Classic: the param group with the ADMM regularizer."""
        return group_of(self.optimizer, self.layers[0][1])

    # -- timetable ------------------------------------------------------------
    def _advance(self) -> None:
        if self.sas:
            ks = [int(self.optimizer.state[p].get("k", 1)) for _, p, _ in self.layers if p in self.optimizer.state]
            if ks and min(ks) > self.outer_iterations:
                self._done = True
            return
        if self.iteration % self.K == 0 and not self._done:
            self.admm_update()
        if self.iteration >= self.steps:
            self._done = True

    @torch.no_grad()
    def admm_update(self) -> None:
        """The Z/U update of every layer in one fused call (``Z = Proj(W + U)``,
        ``U += W - Z``, ``target = Z - U``; per-layer ratios)."""
        from regkern.admm import admm_update_all

        states = [self.optimizer.state[p] for _, p, _ in self.layers]
        admm_update_all([p for _, p, _ in self.layers], [st["admm_z"] for st in states],
                        [st["admm_u"] for st in states], [st["admm_target"] for st in states],
                        ratio=[r for _, _, r in self.layers], rows=self.structured,
                        backend=getattr(self.optimizer, "backend", None))

    # -- pruning ----------------------------------------------------------------
    def install_masks(self, optimizer: torch.optim.Optimizer) -> None:
        """Install the masks of the last ``prune()`` into ``optimizer`` (for retraining)."""
        if not self.masks:
            raise ValueError("no masks yet: call prune() first")
        params = dict(self.model.named_parameters())
        install_masks(optimizer, {params[name]: m for name, m in self.masks.items()})

    @torch.no_grad()
    def _prune(self, finetune_optimizer: Optional[torch.optim.Optimizer] = None,
               use: Optional[str] = None) -> PruneSummary:
        from regkern.admm import project

        if use is None:
            use = "average" if self.sas else "w"
        if self.sas and use not in ("average", "w", "z"):
            raise ValueError(f"use must be 'average' (the ergodic average of W, official), 'w' (the last W) or "
                             f"'z' (the sparse Z), got {use!r}")
        if not self.sas and use not in ("w", "z"):
            raise ValueError(f"use must be 'w' (the ADMM iterate W) or 'z' (the projected Z), got {use!r}"
                             f"{'; the ergodic average is kept by regkern.SASADMM only' if use == 'average' else ''}")
        if finetune_optimizer is not None and finetune_optimizer is not self.optimizer:
            check_mask_optimizer(finetune_optimizer, [p for _, p, _ in self.layers])  # before writing anything
        notes = []
        if self.sas:
            if use == "average":
                notes.append(self._average_note())
            self.optimizer.write_params(use)
        elif use == "z":
            for _, p, _ in self.layers:
                p.copy_(self.optimizer.state[p]["admm_z"])
        keeps = {}
        for name, p, ratio in self.layers:
            kept = project(whole(p).float(), ratio=ratio, rows=self.structured)
            w = kept.reshape(kept.shape[0], -1) if self.structured else kept
            keeps[p] = w.ne(0).any(dim=1) if self.structured else w.ne(0)
        if finetune_optimizer is not None and finetune_optimizer is not self.optimizer:
            install_masks(finetune_optimizer, keeps)
        if self.sas:
            for p, keep in keeps.items():
                full = keep.view((-1,) + (1,) * (p.dim() - 1)).expand(p.shape) if keep.dim() == 1 else keep
                local_tensor(p).mul_(own_shard(p, full))
        else:
            for p, keep in keeps.items():
                apply_mask(self.optimizer, p, keep)
            self._finetune_setup()
        self.masks = {name + ".weight": keeps[p].cpu() for name, p, _ in self.layers}
        layers = {name: (int(keeps[p].sum()), keeps[p].numel()) for name, p, _ in self.layers}
        if self.structured:
            notes.append("rows are masked to exact zeros, not sliced out (BatchNorm shifts after them still act)")
        if self.sas and (finetune_optimizer is None or finetune_optimizer is self.optimizer):
            notes.append("SASADMM does not read masks: install them in the retraining optimizer "
                         "(prune(finetune_optimizer=...) or install_masks)")
        return PruneSummary(self.method, False, layers, None, notes)

    def _average_note(self) -> str:
        """What ``use="average"`` writes, in one sentence."""
        counts = {int(self.optimizer.state[p].get("w_avg_count", 0)) for _, p, _ in self.layers
                  if p in self.optimizer.state}
        start = group_of(self.optimizer, self.layers[0][1])["average_from"]
        if counts == {0} or not counts:
            reason = ("average_from is None" if start is None else
                      f"no outer iteration reached average_from={start}")
            return f"the weights are the last W of SAS-ADMM ({reason}), not an average"
        shown = "/".join(map(str, sorted(counts - {0})))
        rest = "; layers that stopped before average_from keep their last W" if 0 in counts else ""
        return f"the weights are the ergodic average of W over the last {shown} outer iterations of SAS-ADMM{rest}"

    def _finetune_setup(self) -> None:
        """Classic: retrain without the ADMM pull (regularizer and Z/U/target state removed)."""
        from regkern.regularizers import ADMM

        group = self.group
        drop_regularizer(group, ADMM)
        for p in group["params"]:
            st = self.optimizer.state.get(p)
            for key in ("admm_z", "admm_u", "admm_target"):
                if st is not None and key in st:
                    del st[key]

    # -- state --------------------------------------------------------------------
    def _extra_state(self) -> Dict[str, Any]:
        return {"layers": [n for n, _, _ in self.layers], "masks": dict(self.masks)}

    def _check_extra(self, state: Dict[str, Any]) -> None:
        if state.get("layers") != [n for n, _, _ in self.layers]:
            raise ValueError(f"this ADMMPruner state_dict was saved for other layers ({state.get('layers')}); "
                             "build the schedule with the same model and ratios")

    def _reapply(self, state: Dict[str, Any]) -> None:
        if not self.sas:
            from regkern.regularizers import ADMM

            drop_regularizer(self.group, ADMM)

    def _load_extra(self, state: Dict[str, Any]) -> None:
        self.masks = dict(state.get("masks") or {})
