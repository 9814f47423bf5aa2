"""
Tests for L{tunnel.upstream}: reaching targets through a parent HTTP proxy.

The unit tests run on a L{MemoryReactorClock}: the parent connection is a
L{StringTransport}, and the test plays the parent.  The loopback tests chain
two of our own proxies on 127.0.0.1 (the parent over TCP or TLS) with real
sockets; names are resolved by L{FakeResolver}, so no DNS query is sent.
"""

from __future__ import annotations

import base64
import datetime
import errno
import functools
import ipaddress
from collections.abc import Callable, Generator
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor as globalReactor
from twisted.internet.address import HostnameAddress, IPv4Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    NoProtocol,
    TimeoutError,
    getConnectError,
)
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import FakeGetaddrinfo, FakeResolver, ManualWorkers, ThreadReactor
from tunnel import ConnectProxy, ConnectProxyFactory, HostnameConnector
from tunnel.auth import portalFromCheckers
from tunnel.connector import AddressDenied
from tunnel.direct import DirectTransport
from tunnel.interfaces import ITargetConnector, NoLocalPort, SourceUnusable
from tunnel.policy import TunnelPolicy
from tunnel.resolver import ThreadedResolver
from tunnel.upstream import (
    MAX_RESPONSE_HEAD,
    UpstreamCancelled,
    UpstreamConnector,
    UpstreamEndpoint,
    UpstreamProtocolError,
    UpstreamProxy,
    UpstreamRefused,
    UpstreamTimedOut,
    UpstreamUnreachable,
    parseUpstreamURL,
    readUpstreamCredentials,
)

reactor: Any = globalReactor
Yielding = Generator[Deferred[Any], Any, Any]

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
PARENT = parseUpstreamURL("http://proxy.example:3128")
PARENT_ADDRESS = "192.0.2.1"
# The default policy allows only port 443 and only public addresses; the
# loopback tests reach loopback targets on any port.
LOOPBACK = TunnelPolicy.fromStrings(ports=["any"], allowTo=["127.0.0.0/8"])


class ReadUpstreamCredentialsTests(SynchronousTestCase):
    """
    Tests for L{readUpstreamCredentials}: a parent proxy's credentials from
    a file rather than from its URL.
    """

    def credentials(self, content: bytes) -> str:
        """
        Write C{content} to a new file and return its path.
        """
        path: str = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_read(self) -> None:
        """
        The file's one line is C{user:password}, taken as is (no percent
        decoding), the password running to the end of the line, colons
        included; one trailing line break is not part of it.  The URL's
        other parts are kept.
        """
        for content, user, password in [
            (b"alice:s3:cr%41t\n", "alice", "s3:cr%41t"),
            (b"alice:pw\r\n", "alice", "pw"),
            (b"al ice:", "al ice", ""),
            ("z\u00fc:p\u00e4ss".encode(), "z\u00fc", "p\u00e4ss"),
        ]:
            proxy = readUpstreamCredentials(PARENT, self.credentials(content))
            self.assertEqual(
                (proxy.username, proxy.password, proxy.host, proxy.port),
                (user, password, "proxy.example", 3128),
            )

    def test_refused(self) -> None:
        """
        A file that cannot be read, or holds no C{user:} part, more than one
        line, control characters, something not UTF-8 or more than 4 KiB,
        and a URL holding credentials already, are errors that never repeat
        the file's content.
        """
        for content, message in [
            (b"alice\n", "user:password"),
            (b":pw\n", "user:password"),
            (b"", "user:password"),
            (b"alice:pw\n\n", "one line"),
            (b"alice:pw\nbob:pw\n", "one line"),
            (b"alice:p\tw", "one line"),
            (b"alice:p\xffw", "UTF-8"),
            (b"alice:" + b"w" * 4096, "4096"),
        ]:
            e = self.assertRaises(
                ValueError, readUpstreamCredentials, PARENT, self.credentials(content)
            )
            self.assertIn(message, str(e))
            self.assertNotIn("alice", str(e))
        e = self.assertRaises(
            ValueError, readUpstreamCredentials, PARENT, "/nonexistent/credentials"
        )
        self.assertIn("No such file", str(e))
        e = self.assertRaises(
            ValueError,
            readUpstreamCredentials,
            parseUpstreamURL("http://bob:pw@proxy.example"),
            self.credentials(b"alice:pw"),
        )
        self.assertIn("already", str(e))


