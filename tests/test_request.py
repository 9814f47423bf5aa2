"""
Tests for L{tunnel.request}: the pure CONNECT head parser.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunnel import request as requestModule
from tunnel.request import (
    ConnectRequest,
    RequestRejected,
    findHeadEnd,
    isHeadRequest,
    overlongRequestLine,
    parseAuthority,
    parseConnectHead,
    requestLineLength,
    strayCarriageReturn,
)

# Every status the parser may answer with.
PARSER_STATUSES = {400, 405, 414, 431, 501, 505}


def parse(head: bytes, **kwargs: int) -> ConnectRequest:
    """
    Parse C{head} plus the line ending that ends its last line, adding the
    C{Host} field HTTP/1.1 requires when the head has none.
    """
    if b"HTTP/1.1" in head and b"\nhost:" not in head.lower():
        head += b"\r\nHost: h"
    return parseConnectHead(head + b"\r\n", **kwargs)


class RequestLineLengthTests(SynchronousTestCase):
    """
    Tests for L{requestLineLength}.
    """

    def test_lengths(self) -> None:
        """
        The length of the request line so far, without its line ending
        (CRLF or LF, or a CR that may start one), counting the empty lines
        before it.
        """
        for buffer, length in [
            (b"", 0),
            (b"\r", 0),
            (b"abc", 3),
            (b"abc\r", 3),
            (b"abc\r\n", 3),
            (b"\r\nabc", 5),
            (b"\r\n\r\nab\r\nxx", 6),
            (b"\n\nabcd\n", 6),
            (b"\r\n\r\n", 4),
            (b"\r\n\r", 2),
            (b"\n\rab\n", 4),
            (b"\r\n\r\rab\r\n", 6),
        ]:
            self.assertEqual(requestLineLength(buffer), length, buffer)


def hasBareCR(buffer: bytes) -> bool:
    """
    Whether a CR in C{buffer} is followed by anything but LF, byte by byte.
    """
    return any(
        buffer[i : i + 1] == b"\r" and buffer[i + 1 : i + 2] != b"\n"
        for i in range(len(buffer) - 1)
    )


class StrayCarriageReturnTests(SynchronousTestCase):
    """
    Tests for L{strayCarriageReturn} and L{isHeadRequest}.
    """

    def test_examples(self) -> None:
        """
        A CR followed by anything but LF is refused with 400; CRLFs, bare
        LFs and a CR at the very end (which may start a CRLF) are not.
        """
        for buffer in [
            b"",
            b"\r",
            b"CONNECT a:1 HTTP/1.1\r\nHost: h\r",
            b"CONNECT a:1 HTTP/1.1\nHost: h\n",
            b"\r\n\r\nCONNECT",
        ]:
            self.assertIsNone(strayCarriageReturn(buffer), buffer)
        for buffer in [
            b"\r\r",
            b"CONNECT a:1 HTTP/1.1\rHost: h",
            b"CONNECT a:1 HTTP/1.1\r\r\n",
            b"\rCONNECT",
        ]:
            rejected = strayCarriageReturn(buffer)
            assert rejected is not None, buffer
            self.assertEqual(
                (rejected.status, rejected.detail),
                (400, "A bare CR is not a line ending."),
            )

    def test_fromWhereItLeftOff(self) -> None:
        """
        Given where the last look ended, a CR just before it is judged by
        the byte after it, and what came before it is not looked at again.
        """
        self.assertIsNotNone(strayCarriageReturn(b"abc\rx", 4))
        self.assertIsNone(strayCarriageReturn(b"abc\r\nx", 5))
        self.assertIsNone(strayCarriageReturn(b"a\rbc\r\nx", 5))

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b" "]), max_size=40))
    def test_piecesAgreeWithWhole(self, pieces: list[bytes]) -> None:
        """
        Looking at a head as it grows, piece by piece, each time from where
        the last look ended, finds a bare CR exactly when one is there.
        """
        buffer = b""
        found = False
        for piece in pieces:
            start, buffer = len(buffer), buffer + piece
            found = found or strayCarriageReturn(buffer, start) is not None
        self.assertEqual(found, hasBareCR(buffer))

    def test_isHeadRequest(self) -> None:
        """
        A head asks for C{HEAD} when that is its method, after any empty
        lines.
        """
        self.assertTrue(isHeadRequest(b"HEAD / HTTP/1.1\r\n"))
        self.assertTrue(isHeadRequest(b"\r\n\nHEAD "))
        self.assertFalse(isHeadRequest(b"HEADER / HTTP/1.1"))
        self.assertFalse(isHeadRequest(b"GET / HTTP/1.1"))
        self.assertFalse(isHeadRequest(b"head / HTTP/1.1"))


class ParseConnectHeadTests(SynchronousTestCase):
    """
    Tests for L{parseConnectHead}.
    """

    def assertRejected(self, head: bytes, status: int) -> RequestRejected:
        """
        Assert that parsing C{head} is rejected with C{status}.
        """
        rejected: RequestRejected = self.assertRaises(RequestRejected, parse, head)
        self.assertEqual(rejected.status, status)
        return rejected

    def test_simple(self) -> None:
        """
        A minimal HTTP/1.1 CONNECT request parses into host, port, version.
        """
        request = parse(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443")
        self.assertEqual(request.host, "example.com")
        self.assertEqual(request.port, 443)
        self.assertEqual(request.version, (1, 1))
        self.assertEqual(request.header(b"host"), b"example.com:443")
        self.assertEqual(request.authority, "example.com:443")

    def test_lastLineEndingLeftOff(self) -> None:
        """
        A head whose last line ending was left off (split where
        the empty line begins, say) is parsed whole: its last line is not
        dropped, so a C{Transfer-Encoding} there is still refused.
        """
        for ending in (b"\r\n", b""):
            request = parseConnectHead(
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443" + ending
            )
            self.assertEqual(request.header(b"host"), b"example.com:443")
            self.assertEqual(
                parseConnectHead(b"CONNECT example.com:443 HTTP/1.0" + ending).version,
                (1, 0),
            )
            rejected = self.assertRaises(
                RequestRejected,
                parseConnectHead,
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
                b"Transfer-Encoding: chunked" + ending,
            )
            self.assertEqual(rejected.status, 400)
            self.assertIn("no content", rejected.detail)

    def test_hostRequired(self) -> None:
        """
        An HTTP/1.1 request without C{Host} gets 400 (RFC 9112 section
        3.2); HTTP/1.0 requests need none.
        """
        rejected = self.assertRaises(
            RequestRejected, parseConnectHead, b"CONNECT a.example:443 HTTP/1.1\r\n"
        )
        self.assertEqual(rejected.status, 400)
        self.assertIn("Host", rejected.detail)
        parseConnectHead(b"CONNECT a.example:443 HTTP/1.0\r\n")

    def test_http10(self) -> None:
        """
        HTTP/1.0 requests are served (Python's http.client sends them).
        """
        request = parse(b"CONNECT example.com:443 HTTP/1.0")
        self.assertEqual(request.version, (1, 0))

    def test_ipv6(self) -> None:
        """
        A bracketed IPv6 literal is the host, without its brackets.
        """
        request = parse(b"CONNECT [2001:db8::1]:8443 HTTP/1.1")
        self.assertEqual(request.host, "2001:db8::1")
        self.assertEqual(request.port, 8443)
        self.assertEqual(request.authority, "[2001:db8::1]:8443")

    def test_bareLineFeeds(self) -> None:
        """
        Lines ending in a bare LF are accepted (RFC 9112 section 2.2).
        """
        request = parseConnectHead(b"CONNECT a.example:1 HTTP/1.1\nHost: x\n")
        self.assertEqual((request.host, request.port), ("a.example", 1))

    def test_leadingEmptyLine(self) -> None:
        """
        An empty line before the request line is ignored.
        """
        request = parse(b"\r\nCONNECT a.example:1 HTTP/1.1")
        self.assertEqual(request.host, "a.example")

    def test_headerValueWhitespace(self) -> None:
        """
        Whitespace around a field value is not part of it; names are
        compared case-insensitively.
        """
        request = parse(
            b"CONNECT a.example:1 HTTP/1.1\r\nPROXY-Authorization: \t x y \t"
        )
        self.assertEqual(request.header(b"proxy-authorization"), b"x y")
        self.assertIsNone(request.header(b"x-absent"))

    def test_zeroContentLength(self) -> None:
        """
        C{Content-Length: 0} is harmless and accepted.
        """
        parse(b"CONNECT a.example:1 HTTP/1.1\r\nContent-Length: 0")

    def test_longContentLength(self) -> None:
        """
        A Content-Length of more digits than Python converts to an integer
        (4300) is read all the same: zero spelled with 5000 digits is
        accepted, and any other number of that length gets 400, rather than
        a C{ValueError} from C{int}.
        """
        parse(b"CONNECT a.example:1 HTTP/1.1\r\nContent-Length: " + b"0" * 5000)
        for value in [b"0" * 4999 + b"1", b"9" * 5000, b"1" + b"0" * 4999]:
            self.assertRejected(
                b"CONNECT a.example:1 HTTP/1.1\r\nContent-Length: " + value, 400
            )

    def test_otherMethod(self) -> None:
        """
        Another method gets 405 with C{Allow: CONNECT}.
        """
        rejected = self.assertRejected(b"GET http://a.example/ HTTP/1.1", 405)
        self.assertEqual(rejected.headers, ((b"Allow", b"CONNECT"),))

    def test_methodCaseSensitive(self) -> None:
        """
        Methods are case-sensitive: C{connect} is not C{CONNECT}, nor any
        method this proxy knows, so it gets 501 (RFC 9110 section 9.1).
        """
        rejected = self.assertRejected(b"connect a.example:443 HTTP/1.1", 501)
        self.assertEqual(rejected.headers, ())

    def test_badVersions(self) -> None:
        """
        A well-formed HTTP version of a major version other than 1 gets 505;
        a malformed one gets 400.
        """
        self.assertRejected(b"CONNECT a.example:443 HTTP/2.0", 505)
        self.assertRejected(b"CONNECT a.example:443 HTTP/0.9", 505)
        self.assertRejected(b"CONNECT a.example:443 http/1.1", 400)
        self.assertRejected(b"CONNECT a.example:443 HTTP/1.10", 400)
        self.assertRejected(b"CONNECT a.example:443", 400)

    def test_laterMinorVersion(self) -> None:
        """
        A later minor version of HTTP/1 is served as HTTP/1.1 (RFC 9110
        section 2.5), so HTTP/1.1's rules, Host among them, apply to it.
        """
        request = parseConnectHead(b"CONNECT a.example:443 HTTP/1.2\r\nHost: a\r\n")
        self.assertEqual(request.version, (1, 1))
        self.assertEqual(
            parseConnectHead(b"CONNECT a.example:443 HTTP/1.9\r\nHost: a\r\n").version,
            (1, 1),
        )
        rejected = self.assertRaises(
            RequestRejected, parseConnectHead, b"CONNECT a.example:443 HTTP/1.2\r\n"
        )
        self.assertEqual(rejected.status, 400)

    def test_hostValue(self) -> None:
        """
        A Host field value that is not C{uri-host [":" port]} gets 400 (RFC
        9112 section 3.2); any valid one is accepted, empty included, even
        if it differs from the target, and so is the unbracketed IPv6
        address (and port) that Python's http.client 3.12+ sends.
        """
        for value in [b"a b@c", b"[::1", b"x/y?z", b"h:p:q", b"a@b", b"h:80:"]:
            rejected = self.assertRaises(
                RequestRejected,
                parse,
                b"CONNECT a.example:443 HTTP/1.1\r\nHost: " + value,
            )
            self.assertEqual(rejected.status, 400, value)
            self.assertIn("Host", rejected.detail)
        for value in [
            b"",
            b"a.example",
            b"a.example:443",
            b"a.example:",
            b"[::1]:8",
            b"x_y%41",
            b"::1:443",
            b"2001:db8::1",
            b":",
            b"::",
            b"1.2.3.4:5",
        ]:
            parse(b"CONNECT a.example:443 HTTP/1.1\r\nHost: " + value)

    def test_hostValueOfManyColons(self) -> None:
        """
        A Host value of tens of thousands of colons that ends in a character
        no address has gets 400 like a short one.  The pattern that accepts
        unbracketed IPv6 addresses once took time growing with the square
        of such a value (seconds for these, on the reactor's one thread);
        the test shows the answer, not the time, which is measured apart.
        """
        for value in [
            b":" * 65000 + b"x",
            b"a:" * 32000 + b"x",
            b"[" + b":" * 65000 + b"x",
        ]:
            rejected = self.assertRaises(
                RequestRejected,
                parseConnectHead,
                b"CONNECT a.example:443 HTTP/1.1\r\nHost: " + value + b"\r\n",
            )
            self.assertEqual(rejected.status, 400)
            self.assertIn("Host", rejected.detail)

    def test_malformedRequestLines(self) -> None:
        """
        Extra or missing spaces and non-token methods get 400.
        """
        for line in [
            b"CONNECT  a.example:443 HTTP/1.1",
            b"CONNECT a.example:443  HTTP/1.1",
            b" CONNECT a.example:443 HTTP/1.1",
            b"CONNECT\ta.example:443 HTTP/1.1",
            b"CON(NECT a.example:443 HTTP/1.1",
            b"CONNECT a.example:443 HTTP/1.1 extra",
        ]:
            self.assertRejected(line, 400)

    def test_badTargetsSaySo(self) -> None:
        """
        The 400's text names what is wrong with the request line: an empty
        target is a malformed line, user info in the target is said to be
        one.
        """
        for line, detail in [
            (b"CONNECT  HTTP/1.1", "The request line is malformed."),
            (
                b"CONNECT user@a.example:443 HTTP/1.1",
                "The request target must not hold user info.",
            ),
            (
                b"CONNECT user:pw@a.example:443 HTTP/1.1",
                "The request target must not hold user info.",
            ),
        ]:
            self.assertEqual(self.assertRejected(line, 400).detail, detail, line)

    def test_formatAuthority(self) -> None:
        """
        L{formatAuthority} brackets every IPv6 literal, with or without
        C{::}, and nothing else.
        """
        from tunnel.request import formatAuthority

        for host, authority in [
            ("a.example", "a.example:443"),
            ("192.0.2.1", "192.0.2.1:443"),
            ("2001:db8::1", "[2001:db8::1]:443"),
            ("2001:db8:1:2:3:4:5:6", "[2001:db8:1:2:3:4:5:6]:443"),
        ]:
            self.assertEqual(formatAuthority(host, 443), authority)

    def test_missingRequestLine(self) -> None:
        """
        A head of empty lines gets 400.
        """
        rejected = self.assertRaises(RequestRejected, parseConnectHead, b"\r\n")
        self.assertEqual(rejected.status, 400)

    def test_badTargets(self) -> None:
        """
        Anything but authority-form with a port in 1-65535 gets 400.
        """
        for target in [
            b"a.example",
            b"a.example:",
            b"a.example:0",
            b"a.example:65536",
            b"a.example:-1",
            b"a.example:+443",
            b"a.example:443a",
            b"a.example:123456",
            b":443",
            b"/path",
            b"http://a.example:443/",
            b"user@a.example:443",
            b"a%2eexample:443",
            b"a example:443",
            b"-a.example:443",
            b"[::1:443",
            b"[::1]443",
            b"[::1]:",
            b"[not:v6]:443",
            b"[fe80::1%25eth0]:443",
            b"::1:443",
            b"\xc3\xa9.example:443",
            b"a.example.:443." + b"x",
            b"a..b:443",
            b"." + b"a:443",
            b"a" * 64 + b".example:443",
            b"127.1:443",
            b"2130706433:443",
            b"0x7f.0.0.1:443",
            b"0251.0376.0251.0376:443",
            b"example.0x10:443",
            b"1.2.3.04:443",
        ]:
            rejected = self.assertRaises(
                RequestRejected, parse, b"CONNECT " + target + b" HTTP/1.1"
            )
            self.assertEqual(rejected.status, 400, target)

    def test_numericSpellings(self) -> None:
        """
        Standard dotted-quad IPv4 literals and names with a numeric label
        that is not the last are accepted.
        """
        self.assertEqual(parseAuthority(b"127.0.0.1:443"), ("127.0.0.1", 443))
        self.assertEqual(parseAuthority(b"1.example:443"), ("1.example", 443))
        self.assertEqual(
            parseAuthority(b"a" * 63 + b".example:443"), ("a" * 63 + ".example", 443)
        )

    def test_portBounds(self) -> None:
        """
        Ports 1 and 65535 are the extremes accepted.
        """
        self.assertEqual(parseAuthority(b"a.example:1"), ("a.example", 1))
        self.assertEqual(parseAuthority(b"a.example:65535"), ("a.example", 65535))

    def test_badFieldLines(self) -> None:
        """
        Field lines with no colon, whitespace before the colon, obs-fold,
        a non-token name or control characters get 400.
        """
        for line in [
            b"NoColon",
            b"Host : a.example",
            b"Host\t: a.example",
            b": value",
            b"Bad Name: value",
            b" folded",
            b"\tfolded",
            b"X: a\x00b",
            b"X: a\x7fb",
            b"X: a\x1bb",
            b"X: a\rb",
        ]:
            rejected = self.assertRaises(
                RequestRejected,
                parse,
                b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\r\n" + line,
            )
            self.assertEqual(rejected.status, 400, line)

    def test_obsTextAllowed(self) -> None:
        """
        Bytes above 0x7F (obs-text) and tabs are allowed in field values.
        """
        request = parse(b"CONNECT a.example:443 HTTP/1.1\r\nX: caf\xe9\tok")
        self.assertEqual(request.header(b"x"), b"caf\xe9\tok")

    def test_framingFields(self) -> None:
        """
        A second Host or Proxy-Authorization, any Transfer-Encoding, or a
        Content-Length that is not zero gets 400: a CONNECT request has no
        content, and one set of credentials.
        """
        for fields in [
            b"Host: a\r\nHost: a",
            b"Proxy-Authorization: Basic YTpi\r\nProxy-Authorization: Basic YTpj",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: identity",
            b"Content-Length: 5",
            b"Content-Length: -0",
            b"Content-Length: 0x0",
            b"Content-Length: ",
        ]:
            rejected = self.assertRaises(
                RequestRejected, parse, b"CONNECT a.example:443 HTTP/1.1\r\n" + fields
            )
            self.assertEqual(rejected.status, 400, fields)

    def test_requestLineLimit(self) -> None:
        """
        A request line longer than the limit gets 414.
        """
        line = b"CONNECT " + b"a" * 50 + b"." + b"a" * 49 + b".example:443 HTTP/1.1"
        rejected = self.assertRaises(
            RequestRejected, parse, line, maxRequestLine=len(line) - 1
        )
        self.assertEqual(rejected.status, 414)
        parse(line, maxRequestLine=len(line))

    def test_fieldCountLimit(self) -> None:
        """
        More header fields than the limit gets 431.
        """
        head = b"CONNECT a.example:443 HTTP/1.1\r\nHost: h" + b"\r\nX: y" * 2
        rejected = self.assertRaises(RequestRejected, parse, head, maxFields=2)
        self.assertEqual(rejected.status, 431)
        parse(head, maxFields=3)

    def test_bareCarriageReturn(self) -> None:
        """
        A bare CR inside a line gets 400.
        """
        self.assertRejected(b"CONNECT a.example:443\rHTTP/1.1", 400)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300))
    def test_anyBytes(self, head: bytes) -> None:
        """
        Any byte string either parses or is rejected with one of the parser's
        statuses; it never raises anything else.
        """
        try:
            request = parseConnectHead(head + b"\n")
        except RequestRejected as rejected:
            self.assertIn(rejected.status, PARSER_STATUSES)
        else:
            self.assertTrue(1 <= request.port <= 65535)

    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(
            st.sampled_from(["0", "00", "1", "09", "10", "199", "249", "255", "256"]),
            min_size=3,
            max_size=5,
        )
    )
    def test_numericHostsAsIPv4Address(self, labels: list[str]) -> None:
        """
        A host of numbers is accepted exactly when L{ipaddress.IPv4Address}
        reads it as an address: the standard dotted quad only.
        """
        host = ".".join(labels)
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            expected = False
        else:
            expected = True
        try:
            parseAuthority(host.encode() + b":443")
        except RequestRejected:
            accepted = False
        else:
            accepted = True
        self.assertEqual(accepted, expected, host)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"CONNECT",
                    b"GET",
                    b" ",
                    b"a.example",
                    b":",
                    b"443",
                    b"[::1]",
                    b"HTTP/1.1",
                    b"HTTP/1.0",
                    b"HTTP/2.0",
                    b"\r\n",
                    b"\n",
                    b"Host",
                    b"Content-Length",
                    b"0",
                    b"\x00",
                    b"\t",
                ]
            ),
            max_size=30,
        )
    )
    def test_anyHeadLikeBytes(self, pieces: list[bytes]) -> None:
        """
        Heads built from HTTP-shaped pieces (which reach deeper than random
        bytes do) either parse or are rejected with a parser status.
        """
        try:
            parseConnectHead(b"".join(pieces) + b"\r\n")
        except RequestRejected as rejected:
            self.assertIn(rejected.status, PARSER_STATUSES)

    def test_defaultLimits(self) -> None:
        """
        Without explicit limits a request line of 8192 bytes passes the
        length check (this one is then malformed: 400) and one of 8193 gets
        414; 100 header fields are accepted and 101 get 431.  The proxy
        passes its own request-line limit but relies on the default field
        limit.
        """
        line = b"CONNECT " + b"a" * (8192 - len(b"CONNECT  HTTP/1.1")) + b" HTTP/1.1"
        self.assertEqual(len(line), 8192)
        for request, status in [(line, 400), (line + b"a", 414)]:
            rejected = self.assertRaises(
                RequestRejected, parseConnectHead, request + b"\r\nHost: a\r\n"
            )
            self.assertEqual(rejected.status, status)
        head = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 99
        self.assertEqual(parseConnectHead(head).host, "a.example")
        rejected = self.assertRaises(
            RequestRejected, parseConnectHead, head + b"X: y\r\n"
        )
        self.assertEqual(rejected.status, 431)

    def test_versionCaseSensitive(self) -> None:
        """
        The HTTP version is case-sensitive (RFC 9112 section 2.3): a
        lower-case C{http/1.x} gets 400 even with everything else right.
        """
        for version in [b"http/1.1", b"http/1.0", b"Http/1.1"]:
            rejected = self.assertRaises(
                RequestRejected,
                parseConnectHead,
                b"CONNECT a.example:443 " + version + b"\r\nHost: a\r\n",
            )
            self.assertEqual(rejected.status, 400, version)

    def test_controlCharactersInValues(self) -> None:
        """
        Vertical tab and form feed are control characters too: a field
        value holding one gets 400.
        """
        for value in [b"a\x0bb", b"a\x0cb", b"\x0b"]:
            self.assertRejected(b"CONNECT a.example:443 HTTP/1.1\r\nX: " + value, 400)

    def test_hostNameLength(self) -> None:
        """
        A host name may be 253 characters long (RFC 1035), and no longer,
        not counting the root's trailing dot, which makes it 254.
        """
        name = b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 61
        self.assertEqual(len(name), 253)
        self.assertEqual(parseAuthority(name + b":443"), (name.decode(), 443))
        self.assertEqual(parseAuthority(name + b".:443"), (name.decode() + ".", 443))
        for longer in [name + b"d", name + b"d.", name + b".."]:
            rejected = self.assertRaises(
                RequestRejected, parseAuthority, longer + b":443"
            )
            self.assertEqual(rejected.status, 400)

    def test_moreBadTargets(self) -> None:
        """
        A host name ending in a hyphen, an IPv6 zone written without
        percent-encoding, a port of more than five digits once its leading
        zeros are gone, and spellings of IPv4 addresses in hexadecimal (in
        either case, or just C{0x}) or with a trailing dot all get 400.
        """
        for target in [
            b"example-:443",
            b"[fe80::1%eth0]:443",
            b"a.example:0443210",
            b"127.0.0.0X7F:443",
            b"127.0.0.0x7F:443",
            b"127.0.0.0x:443",
            b"0X7F000001:443",
            b"127.1.:443",
            b"2130706433.:443",
        ]:
            rejected = self.assertRaises(RequestRejected, parseAuthority, target)
            self.assertEqual(rejected.status, 400, target)

    def test_trailingDot(self) -> None:
        """
        A fully qualified name with its trailing dot is a valid host.
        """
        self.assertEqual(parseAuthority(b"a.example.:443"), ("a.example.", 443))

    def test_hostValueCharacters(self) -> None:
        """
        A Host value holding a character that cannot be in a URI host (each
        on its own) gets 400.
        """
        for value in [b"a/b", b"a?b", b"a#b", b"[ ::1]", b"[::1 ]"]:
            rejected = self.assertRaises(
                RequestRejected,
                parse,
                b"CONNECT a.example:443 HTTP/1.1\r\nHost: " + value,
            )
            self.assertEqual(rejected.status, 400, value)

    def test_contentLengthOne(self) -> None:
        """
        Any Content-Length but 0 gets 400, 1 included.
        """
        self.assertRejected(b"CONNECT a.example:443 HTTP/1.1\r\nContent-Length: 1", 400)

    def test_hostValueSyntax(self) -> None:
        """
        A Host value whose characters could all be in a URI host but that is
        not C{uri-host [":" port]} gets 400: a percent that does not start
        C{"%" HEXDIG HEXDIG}, brackets around neither an IPv6 address nor
        IPvFuture (nor a zone identifier, which RFC 3986 does not have), a
        port that is not digits, and colons that make no IPv6 address.
        """
        for value in [
            b"[foo]",
            b"a%",
            b"a%4",
            b"%zz",
            b"a%4g",
            b"1.2.3.4:abc",
            b"dead:beef",
            b"::::",
            b"::1:x1",
            b"[::1]:a",
            b"[]",
            b"[v1.]",
            b"[v.x]",
            b"[vx.y]",
            b"[::1.2.3.04]",
            b"[fe80::1%25eth0]",
            b"fe80::1%25eth0",
            b"1:2:3:4:5:6:7:8:9:10",
        ]:
            rejected = self.assertRaises(
                RequestRejected,
                parse,
                b"CONNECT a.example:443 HTTP/1.1\r\nHost: " + value,
            )
            self.assertEqual(rejected.status, 400, value)
            self.assertIn("Host", rejected.detail)

    def test_hostValueSyntaxAccepted(self) -> None:
        """
        Percent-encoding, sub-delims, IPv6 literals (IPv4 embedded too),
        IPvFuture, empty ports, and unbracketed IPv6 addresses with or
        without a port are accepted in a Host value.
        """
        for value in [
            b"a%41b",
            b"%7e%7E",
            b"!$&'()*+,;=-._~:80",
            b"[::ffff:1.2.3.4]",
            b"[2001:DB8::1]:",
            b"[v1.x:y]",
            b"[V1F.a-b_c~d!$&'()*+,;=:]:443",
            b"::1:65535",
            b"2001:db8::1:",
            b"1.2.3.4:",
            b"dead",
        ]:
            parse(b"CONNECT a.example:443 HTTP/1.1\r\nHost: " + value)

    @settings(max_examples=1000, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    *(b"[", b"]", b":", b".", b"%", b"a", b"f", b"g", b"v", b"V"),
                    *(b"0", b"1", b"4", b"9", b"!", b"~", b"@", b" ", b"/", b"%25"),
                ]
            ),
            max_size=14,
        )
    )
    def test_hostValueNoLooser(self, pieces: list[bytes]) -> None:
        """
        No Host value that the pattern checking it before was written to RFC
        3986's grammar refused is accepted now.
        """
        try:
            request = parse(
                b"CONNECT a.example:443 HTTP/1.1\r\nHost: " + b"".join(pieces)
            )
        except RequestRejected:
            return
        value = request.header(b"host")
        assert value is not None
        self.assertTrue(_OLD_HOST_VALUE.match(value), value)

    def test_leadingEmptyLines(self) -> None:
        """
        Any number of empty lines (CRLF or bare LF) before the request line
        are ignored (RFC 9112 section 2.2), not only one.
        """
        for empty in [b"\r\n\r\n", b"\n\n", b"\r\n\n\r\n", b"\r\n" * 1000]:
            request = parse(empty + b"CONNECT a.example:1 HTTP/1.1")
            self.assertEqual((request.host, request.port), ("a.example", 1))

    def test_leadingEmptyLinesCount(self) -> None:
        """
        The empty lines before the request line count toward its limit, so
        that endless ones cannot be buffered: with them, a line at the limit
        passes and one byte more gets 414, as L{requestLineLength} measures.
        """
        line = b"CONNECT a.example:443 HTTP/1.1"
        for empty in [b"\r\n", b"\n", b"\r\n" * 3000 + b"\n"]:
            head = empty + line + b"\r\nHost: h\r\n"
            limit = len(empty + line)
            self.assertEqual(requestLineLength(head), limit)
            self.assertEqual(
                parseConnectHead(head, maxRequestLine=limit).host, "a.example"
            )
            rejected = self.assertRaises(
                RequestRejected, parseConnectHead, head, maxRequestLine=limit - 1
            )
            self.assertEqual(rejected.status, 414)
        rejected = self.assertRaises(
            RequestRejected, parseConnectHead, b"\r\n" * 5000 + line + b"\r\n"
        )
        self.assertEqual(rejected.status, 414)

    def test_knownMethods(self) -> None:
        """
        The methods of the IANA registry that RFC 9110 and RFC 5789 define,
        and WebDAV's (RFC 4918), get 405 with C{Allow: CONNECT}: known, but
        not allowed here.
        """
        for method in [
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
        ]:
            rejected = self.assertRaises(
                RequestRejected, parse, method + b" a.example:443 HTTP/1.1"
            )
            self.assertEqual(rejected.status, 405, method)
            self.assertEqual(rejected.headers, ((b"Allow", b"CONNECT"),))

    def test_unknownMethods(self) -> None:
        """
        Any other method token gets 501 (RFC 9110 section 9.1), without
        C{Allow}; a method that is not a token is still a malformed line.
        """
        for method in [b"BREW", b"Get", b"CONNECTX", b"X-CONNECT!", b"A" * 100]:
            rejected = self.assertRaises(
                RequestRejected, parse, method + b" a.example:443 HTTP/1.1"
            )
            self.assertEqual(rejected.status, 501, method)
            self.assertEqual(rejected.headers, ())
        self.assertRejected(b"BR(EW a.example:443 HTTP/1.1", 400)

    def test_longMethodOverLimit(self) -> None:
        """
        A request line over the limit whose method is a token longer than
        any known method gets 501 rather than 414 (RFC 9112 section 3); one
        whose method could still be known, or is no token, gets 414.
        """
        for line, status in [
            (b"A" * 10 + b" " + b"a" * 100 + b":443 HTTP/1.1", 501),
            (b"\r\n" + b"A" * 10 + b" " + b"a" * 100 + b":443 HTTP/1.1", 501),
            (b"A" * 200, 501),
            (b"PROPPATCH " + b"a" * 100 + b":443 HTTP/1.1", 414),
            (b"CONNECT " + b"a" * 100 + b":443 HTTP/1.1", 414),
            (b"A" * 9 + b"( " + b"a" * 100 + b":443 HTTP/1.1", 414),
        ]:
            rejected = self.assertRaises(
                RequestRejected, parseConnectHead, line + b"\r\n", maxRequestLine=64
            )
            self.assertEqual(rejected.status, status, line)

    def test_portLeadingZeros(self) -> None:
        """
        A port may have leading zeros (RFC 3986: C{port = *DIGIT}), however
        many; what is left must be 1-65535, in at most five digits.
        """
        for target, port in [
            (b"127.0.0.1:00001", 1),
            (b"127.0.0.1:018190", 18190),
            (b"a.example:000443", 443),
            (b"a.example:" + b"0" * 5000 + b"65535", 65535),
        ]:
            self.assertEqual(parseAuthority(target)[1], port, target)
        for target in [
            b"a.example:00000",
            b"a.example:" + b"0" * 5000,
            b"a.example:065536",
            b"a.example:0123456",
            b"a.example:" + b"0" * 5000 + b"1" * 5000,
            b"[::1]:000000",
        ]:
            rejected = self.assertRaises(RequestRejected, parseAuthority, target)
            self.assertEqual(rejected.status, 400, target)

    def test_trailingDots(self) -> None:
        """
        Only one trailing dot, the root's, may end a host name: two or more
        make an empty label, and get 400.
        """
        for target in [b"localhost..:18190", b"a.example...:443", b"a..:1"]:
            rejected = self.assertRaises(RequestRejected, parseAuthority, target)
            self.assertEqual(rejected.status, 400, target)
        self.assertEqual(parseAuthority(b"localhost.:18190"), ("localhost.", 18190))

    def test_contentLengthList(self) -> None:
        """
        A Content-Length list of zeros is accepted as two Content-Length: 0
        lines are (RFC 9110 section 8.6); a list with any member that is not
        a zero, or an empty one, gets 400, in one line or in several.
        """
        for fields in [
            b"Content-Length: 0, 0",
            b"Content-Length: 0,0",
            b"Content-Length: 00 ,\t000, 0",
            b"Content-Length: 0\r\nContent-Length: 0",
            b"Content-Length: 0, 0\r\nContent-Length: 0",
        ]:
            parse(b"CONNECT a.example:443 HTTP/1.1\r\n" + fields)
        for fields in [
            b"Content-Length: 0, 1",
            b"Content-Length: 1, 1",
            b"Content-Length: 0,",
            b"Content-Length: ,0",
            b"Content-Length: 0,,0",
            b"Content-Length: 0 0",
            b"Content-Length: 0, -0",
            b"Content-Length: 0\r\nContent-Length: 0, 1",
            b"Content-Length: 0, 0\r\nContent-Length: 1",
        ]:
            self.assertRejected(b"CONNECT a.example:443 HTTP/1.1\r\n" + fields, 400)


# The Host value pattern before Host values were checked to RFC 3986's
# grammar: what it refused must stay refused.
_OLD_HOST_VALUE = re.compile(
    rb"(?:\[[0-9A-Za-z:.%_~!$&'()*+,;=-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)"
    rb"(?::[0-9]*)?\Z"
    rb"|[0-9A-Fa-f.]*(?::[0-9A-Fa-f.]*)+\Z"
)


class OverlongRequestLineTests(SynchronousTestCase):
    """
    Tests for L{overlongRequestLine}, which the proxy asks while the head
    arrives, as soon as L{requestLineLength} passes the limit.
    """

    def test_statuses(self) -> None:
        """
        The answer is 501 if the method so far is a token longer than any
        known method, else 414.  The method is what comes after the empty
        lines and before the first space, or with no space yet all of the
        line but a line ending or a CR that may start one.
        """
        for buffer, status in [
            (b"A" * 10, 501),
            (b"A" * 10 + b"\r", 501),
            (b"A" * 10 + b"\r\n", 501),
            (b"\r\n\n" + b"A" * 10, 501),
            (b"A" * 10 + b" x", 501),
            (b"A" * 9, 414),
            (b"PROPPATCH x", 414),
            (b"A" * 9 + b"\r ", 414),
            (b"A" * 9 + b"\x00", 414),
            (b"\r\n" * 5000, 414),
            (b"", 414),
            # A CR after the empty lines, not followed by LF, ends no line:
            # the request line starts with it, and a CR is no token.
            (b"\n\r" + b"A" * 9000, 414),
        ]:
            self.assertEqual(overlongRequestLine(buffer).status, status, buffer)

    def test_details(self) -> None:
        """
        The 414 says the line is too long; the 501, that the method is not
        implemented.
        """
        self.assertIn("too long", overlongRequestLine(b"GET").detail)
        self.assertIn("not implemented", overlongRequestLine(b"B" * 20).detail)


def referenceParse(head: bytes, maxFields: int = 100) -> ConnectRequest:
    """
    L{parseConnectHead} as it was written before it handled CRs in one
    pass: each line on its own, each check in its turn.
    """
    lines = head.split(b"\n")
    del lines[-1]
    for index, line in enumerate(lines):
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise RequestRejected(400, "A bare CR is not a line ending.")
        lines[index] = line
    while lines and not lines[0]:
        del lines[0]
    if not lines:
        raise RequestRejected(400, "The request line is missing.")
    if len(lines[0]) > 8192:
        raise RequestRejected(414, "The request line is too long.")
    version, target = requestModule._parseRequestLine(lines[0])
    if len(lines) - 1 > maxFields:
        raise RequestRejected(431, "Too many header fields.")
    headers = tuple(requestModule._parseFieldLine(line) for line in lines[1:])
    requestModule._checkFraming(headers, version)
    host, port = parseAuthority(target)
    return ConnectRequest(host=host, port=port, version=version, headers=headers)


def outcome(
    parser: Callable[..., ConnectRequest], head: bytes, maxFields: int
) -> object:
    """
    What C{parser} makes of C{head}: the request, or the status and detail
    of the refusal.
    """
    try:
        return parser(head, maxFields=maxFields)
    except RequestRejected as rejected:
        return (rejected.status, rejected.detail)


# Pieces of heads, right and wrong, that the parser's checks tell apart.
_requestLines = st.sampled_from(
    [
        b"CONNECT a.example:443 HTTP/1.1",
        b"CONNECT 127.0.0.1:443 HTTP/1.0",
        b"CONNECT [::1]:8443 HTTP/1.1",
        b"CONNECT a..example:443 HTTP/1.1",
        b"CONNECT 127.1:443 HTTP/1.1",
        b"CONNECT a.example:0 HTTP/1.1",
        b"CONNECT a.example HTTP/1.1",
        b"GET / HTTP/1.1",
        b"CONNECT a.example:443 HTTP/2.0",
        b"CONNECT a.example:443 HTTP/1.1 x",
        b"CONNECT a.exa\rmple:443 HTTP/1.1",
        b"CONNECT " + b"a" * 600 + b":443 HTTP/1.1",
    ]
)
_fieldLines = st.sampled_from(
    [
        b"Host: a.example:443",
        b"Host: a/b",
        b"Content-Length: 0",
        b"Content-Length: 1",
        b"Transfer-Encoding: chunked",
        b" folded",
        b"No colon",
        b"X: y\rz",
        b"X: \x01",
        b"",
    ]
)
_lineEnds = st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b"\n\r"])


class OnePassTests(SynchronousTestCase):
    """
    L{parseConnectHead} reads CRs in one pass over the head, without
    changing what it answers.
    """

    @settings(max_examples=400, deadline=None)
    @given(
        st.lists(
            st.tuples(st.one_of(_requestLines, _fieldLines), _lineEnds),
            min_size=1,
            max_size=5,
        ),
        st.integers(min_value=0, max_value=4),
    )
    def test_sameAsReference(
        self, pieces: list[tuple[bytes, bytes]], maxFields: int
    ) -> None:
        """
        Heads assembled from right and wrong lines and line endings get the
        same request, or the same refusal in the same order of checks, as
        from the parser written line by line.
        """
        head = b"".join(line + end for line, end in pieces)
        if not head.endswith(b"\n"):
            # As findHeadEnd cuts them: a head ends with its last line's LF.
            head += b"\n"
        expected = outcome(referenceParse, head, maxFields)
        self.assertEqual(outcome(parseConnectHead, head, maxFields), expected)

    def test_refusedLineKeepsItsTurn(self) -> None:
        """
        A refused request target is reported after the head's other
        refusals (too many fields: 431).
        """
        head = b"CONNECT a..example:443 HTTP/1.1\r\nHost: h\r\nX: y"
        rejected = self.assertRaises(RequestRejected, parse, head, maxFields=1)
        self.assertEqual(rejected.status, 431)


class FindHeadEndTests(SynchronousTestCase):
    """
    Tests for L{findHeadEnd}.
    """

    def test_incomplete(self) -> None:
        """
        No empty line yet: no end.
        """
        self.assertIsNone(findHeadEnd(b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n"))
        self.assertIsNone(findHeadEnd(b""))

    def test_crlf(self) -> None:
        """
        CRLF CRLF ends the head; the head keeps its last line ending.
        """
        data = b"CONNECT a:1 HTTP/1.1\r\n\r\nearly"
        self.assertEqual(findHeadEnd(data), (22, 24))

    def test_lf(self) -> None:
        """
        LF LF ends the head too.
        """
        self.assertEqual(findHeadEnd(b"CONNECT a:1 HTTP/1.1\n\nearly"), (21, 22))

    def test_start(self) -> None:
        """
        The search may start after bytes already scanned.
        """
        data = b"CONNECT a:1 HTTP/1.1\r\nX: y\r\n\r\n"
        self.assertEqual(findHeadEnd(data, 20), (len(data) - 2, len(data)))

    def test_leadingEmptyLines(self) -> None:
        """
        With C{skipEmptyLines}, empty lines before the first line do not
        end the head, however many, and the head keeps them; a CR that ends
        no line is where the first line starts.
        """
        for empty in [b"\r\n", b"\r\n\r\n", b"\n\n\n", b"\r\n\n" * 100]:
            self.assertIsNone(findHeadEnd(empty, skipEmptyLines=True))
            self.assertIsNone(findHeadEnd(empty + b"\r", skipEmptyLines=True))
            data = empty + b"CONNECT a:1 HTTP/1.1\r\n\r\nearly"
            self.assertEqual(
                findHeadEnd(data, skipEmptyLines=True),
                (len(data) - 7, len(data) - 5),
            )
        self.assertEqual(findHeadEnd(b"\n\r\r\n\n", skipEmptyLines=True), (4, 5))

    def test_emptyLineEndsHeadByDefault(self) -> None:
        """
        Without C{skipEmptyLines} (a parent proxy's response) the first
        empty line ends the head, however early.
        """
        self.assertEqual(findHeadEnd(b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"), (2, 4))
        self.assertEqual(findHeadEnd(b"\n\n"), (1, 2))

    def test_emptyLinesOnePerPacket(self) -> None:
        """
        Empty lines that arrive one per packet (or one byte per packet),
        looked for as the proxy does (from 3 bytes before the new ones,
        counted by L{requestLineLength}), neither end the head nor hide its
        end.
        """
        request = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n"
        for packets in [
            [b"\r\n"] * 50 + [request],
            [b"\n"] * 50 + [request],
            [b"\r", b"\n"] * 50 + [request[:1], request[1:]],
            [bytes([byte]) for byte in b"\r\n" * 50 + request],
        ]:
            buffer = b""
            for number, packet in enumerate(packets):
                buffered = len(buffer)
                buffer += packet
                found = findHeadEnd(buffer, max(0, buffered - 3), skipEmptyLines=True)
                if number < len(packets) - 1:
                    self.assertIsNone(found, buffer)
                    self.assertLessEqual(requestLineLength(buffer), len(buffer))
            self.assertEqual(found, (len(buffer) - 2, len(buffer)))
            head = buffer[: len(buffer) - 2]
            self.assertEqual(parseConnectHead(head).host, "a.example")

    def test_endlessEmptyLines(self) -> None:
        """
        A stream of nothing but empty lines never ends the head, and its
        L{requestLineLength} grows with it, so the proxy's request line
        limit refuses it (414).
        """
        buffer = b"\r\n" * 4097
        self.assertIsNone(findHeadEnd(buffer, skipEmptyLines=True))
        self.assertEqual(requestLineLength(buffer), 8194)
        self.assertEqual(overlongRequestLine(buffer).status, 414)
