"""
Loopback integration tests of the proxy's defences: authentication against
an htpasswd file (with curl and with raw clients), damping of failed logins,
connection limits, and the destination policy, all over real sockets.

Everything listens on 127.0.0.1, always on port 0.  Target names are
resolved by a L{FakeResolver}, so no DNS query is sent, and the proxy's
connector reaches targets through a L{LoopbackOnlyReactor}, which records
every connection attempt and refuses any to a non-loopback address: whatever
the code under test does, no test can reach beyond the host.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

import attrs
import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest
from twisted.web.resource import Resource
from twisted.web.static import Data
from zope.interface import implementer

from tests.fakes import FakeResolver
from tests.test_integration import (
    ESTABLISHED,
    PAGE,
    Echo,
    LoopbackTestCase,
    Once,
    Peer,
    PeerFactory,
    RunningProxy,
    TrackedSite,
    Yielding,
    connectHead,
    reactor,
)
from tunnel import ConnectProxyFactory, HostnameConnector, limits
from tunnel.auth import FailureDamper, portalFromCheckers
from tunnel.htpasswd import HtpasswdChecker
from tunnel.policy import ITunnelPolicy, TunnelPolicy
from tunnel.tap import Options, makeFactory

USER = "alice"
PASSWORD = "s3cret"
REALM = "Test Realm"
CHALLENGE = b'Basic realm="Test Realm", charset="UTF-8"'
# Any port, and loopback opened on purpose: the targets here all listen on
# 127.0.0.1.
LOOPBACK_POLICY = TunnelPolicy.fromStrings(ports=["any"], allowTo=["127.0.0.0/8"])
# A second client address: Linux routes all of 127.0.0.0/8 to loopback.
OTHER_CLIENT = "127.0.0.2"


class LoopbackOnlyReactor:
    """
    The reactor, except that C{connectTCP} records every attempt and refuses
    any address that is not loopback.

    Given to the proxy's L{HostnameConnector}, it proves which addresses the
    proxy tried, and keeps a test from ever sending a packet off the host,
    even should the policy under test let a foreign address through.

    @ivar attempts: The C{(host, port)} of every connection attempt, in order.
    """

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped
        self.attempts: list[tuple[str, int]] = []

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30,
        bindAddress: tuple[str, int] | None = None,
    ) -> Any:
        """
        Record the attempt, and pass it on only if C{host} is loopback.
        """
        self.attempts.append((host, port))
        if not ipaddress.ip_address(host.partition("%")[0]).is_loopback:
            raise ConnectError(string=f"the tests never connect to {host}")
        return self._wrapped.connectTCP(host, port, factory, timeout, bindAddress)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


@implementer(ICredentialsChecker)
class CountingChecker:
    """
    A checker that counts the credentials it is asked about, then lets
    another checker decide, optionally only once a gate opens.

    @ivar asked: How many credentials were asked about.
    @ivar onAsked: Called each time, after counting.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self, checker: ICredentialsChecker, gate: Once[None] | None = None
    ) -> None:
        """
        @param checker: Decides.
        @param gate: If given, no credentials are passed on to C{checker}
            until it has happened.
        """
        self._checker = checker
        self._gate = gate
        self.asked = 0
        self.onAsked: Callable[[], None] = lambda: None
        self._waiters: list[tuple[int, Once[None]]] = []

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        """
        Count, then ask the wrapped checker (once the gate is open).
        """
        self.asked += 1
        for count, waiter in self._waiters:
            if self.asked >= count:
                waiter.fire(None)
        self.onAsked()
        if self._gate is None:
            result: Deferred[Any] = self._checker.requestAvatarId(credentials)
            return result
        return self._gate.wait().addCallback(
            lambda ignored: self._checker.requestAvatarId(credentials)
        )

    def waitAsked(self, count: int) -> Deferred[None]:
        """
        @return: Fires once at least C{count} credentials were asked about.
        """
        waiter: Once[None] = Once()
        if self.asked >= count:
            waiter.fire(None)
        self._waiters.append((count, waiter))
        return waiter.wait()


def bcryptEntry(password: str, cost: int) -> bytes:
    """
    Hash C{password} as C{htpasswd -B} does: bcrypt with the C{$2y$} prefix.
    """
    hashed = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(cost))
    return b"$2y$" + hashed[len(b"$2b$") :]


def basicCredentials(user: str, password: str) -> bytes:
    """
    The value of a C{Proxy-Authorization} field for Basic credentials.
    """
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def authHead(authority: str, user: str, password: str) -> bytes:
    """
    A CONNECT request head for C{authority} with Basic credentials.
    """
    target = authority.encode("ascii")
    return b"CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: %s\r\n\r\n" % (
        target,
        target,
        basicCredentials(user, password),
    )


