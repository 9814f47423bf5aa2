"""
The default way to reach a target: Happy Eyeballs (our own race over
L{DirectEndpoint}s on POSIX reactors, C{HostnameEndpoint} elsewhere), over
only the resolved addresses the destination policy allows.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectingCancelledError, DNSLookupError, NoProtocol
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IHalfCloseableProtocol,
    IHostnameResolver,
    IHostResolution,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.runtime import platformType
from zope.interface import implementer

from .direct import DirectEndpoint, routeFrom, sourcesByVersion

# AddressDenied is defined with the seam; importable from here as before.
from .interfaces import (
    AddressDenied,
    AllowAddress,
    ITargetConnector,
    LookupsBusy,
    NoLocalPort,
    SourceUnusable,
)
from .policy import parseAddress
from .resolver import Lookup, sharedResolver

__all__ = ["AddressDenied", "HostnameConnector"]

#: No source address for any IP version: connect from what routing picks.
_NO_SOURCES: Mapping[int, str] = types.MappingProxyType({})

_log = Logger()


def _allowAll(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return True


@implementer(IProtocol, ILoggingContext)
class _Announcing:
    """
    The protocol a target connection made by L{_AddressEndpoint} runs: it
    passes every event to the real protocol and, once that one is
    connected, fires the endpoint's Deferred with it.
    """

    __slots__ = ("_connected", "_protocol")

    def __init__(self, protocol: IProtocol, connected: Deferred[Any]) -> None:
        self._protocol = protocol
        self._connected: Deferred[Any] | None = connected

    def makeConnection(self, transport: ITransport) -> None:
        self._protocol.makeConnection(transport)
        connected, self._connected = self._connected, None
        if connected is not None:
            connected.callback(self._protocol)

    def connectionMade(self) -> None:
        # makeConnection tells the real protocol; nothing to do here.
        pass

    def dataReceived(self, data: bytes) -> None:
        self._protocol.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self._protocol.connectionLost(reason)

    def logPrefix(self) -> str:
        logPrefix = getattr(self._protocol, "logPrefix", None)
        return logPrefix() if logPrefix is not None else "-"


@implementer(IHalfCloseableProtocol)
class _HalfCloseableAnnouncing(_Announcing):
    """
    L{_Announcing} for a protocol that takes half-closes.
    """

    __slots__ = ()

    def readConnectionLost(self) -> None:
        self._protocol.readConnectionLost()  # type: ignore[attr-defined]

    def writeConnectionLost(self) -> None:
        self._protocol.writeConnectionLost()  # type: ignore[attr-defined]


@implementer(IProtocolFactory)
class _AnnouncingFactory:
    """
    The client factory of one L{_AddressEndpoint} connection attempt.
    """

    __slots__ = ("_connector", "_factory", "connected")

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory: IProtocolFactory | None = factory
        self._connector: IConnector | None = None
        self.connected: Deferred[Any] | None = Deferred(self._cancel)

    def _cancel(self, connected: Deferred[Any]) -> None:
        # Fail first: stopConnecting reports a UserError to
        # clientConnectionFailed at once, which must not be the reason.
        self.connected = None
        connected.errback(CancelledError())
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.stopConnecting()

    def doStart(self) -> None:
        if self._factory is not None:
            self._factory.doStart()

    def doStop(self) -> None:
        factory, self._factory = self._factory, None
        if factory is not None:
            factory.doStop()

    def startedConnecting(self, connector: IConnector) -> None:
        self._connector = connector

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        self._connector = None
        try:
            assert self._factory is not None
            protocol = self._factory.buildProtocol(addr)
            if protocol is None:
                raise NoProtocol()
        except BaseException:
            connected, self.connected = self.connected, None
            assert connected is not None
            connected.errback()
            return None
        announcing = (
            _HalfCloseableAnnouncing
            if IHalfCloseableProtocol.providedBy(protocol)
            else _Announcing
        )
        # The connector keeps this factory as long as the connection lasts:
        # from now on the protocol fires the Deferred.
        connected, self.connected = self.connected, None
        assert connected is not None
        return announcing(protocol, connected)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._connector = None
        # Let go of the Deferred before it fires: it holds this factory in
        # its canceller.
        connected, self.connected = self.connected, None
        if connected is not None and not connected.called:
            connected.errback(reason)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        pass


@implementer(IStreamClientEndpoint)
class _AddressEndpoint:
    """
    Connects to one IP address with C{connectTCP}: what L{HostnameConnector}
    uses for address literals where L{DirectEndpoint} cannot serve (a
    reactor that is not a POSIX one, or a local address to bind to).

    Written by hand rather than taken from C{TCP4ClientEndpoint}: a tunnel
    keeps its target connection open for as long as it lasts, thousands at
    once, and the endpoint's wrapping factory, wrapping protocol and fired
    Deferred stay alive with each (about 600 bytes a tunnel).  Here a small
    announcing protocol stays, and the factory keeps only the given factory
    (for its C{doStop}).  It serves plain TCP: it passes on the protocol
    events of L{IProtocol}, L{IHalfCloseableProtocol} and
    L{ILoggingContext}, not those of TLS or descriptor passing.
    """

    __slots__ = ("_bindAddress", "_host", "_port", "_reactor", "_timeout")

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        timeout: float | None,
        bindAddress: tuple[str, int] | None,
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout
        self._bindAddress = bindAddress

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Connect, and fire with the protocol C{protocolFactory} built once it
        is connected.
        """
        factory = _AnnouncingFactory(protocolFactory)
        connected = factory.connected
        assert connected is not None
        try:
            self._reactor.connectTCP(
                self._host, self._port, factory, self._timeout, self._bindAddress
            )
        except Exception:
            return fail()
        return connected


