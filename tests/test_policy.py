"""
Tests for L{tunnel.policy}: pure decisions, no sockets.
"""

from __future__ import annotations

import ipaddress
import socket

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunnel.policy import (
    DEFAULT_DENIED_NETWORKS,
    OPEN_POLICY,
    Denial,
    ITunnelPolicy,
    PortRange,
    TunnelPolicy,
    embeddedIPv4,
    hostBitsNote,
    isDeniedByDefault,
    isUnspecified,
    parseAddress,
    parsePortRange,
    parseRules,
    parseTargetRule,
)
from tunnel.request import RequestRejected, parseAuthority

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT = TunnelPolicy()


def allowed(policy: TunnelPolicy, address: str, host: str = "h.example") -> bool:
    """
    Ask C{policy} whether a tunnel to C{host} may go to C{address}.
    """
    return policy.checkAddress(None, None, host, 443, ipaddress.ip_address(address))


def spellings(address: IPAddress) -> list[str]:
    """
    The ways a client can write C{address} in a CONNECT target, from the
    canonical form to the odd ones C{inet_aton} accepts.
    """
    forms: list[str] = []
    if isinstance(address, ipaddress.IPv4Address):
        value = int(address)
        a, b, c, d = address.packed
        forms += [
            str(address),
            str(value),
            hex(value),
            f"{a}.{(b << 16) | (c << 8) | d}",
            f"{a}.{b}.{(c << 8) | d}",
            f"0x{a:x}.{b}.{c}.{d}",
            f"0{a:o}.{b}.{c}.{d}" if a else f"{a}.{b}.{c}.{d}",
            f"::ffff:{address}",
            f"::ffff:{value >> 16:x}:{value & 0xFFFF:x}",
            f"64:ff9b::{address}",
            f"2002:{value >> 16:x}:{value & 0xFFFF:x}::1",
        ]
        if value > 0xFFFF:
            forms.append(f"::{address}")
    else:
        forms += [str(address), address.exploded, address.exploded.upper()]
    return forms


def resolve(form: str) -> IPAddress:
    """
    What a resolver turns C{form} into: the address literal itself, or for
    the legacy IPv4 spellings what C{inet_aton} (and so C{getaddrinfo})
    makes of them.  This is libc arithmetic, not a DNS query.
    """
    literal = parseAddress(form)
    if literal is not None:
        return literal
    return ipaddress.IPv4Address(socket.inet_aton(form))


deniedAddresses = st.sampled_from(DEFAULT_DENIED_NETWORKS).flatmap(
    lambda network: st.integers(
        int(network.network_address), int(network.broadcast_address)
    ).map(ipaddress.IPv4Address if network.version == 4 else ipaddress.IPv6Address)
)


