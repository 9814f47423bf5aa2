"""
Where the proxy listens: a listener's address checked before anything
listens, listeners that stop start-up if they cannot bind, the sockets a
C{--workers} worker inherits, and services that stop in turn.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from .workers import adoptListeningSocket

__all__ = [
    "DEFAULT_BACKLOG",
    "InheritedPorts",
    "StopInTurn",
    "boundBeyondLoopback",
    "checkBindable",
    "listen",
    "listensBeyondLoopback",
    "withDefaultBacklog",
]

_log = Logger()

#: How many connections the kernel queues on a listener for the proxy to
#: accept, unless its endpoint string sets C{backlog=}.  Twisted's default,
#: 50, overflows when a few hundred clients connect at once (a soak test's
#: 1000 at once took 14 s to be accepted, against 0.3 s with 1024): the
#: kernel drops the SYNs beyond it, and each such client waits one second,
#: then three, for its SYN to be sent again.  The kernel caps it at
#: C{net.core.somaxconn} (4096 by default since Linux 5.4).
DEFAULT_BACKLOG = 1024

# The kinds of endpoint string that take a backlog= parameter.
_QUEUED_KINDS = ("tcp", "tcp6", "ssl", "unix")
# One colon-separated field of an endpoint string, escapes (\:) included.
_FIELD = re.compile(r"(?:[^:\\]|\\.)+")


def withDefaultBacklog(description: str) -> str:
    """
    Give a server endpoint string L{DEFAULT_BACKLOG} unless it sets a
    backlog itself.

    @param description: A server endpoint string.
    @return: C{description} with C{:backlog=1024} added, for the kinds that
        take one (C{tcp}, C{tcp6}, C{ssl}, C{unix}) and do not set it, by
        name or by position; otherwise C{description} itself (a
        C{systemd:} socket's queue is set by systemd, C{Backlog=}).
    """
    kind, _, rest = description.partition(":")
    if kind.lower() not in _QUEUED_KINDS or any(
        field.startswith("backlog=") for field in _FIELD.findall(rest)
    ):
        return description
    queued = f"{description}:backlog={DEFAULT_BACKLOG}"
    try:
        # Only parsed: an endpoint is built, nothing listens.
        serverFromString(None, queued)
    except Exception:
        # A backlog given by position (tcp:3128:127.0.0.1:100,
        # tcp6:3128:100), which Twisted refuses to take twice; or another
        # mistake, reported where the string is checked, as it was written.
        return description
    return queued


def checkBindable(option: str, description: str, endpoint: object) -> None:
    """
    Try the address a TCP or UNIX server endpoint will listen on, so that a
    port in use, an address this host does not have or a missing directory
    is a usage error now, not twistd's traceback when the listener starts.
    (The endpoints keep their address in private attributes; any other kind
    of endpoint is left to fail, if it does, when it listens.)

    @param option: The option that named the listener, for the message.
    @param description: The listener's endpoint string.
    @param endpoint: The endpoint made of it.
    @raise usage.UsageError: If the address cannot be bound.
    """
    port, interface = (
        getattr(endpoint, "_port", None),
        getattr(endpoint, "_interface", None),
    )
    path = getattr(endpoint, "_address", None)
    try:
        if isinstance(port, int) and port and isinstance(interface, str):
            family = socket.AF_INET6 if ":" in interface else socket.AF_INET
            # getaddrinfo keeps an IPv6 zone (fe80::1%eth0) in the address.
            [(_, _, _, _, address), *_] = socket.getaddrinfo(
                interface or None,
                port,
                family,
                socket.SOCK_STREAM,
                0,
                socket.AI_PASSIVE,
            )
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # As Twisted's own listening sockets do.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        elif isinstance(path, str) and not path.startswith("\0"):
            directory = os.path.dirname(path) or "."
            if not os.path.isdir(directory):
                raise OSError(f"no directory {directory}")
            if os.path.lexists(path):
                _checkSocketFree(path, getattr(endpoint, "_wantPID", False))
    except OSError as e:
        raise usage.UsageError(
            f"{option} {description}: cannot listen: {e.strerror or e}"
        ) from None


def _checkSocketFree(path: str, locked: bool) -> None:
    """
    Check that the UNIX socket file at C{path}, which exists, may be listened
    on: a socket nothing answers on, which Twisted will remove (it does so
    only when the listener uses a lock file, C{lockfile=1} as by default,
    and finds a stale lock, left by a process that died).

    @param path: The socket's path.
    @param locked: Whether the listener uses a lock file.
    @raise OSError: If it is not a socket, is in use, or would stay.
    """
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OSError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Not blocking: a connect to a listener whose queue is full (a
        # wedged earlier instance) would wait, and start-up with it.
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:
            raise OSError(errno.EADDRINUSE, "Address already in use") from None
        except OSError:
            pass
        else:
            raise OSError(errno.EADDRINUSE, "Address already in use")
    if not (locked and os.path.lexists(path + ".lock")):
        raise OSError(
            f"{path} is a socket no one listens on, left without a lock file "
            "by a process that did not clean up: remove it first"
        )


_INTERFACE = re.compile(r"(?:^|:)interface=((?:[^:\\]|\\.)*)")


def listensBeyondLoopback(description: str) -> bool:
    """
    Whether a server endpoint string may accept connections from other
    machines.

    @param description: The endpoint string.
    @return: C{False} for UNIX sockets and for TCP/TLS listeners bound to a
        loopback interface, and for a C{systemd:} socket bound so (its
        address is asked of the socket itself); C{True} otherwise (all
        interfaces, a public address, or a listener this cannot tell).
    """
    kind = description.partition(":")[0].lower()
    if kind == "unix":
        return False
    if kind == "systemd":
        try:
            # The descriptor the listener will adopt, as Twisted's parser
            # finds it: the environment systemd set is read once, by
            # Twisted, which then removes it.
            fd = serverFromString(None, description).fileno
        except (LookupError, ValueError, TypeError, AttributeError):
            return True
        return boundBeyondLoopback(fd)
    match = _INTERFACE.search(description)
    if match is None:
        return True
    interface = re.sub(r"\\(.)", r"\1", match.group(1))
    if interface.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return True


def boundBeyondLoopback(fd: int) -> bool:
    """
    Whether a listening socket may accept connections from other machines,
    as its own address tells.

    @param fd: The socket's descriptor (a copy is asked, and closed).
    @return: C{False} for a UNIX socket or one bound to a loopback address;
        C{True} otherwise, and for a descriptor that cannot be asked.
    """
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            family, address = sock.family, sock.getsockname()
    except OSError:
        return True
    if family == socket.AF_UNIX:
        return False
    host = address[0].partition("%")[0]
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class InheritedPorts(Service):
    """
    Listening sockets inherited from the C{--workers} supervisor, adopted on
    start and closed on stop.
    """

    def __init__(self, reactor: Any, fds: list[tuple[int, Any]], factory: Any) -> None:
        """
        @param reactor: Adopts the sockets.
        @param fds: Each socket's descriptor and address family.
        @param factory: Serves the connections they accept.
        """
        self._reactor = reactor
        self._fds = fds
        self._factory = factory
        self._ports: list[Any] = []

    def startService(self) -> None:
        """
        Adopt the sockets, and close the inherited descriptors (the ports
        hold copies).
        """
        super().startService()
        for fd, family in self._fds:
            self._ports.append(
                adoptListeningSocket(self._reactor, fd, family, self._factory)
            )
            os.close(fd)

    def stopService(self) -> Any:
        """
        Stop listening.

        @return: A Deferred that fires once every port has stopped.
        """
        super().stopService()
        return DeferredList([maybeDeferred(port.stopListening) for port in self._ports])


def listen(reactor: Any, description: str, factory: Any, parent: MultiService) -> None:
    """
    Add to C{parent} a service that listens on C{description}, and makes
    start-up fail if it cannot.

    @param reactor: The reactor.
    @param description: A server endpoint string; without a C{backlog=}, it
        gets L{DEFAULT_BACKLOG} (see L{withDefaultBacklog}).
    @param factory: Serves the connections.
    @param parent: The service to add it to.
    """
    listener = StreamServerEndpointService(
        serverFromString(reactor, withDefaultBacklog(description)), factory
    )
    # Fail start-up loudly if a listener cannot bind, instead of logging the
    # error and running with fewer listeners than configured.
    listener._raiseSynchronously = True
    listener.setServiceParent(parent)


def _stopService(_: object, service: IService) -> Deferred[Any] | None:
    return service.stopService()  # type: ignore[no-any-return]


class StopInTurn(MultiService):
    """
    A L{MultiService} that stops its children one after another, the last
    added first, each once the one before has stopped (L{MultiService}
    stops them all at once).
    """

    def stopService(self) -> Deferred[None]:
        """
        Stop the children in turn.

        @return: A Deferred that fires once the first child added has
            stopped.
        """
        Service.stopService(self)
        stopped: Deferred[Any] = succeed(None)
        for child in reversed(list(self)):
            stopped.addCallback(_stopService, child)
            # One that fails to stop must not keep the next one running.
            stopped.addErrback(
                lambda reason: _log.failure("Stopping a service failed", reason)
            )
        return stopped
