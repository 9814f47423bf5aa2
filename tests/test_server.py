"""
Tests for L{tunnel.server}: the handshake protocol, without sockets.
"""

from __future__ import annotations

import base64
import errno
import gc
import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import (
    AllowAnonymousAccess,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import (
    HostnameAddress,
    IPv4Address,
    IPv6Address,
    UNIXAddress,
)
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    getConnectError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.compat import iterbytes
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.fakes import FakeResolver
from tunnel import ConnectProxyFactory, HostnameConnector, ITargetConnector, server
from tunnel.answers import errorResponse, httpDate, mayAddField
from tunnel.auth import FailureDamper, IProxyUser, ProxyUser, portalFromCheckers
from tunnel.clients import formatAddress
from tunnel.connector import AddressDenied
from tunnel.interfaces import LookupsBusy, NoLocalPort, SourceUnusable
from tunnel.policy import Denial, ITunnelPolicy, PortRange, TunnelPolicy
from tunnel.relay import Relay, TargetProtocol, canHalfClose
from tunnel.resolver import lookupClient
from tunnel.server import (
    LINGER_BYTES,
    LINGER_SECONDS,
    MAX_PARTIAL_HEAD_BYTES_PER_CLIENT,
    ConnectProxy,
)
from tunnel.upstream import UpstreamProtocolError, UpstreamRefused

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
HEAD = b"CONNECT target.example:443 HTTP/1.1\r\nHost: target.example:443\r\n\r\n"


def headOfLength(length: int) -> bytes:
    """
    A request head of C{length} bytes, without the empty line that ends it.
    """
    start = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX: "
    return start + b"p" * (length - len(start) - 2) + b"\r\n"


@implementer(IHalfCloseableDescriptor)
class HalfCloseTransport(StringTransport):
    """
    A L{StringTransport} that also records half-closes, as a TCP transport
    would perform them.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        """
        Record that a FIN would have been sent.
        """
        self.writeClosed = True

    def readConnectionLost(self, reason: Failure) -> None:
        """
        Part of L{IHalfCloseableDescriptor}; the tests call the protocol.
        """

    def writeConnectionLost(self, reason: Failure) -> None:
        """
        Part of L{IHalfCloseableDescriptor}; the tests call the protocol.
        """


@implementer(ITCPTransport)
class NoDelayTransport(HalfCloseTransport):
    """
    A L{HalfCloseTransport} that is a TCP transport, and records whether
    Nagle's algorithm was turned off.
    """

    noDelay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        """
        Record the setting.
        """
        self.noDelay = enabled

    def getTcpNoDelay(self) -> bool:
        """
        The recorded setting.
        """
        return bool(self.noDelay)

    keepAlive: bool | None = None

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """
        Record the setting.
        """
        self.keepAlive = enabled

    def getTcpKeepAlive(self) -> bool:
        """
        The recorded setting.
        """
        return bool(self.keepAlive)


def recordingPolicy(
    asked: list[tuple[str, tuple[Any, ...]]], **kwargs: Any
) -> TunnelPolicy:
    """
    A L{TunnelPolicy} made with C{kwargs} that appends each question it is
    asked, and its arguments, to C{asked}.
    """

    class RecordingPolicy(TunnelPolicy):
        def checkClient(self, *args: Any) -> Any:
            asked.append(("checkClient", args))
            return super().checkClient(*args)

        def checkTarget(self, *args: Any) -> Any:
            asked.append(("checkTarget", args))
            return super().checkTarget(*args)

        def checkAddress(self, *args: Any) -> Any:
            asked.append(("checkAddress", args))
            return super().checkAddress(*args)

        def addressDenial(self, *args: Any) -> Any:
            asked.append(("addressDenial", args))
            return super().addressDenial(*args)

    return RecordingPolicy(**kwargs)


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """
    An endpoint whose connection attempts are completed by the test.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[IProtocolFactory, Deferred[Any]]] = []
        self.cancelled = 0
        #: What a cancelled attempt fails with (by default the Deferred's
        #: own CancelledError).
        self.cancelWith: Exception | None = None
        #: Who the lookups started by each attempt were for.
        self.lookupClients: list[str | None] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Record an attempt and return its pending Deferred.
        """

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1
            if self.cancelWith is not None:
                d.errback(self.cancelWith)

        d: Deferred[Any] = Deferred(cancel)
        self.attempts.append((protocolFactory, d))
        self.lookupClients.append(lookupClient.get())
        return d


@implementer(ITargetConnector)
class RecordingConnector:
    """
    A connector that records the targets asked for and hands out one
    L{RecordingEndpoint}.
    """

    def __init__(self) -> None:
        self.endpoint = RecordingEndpoint()
        self.targets: list[tuple[str, int]] = []
        self.allowAddress: Any = None

    def endpointForTarget(
        self, host: str, port: int, allowAddress: Any = None
    ) -> RecordingEndpoint:
        """
        Record the target and the policy, and give the endpoint.
        """
        self.targets.append((host, port))
        self.allowAddress = allowAddress
        return self.endpoint


@implementer(ITargetConnector)
class BrokenConnector:
    """
    A connector with a bug: it raises.
    """

    def endpointForTarget(
        self, host: str, port: int, allowAddress: Any = None
    ) -> IStreamClientEndpoint:
        """
        Fail.
        """
        raise RuntimeError("broken connector")


class DenialForAddress(TunnelPolicy):
    """
    A policy with a mistake: its C{checkAddress} answers with a L{Denial}
    (which is true), as its C{checkTarget} would, instead of C{False}.
    """

    def checkAddress(self, *args: object) -> Any:
        """
        Refuse the wrong way.
        """
        return Denial(403, "No.", "address")


class ProxyTestMixin:
    """
    Build a proxy on a fake clock with a recording connector.
    """

    def assertAnswered(self, client: HalfCloseTransport) -> None:
        """
        Assert that the proxy ended its side of C{client} after answering:
        it sent FIN and reads only to drop what still comes (RFC 9112
        section 9.6), then closes within L{LINGER_SECONDS}.
        """
        assert isinstance(self, SynchronousTestCase)
        self.assertTrue(client.writeClosed)
        self.assertFalse(client.disconnecting)
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(client.disconnecting)

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.connector = RecordingConnector()
        self.factory = ConnectProxyFactory(
            self.connector, reactor=self.clock, maxEarlyData=100
        )
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        self.proxy, self.client = self.connectClient()

    def connectClient(self) -> tuple[ConnectProxy, HalfCloseTransport]:
        """
        Connect a new client to the proxy.
        """
        proxy = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        assert isinstance(proxy, ConnectProxy)
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        proxy.makeConnection(client)
        return proxy, client

    def reachTarget(self, index: int = 0) -> tuple[TargetProtocol, HalfCloseTransport]:
        """
        Complete the connection attempt number C{index} to the target.
        """
        factory, d = self.connector.endpoint.attempts[index]
        target = factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 443))
        assert isinstance(target, TargetProtocol)
        transport = HalfCloseTransport()
        target.makeConnection(transport)
        d.callback(target)
        return target, transport

    def establish(
        self, head: bytes = HEAD
    ) -> tuple[TargetProtocol, HalfCloseTransport]:
        """
        Send C{head}, reach the target, and check the 200 went out.
        """
        self.proxy.dataReceived(head)
        target, transport = self.reachTarget()
        self.assertEqual(self.client.value(), ESTABLISHED)  # type: ignore[attr-defined]
        self.client.clear()
        return target, transport

    def tunnelEvents(self) -> list[dict[str, Any]]:
        """
        The log events that ended a connection.
        """
        return [e for e in self.events if "ended" in e]

    def closeBoth(self, target: TargetProtocol) -> None:
        """
        Deliver the connection-lost events that the closes asked for.
        """
        self.proxy.connectionLost(Failure(ConnectionDone()))
        target.connectionLost(Failure(ConnectionDone()))


class HandshakeTests(ProxyTestMixin, SynchronousTestCase):
    """
    The request head, the answer, and errors.
    """

    def assertRejected(self, status: int, ended: str = "refused") -> bytes:
        """
        Assert that the client got an error with C{status}, the connection is
        closing, and one log event says so.
        """
        response: bytes = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 %d " % (status,)), response[:80])
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nConnection: close", head)
        self.assertIn(b"\r\nContent-Type: text/plain; charset=utf-8", head)
        self.assertIn(b"\r\nContent-Length: %d" % (len(body),), head)
        self.assertAnswered(self.client)
        [event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["ended"]), (status, ended))
        return response

    def test_established(self) -> None:
        """
        A good request is answered with exactly the 200 line and an empty
        line, after the target is reached; the connector is asked for the
        requested host and port.
        """
        self.proxy.dataReceived(HEAD)
        self.assertEqual(self.client.value(), b"")
        self.assertEqual(self.connector.targets, [("target.example", 443)])
        self.reachTarget()
        self.assertEqual(self.client.value(), ESTABLISHED)

    def test_openConnectionView(self) -> None:
        """
        An open connection tells an application who it is for, where to,
        whether it is a tunnel yet, and the bytes relayed so far.
        """
        proxy = self.proxy
        self.assertEqual(
            (proxy.client, proxy.user, proxy.avatar, proxy.target),
            ("192.0.2.7:40000", None, None, None),
        )
        self.assertEqual(
            (proxy.established, proxy.bytesUp, proxy.bytesDown), (False, 0, 0)
        )
        proxy.dataReceived(HEAD + b"early")
        self.assertEqual(proxy.target, "target.example:443")
        self.assertEqual((proxy.established, proxy.bytesUp), (False, 0))
        target, _transport = self.reachTarget()
        proxy.dataReceived(b"more")
        target.dataReceived(b"answer")
        self.assertEqual(
            (proxy.established, proxy.bytesUp, proxy.bytesDown), (True, 9, 6)
        )

    def test_headInPieces(self) -> None:
        """
        The head may arrive a byte at a time.
        """
        for index in range(len(HEAD)):
            self.proxy.dataReceived(HEAD[index : index + 1])
        self.assertEqual(self.connector.targets, [("target.example", 443)])

    def test_malformed(self) -> None:
        """
        A malformed request line gets 400.
        """
        self.proxy.dataReceived(b"CONNECT nope HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertRejected(400)
        self.assertEqual(self.connector.targets, [])

    def test_methodNotAllowed(self) -> None:
        """
        Another method gets 405 with C{Allow: CONNECT}.
        """
        self.proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"\r\nAllow: CONNECT\r\n", self.assertRejected(405))

    def test_headGetsNoContent(self) -> None:
        """
        The error answering a C{HEAD} request carries no content (RFC 9110
        section 9.3.2), only its head: whether the head parsed (405) or
        could not (414, for a request line too long).
        """
        self.proxy.dataReceived(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 405 "), response)
        self.assertIn(b"\r\nAllow: CONNECT\r\n", response)
        self.assertTrue(response.endswith(b"\r\n\r\n"), response)
        proxy, client = self.connectClient()
        proxy.dataReceived(b"HEAD /" + b"a" * self.factory.maxRequestLine)
        response = client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 414 "), response)
        self.assertTrue(response.endswith(b"\r\n\r\n"), response)

    def test_headTimeoutHasNoContent(self) -> None:
        """
        The 408 answering an incomplete C{HEAD} head carries no content
        either.
        """
        self.proxy.dataReceived(b"HEAD / HTTP/1.1\r\nHost: a\r\n")
        self.clock.advance(self.factory.headerTimeout)
        response = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 408 "), response)
        self.assertTrue(response.endswith(b"\r\n\r\n"), response)

    def test_bareCarriageReturnsWhileIncomplete(self) -> None:
        """
        A head whose lines end in bare CRs gets 400 as soon as a CR is
        followed by anything but LF, even split between two reads: its end
        is never found, so the client would otherwise wait for the header
        timeout (408), or be told its request line is too long (414).
        """
        self.proxy.dataReceived(b"CONNECT target.example:443 HTTP/1.1\r")
        self.assertEqual(self.client.value(), b"")
        self.proxy.dataReceived(b"Host: h\r\r")
        response = self.assertRejected(400)
        self.assertIn(b"A bare CR is not a line ending.", response)
        self.assertEqual(self.connector.targets, [])

    def test_versionNotSupported(self) -> None:
        """
        HTTP/2.0 in a request line gets 505.
        """
        self.proxy.dataReceived(b"CONNECT a.example:443 HTTP/2.0\r\n\r\n")
        self.assertRejected(505)

    def test_nothingReadAfterError(self) -> None:
        """
        After an error, nothing that follows is read as a new request
        (RFC 9931): one response, then the connection closes.
        """
        self.proxy.dataReceived(b"GET / HTTP/1.1\r\n\r\n" + HEAD)
        self.proxy.dataReceived(HEAD)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.connector.targets, [])

    def test_lingerDropsInput(self) -> None:
        """
        After an error the proxy keeps reading and dropping what the client
        sends, up to a bound, so closing does not reset the connection and
        destroy the answer; the client's FIN ends it at once.
        """
        self.proxy.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        response = self.client.value()
        self.proxy.dataReceived(b"x" * 1000)
        self.assertEqual(self.client.value(), response)
        self.assertFalse(self.client.disconnecting)
        self.proxy.readConnectionLost()
        self.assertTrue(self.client.disconnecting)
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lingerBounded(self) -> None:
        """
        A client that keeps sending after an error is closed once it has
        sent more than L{LINGER_BYTES}.
        """
        self.proxy.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(LINGER_BYTES // len(chunk)):
            self.proxy.dataReceived(chunk)
        self.assertFalse(self.client.disconnecting)
        self.proxy.dataReceived(b"x")
        self.assertTrue(self.client.disconnecting)

    def test_lingerResumesPausedClient(self) -> None:
        """
        A client paused for sending too much early data is read again after
        an error, so that its input is drained.
        """
        self.proxy.dataReceived(HEAD + b"x" * 200)
        self.assertEqual(self.client.producerState, "paused")
        self.connector.endpoint.attempts[0][1].errback(ConnectionRefusedError())
        self.assertEqual(self.client.producerState, "producing")

    def test_noLingerWithoutHalfClose(self) -> None:
        """
        A transport that cannot half-close (TLS) is closed right after the
        answer.
        """
        tlsLike = StringTransport()
        self.proxy.transport = tlsLike
        self.proxy._client = tlsLike  # type: ignore[assignment]
        self.proxy.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(tlsLike.disconnecting)
        self.assertFalse(tlsLike.disconnected)
        # A TLS client that never finishes its handshake never receives the
        # answer, so the close never completes: it is aborted after the
        # linger time.
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(tlsLike.disconnected)

    def test_requestLineTooLong(self) -> None:
        """
        A request line over the limit gets 414 as soon as the limit is
        passed, without buffering more than the limit.
        """
        self.proxy.dataReceived(b"CONNECT ")
        chunk = b"a" * 1000
        for _ in range(8):
            self.proxy.dataReceived(chunk)
            self.assertLessEqual(len(self.proxy._buffer), 8192 + 2)
        self.assertEqual(self.client.value(), b"")
        self.proxy.dataReceived(chunk)
        self.assertRejected(414)
        self.assertEqual(self.proxy._buffer, b"")

    def test_leadingEmptyLinesOnePerPacket(self) -> None:
        """
        Empty lines before the request line are passed over (RFC 9112
        section 2.2), however many, each in a packet of its own, and
        whatever ends them (CRLF or a bare LF).
        """
        for _ in range(3):
            self.proxy.dataReceived(b"\r")
            self.proxy.dataReceived(b"\n")
        self.proxy.dataReceived(b"\n")
        self.proxy.dataReceived(HEAD)
        self.assertEqual(self.connector.targets, [("target.example", 443)])

    def test_endlessEmptyLines(self) -> None:
        """
        Empty lines before the request line count toward its limit: an
        endless run of them gets 414 once past it, without the buffer ever
        holding more.
        """
        self.factory.maxRequestLine = 100
        for _ in range(50):
            self.proxy.dataReceived(b"\r\n")
            self.assertLessEqual(len(self.proxy._buffer), 100 + 4)
        self.assertEqual(self.client.value(), b"")
        self.proxy.dataReceived(b"\r\n")
        self.assertRejected(414)

    def test_longMethodStreamed(self) -> None:
        """
        A request line over the limit whose method is already longer than
        any method there is gets 501 (RFC 9112 section 3), not 414.
        """
        self.factory.maxRequestLine = 100
        for _ in range(11):
            self.proxy.dataReceived(b"A" * 10)
        self.assertRejected(501)

    def test_requestLineTooLongBeforeHeadEnds(self) -> None:
        """
        A request line over the limit gets 414 as soon as its line ending
        arrives, though the rest of the head has not: no waiting for the
        header timeout (and a 408).
        """
        self.factory.maxRequestLine = 100
        self.proxy.dataReceived(b"\r\nCONNECT " + b"a" * 200 + b":443 HTTP/1.1\r\n")
        self.assertRejected(414)

    def test_requestLineAtLimitBeforeHeadEnds(self) -> None:
        """
        A request line exactly at the limit, CRLF after it, waits for the
        rest of the head.
        """
        line = b"CONNECT a.example:443 HTTP/1.1"
        self.factory.maxRequestLine = len(line)
        self.proxy.dataReceived(line + b"\r")
        self.proxy.dataReceived(b"\nHost: a\r\n")
        self.assertEqual(self.client.value(), b"")
        self.proxy.dataReceived(b"\r\n")
        self.assertEqual(self.connector.targets, [("a.example", 443)])

    def test_requestLineTooLongComplete(self) -> None:
        """
        A complete request line over the limit gets 414 too.
        """
        self.factory.maxRequestLine = 64
        self.proxy.dataReceived(
            b"CONNECT " + b"a" * 60 + b".example:443 HTTP/1.1\r\n\r\n"
        )
        self.assertRejected(414)

    def test_headTooLarge(self) -> None:
        """
        A head over the header size limit gets 431, without the buffer ever
        holding more than the limit.
        """
        self.proxy.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\n")
        field = b"X-Padding: " + b"p" * 1000 + b"\r\n"
        for _ in range(80):
            if self.client.value():
                break
            self.proxy.dataReceived(field)
            self.assertLessEqual(len(self.proxy._buffer), 65536)
        self.assertRejected(431)

    def test_headTooLargeInOneWrite(self) -> None:
        """
        A complete head over the limit that arrives in one piece gets 431.
        """
        self.factory.maxHeaderSize = 300
        self.proxy.dataReceived(
            b"CONNECT a.example:443 HTTP/1.1\r\nX: " + b"p" * 300 + b"\r\n\r\n"
        )
        self.assertRejected(431)

    def test_headerTimeout(self) -> None:
        """
        A head that does not arrive within the header timeout gets 408.
        """
        self.proxy.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\n")
        self.clock.advance(9.9)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.2)
        self.assertRejected(408)

    def test_noHeaderTimeoutOnceParsed(self) -> None:
        """
        The header timeout stops once the head is complete.
        """
        self.proxy.dataReceived(HEAD)
        self.clock.advance(11)
        self.assertEqual(self.client.value(), b"")
        self.assertFalse(self.client.disconnecting)

    def test_refused(self) -> None:
        """
        A target that refuses the connection gets the client a 502.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(ConnectionRefusedError())
        self.assertIn(b"refused", self.assertRejected(502, "target-failed"))
        self.assertIsNone(self.tunnelEvents()[0]["limit"])

    def test_outOfResources(self) -> None:
        """
        A socket to the target that cannot be made for want of descriptors
        or memory is the proxy's trouble, not the target's: the client gets
        a 503 with C{Retry-After}, and the log a warning, at most one every
        ten seconds however many clients meet it.
        """
        exhausted = getConnectError(OSError(errno.EMFILE, "Too many open files"))
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[-1][1].errback(exhausted)
        response = self.assertRejected(503, "target-failed")
        self.assertIn(b"\r\nRetry-After: 1\r\n", response)
        self.assertIn(b"out of resources", response)
        [event] = self.tunnelEvents()
        self.assertEqual(event["limit"], "resources")
        self.assertTrue(event["line"].endswith(" target-failed (resources)"))
        for _ in range(2):
            self.clock.advance(5)
            proxy, client = self.connectClient()
            proxy.dataReceived(HEAD)
            self.connector.endpoint.attempts[-1][1].errback(exhausted)
            self.assertTrue(client.value().startswith(b"HTTP/1.1 503 "))
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertIn("Too many open files", formatEvent(warnings[0]))

    def test_noLocalPort(self) -> None:
        """
        An IPv4 target that cannot be connected to for want of a local port
        (L{NoLocalPort}) is the proxy's trouble too: a 503 with
        C{Retry-After}, and a warning naming the local port range.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[-1][1].errback(
            NoLocalPort(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        )
        response = self.assertRejected(503, "target-failed")
        self.assertIn(b"\r\nRetry-After: 1\r\n", response)
        self.assertEqual(self.tunnelEvents()[0]["limit"], "local-ports")
        [warning] = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertIn("Cannot assign requested address", formatEvent(warning))
        self.assertIn("ip_local_port_range", formatEvent(warning))

    def test_shortagesWarnedApart(self) -> None:
        """
        Each shortage has its own ten seconds between warnings: while both
        come, each is told.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[-1][1].errback(
            getConnectError(OSError(errno.EMFILE, "Too many open files"))
        )
        self.clock.advance(1)
        proxy, _client = self.connectClient()
        proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[-1][1].errback(
            NoLocalPort(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        )
        warnings = [
            formatEvent(e) for e in self.events if e["log_level"] == LogLevel.warn
        ]
        self.assertEqual(len(warnings), 2)
        self.assertIn("ulimit", warnings[0])
        self.assertIn("ip_local_port_range", warnings[1])

    def test_sourceUnusable(self) -> None:
        """
        A connection that could not be bound to its outgoing address
        (L{SourceUnusable}) is the proxy's trouble: a 503 with
        C{Retry-After}, named C{outgoing-address}, and a warning asking
        whether the address is still the host's.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[-1][1].errback(
            SourceUnusable(errno.EADDRNOTAVAIL, "Cannot assign (binding to 192.0.2.9)")
        )
        response = self.assertRejected(503, "target-failed")
        self.assertIn(b"\r\nRetry-After: 1\r\n", response)
        self.assertEqual(self.tunnelEvents()[0]["limit"], "outgoing-address")
        [warning] = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertIn("192.0.2.9", formatEvent(warning))
        self.assertIn("--outgoing-address", formatEvent(warning))
        # The other version's address, failing too, is named as well.
        proxy, _client = self.connectClient()
        proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[-1][1].errback(
            SourceUnusable(
                errno.EADDRNOTAVAIL, "Cannot assign (binding to 2001:db8::9)"
            )
        )
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertIn("2001:db8::9", formatEvent(warnings[1]))

    def test_addressNotAvailable(self) -> None:
        """
        C{EADDRNOTAVAIL} not told apart as L{NoLocalPort} (as for an IPv6
        target on a host without IPv6) stays the target's 502.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[-1][1].errback(
            getConnectError(OSError(errno.EADDRNOTAVAIL, "Cannot assign"))
        )
        self.assertRejected(502, "target-failed")
        self.assertEqual(
            [e for e in self.events if e["log_level"] == LogLevel.warn], []
        )

    def test_doesNotResolve(self) -> None:
        """
        A target name that does not resolve gets the client a 502.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(DNSLookupError("nope"))
        self.assertIn(b"resolve", self.assertRejected(502, "target-failed"))

    def test_lookupsBusy(self) -> None:
        """
        A target name the resolver would not look up, because too many
        lookups were waiting, gets the client a 503 with C{Retry-After}.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(LookupsBusy())
        response = self.assertRejected(503, "target-failed")
        self.assertIn(b"\r\nRetry-After: 1\r\n", response)
        self.assertIn(b"name lookups", response)
        self.assertEqual(self.tunnelEvents()[0]["limit"], "name-lookups")

    def test_targetResetBeforeAnswer(self) -> None:
        """
        A target connection reset before the proxy answered (a target that
        accepts and aborts at once) gets the client a 502, not a 200 that
        the reset would drop unsent.
        """
        self.proxy.dataReceived(HEAD)
        factory, d = self.connector.endpoint.attempts[0]
        target = factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 443))
        assert isinstance(target, TargetProtocol)
        target.makeConnection(HalfCloseTransport())
        target.connectionLost(Failure(ConnectionLost()))
        d.callback(target)
        self.assertIn(b"reset", self.assertRejected(502, "target-failed"))
        self.assertEqual(self.factory.relaying, 0)

    def test_targetClosedCleanlyBeforeAnswer(self) -> None:
        """
        One that sent its bytes and closed cleanly before the proxy
        answered is tunnelled: the 200, then its bytes.
        """
        self.proxy.dataReceived(HEAD)
        factory, d = self.connector.endpoint.attempts[0]
        target = factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 443))
        assert isinstance(target, TargetProtocol)
        target.makeConnection(HalfCloseTransport())
        target.dataReceived(b"421 bye\r\n")
        target.readConnectionLost()
        target.connectionLost(Failure(ConnectionLost()))
        d.callback(target)
        self.assertEqual(self.client.value(), ESTABLISHED + b"421 bye\r\n")

    def test_lookupsForTheClient(self) -> None:
        """
        The lookups that connecting to a name starts are the client's (for
        the resolver's share per client), and only those: afterwards no
        client is named.
        """
        self.proxy.dataReceived(HEAD)
        self.assertEqual(self.connector.endpoint.lookupClients, ["192.0.2.7"])
        self.assertIsNone(lookupClient.get())

    def test_noLookupsForAnAddress(self) -> None:
        """
        Connecting to an address names no client: it needs no lookup.
        """
        self.proxy.dataReceived(
            b"CONNECT 93.184.216.34:443 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.assertEqual(self.connector.endpoint.lookupClients, [None])

    def test_lookupClientResetWhenConnectFails(self) -> None:
        """
        A connector that raises leaves no client named either.
        """
        self.factory.connector = BrokenConnector()
        self.proxy.dataReceived(HEAD)
        self.flushLoggedErrors(RuntimeError)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502 "))
        self.assertIsNone(lookupClient.get())

    def test_parentRefused(self) -> None:
        """
        A parent proxy's refusal gets the client a 502 naming the parent's
        answer, and the parent's status is in the log event.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(
            UpstreamRefused(403, "Forbidden")
        )
        self.assertIn(b"403 Forbidden", self.assertRejected(502, "target-failed"))
        [event] = self.tunnelEvents()
        self.assertEqual(event["parentStatus"], 403)
        self.assertTrue(
            event["line"].endswith(
                " 502 up=0 down=0 0.000s target-failed (parent 403)"
            ),
            event["line"],
        )

    def test_parentFailed(self) -> None:
        """
        A parent proxy that answers nonsense gets the client a 502.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(UpstreamProtocolError())
        self.assertRejected(502, "target-failed")

    def test_otherConnectError(self) -> None:
        """
        Any other connection error (a reset, no route) gets a 502.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(ConnectError("no route"))
        self.assertRejected(502, "target-failed")

    def test_unexpectedError(self) -> None:
        """
        An unexpected exception from the endpoint still gets a 502, and is
        logged as a failure for the operator.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(ZeroDivisionError())
        self.assertRejected(502, "target-failed")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_connectorCancelsItself(self) -> None:
        """
        An attempt the connector cancels itself (on a deadline of its own,
        say), while the client waits, gets the client a 502 at once: it is
        not taken for a client that left, which would leave the client
        waiting for the connect timeout and then answer it a 503.  Nor is
        it logged with a traceback: the connector meant it.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(CancelledError())
        self.assertRejected(502, "target-failed")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.clock.advance(60)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 "), 1)

    def test_parserFails(self) -> None:
        """
        A request head the parser fails on unexpectedly (an exception other
        than L{RequestRejected}) gets a 500 and a closed connection, and
        the failure is logged for the operator, rather than an unhandled
        error and a silent close; no target is reached.
        """

        def broken(head: bytes, maxRequestLine: int) -> Any:
            raise ValueError("not foreseen")

        self.patch(server, "parseConnectHead", broken)
        self.proxy.dataReceived(HEAD)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertAnswered(self.client)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.connector.targets, [])

    def test_brokenConnector(self) -> None:
        """
        A connector that raises gets the client a 502, not a traceback to
        the client or a hang, and the tunnel's end is logged as
        C{target-failed}, as every 502 is.
        """
        self.factory.connector = BrokenConnector()
        self.proxy.dataReceived(HEAD)
        self.assertRejected(502, "target-failed")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_connectTimeout(self) -> None:
        """
        Reaching the target for longer than the connect timeout cancels the
        attempt and gets the client a 504.
        """
        self.proxy.dataReceived(HEAD)
        self.clock.advance(14.9)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.2)
        self.assertEqual(self.connector.endpoint.cancelled, 1)
        self.assertRejected(504, "target-failed")

    def test_clientLeavesWhileConnecting(self) -> None:
        """
        A client that disconnects while the proxy is connecting cancels the
        attempt; one event records that it left.
        """
        self.proxy.dataReceived(HEAD)
        self.proxy.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.connector.endpoint.cancelled, 1)
        [event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["ended"]), ("-", "client-left"))
        self.assertEqual(self.factory.connections, set())

    def test_clientLeavesWhileConnectingToName(self) -> None:
        """
        An attempt that fails with C{ConnectingCancelledError} when
        cancelled (as C{HostnameEndpoint}'s does) is also a client that
        left, not a failure to log.
        """
        self.connector.endpoint.cancelWith = ConnectingCancelledError(
            HostnameAddress(b"target.example", 443)
        )
        self.proxy.dataReceived(HEAD)
        self.proxy.connectionLost(Failure(ConnectionLost()))
        [event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["ended"]), ("-", "client-left"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_clientLeavesCancelFailsOtherwise(self) -> None:
        """
        However the connector's cancelled attempt fails (here with a plain
        L{ConnectError}), a client that left is not answered, nothing
        lingers or stays counted, and it is logged as a client that left.
        """
        self.connector.endpoint.cancelWith = ConnectError("attempt aborted")
        self.proxy.dataReceived(HEAD)
        self.proxy.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.client.value(), b"")
        self.assertEqual(self.factory.lingeringRefusals, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["ended"]), ("-", "client-left"))

    def test_clientFinWhileConnecting(self) -> None:
        """
        A client that sends FIN (and nothing else) after its head while the
        proxy is connecting has left: the attempt is cancelled.
        """
        self.proxy.dataReceived(HEAD)
        self.proxy.readConnectionLost()
        self.assertEqual(self.connector.endpoint.cancelled, 1)
        self.assertTrue(self.client.disconnecting)

    def test_clientFinDuringHead(self) -> None:
        """
        A client that sends FIN before its head is complete is closed,
        without an answer.
        """
        self.proxy.dataReceived(b"CONNECT a")
        self.proxy.readConnectionLost()
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.client.value(), b"")
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.tunnelEvents()), 1)

    def test_logEvent(self) -> None:
        """
        Each connection emits one event with its client, target, status,
        byte counts, duration and how it ended, and it formats as one line.
        """
        target, _transport = self.establish()
        self.proxy.dataReceived(b"12345")
        target.dataReceived(b"abc")
        self.clock.advance(2)
        self.proxy.readConnectionLost()
        target.readConnectionLost()
        self.closeBoth(target)
        [event] = self.tunnelEvents()
        self.assertEqual(event["client"], "192.0.2.7:40000")
        self.assertEqual(event["target"], "target.example:443")
        self.assertEqual(event["status"], 200)
        self.assertEqual((event["bytesUp"], event["bytesDown"]), (5, 3))
        self.assertEqual(event["duration"], 2)
        self.assertEqual(event["ended"], "client-eof")
        from twisted.logger import formatEvent

        self.assertEqual(
            formatEvent(event),
            "192.0.2.7:40000 - CONNECT target.example:443 200 up=5 down=3 "
            "2.000s client-eof",
        )

    def test_logLineOfRefusal(self) -> None:
        """
        The line of a refused request names the rule that refused it.
        """
        self.proxy.dataReceived(
            b"CONNECT target.example:22 HTTP/1.1\r\nHost: target.example:22\r\n\r\n"
        )
        self.proxy.connectionLost(Failure(ConnectionDone()))
        from twisted.logger import formatEvent

        [event] = self.tunnelEvents()
        self.assertEqual(
            formatEvent(event),
            "192.0.2.7:40000 - CONNECT target.example:22 403 up=0 down=0 "
            "0.000s refused (port)",
        )

    def test_logLineWithoutConnect(self) -> None:
        """
        A request that is not a CONNECT logs C{-} for the method and the
        target, not C{CONNECT}.
        """
        self.proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.proxy.connectionLost(Failure(ConnectionDone()))
        from twisted.logger import formatEvent

        [event] = self.tunnelEvents()
        self.assertEqual(
            formatEvent(event),
            "192.0.2.7:40000 - - - 405 up=0 down=0 0.000s refused",
        )

    def test_unixClient(self) -> None:
        """
        A client on a UNIX socket (no IP address) is served, and counted
        under its user, never under the socket name it chose: clients that
        each bind a name of their own are counted together (a transport
        whose user cannot be told counts as C{unix}).
        """
        clients: list[tuple[ConnectProxy, HalfCloseTransport]] = []
        for name in [b"/run/client.sock", b"\0other"]:
            proxy = self.factory.buildProtocol(None)
            assert isinstance(proxy, ConnectProxy)
            client = HalfCloseTransport(peerAddress=UNIXAddress(name))
            proxy.makeConnection(client)
            clients.append((proxy, client))
        self.assertEqual(self.factory._openPerClient["unix"], 2)
        clients[0][0].dataReceived(HEAD)
        self.reachTarget()
        self.assertEqual(clients[0][1].value(), ESTABLISHED)
        self.assertEqual(clients[1][1].value(), b"")

    def test_unixClientLogPrefix(self) -> None:
        """
        A UNIX client's transport gets a log prefix that names the client as
        the logs do: Twisted's holds the socket name the client chose, raw,
        which could forge log lines or a worker's records.
        """
        proxy = self.factory.buildProtocol(None)
        assert isinstance(proxy, ConnectProxy)
        client = HalfCloseTransport(peerAddress=UNIXAddress(b"\0\x1eevil\n"))
        client.logstr = "ConnectProxy,7,\x00\x1eevil\n"
        client.sessionno = 7
        proxy.makeConnection(client)
        self.assertEqual(
            client.logstr,
            "ConnectProxy,7,@\\x1eevil\\x0a",
        )

    def tunnelOverTCP(self) -> tuple[NoDelayTransport, NoDelayTransport]:
        """
        Open a tunnel whose two connections are TCP transports that record
        their socket options.

        @return: The client's transport and the target's.
        """
        proxy = self.factory.buildProtocol(None)
        assert isinstance(proxy, ConnectProxy)
        client = NoDelayTransport(peerAddress=IPv4Address("TCP", "192.0.2.8", 1))
        proxy.makeConnection(client)
        proxy.dataReceived(HEAD)
        factory, d = self.connector.endpoint.attempts[0]
        target = factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 443))
        transport = NoDelayTransport()
        target.makeConnection(transport)
        d.callback(target)
        return client, transport

    def test_noDelay(self) -> None:
        """
        Nagle's algorithm is turned off on TCP connections, to the client
        and to the target; keepalive is left alone (the idle timeout ends a
        tunnel whose peer vanished).
        """
        client, target = self.tunnelOverTCP()
        self.assertEqual((client.noDelay, target.noDelay), (True, True))
        self.assertEqual((client.keepAlive, target.keepAlive), (None, None))

    def test_keepAliveWithoutIdleTimeout(self) -> None:
        """
        With no idle timeout, TCP keepalive is turned on for both
        connections of a tunnel, so that a peer that vanished silently does
        not keep its tunnel for ever.
        """
        self.factory.idleTimeout = None
        client, target = self.tunnelOverTCP()
        self.assertEqual((client.keepAlive, target.keepAlive), (True, True))

    def test_headAtSizeLimit(self) -> None:
        """
        A head of exactly C{maxHeaderSize} bytes (without the empty line
        that ends it) is accepted, whether that empty line comes with it,
        later, or byte by byte; one byte more gets 431 even when the empty
        line arrives in the same write, and when it comes byte by byte.
        """
        self.factory.maxHeaderSize = 100
        self.proxy.dataReceived(headOfLength(100) + b"\r\n")
        self.assertEqual(self.connector.targets, [("a.example", 443)])
        proxy, client = self.connectClient()
        proxy.dataReceived(headOfLength(100))
        proxy.dataReceived(b"\r\n")
        self.assertEqual(self.connector.targets, [("a.example", 443)] * 2)
        proxy, client = self.connectClient()
        for byte in iterbytes(headOfLength(100) + b"\r\n"):
            proxy.dataReceived(byte)
        self.assertEqual(self.connector.targets, [("a.example", 443)] * 3)
        proxy, client = self.connectClient()
        proxy.dataReceived(headOfLength(101) + b"\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 431 "), client.value())
        proxy, client = self.connectClient()
        for byte in iterbytes(headOfLength(101) + b"\r\n"):
            proxy.dataReceived(byte)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 431 "), client.value())
        self.assertEqual(len(self.connector.targets), 3)

    def test_headInPiecesThenEarlyData(self) -> None:
        """
        Early data that arrives with the end of a head sent in pieces
        reaches the target whole, and the head is not kept once parsed.
        """
        self.proxy.dataReceived(HEAD[:20])
        self.proxy.dataReceived(HEAD[20:] + b"early")
        self.assertEqual(self.proxy._buffer, b"")
        _target, transport = self.reachTarget()
        self.assertEqual(transport.value(), b"early")

    def test_logEventTimes(self) -> None:
        """
        The event gives the handshake time (until the 200), the time taken
        to reach the target, the whole duration, all counted from when the
        client connected whatever the clock read before, and the address
        the tunnel reached.
        """
        self.clock.advance(1000)
        proxy, _client = self.connectClient()
        self.clock.advance(1)
        proxy.dataReceived(HEAD)
        self.clock.advance(2)
        target, transport = self.reachTarget()
        self.clock.advance(4)
        proxy.connectionLost(Failure(ConnectionLost()))
        target.connectionLost(Failure(ConnectionLost()))
        # The mixin's own client timed out its head long before.
        [event] = [e for e in self.tunnelEvents() if e["status"] == 200]
        self.assertEqual(
            (event["handshake"], event["connect"], event["duration"]), (3, 2, 7)
        )
        self.assertEqual(event["connectedTo"], formatAddress(transport.getPeer()))

    def test_connectorTimeout(self) -> None:
        """
        An attempt that times out on its own (the connector's timeout, as
        when there is no connect timeout) gets a 504 as well.
        """
        for timeout in [ConnectTimeoutError(), DeferredTimeoutError()]:
            proxy, client = self.connectClient()
            proxy.dataReceived(HEAD)
            self.connector.endpoint.attempts[-1][1].errback(timeout)
            self.assertTrue(client.value().startswith(b"HTTP/1.1 504 "), timeout)

    def test_parentUnreachableSaysSo(self) -> None:
        """
        A parent proxy that cannot be reached gets the client a 502 that
        says so (not that the target refused or does not resolve), and a
        log line that gives the reason.
        """
        from tunnel.interfaces import UpstreamUnreachable

        lines = self.loggedLines("Parent proxy unreachable")
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(
            UpstreamUnreachable(string="Connection refused")
        )
        response = self.assertRejected(502, "target-failed")
        self.assertTrue(
            response.endswith(b"\r\n\r\nThe parent proxy could not be reached.\n")
        )
        [line] = lines()
        self.assertIn("Connection refused", line)

    def test_parentFailedSaysSo(self) -> None:
        """
        The 502 for a parent proxy that answered nonsense says that the
        parent proxy failed.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(UpstreamProtocolError())
        response = self.assertRejected(502, "target-failed")
        self.assertTrue(response.endswith(b"\r\n\r\nThe parent proxy failed.\n"))

    def loggedLines(self, containing: str) -> Callable[[], list[str]]:
        """
        Start collecting the log's events.

        @param containing: What the lines wanted contain.
        @return: A function giving the lines logged since that contain it.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import formatEvent, globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

        def lines() -> list[str]:
            return [formatEvent(e) for e in events if containing in formatEvent(e)]

        return lines

    def test_parentTimeoutSaysSo(self) -> None:
        """
        When the connect timeout cancels an attempt through a parent proxy,
        the 504 says the parent did not answer in time (not that reaching
        the target did), and the log says how far the attempt got.
        """
        from tunnel.interfaces import UpstreamCancelled

        lines = self.loggedLines("Parent proxy timed out")
        for answering, why in [
            (False, "could not reach the parent proxy in time"),
            (True, "the parent proxy did not answer in time"),
        ]:
            self.connector.endpoint.cancelWith = UpstreamCancelled(answering)
            proxy, client = self.connectClient()
            proxy.dataReceived(HEAD)
            self.clock.advance(15)
            self.assertTrue(client.value().startswith(b"HTTP/1.1 504 "))
            self.assertTrue(
                client.value().endswith(
                    b"\r\n\r\nThe parent proxy did not answer in time.\n"
                )
            )
            self.assertIn(why, lines()[-1])
        self.assertEqual(len(lines()), 2)

    def test_parentCancelledNotTimedOut(self) -> None:
        """
        An attempt through a parent that fails as cancelled without the
        proxy's timeout (the connector gave up on its own) is not reported
        as the parent's timeout.
        """
        from tunnel.interfaces import UpstreamCancelled

        lines = self.loggedLines("Parent proxy timed out")
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(UpstreamCancelled(True))
        response = self.assertRejected(502, "target-failed")
        self.assertTrue(
            response.endswith(b"\r\n\r\nThe proxy could not reach the target.\n")
        )
        self.assertEqual(lines(), [])

    def test_parentOwnTimeoutSaysSo(self) -> None:
        """
        A parent connector's own timeout (L{UpstreamTimedOut}, as with no
        connect timeout of the proxy's) gets the same 504, and its message
        in the log.
        """
        from tunnel.interfaces import UpstreamTimedOut

        lines = self.loggedLines("Parent proxy timed out")
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(
            UpstreamTimedOut(string="the parent proxy did not answer within 30 s")
        )
        response = self.assertRejected(504, "target-failed")
        self.assertTrue(
            response.endswith(b"\r\n\r\nThe parent proxy did not answer in time.\n")
        )
        [line] = lines()
        self.assertIn("did not answer within 30 s", line)

    def test_defaultLimits(self) -> None:
        """
        By default the request line may be 8192 bytes, the head 65536, and
        65536 bytes of early data are held before the client is paused.
        """
        self.factory = ConnectProxyFactory(self.connector, reactor=self.clock)
        line = b"CONNECT " + b"a" * (8192 - len(b"CONNECT  HTTP/1.1")) + b" HTTP/1.1"
        for request, status in [(line, b"400"), (line + b"a", b"414")]:
            proxy, client = self.connectClient()
            proxy.dataReceived(request + b"\r\nHost: a\r\n\r\n")
            self.assertTrue(client.value().startswith(b"HTTP/1.1 " + status))
        proxy, client = self.connectClient()
        proxy.dataReceived(headOfLength(65536) + b"\r\n")
        self.assertEqual(client.value(), b"")
        self.assertEqual(self.connector.targets, [("a.example", 443)])
        proxy, client = self.connectClient()
        proxy.dataReceived(headOfLength(65537) + b"\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 431 "))
        proxy, client = self.connectClient()
        proxy.dataReceived(HEAD + b"x" * 65536)
        self.assertEqual(client.producerState, "producing")
        proxy.dataReceived(b"x")
        self.assertEqual(client.producerState, "paused")

    def test_answeredClientStaysCounted(self) -> None:
        """
        A client answered with an error stays among the factory's
        connections (a drain waits for it) until its connection is closed.
        """
        self.proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertIn(self.proxy, self.factory.connections)
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertNotIn(self.proxy, self.factory.connections)


class EarlyDataTests(ProxyTestMixin, SynchronousTestCase):
    """
    Bytes sent after the head, before the answer (RFC 9931).
    """

    def test_earlyDataFirst(self) -> None:
        """
        Bytes sent in the same write as the head, and while connecting,
        reach the target first, once, in order.
        """
        self.proxy.dataReceived(HEAD + b"hello ")
        self.proxy.dataReceived(b"world")
        _target, transport = self.reachTarget()
        self.assertEqual(transport.value(), b"hello world")
        self.proxy.dataReceived(b"!")
        self.assertEqual(transport.value(), b"hello world!")

    def test_pipelinedRequestIsTunnelData(self) -> None:
        """
        A second request after the head is tunnel data, not a request.
        """
        self.proxy.dataReceived(HEAD + HEAD)
        _target, transport = self.reachTarget()
        self.assertEqual(transport.value(), HEAD)
        self.assertEqual(len(self.connector.targets), 1)

    def test_earlyDataDroppedOnFailure(self) -> None:
        """
        When the target cannot be reached, early data is dropped and only
        the error goes back.
        """
        self.proxy.dataReceived(HEAD + b"secret")
        self.connector.endpoint.attempts[0][1].errback(ConnectionRefusedError())
        self.assertNotIn(b"secret", self.client.value())
        self.assertIsNone(self.proxy._early)

    def test_earlyDataBounded(self) -> None:
        """
        Beyond C{maxEarlyData} bytes while connecting, the proxy stops
        reading from the client, and resumes once the tunnel is up.
        """
        self.proxy.dataReceived(HEAD + b"x" * 60)
        self.assertEqual(self.client.producerState, "producing")
        self.proxy.dataReceived(b"y" * 60)
        self.assertEqual(self.client.producerState, "paused")
        _target, transport = self.reachTarget()
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(transport.value(), b"x" * 60 + b"y" * 60)

    def test_earlyDataThenFin(self) -> None:
        """
        A client that sends early data and then FIN before the answer gets
        its data delivered and its FIN passed on.
        """
        self.proxy.dataReceived(HEAD + b"last words")
        self.proxy.readConnectionLost()
        self.assertEqual(self.connector.endpoint.cancelled, 0)
        target, transport = self.reachTarget()
        self.assertEqual(transport.value(), b"last words")
        self.assertTrue(transport.writeClosed)
        target.dataReceived(b"reply")
        self.assertEqual(self.client.value(), ESTABLISHED + b"reply")

    def test_earlyDataLimitExact(self) -> None:
        """
        Exactly C{maxEarlyData} bytes of early data are held without
        pausing the client; one more byte pauses it.
        """
        self.proxy.dataReceived(HEAD + b"x" * 99)
        self.proxy.dataReceived(b"x")
        self.assertEqual(self.client.producerState, "producing")
        self.proxy.dataReceived(b"y")
        self.assertEqual(self.client.producerState, "paused")


class TunnelTests(ProxyTestMixin, SynchronousTestCase):
    """
    The relay once the tunnel is established.
    """

    def test_relayBothWays(self) -> None:
        """
        Bytes flow both ways.
        """
        target, transport = self.establish()
        self.proxy.dataReceived(b"up")
        target.dataReceived(b"down")
        self.assertEqual(transport.value(), b"up")
        self.assertEqual(self.client.value(), b"down")

    def test_flowControl(self) -> None:
        """
        Each transport is the streaming producer of the other: when the
        client stops reading, the proxy stops reading from the target, and
        the other way round.
        """
        _target, transport = self.establish()
        clientProducer, targetProducer = self.client.producer, transport.producer
        assert clientProducer is not None and targetProducer is not None
        self.assertIs(clientProducer.transport, transport)
        self.assertIs(targetProducer.transport, self.client)
        self.assertTrue(self.client.streaming)
        self.assertTrue(transport.streaming)
        clientProducer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        clientProducer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        # Only the relay ends the other side: Twisted's stopProducing, sent
        # when a consumer's connection is lost, leaves it alone.
        clientProducer.stopProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(transport.disconnecting)

    def test_clientHalfClose(self) -> None:
        """
        A FIN from the client becomes a FIN towards the target while the
        target can still send; the tunnel ends when the target finishes too.
        """
        target, transport = self.establish()
        self.proxy.readConnectionLost()
        self.assertTrue(transport.writeClosed)
        self.assertIsNone(transport.producer)
        self.assertFalse(self.client.disconnecting)
        target.dataReceived(b"still flowing")
        self.assertEqual(self.client.value(), b"still flowing")
        target.readConnectionLost()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(transport.disconnecting)
        self.closeBoth(target)
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "client-eof")

    def test_targetHalfClose(self) -> None:
        """
        A FIN from the target becomes a FIN towards the client while the
        client can still send.
        """
        target, transport = self.establish()
        target.readConnectionLost()
        self.assertTrue(self.client.writeClosed)
        self.assertIsNone(self.client.producer)
        self.proxy.dataReceived(b"still flowing")
        self.assertEqual(transport.value(), b"still flowing")
        self.proxy.readConnectionLost()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(transport.disconnecting)
        self.closeBoth(target)
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "target-eof")

    def test_targetFinNoHalfCloseClient(self) -> None:
        """
        A FIN from the target towards a client transport that cannot
        half-close (TLS) closes the client once its data is flushed.
        """
        self.proxy.dataReceived(HEAD)
        tlsLike = StringTransport()
        self.proxy.transport = tlsLike
        self.proxy._client = tlsLike  # type: ignore[assignment]
        target, _transport = self.reachTarget()
        target.dataReceived(b"last")
        target.readConnectionLost()
        self.assertEqual(tlsLike.value(), ESTABLISHED + b"last")
        self.assertTrue(tlsLike.disconnecting)
        self.assertIsNone(tlsLike.producer)

    def test_targetReset(self) -> None:
        """
        A target lost before both sides finished resets the client at once.
        """
        target, _transport = self.establish()
        target.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.client.disconnected)
        self.proxy.connectionLost(Failure(ConnectionLost()))
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "target-reset")

    def test_clientReset(self) -> None:
        """
        A client lost before both sides finished resets the target at once.
        """
        target, transport = self.establish()
        self.proxy.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(transport.disconnected)
        target.connectionLost(Failure(ConnectionLost()))
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "client-reset")
        self.assertEqual(self.factory.connections, set())

    def test_cleanCloseWithoutHalfClose(self) -> None:
        """
        A clean close from a side that cannot half-close (TLS) closes the
        other side gracefully, letting it flush, rather than resetting it.
        """
        target, transport = self.establish()
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        target.connectionLost(Failure(ConnectionDone()))
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "client-eof")

    def test_gracefulCloseDeadline(self) -> None:
        """
        A tunnel closing gracefully whose peer never takes the buffered
        bytes is aborted after the idle timeout, so it cannot linger forever.
        """
        target, transport = self.establish()
        self.proxy.readConnectionLost()
        target.readConnectionLost()
        self.assertTrue(self.client.disconnecting)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(600)
        self.assertTrue(self.client.disconnected)
        self.assertTrue(transport.disconnected)
        self.closeBoth(target)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleTimeout(self) -> None:
        """
        A tunnel with no traffic for the idle timeout is closed; traffic in
        either direction restarts the count.
        """
        target, transport = self.establish()
        self.clock.advance(599)
        self.proxy.dataReceived(b"x")
        self.clock.advance(599)
        target.dataReceived(b"y")
        self.clock.advance(599)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(2)
        self.assertTrue(self.client.disconnected)
        self.assertTrue(transport.disconnected)
        self.closeBoth(target)
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "idle-timeout")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oneIdleTimer(self) -> None:
        """
        The factory's tunnels share one idle timer, which still ends each
        quiet tunnel on its own time.
        """
        _target, transport = self.establish()
        self.clock.advance(300)
        proxy, _client = self.connectClient()
        proxy.dataReceived(HEAD)
        _otherTarget, otherTransport = self.reachTarget(1)
        watch = self.factory.idleWatch()
        assert watch is not None
        self.assertEqual(watch.watching, 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(300)
        self.assertTrue(transport.disconnected)
        self.assertFalse(otherTransport.disconnected)
        self.clock.advance(300)
        self.assertTrue(otherTransport.disconnected)
        self.assertEqual(watch.watching, 0)

    def test_idleTimeoutDisabled(self) -> None:
        """
        An idle timeout of 0 leaves quiet tunnels open.
        """
        self.factory.idleTimeout = None
        _target, _transport = self.establish()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10**6)
        self.assertFalse(self.client.disconnecting)

    def test_noTimersLeft(self) -> None:
        """
        No timer outlives its tunnel.
        """
        target, _transport = self.establish()
        self.proxy.readConnectionLost()
        target.readConnectionLost()
        self.closeBoth(target)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_abortTunnel(self) -> None:
        """
        L{ConnectProxy.abortTunnel} resets an established tunnel, and a
        connection still in its handshake.
        """
        target, transport = self.establish()
        self.proxy.abortTunnel()
        self.assertTrue(self.client.disconnected)
        self.assertTrue(transport.disconnected)
        self.closeBoth(target)
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "shutdown")
        proxy, client = self.connectClient()
        proxy.dataReceived(HEAD)
        proxy.abortTunnel()
        self.assertTrue(client.disconnected)
        proxy.connectionLost(Failure(ConnectionAborted()))
        [_, event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["ended"]), ("-", "shutdown"))

    def test_targetDataBeforeAttach(self) -> None:
        """
        A target protocol that hears from its target before it is attached
        to a relay (a parent proxy may deliver bytes with the connection)
        passes them on once it is.
        """
        target = TargetProtocol()
        target.makeConnection(HalfCloseTransport())
        target.dataReceived(b"early")
        target.readConnectionLost()
        target.connectionLost(Failure(ConnectionLost()))
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].callback(target)
        self.assertEqual(self.client.value(), ESTABLISHED + b"early")
        self.assertTrue(self.client.disconnected)

    def test_tunnelObservers(self) -> None:
        """
        The factory's C{tunnelObservers} get the event that ends each
        connection, with the fields and the C{log_*} keys of a log event;
        with C{logTunnels} off it goes to them and not to the global log.
        """
        seen: list[dict[str, Any]] = []
        self.factory.tunnelObservers.append(seen.append)
        self.factory.logTunnels = False
        target, _transport = self.establish()
        target.dataReceived(b"hello")
        self.closeBoth(target)
        self.assertEqual(self.tunnelEvents(), [])
        [event] = seen
        self.assertEqual(
            (event["status"], event["bytesDown"], event["tunnelEvent"]),
            (200, 5, True),
        )
        self.assertEqual(event["log_format"], "{line}")
        self.assertIn("CONNECT target.example:443 200", formatEvent(event))
        self.assertIsInstance(event["log_time"], float)

    def test_failingTunnelObserver(self) -> None:
        """
        A tunnel observer that raises is logged and does not stop the
        others nor the connection's close.
        """

        def broken(event: object) -> None:
            raise RuntimeError("observer bug")

        seen: list[dict[str, Any]] = []
        self.factory.tunnelObservers.extend([broken, seen.append])
        target, _transport = self.establish()
        self.closeBoth(target)
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.tunnelEvents()), 1)
        [_failure] = self.flushLoggedErrors(RuntimeError)
        self.assertNotIn(self.proxy, self.factory.connections)

    def test_gracefulCloseDeadlineIsIdleTimeout(self) -> None:
        """
        A graceful close waits for the whole idle timeout before it aborts;
        without an idle timeout it waits a minute, not less.
        """
        target, transport = self.establish()
        self.proxy.readConnectionLost()
        target.readConnectionLost()
        self.clock.advance(599)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnected)
        self.closeBoth(target)
        self.factory.idleTimeout = None
        proxy, client = self.connectClient()
        proxy.dataReceived(HEAD)
        target, transport = self.reachTarget(1)
        proxy.readConnectionLost()
        target.readConnectionLost()
        self.assertTrue(client.disconnecting)
        self.clock.advance(59)
        self.assertFalse(client.disconnected)
        self.assertFalse(transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(client.disconnected)
        self.assertTrue(transport.disconnected)

    def test_closeUnregistersProducer(self) -> None:
        """
        When the target closes cleanly without a FIN of its own, the client
        is closed with no producer left registered on it: a TLS transport
        does not close while one is.
        """
        target, _transport = self.establish()
        target.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.client.disconnecting)
        self.assertIsNone(self.client.producer)
        self.assertFalse(self.client.disconnected)

    def test_firstEndKept(self) -> None:
        """
        A tunnel whose client sent FIN first, and whose target then closed
        cleanly without a FIN of its own (as TLS does), ended C{client-eof}.
        """
        target, _transport = self.establish()
        self.proxy.readConnectionLost()
        target.connectionLost(Failure(ConnectionDone()))
        self.proxy.connectionLost(Failure(ConnectionDone()))
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "client-eof")

    def test_endsOnceBothClosed(self) -> None:
        """
        A tunnel whose target is lost first ends (its event, the count of
        relaying tunnels) only once the client connection is closed too.
        """
        target, _transport = self.establish()
        target.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.tunnelEvents(), [])
        self.assertEqual(self.factory.relaying, 1)
        self.proxy.connectionLost(Failure(ConnectionLost()))
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "target-reset")
        self.assertEqual(self.factory.relaying, 0)

    def test_targetFinBeforeAttach(self) -> None:
        """
        A target that sends bytes, in several pieces, and its FIN before
        the relay is attached has all of it passed on in order: the client
        gets the bytes, then a FIN, and can still send.
        """
        target = TargetProtocol()
        transport = HalfCloseTransport()
        target.makeConnection(transport)
        target.dataReceived(b"one ")
        target.dataReceived(b"two ")
        target.dataReceived(b"three")
        target.readConnectionLost()
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].callback(target)
        self.assertEqual(self.client.value(), ESTABLISHED + b"one two three")
        self.assertTrue(self.client.writeClosed)
        self.assertFalse(self.client.disconnecting)
        self.proxy.dataReceived(b"up")
        self.assertEqual(transport.value(), b"up")

    def test_handshakeStateDropped(self) -> None:
        """
        Once the tunnel is up, what only the handshake needed (the early
        data, the request, the client's address) is not kept.
        """
        self.proxy.dataReceived(HEAD + b"early")
        self.reachTarget()
        self.assertIsNone(self.proxy._early)
        self.assertIsNone(self.proxy._request)
        self.assertIsNone(self.proxy._clientIP)

    def test_idleTimeoutChanged(self) -> None:
        """
        A new idle timeout applies to the tunnels established after it is
        set.
        """
        self.establish()
        self.factory.idleTimeout = 30
        proxy, client = self.connectClient()
        proxy.dataReceived(HEAD)
        self.reachTarget(1)
        self.clock.advance(30)
        self.assertTrue(client.disconnected)
        self.assertFalse(self.client.disconnected)

    def test_noSpliceWhenDisabled(self) -> None:
        """
        With C{splice} off, tunnels use a L{Relay} even between transports
        that could splice.
        """
        self.patch(server, "canSplice", lambda transport: True)
        self.factory.splice = False
        self.establish()
        self.assertIsInstance(self.proxy._relay, Relay)

    def test_forgottenWithoutLogging(self) -> None:
        """
        With no tunnel log and no observers, a tunnel whose target closes
        last is still forgotten by the factory once both are closed.
        """
        self.factory.logTunnels = False
        target, _transport = self.establish()
        self.proxy.connectionLost(Failure(ConnectionLost()))
        target.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.factory.connections, set())
        self.assertEqual(self.factory.relaying, 0)

    def test_earlyDataCounted(self) -> None:
        """
        The bytes sent up include the early data.
        """
        self.proxy.dataReceived(HEAD + b"early")
        target, _transport = self.reachTarget()
        self.proxy.dataReceived(b"late")
        self.closeBoth(target)
        [event] = self.tunnelEvents()
        self.assertEqual(event["bytesUp"], 9)


class RelayCycleTests(SynchronousTestCase):
    """
    A finished L{Relay} is freed by reference counting.
    """

    def test_closeDeadlineLeavesNoCycle(self) -> None:
        """
        A tunnel whose graceful close ran into the close deadline (a peer
        that never reads) leaves no reference cycle once it ended: the
        fired deadline, which holds the relay's C{abort}, goes with it.
        """
        clock = MemoryReactorClock()
        results: list[object] = []
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

        def closeLate() -> None:
            relay = Relay(
                HalfCloseTransport(), HalfCloseTransport(), clock, 10, results.append
            )
            relay.start()
            relay.clientFinished()
            relay.targetFinished()
            clock.advance(10)
            relay.clientLost(Failure(ConnectionAborted()))
            relay.targetLost(Failure(ConnectionAborted()))

        closeLate()
        self.assertEqual(len(results), 1)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, Relay)]
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
        self.assertEqual(left, [])


class HelperTests(SynchronousTestCase):
    """
    Tests for the helpers the server writes its answers and log lines
    with, from L{tunnel.clients} and L{tunnel.answers}.
    """

    def test_formatAddress(self) -> None:
        """
        Addresses render as host:port, [v6]:port, a UNIX path, or C{-}.
        """
        from twisted.internet.address import IPv6Address, UNIXAddress

        self.assertEqual(formatAddress(IPv4Address("TCP", "1.2.3.4", 5)), "1.2.3.4:5")
        self.assertEqual(formatAddress(IPv6Address("TCP", "::1", 5)), "[::1]:5")
        self.assertEqual(formatAddress(UNIXAddress(b"/run/p.sock")), "/run/p.sock")
        self.assertEqual(formatAddress(UNIXAddress(None)), "-")
        self.assertEqual(formatAddress(None), "-")

    def test_formatUNIXNames(self) -> None:
        """
        A UNIX client's socket name, which it chooses, is rendered with
        bytes outside visible ASCII and backslashes as C{\\xNN}, so that it
        can neither split a log line or a worker's record nor forge one; a
        name in the abstract namespace starts with C{@}.
        """
        from twisted.internet.address import UNIXAddress

        self.assertEqual(
            formatAddress(UNIXAddress(b"\0\x1ecritical\tx\n")),
            "@\\x1ecritical\\x09x\\x0a",
        )
        self.assertEqual(
            formatAddress(UNIXAddress("/run/my proxy\\.sock")),
            "/run/my\\x20proxy\\x5c.sock",
        )
        self.assertEqual(formatAddress(UNIXAddress(b"/run/\xff")), "/run/\\xff")

    def test_errorResponse(self) -> None:
        """
        An error response has the status line, a text body and its length,
        C{Connection: close}, and any extra fields; without its content (for
        C{HEAD}) it still gives the body's length.
        """
        self.assertEqual(
            errorResponse(405, "No.", ((b"Allow", b"CONNECT"),)),
            b"HTTP/1.1 405 Method Not Allowed\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 4\r\nConnection: close\r\nAllow: CONNECT\r\n\r\nNo.\n",
        )
        self.assertEqual(
            errorResponse(405, "No.", ((b"Allow", b"CONNECT"),), content=False),
            b"HTTP/1.1 405 Method Not Allowed\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 4\r\nConnection: close\r\nAllow: CONNECT\r\n\r\n",
        )

    def test_mayAddField(self) -> None:
        """
        L{mayAddField} accepts a token name with a value of visible
        characters, spaces, tabs and obs-text; it refuses a name that is
        not a token, a value with CR, LF, NUL or DEL, and the fields an
        error response writes itself (any case), and Transfer-Encoding.
        """
        self.assertTrue(mayAddField(b"Retry-After", b"60"))
        self.assertTrue(mayAddField(b"X-Why", b"a\tb \xff"))
        for name, value in [
            (b"Bad Name", b"x"),
            (b"", b"x"),
            (b"X", b"a\r\nSet-Cookie: y"),
            (b"X", b"a\x00"),
            (b"X", b"a\x7f"),
            (b"content-length", b"0"),
            (b"Connection", b"keep-alive"),
            (b"Date", b"x"),
            (b"Content-Type", b"text/html"),
            (b"Transfer-Encoding", b"chunked"),
        ]:
            self.assertFalse(mayAddField(name, value), (name, value))

    def test_dated(self) -> None:
        """
        Given a date (L{httpDate}: an IMF-fixdate), an error response
        carries it in a C{Date} field, right after the status line.
        """
        self.assertEqual(httpDate(0), b"Thu, 01 Jan 1970 00:00:00 GMT")
        self.assertTrue(
            errorResponse(400, "No.", date=httpDate(86400 * 365)).startswith(
                b"HTTP/1.1 400 Bad Request\r\nDate: Fri, 01 Jan 1971 00:00:00 GMT\r\n"
            )
        )

    def test_defaultConnector(self) -> None:
        """
        Without a connector, the factory reaches targets with a
        L{HostnameConnector} on its reactor.
        """
        factory = ConnectProxyFactory(reactor=MemoryReactorClock())
        self.assertIsInstance(factory.connector, HostnameConnector)

    def test_defaultConnectorBoundedByConnectTimeout(self) -> None:
        """
        The default connector keeps no timer of its own: the factory's
        connect timeout alone ends an attempt that never completes, with a
        504, and stops the attempt.
        """
        reactor = MemoryReactorClock()
        factory = ConnectProxyFactory(
            reactor=reactor,
            connectTimeout=5,
            policy=TunnelPolicy.fromStrings(allowTo=["192.0.2.0/24"]),
        )
        proxy = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        assert proxy is not None
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        proxy.makeConnection(client)
        proxy.dataReceived(
            b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n"
        )
        [(host, port, _, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.1", 443, None))
        [connector] = reactor.connectors
        reactor.advance(5)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 504 "))
        self.assertTrue(connector.stoppedConnecting)

    def test_defaultConnectorWithoutConnectTimeout(self) -> None:
        """
        Without a connect timeout the default connector bounds each attempt
        itself, so that no attempt lasts forever.
        """
        reactor = MemoryReactorClock()
        factory = ConnectProxyFactory(
            reactor=reactor,
            connectTimeout=None,
            policy=TunnelPolicy.fromStrings(allowTo=["192.0.2.0/24"]),
        )
        proxy = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        assert proxy is not None
        proxy.makeConnection(
            HalfCloseTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        )
        proxy.dataReceived(
            b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n"
        )
        [(_, _, _, timeout, _)] = reactor.tcpClients
        self.assertEqual(timeout, 30)

    def test_alpn(self) -> None:
        """
        The factory offers C{http/1.1} for ALPN, so that a TLS listener does
        not abort the handshake of clients that send ALPN.
        """
        from twisted.internet.interfaces import IProtocolNegotiationFactory

        factory = ConnectProxyFactory(reactor=MemoryReactorClock())
        self.assertTrue(IProtocolNegotiationFactory.providedBy(factory))
        self.assertEqual(factory.acceptableProtocols(), [b"http/1.1"])

    def test_protocolClass(self) -> None:
        """
        The factory builds L{ConnectProxy} instances that know their factory.
        """
        factory = ConnectProxyFactory(reactor=MemoryReactorClock())
        proxy = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIsInstance(proxy, ConnectProxy)
        self.assertIsInstance(proxy, Protocol)
        self.assertIs(proxy.factory, factory)  # type: ignore[union-attr]

    def test_canHalfClose(self) -> None:
        """
        A socket transport can half-close; a wrapper around one (TLS is a
        L{ProtocolWrapper}) cannot, though it claims its transport's
        interfaces.
        """
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        wrapper.makeConnection(HalfCloseTransport())
        self.assertTrue(IHalfCloseableDescriptor.providedBy(wrapper))
        self.assertFalse(canHalfClose(wrapper))
        self.assertTrue(canHalfClose(HalfCloseTransport()))
        self.assertFalse(canHalfClose(StringTransport()))

    def test_errorBodyUTF8(self) -> None:
        """
        An error's text (a policy's own, say) is sent as UTF-8, as its
        C{Content-Type} says, with the length in bytes.
        """
        response = errorResponse(403, "Zugriff verweigert: Straße gesperrt.")
        head, body = response.split(b"\r\n\r\n", 1)
        self.assertEqual(body, "Zugriff verweigert: Straße gesperrt.\n".encode())
        self.assertIn(b"Content-Type: text/plain; charset=utf-8", head)
        self.assertIn(b"Content-Length: %d" % (len(body),), head)

    def test_reasonPhrases(self) -> None:
        """
        Each status the proxy answers with has its standard reason phrase;
        any other gets C{Error}.
        """
        for status, reason in [
            (400, b"Bad Request"),
            (403, b"Forbidden"),
            (405, b"Method Not Allowed"),
            (407, b"Proxy Authentication Required"),
            (408, b"Request Timeout"),
            (414, b"URI Too Long"),
            (429, b"Too Many Requests"),
            (431, b"Request Header Fields Too Large"),
            (500, b"Internal Server Error"),
            (502, b"Bad Gateway"),
            (503, b"Service Unavailable"),
            (504, b"Gateway Timeout"),
            (505, b"HTTP Version Not Supported"),
            # RFC 9110's names, where Python before 3.13 has older ones.
            (413, b"Content Too Large"),
            (416, b"Range Not Satisfiable"),
            (422, b"Unprocessable Content"),
            (451, b"Unavailable For Legal Reasons"),
            (599, b"Error"),
        ]:
            self.assertTrue(
                errorResponse(status, "x").startswith(
                    b"HTTP/1.1 %d %s\r\n" % (status, reason)
                ),
                status,
            )


def basicHead(
    credentials: bytes | None, target: bytes = b"target.example:443"
) -> bytes:
    """
    A CONNECT head with C{Proxy-Authorization: Basic} for C{credentials}.
    """
    field = b""
    if credentials is not None:
        field = b"Proxy-Authorization: Basic " + base64.b64encode(credentials) + b"\r\n"
    return (
        b"CONNECT "
        + target
        + b" HTTP/1.1\r\nHost: "
        + target
        + b"\r\n"
        + field
        + b"\r\n"
    )


@implementer(ICredentialsChecker)
class BrokenChecker:
    """
    A checker with a bug.
    """

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: object) -> Deferred[Any]:
        """
        Fail unexpectedly.
        """
        return fail(ZeroDivisionError())


@implementer(ICredentialsChecker)
class PendingChecker:
    """
    A checker that answers when the test says so.

    @ivar pending: The Deferreds of the checks asked for, in order.
    @ivar credentials: The credentials checked, in order.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []
        self.credentials: list[Any] = []

    def requestAvatarId(self, credentials: object) -> Deferred[Any]:
        """
        Answer later.
        """
        self.credentials.append(credentials)
        self.pending.append(Deferred())
        return self.pending[-1]


class AuthenticationTests(ProxyTestMixin, SynchronousTestCase):
    """
    C{Proxy-Authorization} through a cred portal.
    """

    def setUp(self) -> None:
        super().setUp()
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"s3:cret")
        self.factory.portal = portalFromCheckers([checker])
        self.factory.realm = "Test Realm"
        self.factory.damper = FailureDamper(self.clock, maxFailures=3)

    def assertChallenged(self) -> None:
        """
        Assert the client got a 407 with the realm, and the connection is
        closing.
        """
        response = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 407 "), response)
        self.assertIn(
            b'\r\nProxy-Authenticate: Basic realm="Test Realm", charset="UTF-8"\r\n',
            response,
        )
        self.assertIn(b"\r\nConnection: close\r\n", response)
        self.assertAnswered(self.client)
        self.assertEqual(self.connector.targets, [])

    def authWarnings(self) -> list[dict[str, Any]]:
        """
        The warnings that an authentication failed.
        """
        return [
            e
            for e in self.events
            if e.get("log_format", "").startswith("Authentication failed")
        ]

    def test_noCredentials(self) -> None:
        """
        A request without credentials gets a 407 challenge naming the realm;
        it is how every browser starts, so no failure is warned of.
        """
        self.proxy.dataReceived(HEAD)
        self.assertChallenged()
        self.assertEqual(self.authWarnings(), [])

    def test_malformed(self) -> None:
        """
        A malformed Proxy-Authorization value is a 407, never a 5xx, and is
        warned of.
        """
        self.proxy.dataReceived(
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: h\r\n"
            b"Proxy-Authorization: Basic %%%\r\n\r\n"
        )
        self.assertChallenged()
        [warning] = self.authWarnings()
        self.assertEqual(warning["why"], "no valid Basic credentials")

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets a 407, logged with the client address and user
        name but never the password.
        """
        self.proxy.dataReceived(basicHead(b"alice:wrong"))
        self.assertChallenged()
        [warning] = [e for e in self.events if "why" in e]
        self.assertEqual(
            (warning["user"], warning["client"]), ("alice", "192.0.2.7:40000")
        )
        from twisted.logger import formatEvent

        for event in self.events:
            self.assertNotIn("wrong", formatEvent(event).replace("wrong user", ""))
            self.assertNotIn(base64.b64encode(b"alice:wrong").decode(), repr(event))

    def test_sameCredentialsCheckedOnce(self) -> None:
        """
        Many connections that send the same credentials at once share one
        check (the failed-login limit counts them as one attempt in flight,
        so each must not start a costly check of its own); every one gets
        the answer, and each failure still counts.
        """
        checker = PendingChecker()
        self.factory.portal = portalFromCheckers([checker])
        clients = []
        for _ in range(20):
            proxy, client = self.connectClient()
            proxy.dataReceived(basicHead(b"alice:guess"))
            clients.append(client)
        self.assertEqual(len(checker.pending), 1)
        checker.pending[0].errback(UnauthorizedLogin())
        for client in clients:
            self.assertTrue(client.value().startswith(b"HTTP/1.1 407 "))
        self.assertEqual(self.factory._logins.pending, {})
        proxy, client = self.connectClient()
        proxy.dataReceived(basicHead(b"alice:another"))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 429 "))
        self.assertEqual(len(checker.pending), 1)

    def test_userNameEscapedInLog(self) -> None:
        """
        The user name a client claims is escaped in the log lines (as in the
        access log), so that it cannot shift the line's fields.
        """
        self.proxy.dataReceived(basicHead(b"mallory from 10.9.9.9:wrong"))
        self.assertChallenged()
        self.proxy.connectionLost(Failure(ConnectionDone()))
        from twisted.logger import formatEvent

        lines = [formatEvent(event) for event in self.events]
        self.assertIn(
            "Authentication failed for mallory%20from%2010.9.9.9 from "
            "192.0.2.7:40000: wrong user name or password",
            lines,
        )
        self.assertIn(
            "192.0.2.7:40000 mallory%20from%2010.9.9.9 CONNECT target.example:443 "
            "407 up=0 down=0 0.000s refused (auth)",
            lines,
        )

    def test_longUserNameCut(self) -> None:
        """
        A claimed user name longer than 256 characters is logged, and kept
        as the connection's C{user}, cut to its first 256 and C{...}: a
        head may claim 40 KB, which escaped in each log line would cost
        the disk several times the request; the check sees it whole.
        """
        checker = PendingChecker()
        self.factory.portal = portalFromCheckers([checker])
        name = "é" * 300
        self.proxy.dataReceived(basicHead(name.encode("utf-8") + b":wrong"))
        [pending] = checker.pending
        pending.errback(UnauthorizedLogin())
        [credentials] = checker.credentials
        self.assertEqual(credentials.username, name.encode("utf-8"))
        self.assertEqual(self.proxy.user, "é" * 256 + "...")
        self.proxy.connectionLost(Failure(ConnectionDone()))
        from twisted.logger import formatEvent

        [line] = [
            formatEvent(e)
            for e in self.events
            if formatEvent(e).startswith("Authentication failed")
        ]
        self.assertIn("%C3%A9" * 256 + "... from", line)
        self.assertNotIn("%C3%A9" * 257, line)
        short = "é" * 256
        proxy, _client = self.connectClient()
        proxy.dataReceived(basicHead(short.encode("utf-8") + b":wrong"))
        self.assertEqual(proxy.user, short)

    def test_valid(self) -> None:
        """
        Valid credentials (the password may hold a colon) let the request
        through, and the user name reaches the policy and the log event.
        """
        self.proxy.dataReceived(basicHead(b"alice:s3:cret"))
        self.assertEqual(self.connector.targets, [("target.example", 443)])
        target, _transport = self.reachTarget()
        self.proxy.connectionLost(Failure(ConnectionLost()))
        target.connectionLost(Failure(ConnectionLost()))
        [event] = self.tunnelEvents()
        self.assertEqual(event["user"], "alice")

    def test_damping(self) -> None:
        """
        After repeated failures from one address the next attempt gets a 429
        with Retry-After, even with the right password; other clients are
        not affected.
        """
        for _ in range(3):
            proxy, client = self.connectClient()
            proxy.dataReceived(basicHead(b"alice:wrong"))
            self.assertTrue(client.value().startswith(b"HTTP/1.1 407 "))
        proxy, client = self.connectClient()
        proxy.dataReceived(basicHead(b"alice:s3:cret"))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 429 "))
        self.assertIn(b"\r\nRetry-After: 60\r\n", client.value())
        self.assertEqual(self.tunnelEvents()[-1]["limit"], "failed-logins")
        other = self.factory.buildProtocol(None)
        assert other is not None
        otherClient = HalfCloseTransport(
            peerAddress=IPv4Address("TCP", "192.0.2.8", 40000)
        )
        other.makeConnection(otherClient)
        other.dataReceived(basicHead(b"alice:s3:cret"))
        self.assertEqual(otherClient.value(), b"")

    def test_clientLeavesDuringLogin(self) -> None:
        """
        A client that leaves while its credentials are checked is not
        answered when the check ends.
        """
        pending: Deferred[bytes] = Deferred()

        @implementer(ICredentialsChecker)
        class SlowChecker:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[Any]:
                return pending

        self.factory.portal = portalFromCheckers([SlowChecker()])
        self.proxy.dataReceived(basicHead(b"alice:s3:cret"))
        self.proxy.connectionLost(Failure(ConnectionLost()))
        pending.callback(b"alice")
        self.assertEqual(self.client.value(), b"")
        self.assertEqual(self.connector.targets, [])

    def test_slowChecker(self) -> None:
        """
        Credentials that are not checked within the connect timeout get a
        503 with Retry-After; the check is cancelled, and a late answer is
        ignored.
        """
        pending: Deferred[Any] = Deferred()

        @implementer(ICredentialsChecker)
        class SlowChecker:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[Any]:
                return pending

        self.factory.portal = portalFromCheckers([SlowChecker()])
        self.proxy.dataReceived(basicHead(b"alice:s3:cret"))
        self.clock.advance(15)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(self.tunnelEvents()[-1]["limit"], "login-timeout")
        # Given up with the 503: a check still waiting would not run.
        self.assertTrue(pending.called)
        pending.callback(b"alice")
        self.assertEqual(self.connector.targets, [])

    def test_brokenChecker(self) -> None:
        """
        A checker that fails unexpectedly gets the client a 500, and the
        failure is logged.
        """
        self.factory.portal = portalFromCheckers([BrokenChecker()])
        self.proxy.dataReceived(basicHead(b"alice:s3:cret"))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        # It counts as a failed login: errors must not be free guesses.
        self.assertEqual(self.factory.damper._failures["192.0.2.7"][1], 1)

    def test_successesAreNotFailures(self) -> None:
        """
        Successful logins neither count as failures nor stay counted as
        checks in flight: a client may log in any number of times.
        """
        for _ in range(5):
            proxy, client = self.connectClient()
            proxy.dataReceived(basicHead(b"alice:s3:cret"))
            self.assertEqual(client.value(), b"")
        self.assertEqual(len(self.connector.targets), 5)
        self.assertEqual(self.factory.damper._checking, {})
        self.assertEqual(self.factory.damper._failures, {})

    def test_avatarIsTheUser(self) -> None:
        """
        The user is the avatar the portal logged in, as the checker names it,
        not the name the client sent: the policy and the log get that one.
        """

        @implementer(ICredentialsChecker)
        class CanonicalChecker:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
                return succeed(b"alice@corp")

        users: list[str | None] = []

        class RecordingPolicy(TunnelPolicy):
            def checkTarget(self, avatar: Any, *args: Any) -> Any:
                users.append(avatar.name)
                return super().checkTarget(avatar, *args)

        self.factory.portal = portalFromCheckers([CanonicalChecker()])
        self.factory.policy = RecordingPolicy()
        self.proxy.dataReceived(basicHead(b"ALICE:pw"))
        target, _transport = self.reachTarget()
        self.closeBoth(target)
        self.assertEqual(users, ["alice@corp"])
        [event] = self.tunnelEvents()
        self.assertEqual(event["user"], "alice@corp")

    def test_clientLeavesDuringFailedLogin(self) -> None:
        """
        A client that leaves while its credentials are checked is not
        answered, whatever the check would have said (wrong credentials, or
        a checker's bug): the check is cancelled, and its late answer is
        dropped, unlogged.  It leaves no timer or count behind, but a
        failure for its address: leaving at once must not make guessing
        cheaper.
        """
        checker = PendingChecker()
        self.factory.portal = portalFromCheckers([checker])
        for failure in [UnauthorizedLogin(), ZeroDivisionError()]:
            proxy, client = self.connectClient()
            proxy.dataReceived(basicHead(b"alice:wrong"))
            proxy.connectionLost(Failure(ConnectionLost()))
            self.assertTrue(checker.pending[-1].called)
            checker.pending[-1].errback(failure)
            self.assertEqual(client.value(), b"", failure)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.proxy.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.lingeringRefusals, 0)
        self.assertEqual(self.factory.connections, set())
        self.assertEqual(self.factory.damper._checking, {})
        self.assertEqual(self.factory.damper._failures["192.0.2.7"][1], 2)

    def test_differentCredentialsCheckedApart(self) -> None:
        """
        Credentials that differ are never joined to the same check, even
        when user name and password run together the same.
        """
        checker = PendingChecker()
        self.factory.portal = portalFromCheckers([checker])
        for credentials in [b"alice:s3:cret", b"alices3::cret"]:
            proxy, _client = self.connectClient()
            proxy.dataReceived(basicHead(credentials))
        self.assertEqual(len(checker.pending), 2)

    def test_unhandledCredentials(self) -> None:
        """
        A portal that cannot check user names and passwords answers every
        request with a 407, not a 500.
        """
        checker = AllowAnonymousAccess()
        self.factory.portal = portalFromCheckers([checker])
        self.proxy.dataReceived(basicHead(b"alice:s3:cret"))
        self.assertChallenged()


@implementer(IProxyUser)
class TeamMember:
    """
    An avatar of an application's own realm: a name, and more.
    """

    def __init__(self, name: str, team: str) -> None:
        self.name = name
        self.team = team


@implementer(IRealm)
class RecordingRealm:
    """
    A realm that hands out L{TeamMember} avatars, or a given avatar, and
    records logins and logouts.

    @ivar events: C{login NAME} and C{logout NAME}, in order.
    """

    def __init__(self, avatar: object = None) -> None:
        self.avatar = avatar
        self.events: list[str] = []

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, object, Any]:
        """
        Give the avatar, and a logout that records itself.
        """
        assert isinstance(avatarId, bytes)
        name = avatarId.decode()
        self.events.append(f"login {name}")
        avatar = self.avatar if self.avatar is not None else TeamMember(name, "red")
        return IProxyUser, avatar, lambda: self.events.append(f"logout {name}")


class RealmTests(ProxyTestMixin, SynchronousTestCase):
    """
    What the application's realm gives: the avatar reaches the policy, and
    its logout is called when the connection ends.
    """

    def setUp(self) -> None:
        super().setUp()
        self.realm = RecordingRealm()
        self.checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
        self.factory.portal = Portal(self.realm, [self.checker])

    def test_avatarReachesPolicy(self) -> None:
        """
        The policy is given the realm's avatar itself, with whatever the
        realm put on it; the log event names the user by its C{name}.
        """
        seen: list[object] = []

        class TeamPolicy(TunnelPolicy):
            def checkTarget(self, avatar: Any, *args: Any) -> Any:
                seen.append(avatar)
                return super().checkTarget(avatar, *args)

            def checkAddress(self, avatar: Any, *args: Any) -> bool:
                seen.append(avatar)
                return bool(avatar.team == "red")

        self.factory.policy = TeamPolicy()
        self.proxy.dataReceived(basicHead(b"alice:pw"))
        self.assertTrue(self.connector.allowAddress(ipaddress.ip_address("1.2.3.4")))
        self.assertEqual(
            [(type(a), a.name, a.team) for a in seen],  # type: ignore[attr-defined]
            [(TeamMember, "alice", "red")] * 2,
        )
        target, _ = self.reachTarget()
        self.closeBoth(target)
        [event] = self.tunnelEvents()
        self.assertEqual(event["user"], "alice")

    def test_logoutWhenDone(self) -> None:
        """
        The realm's logout is called once, when the tunnel has ended and the
        connection is gone, not before.
        """
        self.proxy.dataReceived(basicHead(b"alice:pw"))
        target, _ = self.reachTarget()
        self.assertEqual(self.realm.events, ["login alice"])
        self.closeBoth(target)
        self.assertEqual(self.realm.events, ["login alice", "logout alice"])
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.realm.events, ["login alice", "logout alice"])

    def test_logoutAfterRefusal(self) -> None:
        """
        A user refused by the policy after logging in is logged out when the
        connection closes.
        """
        self.proxy.dataReceived(
            b"CONNECT target.example:22 HTTP/1.1\r\nHost: h\r\n"
            b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:pw") + b"\r\n\r\n"
        )
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 403 "))
        self.assertEqual(self.realm.events, ["login alice"])
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.realm.events, ["login alice", "logout alice"])

    def test_logoutClientLeftDuringLogin(self) -> None:
        """
        A client that left while its credentials were checked is never
        logged in: the check is cancelled, so the realm is not asked, even
        if the checker answers later.  A check that answers its
        cancellation with a success is logged out at once.
        """
        checker = PendingChecker()
        self.factory.portal = Portal(self.realm, [checker])
        self.proxy.dataReceived(basicHead(b"alice:pw"))
        self.proxy.connectionLost(Failure(ConnectionLost()))
        checker.pending[0].callback(b"alice")
        self.assertEqual(self.realm.events, [])

        @implementer(ICredentialsChecker)
        class Stubborn:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[Any]:
                return Deferred(lambda d: d.callback(b"bob"))

        self.factory.portal = Portal(self.realm, [Stubborn()])
        proxy, _ = self.connectClient()
        proxy.dataReceived(basicHead(b"bob:pw"))
        proxy.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.realm.events, ["login bob", "logout bob"])
        self.assertEqual(self.connector.targets, [])

    def test_leftWhileOthersWaited(self) -> None:
        """
        A client that left a check another connection still waits for is
        not answered, reaches no target, logs out its share of a success,
        and is counted by the check's real outcome: a valid user's
        abandoned connections are not failed guesses.
        """
        checker = PendingChecker()
        self.factory.portal = Portal(self.realm, [checker])
        self.proxy.dataReceived(basicHead(b"alice:pw"))
        for _ in range(9):
            proxy, client = self.connectClient()
            proxy.dataReceived(basicHead(b"alice:pw"))
            proxy.connectionLost(Failure(ConnectionLost()))
            self.assertEqual(client.value(), b"")
        [pending] = checker.pending
        pending.callback(b"alice")
        self.assertEqual(self.factory.damper._failures, {})
        self.assertEqual(len(self.connector.targets), 1)
        self.assertEqual(self.realm.events, ["login alice"])
        self.proxy.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.realm.events, ["login alice", "logout alice"])

    def test_asyncRealmLoggedOutWhenClientLeft(self) -> None:
        """
        A realm that answers after the client left is not cancelled: its
        avatar is logged out when it comes.
        """
        answer: Deferred[Any] = Deferred()
        checker = PendingChecker()
        self.factory.portal = Portal(self.realm, [checker])
        self.patch(self.realm, "requestAvatar", lambda *args: answer)
        self.proxy.dataReceived(basicHead(b"alice:pw"))
        checker.pending[0].callback(b"alice")
        self.proxy.connectionLost(Failure(ConnectionLost()))
        answer.callback(
            (
                IProxyUser,
                TeamMember("alice", "red"),
                lambda: self.realm.events.append("out"),
            )
        )
        self.assertEqual(self.realm.events, ["out"])
        self.assertEqual(self.connector.targets, [])

    def test_checkersOwnCancellation(self) -> None:
        """
        A checker that fails with L{CancelledError} of its own while the
        client waits is a checker's failure like any: logged, and answered
        with a 500.
        """

        @implementer(ICredentialsChecker)
        class SelfCancelling:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                d.cancel()
                return d

        self.factory.portal = Portal(self.realm, [SelfCancelling()])
        self.proxy.dataReceived(basicHead(b"alice:pw"))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len(self.flushLoggedErrors(CancelledError)), 1)

    def test_sharedLoginLogsOutOnce(self) -> None:
        """
        Connections that joined one login (the same credentials at once)
        share its avatar; its logout is called once, when the last of them
        is gone.
        """
        checker = PendingChecker()
        self.factory.portal = Portal(self.realm, [checker])
        first, _ = self.connectClient()
        second, _ = self.connectClient()
        first.dataReceived(basicHead(b"alice:pw"))
        second.dataReceived(basicHead(b"alice:pw"))
        checker.pending[0].callback(b"alice")
        self.assertEqual(self.realm.events, ["login alice"])
        self.assertEqual(len(self.connector.targets), 2)
        first.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.realm.events, ["login alice"])
        second.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.realm.events, ["login alice", "logout alice"])

    def test_sharedLoginUnusableResult(self) -> None:
        """
        A realm result the proxy cannot use (no logout) gets every
        connection that shared the login a 500 at once, as it does a lone
        login.
        """

        @implementer(IRealm)
        class TwoTupleRealm:
            def requestAvatar(self, *args: Any) -> Any:
                return (IProxyUser, TeamMember("alice", "red"))

        checker = PendingChecker()
        self.factory.portal = Portal(TwoTupleRealm(), [checker])
        clients = []
        for _ in range(2):
            proxy, client = self.connectClient()
            proxy.dataReceived(basicHead(b"alice:pw"))
            clients.append(client)
        checker.pending[0].callback(b"alice")
        self.assertTrue(all(c.value().startswith(b"HTTP/1.1 500 ") for c in clients))
        # Logged for each connection, with its client's address.
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_defaultRealmKeepsAvatarOnly(self) -> None:
        """
        With the default realm, whose logout does nothing, an open tunnel
        keeps only its avatar (what thousands of idle tunnels hold).
        """
        self.factory.portal = portalFromCheckers([self.checker])
        self.establish(basicHead(b"alice:pw"))
        self.assertIs(self.proxy._login, self.proxy.avatar)
        self.assertEqual(self.proxy.avatar, ProxyUser("alice"))

    def test_brokenAvatar(self) -> None:
        """
        An avatar the proxy cannot use (here without a C{name}) gets the
        client a 500 at once, not a wait for the connect timeout, and the
        error is logged.
        """

        class Nameless:
            pass

        self.realm.avatar = Nameless()
        self.proxy.dataReceived(basicHead(b"alice:pw"))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual(self.connector.targets, [])

    def test_bytesName(self) -> None:
        """
        An avatar whose C{name} is bytes (twisted.cred's avatar ID, passed on
        undecoded) gets the client a 500 at the login, with the reason
        logged, where it used to get a tunnel whose end failed and was
        never recorded nor forgotten: the connection is forgotten once
        closed, and the realm's logout runs.
        """
        self.realm.avatar = TeamMember(b"alice", "red")  # type: ignore[arg-type]
        self.proxy.dataReceived(basicHead(b"alice:pw"))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(self.connector.targets, [])
        [failure] = self.flushLoggedErrors(TypeError)
        self.assertIn("IProxyUser.name must be a str", str(failure.value))
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.connections, set())
        self.assertEqual(self.realm.events, ["login alice", "logout alice"])
        [event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["user"]), (500, "alice"))


class BrokenPolicyTests(ProxyTestMixin, SynchronousTestCase):
    """
    A policy of the application's that raises gets the client a 500 at
    once, and the error is logged.
    """

    def brokenPolicy(self, method: str) -> None:
        """
        Make the factory's policy the default one, but for C{method}, which
        raises L{KeyError}.
        """

        def broken(self: object, *args: object) -> Any:
            raise KeyError("no such rule")

        self.factory.policy = type("BrokenPolicy", (TunnelPolicy,), {method: broken})()

    def test_checkTarget(self) -> None:
        """
        C{checkTarget} raising: a 500, logged.
        """
        self.brokenPolicy("checkTarget")
        self.proxy.dataReceived(HEAD)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertAnswered(self.client)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(self.connector.targets, [])

    def test_addressDenial(self) -> None:
        """
        C{addressDenial} raising (when the connector found no allowed
        address): a 500 at once, logged; no later answer.
        """
        self.brokenPolicy("addressDenial")
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(AddressDenied())
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.clock.advance(60)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 "), 1)

    def realConnector(self) -> None:
        """
        Use the default connector, over a resolver that knows
        C{target.example} (no DNS), and a policy whose C{checkAddress}
        raises.
        """
        self.factory.connector = HostnameConnector(
            self.clock,
            resolver=FakeResolver({"target.example": ["127.0.0.5"]}),
            timeout=None,
        )
        self.brokenPolicy("checkAddress")

    def test_checkAddressLiteral(self) -> None:
        """
        C{checkAddress} raising for an address literal: a 500, logged, and
        no connection attempt.
        """
        self.realConnector()
        self.proxy.dataReceived(
            b"CONNECT 127.0.0.5:443 HTTP/1.1\r\nHost: 127.0.0.5:443\r\n\r\n"
        )
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(self.clock.tcpClients, [])
        self.clock.advance(60)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 "), 1)

    def test_checkAddressResolvedNotABool(self) -> None:
        """
        A C{checkAddress} that answers a name's resolved address with
        something other than C{True} or C{False} (a L{Denial}, which is
        true) gets the client a 500, logged, and no connection attempt.
        """

        self.realConnector()
        self.factory.policy = DenialForAddress()
        self.proxy.dataReceived(HEAD)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        [failure] = self.flushLoggedErrors(TypeError)
        self.assertIn("must give True or False", str(failure.value))
        self.assertEqual(self.clock.tcpClients, [])
        self.clock.advance(60)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 "), 1)

    def test_checkAddressResolved(self) -> None:
        """
        C{checkAddress} raising for an address a name resolved to: a 500 at
        once (not a wait for the connect timeout), logged, and no
        connection attempt.
        """
        self.realConnector()
        self.proxy.dataReceived(HEAD)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(self.clock.tcpClients, [])

    def test_checkClient(self) -> None:
        """
        C{checkClient} raising: a 500 as soon as the client connects,
        logged.
        """
        self.brokenPolicy("checkClient")
        proxy, client = self.connectClient()
        self.assertTrue(client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        proxy.dataReceived(HEAD)
        self.assertEqual(self.connector.targets, [])


class PolicyTests(ProxyTestMixin, SynchronousTestCase):
    """
    The destination policy as the client sees it.
    """

    def deniedWith(self, denial: Any, where: str = "checkTarget") -> bytes:
        """
        Make the policy answer C{denial} from C{where}; give what the client
        gets for L{HEAD}.
        """

        def deny(self: object, *args: object) -> Any:
            return denial

        self.factory.policy = type("Denying", (TunnelPolicy,), {where: deny})()
        proxy, client = self.connectClient()
        proxy.dataReceived(HEAD)
        if where == "addressDenial":
            self.connector.endpoint.attempts[-1][1].errback(AddressDenied())
        self.assertAnswered(client)
        response: bytes = client.value()
        return response

    def test_refusalDated(self) -> None:
        """
        The proxy's own error answers carry a C{Date} from the factory's
        clock (RFC 9110 section 6.6.1); the C{200} stays exactly as it is.
        """
        self.clock.advance(86400 * 365)
        response = self.deniedWith(Denial(403, "No.", "rule"))
        self.assertIn(b"\r\nDate: Fri, 01 Jan 1971 00:00:00 GMT\r\n", response)

    def test_denialHeaders(self) -> None:
        """
        A policy's L{Denial} may carry header fields, which the answer
        carries; its status has its registered reason phrase, and a detail
        ending with a newline does not get a second one.
        """
        for where in ["checkClient", "checkTarget", "addressDenial"]:
            response = self.deniedWith(
                Denial(451, "Not here.\n", "legal", ((b"Retry-After", b"60"),)),
                where,
            )
            head, _, body = response.partition(b"\r\n\r\n")
            self.assertTrue(
                head.startswith(b"HTTP/1.1 451 Unavailable For Legal Reasons\r\n"),
                where,
            )
            self.assertIn(b"\r\nRetry-After: 60", head)
            self.assertEqual(body, b"Not here.\n")

    def test_denial407Challenges(self) -> None:
        """
        A policy's 407 (log in to go there) carries the proxy's own
        C{Proxy-Authenticate} challenge, unless the denial brings one.
        """
        response = self.deniedWith(Denial(407, "Log in first.", "login"))
        self.assertIn(b'\r\nProxy-Authenticate: Basic realm="tunnel"', response)
        response = self.deniedWith(
            Denial(407, "Log in.", "login", ((b"Proxy-Authenticate", b"Other"),))
        )
        self.assertEqual(response.count(b"Proxy-Authenticate"), 1)
        self.assertIn(b"Proxy-Authenticate: Other", response)

    def test_notADenial(self) -> None:
        """
        A policy that answers something other than a L{Denial} gets the
        client a 500, and the error is logged: no traceback out of the
        protocol, no tunnel.
        """
        for where in ["checkClient", "checkTarget", "addressDenial"]:
            response = self.deniedWith(("403", "no"), where)
            self.assertTrue(response.startswith(b"HTTP/1.1 500 "), response)
            [failure] = self.flushLoggedErrors(TypeError)
            self.assertIn("it must give a Denial", str(failure.value))
            # addressDenial only ever refuses: None allows nothing there.
            self.assertEqual(
                "or None to allow" in str(failure.value), where != "addressDenial"
            )
        self.assertEqual(self.connector.targets, [("target.example", 443)])

    def test_addressAnswerNotABool(self) -> None:
        """
        A C{checkAddress} that answers something other than C{True} or
        C{False} (here a L{Denial}, which is true) gets the client a 500,
        not a tunnel to the address it meant to refuse.
        """

        self.factory.policy = DenialForAddress()
        self.proxy.dataReceived(b"CONNECT 198.51.100.1:443 HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        [failure] = self.flushLoggedErrors(TypeError)
        self.assertIn("must give True or False", str(failure.value))
        self.assertEqual(self.connector.targets, [])

    def test_literalVettedWhateverConnector(self) -> None:
        """
        An address literal is vetted by the policy before the connector is
        asked, so a connector of the application's that ignores
        C{allowAddress} (this test's records it and connects anywhere)
        cannot open the addresses the default policy refuses.
        """
        for address in [b"127.0.0.1", b"169.254.169.254", b"[::1]", b"10.0.0.1"]:
            proxy, client = self.connectClient()
            proxy.dataReceived(
                b"CONNECT " + address + b":443 HTTP/1.1\r\nHost: h\r\n\r\n"
            )
            self.assertTrue(client.value().startswith(b"HTTP/1.1 403 "), address)
            self.assertIn(b"--allow-to", client.value())
        self.assertEqual(self.connector.targets, [])

    def test_literalVettedOnce(self) -> None:
        """
        An allowed address literal is checked once: the connector's
        C{allowAddress} answers yes for it without asking the policy again,
        and still asks it about any other address.
        """
        asked: list[object] = []

        class Counting(TunnelPolicy):
            def checkAddress(self, *args: Any) -> bool:
                asked.append(args[-1])
                return True

        self.factory.policy = Counting()
        self.proxy.dataReceived(b"CONNECT 198.51.100.1:443 HTTP/1.1\r\nHost: h\r\n\r\n")
        literal = ipaddress.ip_address("198.51.100.1")
        self.assertEqual(asked, [literal])
        self.assertEqual(self.connector.targets, [("198.51.100.1", 443)])
        self.assertTrue(self.connector.allowAddress(literal))
        self.assertEqual(asked, [literal])
        other = ipaddress.ip_address("198.51.100.2")
        self.assertTrue(self.connector.allowAddress(other))
        self.assertEqual(asked, [literal, other])

    def assertForbidden(self, client: HalfCloseTransport, phrase: bytes) -> None:
        """
        Assert that C{client} got a 403 whose body holds C{phrase}.
        """
        response = client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 403 "), response)
        self.assertIn(phrase, response)
        self.assertAnswered(client)

    def test_port(self) -> None:
        """
        A port that is not allowed gets a 403 naming C{--allow-port}, with
        no connection attempt.
        """
        self.proxy.dataReceived(
            b"CONNECT target.example:22 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.assertForbidden(self.client, b"--allow-port 22")
        self.assertEqual(self.connector.targets, [])

    def test_addressesDenied(self) -> None:
        """
        When the connector finds no allowed address, the client gets a 403
        naming C{--allow-to}.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(AddressDenied())
        self.assertForbidden(self.client, b"--allow-to")

    def test_allowAddress(self) -> None:
        """
        The connector is handed the policy's address check for this tunnel.
        """
        self.proxy.dataReceived(HEAD)
        allow = self.connector.allowAddress
        self.assertFalse(allow(ipaddress.ip_address("10.0.0.1")))
        self.assertTrue(allow(ipaddress.ip_address("93.184.216.34")))

    def test_allowFrom(self) -> None:
        """
        A client outside C{--allow-from} gets a 403 as soon as it connects.
        """
        self.factory.policy = TunnelPolicy.fromStrings(allowFrom=["198.51.100.0/24"])
        proxy, client = self.connectClient()
        self.assertForbidden(client, b"--allow-from")
        proxy.dataReceived(HEAD)
        self.assertEqual(self.connector.targets, [])

    def test_allowFromLogged(self) -> None:
        """
        A client refused by C{--allow-from} is logged as refused by the
        client rule.
        """
        self.factory.policy = TunnelPolicy.fromStrings(allowFrom=["198.51.100.0/24"])
        proxy, _client = self.connectClient()
        proxy.connectionLost(Failure(ConnectionDone()))
        [event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["refusal"]), (403, "client"))
        self.assertTrue(event["line"].endswith(" refused (client)"), event["line"])

    def test_addressesDeniedLogged(self) -> None:
        """
        A tunnel refused because no address was allowed is logged as refused
        by the address rules.
        """
        self.proxy.dataReceived(HEAD)
        self.connector.endpoint.attempts[0][1].errback(AddressDenied())
        self.proxy.connectionLost(Failure(ConnectionDone()))
        [event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["refusal"]), (403, "address"))

    def test_policyAskedAboutThisTunnel(self) -> None:
        """
        The policy is asked about the client's address (an IPv6 zone left
        out), then the target, then each address the target resolves to, for
        this client; the denial of every address is asked for this target
        and port.
        """
        asked: list[tuple[str, tuple[Any, ...]]] = []
        self.factory.policy = recordingPolicy(asked, ports=(PortRange(1, 65535),))
        proxy = self.factory.buildProtocol(None)
        assert proxy is not None
        proxy.makeConnection(
            HalfCloseTransport(peerAddress=IPv6Address("TCP", "fe80::1%eth0", 1))
        )
        proxy.dataReceived(b"CONNECT target.example:8443 HTTP/1.1\r\nHost: h\r\n\r\n")
        public = ipaddress.ip_address("93.184.216.34")
        self.assertTrue(self.connector.allowAddress(public))
        self.connector.endpoint.attempts[-1][1].errback(AddressDenied())
        client = ipaddress.ip_address("fe80::1")
        self.assertEqual(
            asked,
            [
                ("checkClient", (client,)),
                ("checkTarget", (None, client, "target.example", 8443)),
                ("checkAddress", (None, client, "target.example", 8443, public)),
                ("addressDenial", ("target.example", 8443)),
            ],
        )


