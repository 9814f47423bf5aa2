"""
Tests for L{tunnel.splice}.

The loopback relay tests of L{tests.test_integration} run again with every
tunnel relayed by a L{SpliceRelay}, with the usual pipes and with tiny ones;
then the splice relay's own parts (the pipe pool, the idle timeout with a
fake clock, resets, what Twisted held before the switch) on real loopback
sockets.

Everything listens on 127.0.0.1, always on port 0; every connection a test
opens is closed, and waited for, before it ends.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import inspect
import mmap
import os
import socket
import sys
import termios
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.defer import (
    Deferred,
    DeferredQueue,
    gatherResults,
    inlineCallbacks,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer, provider

import tunnel.server
from tests import test_integration as integration
from tests.fakes import turnsUntil
from tests.test_integration import (
    DataSource,
    Echo,
    MiB,
    Once,
    Peer,
    PeerFactory,
    Yielding,
    pendingWrite,
    reactor,
)
from tunnel import ConnectProxyFactory, splice
from tunnel.direct import DirectEndpoint, DirectTransport
from tunnel.relay import Relay, RelayResult
from tunnel.splice import (
    PIPE_SIZE,
    Pipe,
    PipePool,
    SpliceEnd,
    SpliceRelay,
    canSplice,
    idleLimit,
    spliceAvailable,
)

skipUnlessSplice = None if spliceAvailable() else "splice(2) is Linux-only"


def captureLogs(case: SynchronousTestCase) -> list[LogEvent]:
    """
    Collect the log events emitted until C{case} ends.
    """
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def tunnelLogTexts(events: list[LogEvent]) -> list[str]:
    """
    The text of each event that C{tunnel}'s own loggers emitted.
    """
    return [
        formatEvent(e)
        for e in events
        if e.get("log_namespace", "").startswith("tunnel.")
    ]


#: The smallest pipe the kernel makes: one page.
SMALL_PIPE = 4096


def openDescriptors() -> int:
    """
    How many file descriptors this process has open now.
    """
    return len(os.listdir("/proc/self/fd"))


def spliceEndsRegistered() -> list[SpliceEnd]:
    """
    The L{SpliceEnd}s the reactor watches now.
    """
    return [
        selectable
        for selectable in {*reactor.getReaders(), *reactor.getWriters()}
        if isinstance(selectable, SpliceEnd)
    ]


def assertIdlePipesEmpty(case: SynchronousTestCase, pool: PipePool) -> None:
    """
    Check that every idle pipe of C{pool} is empty: no pipe with bytes in it
    was taken back for reuse.
    """
    pipes = [pool.acquire() for _ in range(pool.idle)]
    for pipe in pipes:
        unread = fcntl.ioctl(pipe.readFD, termios.FIONREAD, b"\0\0\0\0")
        case.assertEqual(int.from_bytes(unread, sys.byteorder), 0)
        pool.release(pipe, empty=True)


def proxyChoosesRelay() -> bool:
    """
    Whether L{ConnectProxyFactory} chooses between L{Relay} and
    L{SpliceRelay} itself (it takes a C{splice} argument).
    """
    return "splice" in inspect.signature(ConnectProxyFactory.__init__).parameters


def spliceInstead(
    client: Any, target: Any, clock: Any, idleTimeout: Any, onEnd: Any
) -> Relay | SpliceRelay:
    """
    TEMPORARY SHIM, used only while L{tunnel.server} does not choose the
    relay itself (see L{proxyChoosesRelay}): stands in for L{Relay} in
    L{tunnel.server} and builds a L{SpliceRelay} when both transports allow
    it, as C{ConnectProxy._targetConnected} will.
    """
    if canSplice(client) and canSplice(target):
        return SpliceRelay(client, target, clock, idleTimeout, onEnd, reactor)
    return Relay(client, target, clock, idleTimeout, onEnd)


class SpliceLoopbackTestCase(integration.LoopbackTestCase):
    """
    The loopback helpers, with every tunnel relayed by a L{SpliceRelay}
    whose pipes come from a pool of this test's own.

    When the test has ended and everything is closed, it checks that each
    tunnel the proxy established was spliced (and none relayed by a plain
    L{Relay}), that no L{SpliceEnd} is left with the reactor, and that every
    pipe came back to the pool.

    @ivar pipeSize: The capacity of the pool's pipes.
    @ivar pool: The pool.
    @ivar spliceRelays: The L{SpliceRelay}s started, in order.
    @ivar plainRelays: The L{Relay}s started: none, unless the proxy failed
        to splice.
    """

    skip = skipUnlessSplice
    pipeSize = PIPE_SIZE

    #: L{SpliceRelay.copySmallReads} for the test: off, so that every byte
    #: goes through the pipes, unless the class says otherwise (L{None}:
    #: the relay's own default, as the proxy runs).
    copySmallReads: bool | None = False

    def setUp(self) -> None:
        """
        Route the proxy's tunnels through L{SpliceRelay} and count relays.
        """
        # Registered first, so run last: after every connection is closed.
        self.addCleanup(self._checkSpliced)
        super().setUp()
        if self.copySmallReads is not None:
            self.patch(SpliceRelay, "copySmallReads", self.copySmallReads)
        self.pool = PipePool(self.pipeSize)
        self.patch(splice, "defaultPool", self.pool)
        self.spliceRelays: list[SpliceRelay] = []
        self.plainRelays: list[Relay] = []
        spliceStart, plainStart = SpliceRelay.start, Relay.start

        def recordSplice(relay: SpliceRelay, *args: Any, **kwargs: Any) -> None:
            self.spliceRelays.append(relay)
            spliceStart(relay, *args, **kwargs)

        def recordPlain(relay: Relay, *args: Any, **kwargs: Any) -> None:
            self.plainRelays.append(relay)
            plainStart(relay, *args, **kwargs)

        self.patch(SpliceRelay, "start", recordSplice)
        self.patch(Relay, "start", recordPlain)
        if not proxyChoosesRelay():
            self.patch(tunnel.server, "Relay", spliceInstead)

    def startProxy(self, *args: Any, **kwargs: Any) -> integration.RunningProxy:
        """
        Run a proxy as L{integration.LoopbackTestCase.startProxy} does, with
        splicing on.
        """
        proxy = super().startProxy(*args, **kwargs)
        if proxyChoosesRelay():
            cast(Any, proxy.factory).splice = True
        return proxy

    @inlineCallbacks
    def echoedTunnel(self) -> Yielding[Peer]:
        """
        Open a tunnel through a new proxy to an echo server and make one
        small round trip; the tunnel stays open.

        @return: Fires with the client L{Peer}.
        """
        proxy = self.startProxy()
        echo = self.serve(Echo)
        client = Peer()
        yield self.connectThrough(proxy.port, f"127.0.0.1:{echo.port}", client)
        client.tcp.write(b"there and back")
        yield client.waitFor(14)
        return client

    def _checkSpliced(self) -> None:
        established = [e for e in self.proxyEvents if e["status"] == 200]
        self.assertEqual(len(self.spliceRelays), len(established))
        self.assertEqual(self.plainRelays, [])
        self.assertEqual(spliceEndsRegistered(), [])
        self.assertEqual(self.pool.lent, 0)
        assertIdlePipesEmpty(self, self.pool)
        self.pool.clear()
        self.assertEqual(self.pool.opened, 0)


class SpliceTunnelTests(SpliceLoopbackTestCase, integration.TunnelTests):
    """
    L{integration.TunnelTests} through L{SpliceRelay}: echo, early data,
    half-close both ways.
    """


class SpliceFlowTests(SpliceLoopbackTestCase, integration.FlowTests):
    """
    L{integration.FlowTests} through L{SpliceRelay}: 64 MiB each way, and a
    slow reader.
    """

    @inlineCallbacks
    def test_slowReaderBoundsProxyBuffers(self) -> Yielding[None]:
        """
        While the client does not read, the proxy stops reading from the
        target: the target, sending 256 MiB through a streaming producer,
        ends up paused by backpressure, while the proxy holds no tunnel byte
        in Twisted's transports' buffers, at most one pipe's worth per
        direction in the kernel, and in the relay's own, none (or, when it
        copies small reads, at most one read of 64 KiB).  Once the client
        reads again, data flows again.
        """
        mostInPython = splice._PYTHON_READ if SpliceRelay.copySmallReads else 0
        proxy = self.startProxy()
        targets = self.serve(lambda: Peer(keep=False))
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(keep=False)
        )
        client.tcp.pauseProducing()
        target = yield targets.accepted.get()
        [relay] = self.spliceRelays
        [connection] = proxy.factory.connections
        proxyClientSide = relay.clientEnd.transport
        proxyTargetSide = relay.targetEnd.transport
        self.assertIs(proxyClientSide, connection.transport)
        source = DataSource(b"to a slow reader", 256 * MiB)
        mostInPipes = [0, 0]
        blocked: Once[None] = Once()

        def observe() -> None:
            inTwisted = [pendingWrite(proxyClientSide), pendingWrite(proxyTargetSide)]
            inPython = relay.pythonBytes()
            inPipes = relay.pipeBytes()
            mostInPipes[:] = map(max, mostInPipes, inPipes)
            registered = {*reactor.getReaders(), *reactor.getWriters()}
            if (
                any(inTwisted)
                or max(inPython) > mostInPython
                or max(inPipes) > PIPE_SIZE
                or {proxyClientSide, proxyTargetSide} & registered
            ):
                why = f"Twisted {inTwisted}, Python {inPython}, pipes {inPipes}"
                blocked.fail(Failure(self.failureException(why)))
            elif source.paused and relay.targetEnd not in reactor.getReaders():
                # The target is paused, and the proxy is not reading from it.
                blocked.fire(None)

        def sentEverything(ignored: None) -> None:
            blocked.fail(Failure(self.failureException("the proxy never pushed back")))

        source.onPause = observe
        source.finished.wait().addCallback(sentEverything)
        source.start(target.tcp)
        # Look at each pause, and after each reactor turn.  Bounded.
        for _ in range(100_000):
            if blocked.happened:
                break
            yield deferLater(reactor, 0, lambda: None)
            observe()
        self.assertTrue(blocked.happened, "the target was never held back")
        yield blocked.wait()
        self.assertLess(source.sent, source.size)
        self.assertLessEqual(max(mostInPipes), PIPE_SIZE)
        self.assertTrue(relay.clientEnd.writing, "not waiting for the client")

        resumed: Once[None] = Once()
        source.onPause = lambda: None
        source.onResume = lambda: resumed.fire(None)
        alreadyReceived = client.count
        client.tcp.resumeProducing()
        yield gatherResults([resumed.wait(), client.waitFor(alreadyReceived + MiB)])

        # Once the target stops and the client has everything, the relay
        # waits to write no more: a destination left registered as a writer
        # would have the reactor spin on the idle tunnel.
        source.stopProducing()
        yield client.waitFor(source.sent)
        yield deferLater(reactor, 0, lambda: None)
        self.assertEqual((relay.pipeBytes(), relay.pythonBytes()), ((0, 0), (0, 0)))
        self.assertFalse(relay.clientEnd.writing)
        self.assertNotIn(relay.clientEnd, reactor.getWriters())


class CopyingTunnelTests(SpliceLoopbackTestCase, integration.TunnelTests):
    """
    L{integration.TunnelTests} through L{SpliceRelay} as the proxy runs it:
    small reads through Python, bulk through the pipes.
    """

    copySmallReads = None

    @inlineCallbacks
    def test_smallExchangeBorrowsNoPipe(self) -> Yielding[None]:
        """
        By default a tunnel whose bytes come in small pieces never borrows
        a pipe: an echo round trip leaves the pool without any.
        """
        client = yield self.echoedTunnel()
        self.assertEqual(self.pool.opened, 0)
        client.tcp.loseConnection()
        yield self.proxyEnded(1)


class OneRoundTunnelTests(SpliceLoopbackTestCase, integration.TunnelTests):
    """
    L{integration.TunnelTests} through L{SpliceRelay} moving at most one
    piece per direction each time it is called: a direction with bytes
    still to move when its turn ends is taken up again as soon as its
    destination can be written, not left in the pipe until the source
    sends more (or the idle timeout ends the tunnel).
    """

    def setUp(self) -> None:
        """
        Let the relay make one round a call.
        """
        super().setUp()
        self.patch(splice, "_ROUNDS", 1)


class CopyingFlowTests(SpliceLoopbackTestCase, integration.FlowTests):
    """
    L{integration.FlowTests} through L{SpliceRelay} as the proxy runs it:
    the first reads of each direction through Python, then the pipes.
    """

    copySmallReads = None
    test_slowReaderBoundsProxyBuffers = (
        SpliceFlowTests.test_slowReaderBoundsProxyBuffers
    )


class SpliceRealClientTests(SpliceLoopbackTestCase, integration.RealClientTests):
    """
    L{integration.RealClientTests} through L{SpliceRelay}: TLS end to end,
    plain TCP at the proxy.
    """


class SpliceCompositionTests(SpliceLoopbackTestCase, integration.CompositionTests):
    """
    L{integration.CompositionTests} through L{SpliceRelay}.
    """


class SmallPipeTunnelTests(SpliceLoopbackTestCase, integration.TunnelTests):
    """
    L{integration.TunnelTests} through L{SpliceRelay} with one-page pipes,
    so that early data and the greeting take many steps.
    """

    pipeSize = SMALL_PIPE

    @inlineCallbacks
    def test_earlyDataLargerThanPipe(self) -> Yielding[None]:
        """
        Early data fifteen times the size of a pipe, sent with the head,
        reaches the target intact and first, and is counted.
        """
        proxy = self.startProxy()
        targets = self.serve(Peer)
        early = hashlib.shake_256(b"early").digest(15 * SMALL_PIPE)
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{targets.port}", Peer(), early=early
        )
        target = yield targets.accepted.get()
        client.tcp.write(b"after")
        yield target.waitFor(len(early) + 5)
        self.assertEqual(target.received, early + b"after")
        self.assertEqual(self.spliceRelays[0].pythonBytes(), (0, 0))
        client.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["bytesUp"], event["bytesDown"]), (len(early) + 5, 0))


class SmallPipeFlowTests(SpliceLoopbackTestCase, integration.FlowTests):
    """
    L{integration.FlowTests} through L{SpliceRelay} with one-page pipes.
    """

    pipeSize = SMALL_PIPE
    test_slowReaderBoundsProxyBuffers = (
        SpliceFlowTests.test_slowReaderBoundsProxyBuffers
    )


class SpliceProxyTests(SpliceLoopbackTestCase):
    """
    What splicing costs the proxy in descriptors.
    """

    @inlineCallbacks
    def test_noDescriptorLeak(self) -> Yielding[None]:
        """
        After a tunnel that moved 8 MiB each way has ended, the process has
        as many descriptors open as before it started, once the pool's idle
        pipes are closed: every socket and every pipe was released.
        """
        proxy = self.startProxy()
        echo = self.serve(lambda: Echo(keep=False))
        # The reactor opens descriptors of its own when it first runs.
        yield deferLater(reactor, 0, lambda: None)
        before = openDescriptors()
        client = yield self.connectThrough(
            proxy.port, f"127.0.0.1:{echo.port}", Peer(keep=False)
        )
        source = DataSource(b"round trip", 8 * MiB)
        source.start(client.tcp)
        yield client.waitFor(8 * MiB)
        self.assertEqual(client.digest.hexdigest(), source.digest.hexdigest())
        client.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["bytesUp"], event["bytesDown"]), (8 * MiB, 8 * MiB))
        yield gatherResults([c.lost.wait() for c in self._open])
        self.assertGreater(self.pool.opened, 0, "no pipe was used")
        self.assertEqual(self.pool.lent, 0)
        self.assertEqual(openDescriptors(), before + 2 * self.pool.idle)
        self.pool.clear()
        self.assertEqual(openDescriptors(), before)

    @inlineCallbacks
    def test_quietTunnelHoldsNoPipe(self) -> Yielding[None]:
        """
        A tunnel with no byte in flight holds no pipe: after an echo round
        trip, while the tunnel stays open, the pool has lent nothing, and
        the tunnel costs the proxy only its two sockets.
        """
        client = yield self.echoedTunnel()
        self.assertEqual(self.pool.lent, 0)
        self.assertGreater(self.pool.idle, 0)
        [relay] = self.spliceRelays
        self.assertEqual(relay.pipeBytes(), (0, 0))
        self.assertEqual(
            {relay.clientEnd, relay.targetEnd}, set(spliceEndsRegistered())
        )
        client.tcp.loseConnection()
        yield self.proxyEnded(1)

    @inlineCallbacks
    def test_greetingBeforeTargetBytes(self) -> Yielding[None]:
        """
        A target that speaks first: its bytes reach the client after the
        C{200} response, which the proxy wrote through the pipe too.
        """
        proxy = self.startProxy()

        class Greeter(Peer):
            """
            A target that greets first.
            """

            def connectionMade(self) -> None:
                """
                Greet.
                """
                super().connectionMade()
                self.tcp.write(b"220 hello first\r\n")

        targets = self.serve(Greeter)
        client = Peer()
        head = yield self.requestTunnel(proxy.port, f"127.0.0.1:{targets.port}", client)
        self.assertEqual(head, integration.ESTABLISHED)
        yield client.waitFor(17)
        self.assertEqual(client.received, b"220 hello first\r\n")
        client.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["bytesDown"], 17)


@implementer(IHalfCloseableProtocol)
class ProxySide(Protocol):
    """
    The proxy's end of one connection in the relay tests: holds what
    arrives until a relay is attached, then hands every event to it, as
    C{ConnectProxy} and L{tunnel.relay.TargetProtocol} do.

    @ivar side: C{"client"} or C{"target"}.
    @ivar relay: The relay, once attached.
    @ivar pending: Bytes that arrived before.
    @ivar finished: Fires when the peer's FIN arrives.
    @ivar lost: Fires when the connection is closed.
    """

    def __init__(self, side: str) -> None:
        self.side = side
        self.relay: SpliceRelay | None = None
        self.pending: list[bytes] = []
        self.made: Once[ProxySide] = Once()
        self.finished: Once[None] = Once()
        self.lost: Once[None] = Once()
        self.lostReason: Failure | None = None

    def connectionMade(self) -> None:
        """
        Announce the connection.
        """
        self.made.fire(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Hand the bytes to the relay, or hold them.
        """
        if self.relay is None:
            self.pending.append(data)
        elif self.side == "client":
            self.relay.clientData(data)
        else:
            self.relay.targetData(data)

    def readConnectionLost(self) -> None:
        """
        The peer sent FIN.
        """
        self.finished.fire(None)
        if self.relay is not None:
            if self.side == "client":
                self.relay.clientFinished()
            else:
                self.relay.targetFinished()

    def writeConnectionLost(self) -> None:
        """
        Our FIN went out.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Tell the relay, and record.
        """
        self.lostReason = reason
        if self.relay is not None:
            if self.side == "client":
                self.relay.clientLost(reason)
            else:
                self.relay.targetLost(reason)
        self.lost.fire(None)


