"""
Loopback tests for the listener options (the PROXY protocol keeps
half-close) and for how the proxy closes after an error.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.protocol import ServerFactory

from tests.test_integration import (
    ESTABLISHED,
    LoopbackTestCase,
    Peer,
    Yielding,
    connectHead,
    streamChunk,
)


class ProxyProtocolLoopbackTests(LoopbackTestCase):
    """
    C{--proxy-protocol} over real sockets.
    """

    @inlineCallbacks
    def test_halfCloseThroughProxyProtocol(self) -> Yielding[None]:
        """
        Behind a PROXY v1 header, the client's half-close still reaches the
        target as EOF while the target can answer, and the log names the
        client from the header.
        """
        proxy = self.startProxy()
        proxy.factory.proxyProtocol = True
        targets = self.serve(lambda: Peer(closeOnEOF=False))
        client = Peer(closeOnEOF=False)
        head = client.expectResponseHead()
        yield self.connectToProxy(proxy.port, client)
        client.tcp.write(
            b"PROXY TCP4 203.0.113.50 127.0.0.1 40123 3128\r\n"
            + connectHead(f"127.0.0.1:{targets.port}")
        )
        self.assertEqual((yield head), ESTABLISHED)
        target = yield targets.accepted.get()
        client.tcp.write(b"question")
        yield target.waitFor(8)
        client.tcp.loseWriteConnection()
        yield target.eof.wait()
        target.tcp.write(b"answer")
        yield client.waitFor(6)
        self.assertFalse(client.eof.happened)
        target.tcp.loseConnection()
        yield client.eof.wait()
        client.tcp.loseConnection()
        yield gatherResults([client.lost.wait(), target.lost.wait()])
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["client"], "203.0.113.50:40123")
        self.assertEqual(event["ended"], "client-eof")

    @inlineCallbacks
    def test_refusedWithoutHeader(self) -> Yielding[None]:
        """
        With C{--proxy-protocol}, a connection that starts with a request
        instead of a header gets a 400 and is closed.
        """
        proxy = self.startProxy()
        proxy.factory.proxyProtocol = True
        client = Peer()
        head = yield self.requestTunnel(proxy.port, "127.0.0.1:1", client)
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        yield client.lost.wait()


class RefusalTests(LoopbackTestCase):
    """
    How the proxy closes after an error answer.
    """

    @inlineCallbacks
    def test_refusalWithUnreadEarlyData(self) -> Yielding[None]:
        """
        A refused request whose early data the proxy has not read is closed
        cleanly (FIN, not a reset), so the answer cannot be destroyed by a
        reset before the client reads it (RFC 9112 section 9.6).
        """
        proxy = self.startProxy()
        closed = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
        port = closed.getHost().port  # type: ignore[attr-defined]
        yield closed.stopListening()  # type: ignore[misc]
        early = b"".join(streamChunk(b"e", i, 65536) for i in range(64))
        client = Peer()
        head = yield self.requestTunnel(proxy.port, f"127.0.0.1:{port}", client, early)
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        yield client.lost.wait()
        self.assertClosedCleanly(client)