class LimitTests(ProxyTestMixin, SynchronousTestCase):
    """
    C{maxTunnels} and C{maxTunnelsPerClient}.
    """

    def test_maxTunnels(self) -> None:
        """
        Beyond C{maxTunnels} connections (handshakes included) new clients
        get a 503 with Retry-After; open tunnels are untouched, and a closed
        one frees its place.
        """
        self.factory.maxTunnels = 2
        _target, transport = self.establish()
        second, _secondClient = self.connectClient()
        third, thirdClient = self.connectClient()
        self.assertTrue(thirdClient.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"\r\nRetry-After: 1\r\n", thirdClient.value())
        self.assertEqual(self.tunnelEvents()[-1]["limit"], "max-tunnels")
        third.connectionLost(Failure(ConnectionDone()))
        self.proxy.dataReceived(b"still works")
        self.assertEqual(transport.value(), b"still works")
        second.connectionLost(Failure(ConnectionDone()))
        _fourth, fourthClient = self.connectClient()
        self.assertEqual(fourthClient.value(), b"")
        self.assertFalse(fourthClient.disconnecting)

    def test_lingeringRefusalsBounded(self) -> None:
        """
        Connections refused before they were counted (over a limit) linger
        to deliver their answer only up to C{maxLingeringRefusals} at once;
        beyond, the answer is written and the connection closed at once, so
        refused clients cannot hold descriptors beyond the limits.
        """
        self.factory.maxTunnels = 1
        self.factory.maxLingeringRefusals = 1
        second, secondClient = self.connectClient()
        self.assertTrue(secondClient.value().startswith(b"HTTP/1.1 503 "))
        self.assertTrue(secondClient.writeClosed)
        self.assertFalse(secondClient.disconnecting)
        third, thirdClient = self.connectClient()
        self.assertTrue(thirdClient.value().startswith(b"HTTP/1.1 503 "))
        self.assertTrue(thirdClient.disconnecting)
        self.assertEqual(self.factory.lingeringRefusals, 1)
        third.connectionLost(Failure(ConnectionDone()))
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.lingeringRefusals, 0)
        _fourth, fourthClient = self.connectClient()
        self.assertTrue(fourthClient.writeClosed)
        self.assertFalse(fourthClient.disconnecting)

    def test_maxTunnelsPerClient(self) -> None:
        """
        Beyond C{maxTunnelsPerClient} connections from one address, that
        address gets a 429; other addresses do not.
        """
        self.factory.maxTunnelsPerClient = 1
        _second, secondClient = self.connectClient()
        self.assertTrue(secondClient.value().startswith(b"HTTP/1.1 429 "))
        self.assertEqual(self.tunnelEvents()[-1]["limit"], "max-tunnels-per-client")
        other = self.factory.buildProtocol(None)
        assert other is not None
        otherClient = HalfCloseTransport(
            peerAddress=IPv4Address("TCP", "192.0.2.99", 1)
        )
        other.makeConnection(otherClient)
        self.assertEqual(otherClient.value(), b"")
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory._openPerClient, {"192.0.2.99": 1})

    def test_ipv4MappedClientsByAddress(self) -> None:
        """
        A client an IPv6 socket reports as IPv4-mapped is counted under its
        IPv4 address, each on its own: the same as over IPv4.
        """
        self.factory.maxTunnelsPerClient = 1
        clients = []
        for host in ["::ffff:192.0.2.7", "::ffff:192.0.2.8"]:
            proxy = self.factory.buildProtocol(None)
            assert proxy is not None
            client = HalfCloseTransport(peerAddress=IPv6Address("TCP", host, 1))
            proxy.makeConnection(client)
            clients.append(client)
        self.assertTrue(clients[0].value().startswith(b"HTTP/1.1 429 "))
        self.assertEqual(clients[1].value(), b"")
        self.assertEqual(self.factory._openPerClient, {"192.0.2.7": 1, "192.0.2.8": 1})

    def test_fullBeforeAllowFrom(self) -> None:
        """
        A full proxy answers 503 before it asks the policy about the client.
        """
        self.factory.maxTunnels = 1
        self.factory.policy = TunnelPolicy.fromStrings(allowFrom=["198.51.100.0/24"])
        _proxy, client = self.connectClient()
        self.assertTrue(client.value().startswith(b"HTTP/1.1 503 "))

    def test_lingerCountOnlyForRefusals(self) -> None:
        """
        Only refusals before admission count as lingering refusals: admitted
        connections, answered or relayed, leave the count at 0 when closed.
        """
        target, _transport = self.establish()
        self.closeBoth(target)
        proxy, _client = self.connectClient()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.lingeringRefusals, 0)

    def test_admittedClientAlwaysLingers(self) -> None:
        """
        An admitted client (counted against the limits) lingers after its
        error answer however many refused ones linger.
        """
        self.factory.maxLingeringRefusals = 0
        self.proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(self.client.writeClosed)
        self.assertFalse(self.client.disconnecting)

    def test_perClientCountFollowsCloses(self) -> None:
        """
        A client's count goes down as its connections close, so that it may
        open new ones up to its limit again.
        """
        self.factory.maxTunnelsPerClient = 3
        second, _ = self.connectClient()
        third, _ = self.connectClient()
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory._openPerClient, {"192.0.2.7": 2})
        fourth, fourthClient = self.connectClient()
        self.assertEqual(fourthClient.value(), b"")
        third.connectionLost(Failure(ConnectionDone()))
        self.proxy.connectionLost(Failure(ConnectionDone()))
        fourth.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory._openPerClient, {})


