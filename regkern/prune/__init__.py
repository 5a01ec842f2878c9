"""Pruning schedules: small objects that write optimizer state (lambda vectors,
masks, L1 coefficients, ADMM targets) on their timetable and cut the model at
the end. Call ``step()`` after every optimizer step; when ``done``, call
``prune()``; fine-tune with the same optimizer. See each class."""
from regkern.prune.admm import ADMMPruner
from regkern.prune.base import PruneSummary, Schedule
from regkern.prune.bn import PolarizationPruner, SearchResult, Slimming, polarization_search, search_threshold
from regkern.prune.greg import GReg1, GReg2, OneShotL1
from regkern.prune.ratios import layer_ratios, parse_ratio_string, pruned_count
from regkern.prune.sparse import SparseTraining, install_masks

__all__ = ["GReg1", "GReg2", "OneShotL1", "Slimming", "PolarizationPruner", "SparseTraining", "ADMMPruner",
           "PruneSummary", "Schedule", "SearchResult", "polarization_search", "search_threshold", "layer_ratios",
           "parse_ratio_string", "pruned_count", "install_masks"]
