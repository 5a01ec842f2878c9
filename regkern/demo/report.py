"""The results table of the demo, in the papers' style: parameters, FLOPs,
speed-up, accuracy right after pruning and after fine-tuning, sparsity;
printed as text and written as CSV and Markdown."""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class Row:
    """One line of the table. ``params`` and ``macs`` count what is left:
    for structured (filter) pruning the sliced network, for unstructured
    (weight) pruning the nonzero weights and the multiply-adds that touch
    them (a theoretical count: dense kernels do not skip zeros)."""

    method: str
    structure: str            # "-" (baseline), "filters" or "weights"
    params: int
    macs: int
    speedup: float
    acc_pruned: Optional[float]
    acc_finetuned: float
    sparsity: float           # fraction of the baseline's conv/linear weights removed or zero
    seconds: float = 0.0
    note: str = ""


def prunable_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def weight_count(model: nn.Module, nonzero: bool = False) -> int:
    """Conv/linear weights of the model (only the nonzero ones with ``nonzero``)."""
    return sum(int(torch.count_nonzero(m.weight)) if nonzero else m.weight.numel() for m in prunable_layers(model))


def param_count(model: nn.Module, nonzero: bool = False) -> int:
    """All parameters; with ``nonzero``, the zeros of conv/linear weights are not counted."""
    total = sum(p.numel() for p in model.parameters())
    if nonzero:
        total -= weight_count(model) - weight_count(model, nonzero=True)
    return total


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Tensor, nonzero: bool = False) -> int:
    """Multiply-accumulates of conv and linear layers for one input (the
    FLOPs of the papers' tables); with ``nonzero``, only those of nonzero
    weights (each weight is used once per output position)."""
    total = 0

    def hook(module: nn.Module, inputs, output: Tensor) -> None:
        nonlocal total
        outputs = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        positions = output[0].numel() // outputs  # H * W of a conv's output, 1 for a linear layer
        weights = int(torch.count_nonzero(module.weight)) if nonzero else module.weight.numel()
        total += weights * positions

    handles = [m.register_forward_hook(hook) for m in prunable_layers(model)]
    was_training = model.training
    model.eval()
    try:
        model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


COLUMNS = ("Method", "Pruned", "Params", "FLOPs (MACs)", "Speed-up", "Acc. pruned (%)",
           "Acc. fine-tuned (%)", "Sparsity (%)", "Time (s)")


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cells(row: Row) -> List[str]:
    return [row.method, row.structure, _human(row.params), _human(row.macs), f"{row.speedup:.2f}x",
            "-" if row.acc_pruned is None else f"{row.acc_pruned:.2f}", f"{row.acc_finetuned:.2f}",
            f"{100 * row.sparsity:.2f}", f"{row.seconds:.1f}"]


FOOTNOTE = ("FLOPs: multiply-adds of conv and linear layers per image. Filter methods: the sliced network. "
            "Weight methods: nonzero weights only (a theoretical speed-up; dense kernels do not skip zeros). "
            "Sparsity: share of the baseline's conv/linear weights removed or zero.")


@dataclasses.dataclass(frozen=True)
class TableFormat:
    """How a demo prints, writes and saves its table of ``row_type`` rows:
    the column titles, the cells of a row, the footnote, and how many leading
    columns are text (aligned left; the others are numbers)."""

    row_type: type
    columns: Sequence[str]
    cells: Callable[[Any], List[str]]
    footnote: str
    text_columns: int = 1

    def text(self, rows: Sequence[Any], title: str = "") -> str:
        """A fixed-width text table (what the command prints)."""
        body = [list(self.columns)] + [self.cells(r) for r in rows]
        widths = [max(len(line[i]) for line in body) for i in range(len(self.columns))]
        fmt = lambda line: "  ".join(c.ljust(w) if i < self.text_columns else c.rjust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(line, widths)))
        rule = "-" * len(fmt(body[0]))
        lines = ([title] if title else []) + [rule, fmt(body[0]), rule] + [fmt(line) for line in body[1:]] + [rule]
        notes = [f"  {r.method}: {r.note}" for r in rows if r.note]
        return "\n".join(lines + [self.footnote] + (["notes:"] + notes if notes else []))

    def markdown(self, rows: Sequence[Any], title: str = "") -> str:
        head = "| " + " | ".join(self.columns) + " |"
        align = "|" + "|".join(":---" if i < self.text_columns else "---:" for i in range(len(self.columns))) + "|"
        lines = ([f"**{title}**", ""] if title else []) + [head, align]
        lines += ["| " + " | ".join(self.cells(r)) + " |" for r in rows]
        notes = [f"- {r.method}: {r.note}" for r in rows if r.note]
        return "\n".join(lines + ["", self.footnote] + ([""] + notes if notes else [])) + "\n"

    def write(self, rows: Sequence[Any], out_dir: str, title: str = "") -> List[str]:
        """``results.csv`` (exact numbers) and ``results.md`` in ``out_dir``; returns their paths."""
        csv_path, md_path = os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.md")
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[fd.name for fd in dataclasses.fields(self.row_type)])
            writer.writeheader()
            for r in rows:
                writer.writerow(dataclasses.asdict(r))
        with open(md_path, "w") as f:
            f.write(self.markdown(rows, title))
        return [csv_path, md_path]


TABLE = TableFormat(Row, COLUMNS, cells, FOOTNOTE, text_columns=2)
format_table, to_markdown, write = TABLE.text, TABLE.markdown, TABLE.write
