"""
Test doubles shared by the test modules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """
        Nothing to cancel: fake resolutions finish at once.
        """


@implementer(IHostnameResolver)
class FakeResolver:
    """
    A resolver that never sends a DNS query: IP literals resolve to
    themselves, names to what C{hostMap} says, anything else to nothing
    (which endpoints report as a failed lookup).

    @ivar queries: The names asked for, in order.
    """

    def __init__(self, hostMap: dict[str, Sequence[str]] | None = None) -> None:
        self.hostMap = dict(hostMap or {})
        self.queries: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: object = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        Resolve at once from the map.
        """
        self.queries.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        try:
            addresses = [str(ipaddress.ip_address(hostName))]
        except ValueError:
            addresses = list(self.hostMap.get(hostName, ()))
        for text in addresses:
            if ":" in text:
                resolutionReceiver.addressResolved(IPv6Address("TCP", text, portNumber))
            else:
                resolutionReceiver.addressResolved(IPv4Address("TCP", text, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution
