"""
Loopback integration tests: the proxy on real sockets, with real clients.

Everything listens on 127.0.0.1 or ::1, always on port 0, and the proxy
resolves target names with L{FakeResolver}: nothing leaves the host and no
DNS query is ever sent.  Every connection and listening port a test opens is
closed, and waited for, before the test ends.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import shutil
import socket
import ssl as stdlibSSL
import struct
from collections.abc import Callable, Generator
from http.client import HTTPSConnection
from typing import Any, Generic, TypeVar, cast
from typing import Protocol as TypingProtocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor as globalReactor
from twisted.internet import tcp
from twisted.internet.defer import (
    Deferred,
    DeferredQueue,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    serverFromString,
)
from twisted.internet.error import (
    CannotListenError,
    ConnectionDone,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from zope.interface import implementer

from tests.fakes import FakeResolver, turnsUntil
from tunnel import (
    ConnectProxy,
    ConnectProxyFactory,
    HostnameConnector,
    ITargetConnector,
)
from tunnel.policy import TunnelPolicy

reactor: Any = globalReactor

T = TypeVar("T")
Yielding = Generator[Deferred[Any], Any, T]

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
MiB = 1024 * 1024
PAGE = b"Hello from the far side of the tunnel.\n"
# The default policy allows only port 443 and only public addresses; these
# tests reach loopback targets on any port.
LOOPBACK = TunnelPolicy.fromStrings(ports=["any"], allowTo=["127.0.0.0/8", "::1"])


class Once(Generic[T]):
    """
    Something that happens at most once, that any number of callers can wait
    for, before or after it happened.

    @ivar happened: Whether it has happened.
    """

    def __init__(self) -> None:
        self.happened = False
        self._result: T | None = None
        self._failure: Failure | None = None
        self._waiting: list[Deferred[T]] = []

    def fire(self, result: T) -> None:
        """
        It happened, with this result; later calls are ignored.
        """
        if not self.happened:
            self.happened = True
            self._result = result
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(result)

    def fail(self, reason: Failure) -> None:
        """
        It will never happen, for this reason; later calls are ignored.
        """
        if not self.happened:
            self.happened = True
            self._failure = reason
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.errback(reason)

    def wait(self) -> Deferred[T]:
        """
        @return: A Deferred that fires when it happens (or at once if it has).
        """
        if self._failure is not None:
            return fail(self._failure)
        if self.happened:
            return succeed(cast(T, self._result))
        waiter: Deferred[T] = Deferred()
        self._waiting.append(waiter)
        return waiter


class ClosedTooSoon(Exception):
    """
    A connection ended before what a test waited for arrived.
    """


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """
    One end of a test connection, client or server: counts and hashes what it
    receives, and records each half of the connection ending.

    Used as a client of the proxy it first reads the response head (see
    L{expectResponseHead}); what follows the head is tunnel data.

    @ivar received: The tunnel bytes received (if C{keep}).
    @ivar count: How many tunnel bytes were received.
    @ivar digest: The SHA-256 of the tunnel bytes received.
    @ivar eof: Fires when the peer's FIN arrives.
    @ivar lost: Fires when the connection is closed; C{lostReason} says why.
    """

    def __init__(self, closeOnEOF: bool = True, keep: bool = True) -> None:
        """
        @param closeOnEOF: Close the connection when the peer's FIN arrives,
            as a protocol that does not half-close would.
        @param keep: Keep the bytes received (not only count and hash them).
        """
        self.closeOnEOF = closeOnEOF
        self.keep = keep
        self.received = bytearray()
        self.count = 0
        self.digest = hashlib.sha256()
        self.made: Once[Peer] = Once()
        self.eof: Once[None] = Once()
        self.lost: Once[None] = Once()
        self.lostReason: Failure | None = None
        self._head: bytearray | None = None
        self._responseHead: Once[bytes] = Once()
        self._countWaiters: list[tuple[int, Deferred[None]]] = []

    @property
    def tcp(self) -> Any:
        """
        The transport, untyped: tests use TCP-only methods such as
        C{loseWriteConnection} and C{pauseProducing}.
        """
        return self.transport

    def expectResponseHead(self) -> Deferred[bytes]:
        """
        Treat the first bytes received as an HTTP response head.

        @return: Fires with the head, up to and including its empty line.
        """
        self._head = bytearray()
        return self._responseHead.wait()

    def waitFor(self, count: int) -> Deferred[None]:
        """
        @return: Fires once at least C{count} tunnel bytes were received, or
            fails with L{ClosedTooSoon} if the connection ends before.
        """
        waiter: Deferred[None] = Deferred()
        self._countWaiters.append((count, waiter))
        self._checkWaiters()
        return waiter

    def connectionMade(self) -> None:
        """
        Announce the connection.
        """
        self.made.fire(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Split off the response head, if one is expected, then record.
        """
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end == -1:
                if len(self._head) > 65536:
                    self.tcp.abortConnection()
                return
            head, rest = bytes(self._head[: end + 4]), bytes(self._head[end + 4 :])
            self._head = None
            if rest:
                self._record(rest)
            self._responseHead.fire(head)
            return
        self._record(data)

    def _record(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)
        if self.keep:
            self.received += data
        self._checkWaiters()

    def _checkWaiters(self) -> None:
        waiters, self._countWaiters = self._countWaiters, []
        for count, waiter in waiters:
            if self.count >= count:
                waiter.callback(None)
            elif self.lost.happened:
                waiter.errback(
                    ClosedTooSoon(f"closed after {self.count} of {count} bytes")
                )
            else:
                self._countWaiters.append((count, waiter))

    def readConnectionLost(self) -> None:
        """
        The peer sent FIN.
        """
        self.eof.fire(None)
        if self.closeOnEOF:
            self.tcp.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Our FIN went out.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Record the end of the connection and fail whatever still waits.
        """
        self.lostReason = reason
        self.lost.fire(None)
        self._responseHead.fail(Failure(ClosedTooSoon("no complete response head")))
        self._checkWaiters()


class Echo(Peer):
    """
    A target that sends back whatever it receives.
    """

    def dataReceived(self, data: bytes) -> None:
        """
        Record and echo.
        """
        super().dataReceived(data)
        self.tcp.write(data)


class ResetAtOnce(Peer):
    """
    A target that accepts and resets the connection at once.
    """

    def connectionMade(self) -> None:
        """
        Reset.
        """
        super().connectionMade()
        self.tcp.abortConnection()


class PeerFactory(Factory):
    """
    Builds L{Peer}s for a test server.

    @ivar accepted: The peers, each put once its connection is made.
    """

    noisy = False

    def __init__(self, make: Callable[[], Peer], track: Callable[[Peer], None]) -> None:
        self._make = make
        self._track = track
        self.accepted: DeferredQueue[Peer] = DeferredQueue()
        self.port = 0

    def buildProtocol(self, addr: IAddress | None) -> Peer:
        """
        Build a peer; it is tracked for cleanup and queued once connected.
        """
        peer = self._make()
        peer.factory = self
        self._track(peer)
        peer.made.wait().addCallback(self.accepted.put)
        return peer


class TrackedChannel(HTTPChannel):
    """
    An HTTP channel that reports the end of its connection.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lost: Once[None] = Once()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Report the end.
        """
        super().connectionLost(reason)
        self.lost.fire(None)


class TrackedSite(Site):
    """
    A site whose connections are tracked for cleanup.
    """

    protocol = TrackedChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, track: Callable[[Any], None]) -> None:
        super().__init__(resource)
        self._track = track

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """
        Build a channel and track it.
        """
        channel = super().buildProtocol(addr)
        self._track(channel)
        return channel


class Closable(TypingProtocol):
    """
    A connection a test opened: it can be aborted and reports its end.
    """

    lost: Once[None]
    transport: Any


def streamChunk(seed: bytes, index: int, size: int) -> bytes:
    """
    Give one chunk of a deterministic pseudo-random stream.

    @param seed: Names the stream.
    @param index: Which chunk.
    @param size: Its length.
    @return: SHAKE-256 of the seed and the chunk index, C{size} bytes long.
    """
    return hashlib.shake_256(seed + index.to_bytes(8, "big")).digest(size)


@implementer(IPushProducer)
class DataSource:
    """
    Writes a deterministic pseudo-random stream to a transport as a streaming
    producer: it writes only while the transport does not pause it, so the
    transport's buffer stays small and the stream is never all in memory.

    @ivar sent: Bytes written so far.
    @ivar digest: The SHA-256 of the bytes written so far.
    @ivar paused: Whether the consumer has paused this producer.
    @ivar finished: Fires when all C{size} bytes were written.
    @ivar pauses: How many times the consumer paused this producer.
    @ivar resumes: How many times the consumer resumed it.
    @ivar onPause: Called each time the consumer pauses this producer.
    @ivar onResume: Called each time the consumer resumes this producer.
    """

    chunkSize = 65536

    def __init__(self, seed: bytes, size: int) -> None:
        self.seed = seed
        self.size = size
        self.sent = 0
        self.digest = hashlib.sha256()
        self.paused = False
        self.finished: Once[None] = Once()
        self.pauses = 0
        self.resumes = 0
        self.onPause: Callable[[], None] = lambda: None
        self.onResume: Callable[[], None] = lambda: None
        self._stopped = False
        self._consumer: Any = None

    def start(self, consumer: Any) -> None:
        """
        Register with C{consumer} and start writing.
        """
        self._consumer = consumer
        consumer.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        """
        Write chunks until paused or done.
        """
        self.paused = False
        self.resumes += 1
        self.onResume()
        # Bounded: each pass writes one of the size/chunkSize chunks.
        while not (self.paused or self._stopped) and self.sent < self.size:
            length = min(self.chunkSize, self.size - self.sent)
            chunk = streamChunk(self.seed, self.sent // self.chunkSize, length)
            self.sent += length
            self.digest.update(chunk)
            self._consumer.write(chunk)
        if self.sent == self.size and not self.finished.happened:
            self._consumer.unregisterProducer()
            self.finished.fire(None)

    def pauseProducing(self) -> None:
        """
        Stop writing until resumed.
        """
        self.paused = True
        self.pauses += 1
        self.onPause()

    def stopProducing(self) -> None:
        """
        The connection is gone: never write again.
        """
        self._stopped = True


@implementer(IStreamClientEndpoint)
class NeverConnects:
    """
    An endpoint whose connection attempts never finish, and which records
    being asked and being cancelled.
    """

    def __init__(self) -> None:
        self.attempted: Once[None] = Once()
        self.cancelled: Once[None] = Once()

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Start an attempt that only a cancellation ends.
        """
        self.attempted.fire(None)
        return Deferred(lambda attempt: self.cancelled.fire(None))


