"""
Tests for L{tunnel.pooled}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import ManualThreadPool, ThreadPoolReactor
from tunnel.pooled import deferToPoolUnlessCancelled


class DeferToPoolUnlessCancelledTests(SynchronousTestCase):
    """
    Tests for L{deferToPoolUnlessCancelled}.
    """

    def setUp(self) -> None:
        self.reactor = ThreadPoolReactor()
        self.pool = ManualThreadPool()
        self.patch(self.reactor, "getThreadPool", lambda: self.pool)
        self.ran: list[int] = []

    def work(self, value: int) -> int:
        """
        Note that the work ran, and give C{value} doubled.
        """
        self.ran.append(value)
        return value * 2

    def test_result(self) -> None:
        """
        The work runs in the pool, and the Deferred fires with its result
        once it has run.
        """
        result = deferToPoolUnlessCancelled(self.reactor, self.work, 21)
        self.assertNoResult(result)
        self.pool.runNext()
        self.assertEqual(self.successResultOf(result), 42)
        self.assertEqual(self.ran, [21])

    def test_failure(self) -> None:
        """
        An exception the work raises fails the Deferred.
        """
        result = deferToPoolUnlessCancelled(self.reactor, int, "x")
        self.pool.runNext()
        self.failureResultOf(result, ValueError)

    def test_cancelledBeforeItRuns(self) -> None:
        """
        Cancelled while it waits for a thread, the work never runs, and the
        Deferred fails with L{CancelledError} at once.
        """
        result = deferToPoolUnlessCancelled(self.reactor, self.work, 1)
        result.cancel()
        self.failureResultOf(result, CancelledError)
        self.pool.runNext()
        self.assertEqual(self.ran, [])

    def test_cancelledWhileItRuns(self) -> None:
        """
        Cancelled once a thread has taken it, the work runs to its end and
        its result is dropped: the Deferred has failed with
        L{CancelledError} already, and is not fired again.
        """
        results: list[Deferred[int]] = []

        def workCancelled(value: int) -> int:
            # The caller gives up while the work runs.
            results[0].cancel()
            return self.work(value)

        results.append(deferToPoolUnlessCancelled(self.reactor, workCancelled, 1))
        self.pool.runNext()
        self.assertEqual(self.ran, [1])
        self.failureResultOf(results[0], CancelledError)
