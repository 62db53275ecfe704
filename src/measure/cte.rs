//! A measure's common table expressions computed once: DataFusion inlines
//! a CTE at every reference, so a criterion that several others build on
//! (CMS2's qualifying encounters: six references) was evaluated, scans and
//! joins included, once per reference. Every CTE of the top-level `WITH`
//! that is referenced more than once and computes something (see
//! [`computed`]: grouping, DISTINCT, a window...) is run first, in order,
//! held as a session table (in memory; on a cluster a scratch file) and
//! read in its place; the others
//! stay inline, where DataFusion pushes each reference's filters into them.
//! A `WITH RECURSIVE`, or SQL that is not one query, runs as written.

use std::ops::ControlFlow;
use std::path::Path;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::{DataFusionError, Result};
use datafusion::prelude::{DataFrame, SessionContext};
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::ast::{
    self, Ident, ObjectName, ObjectNamePart, visit_relations, visit_relations_mut,
};
use futures::StreamExt;

/// The most a measure's computed CTEs may hold together (Arrow bytes): a
/// CTE that would pass it is evaluated at each reference instead, as
/// DataFusion would, so memory stays bounded at any population. At 1M
/// persons the largest measure holds well under it (CMS2: see
/// benches/RESULTS.md).
const HELD_BYTES: usize = 1 << 30;

/// A measure's query, planned with its shared CTEs computed.
pub(crate) struct Planned {
    /// The query, reading the shared CTEs' tables.
    pub(crate) query: DataFrame,
    /// The session tables holding them: deregister them when the measure
    /// is done.
    pub(crate) tables: Vec<String>,
}

/// Plans `sql` on `ctx`, first computing every CTE referenced more than
/// once (and [`computed`]) into a table named `<prefix>_cte<n>_<cte>`,
/// within [`HELD_BYTES`].
pub(crate) async fn plan(ctx: &SessionContext, sql: &str, prefix: &str) -> Result<Planned> {
    plan_within(ctx, sql, prefix, HELD_BYTES).await
}

/// [`plan`], holding at most `budget` bytes.
async fn plan_within(
    ctx: &SessionContext,
    sql: &str,
    prefix: &str,
    budget: usize,
) -> Result<Planned> {
    let as_written = || async {
        Ok(Planned {
            query: ctx.sql(sql).await?,
            tables: Vec::new(),
        })
    };
    let mut statements = DFParser::parse_sql(sql)?;
    let (Some(Statement::Statement(statement)), None) =
        (statements.pop_front(), statements.pop_front())
    else {
        return as_written().await;
    };
    let ast::Statement::Query(mut query) = *statement else {
        return as_written().await;
    };
    let Some(with) = query.with.take().filter(|w| !w.recursive) else {
        return as_written().await;
    };

    let names: Vec<String> = with
        .cte_tables
        .iter()
        .map(|c| normal(&c.alias.name))
        .collect();
    let mut references = vec![0usize; names.len()];
    let mut count = |name: &ObjectName| {
        if let Some(i) = single(name).and_then(|n| names.iter().position(|c| *c == n)) {
            references[i] += 1;
        }
        ControlFlow::<()>::Continue(())
    };
    for cte in &with.cte_tables {
        let _ = visit_relations(&cte.query, &mut count);
    }
    let _ = visit_relations(&query, &mut count);

    let mut shared: Vec<(String, String)> = Vec::new();
    let mut held = 0;
    let mut inline: Vec<ast::Cte> = Vec::new();
    for ((mut cte, name), n) in with.cte_tables.into_iter().zip(names).zip(references) {
        rename(&mut cte.query, &shared);
        if n < 2 || !computed(ctx, &cte.query) {
            inline.push(cte);
            continue;
        }
        // Its own query, with the inline CTEs before it that it may read.
        let original = cte.clone();
        let mut body = *cte.query;
        let mut own = body.with.take().unwrap_or_else(|| ast::With {
            with_token: with.with_token.clone(),
            recursive: false,
            cte_tables: Vec::new(),
        });
        own.cte_tables.splice(0..0, inline.iter().cloned());
        body.with = (!own.cte_tables.is_empty()).then_some(own);
        let table = super::table_name(&format!("{prefix}_cte{}_{name}", shared.len()));
        let computed = run(ctx, body).await?;
        let schema = std::sync::Arc::new(computed.schema().as_arrow().clone());
        let mut stream = computed.execute_stream().await?;
        let mut batches = Vec::new();
        let mut bytes = 0;
        while let Some(batch) = stream.next().await {
            let batch = compact(&batch?, &schema)?;
            bytes += batch.get_array_memory_size();
            if held + bytes > budget {
                break;
            }
            batches.push(batch);
        }
        if held + bytes > budget {
            tracing::debug!(cte = %name, "larger than the budget: evaluated at each reference");
            inline.push(original);
            continue;
        }
        held += bytes;
        tracing::debug!(cte = %name, bytes, "computed once");
        // In memory, or on a cluster a scratch file the executors read.
        crate::engine::register_batches(ctx, &table, schema, batches, Path::new(&name))
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        shared.push((name, table));
    }
    rename(&mut query, &shared);
    query.with = (!inline.is_empty()).then_some(ast::With {
        with_token: with.with_token,
        recursive: false,
        cte_tables: inline,
    });
    Ok(Planned {
        query: run(ctx, *query).await?,
        tables: shared.into_iter().map(|(_, t)| t).collect(),
    })
}

