"""User-facing errors, and the exit status of a command that meets one.

Every error a user can cause or fix (a bad input, an unknown model, a corrupt model file, a
run of another configuration, an unreachable cluster, a store that stops answering) is a
:class:`SegflowError`. Its message names the input and the problem, and the command line
prints it as one line; the traceback is printed only under ``segflow --verbose``. Library
errors keep their usual kind too (a bad card is also a ``ValueError``), so callers that
catch those go on working.

Exit statuses, decided here and nowhere else (:func:`exit_status`):

=====  ================================================================================
0      every image was done
1      the run finished, and some images failed: each is a row of the ``errors`` table
2      the job could not start, and nothing was written (a bad job: :class:`SegflowError`)
3      the job started and could not finish: what was committed stays, and rerunning the
       same command resumes (:class:`RunIncompleteError`, or any error once the run is
       under way, a crash included)
130    interrupted (Ctrl-C, SIGINT); 143 for SIGTERM. As 3: committed shards are kept
=====  ================================================================================
"""

from __future__ import annotations

OK = 0
IMAGES_FAILED = 1
NOT_STARTED = 2
INCOMPLETE = 3


class SegflowError(Exception):
    """A job or request that cannot be done as given; the message says what and why."""

    exit_status = NOT_STARTED


class RunIncompleteError(SegflowError):
    """A run that started and stopped before every shard was committed."""

    exit_status = INCOMPLETE


def exit_status(error: BaseException, *, started: bool) -> int:
    """The exit status of a command that ``error`` ended; ``started``: whether it had begun
    writing (a run's plan was made), after which any failure leaves a run to resume."""
    if started:
        return INCOMPLETE
    if isinstance(error, SegflowError):
        return error.exit_status
    # Before anything is written, whatever stopped the job, it did not start.
    return NOT_STARTED
