//! Value sets under queries/valuesets/: reproducible from ../shared/data and
//! queryable as one table.

use crate::common::*;

#[test]
fn committed_value_sets_are_the_converter_output_of_the_shared_data() {
    let Some(shared) = shared_data("ecqm/valuesets") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let report = ward::valuesets::convert(&[shared], dir.path()).unwrap();
    assert!(report.written.len() >= 40);
    let strip = |d: &std::path::Path| {
        snapshot(d)
            .into_iter()
            .filter(|(p, _)| p.extension().is_some_and(|x| x == "csv"))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(dir.path()), strip(&repo().join("queries/valuesets")));
}

#[test]
fn value_sets_are_one_table_with_short_system_names() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        let dir = repo().join("queries/valuesets/");
        let schema = ward::schema::valueset_code_schema();
        let options = datafusion::prelude::CsvReadOptions::new().schema(&schema);
        ctx.register_csv("valueset_code", dir.to_str().unwrap(), options)
            .await
            .unwrap();
        let diabetes = ctx
            .sql("SELECT code_system, code FROM valueset_code \
                  WHERE valueset = '2.16.840.1.113883.3.464.1003.103.12.1001' AND code IN ('E11.9', '44054006') \
                  ORDER BY code")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(strings(&diabetes, "code"), [Some("44054006".into()), Some("E11.9".into())]);
        assert_eq!(strings(&diabetes, "code_system"), [Some("snomed".into()), Some("icd10cm".into())]);
        let uris = ctx
            .sql("SELECT count(*) AS n FROM valueset_code WHERE code_system LIKE 'http%'")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let n = uris[0].column(0).as_any().downcast_ref::<datafusion::arrow::array::Int64Array>().unwrap().value(0);
        assert_eq!(n, 0, "every system of the eCQM value sets has a short name");
    });
}
