"""
Who may tunnel where: pure decisions about clients, ports, names and
addresses.

Nothing here does I/O.  A L{TunnelPolicy} answers three questions, each as
early as it can be asked:

  1. may this client use the proxy at all (C{--allow-from})?
  2. may this user reach this host and port (ports, name rules)?
  3. may the tunnel go to this resolved address (address rules and the
     ranges denied by default)?

The third question is asked for every address a name resolves to, and only
the addresses that pass are connected to, so a name that resolves to a
private address, or an odd spelling of one, cannot get through.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from attrs import field, frozen
from attrs.validators import deep_iterable, instance_of
from zope.interface import Interface, implementer

from .answers import mayAddField

if TYPE_CHECKING:
    from .auth import IProxyUser

__all__ = [
    "DEFAULT_DENIED_NETWORKS",
    "DEFAULT_PORTS",
    "RULE_KINDS",
    "RULE_PARSERS",
    "AddressRule",
    "Denial",
    "IPAddress",
    "IPNetwork",
    "ITunnelPolicy",
    "PortRange",
    "TunnelPolicy",
    "embeddedIPv4",
    "hostBitsNote",
    "inNetworks",
    "isDeniedByDefault",
    "isUnspecified",
    "parseAddress",
    "parseNetwork",
    "parsePortRange",
    "parseRules",
    "parseTargetRule",
]

#: An IPv4 or IPv6 address.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: An IPv4 or IPv6 network.
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The target ports allowed without any C{--allow-port}.
DEFAULT_PORTS = (443,)

#: Destinations refused unless an --allow-to rule opens them: everything that
#: is not a globally routed unicast address (IANA special-purpose registries,
#: RFC 6890 and its updates).
DEFAULT_DENIED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(text)
    for text in [
        # IPv4
        "0.0.0.0/8",  # "this network", the unspecified address
        "10.0.0.0/8",  # RFC 1918 private
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "172.16.0.0/12",  # RFC 1918 private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  # RFC 1918 private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
        # IPv6
        "::/128",  # unspecified
        "::1/128",  # loopback
        # IPv4-mapped (::ffff:0:0/96), IPv4-compatible (::/96), NAT64
        # (64:ff9b::/96) and 6to4 (2002::/16) addresses are judged by the
        # IPv4 address they carry: see embeddedIPv4.
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, Teredo included
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    ]
)

# Never a destination, whatever the rules say: the unspecified address is
# only ever a source (RFC 1122 section 3.2.1.3, RFC 4291 section 2.5.2), and
# Linux connects a socket aimed at it to the proxy's own host, so an
# --allow-to 0.0.0.0/0 next to --deny-to 127.0.0.0/8 would open loopback.
_UNSPECIFIED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::/128"),
)

# A last label that is a decimal or hexadecimal number: inet_aton reads such
# a name as an IPv4 address, so request.parseAuthority refuses it as a host.
# The same pattern as request._looksNumeric's, repeated so that neither of
# these two pure modules imports the other (DESIGN.md).
_NUMERIC_LAST_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@functools.lru_cache(maxsize=4096)
def parseAddress(text: str) -> IPAddress | None:
    """
    Parse a canonical IP address literal.

    Every handshake parses its client's and its target's address, and the
    same ones come back again and again: the answers are cached (a bounded
    cache: addresses are immutable values).

    Only the standard dotted-quad and IPv6 forms are addresses here; the
    odd spellings C{inet_aton} accepts (C{127.1}, C{2130706433},
    C{0x7f.0.0.1}) are not, so they are names, and names are vetted by what
    they resolve to.

    @param text: The text, an IPv6 literal without brackets.
    @return: The address, or L{None} if C{text} is not an address literal.
    """
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def embeddedIPv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """
    Find the IPv4 address an IPv6 address stands for, if any.

    @param address: An address.
    @return: The IPv4 address carried by an IPv4-mapped (C{::ffff:a.b.c.d}),
        IPv4-compatible (C{::a.b.c.d}), NAT64 (C{64:ff9b::a.b.c.d}) or 6to4
        (C{2002:AABB:CCDD::}) address; L{None} otherwise, and for C{::} and
        C{::1}, the unspecified and loopback addresses of IPv6 itself (RFC
        4291 section 2.5.5.1), not IPv4's C{0.0.0.0} and C{0.0.0.1}.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    # Read as IPv4-compatible, ::1 would be 0.0.0.1, which an IPv4 rule such
    # as --allow-to 0.0.0.0/0 covers: IPv6 loopback opened by a rule that
    # says nothing of IPv6.
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def isDeniedByDefault(address: IPAddress) -> bool:
    """
    Whether C{address} is in a range the proxy refuses unless told otherwise.

    @param address: The address to check; an IPv6 address that carries an
        IPv4 address is denied if either is.
    @return: C{True} if the address is not a globally routed unicast one.
    """
    candidates: list[IPAddress] = [address]
    embedded = embeddedIPv4(address)
    if embedded is not None:
        candidates.append(embedded)
    return any(
        candidate in network
        for candidate in candidates
        for network in DEFAULT_DENIED_NETWORKS
        if network.version == candidate.version
    )


