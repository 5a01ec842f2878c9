"""Command line: ``python -m regkern COMMAND ...`` (``--help`` lists the commands).

Each command is a subparser added by a small ``_add_<command>`` function that
sets ``func``; add new commands (e.g. ``demo``) the same way.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _add_bench(commands) -> None:
    from regkern.bench import cli  # imports every suite, so that the options list them all

    parser = commands.add_parser(
        "bench", help="time the fused regularized SGD and AdamW steps against PyTorch",
        description=(
            "Time one optimizer step on the parameter shapes of real networks "
            "(ResNet-56/CIFAR, ResNet-50/ImageNet, ViT-B/16, single 16M and 64M tensors) "
            "with random gradients: regkern.SGD with a per-row L2 penalty (RowL2) on every "
            "conv/linear weight, against (a) the official GReg loop grad += lam*W then "
            "torch.optim.SGD(foreach=True), (b) the same with fused=True, (c) torch.compile "
            "of the whole step, (d) torch.optim.SGD(fused=True) without the penalty, and "
            "(e) the memory floor: the bytes the fused step must move at the bandwidth of a copy "
            "(and, e2, of an in-place x += y) measured in the same run. The other regularizers "
            "(--regularizers) get a table each, by default on resnet56 and resnet50: regkern.SGD with "
            "ProxL1 / GroupLasso / ADMM on conv/linear weights or L1 / Polarization on BatchNorm scales "
            "against (a) what users run today (the proximal map as torch ops after the step, the official "
            "network-slimming loop, the polarization loss term with backward and clamp loop, the ADMM "
            "loop) with torch.optim.SGD(foreach=True), (c) torch.compile of the same math (prox-l1, "
            "group-lasso), (d) and the floors at that regularizer's bytes. The adam table (--regularizers adam; "
            "default shapes resnet56, resnet50, tensor16m) times regkern.AdamW with RowL2 (decoupled; also "
            "coupled, and without a regularizer) against (a) the loop grad += lam*W then "
            "torch.optim.AdamW(foreach=True), (b) the same with fused=True, (c) torch.compile of the loop and "
            "the AdamW update, (d) torch.optim.AdamW(fused=True) without the penalty, and the floors at an "
            "Adam step's bytes (read W, grad, m, v, lam; write W, m, v). Prints the median step time, its interquartile range "
            "and minimum, and each row's ratio to regkern."))
    cli.add_arguments(parser)
    parser.set_defaults(func=cli.main)


def _add_demo(commands) -> None:
    from regkern.demo import cli

    parser = commands.add_parser(
        "demo", help="prune a small network with every method and print the papers' table",
        description=cli.DESCRIPTION)
    cli.add_arguments(parser)
    parser.set_defaults(func=cli.main)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m regkern",
                                     description="regkern: fused optimizer kernels for regularization-based pruning.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_bench(commands)
    _add_demo(commands)
    args = parser.parse_args(argv)
    return args.func(args, argv)


if __name__ == "__main__":
    sys.exit(main())
