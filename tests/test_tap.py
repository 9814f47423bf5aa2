"""
Tests for L{tunnel.tap}: the command line and the service it makes.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import itertools
import os
import platform
import socket
import sys
import time
from typing import Any, cast

import bcrypt
from twisted.application.service import IServiceCollection
from twisted.cred.credentials import UsernamePassword
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import DescriptorsExhausted
from tests.test_auth import bcryptLine
from tunnel import connector, limits, listeners, tap, upstream
from tunnel.auth import IProxyUser, ProxyUser
from tunnel.connector import HostnameConnector
from tunnel.htpasswd import HtpasswdChecker
from tunnel.listeners import (
    StopInTurn,
    boundBeyondLoopback,
    listensBeyondLoopback,
    withDefaultBacklog,
)
from tunnel.resolver import ThreadedResolver
from tunnel.rules import RulesFilePolicy
from tunnel.server import ConnectProxyFactory
from tunnel.service import ProxyService
from tunnel.tap import DEFAULT_LISTEN, Options, makeFactory, makeService
from tunnel.upstream import UpstreamConnector


def parse(*argv: str) -> Options:
    """
    Parse C{argv} as twistd would, but without trying the listeners'
    addresses (the default, 127.0.0.1:8080, may be in use where the tests
    run; L{BindCheckTests} tries them).
    """
    options = Options()
    check, listeners.checkBindable = listeners.checkBindable, lambda *args: None
    try:
        options.parseOptions(list(argv))
    finally:
        listeners.checkBindable = check
    return options


class BindCheckTests(SynchronousTestCase):
    """
    A listener's address that cannot be bound is a usage error while the
    options are parsed, not a traceback when the listener starts.
    """

    def test_ipv6Zone(self) -> None:
        """
        The check binds the address as Twisted will, zone included: an
        IPv6 link-local address with its zone is not refused for losing it.
        """
        bound: list[object] = []

        class Probe:
            def __init__(self, *args: object) -> None:
                pass

            def __enter__(self) -> Probe:
                return self

            def __exit__(self, *args: object) -> None:
                pass

            def setsockopt(self, *args: object) -> None:
                pass

            def bind(self, address: object) -> None:
                bound.append(address)

        self.patch(socket, "socket", Probe)
        Options().parseOptions(["--listen", "tcp6:8443:interface=fe80\\:\\:1%lo"])
        [address] = bound
        self.assertEqual(address[:2], ("fe80::1", 8443))  # type: ignore[index]
        self.assertNotEqual(address[3], 0)  # type: ignore[index]

    def test_portInUse(self) -> None:
        """
        A TCP port something already listens on is a usage error naming the
        option; a free one is fine.

        The free port stays reserved while it is tried: bound, with
        C{SO_REUSEADDR} as the check's own probe and Twisted's listening
        sockets have it, but not listening.  That lets the probe bind it too,
        while the kernel gives it to no one asking for a free port (port 0),
        as it could if it were closed before the check.
        """
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            self.patch(tap, "requirePrometheus", lambda: None)
            description = f"tcp:{port}:interface=127.0.0.1"
            for option, others in [
                ("--listen", []),
                ("--metrics", ["--listen", "tcp:0:interface=127.0.0.1"]),
            ]:
                e = self.assertRaises(
                    UsageError, Options().parseOptions, [*others, option, description]
                )
                self.assertIn(f"{option} {description}: cannot listen", str(e))
        with socket.socket() as free:
            free.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
            Options().parseOptions(["--listen", f"tcp:{port}:interface=127.0.0.1"])

    def test_unixPathTaken(self) -> None:
        """
        A UNIX socket path that holds a file other than a socket, a socket
        something listens on, or a stale socket (no one listening) that
        Twisted would not clear, is a usage error; a stale socket with a
        stale lock file (left by a proxy that died) is left for Twisted to
        clear.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        regular = os.path.join(directory, "regular")
        with open(regular, "w"):
            pass
        e = self.assertRaises(
            UsageError, Options().parseOptions, ["--listen", f"unix:{regular}"]
        )
        self.assertIn("exists and is not a socket", str(e))
        busy = os.path.join(directory, "busy")
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(busy)
            listening.listen(1)
            e = self.assertRaises(
                UsageError, Options().parseOptions, ["--listen", f"unix:{busy}"]
            )
            self.assertIn("Address already in use", str(e))
        e = self.assertRaises(
            UsageError, Options().parseOptions, ["--listen", f"unix:{busy}"]
        )
        self.assertIn("remove it first", str(e))
        e = self.assertRaises(
            UsageError,
            Options().parseOptions,
            ["--listen", f"unix:{busy}:lockfile=0"],
        )
        self.assertIn("remove it first", str(e))
        # A listener whose queue is full (a wedged earlier instance) is in
        # use too, and the check does not wait for it.
        full = os.path.join(directory, "full")
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(full)
            listening.listen(0)
            waiting = []
            try:
                for _ in range(1000):
                    client = socket.socket(socket.AF_UNIX)
                    waiting.append(client)
                    client.setblocking(False)
                    client.connect(full)
            except BlockingIOError:
                pass
            finally:
                for client in waiting:
                    client.close()
            # (Closed clients leave the queue full until accepted.)
            e = self.assertRaises(
                UsageError, Options().parseOptions, ["--listen", f"unix:{full}"]
            )
            self.assertIn("Address already in use", str(e))
        # A lock naming a process that is gone: Twisted breaks it.
        os.symlink("999999999", busy + ".lock")
        Options().parseOptions(["--listen", f"unix:{busy}"])

    def test_missingDirectory(self) -> None:
        """
        A UNIX socket in a directory that does not exist is a usage error.
        """
        path = os.path.join(self.mktemp(), "proxy.sock")
        e = self.assertRaises(
            UsageError, Options().parseOptions, ["--listen", f"unix:{path}"]
        )
        self.assertIn("no directory", str(e))


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

    def test_relativePathsMadeAbsolute(self) -> None:
        """
        The files the proxy reads again later (rules, htpasswd and C{file:}
        logins, the access log it reopens) are named by absolute paths, as
        are the parent's CA and credentials: twistd's C{-d} changes
        directory once the options are read.
        """
        from twisted.cred.checkers import FilePasswordDB

        directory = self.mktemp()
        os.makedirs(directory)
        for name, content in [
            ("rules", b"allow-port 8443\n"),
            ("users", bcryptLine(b"alice", b"pw")),
            ("logins", b"bob:pw\n"),
            ("credentials", b"carol:pw\n"),
        ]:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(content)
        options = parse(
            *("--rules", f"{directory}/rules"),
            *("--auth", f"htpasswd:{directory}/users"),
            *("--auth", f"file:{directory}/logins"),
            *("--access-log", f"{directory}/access.log"),
            *("--upstream", "http://127.0.0.1:3128"),
            *("--upstream-credentials", f"{directory}/credentials"),
        )
        absolute = os.path.abspath(directory)
        self.assertEqual(options["rules"], f"{absolute}/rules")
        self.assertEqual(options["access-log"], f"{absolute}/access.log")
        self.assertEqual(options["upstream-credentials"], f"{absolute}/credentials")
        htpasswd, logins = options["credCheckers"]
        self.assertIsInstance(htpasswd, HtpasswdChecker)
        self.assertEqual(htpasswd.path, f"{absolute}/users")
        self.assertIsInstance(logins.checker, FilePasswordDB)
        self.assertEqual(logins.checker.filename, f"{absolute}/logins")
        self.assertEqual(parse("--access-log", "-")["access-log"], "-")

    def test_resolverThreads(self) -> None:
        """
        Target names are looked up by a L{ThreadedResolver} with 20 threads,
        or as many as C{--resolver-threads} says (1 to 1000).
        """
        for argv, threads in [((), 20), (("--resolver-threads", "3"), 3)]:
            factory = makeFactory(parse(*argv), MemoryReactorClock())
            connector = factory.connector
            assert isinstance(connector, HostnameConnector)
            resolver = connector.resolver
            assert isinstance(resolver, ThreadedResolver)
            self.assertEqual((resolver.threads, resolver.maxWaiting), (threads, 1000))
        for bad in ("0", "1001", "many"):
            self.assertRaises(UsageError, parse, "--resolver-threads", bad)

    def test_resolverCache(self) -> None:
        """
        The resolver keeps answers 30 seconds and answers without an address
        10, or as long as C{--resolver-cache} and C{--resolver-cache-failures}
        say (0 keeps none).
        """
        for argv, kept in [
            ((), (30.0, 10.0)),
            (("--resolver-cache", "5", "--resolver-cache-failures", "0"), (5.0, 0.0)),
        ]:
            factory = makeFactory(parse(*argv), MemoryReactorClock())
            connector = factory.connector
            assert isinstance(connector, HostnameConnector)
            resolver = connector.resolver
            assert isinstance(resolver, ThreadedResolver)
            self.assertEqual((resolver.cacheFor, resolver.cacheFailuresFor), kept)
        for option in ("--resolver-cache", "--resolver-cache-failures"):
            for bad in ("-1", "soon"):
                self.assertRaises(UsageError, parse, option, bad)

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

    def test_badListen(self) -> None:
        """
        An endpoint string that does not parse is a usage error that says
        how to escape colons, not a traceback; a misspelt endpoint type, or
        a missing file (named), is a usage error that says nothing of
        colons.
        """
        e = self.assertRaises(UsageError, parse, "--listen", "tcp6:80:interface=::1")
        self.assertIn("\\:", str(e))
        e = self.assertRaises(UsageError, parse, "--listen", "tpc:8080")
        self.assertIn("Unknown endpoint type: 'tpc'", str(e))
        self.assertNotIn("colons", str(e))
        missing = os.path.abspath(self.mktemp())
        e = self.assertRaises(
            UsageError,
            parse,
            "--listen",
            f"ssl:0:interface=127.0.0.1:privateKey={missing}:certKey={missing}",
        )
        self.assertIn(
            "FileNotFoundError: [Errno 2] No such file or directory: ", str(e)
        )
        self.assertIn(missing, str(e))
        self.assertNotIn("colons", str(e))

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

    def test_version(self) -> None:
        """
        C{--version} prints tunnel's version (the installed package's), then
        Twisted's and Python's, and exits.
        """
        import tunnel
        import twisted

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        exited = self.assertRaises(SystemExit, Options().parseOptions, ["--version"])
        self.assertEqual(exited.code, 0)
        self.assertEqual(
            out.getvalue(),
            f"tunnel {tunnel.__version__} (Twisted {twisted.__version__}, "
            f"Python {platform.python_version()})\n",
        )
        self.assertRegex(tunnel.__version__, r"^\d+\.\d+")


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

    def test_backlog(self) -> None:
        """
        A listener queues up to 1024 connections for the proxy to accept
        (Twisted's default is 50), unless its endpoint string says
        otherwise; the C{--workers} supervisor binds its shared sockets so
        too.
        """
        reactor = MemoryReactorClock()
        path = self.mktemp()
        service = makeService(
            parse(
                "--listen",
                "tcp:8081:interface=127.0.0.1",
                "--listen",
                "tcp:8082:interface=127.0.0.1:backlog=7",
                "--listen",
                f"unix:{path}",
            ),
            reactor,
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(
            [(port, backlog) for port, _, backlog, _ in reactor.tcpServers],
            [(8081, 1024), (8082, 7)],
        )
        self.assertEqual([server[2] for server in reactor.unixServers], [1024])
        supervisor = makeService(
            parse("--workers", "2", "--listen", "tcp:0:interface=127.0.0.1"),
            MemoryReactorClock(),
        )
        self.assertEqual(
            cast(Any, supervisor)._listen, ["tcp:0:interface=127.0.0.1:backlog=1024"]
        )

    def test_proxyProtocolFrom(self) -> None:
        """
        C{--proxy-protocol-from} networks reach the factory; the option
        needs C{--proxy-protocol}, and a value that is not a network is a
        usage error naming it.
        """
        options = parse(
            "--proxy-protocol",
            "--proxy-protocol-from",
            "10.1.0.0/16",
            "--proxy-protocol-from",
            "2001:db8::1",
        )
        factory = makeFactory(options, MemoryReactorClock())
        self.assertEqual(
            [str(network) for network in factory.proxyProtocolFrom],
            ["10.1.0.0/16", "2001:db8::1/128"],
        )
        e = self.assertRaises(UsageError, parse, "--proxy-protocol-from", "10.0.0.0/8")
        self.assertIn("--proxy-protocol-from needs --proxy-protocol", str(e))
        e = self.assertRaises(
            UsageError, parse, "--proxy-protocol", "--proxy-protocol-from", "nope"
        )
        self.assertIn("--proxy-protocol-from nope: ", str(e))

    def test_proxyProtocolNotOverTLS(self) -> None:
        """
        C{--proxy-protocol} with an C{ssl:} listener is a usage error that
        says why (balancers send the header before TLS, the proxy would
        look for it inside); with C{tcp:} listeners it is accepted.
        """
        e = self.assertRaises(
            UsageError,
            parse,
            "--proxy-protocol",
            "--listen",
            "tcp:8081",
            "--listen",
            "ssl:8443:privateKey=k.pem",
        )
        self.assertIn("--proxy-protocol cannot be used with an ssl: listener", str(e))
        self.assertIn("before the TLS handshake", str(e))
        self.assertTrue(
            parse("--proxy-protocol", "--listen", "tcp:8081")["proxy-protocol"]
        )

    def test_metricsOutliveTheDrain(self) -> None:
        """
        With C{--metrics}, a single process's metrics listener is not one of
        the listeners that stop when the drain begins: it runs beside the
        proxy's service, which stops first (L{StopInTurn}), so the
        metrics answer while connections drain.  The listener is bound with
        the proxy's listeners.
        """
        from twisted.application.internet import StreamServerEndpointService
        from twisted.web.server import Site

        reactor = MemoryReactorClock()
        service = makeService(
            parse("--metrics", "tcp:9100:interface=127.0.0.1"), reactor
        )
        self.assertIsInstance(service, StopInTurn)
        [listener, proxy] = list(service)  # type: ignore[call-overload]
        self.assertIsInstance(listener, StreamServerEndpointService)
        self.assertIsInstance(listener.factory, Site)
        self.assertIsInstance(proxy, ProxyService)
        service.startService()
        self.addCleanup(service.stopService)
        ports = [port for port, _, _, _ in reactor.tcpServers]
        self.assertEqual(sorted(ports), [8080, 9100])

    def test_freezeOnceRunning(self) -> None:
        """
        Once the reactor runs, the objects made at start-up are frozen out
        of the cyclic garbage collector's work (C{gc.freeze}).
        """
        import gc

        reactor = MemoryReactorClock()
        makeService(parse(), reactor)
        self.assertIn((gc.freeze, (), {}), reactor.whenRunningHooks)

    def test_stopOnSignals(self) -> None:
        """
        A single proxy process stops on SIGTERM or SIGINT once, however
        many arrive (installed once the reactor runs); a worker installs
        the same from its own entry point instead.
        """
        from tunnel.service import StopOnSignals

        reactor = MemoryReactorClock()
        makeService(parse(), reactor)
        installs = [
            f for f, _, _ in reactor.whenRunningHooks if f.__name__ == "install"
        ]
        self.assertEqual([type(f.__self__) for f in installs], [StopOnSignals])
        worker = MemoryReactorClock()
        makeService(parse("--inherit-fd", "5:2"), worker)
        self.assertEqual(
            [f for f, _, _ in worker.whenRunningHooks if f.__name__ == "install"], []
        )
        supervisor = MemoryReactorClock()
        makeService(parse("--workers", "2", "--listen", "tcp:0"), supervisor)
        installs = [
            f for f, _, _ in supervisor.whenRunningHooks if f.__name__ == "install"
        ]
        self.assertEqual([type(f.__self__) for f in installs], [StopOnSignals])

    def test_workerOf(self) -> None:
        """
        A worker told it is one of N (the internal C{--worker-of}) makes its
        pipe pool share the user's pipe quota N ways; alone, it has it all.
        """
        from tunnel import splice

        for argv, processes in [((), 1), (("--worker-of", "4"), 4)]:
            self.patch(splice, "defaultPool", splice.PipePool())
            makeService(parse(*argv), MemoryReactorClock())
            self.assertEqual(splice.defaultPool.processes, processes)
        self.assertRaises(UsageError, parse, "--worker-of", "0")

    def test_pipeSize(self) -> None:
        """
        C{--pipe-size} sets the capacity the pipe pool asks for each new
        pipe (1 MiB unless given), within one page and 64 MiB.
        """
        from tunnel import splice

        for argv, size in [((), 1 << 20), (("--pipe-size", "262144"), 262144)]:
            self.patch(splice, "defaultPool", splice.PipePool())
            makeService(parse(*argv), MemoryReactorClock())
            self.assertEqual(splice.defaultPool.pipeSize, size)
        for wrong in ("4095", str((1 << 26) + 1), "1M"):
            self.assertRaises(UsageError, parse, "--pipe-size", wrong)

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


class SecurityOptionsTests(SynchronousTestCase):
    """
    C{--auth}, the destination rules, C{--rules} and the limits.
    """

    def test_secureDefaults(self) -> None:
        """
        Without options: no authentication, port 443 only, private
        destinations refused, and as many connections at once as the file
        descriptor limit holds.
        """
        reactor = MemoryReactorClock()
        factory = makeFactory(parse(), reactor)
        self.assertIsNone(factory.portal)
        policy = factory.policy
        self.assertIsNotNone(policy.checkTarget(None, None, "h", 22))
        self.assertFalse(
            policy.checkAddress(None, None, "h", 443, ipaddress.ip_address("10.0.0.1"))
        )
        byDescriptors = limits.descriptorBoundTunnels(limits.descriptorLimit(reactor))
        byMemory = limits.memoryBoundTunnels(128 * 1024)
        self.assertEqual(
            factory.maxTunnels,
            byDescriptors if byMemory is None else min(byDescriptors, byMemory),
        )

    def test_memoryBoundTunnels(self) -> None:
        """
        L{memoryBoundTunnels} counts the connections a quarter of the
        memory holds at the given size each: the machine's C{MemTotal}, or
        a lower cgroup limit; none where neither is known.
        """
        meminfo, cgroup = self.mktemp(), self.mktemp()
        with open(meminfo, "w") as f:
            f.write("MemFree:  100 kB\nMemTotal:       2097152 kB\nOther: 1 kB\n")
        self.assertEqual(limits.memoryBoundTunnels(128 * 1024, meminfo, cgroup), 4096)
        self.assertEqual(limits.memoryBoundTunnels(1 << 20, meminfo, cgroup), 512)
        with open(cgroup, "w") as f:
            f.write("max\n")
        self.assertEqual(limits.memoryBoundTunnels(128 * 1024, meminfo, cgroup), 4096)
        with open(cgroup, "w") as f:
            f.write("1073741824\n")
        self.assertEqual(limits.memoryBoundTunnels(128 * 1024, meminfo, cgroup), 2048)
        missing = self.mktemp()
        self.assertEqual(limits.memoryBoundTunnels(128 * 1024, missing, cgroup), 2048)
        self.assertIsNone(limits.memoryBoundTunnels(128 * 1024, missing, missing))
        self.assertEqual(limits.memoryBoundTunnels(1 << 40, meminfo, missing), 1)

    def test_maxTunnelsByMemory(self) -> None:
        """
        The default C{--max-tunnels} is the lower of what the descriptors
        and what the memory hold (at the larger of C{--max-header-size} and
        128 KiB a connection), and says which; one set by C{--max-tunnels}
        is kept.
        """
        sizes: list[int] = []

        def byMemory(perConnection: int) -> int:
            sizes.append(perConnection)
            return 7

        self.patch(limits, "memoryBoundTunnels", byMemory)
        logged = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        self.assertEqual(makeFactory(parse(), MemoryReactorClock()).maxTunnels, 7)
        self.assertEqual(
            formatEvent(logged[-1]),
            "At most 7 connections at once, as a quarter of the memory holds at "
            "128 KiB each (--max-tunnels sets another)",
        )
        bigHeads = parse("--max-header-size", str(1 << 20))
        self.assertEqual(makeFactory(bigHeads, MemoryReactorClock()).maxTunnels, 7)
        self.assertEqual(sizes, [128 * 1024, 1 << 20])
        chosen = makeFactory(parse("--max-tunnels", "5000"), MemoryReactorClock())
        self.assertEqual(chosen.maxTunnels, 5000)
        # Each of --workers 3 has a third of what the memory holds.
        self.patch(limits, "memoryBoundTunnels", lambda perConnection: 30)
        worker = parse("--worker-of", "3", "--inherit-fd", "5:2")
        self.assertEqual(makeFactory(worker, MemoryReactorClock()).maxTunnels, 10)

    def test_descriptorBoundTunnels(self) -> None:
        """
        The default C{--max-tunnels} gives each connection two descriptors,
        less a quarter of them (at most 256) kept back.
        """
        for descriptors, expected in [
            (1024, 384),
            (65536, 32640),
            (64, 24),
            (1, 1),
            (1 << 20, 524160),
        ]:
            self.assertEqual(
                limits.descriptorBoundTunnels(descriptors), expected, descriptors
            )

    def test_descriptorLimit(self) -> None:
        """
        The proxy counts on its hard descriptor limit (at most 2**20, an
        unlimited one too), to which it raises its soft one; on
        C{select()}'s reactor, which cannot watch descriptors beyond 1024,
        on its soft limit as it is.
        """
        import resource

        from twisted.internet.selectreactor import SelectReactor

        # Not started: only its class matters.
        selecting = SelectReactor.__new__(SelectReactor)
        epolling = MemoryReactorClock()
        infinity = resource.RLIM_INFINITY
        for (soft, hard), raised, kept in [
            ((1024, 524288), 524288, 1024),
            ((1024, 1024), 1024, 1024),
            ((1024, infinity), 1 << 20, 1024),
            ((infinity, infinity), 1 << 20, 1 << 20),
            ((1 << 30, 1 << 30), 1 << 20, 1 << 20),
        ]:
            given = itertools.repeat((soft, hard)).__next__
            self.assertEqual(limits.descriptorLimit(epolling, given), raised, hard)
            self.assertEqual(limits.descriptorLimit(selecting, given), kept, soft)

    def test_raiseDescriptorLimit(self) -> None:
        """
        L{makeFactory} has the soft descriptor limit raised once the
        reactor runs (a test's reactor never does); L{raiseDescriptorLimit}
        raises it only when it is lower, keeps the hard limit, logs what it
        did, or why it could not, and gives the limit in force.
        """
        import resource

        reactor = MemoryReactorClock()
        factory = makeFactory(parse(), reactor)
        self.assertIn(
            (
                tap._raiseDescriptorLimitFor,
                (factory, limits.descriptorLimit(reactor), True),
                {},
            ),
            reactor.whenRunningHooks,
        )
        calls: list[tuple[int, tuple[int, int]]] = []

        def setLimit(which: int, values: tuple[int, int]) -> None:
            calls.append((which, values))

        logged = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        given = itertools.repeat((1024, 524288)).__next__
        self.assertEqual(limits.raiseDescriptorLimit(524288, given, setLimit), 524288)
        self.assertEqual(limits.raiseDescriptorLimit(1024, given, setLimit), 1024)
        self.assertEqual(limits.raiseDescriptorLimit(1000, given, setLimit), 1024)
        self.assertEqual(calls, [(resource.RLIMIT_NOFILE, (524288, 524288))])

        def refuse(which: int, values: tuple[int, int]) -> None:
            raise ValueError("not allowed")

        self.assertEqual(limits.raiseDescriptorLimit(524288, given, refuse), 1024)
        self.assertEqual(
            [formatEvent(event) for event in logged],
            [
                "Raised the file descriptor limit from 1024 to 524288",
                "Could not raise the file descriptor limit from 1024 to 524288: "
                "not allowed",
            ],
        )

    def test_limitNotRaised(self) -> None:
        """
        When the soft descriptor limit cannot be raised as planned, the
        default C{--max-tunnels} comes down to what the limit in force
        holds (and says so), so that a flood still meets a 503 rather than
        accepts that find no descriptor; one set by C{--max-tunnels} stays,
        and so does a default already lower (what the memory holds).
        """
        self.patch(limits, "raiseDescriptorLimit", lambda descriptors: 1024)
        logged = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        defaulted = makeFactory(parse(), MemoryReactorClock())
        tap._raiseDescriptorLimitFor(defaulted, 524288, True)
        self.assertEqual(defaulted.maxTunnels, 384)
        self.assertEqual(
            formatEvent(logged[-1]),
            "At most 384 connections at once, as the file descriptor limit "
            "allows (--max-tunnels sets another)",
        )
        chosen = makeFactory(parse("--max-tunnels", "5000"), MemoryReactorClock())
        tap._raiseDescriptorLimitFor(chosen, 524288, False)
        self.assertEqual(chosen.maxTunnels, 5000)
        # Lower already (what the memory holds): kept.
        enough = makeFactory(parse(), MemoryReactorClock())
        enough.maxTunnels = 100
        tap._raiseDescriptorLimitFor(enough, 524288, True)
        self.assertEqual(enough.maxTunnels, 100)

    def test_rules(self) -> None:
        """
        C{--allow-port}, C{--allow-to}, C{--deny-to} and C{--allow-from}
        reach the policy.
        """
        factory = makeFactory(
            parse(
                "--allow-port",
                "22",
                "--allow-to",
                "10.0.0.0/8",
                "--deny-to",
                "10.9.9.9",
                "--allow-from",
                "192.0.2.0/24",
            ),
            MemoryReactorClock(),
        )
        policy = factory.policy
        ip = ipaddress.ip_address
        self.assertIsNone(policy.checkTarget(None, None, "h", 22))
        self.assertTrue(policy.checkAddress(None, None, "h", 22, ip("10.1.1.1")))
        self.assertFalse(policy.checkAddress(None, None, "h", 22, ip("10.9.9.9")))
        self.assertIsNotNone(policy.checkClient(ip("198.51.100.1")))

    def test_badRules(self) -> None:
        """
        Rules that do not parse are usage errors naming the option.
        """
        for argv in [
            ("--allow-port", "http"),
            ("--allow-to", "bad name"),
            ("--deny-to", "1.2.3.4/99"),
            ("--allow-from", "somewhere"),
        ]:
            e = self.assertRaises(UsageError, parse, *argv)
            self.assertIn(argv[0], str(e))

    def test_auth(self) -> None:
        """
        C{--auth memory:...} makes a portal that accepts those users, and
        C{--realm} names the realm.
        """
        factory = makeFactory(
            parse("--auth", "memory:alice:pw", "--realm", "Corp"), MemoryReactorClock()
        )
        assert factory.portal is not None
        self.assertEqual(factory.realm, "Corp")
        login = factory.portal.login(
            UsernamePassword(b"alice", b"pw"), None, IProxyUser
        )
        self.assertEqual(self.successResultOf(login)[1], ProxyUser("alice"))

    def test_realmWithControlCharacters(self) -> None:
        """
        A C{--realm} that could split the 407 (CR, LF) is a usage error.
        """
        e = self.assertRaises(
            UsageError,
            parse,
            "--auth",
            "memory:a:b",
            "--realm",
            "corp\r\nX-Injected: 1",
        )
        self.assertIn("realm", str(e))

    def test_htpasswdAuth(self) -> None:
        """
        C{--auth htpasswd:PATH} is available as a strcred plugin; a file in
        another format is refused at start-up with the line and the reason.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
        options = parse("--auth", "htpasswd:" + path)
        [checker] = options["credCheckers"]
        self.assertIsInstance(checker, HtpasswdChecker)
        with open(path, "wb") as f:
            f.write(b"alice:$apr1$x$y\n")
        e = self.assertRaises(UsageError, parse, "--auth", "htpasswd:" + path)
        self.assertIn(f"--auth htpasswd: {os.path.abspath(path)}:1: ", str(e))
        missing = os.path.abspath(self.mktemp())
        e = self.assertRaises(UsageError, parse, "--auth", "htpasswd:" + missing)
        self.assertEqual(
            str(e), f"--auth htpasswd: {missing}: No such file or directory"
        )

    def test_badAuth(self) -> None:
        """
        Unknown checker types and checkers that cannot check passwords are
        usage errors.
        """
        self.assertRaises(UsageError, parse, "--auth", "nonsense:x")
        self.assertRaises(UsageError, parse, "--auth", "sshkey")

    def test_splice(self) -> None:
        """
        Splicing is on wherever the system has it, and C{--no-splice} turns
        it off.
        """
        from tunnel.splice import spliceAvailable

        reactor = MemoryReactorClock()
        self.assertEqual(makeFactory(parse(), reactor).splice, spliceAvailable())
        self.assertFalse(makeFactory(parse("--no-splice"), reactor).splice)

    def test_noTunnelLog(self) -> None:
        """
        Each connection's line goes to the twistd log unless
        C{--no-tunnel-log} says otherwise.
        """
        reactor = MemoryReactorClock()
        self.assertTrue(makeFactory(parse(), reactor).logTunnels)
        self.assertFalse(makeFactory(parse("--no-tunnel-log"), reactor).logTunnels)

    def test_limits(self) -> None:
        """
        C{--max-tunnels} and C{--max-tunnels-per-client} reach the factory.
        """
        factory = makeFactory(
            parse("--max-tunnels", "100", "--max-tunnels-per-client", "5"),
            MemoryReactorClock(),
        )
        self.assertEqual((factory.maxTunnels, factory.maxTunnelsPerClient), (100, 5))

    def test_partialHeadBytesPerClient(self) -> None:
        """
        One address may make the proxy hold 16 MiB of partial heads by
        default, as many bytes as C{--max-partial-head-bytes-per-client}
        says, or any number with C{0}.
        """
        reactor = MemoryReactorClock()
        for argv, limit in [
            ((), 16 << 20),
            (("--max-partial-head-bytes-per-client", "65536"), 65536),
            (("--max-partial-head-bytes-per-client", "0"), None),
        ]:
            factory = makeFactory(parse(*argv), reactor)
            self.assertEqual(factory.maxPartialHeadBytesPerClient, limit)
        for bad in ("-1", "lots"):
            self.assertRaises(
                UsageError, parse, "--max-partial-head-bytes-per-client", bad
            )

    def test_rulesFile(self) -> None:
        """
        C{--rules PATH} adds the file's rules to the options'; a broken file
        is refused at start-up.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# ssh too\nallow-port 22\n\nallow-to 10.0.0.0/8  # lab\n")
        factory = makeFactory(
            parse("--rules", path, "--allow-port", "80"), MemoryReactorClock()
        )
        self.assertIsInstance(factory.policy, RulesFilePolicy)
        for port in [22, 80, 443]:
            self.assertIsNone(factory.policy.checkTarget(None, None, "h", port))
        with open(path, "w") as f:
            f.write("allow-port\n")
        e = self.assertRaises(UsageError, parse, "--rules", path)
        self.assertIn(f"{path}:1: ", str(e))
        self.assertRaises(UsageError, parse, "--rules", path + ".missing")


class OpenProxyWarningTests(SynchronousTestCase):
    """
    The start-up warning for an open proxy.
    """

    def warnings(self, *argv: str) -> list[str]:
        """
        The warnings logged while making the service for C{argv}.
        """
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        makeService(parse(*argv), MemoryReactorClock())
        return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]

    def test_loopbackOnly(self) -> None:
        """
        Listening on loopback or a UNIX socket warns of nothing.
        """
        self.assertEqual(self.warnings(), [])
        self.assertEqual(
            self.warnings(
                "--listen",
                "tcp6:8080:interface=\\:\\:1",
                "--listen",
                "unix:/tmp/x.sock",
                "--listen",
                "tcp:1:interface=localhost",
            ),
            [],
        )

    def test_open(self) -> None:
        """
        Listening beyond loopback with neither C{--auth} nor C{--allow-from}
        logs a prominent warning naming the listener.
        """
        [warning] = self.warnings("--listen", "tcp:3128")
        self.assertIn("*** OPEN PROXY *** tcp:3128", warning)
        self.assertIn("--allow-from", warning)

    def test_guarded(self) -> None:
        """
        C{--auth} or C{--allow-from} silences the warning.
        """
        self.assertEqual(
            self.warnings("--listen", "tcp:3128", "--auth", "memory:a:b"), []
        )
        self.assertEqual(
            self.warnings("--listen", "tcp:3128", "--allow-from", "10.0.0.0/8"), []
        )

    def test_everyAddressIsOpen(self) -> None:
        """
        An C{--allow-from} of a whole address family (C{0.0.0.0/0}, or an
        address over C{/0}) restricts nothing: the open-proxy warning
        stays, and a rule with host bits set is said to be taken for its
        network.
        """
        warnings = self.warnings("--listen", "tcp:3128", "--allow-from", "10.0.0.1/0")
        self.assertEqual(len(warnings), 2)
        self.assertIn(
            "--allow-from 10.0.0.1/0 is taken for the network 0.0.0.0/0 "
            "(every address)",
            warnings[0],
        )
        self.assertIn("*** OPEN PROXY *** tcp:3128", warnings[1])
        warnings = self.warnings(
            "--listen", "tcp:3128", "--allow-from", "10.0.0.7/8", "--deny-to", "a.b"
        )
        self.assertEqual(
            warnings, ["--allow-from 10.0.0.7/8 is taken for the network 10.0.0.0/8"]
        )

    def test_listensBeyondLoopback(self) -> None:
        """
        L{listensBeyondLoopback} tells loopback and UNIX listeners from the
        rest, including kinds it cannot see into.
        """
        for description, beyond in [
            ("tcp:80", True),
            ("tcp:80:interface=0.0.0.0", True),
            ("tcp:80:interface=192.0.2.1", True),
            ("tcp:80:interface=127.0.0.1", False),
            ("tcp:80:interface=127.9.9.9:backlog=5", False),
            ("tcp6:80:interface=\\:\\:1", False),
            ("tcp6:80:interface=\\:\\:", True),
            ("ssl:443:privateKey=k.pem:interface=127.0.0.1", False),
            ("unix:/run/p.sock", False),
            ("systemd:domain=INET:index=0", True),
            ("tcp:80:interface=eth0", True),
        ]:
            self.assertEqual(listensBeyondLoopback(description), beyond, description)

    def test_boundBeyondLoopback(self) -> None:
        """
        For a C{systemd:} listener the socket systemd passed is asked its
        address: bound to loopback, or a UNIX socket, it accepts no other
        machine; a descriptor that cannot be asked might.  (Without the
        socket, as here, a C{systemd:} listener might too: see
        L{test_listensBeyondLoopback}.)
        """
        loopback = socket.socket()
        self.addCleanup(loopback.close)
        loopback.bind(("127.0.0.1", 0))
        unix = socket.socket(socket.AF_UNIX)
        self.addCleanup(unix.close)
        reading, writing = os.pipe()
        self.addCleanup(os.close, reading)
        self.addCleanup(os.close, writing)
        self.assertFalse(boundBeyondLoopback(loopback.fileno()))
        self.assertFalse(boundBeyondLoopback(unix.fileno()))
        self.assertTrue(boundBeyondLoopback(reading))
        # The descriptors asked were copies: these are still open.
        self.assertEqual(loopback.getsockname()[0], "127.0.0.1")

    def test_withDefaultBacklog(self) -> None:
        """
        L{withDefaultBacklog} adds C{backlog=1024} to the kinds of listener
        that take one and do not set it, reading escaped colons as part of
        a value; it leaves a C{systemd:} socket (whose queue systemd sets),
        a listener with its own backlog, by name or by position, and a
        string with another mistake (for its check to report) as they are.
        """
        for description, expected in [
            ("tcp:8080", "tcp:8080:backlog=1024"),
            (
                "tcp:8080:interface=127.0.0.1",
                "tcp:8080:interface=127.0.0.1:backlog=1024",
            ),
            ("tcp6:80:interface=\\:\\:1", "tcp6:80:interface=\\:\\:1:backlog=1024"),
            ("unix:/run/p.sock", "unix:/run/p.sock:backlog=1024"),
            ("unix:/run/a\\:b.sock", "unix:/run/a\\:b.sock:backlog=1024"),
            ("tcp:8080:backlog=5", "tcp:8080:backlog=5"),
            ("tcp:3128:127.0.0.1:100", "tcp:3128:127.0.0.1:100"),
            ("tcp6:3128:100", "tcp6:3128:100"),
            ("unix:/run/p.sock:660:10", "unix:/run/p.sock:660:10"),
            ("unix:/run/p.sock:660", "unix:/run/p.sock:660:backlog=1024"),
            ("tcp:notaport", "tcp:notaport"),
            (
                "tcp:0:backlog=1:interface=127.0.0.1",
                "tcp:0:backlog=1:interface=127.0.0.1",
            ),
            ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ]:
            self.assertEqual(withDefaultBacklog(description), expected, description)
        from tests.test_integration import localhostCertificate

        certificate, key = localhostCertificate()
        path = self.mktemp()
        with open(path, "wb") as pem:
            pem.write(key + certificate)
        self.assertEqual(
            withDefaultBacklog(f"ssl:443:privateKey={path}"),
            f"ssl:443:privateKey={path}:backlog=1024",
        )


