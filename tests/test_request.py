"""
Tests for L{tunnel.request}: the pure CONNECT head parser.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunnel import request as requestModule
from tunnel.request import (
    ConnectRequest,
    RequestRejected,
    findHeadEnd,
    parseAuthority,
    parseConnectHead,
    requestLineLength,
)

# Every status the parser may answer with.
PARSER_STATUSES = {400, 405, 414, 431, 505}


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
        (CRLF or LF, or a CR that may start one), after any empty lines.
        """
        for buffer, length in [
            (b"", 0),
            (b"\r", 0),
            (b"abc", 3),
            (b"abc\r", 3),
            (b"abc\r\n", 3),
            (b"\r\nabc", 3),
            (b"\r\n\r\nab\r\nxx", 2),
            (b"\n\nabcd\n", 4),
            (b"\r\n\r\n", 0),
        ]:
            self.assertEqual(requestLineLength(buffer), length, buffer)


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
        Methods are case-sensitive: C{connect} is not C{CONNECT}.
        """
        self.assertRejected(b"connect a.example:443 HTTP/1.1", 405)

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
        A host name may be 253 characters long (RFC 1035), and no longer.
        """
        name = b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 61
        self.assertEqual(len(name), 253)
        self.assertEqual(parseAuthority(name + b":443"), (name.decode(), 443))
        for longer in [name + b"d", name + b"."]:
            rejected = self.assertRaises(
                RequestRejected, parseAuthority, longer + b":443"
            )
            self.assertEqual(rejected.status, 400)

    def test_moreBadTargets(self) -> None:
        """
        A host name ending in a hyphen, an IPv6 zone written without
        percent-encoding, a port of more than five digits, and spellings of
        IPv4 addresses in hexadecimal (in either case, or just C{0x}) or
        with a trailing dot all get 400.
        """
        for target in [
            b"example-:443",
            b"[fe80::1%eth0]:443",
            b"a.example:000443",
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