@implementer(ITargetConnector)
class FixedConnector:
    """
    Reaches every target through one endpoint, recording the targets.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint
        self.targets: list[tuple[str, int]] = []

    def endpointForTarget(
        self, host: str, port: int, allowAddress: object = None
    ) -> IStreamClientEndpoint:
        """
        Record the target, give the endpoint.
        """
        self.targets.append((host, port))
        return self.endpoint


class RunningProxy:
    """
    A proxy listening on 127.0.0.1.

    @ivar port: Its port number.
    @ivar factory: Its L{ConnectProxyFactory}.
    @ivar resolver: The fake resolver its connector uses.
    """

    def __init__(
        self, port: int, factory: ConnectProxyFactory, resolver: FakeResolver
    ) -> None:
        self.port = port
        self.factory = factory
        self.resolver = resolver


@functools.cache
def localhostCertificate() -> tuple[bytes, bytes]:
    """
    Make a self-signed certificate for C{localhost} and 127.0.0.1, once.

    @return: The certificate and its EC P-256 private key, both PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), keyPEM


def connectHead(authority: str) -> bytes:
    """
    A CONNECT request head for C{authority}.
    """
    target = authority.encode("ascii")
    return b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)


def pendingWrite(transport: Any) -> int:
    """
    How many bytes a Twisted transport holds that it has not yet written to
    its socket (see C{twisted.internet.abstract.FileDescriptor}).
    """
    return int(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)


