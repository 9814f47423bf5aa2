"""
Tests for L{tunnel.direct}.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, cast

from twisted.internet import reactor as globalReactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectionLost,
    ConnectionRefusedError,
    NoProtocol,
    NoRouteError,
    TimeoutError,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import FakeResolver
from tunnel.connector import HostnameConnector, _AddressEndpoint
from tunnel.direct import (
    DirectEndpoint,
    DirectTransport,
    checkSourceAddress,
    routeFrom,
    sourcesByVersion,
)
from tunnel.interfaces import NoLocalPort, SourceUnusable


class FakeSocket:
    """
    Just enough of a non-blocking socket for L{DirectEndpoint} and the
    transport it makes, answering as Linux does: C{connect_ex} answers
    C{connectResult} the first time; asked again it answers C{again} if
    set, otherwise the handshake's C{error} (which it then clears, as the
    kernel does) or C{EISCONN}; C{SO_ERROR} reads C{error}.

    @ivar made: The C{(family, type)} it was made with.
    @ivar connectedTo: The address given to C{connect_ex}.
    @ivar closed: Whether it was closed.
    @ivar boundTo: The address given to C{bind}, if any.
    @ivar options: The C{(level, option, value)} set, in order, with
        C{"bind"} where it was bound.
    @ivar bindError: What C{bind} raises, if anything.
    """

    def __init__(self, connectResult: int = errno.EINPROGRESS) -> None:
        self.connectResult = connectResult
        self.error = 0
        self.again: int | None = None
        self.made: tuple[int, int] | None = None
        self.connectedTo: object = None
        self.closed = False
        self.boundTo: object = None
        self.options: list[object] = []
        self.bindError: OSError | None = None

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))

    def bind(self, address: object) -> None:
        if self.bindError is not None:
            raise self.bindError
        self.boundTo = address
        self.options.append("bind")

    def __enter__(self) -> FakeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, family: int, type: int) -> FakeSocket:
        self.made = (family, type)
        return self

    def connect_ex(self, address: object) -> int:
        if self.connectedTo is None:
            self.connectedTo = address
            return self.connectResult
        if self.again is not None:
            return self.again
        error, self.error = self.error, 0
        return error or errno.EISCONN

    def getsockopt(self, level: int, option: int) -> int:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR)
        return self.error

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return -1 if self.closed else 42

    def close(self) -> None:
        self.closed = True


class CountingFactory(Factory):
    """
    A factory that records the addresses it builds protocols for and how
    often it is started and stopped.
    """

    def __init__(self, protocol: Protocol | None) -> None:
        self.built = protocol
        self.addresses: list[object] = []
        self.calls: list[str] = []

    def doStart(self) -> None:
        self.calls.append("start")

    def doStop(self) -> None:
        self.calls.append("stop")

    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.addresses.append(addr)
        return self.built


class DirectEndpointTests(SynchronousTestCase):
    """
    L{DirectEndpoint} connects with one C{connect}, waits for the socket to
    be writable, and reads the outcome from C{SO_ERROR}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.socket = FakeSocket()
        self.protocol = Protocol()
        self.factory = CountingFactory(self.protocol)

    def connect(
        self, host: str = "192.0.2.1", timeout: float | None = None
    ) -> tuple[Deferred[Any], Any]:
        """
        Start connecting to C{host} port 443.

        @return: The Deferred and the attempt registered with the reactor.
        """
        endpoint = DirectEndpoint(
            self.reactor, host, 443, timeout, newSocket=cast(Any, self.socket)
        )
        d = endpoint.connect(self.factory)
        writers = list(self.reactor.getWriters())
        attempt = writers[0] if writers else None
        return d, attempt

    def assertClosedSoon(self) -> None:
        """
        Assert that the socket is closed at the reactor's next turn, not at
        once: a socket made later in the same poll would reuse its
        descriptor number, and get the events still due for it.
        """
        self.assertFalse(self.socket.closed)
        self.reactor.advance(0)
        self.assertTrue(self.socket.closed)

    def test_connected(self) -> None:
        """
        A non-blocking IPv4 socket is made and connected; once it is
        writable without error, the attempt leaves the reactor, the protocol
        is built for the target's address and connected to a
        L{DirectTransport} that reads, the Deferred fires with it, and the
        factory was started and then stopped.
        """
        d, attempt = self.connect()
        self.assertEqual(
            self.socket.made,
            (
                socket.AF_INET,
                socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            ),
        )
        self.assertEqual(self.socket.connectedTo, ("192.0.2.1", 443))
        self.assertEqual(attempt.fileno(), 42)
        self.assertEqual(attempt.logPrefix(), "DirectEndpoint")
        self.assertNoResult(d)
        self.assertEqual(self.factory.calls, ["start"])
        attempt.doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)
        transport = self.protocol.transport
        self.assertIs(type(transport), DirectTransport)
        self.assertEqual(list(self.reactor.getWriters()), [])
        self.assertEqual(list(self.reactor.getReaders()), [transport])
        self.assertEqual(self.factory.addresses, [IPv4Address("TCP", "192.0.2.1", 443)])
        assert transport is not None
        self.assertEqual(transport.getPeer(), IPv4Address("TCP", "192.0.2.1", 443))
        self.assertEqual(repr(transport), "<Protocol to 192.0.2.1:443>")
        self.assertEqual(self.factory.calls, ["start", "stop"])
        self.assertFalse(self.socket.closed)

    def test_ipv6(self) -> None:
        """
        An IPv6 literal makes an IPv6 socket, connects to the four-part
        address, and the transport's peer is an L{IPv6Address}.
        """
        d, attempt = self.connect("2001:db8::1")
        self.assertEqual(self.socket.made and self.socket.made[0], socket.AF_INET6)
        self.assertEqual(self.socket.connectedTo, ("2001:db8::1", 443, 0, 0))
        attempt.doWrite()
        self.successResultOf(d)
        self.assertEqual(
            self.protocol.transport.getPeer(),  # type: ignore[union-attr]
            IPv6Address("TCP", "2001:db8::1", 443),
        )
        self.assertEqual(
            self.factory.addresses, [IPv6Address("TCP", "2001:db8::1", 443)]
        )

    def test_refused(self) -> None:
        """
        A handshake that ends with C{ECONNREFUSED} in C{SO_ERROR} fails the
        Deferred with L{ConnectionRefusedError}, as C{connectTCP} would; the
        socket is closed and nothing stays registered.
        """
        d, attempt = self.connect()
        self.socket.error = errno.ECONNREFUSED
        attempt.doWrite()
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertClosedSoon()
        self.assertEqual(list(self.reactor.getWriters()), [])
        self.assertEqual(list(self.reactor.getReaders()), [])
        self.assertEqual(self.factory.calls, ["start", "stop"])
        self.assertEqual(self.factory.addresses, [])

    def test_failsAtOnce(self) -> None:
        """
        A C{connect} that fails at once (no route) fails the Deferred at
        once with the matching error; the socket is never registered.
        """
        self.socket.connectResult = errno.ENETUNREACH
        d, attempt = self.connect()
        self.assertIsNone(attempt)
        self.failureResultOf(d, NoRouteError)
        self.assertClosedSoon()

    def test_noLocalPort(self) -> None:
        """
        A C{connect} to an IPv4 address that fails at once with
        C{EADDRNOTAVAIL} (no local port left) fails with L{NoLocalPort}, a
        L{ConnectError}; to an IPv6 address (where it also means no IPv6
        address to connect from) with a plain L{ConnectError}.
        """
        self.socket.connectResult = errno.EADDRNOTAVAIL
        d, _ = self.connect()
        failure = self.failureResultOf(d, NoLocalPort)
        self.assertIsInstance(failure.value, ConnectError)
        self.assertEqual(failure.value.osError, errno.EADDRNOTAVAIL)
        self.assertClosedSoon()
        self.socket = FakeSocket(errno.EADDRNOTAVAIL)
        d, _ = self.connect("2001:db8::1")
        failure = self.failureResultOf(d, ConnectError)
        self.assertNotIsInstance(failure.value, NoLocalPort)

    def fromSource(self, source: str) -> DirectEndpoint:
        """
        An endpoint to C{192.0.2.1} port 443 that connects from C{source}.
        """
        return DirectEndpoint(
            self.reactor,
            "192.0.2.1",
            443,
            None,
            newSocket=cast(Any, self.socket),
            source=source,
        )

    def test_sourceAddress(self) -> None:
        """
        With a C{source}, the socket is bound to that address, port 0, and
        told first to pick its port at C{connect}
        (C{IP_BIND_ADDRESS_NO_PORT}), so that a source address does not
        hold an ephemeral port per tunnel for every destination.
        """
        endpoint = self.fromSource("192.0.2.100")
        endpoint.connect(self.factory)
        self.assertEqual(self.socket.boundTo, ("192.0.2.100", 0))
        self.assertEqual(self.socket.options, [(socket.IPPROTO_IP, 24, 1), "bind"])
        self.assertEqual(self.socket.connectedTo, ("192.0.2.1", 443))

    def test_noSourceNoBind(self) -> None:
        """
        Without a C{source}, the socket is not bound.
        """
        self.connect()
        self.assertIsNone(self.socket.boundTo)

    def test_sourceUnusable(self) -> None:
        """
        A source the socket cannot be bound to (no longer the host's, say)
        fails the attempt with L{SourceUnusable}, a L{ConnectError} naming
        the source, before any C{connect}: the socket is closed and the
        factory never started.
        """
        self.socket.bindError = OSError(
            errno.EADDRNOTAVAIL, "Cannot assign requested address"
        )
        endpoint = self.fromSource("192.0.2.100")
        failure = self.failureResultOf(endpoint.connect(self.factory), SourceUnusable)
        self.assertIsInstance(failure.value, ConnectError)
        self.assertEqual(failure.value.osError, errno.EADDRNOTAVAIL)
        self.assertIn("192.0.2.100", str(failure.value))
        self.assertTrue(self.socket.closed)
        self.assertIsNone(self.socket.connectedTo)
        self.assertEqual(self.factory.calls, [])

    def test_checkSourceAddress(self) -> None:
        """
        L{checkSourceAddress} binds a socket of the address's family to it,
        as connections from it will be, and closes it; a failure to bind is
        raised.
        """
        for address, family in [
            ("192.0.2.100", socket.AF_INET),
            ("2001:db8::100", socket.AF_INET6),
        ]:
            made = FakeSocket()
            checkSourceAddress(address, cast(Any, made))
            self.assertEqual(made.made, (family, socket.SOCK_STREAM))
            self.assertEqual(made.boundTo, (address, 0))
            self.assertTrue(made.closed)
        broken = FakeSocket()
        broken.bindError = OSError(errno.EADDRNOTAVAIL, "Cannot assign")
        self.assertRaises(OSError, checkSourceAddress, "192.0.2.1", cast(Any, broken))
        self.assertTrue(broken.closed)

    def test_zonedSource(self) -> None:
        """
        An IPv6 source with a zone is bound with the zone's scope number,
        which a numeric lookup gives (no DNS), not the 0 a plain address
        pair would leave.
        """
        endpoint = DirectEndpoint(
            self.reactor,
            "fe80::2%lo",
            443,
            None,
            newSocket=cast(Any, self.socket),
            source="fe80::1%lo",
        )
        endpoint.connect(self.factory)
        self.assertEqual(
            self.socket.boundTo, ("fe80::1", 0, 0, socket.if_nametoindex("lo"))
        )

    def test_routeFrom(self) -> None:
        """
        L{routeFrom} picks the source of the target's IP version; an
        IPv4-mapped IPv6 target is connected to as the IPv4 address it
        holds, from the IPv4 source (an IPv6 source could not reach it).
        """
        both = {4: "192.0.2.100", 6: "2001:db8::100"}
        self.assertEqual(routeFrom("192.0.2.1", both), ("192.0.2.1", "192.0.2.100"))
        self.assertEqual(
            routeFrom("2001:db8::1", both), ("2001:db8::1", "2001:db8::100")
        )
        self.assertEqual(
            routeFrom("::ffff:192.0.2.1", both), ("192.0.2.1", "192.0.2.100")
        )
        self.assertEqual(
            routeFrom("::ffff:192.0.2.1", {6: "2001:db8::100"}), ("192.0.2.1", None)
        )
        self.assertEqual(
            routeFrom("192.0.2.1", {6: "2001:db8::100"}), ("192.0.2.1", None)
        )
        self.assertEqual(
            routeFrom("fe80::2%lo", {6: "fe80::1%lo"}), ("fe80::2%lo", "fe80::1%lo")
        )

    def test_sourcesByVersion(self) -> None:
        """
        L{sourcesByVersion} sorts source addresses by IP version, written
        as C{ipaddress} writes them; it refuses what is not an IP address,
        and two of one version.
        """
        self.assertEqual(
            sourcesByVersion(["2001:DB8::0:1", "192.0.2.1"]),
            {4: "192.0.2.1", 6: "2001:db8::1"},
        )
        self.assertEqual(sourcesByVersion([]), {})
        for bad in (["proxy.example"], ["192.0.2.1", "192.0.2.2"], ["::1", "::2"]):
            self.assertRaises(ValueError, sourcesByVersion, bad)
        # What the kernel binds to without complaint and then takes for "no
        # source" (or, a mapped address, for an IPv6 source that reaches
        # nothing).
        for notUnicast in (
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:127.0.0.2",
        ):
            self.assertRaises(ValueError, sourcesByVersion, [notUnicast])

    def test_hangUp(self) -> None:
        """
        When the reactor reports the socket lost (it reports a refused
        handshake as a hang-up, without calling C{doWrite}), the socket's
        own error is the reason if it has one, the reactor's otherwise.
        """
        d, attempt = self.connect()
        self.socket.error = errno.ECONNREFUSED
        self.reactor.removeWriter(attempt)
        attempt.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertClosedSoon()

        # No error in the socket, and a second connect that fails: that
        # error.
        self.socket = FakeSocket()
        d, attempt = self.connect()
        self.reactor.removeWriter(attempt)
        self.socket.again = errno.ECONNRESET
        attempt.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, ConnectError)
        self.assertIn("Connection reset by peer", str(failure.value))

    def test_staleHangUp(self) -> None:
        """
        A hang-up the reactor passes on while the handshake is still under
        way (the stale event of an earlier socket whose descriptor this one
        reuses: no error in the socket, a second C{connect} says
        C{EALREADY}) does not fail the attempt: it registers again, and
        connects once the handshake ends; one after the handshake ended
        (C{EISCONN}) is the connection.
        """
        d, attempt = self.connect()
        self.reactor.removeWriter(attempt)
        self.socket.again = errno.EALREADY
        attempt.connectionLost(Failure(ConnectionLost()))
        self.assertNoResult(d)
        self.assertEqual(list(self.reactor.getWriters()), [attempt])
        self.socket.again = None
        attempt.doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)

        self.socket = FakeSocket()
        d, attempt = self.connect()
        self.reactor.removeWriter(attempt)
        attempt.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(d)

    def test_timeout(self) -> None:
        """
        With a timeout, an attempt still connecting when it passes fails
        with L{TimeoutError}, leaves the reactor and closes its socket.
        """
        d, _ = self.connect(timeout=5)
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(list(self.reactor.getWriters()), [])
        self.assertTrue(self.socket.closed)
        self.assertEqual(self.factory.calls, ["start", "stop"])

    def test_connectedStopsTimer(self) -> None:
        """
        An attempt that connects in time leaves no timer behind.
        """
        d, attempt = self.connect(timeout=5)
        attempt.doWrite()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """
        Cancelling abandons the attempt: L{CancelledError}, nothing
        registered, no timer, the socket closed, the factory stopped.
        """
        d, _ = self.connect(timeout=5)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(list(self.reactor.getWriters()), [])
        self.assertClosedSoon()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.factory.calls, ["start", "stop"])

    def test_lostAfterCancel(self) -> None:
        """
        When the reactor stops it removes every selectable and then tells
        each it is lost, in no set order: an attempt that a client's loss
        cancelled meanwhile is told too.  It stays over: it neither
        connects (its handshake may have ended since; it would have built a
        protocol with a factory it let go) nor registers again (its
        handshake still under way).
        """
        for again in (None, errno.EALREADY):
            self.socket = FakeSocket()
            d, attempt = self.connect()
            self.reactor.removeWriter(attempt)
            d.cancel()
            self.socket.again = again
            attempt.connectionLost(Failure(ConnectionLost()))
            self.failureResultOf(d, CancelledError)
            self.assertEqual(list(self.reactor.getWriters()), [])
            self.assertIsNone(self.protocol.transport)
            self.assertEqual(self.factory.calls[-2:], ["start", "stop"])

    def test_writableAfterCancel(self) -> None:
        """
        Nor does a writability notification already fetched in the same
        poll as the cancellation connect it.
        """
        d, attempt = self.connect()
        d.cancel()
        attempt.doWrite()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(list(self.reactor.getWriters()), [])
        self.assertIsNone(self.protocol.transport)

    def test_noProtocol(self) -> None:
        """
        A factory that builds no protocol fails the Deferred with
        L{NoProtocol} and the socket is closed.
        """
        self.factory.built = None
        d, attempt = self.connect()
        attempt.doWrite()
        self.failureResultOf(d, NoProtocol)
        self.assertClosedSoon()
        self.assertEqual(list(self.reactor.getReaders()), [])

    def test_makeConnectionRaises(self) -> None:
        """
        A protocol that raises as it is connected fails the Deferred with
        that error; its transport is taken off the reactor and the socket
        closed.
        """

        class Broken(Protocol):
            def connectionMade(self) -> None:
                raise ZeroDivisionError()

        self.factory.built = Broken()
        d, attempt = self.connect()
        attempt.doWrite()
        self.failureResultOf(d, ZeroDivisionError)
        self.assertEqual(list(self.reactor.getReaders()), [])
        self.assertClosedSoon()

    def test_noSocket(self) -> None:
        """
        When no socket can be made (out of descriptors), the Deferred fails
        with a L{ConnectError} and the factory is never started.
        """

        def noSocket(family: int, type: int) -> socket.socket:
            raise OSError(errno.EMFILE, "Too many open files")

        endpoint = DirectEndpoint(self.reactor, "192.0.2.1", 443, newSocket=noSocket)
        self.failureResultOf(endpoint.connect(self.factory), ConnectError)
        self.assertEqual(self.factory.calls, [])

    def test_staleWritableKeepsWaiting(self) -> None:
        """
        A writability notification that comes while the handshake is still
        under way (a second C{connect} says C{EALREADY}; the epoll reactor
        delivers a stale event this way when the descriptor of an attempt
        closed earlier in the same poll is reused) does not count as
        connected: the attempt stays registered, and connects once the
        handshake ends.
        """
        d, attempt = self.connect()
        self.socket.again = errno.EALREADY
        attempt.doWrite()
        self.assertNoResult(d)
        self.assertEqual(list(self.reactor.getWriters()), [attempt])
        self.assertIsNone(self.protocol.transport)
        self.socket.again = None
        attempt.doWrite()
        self.assertIs(self.successResultOf(d), self.protocol)

    def test_errorLeftInSocket(self) -> None:
        """
        Where a second C{connect} does not answer the handshake's error
        itself, the error C{SO_ERROR} holds is the reason.
        """
        d, attempt = self.connect()
        self.socket.error = errno.ECONNREFUSED
        self.socket.again = errno.ECONNABORTED
        attempt.doWrite()
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertClosedSoon()

    def test_connectRaises(self) -> None:
        """
        A C{connect} that raises instead of answering an error number (here
        a port out of range, which C{HostnameConnector} does not check)
        fails the Deferred instead of raising; the socket is closed and the
        factory stopped as often as it was started.
        """

        class Raising(FakeSocket):
            def connect_ex(self, address: object) -> int:
                raise OverflowError("connect_ex(): port must be 0-65535.")

        sock = Raising()
        endpoint = DirectEndpoint(
            self.reactor, "192.0.2.1", 70000, None, newSocket=cast(Any, sock)
        )
        d = endpoint.connect(self.factory)
        self.failureResultOf(d, OverflowError)
        self.reactor.advance(0)
        self.assertTrue(sock.closed)
        self.assertEqual(self.factory.calls, ["start", "stop"])
        self.assertEqual(list(self.reactor.getWriters()), [])


