//! Ward's own SQL functions, which every session registers (and, on a
//! cluster, the scheduler and executors): `age_years(birth_date, at_date)`
//! and `age_band(age)`, with the Rust functions research ages share.

use std::sync::Arc;

use chrono::{Datelike, NaiveDate};
use datafusion::arrow::array::{Array, ArrayRef, Date32Array, Int32Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};

/// Every function of this module, as DataFusion UDFs.
pub fn functions() -> Vec<ScalarUDF> {
    vec![age_years_udf(), age_band_udf()]
}

/// Completed years between two dates (CQL `AgeInYearsAt`; negative when
/// `at` is before `birth`). Measures (the `age_years` SQL function) and
/// research ages share it.
pub fn age_years(birth: NaiveDate, at: NaiveDate) -> i32 {
    let mut years = at.year() - birth.year();
    if (at.month(), at.day()) < (birth.month(), birth.day()) {
        years -= 1;
    }
    years
}

/// The age bands of reports and research tables alike: `0-17`, `18-44`,
/// `45-64`, `65-74`, `75+` (years completed). Coarser than ten-year bands,
/// they also hide ages of 90 and over as Safe Harbor requires.
pub fn age_band(age: i32) -> &'static str {
    match age {
        ..18 => "0-17",
        18..45 => "18-44",
        45..65 => "45-64",
        65..75 => "65-74",
        _ => "75+",
    }
}

fn age_years_udf() -> ScalarUDF {
    create_udf(
        "age_years",
        vec![DataType::Date32, DataType::Date32],
        DataType::Int32,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let as_dates = |a: &ArrayRef| {
                a.as_any()
                    .downcast_ref::<Date32Array>()
                    .cloned()
                    .ok_or_else(|| {
                        datafusion::error::DataFusionError::Execution(
                            "age_years expects two DATE arguments".into(),
                        )
                    })
            };
            let (birth, at) = (as_dates(&arrays[0])?, as_dates(&arrays[1])?);
            let out: Int32Array = (0..birth.len())
                .map(|i| {
                    if birth.is_null(i) || at.is_null(i) {
                        None
                    } else {
                        Some(age_years(birth.value_as_date(i)?, at.value_as_date(i)?))
                    }
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// `age_band(age)`: the report's age band of an age in years
/// ([`age_band`]); NULL for NULL.
fn age_band_udf() -> ScalarUDF {
    // BIGINT, so an INT (`age_years`) widens to it and a literal age needs
    // no cast.
    create_udf(
        "age_band",
        vec![DataType::Int64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let ages = arrays[0]
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| {
                    datafusion::error::DataFusionError::Execution(
                        "age_band expects an integer argument".into(),
                    )
                })?;
            let band = |a: i64| age_band(a.clamp(i32::MIN.into(), i32::MAX.into()) as i32);
            let out: StringArray = ages.iter().map(|a| a.map(band)).collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn age_counts_completed_years() {
        assert_eq!(age_years(d("2000-12-31"), d("2025-12-31")), 25);
        assert_eq!(age_years(d("2001-01-01"), d("2025-12-31")), 24);
        assert_eq!(age_years(d("2000-02-29"), d("2025-02-28")), 24);
        assert_eq!(age_years(d("2000-02-29"), d("2025-03-01")), 25);
    }

    #[test]
    fn the_functions_are_registered_by_name() {
        let names: Vec<String> = functions().iter().map(|f| f.name().to_string()).collect();
        assert_eq!(names, ["age_years", "age_band"]);
    }
}