class DefaultRangesTests(SynchronousTestCase):
    """
    The ranges denied by default.
    """

    def test_examples(self) -> None:
        """
        The classic targets of an open proxy are denied; public addresses
        are not.
        """
        for text in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.0.0.5",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:a9fe:a9fe",
            "64:ff9b::10.0.0.1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "::127.0.0.1",
            "2001:db8::1",
        ]:
            self.assertTrue(isDeniedByDefault(ipaddress.ip_address(text)), text)
        for text in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
        ]:
            self.assertFalse(isDeniedByDefault(ipaddress.ip_address(text)), text)

    def test_embedded(self) -> None:
        """
        L{embeddedIPv4} finds the IPv4 address in mapped, compatible, NAT64
        and 6to4 addresses, and nothing in others.
        """
        v4 = ipaddress.IPv4Address("192.0.2.33")
        for text in [
            "::ffff:192.0.2.33",
            "::192.0.2.33",
            "64:ff9b::192.0.2.33",
            "2002:c000:221::",
        ]:
            self.assertEqual(embeddedIPv4(ipaddress.ip_address(text)), v4, text)
        self.assertIsNone(embeddedIPv4(ipaddress.ip_address("2606:4700::1")))
        self.assertIsNone(embeddedIPv4(v4))
        # IPv6's own unspecified and loopback addresses carry no IPv4 one.
        for text in ["::", "::1", "0::1", "::0.0.0.1"]:
            self.assertIsNone(embeddedIPv4(ipaddress.ip_address(text)), text)
        self.assertEqual(
            embeddedIPv4(ipaddress.ip_address("::0.0.0.2")),
            ipaddress.IPv4Address("0.0.0.2"),
        )

    @settings(max_examples=400, deadline=None)
    @given(deniedAddresses)
    def test_deniedInEveryForm(self, address: IPAddress) -> None:
        """
        Any address inside a default-denied range is denied however the
        client writes it: each spelling is either refused by the parser or
        resolves to an address the policy denies.
        """
        for form in spellings(address):
            target = f"[{form}]:443" if ":" in form else f"{form}:443"
            try:
                host, port = parseAuthority(target.encode("ascii"))
            except RequestRejected:
                continue
            self.assertFalse(
                DEFAULT.checkAddress(None, None, host, port, resolve(host)),
                f"{form} ({address}) was allowed",
            )

    # Hypothesis favours small integers, many of which are in 0.0.0.0/8.
    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.filter_too_much],
    )
    @given(
        st.one_of(
            st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
            st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
        )
    )
    def test_publicAllowed(self, address: IPAddress) -> None:
        """
        Any public address (one Python's own tables call global, that is not
        multicast and carries no denied IPv4 address) is allowed on port 443,
        and every address Python calls non-global is denied: the two tables
        agree.
        """
        embedded = embeddedIPv4(address)
        public = (
            address.is_global
            and not address.is_multicast
            and (embedded is None or (embedded.is_global and not embedded.is_multicast))
        )
        if not address.is_global:
            self.assertFalse(allowed(DEFAULT, str(address)), str(address))
        assume(public and not isDeniedByDefault(address))
        self.assertIsNone(DEFAULT.checkTarget(None, None, "h.example", 443))
        self.assertTrue(allowed(DEFAULT, str(address)), str(address))

    def test_everyDefaultRange(self) -> None:
        """
        The first and the last address of each range denied by default are
        denied, and so are the addresses an IPv6 address carries in one.
        """
        for text in [
            "0.0.0.0/8",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.0.0.0/24",
            "192.0.2.0/24",
            "192.88.99.0/24",
            "192.168.0.0/16",
            "198.18.0.0/15",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "224.0.0.0/4",
            "240.0.0.0/4",
            "::/128",
            "::1/128",
            "64:ff9b:1::/48",
            "100::/64",
            "2001::/23",
            "2001:db8::/32",
            "3fff::/20",
            "5f00::/16",
            "fc00::/7",
            "fe80::/10",
            "fec0::/10",
            "ff00::/8",
        ]:
            network = ipaddress.ip_network(text)
            for address in [network[0], network[-1]]:
                self.assertTrue(isDeniedByDefault(address), f"{address} ({text})")
                if address.version == 4:
                    mapped = ipaddress.ip_address(f"::ffff:{address}")
                    self.assertTrue(isDeniedByDefault(mapped), f"{mapped} ({text})")


