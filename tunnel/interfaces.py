"""
The seams an application plugs its own objects into.
"""

from __future__ import annotations

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

    def endpointForTarget(host: str, port: int) -> IStreamClientEndpoint:
        """
        Give the endpoint that reaches C{host:port}.

        @param host: The target host as the client named it: a DNS name, an
            IPv4 literal or an IPv6 literal without brackets.
        @param port: The target port.
        @return: An L{IStreamClientEndpoint} whose C{connect} Deferred fires
            when the target is reached, and fails with a
            L{twisted.internet.error.ConnectError} (or a
            L{twisted.internet.defer.TimeoutError}) when it cannot be.  The
            proxy may cancel that Deferred.
        """
