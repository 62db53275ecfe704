//! Age-standardized rates by the direct method, with the 2000 U.S.
//! standard population, so that strata and regions with different age
//! structures can be compared (for measures whose metadata sets
//! `age_standardize = true`).
//!
//! Method: the age-specific rates `p_i = x_i / n_i` of a stratum (numerator
//! over the performance denominator, i.e. denominator less exclusions and
//! exceptions, in each of Ward's age bands) are weighted by the standard
//! population's share `w_i` of each band: `rate = Σ w_i p_i`. The weights
//! are renormalized over the bands the measure covers — the bands holding
//! any of its denominator overall (an adults-only measure has no 0-17
//! band, so its weights are the adult shares of the standard).
//!
//! 95 % interval: normal approximation with `Var = Σ w_i² p_i (1 - p_i) / n_i`
//! (the binomial variance of each age-specific proportion; Klein &
//! Schoenborn 2001 give the same form for survey estimates), `rate ± 1.96 √Var`
//! clamped to [0, 1]. When every `p_i` is 0 or 1 the interval collapses to
//! the point: read it with the crude Wilson interval beside it.
//!
//! A stratum in which a covered band has nobody is *not computable*
//! (`None`): renormalizing silently over the bands it has would compare it
//! with a different standard than every other stratum. People whose age is
//! unknown belong to no band and do not enter the standardized rate (the
//! adult measures require an age, so they have none).

use std::collections::BTreeMap;

/// The 2000 U.S. standard population in Ward's age bands (age at the end of
/// the measurement period; `queries/lib/strata.sql`), in thousands.
///
/// Source: Klein RJ, Schoenborn CA. *Age adjustment using the 2000
/// projected U.S. population.* Healthy People 2010 Statistical Notes, no. 20.
/// Hyattsville, MD: National Center for Health Statistics, January 2001 —
/// distribution #4 (under 18, 18-44, 45-64, 65-74, 75 and over), from the
/// Census Bureau's projection of the 2000 population (Current Population
/// Reports P25-1130, Day 1996). The counts agree with the 11-group table of
/// Anderson & Rosenberg (NVSR 47(3), 1998; `tests::bands_agree_with_the_eleven_group_standard`):
/// 45-64 = 37,030 + 23,961; 75+ = 12,315 + 4,259; under 45 and the total
/// (274,634) match. Only the split of the 15-24 group at age 18 (11,818
/// under 18, 26,259 from 18) comes from the Note's distribution alone.
pub const US_2000_STANDARD: [(&str, u64); 5] = [
    ("0-17", 70_782),
    ("18-44", 108_151),
    ("45-64", 60_991),
    ("65-74", 18_136),
    ("75+", 16_574),
];

/// Standard normal quantile for a two-sided 95 % interval.
const Z95: f64 = 1.959_963_984_540_054;

/// An age-standardized rate and its 95 % confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standardized {
    pub rate: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// People in one age band of a stratum: `n` in the performance
/// denominator, `x` of them in the numerator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BandCount {
    pub n: u64,
    pub x: u64,
}

/// The standard bands a measure covers: those of [`US_2000_STANDARD`] with
/// anyone in the measure's overall performance denominator, in table order.
pub fn covered_bands(overall: &BTreeMap<String, BandCount>) -> Vec<&'static str> {
    US_2000_STANDARD
        .iter()
        .map(|(band, _)| *band)
        .filter(|band| overall.get(*band).is_some_and(|c| c.n > 0))
        .collect()
}

