"""The lifecycle event vocabulary, shared by the worker that publishes events and their readers.

One module holds the state names, the routing keys, the body format and the result size rule so
that the side writing events and the side reading them can never disagree about the wire. The
body is the contract's ("Lifecycle" in docs/CONTRACT.md): a JSON object with ``job_id``, ``job``,
``queue``, ``state``, ``attempt``, ``at`` and, where they apply, ``duration_s``, ``error``,
``result``, ``progress``, ``message``. Other clients subscribe to ``<exchange>.events`` too, so
fields that do not apply are left out rather than sent as ``null``; ``result`` is the exception:
a ``succeeded`` event always carries it (``null`` for a handler that returned nothing).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from leveret.topology.errors import LeveretError
from leveret.topology.model import events_exchange_name

EventState = Literal["started", "progress", "succeeded", "retrying", "dead", "cancelled"]
EventsMode = Literal["outcomes", "all", "off"]

STARTED: Final = "started"
PROGRESS: Final = "progress"
SUCCEEDED: Final = "succeeded"
RETRYING: Final = "retrying"
DEAD: Final = "dead"
CANCELLED: Final = "cancelled"

EVENT_STATES: Final[tuple[EventState, ...]] = get_args(EventState)
# What the broker must confirm before the job's ack: these change where a job is.
OUTCOME_STATES: Final[frozenset[str]] = frozenset({SUCCEEDED, RETRYING, DEAD, CANCELLED})
# A job in one of these never runs again; a status that reached one is final.
TERMINAL_STATES: Final[frozenset[str]] = frozenset({SUCCEEDED, DEAD, CANCELLED})
# States that end a run and so carry ``duration_s`` (``cancelled`` only for a running job).
RUN_ENDING_STATES: Final[frozenset[str]] = frozenset({SUCCEEDED, RETRYING, DEAD, CANCELLED})

DEFAULT_RESULT_MAX_BYTES: Final = 65536
EVENTS_CONTENT_TYPE: Final = "application/json"

_MODE_STATES: Final[dict[str, frozenset[str]]] = {
    "off": frozenset(),
    "outcomes": OUTCOME_STATES | {PROGRESS},
    "all": OUTCOME_STATES | {PROGRESS, STARTED},
}


class InvalidEvent(LeveretError, ValueError):
    """An event body is not a lifecycle event this version understands.

    Raised by ``parse_event``; a reader (the history writer) logs it and acks the message
    instead of crashing.
    """


def events_exchange(exchange: str) -> str:
    """The topic exchange for events, named after the jobs exchange: ``jobs`` → ``jobs.events``."""
    return events_exchange_name(exchange)


def routing_key(job: str, state: str) -> str:
    """``<job>.<state>``: subscribers bind ``send_email.*`` or ``*.dead`` without parsing bodies."""
    return f"{job}.{state}"


def default_events_mode(history_url: str | None = None) -> EventsMode:
    """``off`` (v3): a job pays for events only where someone reads them; the status store
    does not need them (the worker writes statuses itself). A job history
    (``LEVERET_HISTORY_URL``) is built from the outcome events, so there it is ``outcomes``."""
    return "outcomes" if history_url else "off"


def publishes(mode: EventsMode, state: str) -> bool:
    """Whether a worker running with ``LEVERET_EVENTS=mode`` publishes an event for ``state``."""
    return state in _MODE_STATES[mode]


def is_outcome(state: str) -> bool:
    """Outcome events are confirmed before the job's ack; ``started``/``progress`` are not."""
    return state in OUTCOME_STATES


