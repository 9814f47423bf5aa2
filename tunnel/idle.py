"""
Idle timeouts for many tunnels on one timer.

A timer per tunnel costs a L{twisted.internet.base.DelayedCall} (with its
bound methods, about half a kilobyte) for every open tunnel, and a heap
operation on every reset.  An L{IdleWatch} keeps one timer for all the
tunnels it watches: each tunnel only notes when it last moved a byte, and
the watch looks at them when the oldest of them could have run out of time.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["IdleWatch", "Watched"]


class Watched(Protocol):
    """
    What an L{IdleWatch} watches.

    @ivar lastActivity: When, by the watch's clock, the tunnel last moved a
        byte.
    """

    lastActivity: float

    def idleTimedOut(self) -> None:
        """
        No byte moved for the watch's timeout: end the tunnel.
        """


class IdleWatch:
    """
    Ends the tunnels that moved no byte for C{timeout} seconds, with one
    timer for all of them.

    The timer is set for the moment the least recently active tunnel runs
    out of time, so a tunnel ends exactly C{timeout} seconds after its last
    byte, unless many tunnels keep the watch looking: it then looks at most
    once per C{granularity} seconds, and a tunnel may last up to that much
    longer.

    @ivar timeout: Seconds without a byte after which a tunnel ends.
    """

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, timeout: float, granularity: float = 1.0
    ) -> None:
        """
        @param clock: Runs the timer and tells the time.
        @param timeout: Seconds without a byte after which a tunnel ends;
            more than 0.
        @param granularity: The shortest time between two looks.
        """
        self._clock = clock
        self.timeout = timeout
        self._granularity = min(granularity, timeout)
        # A dict as an insertion-ordered set: tunnels are looked at oldest
        # first.
        self._watched: dict[Watched, None] = {}
        self._call: IDelayedCall | None = None

    @property
    def watching(self) -> int:
        """
        How many tunnels are watched.
        """
        return len(self._watched)

    def watch(self, tunnel: Watched) -> None:
        """
        Start watching C{tunnel}; its C{lastActivity} must be set.

        @param tunnel: The tunnel.
        """
        self._watched[tunnel] = None
        if self._call is None:
            self._schedule(tunnel.lastActivity + self.timeout)

    def unwatch(self, tunnel: Watched) -> None:
        """
        Stop watching C{tunnel} (it ended); nothing happens if it was not
        watched.

        @param tunnel: The tunnel.
        """
        self._watched.pop(tunnel, None)
        if not self._watched and self._call is not None:
            self._call.cancel()
            self._call = None

    def _schedule(self, when: float) -> None:
        delay = max(when - self._clock.seconds(), 0.0)
        self._call = self._clock.callLater(delay, self._look)

    def _look(self) -> None:
        self._call = None
        now = self._clock.seconds()
        timeout = self.timeout
        expired = [t for t in self._watched if now - t.lastActivity >= timeout]
        try:
            for tunnel in expired:
                # Forget it first: ending it may unwatch it, or not.
                self._watched.pop(tunnel, None)
                try:
                    tunnel.idleTimedOut()
                except Exception:
                    # One tunnel's failure must not leave the others
                    # without their timeout.
                    self._log.failure("Ending an idle tunnel failed")
        finally:
            if self._watched and self._call is None:
                oldest = min(t.lastActivity for t in self._watched)
                self._schedule(max(oldest + timeout, now + self._granularity))
