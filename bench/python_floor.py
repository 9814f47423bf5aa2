"""The least work CPython does per CONNECT tunnel: a reference for the benchmark.

A relay with no framework, no checks, no timeouts, no limits, no logging:
read the head, connect to the host:port it names (address literals only, no
DNS), answer 200, copy bytes both ways with flow control and half-close,
close when both sides are done.  Not a proxy to use: loopback only.

    python python_floor.py --port 18019 [--workers N] [--reactor]

By default it waits on ``select.epoll`` itself: what it costs per handshake
is what the interpreter and the kernel cost.  With ``--reactor`` the same
sockets are dispatched by Twisted's epoll reactor (``addReader`` and
``addWriter``), still without Twisted's transports or protocols: the
difference is what the reactor's dispatch costs, and what ``tunnel`` costs
above that is Twisted's transports and its own features.

``--workers N`` forks N processes after ``listen`` that share the socket, as
``tunnel --workers`` does.

``--checks`` (with ``--reactor``) adds ``tunnel``'s own work per request
that any handshake path must keep: its head parser, its policy (opened to
loopback and any port, as the benchmark's ``ours`` is) and the header and
connect timers.  Still no Twisted transports, Deferreds, limits, metrics,
log events or idle timeouts: what this reaches bounds from above what a
hand-written handshake path beside Twisted's transports could give.
"""

import argparse
import contextlib
import errno
import os
import select
import signal
import socket

IN, OUT = select.EPOLLIN, select.EPOLLOUT
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
CHUNK = 65536
MAX_HEAD = 8192


class End:
    """
    One socket of a tunnel; ``peer`` is the other end once there is one.
    ``mask`` is what it waits for (``IN``, ``OUT``, both or nothing).
    """

    __slots__ = (
        "clientIP",
        "connecting",
        "eof",
        "fd",
        "head",
        "mask",
        "peer",
        "pending",
        "relay",
        "shut",
        "sock",
        "timer",
    )

    def __init__(self, relay, sock):
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = None
        self.head = b""
        self.pending = b""  # bytes for this socket that did not fit yet
        self.eof = False  # this socket sent its FIN
        self.shut = False  # we sent this socket our FIN
        self.connecting = False
        self.mask = 0
        self.timer = None

    # What Twisted's reactor calls (--reactor).

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "End"

    def doRead(self):
        self.relay.event(self, IN)

    def doWrite(self):
        self.relay.event(self, OUT)

    def connectionLost(self, reason):
        # The reactor saw a hang-up or an error and unregistered the socket.
        self.mask = 0
        self.relay.event(self, select.EPOLLERR)


class TunnelChecks:
    """
    tunnel's per-request work (``--checks``): its parser and policy, and a
    timer from accept to the head and another from the head to connected.
    """

    def __init__(self, clock):
        from ipaddress import ip_address

        from tunnel.policy import TunnelPolicy
        from tunnel.request import RequestRejected, findHeadEnd, parseConnectHead

        self._clock = clock
        self._address = ip_address
        self._findHeadEnd = findHeadEnd
        self._parse = parseConnectHead
        self._rejected = RequestRejected
        self._policy = TunnelPolicy.fromStrings(ports=["any"], allowTo=["127.0.0.0/8"])

    def accepted(self, client):
        client.timer = self._clock.callLater(10, _timedOut)
        client.clientIP = self._address(client.sock.getpeername()[0])

    def target(self, client):
        """
        The address to connect to and the length of the head, or None while
        the head is incomplete; raises ValueError for a refused request.
        """
        found = self._findHeadEnd(client.head, 0, skipEmptyLines=True)
        if found is None:
            return None
        try:
            request = self._parse(client.head[: found[0]], 8192)
        except self._rejected as rejected:
            raise ValueError(rejected.status) from None
        policy, host, port = self._policy, request.host, request.port
        if policy.checkTarget(None, client.clientIP, host, port) is not None:
            raise ValueError("refused")
        address = self._address(host)
        if not policy.checkAddress(None, client.clientIP, host, port, address):
            raise ValueError("refused")
        client.timer.cancel()
        client.timer = self._clock.callLater(10, _timedOut)
        return (str(address), port), found[1]

    def connected(self, client):
        client.timer.cancel()
        client.timer = None

    def closed(self, client):
        if client.timer is not None:
            client.timer.cancel()
            client.timer = None


