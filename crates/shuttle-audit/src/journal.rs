//! The per-writer journal: an append-only, checksummed, fdatasync'd log of audit records that a
//! VM's monitor keeps while the broker (which owns the database) may be down.
//!
//! # Layout
//!
//! A journal is a directory (e.g. `STATE/vms/NAME/audit.journal/`):
//!
//! ```text
//! id                          random journal identity, written once (see below)
//! writer.lock                 flock(2)ed exclusively by the one live writer
//! 00000000000000000001.seg    segment: records with seq >= 1 and < the next segment's name
//! 00000000000000004097.seg    the newest segment is the active one; only it is ever appended to
//! ```
//!
//! Each record is one line: `CRC32(json) as 8 hex digits`, a space, the record as JSON, `\n`.
//!
//! # Why segments rather than rewriting one file
//!
//! The writer (monitor) and the collector (broker) are different processes. Truncating a single
//! file by writing the remainder to a temporary file and renaming it over the journal would race
//! with the writer: appends made through the writer's already-open descriptor would land in the
//! unlinked old file and be lost. With segments the collector only ever *deletes whole sealed
//! segments* (never written again), which needs no coordination with the writer, never copies
//! data, and is atomic: after a crash a segment is either there (and re-collection skips its
//! records by sequence number) or gone (and was fully collected).
//!
//! # Crash safety
//!
//! * With [`Durability::EveryAppend`] (the default), [`Journal::append`] returns only after
//!   `fdatasync(2)` of the segment; the segment's directory entry was made durable (`fsync` of
//!   the directory) when the segment was created.
//! * With [`Durability::Deferred`], `append` returns once the record is written to the file
//!   (`write(2)`): from then on it survives the death of any process, the writer's included,
//!   because it is in the kernel's page cache. A flusher makes it durable on disk with
//!   [`Journal::pending_sync`]; at most [`MAX_UNSYNCED_RECORDS`] records are ever written but not
//!   yet synced (the writer syncs in line beyond that), and a sealed segment is always synced.
//! * Only the tail of the newest segment can be torn (a crash in the middle of an append). Readers
//!   stop at the first line that is incomplete or fails its checksum; [`Journal::open`] cuts it
//!   off. Everything after such a line was never acknowledged: the writer acknowledges a record
//!   only after everything before it was synced.
//! * Sequence numbers only grow. A writer that reopens a journal starts a new segment and skips
//!   [`RESTART_SEQ_GAP`] numbers: a collector may have read (from the page cache) a record that
//!   a power cut then took away before it was synced; a new record must never reuse its number,
//!   or collection would skip the new record as already collected.
//! * The `id` file gives a journal an identity. A VM removed and created again under the same
//!   name gets a new journal (sequence numbers starting at 1 again); the store keys its
//!   high-water mark by journal identity, so the new records are not mistaken for old ones.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::record::AuditRecord;

/// Sequence numbers skipped when a writer reopens a journal; larger than the most records that
/// can be written but not yet synced at any moment ([`MAX_BATCH_RECORDS`] plus, with deferred
/// durability, [`MAX_UNSYNCED_RECORDS`]).
pub const RESTART_SEQ_GAP: u64 = 1 << 16;

/// The most records [`Journal::append_batch`] writes per `fdatasync`; larger batches are split.
pub const MAX_BATCH_RECORDS: usize = 4096;

/// With [`Durability::Deferred`], the most records written but not yet synced; an append beyond
/// that syncs in line (back-pressure on a writer faster than the disk).
pub const MAX_UNSYNCED_RECORDS: u64 = 1024;

/// When an appended record reaches stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `append` returns after `fdatasync(2)`.
    #[default]
    EveryAppend,
    /// `append` returns after `write(2)`; a flusher syncs through [`Journal::pending_sync`]
    /// (group commit off the caller's path). See the module documentation.
    Deferred,
    /// Never synced: only for measuring what syncing costs.
    #[doc(hidden)]
    NeverForBenchmarks,
}

/// The default size at which the writer starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 1 << 20;

const ID_FILE: &str = "id";
const LOCK_FILE: &str = "writer.lock";
const SEGMENT_SUFFIX: &str = ".seg";

