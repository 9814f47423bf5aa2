"""
Work for the reactor's thread pool that a cancellation withdraws while it
waits for a thread.

Twisted's C{deferToThreadPool} gives a Deferred that cannot be cancelled:
the work runs when a thread is free, whoever still wants its result.  A
password check is a quarter of a second of CPU (bcrypt), and it waits in
the pool's queue behind every check asked before it; a client that sends
its credentials and leaves at once would otherwise cost that quarter of a
second all the same, and a crowd of them would queue unbounded work ahead of
everyone else's logins.  Cancelled before a thread takes it, the work here
does not run; once running it runs to its end, and its result is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

__all__ = ["deferToPoolUnlessCancelled"]

_T = TypeVar("_T")


class _Withdrawn:
    """
    Whether the caller still wants the work: set on the reactor thread,
    read by the pool thread when it takes the work.
    """

    __slots__ = ("withdrawn",)

    def __init__(self) -> None:
        self.withdrawn = False

    def withdraw(self, result: Deferred[Any]) -> None:
        """
        The Deferred's canceller: the work is no longer wanted.

        @param result: The Deferred cancelled.
        """
        self.withdrawn = True


def deferToPoolUnlessCancelled(
    reactor: Any, f: Callable[..., _T], *args: object
) -> Deferred[_T]:
    """
    Run C{f(*args)} in C{reactor}'s thread pool, unless the Deferred
    returned is cancelled before a thread takes it.

    @param reactor: The reactor, whose C{getThreadPool} runs the work and
        whose thread gets the result.
    @param f: The work.
    @param args: Its arguments.
    @return: Fires with C{f}'s result or fails with its exception; on
        cancellation fails with L{twisted.internet.defer.CancelledError}
        at once, whether or not the work had started.
    """
    wanted = _Withdrawn()
    result: Deferred[_T] = Deferred(wanted.withdraw)

    def work() -> _T | None:
        if wanted.withdrawn:
            return None
        return f(*args)

    def deliver(succeeded: bool, outcome: Any) -> None:
        if result.called:
            # Cancelled: the caller has its CancelledError already.
            return
        if succeeded:
            result.callback(outcome)
        else:
            result.errback(outcome)

    def done(succeeded: bool, outcome: Any) -> None:
        reactor.callFromThread(deliver, succeeded, outcome)

    reactor.getThreadPool().callInThreadWithCallback(done, work)
    return result
