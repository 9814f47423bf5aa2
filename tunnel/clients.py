"""
Who a client is, for the logs and the per-client limits: the text form of
its address, and the key its connections and failed logins are counted
under.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct

from twisted.internet.interfaces import IAddress

from .policy import IPAddress, parseAddress
from .request import formatAuthority

__all__ = ["clientKey", "formatAddress", "ipOf", "unixClientKey"]


def formatAddress(address: IAddress | None) -> str:
    """
    Render a transport address for logs: C{host:port}, C{[v6]:port}, or the
    name of a UNIX socket (C{@name} for a name in Linux's abstract
    namespace, as C{ss} shows it).

    A UNIX client chooses its own socket's name, any bytes at all: bytes
    other than visible ASCII, and backslashes, are written C{\\xNN}, so
    that a name can neither split a log line or record nor start a forged
    one.

    @param address: The address, or L{None}.
    @return: Its text form, or C{"-"} when there is nothing to say.
    """
    host = getattr(address, "host", None)
    if host is not None:
        return formatAuthority(host, getattr(address, "port", 0))
    name = getattr(address, "name", None)
    if not name:
        return "-"
    raw = name if isinstance(name, bytes) else os.fsencode(str(name))
    if raw.startswith(b"\0"):
        raw = b"@" + raw[1:]
    return _UNSAFE_IN_NAME.sub(_hexEscaped, raw).decode("ascii")


# What formatAddress escapes in a UNIX socket's name.
_UNSAFE_IN_NAME = re.compile(rb"[^!-\[\]-~]")


def _hexEscaped(match: re.Match[bytes]) -> bytes:
    return b"\\x%02x" % match.group()[0]


def unixClientKey(transport: object) -> str:
    """
    The key a UNIX client's limits and failed logins are counted under: its
    user, as the kernel tells it (C{SO_PEERCRED}), never the socket name it
    chose (a name per connection would escape every limit, and an unnamed
    socket would share one count with every other user's).

    @param transport: The client's transport.
    @return: C{"uid N"}, or C{"unix"} where the user cannot be told.
    """
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
        credentials = handle.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        _, uid, _ = struct.unpack("3i", credentials)
    except (AttributeError, OSError, struct.error):
        return "unix"
    return f"uid {uid}"


def ipOf(address: IAddress | None) -> IPAddress | None:
    """
    The IP address of a transport address (an IPv6 zone left out).

    @param address: The address, or L{None}.
    @return: The IP address, or L{None} for a UNIX socket.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    return parseAddress(host.partition("%")[0])


def clientKey(ip: IPAddress) -> str:
    """
    The key a client's limits and failed logins are counted under: its IPv4
    address, or its IPv6 /64 (one host usually holds a whole /64, so a
    per-address count would be no limit at all).

    @param ip: The client's IP address.
    @return: The key.
    """
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
