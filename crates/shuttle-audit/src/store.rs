//! The broker's audit database: SQLite in WAL mode with `synchronous=FULL`, bounded in size,
//! fed exactly once from the monitors' journals.

use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, Transaction};

use crate::journal::{JournalError, JournalSource};
use crate::record::{AuditRecord, Caller, Outcome, RuleRef};

/// How many journal records go into one transaction while collecting. Each transaction also
/// advances the source's high-water mark, so a crash loses no progress beyond one chunk.
pub const COLLECT_CHUNK: usize = 4096;

/// The schema, one migration per version; `MIGRATIONS[0]` takes version 0 to 1.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    "
    CREATE TABLE records (
        -- AUTOINCREMENT: ids are never reused after rotation deletes rows, so a follower's
        -- `after_id` stays meaningful.
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        time         INTEGER NOT NULL,
        op           TEXT NOT NULL,
        from_vm      TEXT NOT NULL,
        to_vm        TEXT,
        object       TEXT NOT NULL,
        result       TEXT NOT NULL,
        rule_index   INTEGER,
        rule_name    TEXT,
        rule_file    TEXT,
        rule_line    INTEGER,
        rule_column  INTEGER,
        pid_in_vm    INTEGER,
        pid_on_host  INTEGER,
        uid          INTEGER,
        program      TEXT,
        reason       TEXT,
        source       TEXT,
        seq          INTEGER NOT NULL
    );
    CREATE INDEX records_time ON records (time, id);
    CREATE INDEX records_from ON records (from_vm);
    CREATE INDEX records_to ON records (to_vm);
    CREATE INDEX records_result ON records (result);

    -- Per-source high-water mark: the highest journal seq already in `records`, for the journal
    -- with this identity. Updated in the same transaction as the inserts it covers.
    CREATE TABLE sources (
        source      TEXT PRIMARY KEY,
        journal_id  TEXT NOT NULL,
        last_seq    INTEGER NOT NULL
    );

    -- Row count kept by triggers, so rotation needs no full count(*) scan.
    CREATE TABLE record_count (n INTEGER NOT NULL);
    INSERT INTO record_count (n) VALUES (0);
    CREATE TRIGGER records_count_insert AFTER INSERT ON records
        BEGIN UPDATE record_count SET n = n + 1; END;
    CREATE TRIGGER records_count_delete AFTER DELETE ON records
        BEGIN UPDATE record_count SET n = n - 1; END;
    ",
];

const COLUMNS: &str = "id, time, op, from_vm, to_vm, object, result, rule_index, rule_name, \
     rule_file, rule_line, rule_column, pid_in_vm, pid_on_host, uid, program, reason, seq";

const ALLOWED: &str = "('allow', 'ask-allow')";

/// Errors of the audit store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or configuring the database failed.
    #[error("open audit database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// Bringing the schema up to date failed.
    #[error("migrate audit database {path} to schema version {version}: {source}")]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The version being applied.
        version: usize,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The database was written by a newer Shuttle.
    #[error(
        "audit database {path} has schema version {found}, newer than the {supported} this \
         shuttle knows; upgrade shuttle"
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: i64,
        /// The newest version this build knows.
        supported: usize,
    },
    /// The limits are unusable.
    #[error("invalid audit limits: max_records must be at least 1")]
    InvalidLimits,
    /// Inserting records (and rotating) failed; nothing of the transaction was kept.
    #[error("insert audit records into {path}: {source}")]
    Insert {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// A query failed.
    #[error("query audit database {path}: {source}")]
    Query {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// A value does not fit the database's 64-bit signed integers.
    #[error("audit record field {field} is out of range: {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// A row holds a value this build cannot read.
    #[error("audit database {path} holds an invalid {field}: {value}")]
    InvalidValue {
        /// The database file.
        path: PathBuf,
        /// The column.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// Reading or truncating a journal failed.
    #[error("collect journal {path} as {source_name}: {source}")]
    Collect {
        /// The journal directory.
        path: PathBuf,
        /// The source name the journal is collected as.
        source_name: String,
        /// The cause.
        source: JournalError,
    },
}

/// Size bounds of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most records kept; beyond it the oldest (by time) are deleted.
    pub max_records: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_records: 1_000_000,
        }
    }
}

