"""
Tests for L{metricsSite}, the site that serves the metrics at C{--metrics}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from tests.test_operations import EVENT
from tunnel.metrics import ProxyMetrics
from tunnel.metricssite import metricsSite
from tunnel.tap import Options, makeService

GET = b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n"


def connect(site: Site, host: str = "127.0.0.1") -> tuple[Any, StringTransport]:
    """
    Connect a client to C{site} over a L{StringTransport}.

    @param host: The client's address.
    @return: The site's protocol and the transport.
    """
    protocol = site.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def headers(response: bytes) -> dict[bytes, bytes]:
    """
    The headers of the first response in C{response}, by lower-case name.
    """
    head = response.split(b"\r\n\r\n", 1)[0]
    fields = (line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    return {name.lower(): value for name, value in fields}


class MetricsSiteTests(SynchronousTestCase):
    """
    Tests for L{metricsSite}.
    """

    def setUp(self) -> None:
        """
        A site serving metrics that counted one tunnel, on a fake clock.
        """
        self.clock = MemoryReactorClock()
        metrics = ProxyMetrics()
        metrics(EVENT)
        self.site = metricsSite(metrics, self.clock)
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def test_bodyRefused(self) -> None:
        """
        A request whose headers announce a body, however long, is answered
        413 at once and its connection closed; what of the body arrives
        meanwhile is not kept, and the request is not answered otherwise.
        A request that announces an empty body is answered as one without.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(
            b"POST /metrics HTTP/1.1\r\nHost: metrics\r\n"
            b"Content-Length: 10000000000\r\n\r\n"
        )
        refusal = transport.value()
        self.assertTrue(refusal.startswith(b"HTTP/1.1 413 "), refusal)
        self.assertEqual(headers(refusal)[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"x" * 200_000)
        [request] = protocol.requests
        self.assertIsNone(request.content)
        self.assertEqual(transport.value(), refusal)

        protocol, transport = connect(self.site)
        protocol.dataReceived(
            b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_chunkedRefused(self) -> None:
        """
        A chunked request body is refused as well.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(
            b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)

    def test_noContinue(self) -> None:
        """
        A request that asks to be told to send its body
        (C{Expect: 100-continue}) gets only the 413, not the invitation.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(
            b"POST /metrics HTTP/1.1\r\nHost: metrics\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertNotIn(b"100 Continue", transport.value())

    def test_completeBodyNotAnswered(self) -> None:
        """
        A refused request whose short body is complete before the
        connection has closed gets no answer but the 413.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(
            b"POST /metrics HTTP/1.1\r\nHost: metrics\r\nContent-Length: 4\r\n\r\n"
        )
        refusal = transport.value()
        protocol.dataReceived(b"abcd")
        self.assertEqual(transport.value(), refusal)

    def test_head(self) -> None:
        """
        A HEAD of C{/metrics} gets the headers of a GET, with no body and
        nothing logged.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(GET)
        get = transport.value()
        self.assertTrue(get.startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"\ntunnel_connections_total{", get)
        transport.clear()
        protocol.dataReceived(b"HEAD /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n")
        head = transport.value()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "))
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        for name in (b"content-type", b"content-length"):
            self.assertEqual(headers(head)[name], headers(get)[name])
        self.assertEqual(list(self.events), [])

    def test_requestsNotLogged(self) -> None:
        """
        The site does not log the requests it answers.
        """
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)
        protocol, transport = connect(self.site)
        protocol.dataReceived(GET)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(list(self.events), [])

    def test_idleTimeout(self) -> None:
        """
        A connection idle for 10 seconds is closed, without a log line; if
        it has not closed 15 seconds later, it is aborted.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(GET)
        self.clock.advance(9.5)
        protocol.dataReceived(GET)
        self.clock.advance(9.5)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.5)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(15)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(list(self.events), [])

    def test_headDeadline(self) -> None:
        """
        A request head must arrive whole within 10 seconds of the
        connection or of the previous answer, however often its bytes come:
        a client sending a byte every few seconds does not keep the
        connection.
        """
        protocol, transport = connect(self.site)
        for byte in b"GET /metrics HTTP/1.1\r\n"[:5]:
            protocol.dataReceived(bytes([byte]))
            self.clock.advance(1.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.6)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

        # The same after an answer: the next head has 10 seconds too.
        protocol, transport = connect(self.site)
        self.clock.advance(9)
        protocol.dataReceived(GET)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        for byte in GET[:5]:
            protocol.dataReceived(bytes([byte]))
            self.clock.advance(1.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.6)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(list(self.events), [])

    def test_pipelinedHeads(self) -> None:
        """
        Requests sent together are all answered, and the connection then
        waits for the next head with the full 10 seconds.
        """
        protocol, transport = connect(self.site)
        self.clock.advance(5)
        protocol.dataReceived(GET + GET)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 2)
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_connectionsPerClient(self) -> None:
        """
        One client (an IPv4 address, or an IPv6 /64) holds at most 4
        connections; a fifth is aborted at once, another client's is not,
        and one that closes leaves room again.
        """
        opened = [connect(self.site, "192.0.2.1") for _ in range(4)]
        self.assertFalse(any(t.disconnecting for _, t in opened))
        self.assertTrue(connect(self.site, "192.0.2.1")[1].disconnected)
        self.assertFalse(connect(self.site, "192.0.2.2")[1].disconnecting)
        opened[0][0].connectionLost(Failure(ConnectionDone()))
        self.assertFalse(connect(self.site, "192.0.2.1")[1].disconnecting)

        site = metricsSite(ProxyMetrics(), self.clock)
        for port in range(4):
            site.buildProtocol(
                IPv6Address("TCP", f"2001:db8::{port}", 40000)
            ).makeConnection(StringTransport())
        protocol = site.buildProtocol(IPv6Address("TCP", "2001:db8::ff", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnected)

    def test_connectionLimit(self) -> None:
        """
        While 32 connections are open, a new one is aborted at once; each
        that closes, however (here: timed out, refused a body, closed by
        its client), leaves room for another.
        """
        opened = [connect(self.site, f"192.0.2.{i // 4}") for i in range(32)]
        self.assertFalse(any(t.disconnecting for _, t in opened))
        protocol, transport = connect(self.site, "192.0.2.100")
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(connect(self.site, "192.0.2.101")[1].disconnected)

        # Timed out: all of them, but for the one kept busy.
        busy, _ = opened.pop()
        self.clock.advance(5)
        busy.dataReceived(GET)
        self.clock.advance(5)
        self.assertTrue(all(t.disconnecting for _, t in opened))
        opened[0][0].connectionLost(Failure(ConnectionDone()))
        protocol, transport = connect(self.site)
        self.assertFalse(transport.disconnecting)

        # Refused a body.
        protocol.dataReceived(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertTrue(connect(self.site)[1].disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        protocol, transport = connect(self.site)
        self.assertFalse(transport.disconnecting)

        # Closed by the client.
        self.assertTrue(connect(self.site)[1].disconnected)
        busy.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(connect(self.site)[1].disconnecting)

    def test_served(self) -> None:
        """
        C{--metrics} serves the metrics with L{metricsSite}, with
        C{--workers} too.
        """
        for workers in ([], ["--workers", "2"]):
            options = Options()
            options.parseOptions(
                [*workers, "--listen", "tcp:0", "--metrics", "tcp:0"],
            )
            service: Any = makeService(options, MemoryReactorClock())
            [listener] = [
                s for s in service if isinstance(s, StreamServerEndpointService)
            ]
            protocol, transport = connect(listener.factory)
            protocol.dataReceived(
                b"POST /metrics HTTP/1.1\r\nHost: metrics\r\n"
                b"Content-Length: 10000000000\r\n\r\n"
            )
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
