"""The graph-ready step (what a CUDA graph replays) against PyTorch's eager step, on the CPU."""

import pytest
import torch

from resnet_study import EXPERIMENTS, UsageError
from resnet_study.config import ExecutionConfig, Experiment, ModelConfig, TrainConfig
from resnet_study.models import ResNet18
from resnet_study.training import step as steplib
from resnet_study.training.assembly import assemble
from resnet_study.training.step import schedule_table

STEPS_PER_EPOCH = 3
# The literature's kind of schedule in small: 2 warm-up steps, then the LR x0.2 after epoch 1.
MULTISTEP = TrainConfig(epochs=2, lr=0.01, nesterov=True, weight_decay=5e-4,
                        schedule="multistep", milestones=(1,), gamma=0.2, warmup_steps=2)


def setup(cfg: TrainConfig, state: dict | None = None, **execution):
    """A run of `cfg` on a float64 ResNet-18 (from `state`, else from seed 0), batches brought
    by the test. At 16 channels, not 64: the step does not depend on the width, and the suite
    ran these float64 steps for a minute at the paper's."""
    torch.manual_seed(0)
    model = ResNet18(ModelConfig(channels=16), num_classes=10).double()
    if state is not None:
        model.load_state_dict(state)
    exp = Experiment("test", "", train=cfg, execution=ExecutionConfig(
        device="cpu", precision="fp32", channels_last=False, **execution))
    return assemble(exp, model=model, steps_per_epoch=STEPS_PER_EPOCH)


def trained(parts) -> tuple:
    return parts.model, parts.optimizer, parts.scheduler, parts.ema


def averaged(parts) -> None:
    """The moving average's update after each step, as the epoch loop makes it (`--ema-horizon`)."""
    if parts.ema is not None:
        parts.ema.update_parameters(parts.model)


def batches(n: int, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def eager_run(cfg: TrainConfig, data) -> tuple:
    parts = setup(cfg)
    seen = []
    for x, y in data:
        group = parts.optimizer.param_groups[0]
        seen.append((group["lr"], group["momentum"] if "momentum" in group else group["betas"][0]))
        steplib.train_step(parts, parts.model, x, y)
        averaged(parts)
    return (*trained(parts), seen)


def graph_ready_run(cfg: TrainConfig, data, parts=None):
    parts = parts or setup(cfg)
    step = steplib.GraphStep(parts, capture=False)
    for x, y in data:
        step(x, y)
        averaged(parts)
    return trained(parts)


def assert_same_training(a, b, rtol=1e-9, atol=1e-12):
    (model_a, opt_a, sched_a, ema_a), (model_b, opt_b, sched_b, ema_b) = a[:4], b[:4]
    assert (ema_a is None) == (ema_b is None)
    if ema_a is not None:  # its weights and buffers (batch norm's statistics), and its count
        for (name, x), y in zip(ema_a.state_dict().items(), ema_b.state_dict().values(),
                                strict=True):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f"ema {name}")
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, value in opt_a.state[p].items():  # momentum, or Adam's moments and step
            torch.testing.assert_close(value, opt_b.state[q][key], rtol=rtol, atol=atol)
    assert sched_a.state_dict() == sched_b.state_dict()
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


