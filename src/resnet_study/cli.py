"""`resnet-study` command line: experiments, train, study, report, search, bench, inspect,
evaluate.

Every config field is a `--flag` of `train`, `study`, `search` and `bench` (`flags`), so a
preset value can always be overridden; `--experiments FILE` adds the user's own experiments
to the command's catalogue (`catalogue`), which every command is handed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .catalogue import PRESETS, Catalogue
from .config import (
    EXECUTION_FIELDS,
    RECIPE_SECTIONS,
    SECTION_OF,
    Experiment,
)
from .errors import Interrupted, UsageError
from .flags import EXIT_USAGE, build_parser, config_overrides

EXIT_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, resumable


def experiment_from_args(args: argparse.Namespace, catalogue: Catalogue) -> Experiment:
    return catalogue.get(args.experiment).replace(**config_overrides(args))


def cmd_experiments(args: argparse.Namespace, catalogue: Catalogue) -> int:
    import torch

    from .models import count_params, network, training_flops

    rows = []
    for name, exp in catalogue.experiments.items():
        with torch.device("meta"):  # count parameters without allocating 50M floats
            params = count_params(network(exp.model, num_classes=100))
        t = exp.train
        rows.append({"name": name, "group": exp.group, "extends": exp.extends or None,
                     "row": exp.row, "params": params,
                     "gflop": round(training_flops(exp.model, 100) / 1e9, 3),
                     "model": _describe_model(exp), "optimizer": t.optimizer, "lr": t.lr,
                     "schedule": _describe_schedule(t),
                     "grad_clip": f"{t.grad_clip} ({t.clip_mode})" if t.grad_clip else "none",
                     "epochs": t.epochs, "batch_size": t.batch_size, "notes": exp.notes})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    # gflop: of one training step per 32x32 image (models.training_flops)
    cols = ["name", "model", "params", "gflop", "optimizer", "lr", "schedule", "grad_clip",
            "epochs"]
    table = [[f"{r[c]:,}" if c == "params" else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    for line in [cols, ["-" * w for w in widths], *table]:
        print("  ".join(v.rjust(w) if c in ("params", "gflop") else v.ljust(w)
                        for v, w, c in zip(line, widths, cols, strict=True)).rstrip())
    return 0


def _describe_schedule(t) -> str:
    if t.schedule == "onecycle":
        return "one-cycle" + (f", {t.onecycle_warmup:g} warm-up" if t.onecycle_warmup != 0.3
                              else "")
    text = f"x{t.gamma:g} at {','.join(map(str, t.milestones))}" if t.milestones else "constant"
    warmup = f", {t.warmup_factor:g}x for {t.warmup_steps} steps" if t.warmup_steps else ""
    return text + warmup


def _describe_model(exp: Experiment) -> str:
    m = exp.model
    if m.user_network:
        return " ".join([m.family, *(f"{k}={v}" for k, v in m.options.as_dict().items())])
    if m.family == "cifar-resnet" and m.block == "pre":
        parts = [f"WRN-{6 * m.blocks + 4}-{m.width}"]
    elif m.family == "cifar-resnet":
        parts = [f"ResNet-{6 * m.blocks + 2}"] + ([f"k={m.width}"] if m.width != 1 else [])
    else:
        parts = ["ResNet-18"] + ([f"k={m.width}"] if m.width != 1 else []) + (
            [f"C={m.channels}"] if m.channels != 64 else [])
    parts += [f"{m.shortcut}-shortcut"] if m.shortcut != "projection" else []
    parts += ["3x3-shortcut"] if m.shortcut_kernel == 3 else []
    parts += ["pre-act"] if m.block == "pre" and m.family == "resnet18" else []
    parts += ["no-BN"] if not m.batch_norm else []
    if m.block_dropout or m.fc_dropout:
        parts.append(f"dropout {m.block_dropout}/{m.fc_dropout}")
    parts += [f"{m.stem}-stem"] if m.stem != "imagenet" and m.family == "resnet18" else []
    parts += [f"pretrained:{m.pretrained}"] if m.pretrained else []
    return " ".join(parts)


def cmd_train(args: argparse.Namespace, catalogue: Catalogue) -> int:
    exp = experiment_from_args(args, catalogue)
    from .training.trackers import Tracking, check
    from .training.train import EXIT_DIVERGED, train

    out = args.out or Path("runs") / exp.name / f"seed-{exp.train.seed}"
    if os.environ.get("RANK", "0") == "0":  # torchrun ends the other ranks if rank 0 exits
        check(exp.execution.log, Tracking.of_run(out, exp))
    summary = train(exp, out, resume=args.resume, quiet=args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, from rank 0
        print(json.dumps({k: summary[k] for k in ("experiment", "status", "test_top1",
                                                  "test_top5", "train_seconds")}))
    return 0 if summary["status"] == "completed" else EXIT_DIVERGED


def _runs_per_device(text: str) -> int | None:
    """--runs-per-device: a whole number >= 1, or None for auto."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--runs-per-device takes auto or a whole number >= 1, not {text!r}")
    return int(text)


