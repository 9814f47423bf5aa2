"""
The site that serves the metrics at C{--metrics}, to whoever can reach that
port: it reads no request body, logs no request, and holds few connections
and none for long.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .clients import clientKey, ipOf
from .metrics import ProxyMetrics, WorkerMetrics, metricsResource

__all__ = ["metricsSite"]

# Seconds a metrics connection may stay idle, and may take to send a
# request head, from its start or the previous answer, before it is closed
# (twisted.web's default is 60, from the last byte).
_METRICS_TIMEOUT = 10.0
# Metrics connections open at once; beyond, a new one is closed at once.
# A scraper needs one or two.
_METRICS_CONNECTIONS = 32
# Of those, the most from one client (one IPv4 address or IPv6 /64): one
# host cannot take them all.
_METRICS_CONNECTIONS_PER_CLIENT = 4

# The answer to a request with a body, which the metrics never need.
_BODY_REFUSED = (
    b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)


class _MetricsRequest(Request):
    """
    A request to the metrics site, refused with 413 as soon as its headers
    announce a body (by a non-zero C{Content-Length} or a
    C{Transfer-Encoding}): twisted.web would otherwise store the whole body
    (in a temporary file past 100 kB, however large it says it is) before
    answering.
    """

    _refused = False

    def gotLength(self, length: int | None) -> None:
        """
        Refuse the request if it has a body.

        @param length: The body's length from the headers; L{None} if it is
            chunked.
        """
        if length == 0:
            super().gotLength(length)
            return
        self._refused = True
        # The channel answers "Expect: 100-continue" once this returns,
        # which would invite the body just refused.
        self.requestHeaders.removeHeader(b"Expect")
        self.channel.transport.write(_BODY_REFUSED)  # type: ignore[union-attr]
        self.channel.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        """
        Drop a piece of the refused body: only a refused request has one,
        and what of it arrives before the connection has closed is not
        kept.

        @param data: The piece.
        """

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Answer the request, unless it was refused: a short body can be
        complete before the connection has closed.

        @param command: The method.
        @param path: The request target.
        @param version: The HTTP version.
        """
        if not self._refused:
            super().requestReceived(command, path, version)


