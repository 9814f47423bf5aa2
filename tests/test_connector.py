"""
Tests for L{tunnel.connector}.
"""

from __future__ import annotations

import errno
import gc
import socket
import weakref
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
    NoProtocol,
    TCPTimedOutError,
    UserError,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.fakes import FakeGetaddrinfo, FakeResolver, ManualWorkers, ThreadReactor
from tests.test_direct import CountingFactory, FakeSocket
from tunnel import HostnameConnector, ITargetConnector
from tunnel.connector import ATTEMPT_DELAY, MAX_ATTEMPTS, AddressDenied, _AddressRace
from tunnel.interfaces import LookupsBusy, NoLocalPort, SourceUnusable
from tunnel.policy import IPAddress, TunnelPolicy
from tunnel.resolver import ThreadedResolver


class HostnameConnectorTests(SynchronousTestCase):
    """
    Tests for L{HostnameConnector}.
    """

    def test_interface(self) -> None:
        """
        L{HostnameConnector} provides L{ITargetConnector}.
        """
        self.assertTrue(ITargetConnector.providedBy(HostnameConnector(object())))

    def test_resolverUsed(self) -> None:
        """
        The endpoint resolves names with the given resolver, not the
        reactor's, and connects to every address it yields.
        """
        reactor = MemoryReactorClock()
        resolver = FakeResolver({"target.test": ["192.0.2.1", "2001:db8::1"]})
        connector = HostnameConnector(reactor, resolver=resolver, timeout=7)
        endpoint = connector.endpointForTarget("target.test", 443)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        reactor.advance(1)
        self.assertEqual(resolver.queries, ["target.test"])
        attempts = [
            (host, port, timeout) for host, port, _, timeout, _ in reactor.tcpClients
        ]
        self.assertEqual(
            sorted(attempts), [("192.0.2.1", 443, 7), ("2001:db8::1", 443, 7)]
        )
        d.cancel()
        self.failureResultOf(d)

    def test_noTimeout(self) -> None:
        """
        With C{timeout=None} the connector schedules no timer of its own,
        for an address or for a name: the caller bounds the attempt.
        """
        reactor = MemoryReactorClock()
        resolver = FakeResolver({"target.test": ["192.0.2.1"]})
        connector = HostnameConnector(reactor, resolver=resolver, timeout=None)
        attempts = [
            connector.endpointForTarget(host, 443).connect(
                Factory.forProtocol(Protocol)
            )
            for host in ("192.0.2.2", "target.test")
        ]
        reactor.advance(1)
        timeouts = [timeout for _, _, _, timeout, _ in reactor.tcpClients]
        self.assertEqual(timeouts, [None, None])
        for attempt in attempts:
            attempt.cancel()
            self.failureResultOf(attempt)

    def test_fixedResolver(self) -> None:
        """
        The resolving reactor wrapper refuses to have its resolver replaced.
        """
        from tunnel.connector import _ResolvingReactor

        reactor = _ResolvingReactor(MemoryReactorClock(), FakeResolver())
        self.assertRaises(
            NotImplementedError, reactor.installNameResolver, FakeResolver()
        )

    def test_defaultResolver(self) -> None:
        """
        Without a resolver, names are looked up by the reactor's shared
        L{ThreadedResolver}, not the reactor's C{nameResolver} (which queues
        without bound in the pool bcrypt needs); literals are connected to
        from the bind address without any lookup.
        """
        reactor = MemoryReactorClock()
        connector = HostnameConnector(reactor, bindAddress=("127.0.0.1", 0))
        self.assertIsInstance(connector.resolver, ThreadedResolver)
        # One per reactor: connectors made per tunnel share its threads.
        self.assertIs(HostnameConnector(reactor).resolver, connector.resolver)
        endpoint = connector.endpointForTarget("127.0.0.1", 80)
        endpoint.connect(Factory.forProtocol(Protocol))
        reactor.advance(1)
        [(host, port, _, _, bindAddress)] = reactor.tcpClients
        self.assertEqual((host, port, bindAddress), ("127.0.0.1", 80, ("127.0.0.1", 0)))