class ParseUpstreamURLTests(SynchronousTestCase):
    """
    L{parseUpstreamURL} reads C{http://} and C{https://} proxy URLs.
    """

    def test_plain(self) -> None:
        """
        C{http://host:port} names a plain parent with no credentials.
        """
        self.assertEqual(
            parseUpstreamURL("http://proxy.example:8080"),
            UpstreamProxy("http", "proxy.example", 8080),
        )

    def test_tls(self) -> None:
        """
        C{https://} means TLS to the parent.
        """
        upstream = parseUpstreamURL("https://proxy.example:8443")
        self.assertEqual(upstream, UpstreamProxy("https", "proxy.example", 8443))
        self.assertTrue(upstream.tls)
        self.assertFalse(PARENT.tls)

    def test_defaultPorts(self) -> None:
        """
        Without a port (or with an empty one), C{http} means 3128 and
        C{https} 443.
        """
        self.assertEqual(parseUpstreamURL("http://proxy.example").port, 3128)
        self.assertEqual(parseUpstreamURL("http://proxy.example:").port, 3128)
        self.assertEqual(parseUpstreamURL("https://proxy.example").port, 443)

    def test_caseInsensitive(self) -> None:
        """
        The scheme and the host are case-insensitive, and come out in lower
        case.
        """
        self.assertEqual(
            parseUpstreamURL("HTTPS://Proxy.Example:8443"),
            UpstreamProxy("https", "proxy.example", 8443),
        )

    def test_trailingSlash(self) -> None:
        """
        One trailing slash, as in many C{http_proxy} settings, is allowed.
        """
        self.assertEqual(
            parseUpstreamURL("http://proxy.example:3128/"),
            UpstreamProxy("http", "proxy.example", 3128),
        )

    def test_addresses(self) -> None:
        """
        The host may be an IPv4 literal or a bracketed IPv6 literal.
        """
        self.assertEqual(parseUpstreamURL("http://192.0.2.1:3128").host, "192.0.2.1")
        upstream = parseUpstreamURL("http://[2001:db8::1]:3128")
        self.assertEqual(upstream.host, "2001:db8::1")
        self.assertEqual(upstream.authority, "[2001:db8::1]:3128")

    def test_credentials(self) -> None:
        """
        The user name and password are percent-decoded (as UTF-8), and sent
        as C{Basic} credentials.
        """
        upstream = parseUpstreamURL("http://al%20ice:p%40ss%3Aw%C3%B6rd@proxy:3128")
        self.assertEqual(
            (upstream.username, upstream.password), ("al ice", "p@ss:wörd")
        )
        self.assertEqual(
            upstream.proxyAuthorization,
            b"Basic " + base64.b64encode("al ice:p@ss:wörd".encode()),
        )

    def test_userWithoutPassword(self) -> None:
        """
        C{user@host} means that user with an empty password.
        """
        upstream = parseUpstreamURL("http://alice@proxy:3128")
        self.assertEqual((upstream.username, upstream.password), ("alice", ""))
        self.assertEqual(upstream.proxyAuthorization, b"Basic YWxpY2U6")

    def test_noCredentials(self) -> None:
        """
        Without user info no C{Proxy-Authorization} is sent.
        """
        self.assertIsNone(PARENT.username)
        self.assertIsNone(PARENT.proxyAuthorization)

    def test_passwordHidden(self) -> None:
        """
        Neither C{repr} nor C{displayURL} shows the password.
        """
        upstream = parseUpstreamURL("https://alice:s3cret@proxy.example:8443")
        self.assertNotIn("s3cret", repr(upstream))
        self.assertEqual(upstream.displayURL, "https://alice@proxy.example:8443")
        self.assertEqual(PARENT.displayURL, "http://proxy.example:3128")

    def test_invalid(self) -> None:
        """
        Anything else raises L{ValueError}, with a message that does not
        repeat the URL (it may hold a password).
        """
        for url in [
            "socks5://proxy:1080",
            "ftp://proxy:21",
            "proxy.example:3128",
            "http:proxy.example:3128",
            "http://proxy.example:3128/path",
            "http://proxy.example:3128/?",
            "http://proxy.example:3128?a=b",
            "http://proxy.example:3128#top",
            "http://:3128",
            "http://user:secret@:3128",
            "http://proxy.example:0",
            "http://proxy.example:65536",
            "http://proxy.example:port",
            "http://[2001:db8::1:3128",
            "http://[fe80::1%25eth0]:3128",
            "http://[not:an:address]:3128",
            "http://pro%78y:3128",
            "http://bücher.example:3128",
            "http://proxy example:3128",
            "http://proxy.example:3128\r\n",
            "http://al%3Aice:secret@proxy:3128",
            "http://alice:se%0Acret@proxy:3128",
            "http://alice:se%FFcret@proxy:3128",
            "",
        ]:
            with self.assertRaises(ValueError, msg=url) as raised:
                parseUpstreamURL(url)
            self.assertNotIn("secret", str(raised.exception))

    def test_constructorChecksScheme(self) -> None:
        """
        L{UpstreamProxy} itself refuses a scheme other than C{http} and
        C{https}.
        """
        self.assertRaises(ValueError, UpstreamProxy, "socks5", "proxy", 1080)


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    A protocol for the tunnel that records every event it gets.

    @ivar events: C{("made",)}, C{("data", bytes)}, C{("readLost",)},
        C{("writeLost",)} and C{("lost", exception type)}, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def connectionMade(self) -> None:
        """
        Record.
        """
        self.events.append(("made",))

    def dataReceived(self, data: bytes) -> None:
        """
        Record.
        """
        self.events.append(("data", data))

    def readConnectionLost(self) -> None:
        """
        Record.
        """
        self.events.append(("readLost",))

    def writeConnectionLost(self) -> None:
        """
        Record.
        """
        self.events.append(("writeLost",))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Record.
        """
        self.events.append(("lost", reason.type))


class PlainRecorder(Protocol):
    """
    A protocol that cannot half-close, recording what it gets.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def dataReceived(self, data: bytes) -> None:
        """
        Record.
        """
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Record.
        """
        self.events.append(("lost", reason.type))


class RecordingFactory(Factory):
    """
    Builds one protocol, recording the address it is given.
    """

    noisy = False

    def __init__(self, protocol: Protocol | None = None) -> None:
        self.built: Any = protocol if protocol is not None else Recorder()
        self.addresses: list[IAddress | None] = []
        self.buildable = True

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        """
        Give the protocol (or L{None} if not C{buildable}).
        """
        self.addresses.append(addr)
        return self.built if self.buildable else None


class EndpointTestMixin:
    """
    Run an L{UpstreamEndpoint} on a memory reactor, and play its parent.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver({"proxy.example": [PARENT_ADDRESS]})
        self.factory = RecordingFactory()

    def endpoint(
        self,
        upstream: UpstreamProxy = PARENT,
        host: str = "target.example",
        port: int = 443,
        **kwargs: Any,
    ) -> UpstreamEndpoint:
        """
        Make an endpoint on the memory reactor with the fake resolver.
        """
        return UpstreamEndpoint(
            self.reactor, upstream, host, port, resolver=self.resolver, **kwargs
        )

    def connect(
        self, endpoint: UpstreamEndpoint | None = None
    ) -> tuple[Deferred[Any], Any, StringTransport]:
        """
        Connect, and complete the TCP connection to the parent.

        @return: The endpoint's Deferred, the protocol on the parent
            connection (as the reactor sees it) and its transport.
        """
        result = (endpoint or self.endpoint()).connect(self.factory)
        host, port, factory, _timeout, _bindAddress = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return result, protocol, transport

    def establish(
        self, answer: bytes = ESTABLISHED
    ) -> tuple[Any, StringTransport, Any]:
        """
        Connect and answer with C{answer}; the endpoint must succeed.

        @return: The protocol on the parent connection, its transport, and
            the protocol the endpoint's Deferred fired with.
        """
        result, protocol, transport = self.connect()
        protocol.dataReceived(answer)
        return protocol, transport, self.successResultOf(result)  # type: ignore[attr-defined]


