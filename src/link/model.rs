//! Fellegi–Sunter record comparison: comparisons declared per field as
//! ordered levels ([`Comparison`], `[[link.comparison]]` in the config), u
//! probabilities from random pairs, m probabilities and the match prior by
//! expectation–maximisation over the blocked pairs (no labels),
//! term-frequency adjusted weights, and a household level for pairs that
//! differ only in the given name (twins, siblings).

use ahash::AHashMap as HashMap;
use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDate};
use compact_str::CompactString;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use strsim::{damerau_levenshtein, jaro_winkler};

/// One standardized source patient record.
#[derive(Debug, Clone, Default)]
pub struct Rec {
    pub source: CompactString,
    pub source_patient_id: CompactString,
    pub given: Option<CompactString>,
    /// The given name as written when `given` is a nickname's full name
    /// (`betty` for `elizabeth`), so that a typo in a nickname (`betyt`)
    /// is still compared with it; `None` otherwise.
    pub given_written: Option<CompactString>,
    pub family: Option<CompactString>,
    /// Soundex of `family` (a blocking key).
    pub family_soundex: Option<CompactString>,
    pub birth: Option<NaiveDate>,
    /// Year and month (when known) of a birth date too partial or garbled
    /// to use (`1970-05`, `19450493`); `None` when `birth` is known.
    pub birth_partial: Option<(i32, Option<u32>)>,
    pub sex: Option<CompactString>,
    pub zip: Option<CompactString>,
    pub phone: Option<CompactString>,
    pub email: Option<CompactString>,
    pub ssn: Option<CompactString>,
    pub address: Option<CompactString>,
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

    /// The standardized text of a column (`None` for the birth date, which
    /// is a date, and where the record has no value).
    pub fn value(&self, column: Column) -> Option<&str> {
        match column {
            Column::GivenName => self.given.as_deref(),
            Column::FamilyName => self.family.as_deref(),
            Column::BirthDate => None,
            Column::Sex => self.sex.as_deref(),
            Column::Zip => self.zip.as_deref(),
            Column::Phone => self.phone.as_deref(),
            Column::Email => self.email.as_deref(),
            Column::Identifier => self.ssn.as_deref(),
            Column::Address => self.address.as_deref(),
        }
    }

    /// Whether the record has a value for `column` (a partial birth date
    /// counts).
    pub fn has(&self, column: Column) -> bool {
        match column {
            Column::BirthDate => self.birth.is_some() || self.birth_partial.is_some(),
            c => self.value(c).is_some(),
        }
    }
}

/// A standardized column of the patient record that a comparison reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Column {
    GivenName,
    FamilyName,
    BirthDate,
    Sex,
    Zip,
    Phone,
    Email,
    Identifier,
    Address,
}

impl Column {
    pub const ALL: [Column; 9] = [
        Column::GivenName,
        Column::FamilyName,
        Column::BirthDate,
        Column::Sex,
        Column::Zip,
        Column::Phone,
        Column::Email,
        Column::Identifier,
        Column::Address,
    ];

    /// The column's name in the config and the link report.
    pub fn name(self) -> &'static str {
        match self {
            Column::GivenName => "given_name",
            Column::FamilyName => "family_name",
            Column::BirthDate => "birth_date",
            Column::Sex => "sex",
            Column::Zip => "zip",
            Column::Phone => "phone",
            Column::Email => "email",
            Column::Identifier => "identifier",
            Column::Address => "address",
        }
    }

    pub fn parse(name: &str) -> Option<Column> {
        Column::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Household members share it, so its agreement is no evidence within
    /// the household level.
    fn shared_by_household(self) -> bool {
        matches!(self, Column::Zip | Column::Phone | Column::Address)
    }
}

/// One test a comparison level makes of two values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    /// `exact`: the standardized values are equal.
    Exact,
    /// `jaro_winkler >= X`.
    JaroWinkler(f64),
    /// `damerau_levenshtein <= N`: at most N edits (an adjacent
    /// transposition is one).
    DamerauLevenshtein(usize),
    /// `prefix N`: the first N characters are equal.
    Prefix(usize),
    /// `within X`: both are numbers at most X apart.
    Within(f64),
    /// `initial` (names): one is the other's first letter.
    Initial,
    /// `swapped` (given_name): given and family names were entered in each
    /// other's field; the family comparison is then left out (the swap is
    /// the evidence of both).
    Swapped,
    /// `crossed` (given_name): one name crossed over to the other field and
    /// the other differs (a swap and a married name, or a twin entered
    /// family name first); the family comparison compares what is left.
    Crossed,
    /// `day_month_swapped` (birth_date).
    DayMonthSwapped,
    /// `one_part_differs` (birth_date): two of year, month and day agree.
    OnePartDiffers,
    /// `within N days` / `within N years` (birth_date), as days.
    WithinDays(i64),
    /// `partial` (birth_date): one date is partial (a year, or a year and
    /// month) and agrees with what it shows.
    Partial,
}