class VettingTests(SynchronousTestCase):
    """
    Only the resolved addresses the policy allows are connected to.
    """

    def connect(
        self, hostMap: dict[str, list[str]], host: str
    ) -> tuple[MemoryReactorClock, Deferred[Any]]:
        """
        Connect to C{host}:443 under the default policy.
        """
        reactor = MemoryReactorClock()
        connector = HostnameConnector(reactor, resolver=FakeResolver(hostMap))
        policy = TunnelPolicy()

        def allow(address: IPAddress) -> bool:
            return policy.checkAddress(None, None, host, 443, address)

        endpoint = connector.endpointForTarget(host, 443, allow)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        reactor.advance(1)
        return reactor, d

    def test_mixed(self) -> None:
        """
        A public-looking name that resolves to private and public addresses
        is connected to only on its public ones.
        """
        reactor, d = self.connect(
            {
                "www.test": [
                    "10.0.0.5",
                    "93.184.216.34",
                    "::ffff:127.0.0.1",
                    "2606:2800:220:1::1",
                    "169.254.169.254",
                ]
            },
            "www.test",
        )
        attempted = sorted(host for host, *_ in reactor.tcpClients)
        self.assertEqual(attempted, ["2606:2800:220:1::1", "93.184.216.34"])
        d.cancel()
        self.failureResultOf(d)

    def test_allPrivate(self) -> None:
        """
        A name that resolves only to denied addresses fails with
        L{AddressDenied}, without any connection attempt.
        """
        reactor, d = self.connect(
            {"rebind.test": ["10.0.0.5", "127.0.0.1"]}, "rebind.test"
        )
        self.assertEqual(reactor.tcpClients, [])
        self.failureResultOf(d, AddressDenied)

    def test_literal(self) -> None:
        """
        IP literals are vetted too.
        """
        reactor, d = self.connect({}, "127.0.0.1")
        self.assertEqual(reactor.tcpClients, [])
        self.failureResultOf(d, AddressDenied)

    def test_allowedLiteral(self) -> None:
        """
        An allowed address literal is connected to directly, without asking
        the resolver.
        """
        reactor = MemoryReactorClock()
        resolver = FakeResolver()
        connector = HostnameConnector(reactor, resolver=resolver, timeout=5)
        for host in ["93.184.216.34", "2606:2800:220:1::1"]:
            endpoint = connector.endpointForTarget(host, 443, lambda address: True)
            endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(
            [(h, p, t) for h, p, _, t, _ in reactor.tcpClients],
            [("93.184.216.34", 443, 5), ("2606:2800:220:1::1", 443, 5)],
        )
        self.assertEqual(resolver.queries, [])

    def test_invalidName(self) -> None:
        """
        A name the request grammar admits but IDNA does not (C{a_b},
        C{ab--c}, C{a-.b}) fails as a lookup failure (502 "does not
        resolve"), not as an unexpected error, and nothing is asked of the
        resolver.
        """
        for host in ["a_b", "_a.test", "ab--c.test", "a-.b"]:
            reactor = MemoryReactorClock()
            resolver = FakeResolver()
            connector = HostnameConnector(reactor, resolver=resolver)
            endpoint = connector.endpointForTarget(host, 443, lambda address: True)
            failure = self.failureResultOf(
                endpoint.connect(Factory.forProtocol(Protocol)), DNSLookupError
            )
            self.assertIn(host, str(failure.value))
            self.assertEqual(resolver.queries, [])

    def test_otherValueErrorKept(self) -> None:
        """
        An attempt that fails with a L{ValueError} for a valid name is not
        reported as a name that does not resolve: its failure is kept.
        """
        self.patch(
            HostnameEndpoint,
            "connect",
            lambda self, factory: fail(ValueError("something else")),
        )
        connector = HostnameConnector(MemoryReactorClock(), resolver=FakeResolver())
        endpoint = connector.endpointForTarget("a.test", 443, lambda address: True)
        failure = self.failureResultOf(
            endpoint.connect(Factory.forProtocol(Protocol)), ValueError
        )
        self.assertEqual(str(failure.value), "something else")

    def test_noAddresses(self) -> None:
        """
        A name with no addresses at all is a lookup failure (502), not a
        policy denial.
        """
        _reactor, d = self.connect({}, "nowhere.test")
        self.failureResultOf(d, DNSLookupError)


