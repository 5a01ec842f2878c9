"""PNG figures of the demo (matplotlib, Agg backend: no display needed).

* ``greg_filter_norms.png``: GReg's Figure 1 (row 2) on one layer: every
  filter's L1 norm, divided by the layer's largest, over the iterations of
  the growing penalty, pruned filters red and kept ones blue, with the
  penalty itself on a second axis.
* ``bn_scales_l1_vs_polarization.png``: the polarization paper's Figure 1:
  histograms of BatchNorm scales after network slimming's L1 and after
  polarization, pruned channels orange.
* ``sparsity_rda_vs_sgd_l1.png``: the fraction of exactly-zero weights over
  training, RDA against SGD with an L1 subgradient of the same strength.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KEPT, PRUNED = "#1f77b4", "#d62728"


def filter_norms(traces: Dict[str, dict], layer: str, path: str) -> str:
    """``traces[method]``: ``iters`` [T], ``norms`` [T, R] (filter L1 norms),
    ``pruned`` bool [R], ``lam`` [T] (largest penalty in the layer)."""
    fig, axes = plt.subplots(1, len(traces), figsize=(5.5 * len(traces), 4), squeeze=False)
    for ax, (method, tr) in zip(axes[0], traces.items()):
        pruned = np.asarray(tr["pruned"], dtype=bool)
        norm_separation(ax, tr["iters"], tr["norms"], pruned, tr["lam"], "iteration", "filter L1 norm / max",
                        f"{method}: {layer} ({int(pruned.sum())} pruned of {len(pruned)})")
    fig.suptitle("Filter-norm separation as the L2 penalty grows (GReg, Fig. 1)")
    return save(fig, path)


def norm_separation(ax, iters, norms, pruned, lam, xlabel: str, ylabel: str, title: str, lw: float = 0.8,
                    title_size: Optional[float] = None) -> None:
    """One panel of GReg's Figure 1: each unit's norm divided by the largest
    at that iteration (``norms`` [T, U]), ``pruned`` units red on top of the
    kept blue ones, and the penalty ``lam`` [T] on a second axis."""
    iters, norms = np.asarray(iters), np.asarray(norms, dtype=np.float64)
    relative = norms / np.maximum(norms.max(axis=1, keepdims=True), 1e-30)
    for u in np.argsort(pruned, kind="stable"):  # red lines drawn on top
        ax.plot(iters, relative[:, u], color=PRUNED if pruned[u] else KEPT, lw=lw, alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=title_size)
    ax.plot([], [], color=PRUNED, label="pruned")
    ax.plot([], [], color=KEPT, label="kept")
    twin = ax.twinx()
    twin.plot(iters, lam, color="k", ls="--", lw=1.2, label="penalty $\\lambda$ (max)")
    twin.set_ylabel("penalty $\\lambda$")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)


def bn_histograms(scales: Dict[str, dict], path: str, bins: int = 50) -> str:
    """``scales[method]``: ``values`` (BatchNorm scales of the pruned layers)
    and ``pruned`` (bool, same length: the channels the method removes)."""
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4), squeeze=False)
    for ax, (method, sc) in zip(axes[0], scales.items()):
        values = np.abs(np.asarray(sc["values"], dtype=np.float64))
        pruned = np.asarray(sc["pruned"], dtype=bool)
        edges = np.linspace(0, max(values.max(initial=0.0), 1e-6), bins + 1)
        ax.hist([values[~pruned], values[pruned]], bins=edges, stacked=True, color=[KEPT, "#ff7f0e"],
                label=[f"kept ({int((~pruned).sum())})", f"pruned ({int(pruned.sum())})"])
        ax.set_xlabel("|BatchNorm scale|")
        ax.set_ylabel("channels")
        ax.set_title(method)
        ax.legend(fontsize=8)
    fig.suptitle("BatchNorm scales after sparsity training: L1 vs polarization")
    return save(fig, path)


def sparsity_curves(curves: Dict[str, dict], path: str) -> str:
    """``curves[name]``: ``iters``, ``sparsity`` (fraction of exact zeros) and
    optionally ``near_zero`` (fraction below ``near_zero_below``, dashed)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(c["iters"], 100 * np.asarray(c["sparsity"]), color=color, lw=1.8, label=f"{name}: exactly 0")
        if "near_zero" in c:
            ax.plot(c["iters"], 100 * np.asarray(c["near_zero"]), color=color, lw=1.0, ls="--",
                    label=f"{name}: |w| < {c.get('near_zero_below', 1e-3):g}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("conv/linear weights (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Weight sparsity over training: RDA vs SGD + L1 subgradient")
    ax.legend(fontsize=8)
    return save(fig, path)


def save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(out_dir: str, *, norm_traces: Optional[Dict[str, dict]] = None, norm_layer: str = "",
              bn_scales: Optional[Dict[str, dict]] = None,
              sparsity: Optional[Dict[str, dict]] = None) -> Sequence[str]:
    """Every figure whose data the run produced; returns the paths written."""
    written = []
    if norm_traces:
        written.append(filter_norms(norm_traces, norm_layer, os.path.join(out_dir, "greg_filter_norms.png")))
    if bn_scales:
        written.append(bn_histograms(bn_scales, os.path.join(out_dir, "bn_scales_l1_vs_polarization.png")))
    if sparsity:
        written.append(sparsity_curves(sparsity, os.path.join(out_dir, "sparsity_rda_vs_sgd_l1.png")))
    return written
