"""
Prometheus metrics, served at C{/metrics} through twisted.web.

Needs the optional C{prometheus_client} package (C{pip install
'.[metrics]'} in the checkout).  Counters and histograms are fed by the proxy's one log
event per connection, so the relay's hot path pays nothing for them; the
gauges are read from the factory when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from twisted.logger import ILogObserver, LogEvent
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from .resolver import ThreadedResolver

if TYPE_CHECKING:
    from .server import ConnectProxyFactory

__all__ = ["MetricsUnavailable", "ProxyMetrics", "metricsResource", "requirePrometheus"]


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
            "--metrics needs the prometheus_client package: pip install "
            "'.[metrics]' in a checkout of tunnel, or pip install prometheus_client"
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


@implementer(ILogObserver)
class ProxyMetrics:
    """
    The proxy's metrics in their own registry.

    Add it as a log observer (it keeps only tunnel events) and serve
    L{metricsResource} of its C{registry}.

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


def metricsResource(metrics: ProxyMetrics) -> Resource:
    """
    A twisted.web resource tree that serves C{metrics} at C{/metrics}.

    @param metrics: The metrics to serve.
    @return: The root resource, for a L{twisted.web.server.Site}.
    """
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(metrics.registry))
    return root