def proxySideOf(transport: Any) -> Any:
    """
    Find the proxy's transport for a loopback connection, from the transport
    of its other end, among the reactor's readers and writers.
    """
    local, remote = transport.getHost(), transport.getPeer()
    for selectable in {*reactor.getReaders(), *reactor.getWriters()}:
        if isinstance(selectable, tcp.Connection) and (
            selectable.getHost(),
            selectable.getPeer(),
        ) == (remote, local):
            return selectable
    raise LookupError(f"no transport from {remote} to {local}")


class LoopbackTestCase(TestCase):
    """
    Helpers to run a proxy, targets and clients on loopback, and to close
    them all when the test ends.

    Each proxy connection logs one event when it has ended; for a tunnel that
    is after both its connections are closed.  Cleanup aborts whatever test
    connection is still open, then waits for every proxy connection's event,
    so that no socket is left behind.
    """

    # Each test takes well under a second; fail a hung one quickly.
    timeout = 30

    def setUp(self) -> None:
        self._open: list[Closable] = []
        self._factories: list[ConnectProxyFactory] = []
        self._proxyClients = 0
        self.proxyEvents: list[LogEvent] = []
        self._eventWaiters: list[tuple[int, Deferred[list[LogEvent]]]] = []
        observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.addCleanup(self._closeEverything)

    def _observe(self, event: LogEvent) -> None:
        if isinstance(event.get("log_source"), ConnectProxy) and "ended" in event:
            self.proxyEvents.append(event)
            waiters, self._eventWaiters = self._eventWaiters, []
            for count, waiter in waiters:
                if len(self.proxyEvents) >= count:
                    waiter.callback(self.proxyEvents[:count])
                else:
                    self._eventWaiters.append((count, waiter))

    def proxyEnded(self, count: int) -> Deferred[list[LogEvent]]:
        """
        @return: Fires with the first C{count} end-of-connection events the
            proxy logs, once it has logged them.
        """
        if len(self.proxyEvents) >= count:
            return succeed(self.proxyEvents[:count])
        waiter: Deferred[list[LogEvent]] = Deferred()
        self._eventWaiters.append((count, waiter))
        return waiter

    def expectProxyConnections(self, count: int) -> None:
        """
        Note that a client the helpers do not know about (an external program,
        say) opens C{count} connections to the proxy.
        """
        self._proxyClients += count

    @inlineCallbacks
    def _closeEverything(self) -> Yielding[None]:
        for connection in self._open:
            if not connection.lost.happened:
                connection.transport.abortConnection()
        yield gatherResults([connection.lost.wait() for connection in self._open])
        yield self.proxyEnded(self._proxyClients)
        # A refused connection logs its event when it answers, then lingers
        # until the client closes; wait for those sockets too.
        yield gatherResults([factory.drain(10) for factory in self._factories])

    def listen(
        self, factory: Any, interface: str = "127.0.0.1", tls: Any = None
    ) -> int:
        """
        Listen on port 0 of C{interface}, until the test ends.

        @param tls: Context options for a TLS listener, or L{None} for TCP.
        @return: The port number.
        """
        if tls is None:
            port = reactor.listenTCP(0, factory, interface=interface)
        else:
            port = reactor.listenSSL(0, factory, tls, interface=interface)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def startProxy(
        self,
        hostMap: dict[str, list[str]] | None = None,
        connector: ITargetConnector | None = None,
    ) -> RunningProxy:
        """
        Run a proxy whose connector resolves names with a L{FakeResolver}.

        @param hostMap: What the fake resolver knows.
        @param connector: Another connector to use instead.
        """
        resolver = FakeResolver(hostMap)
        if connector is None:
            connector = HostnameConnector(reactor, resolver=resolver)
        # The plain relay; tests/test_splice.py runs these tests spliced.
        factory = ConnectProxyFactory(
            connector, reactor=reactor, policy=LOOPBACK, splice=False
        )
        self._factories.append(factory)
        return RunningProxy(self.listen(factory), factory, resolver)

    def serve(
        self, make: Callable[[], Peer] = Echo, interface: str = "127.0.0.1"
    ) -> PeerFactory:
        """
        Run a target server whose connections are C{make()} peers.

        @return: Its factory; its C{port} is the port number.
        """
        factory = PeerFactory(make, self._open.append)
        factory.port = self.listen(factory, interface)
        return factory

    def serveTLS(self) -> tuple[int, str]:
        """
        Run an HTTPS server for C{localhost} serving L{PAGE} at C{/page}.

        @return: Its port number, and the path of a file holding the
            certificate that clients should trust.
        """
        certificatePEM, keyPEM = localhostCertificate()
        root = Resource()
        root.putChild(b"page", Data(PAGE, "text/plain"))
        site = TrackedSite(root, self._open.append)
        site.noisy = False
        options = PrivateCertificate.loadPEM(keyPEM + certificatePEM).options()
        certificatePath = self.mktemp()
        with open(certificatePath, "wb") as certificateFile:
            certificateFile.write(certificatePEM)
        return self.listen(site, tls=options), certificatePath

    @inlineCallbacks
    def connectToProxy(
        self, proxyPort: int, peer: Peer, source: str | None = None
    ) -> Yielding[Peer]:
        """
        Open a TCP connection to the proxy, tracked for cleanup.

        @param source: The loopback address to connect from (another
            client, for the proxy), or L{None} for C{127.0.0.1}.
        """
        endpoint = TCP4ClientEndpoint(
            reactor,
            "127.0.0.1",
            proxyPort,
            bindAddress=None if source is None else (source, 0),
        )
        yield connectProtocol(endpoint, peer)
        self._open.append(peer)
        self._proxyClients += 1
        return peer

    @inlineCallbacks
    def requestTunnel(
        self, proxyPort: int, authority: str, peer: Peer, early: bytes = b""
    ) -> Yielding[bytes]:
        """
        Connect C{peer} to the proxy and send a CONNECT request for
        C{authority}, followed by C{early} in the same write.

        @return: Fires with the proxy's response head.
        """
        head = peer.expectResponseHead()
        yield self.connectToProxy(proxyPort, peer)
        peer.tcp.write(connectHead(authority) + early)
        response: bytes = yield head
        return response

    @inlineCallbacks
    def connectThrough(
        self, proxyPort: int, authority: str, peer: Peer, early: bytes = b""
    ) -> Yielding[Peer]:
        """
        Open a tunnel to C{authority} for C{peer}.

        @return: Fires with C{peer} once the proxy's 200 response is read;
            fails the test if the response is anything else.
        """
        head = yield self.requestTunnel(proxyPort, authority, peer, early)
        self.assertEqual(head, ESTABLISHED)
        return peer

    def assertClosedCleanly(self, peer: Peer) -> None:
        """
        Check that C{peer}'s connection was closed cleanly, not reset.
        """
        self.assertTrue(peer.lost.happened)
        assert peer.lostReason is not None
        self.assertIsInstance(peer.lostReason.value, ConnectionDone)

    def assertEnded(
        self, event: LogEvent, target: str, status: object, ended: str
    ) -> None:
        """
        Check the proxy's end-of-connection event.
        """
        self.assertEqual(
            (event["target"], event["status"], event["ended"]),
            (target, status, ended),
        )


