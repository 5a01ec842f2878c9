"""``python -m regkern demo --task lm``: prune a small Llama language model
trained on the running interpreter's standard-library source, with every
method from one baseline; print and save the table, the figures and the
pruned model (reloaded and checked).

The run: read the text (:mod:`regkern.demo.lm_data`), train a
``LlamaForCausalLM`` (GQA, gated MLP, ~0.85M parameters) with
:class:`regkern.AdamW`, prune ``--ratio`` of the kv head groups and of the MLP
neurons of every block with each method (:mod:`regkern.demo.lm_methods`, whose
docstring lists the departures from the papers' recipes), fine-tune each for
the same number of steps, time forward passes of every model in one loop,
write ``results.csv`` / ``results.md`` and two figures
(:mod:`regkern.demo.lm_report`), save the first method's pruned model with
:func:`regkern.export.save_pruned` into ``OUT/pruned-model`` and reload it with
:func:`regkern.export.load_pruned`: its held-out perplexity must be the one
measured before saving.

Deterministic for a given interpreter (its standard library is the data),
torch build, thread count (default 1) and seed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence, Set

import torch

import regkern
from regkern.demo import lm_data, lm_methods
from regkern.demo.lm_methods import LABELS, METHODS, LMSettings

# flags of the image task whose value decides how --task lm reads them (or refuses them)
_SHARED = ("methods", "ratio", "batch_size", "epochs", "prune_epochs", "finetune_epochs", "data", "data_dir",
           "model", "device")
_UNSET = object()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags only ``--task lm`` reads (the shared ones are the image demo's)."""
    group = parser.add_argument_group(
        "--task lm", "A Llama byte-level language model (GQA, gated MLP, ~0.85M parameters) trained on the\n"
                     "standard library's source of this interpreter, pruned from one baseline by every method:\n"
                     "  greg1        GReg-1: units fixed by magnitude, a growing decoupled L2 penalty (AdamW)\n"
                     "  greg2        GReg-2: a uniformly rising penalty picks the units, then grows on them\n"
                     "  group-lasso  proximal group lasso on the producer rows (AdamW), smallest units cut\n"
                     "  magnitude    one-shot: the units of smallest L1 norm\n"
                     "  wanda        one-shot, activation-aware: |W| times input norms on calibration batches\n"
                     "Shared flags read as: --methods (default: all five), --ratio of the kv head groups and MLP\n"
                     "neurons of every block (default 0.5), --batch-size in windows (default 8), --threads\n"
                     "(default 1: this model gains little from more, a busy machine loses much), --seed, --out,\n"
                     "--backend, --quiet; --epochs, --data and --model are the image task's. Output: the table\n"
                     "(results.csv, results.md), lm_perplexity.png, greg_unit_norms.png and pruned-model/ (the\n"
                     "first method's model, saved by regkern.export.save_pruned and reloaded to check it).")
    d = LMSettings()
    group.add_argument("--steps", type=int, default=None,
                       help=f"baseline training steps of the language model (default {d.steps})")
    group.add_argument("--prune-steps", type=int, default=None,
                       help=f"longest regularization phase in steps (default {d.prune_steps})")
    group.add_argument("--finetune-steps", type=int, default=None,
                       help=f"fine-tuning steps after the cut, the same for every method (default {d.finetune_steps})")
    group.add_argument("--seq-len", type=int, default=None,
                       help=f"bytes per training and held-out window (default {d.seq_len})")
    group.add_argument("--eval-every", type=int, default=None,
                       help=f"held-out perplexity for the figure every this many steps (default {d.eval_every})")


def given_flags(argv: Optional[Sequence[str]]) -> Set[str]:
    """Which of the shared flags the command line set (their image-task
    defaults differ from the LM task's)."""
    from regkern.demo import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    tail = argv[argv.index("demo") + 1:] if "demo" in argv else argv
    parser = argparse.ArgumentParser(add_help=False)
    cli.add_arguments(parser)
    parser.set_defaults(**{dest: _UNSET for dest in _SHARED})
    ns, _ = parser.parse_known_args(tail)
    return {dest for dest in _SHARED if getattr(ns, dest, _UNSET) is not _UNSET}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def settings(args, given: Set[str]) -> LMSettings:
    """Checks every argument (one clear sentence per problem) before anything runs."""
    image_only = [d for d in ("epochs", "prune_epochs", "finetune_epochs", "data", "data_dir", "model") if d in given]
    if image_only:
        raise ValueError(f"{', '.join(map(_flag, image_only))} belong to the image task; --task lm counts --steps, "
                         "--prune-steps and --finetune-steps and always reads the standard library's source")
    if "methods" in given:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'} for --task lm; choose from "
                             f"{', '.join(METHODS)}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"--methods lists a method twice: {args.methods}")
    else:
        chosen = list(METHODS)
    args.method_list = chosen
    d = LMSettings()
    ratio = args.ratio if "ratio" in given else d.ratio
    if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
        raise ValueError(f"--ratio must be a fraction in (0, 1), got {ratio}")
    batch = args.batch_size if "batch_size" in given else d.batch_size
    if batch < 1:
        raise ValueError(f"--batch-size must be at least 1 window, got {batch}")
    values = {}
    for dest, low in (("steps", 0), ("prune_steps", 0), ("finetune_steps", 0), ("seq_len", 16), ("eval_every", 1)):
        v = getattr(args, dest, None)
        v = getattr(d, dest) if v is None else v
        if v < low:
            raise ValueError(f"{_flag(dest)} must be an integer >= {low}, got {v}")
        values[dest] = v
    if values["seq_len"] > 1024:
        raise ValueError(f"--seq-len must be at most 1024 bytes, got {values['seq_len']}")
    if "device" in given and args.device == "cuda":
        raise ValueError("--task lm runs on the CPU (its model is small enough); leave out --device cuda")
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--backend triton runs on CUDA tensors and --task lm runs on the CPU; use auto, cpp or "
                         "reference")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    return LMSettings(ratio=ratio, batch_size=batch, seed=args.seed, quiet=args.quiet,
                      backend=None if args.backend == "auto" else args.backend, **values)


