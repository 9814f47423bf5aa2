"""
Prometheus metrics, served at C{/metrics} through twisted.web.

Needs the optional C{prometheus_client} package (C{pip install
'.[metrics]'} in the checkout).  Counters and histograms are fed by the proxy's one log
event per connection, so the relay's hot path pays nothing for them; the
gauges are read from the factory when scraped.

With C{--workers}, each worker keeps its own L{ProxyMetrics} and a
L{MetricsReporter} sends a snapshot of them to the main process every
second; the main process serves the sum (L{WorkerMetrics}).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from .resolver import ThreadedResolver

if TYPE_CHECKING:
    from .server import ConnectProxyFactory

__all__ = [
    "MetricsReporter",
    "MetricsUnavailable",
    "ProxyMetrics",
    "WorkerMetrics",
    "metricsResource",
    "requirePrometheus",
    "snapshotMetrics",
]


class MetricsUnavailable(Exception):
    """
    C{prometheus_client} is not installed.
    """


def requirePrometheus() -> Any:
    """
    Import C{prometheus_client}.

    @return: The module.
    @raise MetricsUnavailable: With the command that installs it.
    """
    try:
        import prometheus_client
        import prometheus_client.metrics_core
    except ImportError:
        raise MetricsUnavailable(
            "the metrics (--metrics, ProxyMetrics) need the prometheus_client "
            "package: pip install '.[metrics]' in a checkout of tunnel, or pip "
            "install prometheus_client"
        ) from None
    return prometheus_client


_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
_DURATION_BUCKETS = (0.01, 0.1, 1, 5, 15, 60, 300, 900, 3600, 14400)


class _FactoryCollector:
    """
    Reads the gauges from the factories when the registry is scraped.
    """

    def __init__(self, prometheus: Any, factories: list[ConnectProxyFactory]) -> None:
        self._prometheus = prometheus
        self._factories = factories

    def collect(self) -> Iterator[Any]:
        gauge = self._prometheus.metrics_core.GaugeMetricFamily
        relaying = sum(f.relaying for f in self._factories)
        handshaking = sum(
            len(f.connections) - f.relaying - f.answered for f in self._factories
        )
        yield gauge("tunnel_open", "Tunnels established and open now.", value=relaying)
        yield gauge(
            "tunnel_handshakes_in_progress",
            "Client connections in their handshake: not tunnels yet, not answered yet.",
            value=handshaking,
        )
        yield gauge(
            "tunnel_draining",
            "1 while the proxy is draining for shutdown.",
            value=int(any(f.draining for f in self._factories)),
        )
        limits = [f.maxTunnels for f in self._factories]
        capacity = gauge(
            "tunnel_max_connections",
            "The most client connections at once, handshakes included "
            "(--max-tunnels): a 503 beyond. No sample without a limit.",
        )
        if limits and None not in limits:
            capacity.add_metric([], sum(cast(list[int], limits)))
        yield capacity
        # A set: factories may share a connector, or a resolver.
        resolvers = {
            resolver
            for resolver in (
                getattr(f.connector, "resolver", None) for f in self._factories
            )
            if isinstance(resolver, ThreadedResolver)
        }
        yield gauge(
            "tunnel_name_lookups_running",
            "Target name lookups (getaddrinfo) running now.",
            value=sum(r.running for r in resolvers),
        )
        yield gauge(
            "tunnel_name_lookups_waiting",
            "Target name lookups waiting for a resolver thread.",
            value=sum(r.waiting for r in resolvers),
        )
        counter = self._prometheus.metrics_core.CounterMetricFamily
        yield counter(
            "tunnel_name_lookups",
            "Target name lookups (getaddrinfo calls) completed.",
            value=sum(r.lookedUp for r in resolvers),
        )
        yield counter(
            "tunnel_name_lookups_cached",
            "Target name lookups answered from the answers kept, without getaddrinfo.",
            value=sum(r.answeredFromCache for r in resolvers),
        )


@implementer(ILogObserver)
class ProxyMetrics:
    """
    The proxy's metrics in their own registry.

    Add it as a log observer (it keeps only tunnel events) and serve
    L{metricsResource} of it (C{metricsResource(metrics)}).

    @ivar registry: The C{prometheus_client} registry holding the metrics.
    @ivar factories: The factories whose open connections are gauged.
    """

    def __init__(self, factories: list[ConnectProxyFactory] | None = None) -> None:
        """
        @param factories: The factories whose open connections are gauged;
            more can be added to C{factories} later.
        @raise MetricsUnavailable: Without C{prometheus_client}.
        """
        prometheus = requirePrometheus()
        self.registry = registry = prometheus.CollectorRegistry()
        self.factories: list[ConnectProxyFactory] = list(factories or [])
        registry.register(_FactoryCollector(prometheus, self.factories))
        self._tunnels = prometheus.Counter(
            "tunnel_connections",
            "Client connections ended, by final status and how they ended.",
            ["status", "ended"],
            registry=registry,
        )
        self._bytes = prometheus.Counter(
            "tunnel_bytes",
            "Bytes relayed, by direction (up: client to target).",
            ["direction"],
            registry=registry,
        )
        self._authFailures = prometheus.Counter(
            "tunnel_auth_failures",
            "Requests refused with 407.",
            registry=registry,
        )
        self._denials = prometheus.Counter(
            "tunnel_policy_denials",
            "Requests refused by the policy, by rule (port, destination, "
            "address, client).",
            ["rule"],
            registry=registry,
        )
        self._limits = prometheus.Counter(
            "tunnel_limit_refusals",
            "Requests refused (503 or 429) by one of the proxy's limits, by "
            "limit (max-tunnels, max-tunnels-per-client, partial-head-bytes, "
            "failed-logins, login-timeout, draining, name-lookups, resources, "
            "local-ports, outgoing-address).",
            ["limit"],
            registry=registry,
        )
        self._connect = prometheus.Histogram(
            "tunnel_connect_seconds",
            "Time to reach the target.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._duration = prometheus.Histogram(
            "tunnel_duration_seconds",
            "Lifetime of established tunnels.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        for direction in ("up", "down"):
            self._bytes.labels(direction)

    def __call__(self, event: LogEvent) -> None:
        """
        Count a tunnel event.

        @param event: A log event; any but a tunnel event is ignored.
        """
        if not event.get("tunnelEvent"):
            return
        self._tunnels.labels(str(event["status"]), event["ended"]).inc()
        self._bytes.labels("up").inc(event["bytesUp"])
        self._bytes.labels("down").inc(event["bytesDown"])
        refusal = event.get("refusal")
        if refusal == "auth":
            self._authFailures.inc()
        elif refusal is not None:
            self._denials.labels(refusal).inc()
        limit = event.get("limit")
        if limit is not None:
            self._limits.labels(limit).inc()
        if event.get("connect") is not None:
            self._connect.observe(event["connect"])
        if event["status"] == 200:
            self._duration.observe(event["duration"])


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        prometheus = requirePrometheus()
        request.setHeader(b"Content-Type", prometheus.CONTENT_TYPE_LATEST.encode())
        return prometheus.generate_latest(self._registry)  # type: ignore[no-any-return]

    def render_HEAD(self, request: Request) -> bytes:
        # The headers of a GET, without its body: returning the body would
        # have twisted.web log a warning that it is dropping it.
        body = self.render_GET(request)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return b""


def metricsResource(metrics: ProxyMetrics | WorkerMetrics) -> Resource:
    """
    A twisted.web resource tree that serves C{metrics} at C{/metrics}.

    @param metrics: The metrics to serve (anything with a C{registry}).
    @return: The root resource, for a L{twisted.web.server.Site}.
    """
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(metrics.registry))
    return root


def snapshotMetrics(registry: Any) -> str:
    """
    Every sample of a registry, as JSON text: a list of families, each with
    its C{name}, C{type}, C{help} and C{samples} (C{[name, labels,
    value]}).  The C{_created} samples (a timestamp per counter) are left
    out: they cannot be added up across processes.

    @param registry: A C{prometheus_client} registry.
    @return: The JSON text (one line).
    """
    families = [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [
                [sample.name, sample.labels, sample.value]
                for sample in family.samples
                if not sample.name.endswith("_created")
            ],
        }
        for family in registry.collect()
    ]
    return json.dumps(families, separators=(",", ":"))


class MetricsReporter(Service):
    """
    Sends a snapshot of a worker's metrics (L{snapshotMetrics}) every
    C{interval} seconds while running, when it changed, and once more as
    it stops.
    """

    def __init__(
        self,
        registry: Any,
        send: Callable[[str], None],
        clock: IReactorTime,
        interval: float = 1.0,
    ) -> None:
        """
        @param registry: The worker's registry (L{ProxyMetrics.registry}).
        @param send: Takes each snapshot's text.
        @param clock: Schedules the snapshots.
        @param interval: Seconds between snapshots.
        """
        self._registry = registry
        self._send = send
        self._interval = interval
        self._loop = LoopingCall(self._report)
        self._loop.clock = clock
        self._last: str | None = None

    def startService(self) -> None:
        """
        Send a first snapshot now, then every C{interval} seconds.
        """
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        """
        Send the last counts.
        """
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self._report()

    def _report(self) -> None:
        text = snapshotMetrics(self._registry)
        if text != self._last:
            self._last = text
            self._send(text)


# Gauges whose total over the workers is their largest value, not their sum.
_LARGEST = {"tunnel_draining"}

_SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]

# The names of a family's samples in a snapshot, by the family's type.
_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
}
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The most samples (label values apart) the totals may hold: far more than
# the proxy makes, and a bound on what a faulty worker can add for good.
_MAX_KEYS = 10_000


# Far more than any count or gauge of the proxy can reach (2**64 bytes
# relayed), and small enough that the sums of any number of workers stay
# finite.
_LARGEST_VALUE = 2.0**80


def _encodes(text: str) -> bool:
    """
    Whether C{text} can be written as UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Unreadable(Exception):
    """
    A snapshot is not one L{snapshotMetrics} makes of L{ProxyMetrics}.
    """