@implementer(IReactorPluggableNameResolver)
class _ResolvingReactor:
    """
    A reactor that answers name lookups with a given resolver and passes
    everything else to the real reactor.

    C{HostnameEndpoint} takes its resolver from the reactor it is given; this
    lets one endpoint use another resolver without installing it reactor-wide.
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        """
        Refuse: this reactor's resolver is fixed when it is made.
        """
        raise NotImplementedError("this reactor's resolver is fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IResolutionReceiver)
class _VettingReceiver:
    """
    Passes on only the resolved addresses the policy allows, and counts the
    others.
    """

    def __init__(self, receiver: IResolutionReceiver, allow: AllowAddress) -> None:
        self._receiver = receiver
        self._allow = allow
        self.allowed = 0
        self.denied = 0
        self.resolution: IHostResolution | None = None

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self.resolution = resolution
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", "")
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            self.denied += 1
            return
        if self._allow(ip):
            self.allowed += 1
            self._receiver.addressResolved(address)
        else:
            self.denied += 1

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _VettingResolver:
    """
    A resolver that filters another's answers through the policy, so that
    the endpoint connects only to vetted addresses: no second lookup happens
    between the check and the connection, so DNS rebinding cannot slip a
    denied address in.
    """

    def __init__(self, resolver: IHostnameResolver, allow: AllowAddress) -> None:
        self._resolver = resolver
        self._allow = allow
        self.receivers: list[_VettingReceiver] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        receiver = _VettingReceiver(resolutionReceiver, self._allow)
        self.receivers.append(receiver)
        return self._resolver.resolveHostName(
            receiver, hostName, portNumber, addressTypes, transportSemantics
        )

    def deniedAll(self) -> bool:
        """
        Whether addresses were found and every one of them was denied.
        """
        return any(r.denied for r in self.receivers) and not any(
            r.allowed for r in self.receivers
        )

    def busy(self) -> bool:
        """
        Whether a L{ThreadedResolver} refused a lookup because too many
        were waiting.
        """
        return any(
            isinstance(r.resolution, Lookup) and r.resolution.busy
            for r in self.receivers
        )

    def cancel(self) -> None:
        """
        Cancel the lookups in progress: HostnameEndpoint never does, so a
        lookup still waiting for a thread would otherwise run for a tunnel
        long gone.
        """
        for receiver in self.receivers:
            resolution, receiver.resolution = receiver.resolution, None
            if resolution is None:
                continue
            try:
                resolution.cancel()
            except NotImplementedError:
                # Twisted's own resolvers cannot cancel.
                pass
            except Exception:
                _log.failure(
                    "Cancelling the lookup of {name} failed", name=resolution.name
                )


#: Seconds between the starts of two attempts to connect to the addresses of
#: one name: Twisted's C{HostnameEndpoint} waits as long (RFC 8305 suggests
#: 250 ms).
ATTEMPT_DELAY = 0.3

#: The most attempts of one race under way at once: starting another
#: abandons the oldest, which has had C{ATTEMPT_DELAY} times this long.  A
#: name with many addresses that never answer (a black hole) would
#: otherwise hold a socket for each, one more every C{ATTEMPT_DELAY}
#: seconds until the connect timeout: 51 descriptors per client connection
#: in 15 s, which a few hundred such requests turn into a proxy out of
#: descriptors.
MAX_ATTEMPTS = 4


@functools.lru_cache(maxsize=1024)
def _checkedName(host: str) -> tuple[bool, bytes, str]:
    """
    Judge C{host} as C{HostnameEndpoint} does (valid IDNA, normalized), once
    per name: the check encodes the name with the C{idna} package, which
    costs more than the rest of a connection attempt's Python.

    @param host: The name.
    @return: Whether it is valid, its IDNA bytes, and the text to look up.
    """
    invalid, hostBytes, text = HostnameEndpoint._hostAsBytesAndText(host)
    return not invalid, hostBytes, text


@implementer(IStreamClientEndpoint)
class _AddressRace:
    """
    What C{HostnameEndpoint} does, by hand, on a reactor L{DirectEndpoint}
    serves: look the name up, then connect to its addresses in the order
    the resolver gave them, starting the next attempt L{ATTEMPT_DELAY}
    seconds after the last one, or at once when every attempt under way
    failed; the first to connect wins, the others are abandoned (RFC 8305).
    Unlike C{HostnameEndpoint}, at most L{MAX_ATTEMPTS} attempts are under
    way at once: a new one abandons the oldest.

    Written by hand because C{HostnameEndpoint} costs, per tunnel, an IDNA
    encoding of the name, a class built for every C{connect} (with its
    interface declarations), a C{LoopingCall}, and a wrapping factory and
    protocol for each attempt: a tunnel to a name cost twice the CPU of one
    to an address.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IHostnameResolver,
        host: str,
        port: int,
        timeout: float | None,
        newSocket: Callable[[int, int], socket.socket] = socket.socket,
        sources: Mapping[int, str] = _NO_SOURCES,
    ) -> None:
        """
        @param reactor: A reactor L{DirectEndpoint} serves.
        @param resolver: Looks the name up.
        @param host: The name.
        @param port: The port.
        @param timeout: Seconds allowed for each attempt's TCP handshake, or
            L{None}.
        @param newSocket: Makes the sockets; tests pass a fake.
        @param sources: The local address to connect from for each IP
            version (see L{sourcesByVersion}); none for the others.
        """
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._timeout = timeout
        self._newSocket = newSocket
        self._sources = sources

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Look the name up and race its addresses.

        @return: A L{Deferred} that fires with the protocol of the first
            connection made; fails with C{ValueError} for a name that is
            not valid IDNA (before any lookup), with L{DNSLookupError} when
            the name has no address, or when every attempt failed with
            L{NoLocalPort} if one did, else the failure of the last attempt;
            cancelling it fails it with
            L{ConnectingCancelledError} and abandons every attempt.
        """
        valid, hostBytes, name = _checkedName(self._host)
        if not valid:
            return fail(ValueError(f"invalid hostname: {name}"))
        # The race holds nothing of this endpoint: the endpoint's resolver
        # holds the race (as a receiver), and a reference back would make a
        # cycle that keeps the tunnel until the cycle collector runs.
        reactor, port, timeout, newSocket, sources = (
            self._reactor,
            self._port,
            self._timeout,
            self._newSocket,
            self._sources,
        )

        def attempt(host: str) -> Deferred[Any]:
            try:
                source = None
                if sources:
                    host, source = routeFrom(host, sources)
                endpoint = DirectEndpoint(
                    reactor, host, port, timeout, newSocket, source
                )
            except Exception:
                # An address DirectEndpoint cannot use (an IPv6 zone that
                # names no interface): that attempt fails, the race goes on.
                return fail()
            return endpoint.connect(protocolFactory)

        race = _Race(reactor, hostBytes, name, port, attempt)
        result = race.result
        assert result is not None
        self._resolver.resolveHostName(race, name, portNumber=port)
        return result


@implementer(IResolutionReceiver)
class _Race:
    """
    One L{_AddressRace.connect}: receives the addresses, then runs the
    attempts.

    @ivar result: Fires with the winner's protocol, or fails; let go of once
        it fired (its canceller holds this object, and the reference back
        would keep the whole tunnel in a cycle for the cycle collector).
    """

    def __init__(
        self,
        reactor: Any,
        hostBytes: bytes,
        name: str,
        port: int,
        attempt: Callable[[str], Deferred[Any]],
    ) -> None:
        """
        @param reactor: Schedules the next attempts.
        @param hostBytes: The name, as IDNA bytes.
        @param name: The name, as text.
        @param port: The port connected to.
        @param attempt: Starts an attempt to connect to an address.
        """
        self._reactor = reactor
        self._hostBytes = hostBytes
        self._name = name
        self._port = port
        self._attempt = attempt
        self._addresses: list[str] = []
        self._pending: list[Deferred[Any]] = []
        self._timer: Any = None
        self._resolved = False
        # The first attempt that failed for want of a local port or of its
        # source address: the proxy's shortage, which the race reports
        # rather than another address's failure (the shortage may pass; the
        # other may not be the whole story).
        self._noLocalPort: Failure | None = None
        self.result: Deferred[Any] | None = Deferred(self._cancel)

    def _end(self) -> Deferred[Any]:
        """
        Finish the race (C{result} becomes L{None}): no attempt or timer may
        act any more.

        @return: The result, to fire.
        """
        result, self.result = self.result, None
        assert result is not None
        return result

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        """
        Nothing to do until the addresses are known.
        """

    def addressResolved(self, address: IAddress) -> None:
        """
        Keep an IP address to try (until the resolution completed: the list
        is taken once, as C{HostnameEndpoint} takes it).
        """
        if not self._resolved and isinstance(address, (IPv4Address, IPv6Address)):
            self._addresses.append(address.host)

    def resolutionComplete(self) -> None:
        """
        Start the first attempt, or fail for want of an address.
        """
        if self.result is None or self._resolved:
            # Cancelled already, or a resolver that completes twice.
            return
        self._resolved = True
        if not self._addresses:
            self._end().errback(
                DNSLookupError(f"no results for hostname lookup: {self._name}")
            )
            return
        self._addresses.reverse()
        self._next()

    def _next(self) -> None:
        self._timer = None
        if self.result is None:
            return
        attempt = self._attempt(self._addresses.pop())
        self._pending.append(attempt)
        if self._addresses:
            self._timer = self._reactor.callLater(ATTEMPT_DELAY, self._next)
        attempt.addCallbacks(
            self._won, self._lost, callbackArgs=(attempt,), errbackArgs=(attempt,)
        )
        if len(self._pending) > MAX_ATTEMPTS:
            # The oldest goes (its _lost takes it off the list), so that one
            # connection never holds more than MAX_ATTEMPTS sockets.
            self._pending[0].cancel()

    def _stopTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _won(self, protocol: Any, attempt: Deferred[Any]) -> None:
        result = self._end()
        self._stopTimer()
        self._pending.remove(attempt)
        losers, self._pending = self._pending, []
        for loser in losers:
            loser.cancel()
        result.callback(protocol)

    def _lost(self, reason: Failure, attempt: Deferred[Any]) -> None:
        if self.result is None:
            return
        self._pending.remove(attempt)
        if self._noLocalPort is None and reason.check(NoLocalPort, SourceUnusable):
            self._noLocalPort = reason
        if self._pending:
            return
        if self._addresses:
            # Every attempt under way failed: no reason to wait for the timer.
            self._stopTimer()
            self._next()
            return
        self._end().errback(self._noLocalPort or reason)

    def _cancel(self, result: Deferred[Any]) -> None:
        self.result = None
        self._stopTimer()
        pending, self._pending = self._pending, []
        for attempt in pending:
            attempt.cancel()
        result.errback(
            ConnectingCancelledError(HostnameAddress(self._hostBytes, self._port))
        )


@implementer(IStreamClientEndpoint)
class _VettedEndpoint:
    """
    A race to the vetted addresses of a name (an L{_AddressRace} where the
    reactor connects by hand, a L{HostnameEndpoint} elsewhere) that fails
    with L{AddressDenied} when the policy left none, and with L{LookupsBusy}
    when the resolver refused the lookup; cancelling it cancels the lookup.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IHostnameResolver,
        allow: AllowAddress,
        host: str,
        port: int,
        timeout: float | None,
        bindAddress: tuple[str, int] | None,
        direct: bool = False,
        sources: Mapping[int, str] = _NO_SOURCES,
    ) -> None:
        self._vetting = _VettingResolver(resolver, allow)
        self._endpoint: IStreamClientEndpoint
        if direct:
            self._endpoint = _AddressRace(
                reactor, self._vetting, host, port, timeout, sources=sources
            )
        else:
            self._endpoint = HostnameEndpoint(
                _ResolvingReactor(reactor, self._vetting),
                host,
                port,
                # Typed as a float, but passed on to connectTCP as it is,
                # where None means no timer (test_noTimeout checks).
                timeout=timeout,  # type: ignore[arg-type]
                bindAddress=bindAddress,
            )
        self._host = host

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Connect to the first vetted address that answers.
        """

        if not _checkedName(self._host)[0]:
            # Both endpoints refuse, before any lookup, a name that is not
            # valid IDNA (a_b, ab--c, a-.b), with a ValueError: no lookup of
            # it can succeed, which is what the client is told.  (Said
            # here, so that no other ValueError an attempt ends with is
            # taken for this one.)
            return fail(DNSLookupError(f"{self._host} is not a valid host name"))

        def explainFailure(reason: Failure) -> Failure:
            if self._vetting.busy():
                raise LookupsBusy(string=f"too many lookups waiting for {self._host}")
            if self._vetting.deniedAll():
                raise AddressDenied(string=f"no allowed address for {self._host}")
            return reason

        def cancel(connected: Deferred[Any]) -> None:
            self._vetting.cancel()
            attempt.cancel()

        attempt = self._endpoint.connect(protocolFactory).addErrback(explainFailure)
        if attempt.called:
            return attempt
        connected: Deferred[Any] = Deferred(cancel)
        attempt.chainDeferred(connected)
        return connected


@implementer(IStreamClientEndpoint)
class _DeniedEndpoint:
    """
    The endpoint of a target address the policy refuses: it never connects.
    """

    def __init__(self, host: str) -> None:
        self._host = host

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Fail with L{AddressDenied}.
        """
        return fail(AddressDenied(string=f"{self._host} is not allowed"))