def costOf(hashed: bytes) -> int:
    """
    The cost factor of a bcrypt hash (C{$2y$10$...} has cost 10).
    """
    return int(hashed.split(b"$")[2])


@attrs.define
class Answer:
    """
    The proxy's response head to one client connection.

    @ivar peer: The client connection.
    @ivar head: The response head, up to and including its empty line.
    """

    peer: Peer
    head: bytes

    @property
    def status(self) -> int:
        """
        The status code.
        """
        return int(self.head.split(b" ", 2)[1])

    def fields(self, name: bytes) -> list[bytes]:
        """
        The values of the header field C{name} (any case), in order.
        """
        values = []
        for line in self.head.split(b"\r\n")[1:]:
            fieldName, colon, value = line.partition(b":")
            if colon and fieldName.strip().lower() == name.lower():
                values.append(value.strip())
        return values

    def field(self, name: bytes) -> bytes:
        """
        The value of the header field C{name}, which must appear once.
        """
        [value] = self.fields(name)
        return value


def curlOrSkip() -> str:
    """
    @return: The path of curl.
    @raise SkipTest: If curl is not installed.
    """
    curl = shutil.which("curl")
    if curl is None:
        raise SkipTest("curl is not installed")
    return curl


def runCurl(curl: str, arguments: list[str]) -> Deferred[tuple[bytes, bytes, int]]:
    """
    Run curl quietly, with no environment (so no C{*_proxy} variables) and no
    C{.curlrc}.

    @return: Fires with its output, error output and exit code.
    """
    result: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        curl,
        # --max-time only keeps a broken proxy from hanging the test.
        ["-q", "--silent", "--show-error", "--max-time", "30", *arguments],
        env={},
        reactor=reactor,
    )
    return result


