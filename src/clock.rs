//! The engine's clock: one reading per wake-up, taken from the CPU's
//! time-stamp counter where the kernel itself keeps time with it.
//!
//! Why not `Instant::now()` every time: after an idle wait the vDSO's
//! `clock_gettime` finds its code and data out of the caches and TLB
//! (TLB misses are dear in a virtual machine). Measured in the bench's lab
//! (a KVM guest, clocksource `tsc`), the wake-up's one `Instant::now()`
//! took 2.6-3.2 us at the median, half the user-space time from the
//! wake-up to the packet's read, and a ping's round trip pays it at four
//! wake-ups. `rdtsc` reads a register.
//!
//! The counter only interpolates: a true reading anchors it at least once
//! a second (and after any idle wait longer than that), and the counter's
//! rate is measured between true readings, never assumed. Backwards or
//! implausible counts fall back to true readings. The rate is measured
//! against the kernel's monotonic clock, NTP's slewing included, so a
//! reading is off by at most the change in slew over one second (under
//! half a millisecond at NTP's 500 ppm limit; the core's timers are on a
//! 250 ms grid). Where the kernel does not trust the counter (another
//! clocksource, no invariant TSC, not x86-64), every reading is a true
//! one.

use std::time::{Duration, Instant};

/// The longest the counter is trusted past a true reading.
const ANCHOR_PERIOD: Duration = Duration::from_secs(1);
/// The shortest span the counter's rate is measured over: two true
/// readings' own uncertainty (a few microseconds when cold) is then a few
/// parts in 100,000 of it.
const CALIBRATE_OVER: Duration = Duration::from_millis(200);
/// A true reading whose two counter readings around it lie further apart
/// than this was interrupted: it is used, but anchors nothing (about 40 us
/// at 2.5 GHz).
const MAX_READ_TICKS: u64 = 100_000;
/// Counter rates believed, in ticks per nanosecond (0.1-20 GHz).
const PLAUSIBLE_TICKS_PER_NS: std::ops::RangeInclusive<f64> = 0.1..=20.0;

/// The engine's clock (see the module's documentation).
pub struct WakeClock {
    counter: Option<Interpolation>,
    /// What it last said: it never goes back.
    last: Instant,
}

impl WakeClock {
    /// Uses the counter if the kernel keeps time with it.
    pub fn new() -> WakeClock {
        let counter = (counter_available() && kernel_trusts_counter()).then(Interpolation::default);
        WakeClock { counter, last: Instant::now() }
    }

    /// A clock that always takes true readings.
    #[cfg(test)]
    pub fn exact() -> WakeClock {
        WakeClock { counter: None, last: Instant::now() }
    }

    pub fn now(&mut self) -> Instant {
        let at = match &mut self.counter {
            Some(counter) => counter.at(read_counter(), exact_reading),
            None => Instant::now(),
        };
        self.last = self.last.max(at);
        self.last
    }

    /// For `status`: where readings come from, and how many were true ones.
    pub fn describe(&self) -> serde_json::Value {
        match &self.counter {
            Some(c) => serde_json::json!({ "source": "tsc", "true_readings": c.true_readings, "counter_readings": c.counter_readings }),
            None => serde_json::json!({ "source": "clock_gettime" }),
        }
    }
}

/// Interpolates between true readings with the counter. Pure: the counter
/// value and the true reading are handed in.
#[derive(Default)]
struct Interpolation {
    anchor: Option<(Instant, u64)>,
    /// None until the rate is measured (or after it stopped making sense).
    rate: Option<Rate>,
    /// The true reading the next rate measurement starts from.
    rate_from: Option<(Instant, u64)>,
    true_readings: u64,
    counter_readings: u64,
}

/// The counter's measured rate.
#[derive(Clone, Copy)]
struct Rate {
    /// Nanoseconds per tick, fixed point with 32 fractional bits.
    ns_per_tick: u64,
    /// Ticks in ANCHOR_PERIOD at that rate.
    period_ticks: u64,
}

