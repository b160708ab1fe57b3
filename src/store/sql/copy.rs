//! `portcullis storage copy`: every row of the gateway's tables from one database into a new,
//! empty one (SQLite to PostgreSQL as a deployment grows past one gateway, or back). Rows go
//! as they are stored: sealed secrets stay sealed under the same master key, which the target
//! then requires (its `meta` check value comes along).

use futures_util::TryStreamExt;
use sqlx::Row;

use super::{unavailable, SqlStore, GATEWAY_TABLES};
use crate::store::{StoreError, StoreResult};

/// How a column's values are carried: as the target declares the column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Bytes,
    Text,
}

impl Kind {
    fn of(declared: &str) -> Self {
        let t = declared.to_ascii_lowercase();
        if t.contains("int") || t.contains("serial") {
            Kind::Integer
        } else if t.contains("bytea") || t.contains("blob") {
            Kind::Bytes
        } else {
            Kind::Text
        }
    }
}

/// How many rows of a table are copied between two reports of progress.
pub const PROGRESS_EVERY: u64 = 100_000;

/// What was copied: each table's name and row count, in the order copied.
pub type Copied = Vec<(&'static str, u64)>;

impl SqlStore {
    /// The target's columns of `table`, in their order, with how each is carried.
    async fn columns(&self, table: &str) -> StoreResult<Vec<(String, Kind)>> {
        let sql = if self.sqlite {
            "SELECT name, type FROM pragma_table_info($1) ORDER BY cid"
        } else {
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position"
        };
        let rows = sqlx::query(sql)
            .bind(table)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                let name: String = r.try_get(0).map_err(unavailable)?;
                let declared: String = r.try_get(1).map_err(unavailable)?;
                Ok((name, Kind::of(&declared)))
            })
            .collect()
    }

    /// The gateway's tables that hold any row.
    /// Copies every row of the gateway's tables from `self` into `target`, which must be set up
    /// by this build (migrated first, as `self` is) and hold no row: in one transaction on the
    /// target (all rows or none), read from one snapshot of `self`. The audit trail's ids are
    /// kept, and the target's id sequence is set past them. Two copies into one database at once:
    /// the second waits for the first's lock and is then refused, the target holding rows.
    /// `progress` is told of each table as its copy begins (with 0) and then every
    /// [`PROGRESS_EVERY`] rows (with the count so far).
    pub async fn copy_into(
        &self,
        target: &SqlStore,
        progress: &mut (dyn FnMut(&'static str, u64) + Send),
    ) -> StoreResult<Copied> {
        // Both set up by this version: the same tables and columns on either side.
        crate::store::DurableStore::migrate(self).await?;
        // The target is locked for writing before it is found empty, so that no other copy
        // (nor anything else) writes between the check and the copy.
        let mut into = if target.sqlite {
            target.pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            target.pool.begin().await
        }
        .map_err(|e| {
            StoreError::Conflict(format!(
                "could not lock the target database for writing (is another copy or program \
                 writing to it?): {e}"
            ))
        })?;
        if !target.sqlite {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('portcullis storage copy'))")
                .execute(&mut *into)
                .await
                .map_err(unavailable)?;
        }
        // A command run on the new database to set it up (`user list` as its owner) leaves
        // the master key's check value and nothing else: the source's replaces it.
        sqlx::query(&format!(
            "DELETE FROM meta WHERE name = '{}'",
            crate::token::MASTER_KEY_CHECK
        ))
        .execute(&mut *into)
        .await
        .map_err(unavailable)?;
        let mut used = Vec::new();
        for table in GATEWAY_TABLES {
            let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&mut *into)
                .await
                .map_err(unavailable)?;
            if n > 0 {
                used.push(table);
            }
        }
        if !used.is_empty() {
            return Err(StoreError::Conflict(format!(
                "the target database already holds rows ({}): copy into a new, empty database \
                 that nothing but this command has used",
                used.join(", ")
            )));
        }
        let mut from = self.pool.begin().await.map_err(unavailable)?;
        if !self.sqlite {
            // One snapshot of every table, whatever is written meanwhile.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *from)
                .await
                .map_err(unavailable)?;
        }
        let mut copied = Vec::new();
        // `users` first: every other table's rows refer to a user.
        for table in GATEWAY_TABLES {
            let columns = target.columns(table).await?;
            let names = columns
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let params = (1..=columns.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let insert = format!("INSERT INTO {table} ({names}) VALUES ({params})");
            // Streamed: an audit trail of millions of events is never held whole.
            let select = format!("SELECT {names} FROM {table}");
            progress(table, 0);
            let mut rows = sqlx::query(&select).fetch(&mut *from);
            let mut count = 0u64;
            while let Some(row) = rows.try_next().await.map_err(unavailable)? {
                count += 1;
                let mut q = sqlx::query(&insert);
                for (i, (_, kind)) in columns.iter().enumerate() {
                    q = match kind {
                        Kind::Integer => {
                            q.bind(row.try_get::<Option<i64>, _>(i).map_err(unavailable)?)
                        }
                        Kind::Bytes => {
                            q.bind(row.try_get::<Option<Vec<u8>>, _>(i).map_err(unavailable)?)
                        }
                        Kind::Text => {
                            q.bind(row.try_get::<Option<String>, _>(i).map_err(unavailable)?)
                        }
                    };
                }
                q.execute(&mut *into).await.map_err(unavailable)?;
                if count % PROGRESS_EVERY == 0 {
                    progress(table, count);
                }
            }
            drop(rows);
            copied.push((table, count));
        }
        if !target.sqlite {
            // Explicit ids leave the sequence where it was: the next event would take id 1.
            sqlx::query(
                "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), \
                 COALESCE((SELECT MAX(id) FROM audit_events), 1), \
                 (SELECT MAX(id) FROM audit_events) IS NOT NULL)",
            )
            .execute(&mut *into)
            .await
            .map_err(unavailable)?;
        }
        into.commit().await.map_err(unavailable)?;
        from.rollback().await.map_err(unavailable)?;
        Ok(copied)
    }

    /// The tables of `self` whose rows, counted now, are not as many as [`SqlStore::copy_into`]
    /// copied from its snapshot: each with the count copied and the count now. Any means that
    /// something (a gateway still running on the old database) wrote to it meanwhile, and the
    /// copy lacks that.
    pub async fn changed_since(
        &self,
        copied: &Copied,
    ) -> StoreResult<Vec<(&'static str, u64, u64)>> {
        let mut changed = Vec::new();
        for &(table, then) in copied {
            let now: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)?;
            let now = u64::try_from(now).unwrap_or(0);
            if now != then {
                changed.push((table, then, now));
            }
        }
        Ok(changed)
    }
}
