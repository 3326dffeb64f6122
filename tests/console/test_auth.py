"""Signing in to the console and the anti-forgery checks, over real HTTP (no browser)."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from leveret.consumer.api import ApiSettings, create_app
from leveret.consumer.console.auth import COOKIE, Signer
from tests.api.conftest import TOKEN, Served, serve
from tests.console.conftest import console_worker
from tests.support import Broker

PAGES = ("/ui/queues", "/ui/jobs", "/ui/dead", "/ui/dead/api_email", "/ui/schedules")


def signed_in(served: Served) -> httpx.Client:
    client = httpx.Client(base_url=served.url, timeout=30)
    r = client.post("/ui/login", data={"token": TOKEN}, headers={"origin": served.url})
    assert r.status_code == 303, r.text
    return client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no anti-forgery token on the page"
    return match[1]


def test_signer_rejects_tampered_expired_and_foreign_cookies() -> None:
    signer = Signer("s3cret", ttl_s=60)
    cookie = signer.new_cookie(now=1000)
    assert signer.session(cookie, now=1010) is not None
    assert signer.session(cookie, now=1061) is None  # expired
    payload, _, mac = cookie.partition(".")
    assert signer.session(payload + "x." + mac, now=1010) is None  # payload changed
    assert signer.session(Signer("other").new_cookie(now=1000), now=1010) is None  # other key
    assert signer.session("garbage", now=1010) is None
    session = signer.session(cookie, now=1010)
    assert session is not None
    assert signer.csrf_ok(session, signer.csrf(session))
    assert not signer.csrf_ok(session, Signer("other").csrf(session))
    assert not signer.csrf_ok(session, "")
    assert signer.check_token(" s3cret ") and not signer.check_token("s3cre")


def test_pages_need_sign_in_and_the_cookie_is_httponly_strict(console: Served) -> None:
    anon = httpx.Client(base_url=console.url, timeout=30)
    for page in PAGES:
        r = anon.get(page)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
    # htmx polling without a session is told where to go, not handed a login page to swap in
    r = anon.get("/ui/queues", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["hx-redirect"] == "/ui/login"
    # the bearer token is not a console session, and the console cookie is not an API token
    assert anon.get("/ui/queues", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 303
    wrong = anon.post("/ui/login", data={"token": "nope"}, headers={"origin": console.url})
    assert wrong.status_code == 401 and COOKIE not in wrong.cookies
    r = anon.post("/ui/login", data={"token": TOKEN}, headers={"origin": console.url})
    assert r.status_code == 303
    set_cookie = r.headers["set-cookie"].lower()
    for attribute in ("httponly", "samesite=strict", "path=/ui", "max-age="):
        assert attribute in set_cookie
    client = signed_in(console)
    for page in PAGES:
        r = client.get(page)
        assert r.status_code == 200, (page, r.text[:300])
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
    assert client.get("/jobs/whatever").status_code == 401  # the API still wants its bearer
    assert anon.get("/healthz").status_code == 200


def test_state_changing_requests_need_csrf_and_own_origin(console: Served) -> None:
    client = signed_in(console)
    page = client.get("/ui/dead/api_email/purge")
    token = csrf_of(page.text)
    url = "/ui/dead/api_email/purge"
    form: dict[str, Any] = {"confirm": "api_email"}
    own = {"origin": console.url}
    # no token, a wrong token, a foreign origin, no origin at all: refused, nothing purged
    assert client.post(url, data=form, headers=own).status_code == 403
    assert client.post(url, data={**form, "csrf": "x" * 43}, headers=own).status_code == 403
    evil = {"origin": "https://evil.example"}
    assert client.post(url, data={**form, "csrf": token}, headers=evil).status_code == 403
    assert client.post(url, data={**form, "csrf": token}).status_code == 403
    # a foreign sign-in form cannot log a victim into an attacker's session either
    r = httpx.post(f"{console.url}/ui/login", data={"token": TOKEN}, headers=evil)
    assert r.status_code == 403
    # the same request from our own page goes through (header form, as htmx would send it)
    r = client.post(url, data=form, headers={**own, "x-csrf-token": token})
    assert r.status_code == 303 and "msg=Purged" in r.headers["location"]
    # signing out needs the token too, and ends the session
    assert client.post("/ui/logout", headers=own).status_code == 403
    assert client.post("/ui/logout", data={"csrf": token}, headers=own).status_code == 303
    client.cookies.clear()
    assert client.get("/ui/queues").status_code == 303


@pytest.mark.parametrize("page", PAGES)
def test_pages_render_fast(console: Served, page: str) -> None:
    """Server time (the Server-Timing header) under 200 ms, the median of five."""
    client = signed_in(console)
    client.get(page)  # warm: first management/broker connection, template compile
    times = []
    for _ in range(5):
        r = client.get(page)
        assert r.status_code == 200
        times.append(float(r.headers["server-timing"].split("dur=")[1]))
    times.sort()
    print(f"{page}: median {times[2]:.1f} ms, max {times[-1]:.1f} ms")
    assert times[2] < 200, times


def test_no_ui_leaves_ui_to_the_bearer_check(broker: Broker) -> None:
    app = create_app(
        console_worker(broker),
        ApiSettings(api_token=TOKEN),
        registry=CollectorRegistry(),
        metrics_port=0,
        ui=False,
    )
    with serve(app) as served:
        assert httpx.get(f"{served.url}/ui/queues").status_code == 401
        r = httpx.get(f"{served.url}/ui/queues", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404
    time.sleep(0)
