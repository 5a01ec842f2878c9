"""Table and figures of the language-model demo.

The table (printed, ``results.csv`` with exact numbers, ``results.md``): per
method the parameters, multiply-adds per token (:func:`regkern.count_flops`
of one held-out window divided by its length: linear layers and both
attention products), the kv heads and MLP neurons left, held-out perplexity
right after the cut and after fine-tuning, and forward-pass tokens per
second of the sliced model against the baseline's, timed in the same loop.

Figures (matplotlib, Agg backend):

* ``lm_perplexity.png``: held-out perplexity over the baseline's training
  (left) and over each method's run from the baseline (right: regularization
  phase, the cut, fine-tuning).
* ``greg_unit_norms.png``: for one block, the L2 norm of every kv head group
  and every MLP neuron (over its producer rows, divided by the largest)
  during GReg's phase, pruned red and kept blue, with the largest penalty on
  a second axis: the separation as the penalty grows (GReg's Figure 1).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from regkern.demo.plots import norm_separation, save  # noqa: E402
from regkern.demo.report import TableFormat  # noqa: E402



@dataclasses.dataclass
class Row:
    """One line of the LM table."""

    method: str
    params: int
    macs_per_token: float
    kv_heads: int
    neurons: int
    ppl_pruned: Optional[float]    # right after the cut (None: the baseline)
    ppl_finetuned: float           # after fine-tuning (the baseline: its own)
    tokens_per_s: float
    speedup: float                 # tokens/s against the baseline's, same loop
    seconds: float = 0.0
    note: str = ""


COLUMNS = ("Method", "Params", "MACs/token", "KV heads", "MLP neurons", "PPL pruned", "PPL fine-tuned",
           "Tokens/s", "vs baseline", "Time (s)")


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def cells(r: Row) -> List[str]:
    return [r.method, _human(r.params), _human(r.macs_per_token), str(r.kv_heads), str(r.neurons),
            "-" if r.ppl_pruned is None else f"{r.ppl_pruned:.2f}", f"{r.ppl_finetuned:.2f}",
            f"{r.tokens_per_s:,.0f}", f"{r.speedup:.2f}x", f"{r.seconds:.1f}"]


FOOTNOTE = ("PPL: held-out byte-level perplexity (standard-library files never trained on). MACs/token: linear "
            "layers and attention products of one window divided by its length. Tokens/s: forward pass of one "
            "batch in eval mode, the fastest of rounds timing every model in turn, on this machine.")


TABLE = TableFormat(Row, COLUMNS, cells, FOOTNOTE, text_columns=1)
format_table, to_markdown, write = TABLE.text, TABLE.markdown, TABLE.write


def perplexity_curves(baseline: List[Tuple[int, float]], methods: Dict[str, dict], path: str) -> str:
    """``methods[label]``: ``curve`` [(step, ppl)], ``cut`` (the step of the cut)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    steps, ppl = zip(*baseline)
    left.plot(steps, ppl, color="k", lw=1.5)
    left.set_yscale("log")
    left.set_xlabel("baseline training step")
    left.set_ylabel("held-out perplexity")
    left.set_title(f"Baseline (final {ppl[-1]:.2f})")
    for i, (label, m) in enumerate(methods.items()):
        color = f"C{i}"
        xs, ys = zip(*sorted(m["curve"]))
        right.plot(xs, ys, color=color, lw=1.4, marker=".", ms=3, label=label)
        right.axvline(m["cut"], color=color, ls=":", lw=0.8)
    right.axhline(ppl[-1], color="k", ls="--", lw=1.0, label="baseline")
    right.set_yscale("log")
    right.set_xlabel("step from the baseline (dotted: the cut; after it, fine-tuning)")
    right.set_ylabel("held-out perplexity")
    right.set_title("Pruning runs: regularization, cut, fine-tuning")
    right.legend(fontsize=8)
    return save(fig, path)


def unit_norms(traces: Dict[str, dict], path: str) -> str:
    """``traces[label]``: ``iters``, ``block`` and per kind (``heads``,
    ``neurons``) ``norms`` [T, U], ``pruned`` bool [U], ``lam`` [T]."""
    kinds = (("heads", "kv head groups"), ("neurons", "MLP neurons"))
    fig, axes = plt.subplots(len(kinds), len(traces), figsize=(5.5 * len(traces), 7.5), squeeze=False)
    for col, (label, tr) in enumerate(traces.items()):
        for row, (kind, what) in enumerate(kinds):
            t = tr[kind]
            pruned = np.asarray(t["pruned"], dtype=bool)
            norm_separation(axes[row][col], tr["iters"], t["norms"], pruned, t["lam"], "step of the penalty phase",
                            "unit L2 norm / max",
                            f"{label}: block {tr['block']} {what} ({int(pruned.sum())} of {len(pruned)} pruned)",
                            lw=1.5 if kind == "heads" else 0.6, title_size=9)
    fig.suptitle("Unit-norm separation as GReg's penalty grows (AdamW, decoupled penalty)")
    return save(fig, path)
