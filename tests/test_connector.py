"""
Tests for L{tunnel.connector}.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeResolver
from tunnel import HostnameConnector, ITargetConnector


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
        self.assertIsInstance(endpoint, HostnameEndpoint)
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