class FileStampTests(SynchronousTestCase):
    """
    Tests for L{tunnel.filestamp.fileStamp}, which tells the rules and
    htpasswd files' readers that a file changed.
    """

    def test_statusChangeCounts(self) -> None:
        """
        A file rewritten in place with the same size and its modification
        time set back has a new stamp all the same: its status change time
        (which no one can set back) differs.
        """
        from types import SimpleNamespace

        from tunnel import filestamp

        def status(ctime: int) -> SimpleNamespace:
            return SimpleNamespace(
                st_mtime_ns=10**18, st_size=42, st_ino=7, st_ctime_ns=ctime
            )

        statuses = iter([status(1), status(1), status(2)])
        self.patch(filestamp, "os", SimpleNamespace(stat=lambda path: next(statuses)))
        first = filestamp.fileStamp("rules")
        self.assertEqual(filestamp.fileStamp("rules"), first)
        self.assertNotEqual(filestamp.fileStamp("rules"), first)

    def test_missing(self) -> None:
        """
        A file that cannot be examined has no stamp.
        """
        from tunnel.filestamp import fileStamp

        self.assertIsNone(fileStamp(self.mktemp()))

    def test_onlyRegularFilesRead(self) -> None:
        """
        L{readRegularFile} refuses, without blocking, what is not a regular
        file (a FIFO with no writer, a device that never ends, a
        directory), and a file larger than its limit; it reads one of
        exactly the limit.
        """
        import errno

        from tunnel.filestamp import readRegularFile

        fifo = self.mktemp()
        os.mkfifo(fifo)
        directory = self.mktemp()
        os.mkdir(directory)
        for path in [fifo, "/dev/zero", directory]:
            e = self.assertRaises(OSError, readRegularFile, path, 100)
            self.assertEqual(
                (e.errno, e.strerror), (errno.EINVAL, "not a regular file")
            )
        large = self.mktemp()
        with open(large, "wb") as f:
            f.write(b"x" * 101)
        e = self.assertRaises(OSError, readRegularFile, large, 100)
        self.assertEqual(e.errno, errno.EFBIG)
        self.assertEqual(readRegularFile(large, 101), b"x" * 101)

    def test_fifoRulesRefused(self) -> None:
        """
        C{--rules} naming a FIFO is a usage error at start-up, not a proxy
        that hangs waiting for a writer.
        """
        fifo = self.mktemp()
        os.mkfifo(fifo)
        e = self.assertRaises(
            UsageError,
            Options().parseOptions,
            ["--listen", "tcp:0:interface=127.0.0.1", "--rules", fifo],
        )
        self.assertIn("not a regular file", str(e))

    def test_readAgain(self) -> None:
        """
        After L{WatchedFile.readAgain}, the next L{WatchedFile.changed}
        gives the content even though the file has not changed.
        """
        from tunnel.filestamp import WatchedFile

        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"content")
        watched = WatchedFile(path)
        later = time.time() + 3600
        self.assertIsNone(watched.changed(later))
        watched.readAgain()
        self.assertEqual(watched.changed(later), b"content")
        self.assertIsNone(watched.changed(later))

    def test_settled(self) -> None:
        """
        A file is settled once its status has not changed for C{settle}
        seconds; a change the clock puts in the future (the clock was set
        back) and a file that cannot be examined count as settled.
        """
        from tunnel.filestamp import SETTLE, settled

        stamp = (0, 0, 0, 100 * 10**9)
        self.assertEqual(SETTLE, 1.0)
        self.assertFalse(settled(stamp, 100.0))
        self.assertFalse(settled(stamp, 100.5))
        self.assertTrue(settled(stamp, 101.0))
        self.assertTrue(settled(stamp, 99.0))
        self.assertFalse(settled(stamp, 101.0, settle=2.0))
        self.assertTrue(settled(None, 100.0))


