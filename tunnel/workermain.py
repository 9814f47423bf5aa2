"""
A C{--workers} worker process (C{python -m tunnel.workermain}): it runs
C{connect-proxy} on the listening sockets it inherits from the supervisor
(L{tunnel.workers.WorkerSupervisor}), with its log records on its standard
output, until SIGTERM or the supervisor's end.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import FileLogObserver, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from .service import StopOnSignals
from .tap import Options, makeWorkerService
from .workers import formatWorkerRecord

__all__ = ["main"]


def main(argv: list[str]) -> None:
    """
    Run one worker: adopt the inherited listening sockets and serve until
    SIGTERM, then drain.

    @param argv: The C{connect-proxy} arguments the supervisor gave, its
        own (C{--inherit-fd}, C{--worker-of}, ...) first.
    """
    # Until the service handles SIGUSR1 (reopening the access log), the
    # signal's default action would kill a worker still starting.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stdout, formatWorkerRecord)],
        redirectStandardIO=False,
    )
    options = Options()
    options.parseOptions(argv)
    service = makeWorkerService(options, reactor)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    # "systemctl stop" and Ctrl-C signal the whole process group, and the
    # supervisor passes SIGTERM on as well.
    stopping = StopOnSignals(reactor)
    reactor.callWhenRunning(stopping.install)
    # Standard input is a pipe from the supervisor: its end means the
    # supervisor is gone (killed, crashed), and a worker left alone would
    # hold the port against the next start.
    reactor.addReader(_SupervisorWatch(stopping))
    reactor.run()


@implementer(IReadDescriptor)
class _SupervisorWatch:
    """
    Reads the worker's standard input, the supervisor's end of a pipe that
    carries nothing: end of file means the supervisor is gone, and the
    worker drains and stops.
    """

    def __init__(self, stopping: StopOnSignals) -> None:
        self._stopping = stopping

    def fileno(self) -> int:
        """
        Standard input.
        """
        return 0

    def doRead(self) -> Failure | None:
        """
        End of file (or an error): stop.
        """
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return Failure(ConnectionDone("the supervisor is gone"))
        return None

    def connectionLost(self, reason: Failure) -> None:
        """
        Removed from the reactor: the supervisor is gone (or the reactor is
        stopping anyway).
        """
        self._stopping.stop()

    def logPrefix(self) -> str:
        """
        Name it in the log.
        """
        return "SupervisorWatch"


if __name__ == "__main__":
    main(sys.argv[1:])
