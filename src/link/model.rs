//! Fellegi–Sunter record comparison: per-field comparison levels, u
//! probabilities from random pairs, m probabilities and the match prior by
//! expectation–maximisation over the blocked pairs (no labels), and
//! term-frequency adjusted match weights for names.

use std::collections::HashMap;

use chrono::{Datelike, NaiveDate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use strsim::{jaro_winkler, levenshtein};

/// One standardized source patient record.
#[derive(Debug, Clone, Default)]
pub struct Rec {
    pub source: String,
    pub source_patient_id: String,
    pub given: Option<String>,
    /// The given name as written when `given` is a nickname's full name
    /// (`betty` for `elizabeth`), so that a typo in a nickname (`betyt`)
    /// is still compared with it; `None` otherwise.
    pub given_written: Option<String>,
    pub family: Option<String>,
    /// Soundex of `family` (a blocking key).
    pub family_soundex: Option<String>,
    pub birth: Option<NaiveDate>,
    /// Year and month (when known) of a birth date too partial or garbled
    /// to use (`1970-05`, `19450493`); `None` when `birth` is known.
    pub birth_partial: Option<(i32, Option<u32>)>,
    pub sex: Option<String>,
    pub zip: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub ssn: Option<String>,
    pub address: Option<String>,
}

impl Rec {
    /// The birth year, from the birth date or what a partial one shows.
    pub fn birth_year(&self) -> Option<i32> {
        self.birth
            .map(|d| d.year())
            .or(self.birth_partial.map(|p| p.0))
    }

    /// Year and month (when known) of the birth date, full or partial.
    fn birth_year_month(&self) -> Option<(i32, Option<u32>)> {
        self.birth
            .map(|d| (d.year(), Some(d.month())))
            .or(self.birth_partial)
    }

    /// Whether the record has a value for compared field `f` (of [`FIELDS`]).
    pub fn has(&self, f: usize) -> bool {
        match f {
            0 => self.given.is_some(),
            1 => self.family.is_some(),
            2 => self.birth.is_some() || self.birth_partial.is_some(),
            3 => self.sex.is_some(),
            4 => self.zip.is_some(),
            5 => self.phone.is_some(),
            6 => self.email.is_some(),
            7 => self.ssn.is_some(),
            8 => self.address.is_some(),
            _ => false,
        }
    }
}

/// The compared fields, each with its number of levels (level 0 is
/// "different"; the highest is "exact").
pub const FIELDS: [(&str, usize); 9] = [
    ("given_name", 7),
    ("family_name", 4),
    ("birth_date", 4),
    ("sex", 2),
    ("zip", 3),
    ("phone", 2),
    ("email", 2),
    ("identifier", 3),
    ("address", 3),
];

/// Comparison vector of a pair: a level per field, `None` when either side
/// is missing (no evidence either way).
pub type Levels = [Option<u8>; FIELDS.len()];

/// Levels of `given_name`, lowest first: different, one is the other's
/// initial, one name crossed over between given and family (the other
/// changed: a married name, or a twin entered family name first), given and
/// family names swapped (the family level is then left out: the swap is the
/// evidence of both), Jaro–Winkler ≥ 0.80, ≥ 0.92, exact.
pub const GIVEN_DIFFERENT: u8 = 0;
pub const GIVEN_INITIAL: u8 = 1;
pub const GIVEN_CROSSED: u8 = 2;
pub const GIVEN_SWAPPED: u8 = 3;

/// The given name to compare as written (see [`Rec::given_written`]).
fn written(r: &Rec) -> Option<&str> {
    r.given_written.as_deref().or(r.given.as_deref())
}

/// Whether `x` is the initial of `y`.
fn is_initial_of(x: &str, y: &str) -> bool {
    x.len() == 1 && y.len() > 1 && y.starts_with(x)
}

/// The given-name level of two standardized given names (not swapped).
fn given_level(a: &str, b: &str) -> u8 {
    match name_level(a, b) {
        0 if is_initial_of(a, b) || is_initial_of(b, a) => GIVEN_INITIAL,
        0 => GIVEN_DIFFERENT,
        k => k + GIVEN_SWAPPED,
    }
}

fn both<'a>(a: &'a Option<String>, b: &'a Option<String>) -> Option<(&'a str, &'a str)> {
    Some((a.as_deref()?, b.as_deref()?))
}

