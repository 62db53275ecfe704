//! JSON log lines for schedulers and log shippers: one object per line with
//! timestamp, level, target, the run id and stage of the run in progress,
//! and the event's fields.
//!
//! The library opens a `run` span (`run_id`) and one `stage` span (`stage`)
//! per stage on the thread that drives the run; worker threads (rayon)
//! log outside those spans, so [`RunContext`] keeps the innermost run and
//! stage process-wide and every line carries them.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The run id and stage of the run in progress, shared by the layer that
/// follows the spans and the formatter that writes them.
#[derive(Clone, Default)]
pub struct RunContext(Arc<Mutex<Current>>);

#[derive(Default)]
struct Current {
    run_id: Option<String>,
    stage: Option<String>,
}

/// A `run` or `stage` span's value, kept in the span's extensions.
struct Tag(String);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for RunContext {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let key = match attrs.metadata().name() {
            "run" => "run_id",
            "stage" => "stage",
            _ => return,
        };
        let mut fields = Map::new();
        attrs.record(&mut Fields(&mut fields));
        if let (Some(value), Some(span)) = (fields.get(key), ctx.span(id)) {
            let text = value
                .as_str()
                .map(str::to_string)
                .unwrap_or(value.to_string());
            span.extensions_mut().insert(Tag(text));
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        self.set(id, &ctx, true);
    }

    // Not on exit: a span is also entered and exited by the threads that
    // poll futures inside it (the Ballista client's), while the thread
    // that drives the run is still in it; it has ended when it closes.
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        self.set(&id, &ctx, false);
    }
}

impl RunContext {
    fn set<S: Subscriber + for<'a> LookupSpan<'a>>(
        &self,
        id: &Id,
        ctx: &Context<'_, S>,
        enter: bool,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let value = span.extensions().get::<Tag>().map(|t| t.0.clone());
        let Some(value) = value else { return };
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match span.name() {
            "run" => &mut current.run_id,
            _ => &mut current.stage,
        };
        *slot = enter.then_some(value);
    }
}

/// The JSON line formatter.
pub struct JsonLines(pub RunContext);

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        {
            let current = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(run_id) = &current.run_id {
                line.insert("run_id".into(), run_id.clone().into());
            }
            if let Some(stage) = &current.stage {
                line.insert("stage".into(), stage.clone().into());
            }
        }
        event.record(&mut Fields(&mut line));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Collects an event's or span's fields into a JSON object.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// A log writer that escapes control characters inside each line (a
/// newline in a file name would otherwise forge a log line of its own):
/// `\n`, `\r` and other C0 controls are written as escapes; the line's own
/// final newline is kept, and so is ESC when `ansi` colours are on.
pub struct ControlEscaped<W> {
    inner: W,
    ansi: bool,
}

impl<W> ControlEscaped<W> {
    pub fn new(inner: W, ansi: bool) -> Self {
        ControlEscaped { inner, ansi }
    }
}

impl<W: Write> Write for ControlEscaped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.push(b),
                0x1b if self.ansi => out.push(b),
                0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                _ => out.push(b),
            }
        }
        if body.len() < buf.len() {
            out.push(b'\n');
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_a_log_line() {
        let mut out = ControlEscaped::new(Vec::new(), false);
        out.write_all(b"cannot read a.csv\nERROR forged\r\x1b[31m\x07 \xc3\xa9\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(out.inner).unwrap(),
            "cannot read a.csv\\nERROR forged\\r\\x1b[31m\\x07 é\n"
        );
        let mut colour = ControlEscaped::new(Vec::new(), true);
        colour.write_all(b"\x1b[31mred\x1b[0m\n").unwrap();
        assert_eq!(colour.inner, b"\x1b[31mred\x1b[0m\n");
    }
}
