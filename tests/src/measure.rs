//! The bench's arithmetic on measurements, apart from its I/O so that it can be unit tested:
//! medians, ratios and targets. A measurement that failed (no finite sample, a zero or failed
//! baseline, a negative difference) is NaN from here on and its target is reported as
//! *missing*, never as met or as missed.

/// The median of the finite `samples`; NaN when there is none (a failed measurement).
pub fn median(samples: &[f64]) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `value / baseline`; NaN unless both are finite and the baseline is above zero (a ratio
/// over a failed or zero baseline means nothing).
pub fn ratio(value: f64, baseline: f64) -> f64 {
    if value.is_finite() && baseline.is_finite() && baseline > 0.0 {
        value / baseline
    } else {
        f64::NAN
    }
}

/// `(after - before) / count`; NaN when the difference is negative or `count` is zero (a
/// figure that shrank measured something else, e.g. memory given back meanwhile).
pub fn per_item(before: u64, after: u64, count: u64) -> f64 {
    match after.checked_sub(before) {
        Some(d) if count > 0 => d as f64 / count as f64,
        _ => f64::NAN,
    }
}

/// A ratio (or a value) against a target.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub value: f64,
    /// "ratio", "per s", … what `value` is.
    pub unit: &'static str,
    /// `>=` or `<=`.
    pub op: &'static str,
    pub threshold: f64,
    /// What the figure is relative to, in words.
    pub against: String,
}

/// How a target came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// The measurement failed: there is no value to compare.
    Missing,
}

impl Verdict {
    /// The word in the report's tables.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Met => "yes",
            Verdict::Missed => "NO",
            Verdict::Missing => "MISSING",
        }
    }

    /// `met` in report.json: true, false, or null when missing.
    pub fn json(self) -> Option<bool> {
        match self {
            Verdict::Met => Some(true),
            Verdict::Missed => Some(false),
            Verdict::Missing => None,
        }
    }
}

impl Target {
    pub fn verdict(&self) -> Verdict {
        if !self.value.is_finite() || !self.threshold.is_finite() {
            return Verdict::Missing;
        }
        let met = match self.op {
            ">=" => self.value >= self.threshold,
            "<=" => self.value <= self.threshold,
            _ => return Verdict::Missing,
        };
        if met { Verdict::Met } else { Verdict::Missed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(value: f64, op: &'static str, threshold: f64) -> Target {
        Target {
            name: "t".into(),
            value,
            unit: "x",
            op,
            threshold,
            against: "test".into(),
        }
    }

    #[test]
    fn medians_of_finite_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0, f64::INFINITY]), 5.0);
    }

    #[test]
    fn a_failed_measurement_is_missing_not_met() {
        // A NaN sample, as from a run that produced no number.
        let nan = median(&[f64::NAN]);
        assert_eq!(target(nan, "<=", 2.0).verdict(), Verdict::Missing);
        assert_eq!(target(nan, ">=", 0.9).verdict(), Verdict::Missing);
        // No sample at all: once a 0 that met every `<=` target.
        let empty = median(&[]);
        assert_eq!(target(empty, "<=", 8.0).verdict(), Verdict::Missing);
        assert_eq!(
            target(ratio(empty, 10.0), "<=", 2.0).verdict(),
            Verdict::Missing
        );
        // A zero baseline: once an infinite ratio that met every `>=` target.
        assert_eq!(
            target(ratio(9.4, 0.0), ">=", 0.9).verdict(),
            Verdict::Missing
        );
        assert_eq!(
            target(ratio(9.4, median(&[])), ">=", 0.9).verdict(),
            Verdict::Missing
        );
        // Memory that shrank: once 0 KiB per session.
        assert!(per_item(5_000, 4_000, 100).is_nan());
        assert_eq!(
            target(per_item(5_000, 4_000, 100), "<=", 8.0).verdict(),
            Verdict::Missing
        );
        assert_eq!(Verdict::Missing.json(), None);
        assert_eq!(Verdict::Missing.word(), "MISSING");
    }

    #[test]
    fn real_values_are_met_or_missed() {
        assert_eq!(target(ratio(9.0, 10.0), ">=", 0.9).verdict(), Verdict::Met);
        assert_eq!(
            target(ratio(8.0, 10.0), ">=", 0.9).verdict(),
            Verdict::Missed
        );
        assert_eq!(target(0.0, "<=", 0.0).verdict(), Verdict::Met);
        assert_eq!(target(3.0, "<=", 2.0).verdict(), Verdict::Missed);
        assert_eq!(per_item(4_000, 5_000, 100), 10.0);
        assert_eq!(Verdict::Met.json(), Some(true));
        assert_eq!(Verdict::Missed.json(), Some(false));
    }
}
