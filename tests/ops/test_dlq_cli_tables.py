"""`leveret dlq list` shows the error column however stdout looks; `purge` guards "everything"."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import aio_pika

from tests.ops.helpers import days_ago, declare_queue, drain, fill_dlq
from tests.support import Broker, leveret_cli, unique

LONG_ERROR = (
    "ConnectTimeout: the payment gateway at https://pay.example.com/v2/charges did not answer "
    "within 30 s after 3 attempts; last status was 504 Gateway Timeout (request 7f3c9a)"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def env(broker: Broker) -> dict[str, str]:
    return {"LEVERET_AMQP_URL": broker.url}


async def dead_with_long_error(broker: Broker, queue: str) -> None:
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(
                b"{}",
                message_id="long-error-job",
                type="charge",
                headers={
                    "x-reason": "exhausted",
                    "x-error": LONG_ERROR,
                    "x-attempts": 3,
                    "x-died-at": "2026-01-02T03:04:05.678+00:00",
                    "x-queue": queue,
                },
            ),
            routing_key=f"{queue}.dlq",
        )
    finally:
        await connection.close()


async def test_the_table_shows_the_whole_error_off_a_terminal(broker: Broker) -> None:
    """Piped stdout: a header with ERROR and every row's full error, one line per job."""
    queue = unique("tbl")
    await declare_queue(broker.url, queue)
    sent = await fill_dlq(broker.url, queue, 3)
    await dead_with_long_error(broker, queue)

    result = leveret_cli("dlq", "list", queue, env={**env(broker), "COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "JOB", "ATTEMPTS", "REASON", "DIED", "AT", "ERROR"]
    assert len(lines) == 5
    for line, dead in zip(lines[1:4], sent, strict=True):
        assert line.split()[0] == dead.id
        assert line.endswith(dead.headers["x-error"])
    assert lines[4].split()[0] == "long-error-job"
    assert lines[4].endswith(LONG_ERROR)


def test_a_narrow_terminal_folds_the_error_rather_than_dropping_it(
    broker: Broker,
) -> None:
    """On a 60-column terminal the error folds onto more lines; every character is there."""
    queue = unique("narrow")
    asyncio.run(declare_queue(broker.url, queue))
    asyncio.run(dead_with_long_error(broker, queue))

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    exe = Path(sys.executable).parent / "leveret"
    process = subprocess.Popen(
        [str(exe), "dlq", "list", queue],
        stdout=slave,
        stderr=subprocess.PIPE,
        env={
            **{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
            **env(broker),
            "TERM": "xterm",  # rich gives a "dumb" terminal 80 columns whatever its size
        },
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
    screen = ANSI.sub("", b"".join(chunks).decode()).replace("\r", "")
    lines = screen.splitlines()
    assert "ERROR" in lines[0]
    assert all(len(line) <= 60 for line in lines), screen
    assert "…" not in screen
    assert len(lines) > 2  # folded onto several lines
    # The ERROR column, read down the screen, holds the whole error.
    start = lines[0].index("ERROR")
    column = "".join(line[start:] for line in lines[1:])
    assert "".join(column.split()) == "".join(LONG_ERROR.split()), screen


async def test_purge_of_everything_needs_yes_without_a_terminal(broker: Broker) -> None:
    """No filter, no terminal, no --yes: refused, nothing deleted; --dry-run only counts."""
    queue = unique("guard")
    await declare_queue(broker.url, queue)
    await fill_dlq(broker.url, queue, 5)

    refused = leveret_cli("dlq", "purge", queue, env=env(broker), stdin="")
    assert refused.returncode != 0
    assert "--yes" in refused.stderr
    assert refused.stdout == ""
    assert await broker.depth(f"{queue}.dlq") == 5

    dry = leveret_cli("dlq", "purge", queue, "--dry-run", env=env(broker))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == "5\n"
    assert await broker.depth(f"{queue}.dlq") == 5

    everything = leveret_cli("dlq", "purge", queue, "--yes", env=env(broker))
    assert everything.stdout == "5\n", everything.stderr
    assert await broker.depth(f"{queue}.dlq") == 0


async def test_purge_has_the_filters_and_dry_run_of_replay(broker: Broker) -> None:
    """--job, --reason, --older-than and --limit combine; --dry-run deletes nothing."""
    queue = unique("pflt")
    await declare_queue(broker.url, queue)
    sent = await fill_dlq(
        broker.url, queue, 40,
        job=lambda i: "job_a" if i % 2 else "job_b",
        reason=lambda i: "rejected" if i % 3 == 0 else "exhausted",
        died=lambda i: days_ago(10) if i < 30 else days_ago(0),
    )  # fmt: skip
    wanted = [
        s for i, s in enumerate(sent)
        if s.job == "job_a" and s.headers["x-reason"] == "rejected" and i < 30
    ]  # fmt: skip
    args = ("dlq", "purge", queue, "--job", "job_a", "--reason", "rejected", "--older-than", "7d")

    dry = leveret_cli(*args, "--dry-run", env=env(broker))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == f"{len(wanted)}\n"
    assert await broker.depth(f"{queue}.dlq") == 40

    first = leveret_cli(*args, "--limit", "2", env=env(broker))
    assert first.stdout == "2\n", first.stderr
    rest = leveret_cli(*args, env=env(broker))
    assert rest.stdout == f"{len(wanted) - 2}\n", rest.stderr

    left = await drain(broker.url, f"{queue}.dlq")
    assert [m.id for m in left] == [s.id for s in sent if s not in wanted]
