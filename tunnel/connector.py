"""
The default way to reach a target: Happy Eyeballs through C{HostnameEndpoint}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorPluggableNameResolver,
    IStreamClientEndpoint,
)
from zope.interface import implementer

from .interfaces import ITargetConnector

__all__ = ["HostnameConnector"]


@implementer(IReactorPluggableNameResolver)
class _ResolvingReactor:
    """
    A reactor that answers name lookups with a given resolver and passes
    everything else to the real reactor.

    C{HostnameEndpoint} takes its resolver from the reactor it is given; this
    lets one endpoint use another resolver without installing it reactor-wide.
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        """
        Refuse: this reactor's resolver is fixed when it is made.
        """
        raise NotImplementedError("this reactor's resolver is fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(ITargetConnector)
class HostnameConnector:
    """
    Reach targets directly with L{HostnameEndpoint}: every address the name
    resolves to is tried, IPv4 and IPv6 raced as RFC 8305 describes.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IHostnameResolver | None = None,
        timeout: float = 30,
        bindAddress: tuple[str, int] | None = None,
    ) -> None:
        """
        @param reactor: The reactor to connect with.
        @param resolver: Resolves target names; by default the reactor's own
            C{nameResolver}.  Tests pass a fake one so that no real DNS
            query is ever sent.
        @param timeout: Seconds allowed for each connection attempt.
        @param bindAddress: The local address to connect from, if any.
        """
        if resolver is not None:
            reactor = _ResolvingReactor(reactor, resolver)
        self._reactor = reactor
        self._timeout = timeout
        self._bindAddress = bindAddress

    def endpointForTarget(self, host: str, port: int) -> IStreamClientEndpoint:
        """
        Give a L{HostnameEndpoint} for C{host:port}.
        """
        return HostnameEndpoint(
            self._reactor,
            host,
            port,
            timeout=self._timeout,
            bindAddress=self._bindAddress,
        )
