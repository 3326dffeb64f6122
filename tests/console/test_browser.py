"""The console in a real browser: Debian's Chromium driven by Playwright, against the API served
for real (broker, Redis). One signed-in page walks through the pages in order; every request the
browser makes is recorded and must stay on the console's origin (no CDN, no external asset).
Screenshots of each page go to docs/img/console-*.png (docs/console.md shows them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from tests.api.conftest import TOKEN, Served
from tests.console.conftest import IMG
from tests.ops.helpers import fill_dlq
from tests.support import Broker

T = TypeVar("T")
WAIT_MS = 20_000  # the management API's statistics refresh every 5 s


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a loop of its own thread (Playwright's sync API owns this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result(60)  # type: ignore[arg-type]


class Recorder:
    def __init__(self) -> None:
        self.urls: list[str] = []


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def page(browser: Any, console: Served, recorder: Recorder) -> Iterator[Any]:
    context = browser.new_context(
        viewport={"width": 1280, "height": 800},
        timezone_id="Asia/Tokyo",  # times must show in the viewer's zone, not the server's
        locale="en-GB",
    )
    context.on("request", lambda request: recorder.urls.append(request.url))
    p = context.new_page()
    p.set_default_timeout(WAIT_MS)
    yield p
    context.close()


def shot(page: Any, name: str) -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMG / f"console-{name}.png"), full_page=True)


def ready_count(page: Any, queue: str) -> str:
    return str(page.locator(f'tr[data-queue="{queue}"] td[data-col="ready"]').inner_text())


def test_sign_in(page: Any, console: Served) -> None:
    from playwright.sync_api import expect

    page.goto(f"{console.url}/ui/queues")
    expect(page).to_have_url(f"{console.url}/ui/login?next=%2Fui%2Fqueues")
    shot(page, "login")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    expect(page.locator(".flash.bad")).to_have_text("Wrong token.")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{console.url}/ui/queues")
    cookie = next(c for c in page.context.cookies() if c["name"] == "leveret-console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert page.evaluate("document.cookie") == ""  # scripts cannot read the session


def test_queue_figures_update_live(page: Any, console: Served, broker: Broker) -> None:
    from playwright.sync_api import expect

    page.goto(f"{console.url}/ui/queues")
    row = page.locator('tr[data-queue="api_misc"]')
    expect(row.locator("th")).to_have_text("api_misc")
    # The true depth now (a passive declare, in a thread: this test's loop is Playwright's):
    # the page's first figure may be the management API's stale one from before the purge.
    with ThreadPoolExecutor(1) as pool:
        before = pool.submit(asyncio.run, broker.depth("api_misc")).result()
    page.evaluate("window.__sameDocument = true")  # a reload would clear it
    with console.client() as api:
        for i in range(3):
            assert api.post("/jobs/free_form", json={"n": i}).status_code == 202
    expect(row.locator('td[data-col="ready"]')).to_have_text(str(before + 3), timeout=WAIT_MS)
    assert page.evaluate("window.__sameDocument") is True  # htmx swapped it in, no reload
    # times are the viewer's: the server wrote UTC, the browser shows Tokyo's wall clock
    updated = page.locator("#live time").first
    assert updated.get_attribute("datetime", timeout=WAIT_MS).endswith("Z")
    shot(page, "queues")


def test_dead_letters_open_replay_purge(page: Any, console: Served, broker: Broker) -> None:
    from playwright.sync_api import expect

    prefix = f"dead-{uuid.uuid4().hex[:6]}"
    sent = run_async(lambda: fill_dlq(broker.url, "api_email", 3, job="send_email", prefix=prefix))
    page.goto(f"{console.url}/ui/dead")
    expect(page.locator('[data-depth="api_email"]')).to_contain_text("3", timeout=WAIT_MS)
    page.click("text=api_email")
    expect(page).to_have_url(f"{console.url}/ui/dead/api_email")
    rows = page.locator("#dead tbody tr")
    expect(rows).to_have_count(3)
    first = rows.nth(0)
    expect(first).to_contain_text("exhausted")
    expect(first).to_contain_text("ValueError: boom number 0")
    first.locator("summary").click()  # open the dead job: its payload and error
    expect(first.locator("details pre").first).to_contain_text('"text": "payload 0"')
    shot(page, "dead")
    first.locator("button", has_text="Replay").click()
    expect(page.locator(".flash.ok")).to_have_text("Replayed 1 job(s) to api_email.")
    expect(rows).to_have_count(2)
    assert sent[0].id not in page.locator("#dead").inner_text()
    assert run_async(lambda: broker.depth("api_email")) >= 1  # it is back on its queue
    page.click("#purge")
    expect(page.locator("h1")).to_have_text("Purge api_email.dlq?")
    shot(page, "purge")
    page.fill("#confirm", "api_images")  # the wrong name: nothing happens
    page.click("button.danger")
    expect(page.locator(".flash.bad")).to_have_text("type the queue's name to confirm")
    page.fill("#confirm", "api_email")
    page.click("button.danger")
    expect(page.locator(".flash.ok")).to_have_text("Purged 2 dead job(s).")
    expect(page.locator(".empty h2")).to_have_text("No dead jobs")
    assert run_async(lambda: broker.depth("api_email.dlq")) == 0


def test_search_a_job_and_cancel_it(page: Any, console: Served) -> None:
    from playwright.sync_api import expect

    page.goto(f"{console.url}/ui/jobs")
    expect(page.locator("#jobs-empty h2")).to_have_text("Job history is off")
    shot(page, "jobs")
    with console.client() as api:
        job_id = api.post("/jobs/resize", json={"width": 10, "height": 20}).json()["id"]
    page.fill("header .find input", job_id)
    page.press("header .find input", "Enter")
    expect(page.locator("h1")).to_have_text(job_id)
    expect(page.locator("#job-state")).to_have_text("queued")
    expect(page.locator("dl.facts")).to_contain_text("resize")
    shot(page, "job")
    page.click("text=Cancel job")
    expect(page.locator(".flash.ok")).to_have_text("Cancellation requested.")


def test_schedules(page: Any, console: Served) -> None:
    from playwright.sync_api import expect

    page.goto(f"{console.url}/ui/schedules")
    table = page.locator("#schedules")
    expect(table).to_contain_text("hourly_report")
    expect(table).to_contain_text("0 3 * * *")
    expect(table).to_contain_text("Europe/Paris")
    next_fire = table.locator("tbody tr").first.locator("time").first
    assert next_fire.get_attribute("datetime", timeout=WAIT_MS).endswith("Z")
    expect(next_fire).to_contain_text("(in ")  # converted by the package's script
    shot(page, "schedules")


def test_every_request_stayed_on_the_console(recorder: Recorder, console: Served) -> None:
    assert recorder.urls, "the browser made no request"
    foreign = [u for u in recorder.urls if not u.startswith(console.url + "/")]
    assert not foreign, foreign
    assert any(u.endswith("/ui/static/htmx-2.0.11.min.js") for u in recorder.urls)
    polls = [u for u in recorder.urls if u.endswith("/ui/queues")]
    assert len(polls) >= 2  # the page load and at least one htmx poll
