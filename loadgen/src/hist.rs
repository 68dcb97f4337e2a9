//! A log-linear latency histogram (microseconds), mergeable, no allocation per sample.

/// Buckets: 0..1024 us in 1 us steps, then 64 sub-buckets per power of two.
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
    sum_us: u128,
}

const LINEAR: u64 = 1024;
const SUB: u64 = 64;

impl Default for Hist {
    fn default() -> Self {
        Hist { counts: vec![0; (LINEAR + 64 * SUB) as usize], total: 0, max_us: 0, sum_us: 0 }
    }
}

fn bucket(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros() as u64; // >= 10
    let sub = (us >> (exp - 6)) & (SUB - 1);
    (LINEAR + (exp - 10) * SUB + sub) as usize
}

fn bucket_upper(b: usize) -> u64 {
    let b = b as u64;
    if b < LINEAR {
        return b;
    }
    let exp = (b - LINEAR) / SUB + 10;
    let sub = (b - LINEAR) % SUB;
    ((SUB + sub + 1) << (exp - 6)) - 1
}

impl Hist {
    pub fn record(&mut self, us: u64) {
        let b = bucket(us).min(self.counts.len() - 1);
        self.counts[b] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
        self.sum_us += us as u128;
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max_us = self.max_us.max(other.max_us);
        self.sum_us += other.sum_us;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    pub fn mean_us(&self) -> f64 {
        if self.total == 0 { 0.0 } else { self.sum_us as f64 / self.total as f64 }
    }

    /// The `q` quantile (0..=1), as the upper bound of its bucket (within 1.6%).
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (b, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper(b).min(self.max_us);
            }
        }
        self.max_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut h = Hist::default();
        for us in 1..=100_000u64 {
            h.record(us);
        }
        for (q, truth) in [(0.5, 50_000u64), (0.99, 99_000), (0.001, 100)] {
            let got = h.quantile_us(q);
            assert!(got as f64 >= truth as f64 * 0.98 && got as f64 <= truth as f64 * 1.02, "{q}: {got} vs {truth}");
        }
        assert_eq!(h.quantile_us(1.0), 100_000);
        for us in [0u64, 5, 1023, 1024, 1025, 4096, 1 << 40] {
            assert!(bucket_upper(bucket(us)) >= us);
        }
    }
}