fn name_level(a: &str, b: &str) -> u8 {
    if a == b {
        3
    } else {
        let jw = jaro_winkler(a, b);
        if jw >= 0.92 {
            2
        } else if jw >= 0.80 {
            1
        } else {
            0
        }
    }
}

/// Compares two records field by field.
/// Birth-date level of two full dates: 3 equal, 2 day and month swapped,
/// 1 two of year, month and day equal, 0 otherwise.
fn birth_level(x: NaiveDate, y: NaiveDate) -> u8 {
    if x == y {
        3
    } else if x.year() == y.year() && x.month() == y.day() && x.day() == y.month() {
        2
    } else if [
        x.year() == y.year(),
        x.month() == y.month(),
        x.day() == y.day(),
    ]
    .iter()
    .filter(|s| **s)
    .count()
        == 2
    {
        1
    } else {
        0
    }
}

pub fn compare(a: &Rec, b: &Rec) -> Levels {
    let mut l: Levels = [None; FIELDS.len()];
    l[0] = both(&a.given, &b.given).map(|(x, y)| {
        let level = given_level(x, y);
        match (written(a), written(b)) {
            (Some(wa), Some(wb)) if a.given_written.is_some() || b.given_written.is_some() => {
                level.max(given_level(wa, wb))
            }
            _ => level,
        }
    });
    l[1] = both(&a.family, &b.family).map(|(x, y)| name_level(x, y));
    // Given and family names entered in each other's field. A given name
    // is standardized to its first word: compare first words too
    // (`okonkwo lind` entered as the given name becomes `okonkwo`), and an
    // initial on one side.
    let first = |x: &str| x.split(' ').next().unwrap_or(x).to_string();
    let alike = |x: &str, y: &str| {
        name_level(x, y) >= 2
            || name_level(&first(x), &first(y)) >= 2
            || is_initial_of(x, y)
            || is_initial_of(y, x)
    };
    if let (Some((ag, bf)), Some((af, bg))) = (both(&a.given, &b.family), both(&a.family, &b.given))
        && l[0].is_none_or(|k| k <= GIVEN_SWAPPED + 1)
    {
        match (alike(ag, bf), alike(af, bg)) {
            // Swapped: the swap is the evidence of both names.
            (true, true) => {
                l[0] = Some(GIVEN_SWAPPED);
                l[1] = None;
            }
            // One name crossed over, the other differs: swapped and a
            // name changed (a married name), or twins, one entered family
            // name first. The family level compares what is left.
            (true, false) | (false, true) if l[0] == Some(GIVEN_DIFFERENT) => {
                l[0] = Some(GIVEN_CROSSED);
                l[1] = Some(if alike(ag, bf) {
                    name_level(af, bg)
                } else {
                    name_level(ag, bf)
                });
            }
            _ => {}
        }
    }
    l[2] = match (a.birth, b.birth) {
        (Some(x), Some(y)) => Some(birth_level(x, y)),
        // A partial birth date agrees at most partly: its year (and month,
        // where both show one).
        _ => a
            .birth_year_month()
            .zip(b.birth_year_month())
            .map(|((ya, ma), (yb, mb))| {
                let months_agree = ma.zip(mb).is_none_or(|(x, y)| x == y);
                u8::from(ya == yb && months_agree)
            }),
    };
    l[3] = both(&a.sex, &b.sex).map(|(x, y)| u8::from(x == y));
    l[4] = both(&a.zip, &b.zip).map(|(x, y)| {
        if x == y {
            2
        } else if x[..3] == y[..3] {
            1
        } else {
            0
        }
    });
    l[5] = both(&a.phone, &b.phone).map(|(x, y)| u8::from(x == y));
    l[6] = both(&a.email, &b.email).map(|(x, y)| u8::from(x == y));
    l[7] = both(&a.ssn, &b.ssn).map(|(x, y)| {
        if x == y {
            2
        } else if levenshtein(x, y) <= 1 || transposed(x, y) {
            1
        } else {
            0
        }
    });
    l[8] = both(&a.address, &b.address).map(|(x, y)| {
        if x == y {
            2
        } else if jaro_winkler(x, y) >= 0.90 {
            1
        } else {
            0
        }
    });
    l
}

