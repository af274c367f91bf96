"""The training step: PyTorch's optimiser and scheduler as written, or the same step replayed as
one CUDA graph.

On a GPU the eager step of this small model is bound by the host: about 11.5 ms on an H200
whatever the batch, Python launching kernels rather than the GPU running them. A CUDA graph
launches the whole step at once, but nothing inside it may read the host, and it holds fixed the
address of every tensor it touches. So the graph-ready step keeps on the device all that changes
from step to step: the step number, and every step's LR and momentum as a table traced from
PyTorch's own scheduler (`schedule_table`); and it writes SGD's update with tensor
hyper-parameters, because `torch.optim.SGD` takes its momentum, which one-cycle varies, as a
Python number. The optimiser and scheduler objects still hold what a checkpoint saves: the
update writes the optimiser's momentum buffers in place, and the scheduler steps on the host
beside the graph. Uncaptured, the same step runs on any device; tests hold it against the eager
step on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExecutionConfig, TrainConfig
from ..errors import one_line
from .device import autocast

if TYPE_CHECKING:
    from .assembly import Assembly

GRAPH_WARMUP = 3  # uncaptured steps on a side stream before the capture, as CUDA graphs need
Step = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x, y, grad_scale) -> loss


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The parameters grouped by how they train: weight decay (on all, or, without decay on
    norms and biases, on the weights alone: not on batch norm's scales and shifts nor on any
    bias) and LR (`bias_lr_scale` x the weights' for every bias). The weights' group comes
    first; its LR is the run's. Each group keeps its `lr_scale` for the scheduler."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        decayed = cfg.decay_norms_and_biases or p.ndim > 1
        scale = cfg.bias_lr_scale if name.endswith("bias") else 1.0
        groups.setdefault((decayed, scale), []).append(p)
    ordered = sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1] != 1.0))
    return [{"params": params, "lr": cfg.lr * scale, "lr_scale": scale,
             **({} if decayed else {"weight_decay": 0.0})}
            for (decayed, scale), params in ordered]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch.optim's fused kernels, on the CPU as on CUDA: on a 2-core CPU Adam's foreach update
    took 30 ms of a 160 ms ResNet-18 step, the fused one 6.5 ms (benchmarks/RESULTS.md)."""
    fused = {"fused": True}
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **fused)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """PyTorch's own schedulers, stepped every batch. onecycle: the paper's "one cycle policy",
    whose "initial LR" is max_lr. multistep: the LR times `gamma` at each milestone epoch (the
    literature's step schedules), after `warmup_steps` batches at `warmup_factor` x LR."""
    lr_scheduler = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=[cfg.lr * g["lr_scale"] for g in
                                                          optimizer.param_groups],
                                       epochs=cfg.epochs,
                                       steps_per_epoch=steps_per_epoch,
                                       pct_start=cfg.onecycle_warmup)
    # SequentialLR restarts the second scheduler's count where the warm-up ends.
    warmup = cfg.warmup_steps
    steps = lr_scheduler.MultiStepLR(  # a milestone inside the warm-up applies when it ends
        optimizer, [max(m * steps_per_epoch - warmup, 0) for m in cfg.milestones],
        gamma=cfg.gamma)
    if not warmup:
        return steps
    return lr_scheduler.SequentialLR(optimizer, [
        lr_scheduler.ConstantLR(optimizer, factor=cfg.warmup_factor, total_iters=warmup),
        steps], milestones=[warmup])


def clip_gradients(model: nn.Module, cfg: TrainConfig) -> None:
    if cfg.grad_clip and cfg.clip_mode == "value":
        nn.utils.clip_grad_value_(model.parameters(), cfg.grad_clip)
    elif cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)


def train_step(parts: Assembly, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
               grad_scale: float = 1.0) -> torch.Tensor:
    """One optimisation step of `parts`' optimiser through `module` (its network, wrapped or
    compiled); returns the batch's mean loss as a device tensor (no host sync).

    Under DDP, which averages gradients over ranks, `grad_scale` = world x share / global batch
    makes that average the gradient of the global batch's mean loss, whatever the shares.
    """
    cfg, optimizer, scaler = parts.experiment.train, parts.optimizer, parts.scaler
    with autocast(parts.device, parts.amp):
        logits = module(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * grad_scale).backward()
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        clip_gradients(module, cfg)
    scaler.step(optimizer)
    scaler.update()
    parts.scheduler.step()
    return loss.detach()