/// Direct age standardization of one stratum over the `covered` bands
/// (weights renormalized over them). `None` when no band is covered or a
/// covered band is empty in this stratum (not computable).
pub fn direct(bands: &BTreeMap<String, BandCount>, covered: &[&str]) -> Option<Standardized> {
    let weights: Vec<(&str, u64)> = US_2000_STANDARD
        .iter()
        .filter(|(band, _)| covered.contains(band))
        .copied()
        .collect();
    let total: u64 = weights.iter().map(|(_, pop)| pop).sum();
    if total == 0 {
        return None;
    }
    let (mut rate, mut variance) = (0.0, 0.0);
    for (band, pop) in weights {
        let c = bands.get(band).copied().unwrap_or_default();
        if c.n == 0 {
            return None;
        }
        let w = pop as f64 / total as f64;
        let p = c.x as f64 / c.n as f64;
        rate += w * p;
        variance += w * w * p * (1.0 - p) / c.n as f64;
    }
    let half = Z95 * variance.sqrt();
    Some(Standardized {
        rate,
        ci_low: (rate - half).max(0.0),
        ci_high: (rate + half).min(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bands(v: &[(&str, u64, u64)]) -> BTreeMap<String, BandCount> {
        v.iter()
            .map(|(b, n, x)| (b.to_string(), BandCount { n: *n, x: *x }))
            .collect()
    }

    #[test]
    fn bands_agree_with_the_eleven_group_standard() {
        // Anderson RN, Rosenberg HM, NVSR 47(3), 1998, table I (thousands):
        // <1, 1-4, 5-14, 15-24, 25-34, 35-44, 45-54, 55-64, 65-74, 75-84, 85+.
        let eleven = [
            3_795, 15_192, 39_977, 38_077, 37_233, 44_659, 37_030, 23_961, 18_136, 12_315, 4_259,
        ];
        let pop = |band: &str| US_2000_STANDARD.iter().find(|b| b.0 == band).unwrap().1;
        let total: u64 = eleven.iter().sum();
        assert_eq!(total, 274_634);
        assert_eq!(US_2000_STANDARD.iter().map(|b| b.1).sum::<u64>(), total);
        assert_eq!(pop("0-17") + pop("18-44"), eleven[..6].iter().sum::<u64>());
        assert_eq!(pop("45-64"), eleven[6] + eleven[7]);
        assert_eq!(pop("65-74"), eleven[8]);
        assert_eq!(pop("75+"), eleven[9] + eleven[10]);
        // Under 18 = <15 plus part of 15-24.
        let under15: u64 = eleven[..3].iter().sum();
        assert!(pop("0-17") > under15 && pop("0-17") < under15 + eleven[3]);
    }

    #[test]
    fn hand_calculation_for_an_adults_only_measure() {
        // Adults only: weights renormalized over 18-44..75+ whose standard
        // total is 108,151 + 60,991 + 18,136 + 16,574 = 203,852.
        //   band   n   x   p     w = pop / 203,852        w·p        w²·p(1-p)/n
        //   18-44 100  10 0.1  108,151/203,852 = 0.530537  0.0530537  0.00025332
        //   45-64  50  10 0.2   60,991/203,852 = 0.299193  0.0598385  0.00028645
        //   65-74  20   8 0.4   18,136/203,852 = 0.088967  0.0355866  0.00009498
        //   75+    10   5 0.5   16,574/203,852 = 0.081304  0.0406520  0.00016526
        // rate = 0.189131; Var = 0.00080001; SE = 0.028285;
        // 95 % CI = 0.189131 ± 1.96 × 0.028285 = 0.133694 .. 0.244567.
        let b = bands(&[
            ("18-44", 100, 10),
            ("45-64", 50, 10),
            ("65-74", 20, 8),
            ("75+", 10, 5),
        ]);
        let covered = covered_bands(&b);
        assert_eq!(covered, ["18-44", "45-64", "65-74", "75+"]);
        let s = direct(&b, &covered).unwrap();
        assert!((s.rate - 0.189131).abs() < 1e-6, "{s:?}");
        assert!((s.ci_low - 0.133694).abs() < 1e-6, "{s:?}");
        assert!((s.ci_high - 0.244567).abs() < 1e-6, "{s:?}");
        // The crude rate of the same people is 33/180 = 0.1833: the
        // standard's weights, not the stratum's own age mix, decide.
        assert!((s.rate - 33.0 / 180.0).abs() > 1e-3);
    }

    #[test]
    fn equal_age_specific_rates_standardize_to_that_rate() {
        let b = bands(&[
            ("0-17", 40, 10),
            ("18-44", 400, 100),
            ("45-64", 80, 20),
            ("65-74", 12, 3),
            ("75+", 4, 1),
        ]);
        let s = direct(&b, &covered_bands(&b)).unwrap();
        assert!((s.rate - 0.25).abs() < 1e-12);
        assert!(s.ci_low < 0.25 && s.ci_high > 0.25);
    }

    #[test]
    fn an_empty_covered_band_is_not_computable() {
        let covered = ["18-44", "45-64", "65-74", "75+"];
        let b = bands(&[("18-44", 100, 10), ("45-64", 50, 10), ("65-74", 20, 8)]);
        assert_eq!(direct(&b, &covered), None);
        let b = bands(&[
            ("18-44", 100, 10),
            ("45-64", 50, 10),
            ("65-74", 20, 8),
            ("75+", 0, 0),
        ]);
        assert_eq!(direct(&b, &covered), None);
        assert_eq!(direct(&b, &[]), None);
        // Bands outside the covered set (or unknown ages) do not count.
        let b = bands(&[("0-17", 5, 5), ("unknown", 3, 0), ("18-44", 10, 1)]);
        let s = direct(&b, &["18-44"]).unwrap();
        assert!((s.rate - 0.1).abs() < 1e-12);
    }
}
