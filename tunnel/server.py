"""
The CONNECT handshake: the protocol that talks to a client, and its factory.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

from OpenSSL.SSL import Error as TLSError
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import LogEvent, Logger, LogLevel
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import Invalid, implementer
from zope.interface.verify import verifyObject

from .accesslog import escapeField
from .answers import ESTABLISHED, errorResponse, httpDate
from .auth import (
    FailureDamper,
    IProxyUser,
    SharedLogins,
    challengeHeaders,
    checkRealm,
    noLogout,
    parseBasicCredentials,
)
from .clients import clientKey, formatAddress, ipOf, unixClientKey
from .connector import HostnameConnector
from .idle import IdleWatch
from .interfaces import (
    OUT_OF_RESOURCES,
    AddressDenied,
    ITargetConnector,
    LookupsBusy,
    NoLocalPort,
    SourceUnusable,
    UpstreamCancelled,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimedOut,
    UpstreamUnreachable,
)
from .policy import (
    Denial,
    IPAddress,
    ITunnelPolicy,
    TunnelPolicy,
    inNetworks,
    parseAddress,
    parseNetwork,
)
from .proxyprotocol import InvalidProxyHeader, parseProxyHeader
from .relay import (
    Relay,
    RelayEvents,
    RelayResult,
    StreamTransport,
    TargetProtocol,
    canHalfClose,
)
from .request import (
    ConnectRequest,
    RequestRejected,
    findHeadEnd,
    isHeadRequest,
    overlongRequestLine,
    parseConnectHead,
    requestLineLength,
    strayCarriageReturn,
)
from .resolver import lookupClient
from .splice import SpliceRelay, canSplice, spliceAvailable

__all__ = [
    "MAX_EARLY_DATA",
    "MAX_PARTIAL_HEAD_BYTES_PER_CLIENT",
    "ConnectProxy",
    "ConnectProxyFactory",
]

#: How many bytes sent after the request head a connection holds for the
#: target while it is reached, by default (reading pauses beyond).
MAX_EARLY_DATA = 65536

#: How many bytes of partial request heads (begun, not ended) the
#: connections of one client address may make the proxy hold at once, by
#: default.  A head nearly always arrives whole, in one read, and so is
#: never counted; a large head over a long path arrives in a few reads, a
#: few tens of KiB each; what reaches this is a crowd of heads sent a little
#: at a time from one address (a slow-headers attack), each up to
#: C{--max-header-size} for up to C{--header-timeout}.
MAX_PARTIAL_HEAD_BYTES_PER_CLIENT = 16 << 20

#: After an error answer, how long the proxy keeps reading (and dropping)
#: what the client still sends, before it closes.
LINGER_SECONDS = 2.0
#: After an error answer, how many bytes the proxy reads (and drops) at most
#: before it closes.
LINGER_BYTES = 16 << 20

#: How many connections refused before they were counted (over a limit, or
#: outside --allow-from) may linger at once; beyond, the answer is written
#: and the connection closed at once, so that a flood of refused clients
#: cannot hold descriptors beyond the limits.
MAX_LINGERING_REFUSALS = 100

#: The most characters of a claimed user name kept for the log (with
#: C{...} after): a 64 KiB head may claim one that, percent-encoded in the
#: log lines and the access log, would cost the disk many times that.
MAX_LOGGED_USER = 256

#: The least seconds between two warnings that sockets to targets could not
#: be made (no descriptor or memory left).
OUT_OF_RESOURCES_WARNING_INTERVAL = 10.0


def _shortageOf(reason: Failure) -> tuple[str, str, str] | None:
    """
    Which of the proxy's own shortages, if any, failed a connection to a
    target: no descriptor or memory for a socket, no local port, or a
    source address it cannot bind to.

    @param reason: The connection's failure.
    @return: The limit the refusal names, the remedy the warning gives and
        what the answer says, or L{None} when the proxy is not short of
        anything.
    """
    if (
        reason.check(ConnectError)
        and getattr(reason.value, "osError", None) in OUT_OF_RESOURCES
    ):
        return "resources", _DESCRIPTORS_REMEDY, _OUT_OF_RESOURCES_ANSWER
    if reason.check(NoLocalPort):
        return "local-ports", _LOCAL_PORTS_REMEDY, _OUT_OF_RESOURCES_ANSWER
    if reason.check(SourceUnusable):
        return (
            "outgoing-address",
            _SOURCE_REMEDY,
            "The proxy cannot connect from its address; try again.",
        )
    return None


_OUT_OF_RESOURCES_ANSWER = "The proxy is out of resources; try again."
_DESCRIPTORS_REMEDY = (
    "see the file descriptor limit (ulimit -n, LimitNOFILE) and --max-tunnels"
)
_SOURCE_REMEDY = "is the --outgoing-address still an address of this host?"
_LOCAL_PORTS_REMEDY = (
    "every local port towards that address and port is in use; see "
    "net.ipv4.ip_local_port_range and net.ipv4.tcp_tw_reuse"
)


def _safeLogPrefix(transport: object, peer: IAddress | None) -> None:
    """
    Give a UNIX client's transport a log prefix that names its peer as
    L{formatAddress} does: Twisted's holds the name the client bound its
    socket to, raw, and a name with a line break or a worker's record
    separator in it would forge log lines (and, with C{--workers}, metrics).
    """
    if isinstance(getattr(transport, "logstr", None), str):
        sessionno = getattr(transport, "sessionno", 0)
        transport.logstr = (  # type: ignore[attr-defined]
            f"ConnectProxy,{sessionno},{formatAddress(peer)}"
        )


def _tlsUnfinished(transport: object) -> bool:
    """
    Whether C{transport} is TLS whose handshake has not finished: its
    connection (pyOpenSSL's, from C{getHandle}) has no cipher yet.
    """
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return False
    cipherName = getattr(getHandle(), "get_cipher_name", None)
    return cipherName is not None and cipherName() is None


class _LimitReached(RequestRejected):
    """
    A refusal by one of the proxy's own limits (a C{503} or C{429}), not by
    the request: the log line and the event name the limit.

    @ivar limit: Which: C{max-tunnels}, C{max-tunnels-per-client},
        C{partial-head-bytes}, C{failed-logins}, C{login-timeout},
        C{draining}, C{name-lookups}, C{resources}, C{local-ports} or
        C{outgoing-address}.
    """

    def __init__(
        self,
        limit: str,
        status: int,
        detail: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(status, detail, headers)
        self.limit = limit


def _tryAgain(
    detail: str, limit: str, status: int = 503, retryAfter: int = 1
) -> RequestRejected:
    """
    An answer that asks the client to try again later: the proxy is busy,
    or this client has too much open, not the request at fault.

    @param detail: What the body says.
    @param limit: Which limit refuses (see L{_LimitReached}).
    @param status: C{503}, or C{429} for one client's limit.
    @param retryAfter: Seconds, for the C{Retry-After} field.
    @return: The rejection.
    """
    return _LimitReached(
        limit, status, detail, [(b"Retry-After", b"%d" % (retryAfter,))]
    )


def _tuneTCP(transport: object, keepAlive: bool) -> None:
    """
    Turn off Nagle's algorithm on a TCP transport: a relay must pass small
    writes on at once, or every request/response exchange waits for an ACK.
    With C{keepAlive} (when tunnels have no idle timeout), also turn on TCP
    keepalive, so that a peer that vanished without a FIN or a reset (a
    machine switched off, a NAT that forgot the connection) ends its tunnel
    after the kernel's keepalive time, not never.
    """
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)
        if keepAlive:
            transport.setTcpKeepAlive(True)


@implementer(IProtocolFactory)
class _TargetFactory:
    """
    Hands the one L{TargetProtocol} of a tunnel to an endpoint.

    Like C{connectProtocol}'s factory, but quiet (a factory that logs its
    start and stop would log twice per tunnel) and small: an endpoint may
    keep it for as long as the tunnel lasts.
    """

    __slots__ = ("_target",)

    def __init__(self, target: TargetProtocol) -> None:
        self._target = target

    def doStart(self) -> None:
        """
        Nothing to start.
        """

    def doStop(self) -> None:
        """
        Nothing to stop.
        """

    def buildProtocol(self, addr: IAddress | None) -> TargetProtocol:
        """
        Give the tunnel's target protocol.
        """
        return self._target


@implementer(IHalfCloseableProtocol)
class ConnectProxy(Protocol, TimeoutMixin):
    """
    One client connection: read a CONNECT head, reach the target, answer,
    then hand both connections to a relay (a L{SpliceRelay} when both are
    plain TCP, else a L{Relay}).

    The head is buffered up to the factory's limits and no longer than its
    header timeout; anything wrong gets a precise HTTP error and a closed
    connection, and nothing after the head is ever read as a new request
    (RFC 9931).

    What it does with the bytes it reads is C{_reading}:
      - C{"proxy"}: the PROXY header a load balancer sends first
        (C{--proxy-protocol});
      - C{"head"}: the request head, up to its empty line;
      - C{"early"}: from the head on, while the credentials are checked and
        the target is reached: bytes are early data, held for the target
        (bounded: reading pauses beyond C{maxEarlyData});
      - C{"tunnel"}: the relay has them (the C{200} went out);
      - C{"done"}: answered with an error, or abandoned: what still comes is
        read and dropped while the connection lingers.

    @ivar factory: The factory that built this protocol; its limits and
        timeouts apply.
    """

    factory: ConnectProxyFactory
    # A Literal, not any str: mypy refuses the assignment of a misspelt
    # state (not a comparison with one, which it lets through).
    _reading: Literal["proxy", "head", "early", "tunnel", "done"]
    _log = Logger()

    # Thousands of tunnels stay open at once: this protocol's own state lives
    # in slots, not in its instance dict (which keeps what Twisted sets).
    __slots__ = (
        "_admitted",
        "_attempt",
        "_awaitingHeader",
        "_buffer",
        "_client",
        "_clientFinished",
        "_clientGone",
        "_clientIP",
        "_clientKey",
        "_connectStartedAt",
        "_connectedTo",
        "_connecting",
        "_early",
        "_earlyBytes",
        "_ended",
        "_establishedAt",
        "_limit",
        "_lingerBytes",
        "_lingerCounted",
        "_lingering",
        "_loggingIn",
        "_login",
        "_parentStatus",
        "_partialHeadBytes",
        "_peer",
        "_reading",
        "_refusal",
        "_relay",
        "_request",
        "_startedAt",
        "_targetName",
        "_timedOut",
        "_user",
    )

    def __init__(self) -> None:
        self._relay: RelayEvents | None = None
        self._request: ConnectRequest | None = None
        self._targetName = "-"
        self._connecting: Deferred[Any] | None = None
        self._ended: str | None = None
        self._user: str | None = None
        # Once logged in: the realm's avatar, or, if its logout does
        # something, a _Login of both (what an idle tunnel keeps).
        self._login: IProxyUser | _Login | None = None
        self._loggingIn: Deferred[Any] | None = None
        self._admitted = False
        self._connectedTo = "-"
        self._refusal: str | None = None
        self._limit: str | None = None
        self._parentStatus: int | None = None
        self._timedOut = False
        self._awaitingHeader = False
        self._partialHeadBytes = 0
        self._clientGone = False
        self._lingering: IDelayedCall | None = None
        self._lingerBytes = 0
        self._lingerCounted = False
        self._connectStartedAt: float | None = None
        self._establishedAt: float | None = None

    def callLater(
        self, delay: float, call: Callable[..., object], *args: object
    ) -> IDelayedCall:
        """
        Schedule on the factory's clock: L{TimeoutMixin}'s timer.

        A method rather than the bound C{callLater} that L{TimeoutMixin}
        expects in the instance: one object less per open connection.

        @param delay: Seconds from now.
        @param call: What to call then.
        @param args: Positional arguments for C{call}.
        @return: The scheduled call.
        """
        return self.factory.clock.callLater(delay, call, *args)

    def connectionMade(self) -> None:
        """
        Admit the client (limits, C{--allow-from}) and start the header
        timeout.
        """
        factory = self.factory
        self._client = cast(StreamTransport, self.transport)
        self._startedAt = factory.clock.seconds()
        self._buffer = b""
        self._early: list[bytes] | None = None
        self._earlyBytes = 0
        self._clientFinished = False
        factory.connections.add(self)
        _tuneTCP(self.transport, not factory.idleTimeout)
        self.setTimeout(factory.headerTimeout)
        peer = self._client.getPeer()
        if getattr(peer, "host", None) is None:
            _safeLogPrefix(self._client, peer)
        if factory.proxyProtocol:
            # The client's address comes in the PROXY header; admission by
            # address waits for it, but the connection counts against the
            # proxy-wide limit at once, so silent connections cannot pile up.
            self._reading = "proxy"
            self._identify(peer)
            trusted = factory.proxyProtocolFrom
            if (
                trusted
                and self._clientIP is not None
                and not inNetworks(self._clientIP, trusted)
            ):
                self._refusal = "balancer"
                self._reject(
                    RequestRejected(
                        403,
                        "This port takes connections from its load balancer "
                        "only (see --proxy-protocol-from).",
                    )
                )
                return
            full = factory.admit(None)
            if full is not None:
                self._reject(full)
                return
            factory.awaitingHeader += 1
            self._awaitingHeader = True
        else:
            self._reading = "head"
            self._admit(peer)

    def _identify(self, peer: IAddress | None) -> None:
        self._peer = formatAddress(peer)
        self._clientIP = ip = ipOf(peer)
        self._clientKey = (
            clientKey(ip) if ip is not None else unixClientKey(self._client)
        )

    def _admit(self, peer: IAddress | None) -> bool:
        """
        Apply the limits and C{--allow-from} to the client at C{peer}.

        @return: Whether the client was admitted (if not, it was answered).
        """
        factory = self.factory
        self._identify(peer)
        refusal = factory.admit(self._clientKey)
        if refusal is None:
            try:
                denial = factory.policy.checkClient(self._clientIP)
                if denial is not None:
                    refusal = self._denied(denial)
            except Exception:
                self._failedInternally(Failure(), "checking the client")
                return False
        if refusal is not None:
            self._reject(refusal)
            return False
        self._admitted = True
        factory.connectionAdmitted(self._clientKey)
        return True

    def _stopAwaitingHeader(self) -> None:
        if self._awaitingHeader:
            self._awaitingHeader = False
            self.factory.awaitingHeader -= 1

    def _endPartialHead(self) -> None:
        # Called only while a partial head is counted: nearly every head
        # arrives whole, and so costs no call here.
        counted, self._partialHeadBytes = self._partialHeadBytes, 0
        self.factory.partialHeadEnded(self._clientKey, counted)

    def _proxyHeaderData(self, data: bytes) -> None:
        buffer = self._buffer + data
        try:
            header = parseProxyHeader(buffer)
        except InvalidProxyHeader as e:
            self._reject(
                RequestRejected(400, f"A valid PROXY protocol header is required: {e}")
            )
            return
        if header is None:
            self._buffer = buffer
            return
        self._buffer = b""
        self._reading = "head"
        self._stopAwaitingHeader()
        # A LOCAL header (a health check) names no client: it is the
        # balancer itself.
        source = header.source or self._client.getPeer()
        if self._admit(source):
            rest = buffer[header.consumed :]
            if rest:
                self._headData(rest)

    # Reading the head.

    def dataReceived(self, data: bytes) -> None:
        """
        Feed the relay, or collect the head, or hold early data.

        @param data: Bytes from the client.
        """
        relay = self._relay
        if relay is not None:
            relay.clientData(data)
        elif self._reading == "head":
            self._headData(data)
        elif self._reading == "proxy":
            self._proxyHeaderData(data)
        elif self._lingering is not None:
            self._linger(data)
        elif self._reading == "early":
            if self._early is None:
                self._early = []
            self._early.append(data)
            self._earlyBytes += len(data)
            if self._earlyBytes > self.factory.maxEarlyData:
                # Flow control while the target is not reached yet: stop
                # reading rather than buffer without bound.
                self._client.pauseProducing()

    def _headData(self, data: bytes) -> None:
        factory = self.factory
        buffered = len(self._buffer)
        limit = factory.maxHeaderSize
        # Look only at what fits within the limit, so that the buffer never
        # holds more than the limit allows.
        window = self._buffer + data[: limit + 4 - buffered]
        found = findHeadEnd(window, max(0, buffered - 3), skipEmptyLines=True)
        if found is None:
            # Kept before any refusal too: the answer to a HEAD head has no
            # content.
            self._buffer = window
            refusal = factory.partialHeadGrew(
                self._clientKey, len(window) - self._partialHeadBytes
            )
            if refusal is not None:
                self._reject(refusal)
                return
            self._partialHeadBytes = len(window)
            stray = strayCarriageReturn(window, buffered)
            if stray is not None:
                self._reject(stray)
            elif requestLineLength(window) > factory.maxRequestLine:
                # 414, or 501 for a method longer than any known.
                self._reject(overlongRequestLine(window))
            elif len(window) > limit + 1:
                # Not at limit + 1: a head of the limit's length may have the
                # CR of its final CRLF there.
                self._reject(RequestRejected(431, "The request head is too large."))
            return
        if self._partialHeadBytes:
            self._endPartialHead()
        headLength, consumed = found
        head = self._buffer = window[:headLength]
        early = data[consumed - buffered :]
        if headLength > limit:
            self._reject(RequestRejected(431, "The request head is too large."))
            return
        try:
            request = parseConnectHead(head, factory.maxRequestLine)
        except RequestRejected as rejected:
            self._reject(rejected)
            return
        except Exception:
            # A request the parser did not foresee is answered, not left to
            # the reactor's "Unhandled Error" and a silent close.
            self._failedInternally(Failure(), "parsing the request head")
            return
        self._buffer = b""
        # The same timer now bounds authentication and reaching the target.
        self.setTimeout(factory.connectTimeout)
        self._request = request
        self._targetName = request.authority
        self._reading = "early"
        if early:
            self.dataReceived(early)
        if self._refusedForDrain():
            # Before the login: no password check for a request refused anyway.
            return
        self._authenticate(request)

    def timeoutConnection(self) -> None:
        """
        The one timer ran out: the head did not arrive in time (408, or,
        while a TLS handshake is still unfinished, a close without an
        answer), the credentials were not checked in time (503), or the
        target was not reached in time (504).
        """
        if self._reading in ("head", "proxy"):
            if _tlsUnfinished(self.transport):
                # A 408 would wait inside TLS for a handshake that never
                # ends: none is sent, and none is logged.
                self._abandon("tls-timeout")
                self._client.abortConnection()
                return
            self._reject(RequestRejected(408, "The request head took too long."))
        elif self._connecting is not None:
            self._timedOut = True
            self._connecting.cancel()
        elif self._reading == "early":
            self._reject(
                _tryAgain("Checking the credentials took too long.", "login-timeout")
            )

    # Who asks, and where to.

    def _authenticate(self, request: ConnectRequest) -> None:
        factory = self.factory
        portal = factory.portal
        if portal is None:
            self._authorize(request)
            return
        retryAfter = factory.damper.retryAfter(self._clientKey)
        if retryAfter is not None:
            self._reject(
                _tryAgain(
                    "Too many failed logins from your address (or logins still"
                    " being checked); try again later.",
                    "failed-logins",
                    429,
                    retryAfter,
                ),
            )
            return
        given = request.header(b"proxy-authorization")
        credentials = parseBasicCredentials(given)
        if credentials is None:
            # No header at all is how every browser starts: the 407 asks
            # for credentials, and failed nothing worth a warning.
            self._challenge("no valid Basic credentials" if given is not None else None)
            return
        claimed = credentials.username.decode("utf-8")
        self._user = (
            claimed
            if len(claimed) <= MAX_LOGGED_USER
            else claimed[:MAX_LOGGED_USER] + "..."
        )
        # Names the credentials without keeping them: many tunnels opened
        # at once with the same password are one guess, not many.
        self._attempt = hashlib.sha256(
            credentials.username + b"\0" + credentials.password
        ).digest()
        factory.damper.checking(self._clientKey, self._attempt)
        login = self._loggingIn = factory.login(credentials, self._attempt)
        login.addCallbacks(self._authenticated, self._authenticationFailed)
        # What the application's realm and policy do after the login must
        # not fail silently and leave the client waiting.
        login.addErrback(self._failedInternally, "after the login")

    def _authenticated(
        self, result: tuple[Any, IProxyUser, Callable[[], object]]
    ) -> None:
        self._loggingIn = None
        self.factory.damper.checked(self._clientKey, self._attempt, succeeded=True)
        _, avatar, logout = result
        self._login = avatar if logout is noLogout else _Login(avatar, logout)
        if self._reading == "done":
            # The client left, or its time ran out, while others waited for
            # the same check (or it could not be withdrawn).
            self._forgetIfDone()
            return
        if not isinstance(avatar.name, str):
            # It names the user in every record: bytes (twisted.cred's
            # avatarId, passed on as is) would fail when the tunnel ends.
            raise TypeError(
                f"the realm's avatar {avatar!r} has the name {avatar.name!r};"
                " IProxyUser.name must be a str"
            )
        self._user = avatar.name
        assert self._request is not None
        self._authorize(self._request)

    def _failedInternally(self, reason: Failure, doing: str) -> None:
        """
        Code of the application's (a policy, a realm) or ours failed while
        handling this request: log it, and answer 500 rather than leave the
        client waiting for a timeout.
        """
        self._log.failure(
            "Failed {doing} for {client}", reason, doing=doing, client=self._peer
        )
        if self._reading != "done":
            self._reject(
                RequestRejected(500, "The proxy could not handle this request.")
            )

    def _authenticationFailed(self, reason: Failure) -> None:
        self._loggingIn = None
        # A check withdrawn because every client waiting for it left counts
        # as a failure too: leaving at once must not make guessing cheaper.
        self.factory.damper.checked(self._clientKey, self._attempt, succeeded=False)
        if self._reading == "done":
            # The client left, or its time ran out.
            return
        if reason.check(UnauthorizedLogin, UnhandledCredentials):
            self._challenge("wrong user name or password")
            return
        self._log.failure("Checking credentials failed", reason)
        self._reject(RequestRejected(500, "Credentials could not be checked."))

    def _challenge(self, why: str | None) -> None:
        self._refusal = "auth"
        if why is not None:
            self._log.warn(
                "Authentication failed for {user} from {client}: {why}",
                user=escapeField(self._user or "-"),
                client=self._peer,
                why=why,
            )
        self._reject(
            RequestRejected(
                407,
                "This proxy needs a user name and password.",
                challengeHeaders(self.factory.realm),
            )
        )

    def _denied(self, denial: Denial, noneAllows: bool = True) -> RequestRejected:
        """
        The answer to a policy's refusal, whose reason is now the
        connection's.

        @param noneAllows: Whether the policy may have answered L{None}
            instead, to allow (not for C{addressDenial}, which only ever
            refuses).
        @raise TypeError: If the policy gave something else than a
            L{Denial}.
        """
        if not isinstance(denial, Denial):
            raise TypeError(
                f"the policy refused with {denial!r}; it must give a Denial"
                + (" (or None to allow)" if noneAllows else "")
            )
        headers = denial.headers
        if denial.status == 407 and not any(
            name.lower() == b"proxy-authenticate" for name, _ in headers
        ):
            # A 407 without a challenge leaves the client nothing to answer
            # (RFC 9110 section 11.7.1).
            headers += tuple(challengeHeaders(self.factory.realm))
        rejected = RequestRejected(denial.status, denial.detail, headers)
        self._refusal = denial.reason
        return rejected

    def _authorize(self, request: ConnectRequest) -> None:
        try:
            denial = self.factory.policy.checkTarget(
                self.avatar, self._clientIP, request.host, request.port
            )
            refusal = None if denial is None else self._denied(denial)
        except Exception:
            self._failedInternally(Failure(), "checking the target")
            return
        if refusal is not None:
            self._reject(refusal)
            return
        if self._refusedForDrain():
            # The drain began while the login was checked.
            return
        self._connect(request)

    def _refusedForDrain(self) -> bool:
        """
        Answer C{503} if the factory drains.

        @return: Whether it did.
        """
        if not self.factory.draining:
            return False
        self._reject(_tryAgain("The proxy is shutting down.", "draining"))
        return True

    # Reaching the target.

    def _connect(self, request: ConnectRequest) -> None:
        factory = self.factory
        policy = factory.policy
        user, client, host, port = (
            self.avatar,
            self._clientIP,
            request.host,
            request.port,
        )

        def checkAddress(address: IPAddress) -> bool:
            try:
                allowed = policy.checkAddress(user, client, host, port, address)
                if type(allowed) is not bool:
                    # A Denial is true: taken for a yes, it would open the
                    # very address it was meant to refuse.
                    raise TypeError(
                        f"the policy's checkAddress gave {allowed!r}; it must"
                        " give True or False"
                    )
                return allowed
            except Exception:
                self._failedInternally(Failure(), "checking an address")
                return False

        literal = parseAddress(host)
        if literal is not None and not checkAddress(literal):
            # An address literal is vetted here, whatever the connector: one
            # of the application's that forgets allowAddress (or hands the
            # address to a parent proxy) must not open the loopback,
            # private and metadata addresses the policy refuses.
            if self._reading != "done":
                self._refuseAddress(request)
            return

        def allowAddress(address: IPAddress) -> bool:
            # A literal, vetted above, is not asked about twice.
            return address == literal or checkAddress(address)

        target = TargetProtocol()
        # The lookups a name needs are this client's (a resolver gives each
        # client a share of its threads).  An address needs none; through a
        # parent proxy it needs the parent's name, one answer kept for every
        # client, so counted against none.
        asking = None if literal is not None else lookupClient.set(self._clientKey)
        try:
            endpoint = factory.connector.endpointForTarget(host, port, allowAddress)
            connecting = endpoint.connect(_TargetFactory(target))
        except Exception:
            self._log.failure(
                "Could not start connecting to {target}", target=request.authority
            )
            self._reject(
                RequestRejected(502, "The proxy could not reach the target."),
                "target-failed",
            )
            return
        finally:
            if asking is not None:
                lookupClient.reset(asking)
        if self._reading == "done":
            # The policy failed (answered 500) while the attempt started.
            connecting.addErrback(lambda _: None)
            connecting.cancel()
            return
        self._connecting = connecting
        self._connectStartedAt = factory.clock.seconds()
        connecting.addCallbacks(self._targetConnected, self._targetFailed)

    def _targetConnected(self, target: TargetProtocol) -> None:
        self._connecting = None
        if target.resetBeforeRelay() is not None:
            # Connected, then reset before this turn (a target that accepts
            # and aborts at once): a 200 would be followed by a reset at
            # once, and the reset would drop the 200 before it was sent.
            self._reject(
                RequestRejected(502, "The target reset the connection."),
                "target-failed",
            )
            return
        self.setTimeout(None)
        self._connectedTo = formatAddress(target.transport.getPeer())  # type: ignore[union-attr]
        _tuneTCP(target.transport, not self.factory.idleTimeout)
        self._establishedAt = self.factory.clock.seconds()
        self.factory.relaying += 1
        self._reading = "tunnel"
        factory = self.factory
        targetTransport = cast(StreamTransport, target.transport)
        relay: RelayEvents
        if factory.splice and canSplice(self._client) and canSplice(targetTransport):
            # Zero-copy; the relay sends the 200 ahead of the target's bytes.
            relay = SpliceRelay(
                self._client,
                targetTransport,
                factory.clock,
                factory.idleTimeout,
                self._relayEnded,
                factory.reactor,
                idleWatch=factory.idleWatch(),
            )
        else:
            relay = Relay(
                self._client,
                targetTransport,
                factory.clock,
                factory.idleTimeout,
                self._relayEnded,
                idleWatch=factory.idleWatch(),
            )
        self._relay = relay
        early = b"".join(self._early) if self._early else b""
        # What an idle tunnel keeps, times thousands: drop what the
        # handshake alone needed.
        self._early = None
        self._request = None
        self._clientIP = None
        if self._earlyBytes > factory.maxEarlyData:
            self._client.resumeProducing()
        relay.start(early, self._clientFinished, greeting=ESTABLISHED)
        # Anything the target already sent follows the 200.
        target.attach(relay)

    def _refuseAddress(self, request: ConnectRequest) -> None:
        """
        Answer with the policy's refusal when it allowed none of the target's
        addresses.
        """
        try:
            refusal = self._denied(
                self.factory.policy.addressDenial(request.host, request.port),
                noneAllows=False,
            )
        except Exception:
            self._failedInternally(Failure(), "explaining an address denial")
            return
        self._reject(refusal)

    def _targetFailed(self, reason: Failure) -> None:
        self._connecting = None
        if self._reading == "done":
            # Answered already, or the client left and the attempt was
            # cancelled on its behalf, whatever the connector reports.
            self._end(None, "client-left")
            return
        # (A cancellation the proxy made, for a client that left or when it
        # answered, came in above; one after the connect timeout is a 504
        # below; one the connector made itself is a failure like any other.)
        if reason.check(AddressDenied):
            assert self._request is not None
            self._refuseAddress(self._request)
            return
        rejected = self._parentFailed(reason)
        if rejected is None:
            rejected = self._connectFailed(reason)
        self._reject(rejected, "target-failed")

    def _parentFailed(self, reason: Failure) -> RequestRejected | None:
        """
        The answer, logged, to a failure of the parent proxy (C{--upstream}).

        @return: A 502 or 504; L{None} if C{reason} is not the parent's.
        """
        if reason.check(UpstreamRefused):
            refused = cast(UpstreamRefused, reason.value)
            self._parentStatus = refused.status
            self._log.info(
                "Parent proxy refused {target}: {status} {reason}",
                target=self._targetName,
                status=refused.status,
                reason=refused.reason,
            )
            return RequestRejected(
                502, f"The parent proxy refused: {refused.status} {refused.reason}"
            )
        if reason.check(UpstreamUnreachable, UpstreamProtocolError):
            unreachable = reason.check(UpstreamUnreachable) is not None
            self._log.info(
                "Parent proxy {what} for {target}: {why}",
                what="unreachable" if unreachable else "failed",
                target=self._targetName,
                why=str(reason.value),
            )
            return RequestRejected(
                502,
                "The parent proxy could not be reached."
                if unreachable
                else "The parent proxy failed.",
            )
        if reason.check(UpstreamTimedOut) or (
            self._timedOut and reason.check(UpstreamCancelled)
        ):
            value = reason.value
            why = (
                value.timeoutText(None)
                if isinstance(value, UpstreamCancelled)
                else str(value)
            )
            self._log.info(
                "Parent proxy timed out for {target}: {why}",
                target=self._targetName,
                why=why,
            )
            return RequestRejected(504, "The parent proxy did not answer in time.")
        return None

    def _connectFailed(self, reason: Failure) -> RequestRejected:
        """
        The answer to a failure to reach the target itself.

        @return: A 504 after the connect timeout, a 503 when the proxy (not
            the target) is short of something, else a 502.
        """
        if self._timedOut or reason.check(ConnectTimeoutError, DeferredTimeoutError):
            return RequestRejected(504, "Connecting to the target timed out.")
        shortage = _shortageOf(reason)
        if shortage is not None:
            # The target is not at fault: the proxy is short of something.
            limit, remedy, detail = shortage
            self.factory.outOfResources(str(reason.value), remedy)
            return _tryAgain(detail, limit)
        if reason.check(LookupsBusy):
            return _tryAgain(
                "Too many name lookups are waiting; try again.", "name-lookups"
            )
        if reason.check(DNSLookupError):
            return RequestRejected(502, "The target host name does not resolve.")
        if reason.check(ConnectionRefusedError):
            return RequestRejected(502, "The target refused the connection.")
        if reason.check(ConnectError) is None:
            if reason.check(CancelledError):
                # The connector gave up on its own (a deadline of its own,
                # say): not the proxy's doing, not a fault to log with a
                # traceback.
                self._log.info(
                    "The connector gave up reaching {target}", target=self._targetName
                )
            else:
                self._log.failure(
                    "Unexpected failure reaching {target}",
                    reason,
                    target=self._targetName,
                )
        return RequestRejected(502, "The proxy could not reach the target.")

    # Ending.

    def _stopLoggingIn(self) -> None:
        """
        Leave the login under way, if any: once no connection waits for
        its check, the check is withdrawn (one still waiting for a thread
        then does not run).  The login's outcome still comes.
        """
        login, self._loggingIn = self._loggingIn, None
        if login is not None:
            self.factory.leaveLogin(self._attempt, login)

    def _reject(self, rejected: RequestRejected, ended: str = "refused") -> None:
        if isinstance(rejected, _LimitReached):
            self._limit = rejected.limit
        self.setTimeout(None)
        self._reading = "done"
        self._stopLoggingIn()
        # RFC 9110 section 9.3.2: no content in an answer to HEAD (whose
        # head, complete or not, is still in the buffer).
        content = not isHeadRequest(self._buffer)
        self._buffer = b""
        if self._partialHeadBytes:
            self._endPartialHead()
        self._early = None
        self._client.write(
            errorResponse(
                rejected.status,
                rejected.detail,
                rejected.headers,
                self.factory.date(),
                content,
            )
        )
        if canHalfClose(self._client) and self._mayLinger():
            # Closing a socket with unread input makes the kernel send a
            # reset, which can destroy the response before the client reads
            # it (RFC 9112 section 9.6).  So send FIN, then read and drop
            # what the client still sends, bounded in bytes and time.
            self._client.loseWriteConnection()
            if self._earlyBytes > self.factory.maxEarlyData:
                self._client.resumeProducing()
        else:
            self._client.loseConnection()
        # Whatever the transport (a TLS client may never finish its
        # handshake, so the answer never flushes), the connection is gone
        # after the linger time.
        self._lingering = self.factory.clock.callLater(
            LINGER_SECONDS, self._client.abortConnection
        )
        self._end(rejected.status, ended, detail=rejected.detail)
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()

    def _mayLinger(self) -> bool:
        if self._admitted:
            # Counted against the limits until it closes.
            return True
        factory = self.factory
        if factory.lingeringRefusals >= factory.maxLingeringRefusals:
            return False
        factory.lingeringRefusals += 1
        self._lingerCounted = True
        return True

    def _linger(self, data: bytes) -> None:
        self._lingerBytes += len(data)
        if self._lingerBytes > LINGER_BYTES:
            self._client.loseConnection()

    def readConnectionLost(self) -> None:
        """
        The client sent FIN.

        During the head, the client gave up.  While connecting, a client
        that sent early data wants it delivered and its FIN passed on; one
        that sent nothing has left, and the attempt is cancelled.
        """
        if self._relay is not None:
            self._relay.clientFinished()
        elif self._reading == "early" and self._early:
            self._clientFinished = True
        else:
            self._client.loseConnection()
            self._abandon()

    def writeConnectionLost(self) -> None:
        """
        Our FIN to the client went out: nothing to do, the relay sent it
        itself and knows.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The client connection is closed.

        @param reason: Why.
        """
        self._clientGone = True
        if self._ended is not None:
            self.factory.answered -= 1
        self._stopAwaitingHeader()
        if self._partialHeadBytes:
            self._endPartialHead()
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        if self._lingerCounted:
            self._lingerCounted = False
            self.factory.lingeringRefusals -= 1
        if self._admitted:
            self._admitted = False
            self.factory.connectionClosed(self._clientKey)
        if self._relay is not None:
            self._relay.clientLost(reason)
        elif reason.check(TLSError):
            # Behind an ssl: listener: a client that does not speak TLS, or
            # does not trust the certificate.  The operator needs to tell
            # that from a client that simply left.
            self._abandon("tls-failed")
        else:
            self._abandon()
        self._forgetIfDone()

    def _forgetIfDone(self) -> None:
        # The factory counts a connection as open until it is closed and has
        # logged its event, so a drain ends only when both have happened.
        if self._clientGone and self._ended is not None:
            self.factory._connectionGone(self)
            login, self._login = self._login, None
            if isinstance(login, _Login):
                try:
                    login.logout()
                except Exception:
                    self._log.failure(
                        "Logging out {user} failed", user=escapeField(self._user or "-")
                    )

    def _abandon(self, ended: str = "client-left") -> None:
        self.setTimeout(None)
        self._reading = "done"
        self._stopLoggingIn()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        else:
            self._end(None, ended)

    def _relayEnded(self, result: RelayResult) -> None:
        self.factory.relaying -= 1
        self._end(200, result.ended, result.bytesUp, result.bytesDown)

    def _end(
        self,
        status: int | None,
        ended: str,
        bytesUp: int = 0,
        bytesDown: int = 0,
        detail: str | None = None,
    ) -> None:
        """
        Emit the one log event for this connection.

        @param detail: What an error answer told the client, if one did.
        """
        if self._ended is not None:
            return
        self._ended = ended
        factory = self.factory
        if not self._clientGone:
            factory.answered += 1
        if not (factory.logTunnels or factory.tunnelObservers):
            self._forgetIfDone()
            return
        fields = self._tunnelEvent(status, ended, bytesUp, bytesDown, detail)
        # Each reading of self._log makes a new Logger (it is a descriptor
        # that binds the source): once will do.
        log = self._log
        if factory.logTunnels:
            log.info("{line}", **fields)
        if factory.tunnelObservers:
            fields.update(
                log_logger=log,
                log_level=LogLevel.info,
                log_namespace=log.namespace,
                log_source=self,
                log_format="{line}",
                log_time=time.time(),
            )
            for observer in tuple(factory.tunnelObservers):
                try:
                    observer(fields)
                except Exception:
                    log.failure(
                        "Tunnel observer {observer!r} failed", observer=observer
                    )
        self._forgetIfDone()

    def _tunnelEvent(
        self,
        status: int | None,
        ended: str,
        bytesUp: int,
        bytesDown: int,
        detail: str | None = None,
    ) -> dict[str, Any]:
        """
        The fields of the one event for this connection (see the README's
        I{Logging}), its log line among them.
        """
        factory = self.factory
        now = factory.clock.seconds()
        established = self._establishedAt
        connectStarted = self._connectStartedAt
        user = self._user or "-"
        target = self._targetName
        shownStatus = status if status is not None else "-"
        duration = now - self._startedAt
        # CONNECT only once a CONNECT request was read: a 400, 405 or 501
        # answered something else.  A refusal says which rule refused (port,
        # address, destination, client, auth), as the 403's body names the
        # option, or which of the proxy's limits; a parent proxy's refusal,
        # its status.
        method = "CONNECT" if target != "-" else "-"
        why = f" ({self._refusal})" if self._refusal is not None else ""
        if self._limit is not None:
            why += f" ({self._limit})"
        if self._parentStatus is not None:
            why += f" (parent {self._parentStatus})"
        # The line is built here, once, with an f-string: the logger's own
        # formatting of nine fields costs more than the rest of a handshake's
        # bookkeeping.  The fields stay in the event for observers.
        fields = {
            # The user name is the client's word until checked: escaped, it
            # can neither split the line nor reach a terminal as controls.
            "line": f"{self._peer} {escapeField(user)} {method} {target} {shownStatus} "
            f"up={bytesUp} down={bytesDown} {duration:.3f}s {ended}{why}",
            "tunnelEvent": True,
            "client": self._peer,
            "user": user,
            "target": target,
            "connectedTo": self._connectedTo,
            "status": shownStatus,
            "bytesUp": bytesUp,
            "bytesDown": bytesDown,
            "duration": duration,
            "handshake": (established if established is not None else now)
            - self._startedAt,
            "connect": established - connectStarted
            if established is not None and connectStarted is not None
            else None,
            "refusal": self._refusal,
            "limit": self._limit,
            "parentStatus": self._parentStatus,
            "detail": detail,
            "ended": ended,
        }
        return fields

    def closeIfIdle(self) -> None:
        """
        Close this connection if it has not sent a byte yet: during a drain,
        a connection that has not started a request never will.
        """
        if self._reading in ("head", "proxy") and not self._buffer:
            self._reading = "done"
            self.setTimeout(None)
            self._client.loseConnection()
            self._end(None, "shutdown")

    # What an application may read of a connection that is open (the
    # factory's connections): who, where to, and how much so far.  Read
    # from the state the proxy keeps anyway, so they cost no memory.

    @property
    def client(self) -> str:
        """
        The client's address (C{host:port}, or the PROXY header's source),
        as the log shows it.
        """
        return self._peer

    @property
    def user(self) -> str | None:
        """
        The user name: the one authenticated, or claimed while the check
        runs or after it failed (its first L{MAX_LOGGED_USER} characters
        and C{...}, if longer); L{None} without credentials.
        """
        return self._user

    @property
    def avatar(self) -> IProxyUser | None:
        """
        The realm's avatar once the user is authenticated, else L{None}.
        """
        login = self._login
        return login.avatar if isinstance(login, _Login) else login

    @property
    def target(self) -> str | None:
        """
        The target as requested (C{host:port}), once a CONNECT was read.
        """
        return None if self._targetName == "-" else self._targetName

    @property
    def established(self) -> bool:
        """
        Whether the tunnel is established (the 200 was sent).
        """
        return self._relay is not None

    @property
    def bytesUp(self) -> int:
        """
        Bytes relayed from the client to the target so far.
        """
        return self._relay.bytesUp if self._relay is not None else 0

    @property
    def bytesDown(self) -> int:
        """
        Bytes relayed from the target to the client so far.
        """
        return self._relay.bytesDown if self._relay is not None else 0

    def abortTunnel(self) -> None:
        """
        Close this connection at once, whatever stage it is in.
        """
        if self._relay is not None:
            self._relay.abort("shutdown")
        else:
            # The proxy ended it, not the client: said before the close
            # makes the connection look abandoned.
            self._end(None, "shutdown")
            self._client.abortConnection()


class _Login:
    """
    A login whose logout does something: the avatar, and its logout.
    """

    __slots__ = ("avatar", "logout")

    def __init__(self, avatar: IProxyUser, logout: Callable[[], object]) -> None:
        self.avatar = avatar
        self.logout = logout


def _checkSeconds(
    name: str,
    value: object,
    noneAllowed: bool = False,
    zeroAllowed: bool = False,
) -> None:
    """
    Refuse a timeout that is not a positive number of seconds.

    @raise TypeError: For something that is not a number (nor an allowed
        L{None}).
    @raise ValueError: For a negative one, or zero unless C{zeroAllowed}.
    """
    if value is None and noneAllowed:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    # NaN compares false with everything, so it is asked for by name.
    if not math.isfinite(value) or value < 0 or (value == 0 and not zeroAllowed):
        raise ValueError(f"{name} must be more than 0 seconds, not {value!r}")


def _checkCount(
    name: str, value: object, least: int = 1, noneAllowed: bool = False
) -> None:
    """
    Refuse a size or count that is not an C{int} of at least C{least}.

    @raise TypeError: For something that is not an C{int} (nor an allowed
        L{None}).
    @raise ValueError: For one below C{least}.
    """
    if value is None and noneAllowed:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, not {value!r}")


@implementer(IProtocolNegotiationFactory)
class ConnectProxyFactory(Factory):
    """
    Builds a L{ConnectProxy} for each client connection.

    Put it behind any server endpoint::

        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString
        from tunnel import ConnectProxyFactory

        serverFromString(reactor, "tcp:8080:interface=127.0.0.1").listen(
            ConnectProxyFactory(reactor=reactor))

    The constructor's parameters are kept as the attributes of the same
    names, with their defaults filled in.

    @ivar reactor: The reactor.
    @ivar clock: Schedules every timeout; by default the reactor.
    @ivar connector: Reaches the targets; by default a L{HostnameConnector}.
    @ivar policy: Decides who may tunnel where; by default a
        L{TunnelPolicy}.
    @ivar portal: Checks credentials, or L{None} for no authentication.
    @ivar realm: The realm named in the 407 challenge.
    @ivar headerTimeout: Seconds a client has to send its request head.
    @ivar connectTimeout: Seconds allowed to reach the target, or L{None}.
    @ivar idleTimeout: Seconds without traffic before a tunnel is closed,
        or L{None} (also for an C{idleTimeout} of C{0}).
    @ivar maxRequestLine: The longest request line, in bytes.
    @ivar maxHeaderSize: The largest request head, in bytes.
    @ivar maxEarlyData: How many bytes after the head are held while the
        target is reached.
    @ivar maxTunnels: The most client connections at once, or L{None}.
    @ivar maxTunnelsPerClient: The most per client address, or L{None}.
    @ivar maxPartialHeadBytesPerClient: The most bytes of partial request
        heads the connections of one client address may make the proxy hold,
        or L{None}.
    @ivar damper: Refuses clients after repeated failed logins.
    @ivar proxyProtocol: Whether connections start with a PROXY header.
    @ivar proxyProtocolFrom: The networks PROXY headers are taken from
        (empty: any).
    @ivar splice: Whether plain TCP tunnels use a L{SpliceRelay}; by
        default what L{spliceAvailable} says.
    @ivar logTunnels: Whether tunnel events go to the global log.
    @ivar connections: The client connections open now.
    @ivar relaying: How many tunnels are established and relaying now.
    @ivar answered: How many connections have their answer (a refusal, or
        the end of their tunnel) and are only waiting to close: neither
        handshakes nor tunnels any more.
    @ivar awaitingHeader: How many connections are waiting for their PROXY
        header (with C{proxyProtocol}); they count against C{maxTunnels}.
    @ivar lingeringRefusals: How many connections refused before they were
        counted (over a limit, or outside C{--allow-from}) are lingering now,
        reading and dropping what the client still sends after the answer.
    @ivar maxLingeringRefusals: The most such connections that may linger
        at once (L{MAX_LINGERING_REFUSALS}); beyond, the answer is written
        and the connection closed at once.
    @ivar draining: Whether the factory drains (L{drain} was called, and a
        L{tunnel.service.ProxyService} has not started it again): new
        requests get a 503.
    @ivar tunnelObservers: Log observers given the event that ends each
        client connection (marked C{tunnelEvent}) directly, whether or not
        it also goes to the global log (C{logTunnels}): the access log and
        the metrics.
    """

    protocol = ConnectProxy  # type: ignore[assignment]
    _log = Logger()

    def __init__(
        self,
        connector: ITargetConnector | None = None,
        *,
        reactor: Any = None,
        clock: IReactorTime | None = None,
        policy: ITunnelPolicy | None = None,
        portal: Portal | None = None,
        realm: str = "tunnel",
        headerTimeout: float = 10,
        connectTimeout: float | None = 15,
        idleTimeout: float | None = 600,
        maxRequestLine: int = 8192,
        maxHeaderSize: int = 65536,
        maxEarlyData: int = MAX_EARLY_DATA,
        maxTunnels: int | None = None,
        maxTunnelsPerClient: int | None = None,
        maxPartialHeadBytesPerClient: int | None = MAX_PARTIAL_HEAD_BYTES_PER_CLIENT,
        damper: FailureDamper | None = None,
        proxyProtocol: bool = False,
        splice: bool | None = None,
        logTunnels: bool = True,
        proxyProtocolFrom: Sequence[str] = (),
    ) -> None:
        """
        @param connector: Chooses how targets are reached; by default a
            L{HostnameConnector} on C{reactor}.
        @param reactor: The reactor; by default the global one.
        @param clock: Schedules timeouts; by default C{reactor}.
        @param policy: Decides who may tunnel where; by default a
            L{TunnelPolicy}: port 443 only, public addresses only.
        @param portal: Checks C{Proxy-Authorization} credentials, with
            L{IProxyUser} avatars; L{None} means no authentication.
        @param realm: The realm named in the 407 challenge (no control
            characters: L{ValueError} otherwise).
        @param headerTimeout: Seconds a client has to send its request head
            before it gets a 408.
        @param connectTimeout: Seconds allowed to check the credentials
            (503 after) and to reach the target (504 after); L{None} sets no
            limit of the factory's own, leaving only the connector's (the
            default connector's is 30 seconds per connection attempt): a
            portal or a connector of yours that never answers then keeps
            the client waiting until it leaves.
        @param idleTimeout: Seconds without traffic in either direction after
            which a tunnel is closed; C{0} or L{None} disables it.
        @param maxRequestLine: The longest request line, in bytes (414).
        @param maxHeaderSize: The largest request head, in bytes (431).
        @param maxEarlyData: How many bytes sent after the head are held
            while the target is reached before the proxy stops reading.
        @param maxTunnels: The most client connections at once, handshakes
            included; beyond it new ones get a 503.  L{None}: no limit.
        @param maxTunnelsPerClient: The same, per client address; beyond it
            a 429.
        @param maxPartialHeadBytesPerClient: The most bytes of partial
            request heads (begun, not ended) the connections of one client
            address (see L{clientKey}) may make the proxy hold at once; the
            connection whose partial head would go beyond it gets a 429.
            Heads that arrive whole are never counted, so this bounds what
            one address can make the proxy hold in unfinished heads
            without touching bursts of ordinary requests.  L{None}: no
            limit.
        @param damper: Refuses clients after repeated failed logins; by
            default 10 failures a minute.
        @param proxyProtocol: Whether every connection starts with a PROXY
            protocol (v1 or v2) header from a load balancer, whose source
            address is then the client's for the policy, the limits and the
            logs.  Connections without a valid header get a 400.
        @param proxyProtocolFrom: With C{proxyProtocol}, the networks (CIDR
            or address) the load balancers connect from: a connection from
            anywhere else gets a 403 before its header is read, since its
            header would name any client it likes.  Empty: from anywhere
            (clients of a UNIX listener are never refused by it).
        @param splice: Whether tunnels between two plain TCP connections
            move their bytes with C{splice(2)} (a L{SpliceRelay}) instead of
            through Python (a L{Relay}); by default, wherever the system
            can (L{spliceAvailable}).
        @param logTunnels: Whether the event that ends each client
            connection goes to the global log (twistd's log file).  The
            L{tunnelObservers} get it either way.
        @raise TypeError: If C{connector} or C{policy} does not provide its
            interface (or lacks one of its methods), C{portal} has no
            C{login}, C{realm} is no L{str}, a number is not one, or
            C{proxyProtocolFrom} is a string rather than a sequence of them.
        @raise ValueError: For a timeout that is not positive (or, the idle
            timeout, negative), or a size or count below one (early data:
            below zero).
        """
        # Checked now, where a mistake is one traceback at start-up, rather
        # than a 500 (or a client left waiting) on every request.
        for name, value, interface in (
            ("connector", connector, ITargetConnector),
            ("policy", policy, ITunnelPolicy),
        ):
            if value is not None and not interface.providedBy(value):
                raise TypeError(
                    f"{name} must provide {interface.__name__}"
                    f" (@implementer({interface.__name__})), not {value!r}"
                )
            if value is not None:
                try:
                    verifyObject(interface, value)
                except Invalid as e:
                    raise TypeError(
                        f"{name} does not implement {interface.__name__}: {e}"
                    ) from None
        _checkSeconds("headerTimeout", headerTimeout)
        _checkSeconds("connectTimeout", connectTimeout, noneAllowed=True)
        _checkSeconds("idleTimeout", idleTimeout, noneAllowed=True, zeroAllowed=True)
        _checkCount("maxRequestLine", maxRequestLine)
        _checkCount("maxHeaderSize", maxHeaderSize)
        _checkCount("maxEarlyData", maxEarlyData, least=0)
        _checkCount("maxTunnels", maxTunnels, noneAllowed=True)
        _checkCount("maxTunnelsPerClient", maxTunnelsPerClient, noneAllowed=True)
        _checkCount(
            "maxPartialHeadBytesPerClient",
            maxPartialHeadBytesPerClient,
            noneAllowed=True,
        )
        if isinstance(proxyProtocolFrom, (str, bytes)):
            raise TypeError(
                "proxyProtocolFrom must be a sequence of networks, such as"
                f" [{proxyProtocolFrom!r}], not {type(proxyProtocolFrom).__name__}"
            )
        if portal is not None and not callable(getattr(portal, "login", None)):
            raise TypeError(
                f"portal must be a twisted.cred Portal (with login), not {portal!r}"
            )
        if not isinstance(realm, str):
            raise TypeError(
                f"realm is the str named in the 407 challenge, not {realm!r}"
                " (a twisted.cred IRealm goes into the portal)"
            )
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        # The connect timeout bounds reaching the target, so the default
        # connector keeps no timer of its own (one less scheduled call to
        # make and cancel on every handshake), unless there is no connect
        # timeout: then the connector's bounds each attempt.
        self.connector: ITargetConnector = (
            connector
            if connector is not None
            else HostnameConnector(
                reactor, timeout=None if connectTimeout is not None else 30
            )
        )
        self.policy: ITunnelPolicy = policy if policy is not None else TunnelPolicy()
        self.portal = portal
        self.realm = checkRealm(realm)
        self.headerTimeout = headerTimeout
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout or None
        self.maxRequestLine = maxRequestLine
        self.maxHeaderSize = maxHeaderSize
        self.maxEarlyData = maxEarlyData
        self.maxTunnels = maxTunnels
        self.maxTunnelsPerClient = maxTunnelsPerClient
        self.maxPartialHeadBytesPerClient = maxPartialHeadBytesPerClient
        self.damper = damper if damper is not None else FailureDamper(self.clock)
        self.proxyProtocol = proxyProtocol
        self.proxyProtocolFrom = tuple(parseNetwork(t) for t in proxyProtocolFrom)
        self.splice = spliceAvailable() if splice is None else splice
        self.logTunnels = logTunnels
        self.tunnelObservers: list[Callable[[LogEvent], object]] = []
        self.connections: set[ConnectProxy] = set()
        self._outOfResourcesWarnedAt: dict[str, float] = {}
        self.relaying = 0
        # Connections that have their answer (a refusal, or an end) and are
        # only waiting to close: no longer handshakes, nor tunnels.
        self.answered = 0
        self.awaitingHeader = 0
        self.lingeringRefusals = 0
        self.maxLingeringRefusals = MAX_LINGERING_REFUSALS
        self._logins = SharedLogins()
        self.draining = False
        self._drained: list[Deferred[None]] = []
        self._open = 0
        self._openPerClient: dict[str, int] = {}
        self._partialHeadBytes: dict[str, int] = {}
        self._idleWatch: IdleWatch | None = None
        self._date = (float("nan"), b"")

    def date(self) -> bytes:
        """
        The time, as the C{Date} field of the proxy's own answers gives it
        (made once a second at most).

        @return: The field's value.
        """
        now = int(self.clock.seconds())
        if now != self._date[0]:
            self._date = (now, httpDate(now))
        return self._date[1]

    def idleWatch(self) -> IdleWatch | None:
        """
        The watch that applies the idle timeout to this factory's tunnels:
        one timer for all of them.

        @return: The watch for the current C{idleTimeout}, or L{None} if
            there is none.
        """
        timeout = self.idleTimeout
        if not timeout:
            return None
        watch = self._idleWatch
        if watch is None or watch.timeout != timeout:
            watch = self._idleWatch = IdleWatch(self.clock, timeout)
        return watch

    def acceptableProtocols(self) -> list[bytes]:
        """
        Offer C{http/1.1} in ALPN.

        Behind an C{ssl:} listener, a factory that offers no protocol makes
        Twisted abort the handshake of any client that sends ALPN (curl's
        C{--proxy https://} does), so name the one this proxy speaks.

        @return: C{[b"http/1.1"]}.
        """
        return [b"http/1.1"]

    def admit(self, client: str | None) -> RequestRejected | None:
        """
        Apply the connection limits to a new client connection.

        @param client: The client's key (its IPv4 address, its IPv6 /64, or
            C{uid N} on a UNIX socket), or L{None} to apply only the
            proxy-wide limit (before a PROXY header has said who it is).
        @return: L{None} to admit it, or the refusal: 503 when the proxy is
            full, 429 when this client holds its share.
        """
        if (
            self.maxTunnels is not None
            and self._open + self.awaitingHeader >= self.maxTunnels
        ):
            return _tryAgain("The proxy is at capacity.", "max-tunnels")
        if (
            client is not None
            and self.maxTunnelsPerClient is not None
            and self._openPerClient.get(client, 0) >= self.maxTunnelsPerClient
        ):
            return _tryAgain(
                "Too many connections from your address.",
                "max-tunnels-per-client",
                429,
            )
        return None

    def login(
        self, credentials: UsernamePassword, attempt: bytes
    ) -> Deferred[tuple[Any, IProxyUser, Callable[[], object]]]:
        """
        Check C{credentials} through the portal, joining a check of the
        same credentials still running (see L{SharedLogins}).

        @param credentials: What the client sent.
        @param attempt: Names C{credentials} (a digest of them).
        @return: Fires with the portal's login result, or fails with its
            failure.
        """
        assert self.portal is not None
        return self._logins.login(self.portal, credentials, attempt)

    def leaveLogin(self, attempt: bytes, login: Deferred[Any]) -> None:
        """
        A connection that asked L{login} for C{attempt} no longer waits for
        the answer (see L{SharedLogins.leave}).

        @param attempt: What was given to L{login}.
        @param login: What L{login} gave it.
        """
        self._logins.leave(attempt, login)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Let open connections finish, then close what remains.

        Connections that have not sent a byte are closed at once, and
        every request whose head completes from now on gets a 503 (one
        whose credentials are being checked gets it once they are).  After
        C{timeout} seconds every connection still open is aborted.

        @param timeout: Seconds to wait before aborting.
        @return: A Deferred that fires when every connection is closed.
        """
        self.draining = True
        done: Deferred[None] = Deferred()
        if not self.connections:
            self._log.info("Drained: no connection was open")
            done.callback(None)
            return done
        self._drained.append(done)
        self._log.info(
            "Draining: waiting up to {timeout}s for {count} open connection(s)",
            timeout=timeout,
            count=len(self.connections),
        )
        for connection in list(self.connections):
            connection.closeIfIdle()

        def abortRemaining() -> None:
            self._log.info(
                "Drain timeout: aborting {count} connection(s)",
                count=len(self.connections),
            )
            for connection in list(self.connections):
                connection.abortTunnel()

        deadline = self.clock.callLater(timeout, abortRemaining)

        def finished(result: None) -> None:
            if deadline.active():
                deadline.cancel()
            self._log.info("Drained: every connection is closed")

        done.addCallback(finished)
        return done

    def outOfResources(self, why: str, remedy: str = _DESCRIPTORS_REMEDY) -> None:
        """
        A connection to a target could not be made for want of descriptors,
        memory, local ports or its source address: warn, at most once every
        C{OUT_OF_RESOURCES_WARNING_INTERVAL} seconds for each error (they
        come in floods).

        @param why: The error: one of few texts (an errno's, or a source
            address's), so that each is timed apart and all are told.
        @param remedy: What the operator may look at (by default the
            descriptor limit and C{--max-tunnels}).
        """
        now = self.clock.seconds()
        warnedAt = self._outOfResourcesWarnedAt.get(why, float("-inf"))
        if now - warnedAt >= OUT_OF_RESOURCES_WARNING_INTERVAL:
            self._outOfResourcesWarnedAt[why] = now
            self._log.warn(
                "Out of resources for sockets to targets ({why}): clients get "
                "503; {remedy}",
                why=why,
                remedy=remedy,
            )

    def _connectionGone(self, connection: ConnectProxy) -> None:
        self.connections.discard(connection)
        if self._drained and not self.connections:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def partialHeadGrew(self, client: str, grown: int) -> RequestRejected | None:
        """
        A connection of C{client} holds C{grown} more bytes of a partial
        request head: count them, unless the client would go beyond its
        share.

        @param client: The client's key (see L{connectionAdmitted}).
        @param grown: How many more bytes it holds.
        @return: L{None} if counted (L{partialHeadEnded} must follow, with
            all the bytes counted for that head), or the refusal, a 429.
        """
        held = self._partialHeadBytes.get(client, 0) + grown
        limit = self.maxPartialHeadBytesPerClient
        if limit is not None and held > limit:
            return _tryAgain(
                "Too many unfinished requests from your address.",
                "partial-head-bytes",
                429,
            )
        self._partialHeadBytes[client] = held
        return None

    def partialHeadEnded(self, client: str, counted: int) -> None:
        """
        A partial head counted by L{partialHeadGrew} ended: it is whole, it
        was refused, or its connection closed.

        @param client: The key given to L{partialHeadGrew}.
        @param counted: All the bytes counted for it.
        """
        left = self._partialHeadBytes[client] - counted
        if left:
            self._partialHeadBytes[client] = left
        else:
            del self._partialHeadBytes[client]

    def connectionAdmitted(self, client: str) -> None:
        """
        Count an admitted client connection (from its handshake on, whether
        it becomes a tunnel or not).

        @param client: The client's key, for the per-client limit: its IPv4
            address, its IPv6 /64, or C{uid N} on a UNIX socket.
        """
        self._open += 1
        self._openPerClient[client] = self._openPerClient.get(client, 0) + 1

    def connectionClosed(self, client: str) -> None:
        """
        Stop counting an admitted client connection.

        @param client: The key given to L{connectionAdmitted}.
        """
        self._open -= 1
        left = self._openPerClient[client] - 1
        if left:
            self._openPerClient[client] = left
        else:
            del self._openPerClient[client]
