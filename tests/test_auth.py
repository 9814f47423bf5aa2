"""
Tests for L{tunnel.auth} and L{tunnel.htpasswd}.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import DescriptorsExhausted, ManualThreadPool, ThreadPoolReactor
from tunnel import htpasswd
from tunnel.auth import (
    FailureDamper,
    IProxyUser,
    PooledChecker,
    ProxyRealm,
    ProxyUser,
    SharedLogins,
    challengeHeaders,
    checkRealm,
    parseBasicCredentials,
    portalFromCheckers,
)
from tunnel.filestamp import SETTLE
from tunnel.htpasswd import HtpasswdChecker, HtpasswdError, parseHtpasswd


def basic(userPass: bytes, scheme: bytes = b"Basic") -> bytes:
    """
    A C{Proxy-Authorization} value for C{user:password}.
    """
    return scheme + b" " + base64.b64encode(userPass)


def bcryptLine(user: bytes, password: bytes, prefix: bytes = b"$2y$") -> bytes:
    """
    An htpasswd line as C{htpasswd -B} writes it (cheap rounds for speed).
    """
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(4))
    return user + b":" + prefix + hashed[4:] + b"\n"


class BasicCredentialsTests(SynchronousTestCase):
    """
    Tests for L{parseBasicCredentials}.
    """

    def test_valid(self) -> None:
        """
        A Basic value decodes to user name and password; the scheme is
        case-insensitive and the password may hold colons.
        """
        for scheme in [b"Basic", b"basic", b"BASIC"]:
            creds = parseBasicCredentials(basic(b"alice:s3:cr:et", scheme))
            assert creds is not None
            self.assertEqual((creds.username, creds.password), (b"alice", b"s3:cr:et"))

    def test_utf8(self) -> None:
        """
        User names and passwords are UTF-8 (RFC 7617).
        """
        creds = parseBasicCredentials(basic("zoë:pässword".encode()))
        assert creds is not None
        self.assertEqual(creds.username, "zoë".encode())

    def test_malformed(self) -> None:
        """
        Absent, other schemes, bad base64, no colon or non-UTF-8 give
        L{None} (and so a 407), never an exception.
        """
        for value in [
            None,
            b"",
            b"Basic",
            b"Bearer abc",
            b"Digest username=x",
            b"Basic !!!",
            b"Basic YWxpY2U",  # bad padding
            basic(b"no colon"),
            basic(b"\xff\xfe:x"),
        ]:
            self.assertIsNone(parseBasicCredentials(value), value)

    def test_controlCharacters(self) -> None:
        """
        Credentials holding a control character (C0, DEL or C1) are
        malformed (RFC 7617 section 2): they get a 407, and the name never
        reaches the log as a user name.
        """
        for text in [
            "bob\nFORGED:pw",
            "bob\r:pw",
            "\x1b[2Jroot:pw",
            "bob:pass\x00word",
            "bob\x7f:pw",
            "bob\x85:pw",
        ]:
            self.assertIsNone(parseBasicCredentials(basic(text.encode())), text)
        self.assertIsNotNone(parseBasicCredentials(basic(b"with space:p w")))

    def test_checkRealm(self) -> None:
        """
        A realm with a control character (other than tab) is refused, since
        it would break the 407's header line; others pass unchanged.
        """
        for realm in ["corp\r\nX-Injected: 1", "a\nb", "bell\x07", "del\x7f"]:
            self.assertRaises(ValueError, checkRealm, realm)
        for realm in ["Corp", 'my "proxy"', "tab\there", "zoë"]:
            self.assertEqual(checkRealm(realm), realm)

    def test_challenge(self) -> None:
        """
        The challenge names the realm, quoted and escaped.
        """
        self.assertEqual(
            challengeHeaders('my "proxy"'),
            (
                (
                    b"Proxy-Authenticate",
                    b'Basic realm="my \\"proxy\\"", charset="UTF-8"',
                ),
            ),
        )

    def test_onlyBasicScheme(self) -> None:
        """
        Credentials are read only from the C{Basic} scheme: another scheme
        whose token happens to be valid base64 of C{user:password} gives
        L{None}.
        """
        for scheme in [b"Bearer", b"Basicx", b"Digest"]:
            self.assertIsNone(parseBasicCredentials(basic(b"alice:pw", scheme)), scheme)

    def test_strictBase64(self) -> None:
        """
        A token with characters outside the base64 alphabet is malformed,
        even if dropping them would leave valid credentials.
        """
        self.assertIsNotNone(parseBasicCredentials(b"Basic YWxpY2U6cHc="))
        for token in [b"YWxp!Y2U6cHc=", b"YWxpY2U6cHc=\x00", b"YWxp Y2U6cHc="]:
            self.assertIsNone(parseBasicCredentials(b"Basic " + token), token)

    def test_spacesBeforeToken(self) -> None:
        """
        More than one space may separate the scheme from the token (RFC
        9110 section 11.4: C{1*SP}).
        """
        creds = parseBasicCredentials(b"Basic   " + base64.b64encode(b"alice:pw"))
        assert creds is not None
        self.assertEqual((creds.username, creds.password), (b"alice", b"pw"))

    def test_challengeEscapesBackslash(self) -> None:
        """
        A backslash in the realm is escaped too, so that it cannot escape
        the closing quote.
        """
        self.assertEqual(
            challengeHeaders("a\\b\\"),
            (
                (
                    b"Proxy-Authenticate",
                    b'Basic realm="a\\\\b\\\\", charset="UTF-8"',
                ),
            ),
        )


class RealmTests(SynchronousTestCase):
    """
    Tests for L{ProxyRealm} and L{portalFromCheckers}.
    """

    def test_avatar(self) -> None:
        """
        The realm makes a L{ProxyUser} named after the avatar ID.
        """
        interface, avatar, logout = ProxyRealm().requestAvatar(
            "zoë".encode(), None, IProxyUser
        )
        self.assertIs(interface, IProxyUser)
        self.assertEqual(avatar, ProxyUser("zoë"))
        logout()

    def test_otherInterface(self) -> None:
        """
        Only L{IProxyUser} avatars exist.
        """
        self.assertRaises(
            NotImplementedError,
            ProxyRealm().requestAvatar,
            b"a",
            None,
            IUsernamePassword,
        )

    def test_portal(self) -> None:
        """
        A portal over an in-memory checker logs users in as L{ProxyUser}.
        """
        from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
        portal = portalFromCheckers([checker])
        result = self.successResultOf(
            portal.login(UsernamePassword(b"alice", b"pw"), None, IProxyUser)
        )
        self.assertEqual(result[1], ProxyUser("alice"))
        self.failureResultOf(
            portal.login(UsernamePassword(b"alice", b"no"), None, IProxyUser),
            UnauthorizedLogin,
        )


class FailureDamperTests(SynchronousTestCase):
    """
    Tests for L{FailureDamper}.
    """

    def test_damping(self) -> None:
        """
        After C{maxFailures} failures within the window a client is refused
        until the window passes; others are not affected.
        """
        clock = Clock()
        damper = FailureDamper(clock, maxFailures=3, window=60)
        for _ in range(3):
            self.assertIsNone(damper.retryAfter("a"))
            damper.failed("a")
        self.assertEqual(damper.retryAfter("a"), 60)
        self.assertIsNone(damper.retryAfter("b"))
        clock.advance(59.5)
        self.assertEqual(damper.retryAfter("a"), 1)
        clock.advance(0.5)
        self.assertIsNone(damper.retryAfter("a"))

    def test_successForgivesNothing(self) -> None:
        """
        A successful login does not forgive the address's failures: one
        valid account must not buy unlimited guesses at other users.
        """
        damper = FailureDamper(Clock(), maxFailures=2)
        damper.failed("a")
        damper.checking("a", b"x")
        damper.checked("a", b"x", succeeded=True)
        damper.failed("a")
        self.assertIsNotNone(damper.retryAfter("a"))

    def test_checksInFlight(self) -> None:
        """
        Checks still running count against the limit, so guesses sent all
        at once are refused too; each failed check is then recorded.
        """
        damper = FailureDamper(Clock(), maxFailures=3, window=60)
        for guess in [b"1", b"2", b"3"]:
            self.assertIsNone(damper.retryAfter("a"))
            damper.checking("a", guess)
        self.assertEqual(damper.retryAfter("a"), 1)
        for guess in [b"1", b"2", b"3"]:
            damper.checked("a", guess, succeeded=False)
        self.assertEqual(damper.retryAfter("a"), 60)
        self.assertEqual(damper._checking, {})

    def test_sameCredentialsInFlightCountOnce(self) -> None:
        """
        Many checks of the same credentials in flight at once (a client
        opening many tunnels with one password) count as one, so they do
        not get the client refused; each failed one is still recorded.
        """
        damper = FailureDamper(Clock(), maxFailures=3, window=60)
        for _ in range(16):
            self.assertIsNone(damper.retryAfter("a"))
            damper.checking("a", b"same")
        damper.checking("a", b"other")
        self.assertIsNone(damper.retryAfter("a"))
        for _ in range(16):
            damper.checked("a", b"same", succeeded=True)
        damper.checked("a", b"other", succeeded=False)
        self.assertIsNone(damper.retryAfter("a"))
        self.assertEqual(damper._checking, {})

    def test_bounded(self) -> None:
        """
        Only C{maxClients} addresses are remembered; the oldest go first.
        """
        damper = FailureDamper(Clock(), maxFailures=1, maxClients=2)
        for client in ["a", "b", "c"]:
            damper.failed(client)
        self.assertIsNone(damper.retryAfter("a"))
        self.assertIsNotNone(damper.retryAfter("b"))
        self.assertIsNotNone(damper.retryAfter("c"))

    def test_defaults(self) -> None:
        """
        By default a client may fail 10 times a minute, and 10000 clients
        are remembered.
        """
        clock = Clock()
        damper = FailureDamper(clock)
        for _ in range(10):
            self.assertIsNone(damper.retryAfter("a"))
            damper.failed("a")
        self.assertEqual(damper.retryAfter("a"), 60)
        clock.advance(60)
        self.assertIsNone(damper.retryAfter("a"))
        remembered = FailureDamper(clock, maxFailures=1)
        for client in range(10001):
            remembered.failed(str(client))
        self.assertIsNone(remembered.retryAfter("0"))
        self.assertEqual(remembered.retryAfter("1"), 60)

    def test_windowStartsAtFirstFailure(self) -> None:
        """
        The window runs from the first failure, whatever the clock read
        when the damper was made.
        """
        clock = Clock()
        clock.advance(1_000_000)
        damper = FailureDamper(clock, maxFailures=2, window=60)
        damper.failed("a")
        clock.advance(30)
        damper.failed("a")
        self.assertEqual(damper.retryAfter("a"), 30)
        clock.advance(29)
        self.assertEqual(damper.retryAfter("a"), 1)
        clock.advance(1)
        self.assertIsNone(damper.retryAfter("a"))

    def test_retryAfterRoundsUp(self) -> None:
        """
        The seconds to wait are rounded up, and never 0 while the client is
        refused: a client that waits as long as it is told is not refused
        again.
        """
        clock = Clock()
        damper = FailureDamper(clock, maxFailures=1, window=60)
        damper.failed("a")
        clock.advance(29.5)
        self.assertEqual(damper.retryAfter("a"), 31)
        clock.advance(30.4995)
        self.assertEqual(damper.retryAfter("a"), 1)

    def test_repeatedFailuresKeepClientRemembered(self) -> None:
        """
        When addresses must be forgotten, the one whose last failure is the
        oldest goes first: a client that keeps failing stays refused.
        """
        damper = FailureDamper(Clock(), maxFailures=1, maxClients=2)
        damper.failed("a")
        damper.failed("b")
        damper.failed("a")
        damper.failed("c")
        self.assertIsNotNone(damper.retryAfter("a"))
        self.assertIsNone(damper.retryAfter("b"))
        self.assertIsNotNone(damper.retryAfter("c"))


class ParseHtpasswdTests(SynchronousTestCase):
    """
    Tests for L{parseHtpasswd}.
    """

    def test_bcrypt(self) -> None:
        """
        C{$2y$}, C{$2b$} and C{$2a$} entries are read; blank lines and
        comments are skipped.
        """
        content = (
            b"# users\n\n"
            + bcryptLine(b"alice", b"a", b"$2y$")
            + bcryptLine(b"bob", b"b", b"$2b$")
            + bcryptLine(b"carol", b"c", b"$2a$")
        )
        self.assertEqual(sorted(parseHtpasswd(content)), [b"alice", b"bob", b"carol"])

    def test_otherFormats(self) -> None:
        """
        Other formats are refused with the file, the line number and the
        reason.
        """
        for line in [
            b"alice:$apr1$abc$defghijklmnopqrstuvw",
            b"alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            b"alice:abJnggxhB/yAY",
            b"alice:plaintext",
            b"no-colon",
            b":$2y$" + b"x" * 56,
        ]:
            e = self.assertRaises(
                HtpasswdError, parseHtpasswd, b"# c\n" + line + b"\n", "users.htpasswd"
            )
            self.assertIn("users.htpasswd:2: ", str(e))

    def test_brokenBcrypt(self) -> None:
        """
        An entry with a bcrypt prefix but not a whole bcrypt hash (cut
        short, edited by hand, a cost outside 4-31) stops loading, rather
        than failing each login of that user with a 500.
        """
        good = bcryptLine(b"carol", b"c").rstrip(b"\n").partition(b":")[2]
        for hashed in [
            b"$2b$04$" + b"!" * 53,
            good[:-1],
            good + b"x",
            b"$2b$03$" + good[7:],
            b"$2b$99$" + good[7:],
            b"$2b$4$" + good[7:] + b"x",
        ]:
            e = self.assertRaises(
                HtpasswdError, parseHtpasswd, b"carol:" + hashed + b"\n", "users"
            )
            self.assertIn("users:1: ", str(e))
            self.assertIn("carol", str(e))

    def test_duplicate(self) -> None:
        """
        A user listed twice is an error.
        """
        content = bcryptLine(b"a", b"1") + bcryptLine(b"a", b"2")
        e = self.assertRaises(HtpasswdError, parseHtpasswd, content)
        self.assertIn(":2: ", str(e))

    def test_emptyUserName(self) -> None:
        """
        A line with a valid hash but no user name is refused: nobody logs in
        with an empty name.
        """
        hashed = bcryptLine(b"x", b"pw").partition(b":")[2]
        e = self.assertRaises(HtpasswdError, parseHtpasswd, b":" + hashed, "users")
        self.assertIn("users:1: not a 'user:hash' line", str(e))

    def test_unusableBcryptVariants(self) -> None:
        """
        Hashes the bcrypt library cannot check (the C{$2x$} variant, a cost
        above 31) stop loading, rather than fail each login with a 500.
        """
        good = bcryptLine(b"carol", b"c").rstrip(b"\n").partition(b":")[2]
        for hashed in [
            b"$2x$" + good[4:],
            b"$2b$32$" + good[7:],
            b"$2b$39$" + good[7:],
        ]:
            e = self.assertRaises(HtpasswdError, parseHtpasswd, b"carol:" + hashed)
            self.assertIn("carol", str(e))

    def test_lineLayout(self) -> None:
        """
        Spaces around a line are ignored; a user name cannot hold a colon
        (the first colon ends it), so a line with two is refused.
        """
        line = bcryptLine(b"alice", b"a").rstrip(b"\n")
        self.assertEqual(list(parseHtpasswd(b"  " + line + b" \t\n")), [b"alice"])
        self.assertRaises(HtpasswdError, parseHtpasswd, b"a:" + line)


class HtpasswdCheckerTests(SynchronousTestCase):
    """
    Tests for L{HtpasswdChecker}.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write(bcryptLine(b"alice", b"s3:cret") + bcryptLine(b"bob", b"pw"))
        self.reactor = ThreadPoolReactor()
        self.checker = HtpasswdChecker(self.path, reactor=self.reactor, cacheSize=2)
        # A failed check waits out the time a failure takes: not in tests.
        self.patch(self.checker, "_sleep", lambda seconds: None)
        self.patch(self.checker, "_now", lambda: self.now)

    def write(self, content: bytes) -> None:
        """
        Replace the file, making sure its modification stamp changes, and
        let the checker's clock read the moment the file has stayed
        unchanged long enough to be read (L{SETTLE} later).
        """
        with open(self.path, "wb") as f:
            f.write(content)
        stamp = os.stat(self.path).st_mtime_ns + 10**9
        os.utime(self.path, ns=(stamp, stamp))
        self.changed = os.stat(self.path).st_ctime_ns / 1e9
        self.now = self.changed + SETTLE

    def check(self, user: bytes, password: bytes) -> object:
        """
        Check credentials; give the avatar ID or the failure.
        """
        d = self.checker.requestAvatarId(UsernamePassword(user, password))
        results: list[object] = []
        d.addBoth(results.append)
        [result] = results
        return result

    def test_cancelledBeforeItRuns(self) -> None:
        """
        A check cancelled while it waits for a thread (its client left)
        never runs bcrypt.
        """
        pool = ManualThreadPool()
        self.patch(self.reactor, "getThreadPool", lambda: pool)
        checked: list[bytes] = []
        self.patch(bcrypt, "checkpw", lambda p, h: checked.append(p))
        checking = self.checker.requestAvatarId(UsernamePassword(b"alice", b"x"))
        checking.cancel()
        pool.runNext()
        self.failureResultOf(checking, CancelledError)
        self.assertEqual(checked, [])

    def test_failuresTakeAsLong(self) -> None:
        """
        Every failed check takes at least as long as checking the file's
        costliest entry: a wrong password for a cheap entry waits out the
        rest, so that it answers no faster than an unknown user; a
        successful check does not wait.
        """
        now = [100.0]
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(round(seconds, 6))

        def monotonic() -> float:
            # Each bcrypt check takes 0.025 s on this clock (read before and
            # after it).
            now[0] += 0.025
            return now[0]

        self.patch(self.checker, "_monotonic", monotonic)
        self.patch(self.checker, "_sleep", sleep)
        self.checker._failureTime = 0.2
        self.check(b"alice", b"s3:cret")
        self.assertEqual(slept, [])
        self.check(b"alice", b"wrong")
        self.check(b"nobody", b"wrong")
        self.assertEqual(slept, [0.175, 0.175])

    def test_valid(self) -> None:
        """
        The right password gives the user name, verified in the thread pool.
        """
        self.assertEqual(self.check(b"alice", b"s3:cret"), b"alice")
        self.assertEqual(self.reactor.pool.calls, 1)

    def test_wrong(self) -> None:
        """
        A wrong password or an unknown user fails with L{UnauthorizedLogin};
        the unknown user still costs a bcrypt check, so timing tells nothing.
        """
        for user, password in [(b"alice", b"nope"), (b"mallory", b"pw")]:
            result = self.check(user, password)
            self.assertTrue(getattr(result, "check", lambda e: None)(UnauthorizedLogin))
        self.assertEqual(self.reactor.pool.calls, 2)

    def test_longPassword(self) -> None:
        """
        Passwords longer than bcrypt's 72 bytes are checked on their first
        72 bytes, as Apache's htpasswd hashed them, instead of failing.
        """
        password = b"p" * 80
        self.write(bcryptLine(b"long", password[:72]))
        self.assertEqual(self.check(b"long", password), b"long")

    def test_cache(self) -> None:
        """
        A repeated successful check is answered from the bounded cache,
        without bcrypt; a wrong password is never cached.
        """
        self.check(b"alice", b"s3:cret")
        self.check(b"alice", b"s3:cret")
        self.assertEqual(self.reactor.pool.calls, 1)
        self.check(b"alice", b"wrong")
        self.check(b"alice", b"wrong")
        self.assertEqual(self.reactor.pool.calls, 3)
        self.check(b"bob", b"pw")
        self.check(b"bob", b"pw")
        self.assertEqual(self.reactor.pool.calls, 4)

    def test_cacheBounded(self) -> None:
        """
        The cache keeps only C{cacheSize} entries.
        """
        self.write(b"".join(bcryptLine(b"u%d" % i, b"pw") for i in range(3)))
        for i in range(3):
            self.check(b"u%d" % i, b"pw")
        self.assertEqual(len(self.checker._cache), 2)

    def test_reload(self) -> None:
        """
        Users added to or removed from the file take effect without a
        restart; cached verifications of removed users are forgotten.
        """
        self.assertEqual(self.check(b"bob", b"pw"), b"bob")
        self.write(bcryptLine(b"carol", b"c"))
        self.assertEqual(self.check(b"carol", b"c"), b"carol")
        self.assertNotEqual(self.check(b"bob", b"pw"), b"bob")

    def test_reloadKeepsCache(self) -> None:
        """
        A reload keeps the cached verifications of the users it leaves as
        they were (their logins need no bcrypt after an edit of others),
        not those of a user whose password changed, nor of one removed.
        """
        alice = bcryptLine(b"alice", b"s3:cret")
        self.write(alice + bcryptLine(b"bob", b"pw"))
        self.check(b"alice", b"s3:cret")
        self.check(b"bob", b"pw")
        calls = self.reactor.pool.calls
        self.write(alice + bcryptLine(b"bob", b"new") + bcryptLine(b"carol", b"c"))
        self.assertEqual(self.check(b"alice", b"s3:cret"), b"alice")
        self.assertNotEqual(self.check(b"bob", b"pw"), b"bob")
        self.assertEqual(self.reactor.pool.calls, calls + 2)  # bob, the dummy's
        self.write(bcryptLine(b"carol", b"c"))
        self.assertNotEqual(self.check(b"alice", b"s3:cret"), b"alice")

    def test_fileBeingWrittenWaits(self) -> None:
        """
        A file that changed less than L{SETTLE} seconds ago may be half
        written (a rewrite in place empties it first): the users stay as
        they were until a check after it has stayed unchanged that long.
        """
        self.write(bcryptLine(b"carol", b"c"))
        self.now = self.changed + SETTLE / 2
        self.assertNotEqual(self.check(b"carol", b"c"), b"carol")
        self.assertEqual(self.check(b"bob", b"pw"), b"bob")
        self.now = self.changed + SETTLE
        self.assertEqual(self.check(b"carol", b"c"), b"carol")
        self.assertNotEqual(self.check(b"bob", b"pw"), b"bob")

    def test_unreadableFileReadAgain(self) -> None:
        """
        A changed file that cannot be read (no descriptor left, say) keeps
        the users, logs why once however many checks fail, and is read at
        the next check after: a user removed meanwhile is not kept.
        """
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        self.write(bcryptLine(b"alice", b"s3:cret"))
        exhausted = DescriptorsExhausted(self)
        self.assertEqual(self.check(b"bob", b"pw"), b"bob")
        self.assertEqual(self.check(b"bob", b"pw"), b"bob")
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("Too many open files", errors[0]["error"])
        exhausted.on = False
        self.assertNotEqual(self.check(b"bob", b"pw"), b"bob")
        self.assertEqual(self.check(b"alice", b"s3:cret"), b"alice")

    def test_fallbackForBrokenFile(self) -> None:
        """
        With a fallback (a C{--workers} supervisor's last good copy), a file
        that does not parse at start-up gives the fallback's users, a
        warning says why, and the file is read again once it changes.
        """
        self.write(b"alice:plaintext\n")
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        bob = bcryptLine(b"bob", b"pw")
        # The file has settled by the checker's clock: not being written.
        self.patch(HtpasswdChecker, "_now", staticmethod(lambda: self.now))
        self.checker = HtpasswdChecker(self.path, reactor=self.reactor, fallback=bob)
        self.patch(self.checker, "_sleep", lambda seconds: None)
        self.assertEqual(self.check(b"bob", b"pw"), b"bob")
        self.assertNotEqual(self.check(b"alice", b"plaintext"), b"alice")
        [warning] = events
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertIn(f"{self.path}:1: ", warning["error"])
        self.assertEqual(self.checker.content, bob)
        carol = bcryptLine(b"carol", b"c")
        self.write(carol)
        self.assertEqual(self.check(b"carol", b"c"), b"carol")
        self.assertNotEqual(self.check(b"bob", b"pw"), b"bob")
        self.assertEqual(self.checker.content, carol)

    def test_fallbackForUnreadableFile(self) -> None:
        """
        A file that cannot be read at start-up, with a fallback, gives the
        fallback's users, and is read at the next check even though it has
        not changed.
        """

        exhausted = DescriptorsExhausted(self)
        self.patch(HtpasswdChecker, "_now", staticmethod(lambda: self.now))
        self.checker = HtpasswdChecker(
            self.path, reactor=self.reactor, fallback=bcryptLine(b"carol", b"c")
        )
        self.patch(self.checker, "_sleep", lambda seconds: None)
        self.patch(self.checker, "_now", lambda: self.now)
        self.assertEqual(self.check(b"carol", b"c"), b"carol")
        exhausted.on = False
        self.assertEqual(self.check(b"bob", b"pw"), b"bob")
        self.assertNotEqual(self.check(b"carol", b"c"), b"carol")

    def test_fallbackWhileBeingWritten(self) -> None:
        """
        With a fallback, a file that changed less than L{SETTLE} seconds ago
        (perhaps half written) is not read at start-up: the fallback's users
        serve, a warning says why, and the file is read once it settled.
        """
        self.write(bcryptLine(b"carol", b"c"))
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        self.now = self.changed + SETTLE / 2
        self.patch(HtpasswdChecker, "_now", staticmethod(lambda: self.now))
        bob = bcryptLine(b"bob", b"pw")
        self.checker = HtpasswdChecker(self.path, reactor=self.reactor, fallback=bob)
        self.patch(self.checker, "_sleep", lambda seconds: None)
        self.assertEqual(self.check(b"bob", b"pw"), b"bob")
        [warning] = events
        self.assertIn("is being written", formatEvent(warning))
        self.now = self.changed + SETTLE
        self.assertEqual(self.check(b"carol", b"c"), b"carol")
        self.assertNotEqual(self.check(b"bob", b"pw"), b"bob")

    def test_contentOfLastGoodUsers(self) -> None:
        """
        C{content} is what the users in force were read from: it follows a
        good change, not a broken one.
        """
        good = bcryptLine(b"carol", b"c")
        self.write(good)
        self.checker.refresh()
        self.assertEqual(self.checker.content, good)
        self.write(b"alice:plaintext\n")
        self.checker.refresh()
        self.assertEqual(self.checker.content, good)

    def test_badReloadKeepsUsers(self) -> None:
        """
        A file broken by an edit keeps the last good users, and the error is
        logged.
        """
        events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )
        self.write(b"alice:plaintext\n")
        self.assertEqual(self.check(b"alice", b"s3:cret"), b"alice")
        [event] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn(f"{self.path}:1: ", event["error"])

    def test_startupErrors(self) -> None:
        """
        A missing or malformed file is an error at start-up.
        """
        self.assertRaises(HtpasswdError, HtpasswdChecker, self.path + ".missing")
        self.write(b"alice:{SHA}xyz\n")
        e = self.assertRaises(HtpasswdError, HtpasswdChecker, self.path)
        self.assertIn(f"{self.path}:1: ", str(e))

    def test_unknownUserWithDummyPassword(self) -> None:
        """
        An unknown user is checked against a dummy hash for the timing only:
        even the dummy hash's own password does not log anyone in.
        """
        for user in [b"nobody", b""]:
            result = self.check(user, b"tunnel-dummy-password")
            self.assertTrue(
                getattr(result, "check", lambda e: None)(UnauthorizedLogin), result
            )

    def test_dummyHashAsCostlyAsEntries(self) -> None:
        """
        The dummy hash that unknown users are checked against costs as much
        as the file's costliest entry (at least 4, the least bcrypt allows;
        10 for a file without entries), capped at 13 since it is made on the
        reactor thread.
        """
        rounds: list[int] = []
        gensalt = bcrypt.gensalt

        def recordingGensalt(cost: int = 12, prefix: bytes = b"2b") -> bytes:
            rounds.append(cost)
            return gensalt(4, prefix)

        self.patch(bcrypt, "gensalt", recordingGensalt)
        cheap = bcryptLine(b"a", b"pw").rstrip(b"\n")
        for costs, expected in [
            ([b"05", b"07", b"06"], 7),
            ([b"04"], 4),
            ([b"12", b"14"], 13),
            ([], 10),
        ]:
            self.write(
                b"".join(
                    b"u%d:%s%s%s\n" % (i, cheap[2:6], cost, cheap[8:])
                    for i, cost in enumerate(costs)
                )
            )
            del rounds[:]
            HtpasswdChecker(self.path, reactor=self.reactor)
            self.assertEqual(rounds, [expected], costs)

    def test_failureTimeFromCosts(self) -> None:
        """
        The least time a failure takes is what checking the file's costliest
        entry takes: the dummy hash's making, timed, for a file whose
        entries cost 13 at most; for costlier entries, that time doubled
        for each step above 13, as bcrypt's work is.
        """
        cheap = bcryptLine(b"a", b"pw").rstrip(b"\n")
        gensalt = bcrypt.gensalt
        self.patch(bcrypt, "gensalt", lambda cost=12, prefix=b"2b": gensalt(4, prefix))
        for costs, expected in [
            ([b"05"], 0.25),
            ([b"13"], 0.25),
            ([b"12", b"15"], 1.0),
        ]:
            entries = {
                b"u%d" % i: cheap[:4] + cost + cheap[6:] for i, cost in enumerate(costs)
            }
            _, floor = htpasswd._dummyHash(entries, iter([10.0, 10.25]).__next__)
            self.assertEqual(floor, expected, costs)

    def test_reloadSetsFailureTime(self) -> None:
        """
        A reload sets the least time a failure takes to its own dummy's:
        higher or lower than before, not the highest yet.
        """
        self.checker._failureTime = 0.2
        for password, dummyTime, expected in [
            (b"first", 0.9, 0.9),
            (b"the second password", 0.1, 0.1),
        ]:
            self.patch(htpasswd, "_dummyHash", lambda entries, t=dummyTime: (b"x", t))
            self.write(bcryptLine(b"alice", password))
            self.assertEqual(self.check(b"alice", password), b"alice")
            self.assertEqual(self.checker._failureTime, expected)

    def test_reloadMakesDummyInThePool(self) -> None:
        """
        A reload makes its dummy hash in the thread pool, not on the reactor
        thread: the previous one serves until it is made, and one made for
        users a later reload replaced is not used.
        """
        jobs: list[
            tuple[Callable[..., object], Callable[..., object], tuple[object, ...]]
        ] = []
        self.patch(
            self.reactor.pool,
            "callInThreadWithCallback",
            lambda onResult, f, *a, **k: jobs.append((onResult, f, a)),
        )
        self.patch(htpasswd, "_dummyHash", lambda entries: (b"new", 0.0))
        before = self.checker._dummy
        self.write(bcryptLine(b"carol", b"c"))
        self.checker.refresh()
        self.assertIs(self.checker._dummy, before)
        self.write(bcryptLine(b"dave", b"d"))
        self.checker.refresh()
        [(onFirst, _, _), (onSecond, makeDummy, arguments)] = jobs
        onFirst(True, (b"superseded", 0.0))
        self.assertIs(self.checker._dummy, before)
        onSecond(True, makeDummy(*arguments))
        self.assertEqual(self.checker._dummy, b"new")

    def test_dummyNotMadeKeepsPrevious(self) -> None:
        """
        A reload whose dummy hash cannot be handed to the thread pool (a
        pool stopped for shutdown) keeps the previous one and logs why; the
        reload itself goes through.
        """

        def stopped(*args: object, **kwargs: object) -> None:
            raise RuntimeError("the pool is stopped")

        self.patch(self.reactor.pool, "callInThreadWithCallback", stopped)
        before = self.checker._dummy
        carol = bcryptLine(b"carol", b"c")
        self.write(carol)
        self.checker.refresh()
        self.assertEqual(self.checker.content, carol)
        self.assertIs(self.checker._dummy, before)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_slowFailuresLeaveTheFloor(self) -> None:
        """
        A failure that takes longer than the floor (on a busy machine, with
        the pool's threads sharing two cores, a check can take many times
        its time) neither waits nor raises the floor: raised by what each
        took, it would ratchet up under load, and every later failure
        would hold a pool thread seconds long.
        """
        slept: list[float] = []
        self.patch(self.checker, "_sleep", slept.append)
        self.checker._failureTime = 0.25
        for spent in [0.3, 0.375, 4.7]:
            ticks = iter([0.0, spent])
            self.patch(self.checker, "_monotonic", lambda t=ticks: next(t))
            self.check(b"alice", b"wrong")
            self.assertEqual(self.checker._failureTime, 0.25)
        self.assertEqual(slept, [])

    def test_cacheKeepsRecentlyUsed(self) -> None:
        """
        When the cache is full, the verification used longest ago is
        forgotten, not one just used.
        """
        self.write(
            bcryptLine(b"alice", b"a")
            + bcryptLine(b"bob", b"b")
            + bcryptLine(b"carol", b"c")
        )
        self.check(b"alice", b"a")
        self.check(b"bob", b"b")
        self.check(b"alice", b"a")
        self.check(b"carol", b"c")
        calls = self.reactor.pool.calls
        self.assertEqual(self.check(b"alice", b"a"), b"alice")
        self.assertEqual(self.check(b"carol", b"c"), b"carol")
        self.assertEqual(self.reactor.pool.calls, calls)
        self.check(b"bob", b"b")
        self.assertEqual(self.reactor.pool.calls, calls + 1)