# In float64, so that rounding (the two steps order some operations differently) stays far
# under the tolerance, and a wrong LR or momentum on any step far over it.
@pytest.mark.parametrize("cfg", [
    TrainConfig(epochs=2, lr=0.01),
    TrainConfig(epochs=2, lr=0.01, nesterov=True, grad_clip=0.5, clip_mode="norm",
                label_smoothing=0.1),
    TrainConfig(epochs=2, lr=0.01, weight_decay=0.0, grad_clip=0.01, clip_mode="value"),
    MULTISTEP,
    TrainConfig(epochs=2, lr=0.01, optimizer="adam", grad_clip=0.1, clip_mode="value"),
    TrainConfig(epochs=2, lr=0.01, optimizer="adamw", weight_decay=0.05, grad_clip=1.0,
                clip_mode="norm"),
    TrainConfig(epochs=2, lr=0.01, nesterov=True, weight_decay=0.05,
                decay_norms_and_biases=False),
    TrainConfig(epochs=2, lr=0.01, optimizer="adam", weight_decay=0.05,
                decay_norms_and_biases=False),
    TrainConfig(epochs=2, lr=0.01, nesterov=True, onecycle_warmup=0.1, bias_lr_scale=16.0,
                decay_norms_and_biases=False),
    TrainConfig(epochs=2, lr=0.01, optimizer="adamw", weight_decay=0.05, bias_lr_scale=8.0),
    TrainConfig(epochs=2, lr=0.01, optimizer="adam", bias_lr_scale=4.0),
], ids=["paper", "nesterov-norm-clip-smoothing", "value-clip-no-decay", "multistep-warmup",
        "adam-value-clip", "adamw-norm-clip", "sgd-weights-decayed-only",
        "adam-weights-decayed-only", "nesterov-short-warmup-fast-biases",
        "adamw-fast-decayed-biases", "adam-fast-biases"])
def test_graph_ready_step_trains_like_the_eager_step(cfg):
    data = batches(2 * STEPS_PER_EPOCH)
    assert_same_training(eager_run(cfg, data), graph_ready_run(cfg, data))


@pytest.mark.parametrize("schedule", ["onecycle", "multistep"])
def test_every_bias_trains_at_its_multiple_of_the_weights_lr(schedule):
    """Issue 31: batch norm's shifts and the classifier's bias at `bias_lr_scale` x the LR on
    every step (the one-cycle's peak too); the weights and batch norm's scales at the LR."""
    cfg = TrainConfig(epochs=2, lr=0.01, bias_lr_scale=64.0, schedule=schedule,
                      **({"milestones": (1,)} if schedule == "multistep" else {}))
    parts = setup(cfg)
    names = {id(p): n for n, p in parts.model.named_parameters()}
    fast = [g for g in parts.optimizer.param_groups if g["lr_scale"] != 1.0]
    assert len(fast) == 1 and {names[id(p)] for p in fast[0]["params"]} == {
        n for n in names.values() if n.endswith("bias")}
    assert "bn1.weight" in {names[id(p)] for p in parts.optimizer.param_groups[0]["params"]}
    for _ in range(2 * STEPS_PER_EPOCH):
        assert fast[0]["lr"] == pytest.approx(64 * parts.optimizer.param_groups[0]["lr"])
        parts.optimizer.step()
        parts.scheduler.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_without_decay_on_norms_and_biases_only_weights_shrink(optimizer):
    """A step on a zero loss moves a parameter by its weight decay alone: convolution and
    linear weights shrink, batch norm's scales and shifts and every bias stay as they were."""
    cfg = TrainConfig(epochs=1, lr=0.1, optimizer=optimizer, weight_decay=0.5,
                      decay_norms_and_biases=False)
    parts = setup(cfg)
    before = {name: p.detach().clone() for name, p in parts.model.named_parameters()}
    (0 * parts.model(batches(1)[0][0]).sum()).backward()
    parts.optimizer.step()
    moved = {name for name, p in parts.model.named_parameters()
             if not torch.equal(p, before[name])}
    one_dimensional = {name for name, p in parts.model.named_parameters() if p.ndim == 1}
    assert {"bn1.weight", "bn1.bias", "fc.bias", "layer4.1.bn2.weight"} <= one_dimensional
    assert moved == set(before) - one_dimensional


