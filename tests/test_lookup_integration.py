"""
Name lookups over real sockets and real resolver threads: the share of the
threads that the names of one domain, or one client's lookups, may hold,
and the answers kept.

The C{getaddrinfo} here is a fake that answers C{127.0.0.1} for every name
(no DNS query is sent); the names of C{slow.test} (and C{slow1.test}, ...)
block until the test lets them go, as lookups of a domain whose servers do
not answer would.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks

from tests.fakes import turnsUntil
from tests.test_integration import (
    ESTABLISHED,
    LoopbackTestCase,
    Peer,
    Yielding,
    connectHead,
)
from tunnel import HostnameConnector, ThreadedResolver


class SlowDomainTests(LoopbackTestCase):
    """
    A domain whose lookups hang holds only its share of the resolver's
    threads.
    """

    def setUp(self) -> None:
        super().setUp()
        self.release = threading.Event()
        self.looked: list[str] = []
        # Four threads: one for each domain, two for each client.
        self.resolver = ThreadedResolver(
            reactor, threads=4, getaddrinfo=self.getaddrinfo
        )
        # Cleanups run last first: the hung lookups are let go, then the
        # resolver's threads end.
        self.addCleanup(self.resolver._stop)
        self.addCleanup(self.release.set)
        self.proxy = self.startProxy(
            connector=HostnameConnector(reactor, resolver=self.resolver)
        )
        self.target = self.serve()

    def getaddrinfo(
        self, host: str, port: int, family: int = 0, type: int = 0, *args: Any
    ) -> list[tuple[Any, ...]]:
        """
        Answer C{127.0.0.1}; for the names of C{slow.test}, C{slow1.test}
        and the like, once the test
        lets them go (at most 20 seconds, so that no thread outlives a
        failed test for long).
        """
        if ".slow" in host:
            self.release.wait(20)
        self.looked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    @inlineCallbacks
    def request(
        self, name: str, source: str | None = None
    ) -> Yielding[tuple[Peer, Deferred[bytes]]]:
        """
        Connect a client (from C{source}) and ask for a tunnel to C{name}
        on the target's port.

        @return: Fires, once the request is sent, with the client and what
            fires with the proxy's response head.
        """
        peer = Peer()
        answer = peer.expectResponseHead()
        yield self.connectToProxy(self.proxy.port, peer, source)
        peer.tcp.write(connectHead(f"{name}:{self.target.port}"))
        return peer, answer

    @inlineCallbacks
    def test_otherDomainsGoFirst(self) -> Yielding[None]:
        """
        While the lookups of names under a domain whose servers do not
        answer hang, holding the one thread of four that the domain may
        have, a client naming another domain gets its tunnel at once; the
        hung requests get theirs once their lookups return, one at a time.
        """
        answers = []
        for number in range(6):
            _, answer = yield self.request(f"x{number}.slow.test")
            answers.append(answer)
        yield turnsUntil(reactor, lambda: self.resolver.waiting == 5)
        self.assertEqual((self.resolver.running, self.resolver.waiting), (1, 5))
        fast = Peer()
        yield self.connectThrough(
            self.proxy.port, f"fast.test:{self.target.port}", fast
        )
        self.assertEqual(self.looked, ["fast.test"])
        self.assertFalse(any(answer.called for answer in answers))
        self.release.set()
        heads = yield gatherResults(answers)
        self.assertEqual(heads, [ESTABLISHED] * 6)
        self.assertEqual(
            sorted(self.looked[1:]), [f"x{number}.slow.test" for number in range(6)]
        )

    @inlineCallbacks
    def test_otherClientsGoFirst(self) -> Yielding[None]:
        """
        While the lookups one client asked for hang under four slow
        domains, which could hold every thread (one each), they hold only
        the client's share (two of four): another client's name is looked
        up at once, and the first client's lookups wait for its own to end.
        """
        answers = []
        for number in range(4):
            _, answer = yield self.request(f"x.slow{number}.test")
            answers.append(answer)
        yield turnsUntil(reactor, lambda: self.resolver.waiting == 2)
        self.assertEqual((self.resolver.running, self.resolver.waiting), (2, 2))
        _, fast = yield self.request("fast.test", source="127.0.0.2")
        head = yield fast
        self.assertEqual(head, ESTABLISHED)
        self.assertEqual(self.looked, ["fast.test"])
        self.assertFalse(any(answer.called for answer in answers))
        self.release.set()
        heads = yield gatherResults(answers)
        self.assertEqual(heads, [ESTABLISHED] * 4)

    @inlineCallbacks
    def test_answerKept(self) -> Yielding[None]:
        """
        A name looked up once is answered from the answers kept for the
        next tunnels: one C{getaddrinfo} call for three tunnels opened one
        after the other.
        """
        for _ in range(3):
            yield self.connectThrough(
                self.proxy.port, f"kept.test:{self.target.port}", Peer()
            )
        self.assertEqual(self.looked, ["kept.test"])
        self.assertEqual(
            (self.resolver.lookedUp, self.resolver.answeredFromCache), (1, 2)
        )
