"""
Parsing and validation of a CONNECT request head.

Everything here is pure: bytes go in, a L{ConnectRequest} or a
L{RequestRejected} comes out.  No I/O, no reactor, so every rule can be
tested directly.

The grammar is RFC 9112 (HTTP/1.1 message syntax) section 3 and 5, with the
request target restricted to the authority-form that RFC 9110 section 9.3.6
requires for CONNECT.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from attrs import field, frozen

__all__ = [
    "HOSTNAME",
    "ConnectRequest",
    "RequestRejected",
    "findHeadEnd",
    "formatAuthority",
    "isHeadRequest",
    "overlongRequestLine",
    "parseAuthority",
    "parseConnectHead",
    "requestLineLength",
    "strayCarriageReturn",
]

_BARE_CR = "A bare CR is not a line ending."
# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9112 section 2.3: HTTP-version is case-sensitive, one digit each.
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
# Field values may hold visible characters, spaces, tabs and obs-text; any
# other control character (NUL, CR, LF, DEL, ...) is an attack or a bug.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: A DNS name (or an IPv4 literal, which uses the same characters).  RFC 3986
#: also admits percent-encoding and sub-delims in a reg-name; no resolver
#: accepts those, so they are refused rather than passed along.
HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?\Z")
# RFC 3986 section 3.2.3: port = *DIGIT, so leading zeros are allowed; what
# is left once they are gone is at most five digits, so that int() never
# converts a long run of them (and 0 does not match at all).
_PORT = re.compile(r"0*([1-9][0-9]{0,4})\Z")
# RFC 9110 section 7.2: Host = uri-host [ ":" port ], uri-host being an
# IP-literal or a reg-name (RFC 3986 section 3.2.2); empty is allowed.  The
# proxy does not use the value (the target is the request's), but RFC 9112
# section 3.2 wants an invalid one answered with 400.  A reg-name is
# unreserved and sub-delims characters and "%" HEXDIG HEXDIG; each "%"
# starts a repetition of its own, so a failing match takes time in
# proportion to the value.
_HOST_REG_NAME = re.compile(
    rb"[0-9A-Za-z._~!$&'()*+,;=-]*(?:%[0-9A-Fa-f]{2}[0-9A-Za-z._~!$&'()*+,;=-]*)*"
    rb"(?::[0-9]*)?\Z"
)
# An IP-literal is "[" ( IPv6address / IPvFuture ) "]": what is inside the
# brackets is checked apart.
_HOST_IP_LITERAL = re.compile(rb"\[([^\[\]]*)\](?::[0-9]*)?\Z")
_IPV6_CHARACTERS = re.compile(rb"[0-9A-Fa-f:.]+\Z")
_IPV_FUTURE = re.compile(rb"[vV][0-9A-Fa-f]+\.[0-9A-Za-z._~!$&'()*+,;=:-]+\Z")
# Python's http.client (3.12 and later) writes an IPv6 target without its
# brackets (Host: ::1:443): unambiguous enough, and the value is not used,
# so it is let through rather than refuse that client, if it is an IPv6
# address, perhaps followed by a port.  Each colon starts a repetition of
# its own, so the pattern fails in time proportional to the value (two
# overlapping [...:]* took the square of it: seconds, on one thread, for a
# 64 KiB run of colons).
_HOST_BARE_IPV6 = re.compile(rb"[0-9A-Fa-f.]*(?::[0-9A-Fa-f.]*)+\Z")
# The methods of the IANA HTTP method registry that a client may reasonably
# send to a server by mistake: RFC 9110's and PATCH (RFC 5789), and WebDAV's
# (RFC 4918).  They get 405 (known, not allowed here); any other method
# gets 501 (RFC 9110 section 9.1: not implemented).
_KNOWN_METHODS = frozenset(
    {
        b"CONNECT",
        b"GET",
        b"HEAD",
        b"POST",
        b"PUT",
        b"DELETE",
        b"OPTIONS",
        b"TRACE",
        b"PATCH",
        b"PROPFIND",
        b"PROPPATCH",
        b"MKCOL",
        b"COPY",
        b"MOVE",
        b"LOCK",
        b"UNLOCK",
    }
)
_LONGEST_METHOD = max(len(method) for method in _KNOWN_METHODS)
# The CRs and LFs at the start of a head: empty lines, and perhaps a CR
# that ends none.
_LINE_BREAKS = re.compile(rb"[\r\n]*")


@frozen
class ConnectRequest:
    """
    A well-formed CONNECT request head.

    @ivar host: The target host: a DNS name, an IPv4 literal or an IPv6
        literal without its brackets.
    @ivar port: The target port, 1 to 65535.
    @ivar version: The HTTP version of the request, C{(1, 0)} or C{(1, 1)}.
    @ivar headers: The header fields in the order received, names lower-cased.
    """

    host: str
    port: int
    version: tuple[int, int] = (1, 1)
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())

    @property
    def authority(self) -> str:
        """
        The target in authority-form, as it would appear in a request line.
        """
        return formatAuthority(self.host, self.port)

    def header(self, name: bytes) -> bytes | None:
        """
        Look up a header field.

        @param name: The lower-case field name.
        @return: The value of the first field of that name, or L{None}.
        """
        for fieldName, value in self.headers:
            if fieldName == name:
                return value
        return None


class RequestRejected(Exception):
    """
    The request cannot be served; the client gets this HTTP error.

    @ivar status: The HTTP status code to answer with.
    @ivar detail: A short human-readable explanation for the response body.
    @ivar headers: Extra header fields for the response.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """
        @param status: The HTTP status code to answer with.
        @param detail: A short human-readable explanation for the response
            body.
        @param headers: Extra header fields for the response, as
            C{(name, value)} pairs.
        """
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.headers = tuple(headers)