class SharedLoginsTests(SynchronousTestCase):
    """
    Tests for L{SharedLogins}: leaving a login, and withdrawing its check.
    """

    def setUp(self) -> None:
        from tests.test_server import PendingChecker, RecordingRealm

        self.checker = PendingChecker()
        self.realm = RecordingRealm()
        self.portal = Portal(self.realm, [self.checker])
        self.logins = SharedLogins()
        self.credentials = UsernamePassword(b"alice", b"pw")

    def login(self) -> Deferred[Any]:
        """
        Log in (or join the login) with the test's credentials.
        """
        return self.logins.login(self.portal, self.credentials, b"attempt")

    def test_lastToLeaveWithdraws(self) -> None:
        """
        The check goes on while a connection waits for it, and is cancelled
        once the last has left; every connection, gone or not, gets the
        outcome, L{CancelledError}, and the realm is never asked.
        """
        first, second = self.login(), self.login()
        self.assertEqual(len(self.checker.pending), 1)
        self.logins.leave(b"attempt", first)
        self.assertNoResult(first)
        self.logins.leave(b"attempt", second)
        self.failureResultOf(first, CancelledError)
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.logins.pending, {})
        self.assertEqual(self.realm.events, [])
        self.logins.leave(b"attempt", first)

    def test_leaversGetTheOutcome(self) -> None:
        """
        A connection that left a check others still wait for gets its
        outcome all the same, to count it and to log out its share.
        """
        first, second = self.login(), self.login()
        self.logins.leave(b"attempt", first)
        self.checker.pending[0].callback(b"alice")
        for waiter in (first, second):
            _, avatar, logout = self.successResultOf(waiter)
            self.assertEqual(avatar.name, "alice")
            logout()
        self.assertEqual(self.realm.events, ["login alice", "logout alice"])

    def test_leavesOnlyItsOwnLogin(self) -> None:
        """
        A connection leaves the login it waits for, never a later one of
        the same credentials (started while the first was handing out its
        answer, before this connection got it).
        """
        first, second = self.login(), self.login()
        later: list[Deferred[Any]] = []

        def firstAnswered(result: Any) -> Any:
            later.append(self.login())
            self.logins.leave(b"attempt", second)
            return result

        first.addBoth(firstAnswered)
        self.checker.pending[0].errback(UnauthorizedLogin())
        self.failureResultOf(first, UnauthorizedLogin)
        self.failureResultOf(second, UnauthorizedLogin)
        self.assertNoResult(later[0])
        self.assertNoResult(self.checker.pending[1])

    def test_ownPortalWhole(self) -> None:
        """
        A portal of the application's own (a subclass) logs in by its own
        C{login}, whole: leaving withdraws nothing, and its answer comes.
        """
        asked: list[object] = []

        class OwnPortal(Portal):
            def login(self, credentials: Any, mind: object, *interfaces: Any) -> Any:
                asked.append(credentials)
                return super().login(credentials, mind, *interfaces)

        self.portal = OwnPortal(self.realm, [self.checker])
        only = self.login()
        self.logins.leave(b"attempt", only)
        self.checker.pending[0].callback(b"alice")
        self.successResultOf(only)
        self.assertEqual(asked, [self.credentials])

    def test_realmNeverWithdrawn(self) -> None:
        """
        Once the check has passed, leaving withdraws nothing: a realm that
        answers later is not cancelled, so its logout is not lost.
        """
        answer: Deferred[Any] = Deferred()
        self.patch(self.realm, "requestAvatar", lambda *args: answer)
        only = self.login()
        self.checker.pending[0].callback(b"alice")
        self.logins.leave(b"attempt", only)
        self.assertNoResult(only)
        answer.callback((IProxyUser, None, lambda: None))
        self.successResultOf(only)


