"""What regkern reads from Hugging Face ``transformers`` models: the head
size of an attention module and the module attributes that count heads.

Nothing here imports ``transformers``; a model is read through its modules'
attributes and its ``config``. ``find_groups`` uses these to find attention
heads by itself (``regkern.attention.discovered_heads``); the head size is
also what maps sliced projection widths back to head counts
(:func:`head_counts`), e.g. to write a pruned model's config.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

# Attribute names that attention modules of the common model families use.
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "head_size")
HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
KV_GROUPS_ATTRS = ("num_key_value_groups", "n_rep")  # query heads per key/value head
WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim")  # num_heads * head_dim


def int_attr(module: nn.Module, names) -> Optional[Tuple[str, int]]:
    """The first of ``names`` that ``module`` holds as an int: (name, value)."""
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None


def head_dim(model: nn.Module, attention: nn.Module) -> Optional[int]:
    """The size of one head of ``attention`` (a submodule of ``model``): its
    own ``head_dim`` / ``attention_head_size`` attribute, else the model's
    config (``head_dim``, or ``hidden_size // num_attention_heads``); None
    when neither tells. Pruning removes whole heads, so this size never
    changes and holds for every pruning round."""
    own = int_attr(attention, HEAD_SIZE_ATTRS)
    if own is not None and own[1] > 0:
        return own[1]
    config = getattr(model, "config", None)
    if config is None:
        return None
    size = getattr(config, "head_dim", None)
    if isinstance(size, int) and size > 0:
        return size
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def head_counts(q_rows: int, kv_rows: int, size: int) -> Tuple[int, int]:
    """(query heads, key/value heads) of projections with ``q_rows`` and
    ``kv_rows`` output rows and heads of ``size`` channels; ValueError when
    the rows are not whole heads."""
    if size < 1 or q_rows % size or kv_rows % size:
        raise ValueError(f"projections of {q_rows} query and {kv_rows} key/value rows are not whole heads of "
                         f"{size} channels")
    return q_rows // size, kv_rows // size
