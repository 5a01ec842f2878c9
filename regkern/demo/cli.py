"""``python -m regkern demo``: train a baseline, prune it with every method,
print and save the table and the figures."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch

import regkern
from regkern.demo import data as data_mod
from regkern.demo import methods, models, report
from regkern.demo.train import cosine_lr, evaluate, steps_per_epoch, train

DESCRIPTION = """\
Train a small BatchNorm network to a baseline, then prune it at a high ratio with every
method from that same baseline and print a table in the style of the papers: parameters,
FLOPs (multiply-adds of conv and linear layers), speed-up, accuracy right after pruning
(before fine-tuning), accuracy after the same fine-tuning budget, and sparsity (the share
of the baseline's conv/linear weights removed or zero). With --task lm: a small Llama
language model on the interpreter's own standard-library source, its attention heads and
MLP neurons pruned by GReg-1/2, group lasso, magnitude and a Wanda-style score (flags below).

Filter methods remove whole rows of coupled layers (the network gets smaller):
  greg1         GReg-1: rows fixed by magnitude, a growing L2 penalty drives them to zero
  greg2         GReg-2: a uniformly rising L2 penalty picks the rows, then grows on them
  l1            one-shot L1-norm filter pruning (the same rows count as GReg)
  slimming      network slimming: L1 on BatchNorm scales, per-layer percentile cut at --ratio
  polarization  polarization regularizer on BatchNorm scales, cut at each layer's valley
Weight methods zero single weights (FLOPs and speed-up count nonzero weights only:
theoretical, dense kernels do not skip zeros); ADMM and SAS-ADMM prune each layer to
the weight count the filter methods keep, RDA's sparsity follows from its L1 strength:
  rda           L1-regularized dual averaging (exact zeros during training)
  admm          classic ADMM (W-step in the fused SGD, Z/U projection every K steps)
  sas-admm      symmetric accelerated stochastic ADMM
All training uses regkern's fused optimizers. The default data are scikit-learn's bundled
8x8 digits (1,797 images, fixed 75/25 split; nothing is downloaded); --data cifar10 or
cifar100 with --data-dir reads a local copy in the python-pickle format with the papers'
ResNet-56 or VGG-19 (hours per method on a CPU: use --device cuda). Timetables are
compressed so that a digits run takes about a minute on two CPU cores: GReg's penalty grows
by 5e-2 per iteration instead of 1e-4 per 10, and so on (see regkern/demo/methods.py).

Output folder: results.csv, results.md and three PNG figures (GReg filter norms over
iterations, BatchNorm scales L1 vs polarization, weight sparsity RDA vs SGD + L1)."""

DEFAULT_EPOCHS = (30, 10, 10)  # baseline, longest regularization phase, fine-tuning


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--methods", default=",".join(methods.METHODS), metavar="LIST",
                        help=f"comma-separated methods to run, from: {', '.join(methods.METHODS)} "
                             f"(default: all)")
    parser.add_argument("--ratio", type=float, default=0.75,
                        help="fraction of the filters (for slimming: of the BatchNorm channels) removed "
                             "in every prunable layer (default 0.75)")
    parser.add_argument("--epochs", type=float, default=None,
                        help="baseline training epochs (default 30)")
    parser.add_argument("--prune-epochs", type=float, default=None,
                        help="longest regularization phase, in epochs (default 10; GReg ends when its "
                             "penalty has reached its ceiling)")
    parser.add_argument("--finetune-epochs", type=float, default=None,
                        help="fine-tuning epochs after pruning, the same for every method (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size (default 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of initialisation, batch order and augmentation (default 0); "
                             "the same seed gives the same table on the same machine")
    parser.add_argument("--out", default="./regkern-demo", metavar="DIR",
                        help="output folder for the table and the figures (default ./regkern-demo)")
    parser.add_argument("--backend", choices=("auto", "cpp", "triton", "reference"), default="auto",
                        help="kernel backend of regkern's optimizers: auto picks C++ on CPU and Triton "
                             "on CUDA (default auto)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where to train (default cpu; auto: cuda when available)")
    parser.add_argument("--data", choices=("digits", "cifar10", "cifar100"), default="digits",
                        help="dataset (default digits, bundled with scikit-learn)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="local CIFAR folder (holding cifar-10-batches-py/ or cifar-100-python/, or "
                             "those folders themselves); never downloaded")
    parser.add_argument("--model", choices=models.MODELS, default=None,
                        help="network: small (digits default), resnet56 (CIFAR default) or vgg19")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and regkern's kernels (default: 1 for the small digits "
                             "network, whose layers are too small to gain from more, torch's default otherwise)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--task", choices=("image", "lm"), default="image",
                        help="image: the network and data above (default); lm: prune a small Llama language "
                             "model trained on this interpreter's standard-library source (flags below)")
    from regkern.demo import lm

    lm.add_arguments(parser)


def _settings(args) -> methods.Settings:
    """Checks every argument (one clear sentence per problem) before anything runs."""
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in methods.METHODS]
    if unknown or not chosen:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(methods.METHODS)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--methods lists a method twice: {args.methods}")
    args.method_list = chosen
    if not (math.isfinite(args.ratio) and 0.0 < args.ratio < 1.0):
        raise ValueError(f"--ratio must be a fraction in (0, 1), got {args.ratio}")
    given = (args.epochs, args.prune_epochs, args.finetune_epochs)
    values = [default if v is None else v for default, v in zip(DEFAULT_EPOCHS, given)]
    for flag, v in zip(("--epochs", "--prune-epochs", "--finetune-epochs"), values):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{flag} must be a number of epochs >= 0, got {v}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2 (BatchNorm needs two samples), got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--backend triton runs on CUDA tensors: add --device cuda (on CPU only under "
                         "TRITON_INTERPRET=1, set before start, and very slowly)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    if args.model is None:
        args.model = "small" if args.data == "digits" else "resnet56"
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    lm_only = [flag for flag, value in (("--steps", args.steps), ("--prune-steps", args.prune_steps),
                                        ("--finetune-steps", args.finetune_steps), ("--seq-len", args.seq_len),
                                        ("--eval-every", args.eval_every)) if value is not None]
    if lm_only:
        raise ValueError(f"{', '.join(lm_only)} belong to --task lm; the image task counts --epochs, "
                         "--prune-epochs and --finetune-epochs")
    if args.threads is None and args.model == "small":
        args.threads = 1
    if args.data == "digits" and args.model != "small":
        raise ValueError(f"--model {args.model} is a 32x32 CIFAR network; the 8x8 digits use --model small")
    if args.data != "digits" and args.data_dir is None:
        raise ValueError(f"--data {args.data} needs --data-dir DIR, a local copy in the python-pickle format; "
                         "nothing is downloaded")
    return methods.Settings(ratio=args.ratio, epochs=values[0], prune_epochs=values[1], finetune_epochs=values[2],
                            batch_size=args.batch_size, seed=args.seed, device=device,
                            backend=None if args.backend == "auto" else args.backend, quiet=args.quiet)


def train_baseline(dataset: data_mod.Dataset, model_name: str, s: methods.Settings):
    """The shared starting point: the network trained with regkern.SGD
    (momentum, weight decay, cosine learning rate)."""
    torch.manual_seed(s.seed)
    model = models.build(model_name, dataset.input_shape[0], dataset.num_classes).to(s.device)
    opt = regkern.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                      backend=s.backend)
    total = int(round(s.epochs * steps_per_epoch(dataset, s.batch_size)))
    train(model, opt, dataset, epochs=s.epochs, batch_size=s.batch_size,
          generator=torch.Generator().manual_seed(s.seed), device=torch.device(s.device), desc="baseline",
          lr=cosine_lr(s.lr, total), quiet=s.quiet)
    return model, evaluate(model, dataset, torch.device(s.device))


def prepare(args):
    """Check the arguments and load the data (nothing written yet); raises
    ValueError (DataError for the data) with one sentence."""
    s = _settings(args)
    return s, data_mod.load(args.data, args.data_dir)


def run(args, s: methods.Settings, dataset: data_mod.Dataset) -> dict:
    """The whole demo; returns the rows and the paths written. Under
    ``torchrun`` every rank trains (data-parallel); rank 0 prints and writes."""
    from regkern.demo.train import data_parallel_rank, run_quietly

    if data_parallel_rank(s.device)[0] > 0 and not getattr(args, "quiet_rank", False):
        return run_quietly(run, args, s, dataset)
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if s.device == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    os.makedirs(args.out, exist_ok=True)
    print(f"regkern demo: {dataset.name} ({len(dataset.y_train)} train / {len(dataset.y_test)} test images), "
          f"model {args.model}, ratio {s.ratio}, epochs {s.epochs:g} + prune <= {s.prune_epochs:g} + "
          f"fine-tune {s.finetune_epochs:g}, seed {s.seed}, device {s.device}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    t0 = time.perf_counter()
    baseline, acc = train_baseline(dataset, args.model, s)
    ctx = methods.Context(dataset, baseline, s, acc)
    base_row = report.Row("Baseline", "-", ctx.base_params, ctx.base_macs, 1.0, None, acc, 0.0,
                          time.perf_counter() - t0)
    print(f"baseline: {acc:.2f}% test accuracy, {ctx.base_params} parameters, {ctx.base_macs} MACs", flush=True)
    rows, outcomes = [base_row], {}
    for key in args.method_list:
        index = methods.METHODS.index(key) + 1
        outcome = methods.RUNNERS[key](ctx, index)
        outcomes[key] = outcome
        r = outcome.row
        print(f"{r.method}: {r.acc_pruned:.2f}% right after pruning, {r.acc_finetuned:.2f}% after fine-tuning, "
              f"{r.speedup:.2f}x fewer MACs, {100 * r.sparsity:.1f}% sparsity ({r.seconds:.1f} s)", flush=True)
        rows.append(r)
    sparsity = {}
    if "rda" in outcomes:
        sgd = methods.sgd_l1_sparsity(ctx, len(methods.METHODS) + 1)
        sparsity = {"RDA (L1)": outcomes["rda"].sparsity_trace, "SGD + L1 subgradient": sgd}
        print(f"SGD + L1 subgradient (same lam {s.rda_lam:g}, same steps as RDA): {100 * sgd['sparsity'][-1]:.1f}% "
              f"exact zeros, {100 * sgd['near_zero'][-1]:.1f}% below {sgd['near_zero_below']:g}, "
              f"{sgd['accuracy']:.2f}% accuracy", flush=True)
    title = (f"{dataset.name} / {args.model}: pruning ratio {s.ratio}, fine-tuning {s.finetune_epochs:g} epochs, "
             f"seed {s.seed}")
    paths = report.write(rows, args.out, title)
    from regkern.demo import plots  # matplotlib: loaded only when figures are drawn

    paths += plots.write_all(
        args.out,
        norm_traces={methods.LABELS[k]: outcomes[k].norm_trace for k in ("greg1", "greg2")
                     if k in outcomes and outcomes[k].norm_trace is not None},
        norm_layer=ctx.trace_layer,
        bn_scales={methods.LABELS[k] + f" (margin {outcomes[k].bn_scales['margin']:.2f})": outcomes[k].bn_scales
                   for k in ("slimming", "polarization") if k in outcomes},
        sparsity=sparsity)
    print("")
    print(report.format_table(rows, title))
    print("")
    print(f"wrote {', '.join(paths)}")
    print(f"total time {time.perf_counter() - started:.1f} s")
    return {"rows": rows, "paths": paths, "outcomes": outcomes, "sparsity": sparsity, "context": ctx}


def main(args, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m regkern demo``: 2 and one sentence on bad
    arguments or data (checked before anything is trained or written)."""
    if getattr(args, "task", "image") == "lm":
        from regkern.demo import lm

        return lm.main(args, argv)
    try:
        s, dataset = prepare(args)
    except ValueError as exc:  # DataError is a ValueError
        print(f"regkern demo: error: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        run(args, s, dataset)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get theirs back
    return 0