class SecurityTestCase(LoopbackTestCase):
    """
    Run proxies whose connector goes through a L{LoopbackOnlyReactor}, with
    clients that may connect from another loopback address.

    @ivar guard: The reactor the proxies connect to targets with.
    """

    timeout = 30

    def setUp(self) -> None:
        self._proxyFactories: list[ConnectProxyFactory] = []
        # Added before the base class's cleanup, so it runs after it: once
        # the test's connections are closed, wait for the proxy's sockets
        # (a refused connection may linger until its client closes).
        self.addCleanup(self._drainProxies)
        super().setUp()
        self.guard = LoopbackOnlyReactor(reactor)

    def _drainProxies(self) -> Deferred[Any]:
        return gatherResults([factory.drain(10) for factory in self._proxyFactories])

    def runFactory(
        self, factory: ConnectProxyFactory, resolver: FakeResolver
    ) -> RunningProxy:
        """
        Listen with C{factory} on 127.0.0.1 until the test ends.
        """
        self._proxyFactories.append(factory)
        return RunningProxy(self.listen(factory), factory, resolver)

    def runProxy(
        self,
        hostMap: dict[str, list[str]] | None = None,
        policy: ITunnelPolicy = LOOPBACK_POLICY,
        **options: Any,
    ) -> RunningProxy:
        """
        Run a proxy that resolves with a L{FakeResolver} knowing C{hostMap}
        and connects through C{self.guard}.

        @param options: More L{ConnectProxyFactory} arguments.
        """
        resolver = FakeResolver(hostMap)
        factory = ConnectProxyFactory(
            HostnameConnector(self.guard, resolver=resolver),
            reactor=reactor,
            policy=policy,
            **options,
        )
        return self.runFactory(factory, resolver)

    def runAuthProxy(
        self, path: str, checker: ICredentialsChecker | None = None, **options: Any
    ) -> RunningProxy:
        """
        Run a proxy that asks for credentials from the htpasswd file C{path}
        (or from C{checker}), in the realm L{REALM}, and may reach loopback.
        """
        if checker is None:
            checker = HtpasswdChecker(path, reactor=reactor)
        return self.runProxy(
            portal=portalFromCheckers([checker]), realm=REALM, **options
        )

    @inlineCallbacks
    def makeHtpasswd(self, users: dict[str, str], cost: int) -> Yielding[str]:
        """
        Write an htpasswd file with bcrypt entries: with C{htpasswd -B} if it
        is installed, else with the bcrypt package, as C{htpasswd} would.

        @param users: User names and their passwords.
        @param cost: The bcrypt cost factor.
        @return: Fires with the file's path.
        """
        path: str = os.path.abspath(self.mktemp())
        htpasswd = shutil.which("htpasswd")
        if htpasswd is None:
            with open(path, "wb") as f:
                for user, password in users.items():
                    f.write(user.encode() + b":" + bcryptEntry(password, cost) + b"\n")
            return path
        create = ["-c"]
        for user, password in users.items():
            _, err, code = yield getProcessOutputAndValue(
                htpasswd,
                [*create, "-B", "-C", str(cost), "-b", path, user, password],
                env={},
                reactor=reactor,
            )
            self.assertEqual(code, 0, err)
            create = []
        return path

    def serveHTTP(self) -> int:
        """
        Run a plain HTTP server serving L{PAGE} at C{/page}.

        @return: Its port number.
        """
        root = Resource()
        root.putChild(b"page", Data(PAGE, "text/plain"))
        site = TrackedSite(root, self._open.append)
        site.noisy = False
        return self.listen(site)

    @inlineCallbacks
    def connectFrom(
        self, proxyPort: int, peer: Peer, source: str = "127.0.0.1"
    ) -> Yielding[Peer]:
        """
        Open a TCP connection from C{source} to the proxy, tracked for
        cleanup.
        """
        endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", proxyPort, bindAddress=(source, 0)
        )
        yield connectProtocol(endpoint, peer)
        self._open.append(peer)
        self._proxyClients += 1
        return peer

    @inlineCallbacks
    def ask(
        self, proxyPort: int, head: bytes, source: str = "127.0.0.1"
    ) -> Yielding[Answer]:
        """
        Connect to the proxy from C{source} and send C{head}.

        @return: Fires with the proxy's answer.
        """
        peer = Peer()
        response = peer.expectResponseHead()
        yield self.connectFrom(proxyPort, peer, source)
        peer.tcp.write(head)
        responseHead = yield response
        return Answer(peer, responseHead)

    @inlineCallbacks
    def refusedBody(self, answer: Answer) -> Yielding[bytes]:
        """
        Wait for the proxy to close a refused connection, check it sent
        C{Connection: close}, and give the body of its answer.
        """
        self.assertEqual(answer.field(b"connection"), b"close")
        yield answer.peer.lost.wait()
        body = bytes(answer.peer.received)
        self.assertEqual(len(body), int(answer.field(b"content-length")))
        return body

    @inlineCallbacks
    def assertEchoes(self, peer: Peer, message: bytes) -> Yielding[None]:
        """
        Send C{message} through C{peer}'s tunnel to an echo server, and
        check it comes back.
        """
        before = peer.count
        peer.tcp.write(message)
        yield peer.waitFor(before + len(message))
        self.assertEqual(bytes(peer.received[before:]), message)

    @inlineCallbacks
    def assertNeverConnected(self, server: PeerFactory) -> Yielding[None]:
        """
        Check that nothing has connected to C{server} yet: a connection made
        now is the first one it accepts (the kernel accepts connections in
        the order they arrive, so an earlier attempt by the proxy would come
        first).
        """
        probe = Peer()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), probe
        )
        self._open.append(probe)
        first = yield server.accepted.get()
        self.assertEqual(first.tcp.getPeer(), probe.tcp.getHost())
        probe.tcp.loseConnection()
        yield probe.lost.wait()


