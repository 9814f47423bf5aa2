"""
tunnel: an HTTP CONNECT tunnelling proxy built on Twisted.

The public API:
  - L{ConnectProxyFactory}: the server factory to put behind any endpoint;
  - L{ITargetConnector} and its default L{HostnameConnector}: how targets
    are reached;
  - L{parseConnectHead}, L{ConnectRequest} and L{RequestRejected}: the pure
    request parser;
  - L{Relay} and L{RelayResult}: joining two transports into a tunnel.
"""

from .connector import HostnameConnector
from .interfaces import ITargetConnector
from .relay import Relay, RelayResult
from .request import ConnectRequest, RequestRejected, parseConnectHead
from .server import ConnectProxy, ConnectProxyFactory

__all__ = [
    "ConnectProxy",
    "ConnectProxyFactory",
    "ConnectRequest",
    "HostnameConnector",
    "ITargetConnector",
    "Relay",
    "RelayResult",
    "RequestRejected",
    "parseConnectHead",
]