/// Which records a query or count covers. `Filter::default()` covers everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only records from or to this VM (or `@host`).
    pub vm: Option<String>,
    /// Only refused requests (`deny`, `ask-deny`, `error`).
    pub denied_only: bool,
    /// Only records with `time >=` this (Unix nanoseconds).
    pub since: Option<u64>,
    /// Only records with a larger id, for `--follow` polling. When set, results are ordered by
    /// id (insertion order) instead of time, so that a follower that continues after the largest
    /// id it has seen can never skip a record that was collected late with an older time.
    pub after_id: Option<i64>,
    /// At most this many records (queries only; counts ignore it).
    pub limit: Option<usize>,
}

/// Allowed and refused decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `allow` and `ask-allow`.
    pub allowed: u64,
    /// `deny`, `ask-deny` and `error`.
    pub denied: u64,
}

/// Decisions on one edge of the interaction graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeCount {
    /// The operation.
    pub op: String,
    /// The requesting VM.
    pub from: String,
    /// The target VM, if the records name one.
    pub to: Option<String>,
    /// `allow` and `ask-allow`.
    pub allowed: u64,
    /// `deny`, `ask-deny` and `error`.
    pub denied: u64,
}

/// The audit database. One process (the broker) owns it for writing; others may read it
/// concurrently (WAL mode).
#[derive(Debug)]
pub struct AuditStore {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
}

impl AuditStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>, limits: Limits) -> Result<AuditStore, StoreError> {
        if limits.max_records == 0 {
            return Err(StoreError::InvalidLimits);
        }
        let path = path.as_ref().to_path_buf();
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        configure(&conn).map_err(open_err)?;
        migrate(&mut conn, &path)?;
        Ok(AuditStore { conn, path, limits })
    }

    /// Opens an existing database for reading only (e.g. for `shuttle audit` while the broker
    /// writes).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<AuditStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let version = schema_version(&conn).map_err(open_err)?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::SchemaTooNew {
                path,
                found: version,
                supported: MIGRATIONS.len(),
            });
        }
        Ok(AuditStore {
            conn,
            path,
            limits: Limits::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of records held.
    pub fn len(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT n FROM record_count", [], |r| r.get(0))
            .map_err(|source| self.query_err(source))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Inserts one record durably (the transaction is committed with `synchronous=FULL`) and
    /// returns its id. Rotates if the store grew beyond its limit.
    pub fn insert(&mut self, record: &AuditRecord) -> Result<i64, StoreError> {
        let ids = self.insert_batch(std::slice::from_ref(record))?;
        Ok(ids.first().copied().unwrap_or_default())
    }

    /// Inserts records in one transaction and returns their ids.
    pub fn insert_batch(&mut self, records: &[AuditRecord]) -> Result<Vec<i64>, StoreError> {
        let max = self.limits.max_records;
        let path = self.path.clone();
        let insert_err = |source| StoreError::Insert {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(insert_err)?;
        let mut ids = Vec::with_capacity(records.len());
        for record in records {
            ids.push(insert_row(&tx, record, None)?);
        }
        rotate(&tx, max).map_err(insert_err)?;
        tx.commit().map_err(insert_err)?;
        Ok(ids)
    }

    /// The highest journal sequence number already collected from `source`, with the identity of
    /// the journal it came from.
    pub fn high_water_mark(&self, source: &str) -> Result<Option<(String, u64)>, StoreError> {
        let row: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT journal_id, last_seq FROM sources WHERE source = ?1",
                [source],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|source| self.query_err(source))?;
        Ok(row.map(|(id, seq)| (id, u64::try_from(seq).unwrap_or(0))))
    }

    /// Moves the journal's records into the database, exactly once, and returns how many were
    /// added.
    ///
    /// Records are inserted in transactions of [`COLLECT_CHUNK`]; each transaction also advances
    /// the high-water mark of `source` (a stable name for the journal, e.g. the VM name). Only
    /// after the commit are the collected segments deleted from the journal. A crash in between
    /// leaves records in both places, and the next collection skips every `seq <=` the mark, so
    /// nothing is inserted twice. A journal with a different identity under the same source
    /// name (the VM was removed and created again) starts from the beginning.
    ///
    /// `journal` is a journal directory's path (`&path`), `&mut JournalReader`, or
    /// `&mut Journal`.
    pub fn collect_from<J: JournalSource>(
        &mut self,
        mut journal: J,
        source: &str,
    ) -> Result<usize, StoreError> {
        let journal_path = journal.journal_path().to_path_buf();
        let collect_err = |e| StoreError::Collect {
            path: journal_path.clone(),
            source_name: source.to_owned(),
            source: e,
        };
        let Some(journal_id) = journal.journal_id().map_err(collect_err)? else {
            return Ok(0);
        };
        let mut last = match self.high_water_mark(source)? {
            Some((id, seq)) if id == journal_id => Some(seq),
            _ => None,
        };
        let mut records = journal
            .records_from(last.map_or(0, |s| s.saturating_add(1)))
            .map_err(collect_err)?;
        let mut collected = 0;
        let mut pending_error = None;
        loop {
            let mut chunk = Vec::new();
            for item in records.by_ref() {
                match item {
                    Ok(record) if last.is_none_or(|l| record.seq > l) => chunk.push(record),
                    Ok(_) => {}
                    Err(e) => {
                        // Keep what was read before the damage; report the damage after.
                        pending_error = Some(e);
                        break;
                    }
                }
                if chunk.len() == COLLECT_CHUNK {
                    break;
                }
            }
            if chunk.is_empty() {
                break;
            }
            last = Some(self.insert_collected(&chunk, source, &journal_id)?);
            collected += chunk.len();
            if pending_error.is_some() {
                break;
            }
        }
        drop(records);
        if let Some(last) = last {
            journal.drop_through(last).map_err(collect_err)?;
        }
        match pending_error {
            Some(e) => Err(collect_err(e)),
            None => Ok(collected),
        }
    }

    /// Inserts one chunk and the new high-water mark in one transaction; returns the mark.
    fn insert_collected(
        &mut self,
        chunk: &[AuditRecord],
        source: &str,
        journal_id: &str,
    ) -> Result<u64, StoreError> {
        let max = self.limits.max_records;
        let path = self.path.clone();
        let insert_err = |source| StoreError::Insert {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(insert_err)?;
        let mut high = 0;
        for record in chunk {
            insert_row(&tx, record, Some(source))?;
            high = high.max(record.seq);
        }
        tx.execute(
            "INSERT INTO sources (source, journal_id, last_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (source) DO UPDATE SET journal_id = ?2, last_seq = ?3",
            params![source, journal_id, to_i64("seq", high)?],
        )
        .map_err(insert_err)?;
        rotate(&tx, max).map_err(insert_err)?;
        tx.commit().map_err(insert_err)?;
        Ok(high)
    }

    /// The records the filter selects, ordered by time then id (by id when
    /// [`Filter::after_id`] is set), with their ids.
    pub fn query(&self, filter: &Filter) -> Result<Vec<(i64, AuditRecord)>, StoreError> {
        let (clause, mut values) = where_clause(filter)?;
        let order = if filter.after_id.is_some() {
            "id"
        } else {
            "time, id"
        };
        let mut sql = format!("SELECT {COLUMNS} FROM records{clause} ORDER BY {order}");
        if let Some(limit) = filter.limit {
            sql.push_str(" LIMIT ?");
            values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        }
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(|source| self.query_err(source))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), read_row)
            .map_err(|source| self.query_err(source))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, record, result) = row.map_err(|source| self.query_err(source))?;
            let result = Outcome::parse(&result).ok_or_else(|| StoreError::InvalidValue {
                path: self.path.clone(),
                field: "result",
                value: result.clone(),
            })?;
            out.push((id, AuditRecord { result, ..record }));
        }
        Ok(out)
    }

    /// Allowed and refused decisions among the records the filter selects (its `limit` is
    /// ignored).
    pub fn counts(&self, filter: &Filter) -> Result<Counts, StoreError> {
        let (clause, values) = where_clause(filter)?;
        let sql = format!(
            "SELECT coalesce(sum(result IN {ALLOWED}), 0), coalesce(sum(result NOT IN {ALLOWED}), 0)
             FROM records{clause}"
        );
        self.conn
            .query_row(&sql, rusqlite::params_from_iter(values), |r| {
                Ok(Counts {
                    allowed: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    denied: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                })
            })
            .map_err(|source| self.query_err(source))
    }

    /// Allowed and refused decisions per (op, from, to), for the interaction graph, among the
    /// records the filter selects (its `limit` is ignored). Ordered by op, from, to.
    pub fn counts_by_edge(&self, filter: &Filter) -> Result<Vec<EdgeCount>, StoreError> {
        let (clause, values) = where_clause(filter)?;
        let sql = format!(
            "SELECT op, from_vm, to_vm, sum(result IN {ALLOWED}), sum(result NOT IN {ALLOWED})
             FROM records{clause}
             GROUP BY op, from_vm, to_vm
             ORDER BY op, from_vm, to_vm"
        );
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(|source| self.query_err(source))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), |r| {
                Ok(EdgeCount {
                    op: r.get(0)?,
                    from: r.get(1)?,
                    to: r.get(2)?,
                    allowed: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                    denied: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                })
            })
            .map_err(|source| self.query_err(source))?;
        rows.collect::<Result<_, _>>()
            .map_err(|source| self.query_err(source))
    }

    fn query_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Query {
            path: self.path.clone(),
            source,
        }
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // WAL: readers (the CLI) never block the writer (the broker). synchronous=FULL: a commit is
    // on stable storage when it returns, which collection relies on before it deletes journal
    // segments.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, expected wal"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    let has_table: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
        [],
        |r| r.get(0),
    )?;
    if !has_table {
        return Ok(0);
    }
    conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let migrate_err = |version, source| StoreError::Migrate {
        path: path.to_path_buf(),
        version,
        source,
    };
    // IMMEDIATE: two processes opening a fresh database at once must not both migrate it.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| migrate_err(0, e))?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(|e| migrate_err(0, e))?;
    let current = schema_version(&tx).map_err(|e| migrate_err(0, e))?;
    if current > MIGRATIONS.len() as i64 {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found: current,
            supported: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = index + 1;
        if (version as i64) <= current {
            continue;
        }
        tx.execute_batch(sql).map_err(|e| migrate_err(version, e))?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [version as i64],
        )
        .map_err(|e| migrate_err(version, e))?;
    }
    tx.commit().map_err(|e| migrate_err(MIGRATIONS.len(), e))
}

