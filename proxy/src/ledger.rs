//! The durable usage ledger. Each finished request is appended to a local journal file *before*
//! the last bytes of its answer are sent: a `write` to the page cache, which survives a
//! `kill -9` of the edge, and no wait on the store. A background shipper moves the journal into
//! the store in batches ([`Store::ship_usage`]: per-minute rollups, and a row per request for
//! audit). Each journal segment is a stream the store knows how far it has counted (by byte
//! offset), in the transaction that counts its rows, so a journal replayed after a crash never
//! counts twice.
//!
//! Each process writes its own journal (`usage.<pid>.journal`, then further segments
//! `usage.<pid>-<n>.journal` once one is large), so that during an upgrade the old and the new
//! process never share one. Journals of processes that are gone (a crash, the
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
use crate::store::{now, Shipment, Store, StoreError, UsageRow};
use crate::usage::Usage;

/// Who a metered request is for, and the id the client knows it by.
#[derive(Debug, Clone)]
pub struct Payer {
    /// The request's id as the client was given it (`x-request-id`).
    pub request_id: String,
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
    /// What every row id starts with: edge, start time, process (a system call saved per row).
    id_prefix: String,
    /// Rows the journal could not take, until it can or the store has them.
    kept: Mutex<Vec<UsageRow>>,
    /// Rows sent to the store directly and not confirmed yet. They never go back to the
    /// journal: a failed shipment may still have committed, and only a retry of the same
    /// stream (named by its first row) is sure to count them once.
    direct: Mutex<Vec<UsageRow>>,
    /// Whether the last write to the journal failed.
    failing: AtomicBool,
}

impl Ledger {
    /// A ledger writing to `journal` as edge `edge_id`.
    pub fn new(journal: Journal, edge_id: String) -> Self {
        let id_prefix = format!("{edge_id}-{:x}-{:x}", now(), std::process::id());
        Self {
            journal,
            edge_id,
            next: AtomicU64::new(0),
            id_prefix,
            kept: Mutex::new(Vec::new()),
            direct: Mutex::new(Vec::new()),
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
        format!("{}-{n:x}", self.id_prefix)
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
            client_request_id: payer.request_id.clone(),
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
    /// requests again; until then they go to the store directly. Rows sent directly before are
    /// retried first; a store out of reach does not keep the journal from coming back. Returns
    /// whether the journal is writable, or the store's error.
    pub async fn recover(&self, store: &Store) -> Result<bool, StoreError> {
        let retried = self.ship_direct(store, Vec::new()).await;
        if !self.is_writable() {
            let rest = self.back_to_journal();
            if retried.is_ok() {
                self.ship_direct(store, rest).await?;
            } else {
                self.direct
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(rest);
            }
        }
        retried.map(|()| self.is_writable())
    }

    /// Moves the kept rows into the journal if it takes writes again, and then turns it back
    /// on; returns the rows it could not take.
    fn back_to_journal(&self) -> Vec<UsageRow> {
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
        }
        std::mem::take(&mut *kept)
    }

    /// Ships the rows sent directly before and not confirmed, then `more`, as one stream named
    /// by its first row; on failure keeps them all for the next try.
    async fn ship_direct(&self, store: &Store, more: Vec<UsageRow>) -> Result<(), StoreError> {
        let mut rows = std::mem::take(&mut *self.direct.lock().unwrap_or_else(|e| e.into_inner()));
        rows.extend(more);
        let Some(first) = rows.first() else {
            return Ok(());
        };
        // A name apart from the journal segments' (named by their first rows).
        let stream = format!("{}-direct", first.request_id);
        let rows: Vec<(u64, UsageRow)> = (0..).zip(rows).collect();
        let shipment = Shipment {
            stream: &stream,
            edge_id: &self.edge_id,
            end: rows.len() as u64,
            rows: &rows,
        };
        if let Err(e) = store.ship_usage(&shipment).await {
            *self.direct.lock().unwrap_or_else(|e| e.into_inner()) =
                rows.into_iter().map(|(_, r)| r).collect();
            return Err(e);
        }
        Ok(())
    }
}

/// A journal segment this large is retired once shipped: appends move to a new segment and the
/// old one is removed after its last rows are shipped.
const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// The append-only journal of finished requests, in segments: `usage.<pid>.journal`, then
/// `usage.<pid>-1.journal`, `usage.<pid>-2.journal`, … Each has its shipped offset beside it
/// (`<segment>.shipped`).
///
/// The append lock is held for one `write` or for swapping in a new segment, never for file
/// system work: truncating a shipped 4 MiB journal under it, as this did before, held every
/// finishing request for about a millisecond (issue 17).
pub struct Journal {
    dir: PathBuf,
    /// The segment appends go to.
    current: Mutex<Segment>,
    /// Segments retired whose last rows are not shipped yet (a store error in between).
    retired: Mutex<Vec<SegmentPath>>,
    /// The last segment number used.
    segments: AtomicU64,
}

/// One journal file, open for appends.
struct Segment {
    file: File,
    at: SegmentPath,
}

impl Segment {
    fn open(dir: &Path, name: &str) -> std::io::Result<Self> {
        let at = SegmentPath::new(dir, name);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&at.path)?;
        Ok(Self { file, at })
    }
}