class PortTests(SynchronousTestCase):
    """
    The port rules.
    """

    def test_default(self) -> None:
        """
        By default only 443 is allowed; the denial names the option.
        """
        self.assertIsNone(DEFAULT.checkTarget(None, None, "h.example", 443))
        denial = DEFAULT.checkTarget(None, None, "h.example", 22)
        assert denial is not None
        self.assertEqual((denial.status, denial.reason), (403, "port"))
        self.assertIn("--allow-port 22", denial.detail)

    def test_fromStrings(self) -> None:
        """
        C{--allow-port} adds single ports and ranges to 443.
        """
        policy = TunnelPolicy.fromStrings(ports=["22", "8000-8999"])
        for port in [22, 443, 8000, 8500, 8999]:
            self.assertIsNone(policy.checkTarget(None, None, "h", port), port)
        for port in [21, 23, 7999, 9000, 80]:
            self.assertIsNotNone(policy.checkTarget(None, None, "h", port), port)

    def test_any(self) -> None:
        """
        C{any} allows every port.
        """
        policy = TunnelPolicy.fromStrings(ports=["any"])
        for port in [1, 80, 65535]:
            self.assertIsNone(policy.checkTarget(None, None, "h", port))

    def test_parsePortRange(self) -> None:
        """
        Ports and ranges parse; nonsense and out-of-range values do not.
        """
        self.assertEqual(parsePortRange("22"), PortRange(22, 22))
        self.assertEqual(parsePortRange("1-65535"), PortRange(1, 65535))
        for text in ["0", "65536", "9-8", "a", "1-", "-1", "", "1-2-3"]:
            self.assertRaises(ValueError, parsePortRange, text)
        # A range written backwards is told as one, not as out of 1-65535.
        error = self.assertRaises(ValueError, parsePortRange, "8000-7000")
        self.assertIn("ends before it starts (write 7000-8000)", str(error))
        self.assertNotIn("22", PortRange(1, 100))


class FromStringsTests(SynchronousTestCase):
    """
    Tests for L{TunnelPolicy.fromStrings}.
    """

    def test_defaultPorts(self) -> None:
        """
        Ports are allowed besides 443, as on the command line, unless
        C{defaultPorts} is false.
        """
        allowed = TunnelPolicy.fromStrings(ports=["8443"])
        self.assertEqual(allowed.ports, (PortRange(443, 443), PortRange(8443, 8443)))
        only = TunnelPolicy.fromStrings(ports=["8443"], defaultPorts=False)
        self.assertEqual(only.ports, (PortRange(8443, 8443),))
        self.assertIsNotNone(only.checkTarget(None, None, "example.com", 443))
        self.assertIsNone(only.checkTarget(None, None, "example.com", 8443))

    def test_stringForSequence(self) -> None:
        """
        A string where a sequence of rule texts is expected is refused with
        L{TypeError}: iterated, C{"8443"} would allow ports 8, 4 and 3.
        """
        for name in ["ports", "allowFrom", "allowTo", "denyTo"]:
            error = self.assertRaises(
                TypeError, TunnelPolicy.fromStrings, **{name: "8443"}
            )
            self.assertIn(f"{name} must be a sequence of rule texts", str(error))
            self.assertIn("['8443']", str(error))

    def test_notTexts(self) -> None:
        """
        Something other than a string among the rule texts (a port given
        as an int) is refused with L{TypeError} naming it.
        """
        for name in ["ports", "allowFrom", "allowTo", "denyTo"]:
            error = self.assertRaises(
                TypeError, TunnelPolicy.fromStrings, **{name: [8443]}
            )
            self.assertIn(f"{name} must hold rule texts, such as '8443'", str(error))

    def test_iterables(self) -> None:
        """
        Rule texts given as iterators (a generator) are read once and all
        kept: checking them must not use them up and leave a policy that
        allows every client and denies no destination.
        """
        policy = TunnelPolicy.fromStrings(
            ports=iter(["8443"]),
            allowFrom=(text for text in ["10.0.0.0/8"]),
            allowTo=iter(["192.168.0.0/16"]),
            denyTo=iter(["169.254.0.0/16"]),
        )
        listed = TunnelPolicy.fromStrings(
            ports=["8443"],
            allowFrom=["10.0.0.0/8"],
            allowTo=["192.168.0.0/16"],
            denyTo=["169.254.0.0/16"],
        )
        self.assertEqual(policy, listed)
        self.assertIsNotNone(policy.checkClient(ipaddress.ip_address("203.0.113.5")))

    def test_portsAreRanges(self) -> None:
        """
        A policy built with ports that are not L{PortRange}s is refused
        when built (L{TypeError}), not at every request.
        """
        self.assertRaises(TypeError, TunnelPolicy, ports=(443, 8443))
        TunnelPolicy(ports=(PortRange(443, 443),))
        # Any iterable of them, read once into the tuple kept.
        policy = TunnelPolicy(ports=iter([PortRange(22, 22)]))
        self.assertEqual(policy.ports, (PortRange(22, 22),))


