"""
Zero-copy relaying for tunnels whose two connections are plain TCP.

A L{SpliceRelay} does what a L{tunnel.relay.Relay} does (flow control,
half-close, idle timeout, byte counts, one L{RelayResult}) and takes the same
calls, but it moves the bytes from socket to socket inside the kernel with
C{splice(2)}, through a pipe, without ever copying them into Python objects.

How it works:

  - While it relays, the two Twisted transports neither read nor write.
    Each socket is registered with the reactor through one L{SpliceEnd}
    instead: epoll allows one registration per descriptor, so the same
    object is the reader and the writer of its socket.  On the epoll
    reactor the L{SpliceEnd} takes over the transport's registration as it
    stands (see L{SpliceEnd.takeOver}), so starting a relay costs no system
    call.

  - Each direction starts by copying: it reads the source with C{recv}
    (64 KiB at most) and writes what it read to the destination with
    C{send}, which for a request and a response in a few small pieces costs
    no more system calls than splicing them would.  Once one read fills 64
    KiB it splices for good: it moves bytes from its source socket into a
    pipe and from the pipe into its destination socket.  Either way it reads
    from the source only when nothing it read is still waiting; while the
    destination cannot take what is waiting, it stops reading the source and
    waits for the destination to become writable.  So a direction holds at
    most one read (64 KiB, in Python) or one pipe's worth of bytes
    (L{PIPE_SIZE}, in the kernel), and a stalled reader stalls the sender
    through TCP's own flow control.

  - Pipes are borrowed from a L{PipePool} only while bytes are in flight: an
    idle tunnel holds no pipe, only its two sockets.

  - An end of file from one side becomes C{shutdown(SHUT_WR)} on the other
    socket once that direction's pipe is drained, while the other direction
    keeps flowing.  The transport's own C{loseWriteConnection} cannot be used
    for this: it registers the transport with the reactor as a writer, which
    on epoll would replace the L{SpliceEnd} registered for the same
    descriptor.

  - Bytes that Twisted read, or was given to write, before the relay
    started (the C{200}, early data) are sent straight to the destination
    socket, ahead of anything spliced.

  - When both directions are finished, the L{SpliceEnd}s are taken off the
    reactor and both sockets are closed at once; an error
    on either socket, L{SpliceRelay.abort} or the idle timeout takes them off
    and aborts both transports.  Either way Twisted's own C{connectionLost}
    path runs, closes the sockets and reaches L{SpliceRelay.clientLost} and
    L{SpliceRelay.targetLost}; once both have been called, C{onEnd} gets the
    L{RelayResult}.

Use it only for two transports that L{canSplice} accepts.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.interfaces import (
    IReactorFDSet,
    IReactorTime,
    IReadWriteDescriptor,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .direct import DirectTransport
from .idle import IdleWatch
from .relay import RelayLifecycle, RelayResult, StreamTransport

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # pragma: no cover (no epoll: not Linux)
    EPollReactor = None  # type: ignore[assignment,misc]

__all__ = [
    "PIPE_SIZE",
    "POOL_MAX_IDLE",
    "Pipe",
    "PipePool",
    "SpliceEnd",
    "SpliceRelay",
    "canSplice",
    "defaultPool",
    "idleLimit",
    "spliceAvailable",
]

#: The capacity asked for each pipe: the most bytes one direction of one
#: tunnel holds in the proxy.
PIPE_SIZE = 1 << 20

#: The smallest pipe worth splicing through.  The kernel gives smaller ones
#: (two pages) only once the user's pipe quota, C{fs.pipe-user-pages-soft}
#: (64 MiB), is used up, which 64 busy or stalled directions of 1 MiB do
#: when the proxy does not run as root; through such a pipe splice moved
#: 792 MiB/s in one tunnel where Python's recv/send moved 1265-1352.
SMALLEST_PIPE = 1 << 16

# Seconds a pool that met the pipe quota waits before it makes pipes again,
# unless one of its own pipes is closed first (freeing some of the quota).
_QUOTA_RETRY = 1.0

#: The most empty pipes a pool keeps for reuse (see L{idleLimit}).
POOL_MAX_IDLE = 64

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

# The most steps one call moves a direction forward before it lets the
# reactor run (a step moves bytes or ends the call; many steps happen only
# when a destination keeps taking small pieces).
_ROUNDS = 64

# The most reads one call splices from a source while each of them fills the
# pipe.  A full pipe means more is waiting in the socket, and reading it at
# once saves a turn of the reactor (a wait and a dispatch) per pipe's worth:
# eight tunnels together moved two fifths more bytes for a third less CPU per
# GiB, side by side, than with one read a call.  Bounded, so that one bulk
# tunnel holds the reactor for a few pipes' worth (about 1.5 ms for 1 MiB
# pipes here) before the others have their turn.
_READS = 4

# How much one read takes into Python (see _Flow.copying, and when no pipe
# can be had): what the ordinary relay (Twisted's tcp transport) reads at
# once.
_PYTHON_READ = 65536


def spliceAvailable() -> bool:
    """
    Whether this system can splice: Linux, with C{os.splice} and
    C{os.pipe2}.

    @return: C{True} if it can.
    """
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "splice")
        and hasattr(os, "pipe2")
    )


_SPLICE_AVAILABLE = spliceAvailable()

_TCP_TRANSPORTS = (tcp.Server, tcp.Client, DirectTransport)


def canSplice(transport: object) -> bool:
    """
    Whether a L{SpliceRelay} can take over C{transport}.

    Only the reactor's own plain TCP transports (exactly L{tcp.Server},
    L{tcp.Client} and L{DirectTransport}) on an IPv4 or IPv6 stream socket
    qualify, while they are connected, not closing and not running TLS.
    Wrapped transports (TLS, other
    L{twisted.protocols.policies.ProtocolWrapper}s) and UNIX sockets do not.

    @param transport: A connected transport.
    @return: C{True} if a L{SpliceRelay} can take C{transport} over.
    """
    # Exactly these classes (not other subclasses such as unix.Server) only
    # ever hold IPv4 and IPv6 stream sockets: the socket's family and type
    # need not be asked (each an enum conversion, twice a handshake).
    if not _SPLICE_AVAILABLE or type(transport) not in _TCP_TRANSPORTS:
        return False
    t = cast(Any, transport)
    return bool(
        isinstance(getattr(t, "socket", None), socket.socket)
        and t.connected
        and not t.disconnecting
        and not getattr(t, "TLS", False)
        and not getattr(t, "_writeDisconnecting", False)
        and not getattr(t, "_writeDisconnected", False)
    )


class Pipe:
    """
    A non-blocking pipe.

    @ivar readFD: The descriptor bytes come out of.
    @ivar writeFD: The descriptor bytes go into.
    @ivar size: Its capacity in bytes.
    """

    __slots__ = ("readFD", "size", "writeFD")

    def __init__(self, readFD: int, writeFD: int, size: int) -> None:
        """
        @param readFD: The read end.
        @param writeFD: The write end.
        @param size: The capacity.
        """
        self.readFD = readFD
        self.writeFD = writeFD
        self.size = size

    def close(self) -> None:
        """
        Close both ends.
        """
        os.close(self.readFD)
        os.close(self.writeFD)


class PipePool:
    """
    Lends pipes to the directions of tunnels that have bytes in flight.

    A pipe comes back empty and is kept for the next borrower, up to
    C{maxIdle} of them; beyond that, and when it comes back with bytes in it,
    it is closed.  So the pool holds at most C{2 * maxIdle} descriptors
    while no bytes move, and each direction of a tunnel holds one pipe only
    while it has bytes in flight.

    @ivar pipeSize: The capacity asked for each new pipe (the kernel may
        give less, see L{Pipe.size}).
    @ivar maxIdle: How many empty pipes are kept.
    @ivar opened: How many pipes of this pool are open now, lent or idle.
    @ivar short: Whether the last attempt to make a pipe failed.
    @ivar processes: How many processes (C{--workers}) have such a pool
        under the same user: they share its pipe quota (see L{idleLimit}).
    """

    _log = Logger()

    def __init__(self, pipeSize: int = PIPE_SIZE, maxIdle: int | None = None) -> None:
        """
        @param pipeSize: The capacity to ask for each pipe.
        @param maxIdle: How many empty pipes to keep; by default
            L{idleLimit}, found when the first pipe comes back (twistd
            drops privileges after this module is imported, and the
            limit depends on the user the tunnels run as).
        """
        self.pipeSize = pipeSize
        self.maxIdle = maxIdle
        self.opened = 0
        self.short = False
        self.processes = 1
        # The largest size a pipe was given: what pipeSize comes to here.
        self._fullSize = 0
        # /proc/sys/fs/pipe-max-size, read once the first pipe is refused
        # pipeSize.
        self._maxSize: int | None = None
        self._idle: list[Pipe] = []
        # When to try making pipes again, after the pipe quota was met.
        self._quotaRetryAt: float | None = None
        self._now: Callable[[], float] = time.monotonic

    @property
    def idle(self) -> int:
        """
        How many empty pipes wait to be lent.
        """
        return len(self._idle)

    @property
    def lent(self) -> int:
        """
        How many pipes are lent now.
        """
        return self.opened - len(self._idle)

    def acquire(self) -> Pipe:
        """
        Lend a pipe: an idle one, or a new one.

        @return: An empty pipe; give it back with L{release}.
        @raise OSError: A new pipe could not be made (out of descriptors),
            or only one smaller than L{SMALLEST_PIPE} (the user's pipe quota
            used up; then no pipe is made for a second, unless one of this
            pool's is closed before); the first such failure is logged, and
            the next pipe made after it too.
        """
        if self._idle:
            return self._idle.pop()
        if self._quotaRetryAt is not None:
            if self._now() < self._quotaRetryAt:
                raise OSError(errno.ENOBUFS, "the user's pipe quota is used up")
            self._quotaRetryAt = None
        import fcntl

        try:
            readFD, writeFD = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self._fellShort(e.strerror)
            raise
        try:
            fcntl.fcntl(writeFD, fcntl.F_SETPIPE_SZ, self.pipeSize)
        except OSError:
            # Beyond /proc/sys/fs/pipe-max-size, which binds a process
            # without CAP_SYS_RESOURCE: the largest allowed.  Over the
            # user's pipe quota that fails too, and the pipe keeps the size
            # the kernel gave.
            if self._maxSize is None:
                self._maxSize = _pipeMaxSize()
            with contextlib.suppress(OSError):
                fcntl.fcntl(writeFD, fcntl.F_SETPIPE_SZ, self._maxSize)
        size = fcntl.fcntl(writeFD, fcntl.F_GETPIPE_SZ)
        # (Unless pipes that small are all there is: pipe-max-size below.)
        if size < min(self.pipeSize, SMALLEST_PIPE, self._maxSize or SMALLEST_PIPE):
            os.close(readFD)
            os.close(writeFD)
            self._quotaRetryAt = self._now() + _QUOTA_RETRY
            why = (
                f"the user's pipe quota is used up, and a pipe of {size} bytes "
                "splices slower than Python copies"
            )
            self._fellShort(why)
            raise OSError(errno.ENOBUFS, why)
        if self.short:
            self.short = False
            self._log.info("Pipes for spliced tunnels can be made again")
        self._fullSize = max(self._fullSize, size)
        self.opened += 1
        return Pipe(readFD, writeFD, size)

    def _fellShort(self, why: str | None) -> None:
        if not self.short:
            self.short = True
            self._log.warn(
                "No pipe for spliced tunnels ({error}): their bytes go "
                "through Python until pipes can be made again",
                error=why,
            )

    def release(self, pipe: Pipe, empty: bool) -> None:
        """
        Take a lent pipe back.

        @param pipe: A pipe from L{acquire}.
        @param empty: Whether it holds no byte; a pipe with bytes in it is
            closed, never lent again, and so is one smaller than others
            were made (while the user's pipe quota was used up), so that
            the next new pipe may have the full size.
        """
        if self.maxIdle is None:
            self.maxIdle = idleLimit(self.pipeSize, processes=self.processes)
        if empty and len(self._idle) < self.maxIdle and pipe.size >= self._fullSize:
            self._idle.append(pipe)
        else:
            self.opened -= 1
            pipe.close()
            # Some of the quota is free again.
            self._quotaRetryAt = None

    def clear(self) -> None:
        """
        Close every idle pipe.
        """
        idle, self._idle = self._idle, []
        for pipe in idle:
            self.opened -= 1
            pipe.close()


def _procNumber(path: str) -> int | None:
    """
    The number a kernel setting file holds.

    @param path: The file, under C{/proc/sys}.
    @return: The number, or L{None} if it cannot be read.
    """
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _pipeMaxSize(path: str = "/proc/sys/fs/pipe-max-size") -> int:
    """
    The largest pipe a process without C{CAP_SYS_RESOURCE} may ask for.

    @param path: Where the kernel tells it.
    @return: That size in bytes, or L{PIPE_SIZE} if it cannot be read.
    """
    size = _procNumber(path)
    return PIPE_SIZE if size is None else size


def idleLimit(
    pipeSize: int = PIPE_SIZE,
    maxIdle: int = POOL_MAX_IDLE,
    privileged: bool | None = None,
    quotaPath: str = "/proc/sys/fs/pipe-user-pages-soft",
    processes: int = 1,
) -> int:
    """
    How many empty pipes a pool may keep without starving the user's pipes.

    Linux charges the pipe buffers of an unprivileged user to a quota
    (C{fs.pipe-user-pages-soft}, 64 MiB by default) shared by all its
    processes; over it, new pipes get one or two pages and no bigger size.
    So an unprivileged proxy keeps at most a quarter of the quota in idle
    pipes, all its processes together, leaving the rest to the pipes
    tunnels borrow.

    @param pipeSize: The size of each pipe.
    @param maxIdle: The most to keep, quota or not.
    @param privileged: Whether the quota does not apply (root); by default,
        whether the effective user is root.
    @param quotaPath: Where the kernel tells the quota, in pages.
    @param processes: How many processes of the user keep such pools.
    @return: How many to keep.
    """
    if privileged is None:
        privileged = os.geteuid() == 0
    if privileged:
        return maxIdle
    pages = _procNumber(quotaPath)
    if pages is None or pages <= 0:
        # Unknown, or no quota.
        return maxIdle
    return max(1, min(maxIdle, pages * mmap.PAGESIZE // 4 // processes // pipeSize))


#: The pool every L{SpliceRelay} uses unless given another.
defaultPool = PipePool()


@implementer(IReadWriteDescriptor)
class SpliceEnd:
    """
    One socket of a L{SpliceRelay}, as the reactor sees it: the one reader
    and writer registered for that socket's descriptor while the relay runs.

    @ivar side: C{"client"} or C{"target"}.
    @ivar transport: The Twisted transport that owns the socket.
    @ivar fd: The socket's descriptor.
    @ivar reading: Whether it is registered as a reader.
    @ivar writing: Whether it is registered as a writer.
    """

    __slots__ = (
        "_reactor",
        "_relay",
        "_socket",
        "fd",
        "reading",
        "side",
        "transport",
        "writing",
    )

    def __init__(
        self,
        relay: SpliceRelay,
        side: str,
        transport: StreamTransport,
        reactor: IReactorFDSet,
    ) -> None:
        """
        @param relay: The relay this socket belongs to.
        @param side: C{"client"} or C{"target"}.
        @param transport: A transport that L{canSplice} accepts.
        @param reactor: The reactor that runs C{transport}.
        """
        self._relay: SpliceRelay | None = relay
        self.side = side
        self.transport = transport
        self._socket: socket.socket = cast(Any, transport).socket
        self.fd = self._socket.fileno()
        self._reactor = reactor
        self.reading = False
        self.writing = False

    def fileno(self) -> int:
        """
        The socket's descriptor.

        @return: The descriptor, or -1 once the transport closed it (the
            reactor then finds this object by identity, never by a
            descriptor number that may have been reused).
        """
        return self._socket.fileno()

    def logPrefix(self) -> str:
        """
        Log as the relay.

        @return: C{"SpliceRelay"}.
        """
        return "SpliceRelay"

    def setReading(self, on: bool) -> None:
        """
        Register or unregister as the socket's reader.

        @param on: Whether to be registered.
        """
        if on and self._relay is None:
            return
        if on != self.reading:
            self.reading = on
            if on:
                self._reactor.addReader(self)
            else:
                self._reactor.removeReader(self)

    def setWriting(self, on: bool) -> None:
        """
        Register or unregister as the socket's writer.

        @param on: Whether to be registered.
        """
        if on and self._relay is None:
            return
        if on != self.writing:
            self.writing = on
            if on:
                self._reactor.addWriter(self)
            else:
                self._reactor.removeWriter(self)

    def takeOver(self) -> None:
        """
        Become the socket's reader and writer in place of its transport,
        which from now on neither reads nor writes.

        On the epoll reactor the transport's registration is kept as it
        stands and only the reactor's record of whom to call for the
        descriptor is pointed at this object.  The obvious way, the
        transport's C{stopReading} and this object's C{addReader}, costs an
        C{epoll_ctl} to unregister and another to register again, for each
        socket of every tunnel, to end where it started.  That record
        (C{_selectables}, with C{_reads} and C{_writes}, all keyed by
        descriptor) is the reactor's private bookkeeping, so this is done
        only for exactly L{EPollReactor} and only while the transport holds
        the registration; on any other reactor, or otherwise, the transport
        stops reading and writing and this object registers itself as it
        needs to.
        """
        reactor: Any = self._reactor
        transport: Any = self.transport
        if (
            type(reactor) is EPollReactor
            and reactor._selectables.get(self.fd) is transport
        ):
            reactor._selectables[self.fd] = self
            self.reading = self.fd in reactor._reads
            self.writing = self.fd in reactor._writes
        else:
            transport.stopReading()
            transport.stopWriting()

    def recv(self, size: int) -> bytes:
        """
        Read bytes from the socket into Python.

        @param size: The most to read.
        @return: The bytes; empty at end of file.
        @raise BlockingIOError: None are there now.
        @raise OSError: The connection is gone.
        """
        return self._socket.recv(size)

    def send(self, data: bytes) -> int:
        """
        Send bytes from Python straight to the socket.

        @param data: The bytes.
        @return: How many the socket took.
        @raise BlockingIOError: It takes none now.
        @raise OSError: The connection is gone.
        """
        return self._socket.send(data)

    def shutdownWrite(self) -> None:
        """
        Send FIN: shut down the socket's sending side.

        @raise OSError: The connection is gone.
        """
        self._socket.shutdown(socket.SHUT_WR)

    def detach(self) -> None:
        """
        Stop driving the socket, for good: unregister it, and forget the
        relay (without one it is never registered again).  The relay holds
        this object, so the reference back would
        make a cycle that only Python's cycle collector frees; with it
        dropped, a finished tunnel's objects go at once, by reference
        counting, and no tunnel leaves work for a collector pass that
        would stall every other tunnel while it runs.
        """
        self.setReading(False)
        self.setWriting(False)
        self._relay = None

    def doRead(self) -> None:
        """
        The socket is readable: move the direction it is the source of.
        """
        if self._relay is not None:
            self._relay._readable(self)

    def doWrite(self) -> None:
        """
        The socket is writable: move the direction it is the destination
        of.
        """
        if self._relay is not None:
            self._relay._writable(self)

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor gave up on the socket (a hang-up or error it saw, or an
        exception in L{doRead} or L{doWrite}) and unregistered it: the tunnel
        is reset.

        @param reason: Why.
        """
        self.reading = self.writing = False
        if self._relay is not None:
            self._relay._endFailed(self)


class _Flow:
    """
    One direction of a tunnel.

    @ivar src: Where its bytes come from.
    @ivar dst: Where they go.
    @ivar pipe: The pipe borrowed while bytes are in flight.
    @ivar inPipe: Bytes in the pipe.
    @ivar spill: Bytes held in Python, waiting for the destination socket
        to take them: what Twisted read (or was given to write) before the
        relay started, or one read of the source while C{copying} or no
        pipe can be had.
    @ivar moved: Bytes that entered this direction.
    @ivar eof: Whether the source sent FIN.
    @ivar done: Whether the FIN was passed on to the destination.
    @ivar copying: Whether reads still go through Python (C{recv} and
        C{send}) rather than a pipe.  Every direction starts so and switches
        to the pipe for good once one read fills C{_PYTHON_READ}: most
        tunnels carry a request and a response in a few small pieces, and
        for those a read and a send cost no more system calls than two
        splices, without borrowing a pipe or the kernel copying small
        packets into pipe pages; bulk transfers go through the pipe after
        their first 64 KiB.
    """

    __slots__ = (
        "copying",
        "done",
        "dst",
        "eof",
        "inPipe",
        "moved",
        "pipe",
        "spill",
        "src",
    )

    def __init__(self, src: SpliceEnd, dst: SpliceEnd, copying: bool) -> None:
        self.src = src
        self.dst = dst
        self.pipe: Pipe | None = None
        self.inPipe = 0
        # Usually empty for the whole tunnel: the shared empty bytes costs
        # nothing per tunnel, where a bytearray would.
        self.spill = b""
        self.moved = 0
        self.eof = False
        self.done = False
        self.copying = copying


def _takeUnwritten(transport: Any) -> bytes:
    """
    Take the bytes a Twisted transport holds but has not written yet (see
    C{twisted.internet.abstract.FileDescriptor}), leaving its buffer empty.
    """
    if not transport._tempDataBuffer and len(transport.dataBuffer) <= transport.offset:
        # Nothing held: leave the transport's attributes alone (assigning
        # them would grow its instance dict, for every tunnel).
        return b""
    pending = bytes(transport.dataBuffer[transport.offset :]) + b"".join(
        transport._tempDataBuffer
    )
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return pending


class SpliceRelay(RelayLifecycle):
    """
    Moves bytes between a client and a target TCP connection with
    C{splice(2)}: the same calls, callback and results as
    L{tunnel.relay.Relay}, without copying the bytes into Python.

    The client protocol and the L{tunnel.relay.TargetProtocol} feed their
    events into the C{client*} and C{target*} methods, as for a C{Relay}.
    Once started the transports do not read, so the data and end-of-file
    calls only happen before L{start} (Twisted may have read bytes before
    the switch); they are honoured, in order, at any time.

    @cvar copySmallReads: Whether each direction starts by reading through
        Python, and splices only once one read fills 64 KiB (see
        C{_Flow.copying}); otherwise every read goes through the pipe.
    @ivar clientEnd: The L{SpliceEnd} of the client's socket.
    @ivar targetEnd: The L{SpliceEnd} of the target's socket.
    """

    copySmallReads = True

    __slots__ = (
        "_down",
        "_pool",
        "_salvaging",
        "_started",
        "_up",
        "clientEnd",
        "targetEnd",
    )

    def __init__(
        self,
        client: StreamTransport,
        target: StreamTransport,
        clock: IReactorTime,
        idleTimeout: float | None,
        onEnd: Callable[[RelayResult], None],
        reactor: IReactorFDSet,
        pool: PipePool | None = None,
        idleWatch: IdleWatch | None = None,
    ) -> None:
        """
        @param client: The transport connected to the client; L{canSplice}
            must accept it.
        @param target: The transport connected to the target; likewise.
        @param clock: Schedules the idle timeout.
        @param idleTimeout: Seconds without a byte in either direction after
            which both connections are aborted; L{None} or C{0} disables it.
        @param onEnd: Called once with the L{RelayResult} when both
            connections are closed.
        @param reactor: The reactor that runs both transports.
        @param pool: Lends the pipes; by default L{defaultPool}.
        @param idleWatch: The watch, shared with other tunnels, that applies
            the idle timeout (its C{timeout} must be C{idleTimeout}); by
            default the relay has one of its own.
        """
        super().__init__(client, target, clock, idleTimeout, onEnd, idleWatch)
        self._pool = pool if pool is not None else defaultPool
        self.clientEnd = SpliceEnd(self, "client", client, reactor)
        self.targetEnd = SpliceEnd(self, "target", target, reactor)
        self._up = _Flow(self.clientEnd, self.targetEnd, self.copySmallReads)
        self._down = _Flow(self.targetEnd, self.clientEnd, self.copySmallReads)
        self._started = False
        self._salvaging = False

    @property
    def bytesUp(self) -> int:
        """
        Bytes from the client to the target so far, early data included
        (counted as they enter the proxy, as L{tunnel.relay.Relay} does).
        """
        return self._up.moved

    @property
    def bytesDown(self) -> int:
        """
        Bytes from the target to the client so far (the greeting excluded).
        """
        return self._down.moved

    def pipeBytes(self) -> tuple[int, int]:
        """
        @return: The bytes in flight in the kernel now: in the upstream and
            in the downstream pipe.
        """
        return self._up.inPipe, self._down.inPipe

    def pythonBytes(self) -> tuple[int, int]:
        """
        @return: The bytes this relay holds in Python now, upstream and
            downstream: what Twisted had read or was given to write before
            the relay started, or one read (64 KiB at most) a direction
            while it copies small reads (see L{copySmallReads}) or no pipe
            can be had, until the destination socket takes it.
        """
        return len(self._up.spill), len(self._down.spill)

    def start(
        self,
        earlyData: bytes = b"",
        clientFinished: bool = False,
        greeting: bytes = b"",
    ) -> None:
        """
        Take both sockets over from Twisted and start relaying.

        @param earlyData: Bytes the client sent before the tunnel was
            established; they reach the target first.
        @param clientFinished: Whether the client already half-closed its
            side before the tunnel was established.
        @param greeting: Bytes for the client before anything from the
            target (the C{200} response); not counted in L{bytesDown}.
        """
        if self._started or self._closing is not None:
            return
        self._started = True
        client, target = cast(Any, self._client), cast(Any, self._target)
        self.clientEnd.takeOver()
        self.targetEnd.takeOver()
        # What Twisted was asked to write goes first, then what this relay
        # was given before it started.
        self._down.spill = _takeUnwritten(client) + greeting + self._down.spill
        self._up.spill = _takeUnwritten(target) + earlyData + self._up.spill
        self._up.moved += len(earlyData)
        self._watchIdle()
        if clientFinished:
            self.clientFinished()
        self._pump(self._up)
        self._pump(self._down)

    def clientData(self, data: bytes) -> None:
        """
        Bytes from the client that Twisted read (before the relay started).

        @param data: The bytes.
        """
        self._given(self._up, data)

    def targetData(self, data: bytes) -> None:
        """
        Bytes from the target that Twisted read (before the relay started).

        @param data: The bytes.
        """
        self._given(self._down, data)

    def _given(self, flow: _Flow, data: bytes) -> None:
        if self._closing is not None or flow.eof:
            return
        flow.spill += data
        flow.moved += len(data)
        if self._started:
            self._pump(flow)
            self._active()

    def clientFinished(self) -> None:
        """
        The client sent FIN: pass it on to the target once the bytes before
        it are delivered.
        """
        self._finished(self._up)

    def targetFinished(self) -> None:
        """
        The target sent FIN: pass it on to the client once the bytes before
        it are delivered.
        """
        self._finished(self._down)

    def _finished(self, flow: _Flow) -> None:
        if self._closing is not None or flow.eof:
            return
        self._sawEOF(flow)
        if self._started:
            self._pump(flow)

    def _sawEOF(self, flow: _Flow) -> None:
        flow.eof = True
        flow.src.setReading(False)
        if self._firstEnd is None:
            self._firstEnd = f"{flow.src.side}-eof"

    # Moving bytes.

    def _readable(self, end: SpliceEnd) -> None:
        self._pump(self._up if end is self.clientEnd else self._down, readable=True)

    def _writable(self, end: SpliceEnd) -> None:
        self._pump(self._down if end is self.clientEnd else self._up)

    def _endFailed(self, end: SpliceEnd) -> None:
        self._close(f"{end.side}-reset", abort=True)

    def _pump(self, flow: _Flow, readable: bool = False) -> None:
        if self._closing is None and not flow.done and self._move(flow, readable):
            self._active()

    def _move(self, flow: _Flow, readable: bool) -> bool:
        """
        Move one direction as far as it can go now: drain its pipe into the
        destination, then send it the bytes Python holds, and, if
        C{readable}, splice a read from the source, and another after each
        that filled the pipe, up to L{_READS}.  Leaves the source
        registered for reading only while the pipe is empty, and the
        destination registered for writing only while bytes wait for it.

        @return: Whether any byte moved.
        """
        src, dst = flow.src, flow.dst
        moved = False
        reads = _READS
        for _ in range(_ROUNDS):
            if flow.inPipe or flow.spill:
                try:
                    if flow.inPipe:
                        flow.inPipe -= os.splice(
                            cast(Pipe, flow.pipe).readFD,
                            dst.fd,
                            flow.inPipe,
                            flags=_FLAGS,
                        )
                    else:
                        # The pipe is empty: what Python holds goes straight
                        # to the socket, one system call where the pipe
                        # would take two.
                        flow.spill = flow.spill[dst.send(flow.spill) :]
                except BlockingIOError:
                    # The destination is full: read no more until it drains.
                    src.setReading(False)
                    dst.setWriting(True)
                    return moved
                except OSError:
                    self._destinationFailed(flow)
                    return moved
                moved = True
                continue
            # Nothing in flight.
            dst.setWriting(False)
            if flow.pipe is not None:
                self._pool.release(flow.pipe, True)
                flow.pipe = None
            if flow.eof:
                self._finish(flow)
                return moved
            if not readable:
                src.setReading(True)
                return moved
            readable = False
            # Through Python while the direction copies small reads, and
            # when no pipe can be had (out of descriptors): as on the
            # ordinary relay, rather than end a tunnel that works.
            pipe = None if flow.copying else self._borrow(flow)
            try:
                n = 0
                if pipe is not None:
                    try:
                        n = os.splice(src.fd, pipe.writeFD, pipe.size, flags=_FLAGS)
                    except BlockingIOError:
                        if reads < _READS:
                            # Reading on after a full pipe: drained.
                            raise
                    flow.inPipe += n
                    reads -= 1
                    readable = n == pipe.size and reads > 0
                if not n:
                    # Through Python, too, when splice found nothing where
                    # the reactor saw bytes, or an end of file: TCP urgent
                    # data stops splice at its mark (EAGAIN, or 0 once the
                    # FIN is in), which would spin the reactor or cut the
                    # stream short; recv passes the mark, dropping the
                    # urgent byte as the ordinary relay does, and tells a
                    # real end of file.
                    data = src.recv(_PYTHON_READ)
                    flow.spill = data
                    n = len(data)
                    if n == _PYTHON_READ:
                        flow.copying = False
            except BlockingIOError:
                continue
            except OSError:
                self._close(f"{src.side}-reset", abort=True)
                return moved
            if n:
                flow.moved += n
                moved = True
            else:
                self._sawEOF(flow)
        # Many small steps: go on when the reactor has run.
        dst.setWriting(True)
        return moved

    def _borrow(self, flow: _Flow) -> Pipe | None:
        if flow.pipe is None:
            try:
                flow.pipe = self._pool.acquire()
            except OSError:
                return None
        return flow.pipe

    def _finish(self, flow: _Flow) -> None:
        """
        The source sent FIN and every byte before it was delivered: send FIN
        to the destination, and close both connections if the other
        direction is finished too.
        """
        flow.done = True
        # shutdown, not close alone, sends the FIN even while a forked
        # process holds a copy of the descriptor.
        try:
            flow.dst.shutdownWrite()
        except OSError:
            self._destinationFailed(flow)
            return
        if self._up.done and self._down.done:
            # The first of the two FINs named _firstEnd; this flow's is the
            # second.
            first = self._firstEnd or f"{flow.src.side}-eof"
            self._close(first, abort=False, finished=True)

    def _destinationFailed(self, flow: _Flow) -> None:
        """
        Sending to C{flow}'s destination failed: that side reset.  Before
        both connections are reset, the other direction delivers what it
        can at once, as the ordinary relay would have: what Python holds
        for it (the C{200}, when the tunnel is this young) and what the
        side that reset sent before its reset, still queued in its socket.
        A client that sent a request and its FIN with the C{CONNECT}, to a
        target that answers and closes at once, so gets the C{200} and the
        answer, not a bare reset.
        """
        other = self._down if flow is self._up else self._up
        if not (other.done or self._salvaging):
            # One pass, never waiting: a destination that cannot take it
            # now does not hold the tunnel open; and only one, should the
            # other side fail too.
            self._salvaging = True
            self._move(other, readable=True)
        if self._closing is None:
            self._close(f"{flow.dst.side}-reset", abort=True)

    # Ending.

    def _close(self, how: str, abort: bool, finished: bool = False) -> None:
        if not (abort or finished) and any(
            flow.inPipe or flow.spill for flow in (self._up, self._down)
        ):
            # A side closed by someone else while bytes were in flight: the
            # pipes go back below, so those bytes cannot be delivered, and a
            # clean FIN after them would pass a cut stream off as whole.
            abort = True
        self._closing = how
        self._unwatchIdle()
        if not (abort or finished):
            self._startCloseDeadline()
        self._detach()
        for transport, isOpen in (
            (self._client, self._clientOpen),
            (self._target, self._targetOpen),
        ):
            if not isOpen:
                continue
            if finished:
                # Both FINs are passed on and the transports hold no byte:
                # close the sockets now.  loseConnection would register each
                # one for writing only to find its empty buffer empty on the
                # next turn of the reactor (two epoll calls and a wake-up
                # per socket, on every short tunnel).  The reason must be a
                # clean one: with ConnectionAborted Twisted would close with
                # SO_LINGER 0, a reset that drops bytes not yet sent.  Nor
                # need Twisted call shutdown(SHUT_RDWR) before close: each
                # socket has sent its FIN and read the peer's already.
                closing = cast(Any, transport)
                closing._shouldShutdown = False
                closing.connectionLost(connectionDone)
            elif abort:
                transport.abortConnection()
            else:
                transport.loseConnection()

    def _detach(self) -> None:
        """
        Take both sockets off the reactor and give the pipes back: from now
        on the sockets belong to their transports again.
        """
        self.clientEnd.detach()
        self.targetEnd.detach()
        for flow in (self._up, self._down):
            if flow.pipe is not None:
                self._pool.release(flow.pipe, flow.inPipe == 0)
                flow.pipe = None
            flow.inPipe = 0
            flow.spill = b""
