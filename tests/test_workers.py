"""
Tests for C{--workers}: worker processes sharing the listening sockets.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from zope.interface import provider

from tests.test_workermetrics import sample, tunnelsCounted
from tunnel.tap import Options, makeService
from tunnel.workers import (
    WorkerSupervisor,
    _WorkerProtocol,
    adoptListeningSocket,
    formatWorkerRecord,
    parseInheritedDescriptors,
    workerArguments,
)


def keepSignalHandlers(case: TestCase) -> None:
    """
    Put back, when C{case} ends, the SIGINT and SIGTERM handlers a service
    made on the running reactor installs (L{tunnel.service.StopOnSignals}),
    so that they do not pile up from test to test.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        case.addCleanup(signal.signal, signum, signal.getsignal(signum))


class WorkerArgumentsTests(SynchronousTestCase):
    """
    Tests for L{workerArguments} and L{parseInheritedDescriptors}.
    """

    def test_mainOnlyRemoved(self) -> None:
        """
        Workers get every option but the listeners, the worker count and
        the metrics endpoint, in either spelling.
        """
        self.assertEqual(
            workerArguments(
                [
                    "--workers",
                    "2",
                    "--listen=tcp:1",
                    "--allow-port",
                    "22",
                    "--listen",
                    "tcp:2",
                    "--metrics",
                    "tcp:9100",
                    "--auth",
                    "memory:a:b",
                ]
            ),
            ["--allow-port", "22", "--auth", "memory:a:b"],
        )
        # getopt accepts unambiguous prefixes; they are the same options.
        self.assertEqual(
            workerArguments(["--work", "2", "--lis=tcp:1", "--allow-port", "22"]),
            ["--allow-port", "22"],
        )

    def test_openProxyWarning(self) -> None:
        """
        The supervisor warns of an open proxy as a single process would: a
        rules file without C{allow-from} does not silence it.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import LogLevel, globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        rules = self.mktemp()
        with open(rules, "w") as f:
            f.write("allow-port 22\n")
        options = Options()
        options.parseOptions(["--workers", "2", "--listen", "tcp:0", "--rules", rules])
        makeService(options, MemoryReactorClock())
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)

    def test_keptFiles(self) -> None:
        """
        A worker given the supervisor's copies (C{--kept-file}) starts even
        though its rules and htpasswd files are broken, with the copies'
        rules and users; without them, the broken files stop its start.  A
        C{--kept-file} that is not a readable descriptor is a usage error.
        """
        from tests.test_auth import bcryptLine
        from tunnel.htpasswd import HtpasswdChecker
        from tunnel.tap import makePolicy
        from tunnel.workers import keptFileDescriptor

        rules, users = self.mktemp(), self.mktemp()
        for path in [rules, users]:
            with open(path, "w") as f:
                f.write("broken\n")
        arguments = [
            *("--listen", "tcp:0:interface=127.0.0.1"),
            *("--rules", rules, "--auth", f"htpasswd:{users}"),
        ]
        self.assertRaises(UsageError, Options().parseOptions, arguments)
        goodUsers = bcryptLine(b"alice", b"pw")
        keptRules = keptFileDescriptor(rules, b"allow-port 8080\n")
        keptUsers = keptFileDescriptor(users, goodUsers)
        options = Options()
        options.parseOptions(
            ["--kept-file", str(keptRules), "--kept-file", str(keptUsers), *arguments]
        )
        self.assertIsNone(
            makePolicy(options, Clock()).checkTarget(None, None, "h", 8080)
        )
        [checker] = options["credCheckers"]
        assert isinstance(checker, HtpasswdChecker)
        self.assertEqual(checker.content, goodUsers)
        notAFile, writeEnd = os.pipe()
        os.close(writeEnd)
        for value in ["x", str(notAFile)]:
            e = self.assertRaises(
                UsageError, Options().parseOptions, ["--kept-file", value]
            )
            self.assertIn(f"--kept-file {value}: ", str(e))

    def test_parseInheritedDescriptors(self) -> None:
        """
        C{FD:FAMILY} values parse to descriptors and address families.
        """
        import socket

        self.assertEqual(
            parseInheritedDescriptors(["5:2", "6:10"]),
            [(5, socket.AF_INET), (6, socket.AF_INET6)],
        )

    def test_options(self) -> None:
        """
        C{--workers} makes a supervisor, which starts the workers where
        twistd started; a TLS listener cannot be shared.
        """
        options = Options()
        options.parseOptions(["--workers", "3", "--listen", "tcp:0"])
        supervisor = makeService(options, MemoryReactorClock())
        self.assertIsInstance(supervisor, WorkerSupervisor)
        # Where twistd started: -d changes directory later.
        self.assertEqual(supervisor._directory, os.getcwd())  # type: ignore[attr-defined]
        # A worker adopting a TLS listener's socket would serve it in clear.
        e = self.assertRaises(
            UsageError,
            Options().parseOptions,
            ["--workers", "2", "--listen", "ssl:8443:privateKey=k.pem"],
        )
        self.assertIn("without TLS", str(e))
        # Nor can a systemd socket, for a reason of its own.
        e = self.assertRaises(
            UsageError,
            Options().parseOptions,
            ["--workers", "2", "--listen", "systemd:domain=INET:index=0"],
        )
        self.assertIn("not systemd:domain=INET:index=0", str(e))
        self.assertNotIn("TLS", str(e))


class _FakeProcess:
    """
    What L{_SpawningClock.spawnProcess} gives: a pid and the signals sent.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class _SpawningClock(Clock):
    """
    A clock that also spawns (fake) processes, failing while C{failing}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []
        self.keptFiles: list[list[bytes]] = []
        self.childFDs: list[dict[int, Any]] = []
        self.directories: list[str | None] = []
        self.failing = False

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> _FakeProcess:
        if self.failing:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.spawned.append(protocol)
        argv = args[1]
        # What each --kept-file descriptor holds, while it is still open.
        self.keptFiles.append(
            [
                os.pread(int(argv[i + 1]), 1 << 20, 0)
                for i, argument in enumerate(argv)
                if argument == "--kept-file"
            ]
        )
        self.childFDs.append(kwargs["childFDs"])
        self.directories.append(kwargs.get("path"))
        return _FakeProcess(len(self.spawned))

    def callFromThread(self, f: Any, *args: Any) -> None:
        """
        Call at once (as the reactor would soon).
        """
        f(*args)


class RespawnTests(SynchronousTestCase):
    """
    How the supervisor replaces workers, without real processes.
    """

    def setUp(self) -> None:
        self.clock = _SpawningClock()
        self.supervisor = WorkerSupervisor(self.clock, [], [], 2, stopTimeout=5)
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)

    def end(self, number: int) -> None:
        """
        Worker C{number} exits.
        """
        self.supervisor._protocols[number].processEnded(
            Failure(ProcessTerminated(exitCode=1))
        )

    def test_backOffWhileFailingAtStart(self) -> None:
        """
        A worker that keeps ending soon after it starts is replaced after
        1, then 2, 4, 8... seconds, up to a minute, not every second; once
        one has run a while, the next is replaced after a second again.
        """
        delays = []
        for _ in range(8):
            self.end(0)
            self.assertNotIn(0, self.supervisor.workers)
            started = self.clock.seconds()
            for _ in range(120):
                if 0 in self.supervisor.workers:
                    break
                self.clock.advance(1)
            self.assertIn(0, self.supervisor.workers)
            delays.append(self.clock.seconds() - started)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60])
        self.clock.advance(10)
        self.end(0)
        self.clock.advance(1)
        self.assertIn(0, self.supervisor.workers)
        self.assertIn(1, self.supervisor.workers)

    def test_endingsWhileStopping(self) -> None:
        """
        While the supervisor stops, each worker's end is logged: a worker
        that drained and exited as an info, one killed after the drain
        timeout as a warning that says so; neither is replaced.
        """
        from twisted.internet.error import ProcessDone
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        self.supervisor.stopService()
        self.clock.advance(5)
        self.assertEqual(
            [p.signals for p in self.supervisor.workers.values()],
            [[signal.SIGTERM, signal.SIGKILL]] * 2,
        )
        self.supervisor._protocols[0].processEnded(Failure(ProcessDone(0)))
        self.supervisor._protocols[1].processEnded(
            Failure(ProcessTerminated(signal=signal.SIGKILL))
        )
        logged = [
            (e["log_level"], formatEvent(e))
            for e in events
            if formatEvent(e).startswith("Worker ")
        ]
        self.assertEqual(logged[0], (LogLevel.info, "Worker 0 drained and exited"))
        self.assertEqual(logged[1][0], LogLevel.warn)
        self.assertIn("Worker 1 ended while stopping", logged[1][1])
        self.assertIn("signal 9", logged[1][1])
        self.clock.advance(60)
        self.assertEqual(self.supervisor.workers, {})

    def test_directory(self) -> None:
        """
        Workers start in the directory the supervisor is given (where twistd
        started, before its C{-d}), so that they read their options'
        relative paths as the main process did; by default in this
        process's.
        """
        supervisor = WorkerSupervisor(
            self.clock, [], [], 1, stopTimeout=5, directory="/srv/proxy"
        )
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        self.assertEqual(self.clock.directories, [None, None, "/srv/proxy"])

    def test_usr1HandledWhileDraining(self) -> None:
        """
        SIGUSR1 stays the supervisor's while the workers drain, passed on to
        them, and the handler from before comes back only once they have
        all ended: before, with twistd logging to standard output (no
        handler of its own), a logrotate's SIGUSR1 during the drain ended
        the main process.
        """
        before = self.supervisor._previousUSR1
        self.assertEqual(signal.getsignal(signal.SIGUSR1), self.supervisor._onUSR1)
        for protocol in self.supervisor._protocols.values():
            protocol.childDataReceived(
                1,
                formatWorkerRecord(
                    {
                        "log_level": LogLevel.info,
                        "log_namespace": "x",
                        "log_format": "up",
                    }
                ).encode(),
            )
        stopped = self.supervisor.stopService()
        self.assertEqual(signal.getsignal(signal.SIGUSR1), self.supervisor._onUSR1)
        self.supervisor._onUSR1(signal.SIGUSR1, None)
        self.assertEqual(
            [p.signals for p in self.supervisor.workers.values()],
            [[signal.SIGTERM, signal.SIGUSR1]] * 2,
        )
        self.supervisor._protocols[0].processEnded(Failure(ProcessTerminated(0)))
        self.assertEqual(signal.getsignal(signal.SIGUSR1), self.supervisor._onUSR1)
        self.supervisor._protocols[1].processEnded(Failure(ProcessTerminated(0)))
        self.successResultOf(stopped)
        self.assertEqual(signal.getsignal(signal.SIGUSR1), before)
        self.assertNotEqual(before, self.supervisor._onUSR1)

    def test_usr1OnlyToReadyWorkers(self) -> None:
        """
        SIGUSR1 goes only to workers that have logged a record, that is,
        that ignore it by now: before that, its default action would kill a
        worker still starting (worker 1 gets the one held back from it when
        it logs, then the next; worker 0 never logs and gets none).  SIGTERM
        goes to every worker.
        """
        # Whatever handler was there before is not this test's business
        # (but is put back when the supervisor stops).
        previous, self.supervisor._previousUSR1 = self.supervisor._previousUSR1, None
        self.supervisor._onUSR1(signal.SIGUSR1, None)
        self.supervisor._previousUSR1 = previous
        self.supervisor._protocols[1].childDataReceived(
            1,
            formatWorkerRecord(
                {"log_level": LogLevel.info, "log_namespace": "x", "log_format": "up"}
            ).encode(),
        )
        self.supervisor.signalWorkers(signal.SIGUSR1, readyOnly=True)
        self.supervisor.signalWorkers(signal.SIGTERM)
        self.assertEqual(
            [process.signals for process in self.supervisor.workers.values()],
            [[signal.SIGTERM], [signal.SIGUSR1, signal.SIGUSR1, signal.SIGTERM]],
        )

    def test_usr1HeldUntilReady(self) -> None:
        """
        A SIGUSR1 held back from a worker that was not ready yet is sent to
        it, once, as soon as it logs its first record: a worker starting
        while logrotate runs must not go on writing to the rotated log.
        """
        self.supervisor.signalWorkers(signal.SIGUSR1, readyOnly=True)
        self.assertEqual(
            [process.signals for process in self.supervisor.workers.values()],
            [[], []],
        )
        record = formatWorkerRecord(
            {"log_level": LogLevel.info, "log_namespace": "x", "log_format": "up"}
        ).encode()
        self.supervisor._protocols[1].childDataReceived(1, record)
        self.supervisor._protocols[1].childDataReceived(1, record)
        self.assertEqual(
            [process.signals for process in self.supervisor.workers.values()],
            [[], [signal.SIGUSR1]],
        )
        self.supervisor._protocols[0].childDataReceived(1, record)
        self.assertEqual(
            [process.signals for process in self.supervisor.workers.values()],
            [[signal.SIGUSR1], [signal.SIGUSR1]],
        )

    def test_heldSignalNotSentAtEnd(self) -> None:
        """
        A worker that ends with its first record unfinished is not sent the
        signal held back from it when that record is passed on at its end:
        the process is gone (signalling it would fail, and log a
        traceback).
        """
        self.supervisor.signalWorkers(signal.SIGUSR1, readyOnly=True)
        process = self.supervisor.workers[0]
        record = formatWorkerRecord(
            {"log_level": LogLevel.info, "log_namespace": "x", "log_format": "up"}
        ).encode()
        protocol = self.supervisor._protocols[0]
        # The record without its end: the worker died writing it.
        protocol.childDataReceived(1, record[: record.index(b"\x1e")])
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertEqual(process.signals, [])

    def test_spawnFailureRetried(self) -> None:
        """
        A replacement that cannot be started (fork failing for a while) is
        tried again later, so the proxy does not stay a worker short.
        """
        self.clock.advance(20)
        self.end(0)
        self.clock.failing = True
        self.clock.advance(1)
        self.assertNotIn(0, self.supervisor.workers)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.clock.failing = False
        self.clock.advance(2)
        self.assertIn(0, self.supervisor.workers)
        self.assertEqual(len(self.clock.spawned), 3)


class _KeptFile:
    """
    A L{tunnel.workers.KeptFile} whose content changes at each refresh,
    or which fails to refresh while C{failing}.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.content = b"version 0"
        self.failing = False

    def refresh(self) -> None:
        if self.failing:
            raise RuntimeError("cannot look")
        self.content = b"version %d" % (int(self.content.split()[1]) + 1,)