class TunnelTests(LoopbackTestCase):
    """
    Tunnels to targets on loopback.
    """

    @inlineCallbacks
    def test_echoThroughTunnel(self) -> Yielding[None]:
        """
        A client that sends C{CONNECT 127.0.0.1:PORT} gets exactly
        C{HTTP/1.1 200 Connection Established} and an empty line, and then
        talks to the target: its bytes come back from an echo server.  When
        the client closes, the tunnel ends cleanly.
        """
        proxy = self.startProxy()
        echo = self.serve(Echo)
        authority = f"127.0.0.1:{echo.port}"
        client = yield self.connectThrough(proxy.port, authority, Peer())
        client.tcp.write(b"ping through the tunnel")
        yield client.waitFor(23)
        self.assertEqual(client.received, b"ping through the tunnel")
        client.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEnded(event, authority, 200, "client-eof")
        self.assertEqual((event["bytesUp"], event["bytesDown"]), (23, 23))
        # An address literal is connected to directly, without a lookup.
        self.assertEqual(proxy.resolver.queries, [])

    @inlineCallbacks
    def test_targetResetsAtOnce(self) -> Yielding[None]:
        """
        A target that accepts and resets at once: whether the reset comes
        before the proxy answered (a 502) or after (the 200, then the
        reset), the client gets an answer, never a reset alone, which would
        hide the 200 the proxy logs.
        """
        proxy = self.startProxy()
        target = self.serve(ResetAtOnce)
        authority = f"127.0.0.1:{target.port}"
        heads = []
        for _ in range(10):
            peer = Peer()
            head = peer.expectResponseHead()
            yield self.connectToProxy(proxy.port, peer)
            peer.tcp.write(connectHead(authority))
            yield peer.lost.wait()
            self.assertTrue(head.called, "no answer before the reset")
            heads.append((yield head))
        events = yield self.proxyEnded(10)
        for head, event in zip(heads, events, strict=True):
            if head == ESTABLISHED:
                self.assertEqual(
                    (event["status"], event["ended"]), (200, "target-reset")
                )
            else:
                self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)

    @inlineCallbacks
    def test_echoThroughTunnelIPv6(self) -> Yielding[None]:
        """
        C{CONNECT [::1]:PORT} reaches an echo server listening on ::1.
        """
        proxy = self.startProxy()
        try:
            echo = self.serve(Echo, interface="::1")
        except CannotListenError as e:
            raise SkipTest(f"cannot listen on ::1: {e}") from e
        authority = f"[::1]:{echo.port}"
        client = yield self.connectThrough(proxy.port, authority, Peer())
        client.tcp.write(b"ping over IPv6")
        yield client.waitFor(14)
        self.assertEqual(client.received, b"ping over IPv6")
        client.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEnded(event, authority, 200, "client-eof")

    @inlineCallbacks
    def test_nameResolvesToEchoServer(self) -> Yielding[None]:
        """
        A target named by a host name is reached at the address the resolver
        gives for it.
        """
        proxy = self.startProxy({"echo.test": ["127.0.0.1"]})
        echo = self.serve(Echo)
        authority = f"echo.test:{echo.port}"
        client = yield self.connectThrough(proxy.port, authority, Peer())
        client.tcp.write(b"hello by name")
        yield client.waitFor(13)
        self.assertEqual(client.received, b"hello by name")
        self.assertEqual(proxy.resolver.queries, ["echo.test"])
        client.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEnded(event, authority, 200, "client-eof")

    @inlineCallbacks
    def test_earlyDataReachesTargetFirstAndOnce(self) -> Yielding[None]:
        """
        Bytes the client sends in the same write as the CONNECT head, before
        any response, reach the target first and exactly once, followed by
        what the client sends after the 200.
        """
        proxy = self.startProxy()
        targets = self.serve(Peer)
        early = b"\x16\x03\x01 early bytes sent with the head"
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(), early=early
        )
        target = yield targets.accepted.get()
        yield target.waitFor(len(early))
        self.assertEqual(target.received, early)
        client.tcp.write(b"and then more")
        yield target.waitFor(len(early) + 13)
        self.assertEqual(target.received, early + b"and then more")
        client.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["bytesUp"], len(early) + 13)

    @inlineCallbacks
    def test_clientHalfCloses(self) -> Yielding[None]:
        """
        When the client shuts down its sending side, the target sees EOF and
        can still answer; the client reads the answer, and sees the end only
        once the target closes.
        """
        proxy = self.startProxy()
        targets = self.serve(lambda: Peer(closeOnEOF=False))
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(closeOnEOF=False)
        )
        target = yield targets.accepted.get()
        client.tcp.write(b"question")
        yield target.waitFor(8)
        client.tcp.loseWriteConnection()
        yield target.eof.wait()
        target.tcp.write(b"answer after EOF")
        yield client.waitFor(16)
        self.assertEqual(client.received, b"answer after EOF")
        self.assertFalse(client.eof.happened)
        target.tcp.loseConnection()
        yield client.eof.wait()
        client.tcp.loseConnection()
        yield gatherResults([client.lost.wait(), target.lost.wait()])
        self.assertClosedCleanly(client)
        self.assertClosedCleanly(target)
        self.assertEqual(target.received, b"question")
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["ended"], "client-eof")
        self.assertEqual((event["bytesUp"], event["bytesDown"]), (8, 16))

    @inlineCallbacks
    def test_urgentData(self) -> Yielding[None]:
        """
        TCP urgent data (C{MSG_OOB}) in the middle of a long stream, each
        way, is passed over as a plain socket read does: the urgent byte
        itself is dropped, and every byte before and after it arrives, then
        the FIN, all counted.  (The kernel stops C{splice} at the urgent
        mark: read as an end of file, that cut the stream short behind a
        clean FIN, and before the FIN came it made the relay spin.)
        """
        proxy = self.startProxy()
        targets = self.serve(lambda: Peer(closeOnEOF=False))
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(closeOnEOF=False)
        )
        target = yield targets.accepted.get()
        # More than one 64 KiB read first, so that a splicing relay splices.
        before, after = b"a" * 200_000, b"b" * 100_000 + b"END"
        for sender, receiver in [(client, target), (target, client)]:
            sender.tcp.write(before)
            yield receiver.waitFor(len(before))
            sender.tcp.socket.send(b"!", socket.MSG_OOB)
            sender.tcp.write(after)
            sender.tcp.loseWriteConnection()
            yield receiver.eof.wait()
            self.assertEqual(bytes(receiver.received), before + after)
        client.tcp.loseConnection()
        target.tcp.loseConnection()
        yield gatherResults([client.lost.wait(), target.lost.wait()])
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["ended"], "client-eof")
        self.assertEqual((event["bytesUp"], event["bytesDown"]), (300_003, 300_003))

    @inlineCallbacks
    def test_targetHalfCloses(self) -> Yielding[None]:
        """
        When the target shuts down its sending side, the client sees EOF and
        can still send to the target, which receives it; the tunnel ends
        when the client closes too.
        """
        proxy = self.startProxy()
        targets = self.serve(Peer)
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(closeOnEOF=False)
        )
        target = yield targets.accepted.get()
        target.tcp.write(b"last words")
        target.tcp.loseWriteConnection()
        yield client.eof.wait()
        self.assertEqual(client.received, b"last words")
        client.tcp.write(b"a late reply")
        yield target.waitFor(12)
        self.assertEqual(target.received, b"a late reply")
        self.assertFalse(target.eof.happened)
        client.tcp.loseConnection()
        yield gatherResults([client.lost.wait(), target.lost.wait()])
        self.assertTrue(target.eof.happened)
        self.assertClosedCleanly(target)
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["ended"], "target-eof")
        self.assertEqual((event["bytesUp"], event["bytesDown"]), (12, 10))

    @inlineCallbacks
    def test_targetResetsAfterItsFIN(self) -> Yielding[None]:
        """
        A target that sent FIN and then resets is a reset, not an end: when
        the client's next bytes find the target gone, the client's
        connection is reset too (not closed as if all went well), and the
        tunnel ends C{target-reset}.
        """
        yield self.assertResetAfterFIN("target")

    @inlineCallbacks
    def test_clientResetsAfterItsFIN(self) -> Yielding[None]:
        """
        The same the other way: a client that sent FIN and then resets gets
        the target reset when the target's next bytes find it gone.
        """
        yield self.assertResetAfterFIN("client")

    @inlineCallbacks
    def assertResetAfterFIN(self, side: str) -> Yielding[None]:
        """
        Have C{side} send FIN, then reset; the other side then writes.
        """
        proxy = self.startProxy()
        targets = self.serve(lambda: Peer(closeOnEOF=False))
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(closeOnEOF=False)
        )
        target = yield targets.accepted.get()
        leaving, staying = (target, client) if side == "target" else (client, target)
        leaving.tcp.loseWriteConnection()
        yield staying.eof.wait()
        leaving.tcp.abortConnection()
        yield leaving.lost.wait()
        # The proxy no longer watches the finished side for reading: its
        # reset shows when bytes go towards it.
        staying.tcp.write(b"late bytes")
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["ended"], f"{side}-reset")
        # The proxy reset the staying side's connection (TCP_CLOSE), rather
        # than closing it as after a clean end (which leaves CLOSE_WAIT).
        handle = staying.tcp.getHandle()
        tcpState = handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        self.assertEqual(tcpState, _TCP_CLOSE)