impl Interpolation {
    /// The time at counter value `tsc`; `exact` takes a true reading,
    /// bracketed by two counter values.
    fn at(&mut self, tsc: u64, exact: impl FnOnce() -> (u64, Instant, u64)) -> Instant {
        if let (Some((anchor, anchor_tsc)), Some(rate)) = (self.anchor, self.rate) {
            let ticks = tsc.wrapping_sub(anchor_tsc);
            // A counter that went back wraps to a huge count: a true reading.
            if ticks < rate.period_ticks {
                self.counter_readings += 1;
                let ns = (u128::from(ticks) * u128::from(rate.ns_per_tick)) >> 32;
                return anchor + Duration::from_nanos(ns as u64);
            }
        }
        self.true_reading(exact)
    }

    fn true_reading(&mut self, exact: impl FnOnce() -> (u64, Instant, u64)) -> Instant {
        let (before, now, after) = exact();
        self.true_readings += 1;
        let width = after.wrapping_sub(before);
        if width > MAX_READ_TICKS {
            return now;
        }
        let tsc = before.wrapping_add(width / 2);
        self.anchor = Some((now, tsc));
        match self.rate_from {
            Some((from, from_tsc)) if now.saturating_duration_since(from) >= CALIBRATE_OVER => {
                self.measure_rate(now.saturating_duration_since(from), tsc.wrapping_sub(from_tsc));
                self.rate_from = Some((now, tsc));
            }
            Some(_) => {}
            None => self.rate_from = Some((now, tsc)),
        }
        now
    }

    fn measure_rate(&mut self, elapsed: Duration, ticks: u64) {
        let ns = elapsed.as_nanos();
        let plausible = ticks != 0 && PLAUSIBLE_TICKS_PER_NS.contains(&(ticks as f64 / ns as f64));
        if !plausible {
            // Stopped, jumped or went back: true readings until it has
            // been steady over a whole measurement again.
            self.rate = None;
            return;
        }
        let ns_per_tick = ((ns << 32) / u128::from(ticks)) as u64;
        let period_ticks = ((ANCHOR_PERIOD.as_nanos() << 32) / u128::from(ns_per_tick)) as u64;
        self.rate = Some(Rate { ns_per_tick, period_ticks });
    }
}

/// A true reading between two counter readings.
fn exact_reading() -> (u64, Instant, u64) {
    let before = read_counter();
    let now = Instant::now();
    (before, now, read_counter())
}

#[cfg(target_arch = "x86_64")]
fn read_counter() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64; it reads a register.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn read_counter() -> u64 {
    0
}

fn counter_available() -> bool {
    cfg!(target_arch = "x86_64")
}

/// The kernel keeps time with the TSC and the CPU says it ticks at a
/// constant rate through power states: the kernel checked it is usable.
/// Asked once, as the engine starts; should the kernel later give up on
/// the TSC, the counter is still only trusted within a second of a true
/// reading, at a rate measured against the kernel's clock.
fn kernel_trusts_counter() -> bool {
    let source = std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    counter_trusted(&source, &cpuinfo)
}