/// Errors of the journal. Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal directory could not be created or listed.
    #[error("open journal directory {path}: {source}")]
    OpenDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process holds the journal open for writing.
    #[error(
        "journal {path} is already open for writing by another process; \
         stop the other monitor of this VM first"
    )]
    Locked {
        /// The journal directory.
        path: PathBuf,
    },
    /// Taking the writer lock failed.
    #[error("lock journal {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading a segment or the id file failed.
    #[error("read journal {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Writing failed, e.g. with ENOSPC when the disk is full (see [`JournalError::is_disk_full`]).
    #[error("write journal {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `fdatasync`/`fsync` failed; the record may not be durable.
    #[error("sync journal {path}: {source}")]
    Sync {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Creating or removing a segment failed.
    #[error("rotate journal segment {path}: {source}")]
    Rotate {
        /// The segment.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A sealed segment holds a damaged record (not a torn tail, which is expected after a
    /// crash and silently ignored).
    #[error(
        "journal segment {path} is corrupt at byte {offset}; \
         move the segment aside to resume collection"
    )]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// The offset of the first damaged line.
        offset: u64,
    },
    /// An earlier write or sync failed in a way that leaves the file's state unknown.
    #[error("journal {path} refuses appends after an earlier write or sync failure; reopen it")]
    Poisoned {
        /// The journal directory.
        path: PathBuf,
    },
    /// A record could not be encoded.
    #[error("encode audit record: {0}")]
    Encode(#[source] serde_json::Error),
}

impl JournalError {
    /// Whether this error says the file system is full (ENOSPC, or EDQUOT for a quota).
    pub fn is_disk_full(&self) -> bool {
        match self {
            JournalError::Write { source, .. } | JournalError::Sync { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull
                    || source.kind() == io::ErrorKind::QuotaExceeded
            }
            _ => false,
        }
    }
}

/// Tuning for [`Journal::open_with`].
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Start a new segment when the active one reaches this size (bytes).
    pub segment_bytes: u64,
    /// When appends reach stable storage.
    pub durability: Durability,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            durability: Durability::EveryAppend,
        }
    }
}

/// The writing end of a journal: one per VM monitor.
///
/// # Contract (fail closed)
///
/// A caller records a decision with [`Journal::append`] **before** acting on it, and acts only if
/// `append` returned `Ok`: at that point the record is on stable storage. If `append` returns an
/// error (disk full, I/O error, a poisoned journal), the caller must refuse the request, because
/// no decision may take effect unaudited.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    id: String,
    // Held for the lifetime of the writer; the flock is released when the file is closed.
    _lock: File,
    active: ActiveSegment,
    next_seq: u64,
    options: JournalOptions,
    /// Every record with a smaller sequence number is on stable storage (or was written before
    /// this writer opened the journal, and was repaired and synced then).
    synced_below: u64,
    poisoned: bool,
}

#[derive(Debug)]
struct ActiveSegment {
    path: PathBuf,
    file: File,
    len: u64,
}

impl Journal {
    /// Opens (creating if needed) the journal directory `dir` for writing, with default options.
    ///
    /// Fails with [`JournalError::Locked`] if another writer holds it. Cuts off a torn tail left by
    /// a crash and starts a new segment.
    pub fn open(dir: impl AsRef<Path>) -> Result<Journal, JournalError> {
        Journal::open_with(dir, JournalOptions::default())
    }