class UpstreamEndpointTests(EndpointTestMixin, SynchronousTestCase):
    """
    L{UpstreamEndpoint} asks the parent for a tunnel and hands over the
    connection.
    """

    def test_attemptLetsGoOfHandshake(self) -> None:
        """
        Once an attempt ended, established or refused, it no longer holds
        the handshake protocol (which holds it): a finished tunnel through
        the parent is freed by reference counting, not left in a cycle for
        Python's cycle collector.
        """
        protocol, _, _ = self.establish()
        handshake = protocol._wrappedProtocol
        self.assertNotIn(handshake, vars(handshake._attempt).values())
        refused, protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(refused, UpstreamRefused)
        handshake = protocol._wrappedProtocol
        self.assertNotIn(handshake, vars(handshake._attempt).values())

    def test_connectsToParent(self) -> None:
        """
        The endpoint connects to the parent's host and port, resolved by the
        resolver it was given.
        """
        self.endpoint().connect(self.factory)
        [(host, port, _, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), (PARENT_ADDRESS, 3128))
        self.assertEqual(self.resolver.queries, ["proxy.example"])

    def test_request(self) -> None:
        """
        Once connected it sends exactly a C{CONNECT} request with C{Host}.
        """
        result, _protocol, transport = self.connect()
        self.assertEqual(
            transport.value(),
            b"CONNECT target.example:443 HTTP/1.1\r\nHost: target.example:443\r\n\r\n",
        )
        self.assertNoResult(result)

    def test_requestWithCredentials(self) -> None:
        """
        Credentials in the URL are sent as C{Proxy-Authorization: Basic}.
        """
        upstream = parseUpstreamURL("http://alice:p%40ss@proxy.example:3128")
        _result, _protocol, transport = self.connect(self.endpoint(upstream))
        self.assertEqual(
            transport.value(),
            b"CONNECT target.example:443 HTTP/1.1\r\n"
            b"Host: target.example:443\r\n"
            b"Proxy-Authorization: Basic YWxpY2U6cEBzcw==\r\n\r\n",
        )

    def test_requestIPv6Target(self) -> None:
        """
        An IPv6 target is written in brackets.
        """
        endpoint = self.endpoint(host="2001:db8::7", port=8443)
        _result, _protocol, transport = self.connect(endpoint)
        self.assertEqual(
            transport.value(),
            b"CONNECT [2001:db8::7]:8443 HTTP/1.1\r\nHost: [2001:db8::7]:8443\r\n\r\n",
        )

    def test_invalidTarget(self) -> None:
        """
        A target that could not be written in a request line is refused at
        once.
        """
        for host, port in [
            ("target.example\r\nX-Evil: 1", 443),
            ("bad host", 443),
            ("bücher.example", 443),
            ("target.example", 0),
            ("target.example", 65536),
            ("fe80::1%eth0", 443),
        ]:
            self.assertRaises(ValueError, self.endpoint, host=host, port=port)

    def test_established(self) -> None:
        """
        On a 200 the factory's protocol is connected to the parent's very
        transport, built with the target's address, and the Deferred fires
        with it.
        """
        protocol, transport, tunnel = self.establish()
        self.assertIs(tunnel, self.factory.built)
        self.assertIs(tunnel.transport, transport)
        self.assertEqual(tunnel.events, [("made",)])
        self.assertEqual(
            self.factory.addresses, [HostnameAddress(b"target.example", 443)]
        )
        protocol.dataReceived(b"from the target")
        tunnel.transport.write(b"to the target")
        self.assertEqual(tunnel.events, [("made",), ("data", b"from the target")])
        self.assertTrue(transport.value().endswith(b"\r\n\r\nto the target"))

    def test_bytesAfterHead(self) -> None:
        """
        Bytes that follow the parent's head in the same read reach the
        protocol right after C{connectionMade}, before anything read later.
        """
        protocol, _transport, tunnel = self.establish(ESTABLISHED + b"first")
        protocol.dataReceived(b"second")
        self.assertEqual(
            tunnel.events, [("made",), ("data", b"first"), ("data", b"second")]
        )

    def test_bytesAfterHeadOfClosingProtocol(self) -> None:
        """
        A protocol that closes the connection in C{connectionMade} is not
        given the bytes that followed the head, as a TCP transport stops
        reading at C{loseConnection}.
        """

        class Closer(Recorder):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.transport.loseConnection()  # type: ignore[union-attr]

        self.factory = RecordingFactory(Closer())
        _protocol, _transport, tunnel = self.establish(ESTABLISHED + b"unread")
        self.assertEqual(tunnel.events, [("made",)])

    def test_headInPieces(self) -> None:
        """
        The head may arrive a byte at a time; other 2xx statuses, HTTP/1.0,
        header fields (even C{Content-Length}, which a 2xx answer to
        C{CONNECT} cannot have) and bare LF line ends are accepted.
        """
        answer = b"HTTP/1.0 204\nContent-Length: 12\nVia: 1.1 parent\n\ntunnel bytes"
        result, protocol, _transport = self.connect()
        for index in range(len(answer)):
            protocol.dataReceived(answer[index : index + 1])
        tunnel = self.successResultOf(result)
        self.assertEqual(
            b"".join(event[1] for event in tunnel.events if event[0] == "data"),
            b"tunnel bytes",
        )

    def test_interimResponses(self) -> None:
        """
        Interim 1xx responses before the final one are skipped.
        """
        _protocol, _transport, tunnel = self.establish(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ESTABLISHED + b"x"
        )
        self.assertEqual(tunnel.events, [("made",), ("data", b"x")])

    def test_refused(self) -> None:
        """
        A status other than 2xx fails the Deferred with L{UpstreamRefused},
        with the parent's status and reason, once the connection to the
        parent, aborted at once, is closed.
        """
        for status, reason in [(403, "Forbidden"), (502, "Bad Gateway"), (101, "")]:
            result, protocol, transport = self.connect()
            head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: 4\r\n\r\nbody"
            protocol.dataReceived(head.encode("ascii"))
            self.assertTrue(transport.disconnected)
            self.assertNoResult(result)
            protocol.connectionLost(Failure(ConnectionLost()))
            refused = self.failureResultOf(result, UpstreamRefused).value
            self.assertEqual((refused.status, refused.reason), (status, reason))
            self.assertIsInstance(refused, ConnectError)
            self.assertEqual(self.factory.built.events, [])
        self.assertEqual(
            str(UpstreamRefused(403, "Forbidden")),
            "The parent proxy refused the tunnel: 403 Forbidden.",
        )

    def test_refusedReasonSanitized(self) -> None:
        """
        Control characters in the reason phrase are replaced, so that it is
        safe to log.
        """
        result, protocol, _transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 407 Who\ris\x1b[31m there \r\n\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        refused = self.failureResultOf(result, UpstreamRefused).value
        self.assertEqual((refused.status, refused.reason), (407, "Who?is?[31m there"))

    def test_refusedReasonBounded(self) -> None:
        """
        A reason phrase longer than C{MAX_REASON} bytes is cut to that many,
        so a parent cannot fill the client's 502 and the log with its text.
        """
        from tunnel.upstream import MAX_REASON

        result, protocol, _transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 403 " + b"A" * 60000 + b"\r\n\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        refused = self.failureResultOf(result, UpstreamRefused).value
        self.assertEqual((refused.status, refused.reason), (403, "A" * MAX_REASON))

    def test_malformed(self) -> None:
        """
        An answer that is not an HTTP/1.x response fails the Deferred with
        L{UpstreamProtocolError}.
        """
        for answer in [
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 600 High\r\n\r\n",
            b"HTTP/1.1  200 OK\r\n\r\n",
            b"\r\n\r\n",
        ]:
            result, protocol, transport = self.connect()
            protocol.dataReceived(answer)
            self.assertTrue(transport.disconnected, answer)
            protocol.connectionLost(Failure(ConnectionLost()))
            self.failureResultOf(result, UpstreamProtocolError)

    def test_headTooLarge(self) -> None:
        """
        A head that has not ended within L{MAX_RESPONSE_HEAD} bytes fails the
        Deferred, and the parent's connection is aborted.
        """
        result, protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        filler = b"X-Filler: " + b"x" * 1000 + b"\r\n"
        # Bounded: a head that is never refused fails the test, not hangs it.
        for _ in range(MAX_RESPONSE_HEAD // len(filler) + 2):
            if transport.disconnected:
                break
            protocol.dataReceived(filler)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(result, UpstreamProtocolError)
        self.assertIn(str(MAX_RESPONSE_HEAD), str(failure.value))

    def test_headTooLargeCountsInterim(self) -> None:
        """
        Interim heads count towards the limit.
        """
        result, protocol, transport = self.connect()
        interim = b"HTTP/1.1 100 Continue\r\nX: " + b"y" * 1000 + b"\r\n\r\n"
        sent = 0
        # Bounded, as in test_headTooLarge.
        for _ in range(MAX_RESPONSE_HEAD // len(interim) + 2):
            if transport.disconnected:
                break
            protocol.dataReceived(interim)
            sent += len(interim)
        self.assertTrue(transport.disconnected)
        self.assertGreater(sent, MAX_RESPONSE_HEAD)
        self.assertLess(sent, MAX_RESPONSE_HEAD + 2 * len(interim))
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(result, UpstreamProtocolError)

    def test_headAtLimit(self) -> None:
        """
        A head of exactly L{MAX_RESPONSE_HEAD} bytes (without its final empty
        line) is accepted, even when that empty line arrives a byte at a
        time.
        """
        start = b"HTTP/1.1 200 OK\r\nX: "
        head = start + b"z" * (MAX_RESPONSE_HEAD - len(start) - 2) + b"\r\n"
        self.assertEqual(len(head), MAX_RESPONSE_HEAD)
        result, protocol, _transport = self.connect()
        for piece in [head, b"\r", b"\n"]:
            protocol.dataReceived(piece)
        tunnel = self.successResultOf(result)
        self.assertEqual(tunnel.events, [("made",)])

    def test_parentClosesBeforeAnswer(self) -> None:
        """
        A parent that closes the connection before a complete answer fails
        the Deferred with L{UpstreamProtocolError}.
        """
        result, protocol, _transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(result, UpstreamProtocolError)
        self.assertIn("ended before it answered", str(failure.value))

    def test_parentFINBeforeAnswer(self) -> None:
        """
        A FIN from the parent before its answer aborts the connection and
        fails the Deferred.
        """
        result, protocol, transport = self.connect()
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(result, UpstreamProtocolError)
        self.assertIn("closed the connection before answering", str(failure.value))

    def parentConnectionFails(self, error: Exception) -> Deferred[Any]:
        """
        Start an attempt whose connection to the parent fails with C{error}.

        @return: The attempt's Deferred, once the endpoint has reported.
        """
        result = self.endpoint().connect(self.factory)
        [(_, _, factory, _, _)] = self.reactor.tcpClients
        [connector] = self.reactor.connectors
        factory.clientConnectionFailed(connector, Failure(error))
        # HostnameEndpoint reports once its (single) address was tried.
        self.reactor.advance(1)
        return result

    def test_parentUnreachable(self) -> None:
        """
        When the parent cannot be reached the Deferred fails with
        L{UpstreamUnreachable} (a C{ConnectError}), whose message holds the
        connection error: not with the bare error, which the proxy would
        report as the target's.  The message is one sentence, with one full
        stop.
        """
        result = self.parentConnectionFails(ConnectionRefusedError())
        failure = self.failureResultOf(result, UpstreamUnreachable)
        self.assertIsInstance(failure.value, ConnectError)
        self.assertIn("could not be reached", str(failure.value))
        self.assertIn("refused", str(failure.value))
        self.assertFalse(str(failure.value).endswith(".."), str(failure.value))

    def test_parentNoLocalPort(self) -> None:
        """
        A parent that cannot be connected to for want of a local port
        (L{NoLocalPort}) fails the Deferred with that error, not with
        L{UpstreamUnreachable}: the shortage is the proxy's (a 503), not
        the parent's.
        """
        result = self.parentConnectionFails(
            NoLocalPort(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        )
        self.failureResultOf(result, NoLocalPort)

    def test_parentSourceUnusable(self) -> None:
        """
        A connection to the parent that could not be bound to its outgoing
        address (L{SourceUnusable}) fails with that error, not with
        L{UpstreamUnreachable}: the shortage is the proxy's (a 503), not
        the parent's.
        """
        result = self.parentConnectionFails(
            SourceUnusable(errno.EADDRNOTAVAIL, "Cannot assign")
        )
        self.failureResultOf(result, SourceUnusable)

    def test_parentOutOfDescriptors(self) -> None:
        """
        A connection to the parent not made for want of descriptors
        (C{EMFILE}) fails with that error, not with L{UpstreamUnreachable},
        so that the client gets the proxy's 503, as for a target.
        """
        emfile = getConnectError(OSError(errno.EMFILE, "Too many open files"))
        failure = self.failureResultOf(self.parentConnectionFails(emfile), ConnectError)
        self.assertNotIsInstance(failure.value, UpstreamUnreachable)
        self.assertEqual(failure.value.osError, errno.EMFILE)

    def test_parentNameUnknown(self) -> None:
        """
        A parent name that does not resolve fails the Deferred with
        L{UpstreamUnreachable}, whose message holds the lookup's error.
        """
        upstream = parseUpstreamURL("http://nowhere.example:3128")
        result = self.endpoint(upstream).connect(self.factory)
        failure = self.failureResultOf(result, UpstreamUnreachable)
        self.assertIn("nowhere.example", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_timeoutWaitingForAnswer(self) -> None:
        """
        A parent that does not answer within C{timeout} seconds: the
        connection is aborted and the Deferred fails with
        L{UpstreamTimedOut}, a L{twisted.internet.error.TimeoutError} that
        says the parent was reached.
        """
        result, protocol, transport = self.connect(self.endpoint(timeout=5))
        self.reactor.advance(4.9)
        self.assertNoResult(result)
        self.reactor.advance(0.1)
        self.assertTrue(transport.disconnected)
        failure = self.failureResultOf(result, UpstreamTimedOut)
        self.assertIsInstance(failure.value, TimeoutError)
        self.assertIn("the parent proxy did not answer within 5 s", str(failure.value))
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timeoutConnecting(self) -> None:
        """
        A parent not reached within C{timeout} seconds: the attempt is
        cancelled and the Deferred fails with L{UpstreamTimedOut}, saying
        the parent was not reached.
        """
        result = self.endpoint(timeout=5).connect(self.factory)
        self.reactor.advance(5)
        failure = self.failureResultOf(result, UpstreamTimedOut)
        self.assertIn("could not reach the parent proxy within 5 s", str(failure.value))
        [connector] = self.reactor.connectors
        self.assertTrue(connector.stoppedConnecting)

    def test_parentConnectTimedOut(self) -> None:
        """
        A timeout of the connection attempt to the parent (the network's
        or the endpoint's own) fails the Deferred with L{UpstreamTimedOut}
        that names the parent, not a bare timeout to be read as the
        target's.
        """
        result = self.parentConnectionFails(TimeoutError())
        failure = self.failureResultOf(result, UpstreamTimedOut)
        self.assertIn("could not reach the parent proxy: ", str(failure.value))
        self.assertFalse(str(failure.value).endswith(".."), str(failure.value))

    def test_noTimeoutAfterSuccess(self) -> None:
        """
        Once the tunnel is established no timer is left.
        """
        self.establish()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancelWaitingForAnswer(self) -> None:
        """
        Cancelling while the parent has not answered aborts the connection;
        the Deferred fails with L{UpstreamCancelled} (a L{CancelledError})
        saying the parent was reached, and a late answer or the end of the
        connection change nothing.
        """
        result, protocol, transport = self.connect()
        result.cancel()
        self.assertTrue(transport.disconnected)
        failure = self.failureResultOf(result, UpstreamCancelled)
        self.assertIsInstance(failure.value, CancelledError)
        self.assertTrue(failure.value.answering)
        protocol.dataReceived(ESTABLISHED)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.factory.addresses, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancelConnecting(self) -> None:
        """
        Cancelling while connecting to the parent stops the attempt.
        """
        result = self.endpoint().connect(self.factory)
        result.cancel()
        failure = self.failureResultOf(result, UpstreamCancelled)
        self.assertFalse(failure.value.answering)
        [connector] = self.reactor.connectors
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancelAfterRefusal(self) -> None:
        """
        Cancelling after a refusal, before the connection is closed, fails
        the Deferred with L{CancelledError}.
        """
        result, protocol, _transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        result.cancel()
        self.failureResultOf(result, CancelledError)
        protocol.connectionLost(Failure(ConnectionLost()))

    def test_factoryStartedAndStopped(self) -> None:
        """
        The factory is started for the attempt and stopped when the
        connection ends, or when the attempt fails or is cancelled.
        """
        protocol, _transport, _tunnel = self.establish()
        self.assertEqual(self.factory.numPorts, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.numPorts, 0)
        result, protocol, _transport = self.connect()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(result)
        self.assertEqual(self.factory.numPorts, 0)
        result = self.endpoint().connect(self.factory)
        result.cancel()
        self.failureResultOf(result)
        self.assertEqual(self.factory.numPorts, 0)

    def test_noProtocol(self) -> None:
        """
        A factory that builds no protocol fails the Deferred with
        L{NoProtocol}, and the connection is aborted.
        """
        self.factory.buildable = False
        result, protocol, transport = self.connect()
        protocol.dataReceived(ESTABLISHED)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(result, NoProtocol)

    def test_halfClose(self) -> None:
        """
        Half-closes are passed on to a protocol that provides
        L{IHalfCloseableProtocol}, and so is the end of the connection.
        """
        protocol, transport, tunnel = self.establish()
        protocol.readConnectionLost()
        protocol.writeConnectionLost()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            tunnel.events,
            [("made",), ("readLost",), ("writeLost",), ("lost", ConnectionDone)],
        )
        self.assertFalse(transport.disconnecting)

    def test_halfCloseNotSupported(self) -> None:
        """
        A protocol that cannot half-close has its connection closed on the
        parent's FIN, as TCP would do.
        """
        self.factory = RecordingFactory(PlainRecorder())
        protocol, transport, tunnel = self.establish()
        protocol.writeConnectionLost()
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(tunnel.events, [("lost", ConnectionDone)])

    def test_tlsParent(self) -> None:
        """
        For an C{https://} parent the first bytes sent are a TLS handshake
        record, not the request.
        """
        upstream = parseUpstreamURL("https://proxy.example:8443")
        result, _protocol, transport = self.connect(self.endpoint(upstream))
        self.assertEqual(transport.value()[:1], b"\x16")
        self.assertNotIn(b"CONNECT", transport.value())
        result.cancel()
        self.failureResultOf(result, CancelledError)

    def test_tlsOptionsNeedTLS(self) -> None:
        """
        TLS options for an C{http://} parent are a mistake.
        """
        self.assertRaises(ValueError, self.endpoint, caCertificate="ca.pem")

    def test_badCACertificate(self) -> None:
        """
        A CA file without a readable PEM certificate is refused at once.
        """
        upstream = parseUpstreamURL("https://proxy.example:8443")
        path = self.mktemp()
        with open(path, "w") as pemFile:
            pemFile.write("not a certificate\n")
        self.assertRaises(ValueError, self.endpoint, upstream, caCertificate=path)
        with open(path, "w") as pemFile:
            pemFile.write(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            )
        self.assertRaises(ValueError, self.endpoint, upstream, caCertificate=path)
        self.assertRaises(
            OSError, self.endpoint, upstream, caCertificate=path + ".missing"
        )


@implementer(IStreamClientEndpoint)
class ManualEndpoint:
    """
    A parent endpoint whose attempts the test completes, and which cannot
    really cancel them (as some endpoints cannot).
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[IProtocolFactory, Deferred[Any]]] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Record the attempt.
        """
        attempt: Deferred[Any] = Deferred()
        self.attempts.append((protocolFactory, attempt))
        return attempt

    def complete(self, fire: bool = True) -> tuple[Any, StringTransport]:
        """
        Connect the last attempt's protocol (and fire its Deferred).
        """
        factory, attempt = self.attempts[-1]
        protocol: Any = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 3128))
        transport = StringTransport()
        protocol.makeConnection(transport)
        if fire:
            attempt.callback(protocol)
        return protocol, transport


class ManualEndpointTests(EndpointTestMixin, SynchronousTestCase):
    """
    L{UpstreamEndpoint} with parent endpoints that behave unusually.
    """

    def setUp(self) -> None:
        super().setUp()
        self.parent = ManualEndpoint()
        self.upstreamEndpoint = self.endpoint()
        self.upstreamEndpoint._parent = self.parent

    def test_connectedAfterCancel(self) -> None:
        """
        A connection that arrives after the attempt was cancelled is
        aborted at once, without a request.
        """
        result = self.upstreamEndpoint.connect(self.factory)
        result.cancel()
        self.failureResultOf(result, CancelledError)
        _protocol, transport = self.parent.complete(fire=False)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")

    def test_answerBeforeRequest(self) -> None:
        """
        Bytes that arrive before the request is sent are kept, and read as
        the answer once it is.
        """
        result = self.upstreamEndpoint.connect(self.factory)
        protocol, transport = self.parent.complete(fire=False)
        protocol.dataReceived(ESTABLISHED + b"early")
        self.assertEqual(transport.value(), b"")
        self.parent.attempts[-1][1].callback(protocol)
        self.assertTrue(transport.value().startswith(b"CONNECT "))
        tunnel: Any = self.successResultOf(result)
        self.assertEqual(tunnel.events, [("made",), ("data", b"early")])


@implementer(IOpenSSLClientConnectionCreator)
class RecordingCreator:
    """
    TLS options that count the connections they make.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._options = optionsForClientTLS("proxy.example")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        """
        Count, and make the connection as usual.
        """
        self.calls += 1
        return self._options.clientConnectionForTLS(tlsProtocol)


class UpstreamConnectorTests(EndpointTestMixin, SynchronousTestCase):
    """
    L{UpstreamConnector} reaches every target through the parent.
    """

    def test_interface(self) -> None:
        """
        It provides L{ITargetConnector}.
        """
        connector = UpstreamConnector(self.reactor, PARENT)
        self.assertTrue(verifyObject(ITargetConnector, connector))

    def test_defaultResolver(self) -> None:
        """
        Without a resolver, the parent's name is looked up by a
        L{ThreadedResolver} of the connector's own, not the reactor's
        C{nameResolver} (whose pool the password checks use), and every
        tunnel's endpoint uses that one resolver.
        """
        connector = UpstreamConnector(self.reactor, PARENT)
        self.assertIsInstance(connector.resolver, ThreadedResolver)
        given = UpstreamConnector(self.reactor, PARENT, resolver=self.resolver)
        self.assertIs(given.resolver, self.resolver)
        workers = ManualWorkers()
        shared = ThreadedResolver(
            ThreadReactor(),
            getaddrinfo=FakeGetaddrinfo({"proxy.example": ["192.0.2.9"]}),
            workers=workers,
        )
        connector = UpstreamConnector(self.reactor, PARENT, resolver=shared)
        attempts = [
            connector.endpointForTarget(host, 443).connect(
                Factory.forProtocol(Protocol)
            )
            for host in ("a.example", "b.example")
        ]
        # Both tunnels' lookups of the parent share one call.
        self.assertEqual(shared.running, 1)
        self.assertEqual(len(workers.jobs), 1)
        for attempt in attempts:
            attempt.cancel()
            self.failureResultOf(attempt)

    def test_names(self) -> None:
        """
        A target name is handed to the parent whatever C{allowAddress} says:
        the parent resolves it.
        """
        connector = UpstreamConnector(self.reactor, PARENT, resolver=self.resolver)
        endpoint = connector.endpointForTarget(
            "target.example", 443, lambda address: False
        )
        self.assertIsInstance(endpoint, UpstreamEndpoint)
        endpoint.connect(self.factory)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_deniedLiteral(self) -> None:
        """
        A target IP literal that C{allowAddress} denies fails with
        L{AddressDenied} without contacting the parent.
        """
        connector = UpstreamConnector(self.reactor, PARENT, resolver=self.resolver)
        asked: list[object] = []

        def allowAddress(address: object) -> bool:
            asked.append(address)
            return False

        endpoint = connector.endpointForTarget("169.254.169.254", 80, allowAddress)
        self.failureResultOf(endpoint.connect(self.factory), AddressDenied)
        self.assertEqual(asked, [ipaddress.ip_address("169.254.169.254")])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_allowedLiteral(self) -> None:
        """
        A target IP literal that C{allowAddress} allows goes to the parent,
        as does any target without C{allowAddress}.
        """
        connector = UpstreamConnector(self.reactor, PARENT, resolver=self.resolver)
        endpoint = connector.endpointForTarget("2001:db8::1", 443, lambda a: True)
        self.assertIsInstance(endpoint, UpstreamEndpoint)
        self.assertIsInstance(
            connector.endpointForTarget("10.0.0.1", 443), UpstreamEndpoint
        )

    def test_options(self) -> None:
        """
        The endpoints use the connector's timeout and resolver.
        """
        connector = UpstreamConnector(
            self.reactor, PARENT, timeout=3, resolver=self.resolver
        )
        result = connector.endpointForTarget("target.example", 443).connect(
            self.factory
        )
        self.reactor.advance(3)
        self.failureResultOf(result, TimeoutError)
        self.assertEqual(self.resolver.queries, ["proxy.example"])

    def test_tlsOptionsNeedTLS(self) -> None:
        """
        TLS options for an C{http://} parent are a mistake.
        """
        self.assertRaises(
            ValueError, UpstreamConnector, self.reactor, PARENT, caCertificate="x"
        )

    def test_tlsOptions(self) -> None:
        """
        TLS options given to the connector are used for every endpoint.
        """
        upstream = parseUpstreamURL("https://proxy.example")
        options = RecordingCreator()
        connector = UpstreamConnector(
            self.reactor, upstream, tlsOptions=options, resolver=self.resolver
        )
        for _ in range(2):
            endpoint = connector.endpointForTarget("target.example", 443)
            self.connect(cast(UpstreamEndpoint, endpoint))
        self.assertEqual(options.calls, 2)

    def test_caCertificateReadOnce(self) -> None:
        """
        The CA file is read when the connector is made: a bad one fails
        then.
        """
        upstream = parseUpstreamURL("https://proxy.example")
        path = self.mktemp()
        self.assertRaises(
            OSError, UpstreamConnector, self.reactor, upstream, caCertificate=path
        )
        caPEM, _ = testCertificates()["ca"]
        with open(path, "wb") as pemFile:
            pemFile.write(caPEM)
        connector = UpstreamConnector(self.reactor, upstream, caCertificate=path)
        with open(path, "wb") as pemFile:
            pemFile.write(b"gone")
        self.assertIsInstance(
            connector.endpointForTarget("target.example", 443), UpstreamEndpoint
        )


def _makeCertificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    alternativeName: bool = True,
    expired: bool = False,
) -> x509.Certificate:
    """
    Make a CA certificate (without C{issuer}) or a server certificate for
    the DNS name C{subject}, signed by C{issuer}; without
    C{alternativeName}, the name is only the certificate's subject (no
    subjectAltName), as some private CAs still issue them.  An C{expired}
    one was valid for a day, two days ago.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:
        now -= datetime.timedelta(days=2)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
    )
    if issuer is None:
        return (
            builder.issuer_name(name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
    issuerCertificate, issuerKey = issuer
    builder = builder.issuer_name(issuerCertificate.subject).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), True
    )
    if alternativeName:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), False
        )
    return (
        builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()),
            critical=False,
        )
        .sign(issuerKey, hashes.SHA256())
    )


