"""
Tests for L{tunnel.resolver}.
"""

from __future__ import annotations

import errno
import gc
import socket
import threading
import time
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
from tunnel.resolver import (
    MAX_DOMAIN_WARNINGS,
    Lookup,
    ThreadedResolver,
    _Workers,
    domainOf,
    lookupClient,
)


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


class ResolverTestCase(SynchronousTestCase):
    """
    A L{ThreadedResolver} on a fake reactor, fake workers and a fake
    C{getaddrinfo}, with the log captured.
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

    def makeResolver(
        self, threads: int = 2, maxWaiting: int = 2, **kwargs: Any
    ) -> ThreadedResolver:
        """
        A resolver on the fake reactor, workers and C{getaddrinfo}.

        @param kwargs: More arguments for L{ThreadedResolver}.
        """
        return ThreadedResolver(
            self.reactor,
            threads=threads,
            maxWaiting=maxWaiting,
            getaddrinfo=self.getaddrinfo,
            workers=self.workers,
            clock=self.reactor.seconds,
            **kwargs,
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


class ThreadedResolverTests(ResolverTestCase):
    """
    Tests for L{ThreadedResolver}.
    """

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
        streams (and port 0: the answer serves every port), and tells the
        receiver every address, with its port (and an IPv6 address's flow
        information and scope), then that it completed.
        """
        resolver = self.makeResolver()
        receiver, lookup = self.resolve(resolver, "a.example", 443)
        self.assertEqual(lookup.port, 443)
        self.assertEqual(receiver.addresses, [])
        self.workers.runNext()
        self.assertEqual(
            self.getaddrinfo.calls,
            [("a.example", 0, socket.AF_UNSPEC, socket.SOCK_STREAM)],
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
                ("a.example", 0, socket.AF_INET, socket.SOCK_STREAM),
                ("b.example", 0, socket.AF_INET6, socket.SOCK_STREAM),
                ("c.example", 0, socket.AF_UNSPEC, socket.SOCK_DGRAM),
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
        Lookups of the same name and kind in progress at once share one
        C{getaddrinfo} call and all get its answer, each with its own port,
        whatever the case of the name's letters; another kind is another
        call.
        """
        resolver = self.makeResolver(maxRunningPerDomain=2, cacheFor=0)
        first, _ = self.resolve(resolver, "b.example", 443)
        second, _ = self.resolve(resolver, "B.Example", 443)
        other, _ = self.resolve(resolver, "b.example", 8443)
        ipv4, _ = self.resolve(resolver, "b.example", 443, [IPv4Address])
        self.assertEqual(len(self.workers.jobs), 2)
        self.workers.runNext()
        self.workers.runNext()
        self.assertEqual(len(self.getaddrinfo.calls), 2)
        self.assertEqual(first.addresses, [IPv4Address("TCP", "192.0.2.2", 443)])
        self.assertEqual(second.addresses, first.addresses)
        self.assertEqual(other.addresses, [IPv4Address("TCP", "192.0.2.2", 8443)])
        self.assertEqual(ipv4.addresses, first.addresses)
        # Once answered (and with no answer kept), the same lookup runs
        # again.
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
        starts a new lookup (with no answer kept: see L{CacheTests}).
        """
        resolver = self.makeResolver(cacheFor=0)
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


class DomainShareTests(ResolverTestCase):
    """
    The names of one domain share a part of the threads and of the queue.
    """

    def test_domainOf(self) -> None:
        """
        A name's domain is its last two labels, in lower case, without the
        root's dot; a name of fewer labels is its own domain.
        """
        for name, domain in [
            ("www.Example.COM", "example.com"),
            ("a.b.c.example.com.", "example.com"),
            ("example.com", "example.com"),
            ("www.bbc.co.uk", "co.uk"),
            ("localhost", "localhost"),
            ("intranet.", "intranet"),
            ("", ""),
        ]:
            self.assertEqual(domainOf(name), domain, name)

    def test_slowDomainHoldsItsShare(self) -> None:
        """
        By default the names of one domain run in at most a quarter of the
        threads: with twenty lookups of names under a domain whose servers
        do not answer holding five threads, a lookup of another domain runs
        at once, and the slow domain's others wait for one of its own to
        end, not for any thread.
        """
        self.getaddrinfo.answers.update(
            {f"x{n}.slow.example": ["192.0.2.9"] for n in range(20)}
        )
        resolver = ThreadedResolver(
            self.reactor,
            getaddrinfo=self.getaddrinfo,
            workers=self.workers,
        )
        self.assertEqual((resolver.threads, resolver.maxRunningPerDomain), (20, 5))
        slow = [self.resolve(resolver, f"x{n}.slow.example")[0] for n in range(20)]
        self.assertEqual((resolver.running, resolver.waiting), (5, 15))
        other, lookup = self.resolve(resolver, "b.example")
        self.assertFalse(lookup.busy)
        self.assertEqual((resolver.running, resolver.waiting), (6, 15))
        # The other domain's lookup is the last job handed over.
        self.workers.jobs.pop()()
        self.assertEqual(other.addresses, [IPv4Address("TCP", "192.0.2.2", 0)])
        self.assertEqual((resolver.running, resolver.waiting), (5, 15))
        self.workers.runNext()
        self.assertEqual(slow[0].completed, 1)
        self.assertEqual((resolver.running, resolver.waiting), (5, 14))
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls],
            ["b.example", "x0.slow.example"],
        )

    def test_waitingInOrderOfTheirDomains(self) -> None:
        """
        When a thread is free, the oldest waiting lookup whose domain has
        threads left to it starts, passing older ones whose domain has none.
        """
        self.getaddrinfo.answers.update(
            {"x.slow.example": ["192.0.2.9"], "y.slow.example": ["192.0.2.9"]}
        )
        resolver = self.makeResolver(threads=2, maxWaiting=4, maxRunningPerDomain=1)
        self.resolve(resolver, "x.slow.example")
        self.resolve(resolver, "a.example")
        self.resolve(resolver, "y.slow.example")
        self.resolve(resolver, "b.example")
        self.assertEqual((resolver.running, resolver.waiting), (2, 2))
        # a.example ends: y.slow.example waits for x.slow.example, so
        # b.example goes first.
        self.workers.jobs.pop()()
        self.assertEqual((resolver.running, resolver.waiting), (2, 1))
        self.workers.jobs.pop()()
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls], ["a.example", "b.example"]
        )
        # A thread is free, but y.slow.example's domain has none left.
        self.assertEqual((resolver.running, resolver.waiting), (1, 1))
        self.workers.runNext()
        self.assertEqual((resolver.running, resolver.waiting), (1, 0))
        self.workers.runNext()
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls][2:],
            ["x.slow.example", "y.slow.example"],
        )
        self.assertEqual(resolver._domains, {})

    def test_domainWaitingShare(self) -> None:
        """
        By default the names of one domain take at most a quarter of the
        places in the queue: beyond that its lookups are refused (C{busy}),
        while the other domains' still wait.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=8)
        self.assertEqual(resolver.maxWaitingPerDomain, 2)
        self.getaddrinfo.answers.update(
            {f"x{n}.slow.example": ["192.0.2.9"] for n in range(4)}
        )
        lookups = [self.resolve(resolver, f"x{n}.slow.example")[1] for n in range(4)]
        self.assertEqual([lookup.busy for lookup in lookups], [False] * 3 + [True])
        _, other = self.resolve(resolver, "a.example")
        self.assertFalse(other.busy)
        self.assertEqual((resolver.running, resolver.waiting), (1, 3))

    def test_fewThreads(self) -> None:
        """
        A domain's share of the threads is a quarter, rounded down, but at
        least one: with fewer than four threads, one.
        """
        for threads, share in [(1, 1), (2, 1), (3, 1), (4, 1), (8, 2), (20, 5)]:
            resolver = self.makeResolver(threads=threads)
            self.assertEqual(resolver.maxRunningPerDomain, share, threads)

    def test_domainRefusalLogged(self) -> None:
        """
        A lookup refused for its domain's share of the queue logs a warning
        naming the domain, at most one every ten seconds; the queue is not
        said to be backed up, since other domains' lookups still wait.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=8, maxWaitingPerDomain=1)
        self.getaddrinfo.answers.update(
            {f"x{n}.slow.example": ["192.0.2.9"] for n in range(4)}
        )
        for n in range(4):
            self.resolve(resolver, f"x{n}.slow.example")
        self.reactor.now = 9.9
        self.resolve(resolver, "x9.slow.example")
        [warning] = self.resolverEvents()
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["domain"], "slow.example")
        self.assertNotIn("backed up", warning["log_format"])
        self.reactor.now = 10.0
        self.resolve(resolver, "x9.slow.example")
        self.assertEqual(len(self.resolverEvents()), 2)

    def test_domainRefusalsWarnedApart(self) -> None:
        """
        Each domain has its own ten seconds between warnings: a second
        domain refused while the first is still refused is named too.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=8, maxWaitingPerDomain=1)
        for domain in ("one.example", "two.example"):
            self.getaddrinfo.answers.update(
                {f"x{n}.{domain}": ["192.0.2.9"] for n in range(3)}
            )
        for domain in ("one.example", "two.example"):
            for n in range(3):
                self.resolve(resolver, f"x{n}.{domain}")
            self.reactor.now += 1
        self.assertEqual(
            [e.get("domain") for e in self.resolverEvents()],
            ["one.example", "two.example"],
        )

    def test_domainWarningsForgotten(self) -> None:
        """
        The domains warned of are remembered only while it matters: past
        L{MAX_DOMAIN_WARNINGS}, those warned of more than ten seconds ago
        are let go of.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=8, maxWaitingPerDomain=0)
        self.resolve(resolver, "busy.example")
        for n in range(MAX_DOMAIN_WARNINGS + 1):
            self.resolve(resolver, f"x.d{n}.example")
            self.reactor.now += 1
        self.assertLessEqual(len(resolver._warnedAt), 11)
        self.assertEqual(len(self.resolverEvents()), MAX_DOMAIN_WARNINGS + 1)

    def test_cancelledWaitingFreesDomainPlace(self) -> None:
        """
        A waiting lookup cancelled frees its place in its domain's share of
        the queue.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=8, maxWaitingPerDomain=1)
        self.getaddrinfo.answers.update(
            {f"x{n}.slow.example": ["192.0.2.9"] for n in range(3)}
        )
        self.resolve(resolver, "x0.slow.example")
        _, waiting = self.resolve(resolver, "x1.slow.example")
        _, refused = self.resolve(resolver, "x2.slow.example")
        self.assertTrue(refused.busy)
        waiting.cancel()
        _, again = self.resolve(resolver, "x2.slow.example")
        self.assertFalse(again.busy)


class ClientShareTests(ResolverTestCase):
    """
    The lookups one client asks for (as L{lookupClient} names it) share a
    part of the threads and of the queue.
    """

    def resolveFor(
        self, resolver: ThreadedResolver, client: str | None, name: str
    ) -> tuple[RecordingReceiver, Lookup]:
        """
        Start looking C{name} up for C{client}.
        """
        token = lookupClient.set(client)
        try:
            return self.resolve(resolver, name)
        finally:
            lookupClient.reset(token)

    def slowNames(self, count: int) -> list[str]:
        """
        C{count} names, each under a domain of its own.
        """
        names = [f"x.slow{n}.example" for n in range(count)]
        self.getaddrinfo.answers.update({name: ["192.0.2.9"] for name in names})
        return names

    def test_slowClientHoldsItsShare(self) -> None:
        """
        By default one client's lookups run in at most half of the
        threads: with twenty lookups for names under twenty domains (no
        domain's share reached) holding ten threads, another client's
        lookup, and a lookup for no client, run at once; the first
        client's others wait for one of its own to end.
        """
        resolver = ThreadedResolver(
            self.reactor, getaddrinfo=self.getaddrinfo, workers=self.workers
        )
        self.assertEqual(
            (resolver.maxRunningPerClient, resolver.maxWaitingPerClient), (10, 500)
        )
        slow = [
            self.resolveFor(resolver, "192.0.2.66", name)[0]
            for name in self.slowNames(20)
        ]
        self.assertEqual((resolver.running, resolver.waiting), (10, 10))
        other, lookup = self.resolveFor(resolver, "192.0.2.7", "b.example")
        self.assertFalse(lookup.busy)
        _, anonymous = self.resolveFor(resolver, None, "c.example")
        self.assertFalse(anonymous.busy)
        self.assertEqual((resolver.running, resolver.waiting), (12, 10))
        self.workers.jobs.pop()()
        self.workers.jobs.pop()()
        self.assertEqual(other.addresses, [IPv4Address("TCP", "192.0.2.2", 0)])
        self.assertEqual((resolver.running, resolver.waiting), (10, 10))
        self.workers.runNext()
        self.assertEqual(slow[0].completed, 1)
        self.assertEqual((resolver.running, resolver.waiting), (10, 9))
        self.assertEqual(resolver._clients, {"192.0.2.66": [10, 9]})

    def test_clientShareOfFewThreads(self) -> None:
        """
        A client's share of the threads is half, rounded down, but at least
        one.
        """
        for threads, share in [(1, 1), (2, 1), (3, 1), (4, 2), (20, 10)]:
            resolver = self.makeResolver(threads=threads)
            self.assertEqual(resolver.maxRunningPerClient, share, threads)

    def test_noShare(self) -> None:
        """
        A share of no thread, for a domain or a client, is refused: its
        lookups would wait for ever.
        """
        for name in ("maxRunningPerDomain", "maxRunningPerClient"):
            error = self.assertRaises(ValueError, self.makeResolver, **{name: 0})
            self.assertIn(name, str(error))

    def test_waitingInOrderOfTheirClients(self) -> None:
        """
        When a thread is free, the oldest waiting lookup whose client has
        threads left to it starts, passing older ones whose client has
        none.
        """
        resolver = self.makeResolver(threads=2, maxWaiting=4, maxRunningPerClient=1)
        first, second = self.slowNames(2)
        self.resolveFor(resolver, "192.0.2.66", first)
        self.resolveFor(resolver, "192.0.2.7", "a.example")
        self.resolveFor(resolver, "192.0.2.66", second)
        self.resolveFor(resolver, "192.0.2.7", "b.example")
        self.assertEqual((resolver.running, resolver.waiting), (2, 2))
        # a.example ends: the second slow name waits for the first, so
        # b.example goes first.
        self.workers.jobs.pop()()
        self.assertEqual((resolver.running, resolver.waiting), (2, 1))
        self.workers.jobs.pop()()
        self.assertEqual((resolver.running, resolver.waiting), (1, 1))
        self.workers.runNext()
        self.workers.runNext()
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls],
            ["a.example", "b.example", first, second],
        )
        self.assertEqual((resolver._domains, resolver._clients), ({}, {}))

    def test_clientWaitingShare(self) -> None:
        """
        By default one client's lookups take at most half of the places in
        the queue: beyond that they are refused (C{busy}), with
        a warning naming the client at most every ten seconds, while other
        clients' lookups still wait.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=8)
        self.assertEqual(resolver.maxWaitingPerClient, 4)
        lookups = [
            self.resolveFor(resolver, "192.0.2.66", name)[1]
            for name in self.slowNames(7)
        ]
        self.assertEqual([lookup.busy for lookup in lookups], [False] * 5 + [True] * 2)
        _, other = self.resolveFor(resolver, "192.0.2.7", "a.example")
        self.assertFalse(other.busy)
        self.assertEqual((resolver.running, resolver.waiting), (1, 5))
        [warning] = self.resolverEvents()
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["client"], "192.0.2.66")
        self.assertNotIn("backed up", warning["log_format"])
        self.reactor.now = 10.0
        self.resolveFor(resolver, "192.0.2.66", "x.slow9.example")
        self.assertEqual(len(self.resolverEvents()), 2)

    def test_sharedLookupCountsOnce(self) -> None:
        """
        A lookup another client asked for already is shared, and counted
        only against the client that asked first.
        """
        resolver = self.makeResolver(threads=2, maxWaiting=4, maxRunningPerClient=1)
        first, late = (
            self.resolveFor(resolver, "192.0.2.66", "a.example")[0],
            (self.resolveFor(resolver, "192.0.2.7", "a.example")[0]),
        )
        self.assertEqual(resolver._clients, {"192.0.2.66": [1, 0]})
        self.resolveFor(resolver, "192.0.2.7", "b.example")
        self.assertEqual(resolver.running, 2)
        self.workers.runNext()
        self.assertEqual((first.completed, late.completed), (1, 1))
        self.assertEqual(resolver._clients, {"192.0.2.7": [1, 0]})

    def test_cancelledWaitingFreesClientPlace(self) -> None:
        """
        A waiting lookup cancelled frees its place in its client's share of
        the queue.
        """
        resolver = self.makeResolver(threads=1, maxWaiting=8, maxWaitingPerClient=1)
        names = self.slowNames(3)
        self.resolveFor(resolver, "192.0.2.66", names[0])
        _, waiting = self.resolveFor(resolver, "192.0.2.66", names[1])
        _, refused = self.resolveFor(resolver, "192.0.2.66", names[2])
        self.assertTrue(refused.busy)
        waiting.cancel()
        _, again = self.resolveFor(resolver, "192.0.2.66", names[2])
        self.assertFalse(again.busy)

    def test_clientAndDomainWarnedApart(self) -> None:
        """
        A client and a domain of the same name each have their own ten
        seconds between warnings.
        """
        resolver = self.makeResolver(
            threads=1, maxWaiting=8, maxWaitingPerDomain=1, maxWaitingPerClient=1
        )
        self.getaddrinfo.answers.update(
            {f"x{n}.slow.example": ["192.0.2.9"] for n in range(2)}
        )
        names = self.slowNames(3)
        self.resolveFor(resolver, None, "a.example")
        self.resolveFor(resolver, None, "x0.slow.example")
        self.resolveFor(resolver, None, "x1.slow.example")
        self.resolveFor(resolver, "slow.example", names[1])
        self.resolveFor(resolver, "slow.example", names[2])
        self.assertEqual(
            [(e.get("domain"), e.get("client")) for e in self.resolverEvents()],
            [("slow.example", None), (None, "slow.example")],
        )


