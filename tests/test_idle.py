"""
Tests for L{tunnel.idle}.
"""

from __future__ import annotations

from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunnel.idle import IdleWatch


class FakeTunnel:
    """
    A watched tunnel that records its timeout.
    """

    def __init__(self, clock: Clock, watch: IdleWatch | None = None) -> None:
        self.clock = clock
        self.lastActivity = clock.seconds()
        self.timedOut: list[float] = []
        self.watch = watch

    def active(self) -> None:
        """
        A byte moved now.
        """
        self.lastActivity = self.clock.seconds()

    def idleTimedOut(self) -> None:
        self.timedOut.append(self.clock.seconds())
        if self.watch is not None:
            # A tunnel unwatches itself as it ends.
            self.watch.unwatch(self)


class IdleWatchTests(SynchronousTestCase):
    """
    L{IdleWatch} ends quiet tunnels with one timer.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.watch = IdleWatch(self.clock, 10)

    def test_timesOutAfterLastActivity(self) -> None:
        """
        A tunnel ends exactly C{timeout} seconds after its last byte, and
        activity postpones that.
        """
        tunnel = FakeTunnel(self.clock, self.watch)
        self.watch.watch(tunnel)
        self.clock.pump([0.5] * 8)
        tunnel.active()
        self.clock.pump([0.5] * 19)
        self.assertEqual(tunnel.timedOut, [])
        self.clock.advance(0.5)
        self.assertEqual(tunnel.timedOut, [14])
        self.assertEqual(self.watch.watching, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oneTimerForAll(self) -> None:
        """
        However many tunnels are watched, one timer is pending; each ends on
        its own time.
        """
        tunnels = []
        for _ in range(5):
            tunnel = FakeTunnel(self.clock, self.watch)
            self.watch.watch(tunnel)
            tunnels.append(tunnel)
            self.clock.advance(2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.pump([1] * 20)
        self.assertEqual([t.timedOut for t in tunnels], [[10], [12], [14], [16], [18]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unwatchLastCancels(self) -> None:
        """
        Unwatching the last tunnel cancels the timer; unwatching a tunnel
        that is not watched does nothing.
        """
        first, second = FakeTunnel(self.clock), FakeTunnel(self.clock)
        self.watch.watch(first)
        self.watch.watch(second)
        self.watch.unwatch(first)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.watch.unwatch(second)
        self.watch.unwatch(second)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.assertEqual((first.timedOut, second.timedOut), ([], []))

    def test_tunnelThatStaysWatched(self) -> None:
        """
        A tunnel is forgotten once it timed out even if it does not unwatch
        itself: it is told once.
        """
        tunnel = FakeTunnel(self.clock)
        self.watch.watch(tunnel)
        self.clock.pump([1] * 30)
        self.assertEqual(tunnel.timedOut, [10])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_granularity(self) -> None:
        """
        Tunnels that keep moving bytes just before their time, each at its
        own moment, make the watch look at most once per granularity, not
        each time the oldest of them would run out.
        """
        watch = IdleWatch(self.clock, 10, granularity=2)
        tunnels: list[FakeTunnel] = []
        looks = 0
        # 60 seconds in quarters; a new tunnel every half second for the
        # first ten, each active again after 9.5 quiet seconds.
        for step in range(240):
            if step % 2 == 0 and len(tunnels) < 20:
                tunnel = FakeTunnel(self.clock, watch)
                watch.watch(tunnel)
                tunnels.append(tunnel)
            for tunnel in tunnels:
                if self.clock.seconds() - tunnel.lastActivity >= 9.5:
                    tunnel.active()
            [call] = self.clock.getDelayedCalls()
            assert isinstance(call, DelayedCall)
            self.clock.advance(0.25)
            looks += call.called
        # The first look comes after 10 seconds; then one each 2 seconds
        # at most (without the floor, one every half second).
        self.assertLessEqual(looks, 26)
        self.assertGreaterEqual(looks, 20)
        self.assertEqual([t.timedOut for t in tunnels], [[]] * 20)

    def test_granularityDelaysAtMost(self) -> None:
        """
        A tunnel that goes quiet while the watch looks on a coarse schedule
        ends no later than C{granularity} after its time.
        """
        watch = IdleWatch(self.clock, 10, granularity=2)
        early = FakeTunnel(self.clock, watch)
        watch.watch(early)
        self.clock.pump([0.5] * 19)
        late = FakeTunnel(self.clock, watch)
        watch.watch(late)
        self.clock.advance(0.5)
        self.assertEqual(early.timedOut, [10])
        self.clock.pump([0.25] * 48)
        [when] = late.timedOut
        self.assertGreaterEqual(when, 19.5)
        self.assertLessEqual(when, 21.5)

    def test_failingTunnel(self) -> None:
        """
        A tunnel whose ending raises is logged, and the others still end on
        their own time.
        """

        class Broken(FakeTunnel):
            def idleTimedOut(self) -> None:
                raise RuntimeError("cannot end")

        broken = Broken(self.clock)
        self.watch.watch(broken)
        self.clock.pump([1] * 5)
        other = FakeTunnel(self.clock, self.watch)
        self.watch.watch(other)
        self.clock.pump([1] * 5)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.watch.watching, 1)
        self.clock.pump([1] * 10)
        self.assertEqual(other.timedOut, [15])

    def test_firstLookWhenFirstTunnelRunsOut(self) -> None:
        """
        The timer set when the first tunnel is watched is due when that
        tunnel runs out of time, not before.
        """
        self.clock.advance(3)
        self.watch.watch(FakeTunnel(self.clock, self.watch))
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 13)

    def test_granularityFloor(self) -> None:
        """
        After a look, the next is no sooner than C{granularity} (by default
        a second) later, even when a tunnel runs out of time before that:
        that tunnel then ends at the next look.
        """
        for granularity, ends in [(2.0, 12.0), (None, 11.0)]:
            clock = Clock()
            watch = (
                IdleWatch(clock, 10)
                if granularity is None
                else IdleWatch(clock, 10, granularity=granularity)
            )
            quiet, busy = FakeTunnel(clock, watch), FakeTunnel(clock, watch)
            watch.watch(quiet)
            watch.watch(busy)
            clock.advance(0.5)
            busy.active()
            clock.advance(9.5)
            self.assertEqual((quiet.timedOut, busy.timedOut), ([10], []))
            [call] = clock.getDelayedCalls()
            self.assertEqual(call.getTime(), ends)
            clock.advance(ends - 10)
            self.assertEqual(busy.timedOut, [ends])

    def test_watchWhileEnding(self) -> None:
        """
        A tunnel watched while another is being ended (by that tunnel's own
        ending) leaves one timer, not two.
        """
        newcomer = FakeTunnel(self.clock, self.watch)
        watch = self.watch

        class Handover(FakeTunnel):
            def idleTimedOut(self) -> None:
                super().idleTimedOut()
                newcomer.active()
                watch.watch(newcomer)

        watch.watch(Handover(self.clock, watch))
        self.clock.advance(10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        self.assertEqual(newcomer.timedOut, [20])
        self.assertEqual(self.clock.getDelayedCalls(), [])
