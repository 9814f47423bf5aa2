"""
Test doubles, and a way to wait for a real reactor, shared by the test
modules.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """
        Nothing to cancel: fake resolutions finish at once.
        """


@implementer(IHostnameResolver)
class FakeResolver:
    """
    A resolver that never sends a DNS query: IP literals resolve to
    themselves, names to what C{hostMap} says, anything else to nothing
    (which endpoints report as a failed lookup).

    @ivar queries: The names asked for, in order.
    @ivar receivers: The receivers given, in order.
    @ivar completions: How many times a receiver is told its lookup
        completed (more than once plays a resolver that misbehaves).
    @ivar later: Whether lookups wait for L{answerWaiting} rather than
        answer at once.
    """

    def __init__(
        self,
        hostMap: Mapping[str, Sequence[str]] | None = None,
        completions: int = 1,
        later: bool = False,
    ) -> None:
        self.hostMap = dict(hostMap or {})
        self.completions = completions
        self.later = later
        self.queries: list[str] = []
        self.receivers: list[IResolutionReceiver] = []
        self._waiting: list[tuple[IResolutionReceiver, str, int]] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: object = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        Resolve from the map, at once unless told to wait.
        """
        self.queries.append(hostName)
        self.receivers.append(resolutionReceiver)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if self.later:
            self._waiting.append((resolutionReceiver, hostName, portNumber))
        else:
            self._answer(resolutionReceiver, hostName, portNumber)
        return resolution

    def answerWaiting(self) -> None:
        """
        Answer the lookups made while C{later} was set.
        """
        waiting, self._waiting = self._waiting, []
        for receiver, hostName, portNumber in waiting:
            self._answer(receiver, hostName, portNumber)

    def _answer(
        self, receiver: IResolutionReceiver, hostName: str, portNumber: int
    ) -> None:
        try:
            addresses = [str(ipaddress.ip_address(hostName))]
        except ValueError:
            addresses = list(self.hostMap.get(hostName, ()))
        for text in addresses:
            if ":" in text:
                receiver.addressResolved(IPv6Address("TCP", text, portNumber))
            else:
                receiver.addressResolved(IPv4Address("TCP", text, portNumber))
        for _ in range(self.completions):
            receiver.resolutionComplete()


class SynchronousThreadPool:
    """
    A thread pool that runs each call at once, in the calling thread, and
    counts the calls.
    """

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(
        self, onResult: Any, func: Any, *args: Any, **kwargs: Any
    ) -> None:
        """
        Run C{func} now and report its result as a real pool would.
        """
        self.calls += 1
        try:
            result = func(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ManualThreadPool:
    """
    A thread pool that runs each call only when the test says so, in the
    test's thread, reporting its result as a real pool would.

    @ivar jobs: The calls handed over and not run yet: C{(onResult, func,
        args)}.
    """

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any) -> None:
        """
        Keep the call for L{runNext}.
        """
        self.jobs.append((onResult, func, args))

    def runNext(self) -> None:
        """
        Run the oldest call kept.
        """
        onResult, func, args = self.jobs.pop(0)
        SynchronousThreadPool().callInThreadWithCallback(onResult, func, *args)


class ThreadPoolReactor:
    """
    Just enough reactor for C{deferToThreadPool}: a synchronous pool and a
    C{callFromThread} that calls at once.
    """

    def __init__(self) -> None:
        self.pool = SynchronousThreadPool()

    def getThreadPool(self) -> SynchronousThreadPool:
        """
        The pool.
        """
        return self.pool

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        """
        Call C{f} now.
        """
        f(*args, **kwargs)


class ThreadReactor:
    """
    The part of a reactor L{ThreadedResolver} uses: C{callFromThread} runs
    the call at once (the fake workers run jobs in the test's thread), and
    system event triggers are recorded.

    @ivar triggers: The (phase, event, callable) triggers added.
    @ivar now: What C{seconds} tells; tests move it on.
    """

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, Callable[[], None]]] = []
        self.now = 0.0

    def seconds(self) -> float:
        """
        @return: C{now}.
        """
        return self.now

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        """
        Call C{f} now.
        """
        f(*args)

    def addSystemEventTrigger(
        self, phase: str, event: str, f: Callable[[], None]
    ) -> object:
        """
        Record the trigger.
        """
        self.triggers.append((phase, event, f))
        return len(self.triggers)


class ManualWorkers:
    """
    Workers that run a job only when the test says so.

    @ivar jobs: The jobs handed over and not run yet.
    """

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def run(self, job: Callable[[], None]) -> None:
        """
        Keep C{job} for later.
        """
        self.jobs.append(job)

    def runNext(self) -> None:
        """
        Run the oldest job kept.
        """
        self.jobs.pop(0)()


class FakeGetaddrinfo:
    """
    A C{getaddrinfo} that answers from a map and records its calls; a
    name mapped to an exception raises it.

    @ivar calls: The arguments of each call.
    """

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[Any, ...]] = []

    def __call__(
        self, host: str, port: int, family: int, socketType: int
    ) -> list[tuple[Any, ...]]:
        self.calls.append((host, port, family, socketType))
        answer = self.answers.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if isinstance(answer, Exception):
            raise answer
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socketType,
                6,
                "",
                (address, port, 0, 3) if ":" in address else (address, port),
            )
            for address in answer
        ]


class DescriptorsExhausted:
    """
    While C{on}, every L{tunnel.filestamp.WatchedFile.read} fails as an
    open does when the process has no descriptor left (C{EMFILE}).

    @ivar on: Whether reads fail; clear it to let them succeed again.
    """

    def __init__(self, testCase: Any) -> None:
        """
        @param testCase: Patches C{WatchedFile.read} until it ends.
        """
        from tunnel.filestamp import WatchedFile

        self.on = True
        read = WatchedFile.read

        def readUnlessExhausted(watched: WatchedFile) -> bytes:
            if self.on:
                raise OSError(errno.EMFILE, "Too many open files")
            return read(watched)

        testCase.patch(WatchedFile, "read", readUnlessExhausted)


@inlineCallbacks
def turnsUntil(
    reactor: Any, condition: Callable[[], object], turns: int = 100_000
) -> Generator[Deferred[None], None, None]:
    """
    Let a real C{reactor} run a turn at a time, not for a time, until
    C{condition()} is true or C{turns} turns have passed: bounded, so the
    caller asserts the condition afterwards.

    @param reactor: The running reactor.
    @param condition: What is waited for.
    @param turns: The most turns to wait.
    @return: Fires once the condition holds or the turns are spent.
    """
    for _ in range(turns):
        if condition():
            return
        yield deferLater(reactor, 0, lambda: None)
