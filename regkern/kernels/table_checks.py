"""Checks of a metadata table before a Triton launch.

The Triton kernels branch on the kinds and flags of their table (a prox
kind, a mask kind, a mode...): a value they do not implement would fall
through to some other branch and be stepped without a word. Each kernel
module declares the values it implements next to its ``SGD_TERMS``-style
constants; its launch wrappers and ``build_units`` pass the table through a
:class:`TableCheck` on the CPU (vectorised: a few torch ops over the table's
columns, never over the tensors) and refuse, before anything is written, a
row holding a value outside them, sizes that disagree or a pointer that a
kind needs but lacks. The message is the one sentence of the C++ kernels'
checks (``csrc/table_check.h``): the table row, the column and the value.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Union

import torch
from torch import Tensor


class TableError(ValueError):
    """A kernel refused its metadata table before writing anything: ``row``
    is the table row (the tensor's index in the table), ``column`` the column
    name (the same attributes as ``regkern._C.TableError``)."""

    def __init__(self, message: str, row: int, column: str):
        super().__init__(message)
        self.row, self.column = row, column


def float_text(x: float) -> str:
    """A float as the C++ checks print it."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)


Problem = Union[str, Callable[[int], str]]


class TableCheck:
    """One table of a kernel family under check (a CPU copy of ``table``).

    ``family``: "sgd", "rda", "zu" or "sas"; ``builder``: the function that
    builds such tables; ``column``: the layout's name -> index map.
    ``full``: check the pointers (``present``, ``absent``) and the values a
    kernel reads as numbers (bounds, counts, step coefficients) as well as
    the kinds, flags and sizes. A work list is built from the kinds and sizes
    alone (``build_units``), so it checks only those; a launch checks all."""

    def __init__(self, table: Tensor, family: str, builder: str, column: Dict[str, int], full: bool = True):
        if table.dim() != 2 or table.dtype != torch.int64 or table.shape[1] != len(column):
            raise ValueError(f"the {family} table must be int64 of shape [tensors, {len(column)}], got "
                             f"{str(table.dtype).replace('torch.', '')} {tuple(table.shape)}; "
                             f"build it with {builder}")
        self.table = table.cpu()
        self.family, self.builder, self.column, self.full = family, builder, column, full
        self.names = {i: name for name, i in column.items()}

    def __getitem__(self, name: str) -> Tensor:
        return self.table[:, self.column[name]]

    def floats(self, name: str) -> Tensor:
        """A "float" column (float64 bits) as float64."""
        return self[name].contiguous().view(torch.float64)

    def refuse(self, bad: Tensor, name: str, problem: Problem, values: Union[Tensor, None] = None,
               remedy: str = "") -> None:
        """Raise TableError on the first row flagged in ``bad`` (if any):
        "<family> table row <i> has <name> = <value>, <problem>; <remedy>."."""
        if not bool(bad.any()):
            return
        row = int(bad.nonzero()[0, 0])
        if values is None:
            value = str(int(self[name][row]))
        elif values.dtype == torch.float64:
            value = float_text(float(values[row]))
        else:
            value = str(int(values[row]))
        text = problem(row) if callable(problem) else problem
        fix = remedy or f"rebuild the table with {self.builder}"
        raise TableError(f"{self.family} table row {row} has {name} = {value}, {text}; {fix}.", row, name)

    def one_of(self, name: str, allowed: Sequence[int], meaning: str) -> None:
        bad = ~torch.isin(self[name], torch.tensor(list(allowed), dtype=torch.int64))
        self.refuse(bad, name, f"which this Triton kernel does not implement (it takes {meaning})")

    def flag(self, name: str) -> None:
        self.one_of(name, (0, 1), "0 or 1")

    def non_negative(self, name: str) -> None:
        self.refuse(self[name] < 0, name, "but sizes cannot be negative")

    def present(self, name: str, needed: Tensor, why: Problem) -> None:
        """Pointer column ``name`` must be set where ``needed``."""
        if not self.full:
            return
        self.refuse(needed & (self[name] == 0), name, lambda r: f"but {_text(why, r)} needs it")

    def absent(self, name: str, unused: Tensor, why: str) -> None:
        """Pointer column ``name`` must be 0 where ``unused`` (it would be ignored)."""
        if not self.full:
            return
        self.refuse(unused & (self[name] != 0), name, f"but {why}, so it would be ignored")

    def rows_cover(self, numel: str = "NUMEL", rows: str = "ROWS", row_len: str = "ROW_LEN") -> None:
        """NUMEL == ROWS * ROW_LEN, all non-negative (ROWS == 0: no elements)."""
        for name in (numel, rows, row_len):
            self.non_negative(name)
        n, r, length = self[numel], self[rows], self[row_len]
        bad = torch.where(r == 0, (n != 0) | (length != 0), n != r * length)
        self.refuse(bad, numel, lambda i: f"but ROWS * ROW_LEN is {int(r[i])} * {int(length[i])}")

    def dtype_is(self, code: int, dtype: torch.dtype) -> None:
        """Every row holds tensors of the launch's storage dtype (the kernel
        reads them as ``dtype`` whatever the column says)."""
        self.refuse(self["DTYPE"] != code, "DTYPE",
                    f"but this launch steps {str(dtype).replace('torch.', '')} tensors (DTYPE {code})",
                    remedy="launch each storage dtype with a table of its own")


def _text(why: Problem, row: int) -> str:
    return why(row) if callable(why) else why
