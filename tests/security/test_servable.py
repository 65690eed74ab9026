"""Adapters that are well formed but not servable, made from a real trained adapter by changing
one field: each is refused at upload with a 4xx naming its rule and nothing is stored; the same
rows put straight into the store (as a store from before these rules may hold them) break no
read path: the catalog page and API render them and /predict refuses them with a 4xx, never a 5xx.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from torch import nn

from adapters_store import cli as store_cli
from adapters_store.adapter import Adapter, Residual
from adapters_store.bases import TINY, BaseSignature
from adapters_store.blobs import sha256_hex
from adapters_store.catalog import upgrade
from adapters_store.format.codec import decode_adapter, encode_adapter
from adapters_store.format.servable import SERVABLE_RULES
from adapters_store.registry import Registry
from tests.conftest import png_bytes
from tests.security.conftest import serving
from tests.security.helpers import ADMIN, files_under, store_settings

Tiny = tuple[nn.Module, BaseSignature]
IMAGES = [("file", (f"{i}.png", png_bytes(i), "image/png")) for i in range(4)]


def _meta(**change: Any) -> Callable[[Adapter, Tiny], None]:
    def edit(a: Adapter, _: Tiny) -> None:
        for key, value in change.items():
            target = a.meta.train_config if key == "image_size" else a.meta.metrics
            target[key] = value

    return edit


def _residual(value: float, same_sign: bool = False) -> Callable[[Adapter, Tiny], None]:
    """Set the largest residual's first value (with ``same_sign``: the base weight's sign, so
    base + value overflows float32)."""

    def edit(a: Adapter, tiny: Tiny) -> None:
        key = max(a.residual, key=lambda k: a.residual[k].nnz)
        res = a.residual[key]
        values = res.values.clone()
        v = value
        if same_sign:
            base = dict(tiny[0].state_dict())[key].reshape(-1)[int(res.indices[0])]
            v = value if float(base) >= 0 else -value
        values[0] = v
        a.residual[key] = Residual(res.indices, values)

    return edit


def _head(name: str, value: float) -> Callable[[Adapter, Tiny], None]:
    def edit(a: Adapter, _: Tiny) -> None:
        t = a.head[name].clone()
        t.view(-1)[0] = value
        a.head[name] = t

    return edit


def _class_name(a: Adapter, _: Tiny) -> None:
    a.meta.class_names[0] = "bell\x07"


# (id, edit, the rule it breaks): every finding of the servability review, plus one per rule.
CASES: list[tuple[str, Callable[[Adapter, Tiny], None], str]] = [
    ("image-size-48", _meta(image_size=48), "train-config"),
    ("image-size-true", _meta(image_size=True), "train-config"),
    ("image-size-1e30", _meta(image_size=1e30), "train-config"),
    ("image-size-3000", _meta(image_size=3000), "train-config"),
    ("image-size-string", _meta(image_size="32"), "train-config"),
    ("metric-4000-digit-int", _meta(steps=10**3999), "metrics"),
    ("accuracy-5000", _meta(target_accuracy=5000), "metrics"),
    ("accuracy-text", _meta(target_accuracy="99%"), "metrics"),
    ("class-name-control-char", _class_name, "class-names"),
    ("residual-1e38", _residual(1e38), "merged-finite"),
    ("residual-3.4e38-overflows-float32", _residual(3.4e38, same_sign=True), "merged-finite"),
    ("residual-70000-overflows-float16", _residual(7e4, same_sign=True), "merged-finite"),
    ("head-weight-1e38", _head("fc.weight", 1e38), "head-values"),
    ("bn-running-var-minus-1", _head("bn.running_var", -1.0), "head-values"),
    ("bn-weight-1e7", _head("bn.weight", 1e7), "head-values"),
]
IDS = [case[0] for case in CASES]


def mutated(
    trained: bytes, tiny: Tiny, edit: Callable[[Adapter, Tiny], None]
) -> tuple[Adapter, bytes]:
    adapter = decode_adapter(trained)
    adapter = dataclasses.replace(
        adapter,
        meta=dataclasses.replace(
            adapter.meta,
            train_config=dict(adapter.meta.train_config),
            metrics=dict(adapter.meta.metrics),
            class_names=list(adapter.meta.class_names),
        ),
        residual=dict(adapter.residual),
        head=dict(adapter.head),
    )
    edit(adapter, tiny)
    return adapter, encode_adapter(adapter)


def test_the_cases_cover_every_servability_rule() -> None:
    assert {rule for _, _, rule in CASES} == set(SERVABLE_RULES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unservable_adapters_are_refused_at_upload(
    store: Any, api: TestClient, trained: bytes, tiny: Tiny, case: Any
) -> None:
    _, edit, rule = case
    _, data = mutated(trained, tiny, edit)
    r = api.post("/admin/adapters", files={"file": ("a.safetensors", data)}, headers=ADMIN)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_adapter" and error["message"].startswith(f"[{rule}]"), error
    assert api.get("/adapters").json()["total"] == 0
    assert files_under(Path(store.blob_root)) == []
    # The unmodified adapter is accepted and answers with sane scores.
    r = api.post("/admin/adapters", files={"file": ("a.safetensors", trained)}, headers=ADMIN)
    assert r.status_code == 201, r.text
    answer = api.post("/predict?task=shapes", files=IMAGES).json()
    assert len(answer["predictions"]) == len(IMAGES) and all(answer["predictions"])
    assert all(0 <= p["score"] <= 1 for row in answer["predictions"] for p in row)


def test_the_cli_refuses_an_unservable_adapter(
    store: Any, trained: bytes, tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mutated(trained, tiny, _residual(3.4e38, same_sign=True))[1])
    flags = ["--home", str(store.home), "--database-url", store.database_url,
             "--base-model", TINY[0], "--base-pretrained", TINY[1]]  # fmt: skip
    code = store_cli.main(["adapters", "register", str(path), *flags])
    assert code != 0
    assert "[merged-finite]" in capsys.readouterr().err


def test_block_residuals_are_checked_at_their_positions(
    api: TestClient, trained_blocks: bytes, tiny: Tiny
) -> None:
    """A block adapter's first value set to overflow float32 at its position is refused; the
    trained one (tail blocks padded past the parameter's end included) is accepted."""
    adapter = decode_adapter(trained_blocks)
    key = max(adapter.residual, key=lambda k: adapter.residual[k].nnz)
    res = adapter.residual[key]
    assert res.block_size == 4
    base = dict(tiny[0].state_dict())[key].reshape(-1)[int(res.indices[0]) * 4]
    values = res.values.clone()
    values[0, 0] = 3.4e38 if float(base) >= 0 else -3.4e38
    adapter.residual[key] = Residual(res.indices, values, res.block_size)
    r = api.post("/admin/adapters", files={"file": ("a", encode_adapter(adapter))}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("[merged-finite]"), (
        r.text
    )
    r = api.post("/admin/adapters", files={"file": ("a", trained_blocks)}, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert api.post("/predict?task=shapes", files=IMAGES).status_code == 200


def test_a_legal_large_residual_is_served_with_sane_answers(
    api: TestClient, trained: bytes, tiny: Tiny
) -> None:
    """1000 is far from any overflow: stored, and every answer is a probability."""
    _, data = mutated(trained, tiny, _residual(1000.0))
    r = api.post("/admin/adapters", files={"file": ("a.safetensors", data)}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = api.post("/predict?task=shapes&top_k=4", files=IMAGES)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == len(IMAGES)
    for row in r.json()["predictions"]:
        scores = [p["score"] for p in row]
        assert len(scores) == 4
        assert all(s is not None and 0 <= s <= 1 for s in scores)
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4


def test_stored_unservable_rows_break_no_read_path(
    tmp_path: Path, trained: bytes, tiny: Tiny
) -> None:
    """Every case put straight into the store (no checks), as a store from before may hold it."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    settings = store_settings(tmp_path / "home", url)
    reg = Registry.from_settings(settings)
    try:
        for i, (_, edit, _) in enumerate(CASES):
            adapter, data = mutated(trained, tiny, edit)
            adapter.meta.task = f"bad{i}"
            data = encode_adapter(adapter)
            digest = sha256_hex(data)
            reg.blobs.put(data, digest)
            reg._insert(adapter, digest, len(data), tiny[1], None)  # bypasses every check
    finally:
        reg.close()
    with serving(settings) as client:
        assert client.get("/catalog").status_code == 200
        assert client.get("/catalog?limit=5&offset=5").status_code == 200
        page = client.get("/adapters?limit=1000")
        assert page.status_code == 200 and page.json()["total"] == len(CASES)
        for i, (name, _, rule) in enumerate(CASES):
            assert client.get(f"/adapters/bad{i}").status_code == 200, name
            assert client.get(f"/adapters/bad{i}/versions/1").status_code == 200, name
            r = client.post(f"/predict?task=bad{i}", files=IMAGES[:1])
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert r.json()["error"]["message"].startswith(f"[{rule}]"), (name, r.text)