class AuthenticationTests(SecurityTestCase):
    """
    C{Proxy-Authorization: Basic} checked against an htpasswd file.
    """

    @inlineCallbacks
    def test_curlProxyUser(self) -> Yielding[None]:
        """
        C{curl -p --proxy-user alice:s3cret} tunnels through a proxy that
        checks an htpasswd file, and fetches a page from a local HTTP server.
        """
        curl = curlOrSkip()
        path = yield self.makeHtpasswd({USER: PASSWORD, "bob": "other"}, cost=4)
        proxy = self.runAuthProxy(path)
        httpPort = self.serveHTTP()
        self.expectProxyConnections(1)
        out, err, code = yield runCurl(
            curl,
            [
                "--fail",
                "-p",
                "-x",
                f"http://127.0.0.1:{proxy.port}",
                "--proxy-user",
                f"{USER}:{PASSWORD}",
                f"http://127.0.0.1:{httpPort}/page",
            ],
        )
        self.assertEqual((code, err, out), (0, b"", PAGE))
        [event] = yield self.proxyEnded(1)
        self.assertEqual(
            (event["user"], event["target"], event["status"]),
            (USER, f"127.0.0.1:{httpPort}", 200),
        )

    @inlineCallbacks
    def test_curlWrongPassword(self) -> Yielding[None]:
        """
        With a wrong password curl reports the proxy's 407 to its CONNECT
        (C{%{http_connect}}) and fails with exit code 56; the target is
        never contacted.
        """
        curl = curlOrSkip()
        path = yield self.makeHtpasswd({USER: PASSWORD}, cost=4)
        proxy = self.runAuthProxy(path)
        httpPort = self.serveHTTP()
        self.expectProxyConnections(1)
        out, err, code = yield runCurl(
            curl,
            [
                "-p",
                "-x",
                f"http://127.0.0.1:{proxy.port}",
                "--proxy-user",
                f"{USER}:not-{PASSWORD}",
                "-w",
                "%{http_connect}",
                f"http://127.0.0.1:{httpPort}/page",
            ],
        )
        self.assertEqual((code, out), (56, b"407"), err)
        self.assertIn(b"407", err)
        [event] = yield self.proxyEnded(1)
        self.assertEqual(
            (event["user"], event["status"], event["refusal"]), (USER, 407, "auth")
        )
        self.assertEqual(self.guard.attempts, [])

    @inlineCallbacks
    def test_noCredentialsChallenge(self) -> Yielding[None]:
        """
        A CONNECT without credentials gets a 407 carrying C{Proxy-Authenticate:
        Basic realm="Test Realm"}, the connection is closed, and the target is
        never contacted.
        """
        path = yield self.makeHtpasswd({USER: PASSWORD}, cost=4)
        proxy = self.runAuthProxy(path)
        echo = self.serve(Echo)
        answer = yield self.ask(proxy.port, connectHead(f"127.0.0.1:{echo.port}"))
        self.assertEqual(answer.status, 407)
        self.assertTrue(
            answer.head.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
        )
        self.assertEqual(answer.field(b"proxy-authenticate"), CHALLENGE)
        yield self.refusedBody(answer)
        self.assertEqual(self.guard.attempts, [])
        yield self.assertNeverConnected(echo)

    @inlineCallbacks
    def test_commandLineOptions(self) -> Yielding[None]:
        """
        A factory made by L{tunnel.tap.makeFactory} from C{--auth
        htpasswd:PATH --realm ... --allow-port any --allow-to 127.0.0.0/8}
        (with a fake resolver put in) lets alice tunnel with her password,
        and challenges a wrong one in the configured realm.
        """
        path = yield self.makeHtpasswd({USER: PASSWORD}, cost=4)
        options = Options()
        options.parseOptions(
            [
                *("--listen", "tcp:0:interface=127.0.0.1"),
                *("--auth", f"htpasswd:{path}"),
                *("--realm", REALM),
                *("--allow-port", "any"),
                *("--allow-to", "127.0.0.0/8"),
            ]
        )
        # The running reactor would raise this process's descriptor limit.
        self.patch(limits, "raiseDescriptorLimit", lambda descriptors: descriptors)
        factory = makeFactory(options, reactor)
        resolver = FakeResolver()
        factory.connector = HostnameConnector(self.guard, resolver=resolver)
        proxy = self.runFactory(factory, resolver)
        echo = self.serve(Echo)
        authority = f"127.0.0.1:{echo.port}"

        wrong = yield self.ask(proxy.port, authHead(authority, USER, "guess"))
        self.assertEqual(wrong.status, 407)
        self.assertEqual(wrong.field(b"proxy-authenticate"), CHALLENGE)
        yield self.refusedBody(wrong)
        self.assertEqual(self.guard.attempts, [])

        right = yield self.ask(proxy.port, authHead(authority, USER, PASSWORD))
        self.assertEqual(right.head, ESTABLISHED)
        yield self.assertEchoes(right.peer, b"through the command line")
        right.peer.tcp.loseConnection()
        events = yield self.proxyEnded(2)
        self.assertEqual(
            [(e["user"], e["status"]) for e in events], [(USER, 407), (USER, 200)]
        )

    @inlineCallbacks
    def test_unknownUserCostsAsMuchAsWrongPassword(self) -> Yielding[None]:
        """
        A login as a user who is not in the file runs bcrypt at the same cost
        as a wrong password for one who is, so that how long the proxy takes
        to answer does not tell an attacker which user names exist (as
        L{tunnel.htpasswd} means to: "a missing user costs the same time as
        a wrong password").  The entries have cost 5, C{htpasswd -B}'s
        default.
        """
        checkedHashes: list[bytes] = []
        realCheck = bcrypt.checkpw

        def recordingCheck(password: bytes, hashed: bytes) -> bool:
            checkedHashes.append(hashed)
            return realCheck(password, hashed)

        self.patch(bcrypt, "checkpw", recordingCheck)
        path = yield self.makeHtpasswd({USER: PASSWORD}, cost=5)
        proxy = self.runAuthProxy(path)
        authority = "127.0.0.1:9"
        known = yield self.ask(proxy.port, authHead(authority, USER, "guess"))
        unknown = yield self.ask(proxy.port, authHead(authority, "mallory", "guess"))
        self.assertEqual((known.status, unknown.status), (407, 407))
        self.assertEqual(len(checkedHashes), 2)
        self.assertEqual(
            [costOf(hashed) for hashed in checkedHashes],
            [5, 5],
            "bcrypt cost for a wrong password, then for an unknown user",
        )