@pytest.mark.parametrize("optimizer, ema", [("sgd", 0.0), ("adamw", 0.5)])
def test_graph_ready_step_trains_like_the_eager_step_on_mixed_targets(optimizer, ema):
    """mixup's and CutMix's soft targets (each row two labels' shares) through both steps, and
    the moving average of the weights after them."""
    cfg = TrainConfig(epochs=2, lr=0.01, optimizer=optimizer, label_smoothing=0.1, ema_horizon=ema)
    g = torch.Generator().manual_seed(2)
    data = []
    for x, y in batches(2 * STEPS_PER_EPOCH):
        share = torch.rand((), generator=g, dtype=torch.float64)
        soft = torch.nn.functional.one_hot(y, 10).double()
        data.append((x, share * soft + (1 - share) * soft.roll(1, 0)))
    assert_same_training(eager_run(cfg, data), graph_ready_run(cfg, data))


@pytest.mark.parametrize("warmup", [0.05, 0.3])
def test_the_one_cycle_peaks_after_its_warmup_share(warmup):
    """Issue 31: `onecycle_warmup` is OneCycleLR's pct_start; the LR peaks at that share of the
    run's steps, and the momentum is at its lowest there."""
    cfg = TrainConfig(epochs=4, lr=0.1, onecycle_warmup=warmup)
    table = schedule_table(cfg, 25, torch.device("cpu"), torch.float64)
    peak = int(table[:, 0].argmax())
    assert table[peak, 0] == pytest.approx(0.1)
    assert peak == round(warmup * 100) - 1  # OneCycleLR counts its steps from 0
    assert int(table[:, 1].argmin()) == peak
    with pytest.raises(UsageError, match="onecycle_warmup belongs to schedule = onecycle"):
        TrainConfig(schedule="multistep", onecycle_warmup=warmup + 0.01)


def test_a_wrong_momentum_is_caught():
    """The comparison above can fail: the same step with one-cycle's momentum held fixed."""
    cfg = TrainConfig(epochs=2, lr=0.01)
    data = batches(2 * STEPS_PER_EPOCH)
    real = steplib.schedule_table
    steplib.schedule_table = lambda *a: real(*a).index_fill(1, torch.tensor([1]), 0.9)
    try:
        wrong = graph_ready_run(cfg, data)
    finally:
        steplib.schedule_table = real
    with pytest.raises(AssertionError):
        assert_same_training(eager_run(cfg, data), wrong)


def test_schedule_table_is_onecycle_step_by_step():
    cfg = TrainConfig(epochs=2, lr=0.01)
    seen = eager_run(cfg, batches(2 * STEPS_PER_EPOCH))[-1]
    table = steplib.schedule_table(cfg, STEPS_PER_EPOCH, torch.device("cpu"))
    assert table.shape == (2 * STEPS_PER_EPOCH, 2)
    assert torch.equal(table, torch.tensor(seen, dtype=torch.float32))
    assert seen[0][0] < seen[2][0] > seen[-1][0]  # one cycle: up, then down
    assert seen[0][1] > seen[2][1] < seen[-1][1]  # momentum the other way


@pytest.mark.parametrize("cfg", [TrainConfig(epochs=2, lr=0.01), MULTISTEP,
                                 TrainConfig(epochs=2, lr=0.01, optimizer="adam")],
                         ids=["onecycle", "multistep-warmup", "adam"])
def test_graph_ready_step_resumes_from_saved_state(cfg):
    """A run stopped after 3 steps and rebuilt from its state dicts, as a checkpoint resumes
    it, continues exactly as the run that never stopped."""
    data = batches(2 * STEPS_PER_EPOCH)
    straight = graph_ready_run(cfg, data)
    first = graph_ready_run(cfg, data[:STEPS_PER_EPOCH])
    parts = setup(cfg, first[0].state_dict())
    parts.optimizer.load_state_dict(first[1].state_dict())
    parts.scheduler.load_state_dict(first[2].state_dict())
    resumed = graph_ready_run(cfg, data[STEPS_PER_EPOCH:], parts)
    assert_same_training(straight, resumed, rtol=0, atol=0)


