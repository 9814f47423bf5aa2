"""
The proxy behind a TLS listener (an "HTTPS proxy"), over loopback: clients
speak TLS to the proxy, and send their CONNECT inside it.

The proxy listens through C{serverFromString("ssl:0:interface=127.0.0.1:
privateKey=...:certKey=...")} with a self-signed EC certificate for
C{localhost} (and 127.0.0.1) made by the test.  Targets are plain TCP
servers on 127.0.0.1, reached through a L{LoopbackOnlyReactor}.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl as stdlibSSL
from typing import Any, cast

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    quoteStringArgument,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests.fakes import FakeResolver, turnsUntil
from tests.test_integration import (
    ESTABLISHED,
    PAGE,
    Echo,
    MiB,
    Peer,
    RunningProxy,
    Yielding,
    connectHead,
    localhostCertificate,
    reactor,
    streamChunk,
)
from tests.test_security_integration import (
    LOOPBACK_POLICY,
    SecurityTestCase,
    runCurl,
)
from tunnel import ConnectProxy, ConnectProxyFactory, HostnameConnector


class ALPNRecordingProxy(ConnectProxy):
    """
    A L{ConnectProxy} that records, when its first bytes arrive (so after
    the TLS handshake), the protocol ALPN negotiated on its connection.
    """

    _recorded = False

    def dataReceived(self, data: bytes) -> None:
        """
        Record the negotiated protocol once, then handle C{data} as usual.
        """
        if not self._recorded:
            self._recorded = True
            factory = cast(ALPNRecordingFactory, self.factory)
            factory.negotiated.append(cast(Any, self.transport).negotiatedProtocol)
        super().dataReceived(data)


class ALPNRecordingFactory(ConnectProxyFactory):
    """
    A L{ConnectProxyFactory} whose connections record what ALPN negotiated.

    @ivar negotiated: The negotiated protocol of each connection that sent
        bytes, in order (L{None} where the client offered no ALPN).
    """

    protocol = ALPNRecordingProxy

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.negotiated: list[bytes | None] = []


def readUntil(connection: Any, ending: bytes, limit: int = 65536) -> bytes:
    """
    Read from a blocking socket until what was read ends with C{ending}.

    @param connection: The socket.
    @param ending: What the bytes wanted end with.
    @param limit: The most bytes to read.
    @return: Everything read.
    @raise ConnectionError: If the connection ends first.
    """
    received = b""
    # Bounded: each turn reads at least one byte, or stops.
    while not received.endswith(ending) and len(received) < limit:
        chunk = connection.recv(min(4096, limit - len(received)))
        if not chunk:
            raise ConnectionError(f"closed after {received!r}")
        received += chunk
    return received


class TLSProxyTestCase(SecurityTestCase):
    """
    Run a proxy on a TLS listener, and connect to it over TLS.
    """

    @inlineCallbacks
    def runTLSProxy(self) -> Yielding[RunningProxy]:
        """
        Run a proxy on a TLS listener on 127.0.0.1, until the test ends; it
        may reach any port on loopback.

        @return: Fires with the running proxy; C{self.certificatePath} then
            names the file holding its certificate.
        """
        certificatePEM, keyPEM = localhostCertificate()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        keyPath = os.path.join(directory, "key.pem")
        self.certificatePath = os.path.join(directory, "certificate.pem")
        with open(keyPath, "wb") as keyFile:
            keyFile.write(keyPEM)
        with open(self.certificatePath, "wb") as certificateFile:
            certificateFile.write(certificatePEM)
        resolver = FakeResolver()
        factory = ALPNRecordingFactory(
            HostnameConnector(self.guard, resolver=resolver),
            reactor=reactor,
            policy=LOOPBACK_POLICY,
        )
        self._proxyFactories.append(factory)
        endpoint = serverFromString(
            reactor,
            "ssl:0:interface=127.0.0.1"
            f":privateKey={quoteStringArgument(keyPath)}"
            f":certKey={quoteStringArgument(self.certificatePath)}",
        )
        port = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        return RunningProxy(port.getHost().port, factory, resolver)

    @inlineCallbacks
    def connectThroughTLS(
        self,
        proxyPort: int,
        authority: str,
        peer: Peer,
        alpn: list[bytes] | None = None,
    ) -> Yielding[Peer]:
        """
        Connect C{peer} to the proxy over TLS, verifying the proxy's
        certificate for C{localhost}, and open a tunnel to C{authority}.

        @param alpn: The protocols to offer in ALPN, if any.
        @return: Fires with C{peer} once the proxy's 200 response is read.
        """
        certificatePEM, _ = localhostCertificate()
        options = optionsForClientTLS(
            "localhost",
            trustRoot=Certificate.loadPEM(certificatePEM),
            acceptableProtocols=alpn,
        )
        endpoint = wrapClientTLS(
            options, TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort)
        )
        head = peer.expectResponseHead()
        yield connectProtocol(endpoint, peer)
        self._open.append(peer)
        self._proxyClients += 1
        peer.tcp.write(connectHead(authority))
        response = yield head
        self.assertEqual(response, ESTABLISHED)
        return peer


class TLSListenerTests(TLSProxyTestCase):
    """
    Clients that speak TLS to the proxy.
    """

    @inlineCallbacks
    def test_twistedClient(self) -> Yielding[None]:
        """
        A Twisted client offering C{h2} and C{http/1.1} in ALPN completes the
        TLS handshake (C{http/1.1} is chosen), sends a CONNECT inside TLS,
        gets a 200, and talks to an echo server through the tunnel.
        """
        proxy = yield self.runTLSProxy()
        echo = self.serve(Echo)
        client = yield self.connectThroughTLS(
            proxy.port, f"127.0.0.1:{echo.port}", Peer(), [b"h2", b"http/1.1"]
        )
        self.assertEqual(client.tcp.negotiatedProtocol, b"http/1.1")
        yield self.assertEchoes(client, b"ping over TLS")
        client.tcp.loseConnection()
        yield client.lost.wait()
        self.assertClosedCleanly(client)
        [event] = yield self.proxyEnded(1)
        self.assertEqual(
            (event["status"], event["ended"], event["bytesUp"]),
            (200, "client-eof", 13),
        )
        factory = cast(ALPNRecordingFactory, proxy.factory)
        self.assertEqual(factory.negotiated, [b"http/1.1"])

    @inlineCallbacks
    def test_stdlibClient(self) -> Yielding[None]:
        """
        Python's C{ssl} module, on a blocking socket in a thread, verifies
        the proxy's certificate for C{localhost}, negotiates C{http/1.1} in
        ALPN, gets a 200 to its CONNECT, and its bytes come back from an
        echo server; its TLS shutdown ends the tunnel cleanly.
        """
        proxy = yield self.runTLSProxy()
        echo = self.serve(Echo)
        authority = f"127.0.0.1:{echo.port}"
        certificatePath = self.certificatePath

        def tunnel() -> tuple[str | None, bytes, bytes]:
            context = stdlibSSL.create_default_context(cafile=certificatePath)
            context.set_alpn_protocols(["http/1.1"])
            # The timeout only keeps a broken proxy from hanging the thread.
            raw = socket.create_connection(("127.0.0.1", proxy.port), 30)
            # The TLS socket takes the descriptor over: closing it closes both.
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(connectHead(authority))
                head = readUntil(tls, b"\r\n\r\n")
                tls.sendall(b"stdlib ping")
                echoed = readUntil(tls, b"stdlib ping")
                alpn = tls.selected_alpn_protocol()
                tls.unwrap()
            return alpn, head, echoed

        self.expectProxyConnections(1)
        alpn, head, echoed = yield deferToThread(tunnel)
        self.assertEqual(
            (alpn, head, echoed), ("http/1.1", ESTABLISHED, b"stdlib ping")
        )
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["status"], event["ended"]), (200, "client-eof"))

    @inlineCallbacks
    def test_plaintextClient(self) -> Yielding[None]:
        """
        A client that sends its CONNECT in the clear to a TLS listener gets
        no answer it could read, its connection is closed, and its event
        says C{tls-failed} (not C{client-left}: the operator can tell a
        client that does not speak TLS, or does not trust the certificate,
        from one that left).
        """
        proxy = yield self.runTLSProxy()

        def plaintext() -> bytes:
            # The timeout only keeps a broken proxy from hanging the thread.
            with socket.create_connection(("127.0.0.1", proxy.port), 30) as raw:
                raw.sendall(connectHead("127.0.0.1:1"))
                received = b""
                # Bounded: each turn reads at least one byte, or stops.
                while len(received) < 65536:
                    chunk = raw.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                return received

        self.expectProxyConnections(1)
        received = yield deferToThread(plaintext)
        self.assertNotIn(b"HTTP/1.1", received)
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["status"], event["ended"]), ("-", "tls-failed"))

    @inlineCallbacks
    def test_curlHTTPSProxy(self) -> Yielding[None]:
        """
        C{curl --proxy https://localhost:PORT --proxy-cacert CERT -p}
        completes the TLS handshake with the proxy, verifying its
        certificate, and fetches a page from a local HTTP server through the
        tunnel.  If this curl offers ALPN to the proxy (its verbose output
        says so; curl 7.x does not, curl 8 does), the proxy's connection
        negotiated C{http/1.1}; if not, none.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        proxy = yield self.runTLSProxy()
        httpPort = self.serveHTTP()
        self.expectProxyConnections(1)
        out, err, code = yield runCurl(
            curl,
            [
                "--verbose",
                "--fail",
                "-p",
                "--proxy",
                f"https://localhost:{proxy.port}",
                "--proxy-cacert",
                self.certificatePath,
                f"http://127.0.0.1:{httpPort}/page",
            ],
        )
        self.assertEqual((code, out), (0, PAGE), err)
        [event] = yield self.proxyEnded(1)
        self.assertEqual(
            (event["target"], event["status"]), (f"127.0.0.1:{httpPort}", 200)
        )
        offeredALPN = any(
            line.startswith(b"* ") and b"alpn" in line.lower()
            for line in err.splitlines()
        )
        factory = cast(ALPNRecordingFactory, proxy.factory)
        self.assertEqual(
            factory.negotiated, [b"http/1.1" if offeredALPN else None], err
        )


class TLSCloseTests(TLSProxyTestCase):
    """
    The end of a tunnel whose client side is TLS, which cannot half-close:
    when the target finishes, the proxy flushes everything to the client,
    then closes the TLS connection.
    """

    size = MiB

    @inlineCallbacks
    def tunnelOverTLS(self, makeTarget: Any = Peer) -> Yielding[tuple[Peer, Peer]]:
        """
        Open a tunnel from a TLS client through a TLS proxy listener to a
        target that does not echo.

        @return: Fires with the client and the target.
        """
        proxy = yield self.runTLSProxy()
        targets = self.serve(makeTarget)
        client = yield self.connectThroughTLS(
            proxy.port, f"127.0.0.1:{targets.port}", Peer()
        )
        target = yield targets.accepted.get()
        return client, target

    @inlineCallbacks
    def test_targetClosesAfterData(self) -> Yielding[None]:
        """
        A target that sends 1 MiB and closes: the TLS client receives every
        byte, then sees its connection closed cleanly (a TLS close, not a
        reset).
        """
        client, target = yield self.tunnelOverTLS()
        data = streamChunk(b"target to TLS client", 0, self.size)
        target.tcp.write(data)
        target.tcp.loseConnection()
        yield client.lost.wait()
        self.assertEqual(client.count, self.size)
        self.assertEqual(bytes(client.received), data)
        self.assertClosedCleanly(client)
        [event] = yield self.proxyEnded(1)
        self.assertEqual(
            (event["ended"], event["bytesDown"]), ("target-eof", self.size)
        )

    @inlineCallbacks
    def test_targetHalfClosesAfterData(self) -> Yielding[None]:
        """
        A target that sends 1 MiB and then half-closes (FIN, still reading):
        the TLS client receives every byte and then a clean close; the proxy
        then closes the target's connection too, cleanly.
        """
        client, target = yield self.tunnelOverTLS()
        data = streamChunk(b"target half-closes", 0, self.size)
        target.tcp.write(data)
        target.tcp.loseWriteConnection()
        yield gatherResults([client.lost.wait(), target.lost.wait()])
        self.assertEqual(bytes(client.received), data)
        self.assertClosedCleanly(client)
        self.assertTrue(target.eof.happened)
        self.assertClosedCleanly(target)
        [event] = yield self.proxyEnded(1)
        self.assertEqual(
            (event["ended"], event["bytesDown"]), ("target-eof", self.size)
        )

    @inlineCallbacks
    def test_clientClosesAfterData(self) -> Yielding[None]:
        """
        A TLS client that sends 1 MiB and closes: the target receives every
        byte, then EOF (a FIN, so it could still answer were the client
        able to listen).
        """
        client, target = yield self.tunnelOverTLS()
        data = streamChunk(b"TLS client to target", 0, self.size)
        client.tcp.write(data)
        client.tcp.loseConnection()
        yield gatherResults([client.lost.wait(), target.lost.wait()])
        self.assertEqual(bytes(target.received), data)
        self.assertTrue(target.eof.happened)
        self.assertClosedCleanly(client)
        self.assertClosedCleanly(target)
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["ended"], event["bytesUp"]), ("client-eof", self.size))