class KeptFilesTests(SynchronousTestCase):
    """
    The supervisor's last good copies of the rules and htpasswd files, for
    the workers it starts.
    """

    def setUp(self) -> None:
        self.clock = _SpawningClock()
        self.rules = _KeptFile("/etc/tunnel/rules")
        self.users = _KeptFile("/etc/tunnel/htpasswd")
        self.supervisor = WorkerSupervisor(
            self.clock, [], [], 1, stopTimeout=5, keptFiles=[self.rules, self.users]
        )

    def test_givenToEachWorker(self) -> None:
        """
        Each worker is given, before its own options, one C{--kept-file}
        descriptor per file, holding the file's path and its content when
        the worker started; the supervisor closes its copies.
        """
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)
        self.assertEqual(len(self.clock.keptFiles), 1)
        fds = [fd for fd in self.clock.childFDs[0] if fd > 2]
        self.assertEqual(len(fds), 2)
        for fd in fds:
            self.assertRaises(OSError, os.fstat, fd)
        # A replacement (due at 21.5 s) gets the versions of its start.
        self.clock.advance(20.5)
        self.supervisor._protocols[0].processEnded(
            Failure(ProcessTerminated(exitCode=1))
        )
        self.clock.advance(1)
        self.assertEqual(self.rules.content, b"version 2")
        self.assertEqual(
            self.clock.keptFiles,
            [
                [b"/etc/tunnel/rules\0version 0", b"/etc/tunnel/htpasswd\0version 0"],
                [b"/etc/tunnel/rules\0version 2", b"/etc/tunnel/htpasswd\0version 2"],
            ],
        )

    def test_lookedAtEverySecond(self) -> None:
        """
        The files are looked at every second while the supervisor runs; a
        look that fails is logged and the others go on; stopping ends the
        looks.
        """
        self.supervisor.startService()
        self.clock.advance(1)
        self.assertEqual(self.rules.content, b"version 1")
        self.rules.failing = True
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.users.content, b"version 2")
        self.supervisor.stopService()
        self.clock.advance(5)
        self.assertEqual(self.users.content, b"version 2")

    def test_roundTrip(self) -> None:
        """
        L{readKeptFile} gives back the path and content
        L{keptFileDescriptor} wrote, and closes the descriptor, whether
        the anonymous file is in memory (C{memfd_create}) or a temporary
        file; a descriptor that holds no path is refused.
        """
        from tunnel import workers

        content = b"alice:$2y$\0\n" * 1000
        for memfd in [True, False]:
            if not memfd:
                self.patch(os, "memfd_create", None)
            fd = workers.keptFileDescriptor("/\u00e9/rules", content)
            self.assertEqual(workers.readKeptFile(fd), ("/\u00e9/rules", content))
            self.assertRaises(OSError, os.fstat, fd)
        fd = workers.keptFileDescriptor("", b"rules")
        self.assertRaises(ValueError, workers.readKeptFile, fd)
        self.assertRaises(OSError, os.fstat, fd)


