"""``regkern.Adam`` and ``regkern.AdamW``: torch's Adam and AdamW with regularizers fused into their step."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_functional_adam

from regkern.backends.adam import AdamPlan
from regkern.optim.fused import check_number, group_states, scalar_lr
from regkern.optim.plan_cache import CachedPlan, prepare_group
from regkern.optim.regularized import RegularizedOptimizer
from regkern.regularizers import step_options
from regkern.sharding import local_tensor
from regkern.terms import STEP_OPTIONS, STEP_STATE, fixed_dtype_state

COUPLINGS = ("decoupled", "coupled")


class Adam(RegularizedOptimizer):
    r"""Adam with fused regularization.

    Same arguments and behaviour as :class:`torch.optim.Adam` (``betas``,
    ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``, float or tensor
    ``lr``, ``decoupled_weight_decay``, LR schedulers, closures,
    ``torch.amp.GradScaler``, hooks); the state keeps ``step``, ``exp_avg``,
    ``exp_avg_sq`` and ``max_exp_avg_sq`` as torch keeps them, so a
    ``state_dict`` loads into ``torch.optim.Adam`` and back. Without a
    regularizer, fp32 results equal torch's single-tensor step bit for bit
    on the CPU.

    Every param group may carry a ``regularizer`` key (any regularizer of
    :class:`regkern.SGD`: ``RowL2``, ``ElementL2``, ``L1``, ``ProxL1``,
    ``GroupLasso``, ``Polarization``, ``Clamp``, ``ADMM``, with their state
    ``lam``, ``lam_cols``, ``l1``, ``polar``, ``prox_lam``, ``mask``,
    ``row_norms``) and a ``coupling`` key that says how the regularizer's
    gradient term ``r(W)`` enters (docs/adam.md):

    * ``"decoupled"`` (default): beside the adaptive update, scaled by ``lr``
      only, like AdamW's weight decay: ``W -= lr * r(W)``. A penalty of
      strength ``lam`` then shrinks every weight at the same rate, whatever
      the size of its gradients.
    * ``"coupled"``: added to the gradient before the moments, which is what
      ``grad += lam * W`` before ``torch.optim.Adam`` does; the adaptive
      denominator rescales the penalty.

    Proximal maps and clamps follow the update, masks zero the weights and
    all three moments, ``row_norms`` are written after the step, all as for
    ``regkern.SGD``.

    ``foreach``, ``fused`` and ``capturable`` are accepted for compatibility
    and have no effect: the step is always fused and keeps ``step`` on the
    parameter's device. Complex parameters and ``differentiable=True`` are
    stepped by torch's own functional Adam (no regularizer state may apply to
    them). ``backend`` ("cpp", "triton", "reference"; default: by device, or
    the ``REGKERN_BACKEND`` variable) forces a kernel backend.
    """

    fixed_dtype_state = fixed_dtype_state("adam")  # the terms' entries and the fp32 step, moved to W's device
    # what torch.optim.Adam assumes for options an older checkpoint lacks
    legacy_options = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                          fused=None, decoupled_weight_decay=False, regularizer=None, coupling="decoupled")

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False, regularizer=None,
                 coupling: str = "decoupled", backend: Optional[str] = None) -> None:
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, regularizer=regularizer, coupling=coupling)
        self._check_group(defaults, "")
        super().__init__(params, defaults, backend)

    def _check_group(self, group: Dict[str, Any], where: str) -> None:
        check_number(group["lr"], "learning rate", where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas value: {betas!r}{where}; it must be a pair (beta1, beta2)")
        for index, beta in enumerate(betas):
            value = check_number(beta, f"beta parameter at index {index}", where)
            if value is not None and value >= 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {value}{where}; it must be in [0, 1)")
        check_number(group["eps"], "epsilon", where)
        check_number(group["weight_decay"], "weight_decay", where)
        if group["coupling"] not in COUPLINGS:
            raise ValueError(f"Invalid coupling value: {group['coupling']!r}{where}; choose 'decoupled' or 'coupled'")
        self._check_regularizer(group)

    def _check_params(self, group: Dict[str, Any], where: str) -> None:
        for p in group["params"]:
            if not (p.is_floating_point() or p.is_complex()):
                raise ValueError(f"a parameter of dtype {p.dtype}{where} is neither floating point nor complex; "
                                 "only those can be optimized")

    def _prepare(self, index: int, group: Dict[str, Any]):
        """The group's plan and checked local gradients (see regkern.SGD)."""
        cached, grads = prepare_group(self._plans, index, group["params"],
                                      lambda cached, ps: cached.fits(ps, group, self.state.clock.value, self.backend),
                                      lambda ps: _GroupPlan(self, group, ps))
        cached.plan.check_coefficients()
        return cached, grads

    def _apply(self, prepared: List[Any], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        self._before_step()
        for group, (cached, grads) in zip(self.param_groups, prepared):
            decoupled_decay = bool(group["decoupled_weight_decay"])
            beta1, beta2 = (float(b) for b in group["betas"])
            cached.plan.run(grads, lr=scalar_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                            weight_decay=0.0 if decoupled_decay else float(group["weight_decay"]),
                            decay=float(group["weight_decay"]) if decoupled_decay else 0.0,
                            amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                            coupled=group["coupling"] == "coupled", grad_scale=grad_scale, found_inf=found_inf)
            cached.save_new_state(self.state)
            if cached.torch_params:
                _adam_with_torch_ops(cached.torch_params, [self.state[p] for p in cached.torch_params], group,
                                     grad_scale)
            self._group_written(cached, found_inf)


class AdamW(Adam):
    r"""AdamW with fused regularization: :class:`regkern.Adam` with
    ``decoupled_weight_decay=True`` and torch's AdamW defaults
    (``weight_decay=1e-2``). Same arguments and behaviour as
    :class:`torch.optim.AdamW`; checkpoints load into it and back."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, regularizer=None, coupling: str = "decoupled",
                 backend: Optional[str] = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, regularizer=regularizer, coupling=coupling, backend=backend)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # a checkpoint of torch's AdamW before the option existed


def _step_tensor(step: Any, device: torch.device) -> Tensor:
    """A step count as the kernels take it: an fp32 0-d tensor on the parameter's device."""
    if isinstance(step, Tensor) and step.dtype == torch.float32 and step.shape == () and step.device == device:
        return step
    return torch.as_tensor(step, dtype=torch.float32).reshape(()).to(device)


class _GroupPlan(CachedPlan):
    """A param group's AdamPlan with what it was built from (see CachedPlan).
    Moments a parameter lacks (its first step, or amsgrad switched on) are
    created here as zeros and saved into the state after the step; complex
    parameters and a differentiable group take torch's functional Adam."""

    def __init__(self, optimizer: Adam, group: Dict[str, Any], params) -> None:
        self._remember(optimizer, params)
        differentiable = bool(group["differentiable"])
        by_torch = [differentiable or p.is_complex() for p in params]
        self._route_torch(by_torch)
        self.norm_params = [local_tensor(p) for p in params
                            if p in optimizer.state and optimizer.state[p].get("row_norms") is not None]
        self.norm_versions = self.norm_current = None
        self.differentiable = differentiable
        self.regularizer = group["regularizer"]
        self.amsgrad = bool(group["amsgrad"])
        if self.torch_params:
            _check_torch_params(self.torch_params, group_states(optimizer, self.torch_params), group)
        params = self.fast_params
        states = group_states(optimizer, params)
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())
        # (param index, key, tensor) of the state the step creates
        self.new_state = [(i, key, torch.zeros_like(p, memory_format=torch.preserve_format))
                          for i, (p, st) in enumerate(zip(params, states)) for key in keys if st.get(key) is None]
        self.new_state += [(i, "step", _step_tensor(st.get("step", 0.0), local_tensor(p).device))
                           for i, (p, st) in enumerate(zip(params, states))
                           if not isinstance(st.get("step"), Tensor) or st["step"].dtype != torch.float32
                           or st["step"].shape != () or st["step"].device != local_tensor(p).device]
        made = {(i, key): t for i, key, t in self.new_state}
        moment = lambda i, key: local_tensor(made.get((i, key), states[i].get(key)))  # noqa: E731
        options = step_options(group["regularizer"])
        inputs = {keyword: [local_tensor(st.get(key)) for st in states] for key, keyword in STEP_STATE.items()}
        inputs.update({keyword: [options.get(option, absent)] * len(params)
                       for option, (keyword, absent) in STEP_OPTIONS.items()})
        count = len(params)
        self.plan = AdamPlan([local_tensor(p) for p in params], [moment(i, "exp_avg") for i in range(count)],
                             [moment(i, "exp_avg_sq") for i in range(count)],
                             [moment(i, "max_exp_avg_sq") for i in range(count)] if self.amsgrad else None,
                             [moment(i, "step") for i in range(count)], backend=optimizer.backend,
                             warn=lambda i, why: optimizer.warn_once(params[i], why), **inputs)

    def step_fills_state(self) -> bool:
        return bool(self.new_state)  # saved only after a step taken, as when the host skips it

    def fits(self, params, group: Dict[str, Any], clock: int, backend) -> bool:
        return (not self.new_state and self.amsgrad == bool(group["amsgrad"])
                and self.differentiable == bool(group["differentiable"]) and self.regularizer == group["regularizer"]
                and self.same_inputs(params, clock, backend))

    def save_new_state(self, state) -> None:
        """Put the moments and step counts this plan created into the optimizer state."""
        for i, key, tensor in self.new_state:
            state[self.fast_params[i]][key] = tensor


