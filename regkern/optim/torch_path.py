"""The torch-op step of ``regkern.SGD``: complex parameters, sparse gradients
and ``differentiable=True``.

The fused kernels step dense, real, floating-point tensors outside autograd.
Parameters they cannot take are stepped here, with torch ops, so that they
behave exactly as under ``torch.optim.SGD(foreach=False,
differentiable=...)``: the momentum, Nesterov, dampening, weight decay,
``maximize`` and learning-rate arithmetic is torch's own functional SGD
(``sgd`` of ``torch.optim.sgd``), so a parameter without regularizer state gets the
same bits as with ``torch.optim.SGD``, and under ``differentiable=True`` the
step is recorded by autograd (hypergradients through ``lr``, the gradient,
the parameter and the momentum buffer).

The regularizer state of the fused step is read too, in the order of the
fused step (the math is in ``docs/sgd.md``): gradient terms (``lam``,
``lam_cols``, ``l1``, ``polar``, ADMM's ``rho * (W - admm_target)``) are added
to ``d`` after weight decay and before momentum; after the update come the
mask, the proximal map (``prox_lam``), the clamp and the mask again; then
``row_norms`` of the stored W. Here the terms are computed in the
parameter's dtype, like the rest of torch's step (the fused kernels compute in
fp32).

What cannot apply is refused before anything is written:

* complex parameters: the L1 subgradient, polarization, proximal maps and
  clamps, which need the order of real numbers. Row, element and column L2
  (``lam * W``), ADMM's pull, masks and row norms (of ``|W|``, the modulus)
  are well defined and apply.
* sparse gradients: every gradient term, which would add to every element's
  gradient and make it dense (``torch.optim.SGD`` refuses weight decay with
  sparse gradients for the same reason). Masks, proximal maps, clamps and row
  norms act on W, not on the gradient, and apply to the whole W every step; a
  mask also zeroes the masked entries of the (sparse) momentum buffer.
* whatever ``torch.optim.SGD`` itself refuses: weight decay with a sparse
  gradient (``RuntimeError``), a tensor ``lr`` that requires grad with a
  sparse gradient (``NotImplementedError``), a sparse momentum buffer with a
  dense gradient (``RuntimeError``) and, under ``differentiable=True``, a
  leaf parameter that requires grad (``RuntimeError``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim.sgd import sgd as torch_functional_sgd

from regkern.reference.sgd import PROX_NONE, element_mask, _prox, as_rows, num_rows
from regkern.regularizers import step_options
from regkern.terms import FINITE_STATE, GRADIENT_STATE, STEP_OPTIONS, STEP_STATE, UPDATE_OPTIONS, UPDATE_STATE


class _Terms:
    """The regularizer state and group options that apply to one parameter's
    step: one attribute per state entry the step reads and per group option
    (regkern.terms)."""

    __slots__ = tuple(STEP_STATE) + tuple(STEP_OPTIONS)

    def __init__(self, state: Dict[str, Any], options: Dict[str, Any]) -> None:
        for key in STEP_STATE:
            setattr(self, key, state.get(key))
        for option, (_, absent) in STEP_OPTIONS.items():
            setattr(self, option, options.get(option, absent))
        if self.admm_target is None or self.admm_rho == 0:  # ADMM's pull needs both
            self.admm_target, self.admm_rho = None, 0.0

    def gradient_terms(self) -> List[str]:
        """The state keys of the terms added to the gradient."""
        return [key for key in GRADIENT_STATE if getattr(self, key) is not None]

    def after_update(self) -> bool:
        return (any(getattr(self, key) is not None for key in UPDATE_STATE)
                or any(getattr(self, option) != absent for option, absent in UPDATE_OPTIONS.items()))


def sgd_with_torch_ops(params: List[Tensor], states: List[Dict[str, Any]], group: Dict[str, Any],
                       grad_scale: Optional[Tensor]) -> None:
    """Step ``params`` (parameters of ``group`` that have a gradient) with torch ops.

    ``states[i]`` is the optimizer state of ``params[i]``: its regularizer
    entries are read and, when the group has momentum, its
    ``"momentum_buffer"`` is created or updated exactly as
    ``torch.optim.SGD`` does. ``grad_scale`` (a GradScaler's scale) divides
    the gradients first; the caller skips steps with inf/NaN gradients.
    Autograd records the step when ``group["differentiable"]`` is true and
    not otherwise, whatever the caller's grad mode. Raises (changing
    nothing) on what cannot apply; see the module docstring.
    """
    terms = _checked_step(params, states, group)
    differentiable = bool(group.get("differentiable", False))
    momentum = group["momentum"]
    grads = [p.grad for p in params]
    bufs: List[Optional[Tensor]] = [st.get("momentum_buffer") if momentum != 0 else None for st in states]
    with torch.set_grad_enabled(differentiable):
        if grad_scale is not None:
            grads = [g / grad_scale.to(g.device) for g in grads]
        plain = [i for i, t in enumerate(terms) if not t.gradient_terms()]
        termed = [i for i, t in enumerate(terms) if t.gradient_terms()]
        lr = group["lr"]
        # No gradient terms: torch's step as it is (same ops, same bits).
        _torch_step(group, params, grads, bufs, plain, weight_decay=group["weight_decay"],
                    maximize=group["maximize"])
        # Gradient terms: d = g (negated when maximizing) + weight decay + terms,
        # then torch's momentum and update on d.
        descents = {i: _descent(params[i], grads[i], terms[i], group, differentiable) for i in termed}
        _torch_step(group, params, [descents.get(i) for i in range(len(params))], bufs, termed,
                    weight_decay=0.0, maximize=False)
        for i, (p, t) in enumerate(zip(params, terms)):
            if t.after_update():
                bufs[i] = _after_update(p, bufs[i], t, lr, differentiable)
        with torch.no_grad():
            for p, t in zip(params, terms):
                if t.row_norms is not None:
                    _fill_row_norms(t.row_norms, p)
    if momentum != 0:
        for st, buf in zip(states, bufs):
            if st.get("momentum_buffer") is not buf:  # a new buffer (regkern's state counts changes)
                st["momentum_buffer"] = buf


def check_sgd_with_torch_ops(params: List[Tensor], states: List[Dict[str, Any]], group: Dict[str, Any]) -> None:
    """Raise what ``sgd_with_torch_ops(params, states, group, ...)`` would
    refuse, writing nothing: a caller that steps several groups (or other
    parameters with the fused kernels) checks every one of them first, so
    that a refused step changes nothing at all."""
    _checked_step(params, states, group)


def _checked_step(params, states, group) -> List[_Terms]:
    """The terms of every parameter, after every check."""
    if len(states) != len(params):
        raise ValueError(f"the torch-op SGD step got {len(params)} parameters but {len(states)} states; pass one state per parameter")
    missing = [p for p in params if p.grad is None]
    if missing:
        raise ValueError(f"{_describe(group, missing[0])} has no gradient; pass only parameters that have one")
    options = step_options(group.get("regularizer"))
    momentum = group["momentum"]
    grads = [p.grad for p in params]
    bufs = [st.get("momentum_buffer") if momentum != 0 else None for st in states]
    terms = [_checked_terms(group, p, g, b, st, options) for p, g, b, st in zip(params, grads, bufs, states)]
    for p, t in zip(params, terms):  # the per-row coefficients, as the fused path checks them
        for key in FINITE_STATE:
            value = getattr(t, key)
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{_describe(group, p)} has a non-finite value in state['{key}']; "
                                 "write finite coefficients")
    _check_like_torch(group, params, grads, bufs, bool(group.get("differentiable", False)))
    return terms


def _torch_step(group, params, grads, bufs, indices, *, weight_decay, maximize) -> None:
    """torch's single-tensor functional SGD on ``params[i]`` for ``i`` in
    ``indices``; new momentum buffers land in ``bufs``."""
    if not indices:
        return
    chosen_bufs = [bufs[i] for i in indices]
    chosen_grads = [grads[i] for i in indices]
    torch_functional_sgd([params[i] for i in indices], chosen_grads, chosen_bufs,
                         has_sparse_grad=any(g.is_sparse for g in chosen_grads), foreach=False, fused=False,
                         weight_decay=weight_decay, momentum=group["momentum"], lr=group["lr"],
                         dampening=group["dampening"], nesterov=group["nesterov"], maximize=maximize)
    for i, buf in zip(indices, chosen_bufs):
        bufs[i] = buf


def _descent(param: Tensor, grad: Tensor, terms: _Terms, group, differentiable: bool) -> Tensor:
    """``d = g + weight_decay * W + the gradient terms`` (``g`` negated when
    maximizing), out of place, in the parameter's dtype."""
    # torch updates the parameter in place after this; autograd must keep
    # the values the terms were computed from
    w = param.clone() if differentiable else param
    real = param.dtype.to_real()
    d = -grad if group["maximize"] else grad
    weight_decay = group["weight_decay"]
    if isinstance(weight_decay, Tensor) and weight_decay.requires_grad:
        d = d + w * weight_decay
    elif weight_decay != 0:
        d = d.add(w, alpha=weight_decay)
    if terms.lam is not None:
        lam = terms.lam.to(real)
        if lam.shape == w.shape:  # per element (for a vector W the two kinds agree)
            d = d + w * lam
        else:
            d = d + (as_rows(w) * lam[:, None]).reshape(w.shape)
    if terms.lam_cols is not None:
        d = d + w * terms.lam_cols.to(real).reshape((1, -1) + (1,) * (w.dim() - 2))
    if terms.l1 is not None:
        d = d + (as_rows(w.sign()) * terms.l1.to(real)[:, None]).reshape(w.shape)
    if terms.polar is not None:
        p_lam, p_t, p_m, p_s = terms.polar.to(real).unbind()
        d = d + p_lam * (p_t * w.sign() - (w - p_m).sign() + p_s)
    if terms.admm_target is not None:
        d = d + terms.admm_rho * (w - terms.admm_target)
    return d


