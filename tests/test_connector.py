"""
Tests for L{tunnel.connector}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeResolver
from tunnel import HostnameConnector, ITargetConnector
from tunnel.connector import AddressDenied
from tunnel.policy import IPAddress, TunnelPolicy


class HostnameConnectorTests(SynchronousTestCase):
    """
    Tests for L{HostnameConnector}.
    """

    def test_interface(self) -> None:
        """
        L{HostnameConnector} provides L{ITargetConnector}.
        """
        self.assertTrue(ITargetConnector.providedBy(HostnameConnector(object())))

    def test_resolverUsed(self) -> None:
        """
        The endpoint resolves names with the given resolver, not the
        reactor's, and connects to every address it yields.
        """
        reactor = MemoryReactorClock()
        resolver = FakeResolver({"target.test": ["192.0.2.1", "2001:db8::1"]})
        connector = HostnameConnector(reactor, resolver=resolver, timeout=7)
        endpoint = connector.endpointForTarget("target.test", 443)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        reactor.advance(1)
        self.assertEqual(resolver.queries, ["target.test"])
        attempts = [
            (host, port, timeout) for host, port, _, timeout, _ in reactor.tcpClients
        ]
        self.assertEqual(
            sorted(attempts), [("192.0.2.1", 443, 7), ("2001:db8::1", 443, 7)]
        )
        d.cancel()
        self.failureResultOf(d)

    def test_fixedResolver(self) -> None:
        """
        The resolving reactor wrapper refuses to have its resolver replaced.
        """
        from tunnel.connector import _ResolvingReactor

        reactor = _ResolvingReactor(MemoryReactorClock(), FakeResolver())
        self.assertRaises(
            NotImplementedError, reactor.installNameResolver, FakeResolver()
        )

    def test_defaultResolver(self) -> None:
        """
        Without a resolver the reactor's own is used.
        """
        reactor = MemoryReactorClock()
        connector = HostnameConnector(reactor, bindAddress=("127.0.0.1", 0))
        endpoint = connector.endpointForTarget("127.0.0.1", 80)
        endpoint.connect(Factory.forProtocol(Protocol))
        reactor.advance(1)
        [(host, port, _, _, bindAddress)] = reactor.tcpClients
        self.assertEqual((host, port, bindAddress), ("127.0.0.1", 80, ("127.0.0.1", 0)))


class VettingTests(SynchronousTestCase):
    """
    Only the resolved addresses the policy allows are connected to.
    """

    def connect(
        self, hostMap: dict[str, list[str]], host: str
    ) -> tuple[MemoryReactorClock, Deferred[Any]]:
        """
        Connect to C{host}:443 under the default policy.
        """
        reactor = MemoryReactorClock()
        connector = HostnameConnector(reactor, resolver=FakeResolver(hostMap))
        policy = TunnelPolicy()

        def allow(address: IPAddress) -> bool:
            return policy.checkAddress(None, None, host, 443, address)

        endpoint = connector.endpointForTarget(host, 443, allow)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        reactor.advance(1)
        return reactor, d

    def test_mixed(self) -> None:
        """
        A public-looking name that resolves to private and public addresses
        is connected to only on its public ones.
        """
        reactor, d = self.connect(
            {
                "www.test": [
                    "10.0.0.5",
                    "93.184.216.34",
                    "::ffff:127.0.0.1",
                    "2606:2800:220:1::1",
                    "169.254.169.254",
                ]
            },
            "www.test",
        )
        attempted = sorted(host for host, *_ in reactor.tcpClients)
        self.assertEqual(attempted, ["2606:2800:220:1::1", "93.184.216.34"])
        d.cancel()
        self.failureResultOf(d)

    def test_allPrivate(self) -> None:
        """
        A name that resolves only to denied addresses fails with
        L{AddressDenied}, without any connection attempt.
        """
        reactor, d = self.connect(
            {"rebind.test": ["10.0.0.5", "127.0.0.1"]}, "rebind.test"
        )
        self.assertEqual(reactor.tcpClients, [])
        self.failureResultOf(d, AddressDenied)

    def test_literal(self) -> None:
        """
        IP literals are vetted too.
        """
        reactor, d = self.connect({}, "127.0.0.1")
        self.assertEqual(reactor.tcpClients, [])
        self.failureResultOf(d, AddressDenied)

    def test_allowedLiteral(self) -> None:
        """
        An allowed address literal is connected to directly, without asking
        the resolver.
        """
        reactor = MemoryReactorClock()
        resolver = FakeResolver()
        connector = HostnameConnector(reactor, resolver=resolver, timeout=5)
        for host in ["93.184.216.34", "2606:2800:220:1::1"]:
            endpoint = connector.endpointForTarget(host, 443, lambda address: True)
            endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(
            [(h, p, t) for h, p, _, t, _ in reactor.tcpClients],
            [("93.184.216.34", 443, 5), ("2606:2800:220:1::1", 443, 5)],
        )
        self.assertEqual(resolver.queries, [])

    def test_noAddresses(self) -> None:
        """
        A name with no addresses at all is a lookup failure (502), not a
        policy denial.
        """
        _reactor, d = self.connect({}, "nowhere.test")
        self.failureResultOf(d, DNSLookupError)
