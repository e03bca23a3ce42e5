"""The job context: results shared between builders are computed once, across threads."""

import concurrent.futures
import threading
import time

import pytest

from jaxopt_lab.app.report.context import JobContext


def _ctx():
    return JobContext(data=None, models=None, teacher_variables=None, settings=None)


def test_shared_computes_once_across_threads():
    ctx, calls, lock = _ctx(), [], threading.Lock()

    def compute():
        with lock:
            calls.append(1)
        time.sleep(0.05)
        return object()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: ctx.shared("k", compute), range(12)))
    assert len(calls) == 1 and all(r is results[0] for r in results)
    assert ctx.shared("other", lambda: 3) == 3


def test_shared_failure_reaches_every_caller():
    ctx = _ctx()

    def fail():
        raise ValueError("boom")

    for _ in range(2):
        with pytest.raises(ValueError, match="boom"):
            ctx.shared("k", fail)