def _check_torch_params(params: List[Tensor], states: List[Dict[str, Any]], group: Dict[str, Any]) -> None:
    """Refuse, before anything is written, regularizer state on the parameters
    that torch's functional Adam steps (it knows no regularizer)."""
    for p, st in zip(params, states):
        present = [key for key in STEP_STATE if st.get(key) is not None]
        if present or step_options(group["regularizer"]):
            why = "it is complex" if p.is_complex() else "its group is differentiable"
            what = ", ".join(f"state['{k}']" for k in present) or "a regularizer"
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is stepped by torch's own Adam because {why}, "
                             f"which cannot apply {what}; move it to a param group without a regularizer")
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")


def _adam_with_torch_ops(params: List[Tensor], states: List[Dict[str, Any]], group: Dict[str, Any],
                         grad_scale: Optional[Tensor]) -> None:
    """torch's single-tensor functional Adam on ``params`` (complex, or a
    differentiable group), creating their state as torch does."""
    for p, st in zip(params, states):
        if "step" not in st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    grads = [p.grad if grad_scale is None else p.grad / grad_scale.to(p.grad.device) for p in params]
    beta1, beta2 = group["betas"]
    with torch.set_grad_enabled(bool(group["differentiable"])):
        torch_functional_adam(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                              [st["max_exp_avg_sq"] for st in states] if group["amsgrad"] else [],
                              [st["step"] for st in states], foreach=False, capturable=False,
                              differentiable=bool(group["differentiable"]), fused=None,
                              has_complex=any(p.is_complex() for p in params),
                              decoupled_weight_decay=bool(group["decoupled_weight_decay"]), amsgrad=group["amsgrad"],
                              beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                              eps=group["eps"], maximize=group["maximize"])
