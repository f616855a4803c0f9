#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;

use common::rec;
use shuttle_audit::{AuditStore, Filter, Journal, JournalOptions, JournalReader, Limits, Outcome};

/// Two monitors append to their own journals while the broker collects both, repeatedly; at the
/// end every record is in the store exactly once.
#[test]
fn two_writers_and_a_collector() {
    const PER_WRITER: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut store = AuditStore::open(
        dir.path().join("audit.db"),
        Limits {
            max_records: 100_000,
        },
    )
    .unwrap();
    // All three start together, so collection overlaps the appends.
    let start = Arc::new(Barrier::new(3));
    let mut writers = Vec::new();
    for vm in ["web", "db"] {
        let path = dir.path().join("vms").join(vm).join("audit.journal");
        // Small segments, so the collector deletes sealed segments while the writer appends.
        let mut journal = Journal::open_with(
            &path,
            JournalOptions {
                segment_bytes: 4096,
                ..JournalOptions::default()
            },
        )
        .unwrap();
        let start = start.clone();
        writers.push(thread::spawn(move || {
            start.wait();
            for t in 0..PER_WRITER {
                let batch = [rec(t, vm, "other", Outcome::Allow)];
                if t % 3 == 0 {
                    journal.append_batch(&batch).unwrap();
                } else {
                    journal.append(&batch[0]).unwrap();
                }
            }
        }));
    }
    let readers: Vec<_> = ["web", "db"]
        .map(|vm| {
            (
                vm,
                JournalReader::new(dir.path().join("vms").join(vm).join("audit.journal")),
            )
        })
        .into();
    let mut readers = readers;
    start.wait();
    while !writers.iter().all(|w| w.is_finished()) {
        for (vm, reader) in &mut readers {
            store.collect_from(reader, vm).unwrap();
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    for (vm, reader) in &mut readers {
        store.collect_from(reader, vm).unwrap();
    }
    let all = store.query(&Filter::default()).unwrap();
    assert_eq!(all.len() as u64, 2 * PER_WRITER);
    let unique: HashSet<(String, u64)> =
        all.iter().map(|(_, r)| (r.from.clone(), r.time)).collect();
    assert_eq!(unique.len() as u64, 2 * PER_WRITER, "no duplicates");
    for vm in ["web", "db"] {
        let seqs: Vec<u64> = all
            .iter()
            .filter(|(_, r)| r.from == vm)
            .map(|(_, r)| r.seq)
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=PER_WRITER).collect::<Vec<_>>(), "{vm}");
    }
    // Fully collected journals shrank to at most the active segment.
    for (_, reader) in &readers {
        let left = reader.read_from(0).unwrap().count();
        assert!(
            left < PER_WRITER as usize,
            "{left} records left in a journal"
        );
    }
}
