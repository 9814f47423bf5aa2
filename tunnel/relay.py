"""
Joining two connected transports into one tunnel.

Nothing here knows about HTTP: a L{Relay} is handed two transports that are
already connected and moves bytes between them until both directions are
finished, with flow control, half-close and an idle timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as TypingProtocol

from attrs import frozen
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from .idle import IdleWatch

__all__ = [
    "Relay",
    "RelayEvents",
    "RelayLifecycle",
    "RelayResult",
    "StreamTransport",
    "TargetProtocol",
    "canHalfClose",
]


#: How long a graceful close may take when no idle timeout is set.
CLOSE_GRACE_SECONDS = 60.0


def canHalfClose(transport: object) -> bool:
    """
    Whether C{transport} can send a FIN while it keeps reading.

    Only the reactor's own socket transports (TCP, UNIX) can; wrappers such
    as TLS pass attribute lookups through to the socket beneath them, so
    asking them for C{loseWriteConnection} is no answer.

    @param transport: A connected transport.
    @return: C{True} if a relay may half-close C{transport}.
    """
    return IHalfCloseableDescriptor.providedBy(transport) and not isinstance(
        transport, ProtocolWrapper
    )


class StreamTransport(TypingProtocol):
    """
    What a relay needs of a transport: a stream connection that is a push
    producer and a consumer, and can half-close (as TCP and UNIX transports
    can).
    """

    def write(self, data: bytes) -> None:
        """
        Send bytes to the peer, buffering what cannot go out at once.

        @param data: The bytes.
        """

    def registerProducer(self, producer: object, streaming: bool) -> None:
        """
        Have C{producer} paused while this transport's buffer is full.

        @param producer: The producer (the other side's transport).
        @param streaming: C{True} for a push producer, as a relay registers.
        """

    def unregisterProducer(self) -> None:
        """
        Forget the registered producer.
        """

    def pauseProducing(self) -> None:
        """
        Stop reading from the peer.
        """

    def resumeProducing(self) -> None:
        """
        Read from the peer again.
        """

    def loseConnection(self) -> None:
        """
        Close once the buffered bytes are written.
        """

    def loseWriteConnection(self) -> None:
        """
        Send FIN once the buffered bytes are written, and keep reading.
        """

    def abortConnection(self) -> None:
        """
        Close at once, dropping the buffered bytes (a reset for TCP).
        """

    def getPeer(self) -> IAddress:
        """
        The peer's address.

        @return: The address of the other end of the connection.
        """


class RelayEvents(TypingProtocol):
    """
    What the two protocols of a tunnel tell its relay, whichever relay it is
    (L{Relay}, or L{tunnel.splice.SpliceRelay} for plain TCP on both sides).
    """

    def start(
        self,
        earlyData: bytes = b"",
        clientFinished: bool = False,
        greeting: bytes = b"",
    ) -> None:
        """
        Start relaying, once both connections are up.

        @param earlyData: Bytes the client sent before the tunnel was
            established; they reach the target first.
        @param clientFinished: Whether the client already half-closed its
            side before the tunnel was established.
        @param greeting: Bytes for the client before anything from the
            target (the C{200} response); not counted as relayed.
        """

    def clientData(self, data: bytes) -> None:
        """
        Bytes arrived from the client.

        @param data: The bytes.
        """

    def targetData(self, data: bytes) -> None:
        """
        Bytes arrived from the target.

        @param data: The bytes.
        """

    def clientFinished(self) -> None:
        """
        The client sent FIN.
        """

    def targetFinished(self) -> None:
        """
        The target sent FIN.
        """

    def clientLost(self, reason: Failure = ...) -> None:
        """
        The client connection is gone.

        @param reason: Why.
        """

    def targetLost(self, reason: Failure = ...) -> None:
        """
        The target connection is gone.

        @param reason: Why.
        """

    def abort(self, why: str = ...) -> None:
        """
        End the tunnel at once, resetting both connections.

        @param why: How the tunnel ended, for the L{RelayResult}.
        """

    @property
    def bytesUp(self) -> int:
        """
        Bytes written to the target so far.
        """

    @property
    def bytesDown(self) -> int:
        """
        Bytes written to the client so far.
        """


@implementer(IPushProducer)
class _PeerProducer:
    """
    One side's transport as the producer of the other's: passes pause and
    resume on, but not C{stopProducing}.  Twisted calls that when the
    consumer's connection is lost, before its protocol hears why; on a
    transport already half-closed it would close at once and cleanly, so a
    reset would pass on as a clean end.  The relay alone decides how the
    other side ends.

    @ivar transport: The producing side's transport.
    @ivar consumer: The consuming side's transport.
    """

    __slots__ = ("consumer", "transport")

    def __init__(self, transport: StreamTransport, consumer: StreamTransport) -> None:
        self.transport = transport
        self.consumer = consumer

    def pauseProducing(self) -> None:
        """
        The consumer's buffer is full: stop reading the other side.
        """
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """
        The consumer's buffer drained: read the other side again, unless the
        consumer is closing.
        """
        if _closing(self.consumer):
            # A TCP transport asked to close that still has a paused
            # producer resumes it rather than close, and closes only once
            # the producer is gone (FileDescriptor.doWrite).  Twisted's TLS
            # asks its transport to close when the peer sends close_notify
            # and writes nothing more: so the connection would never close
            # nor be lost, while the other side was read at full speed into
            # nowhere.  Letting go of the consumer lets the close finish,
            # and the relay hears of it.
            self.consumer.unregisterProducer()
            return
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """
        The consumer's connection is gone: the relay hears of it and ends
        the other side itself.
        """


def _closing(transport: object) -> bool:
    """
    Whether C{transport} was asked to close: itself, or (behind TLS, whose
    close_notify from the peer closes only the TCP transport under it) the
    transport it wraps.
    """
    if getattr(transport, "disconnecting", False):
        return True
    return bool(getattr(getattr(transport, "transport", None), "disconnecting", False))


@frozen
class RelayResult:
    """
    How a tunnel's relay ended.

    @ivar bytesUp: Bytes moved from the client to the target, early data
        included.
    @ivar bytesDown: Bytes moved from the target to the client.
    @ivar ended: How it ended: C{"client-eof"} or C{"target-eof"} (both
        sides finished; this one finished first), C{"client-reset"} or
        C{"target-reset"} (a side was lost before both finished),
        C{"idle-timeout"}, or C{"shutdown"} (closed by the proxy).
    """

    bytesUp: int
    bytesDown: int
    ended: str


class RelayLifecycle:
    """
    What both relays (L{Relay} and L{tunnel.splice.SpliceRelay}) keep the
    same way: which connections are still open, how the tunnel ends, the
    idle timeout, and the one L{RelayResult}.

    A subclass moves the bytes, calls L{_watchIdle} when it starts and
    L{_active} when bytes move, and closes the transports in L{_close}.

    @ivar lastActivity: When a byte last moved, once started with an idle
        timeout.
    """

    # Thousands of tunnels stay open at once: no per-instance dict.
    __slots__ = (
        "_client",
        "_clientOpen",
        "_clock",
        "_closeDeadline",
        "_closing",
        "_firstEnd",
        "_idleTimeout",
        "_idleWatch",
        "_onEnd",
        "_target",
        "_targetOpen",
        "lastActivity",
    )

    def __init__(
        self,
        client: StreamTransport,
        target: StreamTransport,
        clock: IReactorTime,
        idleTimeout: float | None,
        onEnd: Callable[[RelayResult], None],
        idleWatch: IdleWatch | None = None,
    ) -> None:
        """
        @param client: The transport connected to the client.
        @param target: The transport connected to the target.
        @param clock: Schedules the idle timeout.
        @param idleTimeout: Seconds without a byte in either direction after
            which both connections are aborted; L{None} or C{0} disables it.
        @param onEnd: Called once with the L{RelayResult} when both
            connections are closed.
        @param idleWatch: The watch, shared with other tunnels, that applies
            the idle timeout (its C{timeout} must be C{idleTimeout}); by
            default the relay has one of its own.
        """
        self._client = client
        self._target = target
        self._clock = clock
        self._idleTimeout = idleTimeout or 0.0
        self._onEnd: Callable[[RelayResult], None] | None = onEnd
        self._clientOpen = True
        self._targetOpen = True
        self._firstEnd: str | None = None
        self._closing: str | None = None
        self._closeDeadline: IDelayedCall | None = None
        self._idleWatch = idleWatch
        self.lastActivity = 0.0

    @property
    def bytesUp(self) -> int:
        """
        Bytes from the client to the target so far.
        """
        raise NotImplementedError

    @property
    def bytesDown(self) -> int:
        """
        Bytes from the target to the client so far.
        """
        raise NotImplementedError

    def _watchIdle(self) -> None:
        """
        Start the idle timeout, if there is one.
        """
        if self._idleTimeout:
            if self._idleWatch is None:
                self._idleWatch = IdleWatch(self._clock, self._idleTimeout)
            self.lastActivity = self._clock.seconds()
            self._idleWatch.watch(self)

    def _active(self) -> None:
        """
        Bytes moved: the idle timeout starts again.
        """
        if self._idleWatch is not None:
            self.lastActivity = self._clock.seconds()

    def _unwatchIdle(self) -> None:
        if self._idleWatch is not None:
            self._idleWatch.unwatch(self)

    def clientLost(self, reason: Failure = connectionDone) -> None:
        """
        The client connection is gone.

        @param reason: Why.
        """
        self._clientOpen = False
        self._sideLost("client", reason)

    def targetLost(self, reason: Failure = connectionDone) -> None:
        """
        The target connection is gone.

        @param reason: Why.
        """
        self._targetOpen = False
        self._sideLost("target", reason)

    def _sideLost(self, side: str, reason: Failure) -> None:
        how = self._closing
        if how is None:
            # Closed by something other than this relay.  A clean close is
            # that side's FIN (a transport that cannot half-close, TLS for
            # one, ends that way): let the other side flush and close.
            # Anything else is a reset, passed on as one.
            if reason.check(ConnectionDone) is None:
                how = f"{side}-reset"
                self._close(how, abort=True)
            else:
                how = self._firstEnd = self._firstEnd or f"{side}-eof"
                self._close(how, abort=False)
        self._reportIfDone(how)

    def idleTimedOut(self) -> None:
        """
        No byte moved for the idle timeout: reset both connections.
        """
        self.abort("idle-timeout")

    def abort(self, why: str = "shutdown") -> None:
        """
        End the tunnel at once, resetting both connections.

        @param why: How the tunnel ended, for the L{RelayResult}, unless it
            was already ending for another reason.
        """
        self._close(self._closing or why, abort=True)

    def _close(self, how: str, abort: bool) -> None:
        """
        Close both connections (reset them if C{abort}); the tunnel ended
        C{how}.
        """
        raise NotImplementedError

    def _startCloseDeadline(self) -> None:
        """
        A graceful close waits for the peers to take what is buffered; a
        peer that never reads must not keep the tunnel forever: abort after
        the idle timeout (or L{CLOSE_GRACE_SECONDS} without one).
        """
        if self._closeDeadline is None:
            self._closeDeadline = self._clock.callLater(
                self._idleTimeout or CLOSE_GRACE_SECONDS, self.abort
            )

    def _reportIfDone(self, how: str) -> None:
        if self._clientOpen or self._targetOpen:
            return
        # Dropped, not only cancelled: a deadline that fired still holds
        # its function (this relay's abort), a cycle for the collector.
        deadline, self._closeDeadline = self._closeDeadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        if self._onEnd is not None:
            onEnd, self._onEnd = self._onEnd, None
            onEnd(RelayResult(self.bytesUp, self.bytesDown, how))


def _sendBufferedNow(transport: object) -> None:
    """
    Send what a TCP transport holds for its peer, as far as its socket
    takes it without waiting (one C{doWrite}, as the reactor would call
    it once the socket is writable).  A wrapping transport (TLS, whose
    records are written to the TCP transport below it as soon as they are
    made) has the transport below do so.  Others keep theirs.

    @param transport: A transport about to be aborted.
    """
    if isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    if isinstance(transport, FileDescriptor) and transport.connected:
        transport.doWrite()


class Relay(RelayLifecycle):
    """
    Moves bytes between a client transport and a target transport.

    Each transport is registered as the streaming producer of the other, so
    when one side stops reading, the proxy stops reading from the other side:
    the bytes buffered in the proxy stay bounded whatever the peers do.

    A FIN from one side becomes a half-close towards the other; the relay
    ends when both directions are finished, or at once when either side is
    lost or the idle timeout passes.

    The client protocol and the L{TargetProtocol} feed their events into the
    C{client*} and C{target*} methods.
    """

    __slots__ = (
        "_clientReading",
        "_consuming",
        "_targetReading",
        "_writtenDown",
        "_writtenUp",
    )

    def __init__(
        self,
        client: StreamTransport,
        target: StreamTransport,
        clock: IReactorTime,
        idleTimeout: float | None,
        onEnd: Callable[[RelayResult], None],
        idleWatch: IdleWatch | None = None,
    ) -> None:
        """
        @param client: The transport connected to the client.
        @param target: The transport connected to the target.
        @param clock: Schedules the idle timeout.
        @param idleTimeout: Seconds without a byte in either direction after
            which both connections are aborted; L{None} or C{0} disables it.
        @param onEnd: Called once with the L{RelayResult} when both
            connections are closed.
        @param idleWatch: The watch, shared with other tunnels, that applies
            the idle timeout (its C{timeout} must be C{idleTimeout}); by
            default the relay has one of its own.
        """
        super().__init__(client, target, clock, idleTimeout, onEnd, idleWatch)
        self._writtenUp = 0
        self._writtenDown = 0
        self._clientReading = True
        self._targetReading = True
        # The transports that have the other one registered as producer.
        self._consuming: list[StreamTransport] = []

    @property
    def bytesUp(self) -> int:
        """
        Bytes written to the target so far.
        """
        return self._writtenUp

    @property
    def bytesDown(self) -> int:
        """
        Bytes written to the client so far.
        """
        return self._writtenDown

    def start(
        self,
        earlyData: bytes = b"",
        clientFinished: bool = False,
        greeting: bytes = b"",
    ) -> None:
        """
        Start relaying.

        @param earlyData: Bytes the client sent before the tunnel was
            established; they reach the target first.
        @param clientFinished: Whether the client already half-closed its
            side before the tunnel was established.
        @param greeting: Bytes for the client before anything from the
            target (the C{200} response); not counted in L{bytesDown}.
        """
        if greeting:
            self._client.write(greeting)
        self._target.registerProducer(_PeerProducer(self._client, self._target), True)
        self._client.registerProducer(_PeerProducer(self._target, self._client), True)
        self._consuming = [self._client, self._target]
        if earlyData:
            # Written after the producers are registered, so that a large
            # write pauses the client as any other would.
            self.clientData(earlyData)
        self._watchIdle()
        if clientFinished:
            self.clientFinished()

    def clientData(self, data: bytes) -> None:
        """
        Bytes arrived from the client.

        @param data: The bytes.
        """
        self._writtenUp += len(data)
        self._target.write(data)
        self._active()

    def targetData(self, data: bytes) -> None:
        """
        Bytes arrived from the target.

        @param data: The bytes.
        """
        self._writtenDown += len(data)
        self._client.write(data)
        self._active()

    def clientFinished(self) -> None:
        """
        The client sent FIN: pass it on to the target.
        """
        if self._clientReading:
            self._clientReading = False
            self._halfClose(self._target, "client-eof")

    def targetFinished(self) -> None:
        """
        The target sent FIN: pass it on to the client.
        """
        if self._targetReading:
            self._targetReading = False
            self._halfClose(self._client, "target-eof")

    def _halfClose(self, towards: StreamTransport, how: str) -> None:
        if self._firstEnd is None:
            self._firstEnd = how
        if self._closing is not None:
            return
        if not (self._clientReading or self._targetReading):
            self._close(self._firstEnd, abort=False)
        elif canHalfClose(towards):
            # A transport with a producer still registered waits for that
            # producer before it half-closes; nothing more comes from the
            # finished side anyway.
            self._unregister(towards)
            towards.loseWriteConnection()
        else:
            # TLS and other wrapped transports cannot send a FIN alone (and
            # their loseWriteConnection would reach the raw socket under
            # the TLS layer): close that side once its data is flushed.
            self._unregister(towards)
            towards.loseConnection()

    def clientLost(self, reason: Failure = connectionDone) -> None:
        """
        The client connection is gone.

        @param reason: Why.
        """
        self._clientReading = False
        super().clientLost(reason)

    def targetLost(self, reason: Failure = connectionDone) -> None:
        """
        The target connection is gone.

        @param reason: Why.
        """
        self._targetReading = False
        super().targetLost(reason)

    def _close(self, how: str, abort: bool) -> None:
        self._closing = how
        self._unwatchIdle()
        if not abort:
            self._startCloseDeadline()
        for transport, isOpen in (
            (self._client, self._clientOpen),
            (self._target, self._targetOpen),
        ):
            if isOpen:
                self._unregister(transport)
                if abort:
                    if how.endswith("-reset"):
                        # The other side reset: this one gets it too, but
                        # first what was already given to it (the 200, and
                        # what the side that reset sent before), as far
                        # as its socket takes it now; the reset would drop
                        # it unsent, a bare reset for a tunnel logged 200.
                        _sendBufferedNow(transport)
                    transport.abortConnection()
                else:
                    transport.loseConnection()

    def _unregister(self, transport: StreamTransport) -> None:
        if transport in self._consuming:
            self._consuming.remove(transport)
            transport.unregisterProducer()


@implementer(IHalfCloseableProtocol)
class TargetProtocol(Protocol):
    """
    The protocol on the connection to the target.

    Until a relay (a L{Relay}, or a L{tunnel.splice.SpliceRelay}) is
    attached it only waits; once attached it feeds every event to the
    relay.

    @ivar relay: The relay this connection belongs to, once attached.
    """

    def __init__(self) -> None:
        # Every attribute is set here, Twisted's first and always in this
        # order: instances of one class then share their dict's keys
        # (CPython's key-sharing dicts), which matters at one per tunnel.
        self.connected = 0
        self.transport = None
        self.relay: RelayEvents | None = None
        self._pending: list[bytes] | None = None
        self._finishedEarly = False
        self._lostEarly: Failure | None = None

    def attach(self, relay: RelayEvents) -> None:
        """
        Hand this connection's events to C{relay}.

        @param relay: The relay this connection now belongs to.
        """
        self.relay = relay
        pending, self._pending = self._pending, None
        for data in pending or ():
            relay.targetData(data)
        if self._finishedEarly:
            relay.targetFinished()
        if self._lostEarly is not None:
            relay.targetLost(self._lostEarly)

    def resetBeforeRelay(self) -> Failure | None:
        """
        Why the connection was reset before a relay was attached, if it
        was, before the target sent a byte or its FIN: nothing can be
        relayed, and the client is better told the target failed than
        sent a C{200} and a reset (a reset would drop the C{200} unsent).

        @return: The reason, or L{None} if the connection is open, ended
            cleanly, or brought something to relay.
        """
        lost = self._lostEarly
        if (
            lost is None
            or self._pending
            or self._finishedEarly
            or lost.check(ConnectionDone) is not None
        ):
            return None
        return lost

    def dataReceived(self, data: bytes) -> None:
        """
        Pass target bytes on to the relay (or hold them until it exists).

        @param data: The bytes.
        """
        if self.relay is not None:
            self.relay.targetData(data)
        elif self._pending is None:
            self._pending = [data]
        else:
            self._pending.append(data)

    def readConnectionLost(self) -> None:
        """
        The target sent FIN.
        """
        if self.relay is not None:
            self.relay.targetFinished()
        else:
            self._finishedEarly = True

    def writeConnectionLost(self) -> None:
        """
        Our FIN towards the target went out; nothing to do.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The target connection is closed.

        @param reason: Why.
        """
        if self.relay is not None:
            self.relay.targetLost(reason)
        else:
            self._lostEarly = reason
