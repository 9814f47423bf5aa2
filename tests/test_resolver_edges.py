"""
Edge cases of L{tunnel.resolver} found in review: threads that cannot be
started, lookups cancelled from inside their own callbacks, receivers that
fail, and the parent proxy's lookups.
"""

from __future__ import annotations

import contextlib
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeGetaddrinfo, ManualWorkers, ThreadReactor
from tests.test_resolver import RecordingReceiver
from tunnel.connector import HostnameConnector
from tunnel.interfaces import LookupsBusy
from tunnel.resolver import ThreadedResolver, _Workers
from tunnel.upstream import UpstreamConnector, parseUpstreamURL

PARENT = parseUpstreamURL("http://proxy.example:3128")


def _resolver(workers: Any, threads: int = 1, maxWaiting: int = 1) -> ThreadedResolver:
    return ThreadedResolver(
        ThreadReactor(),
        threads=threads,
        maxWaiting=maxWaiting,
        getaddrinfo=FakeGetaddrinfo(
            {
                "a.example": ["192.0.2.1"],
                "b.example": ["192.0.2.2"],
                "two.example": ["192.0.2.3", "192.0.2.4"],
                "proxy.example": ["192.0.2.9"],
            }
        ),
        workers=workers,
    )


class CancelAtOnce(RecordingReceiver):
    """
    A receiver that cancels its lookup as soon as it begins.
    """

    def resolutionBegan(self, resolution: Any) -> None:
        super().resolutionBegan(resolution)
        resolution.cancel()


