//! The durable usage ledger. Each finished request is appended to a local journal file *before*
//! the last bytes of its answer are sent: a `write` to the page cache, which survives a
//! `kill -9` of the edge, and no wait on the store. A background shipper moves the journal into
//! the store's `usage_ledger` in batches; rows are keyed by the edge's own request id, so a
//! journal replayed after a crash never counts twice.
//!
//! Each process writes its own journal (`usage.<pid>.journal`), so that during an upgrade the
//! old and the new process never share one. Journals of processes that are gone (a crash, the
//! process an upgrade replaced) are shipped by the next one and then removed.
//!
//! A journal that cannot be written (a full disk) loses nothing: the row is kept in memory,
//! the edge refuses new metered requests ([`Ledger::is_writable`]) rather than promise what it
//! cannot keep, and the shipper ([`Ledger::recover`]) puts the kept rows back into the journal
//! once it takes writes again, or sends them to the store directly meanwhile.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::quota::month_of;
use crate::store::{now, Store, StoreError, UsageRow};
use crate::usage::Usage;

/// Who a metered request is for.
#[derive(Debug, Clone)]
pub struct Payer {
    /// Account.
    pub account_id: String,
    /// Key id.
    pub key_id: String,
    /// Agent endpoint id.
    pub agent_id: String,
}

/// This edge's ledger: the journal, and the identity its rows carry.
pub struct Ledger {
    /// The journal.
    pub journal: Journal,
    /// This edge's id (kept in its data directory).
    pub edge_id: String,
    next: AtomicU64,
    started: i64,
    /// Rows the journal could not take, until it can or the store has them.
    kept: Mutex<Vec<UsageRow>>,
    /// Whether the last write to the journal failed.
    failing: AtomicBool,
}

impl Ledger {
    /// A ledger writing to `journal` as edge `edge_id`.
    pub fn new(journal: Journal, edge_id: String) -> Self {
        Self {
            journal,
            edge_id,
            next: AtomicU64::new(0),
            started: now(),
            kept: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
        }
    }

    /// Whether the journal takes writes. While it does not, metered requests are refused.
    pub fn is_writable(&self) -> bool {
        !self.failing.load(Ordering::Acquire)
    }

    /// A row id unique across the fleet, restarts and the two processes of an upgrade:
    /// edge, start time, process, counter.
    fn row_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}-{:x}-{:x}-{n:x}",
            self.edge_id,
            self.started,
            std::process::id()
        )
    }

    /// The one place that decides what a settled request leaves in the journal: a row when it
    /// used tokens, none when it used nothing. A failed write is logged, never raised: the
    /// client's answer does not wait on the disk's health.
    pub fn record(&self, payer: &Payer, usage: Usage, estimated: bool, outcome: &str) {
        let total = usage.total();
        if total == 0 {
            return;
        }
        let at = now();
        let row = UsageRow {
            request_id: self.row_id(),
            edge_id: self.edge_id.clone(),
            account_id: payer.account_id.clone(),
            key_id: payer.key_id.clone(),
            agent_id: payer.agent_id.clone(),
            month: month_of(at),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: total,
            estimated,
            outcome: outcome.into(),
            created_at: at,
        };
        // While the journal fails, rows go straight to memory: an append after a torn one would
        // be glued to it.
        if self.is_writable() && self.append_or_fail(&row) {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        // The shipper turns the journal back on holding this lock, after taking what was kept:
        // a row that finds it on now goes to the journal, not into a list nobody drains.
        if self.is_writable() && self.append_or_fail(&row) {
            return;
        }
        kept.push(row);
    }

    /// Appends `row`; on failure marks the journal failing and says so.
    fn append_or_fail(&self, row: &UsageRow) -> bool {
        match self.journal.append(row) {
            Ok(()) => true,
            Err(e) => {
                self.failing.store(true, Ordering::Release);
                tracing::error!(error = %e, request = %row.request_id,
                    "usage journal write failed: metered requests are refused until it can be written again; no usage is lost");
                false
            }
        }
    }

    /// The shipper's part while the journal fails: the kept rows go back into the journal once
    /// it takes writes (after a line break, which ends a torn line), and the edge takes metered
    /// requests again; until then they go to the store directly (rows are keyed by their id, so
    /// one that reaches both is counted once). Returns whether the journal is writable.
    pub async fn recover(&self, store: &Store) -> Result<bool, StoreError> {
        if self.is_writable() {
            return Ok(true);
        }
        let rest = {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let probed = self.journal.append_bytes(b"\n").is_ok();
            let written = if probed {
                kept.iter()
                    .take_while(|r| self.journal.append(r).is_ok())
                    .count()
            } else {
                0
            };
            kept.drain(..written);
            if probed && kept.is_empty() {
                // Under the lock, so that no row is kept after this (see `record`).
                self.failing.store(false, Ordering::Release);
                tracing::info!(
                    rows = written,
                    "usage journal writable again: metered requests are served"
                );
                return Ok(true);
            }
            std::mem::take(&mut *kept)
        };
        if let Err(e) = store.insert_usage(&rest).await {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let newer = std::mem::replace(&mut *kept, rest);
            kept.extend(newer);
            return Err(e);
        }
        Ok(false)
    }
}

