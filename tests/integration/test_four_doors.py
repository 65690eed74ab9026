"""One contract for every door: an adapter that overflows float16 when merged (base + 1e38 is
finite in float32, infinite in float16) is refused with the same rule, ``merged-finite``, by
``POST /admin/adapters``, ``deltaclip adapters register``, the trainer's registration and
``deltaclip adapters import-finetune``, and nothing is stored by any of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from adapters_store import cli as store_cli
from adapters_store.adapter import Residual
from adapters_store.bases import TINY
from adapters_store.format.codec import encode_adapter
from adapters_store.format.servable import StateWeights
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter
from server.main import create_app
from tests.conftest import wait_ready
from trainer.errors import TrainError
from trainer.export import store_written

RULE = "[merged-finite]"
HUGE = 1e38  # finite in float32 and bfloat16, beyond float16's 65504


def hostile_file(tiny, where: Path) -> Path:  # type: ignore[no-untyped-def]
    adapter = random_adapter(*tiny, "hostile", seed=3)
    key = max(adapter.residual, key=lambda k: adapter.residual[k].nnz)
    res = adapter.residual[key]
    values = res.values.clone()
    values[0] = HUGE
    adapter.residual[key] = Residual(res.indices, values)
    path = where / "hostile.safetensors"
    path.write_bytes(encode_adapter(adapter))
    return path


def hostile_finetune(tiny, where: Path) -> Path:  # type: ignore[no-untyped-def]
    """A dense fine-tune of the tiny base whose largest change (kept at any density) is 1e38."""
    state = {k: v.detach().clone() for k, v in tiny[0].state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.startswith("visual.") and state[k].is_floating_point()]:
        state[key] += 1e-3 * torch.randn(state[key].shape, generator=g)
    state["visual.conv1.weight"].view(-1)[7] = HUGE
    path = where / "tuned.safetensors"
    save_file(state, str(path))
    return path


def test_every_door_refuses_the_same_hostile_adapter_with_the_same_rule(
    server_settings, admin, tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    path = hostile_file(tiny, tmp_path)
    s = server_settings
    flags = ["--home", str(s.home), "--database-url", s.resolved_database_url,
             "--base-model", TINY[0], "--base-pretrained", TINY[1]]  # fmt: skip
    refusals: dict[str, str] = {}

    with TestClient(create_app(s)) as c:  # 1. the HTTP admin API
        wait_ready(c)
        r = c.post("/admin/adapters", files={"file": ("a", path.read_bytes())}, headers=admin)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_adapter"
        refusals["http"] = r.json()["error"]["message"]

    capsys.readouterr()
    assert store_cli.main(["adapters", "register", str(path), *flags]) != 0  # 2. the CLI
    refusals["cli"] = capsys.readouterr().err

    # 3. the trainer's registration: the base it trained from, with its weights (W0).
    net, sig = tiny
    trained_from = ServingBase(sig, StateWeights({k: v.detach().clone()
                                                  for k, v in net.state_dict().items()}))  # fmt: skip
    with pytest.raises(TrainError) as train:
        store_written(path, trained_from, s, alias=None, register=True)
    refusals["train"] = str(train.value)

    tuned = hostile_finetune(tiny, tmp_path)  # 4. import-finetune
    code = store_cli.main(["adapters", "import-finetune", str(tuned), "--task", "hostile",
                           "--classes", "cat,dog", "--density", "0.01", *flags,
                           "-o", str(tmp_path / "imported.safetensors")])  # fmt: skip
    assert code != 0
    refusals["import-finetune"] = capsys.readouterr().err

    assert sorted(refusals) == ["cli", "http", "import-finetune", "train"]
    for door, message in refusals.items():
        assert RULE in message, f"{door}: {message}"
    registry = Registry.from_settings(s)
    try:
        assert registry.list().total == 0, "nothing is catalogued"
        assert list(registry.blobs.digests()) == [], "nothing is stored"
    finally:
        registry.close()
