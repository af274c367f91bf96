"""Helpers of gpu_check.sh: the CUDA-path checks, the study projection, and the closing table.

    python benchmarks/gpu_check.py cuda-path DEVICE WORKDIR   # exit 1 if a check fails
    python benchmarks/gpu_check.py projection STUDY OUT       # the 12 x 3 study from its epochs
    python benchmarks/gpu_check.py table OUT                  # summarise what the script wrote
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import re
import sys
from pathlib import Path

import torch

from resnet_study.catalogue import PRESETS
from resnet_study.config import PAPER
from resnet_study.models import ResNet18, count_params
from resnet_study.training import step as steplib
from resnet_study.training import train as trainlib
from resnet_study.training.assembly import assemble
from resnet_study.training.callbacks import OnEpoch

EXPERIMENTS, GROUPS = PRESETS.experiments, PRESETS.groups()

TRAIN_IMAGES = 50_000  # CIFAR's training set, and the stand-in's


def check_param_counts() -> str:
    wrong = []
    for name in GROUPS["paper"]:
        with torch.device("meta"):
            n = count_params(ResNet18(EXPERIMENTS[name].model, num_classes=100))
        if n != PAPER["experiments"][name]["params"]:
            wrong.append(f"{name} {n:,}")
    assert not wrong, f"parameter counts differ from the paper: {wrong}"
    return f"{len(GROUPS['paper'])} experiments equal the paper"


def check_bf16_against_fp32(device: torch.device, steps: int = 5, batch: int = 64) -> str:
    """A few steps from one initialisation on one batch: bf16 autocast tracks float32."""
    exp = EXPERIMENTS["resnet18-lr0.01"]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    initial = ResNet18(exp.model).state_dict()
    losses = {}
    for precision in ("fp32", "bf16"):
        model = ResNet18(exp.model)
        model.load_state_dict(initial)
        parts = assemble(exp.replace(precision=precision, device=str(device)), model=model,
                         steps_per_epoch=100)
        losses[precision] = [parts.step(x, y, 1.0).item() for _ in range(steps)]
    diff = max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True))
    assert diff < 0.1, f"bf16 losses {losses['bf16']} vs fp32 {losses['fp32']}"
    return f"{steps} steps, max |loss bf16 - loss fp32| = {diff:.4f}"


def random_batches(device: torch.device, steps: int, batch: int,
                   dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Noise images with CIFAR-100 labels: the steps' results are compared, not learned."""
    return [(torch.randn(batch, 3, 32, 32, device=device, dtype=dtype)
             .to(memory_format=torch.channels_last),
             torch.randint(0, 100, (batch,), device=device)) for _ in range(steps)]


def assembled(exp, model: torch.nn.Module, device: torch.device, steps: int):
    """`exp`'s training parts around `model`: one epoch of `steps` steps, in fp32."""
    parts = assemble(exp.replace(epochs=1, precision="fp32", device=str(device)), model=model,
                     steps_per_epoch=steps)
    parts.log = print
    return parts


# The graph-ready step against the eager one (torch.optim's fused kernels on CUDA), for what
# the step has gained since it was first checked on a GPU: the improved presets' 16x16 stems,
# channels, pre-activation, norm clipping, smoothing, fast biases and moving average, Nesterov
# with a short warm-up, the 3x3 stride-2 stem, and mixup's and CutMix's soft targets. Dropout
# is off in each: its masks come from the RNG, which a captured graph draws at other offsets
# than eager steps do, so no two runs would match.
NO_DROPOUT = {"block_dropout": 0.0, "fc_dropout": 0.0}
GRAPH_CHECKS = {  # check: (row, its changes, soft targets)
    "SGD": ("resnet18-lr0.01", {}, False),
    "Adam + clip": ("resnet18-adam-clip", {}, False),
    "improved-resnet18 (16x16 stem, 32 channels, norm clip, smoothing, fast biases)": (
        "improved-resnet18", NO_DROPOUT, False),
    "improved-resnet18-wide (pre-activation, width 2, moving average)": (
        "improved-resnet18-wide", NO_DROPOUT, False),
    "Nesterov SGD, short warm-up, 3x3 stride-2 stem, on mixup's and CutMix's soft targets": (
        "resnet18-lr0.01", {"nesterov": True, "onecycle_warmup": 0.1, "stem": "cifar-s2"}, True),
}