class PooledCheckerTests(SynchronousTestCase):
    """
    Tests for L{PooledChecker}: Twisted's checkers that answer at once
    (C{unix}, C{file:}), run in the thread pool.
    """

    def setUp(self) -> None:
        self.reactor = ThreadPoolReactor()
        users = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
        self.checker = PooledChecker(users, reactor=self.reactor)

    def test_inThePool(self) -> None:
        """
        A check runs in the pool, and its answer, a user name or a
        failure, is the checker's.
        """
        self.assertEqual(
            self.successResultOf(
                self.checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))
            ),
            b"alice",
        )
        self.failureResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"alice", b"no")),
            UnauthorizedLogin,
        )
        self.assertEqual(self.reactor.pool.calls, 2)
        self.assertIn(IUsernamePassword, self.checker.credentialInterfaces)

    def test_cancelledBeforeItRuns(self) -> None:
        """
        A check cancelled while it waits for a thread (its client left)
        never runs.
        """
        asked: list[object] = []

        class Recording:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                asked.append(credentials)
                return Deferred()

        pool = ManualThreadPool()
        self.patch(self.reactor, "getThreadPool", lambda: pool)
        checker = PooledChecker(Recording(), reactor=self.reactor)  # type: ignore[arg-type]
        checking = checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))
        checking.cancel()
        pool.runNext()
        self.failureResultOf(checking, CancelledError)
        self.assertEqual(asked, [])

    def test_lateAnswerIsAnError(self) -> None:
        """
        A checker whose Deferred has not fired when it returns (not one this
        is meant for) fails the login rather than leave it waiting.
        """

        class Late:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                return Deferred()

        checker = PooledChecker(Late(), reactor=self.reactor)  # type: ignore[arg-type]
        failure = self.failureResultOf(
            checker.requestAvatarId(UsernamePassword(b"alice", b"pw")), RuntimeError
        )
        self.assertIn("did not answer at once", str(failure.value))

    def test_wrapsUnixAndFile(self) -> None:
        """
        C{--auth unix} and C{--auth file:PATH} are run in the pool; other
        checkers (C{memory:}, answering from a dict) are not wrapped.
        """
        from twisted.cred.checkers import FilePasswordDB
        from twisted.plugins.cred_unix import UNIXChecker

        from tunnel.tap import Options

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("bob:pw\n")
        options = Options()
        options.parseOptions(
            [
                # Not the default listener: the start-up check would try to
                # bind 127.0.0.1:8080.
                *("--listen", "tcp:0:interface=127.0.0.1"),
                *("--auth", "unix", "--auth", f"file:{path}"),
                *("--auth", "memory:carol:pw"),
            ]
        )
        unix, logins, memory = options["credCheckers"]
        self.assertIsInstance(unix, PooledChecker)
        self.assertIsInstance(unix.checker, UNIXChecker)
        self.assertIsInstance(logins, PooledChecker)
        self.assertIsInstance(logins.checker, FilePasswordDB)
        self.assertIsInstance(memory, InMemoryUsernamePasswordDatabaseDontUse)
