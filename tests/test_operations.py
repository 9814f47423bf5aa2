"""
Tests for running the proxy in production: the access log, the metrics, the
service and its graceful drain.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.server import Site

from tests.fakes import FakeGetaddrinfo, ManualWorkers, ThreadReactor
from tests.test_resolver import RecordingReceiver
from tests.test_server import PendingChecker, ProxyTestMixin, RecordingConnector
from tunnel.accesslog import (
    ACCESS_FIELDS,
    ACCESS_JSON_FIELDS,
    AccessLogObserver,
    escapeField,
    formatAccessJSON,
    formatAccessText,
)
from tunnel.auth import portalFromCheckers
from tunnel.connector import HostnameConnector
from tunnel.interfaces import LookupsBusy, UpstreamRefused
from tunnel.metrics import MetricsUnavailable, ProxyMetrics, metricsResource
from tunnel.resolver import ThreadedResolver
from tunnel.server import ConnectProxyFactory
from tunnel.service import ProxyService, StopOnSignals
from tunnel.tap import Options

EVENT: dict[str, Any] = {
    "tunnelEvent": True,
    "log_time": 1795000000.25,
    "client": "192.0.2.7:40000",
    "user": "alice",
    "target": "example.com:443",
    "connectedTo": "93.184.216.34:443",
    "status": 200,
    "bytesUp": 517,
    "bytesDown": 5123,
    "handshake": 0.0123,
    "duration": 2.5,
    "connect": 0.01,
    "refusal": None,
    "ended": "client-eof",
}


def lineCount(path: str) -> int:
    """
    How many lines the file at C{path} holds.
    """
    with open(path) as f:
        return len(f.read().splitlines())


class AccessLogFormatTests(SynchronousTestCase):
    """
    The two access log formats.
    """

    def test_text(self) -> None:
        """
        The text format is one line of the documented fields in order.
        """
        self.assertEqual(
            formatAccessText(EVENT),
            "2026-11-18T11:06:40.250Z 192.0.2.7:40000 alice example.com:443 "
            "93.184.216.34:443 200 517 5123 12.3 2500.0 client-eof",
        )

    def test_textSpaces(self) -> None:
        """
        A user name with spaces or control characters (a name the client
        claimed) can neither split the line nor start a forged record.
        """
        line = formatAccessText({**EVENT, "user": "a b%"})
        self.assertEqual(len(line.split(" ")), len(ACCESS_FIELDS))
        self.assertIn(" a%20b%25 ", line)
        forged = formatAccessText({**EVENT, "user": "x\n2026 10.9.9.9\tbob\ré"})
        self.assertNotIn("\n", forged)
        self.assertIn(" x%0A2026%2010.9.9.9%09bob%0D%C3%A9 ", forged)

    def test_json(self) -> None:
        """
        The JSON format is one object with the text format's fields, in
        their order, then the three that say why the proxy refused or
        failed the connection (null for one it tunnelled); a connection
        that got no answer has a null status.
        """
        record = json.loads(formatAccessJSON(EVENT))
        self.assertEqual(list(record), list(ACCESS_JSON_FIELDS))
        self.assertEqual(list(record)[: len(ACCESS_FIELDS)], list(ACCESS_FIELDS))
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["handshake_ms"], 12.3)
        self.assertEqual(
            (record["rule"], record["limit"], record["parent_status"]),
            (None, None, None),
        )
        left = json.loads(formatAccessJSON({**EVENT, "status": "-"}))
        self.assertIsNone(left["status"])

    def test_jsonReasons(self) -> None:
        """
        The JSON format carries the event's C{refusal}, C{limit} and
        C{parentStatus} as C{rule}, C{limit} and C{parent_status}.
        """
        record = json.loads(
            formatAccessJSON(
                {**EVENT, "refusal": "port", "limit": "draining", "parentStatus": 407}
            )
        )
        self.assertEqual(
            (record["rule"], record["limit"], record["parent_status"]),
            ("port", "draining", 407),
        )

    def test_escapeField(self) -> None:
        """
        L{escapeField} leaves visible ASCII other than C{%} alone and
        percent-encodes C{%}, spaces, controls and non-ASCII (as UTF-8),
        whatever else the field holds.
        """
        for text, escaped in [
            ("alice", "alice"),
            ("!~", "!~"),
            ("%", "%25"),
            ("50%", "50%25"),
            (" ", "%20"),
            ("\n", "%0A"),
            ("\x7f", "%7F"),
            ("é", "%C3%A9"),
            ("a!~ b", "a!~%20b"),
            ("$&", "$&"),
            ("\x00", "%00"),
            ("\x80", "%C2%80"),
            ("a%b%", "a%25b%25"),
            ("\u2028\U0001f600", "%E2%80%A8%F0%9F%98%80"),
        ]:
            self.assertEqual(escapeField(text), escaped, text)

    def test_milliseconds(self) -> None:
        """
        The handshake and the duration are given in milliseconds with one
        decimal, in both formats.
        """
        event = {**EVENT, "handshake": 1.23456, "duration": 2.34567}
        self.assertTrue(formatAccessText(event).endswith(" 1234.6 2345.7 client-eof"))
        record = json.loads(formatAccessJSON(event))
        self.assertEqual(
            (record["handshake_ms"], record["duration_ms"]), (1234.6, 2345.7)
        )

    def test_jsonUnicode(self) -> None:
        """
        The JSON format writes non-ASCII text as UTF-8, not as escapes.
        """
        self.assertIn('"user":"zoë"', formatAccessJSON({**EVENT, "user": "zoë"}))

    def test_jsonLineBreaks(self) -> None:
        """
        A user name holding characters that readers take for line breaks
        (NEL, U+2028, U+2029) or that reorder text on a terminal (U+202E,
        and the tag characters beyond the Basic Multilingual Plane) is
        written with JSON escapes: the record stays one line, by any
        reader's count, and reads back as the same name.
        """
        user = "a\x85b\u2028c\u2029d\u202ee\U000e0001f\x9b"
        line = formatAccessJSON({**EVENT, "user": user})
        self.assertEqual(line.splitlines(), [line])
        self.assertTrue(line.isprintable())
        self.assertEqual(json.loads(line)["user"], user)
        self.assertIn("\\u2028", line)
        self.assertIn("\\udb40\\udc01", line)

    def test_millisecondsOfTime(self) -> None:
        """
        The time has three digits of milliseconds, leading zeros kept.
        """
        line = formatAccessText({**EVENT, "log_time": 1795000000.05})
        self.assertTrue(line.startswith("2026-11-18T11:06:40.050Z "), line)

    def test_timeOfEachRecord(self) -> None:
        """
        Each record has its own time, to the millisecond, whether it falls
        in the same second as the record before, the next one, or (the
        clock set back) an earlier one.
        """
        for when, shown in [
            (1795000000.999, "2026-11-18T11:06:40.999Z"),
            (1795000000.001, "2026-11-18T11:06:40.001Z"),
            (1795000001.25, "2026-11-18T11:06:41.250Z"),
            (1795000000.5, "2026-11-18T11:06:40.500Z"),
            (1795086400.0, "2026-11-19T11:06:40.000Z"),
        ]:
            line = formatAccessText({**EVENT, "log_time": when})
            self.assertEqual(line.split(" ")[0], shown)


class AccessLogObserverTests(SynchronousTestCase):
    """
    Tests for L{AccessLogObserver}.
    """

    def test_writesTunnelEventsOnly(self) -> None:
        """
        Only tunnel events are written, one line each.
        """
        path = self.mktemp()
        observer = AccessLogObserver(path, "json")
        observer({"log_format": "something else"})
        observer(EVENT)
        observer.close()
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertEqual(json.loads(lines[0])["user"], "alice")

    def test_reopen(self) -> None:
        """
        After logrotate moves the file, C{reopen} starts a new one.
        """
        path = self.mktemp()
        observer = AccessLogObserver(path)
        observer(EVENT)
        os.rename(path, path + ".1")
        observer(EVENT)
        observer.reopen()
        observer(EVENT)
        observer.close()
        self.assertEqual(lineCount(path + ".1"), 2)
        self.assertEqual(lineCount(path), 1)

    def test_reopenIfMoved(self) -> None:
        """
        C{reopenIfMoved} reopens only when the path no longer names the file
        open: not while it does, but after a rename, and after a removal
        (making the file anew).
        """
        path = self.mktemp()
        observer = AccessLogObserver(path)
        self.assertFalse(observer.reopenIfMoved())
        observer(EVENT)
        os.rename(path, path + ".1")
        self.assertTrue(observer.reopenIfMoved())
        observer(EVENT)
        self.assertFalse(observer.reopenIfMoved())
        os.remove(path)
        self.assertTrue(observer.reopenIfMoved())
        observer(EVENT)
        observer.close()
        self.assertEqual(lineCount(path + ".1"), 1)
        self.assertEqual(lineCount(path), 1)

    def test_reopenIfMovedCannotTell(self) -> None:
        """
        A path that cannot be looked at (a log opened as root in a
        directory the user the proxy runs as cannot search) is not taken
        for a removed file: no reopen is tried, so none fails, and records
        go on to the file open.
        """
        path = self.mktemp()
        observer = AccessLogObserver(path)

        def denied(path: str) -> os.stat_result:
            raise PermissionError(errno.EACCES, "Permission denied", path)

        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        self.patch(os, "stat", denied)
        opening = self.patch(builtins, "open", denied)
        self.assertFalse(observer.reopenIfMoved())
        observer(EVENT)
        observer.close()
        opening.restore()
        self.assertEqual([formatEvent(event) for event in events], [])
        self.assertEqual(lineCount(path), 1)

    def test_stdout(self) -> None:
        """
        C{-} writes to standard output, which reopen and close leave alone.
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        observer = AccessLogObserver("-")
        observer(EVENT)
        observer.reopen()
        self.assertFalse(observer.reopenIfMoved())
        observer(EVENT)
        observer.close()
        self.assertFalse(stdout.closed)
        self.assertEqual(stdout.getvalue(), (formatAccessText(EVENT) + "\n") * 2)

    def test_badFormat(self) -> None:
        """
        Only text and json are formats.  (The listener is given, on port 0:
        the default one, 127.0.0.1:8080, is tried while the options are
        parsed, and where it is in use that would be the usage error.)
        """
        self.assertRaises(ValueError, AccessLogObserver, self.mktemp(), "xml")
        options = Options()
        e = self.assertRaises(
            UsageError,
            options.parseOptions,
            ["--listen", "tcp:0:interface=127.0.0.1", "--access-log-format", "xml"],
        )
        self.assertIn("--access-log-format", str(e))

    def test_lineBuffered(self) -> None:
        """
        Each record reaches the file as soon as it is written, before the
        log is closed (for C{tail -f}, and so a crash loses nothing).
        """
        path = self.mktemp()
        observer = AccessLogObserver(path)
        self.addCleanup(observer.close)
        observer(EVENT)
        with open(path) as f:
            self.assertEqual(f.read(), formatAccessText(EVENT) + "\n")

    def test_writeFailures(self) -> None:
        """
        A file that cannot be written (a full disk) loses the records
        meanwhile and logs one error when that starts and one line when it
        ends, not a traceback for each record.
        """
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        observer = AccessLogObserver(self.mktemp())
        self.addCleanup(observer.close)
        written: list[str] = []
        full = [True]

        class Disk(io.StringIO):
            def write(self, text: str) -> int:
                if full[0]:
                    raise OSError(28, "No space left on device")
                written.append(text)
                return len(text)

        # The file the observer opened is replaced: closed here, or it
        # would be left to the garbage collector.
        observer._file.close()
        observer._file = Disk()
        for _ in range(3):
            observer(EVENT)
        full[0] = False
        observer(EVENT)
        observer(EVENT)
        self.assertEqual(written, [formatAccessText(EVENT) + "\n"] * 2)
        messages = [(e["log_level"], formatEvent(e)) for e in events]
        self.assertEqual(
            [level for level, text in messages],
            [LogLevel.error, LogLevel.info],
        )
        self.assertIn("No space left on device", messages[0][1])
        self.assertIn("Writing the access log", messages[1][1])

    def test_reopenFailures(self) -> None:
        """
        A reopen that fails (no descriptor left) logs one error and keeps
        writing to the file open before; each record tries again until a
        reopen succeeds, which says so.
        """
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        path = self.mktemp()
        observer = AccessLogObserver(path)
        self.addCleanup(observer.close)
        os.rename(path, path + ".1")
        real = observer._open
        failing = [True]

        def open() -> Any:
            if failing[0]:
                raise OSError(24, "Too many open files")
            return real()

        self.patch(observer, "_open", open)
        self.assertFalse(observer.reopen())
        observer(EVENT)
        observer(EVENT)
        failing[0] = False
        observer(EVENT)
        self.assertEqual(lineCount(path + ".1"), 2)
        self.assertEqual(lineCount(path), 1)
        messages = [(e["log_level"], formatEvent(e)) for e in events]
        self.assertEqual(
            [level for level, text in messages], [LogLevel.error, LogLevel.info]
        )
        self.assertIn("Too many open files", messages[0][1])

    def test_reopenAndCloseCloseFiles(self) -> None:
        """
        C{reopen} closes the file it stops writing to, and C{close} the one
        it writes to.
        """
        observer = AccessLogObserver(self.mktemp())
        previous = observer._file
        observer.reopen()
        self.assertTrue(previous.closed)
        current = observer._file
        self.assertFalse(current.closed)
        observer.close()
        self.assertTrue(current.closed)

    def test_appends(self) -> None:
        """
        An access log that exists is appended to, not replaced (a restart
        keeps the records before it).
        """
        path = self.mktemp()
        for _ in range(2):
            observer = AccessLogObserver(path)
            observer(EVENT)
            observer.close()
        self.assertEqual(lineCount(path), 2)