class RulesFilePolicyTests(SynchronousTestCase):
    """
    Tests for L{RulesFilePolicy}.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write("allow-port 22\n")
        self.clock = Clock()
        # An hour after the files were written: each has stayed unchanged
        # long enough to be read (how long changed files wait is
        # test_fileBeingWrittenWaits's matter).
        self.clock.advance(time.time() + 3600)
        self.policy = RulesFilePolicy(self.path, self.clock, ports=["80"])

    def write(self, text: str) -> None:
        """
        Replace the rules file, making sure its stamp changes.
        """
        with open(self.path, "w") as f:
            f.write(text)
        stamp = os.stat(self.path).st_mtime_ns + 10**9
        os.utime(self.path, ns=(stamp, stamp))

    def logEvents(self) -> EventLoggingObserver:
        """
        Collect the log's events until the test ends.

        @return: The events logged from now on.
        """
        return EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def ports(self) -> list[int]:
        """
        Which of some ports the policy allows now (after a client connects,
        which is when the file is looked at).
        """
        self.policy.checkClient(None)
        return [
            port
            for port in [22, 80, 443, 8080]
            if self.policy.checkTarget(None, None, "h", port) is None
        ]

    def test_reload(self) -> None:
        """
        A changed file is re-read, at most once a second.
        """
        self.assertEqual(self.ports(), [22, 80, 443])
        self.write("allow-port 8080\n")
        self.assertEqual(self.ports(), [22, 80, 443])
        self.clock.advance(1)
        self.assertEqual(self.ports(), [80, 443, 8080])

    def test_fileBeingWrittenWaits(self) -> None:
        """
        A file that changed less than a second ago may be half written (a
        rewrite in place empties it first, and its C{allow-to} lines may
        come before its C{deny-to} lines): it is read at a later look, once
        it has stayed unchanged for a second.
        """
        from tunnel import filestamp

        stamps = [(1, 1, 1, 0)]
        self.patch(filestamp, "fileStamp", lambda path: stamps[-1])
        self.clock = Clock()
        self.clock.advance(1000)
        self.policy = RulesFilePolicy(self.path, self.clock, ports=["80"])
        self.write("allow-port 8080\n")
        stamps.append((2, 2, 1, 1000_600_000_000))
        self.clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])
        self.clock.advance(1)
        self.assertEqual(self.ports(), [80, 443, 8080])

    def test_unreadableFileReadAgain(self) -> None:
        """
        A changed file that cannot be read (no descriptor left, say) keeps
        the rules, logs why, and is read at the next look: its change is
        not lost.
        """
        events = self.logEvents()
        self.write("allow-port 8080\n")
        exhausted = DescriptorsExhausted(self)
        self.clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])
        # Said once, not at every look (a file -u made unreadable).
        self.clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn("Too many open files", formatEvent(error))
        exhausted.on = False
        self.clock.advance(1)
        self.assertEqual(self.ports(), [80, 443, 8080])

    def test_fallbackForBrokenFile(self) -> None:
        """
        A file that does not parse at start-up is an error, unless there is
        a fallback (a C{--workers} supervisor's last good copy): its rules
        are used, a warning says why, and the broken file is read again
        only once it changes.
        """
        self.write("allow-port 0\n")
        self.assertRaises(ValueError, RulesFilePolicy, self.path, self.clock)
        events = self.logEvents()
        self.policy = RulesFilePolicy(
            self.path, self.clock, ports=["80"], fallback=b"allow-port 8080\n"
        )
        self.assertEqual(self.ports(), [80, 443, 8080])
        self.assertEqual(self.policy.content, b"allow-port 8080\n")
        [warning] = events
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertIn(f"{self.path}:1: ", formatEvent(warning))
        self.clock.advance(1)
        self.assertEqual(self.ports(), [80, 443, 8080])
        self.assertEqual(len(events), 1)
        self.write("allow-port 22\n")
        self.clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])
        self.assertEqual(self.policy.content, b"allow-port 22\n")

    def test_fallbackForUnreadableFile(self) -> None:
        """
        A file that cannot be read at start-up (no descriptor left, say)
        with a fallback uses the fallback, and is read at the next look
        even though it has not changed.
        """

        exhausted = DescriptorsExhausted(self)
        self.policy = RulesFilePolicy(
            self.path, self.clock, ports=["80"], fallback=b"allow-port 8080\n"
        )
        self.assertEqual(self.ports(), [80, 443, 8080])
        exhausted.on = False
        self.clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])

    def test_fallbackWhileBeingWritten(self) -> None:
        """
        With a fallback, a file that changed less than a second ago (perhaps
        half written: its C{allow-to} lines there, its C{deny-to} lines not
        yet) is not read at start-up: the fallback's rules serve, a warning
        says why, and the file is read once it has settled.
        """
        events = self.logEvents()
        self.write("allow-port 22\n")
        clock = Clock()
        clock.advance(os.stat(self.path).st_ctime_ns / 1e9 + 0.5)
        self.policy = RulesFilePolicy(
            self.path, clock, ports=["80"], fallback=b"allow-port 8080\n"
        )
        self.assertEqual(self.ports(), [80, 443, 8080])
        [warning] = events
        self.assertIn("is being written", formatEvent(warning))
        clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])

    def test_justWrittenAsTheSupervisorReadIt(self) -> None:
        """
        A file that changed less than a second ago but holds just what the
        supervisor read (written just before the proxy started) serves at
        once, without a warning, and is not read again until it changes.
        """
        events = self.logEvents()
        self.write("allow-port 22\n")
        clock = Clock()
        clock.advance(os.stat(self.path).st_ctime_ns / 1e9 + 0.5)
        self.policy = RulesFilePolicy(
            self.path, clock, ports=["80"], fallback=b"allow-port 22\n"
        )
        self.assertEqual(self.ports(), [22, 80, 443])
        clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])
        self.assertEqual(list(events), [])

    def test_contentOfLastGoodRules(self) -> None:
        """
        C{content} is what the rules in force were read from: it follows a
        good change, not a broken one.
        """
        self.assertEqual(self.policy.content, b"allow-port 22\n")
        self.write("allow-port 8080\n")
        self.clock.advance(1)
        self.policy.refresh()
        self.assertEqual(self.policy.content, b"allow-port 8080\n")
        self.write("allow-port 0\n")
        self.clock.advance(1)
        self.policy.refresh()
        self.assertEqual(self.policy.content, b"allow-port 8080\n")

    def test_clientsNoLongerLimited(self) -> None:
        """
        A reload that leaves no C{allow-from} where there was one (an empty
        one means anyone) says so in a warning; one that keeps some says
        nothing of the kind.
        """
        events = self.logEvents()
        self.write("allow-from 10.0.0.0/8\nallow-from 192.0.2.0/24\n")
        self.clock.advance(1)
        self.policy.refresh()
        self.write("allow-from 10.0.0.0/8\n")
        self.clock.advance(1)
        self.policy.refresh()
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info] * 2)
        self.write("# allow-from 10.0.0.0/8\n")
        self.clock.advance(1)
        self.policy.refresh()
        warning = events[-1]
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertIn("no longer limit the clients", formatEvent(warning))
        self.assertIsNone(self.policy.checkClient(ipaddress.ip_address("192.0.2.9")))

    def test_hostBitsNoted(self) -> None:
        """
        A rule in the file written with host bits set is said to be taken
        for its network, with the file's name.
        """
        events = self.logEvents()
        self.write("allow-from 192.0.2.7/24\n")
        self.clock.advance(1)
        self.policy.refresh()
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(
            formatEvent(warning),
            f"{self.path}: allow-from 192.0.2.7/24 is taken for the network "
            "192.0.2.0/24",
        )

    def test_combinedWithOptions(self) -> None:
        """
        The file's rules add to the options' own, of every kind: clients
        from either's networks, targets in either's, and either's denials.
        """
        self.write(
            "allow-from 192.0.2.0/24\nallow-to 10.1.0.0/16\ndeny-to 10.9.9.0/24\n"
        )
        policy = RulesFilePolicy(
            self.path,
            self.clock,
            ports=["443"],
            allowFrom=["198.51.100.0/24"],
            allowTo=["10.9.0.0/16"],
            denyTo=["10.1.1.0/24"],
        )
        address = ipaddress.ip_address
        for client, allowed in [
            ("192.0.2.1", True),
            ("198.51.100.1", True),
            ("203.0.113.1", False),
        ]:
            self.assertEqual(policy.checkClient(address(client)) is None, allowed)
        for target, allowed in [
            ("10.1.0.1", True),
            ("10.9.0.1", True),
            ("10.1.1.1", False),
            ("10.9.9.1", False),
            ("10.2.0.1", False),
        ]:
            self.assertEqual(
                policy.checkAddress(None, None, "h", 443, address(target)),
                allowed,
                target,
            )

    def test_emptiedFileLeavesOptions(self) -> None:
        """
        A file emptied (not broken: empty is a valid file of no rules)
        takes its rules away, leaving the options' own.
        """
        self.write("")
        self.clock.advance(1)
        self.assertEqual(self.ports(), [80, 443])

    def test_notUTF8(self) -> None:
        """
        A file that is not UTF-8 is refused at start-up, and kept out at a
        reload, with the file's name and the reason.
        """
        with open(self.path, "wb") as f:
            f.write(b"# caf\xe9\nallow-port 8080\n")
        e = self.assertRaises(ValueError, RulesFilePolicy, self.path, self.clock)
        self.assertTrue(str(e).startswith(f"{self.path}: "), str(e))
        self.assertIn("utf-8", str(e))
        stamp = os.stat(self.path).st_mtime_ns + 10**9
        os.utime(self.path, ns=(stamp, stamp))
        self.clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])

    def test_noWarningWithoutAllowFrom(self) -> None:
        """
        A reload of a file that never limited the clients does not warn
        that it no longer does.
        """
        events = self.logEvents()
        self.write("allow-port 8080\n")
        self.clock.advance(1)
        self.policy.refresh()
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info])

    def test_hostBitsNotedEveryKind(self) -> None:
        """
        Host bits are noted in C{allow-to} and C{deny-to} rules too.
        """
        events = self.logEvents()
        self.write("allow-to 10.1.2.3/16\ndeny-to 10.1.9.9/24\n")
        self.clock.advance(1)
        self.policy.refresh()
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(
            warnings,
            [
                f"{self.path}: allow-to 10.1.2.3/16 is taken for the network "
                "10.1.0.0/16",
                f"{self.path}: deny-to 10.1.9.9/24 is taken for the network "
                "10.1.9.0/24",
            ],
        )

    def test_brokenKeepsRules(self) -> None:
        """
        A file that no longer parses keeps the last good rules, and says why
        in the log.
        """
        events = self.logEvents()
        self.write("allow-port 22\nallow-port 0\n")
        self.clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn(f"{self.path}:2: ", formatEvent(error))

    def test_delegates(self) -> None:
        """
        Address checks and denials come from the current rules.
        """
        ip = ipaddress.ip_address("10.0.0.1")
        self.assertFalse(self.policy.checkAddress(None, None, "h", 22, ip))
        self.write("allow-to 10.0.0.0/8\n")
        self.clock.advance(1)
        self.policy.checkClient(None)
        self.assertTrue(self.policy.checkAddress(None, None, "h", 22, ip))
        self.assertEqual(self.policy.addressDenial("h", 1).status, 403)

    def test_unchangedFileKeepsRules(self) -> None:
        """
        Looking again at a file that did not change since it was last read
        keeps the rules without re-reading it.
        """
        events = self.logEvents()
        self.write("allow-port 8080\n")
        for _ in range(3):
            self.clock.advance(1)
            self.assertEqual(self.ports(), [80, 443, 8080])
        reloads = [e for e in events if "Reloaded" in formatEvent(e)]
        self.assertEqual(len(reloads), 1)

    def test_checkedAtMostOncePerInterval(self) -> None:
        """
        After a look at the file, the next is no sooner than C{checkInterval}
        (by default a second) later, however late the first look came.
        """
        self.clock.advance(100)
        self.write("allow-port 8080\n")
        self.assertEqual(self.ports(), [80, 443, 8080])
        self.write("allow-port 22\n")
        self.clock.advance(0.5)
        self.assertEqual(self.ports(), [80, 443, 8080])
        self.clock.advance(0.25)
        self.assertEqual(self.ports(), [80, 443, 8080])
        self.clock.advance(0.25)
        self.assertEqual(self.ports(), [22, 80, 443])

    def test_missingFileKeepsRules(self) -> None:
        """
        A rules file that disappears (or cannot be read) keeps the last good
        rules, and says why in the log.
        """
        events = self.logEvents()
        os.remove(self.path)
        self.clock.advance(1)
        self.assertEqual(self.ports(), [22, 80, 443])
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn(self.path, formatEvent(error))

    def test_missingAtStart(self) -> None:
        """
        A rules file missing at start-up is a L{ValueError} naming the file,
        as the class says, for code that builds the policy itself.
        """
        missing = self.mktemp()
        e = self.assertRaises(ValueError, RulesFilePolicy, missing, self.clock)
        self.assertTrue(str(e).startswith(f"{missing}: "), str(e))


class UpstreamOptionsTests(SynchronousTestCase):
    """
    C{--upstream} and C{--upstream-ca}.
    """

    def test_upstream(self) -> None:
        """
        C{--upstream URL} sends every tunnel through a parent proxy, whose
        name is looked up with C{--resolver-threads}.
        """
        factory = makeFactory(
            parse(
                "--upstream",
                "http://alice:pw@127.0.0.1:3128",
                "--resolver-threads",
                "4",
            ),
            MemoryReactorClock(),
        )
        self.assertIsInstance(factory.connector, UpstreamConnector)
        assert isinstance(factory.connector, UpstreamConnector)
        self.assertEqual(factory.connector.upstream.port, 3128)
        resolver = factory.connector.resolver
        assert isinstance(resolver, ThreadedResolver)
        self.assertEqual(resolver.threads, 4)

    def test_outgoingAddress(self) -> None:
        """
        C{--outgoing-address} (one IPv4 and one IPv6 address at most) is
        checked by binding to it once, at start-up, and given to the
        connector, or to the parent's (C{--upstream}).
        """
        checked: list[str] = []
        self.patch(tap, "checkSourceAddress", checked.append)
        self.patch(tap, "canConnectDirectly", lambda reactor: True)
        self.patch(connector, "canConnectDirectly", lambda *args: True)
        self.patch(upstream, "canConnectDirectly", lambda *args: True)
        argv = ("--outgoing-address", "192.0.2.10", "--outgoing-address", "2001:db8::a")
        factory = makeFactory(parse(*argv), MemoryReactorClock())
        assert isinstance(factory.connector, HostnameConnector)
        self.assertEqual(
            factory.connector._sources, {4: "192.0.2.10", 6: "2001:db8::a"}
        )
        self.assertEqual(checked, ["192.0.2.10", "2001:db8::a"])
        factory = makeFactory(
            parse(*argv, "--upstream", "http://127.0.0.1:3128"), MemoryReactorClock()
        )
        assert isinstance(factory.connector, UpstreamConnector)
        self.assertEqual(
            factory.connector._sourceAddresses, ("192.0.2.10", "2001:db8::a")
        )

    def test_badOutgoingAddress(self) -> None:
        """
        What is not an IP address, a second of one version, or an address
        that cannot be bound (not one of this host's) is refused while the
        options are read; any, on a reactor that cannot connect by hand,
        when the factory is made.
        """
        for argv in (
            ("--outgoing-address", "egress.example"),
            ("--outgoing-address", "192.0.2.1", "--outgoing-address", "192.0.2.2"),
        ):
            self.assertRaises(UsageError, parse, *argv)

        def cannotBind(address: str) -> None:
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

        self.patch(tap, "checkSourceAddress", cannotBind)
        error = self.assertRaises(UsageError, parse, "--outgoing-address", "192.0.2.1")
        self.assertIn("192.0.2.1: Cannot assign requested address", str(error))
        self.assertIn("is it an address of this host?", str(error))
        # A link-local address without its zone is told so.
        error = self.assertRaises(UsageError, parse, "--outgoing-address", "fe80::1")
        self.assertIn("needs its zone, as in fe80::1%eth0", str(error))
        self.patch(tap, "checkSourceAddress", lambda address: None)
        options = parse("--outgoing-address", "192.0.2.1")
        error = self.assertRaises(
            UsageError, makeFactory, options, MemoryReactorClock()
        )
        self.assertIn("POSIX", str(error))

    def test_badUpstream(self) -> None:
        """
        A URL that is not http(s)://host:port, C{--upstream-ca} alone or
        with an C{http://} parent, and a CA file that cannot be read or holds
        no certificate are usage errors while the options are parsed (so
        twistd prints one line, not a traceback).
        """
        self.assertRaises(UsageError, parse, "--upstream", "socks5://h:1")
        self.assertRaises(UsageError, parse, "--upstream-ca", "ca.pem")
        notPEM = self.mktemp()
        with open(notPEM, "w") as f:
            f.write("not a certificate\n")
        for parent, ca, message in [
            ("https://parent.example:443", "/nonexistent", "No such file"),
            ("https://parent.example:443", notPEM, notPEM),
            ("http://parent.example:3128", "/nonexistent", "https://"),
        ]:
            e = self.assertRaises(
                UsageError, parse, "--upstream", parent, "--upstream-ca", ca
            )
            self.assertIn("--upstream-ca", str(e))
            self.assertIn(message, str(e))

    def test_upstreamCredentials(self) -> None:
        """
        C{--upstream-credentials PATH} gives the parent proxy the user name
        and password the file holds, so that the command line need not; it
        needs C{--upstream}, and a file that cannot be used is a usage error.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice:s3cret\n")
        options = parse(
            "--upstream", "http://127.0.0.1:3128", "--upstream-credentials", path
        )
        self.assertEqual(
            (options["upstream"].username, options["upstream"].password),
            ("alice", "s3cret"),
        )
        factory = makeFactory(options, MemoryReactorClock())
        assert isinstance(factory.connector, UpstreamConnector)
        self.assertEqual(factory.connector.upstream.username, "alice")
        e = self.assertRaises(UsageError, parse, "--upstream-credentials", path)
        self.assertIn("needs --upstream", str(e))
        for url, credentials in [
            ("http://bob:pw@127.0.0.1:3128", path),
            ("http://127.0.0.1:3128", "/nonexistent"),
        ]:
            e = self.assertRaises(
                UsageError,
                parse,
                "--upstream",
                url,
                "--upstream-credentials",
                credentials,
            )
            self.assertIn("--upstream-credentials", str(e))
            self.assertNotIn("s3cret", str(e))

    def test_badMetricsEndpoint(self) -> None:
        """
        A C{--metrics} endpoint string that cannot be parsed is a usage
        error, as for C{--listen}.
        """
        self.patch(tap, "requirePrometheus", lambda: None)
        e = self.assertRaises(UsageError, parse, "--metrics", "bogus:1")
        self.assertIn("--metrics bogus:1", str(e))

    def test_accessLogChecked(self) -> None:
        """
        An access log path that cannot be opened for appending is a usage
        error; C{-} (standard output) with C{--workers} is one too, since a
        worker's standard output carries its log.
        """
        missing = self.mktemp() + "/missing"
        e = self.assertRaises(UsageError, parse, "--access-log", missing + "/x.log")
        self.assertIn("--access-log", str(e))
        self.assertTrue(str(e).endswith(": no directory " + os.path.abspath(missing)))
        e = self.assertRaises(UsageError, parse, "--access-log", "-", "--workers", "2")
        self.assertIn("--workers", str(e))
        parse("--access-log", "-")
        e = self.assertRaises(UsageError, parse, "--access-log", ".")
        self.assertIn("directory", str(e))
        # Checked without creating it (created as root before -u drops
        # privileges, the workers could not open it).
        path = self.mktemp()
        parse("--access-log", path)
        self.assertFalse(os.path.exists(path))
        with open(path, "w"):
            pass
        parse("--access-log", path)


class StopInTurnTests(SynchronousTestCase):
    """
    Tests for L{StopInTurn}, which runs the C{--workers} supervisor and
    the metrics listener of the main process.
    """

    def test_lastAddedStopsFirst(self) -> None:
        """
        The last child added stops first, and the one before only once it
        has stopped; the parent's Deferred fires once all have.
        """
        from twisted.application.service import Service
        from twisted.internet.defer import Deferred

        first, second = Service(), Service()
        secondStopped: Deferred[None] = Deferred()
        second.stopService = lambda: (  # type: ignore[method-assign]
            Service.stopService(second),
            secondStopped,
        )[1]
        parent = StopInTurn()
        first.setServiceParent(parent)
        second.setServiceParent(parent)
        parent.startService()
        stopped = parent.stopService()
        self.assertFalse(second.running)
        self.assertTrue(first.running)
        self.assertNoResult(stopped)
        secondStopped.callback(None)
        self.assertFalse(first.running)
        self.assertIsNone(self.successResultOf(stopped))

    def test_failureToStop(self) -> None:
        """
        A child that fails to stop is logged, and the next one stops all
        the same.
        """
        from twisted.application.service import Service

        first, second = Service(), Service()

        def fail() -> None:
            raise ZeroDivisionError()

        second.stopService = fail  # type: ignore[method-assign]
        parent = StopInTurn()
        first.setServiceParent(parent)
        second.setServiceParent(parent)
        parent.startService()
        self.assertIsNone(self.successResultOf(parent.stopService()))
        self.assertFalse(first.running)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