class ProxySideFactory(Factory):
    """
    Accepts connections as the client side of a test relay.

    @ivar accepted: The L{ProxySide}s, each put once connected.
    """

    noisy = False

    def __init__(self, track: Any) -> None:
        self._track = track
        self.accepted: DeferredQueue[ProxySide] = DeferredQueue()

    def buildProtocol(self, addr: IAddress | None) -> ProxySide:
        """
        Build a client-side L{ProxySide}, tracked for cleanup.
        """
        side = ProxySide("client")
        self._track(side)
        side.made.wait().addCallback(self.accepted.put)
        return side


class SpliceRelayTests(TestCase):
    """
    A L{SpliceRelay} built by hand between two loopback connections: a
    client L{Peer} connected to a L{ProxySide}, and a L{ProxySide}
    connected to a target L{Peer}.
    """

    skip = skipUnlessSplice
    timeout = 30

    #: Whether each L{SpliceEnd} takes over its transport's registration
    #: with the reactor (see L{SpliceEnd.takeOver}).
    takesOver = True

    def setUp(self) -> None:
        """
        Track connections; close them all at the end.  Relays splice every
        read, unless a test says otherwise.
        """
        self.patch(SpliceRelay, "copySmallReads", False)
        self.open: list[Any] = []
        self.pool = PipePool()
        self.results: list[RelayResult] = []
        self.addCleanup(self._closeEverything)

    @inlineCallbacks
    def _closeEverything(self) -> Yielding[None]:
        for connection in self.open:
            if not connection.lost.happened:
                connection.transport.abortConnection()
        yield gatherResults([connection.lost.wait() for connection in self.open])
        self.assertLessEqual(len(self.results), 1)
        self.assertEqual(spliceEndsRegistered(), [])
        self.assertEqual(self.pool.lent, 0)
        assertIdlePipesEmpty(self, self.pool)
        self.pool.clear()

    def listen(self, factory: Factory) -> int:
        """
        Listen on port 0 of 127.0.0.1 until the test ends.
        """
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @inlineCallbacks
    def connectPair(
        self, client: Peer, target: Peer
    ) -> Yielding[tuple[ProxySide, ProxySide]]:
        """
        Connect C{client} to a client-side L{ProxySide}, and a target-side
        L{ProxySide} to C{target}.

        @return: Fires with the two L{ProxySide}s.
        """
        clientSides = ProxySideFactory(self.open.append)
        clientPort = self.listen(clientSides)
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", clientPort), client
        )
        self.open.append(client)
        clientSide = yield clientSides.accepted.get()
        targets = PeerFactory(lambda: target, self.open.append)
        targetPort = self.listen(targets)
        targetSide = ProxySide("target")
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", targetPort), targetSide
        )
        self.open.append(targetSide)
        yield targets.accepted.get()
        return clientSide, targetSide

    def relayBetween(
        self,
        clientSide: ProxySide,
        targetSide: ProxySide,
        clock: Any = None,
        idleTimeout: float | None = None,
    ) -> tuple[SpliceRelay, Once[RelayResult]]:
        """
        Build a L{SpliceRelay} between two L{ProxySide}s and attach it.

        @return: The relay, and what fires with its result.
        """
        ended: Once[RelayResult] = Once()

        def onEnd(result: RelayResult) -> None:
            self.results.append(result)
            ended.fire(result)

        relay = SpliceRelay(
            cast(Any, clientSide.transport),
            cast(Any, targetSide.transport),
            clock if clock is not None else reactor,
            idleTimeout,
            onEnd,
            reactor,
            pool=self.pool,
        )
        clientSide.relay = targetSide.relay = relay
        return relay, ended

    @inlineCallbacks
    def relayed(
        self, clock: Any = None, idleTimeout: float | None = None
    ) -> Yielding[tuple[Peer, Peer, SpliceRelay, Once[RelayResult]]]:
        """
        Connect a client and a target peer through a started relay.

        @return: Fires with the client peer, the target peer, the relay, and
            what fires with its result.
        """
        client, target = Peer(closeOnEOF=False), Peer(closeOnEOF=False)
        clientSide, targetSide = yield self.connectPair(client, target)
        relay, ended = self.relayBetween(clientSide, targetSide, clock, idleTimeout)
        relay.start()
        return client, target, relay, ended

    def assertReset(self, *peers: Peer) -> None:
        """
        Check that each of C{peers} lost its connection to a reset.
        """
        for peer in peers:
            self.assertTrue(peer.lost.happened)
            assert peer.lostReason is not None
            self.assertNotIsInstance(peer.lostReason.value, ConnectionDone)

    @inlineCallbacks
    def test_idleTimeout(self) -> Yielding[None]:
        """
        With no byte either way for C{idleTimeout} seconds of the injected
        clock, both connections are aborted and the tunnel ends
        C{"idle-timeout"}.  Traffic postpones it without rescheduling the
        timer for each chunk: one delayed call, rescheduled when it finds
        that there was traffic, for the time remaining.
        """
        clock = Clock()
        client, target, _, ended = yield self.relayed(clock, idleTimeout=10)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        client.tcp.write(b"ping")
        yield target.waitFor(4)
        clock.advance(9)
        client.tcp.write(b"pong")
        yield target.waitFor(8)
        target.tcp.write(b"back")
        yield client.waitFor(4)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(1)
        self.assertFalse(ended.happened)
        [check] = clock.getDelayedCalls()
        self.assertEqual(check.getTime(), 19)
        clock.advance(8.5)
        self.assertFalse(ended.happened)
        clock.advance(0.5)
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(8, 4, "idle-timeout"))
        self.assertEqual(clock.getDelayedCalls(), [])
        yield gatherResults([client.lost.wait(), target.lost.wait()])
        self.assertReset(client, target)

    @inlineCallbacks
    def test_noIdleTimeout(self) -> Yielding[None]:
        """
        Without an idle timeout, no timer is scheduled.
        """
        clock = Clock()
        client, target, relay, ended = yield self.relayed(clock, idleTimeout=None)
        client.tcp.write(b"ping")
        yield target.waitFor(4)
        self.assertEqual(clock.getDelayedCalls(), [])
        relay.abort()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(4, 0, "shutdown"))

    @inlineCallbacks
    def test_abort(self) -> Yielding[None]:
        """
        L{SpliceRelay.abort} resets both connections and the tunnel ends as
        told; C{onEnd} is called once, after both transports are closed, and
        the idle timer is cancelled.
        """
        clock = Clock()
        client, target, relay, ended = yield self.relayed(clock, idleTimeout=60)
        relay.abort("shutdown")
        relay.abort("something else")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(spliceEndsRegistered(), [])
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(0, 0, "shutdown"))
        yield gatherResults([client.lost.wait(), target.lost.wait()])
        self.assertReset(client, target)
        self.assertEqual(len(self.results), 1)

    @inlineCallbacks
    def test_clientReset(self) -> Yielding[None]:
        """
        A client that resets its connection gets the target's reset too:
        the tunnel ends C{"client-reset"}.
        """
        client, target, _, ended = yield self.relayed()
        client.tcp.write(b"hello")
        yield target.waitFor(5)
        client.tcp.abortConnection()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(5, 0, "client-reset"))
        yield target.lost.wait()
        self.assertReset(target)

    @inlineCallbacks
    def test_targetReset(self) -> Yielding[None]:
        """
        A target that resets its connection gets the client's reset too:
        the tunnel ends C{"target-reset"}.
        """
        client, target, _, ended = yield self.relayed()
        target.tcp.write(b"hello")
        yield client.waitFor(5)
        target.tcp.abortConnection()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(0, 5, "target-reset"))
        yield client.lost.wait()
        self.assertReset(client)

    @inlineCallbacks
    def test_targetGoneBeforeStart(self) -> Yielding[None]:
        """
        A target that answered and closed before the relay started, while
        the client sent early data and its FIN: sending to the target
        fails (it resets), and the client still gets the greeting and the
        target's answer before the reset, as the ordinary relay gives them,
        not a bare reset.
        """
        client, target = Peer(closeOnEOF=False), Peer(closeOnEOF=False)
        clientSide, targetSide = yield self.connectPair(client, target)
        relay, ended = self.relayBetween(clientSide, targetSide)
        # The answer stays in the proxy's socket, unread, with the FIN.
        targetSide.transport.stopReading()
        target.tcp.write(b"421 go away\r\n")
        target.tcp.loseConnection()
        yield target.lost.wait()
        proxySocket = targetSide.transport.socket
        yield turnsUntil(
            reactor,
            lambda: (
                proxySocket.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                == b"421 go away\r\n"
            ),
        )
        relay.start(b"HELO me\r\n", clientFinished=True, greeting=b"200 OK\r\n\r\n")
        yield client.lost.wait()
        self.assertEqual(bytes(client.received), b"200 OK\r\n\r\n421 go away\r\n")
        result = yield ended.wait()
        self.assertEqual((result.bytesUp, result.bytesDown), (9, 13))

    @inlineCallbacks
    def test_greetingBeforeTargetReset(self) -> Yielding[None]:
        """
        Whichever relay moves the bytes, a target reset seen right after
        the relay started, before the reactor wrote anything, leaves the
        client with the greeting and then the reset, not a bare reset: the
        ordinary relay sends what its client transport holds before it
        aborts it, as the splice relay sends the greeting at once.
        """
        for relayClass in (Relay, SpliceRelay):
            client, target = Peer(closeOnEOF=False), Peer(closeOnEOF=False)
            clientSide, targetSide = yield self.connectPair(client, target)
            ended: Once[RelayResult] = Once()
            clientTransport = cast(Any, clientSide.transport)
            targetTransport = cast(Any, targetSide.transport)
            relay: Relay | SpliceRelay
            if relayClass is SpliceRelay:
                relay = SpliceRelay(
                    clientTransport,
                    targetTransport,
                    reactor,
                    None,
                    ended.fire,
                    reactor,
                    pool=self.pool,
                )
            else:
                relay = Relay(
                    clientTransport, targetTransport, reactor, None, ended.fire
                )
            clientSide.relay = targetSide.relay = cast(Any, relay)
            relay.start(greeting=b"200 OK\r\n\r\n")
            relay.targetLost(Failure(ConnectionLost()))
            result = yield ended.wait()
            self.assertEqual(result.ended, "target-reset", relayClass)
            yield client.lost.wait()
            self.assertEqual(bytes(client.received), b"200 OK\r\n\r\n", relayClass)
            self.assertReset(client)

    @inlineCallbacks
    def test_resetWhileHeldBack(self) -> Yielding[None]:
        """
        A client that stopped reading and then resets, while the relay holds
        target bytes in a pipe and waits for the client, ends the tunnel
        C{"client-reset"}; the pipe with bytes in it is closed, not pooled.
        """
        client, target, relay, ended = yield self.relayed()
        client.tcp.pauseProducing()
        source = DataSource(b"never read", 64 * MiB)
        source.start(target.tcp)
        yield turnsUntil(
            reactor, lambda: relay.clientEnd.writing and relay.pipeBytes()[1]
        )
        self.assertTrue(relay.clientEnd.writing, "the client never held back")
        self.assertNotIn(relay.targetEnd, reactor.getReaders())
        client.tcp.abortConnection()
        result = yield ended.wait()
        self.assertEqual(result.ended, "client-reset")
        assertIdlePipesEmpty(self, self.pool)
        yield target.lost.wait()
        self.assertReset(target)

    @inlineCallbacks
    def test_resetSeenByReactor(self) -> Yielding[None]:
        """
        A reset on a socket the relay only writes to (its peer half-closed
        and stopped reading) is reported by the reactor, not by a splice:
        the tunnel ends C{"client-reset"} all the same.
        """
        client, target, relay, ended = yield self.relayed()
        client.tcp.loseWriteConnection()
        yield target.eof.wait()
        client.tcp.pauseProducing()
        source = DataSource(b"never read", 64 * MiB)
        source.start(target.tcp)
        yield turnsUntil(reactor, lambda: relay.clientEnd.writing)
        self.assertTrue(relay.clientEnd.writing, "the client never held back")
        self.assertFalse(relay.clientEnd.reading)
        client.tcp.abortConnection()
        result = yield ended.wait()
        self.assertEqual(result.ended, "client-reset")
        yield target.lost.wait()
        self.assertReset(target)

    @inlineCallbacks
    def test_endsReplaceTransports(self) -> Yielding[None]:
        """
        Once the relay has started, the reactor calls the two L{SpliceEnd}s
        for their sockets, and no longer the transports.
        """
        client, target = Peer(closeOnEOF=False), Peer(closeOnEOF=False)
        clientSide, targetSide = yield self.connectPair(client, target)
        relay, ended = self.relayBetween(clientSide, targetSide)
        relay.start()
        readers = reactor.getReaders()
        self.assertIn(relay.clientEnd, readers)
        self.assertIn(relay.targetEnd, readers)
        self.assertNotIn(clientSide.transport, readers)
        self.assertNotIn(targetSide.transport, readers)
        relay.abort()
        yield ended.wait()

    @inlineCallbacks
    def test_epollCallsAtStart(self) -> Yielding[None]:
        """
        On the epoll reactor, starting a relay tells the kernel nothing:
        each L{SpliceEnd} takes over its transport's registration as it
        stands (L{takesOver}).  Where it cannot, the transport unregisters
        and the end registers, two C{epoll_ctl} calls per socket.
        """
        if type(reactor) is not EPollReactor:
            raise SkipTest("the reactor is not the epoll reactor")
        client, target = Peer(closeOnEOF=False), Peer(closeOnEOF=False)
        clientSide, targetSide = yield self.connectPair(client, target)
        relay, ended = self.relayBetween(clientSide, targetSide)
        poller = CountingPoller(cast(Any, reactor)._poller)
        self.patch(reactor, "_poller", poller)
        relay.start()
        expected = [] if self.takesOver else ["unregister", "register"] * 2
        self.assertEqual(sorted(poller.changes), sorted(expected))
        relay.abort()
        yield ended.wait()

    @inlineCallbacks
    def test_halfCloseBothWays(self) -> Yielding[None]:
        """
        The client's FIN reaches the target as a real end of file while the
        target still sends; the target's FIN then reaches the client, and
        the tunnel closes both connections cleanly, C{"client-eof"}.
        """
        client, target = Peer(closeOnEOF=False), Peer(closeOnEOF=False)
        sides = yield self.connectPair(client, target)
        relay, ended = self.relayBetween(*sides)
        relay.start()
        client.tcp.write(b"request")
        client.tcp.loseWriteConnection()
        yield target.eof.wait()
        self.assertEqual(target.received, b"request")
        target.tcp.write(b"response after EOF")
        yield client.waitFor(18)
        self.assertFalse(client.eof.happened)
        target.tcp.loseWriteConnection()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(7, 18, "client-eof"))
        yield client.eof.wait()
        self.assertEqual(client.received, b"response after EOF")
        # The proxy's sockets were closed in order, not aborted: Twisted
        # aborts with SO_LINGER 0, a reset that could drop bytes the kernel
        # has not sent yet.
        for side in sides:
            assert side.lostReason is not None
            self.assertIsInstance(side.lostReason.value, ConnectionDone)

    @inlineCallbacks
    def test_noCycleAfterEnd(self) -> Yielding[None]:
        """
        Once the tunnel ends, nothing the relay holds refers back to it:
        reference counting alone frees a finished tunnel, and no tunnel
        leaves garbage for Python's cycle collector, whose passes stall
        every other tunnel while they run.
        """
        client, target, relay, ended = yield self.relayed()
        client.tcp.write(b"ping")
        yield target.waitFor(4)
        client.tcp.loseWriteConnection()
        target.tcp.loseWriteConnection()
        yield ended.wait()
        referrers = gc.get_referrers(relay)
        self.assertEqual(
            [r for r in referrers if isinstance(r, (SpliceEnd, splice._Flow))], []
        )

    @inlineCallbacks
    def test_finsWithForkedCopies(self) -> Yielding[None]:
        """
        Both FINs reach the peers while another process holds copies of
        the proxy's sockets (a fork without exec, which a program embedding
        the proxy may do): they go out with C{shutdown}, where C{close}
        alone would send nothing until every copy is closed.
        """
        client, target, _, ended = yield self.relayed()
        readFD, writeFD = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child only waits, then exits)
            try:
                # Until the parent closes its end: end of file.
                os.close(writeFD)
                os.read(readFD, 1)
            finally:
                os._exit(0)
        os.close(readFD)

        def releaseChild() -> None:
            os.close(writeFD)
            os.waitpid(pid, 0)

        self.addCleanup(releaseChild)
        client.tcp.loseWriteConnection()
        yield target.eof.wait()
        target.tcp.loseWriteConnection()
        yield client.eof.wait()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(0, 0, "client-eof"))

    @inlineCallbacks
    def test_whatTwistedHeldGoesFirst(self) -> Yielding[None]:
        """
        Bytes already written to the client's Twisted transport go out
        first, then the greeting, then target bytes Twisted read before the
        relay was attached, then the rest; early data reaches the target
        first.  Twisted's buffers are left empty.
        """
        client, target = Peer(), Peer()
        clientSide, targetSide = yield self.connectPair(client, target)
        target.tcp.write(b"target spoke first;")
        yield turnsUntil(reactor, lambda: targetSide.pending)
        self.assertEqual(targetSide.pending, [b"target spoke first;"])
        clientSide.transport.write(b"written by Twisted;")
        relay, ended = self.relayBetween(clientSide, targetSide)
        relay.targetData(b"".join(targetSide.pending))
        relay.start(earlyData=b"early;", greeting=b"greeting;")
        self.assertEqual(pendingWrite(clientSide.transport), 0)
        target.tcp.write(b"then more")
        client.tcp.write(b"later")
        yield gatherResults([client.waitFor(56), target.waitFor(11)])
        self.assertEqual(
            client.received,
            b"written by Twisted;greeting;target spoke first;then more",
        )
        self.assertEqual(target.received, b"early;later")
        self.assertEqual((relay.bytesUp, relay.bytesDown), (11, 28))
        relay.abort()
        yield ended.wait()

    @inlineCallbacks
    def test_finishedBeforeStart(self) -> Yielding[None]:
        """
        A target whose bytes and FIN Twisted read before the relay was
        attached has them passed on, in order, when it starts, as a real
        end of file to the client; the client can still answer, and the
        tunnel ends C{"target-eof"} when the client closes.
        """
        client, target = Peer(closeOnEOF=False), Peer()
        clientSide, targetSide = yield self.connectPair(client, target)
        target.tcp.write(b"goodbye")
        target.tcp.loseWriteConnection()
        yield targetSide.finished.wait()
        relay, ended = self.relayBetween(clientSide, targetSide)
        relay.targetData(b"".join(targetSide.pending))
        relay.targetFinished()
        relay.start(greeting=b"200;")
        yield client.eof.wait()
        self.assertEqual(client.received, b"200;goodbye")
        client.tcp.write(b"answer")
        yield target.waitFor(6)
        client.tcp.loseConnection()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(6, 7, "target-eof"))

    @inlineCallbacks
    def test_clientFinishedAtStart(self) -> Yielding[None]:
        """
        C{clientFinished=True}: after the early data, the target sees end of
        file, and the tunnel ends C{"client-eof"} once the target closes.
        """
        client, target = Peer(closeOnEOF=False), Peer(closeOnEOF=False)
        clientSide, targetSide = yield self.connectPair(client, target)
        relay, ended = self.relayBetween(clientSide, targetSide)
        relay.start(earlyData=b"last words", clientFinished=True)
        yield target.eof.wait()
        self.assertEqual(target.received, b"last words")
        target.tcp.write(b"reply")
        target.tcp.loseConnection()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(10, 5, "client-eof"))
        yield client.eof.wait()
        self.assertEqual(client.received, b"reply")

    @inlineCallbacks
    def test_spillLargerThanPipe(self) -> Yielding[None]:
        """
        Early data and a greeting a hundred times the size of a pipe (one
        page), which the relay sends from Python straight to the sockets,
        arrive intact and in order, and the bytes the relay held in Python
        are gone once delivered.
        """
        self.pool = PipePool(SMALL_PIPE)
        client, target = Peer(), Peer()
        clientSide, targetSide = yield self.connectPair(client, target)
        relay, ended = self.relayBetween(clientSide, targetSide)
        early = hashlib.shake_256(b"up").digest(100 * SMALL_PIPE)
        greeting = hashlib.shake_256(b"down").digest(100 * SMALL_PIPE + 1)
        relay.start(earlyData=early, greeting=greeting)
        yield gatherResults([target.waitFor(len(early)), client.waitFor(len(greeting))])
        self.assertEqual(bytes(target.received), early)
        self.assertEqual(bytes(client.received), greeting)
        self.assertEqual(relay.pythonBytes(), (0, 0))
        self.assertEqual((relay.bytesUp, relay.bytesDown), (len(early), 0))
        relay.abort()
        yield ended.wait()

    @inlineCallbacks
    def test_readsWhilePipesFill(self) -> Yielding[None]:
        """
        One readiness event of a source with more than a pipe's worth
        waiting moves several pipes' worth: the relay reads again after
        each read that filled the pipe, up to C{_READS} reads, then waits
        for the reactor again.
        """
        self.pool = PipePool(SMALL_PIPE)
        client, target = Peer(), Peer()
        clientSide, targetSide = yield self.connectPair(client, target)
        proxyClient = cast(Any, clientSide.transport)
        # The bytes wait in the socket, unread by Twisted, until the relay
        # reads them; the target's side has room for all it will send.
        proxyClient.stopReading()
        cast(Any, targetSide.transport).socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20
        )
        waiting = (splice._READS + 2) * SMALL_PIPE
        client.tcp.write(b"x" * waiting)

        def queued() -> int:
            raw = fcntl.ioctl(proxyClient.fileno(), termios.FIONREAD, b"\0\0\0\0")
            return int.from_bytes(raw, sys.byteorder)

        yield turnsUntil(reactor, lambda: queued() >= waiting)
        self.assertEqual(queued(), waiting)
        relay, ended = self.relayBetween(clientSide, targetSide)
        relay.start()
        self.assertEqual(relay.bytesUp, 0)
        relay._readable(relay.clientEnd)
        self.assertGreater(relay.bytesUp, SMALL_PIPE)
        self.assertEqual(relay.bytesUp, splice._READS * SMALL_PIPE)
        self.assertEqual(queued(), 2 * SMALL_PIPE)
        self.assertTrue(relay.clientEnd.reading, "not waiting for the rest")
        yield target.waitFor(waiting)
        self.assertEqual(bytes(target.received), b"x" * waiting)
        relay.abort()
        yield ended.wait()

    @inlineCallbacks
    def test_lostElsewhere(self) -> Yielding[None]:
        """
        A transport closed by someone else than the relay (its socket closed
        under it) makes the relay let go of both sockets at once and abort
        the other connection: C{"target-reset"}.
        """
        client, _, relay, ended = yield self.relayed()
        relay.targetEnd.transport.abortConnection()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(0, 0, "target-reset"))
        yield client.lost.wait()
        self.assertReset(client)

    @inlineCallbacks
    def test_lostElsewhereWithBytesInFlight(self) -> Yielding[None]:
        """
        A transport closed cleanly by someone else while bytes from it wait
        in a pipe for the other side (which is not reading): those bytes
        cannot be delivered once the relay lets go, so the other side is
        reset, not sent a FIN after a cut stream.
        """
        client, target, relay, ended = yield self.relayed()
        target.tcp.pauseProducing()
        DataSource(b"held", 32 * MiB).start(client.tcp)
        yield turnsUntil(
            reactor, lambda: relay.targetEnd.writing and relay.pipeBytes()[0]
        )
        self.assertTrue(relay.pipeBytes()[0], "no bytes held in the pipe")
        relay.clientEnd.transport.loseConnection()
        result = yield ended.wait()
        self.assertEqual(result.ended, "client-eof")
        target.tcp.resumeProducing()
        yield target.lost.wait()
        self.assertReset(target)
        self.assertFalse(target.eof.happened)

    @inlineCallbacks
    def test_noPipeGoesThroughPython(self) -> Yielding[None]:
        """
        When no pipe can be had (out of descriptors), a working tunnel
        keeps working: its bytes go through Python, counted as usual, and
        nothing fails; once pipes can be had again, they are used.
        """
        events = captureLogs(self)
        acquire = self.pool.acquire
        failing = [True]

        def noPipe() -> Pipe:
            if failing[0]:
                raise OSError(errno.EMFILE, "Too many open files")
            return acquire()

        self.patch(self.pool, "acquire", noPipe)
        client, target, relay, ended = yield self.relayed()
        client.tcp.write(b"up through Python")
        yield target.waitFor(17)
        target.tcp.write(b"down through Python")
        yield client.waitFor(19)
        self.assertEqual((relay.bytesUp, relay.bytesDown), (17, 19))
        failing[0] = False
        client.tcp.write(b"and spliced again")
        yield target.waitFor(34)
        self.assertEqual(target.received, b"up through Pythonand spliced again")
        client.tcp.loseConnection()
        target.tcp.loseConnection()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(34, 19, "client-eof"))
        self.assertEqual([e for e in events if e.get("log_failure")], [])

    @inlineCallbacks
    def test_smallReadsCopied(self) -> Yielding[None]:
        """
        With C{copySmallReads}, small pieces each way go through Python
        without borrowing a pipe; once a read fills 64 KiB, that direction
        goes through a pipe for the rest of the tunnel, and every byte
        arrives in order and is counted.
        """
        self.patch(SpliceRelay, "copySmallReads", True)
        client, target, relay, ended = yield self.relayed()
        client.tcp.write(b"request")
        yield target.waitFor(7)
        target.tcp.write(b"response")
        yield client.waitFor(8)
        self.assertEqual(self.pool.opened, 0)
        self.assertEqual(relay.pipeBytes(), (0, 0))
        bulk = hashlib.shake_256(b"bulk").digest(4 * MiB)
        target.tcp.write(bulk)
        yield client.waitFor(8 + len(bulk))
        self.assertEqual(client.received, b"response" + bulk)
        self.assertEqual(self.pool.opened, 1)
        client.tcp.write(b"still small")
        yield target.waitFor(18)
        self.assertEqual(self.pool.opened, 1)
        client.tcp.loseConnection()
        target.tcp.loseConnection()
        result = yield ended.wait()
        self.assertEqual(result, RelayResult(18, 8 + len(bulk), "client-eof"))


