"""``regkern.SASADMM``: symmetric accelerated stochastic ADMM.

Yuan, Bai, Jiang, Du (Neurocomputing 2024); "official" below means the
authors' code (``sasPrun``). The math is in ``docs/admm.md``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from regkern.backends.admm import SAS_STATE, SASPlan
from regkern.optim.fused import FusedOptimizer
from regkern.optim.plan_cache import CachedPlan, prepare_group
from regkern.reference.admm import SASCoefficients, sas_coefficients
from regkern.sharding import local_tensor
from regkern.terms import fixed_dtype_state

# Per-parameter state tensors kept in fp32 for fp32/bf16/fp16 parameters (float64
# parameters keep float64): torch's load_state_dict would cast them to the
# parameter's dtype, so they are restored as saved.
STATE_TENSORS = fixed_dtype_state("sas_admm", regularized=False)  # declared in regkern.terms


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


class SASADMM(FusedOptimizer):
    r"""SAS-ADMM weight pruning: minimise ``f(W) + lam * ||Z||_1`` s.t. ``W = Z``.

    Call ``step()`` once per minibatch, after ``backward()``: each call is one
    inner iteration ``t`` of outer iteration ``k`` (both 1-based); the
    optimizer moves to the next outer iteration by itself after ``M_k`` inner
    ones. With ``b_t = 2/(t+1)``, ``c_t = 2/(eta_k t)`` and ``(M_k, eta_k)`` from
    :func:`sas_schedule` (``docs/admm.md``; official ``sasPrun``)::

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
    ``rho = beta``.

    Ergodic average (official ``W_ag``): the final weights of the official
    code are not the last ``W`` but the mean of ``W`` at the end of outer
    iterations ``average_from, average_from + 1, ...`` (official ``last``,
    170 of ``maxIter = 190``: the mean of the last 21). At the end of outer
    iteration ``k``: ``k < average_from``: nothing is kept (the average is
    ``W`` itself); ``k = average_from``: ``W_avg = W``, ``n = 1``; later:
    ``n += 1``, ``W_avg = (1 - 1/n) * W_avg + (1/n) * W`` (the official
    formula and op order), in ``state[p]["w_avg"]`` (fp32, as ``W``) and
    ``state[p]["w_avg_count"]`` (``n``). These are torch foreach ops on the
    parameters whose outer iteration just ended (once every ``M_k`` steps),
    outside the fused pass. ``average_from=None`` keeps no average.
    ``average_from`` counts absolute outer iterations, as the official code
    does: a run that stops before it keeps no average (its final weights
    are the last ``W``, as in the official code). The average of a
    parameter is that of its own outer iterations (a parameter without a
    gradient in some step lags behind the others).

    After ADMM the official recipe copies ``W_avg`` into the network, prunes
    each layer by magnitude (85th percentile, :func:`regkern.admm.project`)
    and retrains with the mask (:class:`regkern.prune.ADMMPruner` does all of
    it); :meth:`write_params` copies ``W_avg``, ``W`` or the sparse ``Z`` into
    the parameters. The official code runs SAS-ADMM on the conv weights and
    the classifier weight only (BatchNorm and biases stay as they are) and
    draws its minibatches with replacement; both are the caller's choice here.
    See ``docs/admm.md`` for the derivation.

    One fused pass per step does the W/Z/U update (``regkern.backends.admm``: C++ on
    CPU, Triton on CUDA, one call / one launch per dtype for every parameter;
    the outer update of the parameters whose outer iteration ends folds into
    the same pass), in fp32 whatever the parameter's dtype, the parameter
    rounded once (the op order is ``regkern.reference.admm``'s).
    ``backend`` ("cpp", "triton", "reference"; default: by device, or the
    ``REGKERN_BACKEND`` variable) forces one. Parameters without a gradient
    are skipped (their ``k``, ``t`` do not move). A refused step (bad
    gradient or state) changes nothing. Not supported: sparse gradients,
    complex parameters, ``maximize``.
    """

    fixed_dtype_state = STATE_TENSORS
    legacy_options = dict(average_from=170)  # a state saved before the option existed: the official default
    # GradScaler unscales the gradients itself before this step (the fused pass takes them unscaled).
    _step_supports_amp_scaling = False

    def __init__(self, params, beta: float = 0.04, lam: float = 1e-4, *, r: float = 0.9, s: float = 1.09,
                 rho: Optional[float] = None, M: int = 50, k0: int = 50, q: float = 1.1, v: float = 25.0,
                 average_from: Optional[int] = 170, backend: Optional[str] = None) -> None:
        defaults = dict(beta=beta, lam=lam, r=r, s=s, rho=rho, M=M, k0=k0, q=q, v=v, average_from=average_from)
        _check_hyper(defaults)
        super().__init__(params, defaults, backend)

    def _check_group(self, group: Dict[str, Any], where: str) -> None:
        _check_hyper(group, where)

    def _check_params(self, group: Dict[str, Any], where: str) -> None:
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"SASADMM steps real floating-point parameters, got {p.dtype}{where}")

    def _prepare(self, index: int, group: Dict[str, Any]):
        """The group's plan (reused while its parameters, their storage and the
        state tensors are the same) and its checked gradients."""
        return prepare_group(self._plans, index, group["params"],
                             lambda cached, ps: cached.fits(ps, self.state.clock.value, self.backend),
                             lambda ps: _GroupPlan(self, group, ps))

    def _apply(self, prepared: List[Any], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        for group, (cached, grads) in zip(self.param_groups, prepared):
            if cached.params:
                cached.plan.run(grads, cached.coefficients(self.state, group))
                cached.mark_written()
                self._average(group, cached)
                cached.commit(self.state)

    @torch.no_grad()
    def _average(self, group: Dict[str, Any], cached: "_GroupPlan") -> None:
        """The ergodic average of the parameters whose outer iteration ``k``
        (their counter, not advanced yet) ended in this step."""
        start = group["average_from"]
        if start is None or not any(co.outer for co in cached.last):
            return
        folds: Dict[int, Tuple[List[Tensor], List[Tensor]]] = {}
        for st, co in zip(cached.states, cached.last):
            if not co.outer:
                continue
            # plain dict writes: the fused step does not read the average, its plan stays valid
            k = st["k"]
            if k < start:  # (an average kept here means average_from was raised: W is the average again)
                dict.pop(st, "w_avg", None)
                dict.pop(st, "w_avg_count", None)
                continue
            if k == start or "w_avg" not in st:
                dict.__setitem__(st, "w_avg", st["w"].clone())
                dict.__setitem__(st, "w_avg_count", 1)
                continue
            n = st["w_avg_count"] + 1
            dict.__setitem__(st, "w_avg_count", n)
            avgs, ws = folds.setdefault(n, ([], []))
            avgs.append(local_tensor(st["w_avg"]))
            ws.append(local_tensor(st["w"]))
        for n, (avgs, ws) in folds.items():
            alpha = 1 / n
            torch._foreach_mul_(avgs, 1 - alpha)
            torch._foreach_add_(avgs, torch._foreach_mul(ws, alpha))

    @torch.no_grad()
    def write_params(self, which: str = "average") -> None:
        """Copy the ergodic average of ``W`` (``which="average"``: ``W_avg``,
        or ``W`` while no average is kept; the official final weights), ``W``
        (``"w"``) or the sparse ``Z`` (``"z"``) of every stepped parameter into
        the parameter, e.g. before magnitude pruning and masked retraining.
        The ADMM state is left as it is."""
        if which not in ("average", "w", "z"):
            raise ValueError(f"which must be 'average' (the ergodic average of W), 'w' or 'z', got {which!r}")
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    p.copy_(st.get("w_avg", st["w"]) if which == "average" else st[which])


class _GroupPlan(CachedPlan):
    """A param group's SASPlan with what it was built from: the parameters
    that had gradients, their storage and the state clock. The state of a
    parameter stepped for the first time (``W = W_breve = Z =`` the parameter,
    ``U = 0``, anchor ``rho W``, ``k = t = 1``) is made here and saved only
    after the step ran."""

    def __init__(self, optimizer: SASADMM, group: Dict[str, Any], params) -> None:
        self._remember(optimizer, params)
        self.new_state: Dict[Tensor, Dict[str, Any]] = {}
        states = []
        for p in self.params:
            st = optimizer.state.get(p)
            if not st:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                w = p.detach().to(dtype, copy=True, memory_format=torch.preserve_format)
                st = self.new_state[p] = {
                    "w": w, "w_breve": w.clone(), "z": w.clone(), "u": torch.zeros_like(w),
                    "anchor": w.mul(_rho(group)),  # rho W + U - beta (W - Z) with U = 0, Z = W
                    "k": 1, "t": 1,
                }
            states.append(st)
        self.states = states
        for i, st in enumerate(states):
            for name in ("k", "t"):
                value = st.get(name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"parameter {i} of its group has SAS-ADMM counter {name}={value!r}; it must be an int >= 1")
        self.plan = SASPlan([local_tensor(p) for p in self.params],
                            *([local_tensor(st.get(name)) for st in states] for name in SAS_STATE),
                            backend=optimizer.backend,
                            warn=lambda i, why: optimizer.warn_once(self.params[i], why))

    def fits(self, params, clock: int, backend) -> bool:
        return not self.new_state and self.same_inputs(params, clock, backend)

    def coefficients(self, state, group: Dict[str, Any]) -> List[SASCoefficients]:
        """Each parameter's coefficients at its own (k, t), computed once per distinct pair."""
        beta, lam, rho = group["beta"], group["lam"], _rho(group)
        made: Dict[Tuple[int, int], SASCoefficients] = {}
        out = []
        for st in self.states:
            key = (st["k"], st["t"])
            co = made.get(key)
            if co is None:
                m_k, eta_k = sas_schedule(key[0], group["M"], group["k0"], group["q"], group["v"])
                co = made[key] = sas_coefficients(key[1], m_k, eta_k, beta=beta, lam=lam, r=group["r"],
                                                  s=group["s"], rho=rho)
            out.append(co)
        self.last = out
        return out

    def commit(self, state) -> None:
        """Advance each parameter's (k, t) and keep the state of first-stepped ones."""
        for st, co in zip(self.states, self.last):
            k, t = (st["k"] + 1, 1) if co.outer else (st["k"], st["t"] + 1)
            # plain dict writes: counters are read every step, changing them needs no new plan
            dict.__setitem__(st, "k", k)
            dict.__setitem__(st, "t", t)
        if self.new_state:
            for p, entries in self.new_state.items():
                state[p].update(entries)
            self.states = [state[p] for p in self.params]
            self.new_state = {}