impl Condition {
    fn parse(text: &str, column: Column) -> Result<Condition, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let number = |w: &str| {
            w.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("'{w}' is not a non-negative number"))
        };
        let whole = |w: &str| {
            w.parse::<usize>()
                .map_err(|_| format!("'{w}' is not a whole number"))
        };
        let date = column == Column::BirthDate;
        let name = matches!(column, Column::GivenName | Column::FamilyName);
        let condition = match words.as_slice() {
            ["exact"] => Condition::Exact,
            ["jaro_winkler", ">=", x] if !date => {
                let x = number(x)?;
                if x > 1.0 {
                    return Err("a Jaro–Winkler similarity is at most 1".into());
                }
                Condition::JaroWinkler(x)
            }
            ["damerau_levenshtein", "<=", n] if !date => Condition::DamerauLevenshtein(whole(n)?),
            ["prefix", n] if !date => match whole(n)? {
                0 => return Err("a prefix has at least 1 character".into()),
                n => Condition::Prefix(n),
            },
            ["within", x] if !date => Condition::Within(number(x)?),
            ["initial"] if name => Condition::Initial,
            ["swapped"] if column == Column::GivenName => Condition::Swapped,
            ["crossed"] if column == Column::GivenName => Condition::Crossed,
            ["day_month_swapped"] if date => Condition::DayMonthSwapped,
            ["one_part_differs"] if date => Condition::OnePartDiffers,
            ["partial"] if date => Condition::Partial,
            ["within", n, unit @ ("days" | "years")] if date => {
                // More than any two birth dates lie apart is "any".
                let n = i64::try_from(whole(n)?).unwrap_or(i64::MAX);
                Condition::WithinDays(if *unit == "days" {
                    n
                } else {
                    n.saturating_mul(365).saturating_add(n / 4)
                })
            }
            _ => {
                return Err(format!(
                    "'{text}' is not a level of {}: use {}",
                    column.name(),
                    if date {
                        "exact, day_month_swapped, one_part_differs, partial, \
                         within N days, within N years"
                    } else if column == Column::GivenName {
                        "exact, jaro_winkler >= X, damerau_levenshtein <= N, prefix N, \
                         within X, initial, swapped, crossed"
                    } else if name {
                        "exact, jaro_winkler >= X, damerau_levenshtein <= N, prefix N, \
                         within X, initial"
                    } else {
                        "exact, jaro_winkler >= X, damerau_levenshtein <= N, prefix N, within X"
                    }
                ));
            }
        };
        Ok(condition)
    }

    /// Whether two standardized text values satisfy the condition (`jw`
    /// caches their Jaro–Winkler similarity across levels).
    fn holds(self, x: &str, y: &str, jw: &mut Option<f64>) -> bool {
        match self {
            Condition::Exact => x == y,
            Condition::JaroWinkler(t) => *jw.get_or_insert_with(|| jaro_winkler(x, y)) >= t,
            Condition::DamerauLevenshtein(n) => damerau_levenshtein(x, y) <= n,
            Condition::Prefix(n) => {
                let (mut p, mut q) = (x.chars(), y.chars());
                (0..n).all(|_| matches!((p.next(), q.next()), (Some(a), Some(b)) if a == b))
            }
            Condition::Within(t) => match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(a), Ok(b)) => (a - b).abs() <= t,
                _ => false,
            },
            Condition::Initial => is_initial_of(x, y) || is_initial_of(y, x),
            _ => false,
        }
    }

    /// Whether two birth dates, full or partial, satisfy the condition.
    fn holds_for_dates(self, a: &Rec, b: &Rec) -> bool {
        match (self, a.birth.zip(b.birth)) {
            (Condition::Exact, Some((x, y))) => x == y,
            (Condition::DayMonthSwapped, Some((x, y))) => {
                x.year() == y.year() && x.month() == y.day() && x.day() == y.month()
            }
            (Condition::OnePartDiffers, Some((x, y))) => {
                [
                    x.year() == y.year(),
                    x.month() == y.month(),
                    x.day() == y.day(),
                ]
                .iter()
                .filter(|s| **s)
                .count()
                    == 2
            }
            (Condition::WithinDays(n), Some((x, y))) => (x - y).num_days().abs() <= n,
            (Condition::Partial, None) => {
                a.birth_year_month().zip(b.birth_year_month()).is_some_and(
                    |((ya, ma), (yb, mb))| ya == yb && ma.zip(mb).is_none_or(|(x, y)| x == y),
                )
            }
            _ => false,
        }
    }
}

/// One level of a comparison: its conditions, any of which makes it hold
/// (`"one_part_differs or partial"`), and the text it was declared with.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub label: String,
    conditions: Vec<Condition>,
}

/// How a field is compared: its levels, highest first, the first that holds
/// giving the pair's level (none: "different", level 0); and whether an
/// exact agreement weighs by how rare the value is (term-frequency
/// adjustment) rather than by the average value.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub column: Column,
    /// Highest first, as declared.
    pub levels: Vec<Level>,
    pub term_frequency: bool,
}

/// At most this many levels per comparison (levels are bytes; EM needs
/// pairs in every level to estimate them).
pub const MAX_LEVELS: usize = 12;

