"""Text of the language-model demo: the source of the running interpreter's
standard library, read as bytes (one token per byte, vocabulary 256, no
tokenizer and nothing downloaded).

Selection (fixed, so two runs of one interpreter read the same bytes): every
top-level ``*.py`` file of ``sysconfig.get_paths()["stdlib"]`` (no
subpackages, no ``site-packages``), sorted by file name; the file at sorted
position ``i`` is held out when ``i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1``
(one file in eight), all others are training text. The split is by file, so
no held-out function or docstring was seen in training. Each split is the
concatenation of its files in sorted order, each followed by a newline.

Training batches are windows of ``seq_len`` bytes at random offsets of the
training stream (a ``torch.Generator`` fixes them); the held-out set is
``eval_windows`` windows at evenly spaced offsets of the held-out stream, the
same for every model of a run.
"""
from __future__ import annotations

import dataclasses
import os
import sysconfig
from typing import List, Optional

import torch
from torch import Tensor

HELD_OUT_EVERY = 8
VOCAB = 256


class TextError(ValueError):
    """The standard library's source could not be read (a stripped interpreter)."""


@dataclasses.dataclass
class Text:
    """Byte streams of both splits and the files they came from."""

    train: Tensor            # uint8 [N]
    held_out: Tensor         # uint8 [M]
    train_files: List[str]
    held_out_files: List[str]
    root: str

    def describe(self) -> str:
        return (f"{len(self.train_files)} files / {len(self.train) / 1e6:.2f} MB train, "
                f"{len(self.held_out_files)} files / {len(self.held_out) / 1e6:.2f} MB held out "
                f"(top-level *.py of {self.root})")


def stdlib_files(root: Optional[str] = None) -> List[str]:
    """The selected files, sorted by name (paths)."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not root or not os.path.isdir(root):
        raise TextError(f"the standard library folder {root!r} of this interpreter does not exist")
    names = sorted(n for n in os.listdir(root) if n.endswith(".py") and os.path.isfile(os.path.join(root, n)))
    return [os.path.join(root, n) for n in names]


def load(root: Optional[str] = None, min_bytes: int = 100_000) -> Text:
    """Read and split the selection; raises :class:`TextError` when the
    interpreter ships too little source (e.g. only ``.pyc`` files)."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    train_files = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held_files = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]

    def read(paths: List[str]) -> Tensor:
        chunks = []
        for p in paths:
            with open(p, "rb") as f:
                chunks.append(f.read() + b"\n")
        data = b"".join(chunks)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)

    train, held = read(train_files), read(held_files)
    if len(train) < min_bytes or len(held) < min_bytes // 8:
        raise TextError(f"this interpreter's standard library at {root} holds too little Python source "
                        f"({len(train)} training and {len(held)} held-out bytes; need {min_bytes} and "
                        f"{min_bytes // 8})")
    return Text(train, held, [os.path.basename(f) for f in train_files], [os.path.basename(f) for f in held_files],
                root)


def train_batch(text: Text, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """``[batch_size, seq_len]`` int64 token ids from random offsets of the training stream."""
    starts = torch.randint(0, len(text.train) - seq_len, (batch_size,), generator=generator)
    return torch.stack([text.train[s:s + seq_len] for s in starts.tolist()]).long()


def held_out_windows(text: Text, windows: int, seq_len: int) -> Tensor:
    """``[windows, seq_len]`` int64: evenly spaced, non-overlapping held-out windows."""
    span = len(text.held_out) - seq_len
    if span < 0 or windows * seq_len > len(text.held_out):
        raise TextError(f"the held-out text ({len(text.held_out)} bytes) is shorter than {windows} windows of "
                        f"{seq_len} bytes")
    starts = torch.linspace(0, span, windows).long()
    return torch.stack([text.held_out[s:s + seq_len] for s in starts.tolist()]).long()
