"""Operator tools: what ``leveret status``, ``doctor``, ``dlq`` and ``topology schema`` run.

They live apart from the worker runtime so that a worker process never loads them (nor their
HTTP client) unless it asks: the runtime imports nothing from here at module level, only
``doctor.log_findings`` lazily when a worker runs its start-up checks. Import the submodules
directly (``leveret.consumer.ops.dlq``); this package re-exports nothing, so importing it
costs nothing.
"""
