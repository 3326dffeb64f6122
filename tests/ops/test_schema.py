"""`leveret topology schema`: JSON Schema and AsyncAPI that accept what the worker accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from tests.ops.helpers import app_module
from tests.support import leveret_cli

DATA = Path(__file__).parent / "data"

APP = '''
    from enum import Enum
    from pydantic import BaseModel, Field
    from leveret.consumer import Worker

    worker = Worker()

    class Address(BaseModel):
        street: str
        city: str

    class Kind(str, Enum):
        welcome = "welcome"
        reset = "reset"

    class Email(BaseModel):
        """An e-mail to send."""
        to: str
        subject: str = Field(max_length=20)
        kind: Kind = Kind.welcome
        retries: int = Field(default=0, ge=0, le=5)
        address: Address | None = None
        tags: list[str] = []

    class Resize(BaseModel):
        image: str
        width: int
        home: Address

    @worker.job("send_email", queue="email")
    async def send_email(email: Email) -> None:
        """Sends one e-mail."""

    @worker.job("resize", queue="images")
    def resize(job: Resize) -> None:
        pass

    @worker.job("raw", queue="images")
    async def raw(payload: dict[str, int]) -> None:
        pass
'''

GOOD: dict[str, list[dict[str, Any]]] = {
    "send_email": [
        {"to": "a@b.c", "subject": "hi"},
        {"to": "a@b.c", "subject": "hi", "kind": "reset", "retries": 5,
         "address": {"street": "1 Main St", "city": "Oslo"}, "tags": ["x"]},
        {"to": "a@b.c", "subject": "hi", "address": None},
    ],
    "resize": [{"image": "a.png", "width": 10, "home": {"street": "s", "city": "c"}}],
    "raw": [{}, {"a": 1, "b": 2}],
}  # fmt: skip
BAD: dict[str, list[dict[str, Any]]] = {
    "send_email": [
        {"subject": "hi"},
        {"to": "a@b.c", "subject": "x" * 21},
        {"to": "a@b.c", "subject": "hi", "kind": "spam"},
        {"to": "a@b.c", "subject": "hi", "retries": 6},
        {"to": "a@b.c", "subject": "hi", "address": {"street": "s"}},
        {"to": 5, "subject": "hi"},
    ],
    "resize": [{"image": "a.png", "width": "wide", "home": {"street": "s", "city": "c"}},
               {"image": "a.png", "width": 3}],
    "raw": [{"a": "one"}],
}  # fmt: skip


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Any]:
    """The app on disk, its schemas written with --out, and the loaded worker."""
    folder = tmp_path_factory.mktemp("schemaapp")
    with app_module(folder, APP, "schemaapp") as app:
        result = leveret_cli("topology", "schema", app, "--out", str(folder / "out"), cwd=folder)
        assert result.returncode == 0, result.stderr
    import importlib.util

    spec = importlib.util.spec_from_file_location("schemaapp_loaded", folder / "schemaapp.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return folder, module.worker


def _accepted_by_worker(worker, job: str, payload: dict[str, Any]) -> bool:
    try:
        worker.jobs.jobs[job].validate(json.dumps(payload).encode())
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("job", sorted(GOOD))
def test_job_schemas_validate_real_payloads_and_reject_bad_ones(generated, job):
    """Each job's JSON Schema accepts what the worker accepts and rejects what it rejects."""
    folder, worker = generated
    schema = json.loads((folder / "out" / f"{job}.schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    for payload in GOOD[job]:
        assert _accepted_by_worker(worker, job, payload)
        assert validator.is_valid(payload), payload
    for payload in BAD[job]:
        assert not _accepted_by_worker(worker, job, payload)
        assert not validator.is_valid(payload), payload


def test_asyncapi_document_is_valid_and_its_payloads_validate(generated):
    """The AsyncAPI document passes the official 2.6 schema; its message payloads validate."""
    folder, _ = generated
    document = json.loads((folder / "out" / "asyncapi.json").read_text())
    official = json.loads((DATA / "asyncapi-2.6.0.schema.json").read_text())
    jsonschema.Draft7Validator(official).validate(document)
    assert set(document["channels"]) == {"send_email", "resize", "raw", "jobs.delay.chain.*"}
    delayed = document["channels"]["jobs.delay.chain.*"]["description"]
    assert "jobs.delay.<ttl>" in delayed and "'+' for 1" in delayed
    binding = document["channels"]["send_email"]["bindings"]["amqp"]
    assert binding["exchange"]["name"] == "jobs" and binding["is"] == "routingKey"
    for job, good in GOOD.items():
        # Resolve the message's payload inside the document (refs point at components).
        pointer = {**document, "$ref": f"#/components/messages/{job}/payload"}
        validator = jsonschema.Draft202012Validator(pointer)
        assert all(validator.is_valid(p) for p in good), job
        assert not any(validator.is_valid(p) for p in BAD[job]), job


def test_schema_of_one_job_and_of_an_unknown_job(generated):
    """--job prints one schema to stdout; an unknown job is one clear line."""
    folder, _ = generated
    one = leveret_cli("topology", "schema", "schemaapp:worker", "--job", "resize", cwd=folder)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["required"] == ["image", "width", "home"]
    bad = leveret_cli("topology", "schema", "schemaapp:worker", "--job", "nope", cwd=folder)
    assert bad.returncode != 0 and "no job 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr
