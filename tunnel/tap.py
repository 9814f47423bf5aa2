"""
The twistd face of the proxy: command-line options and the service they make.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from .server import ConnectProxyFactory

__all__ = ["Options", "makeService"]

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"


def _number(
    convert: Callable[[str], Any], low: float, high: float | None = None
) -> Callable[[str], Any]:
    """
    Make an option coercer that accepts numbers in C{[low, high]}.
    """

    def coerce(text: str) -> Any:
        value = convert(text)
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"in {low}-{high}"
            raise ValueError(f"must be {bound}")
        return value

    coerce.coerceDoc = (  # type: ignore[attr-defined]
        f"A number, at least {low}." if high is None else f"A number, {low}-{high}."
    )
    return coerce


class Options(usage.Options):
    """
    Options of C{twistd connect-proxy}.
    """

    synopsis = "[options]"
    longdesc = (
        "An HTTP CONNECT tunnelling proxy. It listens on "
        f"{DEFAULT_LISTEN} unless --listen says otherwise."
    )

    optParameters = [
        [
            "header-timeout",
            None,
            10.0,
            "Seconds a client has to send its request head (408 after).",
            _number(float, 0.001),
        ],
        [
            "connect-timeout",
            None,
            15.0,
            "Seconds allowed to reach the target (504 after).",
            _number(float, 0.001),
        ],
        [
            "idle-timeout",
            None,
            600.0,
            "Seconds without traffic after which a tunnel is closed; 0 disables.",
            _number(float, 0),
        ],
        [
            "max-request-line",
            None,
            8192,
            "Longest request line in bytes (414 beyond).",
            _number(int, 64, 1 << 20),
        ],
        [
            "max-header-size",
            None,
            65536,
            "Largest request head in bytes (431 beyond).",
            _number(int, 256, 1 << 24),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        self["listen"].append(description)

    opt_listen.__doc__ = (
        "A server endpoint string to listen on (tcp:8080, tcp6:8080, "
        "unix:/run/proxy.sock, ssl:8443:privateKey=key.pem, systemd:domain=INET:"
        "index=0, ...). Repeat for more listeners. Default: " + DEFAULT_LISTEN + "."
    )

    def postOptions(self) -> None:
        """
        Fill in the default listener and check the limits fit together.
        """
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["max-request-line"] > self["max-header-size"]:
            raise usage.UsageError("--max-request-line cannot exceed --max-header-size")


def makeFactory(options: Options, reactor: Any) -> ConnectProxyFactory:
    """
    Build the proxy factory the options describe.

    @param options: Parsed L{Options}.
    @param reactor: The reactor to run on.
    @return: The factory.
    """
    return ConnectProxyFactory(
        reactor=reactor,
        headerTimeout=options["header-timeout"],
        connectTimeout=options["connect-timeout"],
        idleTimeout=options["idle-timeout"],
        maxRequestLine=options["max-request-line"],
        maxHeaderSize=options["max-header-size"],
    )


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Make the service twistd runs: one listener per C{--listen}.

    @param options: Parsed L{Options}.
    @param reactor: The reactor; by default the global one.
    @return: A service that starts and stops every listener.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    factory = makeFactory(options, reactor)
    service = MultiService()
    for description in options["listen"]:
        endpoint = serverFromString(reactor, description)
        listener = StreamServerEndpointService(endpoint, factory)
        # Fail start-up loudly if a listener cannot bind, instead of logging
        # the error and running with fewer listeners than configured.
        listener._raiseSynchronously = True
        listener.setServiceParent(service)
    return service
