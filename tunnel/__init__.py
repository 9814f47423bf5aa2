"""
tunnel: an HTTP CONNECT tunnelling proxy built on Twisted.

The public API (C{__all__}):
  - L{ConnectProxyFactory}: the server factory to put behind any endpoint,
    and L{ConnectProxy}, the protocol it builds for each client connection;
  - L{ITargetConnector} and its default L{HostnameConnector}: how targets
    are reached (a connector fails with L{AddressDenied} when the policy
    left no address), its names looked up by a L{ThreadedResolver} (which
    makes it fail with L{LookupsBusy} when too many lookups wait), and
    which fails with L{NoLocalPort} when no local port is left for an IPv4
    target, and with L{SourceUnusable} when it cannot connect from its
    source address;
  - L{parseConnectHead}, L{ConnectRequest} and L{RequestRejected}: the pure
    request parser;
  - L{Relay} and L{RelayResult}: joining two transports into a tunnel;
  - L{ITunnelPolicy} and its default L{TunnelPolicy}: who may tunnel where
    (a policy refuses with a L{Denial}; the addresses it judges are
    L{IPAddress}es);
  - L{IProxyUser}, L{ProxyUser} and L{portalFromCheckers}: authentication
    through C{twisted.cred}, and L{FailureDamper}, which refuses a client
    after repeated failed logins;
  - L{ProxyService}: listeners, access log (L{AccessLogObserver}), metrics
    (L{ProxyMetrics}, L{metricsResource}) and graceful drain;
    L{StopOnSignals} makes a second SIGTERM harmless during the drain;
  - L{UpstreamEndpoint} and L{UpstreamConnector}: reaching targets through a
    parent CONNECT proxy, an L{UpstreamProxy} (see L{parseUpstreamURL});
    they fail with L{UpstreamRefused} when the parent refuses, with
    L{UpstreamProtocolError} when it gives no usable answer, with
    L{UpstreamUnreachable} when it cannot be reached, with
    L{UpstreamTimedOut} when it does not answer in time, and with
    L{UpstreamCancelled} when cancelled.

The submodules hold more, for those who build on the parts; what they list
in C{__all__} is public too.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .accesslog import AccessLogObserver
from .auth import FailureDamper, IProxyUser, ProxyUser, portalFromCheckers
from .connector import HostnameConnector
from .interfaces import (
    AddressDenied,
    ITargetConnector,
    LookupsBusy,
    NoLocalPort,
    SourceUnusable,
)
from .metrics import ProxyMetrics, metricsResource
from .policy import Denial, IPAddress, ITunnelPolicy, TunnelPolicy
from .relay import Relay, RelayResult
from .request import ConnectRequest, RequestRejected, parseConnectHead
from .resolver import ThreadedResolver
from .server import ConnectProxy, ConnectProxyFactory
from .service import ProxyService, StopOnSignals
from .upstream import (
    UpstreamCancelled,
    UpstreamConnector,
    UpstreamEndpoint,
    UpstreamProtocolError,
    UpstreamProxy,
    UpstreamRefused,
    UpstreamTimedOut,
    UpstreamUnreachable,
    parseUpstreamURL,
)

__all__ = [
    "AccessLogObserver",
    "AddressDenied",
    "ConnectProxy",
    "ConnectProxyFactory",
    "ConnectRequest",
    "Denial",
    "FailureDamper",
    "HostnameConnector",
    "IPAddress",
    "IProxyUser",
    "ITargetConnector",
    "ITunnelPolicy",
    "LookupsBusy",
    "NoLocalPort",
    "ProxyMetrics",
    "ProxyService",
    "ProxyUser",
    "Relay",
    "RelayResult",
    "RequestRejected",
    "SourceUnusable",
    "StopOnSignals",
    "ThreadedResolver",
    "TunnelPolicy",
    "UpstreamCancelled",
    "UpstreamConnector",
    "UpstreamEndpoint",
    "UpstreamProtocolError",
    "UpstreamProxy",
    "UpstreamRefused",
    "UpstreamTimedOut",
    "UpstreamUnreachable",
    "metricsResource",
    "parseConnectHead",
    "parseUpstreamURL",
    "portalFromCheckers",
]

try:
    #: The installed version of tunnel.
    __version__ = _version("tunnel")
except PackageNotFoundError:  # pragma: no cover (a checkout not installed)
    __version__ = "unknown"
