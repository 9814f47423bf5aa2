"""
Proxy authentication: C{Proxy-Authorization: Basic} credentials checked
through a L{twisted.cred} portal, and damping of repeated failures.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from attrs import frozen
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from .pooled import deferToPoolUnlessCancelled

__all__ = [
    "FailureDamper",
    "IProxyUser",
    "PooledChecker",
    "ProxyRealm",
    "ProxyUser",
    "SharedLogins",
    "challengeHeaders",
    "checkRealm",
    "noLogout",
    "parseBasicCredentials",
    "portalFromCheckers",
]


def parseBasicCredentials(value: bytes | None) -> UsernamePassword | None:
    """
    Decode a C{Proxy-Authorization: Basic} field value (RFC 7617).

    @param value: The field value, or L{None} if the field is absent.
    @return: The credentials, or L{None} if there are none or they are
        malformed (another scheme, bad base64, no colon, not UTF-8, control
        characters): all of
        which get the client a 407, never a 5xx.
    """
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
        text = decoded.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    # The user name cannot hold a colon; the password can.
    username, colon, password = text.partition(":")
    if not colon or _C0_OR_C1_CONTROL.search(text):
        # RFC 7617 section 2: neither may hold a control character; a user
        # name that did would reach the operator's log and terminal.
        return None
    return UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))


# C0 and C1 control characters and DEL (Unicode category Cc).
_C0_OR_C1_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def checkRealm(realm: str) -> str:
    """
    Check that C{realm} can be sent in a quoted-string (RFC 9110 section
    5.6.4): no control character but tab, so that no realm can break the
    line of the 407 it is sent in.

    @param realm: The protection realm.
    @return: C{realm}.
    @raise ValueError: If it holds a control character.
    """
    if _C0_OR_C1_CONTROL.search(realm.replace("\t", "")):
        raise ValueError(f"the realm must not hold control characters: {realm!r}")
    return realm


def challengeHeaders(realm: str) -> tuple[tuple[bytes, bytes], ...]:
    """
    The header fields of a 407 answer.

    @param realm: The protection realm shown to users.
    @return: C{Proxy-Authenticate: Basic realm="..."} with UTF-8 declared.
    """
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
    return (
        (
            b"Proxy-Authenticate",
            b'Basic realm="' + quoted.encode("utf-8") + b'", charset="UTF-8"',
        ),
    )


def noLogout() -> None:
    """
    The logout of a L{ProxyRealm} login: nothing to do.
    """


class IProxyUser(Interface):
    """
    An authenticated proxy user; the avatar the portal hands out.  The
    policy is given it (L{tunnel.policy.ITunnelPolicy}), so a realm may put
    there whatever its policy needs.
    """

    name = Attribute(
        """
        The user name, shown in the logs and the access log: a L{str}
        (a realm decodes the C{bytes} avatar ID twisted.cred gives it);
        a login whose avatar has any other name is answered C{500}.
        """
    )


@implementer(IProxyUser)
@frozen
class ProxyUser:
    """
    An authenticated proxy user.

    @ivar name: The user name.
    """

    name: str


@implementer(IRealm)
class ProxyRealm:
    """
    Makes a L{ProxyUser} of each authenticated avatar ID.
    """

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, ProxyUser, Any]:
        """
        Give the L{ProxyUser} named by C{avatarId}.

        @param avatarId: The user name a checker accepted (UTF-8), or
            C{()} for an anonymous login, which gets an empty name.
        @param mind: Unused.
        @param interfaces: The interfaces the avatar may provide; must
            include L{IProxyUser}.
        @return: C{(IProxyUser, avatar, logout)}.
        @raise NotImplementedError: If C{interfaces} lacks L{IProxyUser}.
        """
        if IProxyUser not in interfaces:
            raise NotImplementedError("only IProxyUser avatars are available")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else ""
        return IProxyUser, ProxyUser(name), noLogout


@implementer(ICredentialsChecker)
class PooledChecker:
    """
    A checker that answers at once, on the thread that asks (Twisted's
    C{unix} and C{file:} checkers: C{crypt} of a system password, or a read
    of the whole file, at each login), run in the reactor's thread pool
    instead, so that a flood of logins cannot stall the tunnels, as
    L{tunnel.htpasswd.HtpasswdChecker} runs bcrypt.

    @ivar checker: The checker wrapped.
    @ivar credentialInterfaces: The checker's.
    """

    def __init__(self, checker: ICredentialsChecker, reactor: Any = None) -> None:
        """
        @param checker: A checker whose C{requestAvatarId} gives a Deferred
            that has fired already.
        @param reactor: Whose thread pool runs it; by default the global
            reactor, looked up at the first login (the options that make
            this run before twistd installs its reactor).
        """
        self.checker = checker
        self.credentialInterfaces = checker.credentialInterfaces
        self._reactor = reactor

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        """
        Check C{credentials} in a pool thread.

        @param credentials: What the client sent.
        @return: A Deferred that fires, on the reactor thread, as the
            checker's did.
        """
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        # Withdrawn if the client leaves before a thread takes it.
        return deferToPoolUnlessCancelled(reactor, self._answer, credentials)

    def _answer(self, credentials: Any) -> Any:
        outcome: list[Any] = []
        self.checker.requestAvatarId(credentials).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"{self.checker!r} did not answer at once")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]


def portalFromCheckers(checkers: list[Any]) -> Portal:
    """
    Build a portal over C{checkers} with a L{ProxyRealm}.

    @param checkers: L{twisted.cred.checkers.ICredentialsChecker} providers,
        as C{AuthOptionMixin} collects them.
    @return: The portal.
    """
    return Portal(ProxyRealm(), checkers)


class FailureDamper:
    """
    Count authentication failures per client address, and refuse a client
    for a while after too many, so that the proxy is no password oracle.

    Checks still in flight count as failures until they succeed, so that
    many guesses sent at once cannot slip past the limit; identical
    credentials in flight count once, so a client that opens many tunnels
    at once with the same valid password is not taken for a guesser.  A
    success does not forgive earlier failures (one valid account must not
    buy unlimited guesses at others).

    Memory is bounded: at most C{maxClients} addresses are remembered; the
    oldest is forgotten first.
    """

    def __init__(
        self,
        clock: IReactorTime,
        maxFailures: int = 10,
        window: float = 60.0,
        maxClients: int = 10000,
    ) -> None:
        """
        @param clock: Tells the time.
        @param maxFailures: Failures allowed within C{window} seconds; the
            next attempt is refused until the window passes.
        @param window: The window, in seconds.
        @param maxClients: How many client addresses are remembered.
        """
        self._clock = clock
        self._maxFailures = maxFailures
        self._window = window
        self._maxClients = maxClients
        # address -> (time of the first failure in the window, count)
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()
        # address -> {attempt: how many checks of it are in flight}
        self._checking: dict[str, dict[Hashable, int]] = {}

    def _current(self, client: str) -> tuple[float, int] | None:
        entry = self._failures.get(client)
        if entry is not None and self._clock.seconds() - entry[0] >= self._window:
            del self._failures[client]
            return None
        return entry

    def retryAfter(self, client: str) -> int | None:
        """
        Whether C{client} is refused now.

        @param client: The client address.
        @return: Seconds until it may try again, or L{None} if it may now.
        """
        entry = self._current(client)
        failures = (entry[1] if entry is not None else 0) + len(
            self._checking.get(client, ())
        )
        if failures < self._maxFailures:
            return None
        if entry is None:
            # Refused for checks in flight alone: they end within seconds.
            return 1
        return max(1, int(entry[0] + self._window - self._clock.seconds() + 0.999))

    def checking(self, client: str, attempt: Hashable) -> None:
        """
        Note that a check of C{client}'s credentials started; it counts as a
        failure until L{checked} is called.

        @param client: The client address.
        @param attempt: Names the credentials checked (a digest of them):
            checks of the same credentials in flight at once count as one.
        """
        attempts = self._checking.setdefault(client, {})
        attempts[attempt] = attempts.get(attempt, 0) + 1

    def checked(self, client: str, attempt: Hashable, succeeded: bool) -> None:
        """
        Note that a check started with L{checking} ended.

        @param client: The client address.
        @param attempt: What was given to L{checking}.
        @param succeeded: Whether the credentials were valid; if not, the
            failure is recorded.
        """
        attempts = self._checking[client]
        left = attempts[attempt] - 1
        if left:
            attempts[attempt] = left
        else:
            del attempts[attempt]
            if not attempts:
                del self._checking[client]
        if not succeeded:
            self.failed(client)

    def failed(self, client: str) -> None:
        """
        Record a failure from C{client}.

        @param client: The client address.
        """
        entry = self._current(client)
        if entry is None:
            entry = (self._clock.seconds(), 0)
        self._failures[client] = (entry[0], entry[1] + 1)
        self._failures.move_to_end(client)
        while len(self._failures) > self._maxClients:
            self._failures.popitem(last=False)


class _SharedLogout:
    """
    A realm's logout shared by the connections that joined one login: it
    runs when the last of them logs out.
    """

    __slots__ = ("_logout", "_users")

    def __init__(self, logout: Callable[[], object], users: int) -> None:
        self._logout = logout
        self._users = users

    def __call__(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._logout()


class _PendingLogin:
    """
    A login still running: the Deferreds of the connections waiting for
    its outcome, those of them whose connection is still there, and the
    check's own Deferred while it can be withdrawn.
    """

    __slots__ = ("checking", "present", "waiting")

    def __init__(self) -> None:
        self.waiting: list[Deferred[tuple[Any, IProxyUser, Callable[[], object]]]] = []
        self.present: list[Deferred[Any]] = []
        self.checking: Deferred[Any] | None = None


def _check(portal: Portal, credentials: UsernamePassword) -> Deferred[Any]:
    """
    Ask the portal's checker for C{credentials}, as L{Portal.login} does
    before it asks the realm.
    """
    for interface, checker in portal.checkers.items():
        if interface.providedBy(credentials):
            return maybeDeferred(checker.requestAvatarId, credentials)
    return fail(UnhandledCredentials("No checker for these credentials"))


class SharedLogins:
    """
    Logins through a portal, where a login of the same credentials still
    running is joined rather than started again: the failed-login limit
    counts such checks once, so without this one client could queue any
    number of (costly) checks of one guess.

    A check that every connection waiting for it has left (see L{leave}) is
    withdrawn: cancelled, so one still waiting for a pool thread never
    runs.  Only the check: the realm, once asked, always answers, so that
    an avatar's logout is never lost.

    @ivar pending: The logins running, by attempt.
    """

    def __init__(self) -> None:
        self.pending: dict[bytes, _PendingLogin] = {}

    def login(
        self, portal: Portal, credentials: UsernamePassword, attempt: bytes
    ) -> Deferred[tuple[Any, IProxyUser, Callable[[], object]]]:
        """
        Log in with C{credentials} through C{portal}, or join the login of
        the same C{attempt} still running.  Connections that joined one
        login share its avatar, and the realm's logout runs once, when the
        last of them logs out.

        @param portal: The portal, asked for an L{IProxyUser}.
        @param credentials: What the client sent.
        @param attempt: Names C{credentials} (a digest of them).
        @return: Fires with the portal's login result, or fails with its
            failure (L{twisted.internet.defer.CancelledError} if the check
            was withdrawn).
        """
        result: Deferred[tuple[Any, IProxyUser, Callable[[], object]]] = Deferred()
        pending = self.pending.get(attempt)
        starting = pending is None
        if pending is None:
            pending = self.pending[attempt] = _PendingLogin()
        pending.waiting.append(result)
        pending.present.append(result)
        if not starting:
            return result

        def fire(outcome: Any) -> None:
            del self.pending[attempt]
            waiting = pending.waiting
            if not isinstance(outcome, Failure) and len(waiting) > 1:
                # One login, one avatar, shared: the realm's logout is due
                # when the last connection that shares it ends.
                try:
                    interface, avatar, logout = outcome
                except Exception:
                    outcome = Failure()
                else:
                    outcome = (interface, avatar, _SharedLogout(logout, len(waiting)))
            for waiter in waiting:
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)

        if type(portal) is Portal:
            # The check and the realm apart (as Portal.login joins them), so
            # that only the check can be withdrawn.
            checking = pending.checking = _check(portal, credentials)

            def checked(avatarId: Any) -> Any:
                pending.checking = None
                return portal.realm.requestAvatar(avatarId, None, IProxyUser)

            def notChecked(reason: Failure) -> Failure:
                pending.checking = None
                return reason

            checking.addCallbacks(checked, notChecked).addBoth(fire)
        else:
            # A portal of the application's own: its login, whole.
            portal.login(credentials, None, IProxyUser).addBoth(fire)
        return result

    def leave(self, attempt: bytes, login: Deferred[Any]) -> None:
        """
        A connection waiting for the login of C{attempt} left (its client
        went, or its time ran out): once none is left, the check is
        withdrawn.  The connection still gets the login's outcome.

        @param attempt: What was given to L{login}.
        @param login: What L{login} gave the connection: it leaves only the
            login it waits for, not a later one of the same attempt.
        """
        pending = self.pending.get(attempt)
        if pending is None or login not in pending.present:
            return
        pending.present.remove(login)
        if not pending.present and pending.checking is not None:
            checking, pending.checking = pending.checking, None
            checking.cancel()
