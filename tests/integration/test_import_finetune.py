"""``deltaclip adapters import-finetune`` on a dense fine-tune the trainer made (``--tau 0``).

The fine-tune is real: ``deltaclip train --tau 0`` on the tiny base moves every tower weight; its
dense tower is saved the ways other trainers save checkpoints (whole model, ``visual.`` keys only,
the tower's own keys in a ``state_dict`` wrapper, DDP's ``module.`` prefix) and imported at 0.5 %.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from adapters_store import cli as store_cli
from adapters_store.adapter import merge_state
from adapters_store.bases import TINY, build_base, signature_of, tower_parameters
from adapters_store.format.codec import check_against_base, decode_adapter
from adapters_store.format.framing import Limits
from tests.conftest import png_bytes
from tests.synthetic_domains import make_domains
from trainer import main as trainer_main

CREATED = "2025-01-01T00:00:00Z"
DENSITY = 0.005
BASE_FLAGS = ["--base-model", TINY[0], "--base-pretrained", TINY[1]]


class Dense:
    """The trainer's dense fine-tune: its full state, tower, head, classes and target folder."""

    def __init__(self, state: dict[str, torch.Tensor], adapter: Any, target: Path, root: Path):
        self.state = state
        self.tower = {k: v for k, v in state.items() if k.startswith("visual.")}
        self.head = adapter.head
        self.class_names: list[str] = adapter.meta.class_names
        self.target = target
        self.root = root

    def save(self, name: str, tensors: dict[str, Any]) -> Path:
        path = self.root / name
        if path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        else:
            torch.save(tensors, path)
        return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Dense:
    """``deltaclip train --tau 0`` (no density budget): every weight of the tower may move."""
    root = tmp_path_factory.mktemp("finetune")
    source, target = make_domains(root / "data", per_class=4, size=32)
    out = root / "dense-adapter.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTACLIP_MAX_DENSITY", "1.0")  # a dense adapter is over the store's limit
        trainer_main([
            "--source", str(source), "--target", str(target), "--task", "dense",
            *BASE_FLAGS, "--tau", "0", "--epochs", "1", "--iters", "3", "--batch-size", "4",
            "--lr", "1e-3", "--head-lr-mult", "10", "--workers", "0", "--threads", "1",
            "--no-register", "--no-progress", "--home", str(root / "home"),
            "--run-dir", str(root / "run"), "-o", str(out), "--created-at", CREATED,
        ])  # fmt: skip
    adapter = decode_adapter(out.read_bytes(), Limits(max_density=1.0))
    net = build_base(*TINY)
    assert adapter.meta.density > 0.9, "tau 0 should give a dense fine-tune"
    state = merge_state(dict(net.state_dict()), adapter)
    return Dense({k: v.clone() for k, v in state.items()}, adapter, target, root)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = store_cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def import_args(checkpoint: Path, dense: Dense, *extra: str) -> list[str]:
    return [
        "adapters", "import-finetune", str(checkpoint), "--task", "imported",
        "--classes", ",".join(dense.class_names), "--density", str(DENSITY), *BASE_FLAGS,
        "--created-at", CREATED, *extra,
    ]  # fmt: skip