@functools.cache
def testCertificates() -> dict[str, tuple[bytes, bytes]]:
    """
    Make, once, a test CA, a certificate for C{localhost} that it signed,
    and another CA; EC P-256 keys, so this is fast.

    @return: C{"ca"}, C{"localhost"}, C{"localhostNoSAN"} (signed by the
        test CA too, but naming C{localhost} in its subject only),
        C{"localhostExpired"} (signed by the test CA, expired) and
        C{"otherCA"}, each the PEM certificate and the PEM private key.
    """
    result = {}
    caKey = ec.generate_private_key(ec.SECP256R1())
    ca = _makeCertificate("tunnel test CA", caKey, None)
    serverKey = ec.generate_private_key(ec.SECP256R1())
    server = _makeCertificate("localhost", serverKey, (ca, caKey))
    otherKey = ec.generate_private_key(ec.SECP256R1())
    other = _makeCertificate("another test CA", otherKey, None)
    noSAN = _makeCertificate("localhost", serverKey, (ca, caKey), False)
    expired = _makeCertificate("localhost", serverKey, (ca, caKey), expired=True)
    for name, certificate, key in [
        ("ca", ca, caKey),
        ("localhost", server, serverKey),
        ("localhostNoSAN", noSAN, serverKey),
        ("localhostExpired", expired, serverKey),
        ("otherCA", other, otherKey),
    ]:
        result[name] = (
            certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    return result


class Event:
    """
    Something that happens once, that any number of callers can wait for,
    before or after it happened.
    """

    def __init__(self) -> None:
        self.happened = False
        self._waiting: list[Deferred[None]] = []

    def fire(self) -> None:
        """
        It happened (later calls change nothing).
        """
        if not self.happened:
            self.happened = True
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(None)

    def wait(self) -> Deferred[None]:
        """
        @return: Fires when it has happened.
        """
        if self.happened:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """
    One end of a test connection: records what it receives.

    @ivar echo: Send back whatever arrives.
    @ivar farewell: When the peer's FIN arrives, send this and close.
    """

    def __init__(self, echo: bool = False, farewell: bytes = b"") -> None:
        self.echo = echo
        self.farewell = farewell
        self.received = b""
        self.eof = Event()
        self.lost = Event()
        self._waiting: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    @property
    def tcp(self) -> Any:
        """
        The transport, untyped (tests half-close and abort it).
        """
        return self.transport

    def until(self, condition: Callable[[bytes], bool]) -> Deferred[bytes]:
        """
        @return: Fires with all bytes received once C{condition} holds for
            them; fails if the connection ends before.
        """
        waiter: Deferred[bytes] = Deferred()
        self._waiting.append((condition, waiter))
        self._check()
        return waiter

    def _check(self) -> None:
        waiting, self._waiting = self._waiting, []
        for condition, waiter in waiting:
            if condition(self.received):
                waiter.callback(self.received)
            elif self.lost.happened:
                waiter.errback(AssertionError(f"closed after {self.received!r}"))
            else:
                self._waiting.append((condition, waiter))

    def dataReceived(self, data: bytes) -> None:
        """
        Record (and echo).
        """
        self.received += data
        if self.echo:
            self.tcp.write(data)
        self._check()

    def readConnectionLost(self) -> None:
        """
        The peer sent FIN: say farewell and close.
        """
        self.eof.fire()
        if self.farewell:
            self.tcp.write(self.farewell)
        self.tcp.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Our FIN went out.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Record the end.
        """
        self.lost.fire()
        self._check()


class PeerFactory(Factory):
    """
    Builds test servers' peers, and tracks them for cleanup.
    """

    noisy = False

    def __init__(self, make: Callable[[], Peer], track: Callable[[Any], None]):
        self._make = make
        self._track = track

    def buildProtocol(self, addr: IAddress | None) -> Peer:
        """
        Build and track a peer.
        """
        peer = self._make()
        self._track(peer)
        return peer


class TrackedProxy(ConnectProxy):
    """
    A proxy connection that reports its end.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lost = Event()
        self.ended = Event()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Report the end.
        """
        super().connectionLost(reason)
        self.lost.fire()


class TrackedProxyFactory(ConnectProxyFactory):
    """
    A L{ConnectProxyFactory} whose connections are tracked for cleanup.
    """

    protocol = TrackedProxy

    def __init__(self, track: Callable[[Any], None], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._track = track

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """
        Build and track a proxy connection.
        """
        proxy = super().buildProtocol(addr)
        self._track(proxy)
        return proxy


class ChainTests(TestCase):
    """
    Two of our proxies chained on loopback: a client asks the child, which
    asks the parent, which reaches an echo server.

    Every connection is closed, and waited for, before a test ends: test
    peers are aborted if still open, then each proxy connection must be
    closed and have logged its end (for a tunnel, after both its
    connections are closed).
    """

    timeout = 10

    def setUp(self) -> None:
        self.peers: list[Peer] = []
        self.proxies: list[TrackedProxy] = []
        observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.addCleanup(self._closeEverything)

    def _observe(self, event: LogEvent) -> None:
        source = event.get("log_source")
        if isinstance(source, TrackedProxy) and "ended" in event:
            source.ended.fire()

    @inlineCallbacks
    def _closeEverything(self) -> Yielding:
        for peer in self.peers:
            if not peer.lost.happened:
                peer.tcp.abortConnection()
        yield gatherResults([peer.lost.wait() for peer in self.peers])
        yield gatherResults(
            [proxy.lost.wait() for proxy in self.proxies]
            + [proxy.ended.wait() for proxy in self.proxies]
        )

    def listen(self, factory: Factory, tls: Any = None) -> int:
        """
        Listen on 127.0.0.1, port 0, until the test ends.

        @param tls: Server TLS options, or L{None} for plain TCP.
        @return: The port number.
        """
        if tls is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, factory, tls, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def echoServer(self) -> int:
        """
        Run an echo server that says C{bye} when its peer half-closes.

        @return: Its port.
        """
        return self.listen(
            PeerFactory(lambda: Peer(echo=True, farewell=b"bye"), self.peers.append)
        )

    def startProxy(self, connector: Any, tls: Any = None, **kwargs: Any) -> int:
        """
        Run one of our proxies on loopback, allowed to reach loopback.

        @return: Its port.
        """
        kwargs.setdefault("policy", LOOPBACK)
        factory = TrackedProxyFactory(
            self.proxies.append, connector, reactor=reactor, **kwargs
        )
        return self.listen(factory, tls)

    def startParent(
        self, tls: bool = False, certificate: str = "localhost", **kwargs: Any
    ) -> int:
        """
        Run the parent proxy, which connects directly.

        @param tls: Listen with TLS, as C{localhost} (a certificate signed
            by the test CA).
        @param certificate: Which of L{testCertificates} it presents.
        @return: Its port.
        """
        options = None
        if tls:
            certificatePEM, keyPEM = testCertificates()[certificate]
            options = PrivateCertificate.loadPEM(keyPEM + certificatePEM).options()
        connector = HostnameConnector(reactor, resolver=FakeResolver())
        return self.startProxy(connector, options, **kwargs)

    def caFile(self, name: str = "ca") -> str:
        """
        Write a test CA's certificate to a file.

        @return: The file's path.
        """
        path = self.mktemp()
        with open(path, "wb") as pemFile:
            pemFile.write(testCertificates()[name][0])
        return str(path)

    def upstreamConnector(self, url: str, **kwargs: Any) -> UpstreamConnector:
        """
        An L{UpstreamConnector} for the child, with C{localhost} resolving
        to 127.0.0.1.
        """
        resolver = FakeResolver({"localhost": ["127.0.0.1"]})
        return UpstreamConnector(
            reactor, parseUpstreamURL(url), resolver=resolver, **kwargs
        )

    @inlineCallbacks
    def requestTunnel(self, proxyPort: int, targetPort: int) -> Yielding:
        """
        Connect a client to a proxy and ask for a tunnel to 127.0.0.1.

        @return: Fires with the client L{Peer} once the response head (and
            possibly more) arrived.
        """
        client = Peer()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort)
        yield connectProtocol(endpoint, client)
        self.peers.append(client)
        authority = b"127.0.0.1:%d" % (targetPort,)
        client.tcp.write(
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)
        )
        yield client.until(lambda received: b"\r\n\r\n" in received)
        return client

    @inlineCallbacks
    def assertEcho(
        self, proxyPort: int, targetPort: int, halfClose: bool = True
    ) -> Yielding:
        """
        Check that a tunnel through the proxy reaches the echo server: the
        200, then the bytes echoed.  Then half-close it, and check that the
        echo server's farewell comes back before the end of the connection.

        @param halfClose: Whether the path can carry a half-close.  A TLS
            connection to the parent cannot (Twisted's TLS has no half-close,
            so the child closes it at the client's FIN): then the connection
            only ends cleanly, without the farewell.
        """
        client = yield self.requestTunnel(proxyPort, targetPort)
        self.assertEqual(client.received, ESTABLISHED)
        client.tcp.write(b"ping through two proxies")
        yield client.until(lambda received: received.endswith(b"proxies"))
        client.tcp.loseWriteConnection()
        yield client.lost.wait()
        farewell = b"bye" if halfClose else b""
        self.assertEqual(
            client.received, ESTABLISHED + b"ping through two proxies" + farewell
        )
        self.assertTrue(client.eof.happened)

    @inlineCallbacks
    def assertBadGateway(self, proxyPort: int, targetPort: int) -> Yielding:
        """
        Check that the proxy answers a tunnel request with 502 and closes.
        """
        client = yield self.requestTunnel(proxyPort, targetPort)
        yield client.lost.wait()
        self.assertTrue(
            client.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"),
            client.received,
        )

    @inlineCallbacks
    def test_chain(self) -> Yielding:
        """
        A child proxy whose connector is an L{UpstreamConnector} for the
        parent tunnels through it to the target, half-close included.
        """
        echoPort = self.echoServer()
        parentPort = self.startParent()
        childPort = self.startProxy(
            self.upstreamConnector(f"http://127.0.0.1:{parentPort}")
        )
        yield self.assertEcho(childPort, echoPort)

    @inlineCallbacks
    def test_chainTLS(self) -> Yielding:
        """
        A parent at C{https://localhost:PORT}, its certificate signed by the
        CA in the C{caCertificate} file, works the same (but for half-close,
        which TLS cannot carry).
        """
        echoPort = self.echoServer()
        parentPort = self.startParent(tls=True)
        connector = self.upstreamConnector(
            f"https://localhost:{parentPort}", caCertificate=self.caFile()
        )
        childPort = self.startProxy(connector)
        yield self.assertEcho(childPort, echoPort, halfClose=False)

    def test_identityInIDNA2008(self) -> None:
        """
        The parent's name is checked in the form Twisted's TLS sends it
        (IDNA 2008), not Python's own (IDNA 2003), which would check
        C{faß.de} as C{fass.de}, another domain.
        """
        from tunnel.upstream import _idnaText

        self.assertEqual(_idnaText("faß.de"), "xn--fa-hia.de")
        self.assertEqual(_idnaText("proxy.example"), "proxy.example")

    @inlineCallbacks
    def test_parentWithoutAlternativeName(self) -> Yielding:
        """
        A parent whose certificate chains to the CA but names no host in a
        subjectAltName (only in its subject, as some private CAs still
        issue them) is refused: the child's client gets a 502, and the
        parent never sees the request (Twisted's own check let it through,
        credentials and all).
        """
        echoPort = self.echoServer()
        parentPort = self.startParent(tls=True, certificate="localhostNoSAN")
        connector = self.upstreamConnector(
            f"https://alice:pw@localhost:{parentPort}", caCertificate=self.caFile()
        )
        childPort = self.startProxy(connector)
        yield self.assertBadGateway(childPort, echoPort)
        parents = [
            proxy
            for proxy in self.proxies
            if not isinstance(proxy.factory.connector, UpstreamConnector)
        ]
        self.assertFalse(any(proxy._request is not None for proxy in parents))

    @inlineCallbacks
    def test_parentRefuses(self) -> Yielding:
        """
        When the parent's policy refuses the port (403), the child's client
        gets a 502.
        """
        echoPort = self.echoServer()
        parentPort = self.startParent(policy=TunnelPolicy())
        childPort = self.startProxy(
            self.upstreamConnector(f"http://127.0.0.1:{parentPort}")
        )
        yield self.assertBadGateway(childPort, echoPort)

    @inlineCallbacks
    def test_credentials(self) -> Yielding:
        """
        Credentials in the child's upstream URL get through a parent that
        requires them; wrong ones get the child's client a 502.
        """
        echoPort = self.echoServer()
        portal = portalFromCheckers(
            [InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")]
        )
        parentPort = self.startParent(portal=portal)
        childPort = self.startProxy(
            self.upstreamConnector(f"http://alice:pw@127.0.0.1:{parentPort}")
        )
        yield self.assertEcho(childPort, echoPort)
        wrongPort = self.startProxy(
            self.upstreamConnector(f"http://alice:wrong@127.0.0.1:{parentPort}")
        )
        yield self.assertBadGateway(wrongPort, echoPort)

    @inlineCallbacks
    def connectEndpoint(self, endpoint: UpstreamEndpoint) -> Yielding:
        """
        Connect a L{Peer} with C{endpoint}, tracked for cleanup.

        @return: Fires with the peer.
        """
        peer = Peer()
        yield connectProtocol(endpoint, peer)
        self.peers.append(peer)
        return peer

    @inlineCallbacks
    def echoThroughEndpoint(self, parentHost: str, **kwargs: Any) -> Yielding:
        """
        Connect a L{Peer} through an L{UpstreamEndpoint} to an echo server,
        via a parent at C{parentHost}, and check a round trip.

        @param kwargs: More arguments for the endpoint.
        @return: Fires with the peer.
        """
        echoPort = self.echoServer()
        parentPort = self.startParent()
        endpoint = UpstreamEndpoint(
            reactor,
            parseUpstreamURL(f"http://{parentHost}:{parentPort}"),
            "127.0.0.1",
            echoPort,
            **kwargs,
        )
        peer = yield self.connectEndpoint(endpoint)
        peer.tcp.write(b"hello")
        received = yield peer.until(lambda received: received == b"hello")
        self.assertEqual(received, b"hello")
        return peer

    @inlineCallbacks
    def test_endpoint(self) -> Yielding:
        """
        An L{UpstreamEndpoint} on its own connects any protocol to the target
        through the parent.
        """
        yield self.echoThroughEndpoint("127.0.0.1")

    @inlineCallbacks
    def test_parentReachedByHand(self) -> Yielding:
        """
        With a resolver of its own, an L{UpstreamEndpoint} on a POSIX
        reactor reaches the parent's address by hand, as a target's: the
        connection is a L{DirectTransport}.
        """
        peer = yield self.echoThroughEndpoint(
            "localhost", resolver=FakeResolver({"localhost": ["127.0.0.1"]})
        )
        self.assertIs(type(peer.tcp), DirectTransport)

    @inlineCallbacks
    def test_endpointRefused(self) -> Yielding:
        """
        The parent's refusal fails an L{UpstreamEndpoint}'s Deferred with
        L{UpstreamRefused} and the parent's status: 403 for a port its
        policy denies, 407 without credentials it requires.
        """
        echoPort = self.echoServer()
        cases: list[tuple[dict[str, Any], int]] = [
            ({"policy": TunnelPolicy()}, 403),
            (
                {
                    "portal": portalFromCheckers(
                        [InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")]
                    )
                },
                407,
            ),
        ]
        for kwargs, status in cases:
            parentPort = self.startParent(**kwargs)
            endpoint = UpstreamEndpoint(
                reactor,
                parseUpstreamURL(f"http://127.0.0.1:{parentPort}"),
                "127.0.0.1",
                echoPort,
            )
            with self.assertRaises(UpstreamRefused) as raised:
                yield connectProtocol(endpoint, Peer())
            self.assertEqual(raised.exception.status, status)

    @inlineCallbacks
    def test_untrustedParent(self) -> Yielding:
        """
        A parent whose certificate does not chain to the trusted CA, has
        expired, or does not name the host in the URL (another name, or
        none in a subjectAltName) is refused: TLS fails before any request
        is sent, and the failure says which.
        """
        echoPort = self.echoServer()
        parentPort = self.startParent(tls=True)
        expiredPort = self.startParent(tls=True, certificate="localhostExpired")
        noNamePort = self.startParent(tls=True, certificate="localhostNoSAN")
        plainPort = self.startParent()
        resolver = FakeResolver({"localhost": ["127.0.0.1"]})
        for url, ca, why in [
            (
                # A parent that does not speak TLS: OpenSSL's reason, not
                # pyOpenSSL's list of tuples.
                f"https://localhost:{plainPort}",
                self.caFile(),
                "TLS with the parent proxy failed: wrong version number (does"
                " the parent speak TLS on that port?)",
            ),
            (
                f"https://localhost:{parentPort}",
                self.caFile("otherCA"),
                "certificate verify failed: unable to get local issuer"
                " certificate (the parent's certificate)",
            ),
            (
                f"https://localhost:{expiredPort}",
                self.caFile(),
                "certificate verify failed: certificate has expired"
                " (the parent's certificate)",
            ),
            (
                f"https://127.0.0.1:{parentPort}",
                self.caFile(),
                "certificate verify failed: the parent's certificate does not"
                " name 127.0.0.1 in its subjectAltName",
            ),
            (
                f"https://localhost:{noNamePort}",
                self.caFile(),
                "certificate verify failed: the parent's certificate names no"
                " host in a subjectAltName",
            ),
        ]:
            endpoint = UpstreamEndpoint(
                reactor,
                parseUpstreamURL(url),
                "127.0.0.1",
                echoPort,
                caCertificate=ca,
                resolver=resolver,
            )
            with self.assertRaises(UpstreamProtocolError) as raised:
                yield connectProtocol(endpoint, Peer())
            self.assertTrue(
                str(raised.exception).startswith("TLS with the parent proxy failed: "),
                str(raised.exception),
            )
            self.assertNotIn("did not answer properly", str(raised.exception))
            self.assertIn(why, str(raised.exception))