def _timedOut():
    # The timers are here for what they cost; a floor ends nothing.
    pass


class Relay:
    """
    The tunnels' logic, whichever loop waits: ``want(end, mask)`` says what
    an end waits for now, ``forget(end)`` that it waits for nothing ever.
    """

    def __init__(self, want, forget, checks=None):
        self.want = want
        self.forget = forget
        self.open = {}
        self.checks = checks

    def accepted(self, sock):
        sock.setblocking(False)
        sock.setsockopt(*NODELAY)
        client = End(self, sock)
        if self.checks is not None:
            self.checks.accepted(client)
        self.open[client.fd] = client
        self.want(client, IN)

    def close(self, end):
        for e in (end, end.peer):
            if e is not None and self.open.pop(e.fd, None) is e:
                self.forget(e)
                e.sock.close()
                if self.checks is not None:
                    self.checks.closed(e)

    def shutWrite(self, end):
        end.shut = True
        try:
            end.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(end)

    def finishIfDone(self, end):
        peer = end.peer
        if end.eof and peer.eof and not end.pending and not peer.pending:
            self.close(end)

    def event(self, end, event):
        if self.open.get(end.fd) is not end:
            return
        if end.connecting:
            self.connected(end)
        elif end.peer is None:
            self.headReceived(end)
        elif end.peer.connecting or event & select.EPOLLERR:
            # Only a hang-up or an error wakes a client whose target is
            # still connecting.
            self.close(end)
        elif end.eof and event & select.EPOLLHUP:
            # Both directions of this socket are shut (epoll cannot be told
            # not to report that): stop hearing it; its peer's drain ends it.
            self.forget(end)
            end.mask = 0
        else:
            if event & OUT and end.pending:
                self.drain(end)
                if self.open.get(end.fd) is not end:
                    return
            readable = event & (IN | select.EPOLLHUP)
            if readable and not end.eof and not end.peer.pending:
                self.flush(end, end.peer)

    def flush(self, src, dst):
        # Move what src has for dst, until src has no more or dst is full.
        while True:
            try:
                data = src.sock.recv(CHUNK)
            except BlockingIOError:
                return
            except OSError:
                self.close(src)
                return
            if not data:
                src.eof = True
                self.want(src, OUT if src.pending else 0)
                if not dst.pending:
                    self.shutWrite(dst)
                if src.fd in self.open:
                    self.finishIfDone(src)
                return
            try:
                sent = dst.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close(src)
                return
            if sent < len(data):
                dst.pending = data[sent:]
                # Flow control: read no more from src until dst drains.
                self.want(dst, (0 if dst.eof else IN) | OUT)
                self.want(src, OUT if src.pending else 0)
                return
            if len(data) < CHUNK:
                return

    def drain(self, end):
        try:
            sent = end.sock.send(end.pending)
        except BlockingIOError:
            return
        except OSError:
            self.close(end)
            return
        end.pending = end.pending[sent:]
        if end.pending:
            return
        peer = end.peer
        self.want(end, 0 if end.eof else IN)
        if peer.eof:
            if not end.shut:
                self.shutWrite(end)
            if end.fd in self.open:
                self.finishIfDone(end)
        else:
            self.want(peer, (IN | OUT) if peer.pending else IN)

    def headReceived(self, client):
        try:
            data = client.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(client)
            return
        client.head += data
        try:
            found = self.target(client)
        except ValueError:
            with contextlib.suppress(OSError):
                client.sock.send(BAD_REQUEST)
            self.close(client)
            return
        if found is None:
            if len(client.head) > MAX_HEAD:
                self.close(client)
            return
        address, consumed = found
        early = client.head[consumed:]
        client.head = b""
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        number = sock.connect_ex(address)
        if number not in (0, errno.EINPROGRESS):
            sock.close()
            with contextlib.suppress(OSError):
                client.sock.send(BAD_GATEWAY)
            self.close(client)
            return
        target = End(self, sock)
        target.peer, client.peer = client, target
        target.pending = early
        target.connecting = True
        self.open[target.fd] = target
        self.want(client, 0)
        self.want(target, OUT)

    def target(self, client):
        """
        The address to connect to and the length of the head, or None while
        the head is incomplete; raises ValueError for a bad request.
        """
        if self.checks is not None:
            return self.checks.target(client)
        end = client.head.find(b"\r\n\r\n")
        if end < 0:
            return None
        line = client.head[:end].split(b"\r\n", 1)[0]
        method, authority, _ = line.split(b" ")
        host, _, port = authority.decode("ascii").rpartition(":")
        if method != b"CONNECT":
            raise ValueError(method)
        return (host.strip("[]"), int(port)), end + 4

    def connected(self, target):
        client = target.peer
        number = target.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if number:
            with contextlib.suppress(OSError):
                client.sock.send(BAD_GATEWAY)
            self.close(client)
            return
        target.connecting = False
        if self.checks is not None:
            self.checks.connected(client)
        target.sock.setsockopt(*NODELAY)
        client.pending = OK
        # Once the 200 is sent, drain has both sockets wait for reading.
        self.drain(client)
        if client.fd in self.open and client.pending:
            self.want(client, OUT)
            self.want(target, OUT if target.pending else 0)