class FailedLoginTests(SecurityTestCase):
    """
    Floods of failed logins: bcrypt runs off the reactor thread, and an
    address that fails too often is refused for a while.
    """

    @inlineCallbacks
    def test_badLoginFloodDoesNotStallTunnel(self) -> Yielding[None]:
        """
        While every thread of the reactor's pool is inside bcrypt with one of
        100 wrong passwords (each check held there, once computed, until the
        test lets it go), an established tunnel keeps echoing: no check runs
        on the reactor thread, and none of the 100 is answered before the
        ping comes back.  Once the checks are let go, every one of them gets
        a 407, and the tunnel still works.

        Holding the checks, rather than racing real bcrypt time against the
        echo, makes the outcome the same however loaded the machine is.
        """
        path = yield self.makeHtpasswd({USER: PASSWORD}, cost=4)
        htpasswd = HtpasswdChecker(path, reactor=reactor)
        checker = CountingChecker(htpasswd)
        proxy = self.runAuthProxy(
            path, checker, damper=FailureDamper(reactor, maxFailures=1000)
        )
        echo = self.serve(Echo)
        authority = f"127.0.0.1:{echo.port}"
        tunnel = yield self.ask(proxy.port, authHead(authority, USER, PASSWORD))
        self.assertEqual(tunnel.head, ESTABLISHED)
        yield self.assertEchoes(tunnel.peer, b"before the flood")

        attackers = [Peer() for _ in range(100)]
        # From here on each bcrypt check, run for real, then waits in its
        # thread until release is set (at the latest when the test ends; the
        # wait is bounded anyway).  A check on the reactor thread is never
        # held, which would hang the reactor: it fails the test at once.
        reactorThread = threading.get_ident()
        release = threading.Event()
        self.addCleanup(release.set)
        checkThreads: list[int] = []
        # A check keeps one pool thread until it is let go: the pool is full
        # once this many are held.
        poolSize = min(len(attackers), reactor.getThreadPool().max)
        held = [0]
        poolFull: Once[None] = Once()

        def heldOne() -> None:
            held[0] += 1
            if held[0] >= poolSize:
                poolFull.fire(None)

        realCheck = bcrypt.checkpw

        def heldCheck(password: bytes, hashed: bytes) -> bool:
            checkThreads.append(threading.get_ident())
            valid = realCheck(password, hashed)
            if threading.get_ident() == reactorThread:
                poolFull.fail(Failure(self.failureException("bcrypt on the reactor")))
            else:
                reactor.callFromThread(heldOne)
                release.wait(60)
            return valid

        self.patch(bcrypt, "checkpw", heldCheck)
        # A held failure would otherwise become the time every later failure
        # is padded to (tunnel.htpasswd evens out failure times).
        self.patch(htpasswd, "_sleep", lambda seconds: None)

        answered = [0]

        def countAnswer(head: bytes) -> bytes:
            answered[0] += 1
            return head

        heads = [
            peer.expectResponseHead().addCallback(countAnswer) for peer in attackers
        ]
        for peer in attackers:
            yield self.connectFrom(proxy.port, peer)
        # Each a different guess: identical ones would share one check.
        for number, peer in enumerate(attackers):
            peer.tcp.write(authHead(authority, USER, f"wrong password {number}"))
        # Every bad login has reached the checker, and every pool thread is
        # busy with one of them.
        yield checker.waitAsked(101)
        yield poolFull.wait()
        echoed = tunnel.peer.waitFor(tunnel.peer.count + 4)
        tunnel.peer.tcp.write(b"ping")
        yield echoed
        self.assertEqual(bytes(tunnel.peer.received[-4:]), b"ping")
        self.assertEqual(answered[0], 0, "a login was answered while held")

        release.set()
        responses = yield gatherResults(heads)
        self.assertEqual(
            [
                Answer(peer, head).status
                for peer, head in zip(attackers, responses, strict=True)
            ],
            [407] * 100,
        )
        self.assertEqual(len(checkThreads), 100)
        self.assertNotIn(reactorThread, checkThreads)
        yield self.assertEchoes(tunnel.peer, b"after the flood")
        tunnel.peer.tcp.loseConnection()
        events = yield self.proxyEnded(101)
        self.assertEqual(sorted(e["status"] for e in events), [200] + [407] * 100)

    @inlineCallbacks
    def test_defaultDamper(self) -> Yielding[None]:
        """
        With the default damper, the first 10 wrong passwords from 127.0.0.1
        get 407s; the 11th gets a 429 with a C{Retry-After} of at most a
        minute, and so does the right password after it.  Another client
        address is not affected: its wrong password is checked (407) and its
        right one opens a tunnel.
        """
        path = yield self.makeHtpasswd({USER: PASSWORD}, cost=4)
        proxy = self.runAuthProxy(path)
        echo = self.serve(Echo)
        authority = f"127.0.0.1:{echo.port}"
        badHead = authHead(authority, USER, "wrong")
        for attempt in range(10):
            answer = yield self.ask(proxy.port, badHead)
            self.assertEqual(answer.status, 407, f"attempt {attempt + 1}")

        for head in [badHead, authHead(authority, USER, PASSWORD)]:
            damped = yield self.ask(proxy.port, head)
            self.assertEqual(damped.status, 429)
            self.assertEqual(damped.fields(b"proxy-authenticate"), [])
            retryAfter = int(damped.field(b"retry-after"))
            self.assertTrue(1 <= retryAfter <= 60, retryAfter)
            yield self.refusedBody(damped)

        other = yield self.ask(proxy.port, badHead, source=OTHER_CLIENT)
        self.assertEqual(other.status, 407)
        tunnel = yield self.ask(
            proxy.port, authHead(authority, USER, PASSWORD), source=OTHER_CLIENT
        )
        self.assertEqual(tunnel.head, ESTABLISHED)
        yield self.assertEchoes(tunnel.peer, b"from another address")
        tunnel.peer.tcp.loseConnection()
        events = yield self.proxyEnded(14)
        self.assertEqual(
            [e["status"] for e in events], [407] * 10 + [429, 429, 407, 200]
        )
        self.assertTrue(events[-1]["client"].startswith(f"{OTHER_CLIENT}:"))