/// Deletes the oldest records (by time, then id) beyond `max`, inside the caller's
/// transaction, so the database never holds more than `max` records after a commit.
fn rotate(tx: &Transaction<'_>, max: u64) -> rusqlite::Result<()> {
    let n: i64 = tx.query_row("SELECT n FROM record_count", [], |r| r.get(0))?;
    let excess = n.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
    if excess > 0 {
        tx.execute(
            "DELETE FROM records WHERE id IN
                (SELECT id FROM records ORDER BY time, id LIMIT ?1)",
            [excess],
        )?;
    }
    Ok(())
}

fn to_i64(field: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { field, value })
}

fn insert_row(
    tx: &Transaction<'_>,
    record: &AuditRecord,
    source: Option<&str>,
) -> Result<i64, StoreError> {
    let rule = record.rule.as_ref();
    let rule_index = rule
        .map(|r| to_i64("rule.index", r.index as u64))
        .transpose()?;
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO records (time, op, from_vm, to_vm, object, result, rule_index, rule_name,
                rule_file, rule_line, rule_column, pid_in_vm, pid_on_host, uid, program, reason,
                source, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        )
        .map_err(|source| insert_error(tx, source))?;
    stmt.execute(params![
        to_i64("time", record.time)?,
        record.op,
        record.from,
        record.to,
        record.object,
        record.result.as_str(),
        rule_index,
        rule.and_then(|r| r.name.as_deref()),
        rule.map(|r| r.file.as_str()),
        rule.map(|r| r.line),
        rule.map(|r| r.column),
        record.caller.pid_in_vm,
        record.caller.pid_on_host,
        record.caller.uid,
        record.caller.program,
        record.reason,
        source,
        to_i64("seq", record.seq)?,
    ])
    .map_err(|source| insert_error(tx, source))?;
    Ok(tx.last_insert_rowid())
}

