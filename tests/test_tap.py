"""
Tests for L{tunnel.tap}: the command line and the service it makes.
"""

from __future__ import annotations

from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tunnel.server import ConnectProxyFactory
from tunnel.tap import DEFAULT_LISTEN, Options, makeFactory, makeService


def parse(*argv: str) -> Options:
    """
    Parse C{argv} as twistd would.
    """
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    """
    Tests for L{Options}.
    """

    def test_defaults(self) -> None:
        """
        With no options the proxy listens on loopback port 8080 with the
        documented limits and timeouts.
        """
        options = parse()
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(DEFAULT_LISTEN, "tcp:8080:interface=127.0.0.1")
        factory = makeFactory(options, MemoryReactorClock())
        self.assertEqual(factory.headerTimeout, 10)
        self.assertEqual(factory.connectTimeout, 15)
        self.assertEqual(factory.idleTimeout, 600)
        self.assertEqual(factory.maxRequestLine, 8192)
        self.assertEqual(factory.maxHeaderSize, 65536)

    def test_values(self) -> None:
        """
        Every option reaches the factory; C{--listen} may be repeated.
        """
        options = parse(
            "--listen",
            "tcp:1",
            "--listen",
            "unix:/tmp/p.sock",
            "--header-timeout",
            "2.5",
            "--connect-timeout",
            "3",
            "--idle-timeout",
            "0",
            "--max-request-line",
            "1024",
            "--max-header-size",
            "4096",
        )
        self.assertEqual(options["listen"], ["tcp:1", "unix:/tmp/p.sock"])
        factory = makeFactory(options, MemoryReactorClock())
        self.assertEqual(factory.headerTimeout, 2.5)
        self.assertEqual(factory.connectTimeout, 3)
        self.assertIsNone(factory.idleTimeout)
        self.assertEqual(factory.maxRequestLine, 1024)
        self.assertEqual(factory.maxHeaderSize, 4096)

    def test_badNumbers(self) -> None:
        """
        Values that are not numbers, or out of range, are usage errors.
        """
        for argv in [
            ("--header-timeout", "soon"),
            ("--header-timeout", "0"),
            ("--idle-timeout", "-1"),
            ("--max-request-line", "10"),
            ("--max-header-size", str(1 << 30)),
        ]:
            self.assertRaises(UsageError, parse, *argv)

    def test_requestLineWithinHead(self) -> None:
        """
        The request line limit cannot exceed the head limit.
        """
        self.assertRaises(
            UsageError,
            parse,
            "--max-request-line",
            "9000",
            "--max-header-size",
            "8192",
        )

    def test_help(self) -> None:
        """
        The help text names every option and the default listener.
        """
        text = str(Options())
        for name in ["--listen", "--header-timeout", "--idle-timeout"]:
            self.assertIn(name, text)
        self.assertIn(DEFAULT_LISTEN, text)


class MakeServiceTests(SynchronousTestCase):
    """
    Tests for L{makeService}.
    """

    def test_listeners(self) -> None:
        """
        Each C{--listen} becomes a listener of one shared proxy factory,
        started and stopped with the service.
        """
        reactor = MemoryReactorClock()
        service = makeService(
            parse(
                "--listen",
                "tcp:8081:interface=127.0.0.1",
                "--listen",
                "tcp6:8082:interface=\\:\\:1",
            ),
            reactor,
        )
        self.assertTrue(IServiceCollection.providedBy(service))
        service.startService()
        self.addCleanup(service.stopService)
        ports = [(port, interface) for port, _, _, interface in reactor.tcpServers]
        self.assertEqual(ports, [(8081, "127.0.0.1"), (8082, "::1")])
        factories = {factory for _, factory, _, _ in reactor.tcpServers}
        self.assertEqual(len(factories), 1)
        self.assertIsInstance(factories.pop(), ConnectProxyFactory)

    def test_bindFailureIsFatal(self) -> None:
        """
        A listener that cannot bind makes start-up fail instead of running
        with fewer listeners than configured.
        """
        from twisted.internet.error import CannotListenError

        class RefusingReactor(MemoryReactorClock):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise CannotListenError(interface, port, OSError("in use"))

        service = makeService(parse(), RefusingReactor())
        self.assertRaises(CannotListenError, service.startService)