class ConnectorChoiceTests(TestCase):
    """
    L{HostnameConnector} connects to address literals by hand on POSIX
    reactors (here the running one, though nothing connects), and with
    C{connectTCP} where it cannot.
    """

    def test_posixReactor(self) -> None:
        """
        On the running POSIX reactor, a literal gets a L{DirectEndpoint}.
        """
        connector = HostnameConnector(globalReactor, resolver=FakeResolver())
        self.assertIsInstance(
            connector.endpointForTarget("127.0.0.1", 443), DirectEndpoint
        )
        self.assertIsInstance(connector.endpointForTarget("::1", 443), DirectEndpoint)

    @inlineCallbacks
    def test_namesConnectDirectly(self) -> Any:
        """
        A name's addresses are connected to by hand too, by the connector's
        own race: the target's transport is a L{DirectTransport}.
        """
        port = yield TCP4ServerEndpoint(globalReactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Collect)
        )
        self.addCleanup(port.stopListening)
        connector = HostnameConnector(
            globalReactor, resolver=FakeResolver({"target.example": ["127.0.0.1"]})
        )
        client = Collect()
        endpoint = connector.endpointForTarget("target.example", port.getHost().port)
        connected = yield endpoint.connect(CountingFactory(client))
        self.assertIs(connected, client)
        self.assertIs(type(client.transport), DirectTransport)
        cast(Any, client.transport).loseConnection()
        yield client.done

    def test_bindAddress(self) -> None:
        """
        With a local address to bind to, C{connectTCP} connects.
        """
        connector = HostnameConnector(
            globalReactor, resolver=FakeResolver(), bindAddress=("127.0.0.1", 0)
        )
        self.assertIsInstance(
            connector.endpointForTarget("127.0.0.1", 443), _AddressEndpoint
        )

    @inlineCallbacks
    def test_sourceAddresses(self) -> Any:
        """
        With C{sourceAddresses}, connections to an address literal and to a
        name's address of that version come from the given source (here
        C{127.0.0.2}, which Linux serves on loopback).
        """
        peers: list[str] = []

        class RecordPeer(Collect):
            def connectionMade(self) -> None:
                peers.append(self.transport.getPeer().host)  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

        port = yield TCP4ServerEndpoint(globalReactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(RecordPeer)
        )
        self.addCleanup(port.stopListening)
        connector = HostnameConnector(
            globalReactor,
            resolver=FakeResolver({"target.example": ["127.0.0.1"]}),
            sourceAddresses=["127.0.0.2"],
        )
        for host in ("127.0.0.1", "target.example"):
            client = Collect()
            endpoint = connector.endpointForTarget(host, port.getHost().port)
            yield endpoint.connect(CountingFactory(client))
            self.assertEqual(client.transport.getHost().host, "127.0.0.2")  # type: ignore[union-attr]
            yield client.done
        self.assertEqual(peers, ["127.0.0.2", "127.0.0.2"])

    def test_sourceAddressesNeedDirect(self) -> None:
        """
        Source addresses are only used when connecting by hand: a connector
        given them on a reactor that cannot, or with a C{bindAddress}, is
        refused with a L{ValueError}, as are addresses that are not IP
        addresses or two of one version.
        """
        for reactor, options in [
            (MemoryReactorClock(), {}),
            (globalReactor, {"bindAddress": ("127.0.0.1", 0)}),
        ]:
            self.assertRaises(
                ValueError,
                HostnameConnector,
                reactor,
                resolver=FakeResolver(),
                sourceAddresses=["127.0.0.2"],
                **options,
            )
        for bad in (["source.example"], ["127.0.0.2", "127.0.0.3"]):
            self.assertRaises(
                ValueError,
                HostnameConnector,
                globalReactor,
                resolver=FakeResolver(),
                sourceAddresses=bad,
            )

    def test_otherReactor(self) -> None:
        """
        A reactor that is not a POSIX one (here a memory reactor) gets
        C{connectTCP}.
        """
        connector = HostnameConnector(MemoryReactorClock(), resolver=FakeResolver())
        self.assertIsInstance(
            connector.endpointForTarget("127.0.0.1", 443), _AddressEndpoint
        )


