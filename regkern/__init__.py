"""regkern: fused kernels for regularization-based neural-network pruning."""
import torch  # noqa: F401  (loaded first: regkern._C shares torch's OpenMP runtime)

from regkern import admm, export, prune
from regkern.attention import Heads, head_groups
from regkern.flops import count_flops
from regkern.groups import Group, Member, find_groups, group_scores, set_group_lambda
from regkern.optim import RDA, SASADMM, SGD, Adam, AdamW
from regkern.slicing import SliceSummary, slice_model
from regkern.regularizers import ADMM, L1, Clamp, ColumnL2, ElementL2, GroupLasso, Polarization, ProxL1, RowL2

__all__ = ["Heads", "head_groups", "find_groups", "group_scores", "set_group_lambda", "Group", "Member", "slice_model", "SliceSummary",
           "count_flops", "SGD", "Adam", "AdamW", "RowL2", "ColumnL2", "ElementL2", "L1", "ProxL1", "GroupLasso", "Polarization", "Clamp", "ADMM", "SASADMM", "admm", "export", "prune", "RDA"]
