"""Which asyncio event loop to run: ``auto`` (uvloop when importable), ``asyncio`` or ``uvloop``.

Like uvicorn's ``--loop``: uvloop cuts the per-message CPU of the AMQP client (the worker's and
the publisher's limit on a busy machine; see bench/), and ``auto`` takes it wherever it is
installed (a core dependency on CPython/Linux), so nobody has to know about it. ``asyncio`` is
the escape hatch for a library that misbehaves under uvloop, or to compare.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from typing import Literal

from leveret.topology.errors import LeveretError

LoopChoice = Literal["auto", "asyncio", "uvloop"]
LOOP_CHOICES: tuple[LoopChoice, ...] = ("auto", "asyncio", "uvloop")


class LoopUnavailable(LeveretError):
    """``uvloop`` was asked for and cannot be imported here."""


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: str) -> Literal["asyncio", "uvloop"]:
    """The loop ``choice`` means on this machine; raises ``LoopUnavailable`` for a missing
    uvloop asked for by name (silently falling back would hide a broken install)."""
    if choice not in LOOP_CHOICES:
        raise LoopUnavailable(f"unknown event loop {choice!r}: choose one of auto, asyncio, uvloop")
    if choice == "auto":
        return "uvloop" if uvloop_available() else "asyncio"
    if choice == "uvloop" and not uvloop_available():
        raise LoopUnavailable(
            "--loop uvloop: uvloop is not installed here (pip install uvloop; it has no "
            "Windows or PyPy build), or use --loop asyncio"
        )
    return choice


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function making a new loop of the resolved kind (for ``asyncio.Runner``, threads)."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def install(choice: str) -> str:
    """Make ``asyncio.run`` create loops of the resolved kind in this process; returns its name.

    Through the event loop policy, so a command's existing ``asyncio.run`` picks it up.
    """
    resolved = resolve(choice)
    if resolved == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    return resolved


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what a running loop really is (what the log line says)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