def _after_update(param: Tensor, buf: Optional[Tensor], terms: _Terms, lr, differentiable: bool) -> Optional[Tensor]:
    """Mask (W and the momentum buffer), proximal map, clamp, mask again on
    the updated parameter; returns the momentum buffer (a new tensor only
    under autograd)."""
    real = param.dtype.to_real()
    keep = element_mask(terms.mask, param.shape).to(real) if terms.mask is not None else None
    # Under autograd the ops below read a copy: the values they save must not
    # be overwritten by the final copy into the parameter.
    w = param.clone() if differentiable else param
    if keep is not None:
        w = w * keep
        if buf is not None:
            buf = buf * keep if differentiable else buf.mul_(keep)
    if terms.prox_kind != PROX_NONE:
        if isinstance(lr, Tensor):
            lr = lr.reshape(())
        w = _prox(w, terms.prox_kind, lr * terms.prox_lam.to(real).reshape(-1, 1))
    if terms.clamp is not None:
        w = w.clamp(terms.clamp[0], terms.clamp[1])
        if keep is not None:
            w = w * keep  # a clamp must not revive a pruned weight
    param.copy_(w)
    return buf


def _fill_row_norms(norms: Tensor, param: Tensor) -> None:
    """``norms[r] = (sum |W_r|, ||W_r||_2, mean |W_r|)`` of the stored W (the
    modulus for complex W), in fp32."""
    stored = as_rows(param.detach().abs().to(torch.float32))
    n_r = stored.shape[1]
    l1 = stored.sum(dim=1)
    norms[:, 0] = l1
    norms[:, 1] = stored.square().sum(dim=1).sqrt()
    norms[:, 2] = l1 / n_r if n_r else 0.0


