"""
The CONNECT handshake: the protocol that talks to a client, and its factory.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from .connector import HostnameConnector
from .interfaces import ITargetConnector
from .relay import Relay, RelayResult, StreamTransport, TargetProtocol
from .request import ConnectRequest, RequestRejected, findHeadEnd, parseConnectHead

__all__ = ["ConnectProxy", "ConnectProxyFactory", "formatAddress"]

_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def formatAddress(address: IAddress | None) -> str:
    """
    Render a transport address for logs: C{host:port}, C{[v6]:port}, or the
    path of a UNIX socket.

    @param address: The address, or L{None}.
    @return: Its text form, or C{"-"} when there is nothing to say.
    """
    host = getattr(address, "host", None)
    if host is not None:
        port = getattr(address, "port", 0)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace") or "-"
    return str(name) if name else "-"


def errorResponse(
    status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """
    Build a complete error response that ends the connection.

    @param status: The HTTP status code.
    @param detail: The text of the C{text/plain} body.
    @param headers: Extra header fields.
    @return: The bytes to send.
    """
    body = detail.encode("utf-8") + b"\n"
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Error").encode("ascii")),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % (len(body),),
        b"Connection: close",
    ]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _TargetFactory(Factory):
    """
    Hands the one L{TargetProtocol} of a tunnel to an endpoint.

    Like C{connectProtocol}'s factory, but quiet: a factory that logs its
    start and stop would log twice per tunnel.
    """

    noisy = False

    def __init__(self, target: TargetProtocol) -> None:
        self._target = target

    def buildProtocol(self, addr: IAddress | None) -> TargetProtocol:
        """
        Give the tunnel's target protocol.
        """
        return self._target


@implementer(IHalfCloseableProtocol)
class ConnectProxy(Protocol, TimeoutMixin):
    """
    One client connection: read a CONNECT head, reach the target, answer,
    then hand both connections to a L{Relay}.

    The head is buffered up to the factory's limits and no longer than its
    header timeout; anything wrong gets a precise HTTP error and a closed
    connection, and nothing after the head is ever read as a new request
    (RFC 9931).
    """

    factory: ConnectProxyFactory
    _log = Logger(namespace="tunnel")

    _relay: Relay | None = None
    _request: ConnectRequest | None = None
    _connecting: Deferred[Any] | None = None
    _status: int | None = None
    _ended: str | None = None

    def connectionMade(self) -> None:
        """
        Start the header timeout.
        """
        factory = self.factory
        self._client = cast(StreamTransport, self.transport)
        self.callLater = factory.clock.callLater  # type: ignore[assignment]
        self._startedAt = factory.clock.seconds()
        self._buffer = b""
        self._early: list[bytes] = []
        self._earlyBytes = 0
        self._clientFinished = False
        self._reading = "head"
        factory.connections.add(self)
        self.setTimeout(factory.headerTimeout)

    # Reading the head.

    def dataReceived(self, data: bytes) -> None:
        """
        Feed the relay, or collect the head, or hold early data.
        """
        relay = self._relay
        if relay is not None:
            relay.clientData(data)
        elif self._reading == "head":
            self._headData(data)
        elif self._reading == "early":
            self._early.append(data)
            self._earlyBytes += len(data)
            if self._earlyBytes > self.factory.maxEarlyData:
                # Flow control while the target is not reached yet: stop
                # reading rather than buffer without bound.
                self._client.pauseProducing()

    def _headData(self, data: bytes) -> None:
        factory = self.factory
        buffered = len(self._buffer)
        limit = factory.maxHeaderSize
        # Look only at what fits within the limit, so that the buffer never
        # holds more than the limit allows.
        window = self._buffer + data[: limit + 4 - buffered]
        found = findHeadEnd(window, max(0, buffered - 3))
        if found is None:
            firstLine = window.find(b"\n")
            if firstLine == -1 and len(window) > factory.maxRequestLine + 2:
                self._reject(RequestRejected(414, "The request line is too long."))
            elif len(window) > limit:
                self._reject(RequestRejected(431, "The request head is too large."))
            else:
                self._buffer = window
            return
        headLength, consumed = found
        head = window[:headLength]
        early = data[consumed - buffered :]
        self._buffer = b""
        if headLength > limit:
            self._reject(RequestRejected(431, "The request head is too large."))
            return
        try:
            request = parseConnectHead(head, factory.maxRequestLine)
        except RequestRejected as rejected:
            self._reject(rejected)
            return
        self.setTimeout(None)
        self._request = request
        self._reading = "early"
        if early:
            self.dataReceived(early)
        self._connect(request)

    def timeoutConnection(self) -> None:
        """
        The head did not arrive in time: answer 408.
        """
        self._reject(RequestRejected(408, "The request head took too long."))

    # Reaching the target.

    def _connect(self, request: ConnectRequest) -> None:
        factory = self.factory
        target = TargetProtocol()
        try:
            endpoint = factory.connector.endpointForTarget(request.host, request.port)
            connecting = endpoint.connect(_TargetFactory(target))
        except Exception:
            self._log.failure(
                "Could not start connecting to {target}", target=request.authority
            )
            self._reject(RequestRejected(502, "The proxy could not reach the target."))
            return
        self._connecting = connecting
        connecting.addTimeout(factory.connectTimeout, factory.clock)
        connecting.addCallbacks(self._targetConnected, self._targetFailed)

    def _targetConnected(self, target: TargetProtocol) -> None:
        self._connecting = None
        self._status = 200
        self._reading = "tunnel"
        self._client.write(_ESTABLISHED)
        relay = Relay(
            self._client,
            cast(StreamTransport, target.transport),
            self.factory.clock,
            self.factory.idleTimeout,
            self._relayEnded,
        )
        self._relay = relay
        target.attach(relay)
        early, self._early = b"".join(self._early), []
        if self._earlyBytes > self.factory.maxEarlyData:
            self._client.resumeProducing()
        relay.start(early, self._clientFinished)

    def _targetFailed(self, reason: Failure) -> None:
        self._connecting = None
        if reason.check(CancelledError):
            # The client left and the attempt was cancelled on its behalf.
            self._end(None, "client-left")
            return
        if reason.check(DeferredTimeoutError, ConnectTimeoutError):
            rejected = RequestRejected(504, "Connecting to the target timed out.")
        elif reason.check(DNSLookupError):
            rejected = RequestRejected(502, "The target host name does not resolve.")
        elif reason.check(ConnectionRefusedError):
            rejected = RequestRejected(502, "The target refused the connection.")
        elif reason.check(ConnectError):
            rejected = RequestRejected(502, "The proxy could not reach the target.")
        else:
            self._log.failure(
                "Unexpected failure reaching {target}", reason, target=self._target()
            )
            rejected = RequestRejected(502, "The proxy could not reach the target.")
        self._reject(rejected, "target-failed")

    # Ending.

    def _reject(self, rejected: RequestRejected, ended: str = "refused") -> None:
        self.setTimeout(None)
        self._reading = "done"
        self._buffer = b""
        self._early = []
        self._client.write(
            errorResponse(rejected.status, rejected.detail, rejected.headers)
        )
        self._client.loseConnection()
        self._end(rejected.status, ended)

    def readConnectionLost(self) -> None:
        """
        The client sent FIN.

        During the head, the client gave up.  While connecting, a client
        that sent early data wants it delivered and its FIN passed on; one
        that sent nothing has left, and the attempt is cancelled.
        """
        if self._relay is not None:
            self._relay.clientFinished()
        elif self._reading == "early" and self._early:
            self._clientFinished = True
        else:
            self._client.loseConnection()
            self._abandon()

    def writeConnectionLost(self) -> None:
        """
        Our FIN to the client went out; the relay keeps count of that.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The client connection is closed.
        """
        self.factory.connections.discard(self)
        if self._relay is not None:
            self._relay.clientLost(reason)
        else:
            self._abandon()

    def _abandon(self) -> None:
        self.setTimeout(None)
        self._reading = "done"
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        else:
            self._end(None, "client-left")

    def _relayEnded(self, result: RelayResult) -> None:
        self._end(200, result.ended, result.bytesUp, result.bytesDown)

    def _target(self) -> str:
        return self._request.authority if self._request is not None else "-"

    def _end(
        self, status: int | None, ended: str, bytesUp: int = 0, bytesDown: int = 0
    ) -> None:
        """
        Emit the one log event for this connection.
        """
        if self._ended is not None:
            return
        self._ended = ended
        self._status = status
        self._log.info(
            "{client} CONNECT {target} {status} up={bytesUp} down={bytesDown} "
            "{duration:.3f}s {ended}",
            client=formatAddress(self.transport.getPeer()),  # type: ignore[union-attr]
            target=self._target(),
            status=status if status is not None else "-",
            bytesUp=bytesUp,
            bytesDown=bytesDown,
            duration=self.factory.clock.seconds() - self._startedAt,
            ended=ended,
        )

    def abortTunnel(self) -> None:
        """
        Close this connection at once, whatever stage it is in.
        """
        if self._relay is not None:
            self._relay.abort("shutdown")
        else:
            self._client.abortConnection()


class ConnectProxyFactory(Factory):
    """
    Builds a L{ConnectProxy} for each client connection.

    Put it behind any server endpoint::

        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString
        from tunnel import ConnectProxyFactory

        serverFromString(reactor, "tcp:8080:interface=127.0.0.1").listen(
            ConnectProxyFactory(reactor=reactor))

    @ivar connections: The client connections open now.
    """

    protocol = ConnectProxy  # type: ignore[assignment]

    def __init__(
        self,
        connector: ITargetConnector | None = None,
        *,
        reactor: Any = None,
        clock: IReactorTime | None = None,
        headerTimeout: float = 10,
        connectTimeout: float = 15,
        idleTimeout: float | None = 600,
        maxRequestLine: int = 8192,
        maxHeaderSize: int = 65536,
        maxEarlyData: int = 65536,
    ) -> None:
        """
        @param connector: Chooses how targets are reached; by default a
            L{HostnameConnector} on C{reactor}.
        @param reactor: The reactor; by default the global one.
        @param clock: Schedules timeouts; by default C{reactor}.
        @param headerTimeout: Seconds a client has to send its request head
            before it gets a 408.
        @param connectTimeout: Seconds allowed to reach the target before the
            client gets a 504.
        @param idleTimeout: Seconds without traffic in either direction after
            which a tunnel is closed; C{0} or L{None} disables it.
        @param maxRequestLine: The longest request line, in bytes (414).
        @param maxHeaderSize: The largest request head, in bytes (431).
        @param maxEarlyData: How many bytes sent after the head are held
            while the target is reached before the proxy stops reading.
        """
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.connector: ITargetConnector = (
            connector if connector is not None else HostnameConnector(reactor)
        )
        self.headerTimeout = headerTimeout
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout or None
        self.maxRequestLine = maxRequestLine
        self.maxHeaderSize = maxHeaderSize
        self.maxEarlyData = maxEarlyData
        self.connections: set[ConnectProxy] = set()