impl Comparison {
    /// A comparison of `column` with `levels`, highest first. Returns what
    /// is wrong with the declaration.
    pub fn new(column: Column, levels: &[&str], term_frequency: bool) -> Result<Self, String> {
        if levels.is_empty() || levels.len() > MAX_LEVELS {
            return Err(format!("give 1 to {MAX_LEVELS} levels"));
        }
        let levels = levels
            .iter()
            .map(|text| {
                Ok(Level {
                    label: text.trim().to_string(),
                    conditions: text
                        .split(" or ")
                        .map(|c| Condition::parse(c, column))
                        .collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if term_frequency && (column == Column::BirthDate || levels[0].label != "exact") {
            return Err(
                "term_frequency adjusts an exact agreement of text: the first level must be \
                 exact, and the column not birth_date"
                    .into(),
            );
        }
        Ok(Comparison {
            column,
            levels,
            term_frequency,
        })
    }

    /// Number of levels, "different" included.
    pub fn level_count(&self) -> usize {
        self.levels.len() + 1
    }

    /// What level `k` means (0: different).
    pub fn level_name(&self, k: u8) -> &str {
        match k {
            0 => "different",
            k => &self.levels[self.levels.len() - k as usize].label,
        }
    }

    /// The level of the first declared level whose condition holds (0:
    /// none).
    fn first_holding(&self, mut holds: impl FnMut(Condition) -> bool) -> u8 {
        self.levels
            .iter()
            .position(|l| l.conditions.iter().any(|c| holds(*c)))
            .map_or(0, |p| (self.levels.len() - p) as u8)
    }

    /// The level of two text values.
    fn text_level(&self, x: &str, y: &str) -> u8 {
        let mut jw = None;
        self.first_holding(|c| c.holds(x, y, &mut jw))
    }

    /// Whether level `k` is (or includes) the given condition.
    fn level_has(&self, k: u8, condition: Condition) -> bool {
        k > 0
            && self.levels[self.levels.len() - k as usize]
                .conditions
                .contains(&condition)
    }
}

/// Ward's comparisons (`[[link.comparison]]` replaces them column by
/// column).
pub fn default_comparisons() -> Vec<Comparison> {
    let c = |column, levels: &[&str], tf| Comparison::new(column, levels, tf).expect("valid");
    vec![
        c(
            Column::GivenName,
            &[
                "exact",
                "jaro_winkler >= 0.92",
                "jaro_winkler >= 0.80",
                "swapped",
                "initial",
                "crossed",
            ],
            true,
        ),
        c(
            Column::FamilyName,
            &["exact", "jaro_winkler >= 0.92", "jaro_winkler >= 0.80"],
            true,
        ),
        c(
            Column::BirthDate,
            &["exact", "day_month_swapped", "one_part_differs or partial"],
            false,
        ),
        c(Column::Sex, &["exact"], false),
        c(Column::Zip, &["exact", "prefix 3"], false),
        c(Column::Phone, &["exact"], false),
        c(Column::Email, &["exact"], false),
        c(
            Column::Identifier,
            &["exact", "damerau_levenshtein <= 1"],
            false,
        ),
        c(Column::Address, &["exact", "jaro_winkler >= 0.90"], false),
    ]
}

/// Comparison vector of a pair: a level per comparison (in declared order),
/// `None` when either side is missing (no evidence either way).
pub type Levels = [Option<u8>; Column::ALL.len()];

/// The given name to compare as written (see [`Rec::given_written`]).
fn written(r: &Rec) -> Option<&str> {
    r.given_written.as_deref().or(r.given.as_deref())
}

/// Whether `x` is the initial of `y`.
fn is_initial_of(x: &str, y: &str) -> bool {
    x.len() == 1 && y.len() > 1 && y.starts_with(x)
}

fn both<'a>(a: Option<&'a str>, b: Option<&'a str>) -> Option<(&'a str, &'a str)> {
    Some((a?, b?))
}

/// Two names alike enough to be one name crossed over between fields:
/// Jaro–Winkler ≥ 0.92 (also of their first words: `okonkwo lind` entered
/// as a given name becomes `okonkwo`), or one the other's initial.
fn alike(x: &str, y: &str) -> bool {
    fn first(x: &str) -> &str {
        x.split(' ').next().unwrap_or(x)
    }
    x == y
        || jaro_winkler(x, y) >= 0.92
        || jaro_winkler(first(x), first(y)) >= 0.92
        || is_initial_of(x, y)
        || is_initial_of(y, x)
}

/// The given-name level, and what the family comparison then compares:
/// `None` to compare the family names as they are, `Some(None)` to leave
/// them out (swapped), `Some(Some(pair))` the names left after one crossed
/// over.
fn given_level<'a>(
    c: &Comparison,
    a: &'a Rec,
    b: &'a Rec,
) -> (u8, Option<Option<(&'a str, &'a str)>>) {
    let (Some(x), Some(y)) = (a.given.as_deref(), b.given.as_deref()) else {
        unreachable!("called with both given names")
    };
    let nickname = (a.given_written.is_some() || b.given_written.is_some())
        .then(|| both(written(a), written(b)))
        .flatten();
    // Which names crossed over (given of one ~ family of the other), when
    // all four are known; computed once, when a level asks.
    let cross = std::cell::OnceCell::new();
    let crossing = || {
        *cross.get_or_init(|| {
            both(a.family.as_deref(), b.family.as_deref())
                .map(|(af, bf)| (alike(x, bf), alike(af, y), af, bf))
        })
    };
    let (mut jw, mut jw_written) = (None, None);
    let level = c.first_holding(|cond| match cond {
        Condition::Swapped => crossing().is_some_and(|(p, q, ..)| p && q),
        Condition::Crossed => crossing().is_some_and(|(p, q, ..)| p != q),
        _ => {
            cond.holds(x, y, &mut jw)
                || nickname.is_some_and(|(wx, wy)| cond.holds(wx, wy, &mut jw_written))
        }
    });
    let family = if c.level_has(level, Condition::Swapped) {
        Some(None)
    } else if c.level_has(level, Condition::Crossed) {
        crossing()
            .map(|(given_crossed, _, af, bf)| Some(if given_crossed { (af, y) } else { (x, bf) }))
    } else {
        None
    };
    (level, family)
}

/// Compares two records with each comparison.
pub fn compare(comparisons: &[Comparison], a: &Rec, b: &Rec) -> Levels {
    let mut l: Levels = [None; Column::ALL.len()];
    let mut family = None;
    for (i, c) in comparisons.iter().enumerate() {
        if c.column == Column::GivenName && a.given.is_some() && b.given.is_some() {
            let (level, f) = given_level(c, a, b);
            l[i] = Some(level);
            family = f;
        }
    }
    for (i, c) in comparisons.iter().enumerate() {
        l[i] = match c.column {
            Column::GivenName => l[i],
            Column::FamilyName => family
                .unwrap_or_else(|| both(a.family.as_deref(), b.family.as_deref()))
                .map(|(x, y)| c.text_level(x, y)),
            Column::BirthDate => (a.has(Column::BirthDate) && b.has(Column::BirthDate))
                .then(|| c.first_holding(|cond| cond.holds_for_dates(a, b))),
            col => both(a.value(col), b.value(col)).map(|(x, y)| c.text_level(x, y)),
        };
    }
    l
}

/// Which comparisons play a part in the household level, and the levels
/// that make it.
#[derive(Debug, Clone, Default)]
struct Household {
    given: usize,
    family: Option<usize>,
    birth: usize,
    /// The given-name level of a crossed name (its family comparison
    /// compares what is left, which may differ).
    crossed: Option<u8>,
    /// Comparisons of columns household members share.
    shared: Vec<usize>,
    /// Those that place two people in one household (address, phone; a
    /// postcode is shared by a neighbourhood).
    contact: Vec<usize>,
}

impl Household {
    /// The household roles of `comparisons`; `None` when the given name or
    /// the birth date is not compared.
    fn of(comparisons: &[Comparison]) -> Option<Household> {
        let find = |col| comparisons.iter().position(|c| c.column == col);
        let (given, birth) = (find(Column::GivenName)?, find(Column::BirthDate)?);
        let given_c = &comparisons[given];
        let family = find(Column::FamilyName);
        Some(Household {
            given,
            family,
            birth,
            crossed: (1..given_c.level_count() as u8)
                .find(|k| given_c.level_has(*k, Condition::Crossed)),
            shared: comparisons
                .iter()
                .enumerate()
                .filter(|(_, c)| c.column.shared_by_household())
                .map(|(i, _)| i)
                .collect(),
            contact: comparisons
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c.column, Column::Address | Column::Phone))
                .map(|(i, _)| i)
                .collect(),
        })
    }

