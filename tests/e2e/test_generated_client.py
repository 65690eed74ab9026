"""A client generated from the live ``/openapi.json`` by a third-party generator
(openapi-python-client) works: it registers, predicts and gets typed answers, and an unknown task
or a bad parameter comes back as the declared, typed error instead of "unexpected status".
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from tests.conftest import ADMIN_TOKEN, png_bytes

PACKAGE = "deltaclip_generated"
CLASSES = ["cat", "dog", "bird"]


def generate(url: str, where: Path) -> Any:
    """Generate the client package from the server's document; import and return it."""
    document = where / "openapi.json"
    document.write_bytes(httpx.get(f"{url}/openapi.json").content)
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bin_dir / "openapi-python-client"), "generate", "--path", str(document),
         "--meta", "none", "--output-path", str(where / PACKAGE)],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # The generator skips what it cannot type and says so: a complete document draws no warning.
    assert "warning" not in output.lower(), output
    sys.path.insert(0, str(where))
    try:
        return importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(where))


def test_a_generated_client_predicts_and_gets_typed_answers_and_errors(
    live_server: str, tiny, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    gen = generate(live_server, tmp_path)
    try:
        api = importlib.import_module(f"{PACKAGE}.api")
        models = importlib.import_module(f"{PACKAGE}.models")
        types = importlib.import_module(f"{PACKAGE}.types")
        admin_api = importlib.import_module(f"{PACKAGE}.api.admin.upload")
        predict_api = importlib.import_module(f"{PACKAGE}.api.predict.predict")
        health_api = importlib.import_module(f"{PACKAGE}.api.health.base")
        assert api is not None

        admin = gen.AuthenticatedClient(base_url=live_server, token=ADMIN_TOKEN,
                                        raise_on_unexpected_status=True)  # fmt: skip
        plain = gen.Client(base_url=live_server, raise_on_unexpected_status=True)

        data = encode_adapter(random_adapter(*tiny, "gen-t", class_names=CLASSES))
        upload = models.UploadBody(
            file=types.File(payload=io.BytesIO(data), file_name="a.safetensors")
        )
        registered = admin_api.sync_detailed(client=admin, body=upload)
        assert registered.status_code == 201
        assert isinstance(registered.parsed, models.Registration)
        assert (registered.parsed.task, registered.parsed.version) == ("gen-t", 1)

        images = [types.File(payload=io.BytesIO(png_bytes(i)), file_name=f"{i}.png",
                             mime_type="image/png") for i in range(2)]  # fmt: skip
        answer = predict_api.sync_detailed(
            client=plain, body=models.PredictFilesBody(file=images), task="gen-t", top_k=2
        )
        assert answer.status_code == 200
        prediction = answer.parsed
        assert isinstance(prediction, models.Prediction)
        assert (prediction.task, prediction.version) == ("gen-t", 1)
        assert prediction.digest == registered.parsed.digest
        assert len(prediction.predictions) == 2
        for row in prediction.predictions:
            assert len(row) == 2 and all(isinstance(label, models.Label) for label in row)
            assert {label.label for label in row} <= set(CLASSES)
            assert all(0 <= label.score <= 1 for label in row)

        missing = predict_api.sync_detailed(client=plain, body=models.PredictFilesBody(file=images[:1]),
                                            task="ghost")  # fmt: skip
        assert missing.status_code == 404
        assert isinstance(missing.parsed, models.ErrorBody)
        assert missing.parsed.error.code == "adapter_not_found"
        assert "ghost" in missing.parsed.error.message

        bad = predict_api.sync_detailed(client=plain, body=models.PredictFilesBody(file=images[:1]),
                                        task="gen-t", top_k=0)  # fmt: skip
        assert bad.status_code == 422
        assert isinstance(bad.parsed, models.ErrorBody)
        assert bad.parsed.error.code == "invalid_request" and "top_k" in bad.parsed.error.message

        status = health_api.sync(client=plain)
        assert isinstance(status, models.BaseStatus) and status.unchanged and status.swaps >= 1
    finally:
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]