def _describe(group, param: Tensor) -> str:
    index = next((j for j, q in enumerate(group["params"]) if q is param), None)
    where = f"parameter {index} of its param group" if index is not None else "a parameter"
    return f"{where} ({str(param.dtype).replace('torch.', '')} {tuple(param.shape)} on {param.device})"


def _describe_tensor(t: Tensor) -> str:
    layout = "sparse " if t.is_sparse else ""
    return f"{layout}{str(t.dtype).replace('torch.', '')} {tuple(t.shape)} on {t.device}"


def _checked_terms(group, w: Tensor, grad: Tensor, buf: Optional[Tensor], state: Dict[str, Any],
                   options: Dict[str, Any]) -> _Terms:
    """The terms that apply to ``w``; ``ValueError`` on state that does not fit
    it and on terms that cannot apply to it (complex W, sparse gradient)."""
    where = lambda: _describe(group, w)  # noqa: E731  (built only on error)
    terms = _Terms(state, options)
    device, rows, fp32 = w.device, num_rows(w), torch.float32

    def fits(t: Optional[Tensor], shapes, dtype=fp32) -> bool:
        return t is None or (t.shape in shapes and t.dtype == dtype and t.device == device and not t.is_sparse)

    if not (w.is_floating_point() or w.is_complex()):
        raise ValueError(f"{where()} is neither floating point nor complex; only those can be optimized")
    if buf is not None and (buf.shape != w.shape or buf.dtype != w.dtype or buf.device != device):
        raise ValueError(f"{where()} has a momentum buffer of {_describe_tensor(buf)}; it must match the parameter")
    if not fits(terms.lam, ((rows,), w.shape)):
        raise ValueError(f"{where()} has a lambda of {_describe_tensor(terms.lam)}; it must be a float32 vector of length {rows} (rows) or a float32 tensor of shape {tuple(w.shape)} (elements) on {device}")
    if terms.lam_cols is not None:
        if w.dim() < 2:
            raise ValueError(f"{where()} has column lambdas (state['lam_cols']) but fewer than 2 dimensions; only parameters with a second dimension have columns")
        if not fits(terms.lam_cols, ((w.shape[1],),)):
            raise ValueError(f"{where()} has column lambdas (state['lam_cols']) of {_describe_tensor(terms.lam_cols)}; they must be a float32 vector of length {w.shape[1]} (W.shape[1]) on {device}")
    for name, vector in (("an L1 coefficient (state['l1'])", terms.l1), ("a proximal lambda (state['prox_lam'])", terms.prox_lam)):
        if not fits(vector, ((rows,),)):
            raise ValueError(f"{where()} has {name} of {_describe_tensor(vector)}; it must be a float32 vector of length {rows} on {device}")
    if not fits(terms.polar, ((4,),)):
        raise ValueError(f"{where()} has polarization coefficients of {_describe_tensor(terms.polar)}; they must be float32 of shape (4,) on {device}")
    if not fits(terms.admm_target, (w.shape,), w.dtype):
        raise ValueError(f"{where()} has an ADMM target of {_describe_tensor(terms.admm_target)}; it must match the parameter")
    if not fits(terms.mask, ((rows,), w.shape), torch.bool):
        raise ValueError(f"{where()} has a mask of {_describe_tensor(terms.mask)}; it must be a bool tensor of shape ({rows},) (rows) or {tuple(w.shape)} (elements) on {device}")
    if not fits(terms.row_norms, ((rows, 3),)):
        raise ValueError(f"{where()} has a row-norm output of {_describe_tensor(terms.row_norms)}; it must be float32 of shape ({rows}, 3) on {device}")
    if terms.prox_kind != PROX_NONE and terms.prox_lam is None:
        raise ValueError(f"{where()} asks for a proximal map but has no proximal lambda (state['prox_lam']); add one or drop the ProxL1 / GroupLasso regularizer from its group")

    if w.is_complex():
        ordered = [("an L1 subgradient (state['l1'])", terms.l1 is not None),
                   ("polarization (state['polar'])", terms.polar is not None),
                   ("a proximal map (ProxL1 / GroupLasso)", terms.prox_kind != PROX_NONE),
                   ("a clamp", terms.clamp is not None)]
        for name, present in ordered:
            if present:
                raise ValueError(f"{where()} is complex and its group asks for {name}, which needs the order of real numbers; put complex parameters in a param group without L1, Polarization, ProxL1, GroupLasso or Clamp")
    if grad.is_sparse and terms.gradient_terms():
        names = ", ".join(f"state['{k}']" for k in terms.gradient_terms())
        raise ValueError(f"{where()} has a sparse gradient, and {names} would add to every element's gradient and make it dense; use a dense gradient (e.g. nn.Embedding(sparse=False)) or move the parameter to a group without gradient terms")
    return terms