class ConcurrentGuessTests(SecurityTestCase):
    """
    Wrong passwords sent at once, faster than they are checked.
    """

    @inlineCallbacks
    def test_concurrentGuessesAreDamped(self) -> Yielding[None]:
        """
        20 wrong passwords sent at once from one address, to a checker slower
        than they arrive, get at most 10 checks: the others are answered 429
        without a check, as the README promises ("after 10 failures within a
        minute from one address, that address gets 429") and as the damper
        is meant to ensure (the proxy is no password oracle).

        The checker holds its answers until each attempt has either reached
        it or been answered without it.
        """
        path = yield self.makeHtpasswd({USER: PASSWORD}, cost=4)
        gate: Once[None] = Once()
        checker = CountingChecker(HtpasswdChecker(path, reactor=reactor), gate)
        proxy = self.runAuthProxy(path, checker)
        attackers = [Peer() for _ in range(20)]
        answeredUnchecked = [0]

        def openWhenAllSettled() -> None:
            if checker.asked + answeredUnchecked[0] >= len(attackers):
                gate.fire(None)

        def answered(head: bytes) -> bytes:
            if not gate.happened:
                # Answers that were checked are held until the gate opens.
                answeredUnchecked[0] += 1
                openWhenAllSettled()
            return head

        checker.onAsked = openWhenAllSettled
        heads = [peer.expectResponseHead().addCallback(answered) for peer in attackers]
        for peer in attackers:
            yield self.connectFrom(proxy.port, peer)
        # Each a different guess: the same credentials in flight count once.
        for number, peer in enumerate(attackers):
            peer.tcp.write(authHead("127.0.0.1:9", USER, f"guess{number}"))
        responses = yield gatherResults(heads)
        statuses = [
            Answer(peer, head).status
            for peer, head in zip(attackers, responses, strict=True)
        ]
        self.assertLessEqual(statuses.count(407), 10, statuses)
        self.assertEqual(statuses.count(407) + statuses.count(429), 20, statuses)


class SuccessResetTests(SecurityTestCase):
    """
    A successful login between failures from the same address.
    """

    @inlineCallbacks
    def test_successDoesNotForgiveOtherUsersFailures(self) -> Yielding[None]:
        """
        From one address: 9 wrong passwords for alice, bob's right password,
        then a 10th wrong password for alice; the next attempt gets a 429,
        since 10 failures happened within the minute (README: "after 10
        failures within a minute from one address, that address gets 429").
        Bob logging in does not wipe out the guesses at alice's password.
        """
        path = yield self.makeHtpasswd({USER: PASSWORD, "bob": "bobs"}, cost=4)
        proxy = self.runAuthProxy(path)
        echo = self.serve(Echo)
        authority = f"127.0.0.1:{echo.port}"
        guess = authHead(authority, USER, "guess")
        for attempt in range(9):
            answer = yield self.ask(proxy.port, guess)
            self.assertEqual(answer.status, 407, f"guess {attempt + 1}")
        bob = yield self.ask(proxy.port, authHead(authority, "bob", "bobs"))
        self.assertEqual(bob.head, ESTABLISHED)
        bob.peer.tcp.loseConnection()
        tenth = yield self.ask(proxy.port, guess)
        self.assertEqual(tenth.status, 407)
        eleventh = yield self.ask(proxy.port, guess)
        self.assertEqual(eleventh.status, 429)