/// Two strings equal but for one swap of adjacent characters.
fn transposed(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    diff.len() == 2
        && diff[1] == diff[0] + 1
        && a[diff[0]] == b[diff[1]]
        && a[diff[1]] == b[diff[0]]
}

/// Fitted model: m and u per field and level, the prior match probability
/// among blocked pairs, and name frequencies for the term-frequency
/// adjustment of exact name matches.
#[derive(Debug, Clone)]
pub struct Model {
    pub m: Vec<Vec<f64>>,
    pub u: Vec<Vec<f64>>,
    pub prior: f64,
    pub iterations: usize,
    given_tf: HashMap<String, f64>,
    family_tf: HashMap<String, f64>,
}

const FLOOR: f64 = 1e-6;

impl Model {
    /// Fits the model the way Splink does, without labels: u from
    /// `u_pairs` random record pairs; m by expectation–maximisation over the
    /// blocked pairs, in one session per kind of blocking rule, where the
    /// fields a session was blocked on are left out (they agree by
    /// construction): `dob_pairs` (agreeing on the birth date) give m for
    /// every field but the birth date, `name_pairs` (agreeing on given name,
    /// family-name Soundex and birth year) the birth date's. The prior is the share of matches among all record pairs:
    /// the matches EM finds among `dob_pairs` over every possible pair.
    pub fn fit(
        recs: &[Rec],
        dob_pairs: &[(u32, u32)],
        name_pairs: &[(u32, u32)],
        u_pairs: usize,
        seed: u64,
    ) -> Model {
        let u = estimate_u(recs, u_pairs, seed);
        let levels = |pairs: &[(u32, u32)]| -> Vec<Levels> {
            pairs
                .par_iter()
                .map(|&(a, b)| compare(&recs[a as usize], &recs[b as usize]))
                .collect()
        };
        const BIRTH: usize = 2;
        let (mut m, dob_share, it_a) = em(&levels(dob_pairs), &u, &[BIRTH]);
        let (m_names, _, it_b) = em(&levels(name_pairs), &u, &[0, 1]);
        if !name_pairs.is_empty() {
            m[BIRTH] = m_names[BIRTH].clone();
        }
        let n = recs.len() as f64;
        let all_pairs = (n * (n - 1.0) / 2.0).max(1.0);
        let prior = (dob_share * dob_pairs.len() as f64 / all_pairs).clamp(1e-12, 0.5);
        let tf = |get: fn(&Rec) -> &Option<String>| {
            let mut counts: HashMap<String, f64> = HashMap::new();
            let mut n: f64 = 0.0;
            for r in recs {
                if let Some(v) = get(r) {
                    *counts.entry(v.clone()).or_default() += 1.0;
                    n += 1.0;
                }
            }
            counts.values_mut().for_each(|c| *c /= n.max(1.0));
            counts
        };
        Model {
            m,
            u,
            prior,
            iterations: it_a + it_b,
            given_tf: tf(|r| &r.given),
            family_tf: tf(|r| &r.family),
        }
    }

    /// Log2 of the prior odds of a match (the weight of a pair before any
    /// field is compared).
    pub fn prior_weight(&self) -> f64 {
        (self.prior / (1.0 - self.prior)).log2()
    }

