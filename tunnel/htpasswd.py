"""
A credentials checker for Apache htpasswd files with bcrypt entries.

bcrypt is slow on purpose (tens of milliseconds a check), so verification
runs in the reactor's thread pool, never on the reactor thread, and recent
successful verifications are cached (bounded) so that a busy user does not
pay for each tunnel.  The file is re-read when it changes.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from .filestamp import WatchedFile
from .pooled import deferToPoolUnlessCancelled

__all__ = ["HtpasswdChecker", "HtpasswdError", "parseHtpasswd"]

# The whole modular-crypt form, so that a truncated or hand-edited hash
# stops start-up here instead of failing (with a 500) at each login.
_BCRYPT = re.compile(rb"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")


def _dummyHash(
    entries: dict[bytes, bytes], monotonic: Callable[[], float] = time.monotonic
) -> tuple[bytes, float]:
    """
    A hash to check unknown users against, as costly as the file's most
    costly entry, so that a missing user takes as long as a wrong password
    and timing does not tell which user names exist.

    @param entries: The file's users and hashes.
    @param monotonic: The clock the hash's making is timed with.
    @return: The hash, and the least time a failed check must take: what
        checking the file's costliest entry takes, estimated from the time
        the hash took to make (each cost step doubles bcrypt's work).
    """
    costs = [int(hashed[4:6]) for hashed in entries.values() if hashed[4:6].isdigit()]
    highest = max(costs, default=10)
    # Capped: at start-up this runs on the reactor thread.
    cost = max(min(highest, 13), 4)
    started = monotonic()
    hashed = bcrypt.hashpw(b"tunnel-dummy-password", bcrypt.gensalt(cost))
    return hashed, (monotonic() - started) * 2 ** max(highest - cost, 0)


class HtpasswdError(ValueError):
    """
    An htpasswd file cannot be used; the message names the file, the line
    and the reason.
    """


def parseHtpasswd(content: bytes, path: str = "<htpasswd>") -> dict[bytes, bytes]:
    """
    Parse htpasswd content that must hold only bcrypt entries.

    @param content: The file's bytes.
    @param path: The file name, for error messages.
    @return: User name to bcrypt hash.
    @raise HtpasswdError: For a line in another format (MD5 C{$apr1$}, SHA1
        C{{SHA}}, crypt, plain text), a line with no colon, or a user listed
        twice.
    """
    entries: dict[bytes, bytes] = {}
    for number, raw in enumerate(content.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, hashed = line.partition(b":")
        where = f"{path}:{number}"
        if not colon or not user:
            raise HtpasswdError(f"{where}: not a 'user:hash' line")
        if not _BCRYPT.match(hashed):
            raise HtpasswdError(
                f"{where}: the entry for {user.decode('utf-8', 'replace')!r} is "
                "not a valid bcrypt hash ($2y$/$2b$/$2a$); re-create it with "
                "htpasswd -B"
            )
        if user in entries:
            raise HtpasswdError(
                f"{where}: {user.decode('utf-8', 'replace')!r} is listed twice"
            )
        entries[user] = hashed
    return entries


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """
    Checks user names and passwords against an htpasswd file of bcrypt
    entries.

    @ivar path: The htpasswd file.
    @ivar content: The bytes the users in force were read from (what a
        C{--workers} supervisor hands a new worker, see C{fallback}).
    """

    credentialInterfaces = (IUsernamePassword,)
    _log = Logger()
    # What _verify measures and waits with (tests put in their own).
    _monotonic = staticmethod(time.monotonic)
    _sleep = staticmethod(time.sleep)
    # What tells a file still being written (see refresh).
    _now = staticmethod(time.time)

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        cacheSize: int = 1024,
        fallback: bytes | None = None,
    ) -> None:
        """
        @param path: The htpasswd file.
        @param reactor: Runs bcrypt in its thread pool; by default the
            global reactor.
        @param cacheSize: How many recent successful verifications are
            remembered.
        @param fallback: The content to use if the file cannot be read or
            parsed at start-up (a C{--workers} supervisor's last good copy,
            so that a worker replaced while an edit has left the file
            broken knows the users the others do); the file is then read
            again once it changes.
        @raise HtpasswdError: If the file cannot be read or parsed, and
            there is no C{fallback}.
        """
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._reactor = reactor
        self.path = path
        self._cacheSize = cacheSize
        self._cache: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
        self._file = WatchedFile(path)
        try:
            self.content, self._entries = self._file.readAtStart(
                lambda content: parseHtpasswd(content, path),
                fallback,
                self._log,
                "users",
                self._now(),
            )
        except OSError as e:
            raise HtpasswdError(f"{path}: {e.strerror}") from None
        self._dummy, self._failureTime = _dummyHash(self._entries)

    def refresh(self) -> None:
        """
        Re-read the file if it changed, keeping the users in force if it
        cannot be used (checked at every login).
        """
        wasFailing = self._file.failing
        try:
            content = self._file.changed(self._now())
        except OSError as e:
            # Said once until a read succeeds: this runs at every login.
            if not wasFailing:
                self._log.error(
                    "Keeping the previous users: cannot read {path}: {error}",
                    path=self.path,
                    error=f"{self.path}: {e.strerror}",
                )
            return
        if content is None:
            return
        try:
            self._entries = parseHtpasswd(content, self.path)
        except HtpasswdError as e:
            self._log.error(
                "Keeping the previous users: cannot use {path}: {error}",
                path=self.path,
                error=str(e),
            )
            return
        self.content = content
        # The cache is kept: its keys hold the hash they were verified
        # against, so a user removed or given another password misses it,
        # and the others' logins stay free of bcrypt (a cleared cache made
        # every login after an edit a cold one, all at once).
        self._renewDummy()
        self._log.info(
            "Reloaded {count} users from {path}",
            count=len(self._entries),
            path=self.path,
        )

    def _renewDummy(self) -> None:
        """
        Make the dummy hash for the users just read, in the thread pool:
        bcrypt at cost 13 takes half a second, which on the reactor thread
        would stall every tunnel of the process (and in a C{--workers} main
        process, which reads the file to keep it for new workers, the
        workers' log lines).  Until it is made, the previous one serves.
        """
        entries = self._entries
        try:
            made = deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), _dummyHash, entries
            )
        except Exception:
            # (A pool stopped for shutdown, say.)  The previous one serves.
            self._log.failure("Could not make a dummy hash")
            return

        def use(result: tuple[bytes, float]) -> None:
            # A later reload's own dummy is on its way.
            if self._entries is entries:
                # The floor goes down too: it is the file's, not the
                # slowest time yet (a busy machine's would only ever rise).
                self._dummy, self._failureTime = result

        made.addCallback(use).addErrback(
            lambda failure: self._log.failure("Could not make a dummy hash", failure)
        )

    def _verify(self, password: bytes, hashed: bytes) -> bool:
        """
        Check C{password} against C{hashed}, in a pool thread.  A failure
        takes at least as long as checking the file's costliest entry (see
        L{_dummyHash}): the entries may have different costs, and a wrong
        password for a cheap entry must not answer faster than an unknown
        user does.  One that took longer (a busy machine) leaves the floor
        as it is: raised by the time taken, it would only ever rise, and
        every later failure would wait the longer.
        """
        started = self._monotonic()
        if bcrypt.checkpw(password, hashed):
            return True
        spent = self._monotonic() - started
        if spent < self._failureTime:
            self._sleep(self._failureTime - spent)
        return False

    def requestAvatarId(
        self, credentials: IUsernamePassword
    ) -> Deferred[bytes | tuple[()]]:
        """
        Check C{credentials}.

        @param credentials: The user name and password a client sent.
        @return: A Deferred that fires with the user name, or fails with
            L{UnauthorizedLogin}.
        """
        self.refresh()
        username: bytes = credentials.username
        # bcrypt reads only the first 72 bytes (Apache's htpasswd truncated
        # longer passwords when hashing); the bcrypt package refuses more.
        password: bytes = credentials.password[:72]
        hashed = self._entries.get(username)
        key = (
            username,
            hashed or b"",
            hashlib.sha256((hashed or b"") + b"\0" + password).digest(),
        )
        if hashed is not None and key in self._cache:
            self._cache.move_to_end(key)
            return succeed(username)
        # Withdrawn if the client leaves before a thread takes it.
        d = deferToPoolUnlessCancelled(
            self._reactor,
            self._verify,
            password,
            hashed if hashed is not None else self._dummy,
        )

        def checked(valid: bool) -> bytes:
            if not valid or hashed is None:
                raise UnauthorizedLogin()
            self._cache[key] = None
            while len(self._cache) > self._cacheSize:
                self._cache.popitem(last=False)
            return username

        return d.addCallback(checked)