#: The state of a TCP socket after a reset (include/net/tcp_states.h).
_TCP_CLOSE = 7


class FlowTests(LoopbackTestCase):
    """
    Bulk transfers and flow control through the tunnel.
    """

    @inlineCallbacks
    def test_bulkBothWaysAtOnce(self) -> Yielding[None]:
        """
        64 MiB from the client and 64 MiB from the target, sent at the same
        time by streaming producers, arrive intact: the SHA-256 of what each
        side receives is that of what the other side sent.
        """
        size = 64 * MiB
        proxy = self.startProxy()
        targets = self.serve(lambda: Peer(keep=False))
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(keep=False)
        )
        target = yield targets.accepted.get()
        up = DataSource(b"client to target", size)
        down = DataSource(b"target to client", size)
        up.start(client.tcp)
        down.start(target.tcp)
        yield gatherResults(
            [
                client.waitFor(size),
                target.waitFor(size),
                up.finished.wait(),
                down.finished.wait(),
            ]
        )
        self.assertEqual(target.digest.hexdigest(), up.digest.hexdigest())
        self.assertEqual(client.digest.hexdigest(), down.digest.hexdigest())
        client.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["bytesUp"], event["bytesDown"]), (size, size))
        self.assertEqual((target.count, client.count), (size, size))

    @inlineCallbacks
    def test_slowReaderBoundsProxyBuffers(self) -> Yielding[None]:
        """
        While the client does not read, the proxy stops reading from the
        target instead of buffering: the target, sending 256 MiB through a
        streaming producer, ends up paused by backpressure, and the proxy's
        two transports never hold more than a few reads' worth of bytes
        (under 1 MiB together, the bound the project promises; about 93 KiB
        here).  Once the client reads again, data flows again.
        """
        bound = MiB
        proxy = self.startProxy()
        targets = self.serve(lambda: Peer(keep=False))
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(keep=False)
        )
        client.tcp.pauseProducing()
        target = yield targets.accepted.get()
        [connection] = proxy.factory.connections
        proxyClientSide = cast(Any, connection.transport)
        self.assertIs(proxyClientSide, proxySideOf(client.tcp))
        proxyTargetSide = proxySideOf(target.tcp)
        source = DataSource(b"to a slow reader", 256 * MiB)
        mostHeld = [0, 0]
        blocked: Once[None] = Once()

        def observe() -> None:
            held = [pendingWrite(proxyClientSide), pendingWrite(proxyTargetSide)]
            mostHeld[:] = map(max, mostHeld, held)
            if sum(held) >= bound:
                blocked.fail(Failure(self.failureException(f"proxy holds {held}")))
            elif source.paused and proxyTargetSide not in reactor.getReaders():
                # The target is paused, and the proxy is not reading from it.
                blocked.fire(None)

        def sentEverything(ignored: None) -> None:
            blocked.fail(Failure(self.failureException("the proxy never pushed back")))

        source.onPause = observe
        source.finished.wait().addCallback(sentEverything)
        source.start(target.tcp)
        # The usual signal is a pause of the target at a moment when the
        # proxy has stopped reading from it.  Should the proxy stop reading
        # only after the target's last pause (if the target's buffer can
        # then never drain, nothing pauses it again), the target goes quiet
        # instead: so also check once it has gone ten reactor turns without
        # being paused or resumed.  Bounded, like every loop here.
        quietTurns = 0
        lastNews = source.pauses + source.resumes
        for _ in range(100_000):
            if blocked.happened:
                break
            yield deferLater(reactor, 0, lambda: None)
            news = source.pauses + source.resumes
            quietTurns = quietTurns + 1 if news == lastNews else 0
            lastNews = news
            if quietTurns >= 10:
                observe()
        self.assertTrue(blocked.happened, "the target was never held back")
        yield blocked.wait()
        self.assertLess(source.sent, source.size)
        self.assertLess(sum(mostHeld), bound)

        resumed: Once[None] = Once()
        source.onPause = lambda: None
        source.onResume = lambda: resumed.fire(None)
        alreadyReceived = client.count
        client.tcp.resumeProducing()
        yield gatherResults([resumed.wait(), client.waitFor(alreadyReceived + MiB)])