    /// [`Journal::open`] with explicit options.
    pub fn open_with(
        dir: impl AsRef<Path>,
        options: JournalOptions,
    ) -> Result<Journal, JournalError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|source| JournalError::OpenDir {
            path: dir.clone(),
            source,
        })?;
        let lock = take_writer_lock(&dir)?;
        let id = ensure_id(&dir)?;
        let segments = list_segments(&dir)?;

        let next_seq = match segments.last() {
            None => 1,
            Some(newest) => {
                let scan = repair_tail(&newest.path)?;
                let last = scan.last_seq.unwrap_or(newest.first_seq.saturating_sub(1));
                last.saturating_add(1).saturating_add(RESTART_SEQ_GAP)
            }
        };
        let active = create_segment(&dir, next_seq)?;
        // An empty segment left by an earlier writer carries nothing but its name, and the new
        // segment's name supersedes it.
        if let Some(newest) = segments.last() {
            if fs::metadata(&newest.path)
                .map(|m| m.len() == 0)
                .unwrap_or(false)
            {
                remove_segment(&newest.path)?;
                sync_dir(&dir)?;
            }
        }
        Ok(Journal {
            dir,
            id,
            _lock: lock,
            active,
            next_seq,
            options,
            synced_below: next_seq,
            poisoned: false,
        })
    }

    /// Opens a journal whose appends are **not** synced. Only for measuring what `fdatasync`
    /// costs (`examples/append_rate.rs`); never use it for real audit records.
    #[doc(hidden)]
    pub fn open_unsynced_for_benchmarks(dir: impl AsRef<Path>) -> Result<Journal, JournalError> {
        Journal::open_with(
            dir,
            JournalOptions {
                durability: Durability::NeverForBenchmarks,
                ..JournalOptions::default()
            },
        )
    }

    /// The journal directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The journal's identity (see the module documentation).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sequence number the next appended record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends one record, assigning its sequence number (the `seq` field of `record` is
    /// ignored), and returns once the record is as durable as the journal's [`Durability`]
    /// says. See the fail-closed contract on [`Journal`]: on error the caller must refuse the
    /// request.
    pub fn append(&mut self, record: &AuditRecord) -> Result<u64, JournalError> {
        let seqs = self.append_batch(std::slice::from_ref(record))?;
        Ok(seqs.first().copied().unwrap_or(self.next_seq))
    }

    /// Appends several records with one `fdatasync` per [`MAX_BATCH_RECORDS`] (group commit) and
    /// returns their sequence numbers. On error none of the records may be acted on (some may
    /// nevertheless have been recorded: over-recording is allowed, under-recording is not).
    pub fn append_batch(&mut self, records: &[AuditRecord]) -> Result<Vec<u64>, JournalError> {
        let mut seqs = Vec::with_capacity(records.len());
        for chunk in records.chunks(MAX_BATCH_RECORDS) {
            self.append_chunk(chunk, &mut seqs)?;
        }
        Ok(seqs)
    }

    fn append_chunk(
        &mut self,
        chunk: &[AuditRecord],
        seqs: &mut Vec<u64>,
    ) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.dir.clone(),
            });
        }
        if self.active.len >= self.options.segment_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(chunk.len() * 256);
        let mut seq = self.next_seq;
        for record in chunk {
            let mut record = record.clone();
            record.seq = seq;
            encode_line(&record, &mut buf)?;
            seqs.push(seq);
            seq += 1;
        }
        self.write_durably(&buf, seq)?;
        self.next_seq = seq;
        Ok(())
    }

    /// Writes `buf` (records below `end_seq`) and syncs as the journal's durability says.
    fn write_durably(&mut self, buf: &[u8], end_seq: u64) -> Result<(), JournalError> {
        let sync = match self.options.durability {
            Durability::EveryAppend => true,
            Durability::Deferred => {
                end_seq.saturating_sub(self.synced_below) > MAX_UNSYNCED_RECORDS
            }
            Durability::NeverForBenchmarks => false,
        };
        let synced_file = self.options.durability != Durability::NeverForBenchmarks;
        let active = &mut self.active;
        if let Err(source) = active.file.write_all(buf) {
            // Cut off whatever part of the lines reached the file, so that the next append does
            // not follow a torn line (readers stop at the first damaged line). If even that
            // fails, the file's state is unknown: refuse everything until reopened, which repairs.
            let restored = active.file.set_len(active.len).is_ok()
                && (!synced_file || active.file.sync_data().is_ok());
            if !restored {
                self.poisoned = true;
            }
            return Err(JournalError::Write {
                path: active.path.clone(),
                source,
            });
        }
        active.len += buf.len() as u64;
        if sync {
            self.sync_active(end_seq)?;
        }
        Ok(())
    }

    /// Syncs the active segment in line: every record below `below` (all that was written)
    /// becomes durable.
    fn sync_active(&mut self, below: u64) -> Result<(), JournalError> {
        if let Err(source) = self.active.file.sync_data() {
            // After a failed fdatasync the kernel may have dropped the dirty pages and marked
            // them clean, so a retry could "succeed" without the data ever reaching the disk.
            self.poisoned = true;
            return Err(JournalError::Sync {
                path: self.active.path.clone(),
                source,
            });
        }
        self.synced_below = below.max(self.synced_below);
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), JournalError> {
        // A sealed segment is never written again, nor synced by a flusher: sync it now.
        if self.options.durability == Durability::Deferred && self.synced_below < self.next_seq {
            self.sync_active(self.next_seq)?;
        }
        self.active = create_segment(&self.dir, self.next_seq)?;
        Ok(())
    }

    /// With [`Durability::Deferred`]: what a flusher must sync to make every record written so
    /// far durable, or `None` if nothing is waiting. The flusher runs [`PendingSync::run`]
    /// without holding the writer (appends go on meanwhile) and reports the outcome with
    /// [`Journal::record_sync`].
    pub fn pending_sync(&self) -> Result<Option<PendingSync>, JournalError> {
        if self.synced_below >= self.next_seq {
            return Ok(None);
        }
        let file = self
            .active
            .file
            .try_clone()
            .map_err(|source| JournalError::Sync {
                path: self.active.path.clone(),
                source,
            })?;
        Ok(Some(PendingSync {
            file,
            path: self.active.path.clone(),
            below: self.next_seq,
        }))
    }

    /// Takes note of a flusher's [`PendingSync::run`]. A failed sync poisons the journal: every
    /// later append fails (fail closed) until the journal is reopened, which repairs it.
    pub fn record_sync(&mut self, outcome: &Result<u64, JournalError>) {
        match outcome {
            Ok(below) => self.synced_below = self.synced_below.max(*below),
            Err(_) => self.poisoned = true,
        }
    }

    /// How many appended records are not yet known to be on stable storage.
    pub fn unsynced(&self) -> u64 {
        self.next_seq.saturating_sub(self.synced_below)
    }

    /// Iterates the records with `seq >= from`, oldest first.
    pub fn read_from(&self, from: u64) -> Result<Records, JournalError> {
        read_from(&self.dir, from)
    }

    /// Drops every record with `seq <= through`, by deleting whole segments. Unlike
    /// [`JournalReader::truncate_through`] the writer may also retire its active segment (it
    /// starts a fresh one first), so this can empty the journal completely. Returns the number
    /// of segments deleted.
    pub fn truncate_through(&mut self, through: u64) -> Result<usize, JournalError> {
        let mut removed = truncate_sealed(&self.dir, through)?;
        if self.active.len > 0 && self.next_seq.saturating_sub(1) <= through {
            let old = self.active.path.clone();
            self.rotate()?;
            remove_segment(&old)?;
            sync_dir(&self.dir)?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// A sync a flusher owes a [`Durability::Deferred`] journal, taken by [`Journal::pending_sync`].
#[derive(Debug)]
pub struct PendingSync {
    file: File,
    path: PathBuf,
    below: u64,
}

impl PendingSync {
    /// `fdatasync`s the segment; on success every record with a sequence number below the
    /// returned one is durable.
    pub fn run(self) -> Result<u64, JournalError> {
        self.file
            .sync_data()
            .map(|()| self.below)
            .map_err(|source| JournalError::Sync {
                path: self.path,
                source,
            })
    }
}

/// The reading end of a journal, for the collector (broker). It takes no lock and never writes
/// to a segment, so it is safe while the writer is live: it ignores an incomplete last line (the
/// writer may be in the middle of writing it) and deletes only sealed segments.
#[derive(Debug, Clone)]
pub struct JournalReader {
    dir: PathBuf,
}

impl JournalReader {
    /// A reader of the journal directory `dir` (which need not exist yet: a journal that was
    /// never written is empty).
    pub fn new(dir: impl AsRef<Path>) -> JournalReader {
        JournalReader {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// The journal directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The journal's identity, or `None` if no writer ever opened it.
    pub fn id(&self) -> Result<Option<String>, JournalError> {
        read_id(&self.dir)
    }

    /// Iterates the records with `seq >= from`, oldest first.
    pub fn read_from(&self, from: u64) -> Result<Records, JournalError> {
        read_from(&self.dir, from)
    }

    /// Deletes every sealed segment whose records all have `seq <= through`. The active segment
    /// is left to the writer (it retires it when full or when reopened), so up to one segment of
    /// already-collected records may remain. Returns the number of segments deleted.
    pub fn truncate_through(&self, through: u64) -> Result<usize, JournalError> {
        truncate_sealed(&self.dir, through)
    }
}

/// A journal that [`crate::AuditStore::collect_from`] can collect: a journal directory's path
/// (`&Path`, `&PathBuf`: read through a [`JournalReader`]), a `&mut JournalReader`, or the
/// writer itself (`&mut Journal`, when writer and store share a process).
pub trait JournalSource {
    /// The journal directory, for error messages.
    fn journal_path(&self) -> &Path;
    /// The journal's identity, or `None` if no writer ever opened it.
    fn journal_id(&self) -> Result<Option<String>, JournalError>;
    /// The records with `seq >= from`, oldest first.
    fn records_from(&self, from: u64) -> Result<Records, JournalError>;
    /// Drops records with `seq <= through` (as far as is safe), returning segments deleted.
    fn drop_through(&mut self, through: u64) -> Result<usize, JournalError>;
}

impl JournalSource for Journal {
    fn journal_path(&self) -> &Path {
        self.path()
    }
    fn journal_id(&self) -> Result<Option<String>, JournalError> {
        Ok(Some(self.id.clone()))
    }
    fn records_from(&self, from: u64) -> Result<Records, JournalError> {
        self.read_from(from)
    }
    fn drop_through(&mut self, through: u64) -> Result<usize, JournalError> {
        self.truncate_through(through)
    }
}

impl JournalSource for JournalReader {
    fn journal_path(&self) -> &Path {
        self.path()
    }
    fn journal_id(&self) -> Result<Option<String>, JournalError> {
        self.id()
    }
    fn records_from(&self, from: u64) -> Result<Records, JournalError> {
        self.read_from(from)
    }
    fn drop_through(&mut self, through: u64) -> Result<usize, JournalError> {
        self.truncate_through(through)
    }
}

impl JournalSource for PathBuf {
    fn journal_path(&self) -> &Path {
        self
    }
    fn journal_id(&self) -> Result<Option<String>, JournalError> {
        read_id(self)
    }
    fn records_from(&self, from: u64) -> Result<Records, JournalError> {
        read_from(self, from)
    }
    fn drop_through(&mut self, through: u64) -> Result<usize, JournalError> {
        truncate_sealed(self, through)
    }
}

impl<T: JournalSource + ?Sized> JournalSource for &mut T {
    fn journal_path(&self) -> &Path {
        (**self).journal_path()
    }
    fn journal_id(&self) -> Result<Option<String>, JournalError> {
        (**self).journal_id()
    }
    fn records_from(&self, from: u64) -> Result<Records, JournalError> {
        (**self).records_from(from)
    }
    fn drop_through(&mut self, through: u64) -> Result<usize, JournalError> {
        (**self).drop_through(through)
    }
}

/// A path names a journal read through a [`JournalReader`]: deleting sealed segments needs no
/// mutable access to anything in this process.
impl JournalSource for &Path {
    fn journal_path(&self) -> &Path {
        self
    }
    fn journal_id(&self) -> Result<Option<String>, JournalError> {
        read_id(self)
    }
    fn records_from(&self, from: u64) -> Result<Records, JournalError> {
        read_from(self, from)
    }
    fn drop_through(&mut self, through: u64) -> Result<usize, JournalError> {
        truncate_sealed(self, through)
    }
}

impl JournalSource for &PathBuf {
    fn journal_path(&self) -> &Path {
        self
    }
    fn journal_id(&self) -> Result<Option<String>, JournalError> {
        read_id(self)
    }
    fn records_from(&self, from: u64) -> Result<Records, JournalError> {
        read_from(self, from)
    }
    fn drop_through(&mut self, through: u64) -> Result<usize, JournalError> {
        truncate_sealed(self, through)
    }
}

/// The records of a journal, oldest first, read lazily segment by segment.
#[derive(Debug)]
pub struct Records {
    segments: std::vec::IntoIter<SegmentInfo>,
    current: Option<Cursor>,
    from: u64,
    failed: bool,
}

#[derive(Debug)]
struct Cursor {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    sealed: bool,
    line: Vec<u8>,
}

impl Iterator for Records {
    type Item = Result<AuditRecord, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if self.current.is_none() {
                let info = self.segments.next()?;
                let sealed = self.segments.len() > 0;
                match File::open(&info.path) {
                    Ok(file) => {
                        self.current = Some(Cursor {
                            path: info.path,
                            reader: BufReader::with_capacity(64 * 1024, file),
                            offset: 0,
                            sealed,
                            line: Vec::new(),
                        });
                    }
                    // Deleted since it was listed: it was fully collected.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        self.failed = true;
                        return Some(Err(JournalError::Read {
                            path: info.path,
                            source,
                        }));
                    }
                }
            }
            let cursor = self.current.as_mut()?;
            cursor.line.clear();
            let n = match cursor.reader.read_until(b'\n', &mut cursor.line) {
                Ok(n) => n,
                Err(source) => {
                    self.failed = true;
                    return Some(Err(JournalError::Read {
                        path: cursor.path.clone(),
                        source,
                    }));
                }
            };
            if n == 0 {
                self.current = None;
                continue;
            }
            match decode_line(&cursor.line) {
                Some(record) => {
                    cursor.offset += n as u64;
                    if record.seq >= self.from {
                        return Some(Ok(record));
                    }
                }
                None if cursor.sealed => {
                    self.failed = true;
                    return Some(Err(JournalError::Corrupt {
                        path: cursor.path.clone(),
                        offset: cursor.offset,
                    }));
                }
                // The torn tail of the active segment (a crash, or the writer mid-append): the
                // journal ends here.
                None => {
                    self.current = None;
                    self.segments = Vec::new().into_iter();
                    return None;
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct SegmentInfo {
    first_seq: u64,
    path: PathBuf,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn list_segments(dir: &Path) -> Result<Vec<SegmentInfo>, JournalError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(JournalError::OpenDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| JournalError::OpenDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(first_seq) = stem.parse() {
            segments.push(SegmentInfo {
                first_seq,
                path: entry.path(),
            });
        }
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

fn read_from(dir: &Path, from: u64) -> Result<Records, JournalError> {
    let mut segments = list_segments(dir)?;
    // Segment i holds sequence numbers below segment i+1's first, so it can be skipped when
    // that is <= from.
    let skip = segments
        .windows(2)
        .take_while(|pair| pair[1].first_seq <= from)
        .count();
    segments.drain(..skip);
    Ok(Records {
        segments: segments.into_iter(),
        current: None,
        from,
        failed: false,
    })
}

fn truncate_sealed(dir: &Path, through: u64) -> Result<usize, JournalError> {
    let segments = list_segments(dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        let (segment, next) = (&pair[0], &pair[1]);
        let all_collected = next.first_seq.saturating_sub(1) <= through || {
            // A gap (a writer restart) between the segments: look at the segment's own records.
            let scan = scan_file(&segment.path)?;
            if scan.valid_len != scan.file_len {
                return Err(JournalError::Corrupt {
                    path: segment.path.clone(),
                    offset: scan.valid_len,
                });
            }
            scan.last_seq.is_none_or(|last| last <= through)
        };
        if !all_collected {
            break;
        }
        remove_segment(&segment.path)?;
        removed += 1;
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[derive(Debug)]
struct Scan {
    valid_len: u64,
    file_len: u64,
    last_seq: Option<u64>,
}

fn scan_file(path: &Path) -> Result<Scan, JournalError> {
    let read_err = |source| JournalError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let file_len = file.metadata().map_err(read_err)?.len();
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::new();
    let mut scan = Scan {
        valid_len: 0,
        file_len,
        last_seq: None,
    };
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(read_err)?;
        if n == 0 {
            break;
        }
        match decode_line(&line) {
            Some(record) => {
                scan.valid_len += n as u64;
                scan.last_seq = Some(record.seq);
            }
            None => break,
        }
    }
    Ok(scan)
}

/// Cuts a torn tail off the newest segment, durably.
fn repair_tail(path: &Path) -> Result<Scan, JournalError> {
    let scan = scan_file(path)?;
    if scan.valid_len < scan.file_len {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| JournalError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        file.set_len(scan.valid_len)
            .map_err(|source| JournalError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        file.sync_all().map_err(|source| JournalError::Sync {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(scan)
}

fn create_segment(dir: &Path, first_seq: u64) -> Result<ActiveSegment, JournalError> {
    let path = dir.join(segment_name(first_seq));
    // create_new: a segment with this name can only exist if sequence numbers went backwards,
    // which must never happen silently.
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| JournalError::Rotate {
            path: path.clone(),
            source,
        })?;
    // Make the new name durable before any record is acknowledged from it.
    sync_dir(dir)?;
    Ok(ActiveSegment { path, file, len: 0 })
}

fn remove_segment(path: &Path) -> Result<(), JournalError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(JournalError::Rotate {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| JournalError::Sync {
            path: dir.to_path_buf(),
            source,
        })
}

fn take_writer_lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| JournalError::Lock {
            path: path.clone(),
            source,
        })?;
    // flock(2): released automatically when the holder dies, so a crashed monitor never leaves
    // a stale lock behind.
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(JournalError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(errno) => Err(JournalError::Lock {
            path,
            source: errno.into(),
        }),
    }
}

fn read_id(dir: &Path) -> Result<Option<String>, JournalError> {
    let path = dir.join(ID_FILE);
    match fs::read_to_string(&path) {
        Ok(id) => Ok(Some(id.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(JournalError::Read { path, source }),
    }
}

fn ensure_id(dir: &Path) -> Result<String, JournalError> {
    if let Some(id) = read_id(dir)? {
        return Ok(id);
    }
    let mut bytes = [0u8; 16];
    let urandom = Path::new("/dev/urandom");
    File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| JournalError::Read {
            path: urandom.to_path_buf(),
            source,
        })?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Write-then-rename so a crash never leaves a half-written identity.
    let tmp = dir.join(format!("{ID_FILE}.tmp"));
    let path = dir.join(ID_FILE);
    let write_err = |source| JournalError::Write {
        path: tmp.clone(),
        source,
    };
    let mut file = File::create(&tmp).map_err(write_err)?;
    file.write_all(format!("{id}\n").as_bytes())
        .map_err(write_err)?;
    file.sync_all().map_err(|source| JournalError::Sync {
        path: tmp.clone(),
        source,
    })?;
    fs::rename(&tmp, &path).map_err(|source| JournalError::Write {
        path: path.clone(),
        source,
    })?;
    sync_dir(dir)?;
    Ok(id)
}

/// Appends `record`'s line to `buf`: the CRC of the JSON in eight hex digits, a space, the
/// JSON, a newline. Encoded in place (no intermediate buffers): it is on the path of every
/// mediated call.
fn encode_line(record: &AuditRecord, buf: &mut Vec<u8>) -> Result<(), JournalError> {
    let start = buf.len();
    buf.extend_from_slice(b"00000000 ");
    serde_json::to_writer(&mut *buf, record).map_err(|e| {
        buf.truncate(start);
        JournalError::Encode(e)
    })?;
    let crc = crc32(&buf[start + 9..]);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, digit) in buf[start..start + 8].iter_mut().enumerate() {
        *digit = HEX[((crc >> (28 - 4 * i)) & 0xf) as usize];
    }
    buf.push(b'\n');
    Ok(())
}

/// A complete, intact line, or `None` for a torn or damaged one.
fn decode_line(line: &[u8]) -> Option<AuditRecord> {
    let body = line.strip_suffix(b"\n")?;
    if body.len() < 9 || body[8] != b' ' {
        return None;
    }
    let crc = std::str::from_utf8(&body[..8]).ok()?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    let json = &body[9..];
    if crc32(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// CRC-32 (IEEE 802.3, the one zlib uses).
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::record::{Caller, Outcome};

    fn record(n: u64) -> AuditRecord {
        AuditRecord {
            time: n,
            op: "connect".into(),
            from: "web".into(),
            to: Some("db".into()),
            object: format!("tcp:{n}"),
            result: Outcome::Allow,
            rule: None,
            caller: Caller::default(),
            reason: None,
            seq: 0,
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn decode_rejects_torn_and_damaged_lines() {
        let mut buf = Vec::new();
        encode_line(&record(1), &mut buf).unwrap();
        assert_eq!(decode_line(&buf).unwrap().time, 1);
        assert!(decode_line(&buf[..buf.len() - 1]).is_none(), "no newline");
        let mut flipped = buf.clone();
        let at = flipped.len() - 5;
        flipped[at] ^= 0x01;
        assert!(decode_line(&flipped).is_none(), "checksum");
        assert!(decode_line(b"\0\0\0\0\0\0\0\0\0\0\n").is_none());
    }

    /// ENOSPC surfaces as an error (never as success), and a journal whose file can no longer be
    /// restored refuses every later append until it is reopened.
    #[test]
    fn disk_full_is_an_error_and_poisons() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        // /dev/full: every write fails with ENOSPC.
        journal.active = ActiveSegment {
            path: PathBuf::from("/dev/full"),
            file: OpenOptions::new().append(true).open("/dev/full").unwrap(),
            len: 0,
        };
        let next = journal.next_seq();
        let err = journal.append(&record(1)).unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        assert!(matches!(err, JournalError::Write { .. }), "{err:?}");
        assert_eq!(journal.next_seq(), next, "no sequence number consumed");
        let err = journal.append(&record(2)).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::Poisoned { .. } | JournalError::Write { .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Journal::open(dir.path()).unwrap();
        let err = Journal::open(dir.path()).unwrap_err();
        assert!(matches!(err, JournalError::Locked { .. }), "{err:?}");
    }
}