class Collect(Protocol):
    """
    Records what it receives and fires C{done} when the connection ends.
    """

    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)


class LoopbackTests(TestCase):
    """
    L{DirectEndpoint} on the real reactor, over loopback.
    """

    @inlineCallbacks
    def test_exchange(self) -> Any:
        """
        A connection made by hand carries bytes both ways; its peer is the
        listener and its host a loopback address; once closed, its C{repr}
        still names the address.
        """
        accepted: list[Collect] = []

        def build(addr: object) -> Collect:
            protocol = Collect()
            accepted.append(protocol)
            return protocol

        serverFactory = Factory()
        serverFactory.buildProtocol = build  # type: ignore[method-assign]
        port = yield TCP4ServerEndpoint(globalReactor, 0, interface="127.0.0.1").listen(
            serverFactory
        )
        self.addCleanup(port.stopListening)
        portNumber = port.getHost().port
        client = Collect()
        endpoint = DirectEndpoint(globalReactor, "127.0.0.1", portNumber)
        connected = yield endpoint.connect(CountingFactory(client))
        self.assertIs(connected, client)
        transport: Any = client.transport
        self.assertEqual(
            transport.getPeer(), IPv4Address("TCP", "127.0.0.1", portNumber)
        )
        self.assertEqual(transport.getHost().host, "127.0.0.1")
        transport.write(b"hello")
        transport.loseConnection()
        yield client.done
        [server] = accepted
        yield server.done
        self.assertEqual(server.received, b"hello")
        self.assertEqual(
            repr(transport), f"<closed connection to 127.0.0.1:{portNumber}>"
        )

    @inlineCallbacks
    def test_refused(self) -> Any:
        """
        Connecting to a port nobody listens on fails with
        L{ConnectionRefusedError}.
        """
        # A bound socket that does not listen: its port refuses, and stays
        # ours for the test.
        closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(closed.close)
        closed.bind(("127.0.0.1", 0))
        endpoint = DirectEndpoint(globalReactor, "127.0.0.1", closed.getsockname()[1])
        with self.assertRaises(ConnectionRefusedError):
            yield endpoint.connect(CountingFactory(Protocol()))