class LookupTests(SynchronousTestCase):
    """
    How the connector's endpoints use a L{ThreadedResolver}: a refused
    lookup is L{LookupsBusy}, and a cancelled connection attempt cancels its
    lookup.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.workers = ManualWorkers()
        self.getaddrinfo = FakeGetaddrinfo(
            {"a.test": ["192.0.2.1"], "b.test": ["192.0.2.2"]}
        )
        self.resolver = ThreadedResolver(
            ThreadReactor(),
            threads=1,
            maxWaiting=1,
            getaddrinfo=self.getaddrinfo,
            workers=self.workers,
        )
        self.connector = HostnameConnector(
            self.reactor, resolver=self.resolver, timeout=None
        )

    def connect(self, host: str) -> Deferred[Any]:
        """
        Start connecting to C{host}:443.
        """
        endpoint = self.connector.endpointForTarget(host, 443, lambda address: True)
        return endpoint.connect(Factory.forProtocol(Protocol))

    def test_resolved(self) -> None:
        """
        Once the lookup is answered, the endpoint connects to the address.
        """
        d = self.connect("a.test")
        self.assertNoResult(d)
        self.workers.runNext()
        self.reactor.advance(1)
        [(host, port, _, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("192.0.2.1", 443))
        d.cancel()
        self.failureResultOf(d)

    def test_busy(self) -> None:
        """
        A lookup refused because too many wait fails the attempt with
        L{LookupsBusy}, at once.
        """
        self.connect("a.test")
        self.connect("b.test")
        failure = self.failureResultOf(self.connect("c.test"), LookupsBusy)
        self.assertIn("c.test", str(failure.value))

    def test_cancelWaiting(self) -> None:
        """
        Cancelling an attempt whose lookup waits for a thread cancels the
        lookup: it never runs, and its place in the queue is free at once.
        """
        first = self.connect("a.test")
        second = self.connect("b.test")
        second.cancel()
        self.failureResultOf(second)
        self.assertEqual(self.resolver.waiting, 0)
        third = self.connect("c.test")
        self.assertNoResult(third)
        self.workers.runNext()
        self.workers.runNext()
        self.assertEqual(
            [call[0] for call in self.getaddrinfo.calls], ["a.test", "c.test"]
        )
        # c.test has no address.
        self.failureResultOf(third, DNSLookupError)
        first.cancel()
        self.failureResultOf(first)

    def test_cancelAfterLookup(self) -> None:
        """
        Cancelling once the lookup is answered and a connection is being
        made cancels that connection.
        """
        d = self.connect("a.test")
        self.workers.runNext()
        self.reactor.advance(1)
        [connector] = self.reactor.connectors
        d.cancel()
        self.failureResultOf(d)
        self.assertTrue(connector.stoppedConnecting)

    def test_resolverCannotCancel(self) -> None:
        """
        A resolver whose resolutions cannot be cancelled (Twisted's own
        raise L{NotImplementedError}) is no error; any other failure to
        cancel is logged, and the attempt is cancelled all the same.
        """
        for error in (NotImplementedError(), ZeroDivisionError()):
            resolver = _Unanswered(error)
            connector = HostnameConnector(self.reactor, resolver=resolver)
            endpoint = connector.endpointForTarget("a.test", 443)
            d = endpoint.connect(Factory.forProtocol(Protocol))
            d.cancel()
            self.failureResultOf(d)
            self.assertEqual(resolver.cancels, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


@implementer(IHostnameResolver)
class _Unanswered:
    """
    A resolver that never answers, and whose resolutions raise when
    cancelled.

    @ivar cancels: How many times a resolution was cancelled.
    """

    def __init__(self, error: Exception) -> None:
        self._error = error
        self.cancels = 0

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: object = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        Begin, and never complete.
        """
        resolver = self

        @implementer(IHostResolution)
        class Resolution:
            name = hostName

            def cancel(self) -> None:
                resolver.cancels += 1
                raise resolver._error

        resolution = Resolution()
        resolutionReceiver.resolutionBegan(resolution)
        return resolution


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    """
    A half-closeable protocol that records its events.
    """

    def __init__(self) -> None:
        self.events: list[object] = []

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def readConnectionLost(self) -> None:
        self.events.append("read-lost")

    def writeConnectionLost(self) -> None:
        self.events.append("write-lost")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.events.append(reason.type)


