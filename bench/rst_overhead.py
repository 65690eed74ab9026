"""Step-time overhead of RST against plain fine-tuning (issue #3), CPU, the offline base.

    .venv/bin/python bench/rst_overhead.py [--steps 8] [--batch-size 32] [--out results.json]

A real ``trainer.session.Session`` on ``deltaclip-efflite0`` (the ImageNet-pretrained offline
base), the default CMKD configuration (batch 32 source + 32 target images at the base's image
size), random image tensors (the step's cost does not depend on pixel values). Three variants,
interleaved step by step so machine drift hits all alike:

- *plain*: the same step with RST switched off (``rst.apply`` does nothing): plain fine-tuning;
- *rst*: the threshold reset after every optimiser step (the default τ);
- *rst+budget*: the reset plus a ``--max-density 0.5 %`` budget (the global top-k), with the
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
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median

from adapters_store.basenames import EFFLITE0
from adapters_store.bases import build_base
from trainer.config import TrainConfig
from trainer.model import logit_scale_of, text_embeddings, tower_kind
from trainer.session import Session
from trainer.transforms import image_size_of

CLASSES = 10


def make_session(max_density: float | None, lr_scale: float = 1.0) -> tuple[Session, int]:
    net = build_base(*EFFLITE0)
    size = image_size_of(net)
    cfg = TrainConfig("src", "tgt", "bench", max_density=max_density).resolve(tower_kind(net), size)
    cfg = dataclasses.replace(cfg, lr=float(cfg.require(cfg.lr, "lr")) * lr_scale)
    names = [f"class {i}" for i in range(CLASSES)]
    emb = text_embeddings(net, cfg.base_model, names, cfg.prompt_template)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    variants: dict[str, tuple[Session, Timed]] = {}
    for name, enabled, density, lr_scale in (("plain", False, None, 1.0), ("rst", True, None, 1.0),
                                             ("rst+budget", True, 0.005, 1000.0)):  # fmt: skip
        session, size = make_session(density, lr_scale)
        variants[name] = (session, Timed(session, enabled))
    gen = torch.Generator().manual_seed(1)
    b = args.batch_size
    batch = (
        (torch.randn(b, 3, size, size, generator=gen), torch.randint(0, CLASSES, (b,), generator=gen)),
        (torch.randn(b, 3, size, size, generator=gen), torch.zeros(b, dtype=torch.long)),
    )  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for i in range(args.warmup + args.steps):
        for name, (session, timed) in variants.items():
            t = time.perf_counter()
            session.train_step(*batch)
            step = time.perf_counter() - t
            if i >= args.warmup:
                times[name].append((step, timed.last))
        print(f"step {i + 1}/{args.warmup + args.steps}", flush=True)
    rows = []
    for name, samples in times.items():
        session = variants[name][0]
        step = median([s for s, _ in samples])
        apply = median([a for _, a in samples])
        rows.append({
            "variant": name, "step_ms": step * 1e3, "rst_apply_ms": apply * 1e3,
            "overhead": apply / (step - apply) if step > apply else None,
            "density_after": session.rst.recount() / session.rst.eligible,
            "lr": session.cfg.lr,
        })  # fmt: skip
    plain = rows[0]["step_ms"]
    for row in rows:
        row["step_vs_plain"] = row["step_ms"] / plain
    out = {"machine": machine(), "base": "/".join(EFFLITE0), "image_size": size,
           "batch_size": b, "steps": args.steps, "eligible": variants["rst"][0].rst.eligible,
           "rows": rows}  # fmt: skip
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