class ThreadStartFailureTests(SynchronousTestCase):
    """
    F1: a thread that cannot be started (RuntimeError: can't start new
    thread, under a pids/RLIMIT_NPROC limit) corrupts the bookkeeping for
    good.
    """

    def test_failedThreadStartIsUndone(self) -> None:
        """
        A thread that cannot be started (RuntimeError) leaves the
        resolver's counts as they were, and a later lookup starts a
        thread.
        """
        resolver = ThreadedResolver(
            ThreadReactor(),
            threads=1,
            getaddrinfo=FakeGetaddrinfo(
                {"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}
            ),
        )
        workers = resolver._workers
        assert isinstance(workers, _Workers)

        def cannotStart(target: Any, name: str) -> None:
            raise RuntimeError("can't start new thread")

        workers._startThread = cannotStart
        first = RecordingReceiver()
        with contextlib.suppress(RuntimeError):
            resolver.resolveHostName(first, "a.example")
        # The failure is transient: threads can be started again.
        self.flushLoggedErrors(RuntimeError)
        started: list[Any] = []
        workers._startThread = lambda target, name: started.append(target)
        # Nothing runs, nothing waits, nothing is left in progress...
        self.assertEqual((resolver.running, resolver.waiting), (0, 0))
        self.assertEqual(resolver._jobs, {})
        # ...and a later lookup gets a thread.
        later = RecordingReceiver()
        resolver.resolveHostName(later, "b.example")
        self.assertEqual(len(started), 1)


class UpstreamLookupTests(SynchronousTestCase):
    """
    F2: the parent proxy's lookups (UpstreamConnector) are neither cancelled
    with their attempt nor reported as LookupsBusy.
    """

    def setUp(self) -> None:
        self.workers = ManualWorkers()
        self.resolver = _resolver(self.workers, threads=1, maxWaiting=1)
        self.connector = UpstreamConnector(
            MemoryReactorClock(), PARENT, resolver=self.resolver
        )
        # Another lookup holds the only thread.
        self.resolver.resolveHostName(RecordingReceiver(), "a.example")

    def connect(self) -> Deferred[Any]:
        return self.connector.endpointForTarget("target.example", 443).connect(
            Factory.forProtocol(Protocol)
        )

    def test_cancelledAttemptCancelsLookup(self) -> None:
        """
        Cancelling an attempt through the parent proxy cancels its
        lookup of the parent, which frees its place in the queue.
        """
        d = self.connect()
        self.assertEqual(self.resolver.waiting, 1)
        d.cancel()
        self.failureResultOf(d)
        # The tunnel is gone: its lookup of the parent should not run.
        self.assertEqual(self.resolver.waiting, 0)

    def test_busyIsLookupsBusy(self) -> None:
        """
        A refused lookup of the parent proxy fails the attempt with
        L{LookupsBusy}, not a lookup failure.
        """
        self.resolver.resolveHostName(RecordingReceiver(), "b.example")
        d = self.connect()
        # The client should get 503 + Retry-After, not 502 "does not resolve".
        self.failureResultOf(d, LookupsBusy)


class CancelledLookupSilenceTests(SynchronousTestCase):
    """
    F4: Lookup.cancel() promises "its receiver hears nothing more", which
    does not hold when it is cancelled from inside its own callbacks.
    """

    def test_cancelInResolutionBegan(self) -> None:
        """
        A lookup cancelled from inside C{resolutionBegan} never runs
        and its receiver hears nothing more.
        """
        workers = ManualWorkers()
        resolver = _resolver(workers, threads=1, maxWaiting=1)

        receiver = CancelAtOnce()
        resolver.resolveHostName(receiver, "a.example")
        # A lookup cancelled before anything ran should never run...
        self.assertEqual((resolver.running, resolver.waiting), (0, 0))
        self.assertEqual(workers.jobs, [])

    def test_cancelInResolutionBeganWhenBusy(self) -> None:
        """
        A lookup cancelled from inside C{resolutionBegan} while the
        queue is full is not told it completed.
        """
        resolver = _resolver(ManualWorkers(), threads=1, maxWaiting=0)
        resolver.resolveHostName(RecordingReceiver(), "a.example")

        receiver = CancelAtOnce()
        resolver.resolveHostName(receiver, "b.example")
        # ...and its receiver should hear nothing.
        self.assertEqual(receiver.completed, 0)

    def test_cancelDuringOwnDelivery(self) -> None:
        """
        A lookup cancelled from inside C{addressResolved} hears no
        more addresses and no completion.
        """
        workers = ManualWorkers()
        resolver = _resolver(workers)

        class CancelOnFirst(RecordingReceiver):
            def addressResolved(self, address: Any) -> None:
                super().addressResolved(address)
                assert self.resolution is not None
                self.resolution.cancel()

        receiver = CancelOnFirst()
        resolver.resolveHostName(receiver, "two.example")
        workers.runNext()
        self.assertEqual(
            (receiver.addresses, receiver.completed),
            ([IPv4Address("TCP", "192.0.2.3", 0)], 0),
        )


class ReceiverFailureTests(SynchronousTestCase):
    """
    F5: a receiver whose addressResolved raises is never told the lookup
    completed, so its caller waits for ever.
    """

    def test_connectorAllowAddressRaises(self) -> None:
        """
        An C{allowAddress} that raises is logged and the lookup still
        completes, so the attempt fails rather than waiting for ever.
        """
        workers = ManualWorkers()
        resolver = _resolver(workers)
        connector = HostnameConnector(
            MemoryReactorClock(), resolver=resolver, timeout=None
        )

        def allow(address: Any) -> bool:
            raise ZeroDivisionError()

        d = connector.endpointForTarget("a.example", 443, allow).connect(
            Factory.forProtocol(Protocol)
        )
        workers.runNext()
        self.flushLoggedErrors(ZeroDivisionError)
        # The attempt should fail (it waits for ever instead).
        self.failureResultOf(d)


class ThreadStartFailureStallTests(SynchronousTestCase):
    """
    F1 (continued): with the default workers, after C{threads} failed
    starts no thread is ever started again, though none exists.
    """

    def test_noThreadAfterFailures(self) -> None:
        """
        After as many failed thread starts as threads, a new lookup
        still starts a thread instead of waiting for ever.
        """
        resolver = ThreadedResolver(
            ThreadReactor(),
            threads=2,
            getaddrinfo=FakeGetaddrinfo({}),
        )
        workers = resolver._workers
        assert isinstance(workers, _Workers)

        def cannotStart(target: Any, name: str) -> None:
            raise RuntimeError("can't start new thread")

        workers._startThread = cannotStart
        for name in ("a.example", "b.example"):
            with contextlib.suppress(RuntimeError):
                resolver.resolveHostName(RecordingReceiver(), name)
        self.flushLoggedErrors(RuntimeError)
        started: list[Any] = []
        workers._startThread = lambda target, name: started.append(target)
        receiver = RecordingReceiver()
        resolver.resolveHostName(receiver, "c.example")
        # No thread exists, yet none is started: c.example waits for ever
        # (and so does every later lookup, until 1000 wait and all are 503).
        self.assertEqual((len(started), resolver.waiting), (1, 0))