/// Journals larger than this are emptied once everything in them is shipped.
const COMPACT_BYTES: u64 = 4 * 1024 * 1024;

/// The append-only journal of finished requests.
pub struct Journal {
    file: Mutex<File>,
    path: PathBuf,
    offset_path: PathBuf,
}

impl Journal {
    /// Opens (or creates) this process's journal in `data_dir`.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        Self::open_file(data_dir, &format!("usage.{}.journal", std::process::id()))
    }

    fn open_file(data_dir: &Path, name: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        Ok(Self {
            file: Mutex::new(file),
            offset_path: data_dir.join(format!("{name}.shipped")),
            path,
        })
    }

    /// Ships, then removes, the journals in `data_dir` of processes that are no longer running
    /// (and the single journal of earlier versions). Returns the rows shipped.
    pub async fn ship_orphans(data_dir: &Path, store: &Store) -> Result<usize, StoreError> {
        let io = |e: std::io::Error| StoreError::Db(sqlx::Error::Io(e));
        let names: Vec<String> = std::fs::read_dir(data_dir)
            .map_err(io)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("usage.") && n.ends_with(".journal"))
            .collect();
        let mut shipped = 0;
        for name in names {
            let pid = name
                .trim_start_matches("usage.")
                .trim_end_matches(".journal");
            let alive = pid.parse::<u32>().is_ok_and(|p| {
                p == std::process::id() || Path::new(&format!("/proc/{p}")).exists()
            });
            if alive {
                continue;
            }
            let orphan = Self::open_file(data_dir, &name).map_err(io)?;
            shipped += orphan.ship(store).await?;
            let _ = std::fs::remove_file(&orphan.path);
            let _ = std::fs::remove_file(&orphan.offset_path);
        }
        Ok(shipped)
    }

    /// Appends one row (one `write` of one line).
    pub fn append(&self, row: &UsageRow) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(row).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.append_bytes(&line)
    }

    fn append_bytes(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(bytes)
    }

    fn shipped(&self) -> u64 {
        std::fs::read_to_string(&self.offset_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn set_shipped(&self, offset: u64) -> std::io::Result<()> {
        let tmp = self.offset_path.with_extension("tmp");
        std::fs::write(&tmp, offset.to_string())?;
        std::fs::rename(&tmp, &self.offset_path)
    }

    /// Ships what is new since the last call into the store; returns the rows shipped. A torn
    /// last line (a crash in mid-write) is left for the next call, or skipped once followed by
    /// more lines.
    pub async fn ship(&self, store: &Store) -> Result<usize, StoreError> {
        let start = self.shipped();
        let bytes = {
            let mut f = File::open(&self.path).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < start {
                // Compacted behind our back (cannot happen in one process), start over.
                self.set_shipped(0)
                    .map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
                return Ok(0);
            }
            f.seek(SeekFrom::Start(start))
                .map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)
                .map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
            buf
        };
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete == 0 {
            return Ok(0);
        }
        let rows: Vec<UsageRow> = bytes[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| match serde_json::from_slice(l) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(error = %e, "skipping a torn usage journal line");
                    None
                }
            })
            .collect();
        store.insert_usage(&rows).await?;
        let end = start + complete as u64;
        self.set_shipped(end)
            .map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
        if end >= COMPACT_BYTES {
            self.compact(end);
        }
        Ok(rows.len())
    }

    /// Empties the journal if nothing was appended after `shipped`.
    fn compact(&self, shipped: u64) {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.metadata().map(|m| m.len()).unwrap_or(0) == shipped && file.set_len(0).is_ok() {
            let _ = self.set_shipped(0);
        }
    }
}