def formatAuthority(host: str, port: int) -> str:
    """
    C{host:port} in authority-form, an IPv6 literal in brackets.

    @param host: A name, or an IP address literal (IPv6 without brackets).
    @param port: The port.
    @return: The authority.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _emptyLinesLength(buffer: bytes) -> int:
    """
    How many bytes the empty lines (each CRLF or a bare LF) at the start of
    C{buffer} take.

    Each call reads all of them again, in C rather than a loop over lines:
    callers bound how many there may be (L{requestLineLength} counts them).
    """
    if not buffer.startswith((b"\r", b"\n")):
        # As nearly every head does: a test spares the search.
        return 0
    match = _LINE_BREAKS.match(buffer)
    end = match.end() if match is not None else 0
    # The run of CRs and LFs may hold CRs that end no line.  The first line
    # starts at the first of them: one followed by another CR is a bare CR
    # (which the parser refuses), and so is a last one followed by anything
    # else, while a last one at the end of the buffer may yet start a CRLF.
    stray = buffer.find(b"\r\r", 0, end)
    if stray != -1:
        return stray
    return end - buffer.endswith(b"\r", 0, end)


def findHeadEnd(
    buffer: bytes, start: int = 0, *, skipEmptyLines: bool = False
) -> tuple[int, int] | None:
    """
    Find the empty line that ends a request head.

    Lines end with CRLF; RFC 9112 section 2.2 lets a recipient accept a bare
    LF too, which this does.

    @param buffer: The bytes received so far.
    @param start: Where to start looking (to avoid rescanning old bytes).
    @param skipEmptyLines: Whether empty lines at the start of C{buffer}, any
        number of them, are passed over rather than taken for the end of the
        head, as RFC 9112 section 2.2 wants of those before a request line
        (the head found still starts with them).  Without it (a parent
        proxy's response) the first empty line ends the head, however early.
        The caller bounds how many there may be, as each call reads them all
        again: the proxy counts them in L{requestLineLength}.
    @return: C{(headLength, consumed)}: the length of the head without its
        final empty line, and the number of bytes up to and including that
        empty line; or L{None} if the head is not complete yet.
    """
    if skipEmptyLines:
        # The first line ending after the empty lines is the request line's;
        # the head ends with an empty line after that.
        start = max(start, _emptyLinesLength(buffer))
    index = buffer.find(b"\n", start)
    while index != -1:
        if buffer.startswith(b"\n", index + 1):
            return index + 1, index + 2
        if buffer.startswith(b"\r\n", index + 1):
            return index + 1, index + 3
        index = buffer.find(b"\n", index + 1)
    return None


def requestLineLength(buffer: bytes) -> int:
    """
    How long the request line in C{buffer} is so far, without its line
    ending, as L{parseConnectHead} measures it against its limit: counting
    the empty lines that may come before it (RFC 9112 section 2.2), so that
    a client cannot make the proxy keep and scan an endless run of them.

    @param buffer: The start of a request head, perhaps incomplete.
    @return: The length in bytes.
    """
    end = buffer.find(b"\n", _emptyLinesLength(buffer))
    if end == -1:
        # A CR at the end may be the start of the line ending.
        return len(buffer) - buffer.endswith(b"\r")
    # The line after the empty lines is not empty, so this CR is its own.
    return end - buffer.endswith(b"\r", 0, end)


def strayCarriageReturn(buffer: bytes, start: int = 0) -> RequestRejected | None:
    """
    The refusal of a head, perhaps incomplete, in which a CR is followed by
    anything but LF (RFC 9112 section 2.2: a bare CR is invalid).  Checked
    while the head is still coming: the end of a head whose lines end in
    bare CRs is never found, and the client would wait for a timeout, or be
    told its request line is too long.

    @param buffer: The start of a request head.
    @param start: Where to start looking; the bytes before it were looked
        at already, but for a CR just before it, which needs the byte after
        it to be told.
    @return: The C{400} to answer with, or L{None}: no bare CR yet (a CR
        at the end of C{buffer} may still start a CRLF).
    """
    start = max(0, start - 1)
    crs = buffer.count(b"\r", start) - buffer.endswith(b"\r")
    if crs > buffer.count(b"\r\n", start):
        return RequestRejected(400, _BARE_CR)
    return None


def isHeadRequest(buffer: bytes) -> bool:
    """
    Whether C{buffer}, the start of a request head, asks for C{HEAD}: the
    answer must then carry no content (RFC 9110 section 9.3.2).

    @param buffer: The start of a request head.
    @return: Whether its method is C{HEAD}.
    """
    return buffer.startswith(b"HEAD ", _emptyLinesLength(buffer))


def overlongRequestLine(buffer: bytes) -> RequestRejected:
    """
    The refusal of a request line longer than the limit: 414, unless its
    method is a token already longer than any this proxy knows, which
    RFC 9112 section 3 wants answered with 501 (the method is what matters,
    not the length).

    @param buffer: The start of a request head, perhaps incomplete, whose
        L{requestLineLength} is over the limit.
    @return: The refusal to answer with.
    """
    start = _emptyLinesLength(buffer)
    end = buffer.find(b"\n", start)
    if end == -1:
        end = len(buffer)
    # The method ends at the first SP; with none yet, all of the line so far
    # is the start of it, but for a CR that ends the line or may start its
    # ending.
    space = buffer.find(b" ", start, end)
    if space == -1:
        space = end - buffer.endswith(b"\r", start, end)
    method = buffer[start:space]
    if len(method) > _LONGEST_METHOD and _TOKEN.match(method):
        return RequestRejected(501, "The request method is not implemented.")
    return RequestRejected(414, "The request line is too long.")


def parseAuthority(target: bytes) -> tuple[str, int]:
    """
    Parse an authority-form request target, C{host:port}.

    @param target: The request target from the request line.
    @return: The host (without brackets for IPv6) and the port.
    @raise RequestRejected: With status 400 if the target is not a valid
        authority with a port in 1-65535.
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise RequestRejected(400, "The request target is not ASCII.") from None
    if "@" in text:
        raise RequestRejected(400, "The request target must not hold user info.")
    if text.startswith("["):
        close = text.find("]")
        if close == -1 or text[close + 1 : close + 2] != ":":
            raise RequestRejected(400, "The request target must be [IPv6]:port.")
        host, portText = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise RequestRejected(400, "The IPv6 address is not valid.") from None
        if "%" in host:
            raise RequestRejected(400, "IPv6 zone identifiers are not allowed.")
    else:
        host, colon, portText = text.rpartition(":")
        if not colon:
            raise RequestRejected(400, "The request target must be host:port.")
        # One trailing dot is the DNS root, which a fully qualified name may
        # end with; RFC 1035's 253 characters are counted without it.  Two
        # would make an empty label.
        name = host.removesuffix(".")
        if not HOSTNAME.match(name) or not all(
            0 < len(label) <= 63 for label in name.split(".")
        ):
            raise RequestRejected(400, "The target host name is not valid.")
        # A name whose last label is a number is an IPv4 address in one of
        # the spellings inet_aton accepts (127.1, 2130706433, 0x7f.0.0.1):
        # refuse all but the standard one, which the address policy checks,
        # rather than let a resolver (perhaps a parent proxy's) read it as
        # an address unseen.
        if _looksNumeric(host) and not _DOTTED_QUAD.match(host):
            raise RequestRejected(
                400, "IPv4 addresses must be written as four decimal numbers."
            )
    portMatch = _PORT.match(portText)
    if portMatch is None or int(portMatch.group(1)) > 65535:
        raise RequestRejected(400, "The target port must be a number in 1-65535.")
    return host, int(portMatch.group(1))


# The one IPv4 spelling accepted: four decimal numbers 0-255 without
# leading zeros (what ipaddress.IPv4Address accepts, checked faster).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")

_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")


def _looksNumeric(host: str) -> bool:
    """
    Whether C{host}'s last label is a decimal or hexadecimal number, which
    no DNS name has and which makes C{inet_aton} read it as an address.
    """
    return _NUMERIC_LABEL.match(host.rstrip(".").rpartition(".")[2]) is not None


def _parseRequestLine(line: bytes) -> tuple[tuple[int, int], bytes]:
    """
    Parse and check a request line.

    @return: The HTTP version and the raw request target.
    @raise RequestRejected: 400 for a malformed line, 405 for another
        method this proxy knows, 501 for one it does not, 505 for an HTTP
        major version other than 1.
    """
    parts = line.split(b" ")
    if len(parts) != 3:
        raise RequestRejected(400, "The request line is malformed.")
    method, target, versionText = parts
    versionMatch = _VERSION.match(versionText)
    if not _TOKEN.match(method) or not target or versionMatch is None:
        raise RequestRejected(400, "The request line is malformed.")
    if method not in _KNOWN_METHODS:
        # Methods are case-sensitive: "connect" is not one of them.
        raise RequestRejected(
            501,
            "The request method is not implemented: "
            "this is a CONNECT proxy, it serves only the CONNECT method.",
        )
    if method != b"CONNECT":
        raise RequestRejected(
            405,
            "This is a CONNECT proxy: it serves only the CONNECT method.",
            [(b"Allow", b"CONNECT")],
        )
    major, minor = int(versionMatch.group(1)), int(versionMatch.group(2))
    if major != 1:
        raise RequestRejected(505, "Only HTTP/1.x is supported.")
    # RFC 9110 section 2.5: a later minor version of HTTP/1 is served as the
    # highest this proxy conforms to, HTTP/1.1 (whose rules, Host included,
    # then apply).
    return (1, min(minor, 1)), target


def _parseFieldLine(line: bytes) -> tuple[bytes, bytes]:
    """
    Parse one header field line, C{name: value}.

    @return: The lower-cased name and the value without surrounding
        whitespace.
    @raise RequestRejected: 400 for obs-fold, a missing colon, whitespace
        before the colon, a name that is not a token, or control characters.
    """
    if line[:1] in (b" ", b"\t"):
        raise RequestRejected(400, "Obsolete line folding is not allowed.")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.match(name):
        raise RequestRejected(400, "A header field line is malformed.")
    if _BAD_VALUE_BYTE.search(value):
        raise RequestRejected(400, "A header field holds a control character.")
    return name.lower(), value.strip(b" \t")


def _validHostValue(value: bytes) -> bool:
    """
    Whether C{value} is C{uri-host [":" port]} (RFC 9110 section 7.2, RFC
    3986 section 3.2.2), or an IPv6 address without its brackets, perhaps
    followed by C{":" port}.
    """
    if _HOST_REG_NAME.match(value):
        return True
    literal = _HOST_IP_LITERAL.match(value)
    if literal is not None:
        inside = literal.group(1)
        # RFC 3986 has no zone identifier in an IP-literal (and the request
        # target may not hold one either): a "%" is refused with the other
        # characters IPv6Address does not take.
        return _IPV_FUTURE.match(inside) is not None or _isIPv6Address(inside)
    if not _HOST_BARE_IPV6.match(value):
        return False
    if _isIPv6Address(value):
        return True
    address, _, port = value.rpartition(b":")
    return (not port or port.isdigit()) and _isIPv6Address(address)


def _isIPv6Address(text: bytes) -> bool:
    """
    Whether C{text} is an IPv6 address, without a zone identifier.
    """
    if not _IPV6_CHARACTERS.match(text):
        return False
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        return False
    return True


def _isZeroLength(value: bytes) -> bool:
    """
    Whether a Content-Length field value is 0, or a list of 0s (RFC 9110
    section 8.6 lets a sender repeat the value as a list).  Each member is
    digits that are all zero, however many (without int(): Python refuses
    to convert more than 4300 digits); an empty member is refused as an
    empty value is.
    """
    for member in value.split(b","):
        member = member.strip(b" \t")
        if not member.isdigit() or member.strip(b"0"):
            return False
    return True


def _checkFraming(
    headers: Sequence[tuple[bytes, bytes]], version: tuple[int, int]
) -> None:
    """
    Refuse header fields that make no sense on a CONNECT request.

    @raise RequestRejected: 400 for a missing (HTTP/1.1), repeated or
        malformed Host, a repeated Proxy-Authorization, any
        Transfer-Encoding, or a Content-Length other than 0 (a CONNECT
        request has no content, and a proxy that believed otherwise could be
        made to read tunnel bytes as a body).
    """
    hosts = 0
    credentials = 0
    for name, value in headers:
        if name == b"proxy-authorization":
            # One set of credentials (RFC 9110 section 11.7.1): with two, a
            # proxy in front that read the other would disagree on who asks.
            credentials += 1
            if credentials > 1:
                raise RequestRejected(
                    400, "More than one Proxy-Authorization header field."
                )
        elif name == b"host":
            hosts += 1
            if hosts > 1:
                raise RequestRejected(400, "More than one Host header field.")
            if not _validHostValue(value):
                raise RequestRejected(400, "The Host header field is not valid.")
        elif name == b"transfer-encoding" or (
            name == b"content-length" and not _isZeroLength(value)
        ):
            raise RequestRejected(400, "A CONNECT request has no content.")
    if hosts == 0 and version == (1, 1):
        # RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1
        # request without Host.  HTTP/1.0 clients (Python's http.client
        # before 3.12, for one) need not send it.
        raise RequestRejected(400, "An HTTP/1.1 request needs a Host header field.")


def parseConnectHead(
    head: bytes,
    maxRequestLine: int = 8192,
    maxFields: int = 100,
) -> ConnectRequest:
    """
    Parse a complete request head.

    @param head: The request line and header field lines, each ending in
        CRLF (or a bare LF; the last one's may be left off, as when the head
        was split where the empty line begins), without the final empty line.
        Empty lines before the request line are ignored (RFC 9112 section
        2.2), but for their length.
    @param maxRequestLine: The longest request line accepted, in bytes,
        counting the empty lines before it (as L{requestLineLength} does).
    @param maxFields: The most header fields accepted.
    @return: The parsed request.
    @raise RequestRejected: For anything that is not a well-formed CONNECT
        request this proxy can serve.
    """
    received = head
    if b"\r" in head:
        # A CR may only end a line, just before its LF.
        head = head.replace(b"\r\n", b"\n")
        if b"\r" in head:
            raise RequestRejected(400, _BARE_CR)
    # The empty lines before the request line go at once: deleting them one
    # by one from the list of lines takes time in the square of their number.
    lines = head.lstrip(b"\n").split(b"\n")
    # A head that ends in a line ending (the proxy's always does) leaves an
    # empty last item; one whose last line ending was left off does not,
    # and its last line counts as much as the others.
    if not lines[-1]:
        del lines[-1]
    if not lines:
        raise RequestRejected(400, "The request line is missing.")
    if len(lines[0]) > maxRequestLine or (
        # Empty lines before it count too (rare: measured only then).
        received.startswith((b"\r", b"\n"))
        and requestLineLength(received) > maxRequestLine
    ):
        raise overlongRequestLine(lines[0])
    version, target = _parseRequestLine(lines[0])
    if len(lines) - 1 > maxFields:
        raise RequestRejected(431, "Too many header fields.")
    headers = tuple(_parseFieldLine(line) for line in lines[1:])
    _checkFraming(headers, version)
    host, port = parseAuthority(target)
    return ConnectRequest(host=host, port=port, version=version, headers=headers)
