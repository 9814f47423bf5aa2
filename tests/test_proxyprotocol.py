"""
Tests for L{tunnel.proxyprotocol}: the pure PROXY protocol header parser.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from tunnel.proxyprotocol import (
    MAX_HEADER_BYTES,
    MAX_V1_BYTES,
    InvalidProxyHeader,
    ProxyHeader,
    parseProxyHeader,
)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Byte 13: version 2 with the LOCAL or the PROXY command.
LOCAL = 0x20
PROXY = 0x21
# Byte 14: address family and transport protocol.
UNSPEC = 0x00
TCP4 = 0x11
UDP4 = 0x12
TCP6 = 0x21
UDP6 = 0x22
UNIX_STREAM = 0x31
UNIX_DGRAM = 0x32

REQUEST = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"


def v2Header(
    command: int = PROXY,
    familyProtocol: int = TCP4,
    payload: bytes = b"",
    length: int | None = None,
) -> bytes:
    """
    Build a version 2 header.

    @param command: Byte 13, version and command.
    @param familyProtocol: Byte 14, address family and transport protocol.
    @param payload: The address block and TLVs.
    @param length: The length field, if not the length of C{payload}.
    """
    if length is None:
        length = len(payload)
    return V2_SIGNATURE + struct.pack("!BBH", command, familyProtocol, length) + payload


def v2Inet(
    source: str,
    sourcePort: int,
    destination: str,
    destinationPort: int,
    tlvs: bytes = b"",
) -> bytes:
    """
    Build a version 2 PROXY header for TCP over IPv4 or IPv6.
    """
    sourceAddress = ipaddress.ip_address(source)
    destinationAddress = ipaddress.ip_address(destination)
    if sourceAddress.version == 4:
        familyProtocol, addressFormat = TCP4, "!4s4sHH"
    else:
        familyProtocol, addressFormat = TCP6, "!16s16sHH"
    block = struct.pack(
        addressFormat,
        sourceAddress.packed,
        destinationAddress.packed,
        sourcePort,
        destinationPort,
    )
    return v2Header(PROXY, familyProtocol, block + tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    """
    Build one version 2 TLV.
    """
    return struct.pack("!BH", kind, len(value)) + value


# Some TLVs: PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_NOOP.
SOME_TLVS = tlv(0x01, b"http/1.1") + tlv(0x02, b"example.com") + tlv(0x04, b"\0" * 5)


class ParseTestCase(SynchronousTestCase):
    """
    Helpers for the parser tests.
    """

    def assertInvalid(self, buffer: bytes) -> InvalidProxyHeader:
        """
        Assert that C{buffer} is refused.
        """
        invalid: InvalidProxyHeader = self.assertRaises(
            InvalidProxyHeader, parseProxyHeader, buffer
        )
        self.assertTrue(str(invalid))
        return invalid

    def assertParses(self, buffer: bytes) -> ProxyHeader:
        """
        Assert that C{buffer} is a complete header, and nothing more.
        """
        header = parseProxyHeader(buffer)
        assert header is not None
        self.assertEqual(header.consumed, len(buffer))
        return header

    def assertIncrementallyParses(self, buffer: bytes) -> ProxyHeader:
        """
        Assert that every proper prefix of C{buffer} needs more bytes, and
        that C{buffer} is a complete header.
        """
        for end in range(len(buffer)):
            self.assertIsNone(parseProxyHeader(buffer[:end]), buffer[:end])
        return self.assertParses(buffer)

    def refusedAfter(self, buffer: bytes) -> int:
        """
        Feed C{buffer} one byte at a time.

        @return: The length of the shortest prefix that is refused; every
            shorter prefix must need more bytes.
        """
        for end in range(len(buffer) + 1):
            try:
                result = parseProxyHeader(buffer[:end])
            except InvalidProxyHeader:
                return end
            self.assertIsNone(result)
        self.fail(f"{buffer!r} was never refused")


class ParseV1Tests(ParseTestCase):
    """
    Tests for L{parseProxyHeader} with version 1 (text) headers.
    """

    def test_tcp4(self) -> None:
        """
        A C{TCP4} line gives the source and destination as L{IPv4Address}es.
        """
        header = self.assertParses(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n")
        self.assertEqual(header.source, IPv4Address("TCP", "192.0.2.1", 56324))
        self.assertEqual(header.destination, IPv4Address("TCP", "198.51.100.2", 443))

    def test_tcp6(self) -> None:
        """
        A C{TCP6} line gives L{IPv6Address}es, with the addresses in their
        canonical (compressed, lower-case) form.
        """
        header = self.assertParses(
            b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 2001:db8::2 65535 0\r\n"
        )
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::1", 65535))
        self.assertEqual(header.destination, IPv6Address("TCP", "2001:db8::2", 0))

    def test_tcp6Mapped(self) -> None:
        """
        An IPv4-mapped address is given with its IPv4 part dotted, as a
        search of the logs for the IPv4 address finds it.
        """
        header = self.assertParses(b"PROXY TCP6 ::FFFF:a09:909 ::1 1 2\r\n")
        self.assertEqual(header.source, IPv6Address("TCP", "::ffff:10.9.9.9", 1))

    def test_tcp6Longest(self) -> None:
        """
        The longest C{TCP6} line the specification describes (104 bytes) is
        accepted.
        """
        address = b":".join([b"ffff"] * 8)
        line = b"PROXY TCP6 " + address + b" " + address + b" 65535 65535\r\n"
        self.assertEqual(len(line), 104)
        header = self.assertParses(line)
        self.assertEqual(
            header.source, IPv6Address("TCP", address.decode("ascii"), 65535)
        )

    def test_unknown(self) -> None:
        """
        A bare C{UNKNOWN} line gives no addresses.
        """
        header = self.assertParses(b"PROXY UNKNOWN\r\n")
        self.assertEqual(header, ProxyHeader(None, None, 15))

    def test_unknownIgnoresTheRest(self) -> None:
        """
        Whatever follows C{UNKNOWN} on the line is ignored, even at the
        longest line allowed (107 bytes).
        """
        self.assertIsNone(self.assertParses(b"PROXY UNKNOWN junk ::1\r\n").source)
        longest = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
        self.assertEqual(len(longest), MAX_V1_BYTES)
        self.assertIsNone(self.assertParses(longest).source)

    def test_remainingBytes(self) -> None:
        """
        Bytes after the header are not consumed: they are the start of the
        proxied stream.
        """
        line = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
        header = parseProxyHeader(line + REQUEST)
        assert header is not None
        self.assertEqual(header.consumed, len(line))
        self.assertEqual((line + REQUEST)[header.consumed :], REQUEST)

    def test_byteByByte(self) -> None:
        """
        Fed one byte at a time, a valid line needs more bytes until its LF
        arrives.
        """
        for line in [
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP6 ::1 ::ffff:192.0.2.1 1 2\r\n",
            b"PROXY UNKNOWN\r\n",
            b"PROXY UNKNOWN 1 2 3\r\n",
        ]:
            self.assertIncrementallyParses(line)

    def test_tooLong(self) -> None:
        """
        A line with no LF within 107 bytes is refused; one byte less may
        still become a valid line.
        """
        line = b"PROXY UNKNOWN " + b"x" * 200
        self.assertIsNone(parseProxyHeader(line[: MAX_V1_BYTES - 1]))
        self.assertInvalid(line[:MAX_V1_BYTES])
        self.assertInvalid(line[:MAX_V1_BYTES] + b"\r\n")

    def test_notCRLF(self) -> None:
        """
        The line must end with CRLF: a bare LF or a bare CR is refused.
        """
        self.assertInvalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n")
        self.assertInvalid(b"PROXY UNKNOWN\n")
        self.assertInvalid(b"PROXY UNKNOWN\rx")
        self.assertInvalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rx\r\n")

    def test_unknownFamily(self) -> None:
        """
        Families other than C{TCP4}, C{TCP6} and C{UNKNOWN} (they are
        case-sensitive) are refused, as soon as the family is known wrong.
        """
        for line in [
            b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY \r\n",
            b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
        ]:
            self.assertInvalid(line)
        self.assertEqual(self.refusedAfter(b"PROXY UDP4 "), len(b"PROXY UD"))
        self.assertEqual(self.refusedAfter(b"PROXY TCP4X"), len(b"PROXY TCP4X"))

    def test_familyMismatch(self) -> None:
        """
        An address of the other family than the line announces is refused.
        """
        self.assertInvalid(b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n")
        self.assertInvalid(b"PROXY TCP4 192.0.2.1 2001:db8::1 1 2\r\n")
        self.assertInvalid(b"PROXY TCP6 192.0.2.1 2001:db8::1 1 2\r\n")
        self.assertInvalid(b"PROXY TCP6 2001:db8::1 192.0.2.2 1 2\r\n")

    def test_badAddresses(self) -> None:
        """
        Malformed addresses, leading zeroes, host names, non-ASCII and IPv6
        zone identifiers are refused.
        """
        for source in [
            b"192.0.2",
            b"192.0.2.256",
            b"192.0.2.01",
            b"192.0.2.1.",
            b"localhost",
            b"\xc2\xb9.0.2.1",
            b"",
        ]:
            self.assertInvalid(b"PROXY TCP4 " + source + b" 192.0.2.2 1 2\r\n")
        for source in [b"2001:db8::1::2", b"fe80::1%eth0", b"2001:db8:::1", b"g::1"]:
            self.assertInvalid(b"PROXY TCP6 " + source + b" ::1 1 2\r\n")

    def test_badPorts(self) -> None:
        """
        Ports must be decimal in 0-65535 without leading zeroes.
        """
        for port in [b"65536", b"99999", b"080", b"00", b"-1", b"+1", b"1a", b""]:
            self.assertInvalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 " + port + b" 2\r\n")
            self.assertInvalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 " + port + b"\r\n")

    def test_badFields(self) -> None:
        """
        Exactly four fields separated by single spaces: missing, extra,
        doubled or trailing separators are refused.
        """
        for line in [
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",
            b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
            b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 \r\n",
        ]:
            self.assertInvalid(line)

    def test_badFieldsRefusedEarly(self) -> None:
        """
        Characters that cannot appear in the addresses and ports of the
        announced family, or a fifth field, are refused before the line ends.
        """
        self.assertEqual(self.refusedAfter(b"PROXY TCP4 192.0.2.x"), 20)
        self.assertEqual(self.refusedAfter(b"PROXY TCP4 ::1"), 12)
        self.assertEqual(self.refusedAfter(b"PROXY TCP6 ::g"), 14)
        self.assertEqual(self.refusedAfter(b"PROXY TCP4 1 2 3 4 "), 19)
        self.assertEqual(self.refusedAfter(b"PROXY TCP4 1  "), 14)

    def test_bareLineFeedRefused(self) -> None:
        """
        A line ending in a bare LF is refused even when dropping its last
        character would leave a valid line (C{UNKNOWN} ignores what follows
        it; a port of C{22} would become C{2}).
        """
        self.assertInvalid(b"PROXY UNKNOWN x\n")
        self.assertInvalid(b"PROXY UNKNOWN \n")
        self.assertInvalid(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 22\n")
        self.assertInvalid(b"PROXY TCP6 ::1 ::2 1 22\n")

    def test_bareCarriageReturnInUnknown(self) -> None:
        """
        A bare CR is refused in an C{UNKNOWN} line too, though the rest of
        that line is otherwise ignored.
        """
        self.assertInvalid(b"PROXY UNKNOWN \r\r\n")
        self.assertInvalid(b"PROXY UNKNOWN a\rb\r\n")

    def test_refusedEvenIfEndingInCarriageReturn(self) -> None:
        """
        A partial line that is already wrong is refused though it ends in the
        CR that may start its CRLF.
        """
        for buffer in [b"PROXY TCP4 192.0.2.x\r", b"PROXY TCP4 x\r", b"PROXY TCP9\r"]:
            self.assertInvalid(buffer)

    def test_wrongCharactersRefusedInOneRead(self) -> None:
        """
        A partial line that arrives in one read is refused for a character
        its family's addresses cannot hold, even in a field already ended by
        a space.
        """
        for buffer in [
            b"PROXY TCP4 a ",
            b"PROXY TCP4 192.0.2.f ",
            b"PROXY TCP6 fe80::1%1 ",
        ]:
            self.assertInvalid(buffer)


class ParseV2Tests(ParseTestCase):
    """
    Tests for L{parseProxyHeader} with version 2 (binary) headers.
    """

    def test_proxyTCP4(self) -> None:
        """
        A PROXY header for TCP over IPv4 gives L{IPv4Address}es.
        """
        header = self.assertParses(v2Inet("192.0.2.1", 56324, "198.51.100.2", 443))
        self.assertEqual(header.source, IPv4Address("TCP", "192.0.2.1", 56324))
        self.assertEqual(header.destination, IPv4Address("TCP", "198.51.100.2", 443))
        self.assertEqual(header.consumed, 16 + 12)

    def test_proxyTCP6(self) -> None:
        """
        A PROXY header for TCP over IPv6 gives L{IPv6Address}es.
        """
        header = self.assertParses(v2Inet("2001:db8::1", 65535, "2001:db8::2", 0))
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::1", 65535))
        self.assertEqual(header.destination, IPv6Address("TCP", "2001:db8::2", 0))
        self.assertEqual(header.consumed, 16 + 36)

    def test_proxyTCP6Mapped(self) -> None:
        """
        An IPv4-mapped address in a version 2 header is given with its IPv4
        part dotted.
        """
        header = self.assertParses(v2Inet("::ffff:10.9.9.9", 1, "::1", 2))
        self.assertEqual(header.source, IPv6Address("TCP", "::ffff:10.9.9.9", 1))
        self.assertEqual(header.destination, IPv6Address("TCP", "::1", 2))

    def test_tlvsSkipped(self) -> None:
        """
        TLVs after the addresses are part of the header, and skipped.
        """
        for source, destination in [("192.0.2.1", "192.0.2.2"), ("::1", "::2")]:
            plain = self.assertParses(v2Inet(source, 1, destination, 2))
            withTLVs = self.assertParses(v2Inet(source, 1, destination, 2, SOME_TLVS))
            self.assertEqual(withTLVs.consumed, plain.consumed + len(SOME_TLVS))
            self.assertEqual(withTLVs.source, plain.source)
            self.assertEqual(withTLVs.destination, plain.destination)

    def test_remainingBytes(self) -> None:
        """
        Bytes after the header are not consumed: they are the start of the
        proxied stream.
        """
        data = v2Inet("192.0.2.1", 1, "192.0.2.2", 2, SOME_TLVS)
        header = parseProxyHeader(data + REQUEST)
        assert header is not None
        self.assertEqual((data + REQUEST)[header.consumed :], REQUEST)

    def test_byteByByte(self) -> None:
        """
        Fed one byte at a time, a valid header needs more bytes until its
        last byte arrives.
        """
        for data in [
            v2Inet("192.0.2.1", 1, "192.0.2.2", 2),
            v2Inet("::1", 1, "::2", 2, SOME_TLVS),
            v2Header(LOCAL, UNSPEC),
        ]:
            self.assertIncrementallyParses(data)

    def test_local(self) -> None:
        """
        A LOCAL header (a health check from the balancer itself) gives no
        addresses, and its address block, whatever family it claims, is
        skipped.
        """
        self.assertEqual(
            self.assertParses(v2Header(LOCAL, UNSPEC)), ProxyHeader(None, None, 16)
        )
        addresses = v2Inet("192.0.2.1", 1, "192.0.2.2", 2)
        local = bytes([addresses[0x0C] & 0xF0]) + addresses[0x0D:]
        header = self.assertParses(addresses[:0x0C] + local)
        self.assertEqual(header, ProxyHeader(None, None, 28))
        header = self.assertParses(v2Header(LOCAL, 0xFF, b"\x01\x02\x03"))
        self.assertEqual(header, ProxyHeader(None, None, 19))

    def test_proxyUnspec(self) -> None:
        """
        A PROXY header with C{AF_UNSPEC} gives no addresses; its payload
        (TLVs) is skipped.
        """
        header = self.assertParses(v2Header(PROXY, UNSPEC, SOME_TLVS))
        self.assertEqual(header, ProxyHeader(None, None, 16 + len(SOME_TLVS)))

    def test_proxyUnix(self) -> None:
        """
        A PROXY header with C{AF_UNIX} over a stream gives no addresses: a
        UNIX socket path is no client address.
        """
        path = b"/run/client.sock".ljust(108, b"\0")
        header = self.assertParses(v2Header(PROXY, UNIX_STREAM, path + path))
        self.assertEqual(header, ProxyHeader(None, None, 16 + 216))

    def test_badSignature(self) -> None:
        """
        A near miss of the 12-byte signature is refused at the first wrong
        byte.
        """
        self.assertEqual(self.refusedAfter(V2_SIGNATURE[:-1] + b"X"), 12)
        self.assertEqual(self.refusedAfter(b"\r\n\r\nCONNECT"), 5)

    def test_badVersion(self) -> None:
        """
        A version other than 2 is refused as soon as byte 13 arrives.
        """
        for versionCommand in [0x01, 0x11, 0x31, 0xF1]:
            data = v2Header(versionCommand, TCP4, b"\0" * 12)
            self.assertEqual(self.refusedAfter(data), 13)

    def test_badCommand(self) -> None:
        """
        A command other than LOCAL or PROXY is refused as soon as byte 13
        arrives.
        """
        for versionCommand in [0x22, 0x2F]:
            data = v2Header(versionCommand, TCP4, b"\0" * 12)
            self.assertEqual(self.refusedAfter(data), 13)

    def test_unsupportedFamily(self) -> None:
        """
        PROXY headers for datagram transports or unknown families are refused
        as soon as byte 14 arrives.
        """
        for familyProtocol in [UDP4, UDP6, UNIX_DGRAM, 0x10, 0x20, 0x01, 0x13, 0x41]:
            data = v2Header(PROXY, familyProtocol, b"\0" * 216)
            self.assertEqual(self.refusedAfter(data), 14)

    def test_addressBlockTooShort(self) -> None:
        """
        A length too short for the family's address block is refused as soon
        as the length arrives.
        """
        for familyProtocol, needed in [(TCP4, 12), (TCP6, 36), (UNIX_STREAM, 216)]:
            data = v2Header(PROXY, familyProtocol, b"\0" * (needed - 1))
            self.assertEqual(self.refusedAfter(data), 16)
            self.assertParses(v2Header(PROXY, familyProtocol, b"\0" * needed))

    def test_tooLong(self) -> None:
        """
        A header longer than L{MAX_HEADER_BYTES} in all is refused as soon as
        its length arrives, before its payload; one exactly that long is
        accepted.
        """
        longest = MAX_HEADER_BYTES - 16
        self.assertParses(v2Header(PROXY, UNSPEC, b"\0" * longest))
        tooLong = v2Header(PROXY, UNSPEC, length=longest + 1)
        self.assertEqual(self.refusedAfter(tooLong), 16)
        self.assertInvalid(v2Header(LOCAL, UNSPEC, length=0xFFFF))

    def test_proxyUnspecWithoutPayload(self) -> None:
        """
        A PROXY header with C{AF_UNSPEC} needs no address block at all.
        """
        self.assertEqual(
            self.assertParses(v2Header(PROXY, UNSPEC)), ProxyHeader(None, None, 16)
        )

    def test_longestHeader(self) -> None:
        """
        The longest header accepted is 16 KiB in all.
        """
        self.assertParses(v2Header(PROXY, UNSPEC, b"\0" * (16384 - 16)))
        self.assertInvalid(v2Header(PROXY, UNSPEC, length=16384 - 15))


class SignatureTests(ParseTestCase):
    """
    Tests for how soon L{parseProxyHeader} refuses a connection that does not
    start with a PROXY header.
    """

    def test_empty(self) -> None:
        """
        Nothing received yet: more bytes are needed.
        """
        self.assertIsNone(parseProxyHeader(b""))

    def test_connectRefusedAtOnce(self) -> None:
        """
        A client that sends a CONNECT request straight away is refused at its
        first byte.
        """
        self.assertEqual(self.refusedAfter(b"CONNECT a:443 HTTP/1.1\r\n"), 1)

    def test_nearMissesRefusedEarly(self) -> None:
        """
        Bytes that share a beginning with one of the signatures are refused
        at the first byte that differs.
        """
        for data, refusedAt in [
            (b"PUT / HTTP/1.1\r\n", 2),
            (b"PROXX TCP4", 5),
            (b"PROXY\r\n", 6),
            (b"\r\nCONNECT a:443 HTTP/1.1\r\n", 3),
            (b"\x16\x03\x01\x02\x00", 1),
            (b"GET / HTTP/1.1\r\n", 1),
        ]:
            self.assertEqual(self.refusedAfter(data), refusedAt, data)


def anyOutcome(buffer: bytes) -> ProxyHeader | InvalidProxyHeader | None:
    """
    Parse C{buffer}, returning the exception rather than raising it.
    """
    try:
        return parseProxyHeader(buffer)
    except InvalidProxyHeader as invalid:
        return invalid


V1_PIECES = [
    b"PROXY ",
    b"PROXY",
    b"TCP4",
    b"TCP6",
    b"UNKNOWN",
    b" ",
    b"192.0.2.1",
    b"2001:db8::1",
    b"::",
    b"0",
    b"65535",
    b"65536",
    b"\r\n",
    b"\r",
    b"\n",
    b"\x00",
]

V2_PIECES = [
    V2_SIGNATURE,
    b"\x20",
    b"\x21",
    b"\x00",
    b"\x11",
    b"\x12",
    b"\x31",
    b"\x0c",
    b"\x24",
    b"\xff",
    b"\x7f\xff",
    b"\x00\x0c",
    b"\x00\x24",
    b"\x00\xd8",
]


@st.composite
def validHeaders(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """
    Draw a valid header of either version, with the header it parses to.
    """
    ports = st.integers(min_value=0, max_value=65535)
    kind = draw(st.sampled_from(["v1", "v1unknown", "v2", "v2local"]))
    if kind == "v1unknown":
        # Anything but CR and LF, up to the longest line allowed.
        rest = draw(st.binary(max_size=MAX_V1_BYTES - len(b"PROXY UNKNOWN \r\n")))
        rest = rest.replace(b"\r", b"").replace(b"\n", b"")
        spaced = b" " + rest if draw(st.booleans()) else b""
        data = b"PROXY UNKNOWN" + spaced + b"\r\n"
        return data, ProxyHeader(None, None, len(data))
    if kind == "v2local":
        payload = draw(st.binary(max_size=300))
        data = v2Header(LOCAL, draw(st.integers(0, 255)), payload)
        return data, ProxyHeader(None, None, len(data))
    version = draw(st.sampled_from([4, 6]))
    addresses = st.ip_addresses(v=4) if version == 4 else st.ip_addresses(v=6)
    source, destination = draw(addresses), draw(addresses)
    sourcePort, destinationPort = draw(ports), draw(ports)
    address = IPv4Address if version == 4 else IPv6Address
    if kind == "v1":
        data = b"PROXY TCP%d %s %s %d %d\r\n" % (
            version,
            str(source).encode("ascii"),
            str(destination).encode("ascii"),
            sourcePort,
            destinationPort,
        )
    else:
        data = v2Inet(
            str(source),
            sourcePort,
            str(destination),
            destinationPort,
            draw(st.binary(max_size=300)),
        )

    def shown(ip: object) -> str:
        # An IPv4-mapped address is given with its IPv4 part dotted.
        mapped = getattr(ip, "ipv4_mapped", None)
        return str(ip) if mapped is None else f"::ffff:{mapped}"

    return data, ProxyHeader(
        address("TCP", shown(source), sourcePort),
        address("TCP", shown(destination), destinationPort),
        len(data),
    )


class PropertyTests(ParseTestCase):
    """
    Properties of L{parseProxyHeader} over generated input.
    """

    def checkOutcome(self, buffer: bytes) -> None:
        """
        Check that parsing C{buffer} needs more bytes (only for a buffer
        shorter than the longest header, and one that starts like one of the
        signatures), gives a header no longer than the buffer, or is refused.
        """
        outcome = anyOutcome(buffer)
        if outcome is None:
            self.assertLess(len(buffer), MAX_HEADER_BYTES)
            prefix = buffer[:12]
            self.assertTrue(
                V2_SIGNATURE.startswith(prefix)
                or (b"PROXY ".startswith(prefix[:6]) and len(buffer) < MAX_V1_BYTES)
            )
        elif isinstance(outcome, ProxyHeader):
            self.assertTrue(0 < outcome.consumed <= len(buffer))
        else:
            self.assertIsInstance(outcome, InvalidProxyHeader)
        if buffer[:1] not in (b"", b"P", b"\r"):
            self.assertIsInstance(outcome, InvalidProxyHeader)

    # No deadline, here or below: how long an example takes by the wall
    # clock says how loaded the machine is, not how fast the parser is, and
    # an example slowed past Hypothesis's default 200 ms fails the test.
    @settings(deadline=None)
    @given(st.binary(max_size=300))
    def test_anyBytes(self, buffer: bytes) -> None:
        """
        Any byte string either needs more bytes, parses, or is refused with
        L{InvalidProxyHeader}; it never raises anything else.
        """
        self.checkOutcome(buffer)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(V1_PIECES), max_size=30))
    def test_anyV1LikeBytes(self, pieces: list[bytes]) -> None:
        """
        Buffers built from version 1 pieces (which reach deeper than random
        bytes do) obey the same rule.
        """
        self.checkOutcome(b"".join(pieces))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.sampled_from(V2_PIECES), max_size=10),
        st.binary(max_size=300),
    )
    def test_anyV2LikeBytes(self, pieces: list[bytes], tail: bytes) -> None:
        """
        Buffers built from version 2 pieces and random bytes obey the same
        rule.
        """
        self.checkOutcome(b"".join(pieces) + tail)

    @settings(max_examples=300, deadline=None)
    @given(validHeaders(), st.binary(max_size=50))
    def test_validHeaders(
        self, headerAndExpected: tuple[bytes, ProxyHeader], tail: bytes
    ) -> None:
        """
        Every proper prefix of a valid header needs more bytes; the header
        parses to what it says; bytes after it change nothing.
        """
        data, expected = headerAndExpected
        self.assertEqual(self.assertIncrementallyParses(data), expected)
        self.assertEqual(parseProxyHeader(data + tail), expected)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.sampled_from(V1_PIECES + V2_PIECES), max_size=20),
        st.binary(max_size=50),
    )
    def test_refusalIsFinal(self, pieces: list[bytes], tail: bytes) -> None:
        """
        Once a buffer is refused, so is any longer buffer that starts with it,
        and a parsed header stays the same whatever follows: the caller may
        decide as soon as it has an answer.
        """
        buffer = b"".join(pieces)
        outcome = anyOutcome(buffer)
        longer = anyOutcome(buffer + tail)
        if isinstance(outcome, InvalidProxyHeader):
            self.assertIsInstance(longer, InvalidProxyHeader)
        elif outcome is not None:
            self.assertEqual(longer, outcome)
