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

from .metrics import ProxyMetrics, WorkerMetrics, metricsResource

__all__ = ["metricsSite"]

# Seconds a metrics connection may stay idle, or between two bytes of a
# request, before it is closed (twisted.web's default is 60).
_METRICS_TIMEOUT = 10.0
# Metrics connections open at once; beyond, a new one is closed at once.
# A scraper needs one or two.
_METRICS_CONNECTIONS = 32

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
    from when it is made until it is lost, and timed out without a log
    line.
    """

    site: _MetricsSite
    _counted = False
    _abortCall: IDelayedCall | None = None

    def connectionMade(self) -> None:
        """
        Count the connection.
        """
        super().connectionMade()
        self.site.connections += 1
        self._counted = True

    def timeoutConnection(self) -> None:
        """
        Close the idle connection, and abort it if it has not closed
        C{abortTimeout} seconds later (its client reads nothing of what is
        left to send).  twisted.web would log a line for each: one per
        scrape, for a Prometheus server that keeps its connection between
        scrapes longer than the timeout.
        """
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
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        if self._counted:
            self._counted = False
            self.site.connections -= 1
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
    ) -> None:
        """
        @param resource: The root resource.
        @param reactor: Times the connections out.
        @param timeout: Seconds a connection may stay idle.
        @param maxConnections: The most connections open at once.
        """
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.maxConnections = maxConnections
        self.connections = 0

    def buildProtocol(  # type: ignore[override]
        self, addr: IAddress | None
    ) -> Protocol:
        """
        A channel for a new connection, or one that closes it if
        C{maxConnections} are open already.  (Not L{None}, which a TLS
        listener would fail on.)

        @param addr: The client's address.
        @return: The protocol.
        """
        if self.connections >= self.maxConnections:
            return _Refused()
        channel: Protocol = super().buildProtocol(addr)
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
) -> Site:
    """
    The site that serves C{metrics} (L{metricsResource}) at C{--metrics}.
    Unlike a plain L{Site}, it refuses a request with a body (413) without
    reading it, closes a connection idle for C{timeout} seconds, closes a
    new connection at once while C{maxConnections} are open, and does not
    log each request.

    @param metrics: The metrics to serve.
    @param reactor: Times the connections out.
    @param timeout: Seconds a connection may stay idle (waiting for a
        request, or for the rest of one) before it is closed.
    @param maxConnections: The most connections open at once.
    @return: The site, to listen with.
    """
    return _MetricsSite(metricsResource(metrics), reactor, timeout, maxConnections)
