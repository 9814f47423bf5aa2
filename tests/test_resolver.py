"""
Tests for L{tunnel.resolver}.
"""

from __future__ import annotations

import gc
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import FakeGetaddrinfo, ManualWorkers, ThreadReactor
from tests.test_splice import captureLogs
from tunnel.resolver import Lookup, ThreadedResolver, _Workers


@implementer(IResolutionReceiver)
class RecordingReceiver:
    """
    Records what it is told.

    @ivar resolution: The resolution it was told began.
    @ivar addresses: The addresses resolved.
    @ivar completed: How many times it was told the resolution completed.
    """

    def __init__(self) -> None:
        self.resolution: IHostResolution | None = None
        self.addresses: list[Any] = []
        self.completed = 0

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        """
        Record the resolution.
        """
        self.resolution = resolution

    def addressResolved(self, address: Any) -> None:
        """
        Record the address.
        """
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        """
        Count the completion.
        """
        self.completed += 1


class ThreadedResolverTests(SynchronousTestCase):
    """
    Tests for L{ThreadedResolver}.
    """

    def setUp(self) -> None:
        self.getaddrinfo = FakeGetaddrinfo(
            {
                "a.example": ["192.0.2.1", "2001:db8::1"],
                "b.example": ["192.0.2.2"],
                "c.example": ["192.0.2.3"],
                "d.example": ["192.0.2.4"],
            }
        )
        self.workers = ManualWorkers()
        self.reactor = ThreadReactor()
        self.events = captureLogs(self)

    def makeResolver(self, threads: int = 2, maxWaiting: int = 2) -> ThreadedResolver:
        """
        A resolver on the fake reactor, workers and C{getaddrinfo}.
        """
        return ThreadedResolver(
            self.reactor,
            threads=threads,
            maxWaiting=maxWaiting,
            getaddrinfo=self.getaddrinfo,
            workers=self.workers,
        )

    def resolve(
        self, resolver: ThreadedResolver, name: str, *args: Any
    ) -> tuple[RecordingReceiver, Lookup]:
        """
        Start looking C{name} up.

        @return: The receiver and the lookup.
        """
        receiver = RecordingReceiver()
        lookup = resolver.resolveHostName(receiver, name, *args)
        assert isinstance(lookup, Lookup)
        return receiver, lookup

    def resolverEvents(self) -> list[dict[str, Any]]:
        """
        The log events of the resolver.
        """
        return [e for e in self.events if e.get("log_namespace") == "tunnel.resolver"]

    def test_interface(self) -> None:
        """
        L{ThreadedResolver} provides L{IHostnameResolver} and its lookups
        L{IHostResolution}.
        """
        resolver = self.makeResolver()
        self.assertTrue(verifyObject(IHostnameResolver, resolver))
        receiver, lookup = self.resolve(resolver, "a.example")
        self.assertTrue(verifyObject(IHostResolution, lookup))
        self.assertIs(receiver.resolution, lookup)
        self.assertEqual(lookup.name, "a.example")

    def test_resolves(self) -> None:
        """
        A lookup runs C{getaddrinfo} in a worker for any address family and
        streams, and tells the receiver every address, with its port (and an
        IPv6 address's flow information and scope), then that it completed.
        """
        resolver = self.makeResolver()
        receiver, _ = self.resolve(resolver, "a.example", 443)
        self.assertEqual(receiver.addresses, [])
        self.workers.runNext()
        self.assertEqual(
            self.getaddrinfo.calls,
            [("a.example", 443, socket.AF_UNSPEC, socket.SOCK_STREAM)],
        )
        self.assertEqual(
            receiver.addresses,
            [
                IPv4Address("TCP", "192.0.2.1", 443),
                IPv6Address("TCP", "2001:db8::1", 443, 0, 3),
            ],
        )
        self.assertEqual(receiver.completed, 1)
        self.assertEqual((resolver.running, resolver.waiting), (0, 0))

    def test_addressTypesAndSemantics(self) -> None:
        """
        The address types asked for choose the family, and UDP semantics
        datagram sockets and UDP addresses.
        """
        resolver = self.makeResolver(threads=3)
        self.resolve(resolver, "a.example", 1, [IPv4Address])
        self.resolve(resolver, "b.example", 2, [IPv6Address])
        udp, _ = self.resolve(resolver, "c.example", 3, None, "UDP")
        for _ in range(3):
            self.workers.runNext()
        self.assertEqual(
            self.getaddrinfo.calls,
            [
                ("a.example", 1, socket.AF_INET, socket.SOCK_STREAM),
                ("b.example", 2, socket.AF_INET6, socket.SOCK_STREAM),
                ("c.example", 3, socket.AF_UNSPEC, socket.SOCK_DGRAM),
            ],
        )
        self.assertEqual(udp.addresses, [IPv4Address("UDP", "192.0.2.3", 3)])

    def test_failedLookups(self) -> None:
        """
        A name that does not resolve, or that IDNA cannot encode, completes
        with no address; any other error too, and it is logged.
        """
        self.getaddrinfo.answers["idna.example"] = UnicodeError("label too long")
        self.getaddrinfo.answers["bug.example"] = RuntimeError("a bug")
        resolver = self.makeResolver(threads=3)
        receivers = [
            self.resolve(resolver, name)[0]
            for name in ("none.example", "idna.example", "bug.example")
        ]
        for _ in range(3):
            self.workers.runNext()
        self.assertEqual([(r.addresses, r.completed) for r in receivers], [([], 1)] * 3)
        [error] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(error.value), "a bug")

    def test_threadsBound(self) -> None:
        """
        At most C{threads} lookups run at once; the others wait, in order,
        for one to finish.
        """
        resolver = self.makeResolver(threads=2, maxWaiting=5)
        receivers = [
            self.resolve(resolver, name)[0]
            for name in ("a.example", "b.example", "c.example")
        ]
        self.assertEqual(len(self.workers.jobs), 2)
        self.assertEqual((resolver.running, resolver.waiting), (2, 1))
        self.workers.runNext()
        self.assertEqual(len(self.workers.jobs), 2)
        self.assertEqual((resolver.running, resolver.waiting), (2, 0))
        self.workers.runNext()
        self.workers.runNext()
        self.assertEqual([r.completed for r in receivers], [1, 1, 1])
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls],
            ["a.example", "b.example", "c.example"],
        )

    def test_sharedLookup(self) -> None:
        """
        Lookups of the same name, port and kind in progress at once share one
        C{getaddrinfo} call and all get its answer; another port is another
        call.
        """
        resolver = self.makeResolver()
        first, _ = self.resolve(resolver, "b.example", 443)
        second, _ = self.resolve(resolver, "b.example", 443)
        other, _ = self.resolve(resolver, "b.example", 8443)
        self.assertEqual(len(self.workers.jobs), 2)
        self.workers.runNext()
        self.workers.runNext()
        self.assertEqual(len(self.getaddrinfo.calls), 2)
        self.assertEqual(first.addresses, [IPv4Address("TCP", "192.0.2.2", 443)])
        self.assertEqual(second.addresses, first.addresses)
        self.assertEqual(other.addresses, [IPv4Address("TCP", "192.0.2.2", 8443)])
        # Once answered, the same lookup runs again.
        self.resolve(resolver, "b.example", 443)
        self.assertEqual(len(self.workers.jobs), 1)

    def test_busy(self) -> None:
        """
        With every thread busy and C{maxWaiting} lookups waiting, a new
        lookup completes at once with no address and is marked C{busy}; one
        warning says so, and one line when the queue drained.  A lookup that
        can share one in progress is not refused.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=1)
        self.resolve(resolver, "a.example")
        self.resolve(resolver, "b.example")
        refused, lookup = self.resolve(resolver, "c.example")
        self.assertTrue(lookup.busy)
        self.assertEqual((refused.addresses, refused.completed), ([], 1))
        _, again = self.resolve(resolver, "d.example")
        self.assertTrue(again.busy)
        shared, sharing = self.resolve(resolver, "b.example")
        self.assertFalse(sharing.busy)
        self.assertEqual(
            [e["log_level"] for e in self.resolverEvents()], [LogLevel.warn]
        )
        self.assertEqual(self.getaddrinfo.calls, [])
        self.workers.runNext()
        self.assertEqual(
            [e["log_level"] for e in self.resolverEvents()],
            [LogLevel.warn, LogLevel.info],
        )
        self.workers.runNext()
        self.assertEqual(shared.addresses, [IPv4Address("TCP", "192.0.2.2", 0)])
        _, later = self.resolve(resolver, "c.example")
        self.assertFalse(later.busy)
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls],
            ["a.example", "b.example"],
        )

    def test_receiverFreedWhenDone(self) -> None:
        """
        Once its receiver has heard the end (the addresses, a refusal, or
        its cancellation), a lookup no longer holds it: a receiver that
        keeps its lookup (to cancel it, as the connector's does) is freed by
        reference counting, not left in a cycle for the cycle collector.
        """
        gc.disable()
        self.addCleanup(gc.enable)
        resolver = self.makeResolver(threads=1, maxWaiting=1)
        delivered, _ = self.resolve(resolver, "a.example")
        waiting, cancelled = self.resolve(resolver, "b.example")
        refused, _ = self.resolve(resolver, "c.example")
        cancelled.cancel()
        self.workers.runNext()
        self.assertEqual(delivered.completed, 1)
        receivers = [weakref.ref(r) for r in (delivered, waiting, refused)]
        del delivered, waiting, refused
        self.assertEqual([r() for r in receivers], [None, None, None])

    def test_noWaiting(self) -> None:
        """
        With C{maxWaiting=0}, a lookup is refused whenever every thread is
        busy.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=0)
        _, first = self.resolve(resolver, "a.example")
        _, second = self.resolve(resolver, "b.example")
        self.assertEqual((first.busy, second.busy), (False, True))

    def test_cancelWaiting(self) -> None:
        """
        A cancelled lookup that no thread took never runs, frees its place
        in the queue, and its receiver hears nothing; cancelling twice is
        harmless.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=1)
        self.resolve(resolver, "a.example")
        waiting, lookup = self.resolve(resolver, "b.example")
        lookup.cancel()
        lookup.cancel()
        self.assertEqual(resolver.waiting, 0)
        _, next = self.resolve(resolver, "c.example")
        self.assertFalse(next.busy)
        self.workers.runNext()
        self.workers.runNext()
        self.assertEqual(self.workers.jobs, [])
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls], ["a.example", "c.example"]
        )
        self.assertEqual((waiting.addresses, waiting.completed), ([], 0))

    def test_cancelShared(self) -> None:
        """
        A waiting lookup shared with another that was not cancelled still
        runs, and only the other's receiver hears the answer.
        """
        resolver = self.makeResolver(threads=1)
        self.resolve(resolver, "a.example")
        cancelled, lookup = self.resolve(resolver, "b.example")
        kept, _ = self.resolve(resolver, "b.example")
        lookup.cancel()
        self.workers.runNext()
        self.workers.runNext()
        self.assertEqual(kept.completed, 1)
        self.assertEqual(cancelled.completed, 0)

    def test_cancelRunning(self) -> None:
        """
        A lookup cancelled while its C{getaddrinfo} runs tells its receiver
        nothing when the answer comes.
        """
        resolver = self.makeResolver()
        receiver, lookup = self.resolve(resolver, "a.example")
        lookup.cancel()
        self.assertEqual(resolver.running, 1)
        self.workers.runNext()
        self.assertEqual((receiver.addresses, receiver.completed), ([], 0))
        self.assertEqual(resolver.running, 0)

    def test_receiverFails(self) -> None:
        """
        A receiver that raises is logged, and the others sharing the answer
        still get it.
        """

        class Broken(RecordingReceiver):
            def resolutionComplete(self) -> None:
                raise ZeroDivisionError()

        resolver = self.makeResolver()
        resolver.resolveHostName(Broken(), "b.example")
        receiver, _ = self.resolve(resolver, "b.example")
        self.workers.runNext()
        self.assertEqual(receiver.completed, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_cancelDuringDelivery(self) -> None:
        """
        A receiver that, told its answer, cancels another lookup sharing it
        leaves that one unanswered, and every other one answered.
        """
        resolver = self.makeResolver()
        lookups: list[Lookup] = []

        class Cancelling(RecordingReceiver):
            def resolutionComplete(self) -> None:
                super().resolutionComplete()
                lookups[1].cancel()

        first = Cancelling()
        lookups.append(cast(Lookup, resolver.resolveHostName(first, "b.example")))
        receivers: list[RecordingReceiver] = [first]
        for _ in range(2):
            receiver, lookup = self.resolve(resolver, "b.example")
            receivers.append(receiver)
            lookups.append(lookup)
        self.workers.runNext()
        self.assertEqual([r.completed for r in receivers], [1, 0, 1])
        self.assertEqual((resolver.running, resolver.waiting), (0, 0))

    def test_newLookupDuringDelivery(self) -> None:
        """
        A receiver that, told its answer, looks the same name up again
        starts a new lookup.
        """
        resolver = self.makeResolver()
        again = RecordingReceiver()

        class Again(RecordingReceiver):
            def resolutionComplete(self) -> None:
                super().resolutionComplete()
                resolver.resolveHostName(again, "b.example")

        resolver.resolveHostName(Again(), "b.example")
        self.workers.runNext()
        self.assertEqual(again.completed, 0)
        self.workers.runNext()
        self.assertEqual(again.completed, 1)
        self.assertEqual(len(self.getaddrinfo.calls), 2)

    def test_noThreads(self) -> None:
        """
        A resolver needs a thread.
        """
        self.assertRaises(ValueError, ThreadedResolver, self.reactor, threads=0)

    def test_ownWorkersStopAtShutdown(self) -> None:
        """
        A resolver's own workers are stopped when the reactor shuts down
        (the trigger is added with the first lookup, once); given workers
        are the giver's to stop.
        """
        started: list[Callable[[], None]] = []
        resolver = ThreadedResolver(
            self.reactor, threads=2, getaddrinfo=self.getaddrinfo
        )
        workers = resolver._workers
        assert isinstance(workers, _Workers)
        workers._startThread = lambda target, name: started.append(target)
        self.resolve(resolver, "a.example")
        self.resolve(resolver, "b.example")
        [(phase, event, stop)] = self.reactor.triggers
        self.assertEqual((phase, event), ("during", "shutdown"))
        self.assertEqual(workers.started, 2)
        stop()
        self.assertEqual(workers.started, 0)
        # Each thread runs its job, then sees the stop and ends.
        for target in started:
            target()
        self.assertEqual(len(self.getaddrinfo.calls), 2)
        self.resolve(resolver, "c.example")
        self.assertEqual(len(self.reactor.triggers), 2)

        self.makeResolver().resolveHostName(RecordingReceiver(), "d.example")
        self.assertEqual(len(self.reactor.triggers), 2)


class WorkersTests(SynchronousTestCase):
    """
    Tests for L{_Workers}.
    """

    def test_startsUpToSize(self) -> None:
        """
        A thread is started for each job until there are C{size}; jobs go
        to the threads in order.
        """
        started: list[tuple[Callable[[], None], str]] = []
        workers = _Workers(2, lambda target, name: started.append((target, name)))
        ran: list[int] = []
        for i in range(3):
            workers.run(lambda i=i: ran.append(i))  # type: ignore[misc]
        self.assertEqual(
            [name for _, name in started], ["tunnel-resolver-1", "tunnel-resolver-2"]
        )
        workers.stop()
        started[0][0]()
        self.assertEqual(ran, [0, 1, 2])
        # The first thread took every job and the first stop; the second
        # ends on the second.
        started[1][0]()

    def test_realThreads(self) -> None:
        """
        By default jobs run in daemon threads, which end when stopped.
        """
        workers = _Workers(1)
        done = threading.Event()
        threads: list[threading.Thread] = []

        def job() -> None:
            threads.append(threading.current_thread())
            done.set()

        workers.run(job)
        self.assertTrue(done.wait(30))
        [thread] = threads
        self.assertTrue(thread.daemon)
        self.assertEqual(thread.name, "tunnel-resolver-1")
        workers.stop()
        thread.join(30)
        self.assertFalse(thread.is_alive())