class HostBitsNoteTests(SynchronousTestCase):
    """
    Tests for L{hostBitsNote}.
    """

    def test_notes(self) -> None:
        """
        A network rule with host bits set is said to be taken for its
        network, every address for a C{/0}; a network, an address, a name
        or a malformed rule gets no note.
        """
        self.assertEqual(
            hostBitsNote("192.0.2.7/24"),
            "192.0.2.7/24 is taken for the network 192.0.2.0/24",
        )
        self.assertEqual(
            hostBitsNote("10.0.0.1/0"),
            "10.0.0.1/0 is taken for the network 0.0.0.0/0 (every address)",
        )
        self.assertEqual(
            hostBitsNote("[2001:db8::1/32]"),
            "[2001:db8::1/32] is taken for the network 2001:db8::/32",
        )
        self.assertEqual(
            hostBitsNote("128.0.0.1/1"),
            "128.0.0.1/1 is taken for the network 128.0.0.0/1",
        )
        for text in ["192.0.2.0/24", "0.0.0.0/0", "192.0.2.7", "a.example", "1/x"]:
            self.assertIsNone(hostBitsNote(text), text)


class ParseAddressTests(SynchronousTestCase):
    """
    Tests for L{parseAddress}.
    """

    def test_literalsOnly(self) -> None:
        """
        An IPv4 or IPv6 literal (without brackets) is an address; anything
        else, surrounding space included, is not.
        """
        self.assertEqual(parseAddress("192.0.2.1"), ipaddress.ip_address("192.0.2.1"))
        self.assertEqual(
            parseAddress("2001:db8::1"), ipaddress.ip_address("2001:db8::1")
        )
        for text in [" 192.0.2.1", "192.0.2.1 ", "[::1]", "a.example", "", "1.2.3"]:
            self.assertIsNone(parseAddress(text), text)


class DenialTests(SynchronousTestCase):
    """
    Tests for L{Denial}, a policy's refusal.
    """

    def test_status(self) -> None:
        """
        A denial's status is an error, 400-599: a 2xx would read as an open
        tunnel to the client, a 1xx as an interim answer.
        """
        from http import HTTPStatus

        self.assertEqual(Denial(403, "No.", "rule").status, 403)
        self.assertEqual(Denial(599, "No.", "rule").status, 599)
        self.assertEqual(Denial(HTTPStatus.FORBIDDEN, "No.", "rule").status, 403)
        for status in [200, 100, 399, 600, "403", 403.0, True]:
            self.assertRaises(ValueError, Denial, status, "No.", "rule")

    def test_text(self) -> None:
        """
        A denial's detail and reason are text: bytes (or anything else) are
        refused where the policy makes the denial, not when the answer is
        written.
        """
        self.assertRaises(TypeError, Denial, 403, b"No.", "rule")
        self.assertRaises(TypeError, Denial, 403, "No.", b"rule")
        self.assertRaises(TypeError, Denial, 403, None, "rule")

    def test_headers(self) -> None:
        """
        A denial's header fields are C{(name, value)} pairs of bytes, a
        token and a value with no line break or NUL: nothing a policy gets
        wrong can split the answer.
        """
        self.assertEqual(
            Denial(429, "Later.", "rule", ((b"Retry-After", b"60"),)).headers,
            ((b"Retry-After", b"60"),),
        )
        for headers in [
            [(b"Retry-After", b"60")],
            (("Retry-After", "60"),),
            ((b"Retry After", b"60"),),
            ((b"X", b"1\r\nSet-Cookie: a=b"),),
            ((b"X", b"a\0"),),
            ((b"X",),),
            ((b"X", b"a\x7f"),),
            ((b"X", b"a\x1b[31m"),),
            ((b"Content-Length", b"0"),),
            ((b"connection", b"keep-alive"),),
            ((b"Content-Type", b"text/html"),),
            ((b"Transfer-Encoding", b"chunked"),),
            ((b"Date", b"Thu, 01 Jan 1970 00:00:00 GMT"),),
        ]:
            self.assertRaises(ValueError, Denial, 403, "No.", "rule", headers)
        # Tab is the one control character a field value may hold.
        self.assertEqual(
            Denial(403, "No.", "rule", ((b"X", b"a\tb"),)).headers, ((b"X", b"a\tb"),)
        )


