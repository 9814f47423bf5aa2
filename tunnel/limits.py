"""
How many connections one proxy process can hold: what its file descriptors
hold (the soft limit raised to the hard one) and what its memory holds.
The default C{--max-tunnels} is the lower of the two (L{defaultMaxTunnels}).

Reads the process's limits and the kernel's memory figures; imports
nothing of ours.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

__all__ = [
    "defaultMaxTunnels",
    "descriptorBoundTunnels",
    "descriptorLimit",
    "memoryBoundTunnels",
    "raiseDescriptorLimit",
]

_log = Logger()

#: The most descriptors the proxy plans for, whatever its limits allow.
_MOST_DESCRIPTORS = 1 << 20


def _noFileLimit() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _planned(limit: int) -> int:
    if limit == resource.RLIM_INFINITY or limit > _MOST_DESCRIPTORS:
        return _MOST_DESCRIPTORS
    return limit


def descriptorLimit(
    reactor: Any, limit: Callable[[], tuple[int, int]] = _noFileLimit
) -> int:
    """
    How many file descriptors this process will have once it runs: its hard
    limit, to which L{raiseDescriptorLimit} raises the soft one, unless the
    reactor is C{select()}'s, which cannot watch a descriptor beyond
    C{FD_SETSIZE} (1024): then the soft limit as it is.  Either at most
    2**20.

    Raising it is what systemd asks of a program that needs many
    descriptors and does not use C{select()} (C{LimitNOFILE=} in
    systemd.exec(5)): services start with a soft limit of 1024 below a hard
    limit of 524288, and with 1024 the proxy would hold 384 tunnels.

    @param reactor: The reactor that will watch the descriptors.
    @param limit: Gives the soft and hard C{RLIMIT_NOFILE}.
    @return: The number of descriptors.
    """
    from twisted.internet.selectreactor import SelectReactor

    soft, hard = limit()
    if isinstance(reactor, SelectReactor):
        return _planned(soft)
    return max(_planned(soft), _planned(hard))


def raiseDescriptorLimit(
    descriptors: int,
    limit: Callable[[], tuple[int, int]] = _noFileLimit,
    setLimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """
    Raise this process's soft C{RLIMIT_NOFILE} to C{descriptors} (see
    L{descriptorLimit}), if it is lower; a failure is logged.

    @param descriptors: The soft limit wanted.
    @param limit: Gives the soft and hard limits.
    @param setLimit: Sets them (L{resource.setrlimit}).
    @return: The soft limit now (at most 2**20).
    """
    soft, hard = limit()
    if _planned(soft) >= descriptors:
        return _planned(soft)
    try:
        setLimit(resource.RLIMIT_NOFILE, (descriptors, hard))
    except (OSError, ValueError) as e:
        _log.warn(
            "Could not raise the file descriptor limit from {soft} to "
            "{descriptors}: {error}",
            soft=soft,
            descriptors=descriptors,
            error=e,
        )
        return _planned(soft)
    _log.info(
        "Raised the file descriptor limit from {soft} to {descriptors}",
        soft=soft,
        descriptors=descriptors,
    )
    return descriptors


#: The share of the memory the default C{--max-tunnels} lets connections
#: in their handshake hold at worst (one in N).
_MEMORY_SHARE = 4


def memoryBoundTunnels(
    perConnection: int,
    meminfo: str = "/proc/meminfo",
    cgroupLimit: str = "/sys/fs/cgroup/memory.max",
) -> int | None:
    """
    How many connections a quarter of the memory holds if each holds
    C{perConnection} bytes: what a connection still in its handshake can
    make the proxy keep (its unfinished head, or early data).  The memory
    is the machine's, or the cgroup's limit if that is lower (a container).

    Without it, the default C{--max-tunnels} would follow the descriptor
    limit alone, which can be far more than the memory holds: 262,016
    connections for systemd's hard limit of 524288, 17 GiB of unfinished
    64 KiB heads.

    @param perConnection: Bytes a connection may hold at worst.
    @param meminfo: Where the kernel tells C{MemTotal}.
    @param cgroupLimit: Where cgroup v2 tells the memory limit.
    @return: The number of connections, or L{None} where the memory is not
        known (not Linux).
    """
    total = None
    with contextlib.suppress(OSError, ValueError), open(meminfo) as lines:
        for line in lines:
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    with contextlib.suppress(OSError, ValueError):
        with open(cgroupLimit) as limitFile:
            text = limitFile.read().strip()
        if text != "max":
            limit = int(text)
            total = limit if total is None else min(total, limit)
    if total is None:
        return None
    return max(1, total // _MEMORY_SHARE // perConnection)


def descriptorBoundTunnels(descriptors: int) -> int:
    """
    The default C{--max-tunnels}: as many connections as C{descriptors}
    hold, two descriptors each (client and target), less a quarter of them,
    at most 256, kept back for the rest (the listeners, logs, splice pipes,
    refused connections lingering, metrics scrapes).  Past it new clients
    get a 503 with C{Retry-After}, rather than the reset, and the log lines
    at each, of an accept that found no descriptor left.

    @param descriptors: How many descriptors the process has
        (L{descriptorLimit}).
    @return: The most connections at once.
    """
    return max(1, (descriptors - min(256, descriptors // 4)) // 2)


def defaultMaxTunnels(
    descriptors: int, perConnection: int, processes: int = 1
) -> tuple[int, str]:
    """
    The default C{--max-tunnels}: the lower of what the descriptors hold
    (L{descriptorBoundTunnels}) and what this process's share of the memory
    holds (L{memoryBoundTunnels}; C{--workers} share the memory, each has
    its own descriptors).

    @param descriptors: How many descriptors the process has
        (L{descriptorLimit}).
    @param perConnection: Bytes a connection in its handshake may hold.
    @param processes: How many proxy processes share the memory.
    @return: The most connections at once, and what bounds them, to end
        "as ..." in the log.
    """
    count = descriptorBoundTunnels(descriptors)
    byMemory = memoryBoundTunnels(perConnection)
    if byMemory is None or byMemory // processes >= count:
        return count, "the file descriptor limit allows"
    return max(1, byMemory // processes), (
        f"a quarter of the memory holds at {perConnection // 1024} KiB each"
    )
