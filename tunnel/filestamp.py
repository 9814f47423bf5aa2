"""
Telling whether a file changed, for the files the proxy re-reads (htpasswd,
rules): L{WatchedFile} gives a changed file's content once, when it can be
read whole.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import TypeVar

from twisted.logger import Logger

_Parsed = TypeVar("_Parsed")

__all__ = [
    "MAX_SIZE",
    "SETTLE",
    "WatchedFile",
    "fileStamp",
    "readRegularFile",
    "settled",
]

SETTLE = 1.0
"""
Seconds a changed file must stay unchanged before it is read (see
L{settled}).
"""


MAX_SIZE = 4 * 1024 * 1024
"""
The largest file L{WatchedFile} reads: 4 MiB (some 60,000 htpasswd users,
or 200,000 rules), which the proxy parses on its one thread.
"""


def readRegularFile(path: str, limit: int) -> bytes:
    """
    Read a whole regular file of at most C{limit} bytes.

    A name swapped for a FIFO would block the reading thread (the whole
    proxy, deaf even to SIGTERM) until a writer came; one swapped for a
    device such as C{/dev/zero} would never end: neither is read.

    @param path: The file.
    @param limit: The most bytes it may hold.
    @return: Its content.
    @raise OSError: If it cannot be opened or read, is not a regular file
        (C{EINVAL}), or holds more than C{limit} bytes (C{EFBIG}).
    """
    # Asked before opening too, since opening some devices does something;
    # and again of what was opened, which may have been swapped in since.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    # Non-blocking, so that opening a FIFO with no writer does not wait.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks: list[bytes] = []
        size = 0
        # Bounded: each pass reads at least a byte, up to limit + 1.
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    content = b"".join(chunks)
    if len(content) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return content


def fileStamp(path: str) -> tuple[int, int, int, int] | None:
    """
    What identifies a version of a file: its modification time, size and
    inode (a file replaced by a rename has a new inode), and its status
    change time, which a rewrite in place changes even when it keeps the
    size and sets the modification time back.

    @param path: The file.
    @return: The stamp, or L{None} if the file cannot be examined.
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino, status.st_ctime_ns)


def settled(
    stamp: tuple[int, int, int, int] | None, now: float, settle: float = SETTLE
) -> bool:
    """
    Whether a version of a file has stayed unchanged long enough to be read
    whole.

    A file rewritten in place is first emptied, then written: read in
    between, it holds only its first lines, and for a rules file whose
    C{allow-to} lines come before its C{deny-to} lines that is wider access
    than either version gives.  So a file whose status last changed less
    than C{settle} seconds ago is taken for one being written, and read at a
    later look.  A change that seems to lie in the future (the clock was set
    back) counts as settled, so that a clock set back never holds a reload
    off.

    @param stamp: The file's L{fileStamp}; L{None} (a file that cannot be
        examined) counts as settled, for its reader to report.
    @param now: The time, in seconds since the epoch.
    @param settle: The seconds of stillness asked for.
    @return: Whether the file may be read now.
    """
    if stamp is None:
        return True
    age = now - stamp[3] / 1e9
    return not 0 <= age < settle


# No file has this stamp (nor the None of one that cannot be examined).
_NOT_READ = (-1, -1, -1, -1)


class WatchedFile:
    """
    A file read at start-up and read again whenever it changed: the one
    place that decides when a change is seen, for every reader.

    A change counts as seen only once the new content was read: a file that
    could not be opened (no descriptor left, say) is read at a later look,
    and its change (a rule, a user removed) is not lost.

    @ivar path: The file.
    @ivar failing: Whether the last attempt to read it failed (so that its
        reader says so once, not at every look).
    """

    def __init__(self, path: str) -> None:
        """
        @param path: The file.
        """
        self.path = path
        self.failing = False
        # Taken before the first read, so that a change during it is seen.
        self._stamp: tuple[int, int, int, int] | None = fileStamp(path)

    def read(self) -> bytes:
        """
        The file's content, whether it changed or not.

        @return: The content.
        @raise OSError: If it cannot be read, is not a regular file, or is
            larger than L{MAX_SIZE} (see L{readRegularFile}).
        """
        return readRegularFile(self.path, MAX_SIZE)

    def readAtStart(
        self,
        parse: Callable[[bytes], _Parsed],
        fallback: bytes | None,
        log: Logger,
        what: str,
        now: float,
    ) -> tuple[bytes, _Parsed]:
        """
        Read and parse the file at start-up.

        With a C{fallback} (a C{--workers} supervisor's last good copy), a
        file that cannot be read or parsed, or that has not L{settled} (it
        may be half written) and holds something other than the fallback,
        gives the fallback's content instead, and a warning says why; a
        file that could not be read, or had not settled, is read at the next
        look even if it has not changed.  A file that has not settled but
        holds just what the supervisor read serves as it is, without a
        warning: the file written just before the proxy started, as
        configuration tools do.

        @param parse: Turns content into what its reader uses.
        @param fallback: The content to use if the file cannot be used.
        @param log: Where the reader logs.
        @param what: What the file holds, for the warning (C{"rules"}).
        @param now: The time, in seconds since the epoch.
        @return: The content used, and what C{parse} made of it.
        @raise OSError: If the file cannot be read, and there is no
            fallback.
        @raise ValueError: If C{parse} refuses the content, and there is
            no fallback.
        """
        if fallback is not None and not settled(self._stamp, now):
            # Perhaps half written, unless the supervisor read the same.
            try:
                content = self.read()
            except OSError:
                content = None
            if content == fallback:
                return fallback, parse(fallback)
            # Read at a later look instead.
            self.readAgain()
            error = f"{self.path} is being written"
        else:
            try:
                content = self.read()
                return content, parse(content)
            except (OSError, ValueError) as e:
                if fallback is None:
                    raise
                if isinstance(e, OSError):
                    self.failing = True
                    self.readAgain()
                    error = f"{self.path}: {e.strerror}"
                else:
                    error = str(e)
        log.warn(
            "Using the last good {what} the supervisor kept: {error}",
            what=what,
            error=error,
            path=self.path,
        )
        return fallback, parse(fallback)

    def readAgain(self) -> None:
        """
        Count the file as not read yet, so that the next L{changed} reads
        it even if it has not changed: for a reader that could not read it
        at start-up.
        """
        self._stamp = _NOT_READ

    def changed(self, now: float) -> bytes | None:
        """
        The file's content if it changed since it was last read and has
        L{settled} since.

        @param now: The time, in seconds since the epoch.
        @return: The new content, or L{None} if there is none to read yet.
        @raise OSError: If it changed but cannot be read; the change is
            still there to be read at the next call.
        """
        stamp = fileStamp(self.path)
        if stamp == self._stamp or not settled(stamp, now):
            return None
        try:
            content = self.read()
        except OSError:
            self.failing = True
            raise
        self.failing = False
        self._stamp = stamp
        return content