    /// Whether a pair shows the household pattern: the given names differ
    /// (or one crossed over), the family name, the address or the phone
    /// agrees at some level (twins, one perhaps married), and the birth date
    /// agrees at some level or is missing (twins, a twin's birth date with
    /// a typo; siblings born apart are weighed field by field, where the
    /// birth date tells them apart).
    fn holds(&self, l: &Levels) -> bool {
        let crossed = l[self.given].is_some() && l[self.given] == self.crossed;
        let together = self
            .family
            .iter()
            .chain(&self.contact)
            .any(|f| l[*f].is_some_and(|k| k > 0));
        (l[self.given] == Some(0) && together || crossed) && l[self.birth] != Some(0)
    }

    /// The comparisons the household level stands for in a pair.
    fn covers(&self, f: usize) -> bool {
        f == self.given || Some(f) == self.family || f == self.birth || self.shared.contains(&f)
    }
}

/// Fitted model: the comparisons, m and u per comparison and level, the
/// prior match probability among all record pairs, the household level's
/// u, and value frequencies for term-frequency adjustment.
#[derive(Debug, Clone)]
pub struct Model {
    pub comparisons: Vec<Comparison>,
    pub m: Vec<Vec<f64>>,
    pub u: Vec<Vec<f64>>,
    pub prior: f64,
    pub iterations: usize,
    /// Candidate pairs that show the household pattern (see
    /// [`Model::is_household`]).
    pub household_pairs: u64,
    /// The share of matches among them.
    pub household_match_share: f64,
    /// The household roles and the level's m and u; `None` when it is off.
    household: Option<(Household, f64, f64)>,
    tf: Vec<Option<HashMap<String, f64>>>,
}

const FLOOR: f64 = 1e-6;

impl Model {
    /// Fits the model the way Splink does, without labels: u from
    /// `u_pairs` random record pairs; m by expectation–maximisation over the
    /// blocked pairs, in one session per kind of blocking rule, where the
    /// fields a session was blocked on are left out (they agree by
    /// construction): `dob_levels` (the comparison levels of the candidate
    /// pairs agreeing on the birth date) give m for every field but the
    /// birth date, `name_levels` (those agreeing on given name, family-name
    /// Soundex and birth year) the birth date's. The prior is the share of
    /// matches among all record pairs: the matches EM finds among the
    /// birth-date pairs over every possible pair.
    ///
    /// With `household`, pairs whose given names differ while the rest of
    /// a family agrees ([`Household::holds`]: twins, or one person whose
    /// given name was replaced) are weighed by one household level instead of field by
    /// field: those agreements are not independent within a family, and
    /// household members share address, postcode and phone too. The level's
    /// weight is learned from the candidate pairs (`candidates`: their
    /// levels) that show it: EM
    /// over them, on the fields a household does not share (sex, e-mail,
    /// identifiers), estimates the share of matches among them, π; its m is
    /// then the share of all matches that show the pattern and its u the
    /// share of all non-matches, so that the level alone gives a pair the
    /// odds π / (1 − π), and the pair's own sex, e-mail and identifiers
    /// still weigh on top. Data with twins and no identifiers learns a low
    /// π (twins often differ in sex; a person seldom does), data whose
    /// given names are replaced but whose identifiers agree a high one.
    ///
    /// Comparisons, household, `u_pairs` and seed come from `opts`.
    pub fn fit(
        recs: &[Rec],
        opts: &super::LinkOptions,
        candidates: &[Levels],
        dob_levels: &[Levels],
        name_levels: &[Levels],
    ) -> Model {
        let comparisons = opts.comparisons.as_slice();
        let u = estimate_u(recs, comparisons, opts.u_pairs, opts.seed);
        let find = |col| comparisons.iter().position(|c| c.column == col);
        let skip_birth: Vec<usize> = find(Column::BirthDate).into_iter().collect();
        let (mut m, dob_share, it_a) = em(comparisons, dob_levels, &u, &skip_birth);
        let roles = if opts.household {
            Household::of(comparisons)
        } else {
            None
        };
        let household_levels: Vec<&Levels> = roles
            .as_ref()
            .map(|h| candidates.iter().filter(|l| h.holds(l)).collect())
            .unwrap_or_default();
        let skip_names: Vec<usize> = [find(Column::GivenName), find(Column::FamilyName)]
            .into_iter()
            .flatten()
            .collect();
        let (m_names, _, it_b) = em(comparisons, name_levels, &u, &skip_names);
        if let Some(b) = find(Column::BirthDate)
            && !name_levels.is_empty()
        {
            m[b] = m_names[b].clone();
        }
        let n = recs.len() as f64;
        let all_pairs = (n * (n - 1.0) / 2.0).max(1.0);
        let prior = (dob_share * dob_levels.len() as f64 / all_pairs).clamp(1e-12, 0.5);
        let household_pairs = household_levels.len();
        let share = roles
            .as_ref()
            .map_or(0.0, |h| household_share(h, &household_levels, &m, &u));
        let household = roles.map(|h| {
            let pairs = household_pairs.max(1) as f64;
            let m = pairs * share / (prior * all_pairs);
            let u = pairs * (1.0 - share) / ((1.0 - prior) * all_pairs);
            (h, m, u)
        });
        let tf = comparisons
            .iter()
            .map(|c| {
                c.term_frequency.then(|| {
                    let mut counts: HashMap<String, f64> = HashMap::new();
                    let mut n: f64 = 0.0;
                    for v in recs.iter().filter_map(|r| r.value(c.column)) {
                        *counts.entry(v.to_string()).or_default() += 1.0;
                        n += 1.0;
                    }
                    counts.values_mut().for_each(|x| *x /= n.max(1.0));
                    counts
                })
            })
            .collect();
        Model {
            comparisons: comparisons.to_vec(),
            m,
            u,
            prior,
            iterations: it_a + it_b,
            household_pairs: household_pairs as u64,
            household_match_share: share,
            household,
            tf,
        }
    }

    /// The pair's comparison levels.
    pub fn compare(&self, a: &Rec, b: &Rec) -> Levels {
        compare(&self.comparisons, a, b)
    }