class FailureTests(LoopbackTestCase):
    """
    Targets that cannot be reached, and clients that leave.
    """

    @inlineCallbacks
    def assertBadGateway(self, proxy: RunningProxy, authority: str) -> Yielding[None]:
        """
        Request a tunnel to C{authority} and check that the proxy answers 502
        with C{Connection: close}, then closes the connection itself.
        """
        client = Peer()
        head = yield self.requestTunnel(proxy.port, authority, client)
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        fields = head.lower().split(b"\r\n")
        self.assertIn(b"connection: close", fields)
        yield client.lost.wait()
        self.assertTrue(client.eof.happened, "the proxy did not send FIN")
        self.assertClosedCleanly(client)
        [length] = [f for f in fields if f.startswith(b"content-length:")]
        self.assertEqual(client.count, int(length.split(b":")[1]))
        [event] = yield self.proxyEnded(1)
        self.assertEnded(event, authority, 502, "target-failed")

    @inlineCallbacks
    def test_targetRefuses(self) -> Yielding[None]:
        """
        A target port where nothing listens gets a 502 response with
        C{Connection: close}, and the proxy closes the connection.
        """
        proxy = self.startProxy()
        closed = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        portNumber = closed.getHost().port
        yield closed.stopListening()
        yield self.assertBadGateway(proxy, f"127.0.0.1:{portNumber}")

    @inlineCallbacks
    def test_nameDoesNotResolve(self) -> Yielding[None]:
        """
        A target name that does not resolve gets a 502 response.
        """
        proxy = self.startProxy({})
        yield self.assertBadGateway(proxy, "nowhere.invalid:443")
        self.assertEqual(proxy.resolver.queries, ["nowhere.invalid"])

    @inlineCallbacks
    def test_clientLeavesWhileConnecting(self) -> Yielding[None]:
        """
        A client that goes away while the proxy is still reaching the target
        has the connection attempt cancelled.
        """
        endpoint = NeverConnects()
        connector = FixedConnector(endpoint)
        proxy = self.startProxy(connector=connector)
        client = yield self.connectToProxy(proxy.port, Peer())
        client.tcp.write(connectHead("pending.test:443"))
        yield endpoint.attempted.wait()
        self.assertEqual(connector.targets, [("pending.test", 443)])
        client.tcp.abortConnection()
        yield endpoint.cancelled.wait()
        [event] = yield self.proxyEnded(1)
        self.assertEnded(event, "pending.test:443", "-", "client-left")


