"""
The seams an application plugs its own objects into.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import Interface

__all__ = ["ITargetConnector"]


class ITargetConnector(Interface):
    """
    Chooses how the proxy reaches a tunnel's target.

    The default, L{tunnel.HostnameConnector}, connects directly with Happy
    Eyeballs over IPv4 and IPv6; an application can provide its own to route
    through Tor, SOCKS, a parent proxy or a fixed address.
    """

    def endpointForTarget(
        host: str,
        port: int,
        allowAddress: Callable[[IPv4Address | IPv6Address], bool] | None = None,
    ) -> IStreamClientEndpoint:
        """
        Give the endpoint that reaches C{host:port}.

        @param host: The target host as the client named it: a DNS name, an
            IPv4 literal or an IPv6 literal without brackets.
        @param port: The target port.
        @param allowAddress: The destination policy for this tunnel.  A
            connector that resolves C{host} itself must connect only to
            resolved addresses for which this returns C{True}, and fail with
            L{tunnel.connector.AddressDenied} if none is left.  A connector
            that hands the name on (to a parent proxy, say) may ignore it;
            the policy's name and port rules still apply.
        @return: An L{IStreamClientEndpoint} whose C{connect} Deferred fires
            when the target is reached, and fails with a
            L{twisted.internet.error.ConnectError} (or a
            L{twisted.internet.defer.TimeoutError}) when it cannot be.  The
            proxy may cancel that Deferred.
        """