    /// Each field's m and u at its level and its log2 Bayes factor; `None`
    /// where the pair has no evidence. An exact name match weighs by how
    /// rare the name is (its frequency as u), not by the average name.
    pub fn contributions(
        &self,
        a: &Rec,
        levels: &Levels,
    ) -> [Option<(f64, f64, f64)>; FIELDS.len()] {
        let mut out = [None; FIELDS.len()];
        for (f, level) in levels.iter().enumerate() {
            let Some(k) = *level else { continue };
            let k = k as usize;
            let mut u = self.u[f][k];
            if k == FIELDS[f].1 - 1 {
                let tf = match f {
                    0 => a.given.as_ref().and_then(|g| self.given_tf.get(g)),
                    1 => a.family.as_ref().and_then(|g| self.family_tf.get(g)),
                    _ => None,
                };
                if let Some(tf) = tf {
                    u = *tf;
                }
            }
            let m = self.m[f][k];
            out[f] = Some((m, u, (m.max(FLOOR) / u.max(FLOOR)).log2()));
        }
        out
    }

    /// Match weight (log2 Bayes factor plus prior odds) of a pair with its
    /// comparison levels (`compare(a, b)`).
    pub fn weight(&self, a: &Rec, levels: &Levels) -> f64 {
        self.prior_weight()
            + self
                .contributions(a, levels)
                .iter()
                .flatten()
                .map(|c| c.2)
                .sum::<f64>()
    }
}

/// What each level of each field of [`FIELDS`] means, lowest first.
pub const LEVEL_NAMES: [&[&str]; FIELDS.len()] = [
    &[
        "different",
        "initial",
        "one name crossed over to the other field",
        "swapped with family name",
        "similar (JW >= 0.80)",
        "close (JW >= 0.92)",
        "exact",
    ],
    &[
        "different",
        "similar (JW >= 0.80)",
        "close (JW >= 0.92)",
        "exact",
    ],
    &[
        "different",
        "one of year, month, day differs",
        "day and month swapped",
        "exact",
    ],
    &["different", "same"],
    &["different", "same first 3 characters", "exact"],
    &["different", "same"],
    &["different", "same"],
    &["different", "one typo or transposition", "exact"],
    &["different", "close (JW >= 0.90)", "exact"],
];

/// Pairs per unit of parallel work in [`em`].
const EM_CHUNK: usize = 8192;

/// Expectation–maximisation of m and the match share over `levels` with u
/// held fixed; fields in `skip` neither inform the posterior nor get an m
/// (their initial value is returned).
fn em(levels: &[Levels], u: &[Vec<f64>], skip: &[usize]) -> (Vec<Vec<f64>>, f64, usize) {
    let mut m: Vec<Vec<f64>> = FIELDS
        .iter()
        .map(|(_, n)| {
            let mut v = vec![0.05 / (*n as f64 - 1.0); *n];
            v[n - 1] = 0.95;
            v
        })
        .collect();
    let mut share: f64 = 0.5;
    let empty = || {
        FIELDS
            .iter()
            .map(|(_, n)| vec![0.0; *n])
            .collect::<Vec<_>>()
    };
    let mut iterations = 0;
    while iterations < 100 && !levels.is_empty() {
        iterations += 1;
        // Sums per fixed-size chunk, added in chunk order: the same bits
        // however rayon schedules the work (a fold/reduce splits by load, so
        // its float sums, and the match weights written, varied between runs).
        let parts: Vec<(Vec<Vec<f64>>, f64)> = levels
            .par_chunks(EM_CHUNK)
            .map(|chunk| {
                let (mut acc, mut tp) = (empty(), 0.0);
                for l in chunk {
                    let (mut lm, mut lu) = (share.ln(), (1.0 - share).ln());
                    for (f, level) in l.iter().enumerate() {
                        if let (Some(k), false) = (level, skip.contains(&f)) {
                            lm += m[f][*k as usize].max(FLOOR).ln();
                            lu += u[f][*k as usize].max(FLOOR).ln();
                        }
                    }
                    let p = 1.0 / (1.0 + (lu - lm).exp());
                    for (f, level) in l.iter().enumerate() {
                        if let Some(k) = level {
                            acc[f][*k as usize] += p;
                        }
                    }
                    tp += p;
                }
                (acc, tp)
            })
            .collect();
        let (mut sums, mut total_p) = (empty(), 0.0);
        for (part, tp) in parts {
            for (x, y) in sums.iter_mut().zip(&part) {
                for (p, q) in x.iter_mut().zip(y) {
                    *p += q;
                }
            }
            total_p += tp;
        }
        let mut change: f64 = 0.0;
        for (f, counts) in sums.iter().enumerate() {
            if skip.contains(&f) {
                continue;
            }
            let t: f64 = counts.iter().sum();
            for (k, c) in counts.iter().enumerate() {
                let v = ((c + 0.5) / (t + 0.5 * counts.len() as f64)).max(FLOOR);
                change = change.max((v - m[f][k]).abs());
                m[f][k] = v;
            }
        }
        let new_share = (total_p / levels.len() as f64).clamp(1e-6, 1.0 - 1e-6);
        change = change.max((new_share - share).abs());
        share = new_share;
        if change < 1e-6 {
            break;
        }
    }
    (m, share, iterations)
}