class BeforeAcceptTests(LoopbackTestCase):
    """
    Clients that send, end or reset before the proxy has accepted their
    connection.
    """

    def sentBeforeAccept(self, port: int, data: bytes) -> socket.socket:
        """
        Connect to C{port} and send C{data} while the reactor is not
        running: the kernel completes the connection and holds the bytes
        until the proxy accepts it.

        @return: The client socket, non-blocking; closed when the test ends.
        """
        client = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(client.close)
        client.sendall(data)
        client.setblocking(False)
        self.expectProxyConnections(1)
        return client

    @inlineCallbacks
    def test_resetBeforeAccept(self) -> Yielding[None]:
        """
        A client that sent part of a head and then reset its connection,
        all before the proxy accepted it, is found gone once accepted: the
        connection ends (C{client-left}) and is forgotten, with nothing
        logged as an error.
        """
        proxy = self.startProxy()
        client = self.sentBeforeAccept(proxy.port, b"CONNECT 127.0.0.1:1 HT")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["status"], event["ended"]), ("-", "client-left"))
        # Forgotten once its close has run its course, after the event.
        yield turnsUntil(reactor, lambda: not proxy.factory.connections, turns=100)
        self.assertEqual(proxy.factory.connections, set())

    @inlineCallbacks
    def test_headThenEndBeforeAccept(self) -> Yielding[None]:
        """
        A client that sent its head and then its FIN before the proxy
        accepted it still gets its tunnel: its bytes reach the target, the
        tunnel is half-closed towards the target, and the target's own FIN
        ends it.
        """
        target = self.serve()
        proxy = self.startProxy()
        client = socket.create_connection(("127.0.0.1", proxy.port))
        self.addCleanup(client.close)
        client.sendall(connectHead(f"127.0.0.1:{target.port}") + b"last")
        client.shutdown(socket.SHUT_WR)
        client.setblocking(False)
        self.expectProxyConnections(1)
        received = bytearray()
        ended = []

        def receivedAll() -> bool:
            try:
                data = client.recv(65536)
            except BlockingIOError:
                return False
            if not data:
                ended.append(True)
            received.extend(data)
            return bool(ended)

        yield turnsUntil(reactor, receivedAll)
        self.assertEqual(bytes(received), ESTABLISHED + b"last")
        self.assertEqual(ended, [True])
        [event] = yield self.proxyEnded(1)
        self.assertEnded(event, f"127.0.0.1:{target.port}", 200, "client-eof")