def test_a_failed_capture_says_so_once_and_training_goes_on(monkeypatch):
    cfg = TrainConfig(epochs=2, lr=0.01)
    data = batches(2 * STEPS_PER_EPOCH)

    class Refused(RuntimeError):
        pass

    def capture_refused(graph):
        raise Refused("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", capture_refused)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    parts = setup(cfg)
    lines = []
    parts.log = lines.append
    step = steplib.GraphStep(parts, capture=True)
    step.warmup = 0  # the side-stream warm-up needs CUDA; the capture is what is tested
    for x, y in data:
        step(x, y)
    assert len(lines) == 1 and lines[0].startswith("CUDA graph capture failed (Refused: ")
    assert lines[0].endswith("; training eager")
    assert step.graph is None and not step.capture
    assert_same_training(eager_run(cfg, data), trained(parts))


def test_a_failed_compile_says_so_once_and_training_goes_on():
    """What a machine without a C++ compiler or Triton meets: the backend fails on the first
    step; that step and the rest run eager, as if --compile had not been given."""
    cfg = TrainConfig(epochs=2, lr=0.01)
    data = batches(2 * STEPS_PER_EPOCH)

    def no_compiler(graph, inputs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nsee the docs")

    parts = setup(cfg, compile=True)
    lines = []
    parts.log = lines.append
    parts.step_model = torch.compile(parts.model, backend=no_compiler)
    step = steplib.make_step(parts)
    for x, y in data:
        step(x, y)
    assert lines == ["torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ "
                     "compiler found see the docs); training eager"]
    assert_same_training(eager_run(cfg, data), trained(parts), rtol=0, atol=0)


@pytest.mark.parametrize("change, obstacle", [
    ({}, None),
    ({"device": torch.device("cpu")}, "they need a CUDA device"),
    ({"world": 2}, "not under torchrun"),
    ({"amp": torch.float16}, "fp16 needs loss scaling"),
    ({"execution": ExecutionConfig(compile=True)}, "--compile builds graphs of its own"),
])
def test_runs_that_cannot_use_graphs_are_named(change, obstacle):
    args = {"execution": ExecutionConfig(), "device": torch.device("cuda"), "amp": torch.bfloat16,
            "world": 1, **change}
    reason = steplib.graph_obstacle(**args)
    assert reason == obstacle if obstacle is None else reason.startswith(obstacle)


def lr_trace(name: str, steps_per_epoch: int) -> torch.Tensor:
    """The LR of every step of an experiment's run, as its training loop steps the scheduler."""
    cfg = EXPERIMENTS[name].train
    table = steplib.schedule_table(cfg, steps_per_epoch, torch.device("cpu"), torch.float64)
    assert (table[:, 1] == cfg.momentum).all()  # step schedules leave the momentum alone
    return table[:, 0]


def test_wrn_16_8_published_schedule():
    """LR 0.1, x0.2 at epochs 60, 120 and 160, for 200 epochs (Zagoruyko & Komodakis)."""
    lr = lr_trace("wrn-16-8", steps_per_epoch=3)
    epoch = torch.arange(200 * 3) // 3
    drops = (epoch >= 60).double() + (epoch >= 120).double() + (epoch >= 160).double()
    torch.testing.assert_close(lr, 0.1 * 0.2**drops, rtol=1e-12, atol=0)


def test_resnet_110_published_schedule():
    """0.01 for 400 iterations, then 0.1, /10 at about 32k and 48k, stop at about 64k (He et
    al.), at batch 128 on 50,000 images: 391 iterations per epoch."""
    lr = lr_trace("resnet-110", steps_per_epoch=391)
    assert 64_000 <= len(lr) < 64_000 + 391
    step = torch.arange(len(lr))
    expected = 0.1 * 0.1 ** ((step >= 82 * 391).double() + (step >= 123 * 391).double())
    expected[:400] = 0.01
    torch.testing.assert_close(lr, expected, rtol=1e-12, atol=0)
    drops = [int(i) + 1 for i in torch.nonzero(lr[1:] < lr[:-1] * 0.5)]
    assert [abs(d - k) < 391 for d, k in zip(drops, (32_000, 48_000), strict=True)] == [True] * 2
