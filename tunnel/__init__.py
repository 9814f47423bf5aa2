"""
tunnel: an HTTP CONNECT tunnelling proxy built on Twisted.

The public API:
  - L{ConnectProxyFactory}: the server factory to put behind any endpoint;
  - L{ITargetConnector} and its default L{HostnameConnector}: how targets
    are reached;
  - L{parseConnectHead}, L{ConnectRequest} and L{RequestRejected}: the pure
    request parser;
  - L{Relay} and L{RelayResult}: joining two transports into a tunnel;
  - L{ITunnelPolicy} and its default L{TunnelPolicy}: who may tunnel where;
  - L{ProxyService}: listeners, access log, metrics and graceful drain;
  - L{UpstreamEndpoint} and L{UpstreamConnector}: reaching targets through a
    parent CONNECT proxy (L{parseUpstreamURL}).
"""

from .connector import HostnameConnector
from .interfaces import ITargetConnector
from .policy import ITunnelPolicy, TunnelPolicy
from .relay import Relay, RelayResult
from .request import ConnectRequest, RequestRejected, parseConnectHead
from .server import ConnectProxy, ConnectProxyFactory
from .service import ProxyService
from .upstream import (
    UpstreamConnector,
    UpstreamEndpoint,
    UpstreamProtocolError,
    UpstreamProxy,
    UpstreamRefused,
    parseUpstreamURL,
)

__all__ = [
    "ConnectProxy",
    "ConnectProxyFactory",
    "ConnectRequest",
    "HostnameConnector",
    "ITargetConnector",
    "ITunnelPolicy",
    "ProxyService",
    "Relay",
    "RelayResult",
    "RequestRejected",
    "TunnelPolicy",
    "UpstreamConnector",
    "UpstreamEndpoint",
    "UpstreamProtocolError",
    "UpstreamProxy",
    "UpstreamRefused",
    "parseConnectHead",
    "parseUpstreamURL",
]