class AccessLogReasonTests(ProxyTestMixin, SynchronousTestCase):
    """
    A JSON access log written by a running proxy says why it refused or
    failed each connection it did not tunnel.
    """

    def setUp(self) -> None:
        super().setUp()
        self.path = self.mktemp()
        observer = AccessLogObserver(self.path, "json")
        self.addCleanup(observer.close)
        self.factory.tunnelObservers.append(observer)

    def records(self) -> list[dict[str, Any]]:
        """
        The records written so far.
        """
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def reasons(self, record: dict[str, Any]) -> tuple[Any, Any, Any]:
        """
        A record's C{rule}, C{limit} and C{parent_status}.
        """
        return record["rule"], record["limit"], record["parent_status"]

    def test_rule(self) -> None:
        """
        A request the policy refuses names the rule that refused it.
        """
        self.proxy.dataReceived(
            b"CONNECT target.example:22 HTTP/1.1\r\nHost: target.example:22\r\n\r\n"
        )
        [record] = self.records()
        self.assertEqual(record["status"], 403)
        self.assertEqual(self.reasons(record), ("port", None, None))
        self.assertIn("--allow-port 22", record["detail"])

    def test_limit(self) -> None:
        """
        A request refused by one of the proxy's limits names the limit.
        """
        self.proxy.dataReceived(
            b"CONNECT target.example:443 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.connector.endpoint.attempts[0][1].errback(LookupsBusy())
        [record] = self.records()
        self.assertEqual((record["status"], record["ended"]), (503, "target-failed"))
        self.assertEqual(self.reasons(record), (None, "name-lookups", None))
        self.assertEqual(
            record["detail"], "Too many name lookups are waiting; try again."
        )

    def test_targetRefused(self) -> None:
        """
        A 502 says why in C{detail}: a target that refused the connection
        is told from a name that does not resolve.
        """
        for failure in [ConnectionRefusedError(), DNSLookupError()]:
            proxy, _client = self.connectClient()
            proxy.dataReceived(
                b"CONNECT target.example:443 HTTP/1.1\r\nHost: h\r\n\r\n"
            )
            self.connector.endpoint.attempts[-1][1].errback(failure)
        records = self.records()
        self.assertEqual(
            [record["detail"] for record in records],
            [
                "The target refused the connection.",
                "The target host name does not resolve.",
            ],
        )
        self.assertEqual({record["status"] for record in records}, {502})

    def test_parentStatus(self) -> None:
        """
        A parent proxy's refusal gives its status.
        """
        self.proxy.dataReceived(
            b"CONNECT target.example:443 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.connector.endpoint.attempts[0][1].errback(
            UpstreamRefused(403, "Forbidden")
        )
        [record] = self.records()
        self.assertEqual(record["status"], 502)
        self.assertEqual(self.reasons(record), (None, None, 403))

    def test_tunnel(self) -> None:
        """
        A tunnel has none of the three.
        """
        target, _ = self.establish()
        self.proxy.readConnectionLost()
        target.readConnectionLost()
        self.closeBoth(target)
        [record] = self.records()
        self.assertEqual(record["status"], 200)
        self.assertEqual(self.reasons(record), (None, None, None))
        self.assertIsNone(record["detail"])


class MetricsTests(SynchronousTestCase):
    """
    Tests for L{ProxyMetrics}.
    """

    def sample(self, metrics: ProxyMetrics, name: str, **labels: str) -> float:
        """
        Read one sample from the metrics' registry.
        """
        value = metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    def test_counts(self) -> None:
        """
        Tunnel events move the counters and histograms; refusals are counted
        by kind; other events are ignored.
        """
        metrics = ProxyMetrics()
        metrics(EVENT)
        metrics({**EVENT, "status": 407, "refusal": "auth", "connect": None})
        metrics({**EVENT, "status": 403, "refusal": "port", "connect": None})
        metrics(
            {**EVENT, "status": 429, "limit": "partial-head-bytes", "connect": None}
        )
        metrics({"log_format": "not a tunnel"})
        self.assertEqual(
            self.sample(
                metrics, "tunnel_connections_total", status="200", ended="client-eof"
            ),
            1,
        )
        self.assertEqual(
            self.sample(metrics, "tunnel_bytes_total", direction="up"), 517 * 4
        )
        self.assertEqual(self.sample(metrics, "tunnel_auth_failures_total"), 1)
        self.assertEqual(
            self.sample(metrics, "tunnel_policy_denials_total", rule="port"), 1
        )
        self.assertEqual(
            self.sample(
                metrics, "tunnel_limit_refusals_total", limit="partial-head-bytes"
            ),
            1,
        )
        self.assertEqual(self.sample(metrics, "tunnel_connect_seconds_count"), 1)
        self.assertEqual(self.sample(metrics, "tunnel_duration_seconds_count"), 1)

    def test_gauges(self) -> None:
        """
        The gauges read the factories' open connections when scraped.
        """
        clock = MemoryReactorClock()
        factory = ConnectProxyFactory(reactor=clock)
        metrics = ProxyMetrics([factory])
        proxy = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert proxy is not None
        from tests.test_server import HalfCloseTransport

        proxy.makeConnection(HalfCloseTransport())
        self.assertEqual(self.sample(metrics, "tunnel_handshakes_in_progress"), 1)
        self.assertEqual(self.sample(metrics, "tunnel_open"), 0)
        factory.relaying = 1
        self.assertEqual(self.sample(metrics, "tunnel_open"), 1)
        self.assertEqual(self.sample(metrics, "tunnel_handshakes_in_progress"), 0)

    def test_capacityGauge(self) -> None:
        """
        C{tunnel_max_connections} is the factories' C{maxTunnels} added up,
        read when scraped (so a limit lowered after start shows); it has no
        sample while a factory has no limit, or without a factory (a limit
        of 0 would read as nothing allowed).
        """
        clock = MemoryReactorClock()
        limited = ConnectProxyFactory(reactor=clock, maxTunnels=100)
        other = ConnectProxyFactory(reactor=clock, maxTunnels=20)
        metrics = ProxyMetrics([limited, other])
        self.assertEqual(self.sample(metrics, "tunnel_max_connections"), 120)
        limited.maxTunnels = 50
        self.assertEqual(self.sample(metrics, "tunnel_max_connections"), 70)
        unlimited = ProxyMetrics([limited, ConnectProxyFactory(reactor=clock)])
        self.assertIsNone(unlimited.registry.get_sample_value("tunnel_max_connections"))
        self.assertIsNone(
            ProxyMetrics([]).registry.get_sample_value("tunnel_max_connections")
        )

    def test_lookupGauges(self) -> None:
        """
        The lookup gauges read the running and waiting lookups of the
        factories' resolvers, each resolver once however many factories
        share it; a connector without a L{ThreadedResolver} adds nothing.
        The counters count the C{getaddrinfo} calls completed and the
        lookups answered from the answers kept.
        """
        workers = ManualWorkers()
        resolver = ThreadedResolver(
            ThreadReactor(),
            threads=1,
            getaddrinfo=FakeGetaddrinfo({"a.test": ["192.0.2.1"]}),
            workers=workers,
        )
        clock = MemoryReactorClock()
        connector = HostnameConnector(clock, resolver=resolver)
        factories = [
            ConnectProxyFactory(connector, reactor=clock),
            ConnectProxyFactory(connector, reactor=clock),
            ConnectProxyFactory(RecordingConnector(), reactor=clock),
        ]
        metrics = ProxyMetrics(factories)
        receiver = RecordingReceiver()
        for name in ("a.test", "b.test", "c.test"):
            resolver.resolveHostName(receiver, name)
        self.assertEqual(self.sample(metrics, "tunnel_name_lookups_running"), 1)
        self.assertEqual(self.sample(metrics, "tunnel_name_lookups_waiting"), 2)
        self.assertEqual(self.sample(metrics, "tunnel_name_lookups_total"), 0)
        workers.runNext()
        self.assertEqual(self.sample(metrics, "tunnel_name_lookups_waiting"), 1)
        self.assertEqual(self.sample(metrics, "tunnel_name_lookups_total"), 1)
        resolver.resolveHostName(receiver, "a.test")
        resolver.resolveHostName(receiver, "a.test")
        self.assertEqual(self.sample(metrics, "tunnel_name_lookups_cached_total"), 2)
        self.assertEqual(self.sample(metrics, "tunnel_name_lookups_total"), 1)

    def test_answeredNotInProgress(self) -> None:
        """
        A connection that got its answer (here a 400) and is lingering
        until the client closes is no longer a handshake in progress,
        though it stays open; once closed it is gone from every gauge.
        """
        clock = MemoryReactorClock()
        factory = ConnectProxyFactory(reactor=clock)
        metrics = ProxyMetrics([factory])
        from tests.test_server import HalfCloseTransport

        answered = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        waiting = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        assert answered is not None and waiting is not None
        answered.makeConnection(HalfCloseTransport())
        waiting.makeConnection(HalfCloseTransport())
        answered.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual(self.sample(metrics, "tunnel_handshakes_in_progress"), 1)
        answered.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual(self.sample(metrics, "tunnel_handshakes_in_progress"), 1)
        waiting.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sample(metrics, "tunnel_handshakes_in_progress"), 0)
        self.assertEqual(factory.answered, 0)

    def test_unavailable(self) -> None:
        """
        Without prometheus_client, L{ProxyMetrics} and C{--metrics} fail
        with a message that says what to install.
        """
        realImport = builtins.__import__

        def noPrometheus(name: str, *args: Any, **kwargs: Any) -> Any:
            if name.startswith("prometheus_client"):
                raise ImportError(name)
            return realImport(name, *args, **kwargs)

        self.patch(builtins, "__import__", noPrometheus)
        e = self.assertRaises(MetricsUnavailable, ProxyMetrics)
        self.assertIn(".[metrics]", str(e))
        options = Options()
        e2 = self.assertRaises(
            UsageError,
            options.parseOptions,
            ["--listen", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:9100"],
        )
        self.assertIn(".[metrics]", str(e2))


class ServiceObserverTests(SynchronousTestCase):
    """
    L{ProxyService} hands its observers to the factory while it runs.
    """

    def test_observersWhileRunning(self) -> None:
        """
        The observers are the factory's tunnel observers from start to stop,
        once each even if the service is started twice (by hand, then by
        its parent); stopping a second time finds them gone and does not
        fail.
        """
        factory = ConnectProxyFactory(reactor=MemoryReactorClock())
        observer = AccessLogObserver(self.mktemp())
        service = ProxyService(factory, observers=[observer])
        service.startService()
        service.startService()
        self.assertEqual(factory.tunnelObservers, [observer])
        self.successResultOf(service.stopService())
        self.assertEqual(factory.tunnelObservers, [])
        self.successResultOf(service.stopService())
        self.assertEqual(factory.tunnelObservers, [])

    def test_startCatchesUpOnRotation(self) -> None:
        """
        An access log rotated after it was opened but before the service
        started (a worker starting while logrotate runs: the SIGUSR1 came
        before anything handled it) is reopened when the service starts, so
        records go to the file the path names, not to the rotated one.
        """
        path = self.mktemp()
        observer = AccessLogObserver(path)
        os.rename(path, path + ".1")
        service = ProxyService(
            ConnectProxyFactory(reactor=MemoryReactorClock()), observers=[observer]
        )
        service.startService()
        observer(EVENT)
        self.successResultOf(service.stopService())
        self.assertEqual(lineCount(path), 1)
        with open(path + ".1") as f:
            self.assertEqual(f.read(), "")

    def test_listenersStoppedOnceStopping(self) -> None:
        """
        C{listenersStopped} is L{None} until C{stopService} is called, then a
        Deferred that fires once the listeners are closed.
        """
        service = ProxyService(ConnectProxyFactory(reactor=MemoryReactorClock()))
        self.assertIsNone(service.listenersStopped)
        service.startService()
        stopped = service.stopService()
        assert service.listenersStopped is not None
        self.assertIsNone(self.successResultOf(service.listenersStopped))
        self.successResultOf(stopped)

    def test_restart(self) -> None:
        """
        A service stopped and started again serves as before: requests are
        no longer refused as during the drain, and the access log closed on
        stop is open again and written to.
        """
        factory = ConnectProxyFactory(reactor=MemoryReactorClock())
        path = self.mktemp()
        service = ProxyService(factory, observers=[AccessLogObserver(path)])
        service.startService()
        self.successResultOf(service.stopService())
        self.assertTrue(factory.draining)
        service.startService()
        self.assertFalse(factory.draining)
        proxy = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert proxy is not None
        from tests.test_server import HalfCloseTransport

        client = HalfCloseTransport()
        proxy.makeConnection(client)
        proxy.dataReceived(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 403 "), client.value())
        proxy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(service.stopService())
        with open(path) as log:
            self.assertIn(" 127.0.0.1:443 - 403 ", log.read())

    def test_restartDuringDrain(self) -> None:
        """
        Starting the service again before its drain has finished is refused
        with a clear error (the drain still owns the connections and the
        observers); once the drain is over, it starts.
        """
        factory = ConnectProxyFactory(reactor=MemoryReactorClock())
        service = ProxyService(factory, observers=[AccessLogObserver(self.mktemp())])
        service.startService()
        proxy = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert proxy is not None
        from tests.test_server import HalfCloseTransport

        proxy.makeConnection(HalfCloseTransport())
        proxy.dataReceived(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n")
        stopped = service.stopService()
        self.assertRaises(RuntimeError, service.startService)
        proxy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        service.startService()
        self.assertEqual(factory.tunnelObservers, service.observers)
        self.successResultOf(service.stopService())


class DrainTests(ProxyTestMixin, SynchronousTestCase):
    """
    L{ConnectProxyFactory.drain} on a fake clock.
    """

    def test_nothingOpen(self) -> None:
        """
        With nothing open, the drain is done at once.
        """
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(self.factory.drain(30))

    def test_tunnelsFinish(self) -> None:
        """
        Open tunnels may finish; connections that have sent nothing are
        closed at once; the drain is done when the last one closes.
        """
        target, transport = self.establish()
        idle, idleClient = self.connectClient()
        done = self.factory.drain(30)
        self.assertTrue(idleClient.disconnecting)
        idle.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(done)
        self.proxy.dataReceived(b"still flowing")
        self.assertEqual(transport.value(), b"still flowing")
        self.proxy.readConnectionLost()
        target.readConnectionLost()
        self.closeBoth(target)
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_newRequestsRefused(self) -> None:
        """
        A request whose head completes during the drain gets a 503.
        """
        self.proxy.dataReceived(b"CONNECT target.example:443 HTTP/1.1\r\nHost: h\r\n")
        self.factory.drain(30)
        self.proxy.dataReceived(b"\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 503 "))

    def test_refusedBeforeAnyCheck(self) -> None:
        """
        During the drain a completed request gets the 503 before its
        credentials or its target are looked at: no password is checked
        for a request refused anyway, and one the policy would refuse gets
        the 503 too (as the README says), not a 403.
        """
        checker = PendingChecker()
        self.factory.portal = portalFromCheckers([checker])
        self.proxy.dataReceived(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: h\r\n")
        self.factory.drain(30)
        self.proxy.dataReceived(b"Proxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(checker.credentials, [])
        self.assertEqual(self.connector.targets, [])

    def test_drainRefusalNamesTarget(self) -> None:
        """
        A CONNECT refused with 503 for the drain is logged as a CONNECT to
        its target, like any refusal of a parsed request, and names the
        drain as the limit that refused it.
        """
        self.proxy.dataReceived(b"CONNECT target.example:443 HTTP/1.1\r\n")
        self.factory.drain(30)
        self.proxy.dataReceived(b"Host: h\r\n\r\n")
        [event] = self.tunnelEvents()
        self.assertEqual(event["status"], 503)
        self.assertEqual(event["target"], "target.example:443")
        self.assertIn(" CONNECT target.example:443 503 ", event["line"])
        self.assertEqual(event["limit"], "draining")
        self.assertTrue(event["line"].endswith(" refused (draining)"), event["line"])

    def test_loginOutlastsDrainStart(self) -> None:
        """
        A request whose login was still being checked when the drain began
        gets the 503 once the login succeeds, and no target is reached.
        """
        checker = PendingChecker()
        self.factory.portal = portalFromCheckers([checker])
        self.proxy.dataReceived(
            b"CONNECT target.example:443 HTTP/1.1\r\nHost: h\r\n"
            b"Proxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n"
        )
        self.factory.drain(30)
        checker.pending[0].callback(b"alice")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(self.connector.targets, [])

    def test_timeout(self) -> None:
        """
        After the drain timeout, what remains is aborted, and the drain is
        done when those connections are gone.
        """
        target, transport = self.establish()
        done = self.factory.drain(30)
        self.clock.advance(29)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnected)
        self.assertTrue(transport.disconnected)
        self.proxy.connectionLost(Failure(ConnectionLost()))
        target.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(done)
        [event] = self.tunnelEvents()
        self.assertEqual(event["ended"], "shutdown")

    def test_idleConnectionsEndAsShutdown(self) -> None:
        """
        A connection that had sent nothing when the drain began is logged as
        ended by the shutdown, not as left by its client.
        """
        done = self.factory.drain(30)
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        [event] = self.tunnelEvents()
        self.assertEqual((event["status"], event["ended"]), ("-", "shutdown"))

    def test_waitingForProxyHeaderClosed(self) -> None:
        """
        A connection still waiting for its PROXY header, with nothing sent,
        is closed when the drain begins.
        """
        self.proxy.connectionLost(Failure(ConnectionDone()))
        self.factory.proxyProtocol = True
        proxy, client = self.connectClient()
        done = self.factory.drain(30)
        self.assertTrue(client.disconnecting)
        proxy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class _Client(Protocol):
    """
    Collects what it receives; fires C{gotReply} on the first bytes after
    the 200, and C{lost} when the connection ends.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.gotData: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.gotData.called:
            self.gotData.callback(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class ServiceTests(TestCase):
    """
    L{ProxyService} over real loopback sockets.
    """

    @inlineCallbacks
    def test_drainRealSockets(self) -> Any:
        """
        Stopping the service stops accepting at once, lets an open tunnel
        keep working until it ends, and fires when it has; a metrics
        listener beside it (as C{makeService} has one) shows the drain and
        the open tunnel meanwhile; the access log and the metrics saw the
        tunnel, though the factory writes no tunnel line to the global log.
        """
        from tests.fakes import FakeResolver
        from tunnel import HostnameConnector
        from tunnel.policy import TunnelPolicy

        echoPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(_Echo)
        )
        self.addCleanup(echoPort.stopListening)
        factory = ConnectProxyFactory(
            HostnameConnector(reactor, resolver=FakeResolver()),
            reactor=reactor,
            policy=TunnelPolicy.fromStrings(ports=["any"], allowTo=["127.0.0.0/8"]),
            logTunnels=False,
        )
        logPath = self.mktemp()
        metrics = ProxyMetrics([factory])
        service = ProxyService(
            factory,
            drainTimeout=30,
            observers=[AccessLogObserver(logPath, "json"), metrics],
            reactor=reactor,
        )
        from twisted.application.internet import StreamServerEndpointService

        listener = StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), factory
        )
        listener.setServiceParent(service)
        metricsListener = StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            Site(metricsResource(metrics)),
        )
        # Beside the service, stopped once it has (as makeService has it).
        metricsListener.startService()
        self.addCleanup(
            lambda: metricsListener.stopService() if metricsListener.running else None
        )
        service.startService()

        # Should the test end early, stop the service (closing its listeners,
        # putting SIGUSR1 back, closing the access log) once the client is
        # gone, as the test itself does.
        def stopIfRunning() -> Deferred[None] | None:
            return service.stopService() if service.running else None

        self.addCleanup(stopIfRunning)
        proxyPort = (yield _portOf(listener)).getHost().port
        metricsPort = (yield _portOf(metricsListener)).getHost().port

        client = _Client()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort).connect(
            _OneProtocol(client)
        )

        def abortIfOpen() -> Deferred[None] | None:
            if client.lost.called:
                return None
            client.transport.abortConnection()  # type: ignore[union-attr]
            return client.lost

        self.addCleanup(abortIfOpen)
        target = b"127.0.0.1:%d" % (echoPort.getHost().port,)
        client.transport.write(  # type: ignore[union-attr]
            b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\nping"
        )
        yield client.gotData
        for _ in range(4):
            # "ping" comes back in at most as many reads as it has bytes.
            if b"ping" in client.received:
                break
            more: Deferred[bytes] = Deferred()
            client.gotData = more
            yield more
        self.assertIn(b"ping", client.received)

        body = yield _scrape(metricsPort)
        self.assertIn(b"tunnel_open 1.0", body)

        stopped = service.stopService()
        yield service.listenersStopped
        # The listener is closed: a new connection is refused.
        from twisted.internet.error import ConnectionRefusedError

        yield self.assertFailure(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort).connect(
                Factory.forProtocol(Protocol)
            ),
            ConnectionRefusedError,
        )
        self.assertNoResult(stopped)
        # The metrics still answer, and show the drain and the open tunnel.
        body = yield _scrape(metricsPort)
        self.assertIn(b"tunnel_draining 1.0", body)
        self.assertIn(b"tunnel_open 1.0", body)
        client.received = b""
        client.gotData = Deferred()
        client.transport.write(b"pong")  # type: ignore[union-attr]
        self.assertEqual((yield client.gotData), b"pong")
        client.transport.loseConnection()  # type: ignore[union-attr]
        yield client.lost
        yield stopped
        with open(logPath) as f:
            [line] = f.read().splitlines()
        record = json.loads(line)
        self.assertEqual((record["status"], record["target"]), (200, target.decode()))
        self.assertEqual(record["bytes_up"], 8)

    def test_usr1Reopens(self) -> Deferred[None]:
        """
        SIGUSR1 reopens the access log (for logrotate), and the previous
        handler (twistd's own log rotation) still runs.
        """
        calls: list[int] = []
        previous = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        path = self.mktemp()
        observer = AccessLogObserver(path)
        clock = MemoryReactorClock()
        clock.callFromThread = lambda f, *a: f(*a)  # type: ignore[attr-defined]
        service = ProxyService(
            ConnectProxyFactory(reactor=clock), observers=[observer], reactor=clock
        )
        service.startService()
        os.rename(path, path + ".1")
        os.kill(os.getpid(), signal.SIGUSR1)
        self.assertTrue(os.path.exists(path))
        self.assertEqual(calls, [signal.SIGUSR1])
        return service.stopService()

    def test_usr1WithoutAccessLog(self) -> Deferred[None]:
        """
        Without an access log, SIGUSR1 (logrotate, C{systemctl reload})
        still does not end the process: the service handles it while it
        runs, and then puts the previous handler back.
        """
        previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        clock = MemoryReactorClock()
        clock.callFromThread = lambda f, *a: f(*a)  # type: ignore[attr-defined]
        service = ProxyService(ConnectProxyFactory(reactor=clock), reactor=clock)
        service.startService()
        # With the default action this would kill the test run.
        os.kill(os.getpid(), signal.SIGUSR1)
        stopped = service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)
        return stopped


class StopOnSignalsTests(SynchronousTestCase):
    """
    Tests for L{StopOnSignals}.
    """

    def setUp(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.seen: list[int] = []
        self.stops: list[None] = []
        self.reactor = MemoryReactorClock()
        self.reactor.stop = lambda: self.stops.append(None)  # type: ignore[method-assign]

    def reactorHandler(self, signum: int, frame: object) -> None:
        """
        Stand in for the reactor's own handler.
        """
        self.seen.append(signum)

    def test_firstSignalOnly(self) -> None:
        """
        Only the first SIGTERM or SIGINT reaches the reactor's own handler
        (which logs it, stops, and makes twistd exit by that signal); later
        ones would stop a stopping reactor, a critical error in Twisted.
        """
        signal.signal(signal.SIGTERM, self.reactorHandler)
        signal.signal(signal.SIGINT, self.reactorHandler)
        stopping = StopOnSignals(self.reactor)
        stopping.install()
        for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            signal.getsignal(signum)(signum, None)  # type: ignore[misc, operator]
        self.assertEqual(self.seen, [signal.SIGTERM])
        self.assertTrue(stopping.stopping)
        stopping.stop()
        self.assertEqual(self.stops, [])

    def test_ignoredStaysIgnored(self) -> None:
        """
        A signal the process ignores (SIGINT for a job started in the
        background) stays ignored.
        """
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self.reactorHandler)
        StopOnSignals(self.reactor).install()
        self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_IGN)

    def test_stopThenSignal(self) -> None:
        """
        Once stopped by L{StopOnSignals.stop} (a worker whose supervisor is
        gone), a signal does not stop the reactor again.
        """
        signal.signal(signal.SIGTERM, self.reactorHandler)
        stopping = StopOnSignals(self.reactor)
        stopping.install()
        stopping.stop()
        stopping.stop()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # type: ignore[misc, operator]
        self.assertEqual((len(self.stops), self.seen), (1, []))


class _OneProtocol(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


def _portOf(service: Any) -> Deferred[Any]:
    """
    The listening port of a C{StreamServerEndpointService}, without taking
    it from the service (which needs it to stop listening).
    """
    port: Deferred[Any] = Deferred()

    def passOn(listening: Any) -> Any:
        port.callback(listening)
        return listening

    service._waitingForPort.addCallback(passOn)
    return port


def _scrape(port: int) -> Deferred[bytes]:
    agent = Agent(reactor)
    d = agent.request(b"GET", b"http://127.0.0.1:%d/metrics" % (port,))
    return d.addCallback(readBody)
