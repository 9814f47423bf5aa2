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
from .policy import Denial, IPAddress, ITunnelPolicy, TunnelPolicy, parseRules

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
        @raise ValueError: If the file cannot be read or parsed at start-up.
        """
        self._path = path
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
            content = self._file.read()
        except OSError as e:
            raise ValueError(f"{self._path}: {e}") from None
        self.policy = self._build(content)

    def _build(self, content: bytes) -> TunnelPolicy:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self._path}: {e}") from None
        rules = parseRules(text, self._path)
        return TunnelPolicy.fromStrings(
            ports=self._base["allow-port"] + rules["allow-port"],
            allowFrom=self._base["allow-from"] + rules["allow-from"],
            allowTo=self._base["allow-to"] + rules["allow-to"],
            denyTo=self._base["deny-to"] + rules["deny-to"],
        )

    def _refresh(self) -> TunnelPolicy:
        now = self._clock.seconds()
        if now - self._checkedAt < self._checkInterval:
            return self.policy
        self._checkedAt = now
        try:
            content = self._file.changed(now)
        except OSError as e:
            self._log.error(
                "Keeping the previous rules: cannot read {path}: {error}",
                error=str(e),
                path=self._path,
            )
            return self.policy
        if content is None:
            return self.policy
        try:
            self.policy = self._build(content)
        except ValueError as e:
            self._log.error(
                "Keeping the previous rules: {error}", error=str(e), path=self._path
            )
        else:
            self._log.info("Reloaded the rules from {path}", path=self._path)
        return self.policy

    def checkClient(self, client: IPAddress | None) -> Denial | None:
        """
        See L{ITunnelPolicy.checkClient}; also looks for a changed file.

        @param client: The client's IP address, or L{None}.
        @return: L{None} to allow, or a L{Denial}.
        """
        return self._refresh().checkClient(client)

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
