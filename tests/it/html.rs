//! report.html of `ward run` on the sample: self-contained (nothing loaded
//! from anywhere), only suppressed counts, every section, and rendered by
//! a real browser (headless Chromium) without a console message.

use std::fs;
use std::path::Path;
use std::process::Command;

use regex::Regex;

use crate::common::*;

#[test]
fn run_writes_a_self_contained_report_html() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let run = run_all(&config);
    assert_eq!(run.report_html, run.report_dir.join("report.html"));
    let html = fs::read_to_string(&run.report_html).unwrap();

    // Self-contained: no network address, no reference to another file.
    let lower = html.to_lowercase();
    for banned in [
        "http://", "https://", "<link", "@import", "<script", "<iframe", "<object", "<embed",
    ] {
        assert!(!lower.contains(banned), "report.html contains {banned}");
    }
    let reference =
        Regex::new(r#"(?i)\b(src|href|xlink:href|srcset|action)\s*=\s*["']?([^"'\s>]*)"#).unwrap();
    let mut fragments = 0;
    for m in reference.captures_iter(&html) {
        let target = &m[2];
        assert!(
            target.starts_with('#') || target.starts_with("data:"),
            "{}={target} refers outside the page",
            &m[1]
        );
        fragments += 1;
    }
    assert!(fragments >= 6, "the section links are fragments");
    for m in Regex::new(r"(?i)url\(\s*['\x22]?([^)'\x22]*)")
        .unwrap()
        .captures_iter(&html)
    {
        assert!(
            m[1].starts_with("data:"),
            "url({}) in the stylesheet",
            &m[1]
        );
    }
    assert!(
        html.contains("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none';")
    );

    // Every section, a chart per measure by provider, the control bands.
    for id in [
        "headline",
        "providers",
        "bands",
        "trend",
        "quality",
        "dq",
        "metadata",
    ] {
        assert!(
            html.contains(&format!("<section id=\"{id}\"")),
            "section {id}"
        );
    }
    assert!(html.contains("first run on record"));
    for m in &run.measures {
        assert!(html.contains(&format!("<span class=\"mid\">{}</span>", m.key())));
    }
    // A chart or more per measure with people in it (an empty measure
    // says why instead).
    let populated = run.measures.iter().filter(|r| r.counts.denominator > 0);
    assert!(html.matches("role=\"img\" aria-labelledby=").count() > populated.count());
    assert!(html.contains("DM-CONTROL: distribution by band"));
    for source in &config.sources {
        assert!(html.contains(&format!("<th scope=\"row\">{}</th>", source.name)));
    }
    // The data-quality scorecard: a row per source, every check's result
    // in the table behind it.
    assert!(html.matches("<td class=\"dq-").count() >= 3 * config.sources.len());
    for r in &run.dq {
        assert!(
            html.contains(&format!(
                "<code>{}</code></th><td>{}</td>",
                r.check, r.source
            )),
            "{} on {}",
            r.check,
            r.source
        );
    }

    // Patient counts shown are 0 or at least the minimum cell size; the
    // sample has suppressed strata, marked as such.
    let counts = Regex::new(r#"<(?:td|span) class="num">([\d,]+)</(?:td|span)>"#).unwrap();
    let mut shown = 0;
    for m in counts.captures_iter(&html) {
        let n: u64 = m[1].replace(',', "").parse().unwrap();
        assert!(n == 0 || n >= config.min_cell_size, "count {n} published");
        shown += 1;
    }
    assert!(shown > 20, "{shown} counts");
    assert!(html.contains("<td class=\"sup\" colspan=\"4\">suppressed</td>"));

    // Headline rates are the summary's overall rates.
    let summary: serde_json::Value =
        serde_json::from_slice(&fs::read(run.report_dir.join("summary.json")).unwrap()).unwrap();
    for c in summary.as_array().unwrap() {
        // (An empty measure's overall row has no rate.)
        if c["dimension"] == "overall"
            && !c["suppressed"].as_bool().unwrap()
            && let Some(rate) = c["rate"].as_f64()
        {
            assert!(
                html.contains(&format!("<p class=\"big\">{:.1}%</p>", rate * 100.0)),
                "{c}"
            );
        }
    }

    // A copy for review beside the screenshot.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"));
    fs::copy(&run.report_html, out.join("report.html")).unwrap();
    browser_check(&run.report_html, &out.join("report.png"));
}

/// Renders the page in headless Chromium with `scripts/check_html.sh`:
/// fails on any console message. Without Chromium the check is skipped,
/// unless WARD_REQUIRE_CHROMIUM is set (`.ci/run` installs Chromium and sets it).
fn browser_check(html: &Path, png: &Path) {
    let script = repo().join("scripts/check_html.sh");
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .any(|p| Path::new(p).exists());
    if !chromium {
        assert!(
            std::env::var_os("WARD_REQUIRE_CHROMIUM").is_none(),
            "WARD_REQUIRE_CHROMIUM is set but Chromium is not installed"
        );
        eprintln!("SKIPPED browser check: Chromium not installed (apt-get install -y chromium)");
        return;
    }
    // The check itself must see a CSP violation: a page loading a stylesheet.
    let bad = png.with_file_name("csp-violation.html");
    fs::write(
        &bad,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"Content-Security-Policy\" \
         content=\"default-src 'none'\"><title>bad</title><link rel=\"stylesheet\" href=\"https://example.invalid/a.css\">\
         </head><body><p>bad</p></body></html>",
    )
    .unwrap();
    let out = Command::new(&script)
        .arg(&bad)
        .arg(png.with_file_name("csp-violation.png"))
        .arg("400")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a CSP violation must fail the check"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Content Security Policy"));

    let out = Command::new(&script).arg(html).arg(png).output().unwrap();
    assert!(
        out.status.success(),
        "Chromium check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let png_bytes = fs::read(png).unwrap();
    assert!(
        png_bytes.starts_with(b"\x89PNG") && png_bytes.len() > 20_000,
        "a real screenshot"
    );
    eprintln!("screenshot for review: {}", png.display());
}
