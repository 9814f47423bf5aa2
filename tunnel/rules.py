"""
A policy whose rules also come from a file that is re-read when it changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .filestamp import WatchedFile
from .policy import (
    Denial,
    IPAddress,
    ITunnelPolicy,
    TunnelPolicy,
    hostBitsNote,
    parseRules,
)

if TYPE_CHECKING:
    from .auth import IProxyUser

__all__ = ["RulesFilePolicy"]


@implementer(ITunnelPolicy)
class RulesFilePolicy:
    """
    A L{TunnelPolicy} built from command-line rules plus the rules in a
    file.

    The file is looked at again at most once every C{checkInterval} seconds,
    when a client connects; if it changed it is re-read, once it has stayed
    unchanged for a second (L{tunnel.filestamp.settled}: a file caught half
    written could allow more than the whole one).  A file that no longer
    parses keeps the last good rules, and the reason is logged.

    @ivar policy: The L{TunnelPolicy} of the last good rules.
    @ivar path: The rules file.
    @ivar content: The bytes the last good rules were read from (what a
        C{--workers} supervisor hands a new worker, see C{fallback}).
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        ports: Sequence[str] = (),
        allowFrom: Sequence[str] = (),
        allowTo: Sequence[str] = (),
        denyTo: Sequence[str] = (),
        checkInterval: float = 1.0,
        fallback: bytes | None = None,
    ) -> None:
        """
        @param path: The rules file.
        @param clock: Tells the time (in seconds since the epoch, as a
            reactor does), to pace the checks for changes and to tell a
            file still being written.
        @param ports: C{--allow-port} values from the command line.
        @param allowFrom: C{--allow-from} values.
        @param allowTo: C{--allow-to} values.
        @param denyTo: C{--deny-to} values.
        @param checkInterval: The least time between two looks at the file.
        @param fallback: The content to use if the file cannot be read or
            parsed at start-up (a C{--workers} supervisor's last good copy,
            so that a worker replaced while an edit has left the file
            broken starts with the rules the others keep); the file is then
            read again once it changes.
        @raise ValueError: If the file cannot be read or parsed at start-up,
            and there is no C{fallback}.
        """
        self.path = path
        self._clock = clock
        self._base = {
            "allow-port": list(ports),
            "allow-from": list(allowFrom),
            "allow-to": list(allowTo),
            "deny-to": list(denyTo),
        }
        self._checkInterval = checkInterval
        self._checkedAt = clock.seconds()
        self._file = WatchedFile(path)
        try:
            self.content, self.policy = self._file.readAtStart(
                self._build, fallback, self._log, "rules", clock.seconds()
            )
        except OSError as e:
            raise ValueError(f"{path}: {e}") from None

    def _build(self, content: bytes) -> TunnelPolicy:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: {e}") from None
        rules = parseRules(text, self.path)
        for kind in ("allow-from", "allow-to", "deny-to"):
            for rule in rules[kind]:
                note = hostBitsNote(rule)
                if note is not None:
                    self._log.warn(
                        "{path}: {kind} {note}", path=self.path, kind=kind, note=note
                    )
        return TunnelPolicy.fromStrings(
            ports=self._base["allow-port"] + rules["allow-port"],
            allowFrom=self._base["allow-from"] + rules["allow-from"],
            allowTo=self._base["allow-to"] + rules["allow-to"],
            denyTo=self._base["deny-to"] + rules["deny-to"],
        )

    def refresh(self) -> TunnelPolicy:
        """
        Re-read the file if it changed (at most once every C{checkInterval}
        seconds), keeping the last good rules if it cannot be used.

        @return: The policy of the rules now in force.
        """
        now = self._clock.seconds()
        if now - self._checkedAt < self._checkInterval:
            return self.policy
        self._checkedAt = now
        wasFailing = self._file.failing
        try:
            content = self._file.changed(now)
        except OSError as e:
            # Said once until a read succeeds: a file the proxy may not read
            # (after -u dropped privileges, say) would be said every second.
            if not wasFailing:
                self._log.error(
                    "Keeping the previous rules: cannot read {path}: {error}",
                    error=str(e),
                    path=self.path,
                )
            return self.policy
        if content is None:
            return self.policy
        previous = self.policy
        try:
            self.policy = self._build(content)
            self.content = content
        except ValueError as e:
            self._log.error(
                "Keeping the previous rules: {error}", error=str(e), path=self.path
            )
            return self.policy
        self._log.info("Reloaded the rules from {path}", path=self.path)
        if previous.allowFrom and not self.policy.allowFrom:
            # An empty allow-from means anyone: deleting the last line
            # (to revoke a network, say) opens the proxy to every client.
            self._log.warn(
                "The rules in {path} no longer limit the clients (no "
                "allow-from left): any client that can reach the proxy may "
                "use it, unless --auth requires a login",
                path=self.path,
            )
        return self.policy

    def checkClient(self, client: IPAddress | None) -> Denial | None:
        """
        See L{ITunnelPolicy.checkClient}; also looks for a changed file.

        @param client: The client's IP address, or L{None}.
        @return: L{None} to allow, or a L{Denial}.
        """
        return self.refresh().checkClient(client)

    def checkTarget(
        self, avatar: IProxyUser | None, client: IPAddress | None, host: str, port: int
    ) -> Denial | None:
        """
        See L{ITunnelPolicy.checkTarget}.

        @param avatar: The authenticated user (an L{IProxyUser}), or L{None}.
        @param client: The client's IP address, or L{None}.
        @param host: The target host as requested.
        @param port: The target port.
        @return: L{None} to go on, or a L{Denial}.
        """
        return self.policy.checkTarget(avatar, client, host, port)

    def checkAddress(
        self,
        avatar: IProxyUser | None,
        client: IPAddress | None,
        host: str,
        port: int,
        address: IPAddress,
    ) -> bool:
        """
        See L{ITunnelPolicy.checkAddress}.

        @param avatar: The authenticated user (an L{IProxyUser}), or L{None}.
        @param client: The client's IP address, or L{None}.
        @param host: The target host as requested.
        @param port: The target port.
        @param address: One address C{host} resolved to.
        @return: C{True} to allow connecting to C{address}.
        """
        return self.policy.checkAddress(avatar, client, host, port, address)

    def addressDenial(self, host: str, port: int) -> Denial:
        """
        See L{ITunnelPolicy.addressDenial}.

        @param host: The target host as requested.
        @param port: The target port.
        @return: The refusal.
        """
        return self.policy.addressDenial(host, port)
