"""
Parsing of the HAProxy PROXY protocol header, versions 1 and 2.

A load balancer in front of the proxy can announce the client's real address
by sending a PROXY header before anything else on the connection.  The
specification is U{https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt}.

Everything here is pure: bytes go in, a L{ProxyHeader}, L{None} (more bytes
needed) or an L{InvalidProxyHeader} comes out.  No I/O, no reactor.  The
proxy's own protocol calls L{parseProxyHeader} with what it has received so
far, so half-close keeps working (Twisted's C{haproxy:} endpoint wrapper does
not forward it).

Bytes that cannot start a PROXY header are refused as soon as they show it:
a connection opening with C{CONNECT } is refused at its first byte, not after
waiting for a whole header's worth of bytes.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from typing import Any

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_V1_BYTES",
    "InvalidProxyHeader",
    "ProxyHeader",
    "parseProxyHeader",
]

MAX_V1_BYTES = 107
"""
The longest version 1 header, CRLF included (spec section 2.1: an
C{UNKNOWN} line with two full-length IPv6 addresses and ports).
"""

MAX_HEADER_BYTES = 16 * 1024
"""
The longest header accepted, of either version.

A version 2 header is 16 bytes plus the length its own length field states
(up to 65535); one whose total would exceed this is refused as soon as its
length field arrives, which leaves plenty of room for TLVs.  A version 1
header is at most L{MAX_V1_BYTES}.  L{parseProxyHeader} never returns L{None}
for a buffer this long or longer, so a caller needs to keep at most this many
bytes while waiting for the header.
"""

_V1_PREFIX = b"PROXY "
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED_BYTES = 16

# Version 2, low half of byte 13: the command (the high half is the version).
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
# Version 2, byte 14: address family and transport protocol, and the size of
# the address block each needs.  Only stream transports are accepted: this is
# a TCP proxy.  AF_UNSPEC and AF_UNIX carry no address a TCP client could have.
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_UNIX_STREAM = 0x31
_V2_ADDRESS_BYTES = {_V2_UNSPEC: 0, _V2_TCP4: 12, _V2_TCP6: 36, _V2_UNIX_STREAM: 216}
# How the addresses of a TCP header are laid out, read, and given to Twisted.
_V2_ADDRESS_LAYOUTS: dict[int, tuple[str, Any, Any]] = {
    _V2_TCP4: ("!4s4sHH", ipaddress.IPv4Address, IPv4Address),
    _V2_TCP6: ("!16s16sHH", ipaddress.IPv6Address, IPv6Address),
}

_V1_FAMILIES = (b"TCP4", b"TCP6", b"UNKNOWN")
# Spec section 2.1: ports are decimal in 0-65535, without leading zeroes.
_V1_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")
# What may have arrived so far of the addresses and ports after C{TCP4 } or
# C{TCP6 }: the characters they are made of, at most four fields, single
# spaces.  Anything else is refused before the line is complete.
_V1_PARTIAL_FIELDS = {
    b"TCP4": re.compile(rb"(?:[0-9.]+ ){0,3}[0-9.]*\Z"),
    b"TCP6": re.compile(rb"(?:[0-9A-Fa-f:.]+ ){0,3}[0-9A-Fa-f:.]*\Z"),
}


@frozen
class ProxyHeader:
    """
    A complete, valid PROXY header.

    @ivar source: The client's address as the sender saw it: an
        L{IPv4Address} or L{IPv6Address} of type C{"TCP"}; or L{None} when the
        header does not give one (version 1 C{UNKNOWN}, version 2 C{LOCAL},
        C{AF_UNSPEC} or C{AF_UNIX}), in which case the connection's own peer
        address stands.
    @ivar destination: The address the client connected to, or L{None} when
        C{source} is L{None}.
    @ivar consumed: The length of the header in bytes: whatever follows it in
        the buffer is the start of the proxied stream.
    """

    source: IAddress | None
    destination: IAddress | None
    consumed: int


class InvalidProxyHeader(ValueError):
    """
    The bytes are not, and cannot become, a valid PROXY header.

    The single argument is a short human-readable reason.
    """


def parseProxyHeader(buffer: bytes) -> ProxyHeader | None:
    """
    Parse the PROXY header at the start of a connection.

    @param buffer: All the bytes received on the connection so far.  It may
        hold bytes beyond the header.
    @return: The header once it is complete; or L{None} if C{buffer} is a
        proper prefix of a header that may still be valid and is shorter
        than L{MAX_HEADER_BYTES}.
    @raise InvalidProxyHeader: If no bytes appended to C{buffer} could make
        it start with a valid header.  Once raised for a buffer, it is raised
        for any longer buffer that starts with it.
    """
    if buffer.startswith(b"P"):
        return _parseV1(buffer)
    if buffer.startswith(b"\r"):
        return _parseV2(buffer)
    if not buffer:
        return None
    raise InvalidProxyHeader("The connection does not start with a PROXY header.")


def _parseV1(buffer: bytes) -> ProxyHeader | None:
    """
    Parse a version 1 (text) header.

    @param buffer: The bytes received so far, starting with C{P}.
    @return: The header, or L{None} if more bytes are needed.
    @raise InvalidProxyHeader: If the header is or will be invalid.
    """
    head = buffer[:MAX_V1_BYTES]
    if not head.startswith(_V1_PREFIX) and not _V1_PREFIX.startswith(head):
        raise InvalidProxyHeader("The connection does not start with a PROXY header.")
    end = head.find(b"\n")
    if end == -1:
        if len(head) >= MAX_V1_BYTES:
            raise InvalidProxyHeader("The PROXY v1 line is too long.")
        # A CR at the very end may be the start of the CRLF.
        line = head[:-1] if head.endswith(b"\r") else head
        complete = False
    else:
        if not head.startswith(b"\r\n", end - 1):
            raise InvalidProxyHeader("The PROXY v1 line does not end with CRLF.")
        line = head[: end - 1]
        complete = True
    if b"\r" in line:
        raise InvalidProxyHeader("The PROXY v1 line holds a bare CR.")
    if not complete and len(line) <= len(_V1_PREFIX):
        return None

    family, space, fields = line[len(_V1_PREFIX) :].partition(b" ")
    if not (complete or space):
        if not any(known.startswith(family) for known in _V1_FAMILIES):
            raise InvalidProxyHeader("The PROXY v1 protocol family is unknown.")
        return None
    if family not in _V1_FAMILIES:
        raise InvalidProxyHeader("The PROXY v1 protocol family is unknown.")
    if family == b"UNKNOWN":
        # Section 2.1: the receiver must ignore anything before the CRLF.
        return ProxyHeader(None, None, end + 1) if complete else None
    if not complete:
        if not _V1_PARTIAL_FIELDS[family].match(fields):
            raise InvalidProxyHeader("The PROXY v1 addresses are malformed.")
        return None

    parts = fields.split(b" ")
    if len(parts) != 4:
        raise InvalidProxyHeader("The PROXY v1 line must hold two addresses and ports.")
    sourceHost, destinationHost = (_parseV1Address(family, part) for part in parts[:2])
    sourcePort, destinationPort = (_parseV1Port(part) for part in parts[2:])
    if family == b"TCP4":
        return ProxyHeader(
            IPv4Address("TCP", sourceHost, sourcePort),
            IPv4Address("TCP", destinationHost, destinationPort),
            end + 1,
        )
    return ProxyHeader(
        IPv6Address("TCP", sourceHost, sourcePort),
        IPv6Address("TCP", destinationHost, destinationPort),
        end + 1,
    )


def _parseV1Address(family: bytes, text: bytes) -> str:
    """
    Parse an address from a version 1 line.

    @param family: C{b"TCP4"} or C{b"TCP6"}.
    @param text: The address as sent.
    @return: The address in its canonical text form.
    @raise InvalidProxyHeader: If it is not an address of that family.
    """
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:  # UnicodeDecodeError is a ValueError too.
        raise InvalidProxyHeader("A PROXY v1 address is not valid.") from None
    if address.version != (4 if family == b"TCP4" else 6):
        raise InvalidProxyHeader("A PROXY v1 address does not match its family.")
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise InvalidProxyHeader("A PROXY v1 address has a zone identifier.")
    return _addressText(address)


def _addressText(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """
    An address as logs show it: an IPv4-mapped IPv6 address with its IPv4
    part in dotted form (C{::ffff:10.9.9.9}, where Python before 3.13 writes
    C{::ffff:a09:909}, which a search of the logs for C{10.9.9.9} misses).
    """
    mapped = getattr(address, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(address)


def _parseV1Port(text: bytes) -> int:
    """
    Parse a port from a version 1 line.

    @param text: The port as sent.
    @return: The port.
    @raise InvalidProxyHeader: If it is not a decimal number in 0-65535
        without leading zeroes.
    """
    if not _V1_PORT.match(text) or int(text) > 65535:
        raise InvalidProxyHeader("A PROXY v1 port is not a number in 0-65535.")
    return int(text)


def _parseV2(buffer: bytes) -> ProxyHeader | None:
    """
    Parse a version 2 (binary) header.

    @param buffer: The bytes received so far, starting with CR.
    @return: The header, or L{None} if more bytes are needed.
    @raise InvalidProxyHeader: If the header is or will be invalid.
    """
    if not buffer.startswith(_V2_SIGNATURE):
        if _V2_SIGNATURE.startswith(buffer):
            return None
        raise InvalidProxyHeader("The connection does not start with a PROXY header.")
    signatureEnd = len(_V2_SIGNATURE)
    if len(buffer) <= signatureEnd:
        return None
    versionCommand = buffer[signatureEnd]
    if versionCommand >> 4 != 2:
        raise InvalidProxyHeader("The PROXY v2 version is not 2.")
    command = versionCommand & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise InvalidProxyHeader("The PROXY v2 command is neither LOCAL nor PROXY.")
    if len(buffer) <= signatureEnd + 1:
        return None
    familyProtocol = buffer[signatureEnd + 1]
    # Section 2.2: for LOCAL the receiver ignores the address block, whatever
    # family it claims.
    if command == _V2_PROXY and familyProtocol not in _V2_ADDRESS_BYTES:
        raise InvalidProxyHeader(
            "The PROXY v2 address family or transport is not supported."
        )
    if len(buffer) < _V2_FIXED_BYTES:
        return None
    (length,) = struct.unpack_from("!H", buffer, signatureEnd + 2)
    total = _V2_FIXED_BYTES + length
    if total > MAX_HEADER_BYTES:
        raise InvalidProxyHeader("The PROXY v2 header is too long.")
    if command == _V2_PROXY and length < _V2_ADDRESS_BYTES[familyProtocol]:
        raise InvalidProxyHeader("The PROXY v2 address block is too short.")
    if len(buffer) < total:
        return None

    if command == _V2_LOCAL or familyProtocol in (_V2_UNSPEC, _V2_UNIX_STREAM):
        return ProxyHeader(None, None, total)
    # What follows the addresses is TLVs, which this proxy has no use for.
    layout, parseIP, addressType = _V2_ADDRESS_LAYOUTS[familyProtocol]
    sourceBytes, destinationBytes, sourcePort, destinationPort = struct.unpack_from(
        layout, buffer, _V2_FIXED_BYTES
    )
    return ProxyHeader(
        addressType("TCP", _addressText(parseIP(sourceBytes)), sourcePort),
        addressType("TCP", _addressText(parseIP(destinationBytes)), destinationPort),
        total,
    )
