"""Typed, validated configuration: what one run is.

A run is fully described by four frozen dataclasses: what network (`ModelConfig`), what
images (`DataConfig`), how to train (`TrainConfig`), and how and where it executes
(`ExecutionConfig`, never part of the protocol). Each validates itself on construction, so a
bad value fails before any data is read or any file is written. The twelve rows of the
paper's Table 1 live in `experiments.toml` beside this file, as overrides of the defaults
below; read that file to see every choice and its reason. They and the user's own experiments
are resolved by `catalogue`. The protocol label every output gives a run is computed here too
(`Experiment.settings`, its departures from the entry it was made from; for runs shown
together, `labels`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from .errors import UsageError
from .errors import require as _require
from .fields import Options, check_fields

# The networks' families by name (`models.registry` adds each as it registers): the rules
# each lays on the other model settings. A family `module:callable` is a user's network.
FAMILY_RULES: dict[str, Callable[[ModelConfig], None]] = {}


@dataclass(frozen=True)
class ModelConfig:
    """A network: a family (`models.registry`) and the settings it takes. The built-in
    `resnet18` spans every architecture of the paper's Table 1, `cifar-resnet` the two
    literature rows (He et al.'s 6n+2-layer ResNets, Zagoruyko & Komodakis's wide ResNets); a
    user's network is `module:callable`, given `options`, and takes no other setting."""

    family: str = "resnet18"
    # The map layer1 sees of a 32x32 image: imagenet, the paper's 7x7/2 conv + max-pool, 8x8;
    # imagenet-nopool (7x7/2, no max-pool), imagenet-s1 (7x7/1 + max-pool) and cifar-s2 (a
    # 3x3/2 conv, the CIFAR literature's cheap way to 16x16), 16x16; cifar, a 3x3/1 conv, 32x32
    # (models.resnet.STEMS).
    stem: Literal["imagenet", "imagenet-nopool", "imagenet-s1", "cifar-s2", "cifar"] = "imagenet"
    block: Literal["post", "pre"] = "post"  # conv-BN-ReLU (original) or BN-ReLU-conv
    width: int = 1  # k: stage widths 64k..512k (resnet18) or 16k, 32k, 64k (cifar-resnet)
    # A resnet18's stem and layer1 channels, C: stage widths C k, 2C k, 4C k, 8C k. Fewer than
    # the paper's 64 buy a larger map (a 16x16 stem) within the same FLOPs.
    channels: int = 64
    blocks: int = 2  # residual blocks per stage: 2 in ResNet-18, n in a 6n+2-layer CIFAR ResNet
    shortcut: Literal["projection", "zero-pad"] = "projection"  # He et al.'s option B or A
    shortcut_kernel: Literal[1, 3] = 1  # kernel of the projection shortcut conv
    batch_norm: bool = True
    block_dropout: float = 0.0  # inside each residual block, between its two convs
    fc_dropout: float = 0.0  # before the final fully connected layer
    pretrained: str | None = None  # "imagenet" or a path to a torchvision-format state dict
    # A user's network's keyword arguments, beside num_classes (a TOML table).
    options: Options = field(default_factory=Options)

    def __post_init__(self) -> None:
        check_fields(self)
        _require(self.width >= 1, f"width must be a whole number >= 1, not {self.width}")
        _require(self.channels >= 8, f"channels must be a whole number >= 8, not "
                                     f"{self.channels}")
        _require(self.blocks >= 1, f"blocks must be a whole number >= 1, not {self.blocks}")
        for name in ("block_dropout", "fc_dropout"):
            p = getattr(self, name)
            _require(0.0 <= p < 1.0, f"{name} must be in [0, 1), not {p}")
        if self.user_network:
            self._check_user_network()
            return
        _require(self.family in FAMILY_RULES,
                 f"family must be {', '.join(FAMILY_RULES)} or a network of your own as "
                 f"module:callable, not {self.family!r}")
        _require(not self.options, "options are a network of your own's arguments (family = "
                                   "\"module:callable\")")
        FAMILY_RULES[self.family](self)

    @property
    def user_network(self) -> bool:
        return ":" in self.family

    def _check_user_network(self) -> None:
        module, _, name = self.family.partition(":")
        _require(bool(module) and name.isidentifier()
                 and all(p.isidentifier() for p in module.split(".")),
                 f"family {self.family!r}: a network of your own is module:callable, e.g. "
                 "my_nets:resnet18_se")
        taken = [f.name for f in dataclasses.fields(self)
                 if f.name not in ("family", "options")
                 and getattr(self, f.name) != getattr(ModelConfig, f.name, None)]
        _require(not taken, f"family {self.family}: {', '.join(taken)} belong to the built-in "
                            "families; give your network's own settings as options")


