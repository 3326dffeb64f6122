"""Bad values raise LeveretError subclasses that are ValueError too; the tree is complete."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import leveret
from leveret.consumer.ops.dlq import InvalidDurationError, parse_duration
from leveret.producers.errors import (
    DuplicateJobIdError,
    InvalidPayloadError,
    InvalidPriorityError,
)
from leveret.producers.wire.message import check_priority, encode_payload
from leveret.topology import errors as topology_errors
from leveret.topology.delay import delayed_job_route
from leveret.topology.errors import (
    InvalidDelayError,
    InvalidNameError,
    InvalidValueError,
    LeveretError,
)
from leveret.topology.model import Topology, WorkQueue, check_name


def _is_value_error(exc: BaseException) -> None:
    assert isinstance(exc, LeveretError)
    assert isinstance(exc, InvalidValueError)
    assert isinstance(exc, ValueError)


def test_a_bad_name_is_an_invalid_name_error_with_attributes() -> None:
    with pytest.raises(InvalidNameError) as caught:
        check_name("job", "send email")
    _is_value_error(caught.value)
    assert (caught.value.kind, caught.value.name) == ("job", "send email")


def test_a_bad_delay_is_an_invalid_delay_error() -> None:
    for bad in (-1.0, float("nan"), 1e12, "5"):
        with pytest.raises(InvalidDelayError) as caught:
            delayed_job_route("jobs", bad, "job")  # type: ignore[arg-type]
        _is_value_error(caught.value)
        assert caught.value.delay_s is bad


def test_a_bad_priority_and_payload_are_typed() -> None:
    for bad in (10, -1, True, "5", 1.5):
        with pytest.raises(InvalidPriorityError) as caught:
            check_priority(bad)  # type: ignore[arg-type]
        _is_value_error(caught.value)
        assert caught.value.priority == bad
    with pytest.raises(InvalidPayloadError) as payload:
        encode_payload([1, 2])  # type: ignore[arg-type]
    _is_value_error(payload.value)
    assert isinstance(payload.value, TypeError)  # callers catching TypeError keep working


def test_a_bad_duration_is_typed() -> None:
    with pytest.raises(InvalidDurationError) as caught:
        parse_duration("soon")
    _is_value_error(caught.value)
    assert caught.value.text == "soon"


def test_names_checked_inside_models_still_become_validation_errors() -> None:
    """pydantic wraps a ValueError raised in a validator: the subclasses must keep that."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="collides"):
        WorkQueue(name="work.dlq")
    with pytest.raises(ValidationError, match="unique names"):
        Topology(queues=(WorkQueue(name="a"), WorkQueue(name="a")))


def test_duplicate_job_id_error_names_the_id() -> None:
    exc = DuplicateJobIdError("abc")
    _is_value_error(exc)
    assert exc.job_id == "abc" and "appears twice" in str(exc)


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def test_the_tree_in_the_docstring_lists_every_class() -> None:
    for module in pkgutil.walk_packages(leveret.__path__, "leveret."):
        if module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    doc = topology_errors.__doc__ or ""
    ours = {c for c in _all_subclasses(LeveretError) if c.__module__.startswith("leveret.")}
    assert len(ours) >= 15
    missing = sorted(c.__name__ for c in ours if c.__name__ not in doc)
    assert not missing, f"topology/errors.py's tree lacks {missing}"