    /// Log2 of the prior odds of a match (the weight of a pair before any
    /// field is compared).
    pub fn prior_weight(&self) -> f64 {
        (self.prior / (1.0 - self.prior)).log2()
    }

    /// Whether the pair is weighed by the household level.
    pub fn is_household(&self, levels: &Levels) -> bool {
        self.household
            .as_ref()
            .is_some_and(|(h, ..)| h.holds(levels))
    }

    /// Each comparison's m and u at its level and its log2 Bayes factor
    /// (`None` where the pair has no evidence, or the household level
    /// stands for the comparison), and the household level's when the pair
    /// shows it. An exact agreement of a term-frequency adjusted field
    /// weighs by how rare the value is (its frequency as u).
    pub fn contributions(&self, a: &Rec, levels: &Levels) -> Contributions {
        let household = self.household.as_ref().filter(|(h, ..)| h.holds(levels));
        let mut fields = vec![None; self.comparisons.len()];
        for (f, c) in self.comparisons.iter().enumerate() {
            let Some(k) = levels[f] else { continue };
            if household.is_some_and(|(h, ..)| h.covers(f)) {
                continue;
            }
            let k = k as usize;
            let mut u = self.u[f][k];
            if k == c.levels.len()
                && let Some(tf) = &self.tf[f]
                && let Some(freq) = a.value(c.column).and_then(|v| tf.get(v))
            {
                u = *freq;
            }
            let m = self.m[f][k];
            fields[f] = Some((m, u, bayes_factor(m, u)));
        }
        let household = household.map(|(_, m, u)| (*m, *u, (m / u).log2()));
        Contributions { fields, household }
    }

    /// Match weight (log2 Bayes factor plus prior odds) of a pair with its
    /// comparison levels (`compare(a, b)`).
    pub fn weight(&self, a: &Rec, levels: &Levels) -> f64 {
        let c = self.contributions(a, levels);
        self.prior_weight()
            + c.fields.iter().flatten().map(|p| p.2).sum::<f64>()
            + c.household.map_or(0.0, |p| p.2)
    }
}

/// What a fitted [`Model`] is made of besides its comparisons: what the
/// linkage keeps between runs (`core/link_state.json`) so that a night
/// weighs new records with the model the earlier ones were weighed with.
/// Every number is written as text in its shortest exact form and read back
/// exactly: a kept model gives the very weights it gave when it was fitted.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelParams {
    #[serde(with = "exact::nested")]
    pub m: Vec<Vec<f64>>,
    #[serde(with = "exact::nested")]
    pub u: Vec<Vec<f64>>,
    #[serde(with = "exact::one")]
    pub prior: f64,
    pub iterations: usize,
    pub household_pairs: u64,
    #[serde(with = "exact::one")]
    pub household_match_share: f64,
    /// The household level's m and u (`None`: the level is off).
    #[serde(with = "exact::pair")]
    pub household: Option<(f64, f64)>,
    /// Per comparison, each value's frequency among the records the model
    /// was fitted on (term-frequency adjusted comparisons only).
    #[serde(with = "exact::tables")]
    pub tf: Vec<Option<BTreeMap<String, f64>>>,
}

impl Model {
    /// The model's parameters, to keep ([`Model::from_params`] restores it).
    pub fn params(&self) -> ModelParams {
        ModelParams {
            m: self.m.clone(),
            u: self.u.clone(),
            prior: self.prior,
            iterations: self.iterations,
            household_pairs: self.household_pairs,
            household_match_share: self.household_match_share,
            household: self.household.as_ref().map(|(_, m, u)| (*m, *u)),
            tf: self
                .tf
                .iter()
                .map(|t| {
                    t.as_ref()
                        .map(|t| t.iter().map(|(k, v)| (k.clone(), *v)).collect())
                })
                .collect(),
        }
    }

    /// The model of `comparisons` with kept parameters; an error says why
    /// they do not fit the comparisons (another configuration's model).
    pub fn from_params(comparisons: &[Comparison], p: ModelParams) -> Result<Model, String> {
        let shaped = |probs: &[Vec<f64>]| {
            probs.len() == comparisons.len()
                && probs
                    .iter()
                    .zip(comparisons)
                    .all(|(p, c)| p.len() == c.level_count())
        };
        if !shaped(&p.m) || !shaped(&p.u) || p.tf.len() != comparisons.len() {
            return Err("its levels are not those of the configured comparisons".into());
        }
        let household = match (p.household, Household::of(comparisons)) {
            (Some((m, u)), Some(h)) => Some((h, m, u)),
            (None, _) => None,
            (Some(_), None) => {
                return Err("it has a household level these comparisons cannot have".into());
            }
        };
        Ok(Model {
            comparisons: comparisons.to_vec(),
            m: p.m,
            u: p.u,
            prior: p.prior,
            iterations: p.iterations,
            household_pairs: p.household_pairs,
            household_match_share: p.household_match_share,
            household,
            tf: p
                .tf
                .into_iter()
                .map(|t| t.map(|t| t.into_iter().collect()))
                .collect(),
        })
    }
}

/// Serde of `f64`s as text: Rust writes the shortest form that reads back
/// to the same number and reads text correctly rounded (JSON numbers go
/// through a parser that need not be exact).
mod exact {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    fn parse<E: serde::de::Error>(text: &str) -> Result<f64, E> {
        text.parse()
            .map_err(|_| E::custom(format!("'{text}' is not a number")))
    }