/// Whether a CTE computes something — anywhere in it (its derived tables
/// and subqueries too), grouping, DISTINCT, an aggregate or window
/// function, a set operation, ORDER BY or LIMIT — rather than only filter,
/// join and project tables. Only such a result is worth holding: a plain
/// filter stays inline, where each reference's own conditions (a value
/// set, the period) reach the scan, and holding it would hold a copy of a
/// whole table.
fn computed(ctx: &SessionContext, query: &ast::Query) -> bool {
    struct Finder(
        std::collections::HashMap<String, std::sync::Arc<datafusion::logical_expr::AggregateUDF>>,
    );
    impl ast::Visitor for Finder {
        type Break = ();
        fn pre_visit_query(&mut self, query: &ast::Query) -> ControlFlow<()> {
            let computes = query.order_by.is_some()
                || query.limit_clause.is_some()
                || match query.body.as_ref() {
                    ast::SetExpr::Select(select) => {
                        select.distinct.is_some()
                            || select.having.is_some()
                            || !matches!(&select.group_by, ast::GroupByExpr::Expressions(e, _) if e.is_empty())
                    }
                    ast::SetExpr::SetOperation { .. } => true,
                    _ => false,
                };
            if computes {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
        fn pre_visit_expr(&mut self, expr: &ast::Expr) -> ControlFlow<()> {
            match expr {
                ast::Expr::Function(f)
                    if f.over.is_some()
                        || single(&f.name).is_some_and(|n| self.0.contains_key(&n)) =>
                {
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        }
    }
    let mut finder = Finder(ctx.state().aggregate_functions().clone());
    ast::Visit::visit(query, &mut finder).is_break()
}

/// `batch`, as a batch of `schema` (the plan's: batches may differ from it
/// in field metadata) holding only its own strings: a filtered string view
/// keeps the whole buffers it was cut from (Parquet pages, other rows),
/// which kept in memory for the measure cost several times the rows.
fn compact(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View => std::sync::Arc::new(c.as_string_view().gc()) as ArrayRef,
            DataType::BinaryView => std::sync::Arc::new(c.as_binary_view().gc()),
            _ => c.clone(),
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

async fn run(ctx: &SessionContext, query: ast::Query) -> Result<DataFrame> {
    let statement = Statement::Statement(Box::new(ast::Statement::Query(Box::new(query))));
    let plan = ctx.state().statement_to_plan(statement).await?;
    ctx.execute_logical_plan(plan).await
}

/// A name as DataFusion resolves it: unquoted identifiers are lower-cased.
fn normal(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

/// The name of a one-part relation.
fn single(name: &ObjectName) -> Option<String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => Some(normal(ident)),
        _ => None,
    }
}

/// Points every reference to a shared CTE at its table.
fn rename<V: ast::VisitMut>(node: &mut V, shared: &[(String, String)]) {
    let _ = visit_relations_mut(node, |name: &mut ObjectName| {
        if let Some((_, table)) = single(name).and_then(|n| shared.iter().find(|(c, _)| *c == n)) {
            *name = ObjectName(vec![ObjectNamePart::Identifier(Ident::with_quote(
                '"', table,
            ))]);
        }
        ControlFlow::<()>::Continue(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::util::pretty::pretty_format_batches;

    async fn rows(df: DataFrame) -> String {
        pretty_format_batches(&df.collect().await.unwrap())
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn computed_ctes_referenced_twice_are_held_and_give_the_same_rows() {
        let ctx = SessionContext::new();
        let sql = "WITH base AS (SELECT DISTINCT x FROM (VALUES (1), (2), (3), (3)) AS t(x)), \
                   once AS (SELECT x, count(*) AS n FROM base GROUP BY x), \
                   plain AS (SELECT x FROM base WHERE x > 1), \
                   \"Twice\" AS (SELECT x * 10 AS y, row_number() OVER (ORDER BY x) AS k FROM plain), \
                   unused AS (SELECT 1 AS z) \
                   SELECT a.y, b.k FROM \"Twice\" a JOIN \"Twice\" b ON a.y = b.y \
                   JOIN BASE c ON c.x * 10 = a.y JOIN base d ON d.x = c.x \
                   JOIN plain e ON e.x = c.x JOIN plain f ON f.x = c.x JOIN once g ON g.x = c.x \
                   ORDER BY a.y";
        let planned = plan(&ctx, sql, "m").await.unwrap();
        // `base` (BASE is the same name, DISTINCT) and "Twice" (a window)
        // are referenced twice and computed; `plain`, twice too, only
        // filters; `once` is read once.
        assert_eq!(planned.tables, ["m_cte0_base", "m_cte1_twice"]);
        assert!(ctx.table_exist("m_cte1_twice").unwrap());
        let expected = rows(ctx.sql(sql).await.unwrap()).await;
        assert_eq!(rows(planned.query).await, expected);
        assert!(expected.contains("| 30 | 2 |"), "{expected}");
    }

    #[tokio::test]
    async fn a_cte_over_the_budget_is_evaluated_at_each_reference() {
        let ctx = SessionContext::new();
        let sql = "WITH d AS (SELECT DISTINCT x FROM (VALUES (1), (2), (2)) AS t(x)) \
                   SELECT a.x FROM d a JOIN d b ON a.x = b.x ORDER BY a.x";
        let planned = plan_within(&ctx, sql, "m", 0).await.unwrap();
        assert!(planned.tables.is_empty());
        assert!(!ctx.table_exist("m_cte0_d").unwrap());
        let expected = rows(ctx.sql(sql).await.unwrap()).await;
        assert_eq!(rows(planned.query).await, expected);
        assert!(expected.contains("| 2 |"), "{expected}");
        let planned = plan_within(&ctx, sql, "m", 1 << 20).await.unwrap();
        assert_eq!(planned.tables, ["m_cte0_d"]);
    }

    #[tokio::test]
    async fn other_sql_runs_as_written() {
        let ctx = SessionContext::new();
        for sql in [
            "SELECT 1 AS x",
            "WITH RECURSIVE n AS (SELECT 1 AS i UNION ALL SELECT i + 1 FROM n WHERE i < 3) \
             SELECT a.i FROM n a JOIN n b ON a.i = b.i ORDER BY a.i",
        ] {
            let planned = plan(&ctx, sql, "m").await.unwrap();
            assert!(planned.tables.is_empty(), "{sql}");
            assert_eq!(
                rows(planned.query).await,
                rows(ctx.sql(sql).await.unwrap()).await
            );
        }
    }
}