class DestinationRuleTests(SynchronousTestCase):
    """
    C{--allow-to} and C{--deny-to}, and their precedence.
    """

    def test_allowNetwork(self) -> None:
        """
        An C{--allow-to} CIDR opens addresses in it, and only those.
        """
        policy = TunnelPolicy.fromStrings(allowTo=["10.1.0.0/16"])
        self.assertTrue(allowed(policy, "10.1.2.3"))
        self.assertTrue(allowed(policy, "::ffff:10.1.2.3"))
        self.assertFalse(allowed(policy, "10.2.0.1"))

    def test_allowHost(self) -> None:
        """
        An C{--allow-to} host name opens every address of that name, and a
        C{*.domain} rule every subdomain (not the domain itself).
        """
        policy = TunnelPolicy.fromStrings(
            allowTo=["intranet.example", "*.corp.example"]
        )
        self.assertTrue(allowed(policy, "10.0.0.5", "INTRANET.example."))
        self.assertTrue(allowed(policy, "10.0.0.5", "git.corp.example"))
        self.assertFalse(allowed(policy, "10.0.0.5", "corp.example"))
        self.assertFalse(allowed(policy, "10.0.0.5", "other.example"))

    def test_denyFirst(self) -> None:
        """
        C{--deny-to} wins over C{--allow-to} and over public addresses; a
        denied name is refused before any lookup.
        """
        policy = TunnelPolicy.fromStrings(
            allowTo=["10.0.0.0/8", "*.example"],
            denyTo=["10.9.0.0/16", "bad.example", "8.8.8.0/24"],
        )
        self.assertTrue(allowed(policy, "10.1.0.1"))
        self.assertFalse(allowed(policy, "10.9.0.1"))
        self.assertFalse(allowed(policy, "8.8.8.8", "good.example"))
        self.assertFalse(allowed(policy, "::ffff:8.8.8.8"))
        denial = policy.checkTarget(None, None, "bad.example", 443)
        assert denial is not None
        self.assertIn("--deny-to bad.example", denial.detail)
        self.assertIsNone(policy.checkTarget(None, None, "good.example", 443))

    def test_unspecifiedNeverAllowed(self) -> None:
        """
        No rule opens the unspecified address (C{0.0.0.0/8}, C{::}, or
        C{0.0.0.0} mapped into IPv6): Linux would connect it to the proxy's
        own host, so allowing everything but loopback would open loopback.
        """
        policy = TunnelPolicy.fromStrings(
            ports=["any"],
            allowTo=["0.0.0.0/0", "::/0", "0.0.0.0"],
            denyTo=["127.0.0.0/8", "::1"],
        )
        for address in ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0"]:
            self.assertEqual(
                policy.addressDenial(address, 80).detail,
                f"{address} is the unspecified address, never a destination.",
            )
            self.assertFalse(allowed(policy, address), address)
            self.assertFalse(allowed(OPEN_POLICY, address), address)
            self.assertTrue(isUnspecified(ipaddress.ip_address(address)), address)
        for address in ["8.8.8.8", "::2", "::ffff:8.8.8.8", "2606:2800:220:1::1"]:
            self.assertTrue(allowed(policy, address), address)
            self.assertFalse(isUnspecified(ipaddress.ip_address(address)), address)

    def test_ipv6LoopbackNotOpenedByIPv4Rules(self) -> None:
        """
        Allowing every IPv4 address but loopback (C{--allow-to 0.0.0.0/0
        --deny-to 127.0.0.0/8}) does not open IPv6 loopback, however it is
        spelled: C{::1} is not the IPv4-compatible form of C{0.0.0.1}.
        """
        policy = TunnelPolicy.fromStrings(
            ports=["any"], allowTo=["0.0.0.0/0"], denyTo=["127.0.0.0/8"]
        )
        for address in ["::1", "0::1", "0:0:0:0:0:0:0:1", "::0.0.0.1"]:
            self.assertFalse(allowed(policy, address), address)
        for address in ["::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1"]:
            self.assertFalse(allowed(policy, address), address)
        self.assertTrue(allowed(policy, "8.8.8.8"))

    def test_addressDenial(self) -> None:
        """
        When no address remains the client is told which option opens it.
        """
        denial = DEFAULT.addressDenial("h.example", 443)
        self.assertEqual((denial.status, denial.reason), (403, "address"))
        self.assertIn("resolves only to", denial.detail)
        self.assertIn("--allow-to h.example", denial.detail)
        # An address literal that a --deny-to rule refuses: that rule.
        denied = TunnelPolicy.fromStrings(allowTo=["127.0.0.0/8"], denyTo=["127.0.0.1"])
        denial = denied.addressDenial("127.0.0.1", 443)
        self.assertEqual(
            (denial.detail, denial.reason),
            ("127.0.0.1 is denied by the rule --deny-to 127.0.0.1.", "destination"),
        )
        literal = DEFAULT.addressDenial("10.0.0.1", 443)
        self.assertEqual(
            literal.detail,
            "10.0.0.1 is in a range this proxy may not reach "
            "(see --allow-to 10.0.0.1, unless a --deny-to rule covers it).",
        )

    def test_parseTargetRule(self) -> None:
        """
        Rules are CIDRs, addresses (bracketed or not), host names or
        C{*.domain}; anything else is an error.
        """
        self.assertEqual(
            parseTargetRule("10.0.0.1/8").network, ipaddress.ip_network("10.0.0.0/8")
        )
        self.assertEqual(
            parseTargetRule("[::1]").network, ipaddress.ip_network("::1/128")
        )
        rule = parseTargetRule("*.Example.COM")
        self.assertEqual((rule.name, rule.suffix), ("example.com", True))
        for text in ["", "*.", "a..b", "bad name", "a/b", "é.example", "-"]:
            self.assertRaises(ValueError, parseTargetRule, text)

    def test_numericNameRules(self) -> None:
        """
        A rule that is neither an address nor a CIDR but ends in a number
        (C{10.1}, C{010.0.0.1}, C{2130706433}, C{host.123}, C{0x7f}) is an
        error: the request parser refuses such hosts, so as a name it could
        never match, and a mistyped deny rule would silently do nothing.
        """
        for text in ["10.1", "010.0.0.1", "2130706433", "host.123", "a.0x7f", "*.10"]:
            e = self.assertRaises(ValueError, parseTargetRule, text)
            self.assertIn("four decimal numbers", str(e))
        self.assertEqual(parseTargetRule("host.a123").name, "host.a123")

    def test_openPolicy(self) -> None:
        """
        L{OPEN_POLICY} allows any port and any address.
        """
        self.assertIsNone(OPEN_POLICY.checkTarget(None, None, "h", 1))
        self.assertTrue(allowed(OPEN_POLICY, "127.0.0.1"))
        self.assertTrue(allowed(OPEN_POLICY, "::1"))

    def test_interface(self) -> None:
        """
        L{TunnelPolicy} provides L{ITunnelPolicy}.
        """
        self.assertTrue(ITunnelPolicy.providedBy(DEFAULT))

    def test_denialStatuses(self) -> None:
        """
        Every refusal of a destination is a 403: a name refused by a
        C{--deny-to} rule, an address literal refused by one, one in a
        default-denied range, and the unspecified address.
        """
        policy = TunnelPolicy.fromStrings(denyTo=["bad.example", "10.9.0.0/16"])
        denial = policy.checkTarget(None, None, "bad.example", 443)
        assert denial is not None
        self.assertEqual((denial.status, denial.reason), (403, "destination"))
        for host, reason in [
            ("10.9.0.1", "destination"),
            ("10.0.0.1", "address"),
            ("0.0.0.0", "address"),
            ("h.example", "address"),
        ]:
            denial = policy.addressDenial(host, 443)
            self.assertEqual((denial.status, denial.reason), (403, reason), host)

    def test_addressDenialNamesOnlyMatchingRule(self) -> None:
        """
        A refused address literal is blamed on a C{--deny-to} rule only if
        that rule covers it; otherwise the client is pointed at C{--allow-to}.
        """
        policy = TunnelPolicy.fromStrings(denyTo=["10.9.0.0/16", "bad.example"])
        denial = policy.addressDenial("10.0.0.1", 443)
        self.assertEqual(
            (denial.detail, denial.reason),
            (
                "10.0.0.1 is in a range this proxy may not reach "
                "(see --allow-to 10.0.0.1, unless a --deny-to rule covers it).",
                "address",
            ),
        )

    def test_addressDenialNameOpenedByName(self) -> None:
        """
        A name whose addresses were all refused although an C{--allow-to}
        rule names it was refused by C{--deny-to}: the denial says so, as a
        C{"destination"} refusal, instead of pointing at the C{--allow-to}
        rule already there.  A name no rule opens is still pointed at
        C{--allow-to}.
        """
        policy = TunnelPolicy.fromStrings(
            allowTo=["localhost", "*.lan"], denyTo=["127.0.0.1"]
        )
        for host in ["localhost", "printer.lan"]:
            self.assertFalse(
                policy.checkAddress(
                    None, None, host, 443, ipaddress.ip_address("127.0.0.1")
                )
            )
            denial = policy.addressDenial(host, 443)
            self.assertEqual(
                (denial.detail, denial.reason),
                (
                    f"{host} resolves only to addresses that --deny-to rules deny"
                    " (or to the unspecified address).",
                    "destination",
                ),
            )
        denial = policy.addressDenial("other.example", 443)
        self.assertEqual(denial.reason, "address")
        self.assertIn("see --allow-to other.example", denial.detail)

    def test_ruleLabelLength(self) -> None:
        """
        A name rule may have labels of up to 63 characters, as a host name
        may; a longer label could never match a request, so it is an error.
        """
        label = "a" * 63
        self.assertEqual(parseTargetRule(f"{label}.example").name, f"{label}.example")
        self.assertEqual(parseTargetRule(f"*.{label}.example").name, f"{label}.example")
        self.assertRaises(ValueError, parseTargetRule, f"a{label}.example")

    def test_unpairedBrackets(self) -> None:
        """
        Brackets are taken off an IPv6 rule only in pairs: a rule with one
        bracket is an error, not the address left once the first and last
        characters are dropped.
        """
        for text in ["[::1", "1::1]", "[2001:db8::1"]:
            self.assertRaises(ValueError, parseTargetRule, text)

    def test_openPolicyEverything(self) -> None:
        """
        L{OPEN_POLICY} allows every port, the highest included, and every
        IPv6 address, not only those that carry an IPv4 address.
        """
        for port in [1, 443, 65535]:
            self.assertIsNone(OPEN_POLICY.checkTarget(None, None, "h", port), port)
        for address in ["fd00::1", "fe80::1", "2001:db8::1", "ff02::1"]:
            self.assertTrue(allowed(OPEN_POLICY, address), address)

    def test_ruleSpellings(self) -> None:
        """
        A rule may have surrounding spaces and a name rule a trailing dot
        (it matches the name with or without one); a rule ending in a
        hexadecimal number is refused in either case of C{0x}.
        """
        self.assertEqual(
            parseTargetRule(" 10.0.0.0/8 ").network, ipaddress.ip_network("10.0.0.0/8")
        )
        policy = TunnelPolicy.fromStrings(allowTo=["intranet.example."])
        self.assertTrue(allowed(policy, "10.0.0.5", "intranet.example"))
        self.assertTrue(allowed(policy, "10.0.0.5", "intranet.example."))
        for text in ["a.0x7f", "a.0X7F", "0X7F000001"]:
            self.assertRaises(ValueError, parseTargetRule, text)