/// Match probability of a weight.
pub fn probability(weight: f64) -> f64 {
    1.0 / (1.0 + 2f64.powf(-weight))
}

/// u: level frequencies among random pairs (nearly all non-matches); every
/// pair when there are no more than `pairs` of them.
fn estimate_u(recs: &[Rec], pairs: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut counts: Vec<Vec<f64>> = FIELDS.iter().map(|(_, n)| vec![0.5; *n]).collect();
    let n = recs.len();
    let mut add = |a: usize, b: usize| {
        for (f, level) in compare(&recs[a], &recs[b]).iter().enumerate() {
            if let Some(k) = level {
                counts[f][*k as usize] += 1.0;
            }
        }
    };
    if n * n.saturating_sub(1) / 2 <= pairs {
        for a in 0..n {
            for b in a + 1..n {
                add(a, b);
            }
        }
    } else {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..pairs {
            let (a, b) = (r.random_range(0..n), r.random_range(0..n));
            if a != b {
                add(a, b);
            }
        }
    }
    counts
        .into_iter()
        .map(|c| {
            let t: f64 = c.iter().sum();
            c.into_iter().map(|x| x / t).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(given: &str, family: &str, birth: &str, ssn: Option<&str>) -> Rec {
        Rec {
            given: Some(given.into()),
            family: Some(family.into()),
            birth: NaiveDate::parse_from_str(birth, "%Y-%m-%d").ok(),
            sex: Some("female".into()),
            ssn: ssn.map(str::to_string),
            ..Rec::default()
        }
    }

    #[test]
    fn a_partial_birth_date_agrees_on_what_it_shows() {
        let full = rec("ann", "lee", "1970-05-12", None);
        let partial = |y: i32, m: Option<u32>| Rec {
            birth: None,
            birth_partial: Some((y, m)),
            ..rec("ann", "lee", "", None)
        };
        assert_eq!(compare(&full, &partial(1970, Some(5)))[2], Some(1));
        assert_eq!(compare(&full, &partial(1970, None))[2], Some(1));
        assert_eq!(compare(&full, &partial(1970, Some(6)))[2], Some(0));
        assert_eq!(compare(&partial(1971, None), &full)[2], Some(0));
        assert_eq!(
            compare(&partial(1970, None), &partial(1970, Some(1)))[2],
            Some(1)
        );
        let unknown = rec("ann", "lee", "", None);
        assert_eq!(compare(&full, &unknown)[2], None);
        assert_eq!(partial(1970, None).birth_year(), Some(1970));
    }

    #[test]
    fn levels_grade_each_field() {
        let a = rec("elizabeth", "jackson", "1977-07-05", Some("123456780"));
        let b = rec("elizabeht", "jackson", "1977-05-07", Some("123456708"));
        let l = compare(&a, &b);
        assert_eq!(l[0], Some(5), "typo: close");
        assert_eq!(l[1], Some(3));
        assert_eq!(l[2], Some(2), "day and month swapped");
        assert_eq!(l[7], Some(1), "transposed digits");
        assert_eq!(l[5], None, "no phone on either side: no evidence");
        assert!(transposed("ab", "ba") && !transposed("abc", "cba"));

        // Swapped given and family names: one level, the family left out.
        let swapped = rec("jackson", "elizabeth", "1977-07-05", None);
        let l = compare(&a, &swapped);
        assert_eq!((l[0], l[1]), (Some(GIVEN_SWAPPED), None));
        // An initial, and a name that has nothing in common.
        assert_eq!(
            compare(&a, &rec("e", "jackson", "1977-07-05", None))[0],
            Some(GIVEN_INITIAL)
        );
        assert_eq!(
            compare(&a, &rec("aisha", "jackson", "1977-07-05", None))[0],
            Some(GIVEN_DIFFERENT)
        );
        assert_eq!(compare(&a, &a)[0], Some(6), "exact is the highest level");

        // Swapped, and the family name changed (married) on one side: the
        // given name is the swap's evidence, the family level compares the
        // rest.
        let married = rec("hughes", "elizabeth", "1977-07-05", None);
        assert_eq!(
            (compare(&a, &married)[0], compare(&a, &married)[1]),
            (Some(GIVEN_CROSSED), Some(0))
        );
        // Swapped, with an initial: `e jackson` vs `jackson elizabeth`.
        let l = compare(&rec("e", "jackson", "1977-07-05", None), &swapped);
        assert_eq!((l[0], l[1]), (Some(GIVEN_SWAPPED), None));
        // Twins: nothing crosses over.
        assert_eq!(
            compare(&a, &rec("olivia", "jackson", "1977-07-05", None))[0],
            Some(GIVEN_DIFFERENT)
        );

        // A typo in a nickname is compared as written: `betyt` (no
        // nickname) and `betty` (→ elizabeth).
        let mut betty = rec("elizabeth", "duncan", "1981-04-27", None);
        betty.given_written = Some("betty".into());
        let l = compare(&rec("betyt", "duncan", "1981-04-27", None), &betty);
        assert_eq!(l[0], Some(5), "JW(betyt, betty) >= 0.92");
    }

    /// The fitted m and match share are the same bits however many threads
    /// do the work (they are written as match weights; a re-run must write
    /// identical files).
    #[test]
    fn em_does_not_depend_on_thread_scheduling() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        let levels: Vec<Levels> = (0..40_000)
            .map(|_| {
                let mut l: Levels = [None; FIELDS.len()];
                for (f, (_, n)) in FIELDS.iter().enumerate() {
                    let r = next();
                    // Most pairs disagree; some agree fully; some lack a field.
                    l[f] = match r % 10 {
                        0 => None,
                        1..=2 => Some((n - 1) as u8),
                        _ => Some(((r / 10) % n) as u8),
                    };
                }
                l
            })
            .collect();
        let u: Vec<Vec<f64>> = FIELDS
            .iter()
            .map(|(_, n)| vec![1.0 / *n as f64; *n])
            .collect();
        let fit = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (m, share, it) = pool.install(|| em(&levels, &u, &[2]));
            let bits: Vec<u64> = m.iter().flatten().map(|x| x.to_bits()).collect();
            (bits, share.to_bits(), it)
        };
        let one = fit(1);
        assert!(one.2 > 1, "EM iterated");
        for threads in [2, 8] {
            assert_eq!(fit(threads), one, "{threads} threads");
        }
    }
}
