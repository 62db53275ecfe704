//! Resolve once, then run: turns the command line's choices and the config
//! file into the checked values every command works with (the config, the
//! queries directory, the as-of day, the measurement period, the
//! de-identification key), so the binary only parses flags, dispatches and
//! prints.
//!
//! A flag's mistake is a [`WardError::Usage`] naming the flag; a config
//! file's is a [`WardError::Config`] naming the file, line and key.

use std::path::{Path, PathBuf};

use chrono::{Datelike, NaiveDate};

use crate::config::PipelineConfig;
use crate::error::{Result, WardError};
use crate::measure::Period;

/// The bundled sample config, used when no config is given and the working
/// directory has none (never under `--no-sample`).
fn bundled_sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sample_data")
        .join("ward.toml")
}

/// Where the config comes from: `--config`, else `./ward.toml`, else
/// (unless `no_sample`) the bundled sample's. The flag is `true` for the
/// sample, which the caller must announce: a job started in the wrong
/// directory must not pass for a real night.
pub fn config_path(given: Option<&Path>, no_sample: bool) -> Result<(PathBuf, bool)> {
    if let Some(p) = given {
        return Ok((p.to_path_buf(), false));
    }
    let local = PathBuf::from("ward.toml");
    if local.is_file() {
        return Ok((local, false));
    }
    if no_sample {
        return Err(WardError::Usage {
            message: "no --config given and no ./ward.toml in the working directory \
                      (--no-sample: the bundled sample is not used)"
                .into(),
        });
    }
    let bundled = bundled_sample();
    if bundled.is_file() {
        return Ok((bundled, true));
    }
    Err(WardError::Config {
        path: local,
        line: None,
        column: None,
        key: None,
        message: "no --config given, no ./ward.toml and no bundled sample config".into(),
    })
}

/// The queries directory (measures, shared SQL, value sets): the config's
/// `queries`, else `./queries` when it holds measures, else the bundled one.
pub fn queries_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(q) = configured {
        return q.to_path_buf();
    }
    let local = PathBuf::from("queries");
    if local.join("measures").is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("queries")
}

/// The checked settings of one command that reads a config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config file read.
    pub config_path: PathBuf,
    /// Whether that is the bundled sample's (see [`config_path`]).
    pub bundled_sample: bool,
    /// The checked config.
    pub config: PipelineConfig,
    /// The queries directory (see [`queries_dir`]).
    pub queries: PathBuf,
    /// The day the run is for: the config's `as_of`, else today.
    pub today: NaiveDate,
}

impl Settings {
    /// Finds and loads the config (see [`config_path`]) and resolves the
    /// values that depend on it.
    pub fn load(given: Option<&Path>, no_sample: bool) -> Result<Settings> {
        let (config_path, bundled_sample) = config_path(given, no_sample)?;
        let config = PipelineConfig::load(&config_path)?;
        Ok(Settings::new(config_path, bundled_sample, config))
    }

    /// The settings of an already loaded config.
    pub fn new(config_path: PathBuf, bundled_sample: bool, config: PipelineConfig) -> Settings {
        let queries = queries_dir(config.queries.as_deref());
        let today = config
            .as_of
            .unwrap_or_else(|| chrono::Local::now().date_naive());
        Settings {
            config_path,
            bundled_sample,
            config,
            queries,
            today,
        }
    }

    /// The measurement period: `--period-start`/`--period-end` when given
    /// (both or neither), else the config's `measurement_period`, else the
    /// calendar year before [`Settings::today`].
    pub fn period(&self, start: Option<NaiveDate>, end: Option<NaiveDate>) -> Result<Period> {
        match (start, end) {
            (Some(start), Some(end)) if start > end => Err(WardError::Usage {
                message: format!(
                    "--period-start {start} is after --period-end {end}: the measurement \
                     period starts after it ends"
                ),
            }),
            (Some(start), Some(end)) => Ok(Period { start, end }),
            (Some(_), None) | (None, Some(_)) => Err(WardError::Usage {
                message: "--period-start and --period-end go together".into(),
            }),
            (None, None) => Ok(self
                .config
                .measurement_period
                .unwrap_or_else(|| previous_year(self.today))),
        }
    }
}

/// The calendar year before `today`'s.
fn previous_year(today: NaiveDate) -> Period {
    let year = today.year() - 1;
    Period {
        start: NaiveDate::from_ymd_opt(year, 1, 1).expect("January 1st exists"),
        end: NaiveDate::from_ymd_opt(year, 12, 31).expect("December 31st exists"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(period: Option<Period>) -> Settings {
        let path = bundled_sample();
        let mut config = PipelineConfig::load(&path).unwrap();
        config.as_of = Some(d("2026-03-15"));
        config.measurement_period = period;
        Settings::new(path, false, config)
    }

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn period_comes_from_flags_then_config_then_the_previous_year() {
        let s = settings(None);
        assert_eq!(s.today, d("2026-03-15"));
        let p = s.period(None, None).unwrap();
        assert_eq!((p.start, p.end), (d("2025-01-01"), d("2025-12-31")));

        let configured = Period {
            start: d("2024-07-01"),
            end: d("2025-06-30"),
        };
        let s = settings(Some(configured));
        assert_eq!(s.period(None, None).unwrap(), configured);
        let p = s
            .period(Some(d("2023-01-01")), Some(d("2023-03-31")))
            .unwrap();
        assert_eq!((p.start, p.end), (d("2023-01-01"), d("2023-03-31")));
    }

    #[test]
    fn a_backwards_period_is_a_flag_error_naming_the_flags() {
        let e = settings(None)
            .period(Some(d("2025-02-01")), Some(d("2025-01-01")))
            .unwrap_err();
        assert!(matches!(e, WardError::Usage { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("--period-start 2025-02-01") && text.contains("--period-end"));
        let half = settings(None).period(Some(d("2025-02-01")), None);
        assert!(matches!(half, Err(WardError::Usage { .. })));
    }

    #[test]
    fn given_config_wins_and_no_sample_refuses_the_fallback() {
        let (p, sample) = config_path(Some(Path::new("x/ward.toml")), true).unwrap();
        assert_eq!((p, sample), (PathBuf::from("x/ward.toml"), false));
        // The test runs in the crate root, which has no ./ward.toml.
        assert!(!Path::new("ward.toml").exists());
        assert!(matches!(
            config_path(None, true),
            Err(WardError::Usage { .. })
        ));
        let (p, sample) = config_path(None, false).unwrap();
        assert!(sample && p == bundled_sample());
    }
}
