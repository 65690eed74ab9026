"""One run of the accuracy study, in its own process: train, then score the served adapter.

    python -m bench.accuracy_job SPEC.json

The study (bench/accuracy.py) writes a spec per run and starts this module for it, a few at a
time; each run is a fresh process, so no state (threads, RNG, caches) leaks from one run into the
next, and a run that fails or is interrupted leaves nothing half-written: the row is written to
the spec's ``out`` atomically at the very end.

The run is ``deltaclip train`` with the spec's arguments (in process). The adapter is then merged
into the base exactly as the server does, and scored on the held-out target images and on the
labelled source images held out from training (``photo-val``), keeping every image's prediction
(as a string of class digits in the folder's order) for paired, image-by-image comparisons.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

from adapters_store.adapter import merge_state
from adapters_store.basenames import EFFLITE0
from adapters_store.bases import build_base, tower_parameters
from adapters_store.format.codec import Limits, read_adapter
from adapters_store.head import head_from_state

# A dense fine-tune stored as a sparse adapter is over the store's 50 % limit; reading it is fine.
STUDY_LIMITS = Limits(max_density=1.0)


def digits(values: list[int]) -> str:
    """Class indices (< 36) as one compact string, one character per image."""
    return "".join("0123456789abcdefghijklmnopqrstuvwxyz"[v] for v in values)


class Scorer:
    """Accuracy and per-image predictions of adapters merged into one resident base, as served."""

    def __init__(self, image_size: int) -> None:
        self.net = build_base(*EFFLITE0)
        self.base_state = {k: v.clone() for k, v in self.net.state_dict().items()}
        self.tower_numel = sum(p.numel() for p in tower_parameters(self.net).values())
        self.image_size = image_size

    @torch.no_grad()
    def score(self, adapter_path: Path, folders: dict[str, str]) -> dict[str, Any]:
        """Per folder: accuracy, images, predictions and labels (digit strings)."""
        from trainer.evaluate import folder_data, predictions, report

        adapter = read_adapter(adapter_path, STUDY_LIMITS)
        self.net.load_state_dict(merge_state(self.base_state, adapter))
        self.net.eval()
        head = head_from_state(dict(adapter.head)).eval()
        encode = cast(Any, self.net).encode_image
        out: dict[str, Any] = {}
        try:
            for name, folder in folders.items():
                data = folder_data(
                    folder, adapter.meta.class_names, self.net, self.image_size, 100, 0
                )
                preds, labels = predictions(
                    data.loader, lambda x: {"task": head(encode(x).float())}, torch.device("cpu")
                )
                rep = report(preds["task"], labels, data.class_names)
                out[name] = {
                    "accuracy": rep["accuracy"],
                    "images": rep["images"],
                    "predictions": digits(preds["task"].tolist()),
                    "labels": digits(labels.tolist()),
                }
        finally:
            self.net.load_state_dict(self.base_state)
        out["head_bytes"] = sum(t.numel() * t.element_size() for t in adapter.head.values())
        return out


def train_argv(spec: dict[str, Any]) -> list[str]:
    """``deltaclip train`` arguments of the run (recorded with its row)."""
    s, work = spec["setting"], Path(spec["work"])
    argv = [
        "--source",
        spec["folders"]["photo"],
        "--target",
        spec["folders"][spec["shift"]],
        "--task",
        f"study-{spec['key']}".replace("/", "-").replace(".", "_"),
        "--method",
        s["method"],
        "--tau",
        f"{s['tau']:g}",
        "--base-model",
        EFFLITE0[0],
        "--base-pretrained",
        EFFLITE0[1],
        "--epochs",
        "1",
        "--iters",
        str(spec["steps"]),
        "--batch-size",
        str(spec["batch_size"]),
        "--lr",
        f"{spec['lr']:g}",
        "--head-lr-mult",
        f"{spec['head_lr'] / spec['lr']:g}",
        "--image-size",
        str(spec["image_size"]),
        "--seed",
        str(spec["seed"]),
        "--workers",
        "0",
        "--threads",
        str(spec["threads"]),
        "--home",
        str(work / "home"),
        "--run-dir",
        str(work / "runs" / spec["key"]),
        "--output",
        str(work / "adapters" / f"{spec['key'].replace('/', '_')}.safetensors"),
        "--no-register",
        "--restart",
        "--no-progress",
    ]
    if s.get("max_density") is not None:
        argv += ["--max-density", f"{s['max_density']:g}"]
    return argv + list(s.get("extra", ()))


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and score one run; the study's row (without the provenance the study adds)."""
    from trainer import main as train_main

    argv = train_argv(spec)
    # The study stores dense fine-tunes as adapters too; the store's default 50 % limit is a
    # serving policy (DELTACLIP_MAX_DENSITY), lifted for these runs only.
    os.environ["DELTACLIP_MAX_DENSITY"] = "1.0"
    torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    m = train_main(argv)
    train_s = time.perf_counter() - started
    adapter = Path(m["adapter_path"])
    started = time.perf_counter()
    scorer = Scorer(spec["image_size"])
    scores = scorer.score(adapter, spec["score_folders"])
    score_s = time.perf_counter() - started
    full = spec["setting"]["tau"] == 0 and spec["setting"].get("max_density") is None
    file_bytes = adapter.stat().st_size
    dense_bytes = scorer.tower_numel * 4 + scores.pop("head_bytes")
    if full and not spec.get("keep_dense"):
        adapter.unlink()  # 37 MB each; the row keeps what the study needs from it
    return {
        **{k: spec[k] for k in ("key", "shift", "seed")},
        "setting": spec["setting"]["key"],
        "scores": scores,
        **{
            k: m[k]
            for k in (
                "target_accuracy",
                "target_teacher_accuracy",
                "target_images",
                "source_images",
                "nnz",
                "density",
                "snapped_weights",
                "steps",
            )
        },
        "loss_terms": m.get("loss_terms"),
        "loss_terms_last_step": m.get("loss_terms_last_step"),
        "eligible": scorer.tower_numel,
        "adapter_bytes": file_bytes,
        "dense_bytes": dense_bytes,
        "stored_bytes": dense_bytes if full else file_bytes,
        "stored_as": "dense float32 tower + head" if full else "v1 adapter file",
        "adapter_path": None if full and not spec.get("keep_dense") else str(adapter),
        "train_seconds": round(train_s, 1),
        "score_seconds": round(score_s, 1),
        "argv": ["deltaclip", "train", *argv],
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.accuracy_job SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    row = run_job(spec)
    out = Path(spec["out"])
    tmp = out.with_suffix(".part")
    tmp.write_text(json.dumps(row) + "\n")
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
