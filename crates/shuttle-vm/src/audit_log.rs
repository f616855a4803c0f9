//! A VM's audit journal as its monitor keeps it: every decision is written before it takes
//! effect, and a flusher thread makes it durable on disk right behind.
//!
//! Why not `fdatasync` before every decision: it costs about 130 µs here, more than twice the
//! whole budget of a mediated connect (DESIGN §6: ≤ 50 µs added). A record written with
//! `write(2)` is in the kernel's page cache, so it survives the death of the monitor, the
//! broker or the VM: the only thing that could still lose it is the machine losing power
//! within a few milliseconds of the decision, and that takes every connection it allowed with
//! it. The flusher syncs in rounds (group commit): one `fdatasync` covers every record written
//! since the last, and rounds start at most every `GROUP_COMMIT_WINDOW`, so a record is on
//! disk within about that window plus one sync of being written. Syncing back to back instead
//! (what a 1 ms window amounted to under load) kept a core busy with block I/O and slowed
//! every mediated call on this 2-core machine by a fifth. A flush that fails poisons the
//! journal and every later decision is refused (fail closed); the journal bounds how many
//! records may wait (`MAX_UNSYNCED_RECORDS`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use shuttle_audit::{AuditRecord, Durability, Journal, JournalOptions};

/// How long the flusher lets records gather before a sync: the most a record waits for the
/// disk beyond the sync itself.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(10);

/// Windows without a record the flusher waits through before it sleeps until woken: while
/// decisions keep coming, the thread that writes one never has to wake the flusher (a futex
/// call, and often an interrupt to the other core, on the path of the call it is deciding).
const IDLE_WINDOWS_BEFORE_SLEEP: u32 = 10;

#[derive(Debug)]
pub struct VmJournal {
    path: PathBuf,
    /// Opened at the first decision, not at VM start: opening syncs several files, which would
    /// add milliseconds to every start for VMs that never ask for anything.
    writer: Mutex<Option<Journal>>,
    /// Signalled after an append when the flusher sleeps (`flusher_sleeps`, read and written
    /// under `writer`'s lock, so no wake-up is lost).
    written: Condvar,
    flusher_sleeps: AtomicBool,
    flusher: std::sync::Once,
}

impl VmJournal {
    pub fn new(path: PathBuf) -> Arc<VmJournal> {
        Arc::new(VmJournal {
            path,
            writer: Mutex::new(None),
            written: Condvar::new(),
            flusher_sleeps: AtomicBool::new(false),
            flusher: std::sync::Once::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Journal>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `record` before the decision it describes takes effect; false when that failed
    /// (the caller must then refuse).
    pub fn record(self: &Arc<Self>, vm: &str, record: &AuditRecord) -> bool {
        let written = self.append(vm, record);
        if written {
            // Started once the journal is open: a flusher that found none would end at once.
            self.flusher.call_once(|| {
                let flusher = Arc::clone(self);
                std::thread::spawn(move || flusher.flush_forever());
            });
        }
        written
    }

    /// Records `record` and syncs it in line, on the calling thread alone (for decisions
    /// taken while the monitor must stay single-threaded: before it forks the VM's init).
    pub fn record_synced(&self, vm: &str, record: &AuditRecord) -> bool {
        let written = self.append(vm, record);
        self.flush();
        written && self.lock().as_ref().is_some_and(|j| j.unsynced() == 0)
    }

    fn append(&self, vm: &str, record: &AuditRecord) -> bool {
        let mut guard = self.lock();
        if guard.is_none() {
            let options = JournalOptions {
                durability: Durability::Deferred,
                ..JournalOptions::default()
            };
            match Journal::open_with(&self.path, options) {
                Ok(j) => *guard = Some(j),
                Err(e) => {
                    tracing::error!(vm, error = %e, "cannot open the audit journal; refusing");
                    return false;
                }
            }
        }
        let Some(journal) = guard.as_mut() else {
            return false;
        };
        match journal.append(record) {
            Ok(_) => {
                if self.flusher_sleeps.swap(false, Ordering::Relaxed) {
                    self.written.notify_one();
                }
                true
            }
            Err(e) => {
                tracing::error!(vm, error = %e, "audit journal write failed; refusing");
                false
            }
        }
    }

    /// Syncs whatever was written, once, in line (at the monitor's end).
    pub fn flush(&self) {
        let pending = match self.lock().as_ref().map(Journal::pending_sync) {
            Some(Ok(Some(p))) => p,
            _ => return,
        };
        let outcome = pending.run();
        if let Some(j) = self.lock().as_mut() {
            j.record_sync(&outcome);
        }
    }

    fn flush_forever(&self) {
        let mut idle_windows = 0;
        let mut guard = self.lock();
        loop {
            let pending = match guard.as_ref().map(Journal::pending_sync) {
                Some(Ok(Some(p))) => p,
                Some(Ok(None)) if idle_windows < IDLE_WINDOWS_BEFORE_SLEEP => {
                    idle_windows += 1;
                    drop(guard);
                    std::thread::sleep(GROUP_COMMIT_WINDOW);
                    guard = self.lock();
                    continue;
                }
                Some(Ok(None)) => {
                    self.flusher_sleeps.store(true, Ordering::Relaxed);
                    guard = self.written.wait(guard).unwrap_or_else(|e| e.into_inner());
                    // Woken by a first record: let the ones right behind it join the same
                    // sync (group commit), instead of a sync per record at a modest rate.
                    drop(guard);
                    std::thread::sleep(GROUP_COMMIT_WINDOW);
                    guard = self.lock();
                    continue;
                }
                Some(Err(e)) => {
                    // Only the descriptor to sync through could not be had (out of
                    // descriptors): nothing is lost, and appends sync in line once
                    // `MAX_UNSYNCED_RECORDS` wait. The next round tries again.
                    tracing::warn!(error = %e, "cannot start a sync of the audit journal; trying again");
                    drop(guard);
                    std::thread::sleep(GROUP_COMMIT_WINDOW);
                    guard = self.lock();
                    continue;
                }
                None => return,
            };
            idle_windows = 0;
            // Sync without holding the writer: decisions go on being written meanwhile, and the
            // next round covers them all.
            drop(guard);
            let outcome = pending.run();
            if let Err(e) = &outcome {
                tracing::error!(error = %e, "syncing the audit journal failed; refusing from now on");
            }
            guard = self.lock();
            if let Some(j) = guard.as_mut() {
                j.record_sync(&outcome);
            }
            if outcome.is_err() {
                return;
            }
            // The next round starts a window later, whatever is written meanwhile.
            drop(guard);
            std::thread::sleep(GROUP_COMMIT_WINDOW);
            guard = self.lock();
        }
    }
}
