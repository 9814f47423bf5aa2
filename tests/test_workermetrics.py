"""
Tests for the metrics of C{--workers}: L{snapshotMetrics},
L{MetricsReporter}, L{WorkerMetrics}, and how the supervisor and the workers
carry them.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.test_operations import EVENT
from tunnel import tap
from tunnel.metrics import (
    MetricsReporter,
    ProxyMetrics,
    WorkerMetrics,
    snapshotMetrics,
)
from tunnel.server import ConnectProxyFactory
from tunnel.tap import Options, makeService
from tunnel.workers import WorkerSupervisor, formatMetricsRecord


def workerSnapshot(
    tunnels: int = 0, open: int = 0, draining: bool = False, bytesUp: int = 517
) -> str:
    """
    The snapshot of a worker that ended C{tunnels} tunnels (each C{EVENT}
    with C{bytesUp} bytes up) and has C{open} tunnels open.
    """
    factory = ConnectProxyFactory(reactor=Clock())
    factory.relaying = open
    factory.draining = draining
    metrics = ProxyMetrics([factory])
    for _ in range(tunnels):
        metrics({**EVENT, "bytesUp": bytesUp})
    return snapshotMetrics(metrics.registry)


def gaugeSnapshot(
    name: str = "tunnel_open",
    kind: str = "gauge",
    sampleName: str | None = None,
    labels: dict[str, Any] | None = None,
) -> str:
    """
    A snapshot of one gauge family, C{name}, with one sample of value 3.
    """
    family = {
        "name": name,
        "type": kind,
        "help": "A gauge.",
        "samples": [[sampleName or name, labels or {}, 3.0]],
    }
    return json.dumps([family])


def tunnelsCounted(metrics: WorkerMetrics) -> float:
    """
    The tunnels the totals count, whatever their status and ending.
    """
    return sum(
        float(s.value)
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "tunnel_connections_total"
    )


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    """
    Read one sample of the totals.
    """
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


class SnapshotTests(SynchronousTestCase):
    """
    Tests for L{snapshotMetrics}.
    """

    def test_families(self) -> None:
        """
        A snapshot is one line of JSON with every family's name, type, help
        and samples, without the C{_created} timestamps.
        """
        text = workerSnapshot(tunnels=2, open=3)
        self.assertNotIn("\n", text)
        families = {f["name"]: f for f in json.loads(text)}
        connections = families["tunnel_connections"]
        self.assertEqual(connections["type"], "counter")
        self.assertIn("Client connections ended", connections["help"])
        self.assertIn(
            ["tunnel_connections_total", {"status": "200", "ended": "client-eof"}, 2.0],
            connections["samples"],
        )
        self.assertEqual(families["tunnel_open"]["samples"], [["tunnel_open", {}, 3.0]])
        self.assertNotIn("_created", text)


class ReporterTests(SynchronousTestCase):
    """
    Tests for L{MetricsReporter}.
    """

    def test_reportsChanges(self) -> None:
        """
        The reporter sends a snapshot at start, then each interval only if
        the metrics changed, and once more when it stops.
        """
        clock = Clock()
        metrics = ProxyMetrics()
        sent: list[str] = []
        reporter = MetricsReporter(metrics.registry, sent.append, clock, interval=1)
        reporter.startService()
        self.assertEqual(len(sent), 1)
        clock.advance(1)
        self.assertEqual(len(sent), 1)
        metrics(EVENT)
        clock.advance(1)
        self.assertEqual(len(sent), 2)
        self.assertEqual(sent[1], snapshotMetrics(metrics.registry))
        metrics(EVENT)
        reporter.stopService()
        self.assertEqual(len(sent), 3)
        self.assertEqual(clock.getDelayedCalls(), [])


class WorkerMetricsTests(SynchronousTestCase):
    """
    Tests for L{WorkerMetrics}.
    """

    def test_sum(self) -> None:
        """
        Counters, histograms and gauges are the sums of the workers' last
        snapshots; C{tunnel_draining} is the largest, not the sum.
        """
        metrics = WorkerMetrics()
        metrics.report(0, workerSnapshot(tunnels=1, open=1))
        metrics.report(0, workerSnapshot(tunnels=2, open=2, draining=True))
        metrics.report(1, workerSnapshot(tunnels=5, open=4, draining=True))
        labels = {"status": "200", "ended": "client-eof"}
        self.assertEqual(sample(metrics, "tunnel_connections_total", **labels), 7)
        self.assertEqual(sample(metrics, "tunnel_bytes_total", direction="up"), 517 * 7)
        self.assertEqual(sample(metrics, "tunnel_connect_seconds_count"), 7)
        self.assertEqual(
            sample(metrics, "tunnel_duration_seconds_bucket", le="+Inf"), 7
        )
        self.assertEqual(sample(metrics, "tunnel_open"), 6)
        self.assertEqual(sample(metrics, "tunnel_draining"), 1)
        self.assertEqual(sample(metrics, "tunnel_workers_reporting"), 2)

    def test_retiredWorkerKeepsCounts(self) -> None:
        """
        When a worker ends, its counters and histograms stay in the totals
        (so they never go down) and its gauges leave them; its replacement
        counts on top.
        """
        metrics = WorkerMetrics()
        metrics.report(0, workerSnapshot(tunnels=3, open=2))
        metrics.report(1, workerSnapshot(tunnels=1, open=1))
        metrics.retire(0)
        labels = {"status": "200", "ended": "client-eof"}
        self.assertEqual(sample(metrics, "tunnel_connections_total", **labels), 4)
        self.assertEqual(sample(metrics, "tunnel_open"), 1)
        self.assertEqual(sample(metrics, "tunnel_workers_reporting"), 1)
        self.assertEqual(sample(metrics, "tunnel_worker_exits_total"), 1)
        metrics.report(0, workerSnapshot(tunnels=1, open=0))
        self.assertEqual(sample(metrics, "tunnel_connections_total", **labels), 5)
        self.assertEqual(sample(metrics, "tunnel_open"), 1)

    def test_bucketsInOrder(self) -> None:
        """
        A histogram's buckets come out in the order the worker sent them,
        followed by its count and sum, as the exposition format expects.
        """
        prometheus = __import__("prometheus_client")
        metrics = WorkerMetrics()
        metrics.report(0, workerSnapshot(tunnels=1))
        text = prometheus.generate_latest(metrics.registry).decode()
        lines = [
            line.split("{")[0].split(" ")[0]
            for line in text.splitlines()
            if line.startswith("tunnel_connect_seconds")
        ]
        self.assertEqual(
            lines[-2:], ["tunnel_connect_seconds_count", "tunnel_connect_seconds_sum"]
        )
        buckets = [
            line.split('le="')[1].split('"')[0]
            for line in text.splitlines()
            if line.startswith("tunnel_connect_seconds_bucket")
        ]
        self.assertEqual(buckets[-1], "+Inf")
        self.assertEqual(
            [float(b) for b in buckets[:-1]], sorted(float(b) for b in buckets[:-1])
        )

    def test_unreadable(self) -> None:
        """
        A snapshot that is not what L{snapshotMetrics} makes is logged and
        ignored: the worker's previous one stays.
        """
        metrics = WorkerMetrics()
        metrics.report(0, workerSnapshot(tunnels=1))
        for bad in ("not json", "[1]", '[{"name": "x"}]', "{}"):
            metrics.report(0, bad)
        labels = {"status": "200", "ended": "client-eof"}
        self.assertEqual(sample(metrics, "tunnel_connections_total", **labels), 1)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_badLabelsIgnored(self) -> None:
        """
        A snapshot with a label name or value that is not a string, or a
        label name Prometheus does not allow, is ignored, and the totals
        are still served.
        """
        prometheus = __import__("prometheus_client")
        metrics = WorkerMetrics()
        metrics.report(0, workerSnapshot(open=2))
        for labels in ({"a": 1}, {"a": None}, {"1": "x"}, {'a"b': "x"}):
            metrics.report(0, gaugeSnapshot(labels=labels))
        # A lone surrogate, which JSON can carry and UTF-8 cannot.
        metrics.report(0, gaugeSnapshot(labels={"a": "x"}).replace('"x"', '"\\ud800"'))
        self.assertEqual(sample(metrics, "tunnel_open"), 2)
        self.assertIn(b"tunnel_open 2.0", prometheus.generate_latest(metrics.registry))

    def test_badValuesIgnored(self) -> None:
        """
        A snapshot whose families or samples are not in the shape
        L{snapshotMetrics} makes, or whose values are not finite numbers,
        is ignored.
        """
        metrics = WorkerMetrics()
        metrics.report(0, workerSnapshot(open=2))
        good = json.loads(gaugeSnapshot())
        for bad in (
            [{**good[0], "samples": {}}],
            [{**good[0], "samples": [["tunnel_open", {}]]}],
            [{**good[0], "name": ["tunnel_open"]}],
            ["tunnel_open"],
        ):
            metrics.report(0, json.dumps(bad))
        for value in (
            '"1"',
            "true",
            "null",
            "NaN",
            "Infinity",
            "1" + "0" * 400,
            "1e308",
        ):
            metrics.report(0, gaugeSnapshot().replace("3.0", value))
        self.assertEqual(sample(metrics, "tunnel_open"), 2)

    def test_onlyTheProxysFamilies(self) -> None:
        """
        A snapshot naming a family the proxy does not define, or one of its
        families with another type or a sample of another name, is
        ignored: the totals keep nothing of it.
        """
        prometheus = __import__("prometheus_client")
        metrics = WorkerMetrics()
        metrics.report(0, workerSnapshot(tunnels=1))
        before = prometheus.generate_latest(metrics.registry)
        for number in range(100):
            metrics.report(0, gaugeSnapshot(name=f"forged_{number}"))
        for kind in ("counter", "bogus"):
            metrics.report(0, gaugeSnapshot(kind=kind))
        metrics.report(0, gaugeSnapshot(sampleName="tunnel_open_forged"))
        self.assertEqual(prometheus.generate_latest(metrics.registry), before)
        self.assertEqual(tunnelsCounted(metrics), 1)

    def test_samplesBounded(self) -> None:
        """
        A snapshot that would take the totals beyond 10000 samples (here,
        by label values never seen) is ignored.
        """
        metrics = WorkerMetrics()
        metrics.report(0, workerSnapshot(open=2))
        family = json.loads(gaugeSnapshot())[0]
        family["samples"] = [
            ["tunnel_open", {"forged": str(number)}, 1.0] for number in range(10_001)
        ]
        metrics.report(1, json.dumps([family]))
        self.assertEqual(sample(metrics, "tunnel_open"), 2)
        self.assertIsNone(sample(metrics, "tunnel_open", forged="0"))
        family["samples"] = family["samples"][:100]
        metrics.report(1, json.dumps([family]))
        self.assertEqual(sample(metrics, "tunnel_open", forged="0"), 1)

    def test_loggedOncePerWorker(self) -> None:
        """
        Unreadable snapshots are logged once per worker process: again only
        once the worker has ended and been replaced.
        """
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        metrics = WorkerMetrics()
        for worker in (0, 0, 1, 0, 1):
            metrics.report(worker, gaugeSnapshot(labels={"a": 1}))
        self.assertEqual([e["worker"] for e in events], [0, 1])
        metrics.retire(0)
        metrics.report(0, "not json")
        metrics.report(0, "not json")
        self.assertEqual([e["worker"] for e in events], [0, 1, 0])
        self.assertEqual(events[0]["log_level"], LogLevel.warn)


class _Protocol:
    number = 0


class SupervisorMetricsTests(SynchronousTestCase):
    """
    The supervisor hands the workers' metrics records to its
    L{WorkerMetrics}, and retires a worker's metrics when it ends.
    """

    def test_records(self) -> None:
        """
        A metrics record among a worker's log records reaches the metrics
        and is not logged; the worker's end retires its snapshot.
        """
        from tunnel.workers import _WorkerProtocol

        metrics = WorkerMetrics()
        supervisor = WorkerSupervisor(
            Clock(), [], ["--allow-port", "443"], 1, 1, metrics=metrics
        )
        protocol = _WorkerProtocol(supervisor, 3)
        record = formatMetricsRecord(workerSnapshot(tunnels=2, open=1)).encode()
        # Split across reads, as a pipe may deliver it.
        protocol.childDataReceived(1, record[:10])
        protocol.childDataReceived(1, record[10:])
        self.assertEqual(sample(metrics, "tunnel_open"), 1)
        supervisor.workerEnded(protocol, Failure(Exception("gone")))
        self.assertEqual(sample(metrics, "tunnel_open"), 0)
        labels = {"status": "200", "ended": "client-eof"}
        self.assertEqual(sample(metrics, "tunnel_connections_total", **labels), 2)

    def test_workerArguments(self) -> None:
        """
        With C{--metrics}, C{--workers} makes a service that runs the
        supervisor and serves the totals, and each worker is told to
        report its metrics (and not to serve them itself).
        """
        options = Options()
        options.parseOptions(
            ["--workers", "2", "--listen", "tcp:0", "--metrics", "tcp:0"]
        )
        service: Any = makeService(options, MemoryReactorClock())
        [listener, supervisor] = list(service)
        self.assertIsInstance(supervisor, WorkerSupervisor)
        self.assertIsNotNone(supervisor._metrics)
        self.assertIsInstance(listener, StreamServerEndpointService)
        self.assertNotIn("--metrics", supervisor._workerArgv)
        worker = Options()
        worker.parseOptions(
            ["--report-metrics", "--allow-port", "443", "--inherit-fd", "3:2"]
        )
        self.assertTrue(worker["report-metrics"])
        self.assertFalse(Options()["report-metrics"])


class DrainReportTests(SynchronousTestCase):
    """
    A worker's metrics reporter and its drain.
    """

    def test_reportsWhatEndsDuringDrain(self) -> None:
        """
        A connection that ends while the worker drains (here a request
        whose head completes after the stop, answered 503) is in the last
        snapshot the worker sends: the reporter keeps going until the drain
        is over, and its final snapshot comes after it.
        """
        sent: list[str] = []
        self.patch(tap, "_sendMetrics", sent.append)
        options = Options()
        options.parseOptions(
            [
                "--report-metrics",
                "--allow-port",
                "443",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ]
        )
        reactor = MemoryReactorClock()
        service = tap.makeWorkerService(options, reactor)
        service.startService()
        protocol = service.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"CONNECT 192.0.2.1:443 HTTP/1.1\r\n")
        stopped = service.stopService()
        self.assertNoResult(stopped)
        protocol.dataReceived(b"Host: 192.0.2.1:443\r\n\r\n")
        self.assertIn(b" 503 ", transport.value())
        protocol.connectionLost(Failure(ConnectionDone()))
        reactor.advance(1)
        self.successResultOf(stopped)
        self.assertTrue(sent)
        total = WorkerMetrics()
        total.report(0, sent[-1])
        self.assertEqual(tunnelsCounted(total), 1)