def isUnspecified(address: IPAddress) -> bool:
    """
    Whether C{address} is an unspecified address (C{0.0.0.0/8}, C{::}, or
    C{0.0.0.0/8} mapped into IPv6, which the kernel connects as IPv4):
    never a destination, whatever the rules open.

    @param address: The address to check.
    @return: C{True} if no rule may allow it.
    """
    if isinstance(address, ipaddress.IPv6Address):
        address = address.ipv4_mapped or address
    return any(address in network for network in _UNSPECIFIED)


@frozen
class PortRange:
    """
    An inclusive range of TCP ports.

    @ivar low: The first port of the range.
    @ivar high: The last port of the range (C{low} for a single port).
    """

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        """
        Whether C{port} is in the range.

        @param port: The port.
        @return: C{True} if C{port} is an L{int} from C{low} to C{high}.
        """
        return isinstance(port, int) and self.low <= port <= self.high


def parsePortRange(text: str) -> PortRange:
    """
    Parse C{443}, C{8000-8999} or C{any}.

    @param text: The port, range, or C{any}.
    @return: The range.
    @raise ValueError: If C{text} is none of these, or outside 1-65535.
    """
    if text == "any":
        return PortRange(1, 65535)
    low, dash, high = text.partition("-")
    try:
        lowPort = int(low)
        highPort = int(high) if dash else lowPort
    except ValueError:
        raise ValueError(f"not a port or port range: {text!r}") from None
    if lowPort > highPort:
        raise ValueError(
            f"not a port range: {text!r} ends before it starts (write {high}-{low})"
        )
    if not 1 <= lowPort <= highPort <= 65535:
        raise ValueError(f"not a port range within 1-65535: {text!r}")
    return PortRange(lowPort, highPort)


@frozen
class AddressRule:
    """
    A destination rule: a network, an exact host name, or a domain suffix.

    @ivar network: The network the rule covers, for address rules.
    @ivar name: The lower-case host name for C{HOST} rules, or the domain
        (without its C{*.}) for C{*.DOMAIN} rules.
    @ivar suffix: Whether C{name} matches its subdomains (C{*.DOMAIN}).
    @ivar text: The rule as written, for messages.
    """

    text: str
    network: IPNetwork | None = None
    name: str | None = None
    suffix: bool = False

    def matchesName(self, host: str) -> bool:
        """
        Whether this rule names C{host} (as the client wrote it).

        @param host: The target host as requested.
        @return: C{True} if this is a name rule that covers C{host}: the
            same name, or a subdomain for a C{*.DOMAIN} rule.
        """
        if self.name is None:
            return False
        host = host.lower().rstrip(".")
        if self.suffix:
            return host.endswith("." + self.name)
        return host == self.name

    def matchesAddress(self, address: IPAddress) -> bool:
        """
        Whether this rule covers C{address}, or the IPv4 address it carries.

        @param address: A resolved (or literal) target address.
        @return: C{True} if this is a network rule that covers C{address},
            or the IPv4 address it carries (see L{embeddedIPv4}).
        """
        if self.network is None:
            return False
        if address.version == self.network.version and address in self.network:
            return True
        embedded = embeddedIPv4(address)
        return (
            embedded is not None
            and self.network.version == 4
            and embedded in self.network
        )