class CacheTests(ResolverTestCase):
    """
    Answers are kept for a short time.
    """

    def test_answerKept(self) -> None:
        """
        An answer with addresses is kept for C{cacheFor} seconds (30 by
        default): a lookup of the same name and kind in that time, on any
        port and in any case, is answered at once, in the call, with its
        own port, without a thread or C{getaddrinfo}; then it is looked up
        again.  Another kind (family) is another answer.  The counters say
        which was which.
        """
        resolver = self.makeResolver(maxRunningPerDomain=2)
        self.assertEqual(resolver.cacheFor, 30.0)
        first, _ = self.resolve(resolver, "a.example", 443)
        self.workers.runNext()
        self.reactor.now = 29.9
        kept, lookup = self.resolve(resolver, "a.example", 443)
        self.assertEqual(kept.addresses, first.addresses)
        self.assertEqual(kept.completed, 1)
        self.assertIs(kept.resolution, lookup)
        otherPort, _ = self.resolve(resolver, "A.EXAMPLE", 8443)
        self.assertEqual(
            otherPort.addresses,
            [
                IPv4Address("TCP", "192.0.2.1", 8443),
                IPv6Address("TCP", "2001:db8::1", 8443, 0, 3),
            ],
        )
        self.assertEqual(self.workers.jobs, [])
        self.assertEqual((resolver.lookedUp, resolver.answeredFromCache), (1, 2))
        self.resolve(resolver, "a.example", 443, [IPv4Address])
        self.assertEqual(len(self.workers.jobs), 1)
        self.workers.runNext()
        self.reactor.now = 30.0
        later, _ = self.resolve(resolver, "a.example", 443)
        self.assertEqual(later.completed, 0)
        self.workers.runNext()
        self.assertEqual(later.addresses, first.addresses)
        self.assertEqual((resolver.lookedUp, resolver.answeredFromCache), (3, 2))

    def test_failureKept(self) -> None:
        """
        An answer without an address (here no such name) is kept for
        C{cacheFailuresFor} seconds (10 by default); a C{getaddrinfo} that
        raised something else than C{OSError} gave no answer, and that is
        not kept.
        """
        self.getaddrinfo.answers["bug.example"] = RuntimeError("a bug")
        resolver = self.makeResolver()
        self.assertEqual(resolver.cacheFailuresFor, 10.0)
        self.resolve(resolver, "nowhere.example")
        self.resolve(resolver, "bug.example")
        self.workers.runNext()
        self.workers.runNext()
        self.flushLoggedErrors(RuntimeError)
        self.reactor.now = 9.9
        kept, _ = self.resolve(resolver, "nowhere.example")
        self.assertEqual((kept.addresses, kept.completed), ([], 1))
        self.resolve(resolver, "bug.example")
        self.assertEqual(len(self.workers.jobs), 1)
        self.workers.runNext()
        self.flushLoggedErrors(RuntimeError)
        self.reactor.now = 10.0
        self.resolve(resolver, "nowhere.example")
        self.assertEqual(len(self.workers.jobs), 1)

    def test_onlyAnswersAboutTheNameKept(self) -> None:
        """
        Only the failures that are answers about the name (no such name, no
        address of that kind, a DNS server that failed or did not answer)
        are kept: a lookup that failed for want of descriptors or memory
        (C{EAI_SYSTEM}, which Python raises as the C{OSError}, or
        C{EAI_MEMORY}) says nothing of the name, and runs again.
        """
        self.getaddrinfo.answers.update(
            {
                "again.example": socket.gaierror(socket.EAI_AGAIN, "try again"),
                "fds.example": OSError(errno.EMFILE, "Too many open files"),
                "memory.example": socket.gaierror(socket.EAI_MEMORY, "no memory"),
            }
        )
        resolver = self.makeResolver()
        names = ["nowhere.example", "again.example", "fds.example", "memory.example"]
        for name in names:
            self.resolve(resolver, name)
            self.workers.runNext()
        for name in names:
            self.resolve(resolver, name)
        self.assertEqual(len(self.workers.jobs), 2)
        for _ in range(2):
            self.workers.runNext()
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls][4:],
            ["fds.example", "memory.example"],
        )

    def test_addressesBounded(self) -> None:
        """
        The answers kept hold at most C{maxCachedAddresses} addresses
        together: a new answer pushes out the oldest until it fits, and an
        answer with more addresses than that is not kept at all.
        """
        self.getaddrinfo.answers["many.example"] = [f"192.0.2.{n}" for n in range(1, 5)]
        resolver = self.makeResolver(maxCachedAddresses=3, maxRunningPerDomain=2)
        self.assertEqual(ThreadedResolver(self.reactor).maxCachedAddresses, 65536)
        # Two addresses, then one: three; then one more pushes a.example out.
        for name in ("a.example", "b.example", "c.example", "many.example"):
            self.resolve(resolver, name)
            self.workers.runNext()
        self.assertEqual(resolver.cached, 2)
        self.resolve(resolver, "b.example")
        self.resolve(resolver, "c.example")
        self.assertEqual(self.workers.jobs, [])
        for name in ("a.example", "many.example"):
            self.resolve(resolver, name)
        self.assertEqual(len(self.workers.jobs), 2)

    def test_monotonicClock(self) -> None:
        """
        By default the answers kept expire by C{time.monotonic}, not by the
        wall clock (the reactor's C{seconds}), which a clock set back would
        make keep them that much longer.
        """
        self.assertIs(ThreadedResolver(self.reactor)._clock, time.monotonic)

    def test_nothingKept(self) -> None:
        """
        With C{cacheFor} and C{cacheFailuresFor} 0, no answer is kept.
        """
        resolver = self.makeResolver(cacheFor=0, cacheFailuresFor=0)
        for name in ("a.example", "nowhere.example"):
            self.resolve(resolver, name)
            self.workers.runNext()
            self.resolve(resolver, name)
            self.assertEqual(len(self.workers.jobs), 1)
            self.workers.runNext()
        self.assertEqual(resolver.cached, 0)

    def test_leastRecentlyUsedGoes(self) -> None:
        """
        At most C{maxCached} answers are kept: a new one pushes out the one
        least recently used (looked up, looked up again once expired, or
        answered from the answers kept), so that a flood of new names
        cannot push out a busy one.
        """
        resolver = self.makeResolver(maxCached=3)
        for now, name in [
            (0, "a.example"),
            (20, "b.example"),
            (21, "c.example"),
            # a.example expired (at 30): looked up again, kept until 70.
            (40, "a.example"),
            # b.example, answered from the answers kept, is used again.
            (41, "b.example"),
            # Pushes out the least recently used: c.example, not b.example
            # (kept since 20) nor a.example.
            (42, "d.example"),
        ]:
            self.reactor.now = now
            self.resolve(resolver, name)
            if self.workers.jobs:
                self.workers.runNext()
        self.assertEqual(resolver.cached, 3)
        self.assertEqual(resolver.answeredFromCache, 1)
        self.reactor.now = 45
        for name in ("a.example", "b.example", "d.example"):
            self.resolve(resolver, name)
        self.assertEqual(self.workers.jobs, [])
        self.resolve(resolver, "c.example")
        self.assertEqual(len(self.workers.jobs), 1)

    def test_cancelledBeforeKeptAnswer(self) -> None:
        """
        A receiver that cancels its lookup as it begins hears nothing of a
        kept answer.
        """
        resolver = self.makeResolver()
        self.resolve(resolver, "a.example")
        self.workers.runNext()

        class Cancelling(RecordingReceiver):
            def resolutionBegan(self, resolution: IHostResolution) -> None:
                super().resolutionBegan(resolution)
                resolution.cancel()

        receiver = Cancelling()
        resolver.resolveHostName(receiver, "a.example")
        self.assertEqual((receiver.addresses, receiver.completed), ([], 0))
        self.assertEqual(resolver.answeredFromCache, 0)


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