def run(out: str, s: LMSettings, text: lm_data.Text, method_list: Sequence[str]) -> dict:
    """The whole LM demo; returns the rows, the results and the paths written."""
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    print(f"regkern demo --task lm: {text.describe()}", flush=True)
    eval_windows = lm_data.held_out_windows(text, s.eval_windows, s.seq_len)
    t0 = time.perf_counter()
    baseline, base_curve = lm_methods.train_baseline(text, s, eval_windows)
    base_ppl = lm_methods.perplexity(baseline, eval_windows)
    base_params = sum(p.numel() for p in baseline.parameters())
    kv, neurons = lm_methods.count_structure(baseline)
    print(f"baseline: Llama {base_params} parameters ({s.layers} blocks, {s.heads} heads / {kv // s.layers} kv heads, "
          f"{s.intermediate} MLP neurons per block), {s.steps} steps of {s.batch_size} x {s.seq_len} bytes, "
          f"held-out perplexity {base_ppl:.3f} ({time.perf_counter() - t0:.1f} s), {torch.get_num_threads()} "
          f"thread(s), seed {s.seed}", flush=True)
    ctx = lm_methods.Context(text, baseline, s, eval_windows)
    results = {}
    for key in method_list:
        r = lm_methods.RUNNERS[key](ctx, METHODS.index(key) + 1)
        results[key] = r
        print(f"{LABELS[key]}: perplexity {r.ppl_cut:.3f} right after the cut, {r.ppl_final:.3f} after fine-tuning "
              f"({r.seconds:.1f} s){'; ' + r.note if r.note else ''}", flush=True)

    models = {"baseline": baseline, **{k: r.model for k, r in results.items()}}
    speed = lm_methods.tokens_per_second(models, eval_windows[:s.batch_size], s.speed_reps, s.quiet)
    window = {"input_ids": eval_windows[:1]}

    def row(label, model, ppl_cut, ppl_final, tps, seconds, note=""):
        from regkern.demo import lm_report

        kv_left, neurons_left = lm_methods.count_structure(model)
        return lm_report.Row(label, sum(p.numel() for p in model.parameters()),
                             regkern.count_flops(model, window) / s.seq_len, kv_left, neurons_left, ppl_cut,
                             ppl_final, tps, tps / speed["baseline"], seconds, note)

    rows = [row("Baseline", baseline, None, base_ppl, speed["baseline"], 0.0)]
    rows += [row(LABELS[k], r.model, r.ppl_cut, r.ppl_final, speed[k], r.seconds, r.note) for k, r in results.items()]

    # save the first method's pruned model and check the reload
    from regkern import export
    from regkern.demo import lm_report  # matplotlib: loaded only when the run writes its figures

    from transformers.utils import logging as hf_logging

    saved_key = method_list[0]
    saved = results[saved_key]
    path = os.path.join(out, "pruned-model")
    bars = hf_logging.is_progress_bar_enabled()
    if s.quiet:  # transformers' own bars (writing shards, loading weights) follow --quiet too
        hf_logging.disable_progress_bar()
    try:
        export.save_pruned(saved.model, path)
        reloaded = export.load_pruned(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    ppl_reloaded = lm_methods.perplexity(reloaded, eval_windows)
    same = ppl_reloaded == saved.ppl_final
    print(f"saved {LABELS[saved_key]}'s pruned model to {path}; reloaded with regkern.export.load_pruned: held-out "
          f"perplexity {ppl_reloaded:.6f} ({'equal to' if same else 'DIFFERENT from'} {saved.ppl_final:.6f} before "
          f"saving)", flush=True)

    title = (f"stdlib source bytes / Llama (GQA, SwiGLU): ratio {s.ratio} of kv heads and MLP neurons per block, "
             f"baseline {s.steps} steps, regularization <= {s.prune_steps}, fine-tuning {s.finetune_steps}, "
             f"seed {s.seed}")
    paths = lm_report.write(rows, out, title)
    paths.append(lm_report.perplexity_curves(
        base_curve, {LABELS[k]: {"curve": r.curve, "cut": r.cut_step} for k, r in results.items()},
        os.path.join(out, "lm_perplexity.png")))
    traces = {LABELS[k]: results[k].norm_trace for k in ("greg1", "greg2") if k in results}
    if traces:
        paths.append(lm_report.unit_norms(traces, os.path.join(out, "greg_unit_norms.png")))
    print("")
    print(lm_report.format_table(rows, title))
    print("")
    print(f"wrote {', '.join(paths)} and {path}/")
    print(f"total time {time.perf_counter() - started:.1f} s")
    return {"rows": rows, "results": results, "paths": paths, "baseline_ppl": base_ppl, "reloaded_ppl": ppl_reloaded,
            "saved": saved_key, "saved_path": path, "speed": speed}


def main(args, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m regkern demo --task lm``: 2 and one sentence
    on bad arguments (checked before anything is trained or written)."""
    try:
        s = settings(args, given_flags(argv))
        text = lm_data.load()
    except ValueError as exc:  # TextError is a ValueError
        print(f"regkern demo: error: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if args.threads is None else args.threads)
    try:
        run(args.out, s, text, args.method_list)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get theirs back
    return 0