def test_import_at_half_a_percent_validates_registers_and_serves(
    dense: Dense,
    server_settings: Any,
    live_server: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    whole = dense.save("whole.safetensors", dense.state)
    store = ["--home", str(server_settings.home), "--database-url", server_settings.database_url]
    argv = import_args(whole, dense, *store, "--alias", "production", "--json")
    code, out, err = run_cli([*argv, "--eval-data", str(dense.target), "--workers", "0"], capsys)
    assert code == 0, err
    report = json.loads(out)

    net = build_base(*TINY)
    sig = signature_of(net, *TINY)
    path = Path(report["adapter_path"])
    adapter = decode_adapter(path.read_bytes())
    check_against_base(adapter, sig)
    eligible = sum(p.numel() for p in tower_parameters(net).values())
    assert adapter.meta.nnz == report["nnz"] == int(DENSITY * eligible)
    assert adapter.meta.density == pytest.approx(report["density"]) and report["density"] <= DENSITY
    assert adapter.meta.method == "import-finetune" and report["head"] == "zero-shot"
    assert adapter.class_embeddings is not None
    assert report["version"] == 1 and len(report["digest"]) == 64

    # The kept weights are the largest |W - W0| of the whole tower, stored exactly.
    base = {k: p.detach() for k, p in tower_parameters(net).items()}
    merged = merge_state(base, adapter)
    kept_min, dropped_max = math.inf, 0.0
    kept_sq = full_sq = 0.0
    for key, w0 in base.items():
        delta = (dense.tower[key].double() - w0.double()).reshape(-1)
        kept = (merged[key] != w0).reshape(-1)
        assert torch.equal(merged[key].reshape(-1)[kept], dense.tower[key].reshape(-1)[kept])
        if kept.any():
            kept_min = min(kept_min, float(delta[kept].abs().min()))
        if (~kept).any():
            dropped_max = max(dropped_max, float(delta[~kept].abs().max()))
        kept_sq += float(delta[kept].square().sum())
        full_sq += float(delta.square().sum())
        if key in report["tensors"]:
            entry = report["tensors"][key]
            assert entry["kept"] == int(kept.sum())
            assert entry["changed"] == int((delta != 0).sum())
            norm = float(delta[kept].norm()) / float(delta.norm())
            assert entry["kept_norm"] == pytest.approx(norm, rel=1e-9)
    assert kept_min >= dropped_max
    assert report["kept_norm"] == pytest.approx(math.sqrt(kept_sq / full_sq), rel=1e-9)
    assert 0 < report["kept_norm"] < 1
    assert report["changed"] == sum(t["changed"] for t in report["tensors"].values())
    assert report["ignored_outside_tower"] == []

    evaluation = report["eval"]
    assert evaluation["images"] == 4 * len(dense.class_names)
    for key in ("dense_accuracy", "imported_accuracy", "agreement"):
        assert 0.0 <= evaluation[key] <= 1.0

    # Registered in the catalog the server reads, and served over HTTP.
    answer = httpx.post(
        f"{live_server}/predict", params={"task": "imported", "top_k": 2},
        files={"file": ("x.png", png_bytes(7), "image/png")}, timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["task"], body["version"], body["digest"]) == ("imported", 1, report["digest"])
    assert [p["label"] in dense.class_names for p in body["predictions"][0]] == [True, True]
    shown = httpx.get(f"{live_server}/adapters/imported/versions/1", timeout=30).json()
    assert shown["nnz"] == report["nnz"]


def test_every_checkpoint_layout_gives_the_same_adapter(
    dense: Dense, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = {k.removeprefix("visual."): v for k, v in dense.tower.items()}
    layouts: dict[str, dict[str, Any]] = {
        "whole.safetensors": dense.state,
        "visual.pt": dense.tower,
        "wrapped.pth": {"state_dict": bare, "epoch": 3},
        "ddp.pt": {f"module.{k}": v for k, v in dense.state.items()},
    }
    outputs = []
    for name, tensors in layouts.items():
        out = tmp_path / f"{name}.adapter.safetensors"
        argv = import_args(dense.save(name, tensors), dense, "--no-register", "-o", str(out))
        code, stdout, err = run_cli(argv, capsys)
        assert code == 0, err
        assert "overall" in stdout and f"wrote {out}" in stdout
        adapter = decode_adapter(out.read_bytes())
        assert adapter.meta.train_config.pop("imported_from") == name
        outputs.append(adapter)
    first = outputs[0]
    for adapter in outputs[1:]:
        assert adapter.meta == first.meta
        assert adapter.residual.keys() == first.residual.keys()
        for key, res in adapter.residual.items():
            assert torch.equal(res.indices, first.residual[key].indices)
            assert torch.equal(res.values, first.residual[key].values)


def test_a_head_file_becomes_the_adapter_head(
    dense: Dense, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = dense.save("whole.safetensors", dense.state)
    head_file = dense.save("head.safetensors", {f"head/{k}": v for k, v in dense.head.items()})
    out = tmp_path / "a.safetensors"
    argv = import_args(checkpoint, dense, "--head", str(head_file), "--no-register", "-o", str(out))
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    adapter = decode_adapter(out.read_bytes())
    assert all(torch.equal(adapter.head[k], v) for k, v in dense.head.items())
    assert adapter.class_embeddings is None

    weight = dense.save("linear.pt", {"weight": dense.head["fc.weight"] * 2})
    argv = import_args(checkpoint, dense, "--head", str(weight), "--no-register", "-o", str(out))
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert torch.equal(
        decode_adapter(out.read_bytes()).head["fc.weight"], dense.head["fc.weight"] * 2
    )

    biased = dense.save("biased.pt", {"weight": dense.head["fc.weight"], "bias": torch.zeros(3)})
    assert "has a bias" in refused(import_args(checkpoint, dense, "--head", str(biased)), capsys)


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, _, err = run_cli([*argv, "--no-register", "-o", "/nonexistent/never.safetensors"], capsys)
    assert code == 1
    assert err.startswith("deltaclip: error: ") and "Traceback" not in err
    return err


def test_another_architecture_is_refused_naming_the_keys(
    dense: Dense, capsys: pytest.CaptureFixture[str]
) -> None:
    other = {k: v for k, v in dense.state.items() if ".resblocks.1." not in k}  # one block fewer
    other["visual.proj"] = torch.zeros(7, 5)
    other["visual.extra.weight"] = torch.zeros(2)
    err = refused(import_args(dense.save("other.safetensors", other), dense), capsys)
    assert "not a fine-tune of this base's architecture" in err
    assert "missing: visual.transformer.resblocks.1." in err
    assert "unexpected: visual.extra.weight" in err
    assert "shape mismatch: visual.proj (7, 5)" in err


def test_a_checkpoint_equal_to_the_base_is_refused(
    dense: Dense, capsys: pytest.CaptureFixture[str]
) -> None:
    base = dict(build_base(*TINY).state_dict())
    err = refused(import_args(dense.save("base.safetensors", base), dense), capsys)
    assert "equals the base" in err


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_is_refused_naming_the_tensor(
    dense: Dense, bad: float, capsys: pytest.CaptureFixture[str]
) -> None:
    state = dict(dense.state)
    state["visual.conv1.weight"] = state["visual.conv1.weight"].clone()
    state["visual.conv1.weight"].view(-1)[5] = bad
    err = refused(import_args(dense.save(f"bad-{bad}.safetensors", state), dense), capsys)
    assert "NaN or Inf in visual.conv1.weight" in err


class Payload:
    """Unpickling this would create ``marker``: code execution the importer must never allow."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (os.makedirs, (str(self.marker),))


class Custom:
    """A user's own class saved inside a checkpoint (``torch.save(model)`` does the same)."""

    def __init__(self) -> None:
        self.note = "epoch 3"


def test_a_pickle_needing_code_is_refused_without_running_it(
    dense: Dense, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": dense.tower, "extra": Payload(marker)}, evil)
    err = refused(import_args(evil, dense), capsys)
    assert "needs code execution to load (it names os.makedirs)" in err
    assert not marker.exists()

    # A custom class, through the installed command in its own process: one line, no traceback.
    custom = tmp_path / "custom.pt"
    torch.save({"state_dict": dense.tower, "info": Custom()}, custom)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "deltaclip"), *import_args(custom, dense),
         "--no-register", "-o", str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("deltaclip: error: checkpoint")
    assert "needs code execution to load (it names " in proc.stderr and ".Custom)" in proc.stderr


def test_a_folder_of_other_classes_is_refused_before_anything_is_registered(
    dense: Dense, settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = dense.save("whole.safetensors", dense.state)
    store = ["--home", str(settings.home), "--database-url", settings.database_url]
    argv = import_args(whole, dense, *store, "--eval-data", str(dense.target), "--workers", "0")
    argv[argv.index("--classes") + 1] = "cat,dog,bird,fish"
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "has classes the model does not know" in err, err
    assert store_cli.main(["adapters", "list", "--json", *store]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 0


def test_a_density_outside_the_store_limit_is_refused(
    dense: Dense, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = dense.save("whole.safetensors", dense.state)
    argv = import_args(whole, dense)
    argv[argv.index("--density") + 1] = "0.9"
    assert "--density must be in (0, 0.5]" in refused(argv, capsys)


def test_the_zero_shot_head_answers_like_the_text_head() -> None:
    from trainer.import_head import zero_shot_head
    from trainer.model import TextHead

    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 16, generator=gen)
    features = torch.randn(64, 16, generator=gen) * 3
    features -= features.mean(dim=1, keepdim=True)  # LayerNorm removes the mean: none to remove
    teacher = TextHead(emb, 100.0)(features)
    student = zero_shot_head(emb, 100.0)(features)
    torch.testing.assert_close(student, teacher, rtol=1e-4, atol=1e-3)
    assert torch.equal(student.argmax(1), teacher.argmax(1))