class WorkerMetrics:
    """
    The metrics of a proxy run with C{--workers}, in the main process: the
    sum of the last snapshot each worker sent (see L{MetricsReporter}).

    Counters and histograms stay monotonic when a worker ends and is
    replaced: what the ended worker last reported is kept and added to the
    totals.  Its gauges go with it.  Counts a worker had not yet reported
    when it ended (at most a second's worth, for a worker that crashed) are
    lost.

    @ivar registry: The registry to serve (see L{metricsResource}).
    """

    _log = Logger()

    def __init__(self) -> None:
        """
        @raise MetricsUnavailable: Without C{prometheus_client}.
        """
        self._prometheus = prometheus = requirePrometheus()
        self.registry = prometheus.CollectorRegistry()
        # Family name -> (type, help) of the families L{ProxyMetrics}
        # defines, the only ones a snapshot may hold, and the names their
        # samples may have.
        self._families: dict[str, tuple[str, str]] = {
            family.name: (family.type, family.documentation)
            for family in ProxyMetrics().registry.collect()
        }
        self._sampleNames = {
            name: frozenset(name + suffix for suffix in _SAMPLE_SUFFIXES[kind])
            for name, (kind, _) in self._families.items()
        }
        # Every sample key ever seen, in the order first seen (histogram
        # buckets stay in order).
        self._keys: dict[_SampleKey, None] = {}
        self._live: dict[int, dict[_SampleKey, float]] = {}
        self._retired: dict[_SampleKey, float] = {}
        self._exits = 0
        # The workers whose unreadable snapshot was logged: once is enough.
        self._warned: set[int] = set()
        self.registry.register(self)

    def report(self, worker: int, snapshot: str) -> None:
        """
        Take a worker's snapshot, in place of its previous one.  A snapshot
        that is not one L{snapshotMetrics} makes of L{ProxyMetrics} is
        ignored (and logged, once per worker process), as is one that
        would take the totals beyond 10000 samples.

        @param worker: The worker's number.
        @param snapshot: The text L{snapshotMetrics} made.
        """
        try:
            samples = self._read(snapshot)
            new = [key for key in samples if key not in self._keys]
            if len(self._keys) + len(new) > _MAX_KEYS:
                raise _Unreadable("too many samples")
        except (
            _Unreadable,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ):
            if worker not in self._warned:
                self._warned.add(worker)
                self._log.warn(
                    "Worker {worker} sent unreadable metrics (ignored; not "
                    "logged again for this worker)",
                    worker=worker,
                )
            return
        for key in new:
            self._keys[key] = None
        self._live[worker] = samples

    def _read(self, snapshot: str) -> dict[_SampleKey, float]:
        """
        Check and read a snapshot.

        @param snapshot: The text from a worker.
        @return: Its samples.
        @raise _Unreadable: Or L{ValueError}, L{TypeError}, L{KeyError},
            L{AttributeError}, L{ArithmeticError}, L{RecursionError}, if the
            snapshot is not one L{snapshotMetrics} makes of L{ProxyMetrics}.
        """
        samples: dict[_SampleKey, float] = {}
        families = json.loads(snapshot)
        if not isinstance(families, list):
            raise _Unreadable("not a list")
        for family in families:
            name = family["name"]
            # An unknown name is refused here, so that the keys kept for
            # good are only ever the proxy's own.
            if family["type"] != self._families[name][0]:
                raise _Unreadable(name)
            sampleNames = self._sampleNames[name]
            if not isinstance(family["samples"], list):
                raise _Unreadable(name)
            for sampleName, labels, value in family["samples"]:
                if sampleName not in sampleNames:
                    raise _Unreadable(sampleName)
                # Anything else would fail every scrape (prometheus_client
                # escapes label values as text) or garble it (a label name
                # is written as it is).
                if not all(
                    isinstance(label, str)
                    and isinstance(text, str)
                    and _LABEL_NAME.fullmatch(label)
                    # A lone surrogate (JSON's "\ud800") fails to encode,
                    # and so would every scrape.
                    and _encodes(text)
                    for label, text in labels.items()
                ):
                    raise _Unreadable(labels)
                # A NaN or infinity would stay in the totals for good, and so
                # would a value whose sum with others overflows to one.
                if (
                    isinstance(value, bool)
                    or not math.isfinite(value)
                    or abs(value) > _LARGEST_VALUE
                ):
                    raise _Unreadable(value)
                key = (name, sampleName, tuple(sorted(labels.items())))
                samples[key] = float(value)
        return samples

    def retire(self, worker: int) -> None:
        """
        A worker ended: keep its counters and histograms in the totals,
        drop its gauges.

        @param worker: The worker's number.
        """
        self._exits += 1
        # Its replacement may log an unreadable snapshot of its own.
        self._warned.discard(worker)
        for key, value in self._live.pop(worker, {}).items():
            if self._families[key[0]][0] != "gauge":
                self._retired[key] = self._retired.get(key, 0.0) + value

    def collect(self) -> Iterator[Any]:
        """
        The totals, as the registry asks a collector for them.

        @return: The metric families.
        """
        metricsCore = self._prometheus.metrics_core
        # A gauge no running worker reports (all of them gone) reads 0.
        totals: dict[_SampleKey, float] = {
            key: 0.0 for key in self._keys if self._families[key[0]][0] == "gauge"
        }
        totals.update(self._retired)
        for samples in self._live.values():
            for key, value in samples.items():
                if key[0] in _LARGEST:
                    totals[key] = max(totals.get(key, value), value)
                else:
                    totals[key] = totals.get(key, 0.0) + value
        families: dict[str, Any] = {}
        for key in self._keys:
            if key not in totals:
                continue
            name, sampleName, labels = key
            family = families.get(name)
            if family is None:
                kind, documentation = self._families[name]
                family = families[name] = metricsCore.Metric(name, documentation, kind)
            family.add_sample(sampleName, dict(labels), totals[key])
        yield from families.values()
        yield metricsCore.GaugeMetricFamily(
            "tunnel_workers_reporting",
            "Worker processes running whose metrics are in these totals.",
            value=len(self._live),
        )
        yield metricsCore.CounterMetricFamily(
            "tunnel_worker_exits",
            "Worker processes that ended (and were replaced, unless stopping).",
            value=self._exits,
        )