class ClientTests(SynchronousTestCase):
    """
    C{--allow-from}.
    """

    def test_anyoneByDefault(self) -> None:
        """
        Without C{--allow-from}, any client may connect.
        """
        self.assertIsNone(DEFAULT.checkClient(ipaddress.ip_address("203.0.113.9")))
        self.assertIsNone(DEFAULT.checkClient(None))

    def test_allowFrom(self) -> None:
        """
        With C{--allow-from}, only clients in those networks may connect
        (IPv4-mapped client addresses count as their IPv4 address); others
        get a 403 naming the option.
        """
        policy = TunnelPolicy.fromStrings(allowFrom=["192.0.2.0/24", "2001:db8::/32"])
        for text in ["192.0.2.1", "::ffff:192.0.2.1", "2001:db8::7"]:
            self.assertIsNone(policy.checkClient(ipaddress.ip_address(text)), text)
        denial = policy.checkClient(ipaddress.ip_address("198.51.100.1"))
        assert denial is not None
        self.assertEqual((denial.status, denial.reason), (403, "client"))
        self.assertIn("--allow-from", denial.detail)
        self.assertIsNotNone(policy.checkClient(None))

    def test_allowFromOnlyMappedIPv4(self) -> None:
        """
        An IPv4 C{--allow-from} rule admits the IPv4-mapped form of its
        addresses, but not IPv6 clients whose addresses only carry those
        IPv4 bits (6to4, NAT64, IPv4-compatible): they are other hosts.
        """
        policy = TunnelPolicy.fromStrings(allowFrom=["192.0.2.0/24"])
        for text in ["2002:c000:201::1", "64:ff9b::c000:201", "::c000:201"]:
            self.assertIsNotNone(policy.checkClient(ipaddress.ip_address(text)), text)

    def test_allowFromHostBits(self) -> None:
        """
        An C{--allow-from} network written with host bits set (an address
        and its prefix length, C{192.0.2.7/24}) means the network, as
        C{--allow-to} rules do, on the command line and in a rules file.
        """
        policy = TunnelPolicy.fromStrings(allowFrom=["192.0.2.7/24"])
        self.assertIsNone(policy.checkClient(ipaddress.ip_address("192.0.2.200")))
        self.assertIsNotNone(policy.checkClient(ipaddress.ip_address("192.0.3.1")))
        self.assertEqual(
            parseRules("allow-from 192.0.2.7/24\n")["allow-from"], ["192.0.2.7/24"]
        )