fn counter_trusted(clocksource: &str, cpuinfo: &str) -> bool {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    clocksource.trim() == "tsc" && has("constant_tsc") && has("nonstop_tsc")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake machine: the counter ticks at 2.5 per nanosecond from 1,000.
    struct Machine {
        start: Instant,
    }

    impl Machine {
        fn tsc_at(&self, ns: u64) -> u64 {
            1_000 + ns * 5 / 2
        }
        fn exact_at(&self, ns: u64) -> impl FnOnce() -> (u64, Instant, u64) + use<> {
            let (tsc, at) = (self.tsc_at(ns), self.start + Duration::from_nanos(ns));
            move || (tsc - 40, at, tsc + 40)
        }
        fn read(&self, clock: &mut Interpolation, ns: u64) -> Duration {
            clock.at(self.tsc_at(ns), self.exact_at(ns)).duration_since(self.start)
        }
    }

    /// A clock that measured the counter's rate between 0 and 300 ms.
    fn calibrated() -> (Machine, Interpolation) {
        let m = Machine { start: Instant::now() };
        let mut clock = Interpolation::default();
        m.read(&mut clock, 0);
        m.read(&mut clock, 300_000_000);
        (m, clock)
    }

    #[test]
    fn readings_are_true_ones_until_the_counter_rate_is_measured() {
        let m = Machine { start: Instant::now() };
        let mut clock = Interpolation::default();
        for ms in [0, 50, 100, 150] {
            assert_eq!(m.read(&mut clock, ms * 1_000_000), Duration::from_millis(ms));
        }
        assert_eq!((clock.true_readings, clock.counter_readings), (4, 0));
    }

    #[test]
    fn once_measured_the_counter_interpolates_to_within_a_nanosecond_or_two() {
        let (m, mut clock) = calibrated();
        let true_so_far = clock.true_readings;
        for ns in [300_000_001, 300_123_457, 900_000_000, 1_299_999_000] {
            let got = m.read(&mut clock, ns).as_nanos() as i128;
            assert!((got - ns as i128).abs() <= 2, "{ns} ns read as {got}");
        }
        assert_eq!(clock.true_readings, true_so_far, "all from the counter");
    }

    #[test]
    fn a_second_past_its_anchor_the_counter_takes_a_true_reading_again() {
        let (m, mut clock) = calibrated();
        let before = clock.true_readings;
        m.read(&mut clock, 1_300_000_001);
        assert_eq!(clock.true_readings, before + 1);
    }

    #[test]
    fn a_counter_that_went_back_is_not_believed() {
        let (m, mut clock) = calibrated();
        let before = clock.true_readings;
        // The counter reads lower than at the anchor; the true clock says 400 ms.
        let got = clock.at(m.tsc_at(100_000_000), m.exact_at(400_000_000));
        assert_eq!(got.duration_since(m.start), Duration::from_millis(400));
        assert_eq!(clock.true_readings, before + 1);
    }

    #[test]
    fn a_counter_that_stood_still_between_true_readings_is_given_up() {
        let (m, mut clock) = calibrated();
        // Over a second and a half the counter advanced one tick.
        let tsc = m.tsc_at(300_000_000) + 1;
        let at = m.start + Duration::from_millis(1_800);
        clock.at(u64::MAX / 2, move || (tsc, at, tsc));
        assert!(clock.rate.is_none(), "rate forgotten");
        let got = clock.at(tsc + 10, m.exact_at(1_900_000_000));
        assert_eq!(got.duration_since(m.start), Duration::from_millis(1_900), "a true reading");
    }

    #[test]
    fn an_interrupted_true_reading_anchors_nothing() {
        let m = Machine { start: Instant::now() };
        let mut clock = Interpolation::default();
        let at = m.start + Duration::from_millis(5);
        let got = clock.at(0, move || (0, at, MAX_READ_TICKS + 1));
        assert_eq!(got, at);
        assert!(clock.anchor.is_none() && clock.rate_from.is_none());
    }

    #[test]
    fn the_wake_clock_never_goes_back() {
        let mut clock = WakeClock::new();
        let mut last = clock.now();
        for _ in 0..10_000 {
            let now = clock.now();
            assert!(now >= last);
            last = now;
        }
        let exact = WakeClock::exact();
        assert_eq!(exact.describe()["source"], "clock_gettime");
    }

    #[test]
    fn on_this_machine_the_wake_clock_keeps_to_the_kernel_clock() {
        // Past the rate measurement and into interpolation (where the
        // counter is trusted here); a wrong rate or anchor would be off by
        // far more than the margin, which only allows for preemption.
        let mut clock = WakeClock::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(700) {
            let ours = clock.now();
            let kernel = Instant::now();
            let apart = if kernel >= ours { kernel - ours } else { ours - kernel };
            assert!(apart < Duration::from_millis(20), "{apart:?} apart, {}", clock.describe());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_counter_is_used_only_where_the_kernel_keeps_time_with_it() {
        let cpu = "processor\t: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc rdtscp\n";
        assert!(counter_trusted("tsc\n", cpu));
        assert!(!counter_trusted("kvm-clock\n", cpu));
        assert!(!counter_trusted("tsc\n", "flags\t\t: fpu tsc constant_tsc rdtscp\n"));
        assert!(!counter_trusted("", ""));
    }
}