class FirstSpawnTests(SynchronousTestCase):
    """
    Workers that cannot be started when the supervisor starts.
    """

    def test_firstSpawnFailureRetried(self) -> None:
        """
        A worker that cannot be started with the supervisor (its
        interpreter not executable by the C{-u} user, say) does not make
        C{startService} raise: the failure is logged, the other workers
        start, and it is tried again later, less and less often.
        """
        clock = _SpawningClock()
        clock.failing = True
        supervisor = WorkerSupervisor(clock, [], [], 2, stopTimeout=5)
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        self.assertEqual(supervisor.workers, {})
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
        clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
        clock.failing = False
        clock.advance(1)
        self.assertEqual(supervisor.workers, {})
        clock.advance(1)
        self.assertEqual(sorted(supervisor.workers), [0, 1])


class WorkerLogTests(SynchronousTestCase):
    """
    A worker's log events reach the main process's log with their level and
    their traceback.
    """

    def setUp(self) -> None:
        self.events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_namespace", "").startswith("tunnel.workers."):
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.ended: list[int] = []
        self.metrics: list[str] = []
        supervisor = cast(WorkerSupervisor, self)
        self.protocol = _WorkerProtocol(supervisor, 3)

    def workerEnded(self, protocol: Any, reason: Failure) -> None:
        """
        Stand in for the supervisor.
        """
        self.ended.append(protocol.number)

    def workerMetrics(self, number: int, snapshot: str) -> None:
        """
        Stand in for the supervisor.
        """
        self.metrics.append(snapshot)

    def test_levelsAndTracebacks(self) -> None:
        """
        Records cut anywhere between reads are put together again; each is
        logged at the worker's level, with its namespace, and a failure's
        traceback; what comes on standard error is passed on as warnings,
        line by line.
        """
        try:
            int("not a number")
        except ValueError:
            failure = Failure()
        output = (
            formatWorkerRecord(
                {
                    "log_level": LogLevel.info,
                    "log_namespace": "tunnel.server",
                    "log_format": "a {what}",
                    "what": "line",
                }
            )
            + formatWorkerRecord(
                {
                    "log_level": LogLevel.critical,
                    "log_namespace": "twisted.internet.base",
                    "log_format": "while calling from thread",
                    "log_failure": failure,
                }
            )
        ).encode()
        for index in range(0, len(output), 7):
            self.protocol.childDataReceived(1, output[index : index + 7])
        self.protocol.childDataReceived(2, b"Traceback (most recent call last):\n  F")
        self.protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        texts = [(e["log_level"], formatEvent(e)) for e in self.events]
        self.assertEqual(texts[0], (LogLevel.info, "worker 3: [tunnel.server] a line"))
        level, text = texts[1]
        self.assertEqual(level, LogLevel.critical)
        self.assertTrue(
            text.startswith(
                "worker 3: [twisted.internet.base] while calling from thread\n"
                "Traceback (most recent call last):\n"
            ),
            text,
        )
        self.assertIn("ValueError: invalid literal", text)
        self.assertEqual(
            texts[2:],
            [
                (LogLevel.warn, "worker 3: [-] Traceback (most recent call last):"),
                (LogLevel.warn, "worker 3: [-]   F"),
            ],
        )
        self.assertEqual(self.ended, [3])

    def test_legacySystem(self) -> None:
        """
        An event from Twisted's legacy C{log.msg} is shown with its system
        (as twistd's log shows it in a single process), not the namespace
        C{log_legacy} every such event has.
        """
        self.protocol.childDataReceived(
            1,
            formatWorkerRecord(
                {
                    "log_level": LogLevel.info,
                    "log_namespace": "log_legacy",
                    "log_system": "ConnectProxyFactory,7,127.0.0.1",
                    "log_format": "legacy",
                }
            ).encode(),
        )
        self.assertEqual(
            [formatEvent(e) for e in self.events],
            ["worker 3: [ConnectProxyFactory,7,127.0.0.1] legacy"],
        )

    def test_separatorInText(self) -> None:
        """
        A record separator inside a worker's log text (from anything a
        client could get into a message) stays text: it cannot end the
        record and start a forged log line or metrics record.
        """
        forged = "\x1emetrics\t-\t[]\x1e\ncritical\ttunnel\tforged"
        self.protocol.childDataReceived(
            1,
            formatWorkerRecord(
                {
                    "log_level": LogLevel.info,
                    "log_namespace": "tunnel.server",
                    "log_format": "{peer}",
                    "peer": forged,
                }
            ).encode(),
        )
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["text"], forged.replace("\x1e", "\\x1e"))
        self.assertEqual(self.metrics, [])

    def test_controlsInSource(self) -> None:
        """
        A legacy event's system (Twisted's log prefix of a connection, which
        holds a UNIX client's own name for its socket) has its control
        characters escaped: a tab, a line break or a record separator in it
        can start no forged record.
        """
        forged = "ConnectProxy,0,q\x1ecritical\tFORGED\tforged\x1e\n"
        self.protocol.childDataReceived(
            1,
            formatWorkerRecord(
                {
                    "log_level": LogLevel.info,
                    "log_namespace": "log_legacy",
                    "log_system": forged,
                    "log_format": "a line",
                }
            ).encode(),
        )
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            event["workerNamespace"],
            "ConnectProxy,0,q\\x1ecritical\\x09FORGED\\x09forged\\x1e\\x0a",
        )
        self.assertEqual(event["text"], "a line")

    def test_unstructured(self) -> None:
        """
        Output on standard output that is not a record (a stray print) is
        passed on as a warning, not lost.
        """
        self.protocol.childDataReceived(1, b"stray\x1e\n")
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in self.events],
            [(LogLevel.warn, "worker 3: [-] stray")],
        )


