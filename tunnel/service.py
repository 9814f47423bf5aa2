"""
The proxy as an application service: listeners, observers, graceful drain.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, Logger

from .accesslog import AccessLogObserver
from .server import ConnectProxyFactory

__all__ = ["ProxyService", "StopOnSignals"]


class StopOnSignals:
    """
    Lets only the first SIGTERM or SIGINT stop the reactor.

    The reactor's own handlers stop it on every one, and a second stop of a
    stopping reactor is logged as critical; a drain after SIGTERM easily
    gets a second one ("systemctl stop" and Ctrl-C signal the whole process
    group, and a C{--workers} supervisor passes SIGTERM on as well).  The
    first signal still goes to the reactor's handler, which logs it and
    makes twistd exit by that signal; a signal the process ignores stays
    ignored.

    @ivar stopping: Whether the reactor was asked to stop.
    """

    def __init__(self, reactor: Any) -> None:
        """
        @param reactor: The reactor to stop.
        """
        self._reactor = reactor
        self.stopping = False

    def install(self) -> None:
        """
        Wrap the reactor's SIGTERM and SIGINT handlers (so call it once the
        reactor runs and has installed them).
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if callable(handler):
                signal.signal(signum, self._first(handler))

    def _first(
        self, handler: Callable[[int, Any], object]
    ) -> Callable[[int, Any], None]:
        def onSignal(signum: int, frame: Any) -> None:
            if not self.stopping:
                self.stopping = True
                handler(signum, frame)

        return onSignal

    def stop(self) -> None:
        """
        Stop the reactor (draining, through the shutdown trigger), unless
        that was done already.
        """
        if not self.stopping:
            self.stopping = True
            self._reactor.stop()


class ProxyService(MultiService):
    """
    Runs the proxy's listeners (its child services) and, on stop, drains.

    Stopping first stops every listener, so no new connection is accepted,
    then lets open connections finish for up to C{drainTimeout} seconds,
    then aborts what remains; the Deferred of L{stopService} fires when
    every connection is closed.

    @ivar factory: The proxy factory behind the listeners.
    @ivar drainTimeout: Seconds open connections get to finish on stop.
    @ivar observers: The observers of the tunnel events, added to the
        factory's C{tunnelObservers} while the service runs.
    @ivar listenersStopped: Once L{stopService} was called, a Deferred that
        fires when no listener accepts connections any more; L{None} before.
    @ivar afterDrain: Services started with this one but stopped only once
        the drain is over (a metrics reporter, whose last report must count
        the connections that ended during the drain).
    """

    _log = Logger()

    def __init__(
        self,
        factory: ConnectProxyFactory,
        drainTimeout: float = 30,
        observers: Sequence[Callable[[LogEvent], object]] | None = None,
        reactor: Any = None,
    ) -> None:
        """
        @param factory: The proxy factory.
        @param drainTimeout: Seconds open connections get to finish when the
            service stops.
        @param observers: Observers of the tunnel events (each an
            L{twisted.logger.ILogObserver}, or any callable taking the
            event), added to the factory's C{tunnelObservers} while running
            (the access log, the metrics); an L{AccessLogObserver} is
            reopened on SIGUSR1.
        @param reactor: Runs the SIGUSR1 reopen on the reactor thread; if
            given, the service handles SIGUSR1 while it runs (passing it on
            to the previous handler), so the signal never ends the process.
        """
        super().__init__()
        self.factory = factory
        self.drainTimeout = drainTimeout
        self.observers: list[Callable[[LogEvent], object]] = list(observers or [])
        self._reactor = reactor
        self._previousUSR1: Any = None
        self._logsClosed = False
        self._stopping = False
        self.afterDrain: list[Any] = []
        self.listenersStopped: Deferred[None] | None = None

    def startService(self) -> None:
        """
        Add the observers, then start the listeners.  A service stopped
        before starts again as new: the factory no longer drains, and the
        access logs closed on stop are opened again.  Starting it while it
        runs does nothing.
        """
        if self.running:
            # Started by hand and again by its parent: a second start would
            # add every observer twice (and listen twice).
            return
        if self._stopping:
            raise RuntimeError(
                "ProxyService is still draining: start it again once the "
                "Deferred of stopService has fired"
            )
        self.factory.draining = False
        if self._logsClosed:
            self._logsClosed = False
            for observer in self.observers:
                if isinstance(observer, AccessLogObserver):
                    observer.reopen()
        self.factory.tunnelObservers.extend(self.observers)
        super().startService()
        for service in self.afterDrain:
            service.startService()
        if self._reactor is not None:
            # Installed even without an access log: SIGUSR1 is what
            # logrotate and "systemctl reload" send, and its default action
            # would end the process and every tunnel in it.  Installed once
            # the listeners started: a service that failed to start is
            # never stopped, and must not leave its handler behind.
            self._previousUSR1 = signal.signal(signal.SIGUSR1, self._onUSR1)
        # A log rotated between the file's opening and now (a worker
        # starting while logrotate runs) sent its SIGUSR1 before this
        # service could take it: catch up, after the handler is in place so
        # that no later rotation falls between the two.
        for observer in self.observers:
            if isinstance(observer, AccessLogObserver):
                observer.reopenIfMoved()

    def _onUSR1(self, signum: int, frame: Any) -> None:
        # Signal handlers may run at any point; do the work on the reactor.
        self._reactor.callFromThread(self.reopenLogs)
        previous = self._previousUSR1
        if callable(previous):
            # Chain to twistd's own handler, which rotates its log file.
            previous(signum, frame)

    def reopenLogs(self) -> None:
        """
        Reopen the access log files (what logrotate's SIGUSR1 asks for).
        """
        accessLogs = [o for o in self.observers if isinstance(o, AccessLogObserver)]
        # Every one is tried; one that fails logs why itself.
        reopened = [observer.reopen() for observer in accessLogs]
        if reopened and all(reopened):
            self._log.info("Reopened the access log")

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting at once, drain, then remove the observers.

        @return: A Deferred that fires when every connection is closed and
            the observers are removed.
        """
        stopped: Deferred[Any] = super().stopService()
        listenersStopped: Deferred[None] = Deferred()
        self.listenersStopped = listenersStopped

        def drain(result: object) -> Deferred[None]:
            listenersStopped.callback(None)
            return self.factory.drain(self.drainTimeout)

        stopped.addCallback(drain)

        def cleanUp(result: object) -> object:
            self._stopping = False
            for service in self.afterDrain:
                if service.running:
                    service.stopService()
            if self._previousUSR1 is not None:
                signal.signal(signal.SIGUSR1, self._previousUSR1)
                self._previousUSR1 = None
            for observer in self.observers:
                # Stopping twice finds it gone already.
                with contextlib.suppress(ValueError):
                    self.factory.tunnelObservers.remove(observer)
                if isinstance(observer, AccessLogObserver):
                    observer.close()
                    self._logsClosed = True
            return result

        self._stopping = True
        return stopped.addBoth(cleanUp)