fn insert_error(tx: &Transaction<'_>, source: rusqlite::Error) -> StoreError {
    StoreError::Insert {
        path: tx.path().map(PathBuf::from).unwrap_or_default(),
        source,
    }
}

fn where_clause(filter: &Filter) -> Result<(String, Vec<Value>), StoreError> {
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    if let Some(vm) = &filter.vm {
        conditions.push("(from_vm = ? OR to_vm = ?)".to_owned());
        values.push(Value::Text(vm.clone()));
        values.push(Value::Text(vm.clone()));
    }
    if filter.denied_only {
        conditions.push(format!("result NOT IN {ALLOWED}"));
    }
    if let Some(since) = filter.since {
        conditions.push("time >= ?".to_owned());
        values.push(Value::Integer(to_i64("since", since)?));
    }
    if let Some(after) = filter.after_id {
        conditions.push("id > ?".to_owned());
        values.push(Value::Integer(after));
    }
    let clause = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    Ok((clause, values))
}

/// A row as (id, record with a placeholder result, result text); the caller parses the result
/// so a bad value becomes a typed error rather than a panic.
fn read_row(r: &Row<'_>) -> rusqlite::Result<(i64, AuditRecord, String)> {
    let rule_file: Option<String> = r.get(9)?;
    let rule = match rule_file {
        Some(file) => Some(RuleRef {
            index: usize::try_from(r.get::<_, i64>(7)?).unwrap_or(usize::MAX),
            name: r.get(8)?,
            file,
            line: r.get(10)?,
            column: r.get(11)?,
        }),
        None => None,
    };
    let record = AuditRecord {
        time: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
        op: r.get(2)?,
        from: r.get(3)?,
        to: r.get(4)?,
        object: r.get(5)?,
        result: Outcome::Error,
        rule,
        caller: Caller {
            pid_in_vm: r.get(12)?,
            pid_on_host: r.get(13)?,
            uid: r.get(14)?,
            program: r.get(15)?,
        },
        reason: r.get(16)?,
        seq: u64::try_from(r.get::<_, i64>(17)?).unwrap_or(0),
    };
    Ok((r.get(0)?, record, r.get(6)?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn newer_schema_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        drop(AuditStore::open(&path, Limits::default()).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute("INSERT INTO schema_version (version) VALUES (99)", [])
            .unwrap();
        drop(conn);
        let err = AuditStore::open(&path, Limits::default()).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade shuttle"), "{err}");
    }

    #[test]
    fn database_is_in_wal_mode_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("audit.db"), Limits::default()).unwrap();
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = store
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "FULL");
        let version = schema_version(&store.conn).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn out_of_range_time_is_an_error_not_a_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = AuditStore::open(dir.path().join("audit.db"), Limits::default()).unwrap();
        let mut r = AuditRecord {
            time: u64::MAX,
            op: "signal".into(),
            from: "web".into(),
            to: None,
            object: "TERM".into(),
            result: Outcome::Deny,
            rule: None,
            caller: Caller::default(),
            reason: None,
            seq: 0,
        };
        let err = store.insert(&r).unwrap_err();
        assert!(
            matches!(err, StoreError::OutOfRange { field: "time", .. }),
            "{err}"
        );
        assert_eq!(
            store.len().unwrap(),
            0,
            "the failed transaction left nothing"
        );
        r.time = 1;
        store.insert(&r).unwrap();
        assert_eq!(store.len().unwrap(), 1);
    }
}