def check_graph_step(device: torch.device, name: str, changes: dict, soft: bool, *,
                     steps: int = 12, batch: int = 64, channels: int | None = None) -> str:
    """The step replayed as a CUDA graph against PyTorch's eager step, from one initialisation
    on the same batches (on a CPU the graph-ready step runs uncaptured), the moving average
    (where the row has one) updated after each, as the epoch loop does. In float64, so that
    rounding, which training on noise amplifies from step to step, stays far below the
    yardstick: how far an eager run moves when one initial weight moves by one float32 ulp."""
    exp = EXPERIMENTS[name].replace(**changes, **({"channels": channels} if channels else {}))
    torch.manual_seed(0)
    batches = random_batches(device, steps, batch, torch.float64)
    if soft:  # each row two labels' shares, as mixup and CutMix make them
        mixed = []
        for x, y in batches:
            hot = torch.nn.functional.one_hot(y, 100).double()
            share = torch.rand(batch, 1, device=device, dtype=torch.float64)
            mixed.append((x, share * hot + (1 - share) * hot.roll(1, 0)))
        batches = mixed
    initial = ResNet18(exp.model).state_dict()
    weights, graph_step = {}, None
    for run in ("eager", "nudged", "graph"):
        model = ResNet18(exp.model).to(device, torch.float64, memory_format=torch.channels_last)
        model.load_state_dict(initial)
        if run == "nudged":
            with torch.no_grad():
                model.fc.weight[0, 0] *= 1 + 2**-23
        parts = assembled(exp, model, device, steps)
        step = (steplib.GraphStep(parts, capture=device.type == "cuda") if run == "graph"
                else parts.step)
        for x, y in batches:
            step(x, y)
            if parts.ema is not None:
                parts.ema.update_parameters(model)
        kept = [*model.parameters(), *(parts.ema.parameters() if parts.ema is not None else [])]
        weights[run] = torch.cat([p.detach().flatten() for p in kept])
        graph_step = step
    captured = graph_step.graph is not None
    assert captured or device.type != "cuda", "the step was not captured"
    assert graph_step.index.item() == steps == graph_step.scheduler.last_epoch, \
        f"the graph's step counter reads {graph_step.index.item()} after {steps} steps"

    def moved(run: str) -> float:
        return ((weights[run] - weights["eager"]).norm() / weights["eager"].norm()).item()

    assert moved("graph") <= moved("nudged") / 100, \
        f"graph vs eager {moved('graph'):.1e}, one-ulp nudge {moved('nudged'):.1e}"
    return (f"{steps} steps {'captured' if captured else 'uncaptured'} vs eager: weights differ "
            f"by {moved('graph'):.1e} (relative), a one-ulp nudge of one initial weight moves "
            f"them {moved('nudged'):.1e}")


def check_graph_dropout(device: torch.device, steps: int = 12, batch: int = 64,
                        channels: int | None = None) -> str:
    """Dropout inside the captured step, which the checks above leave out: each replay must draw
    new masks (a graph that kept the masks drawn at its capture would train every later step on
    one sub-network). A forward hook copies the mask before the classifier out of each step;
    the graph records that copy and replays it too."""
    exp = EXPERIMENTS["improved-resnet18"].replace(**({"channels": channels} if channels else {}))
    torch.manual_seed(0)
    model = ResNet18(exp.model).to(device, memory_format=torch.channels_last)
    step = steplib.GraphStep(assembled(exp, model, device, steps), capture=device.type == "cuda")
    dropped = torch.empty(batch, model.fc.in_features, dtype=torch.bool, device=device)

    def copy_mask(module, inputs, output) -> None:  # None: the output stays as it is
        dropped.copy_((output == 0) & (inputs[0] != 0))  # zeroed by dropout, not before

    model.dropout.register_forward_hook(copy_mask)
    masks = []
    for x, y in random_batches(device, steps, batch):
        step(x, y)
        masks.append(dropped.clone())
    captured = step.graph is not None
    assert captured or device.type != "cuda", "the step was not captured"
    same = sum(torch.equal(a, b) for a, b in itertools.pairwise(masks))
    share = torch.stack(masks).float().mean().item()
    p = exp.model.fc_dropout
    assert same == 0, f"{same} of {steps - 1} steps kept the mask of the step before"
    assert p / 3 < share < 3 * p, f"{share:.3f} of the features dropped, at p = {p:.3f}"
    return (f"{steps} steps {'captured' if captured else 'uncaptured'}: a new mask each step, "
            f"{share:.3f} of the features dropped at p = {p:.3f}")


class Interrupt(Exception):
    pass