def parseTargetRule(text: str) -> AddressRule:
    """
    Parse a destination rule: C{CIDR}, an address, C{HOST} or C{*.DOMAIN}.

    @param text: The rule.
    @return: The rule.
    @raise ValueError: If C{text} is none of these.
    """
    cleaned = text.strip()
    if cleaned.startswith("[") and cleaned.endswith("]"):
        cleaned = cleaned[1:-1]
    try:
        return AddressRule(text, network=parseNetwork(cleaned))
    except ValueError:
        pass
    name = cleaned.lower().rstrip(".")
    if _NUMERIC_LAST_LABEL.match(name.rpartition(".")[2]):
        # 10.1, 010.0.0.1, 2130706433: the request parser refuses such hosts
        # (400), so as a name this rule could never match anything.
        raise ValueError(
            f"not an address: {text!r} (write IPv4 addresses as four decimal"
            " numbers, or a CIDR)"
        )
    suffix = name.startswith("*.")
    if suffix:
        name = name[2:]
    labels = name.split(".")
    if not name or not all(
        label
        and len(label) <= 63
        and label.replace("-", "").replace("_", "").isalnum()
        and label.isascii()
        for label in labels
    ):
        raise ValueError(f"not a CIDR, host name or *.domain: {text!r}")
    return AddressRule(text, name=name, suffix=suffix)


def _checkDenialStatus(denial: Denial, attribute: object, status: Any) -> None:
    # A 2xx would read as an open tunnel to a client (curl took the body
    # for the start of TLS), a 1xx as an interim answer.
    if (
        not isinstance(status, int)
        or isinstance(status, bool)
        or not 400 <= status <= 599
    ):
        raise ValueError(f"a Denial's status must be 400-599, not {status!r}")


def _checkDenialHeaders(denial: Denial, attribute: object, headers: Any) -> None:
    if not isinstance(headers, tuple) or not all(
        isinstance(pair, tuple)
        and len(pair) == 2
        and all(isinstance(part, bytes) for part in pair)
        and mayAddField(*pair)
        for pair in headers
    ):
        raise ValueError(
            "a Denial's headers must be (name, value) pairs of bytes, a token "
            "and a field value without CR, LF or NUL, other than the fields "
            f"the proxy writes itself, not {headers!r}"
        )


@frozen
class Denial:
    """
    Why a request is refused, and what the client is told.

    @ivar status: The HTTP status, 400-599 (anything else is refused with
        L{ValueError}): 403 for policy.  A 407 gets the proxy's own
        C{Proxy-Authenticate} challenge, unless C{headers} has one.
    @ivar detail: The text of the response body; it names the option that
        would allow the request, since the operator reading it needs that.
    @ivar reason: A short token for logs and metrics (C{"port"},
        C{"client"}, C{"destination"}, C{"address"}).
    @ivar headers: Extra header fields for the response, as C{(name,
        value)} pairs of bytes (C{(b"Retry-After", b"60")}, say).
    """

    status: int = field(validator=_checkDenialStatus)
    detail: str = field(validator=instance_of(str))
    reason: str = field(validator=instance_of(str))
    headers: tuple[tuple[bytes, bytes], ...] = field(
        default=(), validator=_checkDenialHeaders
    )


def _deniedBy(rule: AddressRule, host: str) -> Denial:
    """
    The refusal of C{host} by the C{--deny-to} rule C{rule}.
    """
    return Denial(
        403, f"{host} is denied by the rule --deny-to {rule.text}.", "destination"
    )


