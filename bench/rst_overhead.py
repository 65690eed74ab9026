"""Question "rst_overhead": step-time overhead of RST against plain fine-tuning, CPU.

    python -m bench rst_overhead [--steps 8] [--warmup 2] [--batch-size 32]

A real ``trainer.step.Session`` on ``--base`` (default ``deltaclip-efflite0``, the ImageNet-
pretrained offline base), the default CMKD configuration (batch of source + target images at the
base's image size), random image tensors (the step's cost does not depend on pixel values). Three
variants, interleaved step by step so machine drift hits all alike:

- *plain*: the same step with RST switched off (``rst.apply`` does nothing): plain fine-tuning;
- *rst*: the threshold reset after every optimiser step (the default τ);
- *rst+budget*: the reset plus a 0.5 % ``max_density`` budget (the global top-k), with the
  learning rate ×1000 so that far more than 0.5 % of the weights move past τ in every step and
  the budget's top-k really runs (at the default lr, random images move almost nothing past τ
  in a few steps, and the budget would never bind).

Reported per variant: median step time and the median time of ``rst.apply`` inside it; the
overhead is ``apply / (step − apply)``, and the plain step as a cross-check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from functools import partial
from typing import Any

import torch

from adapters_store.basenames import EFFLITE0
from adapters_store.zeroshot import class_embeddings
from bench.harness import Result, add_common, base_spec, load_base, median, time_once
from trainer.config import TrainConfig
from trainer.model import logit_scale_of, tower_kind
from trainer.step import Session
from trainer.transforms import image_size_of

# Ten everyday nouns, so the default base's WordNet text side can place every one.
LABELS = ["cat", "dog", "car", "bag", "shoe", "shirt", "coat", "dress", "boot", "sandal"]
CLASSES = len(LABELS)
VARIANTS = (
    ("plain", False, None, 1.0),
    ("rst", True, None, 1.0),
    ("rst+budget", True, 0.005, 1000.0),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, base=EFFLITE0[0], reps=1)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)


def make_session(base: str, max_density: float | None, lr_scale: float) -> tuple[Session, int]:
    net, _ = load_base(base)
    model, pretrained = base_spec(base)
    size = image_size_of(net)
    cfg = TrainConfig(
        "src", "tgt", "bench", base_model=model, base_pretrained=pretrained, max_density=max_density
    ).resolve(tower_kind(net), size)
    cfg = dataclasses.replace(cfg, lr=float(cfg.require(cfg.lr, "lr")) * lr_scale)
    emb = class_embeddings(net, model, pretrained, LABELS, cfg.prompt_template)
    return Session(cfg, net, emb, logit_scale_of(net), torch.device("cpu")), size


class Timed:
    """Wraps ``rst.apply`` to time it (or to skip it: plain fine-tuning)."""

    def __init__(self, session: Session, enabled: bool) -> None:
        self.inner = session.rst.apply
        self.enabled = enabled
        self.last = 0.0
        session.rst.apply = self  # type: ignore[method-assign]

    def __call__(self) -> int:
        t = time.perf_counter()
        nnz = self.inner() if self.enabled else 0
        self.last = time.perf_counter() - t
        return nnz


def run(args: argparse.Namespace, result: Result) -> None:
    variants: dict[str, tuple[Session, Timed]] = {}
    for name, enabled, density, lr_scale in VARIANTS:
        session, size = make_session(args.base, density, lr_scale)
        variants[name] = (session, Timed(session, enabled))
    gen = torch.Generator().manual_seed(1)
    b = args.batch_size
    batch = (
        (
            torch.randn(b, 3, size, size, generator=gen),
            torch.randint(0, CLASSES, (b,), generator=gen),
        ),
        (torch.randn(b, 3, size, size, generator=gen), torch.zeros(b, dtype=torch.long)),
    )
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for i in range(args.warmup + args.steps):
        for name, (session, timed) in variants.items():
            step = time_once(partial(session.train_step, *batch))
            if i >= args.warmup:
                times[name].append((step, timed.last))
        print(f"step {i + 1}/{args.warmup + args.steps}", flush=True)
    rows: list[dict[str, Any]] = []
    for name, samples in times.items():
        session = variants[name][0]
        step, apply = median([s for s, _ in samples]), median([a for _, a in samples])
        rows.append(
            {
                "variant": name,
                "step_ms": step * 1e3,
                "rst_apply_ms": apply * 1e3,
                "overhead": apply / (step - apply) if step > apply else None,
                "density_after": session.rst.recount() / session.rst.eligible,
                "lr": session.cfg.lr,
            }
        )
    for row in rows:
        row["step_vs_plain"] = row["step_ms"] / rows[0]["step_ms"]
    result.data.update(
        image_size=size,
        batch_size=b,
        steps=args.steps,
        eligible=variants["rst"][0].rst.eligible,
        rows=rows,
    )
    print(json.dumps(rows, indent=1))