class LimitTests(SecurityTestCase):
    """
    C{maxTunnels} and C{maxTunnelsPerClient} over real connections.
    """

    @inlineCallbacks
    def openTunnels(
        self, proxyPort: int, authority: str, count: int, source: str = "127.0.0.1"
    ) -> Yielding[list[Peer]]:
        """
        Open C{count} tunnels to an echo server, and check each echoes.
        """
        tunnels = []
        for index in range(count):
            answer = yield self.ask(proxyPort, connectHead(authority), source)
            self.assertEqual(answer.head, ESTABLISHED)
            yield self.assertEchoes(answer.peer, b"tunnel %d" % (index,))
            tunnels.append(answer.peer)
        return tunnels

    @inlineCallbacks
    def test_maxTunnels(self) -> Yielding[None]:
        """
        With C{maxTunnels=3} and 3 tunnels open, a 4th connection gets a 503
        with C{Retry-After} and is closed; the 3 tunnels still echo.  Once
        one of them closes, a new tunnel can be opened.
        """
        proxy = self.runProxy(maxTunnels=3)
        echo = self.serve(Echo)
        authority = f"127.0.0.1:{echo.port}"
        tunnels = yield self.openTunnels(proxy.port, authority, 3)

        refused = yield self.ask(proxy.port, connectHead(authority))
        self.assertEqual(refused.status, 503)
        self.assertTrue(refused.field(b"retry-after").isdigit())
        yield self.refusedBody(refused)
        self.assertEqual(len(self.guard.attempts), 3)

        for index, peer in enumerate(tunnels):
            yield self.assertEchoes(peer, b"still open %d" % (index,))

        tunnels[0].tcp.loseConnection()
        events = yield self.proxyEnded(2)
        self.assertEqual([e["status"] for e in events], [503, 200])
        [again] = yield self.openTunnels(proxy.port, authority, 1)
        for peer in [*tunnels[1:], again]:
            peer.tcp.loseConnection()
        yield self.proxyEnded(5)

    @inlineCallbacks
    def test_maxTunnelsPerClient(self) -> Yielding[None]:
        """
        With C{maxTunnelsPerClient=2} and 2 tunnels open from 127.0.0.1, a
        3rd connection from 127.0.0.1 gets a 429 with C{Retry-After}, while
        one from 127.0.0.2 opens a tunnel; all three tunnels echo.
        """
        proxy = self.runProxy(maxTunnelsPerClient=2)
        echo = self.serve(Echo)
        authority = f"127.0.0.1:{echo.port}"
        tunnels = yield self.openTunnels(proxy.port, authority, 2)

        refused = yield self.ask(proxy.port, connectHead(authority))
        self.assertEqual(refused.status, 429)
        self.assertTrue(refused.field(b"retry-after").isdigit())
        yield self.refusedBody(refused)

        [other] = yield self.openTunnels(proxy.port, authority, 1, OTHER_CLIENT)
        for index, peer in enumerate([*tunnels, other]):
            yield self.assertEchoes(peer, b"still open %d" % (index,))
        for peer in [*tunnels, other]:
            peer.tcp.loseConnection()
        events = yield self.proxyEnded(4)
        self.assertEqual(events[0]["status"], 429)
        self.assertEqual(
            sorted(e["client"].partition(":")[0] for e in events[1:]),
            ["127.0.0.1", "127.0.0.1", OTHER_CLIENT],
        )