def _check_like_torch(group, params, grads, bufs, differentiable: bool) -> None:
    """Refuse, before any write, what ``torch.optim.SGD`` refuses midway
    through its step (same exception types)."""
    sparse = [p for p, g in zip(params, grads) if g.is_sparse]
    if sparse:
        weight_decay, lr = group["weight_decay"], group["lr"]
        if bool(weight_decay != 0):
            raise RuntimeError(f"{_describe(group, sparse[0])} has a sparse gradient, to which weight decay cannot be added (torch.optim.SGD refuses it too); set weight_decay=0 for this param group")
        if isinstance(lr, Tensor) and lr.requires_grad:
            raise NotImplementedError(f"{_describe(group, sparse[0])} has a sparse gradient, which a tensor lr that requires grad cannot scale (torch.optim.SGD refuses it too); use an lr that does not require grad or a dense gradient")
    for p, g, buf in zip(params, grads, bufs):
        if buf is not None and buf.is_sparse and not g.is_sparse:
            raise RuntimeError(f"{_describe(group, p)} has a sparse momentum buffer (from sparse gradients) and now a dense gradient, which torch.optim.SGD cannot add to it either; keep its gradients sparse or delete state['momentum_buffer']")
        if differentiable and p.is_leaf and p.requires_grad:
            raise RuntimeError(f"{_describe(group, p)} is a leaf tensor that requires grad, which differentiable=True cannot update in place under autograd (torch.optim.SGD refuses it too); step a non-leaf copy such as w.clone()")