def check_resume(device: torch.device, workdir: Path) -> str:
    """Stop a run after its first epoch, resume it, and compare with an uninterrupted run."""
    exp = EXPERIMENTS["resnet18-lr0.01"].replace(
        data="synthetic", subset=128, test_subset=64, epochs=2, batch_size=32,
        device=str(device), deterministic=True)
    full = trainlib.train(exp, workdir / "uninterrupted", quiet=True)

    def first_epoch_only(exp, row):  # a crash right after epoch 1's checkpoint
        raise Interrupt

    with contextlib.suppress(Interrupt):
        trainlib.train(exp, workdir / "resumed", quiet=True,
                       callbacks=[OnEpoch(first_epoch_only)])
    resumed = trainlib.train(exp, workdir / "resumed", resume=True, quiet=True)

    def metrics(run: str) -> list[dict]:
        with open(workdir / run / "metrics.csv") as f:
            return [{k: v for k, v in row.items() if "seconds" not in k and "per_second" not in k}
                    for row in csv.DictReader(f)]

    assert metrics("uninterrupted") == metrics("resumed"), "resumed run differs"
    assert full["test_top1"] == resumed["test_top1"]
    return f"2-epoch run stopped after epoch 1 and resumed: metrics identical on {device.type}"


def cuda_path(device_name: str, workdir: Path) -> int:
    device = torch.device(device_name)
    # GPU_CHECK_TINY (on a CPU, as a test runs it): the graph-ready step in float64 is slow
    # there, and a few small batches of a narrow network already hold it against the eager
    # step (`tests/test_step.py` does so at 16 channels too).
    tiny = os.environ.get("GPU_CHECK_TINY") == "1"
    graph = {"steps": 4, "batch": 8, "channels": 16} if tiny else {}
    bf16 = {"batch": 16} if tiny else {}
    results = {}
    for name, check in [("parameter counts", check_param_counts),
                        ("bf16 vs fp32", lambda: check_bf16_against_fp32(device, **bf16)),
                        ("checkpoint resume", lambda: check_resume(device, workdir)),
                        *((f"CUDA graph step, {what}", lambda row=row: check_graph_step(
                            device, *row, **graph)) for what, row in GRAPH_CHECKS.items()),
                        ("CUDA graph step, dropout's masks", lambda: check_graph_dropout(
                            device, **graph))]:
        try:
            results[name] = {"ok": True, "detail": check()}
        except Exception as e:  # report every check, then fail
            results[name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'}: {results[name]['detail']}")
    (workdir / "cuda_path.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results.values()) else 1


def projection(study: Path, out: Path, epochs: int = 25, seeds: int = 3) -> None:
    """The whole study (every experiment x `seeds` at `epochs`) projected from one measured epoch
    per row, at the study's runs per device; a row with no epoch (not run, or failed) is priced
    at the mean of the measured rows and marked so. Written to OUT/projection.json."""
    measured = {}
    for metrics in sorted(study.glob("*/seed-0/metrics.csv")):
        with open(metrics) as f:
            first = next(csv.DictReader(f), None)
        if first:
            measured[metrics.parent.parent.name] = float(first["epoch_seconds"])
    log = (out / "study.log").read_text() if (out / "study.log").exists() else ""
    at_once = re.search(r"study: (\d+) runs at once per device", log)
    at_once = int(at_once.group(1)) if at_once else 1
    if not measured:
        print("projection: no row finished an epoch")
        return
    mean = sum(measured.values()) / len(measured)
    rows = {name: measured.get(name, mean) for name in GROUPS["paper"]}
    total = sum(rows.values()) * epochs * seeds / at_once
    result = {"epoch_seconds": measured, "estimated_rows": sorted(set(rows) - set(measured)),
              "runs_at_once": at_once, "epochs": epochs, "seeds": seeds,
              "projected_seconds": total}
    (out / "projection.json").write_text(json.dumps(result, indent=1))
    print(f"projection: {len(rows)} x {seeds} runs x {epochs} epochs, {at_once} at once: "
          f"{total / 60:.1f} min ({len(measured)} rows measured)")


def seconds(path: Path) -> float | None:
    """The seconds between the start and end times gpu_check.sh wrote to `path`."""
    if not path.exists():
        return None
    start, end = map(float, path.read_text().split())
    return end - start


def table(out: Path) -> None:
    rows = []
    path = out / "cuda_path.json"
    for name, r in (json.loads(path.read_text()) if path.exists() else {}).items():
        rows.append((name, ("ok: " if r["ok"] else "FAILED: ") + r["detail"]))
    bench = {mode: json.loads((out / f"bench-{mode}.json").read_text())
             for mode in ("eager", "graphs") if (out / f"bench-{mode}.json").exists()}
    for mode, b in bench.items():
        graph = "captured" if b["cuda_graph"] else "not captured"
        reference = (f", reference {b['reference']:,.0f}; project/reference "
                     f"{b['project_over_reference']:.2f}" if "reference" in b else "")
        rows.append((f"bench {mode} (img/s)",
                     f"compute {b['compute']:,.0f}, project {b['project']:,.0f}{reference};"
                     f" project/compute {b['project_over_compute']:.2f}; peak "
                     f"{b['peak_memory_mib']:,.0f} MiB ({b['precision']}, {graph})"))
        fraction = (f", {b['project_fraction_of_peak']:.1%} of {b['peak_tflops']:,.0f}"
                    if b["peak_tflops"] else ", device peak not known")
        rows.append((f"bench {mode} (model TFLOP/s)",
                     f"compute {b['compute_tflops']:.2f}, project {b['project_tflops']:.2f}"
                     f"{fraction}"))
    if len(bench) == 2:
        gain = {r: bench["graphs"][r] / bench["eager"][r] for r in ("compute", "project")}
        rows.append(("graphs / eager", f"compute {gain['compute']:.2f}x, project "
                     f"{gain['project']:.2f}x"))
    for name in GROUPS["literature"][::2]:  # the networks, by their published recipes
        path = out / f"bench-{name}.json"
        if path.exists():
            b = json.loads(path.read_text())
            hours = {epochs: epochs * TRAIN_IMAGES / b["project"] / 3600
                     for epochs in (25, EXPERIMENTS[name].train.epochs)}
            rows.append((f"bench {name}",
                         f"{b['project']:,.0f} img/s at batch {b['batch_size']} "
                         f"({b['gflop_per_image']:.2f} GFLOP/image, {b['project_tflops']:.2f} "
                         f"TFLOP/s): 25 epochs {hours[25]:.2f} h, published recipe "
                         f"({EXPERIMENTS[name].train.epochs} epochs) "
                         f"{hours[EXPERIMENTS[name].train.epochs]:.2f} h of training "
                         "(projected)"))
    decode = seconds(out / "decode-times.txt")
    if decode is not None:
        rows.append(("decode the data (once)", f"{decode:.1f} s, into the data cache"))
    base = out / "base-summary.json"
    s = json.loads(base.read_text()) if base.exists() else None
    if s is not None and s["status"] != "completed":
        rows.append(("base run", f"{s['status']} after {s['epochs']} epochs: "
                                 f"{s.get('error', 'see base.log')}"))
    elif s is not None:
        with open(out / "base-metrics.csv") as f:
            evaluation = sum(float(row["eval_seconds"]) for row in csv.DictReader(f))
        graph = (f"graph captured in {s['capture_seconds']:.2f} s" if s.get("cuda_graph")
                 else "graph not captured")
        rows.append((f"base run, {s['epochs']} epochs",
                     f"{s['status']}, top-1 {s['test_top1']:.4f} on {s['dataset']}; wall "
                     f"{seconds(out / 'base-times.txt'):.1f} s (the command, data cached), of "
                     f"which {s['train_seconds']:.1f} s training+evaluation ({evaluation:.2f} s "
                     f"evaluation; {graph}); {s['images_per_second']:,.0f} img/s, peak "
                     f"{s['peak_memory_mib']:,.0f} MiB"))
    study = out / "study.log"
    if study.exists():
        last = [line for line in study.read_text().splitlines() if line.startswith("study:")]
        rows.append(("one epoch per row", last[-1] if last else "did not start"))
    path = out / "projection.json"
    if path.exists():
        p = json.loads(path.read_text())
        rows.append((f"PROJECTED {len(GROUPS['paper'])} x {p['seeds']} study",
                     f"{p['projected_seconds'] / 60:.1f} min at {p['epochs']} epochs, "
                     f"{p['runs_at_once']} runs at once, from {len(p['epoch_seconds'])} measured "
                     f"rows' first epoch (a projection, not a measurement)"))
    width = max(len(name) for name, _ in rows) if rows else 0
    print("\nGPU check summary")
    for name, result in rows:
        print(f"  {name:<{width}}  {result}")


if __name__ == "__main__":
    command, arg = sys.argv[1], Path(sys.argv[-1])
    if command == "cuda-path":
        sys.exit(cuda_path(sys.argv[2], arg))
    if command == "projection":
        projection(Path(sys.argv[2]), arg)
    else:
        table(arg)