def _rho(group: Dict[str, Any]) -> float:
    return group["beta"] if group["rho"] is None else group["rho"]


def _check_hyper(h: Dict[str, Any], where: str = "") -> None:
    def finite(name):
        value = h[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"SASADMM: {name} must be a finite number, got {value!r}{where}")
        return value

    if not finite("beta") > 0:
        raise ValueError(f"SASADMM: beta (the penalty) must be > 0, got {h['beta']}{where}")
    if not finite("lam") >= 0:
        raise ValueError(f"SASADMM: lam must be >= 0, got {h['lam']}{where}")
    finite("r")
    finite("s")
    if h["rho"] is not None and not finite("rho") >= 0:
        raise ValueError(f"SASADMM: rho must be >= 0 (or None: rho = beta), got {h['rho']}{where}")
    for name in ("M", "k0"):
        value = h[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SASADMM: {name} must be an int >= 1, got {value!r}{where}")
    if not finite("q") > 0:
        raise ValueError(f"SASADMM: q must be > 0, got {h['q']}{where}")
    if not finite("v") > 0:
        raise ValueError(f"SASADMM: v must be > 0, got {h['v']}{where}")
    start = h["average_from"]
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 1):
        raise ValueError(f"SASADMM: average_from (the first outer iteration in the average of W) must be an int "
                         f">= 1 or None (no average), got {start!r}{where}")