def cmd_study(args: argparse.Namespace, catalogue: Catalogue) -> int:
    from .study import parse_shard, plan, run_study

    if args.all and args.experiments:
        raise UsageError("name experiments or pass --all (not both)")
    if not (args.all or args.experiments or args.group):
        raise UsageError("name experiments, or pass --all or --group NAME")
    overrides = config_overrides(args)
    if "seed" in overrides:
        raise UsageError("a study runs seeds 0..N-1: use --seeds N, not --seed")
    known = catalogue.groups()
    unknown = [g for g in args.group if g not in known]
    if unknown:
        raise UsageError(f"unknown group {unknown[0]!r}; choose one of: {', '.join(known)}")
    names = [*(known["paper"] if args.all else args.experiments),
             *(name for group in args.group for name in known[group])]
    experiments = [catalogue.get(name) for name in dict.fromkeys(names)]
    runs = plan(experiments, args.seeds, args.out, overrides, args.quick, parse_shard(args.shard))
    per_device = _runs_per_device(args.runs_per_device)
    devices = None
    if args.devices:
        devices = [d if d == "cpu" or d.startswith("cuda") else f"cuda:{d}"
                   for d in args.devices.split(",")]
    outcomes = run_study(runs, devices, per_device)
    bad = outcomes["failed"] + outcomes["diverged"]
    print(json.dumps({"study": str(args.out), "runs": len(runs),
                      **{k: len(v) for k, v in outcomes.items()},
                      "not_completed": bad}))
    return 0 if not bad else 1


def cmd_report(args: argparse.Namespace, catalogue: Catalogue) -> int:
    """Exit 0 with a full report, 2 when damaged runs had to be left out (bad input: repair or
    recopy them), 1 when no run has completed; the page is written in every case."""
    from collections import Counter

    from .report.writer import report

    r = report(args.study_dir, inspect=args.inspect, base=args.base)
    print(f"report written to {r.index.parent} (open {r.index})")
    unreadable = [u for u in r.without_result if u["status"] == "unreadable"]
    if unreadable:
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise UsageError(f"{len(unreadable)} run(s) unreadable, left out of the report and "
                         f"listed on its page: {unreadable[0]['run']}: "
                         f"{unreadable[0]['reason']}{more}")
    if not r.completed:
        reasons = Counter(f"{u['status']}: {u['reason']}" for u in r.without_result)
        print(f"resnet-study: no run of {args.study_dir} has completed: " + "; ".join(
            f"{n} {reason}" for reason, n in reasons.most_common()), file=sys.stderr)
        return 1
    return 0


def cmd_search(args: argparse.Namespace, catalogue: Catalogue) -> int:
    from .search.run import run_search
    from .search.space import FIDELITY, load_space
    from .search.trials import Search

    overrides = config_overrides(args)
    if overrides.get("test_split"):
        raise UsageError("a search never evaluates on the test split: choose on --val-split, "
                         "then confirm best.toml with `study`")
    if args.trials < 1 or (args.timeout is not None and args.timeout <= 0):
        raise UsageError("--trials must be >= 1 and --timeout > 0")
    if args.max_gflop_per_image is not None and args.max_gflop_per_image <= 0:
        raise UsageError("--max-gflop-per-image must be > 0")
    base = catalogue.get(args.experiment).replace(
        **{"val_split": 5000, **overrides, "test_split": False})
    min_epochs = min(3, base.train.epochs) if args.min_epochs is None else args.min_epochs
    if not 1 <= min_epochs <= base.train.epochs:
        raise UsageError(f"--min-epochs must be from 1 to the trials' {base.train.epochs} "
                         f"epochs, not {min_epochs}")
    fixed = {k: v for k, v in overrides.items()
             if SECTION_OF[k] in RECIPE_SECTIONS and k not in FIDELITY | EXECUTION_FIELDS}
    space = load_space(args.space, base).without(fixed)
    if space.left_out:
        print(f"search: {base.name} is a network of your own ({base.model.family}); the model "
              f"knobs {', '.join(space.left_out)} are left out of this search", file=sys.stderr)
    search = Search(out=args.out, base=base, space=space, fixed=fixed, trials=args.trials,
                    timeout=args.timeout, max_gflop=args.max_gflop_per_image,
                    pruner=args.pruner, min_epochs=min_epochs, sampler=args.sampler,
                    storage=args.storage, name=args.study_name or args.out.resolve().name)
    print(json.dumps(run_search(search, args.workers, args.quiet)))
    return 0


