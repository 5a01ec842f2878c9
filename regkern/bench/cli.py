"""The command line of ``python -m regkern bench`` (``regkern/__main__.py``
adds it as the ``bench`` command): its options and ``main``.

This is the one module that knows the list of suites: importing it imports
every suite module, each of which registers its tables and rows with the
harness. Their order here is the order of the ``--regularizers`` choices, of
the tables printed per shape set and of the ``--rows`` list.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Dict, List, Sequence, Tuple

import torch

# The suites, in table order: importing one registers its tables and rows, so
# keep this order (not alphabetical).
from regkern.bench import sgd  # rowl2
from regkern.bench import regularizers  # prox-l1, group-lasso, l1, polarization, admm, admm-zu, sas-admm
from regkern.bench import rda  # rda
from regkern.bench import adam  # adam
from regkern.bench.harness import (BACKENDS, DTYPES, ROWS, SUITES, Case, Context, format_machine, format_table,
                                   machine_info, release, run_case)
from regkern.bench.shapes import SHAPE_SETS, shape_set

SUITE_MODULES = (sgd, regularizers, rda, adam)


def _csv(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m regkern bench`` (the ``--regularizers`` and
    ``--rows`` choices are the registered suites and rows)."""
    parser.add_argument("--shapes", type=_csv(list(SHAPE_SETS)), default=None,
                        help=f"comma-separated shape sets: {', '.join(SHAPE_SETS)} (default: "
                             + _default_shapes_help() + ")")
    parser.add_argument("--regularizers", type=_csv(list(SUITES)), default=list(SUITES), metavar="LIST",
                        help="comma-separated regularizers, one table each per shape set (default: all): "
                             + "; ".join(f"{s.key} = {s.help}" for s in SUITES.values())
                             + ". The BatchNorm ones skip shape sets without BatchNorm (vit-b, tensor*)")
    parser.add_argument("--backend", type=_csv(BACKENDS), default=["auto"],
                        help="regkern backend(s), comma-separated; one regkern row each, the first is "
                             "the baseline of the ratios (default: auto = C++ on CPU, Triton on CUDA)")
    keys = list(dict.fromkeys(r.key for r in ROWS))
    parser.add_argument("--rows", type=_csv(keys), default=None, metavar="LIST",
                        help=f"rows to run in each table (default: all): {', '.join(keys)}. regkern is the "
                             "baseline; a = what users run today (the official loop, or the regularizer "
                             "as separate torch ops or an autograd loss term) with torch.optim.SGD(foreach), "
                             "AdamW(foreach) in the adam table; b = GReg loop with SGD fused (rowl2) or AdamW "
                             "fused (adam); c = torch.compile of the same math (rowl2, prox-l1, group-lasso, rda, "
                             "adam); d = SGD fused without regularizer (adam: AdamW fused); regkern-coupled, "
                             "regkern-noreg = regkern.AdamW with coupled RowL2, without regularizer (adam); floor, "
                             "floor-rmw = the bytes of that regularizer's fused step at copy and x += y bandwidth")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="storage dtype of parameters, gradients and momentum (adam: both moments) "
                             "(default: fp32)")
    parser.add_argument("--device", type=_csv(["cpu", "cuda"]), default=None,
                        help="devices (default: cpu, and cuda when a GPU is present)")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="torch.set_num_threads(T) first (default: torch's own choice)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="timed steps per row, over all rounds (default: adaptive, about --seconds per row)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="target seconds per row when --repeat is not given (default: 1.0)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="time the rows in turn this many times over (default: 3)")
    parser.add_argument("--compile-timeout", type=float, default=300.0, metavar="S",
                        help="give up on torch.compile (rows c) after S seconds (default: 300)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write machine info and every row's times (seconds) as JSON")


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(argv)
    print(format_machine(info), flush=True)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    backends = [None if b == "auto" else b for b in args.backend]
    ctx = Context(repeat=args.repeat, target_s=args.seconds, rounds=args.rounds,
                  compile_timeout_s=args.compile_timeout)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if sys.stderr.isatty() else (lambda s: None)
    suites = [SUITES[key] for key in args.regularizers]
    plan = [(name, [s for s in suites if args.shapes or s.shapes is None or name in s.shapes])
            for name in (args.shapes or SHAPE_SETS)]
    tables = []
    for device_name in devices:
        device = torch.device(device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("\n(cuda asked for but no CUDA device is present: skipped)")
            continue
        for name, wanted in plan:
            if not wanted:
                continue
            base = Case(name, shape_set(name), DTYPES[args.dtype], device)
            for s in wanted:
                case = s.case(base)
                if case is None:
                    print(f"\n({s.key} on {name}: the shape set has nothing it acts on, e.g. no BatchNorm "
                          "scales; skipped)", flush=True)
                    continue
                table = run_case(case, ctx, args.rows, backends, log, regularizer=s.key)
                del case
                release(device)
                print("\n" + format_table(table), flush=True)
                tables.append(table)
            del base
            release(device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "tables": [dataclasses.asdict(t) for t in tables]}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def _default_shapes_help() -> str:
    """The default shape sets of the suites: ``all for rowl2, <sets> for <keys>, ...,
    <sets> for the other regularizers`` (the largest group last)."""
    groups: Dict[Tuple[str, ...], List[str]] = {}
    for s in SUITES.values():
        groups.setdefault(tuple(s.shapes or ()), []).append(s.key)
    everything = groups.pop((), [])
    parts = [f"all for {', '.join(everything)}"] if everything else []
    ordered = sorted(groups.items(), key=lambda kv: len(kv[1]))
    for i, (sets, keys) in enumerate(ordered):
        names = ",".join(sorted(sets, key=list(SHAPE_SETS).index))
        last = i == len(ordered) - 1 and parts
        parts.append(f"{names} for " + ("the other regularizers" if last else ", ".join(keys)))
    return ", ".join(parts) or "all"