class PolicyTests(SecurityTestCase):
    """
    The destination policy, over sockets: refused targets are never
    contacted, and a name is reached only at its allowed addresses.
    """

    @inlineCallbacks
    def assertForbidden(
        self, proxy: RunningProxy, authority: str, option: bytes
    ) -> Yielding[bytes]:
        """
        Request a tunnel to C{authority} and check the proxy answers 403 with
        a body naming C{option}.

        @return: Fires with the body.
        """
        answer = yield self.ask(proxy.port, connectHead(authority))
        self.assertEqual(answer.status, 403, answer.head)
        body: bytes = yield self.refusedBody(answer)
        self.assertIn(option, body)
        return body

    @inlineCallbacks
    def test_defaultPolicyRefusesPort(self) -> Yielding[None]:
        """
        With the default policy, C{CONNECT 127.0.0.1:PORT} (a port other than
        443) gets a 403 naming C{--allow-port PORT}, before any name lookup
        or connection attempt.
        """
        proxy = self.runProxy(policy=TunnelPolicy())
        echo = self.serve(Echo)
        body = yield self.assertForbidden(
            proxy, f"127.0.0.1:{echo.port}", b"--allow-port"
        )
        self.assertIn(b"--allow-port %d" % (echo.port,), body)
        self.assertEqual((proxy.resolver.queries, self.guard.attempts), ([], []))
        yield self.assertNeverConnected(echo)
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["status"], event["refusal"]), (403, "port"))

    @inlineCallbacks
    def test_loopbackNeedsAllowTo(self) -> Yielding[None]:
        """
        With any port allowed but no C{--allow-to}, C{CONNECT 127.0.0.1:PORT}
        gets a 403 naming C{--allow-to}, and the echo server never sees a
        connection.
        """
        proxy = self.runProxy(policy=TunnelPolicy.fromStrings(ports=["any"]))
        echo = self.serve(Echo)
        yield self.assertForbidden(proxy, f"127.0.0.1:{echo.port}", b"--allow-to")
        self.assertEqual(self.guard.attempts, [])
        yield self.assertNeverConnected(echo)
        [event] = yield self.proxyEnded(1)
        self.assertEqual((event["status"], event["refusal"]), (403, "address"))

    @inlineCallbacks
    def test_namesForLoopbackRefused(self) -> Yielding[None]:
        """
        With any port allowed but no C{--allow-to}, a rebinding name that
        resolves to 127.0.0.1 and the IPv4-mapped literal
        C{[::ffff:127.0.0.1]} get a 403 naming C{--allow-to}; the odd IPv4
        spellings C{127.1}, C{2130706433} and C{0x7f.0.0.1} are refused with
        a 400 before any lookup (a parent proxy would read them as
        addresses); nothing is ever connected to.
        """
        spellings = ["127.1", "2130706433", "0x7f.0.0.1"]
        proxy = self.runProxy(
            {name: ["127.0.0.1"] for name in ["rebind.test", *spellings]},
            policy=TunnelPolicy.fromStrings(ports=["any"]),
        )
        echo = self.serve(Echo)
        for host in ["rebind.test", "[::ffff:127.0.0.1]"]:
            yield self.assertForbidden(proxy, f"{host}:{echo.port}", b"--allow-to")
        for host in spellings:
            answer = yield self.ask(proxy.port, connectHead(f"{host}:{echo.port}"))
            self.assertEqual(answer.status, 400, answer.head)
        self.assertEqual(proxy.resolver.queries, ["rebind.test"])
        self.assertEqual(self.guard.attempts, [])
        yield self.assertNeverConnected(echo)

    @inlineCallbacks
    def test_mixedNameReachesOnlyAllowedAddress(self) -> Yielding[None]:
        """
        A name that resolves to 10.0.0.5 and 127.0.0.1, with only
        127.0.0.0/8 allowed, is reached at 127.0.0.1, and 10.0.0.5 is never
        even attempted: the proxy connects only to vetted addresses.
        """
        proxy = self.runProxy({"mixed.test": ["10.0.0.5", "127.0.0.1"]})
        echo = self.serve(Echo)
        answer = yield self.ask(proxy.port, connectHead(f"mixed.test:{echo.port}"))
        self.assertEqual(answer.head, ESTABLISHED)
        yield self.assertEchoes(answer.peer, b"mixed")
        self.assertEqual(self.guard.attempts, [("127.0.0.1", echo.port)])
        answer.peer.tcp.loseConnection()
        [event] = yield self.proxyEnded(1)
        self.assertEqual(event["connectedTo"], f"127.0.0.1:{echo.port}")

    @inlineCallbacks
    def test_denyToWinsOverAllowTo(self) -> Yielding[None]:
        """
        A C{--deny-to} rule for 127.0.0.1 wins over C{--allow-to
        127.0.0.0/8}: the CONNECT gets a 403 and nothing is connected to.
        """
        proxy = self.runProxy(
            policy=TunnelPolicy.fromStrings(
                ports=["any"], allowTo=["127.0.0.0/8"], denyTo=["127.0.0.1"]
            )
        )
        echo = self.serve(Echo)
        answer = yield self.ask(proxy.port, connectHead(f"127.0.0.1:{echo.port}"))
        self.assertEqual(answer.status, 403)
        yield self.refusedBody(answer)
        self.assertEqual(self.guard.attempts, [])
        yield self.assertNeverConnected(echo)