class AddressEndpointTests(SynchronousTestCase):
    """
    Where it cannot connect by hand (here, on a memory reactor), the endpoint
    for address literals connects with C{connectTCP} and keeps only a small
    announcing protocol per connection.
    """

    def connect(
        self, protocol: Protocol | None
    ) -> tuple[MemoryReactorClock, Deferred[Any]]:
        """
        Start connecting to 192.0.2.1:443 with a factory that builds
        C{protocol}.
        """
        reactor = MemoryReactorClock()
        connector = HostnameConnector(reactor, timeout=7, bindAddress=("::1", 0))
        endpoint = connector.endpointForTarget("192.0.2.1", 443)
        factory = Factory()
        factory.buildProtocol = lambda addr: protocol  # type: ignore[method-assign]
        d = endpoint.connect(factory)
        return reactor, d

    def test_connected(self) -> None:
        """
        The Deferred fires with the built protocol once it is connected, and
        every event of the transport reaches it, half-closes included.
        """
        protocol = _Recorder()
        reactor, d = self.connect(protocol)
        [(host, port, factory, timeout, bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout, bind), ("192.0.2.1", 443, 7, ("::1", 0)))
        announcing: Any = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 443))
        self.assertNoResult(d)
        self.assertTrue(IHalfCloseableProtocol.providedBy(announcing))
        transport = StringTransport()
        announcing.makeConnection(transport)
        self.assertIs(self.successResultOf(d), protocol)
        self.assertIs(protocol.transport, transport)
        announcing.dataReceived(b"hello")
        announcing.readConnectionLost()
        announcing.writeConnectionLost()
        announcing.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            protocol.events,
            ["made", b"hello", "read-lost", "write-lost", ConnectionDone],
        )
        self.assertEqual(announcing.logPrefix(), "_Recorder")

    def test_plainProtocol(self) -> None:
        """
        A protocol that does not take half-closes is not announced as one
        (the transport then reports a FIN as a lost connection).
        """
        protocol = Protocol()
        reactor, d = self.connect(protocol)
        [(_, _, factory, _, _)] = reactor.tcpClients
        announcing: Any = factory.buildProtocol(None)
        self.assertFalse(IHalfCloseableProtocol.providedBy(announcing))
        announcing.makeConnection(StringTransport())
        self.assertIs(self.successResultOf(d), protocol)

    def test_failed(self) -> None:
        """
        A failed attempt fails the Deferred with its reason.
        """
        reactor, d = self.connect(Protocol())
        [(_, _, factory, _, _)] = reactor.tcpClients
        [connector] = reactor.connectors
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.failureResultOf(d, ConnectionRefusedError)

    def test_noProtocol(self) -> None:
        """
        A factory that builds no protocol fails the Deferred, and no
        protocol is given to the transport.
        """
        reactor, d = self.connect(None)
        [(_, _, factory, _, _)] = reactor.tcpClients
        self.assertIsNone(factory.buildProtocol(None))
        self.failureResultOf(d, NoProtocol)

    def test_cancel(self) -> None:
        """
        Cancelling stops the attempt; the failure the connector then
        reports changes nothing.
        """
        reactor, d = self.connect(Protocol())
        [(_, _, factory, _, _)] = reactor.tcpClients
        [connector] = reactor.connectors
        stopConnecting = connector.stopConnecting

        def stopAndReport() -> None:
            # As a real connector does: the failure is reported at once.
            stopConnecting()
            factory.clientConnectionFailed(connector, Failure(UserError()))

        connector.stopConnecting = stopAndReport
        d.cancel()
        self.assertTrue(connector.stoppedConnecting)
        self.failureResultOf(d, CancelledError)

    def test_factoryStartedAndStopped(self) -> None:
        """
        The given factory is started when the attempt starts and stopped
        when the connection (or the attempt) ends, as with Twisted's own
        endpoints.
        """
        calls: list[str] = []

        class Counting(Factory):
            protocol = Protocol

            def doStart(self) -> None:
                calls.append("start")

            def doStop(self) -> None:
                calls.append("stop")

        for failing in (False, True):
            del calls[:]
            reactor = MemoryReactorClock()
            endpoint = HostnameConnector(reactor).endpointForTarget("192.0.2.1", 443)
            d = endpoint.connect(Counting())
            [(_, _, factory, _, _)] = reactor.tcpClients
            [connector] = reactor.connectors
            factory.doStart()
            self.assertEqual(calls, ["start"])
            if failing:
                factory.clientConnectionFailed(connector, Failure(UserError()))
                self.failureResultOf(d, UserError)
            else:
                protocol: Any = factory.buildProtocol(None)
                protocol.makeConnection(StringTransport())
                self.successResultOf(d)
                factory.clientConnectionLost(connector, Failure(ConnectionDone()))
            factory.doStop()
            self.assertEqual(calls, ["start", "stop"])

    def test_connectTCPFails(self) -> None:
        """
        A C{connectTCP} that raises fails the Deferred.
        """
        reactor = MemoryReactorClock()

        def broken(*args: object) -> None:
            raise OSError("no sockets left")

        reactor.connectTCP = broken  # type: ignore[method-assign]
        connector = HostnameConnector(reactor)
        d = connector.endpointForTarget("192.0.2.1", 443).connect(Factory())
        self.failureResultOf(d, OSError)