class ITunnelPolicy(Interface):
    """
    Decides who may tunnel where.

    The default is L{TunnelPolicy}; an application may provide its own to
    decide per user, client address, target and resolved address.
    """

    def checkClient(client: IPAddress | None) -> Denial | None:
        """
        May this client address use the proxy at all?  Asked when a
        connection is accepted.

        @param client: The client's IP address, or L{None} if the listener
            is not an IP one (a UNIX socket).
        @return: L{None} to allow, or a L{Denial}.
        """

    def checkTarget(
        avatar: IProxyUser | None, client: IPAddress | None, host: str, port: int
    ) -> Denial | None:
        """
        May this user reach C{host:port}?  Asked before any name lookup.

        @param avatar: The authenticated user: the portal's avatar (its
            C{name} is the user name, and a realm of the application's may
            give it more to decide on), or L{None} without authentication.
        @param client: The client's IP address, or L{None}.
        @param host: The target host as requested.
        @param port: The target port.
        @return: L{None} to go on (each address is still checked), or a
            L{Denial}.
        """

    def checkAddress(
        avatar: IProxyUser | None,
        client: IPAddress | None,
        host: str,
        port: int,
        address: IPAddress,
    ) -> bool:
        """
        May the tunnel to C{host:port} go to this resolved C{address}?

        @param avatar: The authenticated user: the portal's avatar, as for
            L{checkTarget}, or L{None} without authentication.
        @param client: The client's IP address, or L{None}.
        @param host: The target host as requested.
        @param port: The target port.
        @param address: One address C{host} resolved to (or C{host} itself,
            for an address literal).
        @return: C{True} to allow connecting to this address.
        """

    def addressDenial(host: str, port: int) -> Denial:
        """
        The denial to send when no resolved address was allowed.

        @param host: The target host as requested.
        @param port: The target port.
        @return: The refusal, naming the option that would open the
            destination.
        """