class RealClientTests(LoopbackTestCase):
    """
    Real HTTPS clients fetching a page from a local TLS server through the
    proxy.
    """

    @inlineCallbacks
    def test_httpClient(self) -> Yielding[None]:
        """
        Python's C{http.client.HTTPSConnection}, tunnelling with
        C{set_tunnel} to C{localhost}, fetches a page over TLS and verifies
        the server's certificate for C{localhost}.
        """
        proxy = self.startProxy({"localhost": ["127.0.0.1"]})
        tlsPort, certificatePath = self.serveTLS()

        def fetch() -> tuple[int, bytes]:
            context = stdlibSSL.create_default_context(cafile=certificatePath)
            # The timeout only keeps a broken proxy from hanging the thread.
            connection = HTTPSConnection(
                "127.0.0.1", proxy.port, context=context, timeout=30
            )
            try:
                connection.set_tunnel("localhost", tlsPort)
                connection.request("GET", "/page")
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        self.expectProxyConnections(1)
        status, body = yield deferToThread(fetch)
        self.assertEqual((status, body), (200, PAGE))
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["target"], f"localhost:{tlsPort}")
        self.assertEqual(proxy.resolver.queries, ["localhost"])

    @inlineCallbacks
    def test_curl(self) -> Yielding[None]:
        """
        C{curl --proxytunnel} fetches a page over TLS through the proxy,
        verifying the server's certificate.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        proxy = self.startProxy({"localhost": ["127.0.0.1"]})
        tlsPort, certificatePath = self.serveTLS()
        self.expectProxyConnections(1)
        out, err, code = yield getProcessOutputAndValue(
            curl,
            [
                "-q",  # Ignore any .curlrc.
                "--silent",
                "--show-error",
                "--fail",
                "--proxytunnel",
                "--proxy",
                f"http://127.0.0.1:{proxy.port}",
                "--cacert",
                certificatePath,
                # Only keeps a broken proxy from hanging the test.
                "--max-time",
                "30",
                f"https://localhost:{tlsPort}/page",
            ],
            env={},
            reactor=reactor,
        )
        self.assertEqual((code, err, out), (0, b"", PAGE))
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["target"], f"localhost:{tlsPort}")


class CompositionTests(LoopbackTestCase):
    """
    The proxy put together as an application would, without twistd.
    """

    @inlineCallbacks
    def test_endpointService(self) -> Yielding[None]:
        """
        A L{ConnectProxyFactory} behind a server endpoint string in a
        L{StreamServerEndpointService} serves tunnels once the service is
        started, and stops listening when it is stopped.
        """
        service = StreamServerEndpointService(
            serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
            ConnectProxyFactory(
                HostnameConnector(reactor, resolver=FakeResolver()),
                reactor=reactor,
                policy=LOOPBACK,
            ),
        )
        service.startService()

        def stopIfRunning() -> Deferred[None] | None:
            return service.stopService() if service.running else None

        self.addCleanup(stopIfRunning)
        listening: Once[Any] = Once()

        def gotPort(port: Any) -> Any:
            listening.fire(port)
            return port

        assert service._waitingForPort is not None
        service._waitingForPort.addCallback(gotPort)
        port = yield listening.wait()
        proxyPort = port.getHost().port

        echo = self.serve(Echo)
        client = yield self.connectThrough(proxyPort, f"127.0.0.1:{echo.port}", Peer())
        client.tcp.write(b"composed")
        yield client.waitFor(8)
        self.assertEqual(client.received, b"composed")
        client.tcp.loseConnection()
        yield self.proxyEnded(1)

        yield service.stopService()
        self.assertFalse(service.running)
        refused = connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort), Protocol()
        )
        yield self.assertFailure(refused, ConnectionRefusedError)


class UNIXClientKeyTests(SynchronousTestCase):
    """
    Tests for how a UNIX client is counted by the per-client limits, on a
    real (unnamed, connected) pair of UNIX sockets.
    """

    def test_countedUnderItsUser(self) -> None:
        """
        A UNIX client is counted under the user the kernel gives for its
        socket (C{SO_PEERCRED}), whatever name it bound.
        """
        import os

        from tunnel.clients import unixClientKey

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return ours

        self.assertEqual(unixClientKey(Transport()), f"uid {os.getuid()}")