/// Where a segment and its shipped offset are.
#[derive(Clone)]
struct SegmentPath {
    path: PathBuf,
    offset_path: PathBuf,
}

impl SegmentPath {
    /// Segment `name` in `dir`, its offset beside it.
    fn new(dir: &Path, name: &str) -> Self {
        Self {
            path: dir.join(name),
            offset_path: dir.join(format!("{name}.shipped")),
        }
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

    /// Ships what is new since the last call into the store; returns the rows shipped and the
    /// segment's shipped length. A torn last line (a crash in mid-write) is left for the next
    /// call, or skipped once followed by more lines.
    async fn ship(&self, store: &Store) -> Result<(usize, u64), StoreError> {
        let io = |e: std::io::Error| StoreError::Db(sqlx::Error::Io(e));
        let start = self.shipped();
        let bytes = {
            let mut f = File::open(&self.path).map_err(io)?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < start {
                // Emptied behind our back (a journal of an earlier version), start over.
                self.set_shipped(0).map_err(io)?;
                return Ok((0, 0));
            }
            f.seek(SeekFrom::Start(start)).map_err(io)?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(io)?;
            buf
        };
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete == 0 {
            return Ok((0, start));
        }
        let rows = rows_at(start, &bytes[..complete]);
        let end = start + complete as u64;
        let mut counted = 0;
        if !rows.is_empty() {
            let stream = match start {
                0 => rows[0].1.request_id.clone(),
                _ => self.stream().map_err(io)?,
            };
            counted = store
                .ship_usage(&Shipment {
                    stream: &stream,
                    edge_id: &rows[0].1.edge_id,
                    rows: &rows,
                    end,
                })
                .await?;
        }
        self.set_shipped(end).map_err(io)?;
        Ok((counted, end))
    }

    /// The segment's stream name: its first row's id, unique across the fleet and restarts.
    fn stream(&self) -> std::io::Result<String> {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(File::open(&self.path)?).split(b'\n');
        while let Some(line) = lines.next().transpose()? {
            if let Ok(row) = serde_json::from_slice::<UsageRow>(&line) {
                return Ok(row.request_id);
            }
        }
        Err(std::io::Error::other(
            "a shipped journal segment without a row",
        ))
    }

    /// Removes the segment's files (everything in it is shipped).
    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.offset_path);
    }
}

/// The complete lines of a journal read from offset `start` (`complete` ends with a line
/// break), parsed, each with its offset. A torn line (a crash in mid-write, ended by the line
/// break written on recovery) is skipped.
pub fn rows_at(start: u64, complete: &[u8]) -> Vec<(u64, UsageRow)> {
    let mut rows = Vec::new();
    let mut at = start;
    for line in complete.split(|b| *b == b'\n') {
        let next = at + line.len() as u64 + 1;
        if !line.is_empty() {
            match serde_json::from_slice(line) {
                Ok(r) => rows.push((at, r)),
                Err(e) => tracing::error!(error = %e, "skipping a torn usage journal line"),
            }
        }
        at = next;
    }
    rows
}

impl Journal {
    /// Opens (or creates) this process's journal in `data_dir`.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let first = format!("usage.{}.journal", std::process::id());
        Ok(Self {
            dir: data_dir.to_owned(),
            current: Mutex::new(Segment::open(data_dir, &first)?),
            retired: Mutex::new(Vec::new()),
            segments: AtomicU64::new(0),
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
            // A segment after the first: `<pid>-<n>`.
            let pid = pid.split_once('-').map_or(pid, |(pid, _)| pid);
            let alive = pid.parse::<u32>().is_ok_and(|p| {
                p == std::process::id() || Path::new(&format!("/proc/{p}")).exists()
            });
            if alive {
                continue;
            }
            let orphan = SegmentPath::new(data_dir, &name);
            shipped += orphan.ship(store).await?.0;
            orphan.remove();
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
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .file
            .write_all(bytes)
    }

    /// Ships what is new since the last call into the store; returns the rows shipped. Once the
    /// current segment is large, appends move to a new one, and the old one is removed after
    /// its last rows are shipped.
    pub async fn ship(&self, store: &Store) -> Result<usize, StoreError> {
        let mut shipped = self.ship_retired(store).await?;
        let current = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .at
            .clone();
        let (rows, end) = current.ship(store).await?;
        shipped += rows;
        if end >= SEGMENT_BYTES {
            self.rotate()
                .map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
            shipped += self.ship_retired(store).await?;
        }
        Ok(shipped)
    }

    /// Opens the next segment (outside the append lock) and swaps it in (under it).
    fn rotate(&self) -> std::io::Result<()> {
        let n = self.segments.fetch_add(1, Ordering::Relaxed) + 1;
        let next = Segment::open(
            &self.dir,
            &format!("usage.{}-{n}.journal", std::process::id()),
        )?;
        let old = std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(|e| e.into_inner()),
            next,
        );
        // Closed here, outside the lock; its last rows are shipped next.
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(old.at);
        Ok(())
    }

