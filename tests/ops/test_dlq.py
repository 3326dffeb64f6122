"""`leveret dlq list|replay|purge` against a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.ops.helpers import days_ago, declare_queue, drain, fill_dlq
from tests.support import assert_queue_types, leveret_cli, unique, wait_for

REPLAY_DROPPED = {"x-attempts", "x-reason", "x-error", "x-died-at", "x-redeliveries", "x-queue"}


def env(broker) -> dict[str, str]:
    return {"LEVERET_AMQP_URL": broker.url}


async def test_listing_leaves_the_dlq_unchanged(broker):
    """Listing shows every dead job and leaves ids, order, headers and bodies as they were."""
    queue = unique("list")
    await declare_queue(broker.url, queue)
    sent = await fill_dlq(broker.url, queue, 1200, job=lambda i: "job_b" if i % 7 == 0
                          else "job_a")  # fmt: skip

    result = leveret_cli("dlq", "list", queue, "--json", env=env(broker))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in sent]
    assert rows[7] == {
        "id": sent[7].id, "job": "job_b", "attempts": 3, "reason": "exhausted",
        "error": "ValueError: boom number 7", "died_at": sent[7].headers["x-died-at"],
    }  # fmt: skip
    # A second listing sees exactly the same thing, and the table form works on the same data.
    again = leveret_cli("dlq", "list", queue, "--json", env=env(broker))
    assert again.stdout == result.stdout
    table = leveret_cli("dlq", "list", queue, "--limit", "3", env=env(broker))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "JOB", "ATTEMPTS", "REASON"]
    assert [line.split()[0] for line in lines[1:]] == [s.id for s in sent[:3]]

    after = await drain(broker.url, f"{queue}.dlq")
    assert [m.id for m in after] == [s.id for s in sent]
    assert [m.body for m in after] == [s.body for s in sent]
    assert [m.headers for m in after] == [s.headers for s in sent]
    assert [m.job for m in after] == [s.job for s in sent]


async def test_replay_of_one_id_moves_only_that_job_with_attempts_reset(broker):
    """Replaying one id moves just that job to Q, same id and body, bookkeeping headers gone."""
    queue = unique("one")
    await declare_queue(broker.url, queue)
    sent = await fill_dlq(broker.url, queue, 20)
    target = sent[11]

    result = leveret_cli("dlq", "replay", queue, "--id", target.id, env=env(broker))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n"

    moved = await drain(broker.url, queue)
    assert [m.id for m in moved] == [target.id]
    assert moved[0].body == target.body
    assert moved[0].job == target.job
    assert not REPLAY_DROPPED & set(moved[0].headers)
    assert moved[0].headers == {"trace-id": "trace-11"}
    assert moved[0].redelivered is False
    left = await drain(broker.url, f"{queue}.dlq")
    assert [m.id for m in left] == [s.id for s in sent if s is not target]


async def test_replay_filters_combine_and_dry_run_moves_nothing(broker):
    """--job and --reason select jobs matching both; --dry-run only counts; --limit caps."""
    queue = unique("filt")
    await declare_queue(broker.url, queue)
    sent = await fill_dlq(
        broker.url, queue, 60,
        job=lambda i: "job_a" if i % 2 else "job_b",
        reason=lambda i: "rejected" if i % 3 == 0 else "exhausted",
    )  # fmt: skip
    wanted = [s for s in sent if s.job == "job_a" and s.headers["x-reason"] == "rejected"]
    args = ("dlq", "replay", queue, "--job", "job_a", "--reason", "rejected")

    dry = leveret_cli(*args, "--dry-run", env=env(broker))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == f"{len(wanted)}\n"
    assert await broker.depth(queue) == 0

    limited = leveret_cli(*args, "--limit", "2", env=env(broker))
    assert limited.stdout == "2\n", limited.stderr
    rest = leveret_cli(*args, env=env(broker))
    assert rest.stdout == f"{len(wanted) - 2}\n", rest.stderr

    moved = await drain(broker.url, queue)
    assert sorted(m.id for m in moved) == sorted(s.id for s in wanted)
    left = await drain(broker.url, f"{queue}.dlq")
    assert [m.id for m in left] == [s.id for s in sent if s not in wanted]


async def test_replay_of_all_moves_every_job(broker):
    """A replay without filters moves the whole DLQ to Q, in order, and leaves it empty."""
    queue = unique("all")
    await declare_queue(broker.url, queue)
    sent = await fill_dlq(broker.url, queue, 700)

    result = leveret_cli("dlq", "replay", queue, env=env(broker))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "700\n"
    assert await broker.depth(f"{queue}.dlq") == 0
    moved = await drain(broker.url, queue)
    assert sorted(m.id for m in moved) == [s.id for s in sent]
    assert all(not REPLAY_DROPPED & set(m.headers) for m in moved)


async def test_purge_with_and_without_filters(broker):
    """Purge by id and by age deletes only matches; purge --yes with no filter empties the DLQ."""
    queue = unique("purge")
    await declare_queue(broker.url, queue)
    sent = await fill_dlq(broker.url, queue, 30,
                          died=lambda i: days_ago(10) if i < 10 else days_ago(0))  # fmt: skip

    by_id = leveret_cli("dlq", "purge", queue, "--id", sent[20].id, "--id", sent[21].id,
                        "--yes", env=env(broker))  # fmt: skip
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == "2\n"
    old = leveret_cli("dlq", "purge", queue, "--older-than", "7d", "--yes", env=env(broker))
    assert old.stdout == "10\n", old.stderr
    left = [s.id for s in sent[10:] if s.id not in (sent[20].id, sent[21].id)]
    listed = leveret_cli("dlq", "list", queue, "--json", env=env(broker))
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == left

    everything = leveret_cli("dlq", "purge", queue, "--yes", env=env(broker))
    assert everything.stdout == f"{len(left)}\n", everything.stderr
    assert await broker.depth(f"{queue}.dlq") == 0


async def test_purge_without_a_terminal_deletes_without_asking(broker):
    """In a script (no terminal) purge needs no --yes: it deletes the matches, prints the count."""
    queue = unique("noask")
    await declare_queue(broker.url, queue)
    await fill_dlq(broker.url, queue, 3)
    [first, *_] = broker.get_messages(f"{queue}.dlq")

    result = leveret_cli(
        "dlq", "purge", queue, "--id", first["properties"]["message_id"], env=env(broker)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    assert await broker.depth(f"{queue}.dlq") == 2


async def test_dlq_of_unknown_queue_is_one_clear_line(broker):
    """Naming a queue without a DLQ fails with one line that says what to check."""
    result = leveret_cli("dlq", "list", unique("nope"), env=env(broker))
    assert result.returncode != 0
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    bad = leveret_cli("dlq", "purge", "x", "--older-than", "soon", "--yes", env=env(broker))
    assert bad.returncode != 0 and "duration" in bad.stderr


@pytest.mark.slow
async def test_replay_killed_midway_loses_nothing(broker, queue_type):
    """SIGKILL during a big replay leaves every job in Q or Q.dlq (duplicates allowed), with
    Q and Q.dlq classic or quorum: what the dead connection held goes back either way."""
    queue = unique("kill")
    await declare_queue(broker.url, queue, queue_type=queue_type)
    assert_queue_types(broker, queue, queue_type)
    total = 10_000
    started = time.monotonic()
    sent = await fill_dlq(broker.url, queue, total)
    fill_s = time.monotonic() - started
    exe = Path(sys.executable).parent / "leveret"
    proc = await asyncio.create_subprocess_exec(
        str(exe), "dlq", "replay", queue,
        env={**os.environ, **env(broker)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Kill it once a fifth has moved: well inside the replay (about 1,500 jobs/s here).
        await wait_for(
            lambda: _at_least(broker, queue, total // 5), 30, "the replay to be under way"
        )
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The broker requeues what the dead connection held; wait until nothing is unacked.
    await wait_for(
        lambda: not broker.api("GET", f"/vhosts/{broker.qvhost}/connections").json(),
        30, "the killed replay's connection to be gone",
    )  # fmt: skip
    in_queue = await drain(broker.url, queue)
    in_dlq = await drain(broker.url, f"{queue}.dlq")
    ids_q = {m.id for m in in_queue}
    ids_dlq = {m.id for m in in_dlq}
    assert ids_q | ids_dlq == {s.id for s in sent}, "a job was lost"
    assert 0 < len(ids_q) < total, f"kill was not midway: {len(ids_q)} of {total} moved"
    print(f"\n{queue_type}: fill {total} in {fill_s:.1f} s; killed after {len(ids_q)} moved, "
          f"{len(ids_q & ids_dlq)} duplicate(s), {len(ids_dlq)} left in DLQ")  # fmt: skip


async def _at_least(broker, queue: str, count: int) -> bool:
    return await broker.depth(queue) >= count
