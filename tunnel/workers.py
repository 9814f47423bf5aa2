"""
Several reactor processes sharing the listening sockets: C{--workers N}.

The main process binds every listener once, never accepts on them itself,
and starts N worker processes that inherit the sockets and adopt them with
C{IReactorSocket.adoptStreamPort}; the kernel hands each new connection to
one of the workers.  The main process supervises: a worker that dies is
replaced, SIGTERM drains every worker, SIGUSR1 is passed on (to reopen
access logs), and the workers' log lines come out of the main process's log
tagged with the worker's number.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["WorkerSupervisor", "workerArguments"]

#: Options that belong to the main process only.
_MAIN_ONLY = {"--workers", "--listen", "--metrics"}
_MAIN_ONLY_FLAGS: set[str] = set()


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
        if argument in _MAIN_ONLY_FLAGS:
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


class _WorkerProtocol(ProcessProtocol):
    """
    Passes a worker's output on to the log, line by line, and tells the
    supervisor when it ends.
    """

    _log = Logger(namespace="tunnel.workers")

    def __init__(self, supervisor: WorkerSupervisor, number: int) -> None:
        self._supervisor = supervisor
        self.number = number
        self._partial = b""
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._log.info(
                "worker {number}: {line}",
                number=self.number,
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self.childDataReceived(1, b"\n")
        self._supervisor.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    Runs N worker processes over shared listening sockets, and replaces any
    that dies.
    """

    _log = Logger(namespace="tunnel.workers")

    def __init__(
        self,
        reactor: Any,
        listen: list[str],
        workerArgv: list[str],
        count: int,
        stopTimeout: float,
        respawnDelay: float = 1.0,
    ) -> None:
        """
        @param reactor: The reactor (spawnProcess, callLater).
        @param listen: Server endpoint strings (TCP or UNIX) to share.
        @param workerArgv: The C{connect-proxy} arguments for each worker
            (see L{workerArguments}).
        @param count: How many workers.
        @param stopTimeout: Seconds a worker gets to drain after SIGTERM
            before it is killed.
        @param respawnDelay: Seconds before a dead worker is replaced.
        """
        self._reactor = reactor
        self._listen = listen
        self._workerArgv = workerArgv
        self._count = count
        self._stopTimeout = stopTimeout
        self._respawnDelay = respawnDelay
        self._ports: list[tuple[IListeningPort, int]] = []
        self.workers: dict[int, Any] = {}
        self._protocols: dict[int, _WorkerProtocol] = {}
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
        for number in range(self._count):
            self._spawn(number)

    def _onUSR1(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.signalWorkers, signal.SIGUSR1)
        if callable(self._previousUSR1):
            self._previousUSR1(signum, frame)

    def signalWorkers(self, signum: int) -> None:
        """
        Send C{signum} to every worker.
        """
        for process in self.workers.values():
            try:
                process.signalProcess(signum)
            except Exception:
                self._log.failure("Could not signal a worker")

    def _spawn(self, number: int) -> None:
        inherit: list[str] = []
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for port, family in self._ports:
            fd = port.fileno()  # type: ignore[attr-defined]
            childFDs[fd] = fd
            inherit += ["--inherit-fd", f"{fd}:{int(family)}"]
        protocol = _WorkerProtocol(self, number)
        argv = [
            sys.executable,
            "-m",
            "tunnel.workers",
            *inherit,
            *self._workerArgv,
        ]
        self._protocols[number] = protocol
        self.workers[number] = self._reactor.spawnProcess(
            protocol, sys.executable, argv, env=dict(os.environ), childFDs=childFDs
        )
        self._log.info(
            "Started worker {number} (pid {pid})",
            number=number,
            pid=self.workers[number].pid,
        )

    def workerEnded(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        """
        A worker exited: replace it unless the service is stopping.
        """
        number = protocol.number
        self.workers.pop(number, None)
        if not self.running:
            return
        self._log.warn(
            "Worker {number} ended ({why}); replacing it",
            number=number,
            why=reason.getErrorMessage(),
        )
        self._reactor.callLater(self._respawnDelay, self._respawnIfRunning, number)

    def _respawnIfRunning(self, number: int) -> None:
        if self.running and number not in self.workers:
            self._spawn(number)

    def stopService(self) -> Deferred[Any]:
        """
        Drain every worker (SIGTERM), kill those that outlive the timeout,
        then close the listeners.
        """
        super().stopService()
        if self._previousUSR1 is not None:
            signal.signal(signal.SIGUSR1, self._previousUSR1)
        endings = [p.ended for n, p in self._protocols.items() if n in self.workers]
        self.signalWorkers(signal.SIGTERM)
        killer = self._reactor.callLater(
            self._stopTimeout, self.signalWorkers, signal.SIGKILL
        )

        def closePorts(result: object) -> Deferred[Any]:
            if killer.active():
                killer.cancel()
            return DeferredList(
                [maybeDeferred(port.stopListening) for port, _ in self._ports]
            )

        return DeferredList(endings).addCallback(closePorts)


def _workerMain(argv: list[str]) -> None:
    """
    Run one worker: adopt the inherited listening sockets and serve until
    SIGTERM, then drain.
    """
    from twisted.internet import reactor
    from twisted.logger import FileLogObserver, formatEvent, globalLogBeginner

    from .tap import Options, makeWorkerService

    # The main process adds the time and the worker's number to each line.
    globalLogBeginner.beginLoggingTo(
        [
            FileLogObserver(
                sys.stdout,
                lambda event: "[{}#{}] {}\n".format(
                    event.get("log_namespace", "-"),
                    event["log_level"].name,
                    formatEvent(event),
                ),
            )
        ],
        redirectStandardIO=False,
    )
    options = Options()
    options.parseOptions(argv)
    service = makeWorkerService(options, reactor)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def inheritedPorts(values: list[str]) -> list[tuple[int, socket.AddressFamily]]:
    """
    Parse C{--inherit-fd FD:FAMILY} values.
    """
    ports = []
    for value in values:
        fd, _, family = value.partition(":")
        ports.append((int(fd), socket.AddressFamily(int(family))))
    return ports


if __name__ == "__main__":
    _workerMain(sys.argv[1:])
