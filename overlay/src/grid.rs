//! The node's timer grid: a point every [`TICK`] from the node's start.
//!
//! WireGuard sessions are ticked on it while awake, sleeping sessions wake
//! on it, and timers that can run up to a tick late are put on it too (path
//! keepalives and reprobes, the once-a-second checks), so that one wake-up
//! of the driver serves all of them. A timer set at `now + interval` from a
//! driver that wakes a few microseconds after each deadline would otherwise
//! drift off the grid and cost a wake-up of its own every time.

use std::time::{Duration, Instant};

/// The grid's spacing: how often boringtun's timers are driven while a
/// session is awake.
pub const TICK: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerGrid {
    epoch: Instant,
}

impl TimerGrid {
    pub fn new(epoch: Instant) -> TimerGrid {
        TimerGrid { epoch }
    }

    /// The first grid point at or after `t` (the epoch for earlier times).
    pub fn at_or_after(&self, t: Instant) -> Instant {
        let since = t.saturating_duration_since(self.epoch);
        self.point(since.as_nanos().div_ceil(TICK.as_nanos()))
    }

    /// The first grid point strictly after `t`.
    pub fn after(&self, t: Instant) -> Instant {
        let since = t.saturating_duration_since(self.epoch);
        self.point(since.as_nanos() / TICK.as_nanos() + 1)
    }

    /// `previous + interval` on the grid, keeping a periodic timer's phase
    /// when its run was late; from `now` when it was later than a whole
    /// interval (a suspended host), so missed runs are not made up.
    pub fn next_period(&self, previous: Instant, interval: Duration, now: Instant) -> Instant {
        let next = previous + interval;
        self.at_or_after(if next > now { next } else { now + interval })
    }

    fn point(&self, ticks: u128) -> Instant {
        // u64 nanoseconds reach 584 years past the node's start.
        let nanos = ticks.saturating_mul(TICK.as_nanos());
        self.epoch + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_at_or_after_and_strictly_after_a_time() {
        let epoch = Instant::now();
        let grid = TimerGrid::new(epoch);
        let ms = Duration::from_millis;
        assert_eq!(grid.at_or_after(epoch + ms(1001)), epoch + ms(1250));
        assert_eq!(grid.at_or_after(epoch + ms(1250)), epoch + ms(1250));
        assert_eq!(grid.after(epoch + ms(1250)), epoch + ms(1500));
        assert_eq!(grid.after(epoch + ms(1249)), epoch + ms(1250));
        assert_eq!(grid.at_or_after(epoch), epoch);
    }

    #[test]
    fn a_periodic_timer_run_late_keeps_its_phase_on_the_grid() {
        let epoch = Instant::now();
        let grid = TimerGrid::new(epoch);
        let ms = Duration::from_millis;
        // Due at 1 s, run 80 us late: next at 2 s, not 2 s + 80 us (which
        // would be 2.25 s on the grid, or a wake-up of its own off it).
        let due = epoch + ms(1000);
        assert_eq!(grid.next_period(due, ms(1000), due + Duration::from_micros(80)), epoch + ms(2000));
        // First set off the grid: the next run goes onto it.
        assert_eq!(grid.next_period(epoch + ms(1010), ms(1000), epoch + ms(1010)), epoch + ms(2250));
        // Run 5 s late (suspended): one run now, the next an interval on.
        assert_eq!(grid.next_period(due, ms(1000), epoch + ms(6000)), epoch + ms(7000));
    }
}
