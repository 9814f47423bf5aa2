"""
The seams an application plugs its own objects into, and the failures a
target connector reports through them (the server answers each its own way).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import Interface

__all__ = [
    "OUT_OF_RESOURCES",
    "AddressDenied",
    "AllowAddress",
    "ITargetConnector",
    "LookupsBusy",
    "NoLocalPort",
    "SourceUnusable",
    "UpstreamCancelled",
    "UpstreamProtocolError",
    "UpstreamRefused",
    "UpstreamTimedOut",
    "UpstreamUnreachable",
]

#: A destination policy for one tunnel, as a connector is given it: whether
#: the tunnel may connect to an address.
AllowAddress = Callable[[IPv4Address | IPv6Address], bool]


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
        allowAddress: AllowAddress | None = None,
    ) -> IStreamClientEndpoint:
        """
        Give the endpoint that reaches C{host:port}.

        @param host: The target host as the client named it: a DNS name, an
            IPv4 literal or an IPv6 literal without brackets.
        @param port: The target port.
        @param allowAddress: The destination policy for this tunnel.  A
            connector that resolves C{host} itself must connect only to
            resolved addresses for which this returns C{True}, and fail with
            L{AddressDenied} if none is left.  A connector
            that hands the name on (to a parent proxy, say) may ignore it;
            the policy's name and port rules still apply.  An address
            literal is vetted before the connector is asked, whatever the
            connector does.
        @return: An L{IStreamClientEndpoint} whose C{connect} Deferred fires
            when the target is reached, and fails with a
            L{twisted.internet.error.ConnectError} (or a
            L{twisted.internet.defer.TimeoutError}) when it cannot be.  The
            proxy may cancel that Deferred.
        """


class AddressDenied(ConnectError):
    """
    The target's name resolved, but the policy allows none of its addresses.
    """


class LookupsBusy(ConnectError):
    """
    The target's name was not looked up: too many lookups were waiting for
    a thread (see L{tunnel.resolver.ThreadedResolver}).  The client gets
    C{503} with C{Retry-After}.
    """


class NoLocalPort(ConnectError):
    """
    An IPv4 target could not be connected to for want of a local port:
    C{connect} failed with C{EADDRNOTAVAIL}, which for IPv4 means every port
    of the ephemeral range (C{net.ipv4.ip_local_port_range}) is in use
    towards that address and port, many of them in C{TIME_WAIT} (a parent
    proxy, which takes every tunnel to one address and port, meets it
    first).  The proxy's shortage, not the target's fault: the client gets
    C{503} with C{Retry-After}.  For IPv6 the same error also means that
    the host has no IPv6 address to connect from, which no retry mends:
    there it stays a plain L{twisted.internet.error.ConnectError}, a
    C{502}.
    """


class SourceUnusable(ConnectError):
    """
    A connection could not be bound to the local address it must leave
    from (C{--outgoing-address}, L{tunnel.HostnameConnector}'s
    C{sourceAddresses}): the address is no longer the host's, say.  The
    proxy's trouble, not the target's: the client gets C{503} with
    C{Retry-After}.
    """


#: The errors of C{socket()} (and so of a connection attempt) that mean the
#: proxy, not the target, is short of something: descriptors (its own or the
#: system's), buffers, memory.  The client gets C{503}.  (A used-up local
#: port range is L{NoLocalPort}.)
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class UpstreamRefused(ConnectError):
    """
    The parent proxy answered the C{CONNECT} request with a status other
    than 2xx.

    @ivar status: The parent's status code (403, 407, 502, ...).
    @ivar reason: The parent's reason phrase (control characters replaced).
    """

    MESSAGE = "The parent proxy refused the tunnel"

    def __init__(self, status: int, reason: str) -> None:
        """
        @param status: The parent's status code.
        @param reason: The parent's reason phrase.
        """
        super().__init__(string=f"{status} {reason}".rstrip())
        self.status = status
        self.reason = reason


class UpstreamProtocolError(ConnectError):
    """
    The parent proxy gave no usable answer: its response head was malformed
    or too large, or the connection ended (or TLS with it failed) before a
    complete answer.
    """

    MESSAGE = "The parent proxy did not answer properly"


class UpstreamUnreachable(ConnectError):
    """
    The parent proxy could not be reached: its name did not resolve, it
    refused the connection, or the network failed before a connection was
    made.  The message holds the underlying error.
    """

    MESSAGE = "The parent proxy could not be reached"


class UpstreamTimedOut(TimeoutError):
    """
    The parent proxy was not reached, or did not answer the C{CONNECT}
    request, in the time allowed; the message says which.  A
    L{twisted.internet.error.TimeoutError}, as a direct connection's
    timeout is.
    """

    MESSAGE = "The parent proxy timed out"


class UpstreamCancelled(CancelledError):
    """
    An attempt through the parent proxy was cancelled: what a cancelled
    L{tunnel.UpstreamEndpoint} attempt fails with, telling how far it got
    (the proxy uses it to say, when its own connect timeout cancelled the
    attempt, whether the parent was reached).

    @ivar answering: Whether the parent had been reached and the
        C{CONNECT} request sent, the attempt waiting for its answer.
    """

    def __init__(self, answering: bool) -> None:
        """
        @param answering: Whether the parent had been reached.
        """
        super().__init__(
            "cancelled waiting for the parent proxy's answer"
            if answering
            else "cancelled reaching the parent proxy"
        )
        self.answering = answering

    def timeoutText(self, timeout: float | None) -> str:
        """
        Say what did not happen in time, for a cancellation made because
        of a timeout.

        @param timeout: The seconds allowed, if known.
        @return: A phrase such as C{"the parent proxy did not answer within
            10 s"}.
        """
        within = "in time" if timeout is None else f"within {timeout:g} s"
        if self.answering:
            return f"the parent proxy did not answer {within}"
        return f"could not reach the parent proxy {within}"