    pub mod one {
        use super::*;
        pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&x.to_string())
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
            parse(&String::deserialize(d)?)
        }
    }

    pub mod nested {
        use super::*;
        pub fn serialize<S: Serializer>(x: &[Vec<f64>], s: S) -> Result<S::Ok, S::Error> {
            let text: Vec<Vec<String>> = x
                .iter()
                .map(|v| v.iter().map(f64::to_string).collect())
                .collect();
            text.serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
            Vec::<Vec<String>>::deserialize(d)?
                .iter()
                .map(|v| v.iter().map(|t| parse(t)).collect())
                .collect()
        }
    }

    pub mod pair {
        use super::*;
        pub fn serialize<S: Serializer>(x: &Option<(f64, f64)>, s: S) -> Result<S::Ok, S::Error> {
            x.map(|(a, b)| [a.to_string(), b.to_string()]).serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<(f64, f64)>, D::Error> {
            Option::<[String; 2]>::deserialize(d)?
                .map(|[a, b]| Ok((parse(&a)?, parse(&b)?)))
                .transpose()
        }
    }

    type Tables = Vec<Option<BTreeMap<String, f64>>>;

    pub mod tables {
        use super::*;
        pub fn serialize<S: Serializer>(x: &Tables, s: S) -> Result<S::Ok, S::Error> {
            let text: Vec<Option<BTreeMap<&str, String>>> = x
                .iter()
                .map(|t| {
                    t.as_ref()
                        .map(|t| t.iter().map(|(k, v)| (k.as_str(), v.to_string())).collect())
                })
                .collect();
            text.serialize(s)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Tables, D::Error> {
            Vec::<Option<BTreeMap<String, String>>>::deserialize(d)?
                .into_iter()
                .map(|t| {
                    t.map(|t| {
                        t.into_iter()
                            .map(|(k, v)| Ok((k, parse(&v)?)))
                            .collect::<Result<BTreeMap<_, _>, _>>()
                    })
                    .transpose()
                })
                .collect()
        }
    }
}

/// The share of matches among pairs showing the household pattern, by EM
/// on the comparisons the household level does not cover (their m and u
/// fitted on all pairs). A household pair is a match only on evidence: the
/// estimate starts as if [`HOUSEHOLD_PSEUDO_PAIRS`] pairs had been seen, one
/// in ten a match, which the data outweigh once there are more than a few
/// dozen pairs (a small population's handful of pairs does not decide it).
const HOUSEHOLD_PSEUDO_PAIRS: f64 = 10.0;

fn household_share(h: &Household, pairs: &[&Levels], m: &[Vec<f64>], u: &[Vec<f64>]) -> f64 {
    // Each pair's likelihood ratio on its own evidence.
    let ratios: Vec<f64> = pairs
        .iter()
        .map(|l| {
            l.iter()
                .enumerate()
                .filter(|(f, _)| *f < m.len() && !h.covers(*f))
                .filter_map(|(f, k)| {
                    k.map(|k| m[f][k as usize].max(FLOOR) / u[f][k as usize].max(FLOOR))
                })
                .product()
        })
        .collect();
    let mut share: f64 = 0.1;
    for _ in 0..200 {
        let matches: f64 = ratios
            .iter()
            .map(|r| share * r / (share * r + 1.0 - share))
            .sum();
        let next = (matches + 0.1 * HOUSEHOLD_PSEUDO_PAIRS)
            / (ratios.len() as f64 + HOUSEHOLD_PSEUDO_PAIRS);
        if (next - share).abs() < 1e-9 {
            return next;
        }
        share = next;
    }
    share
}

/// `(m, u, log2 m/u)` of each comparison ([`Model::contributions`]) and of
/// the household level.
#[derive(Debug, Clone)]
pub struct Contributions {
    pub fields: Vec<Option<(f64, f64, f64)>>,
    pub household: Option<(f64, f64, f64)>,
}

fn bayes_factor(m: f64, u: f64) -> f64 {
    (m.max(FLOOR) / u.max(FLOOR)).log2()
}

/// Pairs per unit of parallel work in [`em`].
const EM_CHUNK: usize = 8192;

/// Expectation–maximisation of m and the match share over `levels` with u
/// held fixed; comparisons in `skip` neither inform the posterior nor get
/// an m (their initial value is returned).
fn em(
    comparisons: &[Comparison],
    levels: &[Levels],
    u: &[Vec<f64>],
    skip: &[usize],
) -> (Vec<Vec<f64>>, f64, usize) {
    let mut m: Vec<Vec<f64>> = comparisons
        .iter()
        .map(|c| {
            let n = c.level_count();
            let mut v = vec![0.05 / (n as f64 - 1.0); n];
            v[n - 1] = 0.95;
            v
        })
        .collect();
    let mut share: f64 = 0.5;
    let empty = || {
        comparisons
            .iter()
            .map(|c| vec![0.0; c.level_count()])
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
fn estimate_u(recs: &[Rec], comparisons: &[Comparison], pairs: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut counts: Vec<Vec<f64>> = comparisons
        .iter()
        .map(|c| vec![0.5; c.level_count()])
        .collect();
    let n = recs.len();
    let mut add = |a: usize, b: usize| {
        for (f, level) in compare(comparisons, &recs[a], &recs[b]).iter().enumerate() {
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

    fn compare(a: &Rec, b: &Rec) -> Levels {
        super::compare(&default_comparisons(), a, b)
    }

    fn rec(given: &str, family: &str, birth: &str, ssn: Option<&str>) -> Rec {
        Rec {
            given: Some(given.into()),
            family: Some(family.into()),
            birth: NaiveDate::parse_from_str(birth, "%Y-%m-%d").ok(),
            sex: Some("female".into()),
            ssn: ssn.map(Into::into),
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

    /// Level probabilities per comparison: `disagree` spread over the
    /// levels below exact, the rest on exact.
    fn probabilities(comparisons: &[Comparison], disagree: f64) -> Vec<Vec<f64>> {
        comparisons
            .iter()
            .map(|c| {
                let n = c.level_count();
                let mut x = vec![disagree / (n - 1) as f64; n];
                x[n - 1] = 1.0 - disagree;
                x
            })
            .collect()
    }

    /// Levels of the default given-name comparison.
    const CROSSED: u8 = 1;
    const INITIAL: u8 = 2;
    const SWAPPED: u8 = 3;

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

        // Swapped given and family names: one level, the family left out.
        let swapped = rec("jackson", "elizabeth", "1977-07-05", None);
        let l = compare(&a, &swapped);
        assert_eq!((l[0], l[1]), (Some(SWAPPED), None));
        // An initial, and a name that has nothing in common.
        assert_eq!(
            compare(&a, &rec("e", "jackson", "1977-07-05", None))[0],
            Some(INITIAL)
        );
        assert_eq!(
            compare(&a, &rec("aisha", "jackson", "1977-07-05", None))[0],
            Some(0)
        );
        assert_eq!(compare(&a, &a)[0], Some(6), "exact is the highest level");

        // Swapped, and the family name changed (married) on one side: the
        // given name is the swap's evidence, the family level compares the
        // rest.
        let married = rec("hughes", "elizabeth", "1977-07-05", None);
        assert_eq!(
            (compare(&a, &married)[0], compare(&a, &married)[1]),
            (Some(CROSSED), Some(0))
        );
        // Swapped, with an initial: `e jackson` vs `jackson elizabeth`.
        let l = compare(&rec("e", "jackson", "1977-07-05", None), &swapped);
        assert_eq!((l[0], l[1]), (Some(SWAPPED), None));
        // Twins: nothing crosses over.
        assert_eq!(
            compare(&a, &rec("olivia", "jackson", "1977-07-05", None))[0],
            Some(0)
        );

        // A typo in a nickname is compared as written: `betyt` (no
        // nickname) and `betty` (→ elizabeth).
        let mut betty = rec("elizabeth", "duncan", "1981-04-27", None);
        betty.given_written = Some("betty".into());
        let l = compare(&rec("betyt", "duncan", "1981-04-27", None), &betty);
        assert_eq!(l[0], Some(5), "JW(betyt, betty) >= 0.92");
    }

    #[test]
    fn comparisons_are_declared_as_ordered_levels() {
        let c = |col, levels: &[&str]| Comparison::new(col, levels, false);
        let zip = c(Column::Zip, &["exact", "prefix 3", "within 50"]).unwrap();
        assert_eq!(zip.level_count(), 4);
        assert_eq!(
            (zip.level_name(3), zip.level_name(1), zip.level_name(0)),
            ("exact", "within 50", "different")
        );
        assert_eq!(zip.text_level("2600", "2600"), 3);
        assert_eq!(zip.text_level("2600", "2609"), 2, "first three agree");
        assert_eq!(zip.text_level("2600", "2640"), 1, "numerically close");
        assert_eq!(zip.text_level("2600", "3000"), 0);
        assert_eq!(
            zip.text_level("SW1A", "SW"),
            0,
            "a short code has no prefix 3"
        );
        let id = c(Column::Identifier, &["exact", "damerau_levenshtein <= 1"]).unwrap();
        assert_eq!(id.text_level("5162373", "5163273"), 1, "a transposition");
        assert_eq!(id.text_level("5162373", "5162374"), 1, "one digit");
        assert_eq!(id.text_level("5162373", "5262374"), 0);

        let birth = c(
            Column::BirthDate,
            &[
                "exact",
                "within 7 days or day_month_swapped",
                "within 2 years",
            ],
        )
        .unwrap();
        let on = |a: &str, b: &str| {
            let (x, y) = (rec("a", "b", a, None), rec("a", "b", b, None));
            birth.first_holding(|cond| cond.holds_for_dates(&x, &y))
        };
        assert_eq!(on("1970-05-12", "1970-05-12"), 3);
        assert_eq!(on("1970-05-12", "1970-05-18"), 2);
        assert_eq!(on("1970-05-12", "1970-12-05"), 2, "day and month swapped");
        assert_eq!(on("1970-05-12", "1971-09-01"), 1);
        assert_eq!(on("1970-05-12", "1974-05-12"), 0);
        // A bound beyond any date range is no overflow.
        let any = c(Column::BirthDate, &["within 99999999999999999999 years"]);
        assert!(any.unwrap_err().contains("not a whole number"));
        let wide = c(Column::BirthDate, &["within 9223372036854775807 years"]).unwrap();
        let (x, y) = (
            rec("a", "b", "1900-01-01", None),
            rec("a", "b", "2020-01-01", None),
        );
        assert_eq!(wide.first_holding(|cond| cond.holds_for_dates(&x, &y)), 1);

        for (col, levels, needle) in [
            (
                Column::BirthDate,
                &["jaro_winkler >= 0.9"][..],
                "not a level of birth_date",
            ),
            (Column::Zip, &["swapped"][..], "not a level of zip"),
            (
                Column::FamilyName,
                &["crossed"][..],
                "not a level of family_name",
            ),
            (Column::Address, &["jaro_winkler >= 1.5"][..], "at most 1"),
            (Column::Zip, &["prefix 0"][..], "at least 1"),
            (Column::Zip, &[][..], "give 1 to"),
        ] {
            let e = c(col, levels).unwrap_err();
            assert!(e.contains(needle), "{levels:?}: {e}");
        }
        let e = Comparison::new(Column::Zip, &["prefix 3", "exact"], true).unwrap_err();
        assert!(e.contains("first level must be exact"), "{e}");
    }

    #[test]
    fn the_household_level_stands_for_what_a_family_shares() {
        let comparisons = default_comparisons();
        let h = Household::of(&comparisons).unwrap();
        let person = |given: &str, ssn: Option<&str>| Rec {
            address: Some("8461 maple st".into()),
            zip: Some("84601".into()),
            ..rec(given, "jackson", "1977-07-20", ssn)
        };
        let jessica = person("jessica", None);
        let holds = |b: &Rec| h.holds(&compare(&jessica, b));
        assert!(holds(&person("aisha", None)), "twins");
        assert!(!holds(&person("jesica", None)), "a typo");
        assert!(!holds(&person("j", None)), "an initial");
        assert!(
            !holds(&Rec {
                birth: NaiveDate::from_ymd_opt(1979, 3, 2),
                ..person("aisha", None)
            }),
            "siblings born apart are compared field by field"
        );
        assert!(
            holds(&Rec {
                birth: NaiveDate::from_ymd_opt(1977, 7, 21),
                ..person("aisha", None)
            }),
            "a twin's birth date with a typo"
        );
        // A twin entered family name first: only `jackson` crosses over.
        let mut swapped_twin = person("aisha", None);
        std::mem::swap(&mut swapped_twin.given, &mut swapped_twin.family);
        assert_eq!(compare(&jessica, &swapped_twin)[0], Some(CROSSED));
        assert!(holds(&swapped_twin));
        // A full swap is the same person.
        let mut swapped = person("jessica", None);
        std::mem::swap(&mut swapped.given, &mut swapped.family);
        assert!(!holds(&swapped));

        // Its weight: its own m over u; the address and postcode household
        // members share add nothing, an identifier of the person still does.
        let mut model = Model {
            comparisons: comparisons.clone(),
            m: probabilities(&comparisons, 0.1),
            u: probabilities(&comparisons, 0.99),
            prior: 1e-4,
            iterations: 0,
            household_pairs: 3,
            household_match_share: 0.1,
            household: Some((h.clone(), 0.01, 1e-6)),
            tf: vec![None; comparisons.len()],
        };
        let aisha = person("aisha", None);
        let levels = compare(&jessica, &aisha);
        let c = model.contributions(&jessica, &levels);
        let (m, u, w) = c.household.unwrap();
        assert_eq!((m, u), (0.01, 1e-6));
        assert!((w - 1e4f64.log2()).abs() < 1e-9);
        let weighed: Vec<&str> = comparisons
            .iter()
            .zip(&c.fields)
            .filter(|(_, p)| p.is_some())
            .map(|(c, _)| c.column.name())
            .collect();
        assert_eq!(weighed, ["sex"]);
        let total = model.weight(&jessica, &levels);
        assert!((total - (model.prior_weight() + w + c.fields[3].unwrap().2)).abs() < 1e-9);
        let same_id = |g| person(g, Some("5162373"));
        let with_id = model.weight(
            &same_id("jessica"),
            &compare(&same_id("jessica"), &same_id("aisha")),
        );
        assert!(with_id > total + 3.0, "an agreeing identifier is evidence");
        // Off: field by field, where the shared address adds up.
        model.household = None;
        let independent = model.weight(&jessica, &levels);
        assert!(independent > total, "{independent} vs {total}");
        assert!(model.contributions(&jessica, &levels).household.is_none());
    }

    /// The household level learns the share of matches among the pairs
    /// that show it from the evidence a family does not share.
    #[test]
    fn the_household_share_is_learned_from_sex_and_identifiers() {
        let comparisons = default_comparisons();
        let h = Household::of(&comparisons).unwrap();
        let (m, u) = (
            probabilities(&comparisons, 0.02),
            probabilities(&comparisons, 0.5),
        );
        let jessica = rec("jessica", "jackson", "1977-07-20", Some("5162373"));
        let other = |sex: &str, ssn: Option<&str>| Rec {
            sex: Some(sex.into()),
            ..rec("aisha", "jackson", "1977-07-20", ssn)
        };
        let share = |pairs: &[Rec]| {
            let levels: Vec<Levels> = pairs.iter().map(|b| compare(&jessica, b)).collect();
            assert!(levels.iter().all(|l| h.holds(l)));
            household_share(&h, &levels.iter().collect::<Vec<_>>(), &m, &u)
        };
        // Twins: half of them differ in sex, none shares an identifier.
        let twins: Vec<Rec> = (0..200)
            .map(|i| other(if i % 2 == 0 { "male" } else { "female" }, Some("9990001")))
            .collect();
        assert!(share(&twins) < 0.1, "{}", share(&twins));
        // A person whose given name was replaced: identifiers agree.
        let renamed: Vec<Rec> = (0..200).map(|_| other("female", Some("5162373"))).collect();
        assert!(share(&renamed) > 0.9, "{}", share(&renamed));
        // No evidence either way: the one in ten it starts from.
        let bare = |r: &Rec| Rec {
            sex: None,
            ssn: None,
            ..r.clone()
        };
        let levels = compare(&bare(&jessica), &bare(&twins[0]));
        assert!((household_share(&h, &[&levels, &levels], &m, &u) - 0.1).abs() < 1e-6);
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
        let comparisons = default_comparisons();
        let levels: Vec<Levels> = (0..40_000)
            .map(|_| {
                let mut l: Levels = [None; Column::ALL.len()];
                for (f, c) in comparisons.iter().enumerate() {
                    let (r, n) = (next(), c.level_count());
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
        let u: Vec<Vec<f64>> = comparisons
            .iter()
            .map(|c| vec![1.0 / c.level_count() as f64; c.level_count()])
            .collect();
        let fit = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (m, share, it) = pool.install(|| em(&comparisons, &levels, &u, &[2]));
            let bits: Vec<u64> = m.iter().flatten().map(|x| x.to_bits()).collect();
            (bits, share.to_bits(), it)
        };
        let one = fit(1);
        assert!(one.2 > 1, "EM iterated");
        for threads in [2, 8] {
            assert_eq!(fit(threads), one, "{threads} threads");
        }
    }

    /// A kept model is the model: every number read back to the bit, so
    /// a night that takes it weighs a pair as the night that fitted it.
    #[test]
    fn kept_parameters_give_the_same_weights() {
        let comparisons = default_comparisons();
        let odd = [
            0.1 + 0.2,
            6.367_415_985_778_723e-7,
            1e-300,
            1.0 / 3.0,
            0.999_999_999_999_999_9,
        ];
        let probs = |shift: usize| -> Vec<Vec<f64>> {
            comparisons
                .iter()
                .enumerate()
                .map(|(f, c)| {
                    (0..c.level_count())
                        .map(|k| odd[(f + k + shift) % odd.len()])
                        .collect()
                })
                .collect()
        };
        let mut tf = vec![None; comparisons.len()];
        tf[0] = Some(BTreeMap::from([("jessica".to_string(), 2.0 / 7.0)]));
        let params = ModelParams {
            m: probs(0),
            u: probs(1),
            prior: odd[1],
            iterations: 7,
            household_pairs: 3,
            household_match_share: odd[3],
            household: Some((odd[0], odd[2])),
            tf,
        };
        let model = Model::from_params(&comparisons, params.clone()).unwrap();
        assert_eq!(model.params(), params);
        let json = serde_json::to_string(&params).unwrap();
        let back: ModelParams = serde_json::from_str(&json).unwrap();
        let kept = Model::from_params(&comparisons, back).unwrap();
        let (a, b) = (
            rec("jessica", "jackson", "1977-07-20", Some("5162373")),
            rec("jessica", "jackson", "1977-07-02", None),
        );
        let levels = model.compare(&a, &b);
        assert_eq!(
            kept.weight(&a, &levels).to_bits(),
            model.weight(&a, &levels).to_bits()
        );
        assert_eq!(kept.params(), params);
        // Another configuration's model is refused, not misread.
        let fewer = &comparisons[..comparisons.len() - 1];
        assert!(Model::from_params(fewer, params).is_err());
    }
}
