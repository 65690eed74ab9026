"""Every hyper-parameter of a training run, with the method's defaults (docs/METHOD.md).

A :class:`TrainConfig` is what the adapter file records as ``train_config``: the resolved values
(no ``None`` left), so a stored adapter says exactly how it was made. Knobs that cannot change the
trained weights (paths of outputs, workers, progress bars) live in :class:`RunOptions` instead,
which keeps two runs with the same configuration byte-identical.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.format.schema import BLOCK_SIZES
from adapters_store.zeroshot import DEFAULT_TEMPLATE

from .errors import TrainError

METHODS = ("cmkd", "source-only")
RESIDUAL_DTYPES = ("float32", "bfloat16", "float16")

# Per tower kind: (image-tower lr, head lr multiplier, RST threshold tau). "vit" and "conv" are the
# reference's ViT-B/16 and ResNet-50 values. EfficientNet towers (deltaclip-efflite0) get their
# own: under the ResNet values no weight of EfficientNet-Lite0 ever escapes the reset (measured
# per-step moves stay below 5e-7, far under tau = 1e-5, and most are lost to float32 rounding),
# so RST would silently train the head alone. lr 3e-6 with tau 3e-6 moves a growing sparse set
# of weights (about 0.007 % after 60 steps on 224 px images); the head keeps the reference's
# lr of 3e-3. These are chosen for RST to work on this tower, not tuned on a benchmark.
TOWER_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "vit": (3e-6, 1000.0, 1e-6),
    "conv": (3e-7, 10000.0, 1e-5),
    "efficientnet": (3e-6, 1000.0, 3e-6),
}


@dataclass(frozen=True)
class CMKDWeights:
    """The loss's coefficients; defaults as in docs/METHOD.md (Office-Home / Office-31).

    Declared here, with no torch import, so that :class:`TrainConfig` takes its defaults from
    this one place and the command line can list them without loading torch.
    """

    lambda1: float = 0.25
    lambda2: float = 0.1
    lambda3: float = 0.025
    label_smoothing: float = 0.1
    ramp_gamma: float = 1.0
    # T of λ(t). The loss functions' default is the reference's 20 × 500-step run; a training
    # run uses its own length (``TrainConfig.ramp_iters``).
    ramp_iters: int = 10_000


@dataclass
class TrainConfig:
    """Hyper-parameters of one CMKD + RST (+ FixMatch) run (docs/METHOD.md).

    ``None`` means "the default for this base" and is filled in by :meth:`resolve`.
    """

    source: str
    target: str
    task: str
    source_domain: str = ""
    target_domain: str = ""
    base_model: str = "deltaclip-efflite0"
    base_pretrained: str = "imagenet"
    method: str = "cmkd"
    fixmatch: bool = False
    adabn: bool = False  # source-only with target batches through the head (BatchNorm statistics)
    tau: float | None = None
    max_density: float | None = None
    block_size: int = 1  # RST in blocks of B consecutive weights (1: the paper's RST)
    budget_at_end: bool = False  # the density budget once, after the last step (not every step)
    epochs: int = 20
    iters_per_epoch: int = 500
    batch_size: int = 32
    lr: float | None = None
    head_lr_mult: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    lr_gamma: float = 3e-4
    lr_decay: float = 0.75
    label_smoothing: float = CMKDWeights.label_smoothing
    lambda1: float = CMKDWeights.lambda1
    lambda2: float = CMKDWeights.lambda2
    lambda3: float = CMKDWeights.lambda3
    ramp_gamma: float = CMKDWeights.ramp_gamma
    ramp_iters: int | None = None  # T of the ramp λ(t); None: the run's total_steps
    fixmatch_weight: float = 0.5
    fixmatch_threshold: float = 0.95
    image_size: int | None = None
    resize_ratio: float = 256 / 224
    prompt_template: str = DEFAULT_TEMPLATE
    seed: int = 42
    residual_dtype: str = "float32"
    amp: bool = False
    tower_kind: str | None = None

    @property
    def method_name(self) -> str:
        """The adapter's ``method``, e.g. ``cmkd+rst`` or ``source-only+rst+fixmatch``."""
        return (
            f"{self.method}+rst"
            + ("+adabn" if self.adabn else "")
            + ("+fixmatch" if self.fixmatch else "")
        )

    @property
    def loss_weights(self) -> CMKDWeights:
        """The coefficients the loss functions take, from this run's settings."""
        return CMKDWeights(
            self.lambda1,
            self.lambda2,
            self.lambda3,
            self.label_smoothing,
            self.ramp_gamma,
            int(self.require(self.ramp_iters, "ramp_iters")),
        )

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run; the learning-rate decay and the ramp count in steps."""
        return self.epochs * self.iters_per_epoch

    @property
    def train_resize(self) -> int:
        """The square size images are resized to before the random crop (256 for 224 crops)."""
        return round(self.require(self.image_size, "image_size") * self.resize_ratio)

    @staticmethod
    def require(value: Any, name: str) -> Any:
        """``value``, or an error naming the setting when it was used before :meth:`resolve`."""
        if value is None:
            raise TrainError(f"{name} is not resolved yet; call TrainConfig.resolve first")
        return value

    def resolve(self, tower_kind: str, image_size: int) -> TrainConfig:
        """A copy with every per-base default filled in, then validated."""
        if tower_kind not in TOWER_DEFAULTS:
            raise TrainError(f"unknown tower kind {tower_kind!r}")
        lr, mult, tau = TOWER_DEFAULTS[tower_kind]
        out = dataclasses.replace(
            self,
            tower_kind=tower_kind,
            lr=lr if self.lr is None else self.lr,
            head_lr_mult=mult if self.head_lr_mult is None else self.head_lr_mult,
            tau=tau if self.tau is None else self.tau,
            image_size=image_size if self.image_size is None else self.image_size,
            ramp_iters=self.total_steps if self.ramp_iters is None else self.ramp_iters,
        )
        out.validate()
        return out

    def validate(self) -> None:
        """Refuse values that would silently train something else than asked."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.adabn and self.method != "source-only":
            problems.append(
                "--adabn is the source-only control (CMKD already passes target batches "
                "through the head); use it with --method source-only"
            )
        if self.residual_dtype not in RESIDUAL_DTYPES:
            problems.append(f"residual dtype must be one of {', '.join(RESIDUAL_DTYPES)}")
        if self.tau is not None and not self.tau >= 0:
            problems.append(f"tau must be >= 0, got {self.tau}")
        if self.budget_at_end and self.max_density is None:
            problems.append("--budget-at-end needs a budget (--max-density)")
        if self.max_density is not None and not 0 < self.max_density <= 1:
            problems.append(f"max density must be in (0, 1], got {self.max_density}")
        if self.block_size != 1 and self.block_size not in BLOCK_SIZES:
            sizes = ", ".join(map(str, (1, *BLOCK_SIZES)))
            problems.append(f"block size must be one of {sizes}, got {self.block_size}")
        for name in ("epochs", "iters_per_epoch", "batch_size", "ramp_iters"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name.replace('_', ' ')} must be >= 1")
        for name in ("lr", "head_lr_mult"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name.replace('_', ' ')} must be > 0, got {value}")
        if self.image_size is not None and self.image_size < 8:
            problems.append(f"image size must be >= 8, got {self.image_size}")
        if not 0 <= self.label_smoothing < 1:
            problems.append("label smoothing must be in [0, 1)")
        if not 0 < self.fixmatch_threshold <= 1:
            problems.append("FixMatch threshold must be in (0, 1]")
        if self.resize_ratio < 1:
            problems.append("resize ratio must be >= 1 (the train crop is taken from the resize)")
        try:
            usable = "{name}" in self.prompt_template and bool(
                self.prompt_template.format(name="x")
            )
        except (KeyError, IndexError, ValueError):
            usable = False
        if not usable:
            problems.append(
                f"prompt template must contain {{name}} and no other field, got {self.prompt_template!r}"
            )
        if problems:
            raise TrainError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain values: what checkpoints compare and an adapter's ``train_config`` holds."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunOptions:
    """How a run is executed and where its outputs go; none of it changes the trained weights.

    Attributes:
        output: the adapter file (default ``<home>/adapters/<task>-<timestamp>.safetensors``).
        run_dir: holds ``checkpoint.pt`` and ``train_log.jsonl`` (default ``<home>/runs/<task>``).
        resume: continue from the run dir's checkpoint; restart: discard it and start over.
        register: register the adapter in the store (``--no-register`` writes the file only).
        num_workers: data-loading processes (``None``: ``min(2, cpus)``; 0 loads in-process).
        threads: intra-op CPU threads (``None``: the cores the loader processes leave free).
        device: ``None`` picks ``DELTACLIP_DEVICE`` if set, else CUDA when present, else CPU.
        eval_every: evaluate target accuracy every N epochs (0: only at the end).
        checkpoint_every: also checkpoint every N steps (0: at the end of each epoch only).
        created_at: fixed adapter timestamp (tests compare files byte for byte).
    """

    output: Path | None = None
    run_dir: Path | None = None
    resume: bool = False
    restart: bool = False
    register: bool = True
    alias: str | None = None
    num_workers: int | None = None
    threads: int | None = None
    device: str | None = None
    progress: bool | None = None
    eval_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoint: bool = False
    created_at: str | None = None