class TLSCloseWhileStalledTests(TLSProxyTestCase):
    """
    A TLS client's close_notify that reaches the proxy while the proxy has
    stopped reading the target (the client was not reading).
    """

    @inlineCallbacks
    def test_closeNotifyWhileStalled(self) -> Yielding[None]:
        """
        A TLS client that stops reading while the target sends, closes its
        TLS connection (close_notify), then reads again: the tunnel ends
        and is logged.  Twisted's TLS had the proxy's connection to it ask
        to close with the target's reading paused; once the buffered bytes
        left, Twisted resumed that reading instead of closing, and the
        tunnel stayed open for ever, reading the target into nowhere.
        """
        proxy = yield self.runTLSProxy()
        targets = self.serve(lambda: Peer(keep=False))
        client = yield self.connectThroughTLS(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(keep=False)
        )
        target = yield targets.accepted.get()
        client.tcp.pauseProducing()
        # More than loopback's socket buffers hold: the proxy has to stop
        # reading the target.
        target.tcp.write(b"s" * (64 * MiB))
        [connection] = proxy.factory.connections
        relay = connection._relay
        assert relay is not None
        # Turns of the reactor, not time: the proxy stops reading once its
        # buffers fill, within a few reads.
        yield turnsUntil(
            reactor, lambda: relay._target not in reactor.getReaders(), turns=10000
        )
        self.assertNotIn(relay._target, reactor.getReaders())
        client.tcp.loseConnection()
        client.tcp.resumeProducing()
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["status"], 200)
        target.tcp.abortConnection()


class TLSHandshakeTimeoutTests(TLSProxyTestCase):
    """
    A client of the TLS listener that never finishes its handshake.
    """

    @inlineCallbacks
    def test_handshakeTimeout(self) -> Yielding[None]:
        """
        A client that connects to the TLS listener and never finishes the
        TLS handshake is dropped at the header timeout and logged as
        C{tls-timeout}, without a status: a 408 could not have reached it.
        """
        proxy = yield self.runTLSProxy()
        # The proxy's timers run on a clock of the test's: no waiting.
        clock = proxy.factory.clock = Clock()
        silent = Peer()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), silent
        )
        self._open.append(silent)
        self._proxyClients += 1
        yield turnsUntil(reactor, lambda: proxy.factory.connections, turns=10000)
        clock.advance(proxy.factory.headerTimeout)
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["status"], event["ended"]), ("-", "tls-timeout"))
        yield silent.lost.wait()
        self.assertEqual(silent.count, 0)
