"""
Tests for C{--workers}: worker processes sharing the listening sockets.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from tunnel.tap import Options, makeService
from tunnel.workers import WorkerSupervisor, inheritedPorts, workerArguments


class WorkerArgumentsTests(SynchronousTestCase):
    """
    Tests for L{workerArguments} and L{inheritedPorts}.
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
        makeService(options, reactor)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)

    def test_inheritedPorts(self) -> None:
        """
        C{FD:FAMILY} values parse to descriptors and address families.
        """
        import socket

        self.assertEqual(
            inheritedPorts(["5:2", "6:10"]),
            [(5, socket.AF_INET), (6, socket.AF_INET6)],
        )

    def test_options(self) -> None:
        """
        C{--workers} makes a supervisor; metrics are refused with workers
        (each would count only its own tunnels).
        """
        options = Options()
        options.parseOptions(["--workers", "3", "--listen", "tcp:0"])
        self.assertIsInstance(makeService(options, reactor), WorkerSupervisor)
        self.assertRaises(
            UsageError,
            Options().parseOptions,
            ["--workers", "2", "--metrics", "tcp:9100"],
        )
        # A worker adopting a TLS listener's socket would serve it in clear.
        e = self.assertRaises(
            UsageError,
            Options().parseOptions,
            ["--workers", "2", "--listen", "ssl:8443:privateKey=k.pem"],
        )
        self.assertIn("without TLS", str(e))


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
                if waiter[0] in text or waiter[0] in str(event.get("line", "")):
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

    @inlineCallbacks
    def test_workersServeAndAreReplaced(self) -> Any:
        """
        Two workers accept on the shared socket; a worker that dies is
        replaced and the proxy keeps serving; stopping drains the workers
        and closes the socket.
        """
        targetFactory: ServerFactory = ServerFactory()
        targetFactory.protocol = Protocol
        target = reactor.listenTCP(0, targetFactory, interface="127.0.0.1")
        self.addCleanup(target.stopListening)
        targetPort = target.getHost().port  # type: ignore[attr-defined]
        options = Options()
        options.parseOptions(
            [
                "--workers",
                "2",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--allow-port",
                "any",
                "--allow-to",
                "127.0.0.0/8",
            ]
        )
        supervisor = makeService(options, reactor)
        assert isinstance(supervisor, WorkerSupervisor)
        ready = [
            self.waitForLog("Starting factory"),
            self.waitForLog("Starting factory"),
        ]
        supervisor.startService()
        port = supervisor._ports[0][0].getHost().port  # type: ignore[attr-defined]
        yield gatherResults(ready)
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
