//! Rate profiles of the open-loop workload: when each message is due, relative to the start.

use crate::error::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One step of a [`Profile::Steps`] profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Step {
    /// Seconds since the workload started.
    pub at_s: f64,
    /// Messages per second from then on.
    pub rate: f64,
}

/// How the send rate evolves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Profile {
    /// `rate` messages per second, evenly spaced.
    Constant { rate: f64 },
    /// Piecewise constant rates; the first step starts at 0 s.
    Steps { steps: Vec<Step> },
    /// Exponentially distributed gaps with mean 1/`rate` (drawn from the workload's seed).
    Poisson { rate: f64 },
    /// `base_rate`, and `burst_rate` for the first `burst_s` of every `period_s`.
    Bursts {
        base_rate: f64,
        burst_rate: f64,
        burst_s: f64,
        period_s: f64,
    },
}

const MAX_RATE: f64 = 1_000_000.0;

fn check_rate(what: &str, r: f64) -> Result<()> {
    if !(r.is_finite() && (0.0..=MAX_RATE).contains(&r)) {
        return Err(Error::Config(format!(
            "{what} must be a number of messages per second in 0..=1,000,000, got {r}"
        )));
    }
    Ok(())
}

impl Profile {
    pub fn validate(&self) -> Result<()> {
        match self {
            Profile::Constant { rate } | Profile::Poisson { rate } => check_rate("rate", *rate),
            Profile::Steps { steps } => {
                if steps.first().is_none_or(|s| s.at_s != 0.0) {
                    return Err(Error::Config(
                        "the first step must start at at_s = 0".into(),
                    ));
                }
                for w in steps.windows(2) {
                    if w[1].at_s.partial_cmp(&w[0].at_s) != Some(std::cmp::Ordering::Greater) {
                        return Err(Error::Config(format!(
                            "steps must start at increasing times, got {} then {}",
                            w[0].at_s, w[1].at_s
                        )));
                    }
                }
                steps
                    .iter()
                    .try_for_each(|s| check_rate("a step's rate", s.rate))
            }
            Profile::Bursts {
                base_rate,
                burst_rate,
                burst_s,
                period_s,
            } => {
                check_rate("base_rate", *base_rate)?;
                check_rate("burst_rate", *burst_rate)?;
                if !(period_s.is_finite()
                    && *period_s > 0.0
                    && *burst_s >= 0.0
                    && burst_s <= period_s)
                {
                    return Err(Error::Config(format!(
                        "bursts need 0 <= burst_s <= period_s and period_s > 0, got burst_s \
                         {burst_s}, period_s {period_s}"
                    )));
                }
                Ok(())
            }
        }
    }

    /// The long-run mean rate, messages per second (for steps: the last step's rate).
    pub fn mean_rate(&self) -> f64 {
        match self {
            Profile::Constant { rate } | Profile::Poisson { rate } => *rate,
            Profile::Steps { steps } => steps.last().map_or(0.0, |s| s.rate),
            Profile::Bursts {
                base_rate,
                burst_rate,
                burst_s,
                period_s,
            } => (burst_rate * burst_s + base_rate * (period_s - burst_s)) / period_s,
        }
    }

    /// The rate in force at `t` seconds, and when it next changes.
    fn rate_at(&self, t: f64) -> (f64, f64) {
        match self {
            Profile::Constant { rate } | Profile::Poisson { rate } => (*rate, f64::INFINITY),
            Profile::Steps { steps } => {
                let i = steps.iter().rposition(|s| s.at_s <= t).unwrap_or(0);
                let next = steps.get(i + 1).map_or(f64::INFINITY, |s| s.at_s);
                (steps[i].rate, next)
            }
            Profile::Bursts {
                base_rate,
                burst_rate,
                burst_s,
                period_s,
            } => {
                let cycle = (t / period_s).floor() * period_s;
                if t - cycle < *burst_s {
                    (*burst_rate, cycle + burst_s)
                } else {
                    (*base_rate, cycle + period_s)
                }
            }
        }
    }

    /// The schedule: due times in seconds since the start, increasing, endless (or ending
    /// when the rate is zero for good).
    pub fn schedule(&self, seed: u64) -> Schedule {
        Schedule {
            profile: self.clone(),
            rng: StdRng::seed_from_u64(seed),
            t: 0.0,
            k: 0,
        }
    }
}

