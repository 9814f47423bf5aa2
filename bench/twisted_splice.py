"""Micro-experiment for twisted_ref.py --splice: once a CONNECT tunnel is up,
move its bytes with os.splice() (socket -> pipe -> socket, no copy into Python
objects) instead of Twisted's recv()/send() transports.

Each socket gets one SpliceEnd registered with the reactor (epoll needs a
single reader/writer object per fd).  Data read from an end's socket goes into
a pipe and is spliced on to the peer's socket; when the peer socket is full the
end stops reading until the peer is writable again (flow control).  Pipes are
borrowed from a small pool only while bytes are in flight, so an idle tunnel
holds just its two sockets (a pipe pair per direction per tunnel would triple
the fds per tunnel).  On EOF or error, whatever is in the pipe is flushed and
both Twisted transports are closed through the normal loseConnection() path.
"""

import fcntl
import os

from twisted.internet.interfaces import IReadWriteDescriptor
from zope.interface import implementer

PIPE_SIZE = 1 << 20
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_pool = []  # empty (read_fd, write_fd) pipes
POOL_MAX = 64


def _get_pipe():
    if _pool:
        return _pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def _put_pipe(pipe, empty):
    if empty and len(_pool) < POOL_MAX:
        _pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


@implementer(IReadWriteDescriptor)
class SpliceEnd:
    def __init__(self, reactor, proto):
        self.reactor, self.proto = reactor, proto
        self.fd = proto.transport.fileno()
        self.pipe = None  # borrowed while bytes read from self.fd are in flight
        self.buffered = 0  # bytes read from self.fd still in the pipe
        self.eof = self.closed = False
        self.reading = self.writing = False
        self.peer = None

    def fileno(self):
        return self.fd

    def logPrefix(self):
        return "SpliceEnd"

    def set_reading(self, on):
        if on != self.reading:
            (self.reactor.addReader if on else self.reactor.removeReader)(self)
            self.reading = on

    def set_writing(self, on):
        if on != self.writing:
            (self.reactor.addWriter if on else self.reactor.removeWriter)(self)
            self.writing = on

    def push(self, data):
        """Queue bytes that are already in Python (the 200, early data)."""
        if self.pipe is None:
            self.pipe = _get_pipe()
        self.buffered += os.write(self.pipe[1], data)

    def doRead(self):
        if self.pipe is None:
            self.pipe = _get_pipe()
        try:
            n = os.splice(self.fd, self.pipe[1], PIPE_SIZE - self.buffered, flags=FLAGS)
        except BlockingIOError:
            n = -1
        except OSError:
            return self.teardown()
        if n == 0:
            self.eof = True
            self.set_reading(False)
        elif n > 0:
            self.buffered += n
        return self.peer.drain(self)

    def drain(self, src):
        """Splice src's pipe into our socket."""
        while src.buffered:
            try:
                n = os.splice(src.pipe[0], self.fd, src.buffered, flags=FLAGS)
            except BlockingIOError:
                src.set_reading(False)  # back-pressure: stop reading src
                self.set_writing(True)
                return None
            except OSError:
                return self.teardown()
            src.buffered -= n
        self.set_writing(False)
        if src.pipe is not None:
            _put_pipe(src.pipe, True)
            src.pipe = None
        if src.eof:
            return self.teardown()
        src.set_reading(True)
        return None

    def doWrite(self):
        return self.drain(self.peer)

    def connectionLost(self, reason):
        self.teardown()

    def teardown(self):
        for end in (self, self.peer):
            if end.closed:
                continue
            end.closed = True
            end.set_reading(False)
            end.set_writing(False)
            if end.pipe is not None:
                _put_pipe(end.pipe, end.buffered == 0)
                end.pipe = None
            end.proto.transport.loseConnection()


def start_tunnel(reactor, client, upstream):
    for t in (client.transport, upstream.transport):
        t.stopReading()
        t.stopWriting()
    a, b = SpliceEnd(reactor, client), SpliceEnd(reactor, upstream)
    a.peer, b.peer = b, a
    # the 200 goes to the client as if read from upstream; early bytes go upstream
    b.push(b"HTTP/1.1 200 Connection established\r\n\r\n")
    if client.early:
        a.push(client.early)
        client.early = b""
    a.drain(b)
    b.drain(a)
