//! Statistics across repeated runs, as Hoefler and Belli ask of a benchmark ("Scientific
//! benchmarking of parallel computing systems", SC'15): medians with nonparametric confidence
//! intervals, a rank test for whether two strategies differ, a ratio of medians with its
//! interval, and a stopping rule for repeating runs until an interval is tight.
//!
//! Every function is deterministic: the bootstrap draws from ChaCha8 with a fixed seed (an
//! algorithm fixed by its specification, and indices taken from its raw output), so a table
//! computed twice from the same runs is the same table, whatever version of `rand`.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The confidence level of every interval here unless one is asked for.
pub const LEVEL: f64 = 0.95;

/// Resamples of the bootstrap behind [`ratio_of_medians`].
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// The bootstrap's seed: fixed, so that results are reproducible.
const BOOTSTRAP_SEED: u64 = 0x6d73_326d_7374_6174;

/// The fewest runs with a 95% interval of the median (1 - 2/64 = 0.969); below it, no
/// interval is given for a ratio either (a percentile bootstrap of 1 to 3 runs covers far less
/// than it claims).
pub const MIN_RUNS: usize = 6;

/// A median with its distribution-free confidence interval.
///
/// The interval is a pair of order statistics `x(l) <= median <= x(n + 1 - l)`: how many of `n`
/// observations fall below the true median is Binomial(n, 1/2) whatever the distribution, so
/// `P(x(l) <= true median <= x(n + 1 - l)) = 1 - 2 P(B <= l - 1)`; `l` is the largest that
/// keeps this at or above the level asked. Below 6 runs no pair reaches 95%: no interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MedianCi {
    pub n: usize,
    pub median: f64,
    /// None when `n` is too small for the level (6 runs for 95%).
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    /// The interval's exact coverage (at least the level asked).
    pub coverage: Option<f64>,
    pub min: f64,
    pub max: f64,
    /// The interval's larger half-width over the median: how tight the estimate is (None
    /// without an interval, or with a median of 0).
    pub relative_half_width: Option<f64>,
}

/// `values`' median and its confidence interval at `level` (None: no value, or one is NaN).
pub fn median_ci(values: &[f64], level: f64) -> Option<MedianCi> {
    let sorted = sorted(values)?;
    let n = sorted.len();
    let mut ci = MedianCi {
        n,
        median: median_of_sorted(&sorted),
        lo: None,
        hi: None,
        coverage: None,
        min: sorted[0],
        max: sorted[n - 1],
        relative_half_width: None,
    };
    // The largest l whose pair (x(l), x(n + 1 - l)) still covers `level`.
    let mut below = 0.0; // P(B <= l - 1), growing with l
    for l in 1..=n.div_ceil(2) {
        below += binomial_half_pmf(n, l - 1);
        let coverage = 1.0 - 2.0 * below;
        if coverage < level {
            break;
        }
        ci.lo = Some(sorted[l - 1]);
        ci.hi = Some(sorted[n - l]);
        ci.coverage = Some(coverage);
    }
    if let (Some(lo), Some(hi)) = (ci.lo, ci.hi) {
        let half = (ci.median - lo).max(hi - ci.median);
        // An interval of one point is tight even around 0 (no message waited in any run).
        ci.relative_half_width = if half == 0.0 {
            Some(0.0)
        } else if ci.median == 0.0 {
            None
        } else {
            Some(half / ci.median.abs())
        };
    }
    Some(ci)
}

/// The outcome of a two-sided Mann-Whitney U test (Wilcoxon rank-sum) of two samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RankTest {
    /// U of the first sample: how many pairs (a, b) have a > b (ties count one half).
    pub u: f64,
    /// Two-sided p-value: how likely a U this far from n_a n_b / 2 is if both samples come
    /// from one distribution.
    pub p: f64,
    /// `exact` (no ties, at most 60 runs in all: the permutation distribution of U) or `normal` (the
    /// normal approximation with tie and continuity corrections).
    pub method: &'static str,
}