class AddressRaceTests(SynchronousTestCase):
    """
    L{_AddressRace}: the connector's own Happy Eyeballs race over
    L{DirectEndpoint}s, for names on reactors that connect by hand.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.sockets: list[FakeSocket] = []
        self.resolver = FakeResolver(
            {
                "two.test": ["192.0.2.1", "2001:db8::1"],
                "one.test": ["192.0.2.9"],
            }
        )
        self.protocol = Protocol()
        self.factory = CountingFactory(self.protocol)

    def newSocket(self, family: int, type: int) -> Any:
        """
        Make a fake socket, and keep it.
        """
        made = FakeSocket()
        made(family, type)
        self.sockets.append(made)
        return made

    def race(self, host: str) -> Deferred[Any]:
        """
        Race the addresses of C{host}, port 443.
        """
        endpoint = _AddressRace(
            self.reactor, self.resolver, host, 443, None, self.newSocket
        )
        return endpoint.connect(self.factory)

    def attempts(self) -> list[Any]:
        """
        The attempts waiting for their handshake, by the address they
        connect to.
        """
        return sorted(
            self.reactor.getWriters(), key=lambda attempt: str(attempt._address)
        )

    def assertNothingLeft(self) -> None:
        """
        No attempt is registered and, once the sockets of the attempts that
        ended are closed (at the reactor's next turn), no timer is pending.
        """
        self.assertEqual(list(self.reactor.getWriters()), [])
        self.reactor.advance(0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_firstAddressWins(self) -> None:
        """
        The first address is tried at once; when it connects, the race is
        won with the factory's protocol and no later attempt starts.
        """
        d = self.race("two.test")
        [only] = self.sockets
        self.assertEqual(only.connectedTo, ("192.0.2.1", 443))
        self.assertNoResult(d)
        [attempt] = self.attempts()
        attempt.doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)
        self.assertNothingLeft()
        self.assertEqual(len(self.sockets), 1)
        self.assertEqual(self.resolver.queries, ["two.test"])

    def test_nextAfterDelay(self) -> None:
        """
        An attempt that has not connected after L{ATTEMPT_DELAY} seconds is
        joined by one to the next address; the first to connect wins, and
        the other is abandoned (its socket closed), the factory started and
        stopped once for each attempt.
        """
        d = self.race("two.test")
        self.reactor.advance(ATTEMPT_DELAY - 0.01)
        self.assertEqual(len(self.sockets), 1)
        self.reactor.advance(0.01)
        first, second = self.sockets
        self.assertEqual(second.connectedTo, ("2001:db8::1", 443, 0, 0))
        ipv6 = [a for a in self.attempts() if a._socket is second]
        ipv6[0].doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)
        self.assertNothingLeft()
        self.assertTrue(first.closed)
        self.assertFalse(second.closed)
        self.assertEqual(self.factory.calls, ["start", "start", "stop", "stop"])

    def test_nextAtOnceWhenAllFailed(self) -> None:
        """
        When every attempt under way failed, the next address is tried at
        once, without waiting for the delay.
        """
        d = self.race("two.test")
        first = self.sockets[0]
        first.error = errno.ECONNREFUSED
        [attempt] = self.attempts()
        attempt.doWrite()
        self.assertEqual(len(self.sockets), 2)
        # (Only the failed attempt's socket, closing at the next turn.)
        self.reactor.advance(0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertNoResult(d)

    def test_attemptsBounded(self) -> None:
        """
        However many addresses never answer, at most L{MAX_ATTEMPTS}
        attempts are under way at once: each new one, every
        L{ATTEMPT_DELAY} seconds, abandons the oldest (its socket closed),
        so the race goes on through the addresses with a bounded number of
        sockets, and a later address can still win.
        """
        addresses = [f"192.0.2.{n}" for n in range(1, 11)]
        self.resolver.hostMap["many.test"] = addresses
        d = self.race("many.test")
        for started in range(2, len(addresses) + 1):
            self.reactor.advance(ATTEMPT_DELAY)
            self.assertEqual(len(self.sockets), started)
            self.assertEqual(len(self.attempts()), min(started, MAX_ATTEMPTS), started)
            self.assertEqual(
                sum(not s.closed for s in self.sockets), min(started, MAX_ATTEMPTS)
            )
        self.assertEqual(
            [s.connectedTo for s in self.sockets if not s.closed],
            [(address, 443) for address in addresses[-MAX_ATTEMPTS:]],
        )
        [last] = [a for a in self.attempts() if a._socket is self.sockets[-1]]
        last.doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)
        self.assertNothingLeft()
        self.assertEqual(sum(not s.closed for s in self.sockets), 1)

    def test_unusableAddress(self) -> None:
        """
        An address no socket can connect to (an IPv6 zone naming no
        interface) fails its attempt at once, and the race goes on to the
        next address.
        """
        self.resolver.hostMap["odd.test"] = ["fe80::1%nosuchif0", "192.0.2.5"]
        d = self.race("odd.test")
        [only] = self.sockets
        self.assertEqual(only.connectedTo, ("192.0.2.5", 443))
        self.attempts()[0].doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)

    def test_allFail(self) -> None:
        """
        When every address refuses, the race fails with the last failure.
        """
        d = self.race("two.test")
        self.sockets[0].error = errno.ECONNREFUSED
        self.attempts()[0].doWrite()
        second = self.sockets[1]
        second.error = errno.ETIMEDOUT
        self.attempts()[0].doWrite()
        self.failureResultOf(d, TCPTimedOutError)
        self.assertNothingLeft()

    def test_noLocalPortReported(self) -> None:
        """
        When every address failed and one of them for want of a local port
        (L{NoLocalPort}, the proxy's shortage), the race fails with that,
        not with another address's failure, whatever their order.
        """

        def newSocket(family: int, type: int) -> Any:
            sock = self.newSocket(family, type)
            if family == socket.AF_INET:
                sock.connectResult = errno.EADDRNOTAVAIL
            return sock

        for order in (["192.0.2.1", "2001:db8::1"], ["2001:db8::1", "192.0.2.1"]):
            self.sockets.clear()
            self.resolver.hostMap["dual.test"] = order
            endpoint = _AddressRace(
                self.reactor, self.resolver, "dual.test", 443, None, newSocket
            )
            d = endpoint.connect(self.factory)
            self.reactor.advance(ATTEMPT_DELAY)
            [v6] = [s for s in self.sockets if s.made and s.made[0] == socket.AF_INET6]
            v6.error = errno.ECONNREFUSED
            [attempt] = self.attempts()
            attempt.doWrite()
            self.failureResultOf(d, NoLocalPort)
            self.assertNothingLeft()

    def test_sourcesByVersion(self) -> None:
        """
        Each attempt connects from the source address of its address's IP
        version, if there is one.
        """
        endpoint = _AddressRace(
            self.reactor,
            self.resolver,
            "two.test",
            443,
            None,
            self.newSocket,
            sources={4: "192.0.2.100", 6: "2001:db8::100"},
        )
        endpoint.connect(self.factory)
        self.reactor.advance(ATTEMPT_DELAY)
        self.assertEqual(
            [s.boundTo for s in self.sockets],
            [("192.0.2.100", 0), ("2001:db8::100", 0)],
        )
        self.sockets.clear()
        self.race("two.test")
        self.reactor.advance(ATTEMPT_DELAY)
        self.assertEqual([s.boundTo for s in self.sockets], [None, None])

    def test_mappedAddressFromIPv4Source(self) -> None:
        """
        A name's IPv4-mapped IPv6 address is connected to as the IPv4
        address it holds, from the IPv4 source.
        """
        self.resolver.hostMap["mapped.test"] = ["::ffff:192.0.2.1"]
        _AddressRace(
            self.reactor,
            self.resolver,
            "mapped.test",
            443,
            None,
            self.newSocket,
            sources={4: "192.0.2.100", 6: "2001:db8::100"},
        ).connect(self.factory)
        [made] = self.sockets
        assert made.made is not None
        self.assertEqual(made.made[0], socket.AF_INET)
        self.assertEqual(made.boundTo, ("192.0.2.100", 0))
        self.assertEqual(made.connectedTo, ("192.0.2.1", 443))

    def test_sourceUnusableReported(self) -> None:
        """
        When every address failed and one for want of its source address
        (L{SourceUnusable}), the race fails with that.
        """

        def newSocket(family: int, type: int) -> Any:
            sock = self.newSocket(family, type)
            if family == socket.AF_INET:
                sock.bindError = OSError(errno.EADDRNOTAVAIL, "Cannot assign")
            return sock

        d = _AddressRace(
            self.reactor,
            self.resolver,
            "two.test",
            443,
            None,
            newSocket,
            sources={4: "192.0.2.100"},
        ).connect(self.factory)
        self.reactor.advance(ATTEMPT_DELAY)
        [v6] = [s for s in self.sockets if s.made and s.made[0] == socket.AF_INET6]
        v6.error = errno.ECONNREFUSED
        [attempt] = self.attempts()
        attempt.doWrite()
        self.failureResultOf(d, SourceUnusable)

    def test_noAddresses(self) -> None:
        """
        A name without addresses fails with L{DNSLookupError}, naming it,
        and makes no socket.
        """
        failure = self.failureResultOf(self.race("none.test"), DNSLookupError)
        self.assertIn("none.test", str(failure.value))
        self.assertEqual(self.sockets, [])

    def test_invalidName(self) -> None:
        """
        A name that is not valid IDNA fails with C{ValueError} before any
        lookup, as C{HostnameEndpoint}'s does.
        """
        self.failureResultOf(self.race("ab--c.test"), ValueError)
        self.assertEqual(self.resolver.queries, [])

    def test_cancelDuringRace(self) -> None:
        """
        Cancelling the race abandons every attempt and the timer, and fails
        it with L{ConnectingCancelledError}.
        """
        self.resolver.hostMap["three.test"] = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
        d = self.race("three.test")
        self.reactor.advance(ATTEMPT_DELAY)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertNothingLeft()
        self.assertEqual([s.closed for s in self.sockets], [True, True])

    def test_cancelDuringLookup(self) -> None:
        """
        Cancelled before the name is resolved, the race fails at once and
        never starts an attempt, even if the addresses come later.
        """
        unanswered = _Unanswered(ZeroDivisionError())
        endpoint = _AddressRace(
            self.reactor, unanswered, "late.test", 443, None, self.newSocket
        )
        d = endpoint.connect(self.factory)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertEqual(self.sockets, [])

    def test_throughVettedEndpoint(self) -> None:
        """
        On a reactor that connects by hand, the connector's endpoint for a
        name races only the addresses the policy allows, and fails with
        L{AddressDenied} when it allows none.
        """
        connector = HostnameConnector(self.reactor, resolver=self.resolver)
        connector._direct = True
        endpoint = connector.endpointForTarget(
            "two.test", 443, lambda address: address.version == 6
        )
        self.assertIsInstance(endpoint._endpoint, _AddressRace)  # type: ignore[attr-defined]
        endpoint._endpoint._newSocket = self.newSocket  # type: ignore[attr-defined]
        endpoint.connect(self.factory)
        [only] = self.sockets
        self.assertEqual(only.connectedTo, ("2001:db8::1", 443, 0, 0))
        denied = connector.endpointForTarget("one.test", 443, lambda address: False)
        self.failureResultOf(denied.connect(self.factory), AddressDenied)

    def test_noCycleAfterWin(self) -> None:
        """
        A won race leaves no reference cycle: with Python's cycle collector
        off, the connector's endpoint, the race and the factory are freed
        as soon as the caller lets go of them.
        """
        gc.disable()
        self.addCleanup(gc.enable)
        # A resolver of its own: the shared one records its receivers.
        resolver = FakeResolver({"one.test": ["192.0.2.9"]})
        connector = HostnameConnector(self.reactor, resolver=resolver)
        connector._direct = True
        factory = CountingFactory(self.protocol)
        endpoint: Any = connector.endpointForTarget("one.test", 443)
        endpoint._endpoint._newSocket = self.newSocket
        d = endpoint.connect(factory)
        self.attempts()[0].doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)
        freed = weakref.ref(factory)
        del endpoint, d, factory, connector, resolver
        self.assertIsNone(freed())

    def test_secondCompletionStartsNothing(self) -> None:
        """
        A resolver that reports completion twice (or addresses after it)
        starts no second round of attempts: only the first address is tried
        at once, and once it wins no timer is left and nothing more starts.
        """
        self.resolver.hostMap["three.test"] = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
        self.resolver.completions = 2
        d = self.race("three.test")
        self.assertEqual([s.connectedTo for s in self.sockets], [("192.0.2.1", 443)])
        [receiver] = self.resolver.receivers
        receiver.addressResolved(IPv4Address("TCP", "192.0.2.4", 443))
        self.attempts()[0].doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)
        self.assertNothingLeft()
        self.reactor.advance(ATTEMPT_DELAY * 10)
        self.assertEqual(len(self.sockets), 1)

    def test_addressesAfterCancel(self) -> None:
        """
        Cancelled while the lookup is under way, with a resolver that cannot
        stop it, the race does nothing when the answer comes later, with
        addresses or without.
        """
        self.resolver.later = True
        for name in ["one.test", "none.test"]:
            d = self.race(name)
            d.cancel()
            self.failureResultOf(d, ConnectingCancelledError)
        self.resolver.answerWaiting()
        self.assertEqual(self.sockets, [])
        self.assertNothingLeft()
