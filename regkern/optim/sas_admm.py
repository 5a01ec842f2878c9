"""``regkern.SASADMM``: symmetric accelerated stochastic ADMM (SPEC 6).

Yuan, Bai, Jiang, Du (Neurocomputing 2024; seed ``002_5d81e843822c5b72.txt``;
official code RockonLockon/SAS-ADMM-weight-pruning, ``sas.py``, ``sasPrun``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from regkern.optim.checkpoint import load_keeping_dtypes, plain_state

# Per-parameter state tensors kept in fp32 for fp32/bf16/fp16 parameters (float64
# parameters keep float64): torch's load_state_dict would cast them to the
# parameter's dtype, so they are restored as saved.
STATE_TENSORS = ("w", "w_breve", "z", "u", "anchor")


def sas_schedule(k: int, M: int, k0: int, q: float, v: float) -> Tuple[int, float]:
    """``(M_k, eta_k)`` of outer iteration ``k`` (1-based), as the official code
    computes them: ``M_k = M`` and ``eta_k = 1/v`` for ``k < k0``; afterwards
    ``M_k = ceil(c * k**q)`` with ``c = M / k0**q`` and
    ``eta_k = M(M+1) / (v * M_k (M_k+1))``."""
    if k < k0:
        return M, 1.0 / v
    c = M / k0 ** q
    m_k = math.ceil(c * k ** q)
    return m_k, M * (M + 1) / (v * m_k * (m_k + 1))


class SASADMM(torch.optim.Optimizer):
    r"""SAS-ADMM weight pruning: minimise ``f(W) + lam * ||Z||_1`` s.t. ``W = Z``.

    Call ``step()`` once per minibatch, after ``backward()``: each call is one
    inner iteration ``t`` of outer iteration ``k`` (both 1-based); the
    optimizer moves to the next outer iteration by itself after ``M_k`` inner
    ones. With ``b_t = 2/(t+1)``, ``c_t = 2/(eta_k t)`` and ``(M_k, eta_k)`` from
    :func:`sas_schedule` (SPEC 6, official ``sasPrun``)::

        grad is taken at W_hat = b_t * W_breve + (1 - b_t) * W   (the parameter)
        W_breve = (c_t * W_breve + anchor - grad) / (c_t + rho)
                  anchor = rho * W^k + U^k - beta * (W^k - Z^k)   (fixed during outer iteration k)
        W       = b_t * W_breve + (1 - b_t) * W
        after the M_k-th inner iteration:
        U       = U - r * beta * (W - Z)                 (U^{k+1/2})
        Z       = S_{lam/beta}(W - U / beta)             (soft threshold, exact zeros)
        U       = U - s * beta * (W - Z)                 (U^{k+1})

    ``step()`` then writes the next ``W_hat`` into the parameter, so the next
    forward pass sees it; ``W``, ``W_breve``, ``Z``, ``U`` and the anchor live in
    ``state[p]`` (keys ``"w"``, ``"w_breve"``, ``"z"``, ``"u"``, ``"anchor"``;
    fp32, or float64 for float64 parameters) with the counters ``"k"`` and
    ``"t"`` (the inner iteration the next step runs). Initial state, as the
    official code: ``W = W_breve = Z =`` the parameter, ``U = 0``. A
    ``state_dict`` saves all of it: a resumed run follows the same trajectory.

    Defaults are the official ones (ResNet-32 / CIFAR-10): ``beta=0.04,
    lam=1e-4, r=0.9, s=1.09, M=50, k0=50, q=1.1, v=25``. ``rho`` (the
    proximal weight of the W-step) defaults to ``beta``: the official code sets
    ``rho = beta``. After ADMM the official recipe prunes each layer by
    magnitude (85th percentile, :func:`regkern.admm.project`) and retrains with
    the mask; :meth:`write_params` copies ``W`` or the sparse ``Z`` into the
    parameters for that. (The official code also keeps an ergodic average of
    ``W`` over its last iterations; that is left to the caller.)

    Parameters without a gradient are skipped (their ``k``, ``t`` do not move).
    Not supported: sparse gradients, complex parameters, ``maximize``.
    """

    def __init__(self, params, beta: float = 0.04, lam: float = 1e-4, *, r: float = 0.9, s: float = 1.09,
                 rho: Optional[float] = None, M: int = 50, k0: int = 50, q: float = 1.1, v: float = 25.0) -> None:
        defaults = dict(beta=beta, lam=lam, r=r, s=s, rho=rho, M=M, k0=k0, q=q, v=v)
        _check_hyper(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(group)
        for p in group["params"]:
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"SASADMM steps real floating-point parameters, got {p.dtype}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One inner iteration for every parameter with a gradient; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError("SASADMM does not support sparse gradients")
                if p.grad.shape != p.shape:
                    raise ValueError(f"the gradient of a parameter of shape {tuple(p.shape)} has shape "
                                     f"{tuple(p.grad.shape)}")
            work.append((group, params))
        for group, params in work:  # everything checked: now write
            buckets: Dict[Tuple[int, int, torch.dtype, torch.dtype], List[Tensor]] = {}
            for p in params:
                st = self.state[p]
                if not st:
                    self._init_state(p, st, group)
                buckets.setdefault((st["k"], st["t"], p.dtype, st["w"].dtype), []).append(p)
            for (k, t, _, _), bucket in buckets.items():
                self._inner_step(group, bucket, k, t)
        return loss

    def _init_state(self, p: Tensor, st: Dict[str, Any], group: Dict[str, Any]) -> None:
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        w = p.detach().to(dtype, copy=True, memory_format=torch.preserve_format)
        st["w"] = w
        st["w_breve"] = w.clone()
        st["z"] = w.clone()
        st["u"] = torch.zeros_like(w)
        st["anchor"] = w.mul(_rho(group))  # rho * W + U - beta * (W - Z) with U = 0, Z = W
        st["k"] = 1
        st["t"] = 1

    def _inner_step(self, group: Dict[str, Any], params: List[Tensor], k: int, t: int) -> None:
        beta, rho = group["beta"], _rho(group)
        m_k, eta_k = sas_schedule(k, group["M"], group["k0"], group["q"], group["v"])
        states = [self.state[p] for p in params]
        w = [st["w"] for st in states]
        w_breve = [st["w_breve"] for st in states]
        anchor = [st["anchor"] for st in states]
        grads = [p.grad if p.grad.dtype == st["w"].dtype else p.grad.to(st["w"].dtype)
                 for p, st in zip(params, states)]
        b_t, c_t = 2.0 / (t + 1), 2.0 / (eta_k * t)
        # W_breve = (c_t W_breve + anchor - grad) / (c_t + rho); W = b_t W_breve + (1 - b_t) W
        torch._foreach_mul_(w_breve, c_t / (c_t + rho))
        torch._foreach_add_(w_breve, anchor, alpha=1.0 / (c_t + rho))
        torch._foreach_add_(w_breve, grads, alpha=-1.0 / (c_t + rho))
        torch._foreach_lerp_(w, w_breve, b_t)
        if t >= m_k:
            self._outer_step(group, states, w)
            k, t = k + 1, 1
        else:
            t += 1
        for st in states:
            st["k"], st["t"] = k, t
        # the next forward pass sees W_hat = b W_breve + (1 - b) W of the next inner iteration
        b_next = 2.0 / (t + 1)
        if params[0].dtype == w[0].dtype:
            torch._foreach_copy_(params, w)
            torch._foreach_lerp_(params, w_breve, b_next)
        else:  # fp32 math, rounded once to the parameter's dtype
            torch._foreach_copy_(params, torch._foreach_lerp(w, w_breve, b_next))

    def _outer_step(self, group: Dict[str, Any], states: List[Dict[str, Any]], w: List[Tensor]) -> None:
        beta, lam, rho = group["beta"], group["lam"], _rho(group)
        z = [st["z"] for st in states]
        u = [st["u"] for st in states]
        anchor = [st["anchor"] for st in states]
        diff = torch._foreach_sub(w, z)                          # W^{k+1} - Z^k
        torch._foreach_add_(u, diff, alpha=-group["r"] * beta)   # U^{k+1/2}
        torch._foreach_copy_(z, w)
        torch._foreach_add_(z, u, alpha=-1.0 / beta)             # W - U^{k+1/2} / beta
        tau = lam / beta
        torch._foreach_copy_(diff, z)                            # S_tau(x) = x - clamp(x, -tau, tau):
        torch._foreach_clamp_min_(diff, -tau)                    # exact zeros where |x| <= tau
        torch._foreach_clamp_max_(diff, tau)
        torch._foreach_sub_(z, diff)                             # Z^{k+1}
        torch._foreach_copy_(diff, w)
        torch._foreach_sub_(diff, z)                             # W^{k+1} - Z^{k+1}
        torch._foreach_add_(u, diff, alpha=-group["s"] * beta)   # U^{k+1}
        torch._foreach_copy_(anchor, u)                          # anchor of outer iteration k+1:
        torch._foreach_add_(anchor, w, alpha=rho)                # rho W + U - beta (W - Z)
        torch._foreach_add_(anchor, diff, alpha=-beta)

    @torch.no_grad()
    def write_params(self, which: str = "w") -> None:
        """Copy ``W`` (``which="w"``) or the sparse ``Z`` (``"z"``) of every
        stepped parameter into the parameter, e.g. before magnitude pruning and
        masked retraining. The ADMM state is left as it is."""
        if which not in ("w", "z"):
            raise ValueError(f"which must be 'w' or 'z', got {which!r}")
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    p.copy_(st[which])

    def state_dict(self) -> Dict[str, Any]:
        return plain_state(super().state_dict())

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        load_keeping_dtypes(self, state_dict, STATE_TENSORS, super().load_state_dict)
        for group in self.param_groups:
            _check_hyper(group)


def _rho(group: Dict[str, Any]) -> float:
    return group["beta"] if group["rho"] is None else group["rho"]


def _check_hyper(h: Dict[str, Any]) -> None:
    def finite(name):
        value = h[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"SASADMM: {name} must be a finite number, got {value!r}")
        return value

    if not finite("beta") > 0:
        raise ValueError(f"SASADMM: beta (the penalty) must be > 0, got {h['beta']}")
    if not finite("lam") >= 0:
        raise ValueError(f"SASADMM: lam must be >= 0, got {h['lam']}")
    finite("r")
    finite("s")
    if h["rho"] is not None and not finite("rho") >= 0:
        raise ValueError(f"SASADMM: rho must be >= 0 (or None: rho = beta), got {h['rho']}")
    for name in ("M", "k0"):
        value = h[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SASADMM: {name} must be an int >= 1, got {value!r}")
    if not finite("q") > 0:
        raise ValueError(f"SASADMM: q must be > 0, got {h['q']}")
    if not finite("v") > 0:
        raise ValueError(f"SASADMM: v must be > 0, got {h['v']}")
