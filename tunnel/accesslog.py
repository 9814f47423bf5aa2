"""
The access log: one line per finished connection, as text or JSON.

The proxy emits one C{twisted.logger} event per client connection (marked
C{tunnelEvent}); L{AccessLogObserver} is an ordinary log observer that
writes those events, and only those, to a file of their own.  twistd's own
log options are untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, Logger
from zope.interface import implementer

__all__ = [
    "ACCESS_FIELDS",
    "ACCESS_JSON_FIELDS",
    "AccessLogObserver",
    "accessRecord",
    "escapeField",
    "formatAccessJSON",
    "formatAccessText",
]

#: The fields of a record, in the order of the text format.
ACCESS_FIELDS = (
    "time",
    "client",
    "user",
    "target",
    "connected",
    "status",
    "bytes_up",
    "bytes_down",
    "handshake_ms",
    "duration_ms",
    "ended",
)

#: The fields of a JSON record: those of the text format, then why the
#: proxy refused or failed the connection (each C{null} when it did not):
#: the policy or authentication rule (C{port}, C{auth}, ...), the proxy's
#: own limit (C{max-tunnels}, C{name-lookups}, ...), a parent proxy's
#: status, and what the error answer told the client (C{"The target
#: refused the connection."}).  The text format's fields are fixed; these
#: are the JSON format's only, so that a text line keeps its documented
#: shape.
ACCESS_JSON_FIELDS = (*ACCESS_FIELDS, "rule", "limit", "parent_status", "detail")


# The second last formatted, and its text: records come many to a second,
# and strftime costs as much as the rest of the time's formatting.
_lastSecond: tuple[int, str] = (-1, "")


def _utc(timestamp: float) -> str:
    global _lastSecond
    second = int(timestamp)
    if _lastSecond[0] != second:
        _lastSecond = (
            second,
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
        )
    return f"{_lastSecond[1]}.{int(timestamp * 1000) % 1000:03d}Z"


def accessRecord(event: LogEvent) -> dict[str, Any]:
    """
    The access-log record of a tunnel event.

    @param event: A log event with C{tunnelEvent} set.
    @return: The fields of L{ACCESS_FIELDS}.
    """
    return {
        "time": _utc(event.get("log_time") or time.time()),
        "client": event["client"],
        "user": event["user"],
        "target": event["target"],
        "connected": event["connectedTo"],
        "status": event["status"],
        "bytes_up": event["bytesUp"],
        "bytes_down": event["bytesDown"],
        "handshake_ms": round(event["handshake"] * 1000, 1),
        "duration_ms": round(event["duration"] * 1000, 1),
        "ended": event["ended"],
    }


def formatAccessText(event: LogEvent) -> str:
    """
    One space-separated line of the L{ACCESS_FIELDS}, C{-} for empty ones.

    Every field is free of spaces and control characters: C{%}, spaces and
    anything outside visible ASCII are percent-encoded (C{%20}, C{%0A}).

    @param event: A log event with C{tunnelEvent} set.
    @return: The line, without a line break.
    """
    record = accessRecord(event)
    return " ".join(escapeField(str(record[name])) for name in ACCESS_FIELDS)


def escapeField(text: str) -> str:
    """
    Percent-encode C{%}, spaces and anything outside visible ASCII, so a
    field (a user name a client claimed, say) can neither split a record
    nor start a forged one.

    @param text: The field's value.
    @return: C{text} with those characters percent-encoded (their UTF-8
        bytes, C{%XX} each); C{text} itself if there are none.
    """
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_percentEncoded, text)


# One character escapeField encodes: anything but visible ASCII (! to ~),
# and %.  One regular expression search decides for a whole field, where a
# test per character took most of the time of formatting a record.
_UNSAFE = re.compile("[^!-$&-~]")


def _percentEncoded(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8"))


def formatAccessJSON(event: LogEvent) -> str:
    """
    One JSON object of the L{ACCESS_JSON_FIELDS}; C{status} is C{null} when
    no answer was sent.

    @param event: A log event with C{tunnelEvent} set.
    @return: The object, on one line.
    """
    record = accessRecord(event)
    if record["status"] == "-":
        record["status"] = None
    # Events from before these fields (or a library's own) may lack them.
    record["rule"] = event.get("refusal")
    record["limit"] = event.get("limit")
    record["parent_status"] = event.get("parentStatus")
    record["detail"] = event.get("detail")
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    if text.isprintable():
        return text
    # json.dumps escapes only C0 controls: a user name a client claimed may
    # hold others that readers take for a line break (NEL, U+2028, U+2029)
    # or that reorder what a terminal shows (U+202E).  Outside strings JSON
    # is printable ASCII, so this escapes inside strings only.
    return "".join(c if c.isprintable() else _jsonEscape(c) for c in text)


def _jsonEscape(character: str) -> str:
    code = ord(character)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    # Beyond the Basic Multilingual Plane JSON escapes a surrogate pair.
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


_FORMATS = {"text": formatAccessText, "json": formatAccessJSON}


@implementer(ILogObserver)
class AccessLogObserver:
    """
    Writes tunnel events to an access log file, one line each.

    A file that cannot be written (a full disk) or reopened (no descriptor
    left) costs the records meanwhile, never the tunnels: one error is
    logged when it starts and one line when it ends, rather than a
    traceback for each record.
    """

    _log = Logger()

    def __init__(self, path: str, format: str = "text") -> None:
        """
        @param path: The file to append to, or C{-} for standard output.
        @param format: C{text} or C{json}.
        @raise ValueError: For another format.
        @raise OSError: If the file cannot be opened.
        """
        if format not in _FORMATS:
            raise ValueError(f"access log format must be text or json, not {format!r}")
        self._path = path
        self._format = _FORMATS[format]
        self._file: IO[str] = self._open()
        self._writeFailing = False
        self._reopenWanted = False

    def _open(self) -> IO[str]:
        if self._path == "-":
            return sys.stdout
        return open(self._path, "a", encoding="utf-8", buffering=1)

    def __call__(self, event: LogEvent) -> None:
        """
        Write C{event} if it is a tunnel event.

        @param event: A log event; any but a tunnel event is ignored.
        """
        if not event.get("tunnelEvent"):
            return
        if self._reopenWanted:
            self.reopen()
        try:
            self._file.write(self._format(event) + "\n")
        except OSError as e:
            if not self._writeFailing:
                self._writeFailing = True
                self._log.error(
                    "Cannot write the access log {path}: {error}; its records "
                    "are lost until it can be written again",
                    path=self._path,
                    error=str(e),
                )
            return
        if self._writeFailing:
            self._writeFailing = False
            self._log.info("Writing the access log {path} again", path=self._path)

    def reopen(self) -> bool:
        """
        Close and open the file again, for logrotate (SIGUSR1).

        If it cannot be opened, records go on to the file open before, and
        the next record tries again.

        @return: Whether the file was reopened.
        """
        if self._path == "-":
            return False
        try:
            new = self._open()
        except OSError as e:
            if not self._reopenWanted:
                self._reopenWanted = True
                self._log.error(
                    "Cannot reopen the access log {path}: {error}; writing on "
                    "to the file open before, and trying again at each record",
                    path=self._path,
                    error=str(e),
                )
            return False
        if self._reopenWanted:
            self._reopenWanted = False
            self._log.info("Reopened the access log {path}", path=self._path)
        old, self._file = self._file, new
        # Closing flushes: a line that could not be written is lost already.
        with contextlib.suppress(OSError):
            old.close()
        return True

    def reopenIfMoved(self) -> bool:
        """
        Reopen the file if its path no longer names the file open: it was
        renamed or removed (by logrotate, say) since it was opened, before
        a SIGUSR1 could ask for the reopen.

        @return: Whether the file was reopened.
        """
        if self._path == "-":
            return False
        try:
            opened = os.fstat(self._file.fileno())
            named = os.stat(self._path)
        except (FileNotFoundError, ValueError):
            # Gone (or the open file closed): a reopen makes the file anew.
            return self.reopen()
        except OSError:
            # Not to be told (the directory not searchable by the user the
            # proxy runs as, say): a SIGUSR1 still reopens it.
            return False
        if (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino):
            return False
        return self.reopen()

    def close(self) -> None:
        """
        Close the file.
        """
        if self._path != "-":
            with contextlib.suppress(OSError):
                self._file.close()
