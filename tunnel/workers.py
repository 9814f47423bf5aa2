"""
Several reactor processes sharing the listening sockets: C{--workers N}.

The main process binds every listener once, never accepts on them itself,
and starts N worker processes that inherit the sockets and adopt them (TCP
with C{IReactorSocket.adoptStreamPort}, UNIX through L{_SharedUNIXPort});
the kernel hands each new connection to one of the workers.  The main
process supervises: a worker that dies is replaced, SIGTERM drains every
worker, SIGUSR1 is passed on (to reopen access logs), and the workers' log
lines come out of the main process's log tagged with the worker's number.
With metrics on, each worker also sends a snapshot of its metrics every
second, which the main process adds up.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import (
    InvalidLogLevelError,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
)
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from .metrics import WorkerMetrics

__all__ = [
    "KeptFile",
    "WorkerSupervisor",
    "adoptListeningSocket",
    "formatMetricsRecord",
    "formatWorkerRecord",
    "keptFileDescriptor",
    "readKeptFile",
    "workerArguments",
]

#: Options that belong to the main process only.
_MAIN_ONLY = {"--workers", "--listen", "--metrics"}


def workerArguments(argv: list[str]) -> list[str]:
    """
    The command-line arguments for a worker: the main process's, less the
    options that only the main process uses.

    @param argv: The C{connect-proxy} arguments as given.
    @return: The arguments to pass on.
    """
    kept: list[str] = []
    skip = False
    for argument in argv:
        if skip:
            skip = False
            continue
        name, equals, _ = argument.partition("=")
        # getopt accepts any unambiguous prefix of a long option (--work 2).
        if len(name) > 3 and any(option.startswith(name) for option in _MAIN_ONLY):
            skip = not equals
            continue
        kept.append(argument)
    return kept


class _NoConnections(Factory):
    """
    The factory of the main process's own ports, which never accept.
    """

    noisy = False

    def logPrefix(self) -> str:
        """
        Name the port in the log for what it is.
        """
        return "Shared listening socket"


#: The endpoint kinds whose listening sockets workers can share.
SHAREABLE_KINDS = ("tcp", "tcp6", "unix")


def _listenNow(reactor: Any, description: str) -> IListeningPort:
    """
    Bind a listener synchronously (TCP and UNIX endpoints listen at once).

    @raise ValueError: For other kinds: a worker adopting the socket of an
        C{ssl:} listener would serve it without TLS.
    """
    if description.partition(":")[0].lower() not in SHAREABLE_KINDS:
        raise ValueError(f"{description}: only tcp, tcp6 and unix listeners are shared")
    results: list[Any] = []
    serverFromString(reactor, description).listen(_NoConnections()).addBoth(
        results.append
    )
    if not results:
        raise ValueError(f"{description}: cannot be shared between workers")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    if not hasattr(result, "fileno") or not hasattr(result, "stopReading"):
        raise ValueError(f"{description}: cannot be shared between workers")
    return result  # type: ignore[no-any-return]


class _SharedUNIXPort(unix.Port):
    """
    A worker's copy of a UNIX listening socket the supervisor owns: the
    worker accepts on it, but neither changes its mode (Twisted's port would
    make it 0666 again, undoing the endpoint's C{mode=}) nor removes its
    path nor shuts the socket down when it stops (either would cut off every
    other worker, and every replacement).  The supervisor's own port does
    all that, as usual.
    """

    # Twisted's adopted TCP ports skip the shutdown(SHUT_RDWR) before
    # close; its UNIX ports do not, and on a listening socket that every
    # worker shares it stops the listening for all of them.
    _shouldShutdown = False

    def startListening(self) -> None:
        # unix.Port.startListening for an adopted socket, less its chmod:
        # besides undoing mode=, it fails (EPERM) for a worker that -u made
        # another user than the socket's owner.
        tcp._reservedFD.reserve()
        # Twisted's own attributes, typed for the ports it makes itself.
        port: Any = self
        port.factory.doStart()
        listening, port._preexistingSocket = port._preexistingSocket, None
        # No listen(): the supervisor's socket listens already, with its
        # endpoint's backlog, and a listen() here would set the queue that
        # every worker shares to this port's backlog (Twisted's 50).  An
        # adopted TCP port does not call it either.
        port.connected = True
        port.socket = listening
        port.fileno = listening.fileno
        port.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason: Failure) -> None:
        # tcp.Port's, skipping unix.Port's unlink (the lock file, which
        # only wantPID ports take, is never taken here).
        tcp.Port.connectionLost(self, reason)


def adoptListeningSocket(
    reactor: Any, fd: int, family: socket.AddressFamily, factory: Factory
) -> IListeningPort:
    """
    Start accepting, for C{factory}, on a listening socket inherited from
    the supervisor (C{IReactorSocket.adoptStreamPort}, but for UNIX
    sockets a L{_SharedUNIXPort}).

    @param reactor: The reactor.
    @param fd: The inherited descriptor; the caller still owns it.
    @param family: Its address family.
    @param factory: Builds the protocols.
    @return: The listening port.
    """
    if family != socket.AF_UNIX:
        return reactor.adoptStreamPort(fd, family, factory)  # type: ignore[no-any-return]
    port: IListeningPort = _SharedUNIXPort._fromListeningDescriptor(
        reactor, fd, factory
    )
    port.startListening()
    return port


#: A worker that lived this many seconds started well: the next one that
#: ends is replaced after the base delay again.
_STEADY_AFTER = 10.0

#: The longest wait before a failing worker is started again.
_MAX_RESPAWN_DELAY = 60.0

#: Seconds between the supervisor's looks at the files it keeps for new
#: workers.
_KEEP_INTERVAL = 1.0


class KeptFile(Protocol):
    """
    A file the workers read and re-read (rules, htpasswd), of which the
    supervisor keeps the last good version for the workers it starts: one
    started while an edit has left the file broken then starts with what
    the running workers keep, rather than fail to start.  Its reader in the
    main process decides what is good (L{tunnel.rules.RulesFilePolicy},
    L{tunnel.htpasswd.HtpasswdChecker}).

    @ivar path: The file.
    @ivar content: The content of its last good version.
    """

    path: str
    content: bytes

    def refresh(self) -> object:
        """
        Read the file again if it changed, keeping the last good content
        if the new one cannot be used.

        @return: Whatever the reader gives (ignored).
        """


def keptFileDescriptor(path: str, content: bytes) -> int:
    """
    An anonymous file holding C{path} and C{content}, for a worker to
    inherit (see L{readKeptFile}).

    @param path: The file the content was read from.
    @param content: The content.
    @return: A descriptor of the anonymous file, which the caller closes.
    """
    data = os.fsencode(path) + b"\0" + content
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        # In memory: the content (password hashes) never reaches a disk.
        fd: int = memfd("tunnel-kept-file")
    else:
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def readKeptFile(fd: int) -> tuple[str, bytes]:
    """
    Read what L{keptFileDescriptor} wrote, and close the descriptor.

    @param fd: The descriptor.
    @return: The path and the content.
    @raise OSError: If the descriptor cannot be read.
    @raise ValueError: If it holds no path.
    """
    with os.fdopen(fd, "rb") as f:
        f.seek(0)
        data = f.read()
    path, separator, content = data.partition(b"\0")
    if not separator or not path:
        raise ValueError("not a kept file")
    return os.fsdecode(path), content


def formatWorkerRecord(event: LogEvent) -> str:
    """
    Format a worker's log event for the main process, which adds the time
    and the worker's number: its level, source (its namespace, or the
    system of a legacy event) and text (with the traceback of a failure),
    ended by a record separator, since a text may span lines.

    @param event: The event.
    @return: The record.
    """
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback().rstrip("\n")
    level = event.get("log_level", LogLevel.info)
    # A legacy twisted.python.log event names its source in log_system (as
    # twistd's own log shows it); its namespace is only "log_legacy".
    source = str(event.get("log_system") or event.get("log_namespace", "-"))
    # A separator inside the text, or a tab or separator inside the source
    # (Twisted's log prefix of a connection holds the peer's address, which
    # a UNIX client names itself), would end the field or the record there
    # and start a forged one (a log line, or metrics): whatever a client
    # could get into a message, it stays text.
    text = text.replace(_RECORD_END, "\\x1e")
    source = _C0_CONTROL.sub(_hexEscaped, source)
    return f"{level.name}\t{source}\t{text}{_RECORD_END}\n"


_C0_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _hexEscaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


_RECORD_END = "\x1e"

# The first field of a record carrying metrics (not a log level's name).
_METRICS = "metrics"


def formatMetricsRecord(snapshot: str) -> str:
    """
    Format a worker's metrics snapshot for the main process, as a record
    among its log records.

    @param snapshot: The snapshot (L{tunnel.metrics.snapshotMetrics}: JSON,
        so without tabs, newlines or record separators).
    @return: The record.
    """
    return f"{_METRICS}\t-\t{snapshot}{_RECORD_END}\n"


class _WorkerProtocol(ProcessProtocol):
    """
    Passes a worker's log records on to the log, each at its own level, and
    tells the supervisor when the worker ends.  Anything else the worker
    writes (to standard error, say, before its logging starts) is passed on
    line by line, as a warning.
    """

    _log = Logger()

    def __init__(self, supervisor: WorkerSupervisor, number: int) -> None:
        self._supervisor = supervisor
        self.number = number
        self._partial: dict[int, bytes] = {}
        self.ended: Deferred[None] = Deferred()
        # A worker writes log records only once it ignores SIGUSR1.
        self.ready = False
        # Signals held back until it is ready (see signalWorkers).
        self.held: set[int] = set()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        separator = _RECORD_END.encode() if childFD == 1 else b"\n"
        pieces = (self._partial.pop(childFD, b"") + data).split(separator)
        partial = pieces.pop()
        if partial:
            self._partial[childFD] = partial
        for piece in pieces:
            self._pass(piece.decode("utf-8", "replace").lstrip("\n"), childFD == 1)

    def _pass(self, record: str, structured: bool) -> None:
        if not record:
            return
        level, namespace, text = LogLevel.warn, "-", record
        if structured:
            fields = record.split("\t", 2)
            if fields[0] == _METRICS and len(fields) == 3:
                self._supervisor.workerMetrics(self.number, fields[2])
                return
            with contextlib.suppress(ValueError, IndexError, InvalidLogLevelError):
                level, namespace, text = (
                    LogLevel.levelWithName(fields[0]),
                    fields[1],
                    fields[2],
                )
                if not self.ready:
                    self.ready = True
                    held, self.held = self.held, set()
                    for signum in sorted(held):
                        self._supervisor.signalWorker(self.number, signum)
        self._log.emit(
            level,
            "worker {number}: [{workerNamespace}] {text}",
            number=self.number,
            workerNamespace=namespace,
            text=text,
        )

    def processEnded(self, reason: Failure) -> None:
        # Its last words may make it ready, too late for a signal.
        self.held.clear()
        for fd, partial in sorted(self._partial.items()):
            self._pass(partial.decode("utf-8", "replace").strip("\n"), fd == 1)
        self._partial.clear()
        self._supervisor.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    Runs N worker processes over shared listening sockets, and replaces any
    that dies.

    @ivar workers: The running workers' process transports, by worker
        number (from 0).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        listen: list[str],
        workerArgv: list[str],
        count: int,
        stopTimeout: float,
        respawnDelay: float = 1.0,
        metrics: WorkerMetrics | None = None,
        keptFiles: Sequence[KeptFile] = (),
        directory: str | None = None,
    ) -> None:
        """
        @param reactor: The reactor (spawnProcess, callLater).
        @param listen: Server endpoint strings (TCP or UNIX) to share.
        @param workerArgv: The C{connect-proxy} arguments for each worker
            (see L{workerArguments}).
        @param count: How many workers.
        @param stopTimeout: Seconds a worker gets to drain after SIGTERM
            before it is killed.
        @param respawnDelay: Seconds before a dead worker is replaced;
            doubled each time it ends again within 10 seconds of starting,
            up to a minute.
        @param metrics: Adds up the metrics the workers report, if they
            are to report them.
        @param keptFiles: The files whose last good version each new
            worker is given, looked at every second.
        @param directory: The workers' working directory, if not this
            process's (when it runs, after twistd's C{-d}).
        """
        self._reactor = reactor
        self._listen = listen
        self._workerArgv = workerArgv
        self._count = count
        self._stopTimeout = stopTimeout
        self._respawnDelay = respawnDelay
        self._metrics = metrics
        self._keptFiles = keptFiles
        self._directory = directory
        self._keeping = LoopingCall(self._refreshKeptFiles)
        self._keeping.clock = reactor
        self._ports: list[tuple[IListeningPort, int]] = []
        self.workers: dict[int, Any] = {}
        self._protocols: dict[int, _WorkerProtocol] = {}
        self._startedAt: dict[int, float] = {}
        # How many times in a row each worker ended soon after it started.
        self._quickEnds: dict[int, int] = {}
        self._respawns: dict[int, IDelayedCall] = {}
        self._previousUSR1: Any = None

    def privilegedStartService(self) -> None:
        """
        Bind the listeners (perhaps on privileged ports) before twistd drops
        privileges.
        """
        for description in self._listen:
            port = _listenNow(self._reactor, description)
            # The main process never accepts: the workers do.
            port.stopReading()  # type: ignore[attr-defined]
            family = port.socket.family  # type: ignore[attr-defined]
            self._ports.append((port, family))
            self._log.info(
                "Listening on {address} for {count} workers",
                address=port.getHost(),
                count=self._count,
            )
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Start the workers.
        """
        if not self._ports:
            self.privilegedStartService()
        super().startService()
        self._previousUSR1 = signal.signal(signal.SIGUSR1, self._onUSR1)
        if self._keptFiles:
            self._keeping.start(_KEEP_INTERVAL, now=False)
        for number in range(self._count):
            # A worker that cannot be started (the interpreter not
            # executable by the -u user, fork failing) is logged and tried
            # again later, as a replacement would be, rather than fail the
            # start of the others.
            self._respawnIfRunning(number)

    def _onUSR1(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.signalWorkers, signal.SIGUSR1, True)
        if callable(self._previousUSR1):
            self._previousUSR1(signum, frame)

    def signalWorkers(self, signum: int, readyOnly: bool = False) -> None:
        """
        Send C{signum} to every worker.

        @param signum: The signal.
        @param readyOnly: Hold it back from the workers that have not
            logged anything yet, and send it to each when it does: until
            then a worker may not handle the signal (SIGUSR1's default
            action would kill it).  A worker that is told to reopen its log
            while it starts must not miss it.
        """
        for number in list(self.workers):
            protocol = self._protocols.get(number)
            if readyOnly and not (protocol is not None and protocol.ready):
                if protocol is not None:
                    protocol.held.add(signum)
                continue
            self.signalWorker(number, signum)

    def signalWorker(self, number: int, signum: int) -> None:
        """
        Send C{signum} to one worker, if it runs.

        @param number: The worker's number.
        @param signum: The signal.
        """
        process = self.workers.get(number)
        if process is None:
            return
        try:
            process.signalProcess(signum)
        except Exception:
            self._log.failure("Could not signal a worker")

    def _refreshKeptFiles(self) -> None:
        for kept in self._keptFiles:
            try:
                kept.refresh()
            except Exception:
                self._log.failure("Could not look at {path}", path=kept.path)

    def _spawn(self, number: int) -> None:
        inherit: list[str] = []
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for port, family in self._ports:
            fd = port.fileno()  # type: ignore[attr-defined]
            childFDs[fd] = fd
            inherit += ["--inherit-fd", f"{fd}:{int(family)}"]
        inherit += ["--worker-of", str(self._count)]
        if self._metrics is not None:
            inherit.append("--report-metrics")
        keptFDs: list[int] = []
        try:
            for kept in self._keptFiles:
                fd = keptFileDescriptor(kept.path, kept.content)
                keptFDs.append(fd)
                childFDs[fd] = fd
                # Before the worker's own options, which read the files.
                inherit += ["--kept-file", str(fd)]
            protocol = _WorkerProtocol(self, number)
            argv = [
                sys.executable,
                "-m",
                "tunnel.workermain",
                *inherit,
                *self._workerArgv,
            ]
            self.workers[number] = self._reactor.spawnProcess(
                protocol,
                sys.executable,
                argv,
                env=dict(os.environ),
                path=self._directory,
                childFDs=childFDs,
            )
        finally:
            for fd in keptFDs:
                os.close(fd)
        self._protocols[number] = protocol
        self._startedAt[number] = self._reactor.seconds()
        self._log.info(
            "Started worker {number} (pid {pid})",
            number=number,
            pid=self.workers[number].pid,
        )

    def workerEnded(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        """
        A worker exited: replace it unless the service is stopping.

        @param protocol: The process protocol of the worker that ended.
        @param reason: How it ended.
        """
        number = protocol.number
        self.workers.pop(number, None)
        if self._metrics is not None:
            self._metrics.retire(number)
        if not self.running:
            # Stopping: say whether it drained, or was killed once the drain
            # timeout had passed (or ended otherwise).
            if reason.check(ProcessDone):
                self._log.info("Worker {number} drained and exited", number=number)
            else:
                self._log.warn(
                    "Worker {number} ended while stopping ({why})",
                    number=number,
                    why=reason.getErrorMessage(),
                )
            return
        lived = self._reactor.seconds() - self._startedAt.get(number, 0)
        delay = self._scheduleRespawn(number, quick=lived < _STEADY_AFTER)
        self._log.warn(
            "Worker {number} ended ({why}); replacing it in {delay:g} s",
            number=number,
            why=reason.getErrorMessage(),
            delay=delay,
        )

    def workerMetrics(self, number: int, snapshot: str) -> None:
        """
        A worker sent a snapshot of its metrics.

        @param number: The worker's number.
        @param snapshot: The snapshot's text.
        """
        if self._metrics is not None:
            self._metrics.report(number, snapshot)

    def _scheduleRespawn(self, number: int, quick: bool) -> float:
        """
        Start worker C{number} again after a delay.

        @param quick: Whether the last one ended soon after it started, or
            could not be started at all.
        @return: The delay, in seconds.
        """
        # A worker that keeps ending right after it starts (a file it
        # cannot read once privileges are dropped, say) is replaced less
        # and less often, up to once a minute, instead of every second.
        self._quickEnds[number] = self._quickEnds.get(number, 0) + 1 if quick else 0
        again = max(0, self._quickEnds[number] - 1)
        delay = float(min(self._respawnDelay * 2**again, _MAX_RESPAWN_DELAY))
        self._respawns[number] = self._reactor.callLater(
            delay, self._respawnIfRunning, number
        )
        return delay

    def _respawnIfRunning(self, number: int) -> None:
        self._respawns.pop(number, None)
        if not self.running or number in self.workers:
            return
        try:
            self._spawn(number)
        except Exception:
            # fork can fail for a while (EAGAIN under a process limit,
            # ENOMEM): try again later rather than run a worker short.
            delay = self._scheduleRespawn(number, quick=True)
            self._log.failure(
                "Could not start worker {number}; trying again in {delay:g} s",
                number=number,
                delay=delay,
            )

    def stopService(self) -> Deferred[Any]:
        """
        Drain every worker (SIGTERM), kill those that outlive the timeout,
        then close the listeners.

        @return: A Deferred that fires when every worker has ended and the
            listeners are closed.
        """
        super().stopService()
        if self._keeping.running:
            self._keeping.stop()
        for respawn in self._respawns.values():
            respawn.cancel()
        self._respawns.clear()
        endings = [p.ended for n, p in self._protocols.items() if n in self.workers]
        self.signalWorkers(signal.SIGTERM)
        # Close the shared sockets now, not after the drain: the workers
        # have stopped accepting, and a socket left listening would let the
        # kernel queue connections that nobody will ever answer.  No worker
        # is started again once the service stops.
        closed = DeferredList(
            [maybeDeferred(port.stopListening) for port, _ in self._ports]
        )
        killer = self._reactor.callLater(
            self._stopTimeout, self.signalWorkers, signal.SIGKILL
        )

        def workersEnded(result: object) -> Deferred[Any]:
            if killer.active():
                killer.cancel()
            # Only now: a logrotate's SIGUSR1 during the drain still reaches
            # the draining workers, and does not meet the handler from
            # before (none, with twistd logging to standard output, so the
            # default action: ending this process).
            if self._previousUSR1 is not None:
                signal.signal(signal.SIGUSR1, self._previousUSR1)
                self._previousUSR1 = None
            return closed

        return DeferredList(endings).addCallback(workersEnded)


def parseInheritedDescriptors(
    values: list[str],
) -> list[tuple[int, socket.AddressFamily]]:
    """
    Parse C{--inherit-fd FD:FAMILY} values.

    @param values: The values, as given on the command line.
    @return: C{(descriptor, address family)} for each.
    @raise ValueError: If a value is not two numbers, or the family is
        unknown.
    """
    ports = []
    for value in values:
        fd, _, family = value.partition(":")
        ports.append((int(fd), socket.AddressFamily(int(family))))
    return ports