def rfc3339(moment: datetime) -> str:
    """``2026-11-29T08:15:04.123Z``: UTC, milliseconds, the ``Z`` form every parser takes."""
    if moment.tzinfo is None:
        raise ValueError("a lifecycle timestamp must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now() -> datetime:
    return datetime.now(UTC)


# The worker stamps one event per job: the second's text is made once per second, not per event.
_stamp: list[Any] = [-1, ""]  # [second, its "YYYY-MM-DDTHH:MM:SS"]


def now_rfc3339() -> str:
    """``rfc3339(now())``, the same text, at a fraction of the cost.

    Milliseconds are truncated as ``isoformat(timespec="milliseconds")`` truncates them.
    """
    return rfc3339_ns(time.time_ns())


def rfc3339_ns(epoch_ns: int) -> str:
    """``rfc3339`` of a ``time.time_ns()`` value, the second's text cached (see above)."""
    second, nanos = divmod(epoch_ns, 1_000_000_000)
    if second != _stamp[0]:
        _stamp[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp[0] = second
    return f"{_stamp[1]}.{nanos // 1_000_000:03d}Z"


# ``json.dumps`` with options builds a new encoder per call; one kept encoder does the same work.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedResult:
    """A handler's return value made JSON-ready, or ``None`` with the reason it was dropped.

    ``dropped`` is ``"too_large"`` or ``"not_json"``; the caller logs the warning (it knows the
    job and the logger), the job still succeeds.
    """

    value: JsonValue
    size: int
    dropped: Literal["too_large", "not_json"] | None = None


def encode_result(value: object, max_bytes: int = DEFAULT_RESULT_MAX_BYTES) -> EncodedResult:
    """Apply the contract's result rule: JSON (pydantic dumped), at most ``max_bytes`` encoded.

    The size counted is that of the compact UTF-8 JSON text, which is what travels in the event
    and sits in the status store.
    """
    try:
        if isinstance(value, BaseModel):
            jsonable: Any = value.model_dump(mode="json")
        else:
            # Handles nested models, dataclasses, datetimes, UUIDs ... the way pydantic would.
            jsonable = to_jsonable_python(value)
        text = json.dumps(jsonable, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (PydanticSerializationError, TypeError, ValueError):
        return EncodedResult(None, 0, "not_json")
    size = len(text.encode())
    if size > max_bytes:
        return EncodedResult(None, size, "too_large")
    return EncodedResult(json.loads(text), size)


# --- bodies -----------------------------------------------------------------------------------


class JobEvent(BaseModel):
    """A parsed lifecycle event. Unknown fields are ignored: a newer worker may add some."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    job_id: str = Field(min_length=1)
    job: str = Field(min_length=1)
    queue: str
    state: EventState
    attempt: int = Field(ge=0)
    at: AwareDatetime
    duration_s: float | None = Field(default=None, ge=0)
    error: str | None = None
    result: JsonValue = None
    progress: float | None = Field(default=None, allow_inf_nan=False)
    message: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def build_event(
    *,
    job_id: str,
    job: str,
    queue: str,
    state: EventState,
    attempt: int,
    at: datetime | None = None,
    duration_s: float | None = None,
    error: str | None = None,
    result: JsonValue = None,
    progress: float | None = None,
    message: str | None = None,
) -> bytes:
    """The event body as UTF-8 JSON, exactly the contract's fields.

    ``result`` must already have passed ``encode_result``; it is only sent on ``succeeded``.
    ``error`` is flattened to one line (a traceback's newlines would break log-based consumers).
    """
    if state not in EVENT_STATES:
        raise ValueError(f"unknown event state {state!r}; expected one of {EVENT_STATES}")
    if attempt < 0:
        raise ValueError("attempt must be 0 (no run) or more")
    body: dict[str, Any] = {
        "job_id": job_id,
        "job": job,
        "queue": queue,
        "state": state,
        "attempt": attempt,
        "at": rfc3339(at) if at is not None else now_rfc3339(),
    }
    if duration_s is not None:
        body["duration_s"] = round(duration_s, 6)
    if error is not None:
        body["error"] = " ".join(error.split())
    if state == SUCCEEDED:
        body["result"] = result
    if progress is not None:
        if not math.isfinite(progress):
            raise ValueError("progress must be a finite number")
        body["progress"] = progress
    if message is not None:
        body["message"] = message
    return _encode(body).encode()


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_event(body: bytes | str) -> JobEvent:
    """Validate an event body; any defect becomes one ``InvalidEvent`` with a readable reason."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"event body is not UTF-8 JSON: {exc}") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidEvent(f"event body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"event body is a JSON {type(data).__name__}, not an object")
    try:
        return JobEvent.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidEvent(f"invalid event: {problems}") from None
