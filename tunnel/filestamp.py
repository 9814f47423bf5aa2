"""
Telling whether a file changed, for the files the proxy re-reads (htpasswd,
rules).
"""

from __future__ import annotations

import os

__all__ = ["fileStamp"]


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
