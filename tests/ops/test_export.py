"""`leveret topology export` imports into a fresh vhost and yields what `declare` creates."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from yarl import URL

from leveret.topology.delay import DELAY_BITS
from tests.ops.helpers import app_module
from tests.support import leveret_cli, unique

APP = """
    from pydantic import BaseModel
    from leveret.consumer import Worker

    worker = Worker()

    class P(BaseModel):
        n: int

    @worker.job("resize", queue="{q1}")
    async def resize(p: P) -> None:
        pass

    @worker.job("thumbnail", queue="{q1}")
    async def thumbnail(p: P) -> None:
        pass

    @worker.job("mail", queue="{q2}")
    async def mail(p: P) -> None:
        pass
"""


@contextlib.contextmanager
def fresh_vhost(broker) -> Iterator[str]:
    name = unique("vh")
    broker.api("PUT", f"/vhosts/{name}").raise_for_status()
    broker.api(
        "PUT", f"/permissions/{name}/{broker.user}",
        json={"configure": ".*", "write": ".*", "read": ".*"},
    ).raise_for_status()  # fmt: skip
    try:
        yield name
    finally:
        broker.api("DELETE", f"/vhosts/{name}")


def url_for(broker, vhost: str, user: str | None = None, password: str | None = None) -> str:
    return str(URL(broker.url).with_path("/" + vhost).with_user(user or broker.user)
               .with_password(password or broker.password))  # fmt: skip


def layout(broker, vhost: str) -> dict[str, list]:
    """Queues with arguments, exchanges and bindings of a vhost, without the built-in ones."""
    v = quote(vhost, safe="")
    queues = sorted(
        (q["name"], q["durable"], q["auto_delete"], json.dumps(q["arguments"], sort_keys=True))
        for q in broker.api("GET", f"/queues/{v}").json()
    )
    exchanges = sorted(
        (e["name"], e["type"], e["durable"], e["auto_delete"], e["internal"])
        for e in broker.api("GET", f"/exchanges/{v}").json()
        if e["name"] and not e["name"].startswith("amq.")
    )
    bindings = sorted(
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in broker.api("GET", f"/bindings/{v}").json()
        if b["source"]
    )
    return {"queues": queues, "exchanges": exchanges, "bindings": bindings}


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_export_imports_into_a_fresh_vhost_with_the_declared_layout(broker, tmp_path, queue_type):
    """Importing the export via POST /api/definitions/{vhost} matches `topology declare`."""
    source = APP.replace("{q1}", unique("img")).replace("{q2}", unique("mail"))
    with app_module(tmp_path, source, f"exportapp_{queue_type}") as app, \
            fresh_vhost(broker) as declared, fresh_vhost(broker) as imported:  # fmt: skip
        env = {"LEVERET_QUEUE_TYPE": queue_type}
        to_a = {**env, "LEVERET_AMQP_URL": url_for(broker, declared)}
        result = leveret_cli("topology", "declare", app, cwd=tmp_path, env=to_a)
        assert result.returncode == 0, result.stderr
        to_b = {**env, "LEVERET_AMQP_URL": url_for(broker, imported)}
        exported = leveret_cli("topology", "export", app, "--vhost", imported, cwd=tmp_path,
                               env=to_b)  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        document = json.loads(exported.stdout)
        assert set(document) == {"exchanges", "queues", "bindings"}
        response = broker.api("POST", f"/definitions/{imported}", json=document)
        assert response.status_code in (200, 201, 204), response.text

        a, b = layout(broker, declared), layout(broker, imported)
        # Per work queue: itself and its DLQ; one delay queue per bit for the exchange.
        assert a["queues"] and len(a["queues"]) == 2 * 2 + DELAY_BITS
        assert len(a["bindings"]) > 2 * DELAY_BITS
        assert a == b


def test_export_with_users_gives_a_user_just_enough_permissions(broker, tmp_path):
    """--with-vhost --with-users defines a vhost and a least-privilege user the app can run as."""
    queue = unique("perm")
    source = APP.replace("{q1}", queue).replace("{q2}", unique("mail"))
    vhost, user, password = unique("vhu"), unique("user"), "s3cret-pw"
    with app_module(tmp_path, source, "userapp") as app:
        try:
            exported = leveret_cli(
                "topology", "export", app, "--vhost", vhost, "--with-vhost", "--with-users",
                cwd=tmp_path, env={"LEVERET_AMQP_URL": url_for(broker, vhost, user, password)},
            )  # fmt: skip
            assert exported.returncode == 0, exported.stderr
            assert password not in exported.stdout
            document = json.loads(exported.stdout)
            assert document["vhosts"] == [{"name": vhost}]
            assert [u["name"] for u in document["users"]] == [user]
            response = broker.api("POST", "/definitions", json=document)
            assert response.status_code in (200, 201, 204), response.text

            as_user = {"LEVERET_AMQP_URL": url_for(broker, vhost, user, password)}
            declared = leveret_cli("topology", "declare", app, cwd=tmp_path, env=as_user)
            assert declared.returncode == 0, declared.stderr
            published = leveret_cli("publish", "resize", '{"n": 1}', env=as_user)
            assert published.returncode == 0, published.stderr
            listed = leveret_cli("dlq", "list", queue, env=as_user)
            assert listed.returncode == 0, listed.stderr
            granted = broker.api("GET", f"/permissions/{vhost}/{user}").json()
            assert granted["configure"] == document["permissions"][0]["configure"]
            assert granted["configure"] != ".*"
        finally:
            broker.api("DELETE", f"/vhosts/{vhost}")
            broker.api("DELETE", f"/users/{user}")