class PartialHeadTests(ProxyTestMixin, SynchronousTestCase):
    """
    C{maxPartialHeadBytesPerClient}: the bytes of request heads begun and
    not ended that the connections of one address make the proxy hold.
    """

    def otherClient(self) -> tuple[ConnectProxy, HalfCloseTransport]:
        """
        Connect a client from another address than L{connectClient}'s.
        """
        proxy = self.factory.buildProtocol(None)
        assert isinstance(proxy, ConnectProxy)
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "192.0.2.99", 1))
        proxy.makeConnection(client)
        return proxy, client

    def test_default(self) -> None:
        """
        By default one address may make the proxy hold 16 MiB of partial
        heads.
        """
        self.assertEqual(self.factory.maxPartialHeadBytesPerClient, 16 << 20)
        self.assertEqual(MAX_PARTIAL_HEAD_BYTES_PER_CLIENT, 16 << 20)

    def test_partialHeadsBounded(self) -> None:
        """
        The connection whose partial head would take its address beyond
        C{maxPartialHeadBytesPerClient} gets a 429 with Retry-After, whether
        its head begins or grows; another address's partial heads are not
        refused, nor are heads of the same address that arrive whole.
        """
        self.factory.maxPartialHeadBytesPerClient = 45
        # 37 bytes, then 7: 44.
        self.proxy.dataReceived(b"CONNECT target.example:443 HTTP/1.1\r\n")
        second, secondClient = self.connectClient()
        second.dataReceived(b"CONNECT")
        third, thirdClient = self.connectClient()
        self.assertEqual(thirdClient.value(), b"")
        third.dataReceived(b"CONNECT")
        self.assertTrue(thirdClient.value().startswith(b"HTTP/1.1 429 "))
        self.assertIn(b"\r\nRetry-After: 1\r\n", thirdClient.value())
        self.assertIn(b"Too many unfinished requests", thirdClient.value())
        self.assertEqual(self.tunnelEvents()[-1]["limit"], "partial-head-bytes")
        self.assertEqual(secondClient.value(), b"")
        second.dataReceived(b" target.example:443")
        self.assertTrue(secondClient.value().startswith(b"HTTP/1.1 429 "))
        other, otherClient = self.otherClient()
        other.dataReceived(b"CONNECT target.example:443 HTTP/1.1\r\n")
        self.assertEqual(otherClient.value(), b"")
        whole, wholeClient = self.connectClient()
        whole.dataReceived(HEAD)
        self.assertEqual(wholeClient.value(), b"")
        self.assertEqual(len(self.connector.targets), 1)
        self.assertEqual(
            self.factory._partialHeadBytes, {"192.0.2.7": 37, "192.0.2.99": 37}
        )

    def test_countEndsWithTheHead(self) -> None:
        """
        A partial head's bytes stop counting once it is whole, once its
        connection closes, or once it is refused, so that the address may
        send others.
        """
        self.factory.maxPartialHeadBytesPerClient = 40
        self.proxy.dataReceived(b"CONNECT target.example:443 HTTP/1.1\r\n")
        self.proxy.dataReceived(b"Host: target.example:443\r\n\r\n")
        self.assertEqual(len(self.connector.targets), 1)
        self.assertEqual(self.factory._partialHeadBytes, {})
        second, _secondClient = self.connectClient()
        second.dataReceived(b"CONNECT target.example:443 HTTP/1.1\r\n")
        third, thirdClient = self.connectClient()
        third.dataReceived(b"CONNECT")
        self.assertTrue(thirdClient.value().startswith(b"HTTP/1.1 429 "))
        third.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory._partialHeadBytes, {"192.0.2.7": 37})
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory._partialHeadBytes, {})
        fourth, fourthClient = self.connectClient()
        fourth.dataReceived(b"CONNECT")
        self.assertEqual(fourthClient.value(), b"")
        fourth.dataReceived(b"\rX")
        self.assertTrue(fourthClient.value().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(self.factory._partialHeadBytes, {})

    def test_headRequestRefusedWithoutContent(self) -> None:
        """
        The 429 for a partial C{HEAD} head has no content (RFC 9110 section
        9.3.2).
        """
        self.factory.maxPartialHeadBytesPerClient = 10
        self.proxy.dataReceived(b"HEAD / HTTP/1.1\r\n")
        response = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 429 "))
        self.assertTrue(response.endswith(b"\r\n\r\n"), response)

    def test_noLimit(self) -> None:
        """
        With C{maxPartialHeadBytesPerClient=None}, partial heads are counted
        but never refused.
        """
        self.factory.maxPartialHeadBytesPerClient = None
        clients = []
        for _ in range(3):
            proxy, client = self.connectClient()
            proxy.dataReceived(b"CONNECT target.example:443 HTTP/1.1\r\n")
            clients.append(client)
        self.assertEqual([c.value() for c in clients], [b""] * 3)
        self.assertEqual(self.factory._partialHeadBytes, {"192.0.2.7": 111})


class ProxyProtocolTests(ProxyTestMixin, SynchronousTestCase):
    """
    Connections that start with a PROXY protocol header.
    """

    def setUp(self) -> None:
        super().setUp()
        # Replace the connection the mixin made with one that expects a
        # PROXY header.
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.events._events.clear()
        self.factory.proxyProtocol = True
        self.factory.maxTunnelsPerClient = 1
        self.proxy, self.client = self.connectClient()

    def test_sourceIsTheClient(self) -> None:
        """
        The header's source address is the client's in the log event and
        for the limits; the request after it is served.
        """
        self.proxy.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 3128\r\n")
        self.proxy.dataReceived(HEAD)
        self.assertEqual(self.connector.targets, [("target.example", 443)])
        self.assertEqual(self.factory._openPerClient, {"198.51.100.9": 1})
        self.proxy.connectionLost(Failure(ConnectionLost()))
        [event] = self.tunnelEvents()
        self.assertEqual(event["client"], "198.51.100.9:5555")

    def test_headerAndRequestTogether(self) -> None:
        """
        The header and the request may arrive in one piece, and the header
        may arrive in pieces.
        """
        data = b"PROXY TCP6 2001:db8::9 2001:db8::1 5555 3128\r\n" + HEAD
        self.proxy.dataReceived(data[:10])
        self.proxy.dataReceived(data[10:])
        self.assertEqual(self.connector.targets, [("target.example", 443)])

    def test_onlyFromBalancers(self) -> None:
        """
        With C{proxyProtocolFrom}, a connection from outside those networks
        gets a 403 at once, before any header is read, logged as refused by
        the C{balancer} rule; one from inside (an IPv4 balancer seen as
        IPv4-mapped by a dual-stack socket included) is served, and so is a
        client of a UNIX listener.
        """
        self.factory = ConnectProxyFactory(
            self.connector,
            clock=self.clock,
            proxyProtocol=True,
            proxyProtocolFrom=["192.0.2.0/28", "2001:db8::/64"],
        )
        self.factory.logTunnels = True
        for peer, refused in [
            (IPv4Address("TCP", "192.0.2.99", 1), True),
            (IPv4Address("TCP", "192.0.2.7", 1), False),
            (IPv6Address("TCP", "::ffff:192.0.2.7", 1), False),
            (IPv6Address("TCP", "2001:db8::5", 1), False),
            (IPv6Address("TCP", "2001:db8:1::5", 1), True),
            (UNIXAddress(b"/run/balancer.sock"), False),
        ]:
            proxy = self.factory.buildProtocol(None)
            assert isinstance(proxy, ConnectProxy)
            client = HalfCloseTransport(peerAddress=peer)
            proxy.makeConnection(client)
            if refused:
                self.assertTrue(client.value().startswith(b"HTTP/1.1 403 "), peer)
                self.assertIn(b"--proxy-protocol-from", client.value())
                self.assertEqual(proxy._refusal, "balancer")
            else:
                self.assertEqual(client.value(), b"", peer)
                proxy.dataReceived(
                    b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 3128\r\n" + HEAD
                )
                self.assertEqual(self.connector.targets[-1], ("target.example", 443))

    def test_allowFromUsesSource(self) -> None:
        """
        C{--allow-from} judges the header's source, not the balancer.
        """
        self.factory.policy = TunnelPolicy.fromStrings(allowFrom=["203.0.113.0/24"])
        self.proxy.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 3128\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 403 "))
        proxy, client = self.connectClient()
        proxy.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 3128\r\n")
        self.assertEqual(client.value(), b"")

    def test_missingHeader(self) -> None:
        """
        A connection that does not start with a valid header gets a 400 and
        is closed.
        """
        self.proxy.dataReceived(HEAD)
        response = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 400 "), response)
        self.assertIn(b"PROXY protocol", response)
        self.assertAnswered(self.client)
        self.assertEqual(self.connector.targets, [])

    def test_localHeader(self) -> None:
        """
        A v2 LOCAL header (a balancer's health check) counts as the
        balancer's own connection.
        """
        local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])
        self.proxy.dataReceived(local + HEAD)
        self.assertEqual(self.connector.targets, [("target.example", 443)])
        self.assertEqual(self.factory._openPerClient, {"192.0.2.7": 1})

    def test_waitingForHeaderCounts(self) -> None:
        """
        Connections still waiting for their PROXY header count against the
        proxy-wide limit, so silent connections cannot pile up.
        """
        self.factory.maxTunnels = 2
        second, _secondClient = self.connectClient()
        _third, thirdClient = self.connectClient()
        self.assertTrue(thirdClient.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(self.factory.awaitingHeader, 2)
        second.connectionLost(Failure(ConnectionDone()))
        self.proxy.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 3128\r\n")
        self.assertEqual(self.factory.awaitingHeader, 0)
        self.assertEqual(self.factory._open, 1)

    def test_ipv6ClientsByNetwork(self) -> None:
        """
        IPv6 clients are counted (limits, failed logins) by their /64.
        """
        self.proxy.dataReceived(b"PROXY TCP6 2001:db8:1:2::9 2001:db8::1 5555 3128\r\n")
        proxy, client = self.connectClient()
        proxy.dataReceived(b"PROXY TCP6 2001:db8:1:2::77 2001:db8::1 5555 3128\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 429 "))
        self.assertEqual(self.factory._openPerClient, {"2001:db8:1:2::/64": 1})

    def test_headerTimeout(self) -> None:
        """
        The header timeout covers the PROXY header too.
        """
        self.proxy.dataReceived(b"PROXY TCP4 ")
        self.clock.advance(10)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 408 "))

    def test_refusedHeaderAndRequestTogether(self) -> None:
        """
        A request that arrives with a header whose source C{--allow-from}
        refuses is never served.
        """
        self.factory.policy = TunnelPolicy.fromStrings(allowFrom=["203.0.113.0/24"])
        self.proxy.dataReceived(
            b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 3128\r\n" + HEAD
        )
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 403 "))
        self.assertEqual(self.connector.targets, [])

    def test_awaitingHeaderAfterClose(self) -> None:
        """
        A connection stops counting as waiting for its header once, when
        the header arrives or when it closes first.
        """
        self.proxy.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 3128\r\n")
        self.assertEqual(self.factory.awaitingHeader, 0)
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.awaitingHeader, 0)
        proxy, _client = self.connectClient()
        self.assertEqual(self.factory.awaitingHeader, 1)
        proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.awaitingHeader, 0)


