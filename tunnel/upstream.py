"""
Reaching targets through a parent HTTP proxy, with C{CONNECT}.

L{UpstreamEndpoint} is an ordinary L{IStreamClientEndpoint}: it connects to
the parent proxy (over TCP, or TLS for an C{https://} parent), asks it for a
tunnel to the target, and hands the connection to the caller's protocol once
the parent has answered 2xx.  Any Twisted client can use it::

    from twisted.internet.endpoints import connectProtocol
    from tunnel.upstream import UpstreamEndpoint, parseUpstreamURL

    parent = parseUpstreamURL("http://alice:secret@proxy.example:3128")
    endpoint = UpstreamEndpoint(reactor, parent, "example.com", 443)
    connectProtocol(endpoint, MyProtocol())

L{UpstreamConnector} is the L{ITargetConnector} that makes a
L{tunnel.ConnectProxyFactory} chain to a parent proxy.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

import idna
from attrs import evolve, field, frozen
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import HostnameAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    NoProtocol,
    TimeoutError,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHostnameResolver,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from .connector import (
    _allowAll,
    _DeniedEndpoint,
    _VettedEndpoint,
    canConnectDirectly,
)
from .direct import sourcesByVersion
from .filestamp import readRegularFile

# The failures are defined with the seam; importable from here as before.
from .interfaces import (
    OUT_OF_RESOURCES,
    AllowAddress,
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
from .policy import parseAddress
from .request import (
    HOSTNAME,
    RequestRejected,
    findHeadEnd,
    formatAuthority,
    parseAuthority,
)
from .resolver import sharedResolver

__all__ = [
    "MAX_RESPONSE_HEAD",
    "SCHEME_PORTS",
    "UpstreamCancelled",
    "UpstreamConnector",
    "UpstreamEndpoint",
    "UpstreamProtocolError",
    "UpstreamProxy",
    "UpstreamRefused",
    "UpstreamTimedOut",
    "UpstreamUnreachable",
    "parseUpstreamURL",
    "readUpstreamCredentials",
    "upstreamTLSOptions",
]

SCHEME_PORTS = {"http": 3128, "https": 443}
"""
The parent's port when its URL names none: Squid's 3128 for C{http://},
443 for C{https://}.
"""

MAX_RESPONSE_HEAD = 65536
"""
The most bytes read from the parent before its final response head must
have ended (interim 1xx heads included).
"""

_C0_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: (.*))?\Z", re.DOTALL)
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


@frozen
class UpstreamProxy:
    """
    A parent HTTP proxy, as named by an C{http://} or C{https://} URL.

    Build one with L{parseUpstreamURL}, which checks every part; the
    constructor checks only the scheme.

    @ivar scheme: C{"http"} (plain TCP to the parent) or C{"https"} (TLS to
        the parent, its certificate verified).
    @ivar host: The parent's DNS name or IP literal (IPv6 without brackets).
    @ivar port: The parent's port.
    @ivar username: The user name for C{Proxy-Authorization: Basic}, or
        L{None} to send no credentials.
    @ivar password: The password that goes with C{username}.  Left out of
        C{repr} so that logging the object never shows it.
    """

    scheme: str = field()
    host: str
    port: int
    username: str | None = None
    password: str = field(default="", repr=False)

    @scheme.validator
    def _checkScheme(self, attribute: object, value: str) -> None:
        if value not in SCHEME_PORTS:
            raise ValueError(f"the scheme must be http or https, not {value!r}")

    @property
    def tls(self) -> bool:
        """
        Whether the connection to the parent uses TLS.
        """
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """
        The parent as C{host:port} (an IPv6 literal in brackets).
        """
        return formatAuthority(self.host, self.port)

    @property
    def displayURL(self) -> str:
        """
        The parent's URL without the password, fit for logs.
        """
        user = "" if self.username is None else quote(self.username, safe="") + "@"
        return f"{self.scheme}://{user}{self.authority}"

    @property
    def proxyAuthorization(self) -> bytes | None:
        """
        The C{Proxy-Authorization} field value to send, or L{None}: C{Basic}
        with the user name and password in UTF-8 (RFC 7617).
        """
        if self.username is None:
            return None
        userPass = f"{self.username}:{self.password}".encode()
        return b"Basic " + base64.b64encode(userPass)


def _decodeUserInfo(text: str, what: str) -> str:
    try:
        decoded = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(
            f"the {what} in the upstream URL is not valid UTF-8 once percent-decoded"
        ) from None
    if _C0_CONTROL.search(decoded):
        raise ValueError(f"the {what} in the upstream URL holds a control character")
    return decoded


def parseUpstreamURL(url: str) -> UpstreamProxy:
    """
    Parse the URL of a parent proxy: C{http://[user:password@]host[:port]}
    or C{https://[user:password@]host[:port]}.

    The scheme and the host are case-insensitive; the host is a DNS name,
    an IPv4 literal or a bracketed IPv6 literal (no zone).  Without a port,
    C{http} means 3128 (Squid's) and C{https} 443 (see L{SCHEME_PORTS}).
    The user name and password are percent-decoded and must be UTF-8;
    C{user@host} means an empty password.  A single trailing C{/} is
    allowed; any other path, a query or a fragment is not.

    Error messages never repeat the URL, which may hold a password.

    @param url: The URL.
    @return: The parent proxy.
    @raise ValueError: If C{url} is anything else.
    """
    if _URL_FORBIDDEN.search(url):
        raise ValueError("the upstream URL holds whitespace or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"the upstream URL is malformed: {e}") from None
    if parts.scheme not in SCHEME_PORTS or not url.lower().startswith(
        parts.scheme + "://"
    ):
        raise ValueError(
            "the upstream URL must start with http:// or https://, "
            "as in http://proxy.example:3128"
        )
    if parts.path not in ("", "/") or "?" in url or "#" in url:
        raise ValueError(
            "the upstream URL must name only the proxy: no path, query or fragment"
        )
    host = parts.hostname or ""
    if not host:
        raise ValueError("the upstream URL names no host")
    if ":" in host:
        if "%" in host:
            raise ValueError("IPv6 zone identifiers are not supported")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("the upstream URL's IPv6 address is not valid") from None
    elif not HOSTNAME.match(host):
        raise ValueError(
            "the upstream URL's host is not a valid DNS name or IP address "
            "(write international names in their xn-- form)"
        )
    if port is None:
        port = SCHEME_PORTS[parts.scheme]
    elif not 1 <= port <= 65535:
        raise ValueError("the upstream URL's port must be in 1-65535")
    username: str | None = None
    password = ""
    userInfo, at, _ = parts.netloc.rpartition("@")
    if at:
        rawUser, _, rawPassword = userInfo.partition(":")
        username = _decodeUserInfo(rawUser, "user name")
        password = _decodeUserInfo(rawPassword, "password")
        if ":" in username:
            raise ValueError(
                "the user name in the upstream URL must not hold a colon (RFC 7617)"
            )
    return UpstreamProxy(parts.scheme, host, port, username, password)


def readUpstreamCredentials(proxy: UpstreamProxy, path: str) -> UpstreamProxy:
    """
    Give a parent proxy the credentials held in a file, so that the password
    need not be written in the URL, where C{ps} and C{/proc} show every
    process's command line to every local user.

    The file holds one line, C{user:password}, as is (not percent-encoded),
    in UTF-8; the line may end with a line break.  The user name ends at the
    first colon (RFC 7617: it cannot hold one); the password is the rest,
    colons included, and may be empty.

    Error messages never repeat the file's content.

    @param proxy: The parent proxy, named by a URL without credentials.
    @param path: The file.
    @return: C{proxy} with the file's user name and password.
    @raise ValueError: If the URL holds credentials already, or the file
        cannot be read or holds anything else.
    """
    if proxy.username is not None:
        raise ValueError(
            "the upstream URL holds credentials already: give them in one place"
        )
    try:
        # One line: anything much longer is not a credentials file.
        content = readRegularFile(path, 4096)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    if content.endswith(b"\r\n"):
        content = content[:-2]
    elif content.endswith(b"\n"):
        content = content[:-1]
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8") from None
    if _C0_CONTROL.search(text):
        raise ValueError(
            f"{path}: must hold one line, user:password, without control characters"
        )
    username, colon, password = text.partition(":")
    if not colon or not username:
        raise ValueError(f"{path}: must hold user:password")
    return evolve(proxy, username=username, password=password)


def _loadTrustRoot(path: str) -> Any:
    """
    Trust the certificates in a PEM file, and only those.
    """
    with open(path, "rb") as pemFile:
        pem = pemFile.read()
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ValueError(
            f"{path} holds a certificate that cannot be read: {e}"
        ) from None
    return trustRootFromCertificates(certificates)


def upstreamTLSOptions(
    upstream: UpstreamProxy, caCertificate: str | None = None
) -> IOpenSSLClientConnectionCreator:
    """
    Build the TLS options for an C{https://} parent: its certificate must be
    valid for its host name (or IP address), checked with service_identity,
    and ALPN offers C{http/1.1}.

    Build them once and pass them as C{tlsOptions} to the endpoints of one
    parent, as L{UpstreamConnector} does: the CA file is read once, and the
    TLS context is shared.

    @param upstream: The parent proxy.
    @param caCertificate: The path of a PEM file; if given, the parent's
        certificate must chain to one of the certificates in it (and to
        nothing else).  By default the platform's trust store is used.
    @return: The client connection creator.
    @raise OSError: If the file cannot be read.
    @raise ValueError: If it holds no readable PEM certificate.
    """
    trustRoot = (
        platformTrust() if caCertificate is None else _loadTrustRoot(caCertificate)
    )
    return _StrictIdentity(
        optionsForClientTLS(
            upstream.host, trustRoot=trustRoot, acceptableProtocols=[b"http/1.1"]
        ),
        upstream.host,
    )


def _tlsOptionsFor(
    upstream: UpstreamProxy,
    tlsOptions: IOpenSSLClientConnectionCreator | None,
    caCertificate: str | None,
) -> IOpenSSLClientConnectionCreator | None:
    """
    The TLS options to reach C{upstream} with: those given, or for an
    C{https://} parent L{upstreamTLSOptions}; none for an C{http://} one.

    @raise ValueError: If TLS options or a CA file are given for an
        C{http://} parent.
    """
    if not upstream.tls:
        if tlsOptions is not None or caCertificate is not None:
            raise ValueError("TLS options need an https:// parent proxy")
        return None
    if tlsOptions is None:
        return upstreamTLSOptions(upstream, caCertificate)
    return tlsOptions


def _idnaText(host: str) -> str:
    """
    A host name's ASCII form as Twisted's TLS client sends it (IDNA 2008,
    with the C{idna} package, which Twisted depends on through hyperlink),
    so that the name checked is the name asked for: Python's own codec
    (IDNA 2003) maps C{faß.de} to C{fass.de}, another domain.
    """
    return idna.encode(host).decode("ascii")


#: What OpenSSL's commonest certificate verification errors mean (the codes
#: of C{X509_V_ERR_*}, in C{x509_vfy.h}; pyOpenSSL gives the code to a
#: verify callback, but no public way to its text).
_CHAIN_ERRORS = {
    2: "unable to get issuer certificate",
    4: "unable to decrypt certificate's signature",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    25: "path length constraint exceeded",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    34: "unhandled critical extension",
    47: "permitted subtree violation",
    48: "excluded subtree violation",
    68: "CA cert does not include key usage extension",
}


def _chainErrorText(error: int, depth: int) -> str:
    """
    Say why the parent's certificate chain was refused.

    @param error: OpenSSL's C{X509_V_ERR_*} code.
    @param depth: Where in the chain: 0 for the parent's own certificate.
    @return: For instance C{"certificate has expired (the parent's
        certificate)"}.
    """
    what = _CHAIN_ERRORS.get(error, f"X509 error {error}")
    where = (
        "the parent's certificate"
        if depth == 0
        else f"an issuer's certificate, depth {depth}"
    )
    return f"{what} ({where})"


def _nameMismatch(certificate: Any, identity: Any, host: str) -> str | None:
    """
    Say why the parent's certificate is not for its name, if it is not.

    @param certificate: The certificate (pyOpenSSL's X509).
    @param identity: service_identity's ID of the name asked for.
    @param host: That name, as the log shows it.
    @return: Why not, or L{None} if the certificate names it.
    @raise Exception: If the check cannot be made.
    """
    try:
        verify_service_identity(extract_patterns(certificate), [identity], [])
    except VerificationError:
        return f"the parent's certificate does not name {host} in its subjectAltName"
    except CertificateError:
        return "the parent's certificate names no host in a subjectAltName"
    return None


@implementer(IOpenSSLClientConnectionCreator)
class _StrictIdentity:
    """
    Twisted's client TLS options, whose check that the certificate is the
    parent's is made to fail closed.

    Twisted's own check (Twisted 26.10) refuses a certificate for another
    name, but lets one with no subjectAltName at all through:
    service_identity's C{CertificateError} is logged and the handshake goes
    on, with the chain check alone.  A private CA (C{--upstream-ca}) may
    well sign such a certificate for anyone, who would then receive the
    parent's credentials and every tunnel.  So the check is made again,
    here, in place of Twisted's, and anything but a match refuses.
    """

    def __init__(self, options: IOpenSSLClientConnectionCreator, host: str) -> None:
        """
        @param options: Twisted's options (trust root, ALPN, server name).
        @param host: The parent's host name or IP address.
        """
        self._options = options
        self._host = host
        self._identity: Any = (
            IPAddress_ID(host)
            if isIPAddress(host) or isIPv6Address(host)
            else DNS_ID(_idnaText(host))
        )

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        Make the connection as Twisted does, with the stricter check.

        @param tlsProtocol: The TLS protocol of the connection.
        @return: The connection.
        """
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        identity, host = self._identity, self._host

        def verify(
            connection: SSL.Connection,
            certificate: Any,
            error: int,
            depth: int,
            ok: int,
        ) -> bool:
            if ok and depth != 0:
                # An issuer, its part of the chain good.
                return True
            try:
                # OpenSSL's own words would be "certificate verify failed",
                # whatever failed: the log says which check.
                why = (
                    _nameMismatch(certificate, identity, host)
                    if ok
                    else _chainErrorText(error, depth)
                )
            except Exception:
                # A check that could not be made: no match either.  (An
                # exception must not escape into OpenSSL.)
                tlsProtocol.failVerification(Failure())
                return False
            if why is None:
                return True
            tlsProtocol.failVerification(
                Failure(CertificateError(f"certificate verify failed: {why}"))
            )
            return False

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


#: The most of a parent's reason phrase kept, in bytes.
MAX_REASON = 128


def _parseStatusLine(head: bytes) -> tuple[int, str]:
    """
    The status code and reason phrase of a response head.

    @raise UpstreamProtocolError: If the status line is not HTTP/1.x.
    """
    line = head.split(b"\n", 1)[0].removesuffix(b"\r")
    match = _STATUS_LINE.match(line)
    if match is None or not 100 <= int(match.group(1)) <= 599:
        shown = _C0_CONTROL.sub("?", line[:80].decode("latin-1"))
        raise UpstreamProtocolError(string=f"not an HTTP/1.x status line: {shown!r}")
    # The parent's words reach the client's 502 and the log: as many as a
    # reason phrase needs, not the 64 KiB a head may hold.
    reason = (match.group(2) or b"")[:MAX_REASON].decode("latin-1")
    return int(match.group(1)), _C0_CONTROL.sub("?", reason).strip()


def _timedOut(result: object, timeout: float) -> object:
    """
    The C{onTimeoutCancel} of an attempt: its cancellation because of the
    timeout becomes L{UpstreamTimedOut}.
    """
    if isinstance(result, Failure) and result.check(UpstreamCancelled):
        cancelled = cast(UpstreamCancelled, result.value)
        return Failure(UpstreamTimedOut(string=cancelled.timeoutText(timeout)))
    return result


class _Attempt:
    """
    One call to L{UpstreamEndpoint.connect}: from reaching the parent until
    its answer.

    @ivar result: What C{connect} returned.
    @ivar stage: C{"connecting"} to the parent, then C{"answer"} (request
        sent, waiting for the response head).
    @ivar finished: Whether C{result} has fired, or was cancelled.
    """

    def __init__(
        self, factory: IProtocolFactory, target: HostnameAddress, request: bytes
    ) -> None:
        self.factory = factory
        self.target = target
        self.request = request
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self.connecting: Deferred[Any] | None = None
        self.handshake: _Handshake | None = None
        self.stage = "connecting"
        self.finished = False

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        self.finished = True
        answering = self.stage == "answer"
        if self.handshake is not None:
            self.handshake.abort()
        elif self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        self.factory.doStop()
        # Rather than a bare CancelledError: whoever cancelled because of a
        # timeout of its own can say whether the parent had been reached.
        result.errback(Failure(UpstreamCancelled(answering)))

    def connected(self, handshake: _Handshake) -> None:
        """
        The parent accepted the connection: send the request.
        """
        # Not finished: cancelling the attempt would have fired (cancelled)
        # the connecting Deferred.
        self.connecting = None
        self.stage = "answer"
        self.handshake = handshake
        handshake.start()

    def connectFailed(self, reason: Failure) -> None:
        """
        The parent could not be reached.
        """
        self.connecting = None
        # Said of the parent, not left to read as the target's refusal,
        # unknown name or timeout; without the message's full stop, as
        # these errors add their own.
        why = reason.getErrorMessage().rstrip(".")
        if reason.check(TimeoutError) and not reason.check(UpstreamTimedOut):
            reason = Failure(
                UpstreamTimedOut(string="could not reach the parent proxy: " + why)
            )
        elif (
            reason.check(ConnectError, DNSLookupError)
            and not reason.check(
                ConnectingCancelledError, LookupsBusy, NoLocalPort, SourceUnusable
            )
            # The proxy short of descriptors or memory: its trouble, as for
            # a target (a 503), not the parent's.
            and getattr(reason.value, "osError", None) not in OUT_OF_RESOURCES
        ):
            reason = Failure(UpstreamUnreachable(string=why))
        self.fail(reason)

    def succeed(self, protocol: IProtocol) -> None:
        """
        The tunnel is established and C{protocol} connected to it.
        """
        self.finished = True
        # The handshake keeps this attempt: without its own reference back,
        # a finished tunnel is freed at once rather than by the cycle
        # collector.
        self.handshake = None
        self.result.callback(protocol)

    def fail(self, reason: Failure) -> None:
        """
        No tunnel, for this reason (ignored if the attempt is over already).
        """
        if not self.finished:
            self.finished = True
            self.handshake = None
            self.factory.doStop()
            self.result.errback(reason)


@implementer(IHalfCloseableProtocol)
class _Handshake(Protocol):
    """
    The protocol on the connection to the parent: sends the C{CONNECT}
    request, reads the answer, then connects the caller's protocol to the
    same transport and forwards every event to it, half-close included.
    """

    transport: ITCPTransport

    def __init__(self, attempt: _Attempt) -> None:
        self._attempt = attempt
        self._started = False
        self._buffer = b""
        self._interim = 0
        self._wrapped: IProtocol | None = None
        self._failure: Failure | None = None

    def connectionMade(self) -> None:
        """
        Close a connection that arrives after its attempt was given up (from
        an endpoint whose attempts cannot really be cancelled).
        """
        if self._attempt.finished:
            self.abort()

    def start(self) -> None:
        """
        Send the request (this connection won the attempt).
        """
        self._started = True
        self.transport.write(self._attempt.request)
        if self._buffer:
            self._readHead(b"", searchFrom=0)

    def abort(self) -> None:
        """
        Drop the connection to the parent.
        """
        self.transport.abortConnection()

    def _giveUp(self, error: Exception) -> None:
        """
        Close the connection; the attempt fails with C{error} once it is
        closed, so that no socket outlives the failure.
        """
        if self._failure is None:
            self._failure = Failure(error)
            self._buffer = b""
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        """
        Read the answer, or pass the tunnel's bytes on.
        """
        if self._wrapped is not None:
            self._wrapped.dataReceived(data)
        elif self._failure is None and not self._attempt.finished:
            self._readHead(data)

    def _readHead(self, data: bytes, searchFrom: int | None = None) -> None:
        if searchFrom is None:
            # Only the end of what was searched before can begin the empty
            # line.
            searchFrom = max(0, len(self._buffer) - 3)
        buffer = self._buffer + data
        while True:
            found = findHeadEnd(buffer, searchFrom) if self._started else None
            if found is None:
                # The empty line that ends the head takes up to 2 bytes.
                if self._interim + len(buffer) > MAX_RESPONSE_HEAD + 2:
                    self._tooLarge()
                else:
                    self._buffer = buffer
                return
            headLength, consumed = found
            if self._interim + headLength > MAX_RESPONSE_HEAD:
                self._tooLarge()
                return
            head, buffer = buffer[:headLength], buffer[consumed:]
            try:
                status, reason = _parseStatusLine(head)
            except UpstreamProtocolError as e:
                self._giveUp(e)
                return
            if status < 200 and status != 101:
                # An interim response (100 Continue, 103 Early Hints): the
                # final one follows.
                self._interim += consumed
                searchFrom = 0
                continue
            if status < 200 or status >= 300:
                self._giveUp(UpstreamRefused(status, reason))
            else:
                self._established(buffer)
            return

    def _tooLarge(self) -> None:
        self._giveUp(
            UpstreamProtocolError(
                string=f"its response head exceeds {MAX_RESPONSE_HEAD} bytes"
            )
        )

    def _established(self, rest: bytes) -> None:
        """
        A 2xx: connect the caller's protocol to the transport, fire the
        attempt's Deferred, then deliver what followed the head.
        """
        self._buffer = b""
        attempt = self._attempt
        try:
            wrapped = attempt.factory.buildProtocol(attempt.target)
            if wrapped is None:
                raise NoProtocol()
        except Exception as e:
            self._giveUp(e)
            return
        self._wrapped = wrapped
        wrapped.makeConnection(self.transport)
        attempt.succeed(wrapped)
        # A transport that is closing reads no more (as TCP's stops reading
        # at loseConnection).
        if rest and not getattr(self.transport, "disconnecting", False):
            wrapped.dataReceived(rest)

    def readConnectionLost(self) -> None:
        """
        The parent sent FIN: pass it on, or, before any answer, give up.

        A wrapped protocol that cannot half-close gets what TCP would give
        it: the connection is closed.
        """
        wrapped = self._wrapped
        if wrapped is None:
            self._giveUp(
                UpstreamProtocolError(
                    string="it closed the connection before answering"
                )
            )
            return
        halfCloseable = IHalfCloseableProtocol(wrapped, None)
        if halfCloseable is not None:
            halfCloseable.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Our FIN went out: tell the wrapped protocol, if it wants to know.
        """
        halfCloseable = IHalfCloseableProtocol(self._wrapped, None)
        if halfCloseable is not None:
            halfCloseable.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Pass the end of the connection on, or fail the attempt.
        """
        if self._wrapped is not None:
            self._wrapped.connectionLost(reason)
            self._attempt.factory.doStop()
            return
        failure = self._failure
        if failure is None:
            if reason.check(SSL.Error, VerificationError, CertificateError):
                failure = Failure(_UpstreamTLSFailed(string=_tlsErrorText(reason)))
            else:
                ended = type(reason.value).__name__
                why = f"the connection ended before it answered ({ended})"
                failure = Failure(UpstreamProtocolError(string=why))
        self._attempt.fail(failure)


def _tlsErrorText(reason: Failure) -> str:
    """
    What a TLS failure with the parent says, for the log: OpenSSL's reasons
    (C{wrong version number}), not the list of tuples pyOpenSSL carries
    them in; a parent that does not speak TLS at all is named as such.
    """
    error = reason.value
    entries = error.args[0] if isinstance(error, SSL.Error) and error.args else None
    if isinstance(entries, list):
        reasons = [
            entry[2]
            for entry in entries
            if isinstance(entry, tuple) and len(entry) == 3 and entry[2]
        ]
        if reasons:
            text = "; ".join(reasons)
            if "wrong version number" in reasons:
                text += " (does the parent speak TLS on that port?)"
            return text
    return reason.getErrorMessage().rstrip(".")


class _UpstreamTLSFailed(UpstreamProtocolError):
    """
    TLS with the parent proxy failed (its certificate, most often), so it
    could give no answer: said as such in the log, not as a malformed
    answer.
    """

    MESSAGE = "TLS with the parent proxy failed"


class _HandshakeFactory(Factory):
    """
    Builds the L{_Handshake} of one attempt.
    """

    noisy = False

    def __init__(self, attempt: _Attempt) -> None:
        self._attempt = attempt

    def buildProtocol(self, addr: object) -> _Handshake:
        """
        Build a handshake protocol for the attempt.
        """
        return _Handshake(self._attempt)


@implementer(IStreamClientEndpoint)
class UpstreamEndpoint:
    """
    Reach C{host:port} through a parent HTTP proxy with C{CONNECT}.

    C{connect} reaches the parent with L{HostnameEndpoint} (Happy Eyeballs),
    or, given a resolver, as the default connector reaches a target's name
    (its lookup cancelled with the attempt); wrapped in TLS for an
    C{https://} parent; and sends::

        CONNECT host:port HTTP/1.1
        Host: host:port
        Proxy-Authorization: Basic ...     (if the URL has credentials)

    then reads the parent's response head (at most L{MAX_RESPONSE_HEAD}
    bytes; interim 1xx responses are skipped).  On a 2xx the caller's
    factory builds the protocol (with a L{HostnameAddress} of the target),
    which is connected to the very transport to the parent, so flow control
    (C{registerProducer}, C{pauseProducing}) works as on any connection;
    C{transport.getPeer()} is the parent's address.  Its C{connectionMade}
    runs, the Deferred fires, then it receives whatever the parent sent
    after its head.  Every later event is passed on, half-close included
    (C{readConnectionLost} and C{writeConnectionLost}, to a protocol that
    provides L{IHalfCloseableProtocol}; one that does not is closed on the
    parent's FIN, as TCP would close it).

    The Deferred fails with:
      - L{UpstreamRefused} (a L{twisted.internet.error.ConnectError}) when
        the parent answers anything but 2xx; its C{status} and C{reason}
        say what;
      - L{UpstreamProtocolError} (a L{twisted.internet.error.ConnectError})
        when the answer is malformed or too large, or the connection ends
        (or TLS fails) before it;
      - L{UpstreamTimedOut} (a L{twisted.internet.error.TimeoutError})
        when the parent was not reached, or did not answer, within
        C{timeout};
      - L{UpstreamUnreachable} (a L{twisted.internet.error.ConnectError})
        when the parent cannot be reached (its name does not resolve, it
        refuses the connection...), with the underlying error's message;
      - L{tunnel.interfaces.LookupsBusy} when too many name lookups wait;
      - L{tunnel.interfaces.NoLocalPort} when no local port was left to
        connect to the parent from (the proxy's shortage, not the
        parent's).
    On each of these the connection to the parent is already closed.  The
    Deferred can be cancelled at any time before it fires: the connection
    attempt is cancelled or the connection aborted, and it fails with
    L{UpstreamCancelled} (a L{twisted.internet.defer.CancelledError}).
    """

    def __init__(
        self,
        reactor: Any,
        upstream: UpstreamProxy,
        host: str,
        port: int,
        *,
        tlsOptions: IOpenSSLClientConnectionCreator | None = None,
        caCertificate: str | None = None,
        timeout: float = 30,
        resolver: IHostnameResolver | None = None,
        bindAddress: tuple[str, int] | None = None,
        sourceAddresses: Sequence[str] = (),
    ) -> None:
        """
        @param reactor: The reactor to connect with, and whose clock times
            the attempt.
        @param upstream: The parent proxy (see L{parseUpstreamURL}).
        @param host: The target host: a DNS name (resolved by the parent),
            an IPv4 literal, or an IPv6 literal without brackets.
        @param port: The target port.
        @param tlsOptions: For an C{https://} parent, how to do TLS with it;
            by default L{upstreamTLSOptions}C{(upstream, caCertificate)}.
        @param caCertificate: For an C{https://} parent, the path of a PEM
            file of the certificates to trust (instead of the platform's).
        @param timeout: Seconds allowed to reach the parent and get its
            answer, all told.
        @param resolver: Resolves the parent's name; by default the
            reactor's own C{nameResolver}.
        @param bindAddress: The local address to connect from, if any.
        @param sourceAddresses: The local addresses to connect from, one
            per IP version, as L{tunnel.HostnameConnector} takes them (with
            a C{resolver}, on a POSIX reactor).
        @raise ValueError: If C{host:port} is not a valid target, or TLS
            options are given for an C{http://} parent, or the source
            addresses cannot be used.
        @raise OSError: If C{caCertificate} cannot be read.
        """
        authority = formatAuthority(host, port)
        try:
            parseAuthority(authority.encode("ascii"))
        except (UnicodeEncodeError, RequestRejected) as e:
            raise ValueError(f"not a valid target: {authority!r} ({e})") from None
        sources = sourcesByVersion(sourceAddresses)
        direct = canConnectDirectly(reactor, bindAddress)
        if sources and (resolver is None or not direct):
            raise ValueError(
                "source addresses need a resolver, a POSIX reactor and no bindAddress"
            )
        # With a resolver of its own, the parent's name is reached as a
        # target's is: the lookup is cancelled with the attempt, and a
        # refused one is LookupsBusy.
        endpoint: IStreamClientEndpoint = (
            HostnameEndpoint(
                reactor,
                upstream.host,
                upstream.port,
                timeout=timeout,
                bindAddress=bindAddress,
            )
            if resolver is None
            else _VettedEndpoint(
                reactor,
                resolver,
                _allowAll,
                upstream.host,
                upstream.port,
                timeout,
                bindAddress,
                direct,
                sources,
            )
        )
        tlsOptions = _tlsOptionsFor(upstream, tlsOptions, caCertificate)
        if tlsOptions is not None:
            endpoint = wrapClientTLS(tlsOptions, endpoint)
        self._reactor = reactor
        self._parent = endpoint
        self._timeout = timeout
        self._target = HostnameAddress(host.encode("ascii"), port)
        lines = [b"CONNECT %s HTTP/1.1" % (authority.encode("ascii"),)]
        lines.append(b"Host: %s" % (authority.encode("ascii"),))
        credentials = upstream.proxyAuthorization
        if credentials is not None:
            lines.append(b"Proxy-Authorization: " + credentials)
        self._request = b"\r\n".join(lines) + b"\r\n\r\n"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Reach the target through the parent.

        @param protocolFactory: Builds the protocol for the tunnel.
        @return: A Deferred that fires with that protocol, connected, once
            the parent answered 2xx (see the class docstring for failures).
        """
        attempt = _Attempt(protocolFactory, self._target, self._request)
        protocolFactory.doStart()
        attempt.result.addTimeout(self._timeout, self._reactor, _timedOut)
        connecting = self._parent.connect(_HandshakeFactory(attempt))
        attempt.connecting = connecting
        connecting.addCallbacks(attempt.connected, attempt.connectFailed)
        return attempt.result


@implementer(ITargetConnector)
class UpstreamConnector:
    """
    Reach every target through one parent HTTP proxy: the proxy becomes a
    child of that parent.

    The parent resolves target names, so the destination policy's address
    rules (C{allowAddress}) cannot apply to names; the port and name rules
    still do, checked before any connection.  A target given as an IP
    literal needs no resolving, and is checked against C{allowAddress}
    here: a denied one fails with L{AddressDenied} without contacting the
    parent.

    @ivar upstream: The parent proxy (its C{displayURL} is fit for logs).
    @ivar resolver: Looks the parent's name up.
    """

    def __init__(
        self,
        reactor: Any,
        upstream: UpstreamProxy,
        *,
        tlsOptions: IOpenSSLClientConnectionCreator | None = None,
        caCertificate: str | None = None,
        timeout: float = 30,
        resolver: IHostnameResolver | None = None,
        bindAddress: tuple[str, int] | None = None,
        sourceAddresses: Sequence[str] = (),
    ) -> None:
        """
        Takes the arguments of L{UpstreamEndpoint} but the target's.  For an
        C{https://} parent the TLS options are built here, once (a bad
        C{caCertificate} fails here, not at the first tunnel).

        @param reactor: The reactor to connect with, and whose clock times
            each attempt.
        @param upstream: The parent proxy (see L{parseUpstreamURL}).
        @param tlsOptions: For an C{https://} parent, how to do TLS with it;
            by default L{upstreamTLSOptions}C{(upstream, caCertificate)}.
        @param caCertificate: For an C{https://} parent, the path of a PEM
            file of the certificates to trust (instead of the platform's).
        @param timeout: Seconds allowed to reach the parent and get its
            answer, all told, for each tunnel.
        @param resolver: Resolves the parent's name; by default the
            reactor's shared L{ThreadedResolver}, so that the tunnels'
            lookups of the parent share one call and never wait behind
            password checks in the reactor's thread pool.
        @param bindAddress: The local address to connect from, if any.
        @param sourceAddresses: The local addresses to connect from, one
            per IP version (see L{UpstreamEndpoint}).
        @raise ValueError: If TLS options are given for an C{http://}
            parent, or C{caCertificate} holds no readable certificate, or
            the source addresses cannot be used.
        @raise OSError: If C{caCertificate} cannot be read.
        """
        self.upstream = upstream
        self._reactor = reactor
        self._tlsOptions = _tlsOptionsFor(upstream, tlsOptions, caCertificate)
        self._timeout = timeout
        self.resolver: IHostnameResolver = (
            resolver if resolver is not None else sharedResolver(reactor)
        )
        self._bindAddress = bindAddress
        self._sourceAddresses = tuple(sourceAddresses)
        if sourcesByVersion(self._sourceAddresses) and not canConnectDirectly(
            reactor, bindAddress
        ):
            raise ValueError("source addresses need a POSIX reactor and no bindAddress")

    def endpointForTarget(
        self, host: str, port: int, allowAddress: AllowAddress | None = None
    ) -> IStreamClientEndpoint:
        """
        Give the endpoint that reaches C{host:port} through the parent.

        @param host: The target host: a DNS name (resolved by the parent),
            an IPv4 literal, or an IPv6 literal without brackets.
        @param port: The target port.
        @param allowAddress: Applied to a target given as an IP literal;
            names are resolved by the parent, and not checked here.
        @return: An L{UpstreamEndpoint}, or an endpoint that fails with
            L{AddressDenied} for a denied IP literal.
        """
        if allowAddress is not None:
            literal = parseAddress(host)
            if literal is not None and not allowAddress(literal):
                return _DeniedEndpoint(host)
        return UpstreamEndpoint(
            self._reactor,
            self.upstream,
            host,
            port,
            tlsOptions=self._tlsOptions,
            timeout=self._timeout,
            resolver=self.resolver,
            bindAddress=self._bindAddress,
            sourceAddresses=self._sourceAddresses,
        )