class _Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.answer: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.answer.called:
            self.answer.callback(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


#: Two workers on a TCP port of loopback that may tunnel to loopback.
TWO_TCP_WORKERS = (
    "--workers",
    "2",
    "--listen",
    "tcp:0:interface=127.0.0.1",
    "--allow-port",
    "any",
    "--allow-to",
    "127.0.0.0/8",
)


class SupervisorTests(TestCase):
    """
    Real worker processes on loopback.
    """

    timeout = 60

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        self.waiting: list[tuple[str, Deferred[None]]] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            self.events.append(event)
            text = event.get("log_format") or ""
            for waiter in list(self.waiting):
                if waiter[0] in text or waiter[0] in str(event.get("text", "")):
                    self.waiting.remove(waiter)
                    waiter[1].callback(None)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def waitForLog(self, text: str) -> Deferred[None]:
        """
        Fire when a log event whose format or worker line holds C{text}
        arrives.
        """
        d: Deferred[None] = Deferred()
        self.waiting.append((text, d))
        return d

    @inlineCallbacks
    def connectThrough(self, port: int, targetPort: int) -> Any:
        """
        Ask the proxy for a tunnel to the target; give the response head.
        """
        client = _Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(  # type: ignore[union-attr]
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: h\r\n\r\n" % (targetPort,)
        )
        answer = yield client.answer
        client.transport.loseConnection()  # type: ignore[union-attr]
        yield client.lost
        return answer

    def startTarget(self) -> int:
        """
        Listen on loopback for tunnels to reach; give the port.
        """
        targetFactory: ServerFactory = ServerFactory()
        targetFactory.protocol = Protocol
        target = reactor.listenTCP(0, targetFactory, interface="127.0.0.1")
        self.addCleanup(target.stopListening)
        return target.getHost().port  # type: ignore[attr-defined,no-any-return]

    def startSupervisor(self, *argv: str) -> Deferred[WorkerSupervisor]:
        """
        Start a supervisor with the C{connect-proxy} options C{argv}; fire
        with it once every worker is accepting.
        """
        options = Options()
        options.parseOptions(list(argv))
        keepSignalHandlers(self)
        supervisor = makeService(options, reactor)
        assert isinstance(supervisor, WorkerSupervisor)
        ready = [self.waitForLog("Starting factory") for _ in range(options["workers"])]
        supervisor.startService()
        return gatherResults(ready).addCallback(lambda _: supervisor)

    def startTCPSupervisor(self) -> Deferred[WorkerSupervisor]:
        """
        Start two workers on a TCP port of loopback that may tunnel to
        loopback.
        """
        return self.startSupervisor(*TWO_TCP_WORKERS)

    @inlineCallbacks
    def test_workersServeAndAreReplaced(self) -> Any:
        """
        Two workers accept on the shared socket; a worker that dies is
        replaced and the proxy keeps serving; stopping drains the workers
        and closes the socket.
        """
        targetPort = self.startTarget()
        supervisor = yield self.startTCPSupervisor()
        port = supervisor._ports[0][0].getHost().port
        self.assertEqual(len(supervisor.workers), 2)
        answer = yield self.connectThrough(port, targetPort)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

        replaced = self.waitForLog("replacing it")
        restarted = self.waitForLog("Started worker")
        supervisor.workers[0].signalProcess(signal.SIGKILL)
        yield replaced
        yield restarted
        self.assertEqual(len(supervisor.workers), 2)
        for _ in range(4):
            answer = yield self.connectThrough(port, targetPort)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

        yield supervisor.stopService()
        self.assertEqual(supervisor.workers, {})
        from twisted.internet.error import ConnectionRefusedError

        yield self.assertFailure(
            connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Client()),
            ConnectionRefusedError,
        )

    @inlineCallbacks
    def test_totals(self) -> Any:
        """
        The main process serves the sum of both workers' counts: after four
        tunnels through two workers, C{/metrics} shows four, and two
        workers reporting.
        """
        targetPort = self.startTarget()
        options = Options()
        options.parseOptions(
            [*TWO_TCP_WORKERS, "--metrics", "tcp:0:interface=127.0.0.1"]
        )
        keepSignalHandlers(self)
        service: Any = makeService(options, reactor)
        [listener, supervisor] = list(service)
        ready = [self.waitForLog("Starting factory") for _ in range(2)]
        service.startService()
        self.addCleanup(service.stopService)
        yield gatherResults(ready)
        port = supervisor._ports[0][0].getHost().port
        for _ in range(4):
            answer = yield self.connectThrough(port, targetPort)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        # Each worker reports once it starts, then within a second of a
        # change: wait until the main process has both workers' reports
        # and has counted all four tunnels (the kernel may have given them
        # all to one worker, whose reports can come before the other's
        # first).
        counted: Deferred[None] = Deferred()
        metrics = supervisor._metrics
        report = metrics.report

        def allCounted() -> bool:
            return (
                tunnelsCounted(metrics) == 4
                and sample(metrics, "tunnel_workers_reporting") == 2
            )

        def reportAndCheck(worker: int, snapshot: str) -> None:
            report(worker, snapshot)
            if allCounted() and not counted.called:
                counted.callback(None)

        metrics.report = reportAndCheck
        if not allCounted():
            yield counted
        metricsPort = listener._waitingForPort.result.getHost().port
        url = f"http://127.0.0.1:{metricsPort}/metrics".encode()
        response = yield Agent(reactor).request(b"GET", url)
        body = yield readBody(response)
        self.assertIn(
            b'tunnel_connections_total{ended="client-eof",status="200"} 4.0', body
        )
        self.assertIn(b"tunnel_workers_reporting 2.0", body)

    @inlineCallbacks
    def test_sharedUNIXSocket(self) -> Any:
        """
        Workers sharing a UNIX listener keep the mode of its endpoint string
        (Twisted's port would make it 0666), and a worker that stops does not
        remove the socket's path: its replacement and the other worker go
        on serving on it.
        """
        path = self.mktemp()
        supervisor = yield self.startSupervisor(
            "--workers",
            "2",
            "--listen",
            f"unix:{path}:mode=600",
        )
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        replaced = self.waitForLog("Started worker")
        supervisor.workers[0].signalProcess(signal.SIGTERM)
        yield replaced
        yield self.waitForLog("Starting factory")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        for _ in range(4):
            client = _Client()
            yield connectProtocol(UNIXClientEndpoint(reactor, path), client)
            client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # type: ignore[union-attr]
            answer = yield client.answer
            self.assertTrue(answer.startswith(b"HTTP/1.1 405 "), answer)
            yield client.lost
        yield supervisor.stopService()
        self.assertFalse(os.path.exists(path))

    @inlineCallbacks
    def test_sharedUNIXPortLeavesTheSocketAlone(self) -> Any:
        """
        A worker's copy of a UNIX listening socket changes nothing of it:
        no chmod (which fails for a worker that C{-u} made another user
        than the socket's owner), and stopping it neither removes the path
        nor stops the listening for the others.
        """
        path = self.mktemp()
        owner = cast(Any, reactor).listenUNIX(
            path, ServerFactory.forProtocol(Protocol), mode=0o600
        )
        self.addCleanup(owner.stopListening)

        def notTheOwner(*args: object) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        self.patch(os, "chmod", notTheOwner)
        port = adoptListeningSocket(
            reactor,
            owner.fileno(),
            socket.AF_UNIX,
            ServerFactory.forProtocol(Protocol),
        )
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        yield port.stopListening()
        self.assertTrue(os.path.exists(path))
        client = _Client()
        yield connectProtocol(UNIXClientEndpoint(reactor, path), client)
        client.transport.loseConnection()  # type: ignore[union-attr]
        yield client.lost

    @inlineCallbacks
    def test_sharedUNIXPortKeepsTheBacklog(self) -> Any:
        """
        A worker's copy of a UNIX listening socket leaves its queue as the
        supervisor set it: with a backlog of 1, a third connection waiting
        to be accepted is refused, as it would be before the adoption
        (Twisted's own adoption would listen again with a backlog of 50).
        """
        path = self.mktemp()
        owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(owner.close)
        owner.bind(path)
        owner.listen(1)
        port = adoptListeningSocket(
            reactor, owner.fileno(), socket.AF_UNIX, ServerFactory.forProtocol(Protocol)
        )
        # Nothing is accepted: the reactor does not run until the yield.
        clients = []
        for _ in range(60):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(client.close)
            client.setblocking(False)
            try:
                client.connect(path)
            except BlockingIOError:
                break
            clients.append(client)
        yield port.stopListening()
        self.assertEqual(len(clients), 2)

    @inlineCallbacks
    def test_replacedWhileRulesBroken(self) -> Any:
        """
        A worker replaced while an edit has left the rules file broken
        starts with the last good rules, as the running workers keep them:
        the version the supervisor last read, not the one of its own start.
        """
        targetPort = self.startTarget()
        rules = self.mktemp()
        with open(rules, "w") as f:
            f.write("allow-to 127.0.0.0/8\n")
        supervisor = yield self.startSupervisor(
            "--workers",
            "2",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--allow-port",
            "any",
            "--rules",
            rules,
        )
        self.addCleanup(supervisor.stopService)
        port = supervisor._ports[0][0].getHost().port
        answer = yield self.connectThrough(port, targetPort)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

        # The format, not a worker's line (which holds the path itself):
        # the supervisor has read the new version.
        reloaded = self.waitForLog("Reloaded the rules from {path}")
        with open(rules, "w") as f:
            f.write("allow-to 127.0.0.0/8\ndeny-to 127.0.0.1\n")
        yield reloaded
        with open(rules, "w") as f:
            f.write("allow-to 127.0.0.0/8\ndeny-to 127.0.0.1\nallow-to bogus:::\n")
        ready = self.waitForLog("Starting factory")
        before = len(self.events)
        for process in list(supervisor.workers.values()):
            process.signalProcess(signal.SIGKILL)
        yield ready
        # (One event fires every waiter it matches: one at a time.)
        yield self.waitForLog("Starting factory")
        answer = yield self.connectThrough(port, targetPort)
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
        kept = [
            event
            for event in self.events[before:]
            if "Using the last good rules the supervisor kept"
            in str(event.get("text", ""))
        ]
        self.assertEqual(len(kept), 2)

    @inlineCallbacks
    def test_workerLeavesWithItsSupervisor(self) -> Any:
        """
        A worker whose supervisor is gone (its standard input, a pipe from
        the supervisor, ends) stops, instead of holding the port alone.
        """
        supervisor = yield self.startSupervisor(
            "--workers", "2", "--listen", "tcp:0:interface=127.0.0.1"
        )
        ended = self.waitForLog("ended")
        supervisor.workers[0].closeStdin()
        yield ended
        [event] = [e for e in self.events if "ended" in (e.get("log_format") or "")]
        self.assertIn("exit code 0", event["why"])
        yield supervisor.stopService()

    @inlineCallbacks
    def test_stopClosesAtOnce(self) -> Any:
        """
        On stop the shared socket is closed at once, while open tunnels
        drain: new clients are refused, not queued for nobody.  A worker
        that gets SIGTERM twice (from the process group and from the
        supervisor) stops once, without a critical error.
        """
        targetPort = self.startTarget()
        supervisor = yield self.startTCPSupervisor()
        port = supervisor._ports[0][0].getHost().port
        client = _Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(  # type: ignore[union-attr]
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: h\r\n\r\n" % (targetPort,)
        )
        answer = yield client.answer
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        draining = self.waitForLog("Draining")
        supervisor.signalWorkers(signal.SIGTERM)
        stopped = supervisor.stopService()
        yield draining
        from twisted.internet.error import ConnectionRefusedError

        yield self.assertFailure(
            connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Client()),
            ConnectionRefusedError,
        )
        self.assertFalse(stopped.called)
        client.transport.loseConnection()  # type: ignore[union-attr]
        yield client.lost
        yield stopped
        self.assertEqual(
            [e for e in self.events if e["log_level"] == LogLevel.critical], []
        )
