//! The durable job store: SQLite in WAL mode, one row per job, and the job state machine.
//!
//! # Theory of operation
//! ```text
//! queued -> leased(lease_id) -> delivered | bounced | expired          (final)
//!                            -> deferred(next_attempt_at) -> leased     (when due)
//! leased -> queued            release() (never sent) or recover() at start-up (flagged in_doubt)
//! invalid                     rows rejected at ingestion (bad address, duplicate, ...), final
//! ```
//! Every public method that writes is **one transaction**, and the caller batches: the
//! dispatcher leases many jobs at once, and outcomes are recorded many at once. The database runs
//! with `synchronous=NORMAL` in WAL mode: a committed transaction survives a process crash; an OS
//! crash or power loss can lose the last few transactions. Either way the loss is bounded to the
//! last batch window and can only *replay* work (a job whose `delivered` was lost is sent again,
//! with the same Message-ID), never lose a job: a job only leaves the spool by a committed final
//! state.
//!
//! The interface is deliberately small (open, recover, campaign, ingest, lease, release, record,
//! counts, next_due, invalid_rows) so a second backend could implement the same calls.
//!
//! The schema is versioned with `PRAGMA user_version`; a spool written by a newer governor is
//! refused rather than misread.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::campaign::Row;

/// Schema version this code writes and understands.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS campaigns (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    template      TEXT NOT NULL,
    sender        TEXT NOT NULL,
    fields        TEXT NOT NULL,            -- JSON array of column names
    nonce         TEXT NOT NULL,            -- random, part of every Message-ID
    rows_ingested INTEGER NOT NULL DEFAULT 0,
    ingest_done   INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY,
    campaign_id      INTEGER NOT NULL REFERENCES campaigns(id),
    line             INTEGER NOT NULL,      -- physical line in the recipients file
    recipient        TEXT NOT NULL,         -- address (raw email value for invalid rows)
    addr_key         TEXT,                  -- lowercased address, for dedupe; NULL if invalid
    vals             TEXT NOT NULL,         -- JSON array of merge values
    message_id       TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN
                       ('queued','leased','delivered','deferred','bounced','expired','invalid')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    lease_id         INTEGER,
    next_attempt_at  REAL,
    first_attempt_at REAL,
    last_code        INTEGER,
    last_enhanced    TEXT,
    last_text        TEXT,
    in_doubt         INTEGER NOT NULL DEFAULT 0,
    reason           TEXT,                  -- why invalid
    updated_at       REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedupe ON jobs(campaign_id, addr_key) WHERE addr_key IS NOT NULL;
-- lease(): queued jobs in id order, due deferred jobs by time; both small partial indexes, so a
-- million delivered rows cost nothing.
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs(id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_deferred ON jobs(next_attempt_at, id) WHERE state = 'deferred';
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs(id) WHERE state = 'leased';
CREATE INDEX IF NOT EXISTS jobs_invalid ON jobs(campaign_id, line) WHERE state = 'invalid';
-- Jobs per (campaign, state), kept in the same transactions as the job rows, so counts() reads
-- a few rows instead of scanning a million. State moves are tallied by the Rust code that makes
-- them (each knows the old state: that halves the cost of record() compared with a trigger);
-- the rare in-doubt flag changes are counted by a trigger, under the pseudo-state 'in_doubt'.
CREATE TABLE IF NOT EXISTS state_counts (
    campaign_id INTEGER NOT NULL,
    state       TEXT NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (campaign_id, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS jobs_count_doubt AFTER UPDATE OF in_doubt ON jobs
WHEN OLD.in_doubt IS NOT NEW.in_doubt BEGIN
    INSERT OR IGNORE INTO state_counts VALUES (NEW.campaign_id, 'in_doubt', 0);
    UPDATE state_counts SET n = n + NEW.in_doubt - OLD.in_doubt
    WHERE campaign_id = NEW.campaign_id AND state = 'in_doubt';
END;
"#;

/// A spool failure. Display names the spool file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// SQLite failed (open, I/O, corruption, locked, ...).
    #[error("spool {}: {source}", path.display())]
    Sqlite {
        /// The spool file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The spool's directory could not be created.
    #[error("spool {}: cannot create directory: {}", path.display(), crate::config::io_reason(source))]
    Dir {
        /// The spool file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The spool was written by a newer governor.
    #[error(
        "spool {}: schema version {found} is newer than this governor understands ({SCHEMA_VERSION}); \
         run the newer governor or point `spool` at a new file",
        path.display()
    )]
    TooNew {
        /// The spool file.
        path: PathBuf,
        /// Version found in the file.
        found: i64,
    },
    /// A campaign of that name exists with different settings.
    #[error(
        "spool {}: campaign `{name}` already exists with a different {what}; a campaign's template, \
         sender and columns are fixed once it starts: use a new campaign name or a new spool",
        path.display()
    )]
    CampaignChanged {
        /// The spool file.
        path: PathBuf,
        /// The campaign's name.
        name: String,
        /// What differs: "template", "sender" or "columns".
        what: &'static str,
    },
    /// A stored value could not be decoded (corrupt or hand-edited spool).
    #[error("spool {}: job {job_id}: corrupt {what}; the spool was edited or damaged", path.display())]
    Corrupt {
        /// The spool file.
        path: PathBuf,
        /// The job concerned.
        job_id: u64,
        /// What could not be decoded.
        what: &'static str,
    },
}

