//! Ward's DataFusion optimizer rule, in every session (local, Ballista
//! client and scheduler): it turns an inner join with a one-row table of
//! constants (Ward's `period`) into literals.
//!
//! Measure SQL reads the measurement period as `CROSS JOIN period p WHERE
//! o.day BETWEEN p.start_date AND p.end_date`. DataFusion 55 plans that as
//! a nested-loop join against the one row, evaluated after every other join
//! of the query, so the period filter cannot reach the scans: every fact of
//! every year is joined first and filtered last. [`InlineConstantRow`]
//! replaces such a join by its other input with the constants appended as
//! literal columns (same names and qualifiers) and the join's condition as
//! a filter above; DataFusion's own filter push-down and constant folding
//! then take `o.day BETWEEN DATE '2025-01-01' AND DATE '2025-12-31'` down
//! to the scan.

use std::sync::Arc;

use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, NullEquality, Result};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, Filter, Join, JoinType, LogicalPlan, Projection};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

/// See the [module documentation](self).
#[derive(Debug, Default)]
pub(crate) struct InlineConstantRow;

impl OptimizerRule for InlineConstantRow {
    fn name(&self) -> &str {
        "ward_inline_constant_row"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Join(join) = &plan else {
            return Ok(Transformed::no(plan));
        };
        if join.join_type != JoinType::Inner
            || (!join.on.is_empty() && join.null_equality != NullEquality::NullEqualsNothing)
        {
            return Ok(Transformed::no(plan));
        }
        let inlined = match (constant_row(&join.left), constant_row(&join.right)) {
            (_, Some(row)) => inline(join, &join.left, &join.right, row, false)?,
            (Some(row), None) => inline(join, &join.right, &join.left, row, true)?,
            (None, None) => return Ok(Transformed::no(plan)),
        };
        Ok(Transformed::yes(inlined))
    }
}

/// The join of `other` with the constant row `constant` (whose values are
/// `row`), as `other` with the constants appended (prepended when the
/// constant row is the join's left input) and the join's condition as a
/// filter.
fn inline(
    join: &Join,
    other: &Arc<LogicalPlan>,
    constant: &Arc<LogicalPlan>,
    row: Vec<Expr>,
    constant_first: bool,
) -> Result<LogicalPlan> {
    let columns = other
        .schema()
        .iter()
        .map(|(qualifier, field)| Expr::Column(Column::new(qualifier.cloned(), field.name())));
    let constants = constant
        .schema()
        .iter()
        .zip(row)
        .map(|((qualifier, field), value)| value.alias_qualified(qualifier.cloned(), field.name()));
    let exprs: Vec<Expr> = match constant_first {
        true => constants.chain(columns).collect(),
        false => columns.chain(constants).collect(),
    };
    let projected = LogicalPlan::Projection(Projection::try_new(exprs, other.clone())?);
    let condition = conjunction(
        join.on
            .iter()
            .map(|(l, r)| l.clone().eq(r.clone()))
            .chain(join.filter.clone()),
    );
    Ok(match condition {
        Some(predicate) => LogicalPlan::Filter(Filter::try_new(predicate, Arc::new(projected))?),
        None => projected,
    })
}

/// The values of `plan` when it is one row of literals (a projection of
/// literals over a one-row empty relation, under any aliases), in its
/// schema's order.
fn constant_row(plan: &LogicalPlan) -> Option<Vec<Expr>> {
    match plan {
        LogicalPlan::SubqueryAlias(alias) => constant_row(&alias.input),
        LogicalPlan::Projection(projection) => {
            let one_row = matches!(
                projection.input.as_ref(),
                LogicalPlan::EmptyRelation(e) if e.produce_one_row
            );
            let values: Vec<Expr> = projection
                .expr
                .iter()
                .map(|e| match e.clone().unalias() {
                    literal @ Expr::Literal(..) => Some(literal),
                    _ => None,
                })
                .collect::<Option<_>>()?;
            one_row.then_some(values)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Date32Array, Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::{SessionConfig, SessionContext};

    use super::*;

    async fn context(with_rule: bool) -> SessionContext {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        if with_rule {
            ctx.add_optimizer_rule(Arc::new(InlineConstantRow));
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("day", DataType::Date32, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(Date32Array::from(vec![Some(10), Some(20), None, Some(30)])),
            ],
        )
        .unwrap();
        let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("fact", Arc::new(table)).unwrap();
        ctx.sql("CREATE VIEW period AS SELECT CAST(15 AS DATE) AS start_date, CAST(30 AS DATE) AS end_date")
            .await
            .unwrap();
        ctx
    }

    async fn rows(ctx: &SessionContext, sql: &str) -> Vec<String> {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        text.lines().map(str::to_string).collect()
    }

    async fn plan(ctx: &SessionContext, sql: &str) -> String {
        let df = ctx.sql(&format!("EXPLAIN {sql}")).await.unwrap();
        let batches = df.collect().await.unwrap();
        datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn a_join_with_the_period_becomes_a_filter_on_the_scan_with_the_same_rows() {
        let queries = [
            "SELECT f.id, p.start_date, p.end_date FROM fact f CROSS JOIN period p \
             WHERE f.day BETWEEN p.start_date AND p.end_date ORDER BY f.id",
            "SELECT p.*, f.id FROM period p JOIN fact f ON f.day = p.end_date ORDER BY f.id",
            "SELECT f.id, p.end_date FROM fact f CROSS JOIN period p ORDER BY f.id",
            "SELECT count(*) AS n FROM fact a CROSS JOIN period p JOIN fact b ON b.id = a.id \
             WHERE b.day >= p.start_date",
        ];
        let (plain, inlined) = (context(false).await, context(true).await);
        for sql in queries {
            assert_eq!(rows(&plain, sql).await, rows(&inlined, sql).await, "{sql}");
            let before = plan(&plain, sql).await;
            let after = plan(&inlined, sql).await;
            assert!(before.contains("JoinExec"), "{sql}\n{before}");
            assert!(
                !after.contains("NestedLoopJoinExec") && !after.contains("CrossJoinExec"),
                "{sql}\n{after}"
            );
        }
        // The period's bounds reach the table as literals.
        let after = plan(&inlined, queries[0]).await;
        assert!(
            after.contains("day@1 >= 1970-01-16 AND day@1 <= 1970-01-31"),
            "{after}"
        );
    }

    #[tokio::test]
    async fn other_joins_with_a_constant_row_are_left_alone() {
        let ctx = context(true).await;
        let sql = "SELECT f.id, p.end_date FROM fact f LEFT JOIN period p ON f.day = p.end_date \
                   ORDER BY f.id";
        assert!(plan(&ctx, sql).await.contains("Join"));
        let rows = rows(&ctx, sql).await;
        assert_eq!(rows.len(), 4 + 4, "{rows:?}");
    }
}