def cmd_bench(args: argparse.Namespace, catalogue: Catalogue) -> int:
    if args.batches < 1 or args.windows < 1 or args.warmup < 0:
        raise UsageError("--batches and --windows must be >= 1 and --warmup >= 0")
    exp = catalogue.get(args.experiment).replace(
        **{"data": "synthetic", **config_overrides(args)})
    from .bench import bench

    r = bench(exp, batches=args.batches, windows=args.windows, warmup=args.warmup,
              reference=args.reference)
    lines = [f"{r['experiment']} on {r['device']} ({r['precision']}, batch {r['batch_size']}, "
             f"median of {r['windows']} windows of {r['batches_per_window']} batches)",
             f"  compute (bare step, ready batch):   {r['compute']:8,.0f} img/s",
             f"  project (training loop):            {r['project']:8,.0f} img/s"]
    if args.reference:
        lines += [f"  reference (torchvision DataLoader): {r['reference']:8,.0f} img/s",
                  f"  project / reference:                {r['project_over_reference']:8.3f}"]
    peak = (f"{r['project_fraction_of_peak']:.1%} of the device's {r['peak_tflops']:,.0f}"
            if r["peak_tflops"] else "device peak not known")
    lines += [f"  project / compute:                  {r['project_over_compute']:8.3f}",
              f"  model TFLOP/s (compute, project):   {r['compute_tflops']:8.3f} "
              f"{r['project_tflops']:8.3f}  ({r['gflop_per_image']:.3f} GFLOP per image; "
              f"{peak})",
              f"  peak memory:                        {r['peak_memory_mib'] or 0:8,.0f} MiB"]
    _report(r, args.json, "\n".join(lines))
    return 0


def _report(result: dict, as_json: bool, text: str) -> None:
    print(json.dumps(result) if as_json else text)


def cmd_evaluate(args: argparse.Namespace, catalogue: Catalogue) -> int:
    from .training.checkpoint import load_run
    from .training.epoch import evaluate

    run = load_run(args.run_dir, args.data, args.device, progress=not args.json)
    tta = run.experiment.train.tta  # a run trained with --tta is tested with flips too
    test = evaluate(run.model, run.splits.test, run.amp, tta=tta)
    r = {"run": str(args.run_dir), "epoch": run.epoch, "data": run.splits.images.name,
         "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
         **({"test_top1_tta": test["top1_tta"]} if tta else {})}
    _report(r, args.json, f"{args.run_dir} (epoch {r['epoch']}, {r['data']}): test loss "
                          f"{r['test_loss']:.4f}  top-1 {r['test_top1']:.4f}  "
                          f"top-5 {r['test_top5']:.4f}"
                          + (f"  with flips {r['test_top1_tta']:.4f}" if tta else ""))
    return 0


def cmd_inspect(args: argparse.Namespace, catalogue: Catalogue) -> int:
    from .inspection.probes import inspect_run

    s = inspect_run(args.run_dir, args.images, args.data, args.device, progress=not args.json)
    _report(s, args.json, f"{args.run_dir}/inspect: {s['images']} test images of {s['data']}, "
                          f"Grad-CAM on {s['cam_layer']}, {s['seconds']:.1f} s")
    return 0


COMMANDS = {"experiments": cmd_experiments, "train": cmd_train, "study": cmd_study,
            "report": cmd_report, "search": cmd_search, "bench": cmd_bench,
            "evaluate": cmd_evaluate,
            "inspect": cmd_inspect}


RESUME_HINT = {"train": "to resume, run the same command with --resume",
               "study": "to resume, run the same command again",
               "search": "to go on, run the same command again"}


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun every rank says it at once, and an
    unbuffered stderr would interleave the line and its newline with another rank's."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        catalogue = PRESETS.with_files(getattr(args, "experiment_files", []))
        return COMMANDS[args.command](args, catalogue)
    except UsageError as e:
        _say(f"resnet-study: error: {e}")
        return EXIT_USAGE
    except OSError as e:  # disk full, read-only folder: atomic writes kept the old files
        _say(f"resnet-study: error: {e}")
        return 1
    except Interrupted as e:
        _say(f"resnet-study: {e}; {RESUME_HINT[args.command]}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say("resnet-study: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