class CountingPoller:
    """
    Stands in for an L{EPollReactor}'s C{select.epoll} object: counts the
    changes to what it watches (each one an C{epoll_ctl} call) and passes
    everything on to the real one.

    @ivar changes: The names of the calls made: C{"register"},
        C{"modify"}, C{"unregister"}.
    """

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self.changes: list[str] = []

    def register(self, fd: int, events: int) -> None:
        """
        Count, then register.
        """
        self.changes.append("register")
        self._poller.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        """
        Count, then modify.
        """
        self.changes.append("modify")
        self._poller.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """
        Count, then unregister.
        """
        self.changes.append("unregister")
        self._poller.unregister(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


class SpliceRelaySelfRegisteringTests(SpliceRelayTests):
    """
    L{SpliceRelayTests} as on a reactor other than epoll, where each
    L{SpliceEnd} cannot take over its transport's registration: the
    transport stops reading and writing, and the end registers itself.
    """

    takesOver = False

    def setUp(self) -> None:
        """
        Make L{SpliceEnd.takeOver} find no epoll reactor.
        """
        super().setUp()
        self.patch(splice, "EPollReactor", None)


class PipePoolTests(SynchronousTestCase):
    """
    L{PipePool} lends pipes and keeps a bounded number of idle ones.
    """

    skip = skipUnlessSplice

    def test_pipeSize(self) -> None:
        """
        A pipe has the capacity asked for, or what the kernel allows: a
        non-blocking write of more than that stops at the capacity.
        """
        pool = PipePool(SMALL_PIPE * 4)
        self.addCleanup(pool.clear)
        pipe = pool.acquire()
        self.assertEqual(pipe.size, fcntl.fcntl(pipe.writeFD, fcntl.F_GETPIPE_SZ))
        self.assertEqual(pipe.size, SMALL_PIPE * 4)
        self.assertEqual(os.write(pipe.writeFD, b"x" * (pipe.size + 1)), pipe.size)
        self.assertRaises(BlockingIOError, os.write, pipe.writeFD, b"x")
        pool.release(pipe, empty=False)
        self.assertEqual(pool.opened, 0)

    def test_pipeSizeBeyondTheLimit(self) -> None:
        """
        A capacity beyond C{/proc/sys/fs/pipe-max-size} (which binds a
        process without C{CAP_SYS_RESOURCE}) gives a pipe of at least that
        limit, not the kernel's 64 KiB default.
        """
        limit = splice._pipeMaxSize()
        pool = PipePool(limit * 4)
        self.addCleanup(pool.clear)
        pipe = pool.acquire()
        self.assertEqual(pipe.size, fcntl.fcntl(pipe.writeFD, fcntl.F_GETPIPE_SZ))
        self.assertGreaterEqual(pipe.size, limit)
        pool.release(pipe, empty=True)

    def test_pipeMaxSizeUnknown(self) -> None:
        """
        Where the kernel does not tell its pipe size limit, the limit is
        taken to be L{splice.PIPE_SIZE}.
        """
        self.assertEqual(splice._pipeMaxSize(self.mktemp()), splice.PIPE_SIZE)

    def test_reuse(self) -> None:
        """
        A pipe given back empty is lent again, not a new one.
        """
        pool = PipePool()
        self.addCleanup(pool.clear)
        first = pool.acquire()
        pool.release(first, empty=True)
        self.assertIs(pool.acquire(), first)
        self.assertEqual((pool.opened, pool.lent, pool.idle), (1, 1, 0))
        pool.release(first, empty=True)

    def test_boundedIdle(self) -> None:
        """
        No more than C{maxIdle} idle pipes are kept: the others are closed
        when they come back, and clearing closes the rest; no descriptor is
        left behind.
        """
        before = openDescriptors()
        pool = PipePool(maxIdle=2)
        pipes = [pool.acquire() for _ in range(5)]
        self.assertEqual((pool.opened, pool.lent), (5, 5))
        self.assertEqual(openDescriptors(), before + 10)
        for pipe in pipes:
            pool.release(pipe, empty=True)
        self.assertEqual((pool.opened, pool.idle, pool.lent), (2, 2, 0))
        self.assertEqual(openDescriptors(), before + 4)
        pool.clear()
        self.assertEqual((pool.opened, pool.idle), (0, 0))
        self.assertEqual(openDescriptors(), before)

    def test_smallerPipeNotKept(self) -> None:
        """
        A pipe that came back smaller than the pool's others (made while the
        user's pipe quota was used up) is closed, not kept, so that the next
        new pipe may have the full size.
        """
        pool = PipePool(SMALL_PIPE * 4, maxIdle=4)
        self.addCleanup(pool.clear)
        full, small = pool.acquire(), pool.acquire()
        fcntl.fcntl(small.writeFD, fcntl.F_SETPIPE_SZ, SMALL_PIPE)
        small = Pipe(small.readFD, small.writeFD, SMALL_PIPE)
        pool.release(small, True)
        pool.release(full, True)
        self.assertEqual((pool.idle, pool.opened), (1, 1))
        self.assertIs(pool.acquire(), full)

    def test_smallerPipeMadeLaterNotKept(self) -> None:
        """
        A pipe made smaller than one made before it (the quota used up in
        between) is not kept either: the size to keep is the largest the
        pool has made, not the last.
        """
        pool = PipePool(SMALL_PIPE * 4, maxIdle=4)
        self.addCleanup(pool.clear)
        full = pool.acquire()
        # As the kernel would give while the user's pipe quota is used up.
        pool.pipeSize = SMALL_PIPE
        small = pool.acquire()
        self.assertEqual((full.size, small.size), (SMALL_PIPE * 4, SMALL_PIPE))
        pool.release(small, True)
        self.assertEqual((pool.idle, pool.opened), (0, 1))
        pool.release(full, True)
        self.assertEqual((pool.idle, pool.opened), (1, 1))

    def test_idleLimit(self) -> None:
        """
        Root keeps up to C{maxIdle} empty pipes; another user at most a
        quarter of its pipe quota (C{fs.pipe-user-pages-soft}), shared by
        its processes, and at least one; no quota (0) or no way to read it
        means no limit of its own.
        """
        quota = self.mktemp()

        def limit(pages: str, pipeSize: int = 1 << 20) -> int:
            with open(quota, "w") as f:
                f.write(pages)
            return idleLimit(pipeSize, 64, privileged=False, quotaPath=quota)

        pagesPerMiB = (1 << 20) // mmap.PAGESIZE
        self.assertEqual(idleLimit(1 << 20, 64, privileged=True), 64)
        self.assertEqual(limit(str(64 * pagesPerMiB)), 16)
        with open(quota, "w") as f:
            f.write(str(64 * pagesPerMiB))
        self.assertEqual(
            idleLimit(1 << 20, 64, privileged=False, quotaPath=quota, processes=4), 4
        )
        self.assertEqual(limit(str(64 * pagesPerMiB), 1 << 16), 64)
        self.assertEqual(limit("1"), 1)
        self.assertEqual(limit("0"), 64)
        self.assertEqual(limit("junk"), 64)
        self.assertEqual(
            idleLimit(1 << 20, 64, privileged=False, quotaPath=quota + ".none"), 64
        )

    def test_shortOfDescriptors(self) -> None:
        """
        When a pipe cannot be made, L{PipePool.acquire} raises, and logs the
        shortage once (a warning, no traceback), and once more when pipes
        can be made again.
        """
        events = captureLogs(self)
        pool = PipePool()
        self.addCleanup(pool.clear)
        pipe2 = os.pipe2

        def emfile(flags: int) -> tuple[int, int]:
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(os, "pipe2", emfile)
        for _ in range(3):
            self.assertRaises(OSError, pool.acquire)
        self.assertTrue(pool.short)
        self.patch(os, "pipe2", pipe2)
        pool.release(pool.acquire(), True)
        self.assertFalse(pool.short)
        self.assertEqual(
            tunnelLogTexts(events),
            [
                "No pipe for spliced tunnels (Too many open files): their bytes "
                "go through Python until pipes can be made again",
                "Pipes for spliced tunnels can be made again",
            ],
        )
        self.assertEqual([e for e in events if e.get("log_failure")], [])

    def test_quotaUsedUp(self) -> None:
        """
        A pipe smaller than L{splice.SMALLEST_PIPE} (what the kernel gives
        once the user's pipe quota is used up, two pages) is closed at once
        and refused like a pipe that could not be made: the flow copies
        through Python, which is faster than splicing through it.  For a
        second no pipe is tried again (no system calls on every read),
        unless one of the pool's own pipes is closed first; the shortage is
        logged once, and once more when a full pipe can be made again.
        """
        events = captureLogs(self)
        pool = PipePool()
        self.addCleanup(pool.clear)
        now = [100.0]
        pool._now = lambda: now[0]
        kept = pool.acquire()
        before = openDescriptors()
        realFcntl, pipe2 = fcntl.fcntl, os.pipe2
        made: list[int] = []

        def overQuota(fd: int, command: int, *args: Any) -> Any:
            if command == fcntl.F_SETPIPE_SZ:
                raise PermissionError(errno.EPERM, "Operation not permitted")
            if command == fcntl.F_GETPIPE_SZ:
                return 8192
            return realFcntl(fd, command, *args)

        def counted(flags: int) -> tuple[int, int]:
            made.append(flags)
            return pipe2(flags)

        self.patch(fcntl, "fcntl", overQuota)
        self.patch(os, "pipe2", counted)
        self.assertRaises(OSError, pool.acquire)
        self.assertEqual((len(made), pool.opened, pool.short), (1, 1, True))
        self.assertEqual(openDescriptors(), before)
        now[0] += 0.5
        self.assertRaises(OSError, pool.acquire)
        self.assertEqual(len(made), 1)
        now[0] += 0.6
        self.assertRaises(OSError, pool.acquire)
        self.assertEqual(len(made), 2)
        # One of the pool's own pipes closed: some quota is free, try again.
        pool.release(kept, empty=False)
        self.patch(fcntl, "fcntl", realFcntl)
        again = pool.acquire()
        self.assertEqual((len(made), pool.short), (3, False))
        self.assertGreaterEqual(again.size, splice.SMALLEST_PIPE)
        pool.release(again, empty=True)
        self.assertEqual(
            tunnelLogTexts(events),
            [
                "No pipe for spliced tunnels (the user's pipe quota is used up, "
                "and a pipe of 8192 bytes splices slower than Python copies): "
                "their bytes go through Python until pipes can be made again",
                "Pipes for spliced tunnels can be made again",
            ],
        )

    def test_notEmptyIsClosed(self) -> None:
        """
        A pipe given back with bytes in it is closed, never lent again.
        """
        before = openDescriptors()
        pool = PipePool()
        pipe = pool.acquire()
        os.write(pipe.writeFD, b"left over")
        pool.release(pipe, empty=False)
        self.assertEqual((pool.opened, pool.idle), (0, 0))
        self.assertEqual(openDescriptors(), before)


class CanSpliceTests(TestCase):
    """
    L{canSplice} accepts the reactor's plain TCP transports only.
    """

    timeout = 30

    def test_available(self) -> None:
        """
        Splicing is available on Linux.
        """
        self.assertEqual(spliceAvailable(), os.uname().sysname == "Linux")

    def test_notSocketTransports(self) -> None:
        """
        A transport that is not a socket of the reactor's is refused.
        """
        self.assertFalse(canSplice(StringTransport()))
        self.assertFalse(canSplice(object()))

    @inlineCallbacks
    def connected(
        self, listen: Any, endpoint: Any
    ) -> Yielding[tuple[Protocol, Protocol]]:
        """
        Connect a client to a server, both plain protocols, and close both
        at the end.

        @param listen: Listens with a factory, returns the port.
        @param endpoint: A client endpoint to the port.
        @return: Fires with the server's and the client's protocols.
        """
        accepted: Deferred[Protocol] = Deferred()
        lost: list[Deferred[None]] = []

        class Tracked(Protocol):
            """
            Reports being accepted (on the server) and closed.
            """

            def connectionMade(self) -> None:
                """
                Note the connection; hand the server's to the test.
                """
                self.gone: Deferred[None] = Deferred()
                lost.append(self.gone)
                if self.factory is serverFactory and not accepted.called:
                    accepted.callback(self)

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                """
                Report the end.
                """
                self.gone.callback(None)

        serverFactory = Factory.forProtocol(Tracked)
        port = listen(serverFactory)
        self.addCleanup(port.stopListening)
        client = yield endpoint(port).connect(Factory.forProtocol(Tracked))
        server = yield accepted

        def close() -> Deferred[list[None]]:
            for protocol in (client, server):
                assert protocol.transport is not None
                protocol.transport.loseConnection()
            return gatherResults(lost)

        self.addCleanup(close)
        return server, client

    @inlineCallbacks
    def test_tcp(self) -> Yielding[None]:
        """
        Both ends of a TCP connection qualify, until one starts closing.
        """
        server, client = yield self.connected(
            lambda factory: reactor.listenTCP(0, factory, interface="127.0.0.1"),
            lambda port: TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        self.assertIsInstance(server.transport, tcp.Server)
        self.assertIsInstance(client.transport, tcp.Client)
        self.assertTrue(canSplice(server.transport))
        self.assertTrue(canSplice(client.transport))
        assert client.transport is not None
        client.transport.loseConnection()
        self.assertFalse(canSplice(client.transport))

    @inlineCallbacks
    def test_tlsStartedOrHalfClosed(self) -> Yielding[None]:
        """
        A TCP transport that has started TLS (C{startTLS} marks it so), or
        whose writing side is closing, does not qualify.
        """
        server, _ = yield self.connected(
            lambda factory: reactor.listenTCP(0, factory, interface="127.0.0.1"),
            lambda port: TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        transport: Any = server.transport
        self.assertTrue(canSplice(transport))
        transport.TLS = True
        self.assertFalse(canSplice(transport))
        transport.TLS = False
        self.assertTrue(canSplice(transport))
        transport.loseWriteConnection()
        # Before the reactor has shut the socket's writing side down.
        self.assertFalse(transport._writeDisconnected)
        self.assertFalse(canSplice(transport))

    @inlineCallbacks
    def test_direct(self) -> Yielding[None]:
        """
        A connection L{DirectEndpoint} made (how the proxy reaches address
        literals) qualifies, until it starts closing.
        """
        _, client = yield self.connected(
            lambda factory: reactor.listenTCP(0, factory, interface="127.0.0.1"),
            lambda port: DirectEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        self.assertIs(type(client.transport), DirectTransport)
        self.assertTrue(canSplice(client.transport))
        assert client.transport is not None
        client.transport.loseConnection()
        self.assertFalse(canSplice(client.transport))

    @inlineCallbacks
    def test_tls(self) -> Yielding[None]:
        """
        A TLS connection does not qualify: its transport is a protocol
        wrapper.
        """
        from twisted.internet.ssl import PrivateCertificate

        certificatePEM, keyPEM = integration.localhostCertificate()
        options = PrivateCertificate.loadPEM(keyPEM + certificatePEM).options()
        server, _ = yield self.connected(
            lambda factory: reactor.listenSSL(
                0, factory, options, interface="127.0.0.1"
            ),
            lambda port: TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        self.assertFalse(canSplice(server.transport))

    @inlineCallbacks
    def test_unix(self) -> Yielding[None]:
        """
        A UNIX socket connection does not qualify.
        """
        from twisted.internet.endpoints import UNIXClientEndpoint

        path = self.mktemp()
        server, client = yield self.connected(
            lambda factory: reactor.listenUNIX(path, factory),
            lambda port: UNIXClientEndpoint(reactor, path),
        )
        self.assertFalse(canSplice(server.transport))
        self.assertFalse(canSplice(client.transport))