def canConnectDirectly(reactor: object, bindAddress: object = None) -> bool:
    """
    Whether connections on C{reactor} can be made by hand (L{DirectEndpoint},
    and L{_AddressRace} for names) rather than with C{connectTCP}.

    Connecting by hand gives the same transports as a POSIX reactor's
    C{connectTCP} (see L{tunnel.direct}); binding to a local address is
    left to C{connectTCP}.  (Windows' select reactor is a
    L{PosixReactorBase} too, but its C{connect} reports failures otherwise.)

    @param reactor: The reactor to connect with.
    @param bindAddress: The local address to bind to, if any.
    @return: Whether L{DirectEndpoint} serves.
    """
    return (
        bindAddress is None
        and platformType == "posix"
        and isinstance(reactor, PosixReactorBase)
    )


@implementer(ITargetConnector)
class HostnameConnector:
    """
    Reach targets directly: every allowed address the name resolves to is
    tried, IPv4 and IPv6 raced as RFC 8305 describes (by hand, with
    L{DirectEndpoint}s, on POSIX reactors; with L{HostnameEndpoint}
    elsewhere).  An address literal needs no lookup: it is vetted at once
    and connected to directly (by a L{DirectEndpoint} where it can serve,
    by Twisted's own TCP endpoint elsewhere).

    @ivar resolver: Looks the target names up.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IHostnameResolver | None = None,
        timeout: float | None = 30,
        bindAddress: tuple[str, int] | None = None,
        sourceAddresses: Sequence[str] = (),
    ) -> None:
        """
        @param reactor: The reactor to connect with.
        @param resolver: Resolves target names; by default the reactor's
            shared L{ThreadedResolver} (C{getaddrinfo} in
            at most 20 threads, bounded and cancellable, apart from the
            reactor's thread pool), since the reactor's C{nameResolver}
            queues without bound in the pool bcrypt also needs.  Tests pass
            a fake one so that no real DNS query is ever sent.
        @param timeout: Seconds allowed for each connection attempt, or
            L{None} for no timer of the connector's own, when the caller
            bounds the attempt itself (L{tunnel.ConnectProxy} does, with
            its connect timeout).
        @param bindAddress: The local address and port to connect from, as
            C{connectTCP} takes it, for every target whatever its IP
            version (so the connections are made by C{connectTCP}).
        @param sourceAddresses: The local addresses to connect from: at
            most one IPv4 and one IPv6 address, each for the targets of its
            version (the others connect from the address the kernel's
            routing picks).  Needs a POSIX reactor.
        @raise ValueError: For C{sourceAddresses} that are not IP
            addresses, or two of one version, or given with a
            C{bindAddress} or on a reactor that cannot connect by hand.
        """
        self._reactor = reactor
        self.resolver: IHostnameResolver = (
            resolver if resolver is not None else sharedResolver(reactor)
        )
        self._timeout = timeout
        self._bindAddress = bindAddress
        self._direct = canConnectDirectly(reactor, bindAddress)
        self._sources = sourcesByVersion(sourceAddresses)
        if self._sources and not self._direct:
            raise ValueError("source addresses need a POSIX reactor and no bindAddress")

    def endpointForTarget(
        self, host: str, port: int, allowAddress: AllowAddress | None = None
    ) -> IStreamClientEndpoint:
        """
        Give an endpoint for C{host:port} that connects only to addresses
        C{allowAddress} allows (all of them if it is L{None}).

        @param host: The target host: a DNS name, an IPv4 literal or an IPv6
            literal without brackets.
        @param port: The target port.
        @param allowAddress: The destination policy for this tunnel, or
            L{None} to allow every address.
        @return: An endpoint that connects directly to an address literal,
            or resolves a name and connects (Happy Eyeballs) to the allowed
            addresses only; its C{connect} fails with L{AddressDenied} when
            none is allowed.
        """
        literal = parseAddress(host)
        if literal is not None:
            # An address needs no lookup: vet it now and connect directly,
            # sparing the resolver's thread and HostnameEndpoint's
            # machinery on every handshake.
            if allowAddress is not None and not allowAddress(literal):
                return _DeniedEndpoint(host)
            if self._direct:
                address, source = str(literal), None
                if self._sources:
                    address, source = routeFrom(address, self._sources)
                return DirectEndpoint(
                    self._reactor, address, port, self._timeout, source=source
                )
            return _AddressEndpoint(
                self._reactor,
                host if literal.version == 4 else str(literal),
                port,
                self._timeout,
                self._bindAddress,
            )
        return _VettedEndpoint(
            self._reactor,
            self.resolver,
            allowAddress or _allowAll,
            host,
            port,
            self._timeout,
            self._bindAddress,
            self._direct,
            self._sources,
        )