def serveEpoll(listener):
    """Wait on select.epoll directly."""
    poller = select.epoll()
    registered = set()

    def want(end, mask):
        if end.fd not in registered:
            registered.add(end.fd)
            end.mask = mask
            poller.register(end.fd, mask)
        elif end.mask != mask:
            end.mask = mask
            poller.modify(end.fd, mask)

    def forget(end):
        if end.fd in registered:
            registered.discard(end.fd)
            poller.unregister(end.fd)

    relay = Relay(want, forget)
    lfd = listener.fileno()
    poller.register(lfd, IN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, event in events:
            if fd == lfd:
                acceptSome(listener, relay)
                continue
            end = relay.open.get(fd)
            if end is not None:
                relay.event(end, event)


def serveReactor(listener, checks=False):
    """Have Twisted's epoll reactor dispatch the same sockets."""
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    def want(end, mask):
        if end.mask == mask:
            return
        for bit, add, remove in (
            (IN, reactor.addReader, reactor.removeReader),
            (OUT, reactor.addWriter, reactor.removeWriter),
        ):
            if mask & bit and not end.mask & bit:
                add(end)
            elif end.mask & bit and not mask & bit:
                remove(end)
        end.mask = mask

    def forget(end):
        want(end, 0)

    relay = Relay(want, forget, TunnelChecks(reactor) if checks else None)

    class Listening:
        def fileno(self):
            return listener.fileno()

        def logPrefix(self):
            return "Listening"

        def doRead(self):
            acceptSome(listener, relay)

        def connectionLost(self, reason):
            pass  # the reactor is stopping

    reactor.addReader(Listening())
    reactor.run()


def acceptSome(listener, relay):
    # Bounded: at most 64 accepts per wake-up.
    for _ in range(64):
        try:
            sock, _ = listener.accept()
        except OSError:
            # EAGAIN, or out of descriptors: wait for the next wake-up.
            return
        relay.accepted(sock)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reactor", action="store_true")
    parser.add_argument("--checks", action="store_true", help="needs --reactor")
    args = parser.parse_args()
    if args.checks and not args.reactor:
        parser.error("--checks needs --reactor (its timers are the reactor's)")
    if args.reactor:

        def serve(listener):
            serveReactor(listener, args.checks)

    else:
        serve = serveEpoll
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(4096)
    listener.setblocking(False)
    if args.workers <= 1:
        serve(listener)
        return
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(listener)
            os._exit(0)
        children.append(pid)

    def stop(*_):
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue


if __name__ == "__main__":
    main()
