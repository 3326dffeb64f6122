"""A schemathesis run against the served ``/openapi.json`` (authorized, real broker and Redis):
whatever it generates, the API never answers 5xx except the documented 503/501, and never 500.

Bounded: a fixed seed, few examples per operation, about a minute on a loaded machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from .conftest import TOKEN, RedisParts, build, serve, wait_connected


def _schemathesis() -> str:
    exe = Path(sys.executable).parent / "schemathesis"
    if exe.exists():
        return str(exe)
    found = shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed")
    return found


def test_the_openapi_document_has_one_typed_operation_per_job(broker, redis_parts) -> None:  # type: ignore[no-untyped-def]
    app = build(broker, redis_parts, CollectorRegistry())
    with serve(app) as served, served.client() as client:
        schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for job, model in (("send_email", "Email"), ("resize", "Resize")):
        body = paths[f"/jobs/{job}"]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert paths[f"/jobs/{job}"]["post"]["operationId"] == f"publish_{job}"
    assert schema["components"]["schemas"]["Email"]["required"] == ["to", "subject"]
    assert schema["components"]["schemas"]["Resize"]["properties"]["width"]["minimum"] == 1
    free = paths["/jobs/free_form"]["post"]["requestBody"]["content"]["application/json"]
    assert free["schema"]["type"] == "object"
    assert set(paths["/jobs/{job_id}"]) == {"get", "delete"}
    assert "post" in paths["/jobs/{job}"]
    assert paths["/healthz"]["get"]["security"] == []
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert {"202", "404", "413", "422", "503"} <= set(paths["/jobs/{job}"]["post"]["responses"])
    links = paths["/jobs/send_email"]["post"]["responses"]["202"]["links"]
    assert links["GetStatus"]["operationId"] == "get_status"


def test_schemathesis_finds_no_server_error(broker, redis_parts: RedisParts) -> None:  # type: ignore[no-untyped-def]
    app = build(broker, redis_parts, CollectorRegistry())
    with serve(app) as served:
        wait_connected(served)
        proc = subprocess.run(
            [
                _schemathesis(), "run", f"{served.url}/openapi.json",
                "--header", f"Authorization: Bearer {TOKEN}",
                "--checks", "not_a_server_error",
                "--max-examples", "15",
                "--seed", "1",
                "--workers", "1",
                "--phases", "examples,coverage,fuzzing,stateful",
            ],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        # Whatever it sent, the server is still up and still answering.
        assert httpx.get(f"{served.url}/healthz").status_code == 200
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    print(proc.stdout[-1500:])