/// Mann-Whitney U test of `a` against `b` (None: a sample is empty or holds NaN).
pub fn mann_whitney(a: &[f64], b: &[f64]) -> Option<RankTest> {
    let (a, b) = (sorted(a)?, sorted(b)?);
    let (m, n) = (a.len(), b.len());
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&x| (x, true))
        .chain(b.iter().map(|&x| (x, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    // Average ranks over ties; the tie sizes correct the variance.
    let (mut rank_sum_a, mut tie_term, mut i) = (0.0, 0.0, 0);
    while i < all.len() {
        let j = (i..all.len())
            .find(|&j| all[j].0 != all[i].0)
            .unwrap_or(all.len());
        let t = (j - i) as f64;
        let rank = (i + 1 + j) as f64 / 2.0;
        rank_sum_a += rank * all[i..j].iter().filter(|x| x.1).count() as f64;
        tie_term += t * t * t - t;
        i = j;
    }
    let u = rank_sum_a - (m * (m + 1)) as f64 / 2.0;
    let mn = (m * n) as f64;
    if tie_term == 0.0 && m + n <= 60 {
        let counts = u_distribution(m, n);
        let total: f64 = counts.iter().map(|&c| c as f64).sum();
        let k = u.round() as usize;
        let lower: f64 = counts[..=k].iter().map(|&c| c as f64).sum::<f64>() / total;
        let upper: f64 = counts[k..].iter().map(|&c| c as f64).sum::<f64>() / total;
        let p = (2.0 * lower.min(upper)).min(1.0);
        return Some(RankTest {
            u,
            p,
            method: "exact",
        });
    }
    let big_n = (m + n) as f64;
    let var = mn / 12.0 * ((big_n + 1.0) - tie_term / (big_n * (big_n - 1.0)));
    let p = if var <= 0.0 {
        1.0
    } else {
        let z = ((u - mn / 2.0).abs() - 0.5).max(0.0) / var.sqrt();
        libm::erfc(z / std::f64::consts::SQRT_2).min(1.0)
    };
    Some(RankTest {
        u,
        p,
        method: "normal",
    })
}

/// A ratio of two medians with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatioCi {
    /// median(a) / median(b).
    pub ratio: f64,
    /// The percentile bootstrap's interval ([`BOOTSTRAP_RESAMPLES`] resamples of each sample,
    /// fixed seed); None when a sample has fewer than [`MIN_RUNS`] runs.
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

/// median(`a`) / median(`b`) with its percentile bootstrap interval at `level` (None: a sample
/// is empty or holds NaN, or `b`'s median is 0).
pub fn ratio_of_medians(a: &[f64], b: &[f64], level: f64) -> Option<RatioCi> {
    let (a, b) = (sorted(a)?, sorted(b)?);
    let denominator = median_of_sorted(&b);
    if denominator == 0.0 {
        return None;
    }
    let mut ci = RatioCi {
        ratio: median_of_sorted(&a) / denominator,
        lo: None,
        hi: None,
    };
    if a.len() < MIN_RUNS || b.len() < MIN_RUNS {
        return Some(ci);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(BOOTSTRAP_SEED);
    let mut resample = |s: &[f64], buf: &mut Vec<f64>| {
        buf.clear();
        // An index from the raw 64 bits (multiply and shift): the same stream, the same picks.
        buf.extend(
            (0..s.len())
                .map(|_| s[((u128::from(rng.next_u64()) * s.len() as u128) >> 64) as usize]),
        );
        buf.sort_by(f64::total_cmp);
        median_of_sorted(buf)
    };
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    let mut ratios: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .filter_map(|_| {
            let (x, y) = (resample(&a, &mut ra), resample(&b, &mut rb));
            (y != 0.0).then(|| x / y)
        })
        .collect();
    if ratios.is_empty() {
        return Some(ci);
    }
    ratios.sort_by(f64::total_cmp);
    let at =
        |q: f64| ratios[((q * (ratios.len() - 1) as f64).round() as usize).min(ratios.len() - 1)];
    let tail = (1.0 - level) / 2.0;
    ci.lo = Some(at(tail));
    ci.hi = Some(at(1.0 - tail));
    Some(ci)
}

/// Sorted copy of `values` (None if empty or any is NaN).
fn sorted(values: &[f64]) -> Option<Vec<f64>> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v)
}

fn median_of_sorted(s: &[f64]) -> f64 {
    let n = s.len();
    match n % 2 {
        1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// P(B = k) for B ~ Binomial(n, 1/2), in log space so that large n does not overflow.
fn binomial_half_pmf(n: usize, k: usize) -> f64 {
    let ln_choose: f64 = (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum();
    (ln_choose - n as f64 * std::f64::consts::LN_2).exp()
}

/// How many of the C(m + n, m) orderings of two samples give each U = 0..=m n: the
/// coefficients of the Gaussian binomial [m + n choose m]_q, a product of (1 - q^(n+i)) /
/// (1 - q^i) for i = 1..=m, every division exact.
fn u_distribution(m: usize, n: usize) -> Vec<u128> {
    let mut c = vec![0u128; m * n + 1];
    c[0] = 1;
    for i in 1..=m {
        // Times (1 - q^(n+i)): from the top down, so that each term is read before it changes.
        for k in (n + i..c.len()).rev() {
            c[k] = c[k].wrapping_sub(c[k - n - i]);
        }
        // Divided by (1 - q^i): a running sum with stride i.
        for k in i..c.len() {
            c[k] = c[k].wrapping_add(c[k - i]);
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_is_a_pair_of_order_statistics_with_its_binomial_coverage() {
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let ci = median_ci(&ten, LEVEL).unwrap();
        // n = 10: x(2) and x(9), coverage 1 - 2 * 11/1024 = 0.9785 (x(3), x(8) would be 0.891).
        assert_eq!((ci.median, ci.lo, ci.hi), (5.5, Some(2.0), Some(9.0)));
        assert!((ci.coverage.unwrap() - 0.978_515_625).abs() < 1e-12);
        assert_eq!((ci.min, ci.max, ci.n), (1.0, 10.0, 10));
        // Six runs are the fewest with a 95% interval: their extremes (coverage 1 - 2/64).
        let six = median_ci(&[3.0, 1.0, 2.0, 6.0, 5.0, 4.0], LEVEL).unwrap();
        assert_eq!((six.lo, six.hi), (Some(1.0), Some(6.0)));
        let five = median_ci(&[1.0, 2.0, 3.0, 4.0, 5.0], LEVEL).unwrap();
        assert_eq!((five.median, five.lo, five.coverage), (3.0, None, None));
        assert_eq!(five.relative_half_width, None);
        assert!(median_ci(&[], LEVEL).is_none());
        // Six runs without a wait: a tight interval at 0, not an endless one.
        let zeros = median_ci(&[0.0; 6], LEVEL).unwrap();
        assert_eq!(zeros.relative_half_width, Some(0.0));
        assert!(median_ci(&[1.0, f64::NAN], LEVEL).is_none());
        // Large samples: the interval narrows around the median, its coverage near the level.
        let many: Vec<f64> = (0..1001).map(f64::from).collect();
        let ci = median_ci(&many, LEVEL).unwrap();
        assert_eq!(ci.median, 500.0);
        let (lo, hi) = (ci.lo.unwrap(), ci.hi.unwrap());
        assert!(
            lo > 460.0 && hi < 540.0 && hi - 500.0 == 500.0 - lo,
            "{ci:?}"
        );
        assert!(ci.coverage.unwrap() >= LEVEL && ci.coverage.unwrap() < 0.96);
        assert!((ci.relative_half_width.unwrap() - (500.0 - lo) / 500.0).abs() < 1e-12);
    }

    #[test]
    fn the_rank_test_is_exact_for_small_samples_without_ties() {
        // Complete separation of 5 and 5: U = 25, p = 2 / C(10, 5) = 2/252.
        let a = [6.0, 7.0, 8.0, 9.0, 10.0];
        let b = [1.0, 2.0, 3.0, 4.0, 5.0];
        let t = mann_whitney(&a, &b).unwrap();
        assert_eq!((t.u, t.method), (25.0, "exact"));
        assert!((t.p - 2.0 / 252.0).abs() < 1e-12, "{t:?}");
        assert_eq!(mann_whitney(&b, &a).unwrap().u, 0.0);
        // Interleaved: no evidence at all.
        let t = mann_whitney(&[1.0, 3.0, 5.0], &[2.0, 4.0, 6.0]).unwrap();
        assert_eq!(t.u, 3.0);
        assert!(t.p > 0.6, "{t:?}");
        // The distribution of U sums to C(m + n, m) and is symmetric.
        let d = u_distribution(4, 6);
        assert_eq!(d.iter().sum::<u128>(), 210);
        assert!(d.iter().eq(d.iter().rev()));
        assert!(mann_whitney(&[], &[1.0]).is_none());
    }

    #[test]
    fn the_rank_test_corrects_for_ties_with_the_normal_approximation() {
        let t = mann_whitney(&[1.0, 1.0, 2.0, 2.0], &[1.0, 1.0, 2.0, 2.0]).unwrap();
        assert_eq!((t.u, t.method), (8.0, "normal"));
        assert_eq!(t.p, 1.0);
        let all_equal = mann_whitney(&[3.0; 4], &[3.0; 5]).unwrap();
        assert_eq!(all_equal.p, 1.0);
        // 30 against 31, shifted: z well beyond 3.
        let a: Vec<f64> = (0..30).map(|i| f64::from(i) + 20.0).collect();
        let b: Vec<f64> = (0..31).map(f64::from).collect();
        let t = mann_whitney(&a, &b).unwrap();
        assert_eq!(t.method, "normal");
        assert!(t.p < 1e-3, "{t:?}");
    }

    #[test]
    fn the_ratio_of_medians_comes_with_a_reproducible_bootstrap_interval() {
        let a: Vec<f64> = (0..10).map(|i| 50.0 + f64::from(i)).collect();
        let b: Vec<f64> = (0..10).map(|i| 300.0 + 2.0 * f64::from(i)).collect();
        let r = ratio_of_medians(&a, &b, LEVEL).unwrap();
        assert!((r.ratio - 54.5 / 309.0).abs() < 1e-12);
        let (lo, hi) = (r.lo.unwrap(), r.hi.unwrap());
        assert!(lo < r.ratio && r.ratio < hi, "{r:?}");
        assert!(lo > 50.0 / 318.0 && hi < 59.0 / 300.0, "{r:?}");
        let again = ratio_of_medians(&a, &b, LEVEL);
        assert_eq!(again, Some(r), "the same runs, the same interval");
        assert!(ratio_of_medians(&a, &[0.0, 0.0, 1.0], LEVEL).is_none());
        // Too few runs for an interval: the ratio alone.
        let few = ratio_of_medians(&a[..5], &b, LEVEL).unwrap();
        assert_eq!((few.lo, few.hi), (None, None));
        assert!((few.ratio - 52.0 / 309.0).abs() < 1e-12);
    }
}