def inNetworks(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """
    Whether a client's C{address} lies in one of C{networks}; an
    IPv4-mapped IPv6 address (as a dual-stack socket reports an IPv4
    client) lies in the IPv4 networks its IPv4 address does.

    @param address: The client's address.
    @param networks: The networks.
    @return: Whether one of them holds it.
    """
    candidates: list[IPAddress] = [address]
    # Only the IPv4-mapped form is an IPv4 client; a 6to4 or NAT64 source is
    # an IPv6 host whose address merely carries IPv4 bits, and no IPv4 rule
    # should admit it.
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        candidates.append(mapped)
    return any(
        candidate.version == network.version and candidate in network
        for candidate in candidates
        for network in networks
    )


def hostBitsNote(text: str) -> str | None:
    """
    What a network rule written with host bits set means, said plainly:
    C{192.0.2.7/24} is taken for the network C{192.0.2.0/24} (as C{ip addr}
    writes an interface's address), which is what is meant most of the
    time, but C{10.0.0.1/0} is every address.

    @param text: A rule (C{--allow-from}, C{--allow-to} or C{--deny-to}).
    @return: A sentence naming the network it is taken for, or L{None} if
        the rule is not a network with host bits set.
    """
    cleaned = text.strip()
    if cleaned.startswith("[") and cleaned.endswith("]"):
        cleaned = cleaned[1:-1]
    if "/" not in cleaned:
        return None
    try:
        interface = ipaddress.ip_interface(cleaned)
    except ValueError:
        return None
    network = interface.network
    if interface.ip == network.network_address:
        return None
    everything = " (every address)" if network.prefixlen == 0 else ""
    return f"{text} is taken for the network {network}{everything}"


def parseNetwork(text: str) -> IPNetwork:
    """
    Parse a network as the options and rules files give it (C{--allow-from},
    C{--proxy-protocol-from}): a CIDR or one address.  Host bits are
    allowed and dropped, C{192.0.2.7/24} is C{192.0.2.0/24} (see
    L{hostBitsNote}, which tells the operator).

    @param text: The network.
    @return: The network.
    @raise ValueError: If C{text} is not one.
    """
    return ipaddress.ip_network(text, strict=False)


def _parseNetworks(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(parseNetwork(text) for text in texts)


def _ruleTexts(name: str, texts: Iterable[str]) -> tuple[str, ...]:
    """
    The rule texts given for C{name}, read once (a generator, too) and
    checked.

    @raise TypeError: For a string where a sequence of them is expected,
        or an item that is not a string.
    """
    if isinstance(texts, (str, bytes)):
        # A string is a sequence too: "8443" would allow ports 8, 4 and 3,
        # and not 8443.
        raise TypeError(
            f"{name} must be a sequence of rule texts, such as"
            f" [{texts!r}], not {type(texts).__name__}"
        )
    given = tuple(texts)
    for text in given:
        if not isinstance(text, str):
            raise TypeError(
                f"{name} must hold rule texts, such as {str(text)!r},"
                f" not {type(text).__name__}"
            )
    return given


def _portRanges(ports: Iterable[PortRange]) -> tuple[PortRange, ...]:
    return tuple(ports)


@implementer(ITunnelPolicy)
@frozen
class TunnelPolicy:
    """
    The default policy: ports, client networks, and destination rules.

    Precedence for destinations, first match wins:
      0. the unspecified address (C{0.0.0.0}, C{::}) is always denied
         (see L{isUnspecified}): no rule opens it;
      1. a C{denyTo} rule (name or address) denies;
      2. an C{allowTo} rule (name or address) allows;
      3. an address in L{DEFAULT_DENIED_NETWORKS} is denied;
      4. anything else is allowed.

    @ivar ports: The target ports allowed; by default only 443.
    @ivar allowFrom: Client networks allowed to use the proxy; empty means
        any client.
    @ivar allowTo: Destination rules that open a destination.
    @ivar denyTo: Destination rules that close one, before anything else.
    """

    # Checked when built: a plain int would be taken at every request and
    # fail there, a 500 for each.
    ports: tuple[PortRange, ...] = field(
        default=tuple(PortRange(p, p) for p in DEFAULT_PORTS),
        converter=_portRanges,
        validator=deep_iterable(instance_of(PortRange)),
    )
    allowFrom: tuple[IPNetwork, ...] = ()
    allowTo: tuple[AddressRule, ...] = ()
    denyTo: tuple[AddressRule, ...] = ()

    @classmethod
    def fromStrings(
        cls,
        ports: Iterable[str] = (),
        allowFrom: Iterable[str] = (),
        allowTo: Iterable[str] = (),
        denyTo: Iterable[str] = (),
        defaultPorts: bool = True,
    ) -> TunnelPolicy:
        """
        Build a policy from rule texts, as given on the command line.

        @param ports: Ports or ranges allowed besides 443 (C{22},
            C{8000-8999}, C{any}).
        @param defaultPorts: Whether port 443 is allowed as well, as the
            command line always allows it; C{False} allows only C{ports}.
        @param allowFrom: Client networks (CIDR or address) allowed to use
            the proxy; empty means any client.
        @param allowTo: Destination rules that open a destination (see
            L{parseTargetRule}).
        @param denyTo: Destination rules that close one.
        @return: The policy.
        @raise ValueError: If a rule cannot be parsed.
        @raise TypeError: If a string is given where a sequence of them is.
        """
        ports = _ruleTexts("ports", ports)
        allowFrom = _ruleTexts("allowFrom", allowFrom)
        allowTo = _ruleTexts("allowTo", allowTo)
        denyTo = _ruleTexts("denyTo", denyTo)
        defaults = DEFAULT_PORTS if defaultPorts else ()
        return cls(
            ports=tuple(PortRange(p, p) for p in defaults)
            + tuple(parsePortRange(text) for text in ports),
            allowFrom=_parseNetworks(allowFrom),
            allowTo=tuple(parseTargetRule(text) for text in allowTo),
            denyTo=tuple(parseTargetRule(text) for text in denyTo),
        )

    def checkClient(self, client: IPAddress | None) -> Denial | None:
        """
        Allow clients within C{allowFrom}, or anyone if it is empty.

        See L{ITunnelPolicy.checkClient}.

        @param client: The client's IP address, or L{None} for a client on a
            UNIX socket (refused when C{allowFrom} is set).
        @return: L{None} to allow, or a L{Denial} (C{"client"}).
        """
        if not self.allowFrom:
            return None
        if client is not None and inNetworks(client, self.allowFrom):
            return None
        return Denial(
            403,
            "Your address may not use this proxy (see --allow-from).",
            "client",
        )

    def checkTarget(
        self, avatar: IProxyUser | None, client: IPAddress | None, host: str, port: int
    ) -> Denial | None:
        """
        Check the port and the name rules.

        See L{ITunnelPolicy.checkTarget}.

        @param avatar: The authenticated user (an L{IProxyUser}), or L{None}
            (unused).
        @param client: The client's IP address, or L{None} (unused).
        @param host: The target host as requested.
        @param port: The target port.
        @return: L{None} to go on, or a L{Denial} (C{"port"}, or
            C{"destination"} for a C{denyTo} name rule).
        """
        if not any(port in allowed for allowed in self.ports):
            return Denial(
                403,
                f"Port {port} is not allowed (see --allow-port {port}).",
                "port",
            )
        for rule in self.denyTo:
            if rule.matchesName(host):
                return _deniedBy(rule, host)
        return None

    def checkAddress(
        self,
        avatar: IProxyUser | None,
        client: IPAddress | None,
        host: str,
        port: int,
        address: IPAddress,
    ) -> bool:
        """
        Apply the address rules in order of precedence.

        See L{ITunnelPolicy.checkAddress}.

        @param avatar: The authenticated user (an L{IProxyUser}), or L{None}
            (unused).
        @param client: The client's IP address, or L{None} (unused).
        @param host: The target host as requested.
        @param port: The target port (unused).
        @param address: One address C{host} resolved to.
        @return: C{True} to allow connecting to C{address}.
        """
        if isUnspecified(address):
            return False
        for rule in self.denyTo:
            if rule.matchesAddress(address):
                return False
        for rule in self.allowTo:
            if rule.matchesName(host) or rule.matchesAddress(address):
                return True
        return not isDeniedByDefault(address)

    def addressDenial(self, host: str, port: int) -> Denial:
        """
        Name the option that would open the destination.

        See L{ITunnelPolicy.addressDenial}.

        @param host: The target host as requested.
        @param port: The target port (unused).
        @return: The refusal: C{"destination"} if a C{denyTo} rule covers
            an address literal, or if an C{allowTo} rule names C{host} (so
            only C{denyTo} can have refused its addresses), C{"address"}
            otherwise.
        """
        # The policy may have refused by default or by a --deny-to rule;
        # name both, since --deny-to wins.
        hint = f"see --allow-to {host}, unless a --deny-to rule covers it"
        literal = parseAddress(host)
        if literal is None:
            if any(rule.matchesName(host) for rule in self.allowTo):
                # Opened by name already: only --deny-to (or the unspecified
                # address, which is never a destination) refused its
                # addresses, and pointing at --allow-to would not help.
                return Denial(
                    403,
                    f"{host} resolves only to addresses that --deny-to rules"
                    " deny (or to the unspecified address).",
                    "destination",
                )
            return Denial(
                403,
                f"{host} resolves only to addresses this proxy may not reach ({hint}).",
                "address",
            )
        if isUnspecified(literal):
            return Denial(
                403,
                f"{host} is the unspecified address, never a destination.",
                "address",
            )
        for rule in self.denyTo:
            if rule.matchesAddress(literal):
                return _deniedBy(rule, host)
        return Denial(
            403, f"{host} is in a range this proxy may not reach ({hint}).", "address"
        )


#: How the value of each kind of rule is checked, by the name of its option
#: (and of its lines in a rules file).
RULE_PARSERS: dict[str, Callable[[str], object]] = {
    "allow-port": parsePortRange,
    "allow-from": parseNetwork,
    "allow-to": parseTargetRule,
    "deny-to": parseTargetRule,
}

#: The kinds of rule a rules file may hold, as the options are named.
RULE_KINDS = tuple(RULE_PARSERS)


def parseRules(text: str, source: str = "<rules>") -> dict[str, list[str]]:
    """
    Parse a rules file: one rule a line, C{KIND VALUE}, where KIND is one of
    C{allow-port}, C{allow-from}, C{allow-to}, C{deny-to} (the command-line
    options without their dashes); C{#} starts a comment.

    @param text: The file's text.
    @param source: The file name, for error messages.
    @return: The values of each kind of rule, in order.
    @raise ValueError: Naming the file and line of the first bad rule.
    """
    rules: dict[str, list[str]] = {kind: [] for kind in RULE_KINDS}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.partition("#")[0].split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in rules:
            raise ValueError(
                f"{source}:{number}: expected one of {', '.join(RULE_KINDS)} "
                "and one value"
            )
        kind, value = words
        try:
            RULE_PARSERS[kind](value)
        except ValueError as e:
            raise ValueError(f"{source}:{number}: {e}") from None
        rules[kind].append(value)
    return rules


#: A policy that allows any port and any address: for tests and for
#: applications that do their own checks.
OPEN_POLICY = TunnelPolicy(
    ports=(PortRange(1, 65535),),
    allowTo=(parseTargetRule("0.0.0.0/0"), parseTargetRule("::/0")),
)