class PortabilityTests(SynchronousTestCase):
    """
    L{tunnel.direct} on systems without C{SOCK_NONBLOCK}/C{SOCK_CLOEXEC}.
    """

    def test_importWithoutSockFlags(self) -> None:
        """
        The package imports where the socket module has no
        C{SOCK_NONBLOCK} or C{SOCK_CLOEXEC} (macOS, Windows: Linux-only
        constants), as it did before L{tunnel.direct}; checked in a child
        Python with the constants removed.
        """
        import subprocess
        import sys

        code = (
            "import socket\n"
            "del socket.SOCK_NONBLOCK, socket.SOCK_CLOEXEC\n"
            "import tunnel.connector\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class HandshakingTests(SynchronousTestCase):
    """
    L{DirectEndpoint} with a real socket over loopback, driven by a memory
    reactor (so the test decides when the attempt is told it is writable).
    """

    def test_notifiedWhileHandshaking(self) -> None:
        """
        A real socket whose SYN the target dropped (its accept queue is
        full) reads 0 from C{SO_ERROR} while it is still connecting; a
        writability notification then (a stale epoll event) must not hand
        the unconnected socket to the protocol as connected.
        """
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        # Fills the accept queue of a listen(0) socket: the next SYN is
        # dropped and the next connect stays in SYN_SENT.
        queued = socket.create_connection(listener.getsockname())
        self.addCleanup(queued.close)
        made: list[socket.socket] = []

        def newSocket(family: int, type: int) -> socket.socket:
            made.append(socket.socket(family, type))
            self.addCleanup(made[-1].close)
            return made[-1]

        reactor = MemoryReactorClock()
        protocol = Protocol()
        endpoint = DirectEndpoint(
            reactor, "127.0.0.1", listener.getsockname()[1], None, newSocket
        )
        d = endpoint.connect(CountingFactory(protocol))
        self.addCleanup(lambda: d.cancel() if not d.called else None)
        self.addCleanup(lambda: d.addErrback(lambda f: None))
        [attempt] = list(reactor.getWriters())
        attempt.doWrite()
        [sock] = made
        with self.assertRaises(OSError) as raised:
            sock.getpeername()
        self.assertEqual(raised.exception.errno, errno.ENOTCONN)
        self.assertNoResult(d)
        self.assertIsNone(protocol.transport)