class _MetricsChannel(http.HTTPChannel):
    """
    An HTTP connection to the metrics site, counted in its C{connections}
    (and its client's) from when it is made until it is lost, that must
    send each request head within the site's timeout, and is timed out
    without a log line.

    @ivar client: The key its client is counted under, if any.
    """

    site: _MetricsSite
    client: str | None = None
    _counted = False
    _timedOut = False
    _abortCall: IDelayedCall | None = None
    _headCall: IDelayedCall | None = None

    def connectionMade(self) -> None:
        """
        Count the connection, and wait for a request head.
        """
        super().connectionMade()
        self.site.connections += 1
        self.site.count(self.client, 1)
        self._counted = True
        self._awaitHead()

    def _awaitHead(self) -> None:
        """
        Give the next request head the site's timeout to arrive whole.
        twisted.web's timeout counts from the last byte, so a client
        sending a byte every few seconds would keep the connection for
        ever.
        """
        self._stopWaitingForHead()
        self._headCall = self.callLater(self.site.timeOut, self.timeoutConnection)

    def _stopWaitingForHead(self) -> None:
        if self._headCall is not None and self._headCall.active():
            self._headCall.cancel()

    def allHeadersReceived(self) -> None:
        """
        The head arrived in time.
        """
        self._stopWaitingForHead()
        super().allHeadersReceived()

    def requestDone(self, request: http.Request) -> None:
        """
        Wait for the next request's head, which may be read at once.

        @param request: The request answered.
        """
        self._awaitHead()
        super().requestDone(request)

    def timeoutConnection(self) -> None:
        """
        Close the idle or slow connection, and abort it if it has not
        closed C{abortTimeout} seconds later (its client reads nothing of
        what is left to send).  twisted.web would log a line for each: one
        per scrape, for a Prometheus server that keeps its connection
        between scrapes longer than the timeout.
        """
        if self._timedOut:
            # Both timers ran out: closing already.
            return
        self._timedOut = True
        if self.abortTimeout is not None:
            self._abortCall = self.callLater(
                self.abortTimeout,
                self.transport.abortConnection,  # type: ignore[union-attr]
            )
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop counting the connection, however it ended.

        @param reason: Why it ended.
        """
        for call in (self._abortCall, self._headCall):
            if call is not None and call.active():
                call.cancel()
        if self._counted:
            self._counted = False
            self.site.connections -= 1
            self.site.count(self.client, -1)
        super().connectionLost(reason)


class _Refused(Protocol):
    """
    A connection beyond the metrics site's limit: closed at once.
    """

    def connectionMade(self) -> None:
        """
        Close the connection without waiting to send anything.
        """
        self.transport.abortConnection()  # type: ignore[union-attr]


class _MetricsSite(Site):
    """
    The site of L{metricsSite}.

    @ivar maxConnections: The most connections open at once.
    @ivar maxPerClient: The most of them from one client.
    @ivar connections: The connections open now.
    """

    requestFactory = _MetricsRequest
    # A plain HTTP/1.1 channel (not twisted.web's HTTP/2-capable wrapper),
    # so that it can count itself.
    protocol = _MetricsChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        reactor: IReactorTime,
        timeout: float,
        maxConnections: int,
        maxPerClient: int,
    ) -> None:
        """
        @param resource: The root resource.
        @param reactor: Times the connections out.
        @param timeout: Seconds a connection may stay idle, or take to send
            a request head.
        @param maxConnections: The most connections open at once.
        @param maxPerClient: The most of them from one client.
        """
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.maxConnections = maxConnections
        self.maxPerClient = maxPerClient
        self.connections = 0
        self._perClient: dict[str, int] = {}

    def count(self, client: str | None, change: int) -> None:
        """
        Count a connection of C{client} made (C{1}) or lost (C{-1}).

        @param client: The client's key, or L{None} (not counted).
        @param change: C{1} or C{-1}.
        """
        if client is None:
            return
        left = self._perClient.get(client, 0) + change
        if left:
            self._perClient[client] = left
        else:
            del self._perClient[client]

    def buildProtocol(  # type: ignore[override]
        self, addr: IAddress | None
    ) -> Protocol:
        """
        A channel for a new connection, or one that closes it if
        C{maxConnections} are open already, or C{maxPerClient} from the
        same client (an IPv4 address or IPv6 /64; UNIX clients are not
        counted apart).  (Not L{None}, which a TLS listener would fail on.)

        @param addr: The client's address.
        @return: The protocol.
        """
        ip = ipOf(addr)
        client = None if ip is None else clientKey(ip)
        if self.connections >= self.maxConnections or (
            client is not None and self._perClient.get(client, 0) >= self.maxPerClient
        ):
            return _Refused()
        channel: _MetricsChannel = super().buildProtocol(addr)
        channel.client = client
        return channel

    def log(self, request: http.Request) -> None:
        """
        Log nothing: a scrape every few seconds would fill the log (with
        C{--no-tunnel-log} too).

        @param request: The request answered.
        """


def metricsSite(
    metrics: ProxyMetrics | WorkerMetrics,
    reactor: IReactorTime,
    timeout: float = _METRICS_TIMEOUT,
    maxConnections: int = _METRICS_CONNECTIONS,
    maxPerClient: int = _METRICS_CONNECTIONS_PER_CLIENT,
) -> Site:
    """
    The site that serves C{metrics} (L{metricsResource}) at C{--metrics}.
    Unlike a plain L{Site}, it refuses a request with a body (413) without
    reading it, closes a connection idle for C{timeout} seconds or that has
    not sent a whole request head C{timeout} seconds after it connected or
    was last answered, closes a new connection at once while
    C{maxConnections} are open or C{maxPerClient} from the same client, and
    does not log each request.

    @param metrics: The metrics to serve.
    @param reactor: Times the connections out.
    @param timeout: Seconds a connection may stay idle, or take to send a
        request head, before it is closed.
    @param maxConnections: The most connections open at once.
    @param maxPerClient: The most connections open at once from one client.
    @return: The site, to listen with.
    """
    return _MetricsSite(
        metricsResource(metrics), reactor, timeout, maxConnections, maxPerClient
    )
