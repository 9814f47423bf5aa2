"""
The twistd face of the proxy: command-line options and the service they make.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import sys
from collections.abc import Callable
from typing import Any, NoReturn, cast

from twisted.application.service import IService
from twisted.cred.checkers import (
    FilePasswordDB,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import AuthOptionMixin, UnsupportedInterfaces, makeChecker
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.plugins.cred_unix import UNIXChecker
from twisted.python import usage

from . import limits, listeners, splice
from .accesslog import AccessLogObserver
from .auth import PooledChecker, checkRealm, portalFromCheckers
from .connector import HostnameConnector, canConnectDirectly
from .direct import checkSourceAddress, sourcesByVersion
from .filestamp import MAX_SIZE, readRegularFile
from .htpasswd import HtpasswdChecker, HtpasswdError
from .interfaces import ITargetConnector
from .listeners import (
    InheritedPorts,
    StopInTurn,
    listen,
    listensBeyondLoopback,
)
from .metrics import (
    MetricsReporter,
    MetricsUnavailable,
    ProxyMetrics,
    WorkerMetrics,
    requirePrometheus,
)
from .metricssite import metricsSite
from .policy import (
    RULE_PARSERS,
    ITunnelPolicy,
    TunnelPolicy,
    hostBitsNote,
    parseNetwork,
    parseRules,
)
from .resolver import CACHE_ANSWERS_FOR, CACHE_FAILURES_FOR, ThreadedResolver
from .rules import RulesFilePolicy
from .server import (
    MAX_EARLY_DATA,
    MAX_PARTIAL_HEAD_BYTES_PER_CLIENT,
    ConnectProxyFactory,
)
from .service import ProxyService, StopOnSignals
from .upstream import (
    UpstreamConnector,
    parseUpstreamURL,
    readUpstreamCredentials,
    upstreamTLSOptions,
)
from .workers import (
    SHAREABLE_KINDS,
    KeptFile,
    WorkerSupervisor,
    formatMetricsRecord,
    parseInheritedDescriptors,
    readKeptFile,
    workerArguments,
)

__all__ = ["Options", "makeService"]

#: The listener without any C{--listen}.
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"


def _number(
    convert: Callable[[str], Any], low: float, high: float | None = None
) -> Callable[[str], Any]:
    """
    Make an option coercer that accepts numbers in C{[low, high]}.
    """

    def coerce(text: str) -> Any:
        bound = f"at least {low}" if high is None else f"in {low}-{high}"
        name = coerce.optionName  # type: ignore[attr-defined]
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"{name} must be a number {bound}, not {text!r}") from None
        # float() reads "nan" and "inf": no timeout or limit is either.
        if (
            not math.isfinite(value)
            or value < low
            or (high is not None and value > high)
        ):
            raise ValueError(f"{name} must be {bound}, not {text}")
        return value

    # The option's name, which twisted.python.usage leaves out of its
    # message; set once the options are declared (see below Options).
    coerce.optionName = "the value"  # type: ignore[attr-defined]
    coerce.coerceDoc = (  # type: ignore[attr-defined]
        f"A number, at least {low}." if high is None else f"A number, {low}-{high}."
    )
    return coerce


_WORKER_OF = _number(int, 1, 64)
_WORKER_OF.optionName = "--worker-of"  # type: ignore[attr-defined]

_log = Logger()

#: The options that may be given more than once, and how each value is
#: checked as it is read.
_REPEATED: dict[str, Callable[[str], object] | None] = {
    "listen": None,
    **RULE_PARSERS,
    "proxy-protocol-from": parseNetwork,
    "outgoing-address": lambda text: sourcesByVersion([text]),
}


def _absolutePath(path: str) -> str:
    """
    A file option's path made absolute: twistd's C{-d} changes directory
    after the options are read, and the proxy opens some files again later
    (rules, htpasswd, the access log on SIGUSR1).

    @param path: The path as given.
    @return: The same file's absolute path.
    """
    return os.path.abspath(path)


def _logPath(path: str) -> str:
    """
    An C{--access-log} path made absolute, but for C{-} (standard output).

    @param path: The path as given.
    @return: The absolute path, or C{-}.
    """
    return path if path == "-" else _absolutePath(path)


def _utf8(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else text


class Options(usage.Options, AuthOptionMixin):
    """
    Options of C{twistd connect-proxy}.

    @ivar argv: The arguments last given to L{parseOptions}, which
        C{--workers} passes on to each worker.
    """

    synopsis = "[options]"
    longdesc = (
        "An HTTP CONNECT tunnelling proxy. It listens on "
        f"{DEFAULT_LISTEN} unless --listen says otherwise.\n\n"
        "Destinations, first match wins: a --deny-to rule refuses; an "
        "--allow-to rule allows; loopback, private, link-local, multicast "
        "and other special-purpose addresses are refused; anything else is "
        "allowed. Only port 443 is allowed unless --allow-port adds more."
    )
    supportedInterfaces = (IUsernamePassword,)

    optFlags = [
        [
            "no-splice",
            None,
            "Relay every tunnel through Python instead of moving the bytes "
            "of plain TCP tunnels kernel-to-kernel with splice(2).",
        ],
        [
            "no-tunnel-log",
            None,
            "Write no line per connection to the twistd log (--access-log and "
            "--metrics still see every connection; errors are still logged).",
        ],
        [
            "proxy-protocol",
            None,
            "Every connection starts with a PROXY protocol v1/v2 header (from "
            "a load balancer); its source address is the client's. Connections "
            "without one are refused.",
        ],
    ]

    optParameters = [
        [
            "header-timeout",
            None,
            10.0,
            "Seconds a client has to send its request head (408 after)",
            _number(float, 0.001),
        ],
        [
            "connect-timeout",
            None,
            15.0,
            "Seconds allowed to check the credentials (503 after) and to "
            "reach the target (504 after)",
            _number(float, 0.001),
        ],
        [
            "idle-timeout",
            None,
            600.0,
            "Seconds without traffic after which a tunnel is reset; 0 disables",
            _number(float, 0),
        ],
        [
            "max-request-line",
            None,
            8192,
            "Longest request line in bytes (414 beyond)",
            _number(int, 64, 1 << 20),
        ],
        [
            "max-header-size",
            None,
            65536,
            "Largest request head in bytes (431 beyond)",
            _number(int, 256, 1 << 24),
        ],
        [
            "realm",
            None,
            "tunnel",
            "The realm named in the Proxy-Authenticate challenge",
            checkRealm,
        ],
        [
            "rules",
            None,
            None,
            "A file of rules, one a line (allow-port 22, allow-to 10.0.0.0/8, "
            "deny-to *.example, allow-from 192.0.2.0/24; # comments), added "
            "to the options and re-read when it changes",
            _absolutePath,
        ],
        [
            "max-tunnels",
            None,
            None,
            "The most connections at once, handshakes included (503 beyond); "
            "by default, what the hard file descriptor limit (ulimit -Hn), "
            "to which the proxy raises its soft limit, and a quarter of the "
            "memory allow",
            _number(int, 1),
        ],
        [
            "max-tunnels-per-client",
            None,
            None,
            "The most connections at once from one client address (429 beyond)",
            _number(int, 1),
        ],
        [
            "max-partial-head-bytes-per-client",
            None,
            MAX_PARTIAL_HEAD_BYTES_PER_CLIENT,
            "The most bytes of request heads begun but not ended that the "
            "connections of one client address may make the proxy hold at "
            "once (429 beyond); heads that arrive whole never count. 0: no "
            "limit",
            _number(int, 0),
        ],
        [
            "pipe-size",
            None,
            splice.PIPE_SIZE,
            "Bytes each pipe of a spliced tunnel holds, and so the most one "
            "splice(2) moves (at most /proc/sys/fs/pipe-max-size without "
            "CAP_SYS_RESOURCE). Smaller pipes cost throughput, and leave the "
            "kernel less to buffer for a client that stops reading",
            _number(int, 4096, 1 << 26),
        ],
        [
            "resolver-threads",
            None,
            20,
            "Name lookups (getaddrinfo) of targets and the parent proxy that "
            "may run at once, in threads apart from the password checks; up to "
            "1000 more wait (503 beyond); the names of one domain take at "
            "most a quarter of them, the lookups of one client at most half "
            "(at least one each)",
            _number(int, 1, 1000),
        ],
        [
            "resolver-cache",
            None,
            CACHE_ANSWERS_FOR,
            "Seconds a name's addresses are kept once looked up; 0 keeps none",
            _number(float, 0),
        ],
        [
            "resolver-cache-failures",
            None,
            CACHE_FAILURES_FOR,
            "Seconds a lookup that found no address (no such name, or no "
            "answer from DNS) is kept; 0 keeps none",
            _number(float, 0),
        ],
        [
            "workers",
            None,
            1,
            "Run this many reactor processes sharing the listening sockets "
            "(TCP and UNIX listeners), supervised by the main process",
            _number(int, 1, 64),
        ],
        [
            "upstream",
            None,
            None,
            "Send every tunnel through this parent CONNECT proxy: "
            "http://[user:password@]host:port or https://... (TLS, verified)",
        ],
        [
            "upstream-ca",
            None,
            None,
            "A PEM file of CA certificates to verify an https:// parent with "
            "(default: the system's trust store)",
            _absolutePath,
        ],
        [
            "upstream-credentials",
            None,
            None,
            "A file holding the parent proxy's user:password (one line), "
            "instead of the --upstream URL, which ps shows to every local user",
            _absolutePath,
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "On shutdown, seconds open tunnels get to finish before they are closed",
            _number(float, 0),
        ],
        [
            "access-log",
            None,
            None,
            "Write one line per finished connection to this file (- for "
            "standard output); reopened on SIGUSR1",
            _logPath,
        ],
        [
            "access-log-format",
            None,
            "text",
            "text or json",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this server endpoint, "
            "e.g. tcp:9100:interface=127.0.0.1 (needs prometheus_client: "
            "pip install '.[metrics]' in the checkout)",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in _REPEATED:
            self[name] = []
        self["inherit-fd"] = []
        self["worker-of"] = 1
        self["report-metrics"] = False
        self["kept-files"] = {}
        self.argv: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse, keeping the arguments so that C{--workers} can pass them on.

        @param options: The command-line arguments; by default
            C{sys.argv[1:]}.
        @raise usage.UsageError: For a bad option or value.
        """
        if options is None:
            options = sys.argv[1:]
        self.argv = list(options)
        super().parseOptions(options)

    def opt_version(self) -> NoReturn:
        """
        Print the versions of tunnel, Twisted and Python, and exit.
        """
        import twisted

        from . import __version__

        print(
            f"tunnel {__version__} (Twisted {twisted.__version__}, "
            f"Python {platform.python_version()})"
        )
        sys.exit(0)

    def opt_inherit_fd(self, value: str) -> None:
        """
        Internal (used by --workers): adopt the inherited listening socket
        FD:FAMILY.
        """
        self["inherit-fd"].append(value)

    def opt_report_metrics(self) -> None:
        """
        Internal (used by --workers with --metrics): send a snapshot of the
        metrics to the main process every second.
        """
        self["report-metrics"] = True

    def opt_kept_file(self, value: str) -> None:
        """
        Internal (used by --workers): the supervisor's last good copy of a
        rules or htpasswd file, in the inherited descriptor FD, used if the
        file cannot be read or parsed at start-up.
        """
        try:
            path, content = readKeptFile(int(value))
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--kept-file {value}: {e}") from None
        self["kept-files"][_absolutePath(path)] = content

    def opt_worker_of(self, value: str) -> None:
        """
        Internal (used by --workers): this process is one of N workers.
        """
        try:
            self["worker-of"] = _WORKER_OF(value)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def _repeated(self, name: str, value: str) -> None:
        check = _REPEATED[name]
        if check is not None:
            try:
                check(value)
            except ValueError as e:
                raise usage.UsageError(f"--{name} {value}: {e}") from None
        self[name].append(value)

    def opt_listen(self, description: str) -> None:
        self._repeated("listen", description)

    opt_listen.__doc__ = (
        "A server endpoint string to listen on (tcp:8080, tcp6:8080, "
        "unix:/run/proxy.sock, ssl:8443:privateKey=key.pem, systemd:domain=INET:"
        "index=0, ...). Repeat for more listeners. Default: " + DEFAULT_LISTEN + "."
    )

    def opt_allow_port(self, port: str) -> None:
        """
        Allow a target port or range besides 443: 22, 8000-8999, or any.
        Repeatable.
        """
        self._repeated("allow-port", port)

    def opt_allow_to(self, rule: str) -> None:
        """
        Allow a destination: CIDR, address, HOST or *.DOMAIN, even inside
        the ranges denied by default. Repeatable.
        """
        self._repeated("allow-to", rule)

    def opt_deny_to(self, rule: str) -> None:
        """
        Deny a destination: CIDR, address, HOST or *.DOMAIN; wins over
        --allow-to. Repeatable.
        """
        self._repeated("deny-to", rule)

    def opt_allow_from(self, network: str) -> None:
        """
        Let only clients in this network (CIDR) use the proxy; others get a
        403. Repeatable.
        """
        self._repeated("allow-from", network)

    def opt_proxy_protocol_from(self, network: str) -> None:
        """
        With --proxy-protocol: take PROXY headers only from load balancers
        in this network (CIDR); connections from elsewhere get a 403.
        Repeatable.
        """
        self._repeated("proxy-protocol-from", network)

    def opt_outgoing_address(self, address: str) -> None:
        """
        Connect to targets (and to the --upstream parent) from this local
        address: one IPv4 and one IPv6 address at most, each for the
        targets of its version. Repeatable.
        """
        self._repeated("outgoing-address", address)

    def opt_auth(self, description: str) -> None:
        """
        Require Proxy-Authorization checked by this checker: htpasswd:PATH,
        memory:USER:PASSWORD, file:PATH, unix, ... (see --help-auth).
        """
        kind, _, argument = description.partition(":")
        if kind in ("htpasswd", "file") and argument:
            # Read again at every change (htpasswd) or every login (file).
            argument = _absolutePath(argument)
            description = f"{kind}:{argument}"
        kept = self["kept-files"].get(argument) if kind == "htpasswd" else None
        try:
            if kept is None:
                checker = makeChecker(description)
            else:
                checker = HtpasswdChecker(argument, fallback=kept)
        except HtpasswdError as e:
            raise usage.UsageError(f"--auth {kind}: {e}") from None
        except Exception:
            # Unknown types and other mistakes get strcred's own messages.
            AuthOptionMixin.opt_auth(self, description)
            return
        if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
            if not checker.users:
                raise usage.UsageError(
                    f"--auth {description}: no user given (memory:USER:PASSWORD)"
                )
            # Twisted's memory: plugin stores str users, but credentials
            # carry bytes (as every other checker expects); store bytes.
            checker.users = {
                _utf8(name): _utf8(password) for name, password in checker.users.items()
            }
        if isinstance(checker, FilePasswordDB) and not (
            os.path.isfile(checker.filename) and os.access(checker.filename, os.R_OK)
        ):
            # Twisted's file: checker only warns, and then refuses every
            # login as a wrong password.
            raise usage.UsageError(f"--auth {description}: cannot read the file")
        if isinstance(checker, (FilePasswordDB, UNIXChecker)):
            # They answer at once, crypt and file reads included, on the
            # thread that asks: make that a pool thread.
            checker = PooledChecker(checker)
        try:
            self.addChecker(checker)
        except UnsupportedInterfaces as e:
            raise usage.UsageError(
                f"--auth {description}: cannot check user names and passwords"
            ) from e

    def postOptions(self) -> None:
        """
        Fill in the default listener and check the options fit together.
        """
        if not self["listen"] and not self["inherit-fd"]:
            self["listen"] = [DEFAULT_LISTEN]
        self._checkListeners()
        if self["rules"] is not None and self["rules"] not in self["kept-files"]:
            # (A worker given the supervisor's copy uses that if the file
            # is broken: see makePolicy.)
            try:
                content = readRegularFile(self["rules"], MAX_SIZE)
                parseRules(content.decode("utf-8"), self["rules"])
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise usage.UsageError(f"--rules: {e}") from None
        self._checkUpstream()
        self._checkAccessLog()
        if self["access-log-format"] not in ("text", "json"):
            raise usage.UsageError("--access-log-format must be text or json")
        self._checkMetrics()
        if self["max-request-line"] > self["max-header-size"]:
            raise usage.UsageError("--max-request-line cannot exceed --max-header-size")
        self._checkOutgoing()

    def _checkOutgoing(self) -> None:
        """
        Check the C{--outgoing-address}es: one per IP version, each one
        this host can connect from (bound to once, now, rather than failing
        every tunnel later).
        """
        try:
            sourcesByVersion(self["outgoing-address"])
        except ValueError as e:
            raise usage.UsageError(f"--outgoing-address: {e}") from None
        for address in self["outgoing-address"]:
            try:
                checkSourceAddress(address)
            except OSError as e:
                zone = (
                    " (a link-local IPv6 address needs its zone, as in fe80::1%eth0)"
                    if address.lower().startswith("fe80:") and "%" not in address
                    else " (is it an address of this host?)"
                )
                raise usage.UsageError(
                    f"--outgoing-address {address}: {e.strerror or e}{zone}"
                ) from None

    def _checkListeners(self) -> None:
        """
        Check the C{--listen} endpoint strings, that they fit C{--workers}
        and C{--proxy-protocol}, and that their addresses can be bound.
        """
        kinds = [
            description.partition(":")[0].lower() for description in self["listen"]
        ]
        if self["workers"] > 1:
            for description, kind in zip(self["listen"], kinds, strict=True):
                if kind not in SHAREABLE_KINDS:
                    why = (
                        " (a worker would serve it without TLS)"
                        if kind == "ssl"
                        else ""
                    )
                    raise usage.UsageError(
                        f"--workers shares only tcp:, tcp6: and unix: listeners, "
                        f"not {description}{why}"
                    )
        if self["proxy-protocol-from"] and not self["proxy-protocol"]:
            raise usage.UsageError("--proxy-protocol-from needs --proxy-protocol")
        if self["proxy-protocol"] and "ssl" in kinds:
            # Twisted's ssl: listener decrypts before the proxy reads a byte,
            # so the header would be looked for inside TLS.
            raise usage.UsageError(
                "--proxy-protocol cannot be used with an ssl: listener: load "
                "balancers send the PROXY header before the TLS handshake, "
                "and the proxy would look for it inside TLS; end TLS on the "
                "balancer and listen with tcp:"
            )
        from twisted.internet import reactor

        for description in self["listen"]:
            try:
                # Builds the endpoint without listening: a check of the
                # string, so that a mistake is a usage error, not a traceback.
                endpoint = serverFromString(reactor, description)
            except Exception as e:
                if description.lower().startswith("systemd:") and isinstance(
                    e, (IndexError, KeyError)
                ):
                    raise usage.UsageError(_noSystemdSocket(description)) from None
                # A colon left unescaped in a value makes Twisted's parsers
                # fail with one of these (an argument given twice, a value
                # cut short); a missing file or a misspelt endpoint type has
                # nothing to do with colons.
                hint = (
                    " (in endpoint strings, colons inside a value are written"
                    " \\:, as in tcp6:8080:interface=\\:\\:1)"
                    if isinstance(e, (TypeError, ValueError))
                    and not str(e).startswith("Unknown endpoint type")
                    else ""
                )
                raise usage.UsageError(
                    f"--listen {description}: {type(e).__name__}: {e}{hint}"
                ) from None
            listeners.checkBindable("--listen", description, endpoint)

    def _checkUpstream(self) -> None:
        """
        Parse C{--upstream}, with its credentials file and CA, which need it.
        """
        if self["upstream"] is None:
            if self["upstream-ca"] is not None:
                raise usage.UsageError("--upstream-ca needs --upstream")
            if self["upstream-credentials"] is not None:
                raise usage.UsageError("--upstream-credentials needs --upstream")
            return
        try:
            self["upstream"] = parseUpstreamURL(self["upstream"])
        except ValueError as e:
            raise usage.UsageError(f"--upstream: {e}") from None
        if self["upstream-credentials"] is not None:
            try:
                self["upstream"] = readUpstreamCredentials(
                    self["upstream"], self["upstream-credentials"]
                )
            except ValueError as e:
                raise usage.UsageError(f"--upstream-credentials: {e}") from None
        if self["upstream-ca"] is not None:
            if not self["upstream"].tls:
                raise usage.UsageError(
                    "--upstream-ca: TLS options need an https:// parent proxy"
                )
            try:
                upstreamTLSOptions(self["upstream"], self["upstream-ca"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--upstream-ca: {e}") from None

    def _checkMetrics(self) -> None:
        """
        Check that C{--metrics} can be served: prometheus_client installed,
        the endpoint string valid and its address free.
        """
        if self["metrics"] is None:
            return
        try:
            requirePrometheus()
        except MetricsUnavailable as e:
            raise usage.UsageError(str(e)) from None
        from twisted.internet import reactor

        try:
            endpoint = serverFromString(reactor, self["metrics"])
        except Exception as e:
            raise usage.UsageError(
                f"--metrics {self['metrics']}: {type(e).__name__}: {e}"
            ) from None
        listeners.checkBindable("--metrics", self["metrics"], endpoint)

    def _checkAccessLog(self) -> None:
        """
        Check that the access log can be written, so that a mistake is a
        usage error now rather than a traceback (or, with C{--workers}, a
        worker failing over and over).  As root, before C{-u} drops
        privileges, this cannot tell what the C{-u} user may write.
        """
        path = self["access-log"]
        if path is None:
            return
        if path == "-":
            if self["workers"] > 1:
                raise usage.UsageError(
                    "--access-log - cannot be combined with --workers: a "
                    "worker's standard output carries its log to the main "
                    "process; give a file"
                )
            return
        # Checked without creating the file: made here, before twistd drops
        # privileges (-u), it would belong to root, and the workers that
        # run as the -u user could not open it.
        if os.path.isdir(path):
            raise usage.UsageError(f"--access-log: {path} is a directory")
        if os.path.exists(path):
            writable, why = os.access(path, os.W_OK), "not writable by this user"
        else:
            directory = os.path.dirname(path) or "."
            if not os.path.isdir(directory):
                writable, why = False, f"no directory {directory}"
            else:
                writable = os.access(directory, os.W_OK | os.X_OK)
                why = f"cannot create files in {directory}"
        if not writable:
            raise usage.UsageError(f"--access-log: cannot write {path}: {why}")


# Name each number option in its coercer's errors (see _number).
for _parameter in cast(list[list[Any]], Options.optParameters):
    _coerce: Any = _parameter[4] if len(_parameter) > 4 else None
    if hasattr(_coerce, "optionName"):
        _coerce.optionName = f"--{_parameter[0]}"

# twisted.python.usage prints an option method's docstring as it is, line
# breaks and indentation included; fold each into one line for --help.
for _name in dir(Options):
    _method = getattr(Options, _name)
    if _name.startswith("opt_") and getattr(_method, "__doc__", None):
        _method.__doc__ = " ".join(_method.__doc__.split())


def makePolicy(options: Options, clock: Any) -> ITunnelPolicy:
    """
    Build the destination policy the options describe.

    @param options: Parsed L{Options}.
    @param clock: Paces re-reading the rules file.
    @return: A L{TunnelPolicy}, or a L{RulesFilePolicy} with C{--rules}.
    """
    rules = {
        "ports": options["allow-port"],
        "allowFrom": options["allow-from"],
        "allowTo": options["allow-to"],
        "denyTo": options["deny-to"],
    }
    if options["rules"] is not None:
        return RulesFilePolicy(
            options["rules"],
            clock,
            fallback=options["kept-files"].get(options["rules"]),
            **rules,
        )
    return TunnelPolicy.fromStrings(**rules)


#: How the default C{--max-tunnels} is logged (C{why} ends "as ...").
_AT_MOST = "At most {count} connections at once, as {why} (--max-tunnels sets another)"


def _raiseDescriptorLimitFor(
    factory: ConnectProxyFactory, descriptors: int, defaultTunnels: bool
) -> None:
    """
    L{limits.raiseDescriptorLimit}, and if it fell short, bring the
    factory's default C{maxTunnels} (planned for C{descriptors}) down to
    what the limit in force holds.
    """
    held = limits.descriptorBoundTunnels(limits.raiseDescriptorLimit(descriptors))
    if defaultTunnels and factory.maxTunnels is not None and held < factory.maxTunnels:
        factory.maxTunnels = held
        _log.warn(_AT_MOST, count=held, why="the file descriptor limit allows")


def makeFactory(options: Options, reactor: Any) -> ConnectProxyFactory:
    """
    Build the proxy factory the options describe, and have this process's
    soft descriptor limit raised once C{reactor} runs (see
    L{limits.descriptorLimit}), since the default C{--max-tunnels} counts on
    it.

    @param options: Parsed L{Options}.
    @param reactor: The reactor to run on.
    @return: The factory.
    """
    checkers = options.get("credCheckers", [])
    resolver = ThreadedResolver(
        reactor,
        threads=options["resolver-threads"],
        cacheFor=options["resolver-cache"],
        cacheFailuresFor=options["resolver-cache-failures"],
    )
    connector: ITargetConnector
    sources = options["outgoing-address"]
    if sources and not canConnectDirectly(reactor):
        raise usage.UsageError("--outgoing-address needs a POSIX reactor")
    if options["upstream"] is None:
        # No timer of the connector's own: the factory's connect timeout
        # bounds all of a tunnel's attempts together.
        connector = HostnameConnector(
            reactor, resolver=resolver, timeout=None, sourceAddresses=sources
        )
    else:
        try:
            upstream = UpstreamConnector(
                reactor,
                options["upstream"],
                caCertificate=options["upstream-ca"],
                # As long as the factory's, which starts first and so ends
                # the attempt first; this one only bounds the connector
                # where it is used on its own.
                timeout=options["connect-timeout"],
                resolver=resolver,
                sourceAddresses=sources,
            )
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--upstream-ca: {e}") from None
        _log.info(
            "Tunnels go through the parent proxy {parent}",
            parent=upstream.upstream.displayURL,
        )
        connector = upstream
    descriptors = limits.descriptorLimit(reactor)
    maxTunnels = options["max-tunnels"]
    if maxTunnels is None:
        maxTunnels, why = limits.defaultMaxTunnels(
            descriptors,
            # An unfinished head, or early data: as much as reading goes on
            # for, and the read (up to 64 KiB) that passed it.
            max(options["max-header-size"], MAX_EARLY_DATA + 65536),
            options["worker-of"],
        )
        _log.info(_AT_MOST, count=maxTunnels, why=why)
    factory = ConnectProxyFactory(
        connector,
        reactor=reactor,
        policy=makePolicy(options, reactor),
        portal=portalFromCheckers(checkers) if checkers else None,
        realm=options["realm"],
        headerTimeout=options["header-timeout"],
        connectTimeout=options["connect-timeout"],
        idleTimeout=options["idle-timeout"],
        maxRequestLine=options["max-request-line"],
        maxHeaderSize=options["max-header-size"],
        maxTunnels=maxTunnels,
        maxTunnelsPerClient=options["max-tunnels-per-client"],
        maxPartialHeadBytesPerClient=(
            options["max-partial-head-bytes-per-client"] or None
        ),
        proxyProtocol=bool(options["proxy-protocol"]),
        proxyProtocolFrom=options["proxy-protocol-from"],
        splice=False if options["no-splice"] else None,
        logTunnels=not options["no-tunnel-log"],
    )
    # Once running, as the process it will serve in (a MemoryReactorClock
    # in a test never runs it).
    reactor.callWhenRunning(
        _raiseDescriptorLimitFor,
        factory,
        descriptors,
        options["max-tunnels"] is None,
    )
    return factory


def _noSystemdSocket(description: str) -> str:
    """
    Say why a C{systemd:} listener found no socket: the one asked for was
    not among those systemd passed.

    @param description: The C{--listen} string.
    @return: The usage error's text.
    """
    from twisted.python.systemd import ListenFDs

    passed = len(ListenFDs.fromEnvironment().inheritedDescriptors())
    return (
        f"--listen {description}: no such socket among the {passed} passed by "
        "systemd (LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES, which Twisted "
        "needs all three of: systemd sets them for a socket unit; "
        "systemd-socket-activate sets LISTEN_FDNAMES only with --fdname)"
    )


#: Logged at start-up for each listener that other machines can reach when
#: neither C{--auth} nor C{--allow-from} is set (C{{listen}} is the
#: listener).
OPEN_PROXY_WARNING = (
    "*** OPEN PROXY *** {listen} accepts connections from other machines, and "
    "neither --auth nor --allow-from restricts who may use it (an --allow-from "
    "of a whole family, 0.0.0.0/0 or ::/0, does not): anyone who can reach it can "
    "tunnel through this proxy. Add --auth htpasswd:PATH or --allow-from CIDR."
)


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Make the service twistd runs.

    @param options: Parsed L{Options}.
    @param reactor: The reactor; by default the global one.
    @return: With C{--workers} above 1, a L{WorkerSupervisor}; otherwise
        this process's L{makeWorkerService}, one listener per C{--listen}.
        With C{--metrics}, either inside a service that also serves the
        metrics page (added up over the workers) and stops it last.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    _noteHostBits(options)
    if options["workers"] > 1:
        policy = makePolicy(options, reactor)
        _warnIfOpen(options["listen"], bool(options.get("credCheckers")), policy)
        # What a worker started while an edit has left one of these files
        # broken starts with, as the running workers keep it.
        keptFiles: list[KeptFile] = [
            checker
            for checker in options.get("credCheckers", [])
            if isinstance(checker, HtpasswdChecker)
        ]
        if isinstance(policy, RulesFilePolicy):
            keptFiles.append(policy)
        reactor.callWhenRunning(StopOnSignals(reactor).install)
        workerMetrics = None if options["metrics"] is None else WorkerMetrics()
        supervisor = WorkerSupervisor(
            reactor,
            [listeners.withDefaultBacklog(d) for d in options["listen"]],
            workerArguments(options.argv),
            options["workers"],
            stopTimeout=options["drain-timeout"] + 5,
            metrics=workerMetrics,
            keptFiles=keptFiles,
            # Where twistd started, before -d: the workers read their
            # options' relative paths as the main process did.
            directory=os.getcwd(),
        )
        if workerMetrics is None:
            return supervisor
        # The main process serves the workers' metrics, added up.
        return _servingMetrics(supervisor, reactor, options["metrics"], workerMetrics)
    service = makeWorkerService(options, reactor)
    if not options["inherit-fd"]:
        # A second SIGTERM during the drain must not be a critical error
        # (workers install the same from their own entry point).
        reactor.callWhenRunning(StopOnSignals(reactor).install)
    if options["metrics"] is None:
        return service
    [metrics] = [o for o in service.observers if isinstance(o, ProxyMetrics)]
    return _servingMetrics(service, reactor, options["metrics"], metrics)


def _servingMetrics(
    service: IService, reactor: Any, description: str, metrics: Any
) -> IService:
    """
    Serve C{metrics} at C{description} for as long as C{service} runs, and
    until it has stopped: the metrics answer while it drains (showing
    C{tunnel_draining} and the tunnels still open).

    @param service: The proxy service, or the C{--workers} supervisor.
    @param reactor: The reactor.
    @param description: The C{--metrics} endpoint string.
    @param metrics: A L{ProxyMetrics} or L{WorkerMetrics}.
    @return: A service of both, which stops C{service} first.
    """
    parent = StopInTurn()
    listen(reactor, description, metricsSite(metrics, reactor), parent)
    service.setServiceParent(parent)
    return parent


def _warnIfOpen(listen: list[str], authenticated: bool, policy: ITunnelPolicy) -> None:
    """
    Log L{OPEN_PROXY_WARNING} for each listener that other machines can
    reach, unless clients must authenticate or come from C{--allow-from}.
    """
    if authenticated or _restrictsClients(policy):
        return
    for description in listen:
        if listensBeyondLoopback(description):
            _log.warn(OPEN_PROXY_WARNING, listen=description)


def makeWorkerService(options: Options, reactor: Any) -> ProxyService:
    """
    Make the service of one proxy process: its listeners (or the listening
    sockets it inherited from a C{--workers} supervisor), access log,
    metrics and drain.

    @param options: Parsed L{Options}.
    @param reactor: The reactor.
    @return: The service.
    """
    factory = makeFactory(options, reactor)
    # The workers' idle pipes share one user's pipe quota.
    splice.defaultPool.processes = options["worker-of"]
    splice.defaultPool.pipeSize = options["pipe-size"]
    # Everything made while starting (modules, options, the factory) lives
    # as long as the process: keep it out of the cyclic collector's way, or
    # each full collection walks it again and stalls handshakes (the p99).
    reactor.callWhenRunning(gc.freeze)
    observers: list[ILogObserver] = []
    if options["access-log"] is not None:
        observers.append(
            AccessLogObserver(options["access-log"], options["access-log-format"])
        )
    metrics = None
    if options["metrics"] is not None or options["report-metrics"]:
        metrics = ProxyMetrics([factory])
        observers.append(metrics)
    service = ProxyService(
        factory, options["drain-timeout"], observers=observers, reactor=reactor
    )
    if metrics is not None and options["report-metrics"]:
        # Stopped after the drain, so its last report counts the connections
        # that ended during it.
        service.afterDrain.append(
            MetricsReporter(metrics.registry, _sendMetrics, reactor)
        )
    _warnIfOpen(options["listen"], factory.portal is not None, factory.policy)
    for description in options["listen"]:
        listen(reactor, description, factory, service)
    if options["inherit-fd"]:
        InheritedPorts(
            reactor, parseInheritedDescriptors(options["inherit-fd"]), factory
        ).setServiceParent(service)
    return service


def _sendMetrics(snapshot: str) -> None:
    # A worker's standard output is the pipe its log records go to the
    # main process through (see tunnel.workers).
    sys.stdout.write(formatMetricsRecord(snapshot))
    sys.stdout.flush()


def _noteHostBits(options: Options) -> None:
    # 10.0.0.1/0 is every address, and passes for a restriction.
    for option in ("allow-from", "allow-to", "deny-to", "proxy-protocol-from"):
        for text in options[option]:
            note = hostBitsNote(text)
            if note is not None:
                _log.warn("--{option} {note}", option=option, note=note)


def _restrictsClients(policy: ITunnelPolicy) -> bool:
    # A RulesFilePolicy holds its current TunnelPolicy as .policy.
    inner = getattr(policy, "policy", policy)
    networks = getattr(inner, "allowFrom", ())
    # 0.0.0.0/0 (or 10.0.0.1/0) lets every IPv4 client in.
    return bool(networks) and all(network.prefixlen > 0 for network in networks)
