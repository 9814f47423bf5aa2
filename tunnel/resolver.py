"""
Name lookups for the targets: C{getaddrinfo} in threads of their own,
bounded, shared and cancellable.

Twisted's default resolver runs C{getaddrinfo} in the reactor's thread pool,
which the htpasswd checker's bcrypt also uses, queues without bound, and
runs every queued lookup even when whoever asked left long ago.  A client
that names hosts whose DNS servers do not answer (each lookup then blocks a
thread for the resolver's timeout, about ten seconds by default) could so
stall every other client's lookups and logins, and grow a queue of work that
runs after it is gone; and the names of one slow domain (an attack, or
an outage of that domain's DNS servers), or one client's names, could hold
every thread.  L{ThreadedResolver} keeps the semantics of C{getaddrinfo}
(C{/etc/hosts}, C{nsswitch.conf}, search domains), bounds the rest, shares
the threads between domains and between clients, and keeps answers for a
short time.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "CACHE_ANSWERS_FOR",
    "CACHE_FAILURES_FOR",
    "MAX_CACHED",
    "MAX_CACHED_ADDRESSES",
    "ThreadedResolver",
    "domainOf",
    "lookupClient",
    "sharedResolver",
]

_log = Logger()

#: Seconds an answer with addresses is kept by default.  C{getaddrinfo} does
#: not say how long DNS lets an answer be kept (its TTL), so this is short:
#: as long as Java keeps one, and below the minimum Squid keeps (60 s).
CACHE_ANSWERS_FOR = 30.0

#: Seconds an answer without an address (no such name, or a DNS server
#: that failed or did not answer) is kept by default: long enough that a
#: flood of requests for a name whose servers do not answer costs one
#: lookup in ten seconds, short enough that a name fixed is reachable soon.
CACHE_FAILURES_FOR = 10.0

#: The least seconds between two warnings that a domain's (or a client's)
#: lookups were refused for taking their share of the queue.
DOMAIN_WARNING_INTERVAL = 10.0

#: How many domains' and clients' last warnings are remembered before those
#: older than C{DOMAIN_WARNING_INTERVAL} are let go of.  With the default
#: shares at most four domains and two clients fill theirs at once (a
#: domain takes a quarter of the queue, a client half), so this is reached
#: only by those that came and went.
MAX_DOMAIN_WARNINGS = 64

#: Who asks for the lookups started while it is set: the key of the client
#: (see L{tunnel.clients.clientKey}) whose tunnel needs them, or L{None}
#: for lookups of no client's.  L{tunnel.ConnectProxy} sets it while it
#: starts connecting to a target, so that a L{ThreadedResolver} can give
#: each client a share of its threads without every
#: L{tunnel.interfaces.ITargetConnector} (and Twisted's
#: C{IHostnameResolver}, which knows of no client) passing it on.
lookupClient: ContextVar[str | None] = ContextVar("lookupClient", default=None)

#: The most answers kept by default; the least recently used goes first.
MAX_CACHED = 10_000

#: The most addresses the answers kept hold together, by default: a name
#: can have thousands (a 64 KiB DNS answer holds about 4000), and whoever
#: controls a domain's DNS could otherwise make ten thousand such answers
#: cost gigabytes.  About 11 MB.
MAX_CACHED_ADDRESSES = 65_536

#: The C{getaddrinfo} errors that are answers about the name, kept for
#: C{cacheFailuresFor}: no such name, no address of that kind, a DNS server
#: that failed or did not answer.  Others (C{EAI_SYSTEM}: the process is
#: out of descriptors, say; C{EAI_MEMORY}) say nothing of the name, and
#: are not kept.
_NO_ADDRESS = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_AGAIN", "EAI_FAIL")
    if hasattr(socket, name)
)

# The counts of a domain or client with no lookup running or waiting.
_NONE = (0, 0)

_ANY: frozenset[type[IAddress]] = frozenset([IPv4Address, IPv6Address])
_FAMILIES: dict[frozenset[type[IAddress]], int] = {
    frozenset([IPv4Address]): socket.AF_INET,
    frozenset([IPv6Address]): socket.AF_INET6,
    _ANY: socket.AF_UNSPEC,
}
_ADDRESS_TYPES: dict[int, Any] = {
    socket.AF_INET: IPv4Address,
    socket.AF_INET6: IPv6Address,
}
_SOCKET_TYPES = {"TCP": socket.SOCK_STREAM, "UDP": socket.SOCK_DGRAM}
_SEMANTICS = {socket.SOCK_STREAM: "TCP", socket.SOCK_DGRAM: "UDP"}

#: What C{getaddrinfo} gives: (family, type, proto, canonname, sockaddr).
AddressInfo = list[tuple[Any, Any, int, str, Any]]


@implementer(IHostResolution)
class Lookup:
    """
    One caller's lookup of a name, as L{ThreadedResolver.resolveHostName}
    gives it.

    @ivar name: The name looked up.
    @ivar port: The port the addresses carry.
    @ivar cancelled: Whether the caller cancelled it: its receiver hears
        nothing more.
    @ivar busy: Whether it was refused because too many lookups were
        waiting: its receiver was told the lookup completed, with no
        address.
    """

    __slots__ = (
        "_job",
        "_receiver",
        "_resolver",
        "busy",
        "cancelled",
        "name",
        "port",
    )

    def __init__(
        self,
        resolver: ThreadedResolver,
        name: str,
        receiver: IResolutionReceiver,
        port: int = 0,
    ) -> None:
        """
        @param resolver: The resolver that runs it.
        @param name: The name looked up.
        @param receiver: Told the addresses.
        @param port: The port the addresses carry.
        """
        self._resolver = resolver
        self.name = name
        self.port = port
        # Dropped once the receiver has heard the end: the receiver usually
        # holds this lookup too (to cancel it), and the reference back
        # would make a cycle that keeps the caller's objects until Python's
        # cycle collector runs.
        self._receiver: IResolutionReceiver | None = receiver
        self._job: _Job | None = None
        self.cancelled = False
        self.busy = False

    def cancel(self) -> None:
        """
        Stop the lookup: its receiver hears nothing more, and if no other
        caller waits for the same answer and no thread took it yet, it
        never runs.
        """
        if self.cancelled:
            return
        self.cancelled = True
        self._receiver = None
        job, self._job = self._job, None
        if job is not None:
            self._resolver._cancelled(job, self)


class _Job:
    """
    One C{getaddrinfo} call, and the lookups waiting for its answer.
    """

    __slots__ = ("args", "client", "domain", "lookups", "started")

    def __init__(self, args: tuple[str, int, int, int], client: str | None) -> None:
        self.args = args
        self.domain = domainOf(args[0])
        # Counted against the client that asked first: the others that
        # share the call found it asked for already.
        self.client = client
        self.lookups: list[Lookup] = []
        self.started = False


def domainOf(name: str) -> str:
    """
    The domain whose lookups share one part of the threads: the last two
    labels of C{name} (C{example.com} for C{www.example.com}), or the name
    itself when it has fewer.

    Two labels, not the registrable domain of the public suffix list: that
    would need the list, and a heuristic shorter than the list would let
    anyone with a short name under a country's domain have each of its
    names counted apart.  So every name under C{co.uk} shares one part,
    which bites only when that many of them are looked up at once.

    @param name: A name as looked up.
    @return: Its domain, in lower case.
    """
    return ".".join(name.rstrip(".").lower().rsplit(".", 2)[-2:])


def _tally(counts: dict[str, list[int]], key: str, which: int, step: int) -> None:
    """
    Add C{step} to C{key}'s count number C{which} (running, waiting); a key
    with neither has no entry.
    """
    entry = counts.setdefault(key, [0, 0])
    entry[which] += step
    if entry == [0, 0]:
        del counts[key]


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def _withPort(address: IAddress, port: int) -> IAddress:
    """
    C{address} (as kept, with port 0) with C{port}.
    """
    if isinstance(address, IPv6Address):
        return IPv6Address(
            address.type, address.host, port, address.flowInfo, address.scopeID
        )
    assert isinstance(address, IPv4Address)
    return IPv4Address(address.type, address.host, port)


def _startDaemon(target: Callable[[], None], name: str) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()


class _Workers:
    """
    Threads that run jobs handed to them, started as they are needed.

    Written by hand rather than taken from Twisted's C{ThreadPool}: that
    pool joins its threads when the reactor stops, so a lookup stuck on a
    DNS server that does not answer would hold the process up after the
    drain.  These threads are daemons: a stuck lookup dies with the
    process.  L{ThreadedResolver} hands out no more jobs than there are
    threads, so the queue between them never holds more than that.
    """

    def __init__(
        self,
        size: int,
        startThread: Callable[[Callable[[], None], str], None] = _startDaemon,
    ) -> None:
        """
        @param size: The most threads.
        @param startThread: Starts a thread running its first argument,
            named by its second (tests pass their own).
        """
        self.size = size
        self._startThread = startThread
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.started = 0

    def run(self, job: Callable[[], None]) -> None:
        """
        Run C{job} in a thread: an idle one, or a new one while there are
        fewer than C{size}.

        @param job: Called with no argument in a worker thread.
        """
        if self.started < self.size:
            try:
                self._startThread(self._work, f"tunnel-resolver-{self.started + 1}")
            except Exception:
                if self.started == 0:
                    raise
                # Existing threads take it once they are free.
            else:
                self.started += 1
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()
            # Let go of it before waiting: an idle thread must not keep the
            # job's lookups (and their receivers) alive.
            del job

    def stop(self) -> None:
        """
        Let every thread end once it is done with its job; none is waited
        for.
        """
        for _ in range(self.started):
            self._jobs.put(None)
        self.started = 0


@implementer(IHostnameResolver)
class ThreadedResolver:
    """
    Resolves names with C{getaddrinfo} in threads of its own, as Twisted's
    default resolver does, but:

      - in its own threads (at most C{threads}), so that slow lookups never
        delay the bcrypt checks of logins, nor the reverse;
      - lookups of the same name, port and kind in progress at once share
        one C{getaddrinfo} call;
      - the names of one domain (see L{domainOf}) run in at most
        C{maxRunningPerDomain} threads at once and take at most
        C{maxWaitingPerDomain} of the places in the queue, so that the
        names of a domain whose DNS servers do not answer hold up only
        each other: lookups of other domains go first;
      - likewise the lookups one client asks for (see L{lookupClient}) run
        in at most C{maxRunningPerClient} threads and take at most
        C{maxWaitingPerClient} places, so that a client naming hosts under
        several such domains holds up only itself;
      - at most C{maxWaiting} lookups wait for a thread; beyond that (or
        beyond a domain's or a client's share) a lookup completes at once
        with no
        address, and its L{Lookup} is C{busy} (L{tunnel.HostnameConnector}
        then fails with L{tunnel.interfaces.LookupsBusy}, a C{503} for the
        client);
      - a cancelled lookup that no thread took yet never runs, and one
        running tells its receiver nothing;
      - answers are kept for C{cacheFor} seconds, answers without an
        address (no such name, or no answer from DNS) for
        C{cacheFailuresFor}, at most C{maxCached} of them holding at most
        C{maxCachedAddresses} addresses together: a lookup of a name kept
        is answered at once, without a thread.

    What it cannot bound is how long one C{getaddrinfo} call blocks its
    thread: that is the system resolver's timeout and attempts
    (C{resolv.conf(5)}).

    @ivar threads: The most lookups that run at once.
    @ivar maxWaiting: The most lookups that wait for a thread.
    @ivar maxRunningPerDomain: The most lookups of one domain that run at
        once.
    @ivar maxWaitingPerDomain: The most lookups of one domain that wait.
    @ivar maxRunningPerClient: The most lookups one client asked for that
        run at once.
    @ivar maxWaitingPerClient: The most lookups one client asked for that
        wait.
    @ivar cacheFor: Seconds an answer with addresses is kept.
    @ivar cacheFailuresFor: Seconds an answer without one is kept.
    @ivar maxCached: The most answers kept.
    @ivar maxCachedAddresses: The most addresses the answers kept hold.
    @ivar lookedUp: How many C{getaddrinfo} calls completed.
    @ivar answeredFromCache: How many lookups were answered from the kept
        answers.
    """

    def __init__(
        self,
        reactor: Any,
        threads: int = 20,
        maxWaiting: int = 1000,
        getaddrinfo: Callable[..., AddressInfo] = socket.getaddrinfo,
        workers: Any = None,
        cacheFor: float = CACHE_ANSWERS_FOR,
        cacheFailuresFor: float = CACHE_FAILURES_FOR,
        maxCached: int = MAX_CACHED,
        maxRunningPerDomain: int | None = None,
        maxWaitingPerDomain: int | None = None,
        maxCachedAddresses: int = MAX_CACHED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
        maxRunningPerClient: int | None = None,
        maxWaitingPerClient: int | None = None,
    ) -> None:
        """
        @param reactor: Gets the answers back from the threads
            (C{callFromThread}), and stops the threads when it shuts down.
        @param threads: The most lookups that run at once.
        @param maxWaiting: The most lookups that wait for a thread.
        @param getaddrinfo: Looks a name up, called as
            C{socket.getaddrinfo} is (with the host, the port, and the
            family, type, proto and flags as keywords or in that order);
            tests pass a fake one, and an application may pass its own (a
            private hosts table, say), whose addresses are still vetted by
            the policy.
        @param workers: Runs the lookups: an object whose C{run(job)} calls
            C{job()} in another thread (tests pass one that runs them when
            told).  By default daemon threads, at most C{threads}, stopped
            when the reactor shuts down.
        @param cacheFor: Seconds an answer with addresses is kept; C{0}
            keeps none.
        @param cacheFailuresFor: Seconds an answer without an address is
            kept; C{0} keeps none.
        @param maxCached: The most answers kept.
        @param maxRunningPerDomain: The most lookups of one domain that run
            at once; by default a quarter of C{threads}, rounded down, but
            at least one (so with fewer than four threads, one; with one
            thread, no share at all).
        @param maxWaitingPerDomain: The most lookups of one domain that wait
            for a thread; by default a quarter of C{maxWaiting} (at least
            one).
        @param maxCachedAddresses: The most addresses the answers kept hold
            together; an answer with more is not kept.
        @param clock: Tells the time the answers kept expire by: a clock
            that never steps back (the reactor's C{seconds} is the wall
            clock, which a step back would make keep answers for as long).
        @param maxRunningPerClient: The most lookups one client (as
            L{lookupClient} names it) asked for that run at once; by
            default half of C{threads}, rounded down, but at least one:
            twice a domain's share, so that the names of one domain whose
            servers do not answer hold no more than half of a client's.
        @param maxWaitingPerClient: The most lookups one client asked for
            that wait for a thread; by default half of C{maxWaiting} (at
            least one).
        """
        if threads < 1:
            raise ValueError("a resolver needs at least one thread")
        for name, share in (
            ("maxRunningPerDomain", maxRunningPerDomain),
            ("maxRunningPerClient", maxRunningPerClient),
        ):
            if share is not None and share < 1:
                # No thread for a domain (or client) at all: its lookups
                # would wait for ever.
                raise ValueError(f"{name} must be at least 1, not {share}")
        self._reactor = reactor
        self.threads = threads
        self.maxWaiting = maxWaiting
        # A quarter of each for a domain, half for a client by default: a
        # client's names under a domain whose servers do not answer hold
        # only half of its share, and its other names have the rest.
        self.maxRunningPerDomain = _given(maxRunningPerDomain, max(1, threads // 4))
        self.maxWaitingPerDomain = _given(maxWaitingPerDomain, max(1, maxWaiting // 4))
        self.maxRunningPerClient = _given(maxRunningPerClient, max(1, threads // 2))
        self.maxWaitingPerClient = _given(maxWaitingPerClient, max(1, maxWaiting // 2))
        self.cacheFor = cacheFor
        self.cacheFailuresFor = cacheFailuresFor
        self.maxCached = maxCached
        self.maxCachedAddresses = maxCachedAddresses
        self._clock = clock
        self.lookedUp = 0
        self.answeredFromCache = 0
        self._getaddrinfo = getaddrinfo
        self._ownWorkers = workers is None
        self._workers = workers if workers is not None else _Workers(threads)
        self._jobs: dict[tuple[str, int, int, int], _Job] = {}
        self._waiting: deque[_Job] = deque()
        self._running = 0
        # Per domain, and per client: lookups running, lookups waiting; a
        # domain or client with neither has no entry.
        self._domains: dict[str, list[int]] = {}
        self._clients: dict[str, list[int]] = {}
        # Least recently used first: (when it expires, the addresses).
        self._cache: dict[tuple[str, int, int, int], tuple[float, list[IAddress]]] = {}
        self._cachedAddresses = 0
        # Per domain or client: when its refusal was last warned of.
        self._warnedAt: dict[tuple[str, str], float] = {}
        self._backedUp = False
        self._stopTrigger: Any = None

    @property
    def running(self) -> int:
        """
        How many C{getaddrinfo} calls run now.
        """
        return self._running

    @property
    def waiting(self) -> int:
        """
        How many C{getaddrinfo} calls wait for a thread.
        """
        return len(self._waiting)

    @property
    def cached(self) -> int:
        """
        How many answers are kept (some may have expired: they go when
        asked for, or when newer ones push them out).
        """
        return len(self._cache)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        Look C{hostName} up.

        @param resolutionReceiver: Told the addresses found.
        @param hostName: The name.
        @param portNumber: The port the addresses carry.
        @param addressTypes: L{IPv4Address}, L{IPv6Address} or both (the
            default).
        @param transportSemantics: C{"TCP"} or C{"UDP"}.
        @return: The L{Lookup}, which may be cancelled.
        """
        family = _FAMILIES[
            frozenset(addressTypes) if addressTypes is not None else _ANY
        ]
        # One answer for every port and every spelling of a name (DNS and
        # the hosts file ignore the case of ASCII letters): a client naming
        # one host in random case, or on every port, must not miss the
        # answers kept, nor push out the others'.  The port is put into the
        # addresses as each lookup is answered.
        key = (
            hostName.lower() if hostName.isascii() else hostName,
            0,
            family,
            _SOCKET_TYPES[transportSemantics],
        )
        lookup = Lookup(self, hostName, resolutionReceiver, portNumber)
        resolutionReceiver.resolutionBegan(lookup)
        if lookup.cancelled:
            return lookup
        kept = self._cache.get(key)
        if kept is not None:
            if kept[0] > self._clock():
                self.answeredFromCache += 1
                # To the end: the answer least recently used goes first, so
                # that a flood of new names cannot push out the busy ones.
                del self._cache[key]
                self._cache[key] = kept
                self._deliver(lookup, kept[1])
                return lookup
            self._forget(key)
        job = self._jobs.get(key)
        if job is None:
            job = _Job(key, lookupClient.get())
            counts = self._domains.get(job.domain, _NONE)
            client = job.client
            clientCounts = _NONE if client is None else self._clients.get(client, _NONE)
            startNow = (
                self._running < self.threads
                and counts[0] < self.maxRunningPerDomain
                and clientCounts[0] < self.maxRunningPerClient
            )
            if not startNow:
                if len(self._waiting) >= self.maxWaiting:
                    self._refuse(lookup, resolutionReceiver)
                    return lookup
                if counts[1] >= self.maxWaitingPerDomain:
                    self._refuseForShare(
                        lookup, resolutionReceiver, "domain", job.domain
                    )
                    return lookup
                if client is not None and clientCounts[1] >= self.maxWaitingPerClient:
                    self._refuseForShare(lookup, resolutionReceiver, "client", client)
                    return lookup
            if startNow:
                try:
                    self._start(job)
                except Exception:
                    _log.failure(
                        "Could not start a thread to look {name} up", name=hostName
                    )
                    self._refuse(lookup, resolutionReceiver)
                    return lookup
            else:
                self._waiting.append(job)
                self._enter(job, 1)
            self._jobs[key] = job
        job.lookups.append(lookup)
        lookup._job = job
        return lookup

    def _refuse(self, lookup: Lookup, receiver: IResolutionReceiver) -> None:
        if not self._backedUp:
            self._backedUp = True
            _log.warn(
                "Name lookups are backed up ({threads} running, {waiting} "
                "waiting): new ones are refused until they drain",
                threads=self._running,
                waiting=len(self._waiting),
            )
        self._busy(lookup, receiver)

    def _refuseForShare(
        self, lookup: Lookup, receiver: IResolutionReceiver, kind: str, name: str
    ) -> None:
        """
        Refuse C{lookup} because the lookups of its domain, or of its
        client, take their share of the queue.

        @param kind: C{"domain"} or C{"client"}.
        @param name: The domain, or the client's key.
        """
        # Once every DOMAIN_WARNING_INTERVAL at most for each: a client
        # naming host after host under a slow domain would otherwise log a
        # line each.
        now = self._clock()
        if now - self._warnedAt.get((kind, name), float("-inf")) >= (
            DOMAIN_WARNING_INTERVAL
        ):
            if len(self._warnedAt) >= MAX_DOMAIN_WARNINGS:
                # Only those warned of within the interval matter.
                self._warnedAt = {
                    k: t
                    for k, t in self._warnedAt.items()
                    if now - t < DOMAIN_WARNING_INTERVAL
                }
            self._warnedAt[(kind, name)] = now
            if kind == "domain":
                _log.warn(
                    "Lookups of names under {domain} take their share of the "
                    "queue ({waiting} waiting): new ones of that domain are "
                    "refused, other domains' are not",
                    domain=name,
                    waiting=self.maxWaitingPerDomain,
                )
            else:
                _log.warn(
                    "Lookups for client {client} take its share of the queue "
                    "({waiting} waiting): its new ones are refused, other "
                    "clients' are not",
                    client=name,
                    waiting=self.maxWaitingPerClient,
                )
        self._busy(lookup, receiver)

    def _busy(self, lookup: Lookup, receiver: IResolutionReceiver) -> None:
        lookup.busy = True
        lookup._receiver = None
        receiver.resolutionComplete()

    def _start(self, job: _Job) -> None:
        if self._ownWorkers and self._stopTrigger is None:
            self._stopTrigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._stop
            )
        self._workers.run(lambda: self._lookUp(job))
        job.started = True
        self._running += 1
        self._enter(job, 0)

    def _stop(self) -> None:
        self._stopTrigger = None
        self._workers.stop()

    def _lookUp(self, job: _Job) -> None:
        # In a worker thread.  Errors other than gaierror (a name IDNA
        # cannot encode raises UnicodeError) mean no address too: a lookup
        # must always complete, or its caller waits for ever.
        keep = False
        try:
            result: AddressInfo | Exception = self._getaddrinfo(*job.args)
            keep = True
        except socket.gaierror as e:
            result = []
            keep = e.errno in _NO_ADDRESS
        except (OSError, UnicodeError):
            result = []
        except Exception as e:
            result = e
        self._reactor.callFromThread(self._done, job, result, keep)

    def _done(
        self, job: _Job, result: AddressInfo | Exception, keep: bool = False
    ) -> None:
        self._running -= 1
        self.lookedUp += 1
        self._leave(job, 0)
        del self._jobs[job.args]
        self._next()
        if isinstance(result, Exception):
            # A bug of the getaddrinfo given, not an answer.
            _log.failure("Looking {name} up failed", Failure(result), name=job.args[0])
            addresses: list[IAddress] = []
        else:
            addresses = [
                _ADDRESS_TYPES[family](_SEMANTICS.get(socketType, "TCP"), *address)
                for family, socketType, _, _, address in result
                if family in _ADDRESS_TYPES
            ]
            if keep:
                self._keep(job.args, addresses)
        # A copy: a receiver may cancel another lookup of this job.
        for lookup in list(job.lookups):
            lookup._job = None
            self._deliver(lookup, addresses)
        job.lookups.clear()

    def _keep(self, key: tuple[str, int, int, int], addresses: list[IAddress]) -> None:
        # No answer for this key is kept: a lookup runs only when none is
        # (or once the one kept expired, and was forgotten).
        keepFor = self.cacheFor if addresses else self.cacheFailuresFor
        if (
            keepFor <= 0
            or self.maxCached < 1
            or len(addresses) > self.maxCachedAddresses
        ):
            return
        # The least recently used is always the first, and the first to go.
        while self._cache and (
            len(self._cache) >= self.maxCached
            or self._cachedAddresses + len(addresses) > self.maxCachedAddresses
        ):
            self._forget(next(iter(self._cache)))
        self._cache[key] = (self._clock() + keepFor, addresses)
        self._cachedAddresses += len(addresses)

    def _forget(self, key: tuple[str, int, int, int]) -> None:
        _, addresses = self._cache.pop(key)
        self._cachedAddresses -= len(addresses)

    def _enter(self, job: _Job, which: int) -> None:
        """
        Count C{job} as running (C{which} 0) or waiting (1) for its domain
        and its client.
        """
        self._count(job, which, 1)

    def _leave(self, job: _Job, which: int) -> None:
        """
        Count C{job} as no longer running (C{which} 0) or waiting (1).
        """
        self._count(job, which, -1)

    def _count(self, job: _Job, which: int, step: int) -> None:
        _tally(self._domains, job.domain, which, step)
        if job.client is not None:
            _tally(self._clients, job.client, which, step)

    def _deliver(self, lookup: Lookup, addresses: list[IAddress]) -> None:
        # Until it is cancelled, even from inside its own receiver; a
        # receiver that fails is still told the lookup completed, or its
        # caller would wait for ever.
        receiver = lookup._receiver
        if receiver is None:
            return
        port = lookup.port
        try:
            for address in addresses:
                if lookup.cancelled:
                    return
                receiver.addressResolved(_withPort(address, port) if port else address)
        except Exception:
            _log.failure("A receiver of {name} failed", name=lookup.name)
        if lookup.cancelled:
            return
        lookup._receiver = None
        try:
            receiver.resolutionComplete()
        except Exception:
            _log.failure("A receiver of {name} failed", name=lookup.name)

    def _next(self) -> None:
        # The oldest waiting lookup whose domain and client have threads
        # left to them goes first; the queue holds at most maxWaiting, and
        # this is called once a lookup ends.
        if self._waiting and self._running < self.threads:
            for job in list(self._waiting):
                if self._running >= self.threads:
                    break
                if self._domains[job.domain][0] < self.maxRunningPerDomain and (
                    job.client is None
                    or self._clients[job.client][0] < self.maxRunningPerClient
                ):
                    self._waiting.remove(job)
                    self._leave(job, 1)
                    self._start(job)
        self._checkDrained()

    def _checkDrained(self) -> None:
        if self._backedUp and not self._waiting:
            self._backedUp = False
            _log.info("Name lookups are no longer backed up")

    def _cancelled(self, job: _Job, lookup: Lookup) -> None:
        job.lookups.remove(lookup)
        if job.lookups or job.started:
            return
        # Nobody waits for this answer any more and no thread took it: it
        # never runs, and its place in the queue is free.
        del self._jobs[job.args]
        self._waiting.remove(job)
        self._leave(job, 1)
        self._checkDrained()


_shared: weakref.WeakKeyDictionary[Any, ThreadedResolver] = weakref.WeakKeyDictionary()


def sharedResolver(reactor: Any) -> ThreadedResolver:
    """
    The one default L{ThreadedResolver} of C{reactor}, so that connectors
    made without a resolver share its threads (and its lookups): a
    connector made per tunnel must not leave a thread behind each.

    @param reactor: The reactor.
    @return: Its shared resolver (a new one for a reactor that cannot be
        weakly referred to).
    """
    try:
        resolver = _shared.get(reactor)
    except TypeError:
        # A reactor that cannot be weakly referred to (a test double).
        return ThreadedResolver(reactor)
    if resolver is None:
        resolver = _shared[reactor] = ThreadedResolver(reactor)
    return resolver