class FactoryArgumentTests(SynchronousTestCase):
    """
    What L{ConnectProxyFactory} refuses when it is built, rather than fail
    on every request.
    """

    def test_wrongSeams(self) -> None:
        """
        A connector or policy that does not provide its interface, a portal
        without C{login} (a checker, say) and a realm that is not the
        challenge's text (a twisted.cred realm, say) are L{TypeError}s that
        name the mistake.  A policy given where the connector goes, its
        one positional place, is one of them.
        """
        clock = MemoryReactorClock()
        policy = TunnelPolicy()
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"connector": policy}, "connector must provide ITargetConnector"),
            ({"policy": RecordingConnector()}, "policy must provide ITunnelPolicy"),
            ({"portal": checker}, "portal must be a twisted.cred Portal"),
            ({"realm": RecordingRealm()}, "a twisted.cred IRealm goes into"),
        ]
        for arguments, message in cases:
            error = self.assertRaises(
                TypeError, ConnectProxyFactory, reactor=clock, **arguments
            )
            self.assertIn(message, str(error))
        error = self.assertRaises(TypeError, ConnectProxyFactory, policy, reactor=clock)
        self.assertIn("connector must provide ITargetConnector", str(error))

    def test_halfASeam(self) -> None:
        """
        A policy that declares L{ITunnelPolicy} but lacks some of its
        methods is a L{TypeError} naming one, not a 500 at every request.
        """

        @implementer(ITunnelPolicy)
        class OnlyTarget:  # type: ignore[misc]
            def checkTarget(self, *args: object) -> None:
                """
                Allow.
                """

        error = self.assertRaises(
            TypeError,
            ConnectProxyFactory,
            reactor=MemoryReactorClock(),
            policy=OnlyTarget(),
        )
        self.assertIn("policy does not implement ITunnelPolicy", str(error))
        self.assertIn("checkClient", str(error))

    def test_numbers(self) -> None:
        """
        Timeouts, sizes and counts that are not numbers are L{TypeError}s,
        and those out of range L{ValueError}s, when the factory is built.
        """
        clock = MemoryReactorClock()
        cases: list[tuple[dict[str, Any], type[Exception]]] = [
            ({"headerTimeout": 0}, ValueError),
            ({"headerTimeout": -1}, ValueError),
            ({"headerTimeout": None}, TypeError),
            ({"connectTimeout": 0}, ValueError),
            ({"idleTimeout": -5}, ValueError),
            ({"idleTimeout": "600"}, TypeError),
            ({"headerTimeout": float("nan")}, ValueError),
            ({"connectTimeout": float("inf")}, ValueError),
            ({"idleTimeout": float("nan")}, ValueError),
            ({"maxRequestLine": 0}, ValueError),
            ({"maxHeaderSize": "64k"}, TypeError),
            ({"maxHeaderSize": 65536.0}, TypeError),
            ({"maxEarlyData": -1}, ValueError),
            ({"maxTunnels": 0}, ValueError),
            ({"maxTunnelsPerClient": True}, TypeError),
            ({"maxPartialHeadBytesPerClient": 0}, ValueError),
            ({"proxyProtocolFrom": "10.0.0.0/8"}, TypeError),
        ]
        for arguments, error in cases:
            self.assertRaises(error, ConnectProxyFactory, reactor=clock, **arguments)
        factory = ConnectProxyFactory(
            reactor=clock,
            headerTimeout=0.5,
            connectTimeout=None,
            idleTimeout=0,
            maxEarlyData=0,
            maxTunnels=None,
            maxPartialHeadBytesPerClient=None,
        )
        self.assertIsNone(factory.idleTimeout)

    def test_rightSeams(self) -> None:
        """
        What provides the interfaces, a L{Portal} and a string realm are
        taken as they are.
        """
        clock = MemoryReactorClock()
        connector, policy = RecordingConnector(), TunnelPolicy()
        portal = Portal(RecordingRealm(), [])
        factory = ConnectProxyFactory(
            connector, reactor=clock, policy=policy, portal=portal, realm="office"
        )
        self.assertEqual(
            (factory.connector, factory.policy, factory.portal, factory.realm),
            (connector, policy, portal, "office"),
        )