    /// Ships the rest of each retired segment, then removes it.
    async fn ship_retired(&self, store: &Store) -> Result<usize, StoreError> {
        let mut shipped = 0;
        loop {
            let Some(seg) = self.retired.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                return Ok(shipped);
            };
            match seg.ship(store).await {
                Ok((rows, _)) => {
                    shipped += rows;
                    seg.remove();
                }
                Err(e) => {
                    self.retired
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(seg);
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The journal's current segment passes [`SEGMENT_BYTES`]: shipping moves appends to a new
    /// segment and removes the old one once shipped, and every row reaches the store once.
    #[tokio::test]
    async fn a_large_journal_moves_to_a_new_segment_and_loses_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("sqlite://s.db", dir.path()).await.unwrap();
        let ledger = Ledger::new(Journal::open(dir.path()).unwrap(), "e1".into());
        let payer = Payer {
            request_id: "req-1".into(),
            account_id: "acct".into(),
            key_id: "k1".into(),
            agent_id: "abc123".into(),
        };
        let usage = Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
        };
        let first = dir
            .path()
            .join(format!("usage.{}.journal", std::process::id()));
        let mut rows = 0;
        while std::fs::metadata(&first).unwrap().len() < SEGMENT_BYTES {
            ledger.record(&payer, usage, false, "completed");
            rows += 1;
        }
        assert_eq!(ledger.journal.ship(&store).await.unwrap(), rows);
        assert!(!first.exists(), "the shipped segment is removed");
        for _ in 0..10 {
            ledger.record(&payer, usage, false, "completed");
        }
        let second = dir
            .path()
            .join(format!("usage.{}-1.journal", std::process::id()));
        assert!(second.exists());
        assert_eq!(ledger.journal.ship(&store).await.unwrap(), 10);
        let month = month_of(now());
        let totals = store.month_totals(&month, "e1").await.unwrap();
        assert_eq!(
            totals,
            vec![("acct".to_string(), 3 * (rows as u64 + 10), 0)]
        );
    }

    /// A shipment whose commit the edge never learned of (its offset file not written, as
    /// after a crash or a lost acknowledgement) is shipped again later, from any earlier
    /// offset and with newer rows after it: every row is still counted exactly once.
    #[tokio::test]
    async fn a_journal_shipped_again_from_any_earlier_offset_counts_each_row_once() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("sqlite://s.db", dir.path()).await.unwrap();
        let ledger = Ledger::new(Journal::open(dir.path()).unwrap(), "e1".into());
        let payer = Payer {
            request_id: "req".into(),
            account_id: "acct".into(),
            key_id: "k1".into(),
            agent_id: "abc123".into(),
        };
        let offsets = dir
            .path()
            .join(format!("usage.{}.journal.shipped", std::process::id()));
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let (mut recorded, mut ends) = (0u64, vec![0u64]);
        for _ in 0..40 {
            for _ in 0..rng.gen_range(0..20) {
                let tokens = rng.gen_range(1..50);
                let usage = Usage {
                    prompt_tokens: 0,
                    completion_tokens: tokens,
                    total_tokens: tokens,
                };
                ledger.record(&payer, usage, false, "completed");
                recorded += tokens;
            }
            ledger.journal.ship(&store).await.unwrap();
            ends.push(std::fs::read_to_string(&offsets).unwrap().parse().unwrap());
            if rng.gen_bool(0.5) {
                // The edge forgets: its offset goes back to one it wrote earlier.
                let back = ends[rng.gen_range(0..ends.len())];
                std::fs::write(&offsets, back.to_string()).unwrap();
            }
        }
        ledger.journal.ship(&store).await.unwrap();
        let totals = store.month_totals(&month_of(now()), "e1").await.unwrap();
        assert_eq!(totals, vec![("acct".to_string(), recorded, 0)]);
    }
}
