"""Leveret beside the bare client and beside its peers, measured in one run on one machine.

``python -m bench`` (or ``bash bench/run.sh``) runs every workload for every library in fresh
subprocesses, rounds interleaved, and writes ``bench/RESULTS.md``. Absolute numbers from a
shared 2-core machine are noise; what the tables quote are medians and ratios to the bare
aio-pika loop measured in the same round. See ``bench/harness.py`` for the method.
"""