/// A campaign as the spool knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignRow {
    /// Spool id.
    pub id: u64,
    /// Operator's name (unique).
    pub name: String,
    /// Data rows of the recipients file already ingested (to resume with `skip`).
    pub rows_ingested: u64,
    /// Whether the whole recipients file has been ingested.
    pub ingest_done: bool,
}

/// A job handed out by [`Spool::lease`].
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedJob {
    /// Job id.
    pub job_id: u64,
    /// Fresh, never reused lease id; an outcome must quote it.
    pub lease_id: u64,
    /// Campaign id.
    pub campaign_id: u64,
    /// Attempt number this lease is for (stored attempts + 1).
    pub attempt: u32,
    /// Recipient address.
    pub recipient: String,
    /// Merge values in the campaign's column order.
    pub values: Vec<String>,
    /// Message-ID (no angle brackets), the same on every attempt.
    pub message_id: String,
    /// An earlier attempt may have delivered it (lost reply, or leased at a crash).
    pub in_doubt: bool,
    /// When the first attempt ended (unix seconds), if any.
    pub first_attempt_at: Option<f64>,
}

/// A final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Final {
    /// 2xx after the final dot.
    Delivered,
    /// Permanent failure, or retries exhausted on a permanent-looking error.
    Bounced,
    /// Gave up: retry limit or maximum age reached.
    Expired,
}

/// What an attempt did to a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Update {
    /// The job is finished.
    Final(Final),
    /// Try again at `next_attempt_at` (unix seconds).
    Deferred {
        /// When the job becomes due again.
        next_attempt_at: f64,
    },
}

/// The result of one attempt, to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Job id.
    pub job_id: u64,
    /// New state.
    pub update: Update,
    /// The attempt number that ended (becomes the stored attempt count).
    pub attempt: u32,
    /// SMTP reply code (0 if none).
    pub code: u16,
    /// Enhanced status code, if given.
    pub enhanced: Option<String>,
    /// Reply text or local reason.
    pub text: String,
    /// The attempt ended in doubt (sticky on the job).
    pub in_doubt: bool,
    /// When the attempt ended (unix seconds).
    pub at: f64,
}

/// Jobs per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// All jobs (including invalid rows).
    pub total: u64,
    /// Waiting for a first or re-attempt.
    pub queued: u64,
    /// Handed to a worker.
    pub leased: u64,
    /// Waiting for next_attempt_at.
    pub deferred: u64,
    /// Delivered.
    pub delivered: u64,
    /// Bounced.
    pub bounced: u64,
    /// Expired.
    pub expired: u64,
    /// Rejected at ingestion.
    pub invalid: u64,
    /// Jobs carrying the in-doubt flag (in any state).
    pub in_doubt: u64,
}

impl Counts {
    /// Jobs in a final state (delivered, bounced, expired, invalid).
    pub fn finished(&self) -> u64 {
        self.delivered + self.bounced + self.expired + self.invalid
    }
}

/// What one [`Spool::ingest`] call added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Rows given.
    pub rows: u64,
    /// Jobs queued.
    pub queued: u64,
    /// Rows stored as invalid (including duplicates).
    pub invalid: u64,
    /// Of those, duplicates of an earlier row.
    pub duplicates: u64,
}

impl std::ops::AddAssign for IngestStats {
    fn add_assign(&mut self, o: IngestStats) {
        self.rows += o.rows;
        self.queued += o.queued;
        self.invalid += o.invalid;
        self.duplicates += o.duplicates;
    }
}

/// The SQLite spool.
pub struct Spool {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish()
    }
}

fn state_name(u: &Update) -> &'static str {
    match u {
        Update::Final(Final::Delivered) => "delivered",
        Update::Final(Final::Bounced) => "bounced",
        Update::Final(Final::Expired) => "expired",
        Update::Deferred { .. } => "deferred",
    }
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// State moves made in one transaction, written to `state_counts` before it commits.
#[derive(Default)]
struct Tally(std::collections::HashMap<(i64, &'static str), i64>);

impl Tally {
    fn add(&mut self, campaign_id: i64, state: &'static str, delta: i64) {
        *self.0.entry((campaign_id, state)).or_default() += delta;
    }

    fn moved(&mut self, campaign_id: i64, from: &'static str, to: &'static str) {
        self.add(campaign_id, from, -1);
        self.add(campaign_id, to, 1);
    }

    fn flush(self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO state_counts (campaign_id, state, n) VALUES (?1, ?2, 0)",
        )?;
        let mut upd = tx.prepare_cached(
            "UPDATE state_counts SET n = n + ?3 WHERE campaign_id = ?1 AND state = ?2",
        )?;
        for ((campaign_id, state), delta) in self.0 {
            if delta != 0 {
                ins.execute(params![campaign_id, state])?;
                upd.execute(params![campaign_id, state, delta])?;
            }
        }
        Ok(())
    }
}

/// 16 hex digits from the OS RNG (falls back to std's randomly keyed hasher).
fn random_nonce() -> String {
    use std::io::Read;
    let mut b = [0u8; 8];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    let v = match from_os {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos()));
            h.write_u32(std::process::id());
            h.finish()
        }
    };
    format!("{v:016x}")
}

