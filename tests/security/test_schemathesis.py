"""Schemathesis over the OpenAPI schema against a live loopback server: a bounded number of
generated requests per operation (valid and invalid ones, with and without the admin token)
and not a single 5xx.
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from adapters_store.bases import BaseSignature
from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from tests.conftest import ADMIN_TOKEN

GenerationMode = schemathesis.GenerationMode

Tiny = tuple[nn.Module, BaseSignature]
EXAMPLES_PER_OPERATION = 60


def test_no_generated_request_gets_a_5xx(live_server: str, tiny: Tiny) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for task in ("t", "u"):
        data = encode_adapter(random_adapter(*tiny, task))
        r = httpx.post(f"{live_server}/admin/adapters", files={"file": ("a", data)}, headers=admin)
        assert r.status_code == 201, r.text
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    failures: list[str] = []
    statuses: dict[int, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=st.one_of(operation.as_strategy(mode) for mode in GenerationMode),
            with_token=st.booleans(),
        )
        def run(case: Any, with_token: bool) -> None:
            response = case.call(base_url=live_server, headers=admin if with_token else None, timeout=30)  # fmt: skip
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.operation.label} → {response.status_code}: {response.text[:200]}"
                )

        run()
    assert failures == [], failures[:10]
    assert httpx.get(f"{live_server}/readyz").status_code == 200
    assert httpx.post(f"{live_server}/admin/base/check", headers=admin).json()["unchanged"]
    assert sum(statuses.values()) >= len(operations) * 10, statuses
    print(
        f"\nschemathesis: {sum(statuses.values())} requests over {len(operations)} operations, statuses {dict(sorted(statuses.items()))}"
    )