def schedule_table(cfg: TrainConfig, steps_per_epoch: int, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every step's optimiser hyper-parameters, one row per step of the run, traced from the
    scheduler that `make_scheduler` builds, driven over a stand-in parameter: the graph follows
    it exactly. SGD: (LR, momentum), both varied by one-cycle. Adam and AdamW: (LR, beta1,
    LR / bias correction 1, sqrt of bias correction 2, 1 - LR x weight decay), the host
    arithmetic of torch.optim's Adam done once, in float64 as there, for step t = row + 1.
    In the parameters' dtype, as torch.optim rounds its Python numbers."""
    optimizer = make_optimizer(nn.Linear(1, 1), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    group = optimizer.param_groups[0]
    rows = []
    for t in range(1, cfg.epochs * steps_per_epoch + 1):
        if cfg.optimizer == "sgd":
            rows.append((group["lr"], group["momentum"]))
        else:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            rows.append((lr, beta1, lr / (1 - beta1**t), (1 - beta2**t) ** 0.5,
                         1 - lr * cfg.weight_decay))
        optimizer.step()  # no gradients, so no change; it keeps the scheduler's order check quiet
        scheduler.step()
    return torch.tensor(rows, dtype=dtype, device=device)


def graph_obstacle(execution: ExecutionConfig, device: torch.device, amp,
                   world: int) -> str | None:
    """Why this run cannot replay its step as a CUDA graph, or None if it can."""
    if device.type != "cuda":
        return "they need a CUDA device"
    if world > 1:
        return "not under torchrun (DDP reduces gradients from the host)"
    if amp == torch.float16:
        return "fp16 needs loss scaling, which checks gradients on the host; use bf16"
    if execution.compile:
        return "--compile builds graphs of its own"
    return None


class GraphStep:
    """The training step for `model` (SGD, Adam or AdamW), every per-step value on the device.

    With `capture`, the first full batch after `GRAPH_WARMUP` steps is captured as a CUDA graph
    and every later batch of that shape replays it; other batches (an epoch's shorter last one)
    run uncaptured. A capture that fails says so in one line and leaves the run uncaptured,
    never stopped."""

    def __init__(self, parts: Assembly, capture: bool) -> None:
        self.parts = parts
        self.model, self.optimizer, self.scheduler = parts.model, parts.optimizer, parts.scheduler
        self.cfg, self.amp, self.log = parts.experiment.train, parts.amp, parts.log
        owned = [(p, bool(g["weight_decay"]), g.get("lr_scale", 1.0))
                 for g in self.optimizer.param_groups for p in g["params"]]
        self.params = [p for p, _, _ in owned]
        # Positions in `params` of those the optimiser decays (all, unless norms and biases
        # are left out), and of those whose LR is `bias_lr_scale` x the table's.
        self.decayed = [i for i, (_, decays, _) in enumerate(owned) if decays]
        self.scaled = [i for i, (_, _, scale) in enumerate(owned) if scale != 1.0]
        self.device = self.params[0].device
        self.table = schedule_table(self.cfg, parts.steps_per_epoch, self.device,
                                    self.params[0].dtype)
        self.index = torch.tensor([self.scheduler.last_epoch], device=self.device)  # next row
        self.capture = capture
        self.warmup = GRAPH_WARMUP
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, y, loss
        self.capture_seconds = 0.0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        """The batch's mean loss, as a device tensor valid until the next step."""
        if not self._has_state():  # a new run: PyTorch's first step creates the optimiser state
            loss = train_step(self.parts, self.model, x, y)
            self.index += 1
            return loss
        if self.capture and self.graph is None and self.warmup == 0:
            self._capture(x, y)
        if self.graph is not None and x.shape == self.static[0].shape:
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self.graph.replay()
            loss = self.static[2]
        elif self.capture and self.graph is None:
            loss = self._warm_up(x, y)
        else:
            loss = self._step(x, y)
        # The host's copies, for logs and checkpoints: the schedule, and Adam's step counts.
        self.scheduler.step()
        if self.cfg.optimizer != "sgd":
            torch._foreach_add_([self.optimizer.state[p]["step"] for p in self.params], 1.0)
        return loss

    def _decay(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients with L2 weight decay added where the optimiser decays (torch.optim's
        SGD and Adam do the same per group)."""
        if not self.cfg.weight_decay or not self.decayed:
            return grads
        added = torch._foreach_add([grads[i] for i in self.decayed],
                                   [self.params[i] for i in self.decayed],
                                   alpha=self.cfg.weight_decay)
        grads = list(grads)
        for i, g in zip(self.decayed, added, strict=True):
            grads[i] = g
        return grads

    def _has_state(self) -> bool:
        key = "momentum_buffer" if self.cfg.optimizer == "sgd" else "exp_avg"
        state = self.optimizer.state
        return all(state.get(p, {}).get(key) is not None for p in self.params)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward, clipping, then torch.optim's update in its order,
        with the step's hyper-parameters read from the table on the device (autocast's weight
        cache off, as graph capture requires)."""
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16,
                            enabled=self.amp is not None, cache_enabled=False):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.model, cfg)
        with torch.no_grad():
            row = self.table.index_select(0, self.index)[0].unbind()
            if cfg.optimizer == "sgd":
                self._sgd_update(*row)
            else:
                self._adam_update(*row)
            self.index += 1
        return loss.detach()

    def _sgd_update(self, lr: torch.Tensor, momentum: torch.Tensor) -> None:
        params = self.params
        grads = [p.grad for p in params]
        bufs = [self.optimizer.state[p]["momentum_buffer"] for p in params]
        grads = self._decay(grads)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        if self.cfg.nesterov:
            grads = torch._foreach_add(grads, torch._foreach_mul(bufs, momentum))
        else:
            grads = bufs
        torch._foreach_sub_(params, self._scale(torch._foreach_mul(grads, lr)))

    def _scale(self, updates: list[torch.Tensor]) -> list[torch.Tensor]:
        """The updates, those of the biases (new tensors each) times `bias_lr_scale`: their LR
        is that multiple of the table's, as torch.optim's group LR makes it."""
        if self.scaled:
            torch._foreach_mul_([updates[i] for i in self.scaled], self.cfg.bias_lr_scale)
        return updates

    def _adam_update(self, lr: torch.Tensor, beta1: torch.Tensor, step_size: torch.Tensor,
                     bias_correction2_sqrt: torch.Tensor, decay: torch.Tensor) -> None:
        params, cfg = self.params, self.cfg
        group = self.optimizer.param_groups[0]
        state = [self.optimizer.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in state]
        exp_avg_sqs = [s["exp_avg_sq"] for s in state]
        if cfg.optimizer == "adamw" and cfg.weight_decay and self.decayed:
            scaled = set(self.scaled)  # their decay is 1 - scale x LR x weight decay
            for factor, where in ((decay, [i for i in self.decayed if i not in scaled]),
                                  (1 - cfg.bias_lr_scale * (1 - decay),
                                   [i for i in self.decayed if i in scaled])):
                if where:
                    torch._foreach_mul_([params[i] for i in where], factor)
        elif cfg.optimizer == "adam":
            grads = self._decay(grads)
        torch._foreach_lerp_(exp_avgs, grads, [1 - beta1] * len(grads))
        beta2 = group["betas"][1]
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(update, step_size)
        torch._foreach_sub_(params, self._scale(update))

    def _warm_up(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.warmup -= 1
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            loss = self._step(x, y)
        main.wait_stream(side)
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Record one step (nothing runs while it records); `__call__` then replays it."""
        start = time.perf_counter()
        static_x, static_y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)  # gradients come from the graph's own pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_loss = self._step(static_x, static_y)
        except Exception as e:  # an op that cannot be captured: the run goes on uncaptured
            self.capture = False
            self.log(f"CUDA graph capture failed ({one_line(e)}); training eager")
            return
        finally:
            torch.cuda.synchronize(self.device)
            self.capture_seconds += time.perf_counter() - start
        self.graph, self.static = graph, (static_x, static_y, static_loss)
        self.log(f"training step captured as a CUDA graph in {self.capture_seconds:.2f} s")


def make_step(parts: Assembly) -> Step:
    """The run's step: a `GraphStep` where --cuda-graphs asks for one and the run allows it
    (else one line says why not), PyTorch's eager step otherwise, on `parts.step_model`, which
    `--compile` made a `torch.compile` module.

    A compile that fails (no C++ compiler, no Triton, an op it cannot lower) fails inside a step,
    before the optimiser has moved: one line says so, and that step and the rest run on the
    uncompiled module. (Where the backward pass is what fails, batch norm's running statistics
    have seen that one batch twice.)"""
    execution, log = parts.experiment.execution, parts.log
    if execution.cuda_graphs:
        obstacle = graph_obstacle(execution, parts.device, parts.amp, parts.ranks.world)
        if obstacle is None:
            return GraphStep(parts, capture=True)
        log(f"CUDA graphs off: {obstacle}; training eager")

    def on(module: nn.Module) -> Step:
        return lambda x, y, grad_scale=1.0: train_step(parts, module, x, y, grad_scale)

    if not execution.compile:
        return on(parts.step_model)
    # The compiled module and what it compiles (DDP's wrapper, if any).
    compiled, eager = on(parts.step_model), on(parts.step_model._orig_mod)
    failed = False

    def step(x: torch.Tensor, y: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        nonlocal failed
        if not failed:
            try:
                return compiled(x, y, grad_scale)
            except torch._dynamo.exc.TorchDynamoException as e:
                failed = True
                cause = getattr(e, "inner_exception", None) or e  # the backend's own error
                log(f"torch.compile failed ({one_line(cause)}); training eager")
        return eager(x, y, grad_scale)

    return step