@dataclass(frozen=True)
class DataConfig:
    data: str = "cifar100"  # cifar100, cifar10, synthetic, or a path (folder or .tar.gz)
    subset: int | None = None  # train on N training images drawn at random (seeded)
    val_split: int = 0  # hold N training images out as a validation set
    test_subset: int | None = None  # evaluate on N test images (the same N for every seed)
    padding_mode: Literal["reflect", "zeros"] = "reflect"  # of the 4-pixel random-crop padding
    normalize: Literal["pixel", "channel"] = "pixel"  # mean image (the paper) or channel mean

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("subset", "test_subset"):
            n = getattr(self, name)
            _require(n is None or n > 0, f"{name} must be > 0, not {n}")
        _require(self.val_split >= 0, f"val_split must be >= 0, not {self.val_split}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25
    batch_size: int = 256
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01  # the paper's "initial LR": OneCycleLR's max_lr; multistep's starting LR
    # onecycle: the paper's policy (OneCycleLR). multistep: the LR times `gamma` after each epoch
    # in `milestones` (MultiStepLR), after `warmup_steps` batches at `warmup_factor` x LR.
    schedule: Literal["onecycle", "multistep"] = "onecycle"
    # The share of a one-cycle run that rises to the peak LR (OneCycleLR's pct_start): 0.3 is
    # PyTorch's default and the paper's; the short-budget literature warms up over far less.
    onecycle_warmup: float = 0.3
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    warmup_factor: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    grad_clip: float = 0.0  # 0 disables clipping
    clip_mode: Literal["value", "norm"] = "value"  # the paper's "grad clip" is by value
    label_smoothing: float = 0.0
    # Mixing each training batch with a shuffled copy of itself, by a Beta(a, a) share drawn
    # per batch (a = the value; 0 = off): mixup blends the images, CutMix pastes a box of the
    # other; the targets mix in the same share. With both on, each batch takes one of the two
    # at even odds (data.loader.DeviceLoader).
    mixup: float = 0.0
    cutmix: float = 0.0
    # An exponential moving average of the weights and batch norm's statistics
    # (torch.optim.swa_utils; 0 = off), its horizon a share of the run's steps: 0.1 averages
    # over about the last tenth, whatever the run's length, so that a search's short trials and
    # the protocol's long run mean the same by it (a per-step decay would not). Evaluation,
    # `evaluate` and `inspect` use the average; the checkpoint keeps it beside the weights.
    ema_horizon: float = 0.0
    # False: no weight decay on batch norm's scales and shifts nor on any bias (every parameter
    # of one dimension), only on convolution and linear weights.
    decay_norms_and_biases: bool = True
    # The LR of every bias (batch norm's shifts, the classifier's bias) as a multiple of the
    # weights' (its one-cycle peak, and every step after): the short-budget CIFAR literature
    # (airbench) trains batch norm's biases at a far higher LR than the weights.
    bias_lr_scale: float = 1.0
    # Also test each image with its mirror image, the two softmaxes averaged: test_top1_tta,
    # beside the protocol's single view (test_top1), never in its place.
    tta: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("epochs", "batch_size"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, not {getattr(self, name)}")
        _require(self.lr > 0, f"lr must be > 0, not {self.lr}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, not {self.weight_decay}")
        _require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), not {self.grad_clip}")
        _require(0 <= self.momentum < 1, f"momentum must be in [0, 1), not {self.momentum}")
        _require(0 <= self.label_smoothing < 1,
                 f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        _require(self.bias_lr_scale > 0,
                 f"bias_lr_scale must be > 0, not {self.bias_lr_scale}")
        _require(0 <= self.ema_horizon <= 1,
                 f"ema_horizon must be in [0, 1] (a share of the run; 0 = off), not "
                 f"{self.ema_horizon}")
        for name in ("mixup", "cutmix"):
            _require(getattr(self, name) >= 0,
                     f"{name} must be >= 0 (the Beta distribution's a; 0 = off), not "
                     f"{getattr(self, name)}")
        _require(not (self.nesterov and self.optimizer != "sgd"), "nesterov applies to sgd only")
        object.__setattr__(self, "milestones", tuple(self.milestones))  # TOML and JSON give lists
        _require(list(self.milestones) == sorted(set(self.milestones))
                 and all(m > 0 for m in self.milestones),  # one past `epochs` is never reached
                 f"milestones must be increasing epochs >= 1, not {list(self.milestones)}")
        _require(self.schedule == "multistep" or not (self.milestones or self.warmup_steps),
                 "milestones and warmup_steps belong to schedule = multistep")
        _require(0 < self.onecycle_warmup < 1,
                 f"onecycle_warmup must be in (0, 1), not {self.onecycle_warmup}")
        _require(self.schedule == "onecycle" or self.onecycle_warmup == 0.3,
                 "onecycle_warmup belongs to schedule = onecycle (multistep warms up with "
                 "warmup_steps)")
        _require(0 < self.gamma <= 1, f"gamma must be in (0, 1], not {self.gamma}")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, not {self.warmup_steps}")
        _require(0 < self.warmup_factor <= 1,
                 f"warmup_factor must be in (0, 1], not {self.warmup_factor}")


# A resume may change these: they change how fast a run goes, not what it computes.
RESUMABLE = {"resume": "may change"}


@dataclass(frozen=True)
class ExecutionConfig:
    """How and where a run executes, never what the paper's protocol trains: a run that changes
    these still follows the paper. Those marked RESUMABLE may also change when a run resumes;
    the others (precision, memory format, determinism, batch-norm sync) would change its
    numbers, so a resume keeps them."""

    device: str = field(default="auto", metadata=RESUMABLE)  # auto: cuda if present, else cpu
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where supported
    channels_last: bool = True
    compile: bool = field(default=False, metadata=RESUMABLE)
    # Replay each training step as one CUDA graph (opt-in for now).
    cuda_graphs: bool = field(default=False, metadata=RESUMABLE)
    deterministic: bool = False  # bit-identical reruns and resumes (slower on GPU)
    sync_bn: bool = False  # under torchrun: batch-norm statistics over all ranks' shares
    eval_batch_size: int = field(default=1024, metadata=RESUMABLE)
    # Evaluate on the test split after each epoch. A search's trials never do: they are chosen
    # on a validation split, and the test split is kept for reporting.
    test_split: bool = True
    # The experiment trackers each run writes to beside its folder (training.trackers):
    # tensorboard (where the optional extra is installed), mlflow; `none` for neither.
    log: tuple[str, ...] = field(default=("tensorboard",), metadata=RESUMABLE)

    def __post_init__(self) -> None:
        check_fields(self)
        _require(self.eval_batch_size > 0,
                 f"eval_batch_size must be > 0, not {self.eval_batch_size}")
        object.__setattr__(self, "log", tuple(dict.fromkeys(t for t in self.log if t != "none")))
        unknown = [t for t in self.log if t not in ("tensorboard", "mlflow")]
        _require(not unknown, f"log takes tensorboard, mlflow or none, not "
                              f"{', '.join(map(str, unknown))}")


@dataclass(frozen=True)
class Experiment:
    """A named run recipe: one row of the paper's Table 1, or the user's own."""

    name: str
    row: str  # the paper's label for this row of Table 1
    notes: str = ""
    group: str = "paper"  # paper: the paper's twelve (`study --all`); or, e.g., literature
    extends: str = ""  # the experiment an entry of the user's experiments file builds on
    quick: bool = False  # `study --quick`: a short try of the pipeline, not the paper's protocol
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    # The catalogue entry this experiment was made from (`catalogue.Catalogue.get`), carried
    # with it into every process: its label is its departures from that entry, whichever
    # process computes it. None: an experiment made by hand, labelled custom.
    origin: Experiment | None = field(default=None, compare=False, repr=False)
    # The label a run was trained under ({"profile", "overrides"}), read back from its
    # config.json: a preset edited later never relabels the run.
    recorded: dict | None = field(default=None, compare=False, repr=False)

    def replace(self, **overrides: Any) -> Experiment:
        """Return a copy with `section.field` overrides applied, validated like the original."""
        sections: dict[str, dict] = {s: {} for s in SECTIONS}
        for key, value in overrides.items():
            section = SECTION_OF.get(key)
            _require(section is not None, f"unknown setting {key!r}")
            sections[section][key] = value
        new = dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **kv)
                                           for s, kv in sections.items() if kv})
        # A change to the recipe makes a new run, labelled afresh from its origin.
        if next(differences(self, new, RECIPE_SECTIONS, ignore=_execution), None) is not None:
            new = dataclasses.replace(new, recorded=None)
        return new

    def overrides(self) -> dict[str, Any]:
        """The settings of the protocol in which this run departs from the catalogue entry it
        was made from, e.g. {"epochs": 2}. Execution settings (EXECUTION_FIELDS) are not
        departures."""
        if self.recorded is not None:
            return dict(self.recorded["overrides"])
        if self.origin is None:
            return {}
        return {name: now for name, _, now in differences(self.origin, self, RECIPE_SECTIONS,
                                                          ignore=_execution)}

    @property
    def profile(self) -> str:
        """paper: a catalogue entry as it stands; quick: `--quick`; custom: anything else."""
        if self.recorded is not None:
            return self.recorded["profile"]
        if self.quick:
            return "quick"
        return "paper" if self.origin is not None and not self.overrides() else "custom"

    @property
    def settings(self) -> str:
        """How every output names a run's protocol: `paper`, or its profile and departures
        from its entry, `custom: epochs=2, lr=0.05`."""
        changed = ", ".join(f"{key}={value}" for key, value in self.overrides().items())
        return self.profile + (f": {changed}" if changed else "")

    @property
    def log_mark(self) -> str:
        """What a run's log says when it is not the paper's protocol, naming the departures."""
        return "" if self.profile == "paper" else f" [{self.settings}; not the paper's protocol]"

    def to_dict(self) -> dict[str, Any]:
        """config.json: the full recipe, and the label the run is made under."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("origin", "recorded")}
        d.update({s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS})
        d["model"]["options"] = self.model.options.as_dict()
        return {**d, "profile": self.profile, "overrides": self.overrides()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        return cls(name=d["name"], row=d.get("row", d["name"]), notes=d.get("notes", ""),
                   group=d.get("group", "paper"), extends=d.get("extends", ""),
                   quick=bool(d.get("quick", d.get("profile") == "quick")),
                   **_sections(d),
                   recorded=({"profile": d["profile"], "overrides": d["overrides"]}
                             if "overrides" in d and "profile" in d else None))


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                             "execution": ExecutionConfig}
RECIPE_SECTIONS = ("model", "data", "train")  # what the protocol trains

SECTION_OF: dict[str, str] = {f.name: s for s, c in SECTIONS.items() for f in dataclasses.fields(c)}
# Settings that choose how and where a run executes, not what the paper's protocol trains: a run
# that changes them still follows the paper. (The data set is named on its own in every output.)
EXECUTION_FIELDS = {"data", "seed", *(f.name for f in dataclasses.fields(ExecutionConfig))}


def _execution(f: dataclasses.Field) -> bool:
    return f.name in EXECUTION_FIELDS


def differences(old: Experiment, new: Experiment, sections: Iterable[str] = SECTIONS,
                ignore: Callable[[dataclasses.Field], bool] = lambda f: False
                ) -> Iterator[tuple[str, Any, Any]]:
    """Each setting of `sections` (fields not ignored) in which two experiments differ, as
    (name, old value, new value): a run's departures from its preset, and what refuses a resume
    or a rerun under other settings."""
    for section in sections:
        for f in dataclasses.fields(getattr(new, section)):
            before, now = getattr(getattr(old, section), f.name), getattr(getattr(new, section),
                                                                          f.name)
            if not ignore(f) and before != now:
                yield f.name, before, now


def _sections(d: dict[str, Any]) -> dict[str, Any]:
    """The four sections of an experiment from its dict. Each setting is taken from whichever
    section holds it, so that config.json files written before the execution settings had a
    section of their own (they were under "train") still load."""
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    for section in SECTIONS:
        given = d.get(section, {})
        if not isinstance(given, dict):
            raise UsageError(f"{section} must be a table of settings, not {given!r}")
        for key, value in given.items():
            if key == "ema":  # before ema_horizon; every config.json had it, mostly 0
                _require(value == 0, f"ema = {value} is a decay per step, which this version "
                         "expresses as ema_horizon, a share of the run: a decay d over a run of "
                         "S steps is ema_horizon = 1 / ((1 - d) * S)")
                continue
            values[SECTION_OF.get(key, section)][key] = value
    return {s: _build(SECTIONS[s], v) for s, v in values.items()}


def _build(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
    return cls(**values)


# The paper's own numbers (Table 1 and the literature rows it quotes), beside its presets.
PAPER: dict[str, Any] = tomllib.loads(resources.files(__package__).joinpath("paper.toml")
                                      .read_text())
BASE_EXPERIMENT = "resnet18-lr0.01"
