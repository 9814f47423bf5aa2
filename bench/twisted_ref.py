"""Minimal HTTP CONNECT relay on plain Twisted: the "what stock Twisted can do"
reference for the benchmark.  Not a production proxy: no ACLs, no timeouts,
no limits.  Loopback use only.

    python twisted_ref.py --port 18018 [--reactor epoll|asyncio|uvloop] [--splice]

--splice hands each established tunnel to twisted_splice.start_tunnel (an
os.splice() socket->pipe->socket relay; micro-experiment).
"""

import argparse
import sys


class Relay:
    """Mixin: forward bytes to the peer protocol, close the peer when we close."""

    peer = None

    def dataReceived(self, data):
        self.peer.transport.write(data)

    def connectionLost(self, reason):
        if self.peer is not None:
            self.peer.transport.loseConnection()
            self.peer = None


def build(reactor, start_tunnel=None):
    from twisted.internet import endpoints, protocol
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    class Upstream(Relay, protocol.Protocol):
        def __init__(self, client):
            self.client = client

        def connectionMade(self):
            c = self.client
            if c.gone:  # client left while we connected
                return self.transport.loseConnection()
            self.transport.setTcpNoDelay(True)
            self.peer, c.peer = c, self
            if start_tunnel is not None:  # experiment hook (--splice)
                return start_tunnel(reactor, c, self)
            # flow control both ways, as in twisted.protocols.portforward
            self.transport.registerProducer(c.transport, True)
            c.transport.registerProducer(self.transport, True)
            c.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if c.early:
                self.transport.write(c.early)
                c.early = b""
            c.transport.resumeProducing()

    class ConnectHandler(Relay, protocol.Protocol):
        buf = b""
        early = b""
        pending = False
        gone = False

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data):
            if self.peer is not None:
                self.peer.transport.write(data)
                return
            if self.pending:  # bytes sent before our 200
                self.early += data
                return
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 16384:
                    self.fail(b"431 Request Header Fields Too Large")
                return
            head, self.early, self.buf = self.buf[:end], self.buf[end + 4 :], b""
            try:
                method, target, _version = head.split(b"\r\n", 1)[0].split(b" ")
                host, _, port = target.rpartition(b":")
                host, port = host.decode("ascii").strip("[]"), int(port)
            except ValueError:
                return self.fail(b"400 Bad Request")
            if method != b"CONNECT":
                return self.fail(b"405 Method Not Allowed")
            self.pending = True
            self.transport.pauseProducing()  # read no more until upstream is up
            if isIPAddress(host):
                ep = endpoints.TCP4ClientEndpoint(reactor, host, port)
            elif isIPv6Address(host):
                ep = endpoints.TCP6ClientEndpoint(reactor, host, port)
            else:
                ep = endpoints.HostnameEndpoint(reactor, host, port)
            d = ep.connect(protocol.Factory.forProtocol(lambda: Upstream(self)))
            d.addErrback(lambda _f: self.fail(b"502 Bad Gateway"))

        def connectionLost(self, reason):
            self.gone = True
            Relay.connectionLost(self, reason)

        def fail(self, status):
            self.transport.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n"
            )
            self.transport.loseConnection()

    factory = protocol.Factory.forProtocol(ConnectHandler)
    factory.noisy = False
    return factory


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument(
        "--reactor", choices=["epoll", "asyncio", "uvloop"], default="epoll"
    )
    ap.add_argument("--splice", action="store_true")
    args = ap.parse_args()
    if args.reactor in ("asyncio", "uvloop"):
        import asyncio

        loop = asyncio.new_event_loop()
        if args.reactor == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        from twisted.internet import asyncioreactor

        asyncioreactor.install(loop)
    else:
        from twisted.internet import epollreactor

        epollreactor.install()
    from twisted.internet import reactor

    hook = None
    if args.splice:
        sys.dont_write_bytecode = (
            True  # the harness directory may be read-only; keep it clean
        )
        from twisted_splice import start_tunnel as hook
    reactor.listenTCP(
        args.port, build(reactor, hook), backlog=4096, interface=args.host
    )
    print(
        f"twisted_ref listening on {args.host}:{args.port}"
        f" reactor={type(reactor).__name__}"
        f" splice={args.splice}",
        file=sys.stderr,
        flush=True,
    )
    reactor.run()


if __name__ == "__main__":
    main()
