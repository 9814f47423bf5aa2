"""
Tests for the parts of L{tunnel.relay} that need no connection: how one
side's transport produces for the other, and what a reset flushes first.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from tunnel.relay import _PeerProducer, _sendBufferedNow


class FakeTransport:
    """
    A transport that records what is asked of it as a producer and as a
    consumer.

    @ivar calls: The calls, in order.
    @ivar disconnecting: Whether it was asked to close.
    @ivar transport: The transport it wraps, if it is a wrapper (TLS).
    """

    def __init__(self, disconnecting: bool = False, wrapped: Any = None) -> None:
        self.calls: list[str] = []
        self.disconnecting = disconnecting
        if wrapped is not None:
            self.transport = wrapped

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def unregisterProducer(self) -> None:
        self.calls.append("unregister")


def peerProducer(producer: FakeTransport, consumer: FakeTransport) -> _PeerProducer:
    """
    A L{_PeerProducer} of C{producer} for C{consumer}.
    """
    return _PeerProducer(cast(Any, producer), cast(Any, consumer))


class PeerProducerTests(SynchronousTestCase):
    """
    Tests for L{_PeerProducer}.
    """

    def test_passesOn(self) -> None:
        """
        Pause and resume pass on to the producing side's transport;
        C{stopProducing} does not (the relay decides how that side ends).
        """
        producer, consumer = FakeTransport(), FakeTransport()
        peer = peerProducer(producer, consumer)
        peer.pauseProducing()
        peer.resumeProducing()
        peer.stopProducing()
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertEqual(consumer.calls, [])

    def test_consumerClosing(self) -> None:
        """
        A consumer asked to close is let go of rather than fed again: a TCP
        transport that still has a paused producer resumes it instead of
        closing, and would never close.  So is a TLS consumer whose TCP
        transport was asked to close (by the peer's close_notify): the
        producing side is not read any more.
        """
        for consumer in [
            FakeTransport(disconnecting=True),
            FakeTransport(wrapped=FakeTransport(disconnecting=True)),
        ]:
            producer = FakeTransport()
            peerProducer(producer, consumer).resumeProducing()
            self.assertEqual(producer.calls, [])
            self.assertEqual(consumer.calls, ["unregister"])

    def test_wrapperNotClosing(self) -> None:
        """
        A TLS consumer whose TCP transport is not closing gets the producer
        resumed as any consumer does.
        """
        producer = FakeTransport()
        consumer = FakeTransport(wrapped=FakeTransport())
        peerProducer(producer, consumer).resumeProducing()
        self.assertEqual(producer.calls, ["resume"])
        self.assertEqual(consumer.calls, [])


class RecordingDescriptor(FileDescriptor):
    """
    A file descriptor transport whose socket is a byte string: what
    C{doWrite} sends is recorded.

    @ivar sent: The bytes sent so far.
    """

    def __init__(self) -> None:
        super().__init__(reactor=MemoryReactor())
        self.connected = 1
        self.sent = b""

    def writeSomeData(self, data: bytes) -> int:
        """
        Take everything.
        """
        self.sent += bytes(data)
        return len(data)


class SendBufferedNowTests(SynchronousTestCase):
    """
    L{_sendBufferedNow}, what a relay does with the other side's transport
    before resetting it because one side reset.
    """

    def test_tcp(self) -> None:
        """
        A file descriptor transport sends what it holds at once, as the
        reactor's C{doWrite} would.
        """
        transport = RecordingDescriptor()
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self.assertEqual(transport.sent, b"")
        _sendBufferedNow(transport)
        self.assertEqual(transport.sent, b"HTTP/1.1 200 Connection Established\r\n\r\n")

    def test_wrapper(self) -> None:
        """
        A wrapping transport (TLS, which writes its records to the transport
        below it as soon as it makes them) has that transport send.
        """
        below = RecordingDescriptor()
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        wrapper.makeConnection(below)
        wrapper.write(b"records")
        _sendBufferedNow(wrapper)
        self.assertEqual(below.sent, b"records")

    def test_closedOrOther(self) -> None:
        """
        A transport no longer connected sends nothing; one that is neither
        (a test's C{StringTransport}) is left alone.
        """
        closed = RecordingDescriptor()
        closed.write(b"late")
        closed.connected = 0
        _sendBufferedNow(closed)
        self.assertEqual(closed.sent, b"")
        other = StringTransport()
        other.write(b"kept")
        _sendBufferedNow(other)
        self.assertEqual(other.value(), b"kept")