/// Due times of a profile; see [`Profile::schedule`].
pub struct Schedule {
    profile: Profile,
    rng: StdRng,
    t: f64,
    k: u64,
}

impl Iterator for Schedule {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        if let Profile::Constant { rate } = self.profile {
            // Multiply rather than add, so that rounding never accumulates.
            if rate <= 0.0 {
                return None;
            }
            self.k += 1;
            return Some((self.k - 1) as f64 / rate);
        }
        if let Profile::Poisson { rate } = self.profile {
            if rate <= 0.0 {
                return None;
            }
            let due = self.t;
            let u: f64 = self.rng.random_range(f64::MIN_POSITIVE..1.0);
            self.t += -u.ln() / rate;
            return Some(due);
        }
        // Piecewise constant: the next message is due once the rate, integrated from the last
        // one, reaches 1, across any change of rate, jumping over silent stretches.
        if self.k == 0 {
            loop {
                let (rate, change) = self.profile.rate_at(self.t);
                if rate > 0.0 {
                    break;
                }
                if !change.is_finite() {
                    return None;
                }
                self.t = change;
            }
        }
        let due = self.t;
        if !due.is_finite() {
            return None;
        }
        self.k += 1;
        let mut remaining = 1.0;
        loop {
            let (rate, change) = self.profile.rate_at(self.t);
            if rate > 0.0 {
                let need = remaining / rate;
                if self.t + need < change {
                    self.t += need;
                    break;
                }
                remaining -= (change - self.t) * rate;
            } else if !change.is_finite() {
                self.t = f64::INFINITY;
                break;
            }
            self.t = change;
        }
        Some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(p: &Profile, n: usize) -> Vec<f64> {
        p.schedule(7).take(n).collect()
    }

    #[test]
    fn constant_is_evenly_spaced() {
        let d = take(&Profile::Constant { rate: 4.0 }, 5);
        assert_eq!(d, [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(Profile::Constant { rate: 0.0 }.schedule(1).next(), None);
    }

    #[test]
    fn poisson_is_seeded_and_has_the_right_mean() {
        let p = Profile::Poisson { rate: 100.0 };
        assert_eq!(take(&p, 50), take(&p, 50));
        assert_ne!(take(&p, 50), p.schedule(8).take(50).collect::<Vec<_>>());
        let d = take(&p, 20_001);
        let mean_gap = d[20_000] / 20_000.0;
        assert!((mean_gap - 0.01).abs() < 0.0005, "{mean_gap}");
        assert!(d.windows(2).all(|w| w[1] >= w[0]));
    }

    #[test]
    fn steps_change_rate_and_skip_silence() {
        let p = Profile::Steps {
            steps: vec![
                Step {
                    at_s: 0.0,
                    rate: 2.0,
                },
                Step {
                    at_s: 1.0,
                    rate: 0.0,
                },
                Step {
                    at_s: 3.0,
                    rate: 10.0,
                },
            ],
        };
        p.validate().unwrap();
        let d = take(&p, 4);
        assert_eq!(d, [0.0, 0.5, 3.0, 3.1]);
    }

    #[test]
    fn bursts_repeat() {
        let p = Profile::Bursts {
            base_rate: 1.0,
            burst_rate: 10.0,
            burst_s: 0.5,
            period_s: 2.0,
        };
        let d: Vec<f64> = p.schedule(1).take_while(|t| *t < 4.0).collect();
        let in_burst = d.iter().filter(|t| (**t % 2.0) < 0.5).count();
        assert_eq!(in_burst, 10, "{d:?}");
        assert!((p.mean_rate() - 3.25).abs() < 1e-12);
    }

    #[test]
    fn bad_profiles_are_refused() {
        assert!(Profile::Constant { rate: -1.0 }.validate().is_err());
        assert!(Profile::Steps { steps: vec![] }.validate().is_err());
        assert!(Profile::Steps {
            steps: vec![Step {
                at_s: 1.0,
                rate: 1.0
            }]
        }
        .validate()
        .is_err());
        assert!(Profile::Bursts {
            base_rate: 1.0,
            burst_rate: 1.0,
            burst_s: 3.0,
            period_s: 2.0
        }
        .validate()
        .is_err());
    }
}