class ParseRulesTests(SynchronousTestCase):
    """
    Tests for L{parseRules}.
    """

    def test_rules(self) -> None:
        """
        Each line is a kind and a value; comments and blank lines are
        skipped; the values of each kind keep their order.
        """
        rules = parseRules(
            "# lab\nallow-port 22\n\nallow-to 10.0.0.0/8  # lab\n"
            "allow-port 8000-8999\ndeny-to bad.example\n"
        )
        self.assertEqual(
            rules,
            {
                "allow-port": ["22", "8000-8999"],
                "allow-from": [],
                "allow-to": ["10.0.0.0/8"],
                "deny-to": ["bad.example"],
            },
        )

    def test_unknownKind(self) -> None:
        """
        A line whose first word is not a kind of rule is a L{ValueError}
        naming the file and the line, like any other bad rule.
        """
        for line in ["allow-too 10.0.0.0/8", "deny 10.0.0.1", "ports 22"]:
            e = self.assertRaises(
                ValueError, parseRules, f"allow-port 22\n{line}\n", "rules.txt"
            )
            self.assertIn("rules.txt:2: ", str(e))

    def test_badValues(self) -> None:
        """
        A value that does not parse for its kind is a L{ValueError} naming
        the file and the line, whatever the kind.
        """
        for line in [
            "allow-port http",
            "allow-from somewhere",
            "allow-to bad/name",
            "deny-to bad name",
            "deny-to a..b",
        ]:
            e = self.assertRaises(
                ValueError, parseRules, f"# rules\n{line}\n", "rules.txt"
            )
            self.assertIn("rules.txt:2: ", str(e))
