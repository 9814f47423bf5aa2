"""
What the proxy answers a client itself: the C{200} that opens a tunnel, and
the error responses that end a connection.  No I/O.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from twisted.web.http import datetimeToString

__all__ = ["ESTABLISHED", "errorResponse", "httpDate", "mayAddField"]

#: The answer that opens a tunnel (RFC 9110 section 9.3.6: no content, no
#: framing fields).
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"

# Reason phrases that differ from http.HTTPStatus's, which took RFC 9110's
# names only in Python 3.13.
_REASONS = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}


def _reasonPhrase(status: int) -> bytes:
    """
    The reason phrase for C{status}: the registered one (C{451 Unavailable
    For Legal Reasons}), or C{Error} for a status without one.
    """
    phrase = _REASONS.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
    return phrase.encode("ascii")


def httpDate(seconds: float) -> bytes:
    """
    A time as a C{Date} field gives it (RFC 9110 section 5.6.7).

    @param seconds: Seconds since the epoch.
    @return: The IMF-fixdate, C{Fri, 27 Nov 2026 12:00:00 GMT}.
    """
    return datetimeToString(seconds)  # type: ignore[no-any-return]


# The fields errorResponse writes itself, and Transfer-Encoding, which would
# contradict its Content-Length: a second of any would make the answer
# ambiguous to the client (RFC 9112 section 6.3).
_OWN_FIELDS = frozenset(
    {b"content-length", b"content-type", b"connection", b"transfer-encoding", b"date"}
)
# RFC 9110 section 5.6.2: token = 1*tchar.
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Visible characters, spaces, tabs and obs-text: no CR or LF to end the
# field early, no NUL or other control.
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")


def mayAddField(name: bytes, value: bytes) -> bool:
    """
    Whether L{errorResponse} may be given this field to add.

    @param name: The field name.
    @param value: The field value.
    @return: C{True} for a token name that is not one of the fields the
        response has already, with a value that cannot end the field or
        the head early.
    """
    return (
        _FIELD_NAME.fullmatch(name) is not None
        and _FIELD_VALUE.fullmatch(value) is not None
        and name.lower() not in _OWN_FIELDS
    )


def errorResponse(
    status: int,
    detail: str,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    date: bytes | None = None,
    content: bool = True,
) -> bytes:
    """
    Build a complete error response that ends the connection.

    @param status: The HTTP status code.
    @param detail: The text of the C{text/plain} body.
    @param headers: Extra header fields.
    @param date: The C{Date} field's value (see L{httpDate}): a server
        with a clock sends one (RFC 9110 section 6.6.1).
    @param content: Whether to send the body; without it (the answer to a
        C{HEAD} request) the head still gives the body's type and length,
        as RFC 9110 section 9.3.2 allows.
    @return: The bytes to send.
    """
    body = detail.encode("utf-8")
    if not body.endswith(b"\n"):
        body += b"\n"
    lines = [b"HTTP/1.1 %d %s" % (status, _reasonPhrase(status))]
    if date is not None:
        lines.append(b"Date: " + date)
    lines += [
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % (len(body),),
        b"Connection: close",
    ]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body if content else b"")
