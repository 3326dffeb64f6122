"""One module per library. Each runs as ``python -m bench.runners.<module> SPEC_JSON``.

The protocol with the harness is three lines on stdout: ``READY`` once the library is set up
(queues declared, nothing consumed), then the harness fills the queue and writes ``GO`` on stdin,
then ``CONSUMING`` once the consumer is attached (the harness may start publishing), and finally
``RESULT {json}``. Everything else a library prints goes to stderr, which the harness keeps in a
log file.
"""