impl Spool {
    /// Open (or create, with its parent directory) the spool at `path` and bring the schema up
    /// to date.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let sq = |source| SpoolError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(sq)?;
        let mut spool = Spool {
            conn,
            path: path.to_path_buf(),
        };
        spool.init().map_err(sq)?;
        let found: i64 = spool
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sq)?;
        if found > SCHEMA_VERSION {
            return Err(SpoolError::TooNew {
                path: path.to_path_buf(),
                found,
            });
        }
        if found < SCHEMA_VERSION {
            // Version 0 is a new file; later versions add migrations here, each in the same
            // transaction as the user_version bump.
            let tx = spool.conn.transaction().map_err(sq)?;
            tx.execute_batch(SCHEMA).map_err(sq)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sq)?;
            tx.commit().map_err(sq)?;
        }
        Ok(spool)
    }

    fn init(&mut self) -> rusqlite::Result<()> {
        self.conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // journal_mode returns a row; pragma_update would complain.
        let _: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.conn.pragma_update(None, "foreign_keys", true)?;
        // 16 MiB page cache: lease/record walk small partial indexes and touch rows in id
        // order, so a bounded cache serves them; it also caps the governor's memory whatever
        // the size of the recipients list (measured: peak RSS plateaus, see scripts/rss-recipients).
        self.conn.pragma_update(None, "cache_size", -16384)?;
        Ok(())
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn tx(&mut self) -> Result<Transaction<'_>, SpoolError> {
        let path = self.path.clone();
        self.conn
            .transaction()
            .map_err(|source| SpoolError::Sqlite { path, source })
    }

    /// Start-up recovery: every `leased` job goes back to `queued` flagged in doubt, since it
    /// may have been in flight when the previous governor died. Returns how many.
    pub fn recover(&mut self) -> Result<u64, SpoolError> {
        let path = self.path.clone();
        let sq = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_unix();
        let tx = self.tx()?;
        let mut tally = Tally::default();
        let mut n = 0;
        {
            let mut st = tx
                .prepare(
                    "UPDATE jobs SET state = 'queued', lease_id = NULL, in_doubt = 1, updated_at = ?1
                     WHERE state = 'leased' RETURNING campaign_id",
                )
                .map_err(sq)?;
            let mut rows = st.query(params![now]).map_err(sq)?;
            while let Some(r) = rows.next().map_err(sq)? {
                tally.moved(r.get(0).map_err(sq)?, "leased", "queued");
                n += 1;
            }
        }
        tally.flush(&tx).map_err(sq)?;
        tx.commit().map_err(sq)?;
        Ok(n)
    }

    /// Open the campaign `name`, creating it if new. `template` is the template text (or any
    /// string that identifies it), `fields` the recipients header. An existing campaign with a
    /// different template, sender or columns is an error: its queued jobs were made for the old
    /// ones.
    pub fn campaign(
        &mut self,
        name: &str,
        template: &str,
        sender: &str,
        fields: &[String],
    ) -> Result<CampaignRow, SpoolError> {
        let fields_json = serde_json::to_string(fields).expect("strings serialize");
        let path = self.path.clone();
        let sq = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sq)?;
        let existing = tx
            .query_row(
                "SELECT id, template, sender, fields, rows_ingested, ingest_done
                 FROM campaigns WHERE name = ?1",
                params![name],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, bool>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(sq)?;
        let row = match existing {
            Some((id, t, s, f, rows, done)) => {
                let what = if t != template {
                    Some("template")
                } else if s != sender {
                    Some("sender")
                } else if f != fields_json {
                    Some("columns")
                } else {
                    None
                };
                if let Some(what) = what {
                    return Err(SpoolError::CampaignChanged {
                        path: path.clone(),
                        name: name.to_string(),
                        what,
                    });
                }
                CampaignRow {
                    id: id as u64,
                    name: name.to_string(),
                    rows_ingested: rows as u64,
                    ingest_done: done,
                }
            }
            None => {
                tx.execute(
                    "INSERT INTO campaigns (name, template, sender, fields, nonce, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        name,
                        template,
                        sender,
                        fields_json,
                        random_nonce(),
                        now_unix()
                    ],
                )
                .map_err(sq)?;
                CampaignRow {
                    id: tx.last_insert_rowid() as u64,
                    name: name.to_string(),
                    rows_ingested: 0,
                    ingest_done: false,
                }
            }
        };
        tx.commit().map_err(sq)?;
        Ok(row)
    }

    /// All campaigns, in creation order.
    pub fn campaigns(&self) -> Result<Vec<CampaignRow>, SpoolError> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, rows_ingested, ingest_done FROM campaigns ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(CampaignRow {
                    id: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    rows_ingested: r.get::<_, i64>(2)? as u64,
                    ingest_done: r.get(3)?,
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Insert a batch of rows in ONE transaction together with the new resume point
    /// (`rows_ingested_after` = data rows of the file consumed so far, `done` = the file is
    /// exhausted), so a crash between batches resumes exactly. Valid rows become `queued` unless
    /// their lowercased address was seen before in this campaign, which makes them `invalid`
    /// with "duplicate of line N". Message-IDs are fixed here:
    /// `<campaign>.<line>.<nonce>@<sender domain>`.
    pub fn ingest(
        &mut self,
        campaign_id: u64,
        rows: &[Row],
        rows_ingested_after: u64,
        done: bool,
    ) -> Result<IngestStats, SpoolError> {
        let path = self.path.clone();
        let sq = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.tx()?;
        let (name, sender, nonce): (String, String, String) = tx
            .query_row(
                "SELECT name, sender, nonce FROM campaigns WHERE id = ?1",
                params![campaign_id as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(sq)?;
        let domain = sender
            .rsplit_once('@')
            .map_or(sender.as_str(), |(_, d)| d)
            .to_string();
        let now = now_unix();
        let mut stats = IngestStats::default();
        let mut tally = Tally::default();
        {
            let mut find_dup = tx
                .prepare_cached("SELECT line FROM jobs WHERE campaign_id = ?1 AND addr_key = ?2")
                .map_err(sq)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO jobs (campaign_id, line, recipient, addr_key, vals, message_id,
                                       state, reason, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(sq)?;
            let mut insert_new = tx
                .prepare_cached(
                    "INSERT INTO jobs (campaign_id, line, recipient, addr_key, vals, message_id,
                                       state, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7)
                     ON CONFLICT (campaign_id, addr_key) WHERE addr_key IS NOT NULL DO NOTHING",
                )
                .map_err(sq)?;
            for row in rows {
                stats.rows += 1;
                let line = row.line();
                let message_id = format!("{name}.{line}.{nonce}@{domain}");
                match row {
                    Row::Valid { email, values, .. } => {
                        let key = email.to_lowercase();
                        let vals = serde_json::to_string(values).expect("strings serialize");
                        // One index probe in the common case: the insert itself detects the
                        // duplicate; only then is the first line looked up for the reason.
                        let added = insert_new
                            .execute(params![
                                campaign_id as i64,
                                line as i64,
                                email,
                                key,
                                vals,
                                message_id,
                                now
                            ])
                            .map_err(sq)?;
                        if added == 1 {
                            stats.queued += 1;
                            tally.add(campaign_id as i64, "queued", 1);
                            continue;
                        }
                        tally.add(campaign_id as i64, "invalid", 1);
                        let first: i64 = find_dup
                            .query_row(params![campaign_id as i64, key], |r| r.get(0))
                            .map_err(sq)?;
                        stats.invalid += 1;
                        stats.duplicates += 1;
                        insert
                            .execute(params![
                                campaign_id as i64,
                                line as i64,
                                email,
                                Option::<String>::None,
                                vals,
                                message_id,
                                "invalid",
                                format!("duplicate of line {first}"),
                                now
                            ])
                            .map_err(sq)?;
                    }
                    Row::Invalid {
                        raw_email, reason, ..
                    } => {
                        stats.invalid += 1;
                        tally.add(campaign_id as i64, "invalid", 1);
                        insert
                            .execute(params![
                                campaign_id as i64,
                                line as i64,
                                raw_email,
                                Option::<String>::None,
                                "[]",
                                message_id,
                                "invalid",
                                reason,
                                now
                            ])
                            .map_err(sq)?;
                    }
                }
            }
        }
        tx.execute(
            "UPDATE campaigns SET rows_ingested = ?2, ingest_done = ?3 WHERE id = ?1",
            params![campaign_id as i64, rows_ingested_after as i64, done],
        )
        .map_err(sq)?;
        tally.flush(&tx).map_err(sq)?;
        tx.commit().map_err(sq)?;
        Ok(stats)
    }

    /// Lease up to `limit` jobs: queued ones and deferred ones due at `now`, returned in id
    /// order. When more are ready than `limit`, the lowest queued ids and the longest-due
    /// deferred jobs are taken first (each side in O(limit) from its index).
    /// Each gets state `leased` and a fresh lease id; `attempt` is the stored attempts + 1 (it is
    /// stored only by [`Spool::record`]). One transaction.
    pub fn lease(&mut self, now: f64, limit: usize) -> Result<Vec<LeasedJob>, SpoolError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let path = self.path.clone();
        let sq = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.tx()?;
        // (id, state it is leased from)
        let mut ids: Vec<(i64, &'static str)> = Vec::with_capacity(limit);
        {
            // Two range scans of small partial indexes, merged by id. Due deferred jobs are taken
            // longest-due first (that is what their index gives in O(limit); ordering them by id
            // would sort every due job on each call), then compete with queued jobs by id.
            let mut q = tx
                .prepare_cached("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT ?1")
                .map_err(sq)?;
            for id in q
                .query_map(params![limit as i64], |r| r.get::<_, i64>(0))
                .map_err(sq)?
            {
                ids.push((id.map_err(sq)?, "queued"));
            }
            let mut d = tx
                .prepare_cached(
                    "SELECT id FROM jobs WHERE state = 'deferred' AND next_attempt_at <= ?1
                     ORDER BY next_attempt_at, id LIMIT ?2",
                )
                .map_err(sq)?;
            for id in d
                .query_map(params![now, limit as i64], |r| r.get::<_, i64>(0))
                .map_err(sq)?
            {
                ids.push((id.map_err(sq)?, "deferred"));
            }
        }
        ids.sort_unstable();
        ids.truncate(limit);
        let mut next_lease: i64 = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'next_lease_id'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sq)?
            .unwrap_or(1);
        let mut jobs = Vec::with_capacity(ids.len());
        let mut tally = Tally::default();
        {
            // One B-tree visit per job: update and read back in the same statement.
            let mut take = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'leased', lease_id = ?2, updated_at = ?3 WHERE id = ?1
                     RETURNING campaign_id, attempts, recipient, vals, message_id, in_doubt,
                               first_attempt_at",
                )
                .map_err(sq)?;
            for (id, from) in ids {
                let (campaign_id, attempts, recipient, vals, message_id, in_doubt, first) = take
                    .query_row(params![id, next_lease, now], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, bool>(5)?,
                            r.get::<_, Option<f64>>(6)?,
                        ))
                    })
                    .map_err(sq)?;
                let values: Vec<String> =
                    serde_json::from_str(&vals).map_err(|_| SpoolError::Corrupt {
                        path: path.clone(),
                        job_id: id as u64,
                        what: "merge values",
                    })?;
                jobs.push(LeasedJob {
                    job_id: id as u64,
                    lease_id: next_lease as u64,
                    campaign_id: campaign_id as u64,
                    attempt: (attempts as u32).saturating_add(1),
                    recipient,
                    values,
                    message_id,
                    in_doubt,
                    first_attempt_at: first,
                });
                tally.moved(campaign_id, from, "leased");
                next_lease += 1;
            }
        }
        tally.flush(&tx).map_err(sq)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('next_lease_id', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![next_lease],
        )
        .map_err(sq)?;
        tx.commit().map_err(sq)?;
        Ok(jobs)
    }

    /// Put leased jobs that were never sent back to `queued` (clean shutdown, drain). Jobs not
    /// in `leased` are left alone.
    pub fn release(&mut self, job_ids: &[u64]) -> Result<(), SpoolError> {
        self.requeue(job_ids, false)
    }

    /// Put leased jobs that may have been in flight back to `queued` flagged in doubt (their
    /// worker died or was killed mid-session). Jobs not in `leased` are left alone.
    pub fn release_in_doubt(&mut self, job_ids: &[u64]) -> Result<(), SpoolError> {
        self.requeue(job_ids, true)
    }

    fn requeue(&mut self, job_ids: &[u64], in_doubt: bool) -> Result<(), SpoolError> {
        let path = self.path.clone();
        let sq = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_unix();
        let tx = self.tx()?;
        let mut tally = Tally::default();
        {
            let mut st = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'queued', lease_id = NULL, in_doubt = in_doubt | ?2,
                                     updated_at = ?3
                     WHERE id = ?1 AND state = 'leased' RETURNING campaign_id",
                )
                .map_err(sq)?;
            for &id in job_ids {
                let cid: Option<i64> = st
                    .query_row(params![id as i64, in_doubt, now], |r| r.get(0))
                    .optional()
                    .map_err(sq)?;
                if let Some(cid) = cid {
                    tally.moved(cid, "leased", "queued");
                }
            }
        }
        tally.flush(&tx).map_err(sq)?;
        tx.commit().map_err(sq)
    }

    /// Store the outcomes of a batch of attempts in one transaction: state, attempts =
    /// `attempt`, last reply, sticky in-doubt flag, first_attempt_at (once) and
    /// next_attempt_at (deferred only). Only jobs in `leased` are updated, so a late or repeated
    /// outcome can never overwrite a newer state (skipped ones are logged).
    pub fn record(&mut self, batch: &[Record]) -> Result<(), SpoolError> {
        let path = self.path.clone();
        let sq = |source| SpoolError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.tx()?;
        let mut tally = Tally::default();
        let mut updated = 0;
        {
            // The in-doubt flag is set by a separate statement so the common case does not name
            // `in_doubt` in its SET list and so never runs the counting trigger.
            let mut st = tx
                .prepare_cached(
                    "UPDATE jobs SET state = ?2, attempts = ?3, last_code = ?4, last_enhanced = ?5,
                         last_text = ?6, first_attempt_at = COALESCE(first_attempt_at, ?7),
                         next_attempt_at = ?8, lease_id = NULL, updated_at = ?7
                     WHERE id = ?1 AND state = 'leased' RETURNING campaign_id",
                )
                .map_err(sq)?;
            let mut doubt = tx
                .prepare_cached("UPDATE jobs SET in_doubt = 1 WHERE id = ?1 AND in_doubt = 0")
                .map_err(sq)?;
            for r in batch {
                let next = match r.update {
                    Update::Deferred { next_attempt_at } => Some(next_attempt_at),
                    Update::Final(_) => None,
                };
                let state = state_name(&r.update);
                let cid: Option<i64> = st
                    .query_row(
                        params![
                            r.job_id as i64,
                            state,
                            r.attempt,
                            r.code,
                            r.enhanced,
                            r.text,
                            r.at,
                            next
                        ],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(sq)?;
                let Some(cid) = cid else { continue };
                updated += 1;
                tally.moved(cid, "leased", state);
                if r.in_doubt {
                    doubt.execute(params![r.job_id as i64]).map_err(sq)?;
                }
            }
        }
        tally.flush(&tx).map_err(sq)?;
        tx.commit().map_err(sq)?;
        if updated < batch.len() {
            log::warn!(
                "spool: ignored {} outcomes for jobs no longer leased",
                batch.len() - updated
            );
        }
        Ok(())
    }

    /// Jobs per state, for one campaign or all.
    pub fn counts(&self, campaign_id: Option<u64>) -> Result<Counts, SpoolError> {
        let mut c = Counts::default();
        let cid = campaign_id.map(|c| c as i64);
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT state, SUM(n) FROM state_counts
                 WHERE ?1 IS NULL OR campaign_id = ?1 GROUP BY state",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![cid], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        for (state, n) in rows {
            let n = n as u64;
            match state.as_str() {
                "in_doubt" => {
                    c.in_doubt = n;
                    continue;
                }
                "queued" => c.queued = n,
                "leased" => c.leased = n,
                "deferred" => c.deferred = n,
                "delivered" => c.delivered = n,
                "bounced" => c.bounced = n,
                "expired" => c.expired = n,
                _ => c.invalid += n,
            }
            c.total += n;
        }
        Ok(c)
    }

    /// The earliest `next_attempt_at` among deferred jobs, if any.
    pub fn next_due(&self) -> Result<Option<f64>, SpoolError> {
        self.conn
            .query_row(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'deferred'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// Rows rejected at ingestion for a campaign: (line, raw email, reason), by line.
    pub fn invalid_rows(&self, campaign_id: u64) -> Result<Vec<(u64, String, String)>, SpoolError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT line, recipient, COALESCE(reason, '') FROM jobs
                 WHERE campaign_id = ?1 AND state = 'invalid' ORDER BY line",
            )
            .map_err(|e| self.err(e))?;
        st.query_map(params![campaign_id as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| self.err(e))
    }

    /// A job's state name, `None` if no such job.
    pub fn job_state(&self, job_id: u64) -> Result<Option<String>, SpoolError> {
        self.conn
            .query_row(
                "SELECT state FROM jobs WHERE id = ?1",
                params![job_id as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::tests::TempDir;

    fn valid(line: u64, email: &str) -> Row {
        Row::Valid {
            line,
            email: email.into(),
            values: vec![email.into(), format!("name{line}")],
        }
    }

    fn fields() -> Vec<String> {
        vec!["email".into(), "name".into()]
    }

    fn setup(name: &str) -> (TempDir, Spool, CampaignRow) {
        let d = TempDir::new(name);
        let mut s = Spool::open(&d.0.join("var/spool.db")).unwrap();
        let c = s
            .campaign("spring", "Subject: hi", "news@example.com", &fields())
            .unwrap();
        (d, s, c)
    }

    /// Counts the slow way, to check the trigger-maintained `state_counts`.
    fn counts_by_scan(s: &Spool) -> Counts {
        let mut c = Counts::default();
        let mut st = s
            .conn
            .prepare("SELECT state, COUNT(*), SUM(in_doubt) FROM jobs GROUP BY state")
            .unwrap();
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .unwrap();
        for row in rows {
            let (state, n, doubt) = row.unwrap();
            c.total += n;
            c.in_doubt += doubt;
            *match state.as_str() {
                "queued" => &mut c.queued,
                "leased" => &mut c.leased,
                "deferred" => &mut c.deferred,
                "delivered" => &mut c.delivered,
                "bounced" => &mut c.bounced,
                "expired" => &mut c.expired,
                _ => &mut c.invalid,
            } += n;
        }
        c
    }

    fn rec(job_id: u64, attempt: u32, update: Update, at: f64) -> Record {
        Record {
            job_id,
            update,
            attempt,
            code: 250,
            enhanced: Some("2.0.0".into()),
            text: "ok".into(),
            in_doubt: false,
            at,
        }
    }

    #[test]
    fn open_creates_dir_wal_and_schema_and_refuses_newer() {
        let (d, s, _) = setup("open");
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = s
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "NORMAL");
        s.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(s);
        let e = Spool::open(&d.0.join("var/spool.db"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("var/spool.db") && e.contains("schema version 99 is newer"),
            "{e}"
        );
    }

    #[test]
    fn campaign_open_or_create_and_mismatch() {
        let (_d, mut s, c) = setup("campaign");
        assert_eq!((c.id, c.rows_ingested, c.ingest_done), (1, 0, false));
        let again = s
            .campaign("spring", "Subject: hi", "news@example.com", &fields())
            .unwrap();
        assert_eq!(again, c);
        let e = s
            .campaign("spring", "Subject: other", "news@example.com", &fields())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("campaign `spring` already exists with a different template")
        );
        let e = s
            .campaign("spring", "Subject: hi", "x@example.com", &fields())
            .unwrap_err();
        assert!(e.to_string().contains("different sender; "));
        let e = s
            .campaign(
                "spring",
                "Subject: hi",
                "news@example.com",
                &["email".into()],
            )
            .unwrap_err();
        assert!(e.to_string().contains("different columns; "), "{e}");
        assert!(
            e.to_string()
                .contains("use a new campaign name or a new spool")
        );
        let other = s
            .campaign("autumn", "t", "news@example.com", &fields())
            .unwrap();
        assert_eq!(other.id, 2);
        assert_eq!(s.campaigns().unwrap().len(), 2);
    }

    #[test]
    fn ingest_dedupes_and_keeps_invalid_rows_with_reasons() {
        let (_d, mut s, c) = setup("dedupe");
        let rows = vec![
            valid(2, "alice@example.com"),
            Row::Invalid {
                line: 3,
                raw_email: "not-an-address".into(),
                reason: "bad address in `email`: no @".into(),
            },
            valid(4, "Alice@Example.COM"),
        ];
        let st = s.ingest(c.id, &rows, 3, false).unwrap();
        assert_eq!(
            st,
            IngestStats {
                rows: 3,
                queued: 1,
                invalid: 2,
                duplicates: 1
            }
        );
        // A duplicate in a later batch, of a row of an earlier one.
        let st = s
            .ingest(
                c.id,
                &[valid(5, "ALICE@example.com"), valid(6, "bob@example.com")],
                5,
                true,
            )
            .unwrap();
        assert_eq!((st.queued, st.duplicates), (1, 1));
        assert_eq!(
            s.invalid_rows(c.id).unwrap(),
            vec![
                (
                    3,
                    "not-an-address".into(),
                    "bad address in `email`: no @".into()
                ),
                (4, "Alice@Example.COM".into(), "duplicate of line 2".into()),
                (5, "ALICE@example.com".into(), "duplicate of line 2".into()),
            ]
        );
        let n = s.counts(Some(c.id)).unwrap();
        assert_eq!((n.total, n.queued, n.invalid), (5, 2, 3));
        assert_eq!(counts_by_scan(&s), n);
        // The same address in another campaign is not a duplicate.
        let c2 = s
            .campaign("other", "t", "news@example.com", &fields())
            .unwrap();
        assert_eq!(
            s.ingest(c2.id, &[valid(2, "alice@example.com")], 1, true)
                .unwrap()
                .queued,
            1
        );
    }

    #[test]
    fn message_ids_are_fixed_per_job() {
        let (_d, mut s, c) = setup("msgid");
        s.ingest(c.id, &[valid(2, "a@x.org"), valid(3, "b@x.org")], 2, true)
            .unwrap();
        let jobs = s.lease(0.0, 10).unwrap();
        let nonce = jobs[0]
            .message_id
            .split('.')
            .nth(2)
            .unwrap()
            .split('@')
            .next()
            .unwrap()
            .to_string();
        assert_eq!(nonce.len(), 16);
        assert_eq!(jobs[0].message_id, format!("spring.2.{nonce}@example.com"));
        assert_eq!(jobs[1].message_id, format!("spring.3.{nonce}@example.com"));
        s.release(&[jobs[0].job_id]).unwrap();
        assert_eq!(s.lease(0.0, 10).unwrap()[0].message_id, jobs[0].message_id);
    }

    #[test]
    fn state_transitions_lease_record_release() {
        let (_d, mut s, c) = setup("states");
        let rows: Vec<Row> = (0..5)
            .map(|i| valid(i + 2, &format!("u{i}@x.org")))
            .collect();
        s.ingest(c.id, &rows, 5, true).unwrap();
        let jobs = s.lease(1000.0, 3).unwrap();
        assert_eq!(
            jobs.iter().map(|j| j.job_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            jobs.iter().map(|j| j.lease_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(
            jobs.iter()
                .all(|j| j.attempt == 1 && !j.in_doubt && j.first_attempt_at.is_none())
        );
        assert_eq!(jobs[0].values, vec!["u0@x.org".to_string(), "name2".into()]);
        assert_eq!(s.job_state(1).unwrap().as_deref(), Some("leased"));
        assert_eq!(s.job_state(99).unwrap(), None);

        s.record(&[
            rec(1, 1, Update::Final(Final::Delivered), 1001.0),
            rec(
                2,
                1,
                Update::Deferred {
                    next_attempt_at: 2000.0,
                },
                1001.0,
            ),
            rec(3, 1, Update::Final(Final::Bounced), 1001.0),
        ])
        .unwrap();
        for (id, st) in [
            (1, "delivered"),
            (2, "deferred"),
            (3, "bounced"),
            (4, "queued"),
        ] {
            assert_eq!(s.job_state(id).unwrap().as_deref(), Some(st));
        }
        assert_eq!(s.next_due().unwrap(), Some(2000.0));
        // Lease ids never repeat; the deferred job is not due yet.
        let more = s.lease(1500.0, 10).unwrap();
        assert_eq!(
            more.iter()
                .map(|j| (j.job_id, j.lease_id))
                .collect::<Vec<_>>(),
            vec![(4, 4), (5, 5)]
        );
        s.release(&[4, 5, 1]).unwrap(); // 1 is delivered: untouched
        // A late outcome for a job no longer leased changes nothing.
        s.record(&[rec(
            1,
            2,
            Update::Deferred {
                next_attempt_at: 1.0,
            },
            1600.0,
        )])
        .unwrap();
        assert_eq!(s.job_state(1).unwrap().as_deref(), Some("delivered"));
        assert_eq!(s.job_state(4).unwrap().as_deref(), Some("queued"));
        // Due deferred job comes back in id order with the next attempt number.
        let due = s.lease(2000.0, 10).unwrap();
        assert_eq!(
            due.iter().map(|j| j.job_id).collect::<Vec<_>>(),
            vec![2, 4, 5]
        );
        assert_eq!(due[0].attempt, 2);
        assert_eq!(due[0].first_attempt_at, Some(1001.0));
        assert!(due.iter().all(|j| j.lease_id >= 6));
        s.record(&[Record {
            in_doubt: true,
            ..rec(2, 2, Update::Final(Final::Expired), 2001.0)
        }])
        .unwrap();
        s.release_in_doubt(&[4]).unwrap();
        let n = s.counts(None).unwrap();
        assert_eq!(
            n,
            Counts {
                total: 5,
                queued: 1,
                leased: 1,
                deferred: 0,
                delivered: 1,
                bounced: 1,
                expired: 1,
                invalid: 0,
                in_doubt: 2
            }
        );
        assert_eq!(n.finished(), 3);
        assert_eq!(counts_by_scan(&s), n);
        assert_eq!(s.next_due().unwrap(), None);
    }

    #[test]
    fn lease_orders_queued_and_due_deferred_by_id() {
        let (_d, mut s, c) = setup("order");
        let rows: Vec<Row> = (0..6)
            .map(|i| valid(i + 2, &format!("u{i}@x.org")))
            .collect();
        s.ingest(c.id, &rows, 6, true).unwrap();
        let all = s.lease(0.0, 6).unwrap();
        assert_eq!(all.len(), 6);
        // 1 and 3 deferred (due at 10 and 30), 2 queued again, others final.
        s.record(&[
            rec(
                1,
                1,
                Update::Deferred {
                    next_attempt_at: 10.0,
                },
                1.0,
            ),
            rec(
                3,
                1,
                Update::Deferred {
                    next_attempt_at: 30.0,
                },
                1.0,
            ),
            rec(4, 1, Update::Final(Final::Delivered), 1.0),
            rec(5, 1, Update::Final(Final::Delivered), 1.0),
            rec(6, 1, Update::Final(Final::Delivered), 1.0),
        ])
        .unwrap();
        s.release(&[2]).unwrap();
        assert_eq!(s.next_due().unwrap(), Some(10.0));
        let ids = |v: Vec<LeasedJob>| v.iter().map(|j| j.job_id).collect::<Vec<_>>();
        assert_eq!(ids(s.lease(5.0, 10).unwrap()), vec![2]);
        assert_eq!(ids(s.lease(30.0, 1).unwrap()), vec![1]);
        assert_eq!(ids(s.lease(30.0, 10).unwrap()), vec![3]);
        assert!(s.lease(1e12, 10).unwrap().is_empty());
    }

    #[test]
    fn recover_after_crash_requeues_leased_in_doubt() {
        let (d, mut s, c) = setup("recover");
        let rows: Vec<Row> = (0..4)
            .map(|i| valid(i + 2, &format!("u{i}@x.org")))
            .collect();
        s.ingest(c.id, &rows, 4, true).unwrap();
        let jobs = s.lease(0.0, 3).unwrap();
        s.record(&[rec(jobs[0].job_id, 1, Update::Final(Final::Delivered), 1.0)])
            .unwrap();
        // Crash: the connection goes away without releasing jobs 2 and 3.
        std::mem::forget(s);
        let mut s = Spool::open(&d.0.join("var/spool.db")).unwrap();
        assert_eq!(s.recover().unwrap(), 2);
        assert_eq!(s.recover().unwrap(), 0);
        let n = s.counts(None).unwrap();
        assert_eq!((n.queued, n.leased, n.delivered, n.in_doubt), (3, 0, 1, 2));
        assert_eq!(counts_by_scan(&s), n);
        let again = s.lease(0.0, 10).unwrap();
        let flags: Vec<(u64, bool, u32)> = again
            .iter()
            .map(|j| (j.job_id, j.in_doubt, j.attempt))
            .collect();
        assert_eq!(flags, vec![(2, true, 1), (3, true, 1), (4, false, 1)]);
        assert!(
            again.iter().all(|j| j.lease_id > 3),
            "lease ids survive restarts"
        );
    }

    #[test]
    fn resumable_ingest_from_file() {
        use crate::campaign::{Recipients, ingest_all};
        let d = TempDir::new("resume");
        let csv = d.0.join("r.csv");
        let mut text = String::from("email,name\r\n");
        for i in 0..25 {
            text.push_str(&format!("u{i}@x.org,N{i}\r\n"));
        }
        text.push_str("u3@x.org,dup\r\nbad,row\r\n");
        std::fs::write(&csv, text).unwrap();
        let db = d.0.join("spool.db");
        let open_recipients = || Recipients::open(&csv, 1000).unwrap();

        // First run: ingest two batches of 10 by hand, then "crash".
        {
            let mut s = Spool::open(&db).unwrap();
            let r = open_recipients();
            let c = s.campaign("c", "t", "n@example.com", r.fields()).unwrap();
            let rows: Vec<Row> = r.take(20).collect();
            s.ingest(c.id, &rows[..10], 10, false).unwrap();
            s.ingest(c.id, &rows[10..], 20, false).unwrap();
        }
        // Second run resumes where the spool says.
        let mut s = Spool::open(&db).unwrap();
        let r = open_recipients();
        let c = s.campaign("c", "t", "n@example.com", r.fields()).unwrap();
        assert_eq!((c.rows_ingested, c.ingest_done), (20, false));
        let st = ingest_all(&mut s, &c, r, 4).unwrap();
        assert_eq!(
            st,
            IngestStats {
                rows: 7,
                queued: 5,
                invalid: 2,
                duplicates: 1
            }
        );
        let c = s
            .campaign("c", "t", "n@example.com", open_recipients().fields())
            .unwrap();
        assert_eq!((c.rows_ingested, c.ingest_done), (27, true));
        let n = s.counts(Some(c.id)).unwrap();
        assert_eq!((n.total, n.queued, n.invalid), (27, 25, 2));
        // Third run: done, nothing added.
        assert_eq!(
            ingest_all(&mut s, &c, open_recipients(), 0).unwrap(),
            IngestStats::default()
        );
        assert_eq!(s.counts(None).unwrap().total, 27);
        let lines: Vec<u64> = s.invalid_rows(c.id).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(lines, vec![27, 28]);
    }

    #[test]
    fn corpus_ingests_with_duplicate_flagged() {
        use crate::campaign::{Recipients, ingest_all};
        let (_d, mut s, _) = setup("corpus");
        let r = Recipients::open(
            Path::new("/work/shared/corpus/campaign/recipients.csv"),
            65536,
        )
        .unwrap();
        let c = s
            .campaign("corpus", "t", "news@example.com", r.fields())
            .unwrap();
        let st = ingest_all(&mut s, &c, r, 1000).unwrap();
        assert_eq!(
            (st.rows, st.queued, st.invalid, st.duplicates),
            (23, 19, 4, 1)
        );
        let inv = s.invalid_rows(c.id).unwrap();
        assert_eq!(
            inv[3],
            (25, "alice@example.com".into(), "duplicate of line 2".into())
        );
    }
}
