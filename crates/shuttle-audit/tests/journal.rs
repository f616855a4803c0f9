#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;

use common::{allow, segments};
use shuttle_audit::{Journal, JournalError, JournalOptions, JournalReader, RESTART_SEQ_GAP};

fn read_all(journal: &Journal) -> Vec<shuttle_audit::AuditRecord> {
    journal
        .read_from(0)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[test]
fn append_and_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path().join("audit.journal")).unwrap();
    let first = journal.append(&allow(10)).unwrap();
    let second = journal.append(&allow(20)).unwrap();
    assert_eq!(first, 1);
    assert_eq!(second, 2);
    let seqs = journal.append_batch(&[allow(30), allow(40)]).unwrap();
    assert_eq!(seqs, vec![3, 4]);

    let records = read_all(&journal);
    let mut expected: Vec<_> = [10, 20, 30, 40].into_iter().map(allow).collect();
    for (i, r) in expected.iter_mut().enumerate() {
        r.seq = i as u64 + 1;
    }
    assert_eq!(records, expected);

    let from_3: Vec<u64> = journal
        .read_from(3)
        .unwrap()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(from_3, vec![3, 4]);
}

#[test]
fn records_are_durable_across_reopen_and_seq_keeps_growing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let mut journal = Journal::open(&path).unwrap();
        for t in 0..5 {
            journal.append(&allow(t)).unwrap();
        }
    }
    let mut journal = Journal::open(&path).unwrap();
    let seqs: Vec<u64> = read_all(&journal).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    let next = journal.append(&allow(99)).unwrap();
    assert!(
        next > 5 + RESTART_SEQ_GAP - 1,
        "restart skips a gap: {next}"
    );
    assert_eq!(read_all(&journal).len(), 6);
    // The collector's view agrees and needs no lock.
    let reader = JournalReader::new(&path);
    assert_eq!(reader.read_from(0).unwrap().count(), 6);
    assert_eq!(reader.id().unwrap().as_deref(), Some(journal.id()));
}

#[test]
fn torn_trailing_record_is_ignored_and_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let mut journal = Journal::open(&path).unwrap();
        journal.append(&allow(1)).unwrap();
        journal.append(&allow(2)).unwrap();
    }
    let segment = segments(&path).pop().unwrap();
    let good_len = fs::metadata(&segment).unwrap().len();
    // A crash in the middle of an append: half a line, no newline.
    let mut f = OpenOptions::new().append(true).open(&segment).unwrap();
    f.write_all(b"1234abcd {\"time\":3,\"op\":\"conn").unwrap();
    drop(f);

    // Readers ignore the torn tail.
    let reader = JournalReader::new(&path);
    assert_eq!(reader.read_from(0).unwrap().count(), 2);

    // The writer cuts it off on open and continues after it.
    let mut journal = Journal::open(&path).unwrap();
    assert_eq!(fs::metadata(&segment).unwrap().len(), good_len);
    journal.append(&allow(3)).unwrap();
    let times: Vec<u64> = read_all(&journal).iter().map(|r| r.time).collect();
    assert_eq!(times, vec![1, 2, 3]);
}

#[test]
fn garbage_after_a_crash_is_treated_as_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let mut journal = Journal::open(&path).unwrap();
        journal.append(&allow(1)).unwrap();
    }
    let segment = segments(&path).pop().unwrap();
    // Zero-filled blocks (file size updated, data never written) and a complete line whose
    // checksum does not match.
    let mut f = OpenOptions::new().append(true).open(&segment).unwrap();
    f.write_all(&[0u8; 100]).unwrap();
    f.write_all(b"\n00000000 {}\n").unwrap();
    drop(f);
    let journal = Journal::open(&path).unwrap();
    assert_eq!(read_all(&journal).len(), 1);
}

#[test]
fn corruption_in_a_sealed_segment_is_an_error_not_silence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let mut journal = Journal::open(&path).unwrap();
        journal.append(&allow(1)).unwrap();
        journal.append(&allow(2)).unwrap();
    }
    let _writer = Journal::open(&path).unwrap(); // seals the first segment
    let sealed = segments(&path).into_iter().next().unwrap();
    let mut bytes = fs::read(&sealed).unwrap();
    bytes[20] ^= 0x20;
    fs::write(&sealed, bytes).unwrap();
    let results: Vec<_> = JournalReader::new(&path).read_from(0).unwrap().collect();
    assert!(
        matches!(results.last(), Some(Err(JournalError::Corrupt { .. }))),
        "{results:?}"
    );
}

#[test]
fn truncate_through_keeps_later_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    // Small segments so that records spread over several of them.
    let options = JournalOptions {
        segment_bytes: 600,
        ..JournalOptions::default()
    };
    let mut journal = Journal::open_with(&path, options).unwrap();
    for t in 1..=20 {
        journal.append(&allow(t)).unwrap();
    }
    assert!(segments(&path).len() > 3, "{:?}", segments(&path));

    // The collector may delete only sealed segments whose records are all <= 10.
    let reader = JournalReader::new(&path);
    let removed = reader.truncate_through(10).unwrap();
    assert!(removed > 0);
    let seqs: Vec<u64> = read_all(&journal).iter().map(|r| r.seq).collect();
    assert!(seqs.iter().all(|&s| s <= 20));
    assert!(seqs.contains(&11), "record 11 kept: {seqs:?}");
    assert_eq!(seqs.last(), Some(&20));
    assert!(
        seqs.windows(2).all(|w| w[0] + 1 == w[1]),
        "contiguous: {seqs:?}"
    );
    assert!(seqs[0] <= 11);

    // The writer can retire even its active segment, and keeps numbering after it.
    journal.truncate_through(20).unwrap();
    assert!(read_all(&journal).is_empty());
    assert_eq!(journal.append(&allow(21)).unwrap(), 21);
    let seqs: Vec<u64> = read_all(&journal).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![21]);
    drop(journal);
    // And after a restart numbering still grows.
    let mut journal = Journal::open(&path).unwrap();
    assert!(journal.append(&allow(22)).unwrap() > 21);
}

#[test]
fn collector_never_deletes_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let mut journal = Journal::open(&path).unwrap();
    journal.append(&allow(1)).unwrap();
    JournalReader::new(&path)
        .truncate_through(u64::MAX)
        .unwrap();
    // The writer still appends to a file that exists, and nothing was lost.
    journal.append(&allow(2)).unwrap();
    assert_eq!(read_all(&journal).len(), 2);
}

#[test]
fn reader_of_a_journal_never_written_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let reader = JournalReader::new(dir.path().join("nope"));
    assert_eq!(reader.read_from(0).unwrap().count(), 0);
    assert_eq!(reader.id().unwrap(), None);
    assert_eq!(reader.truncate_through(5).unwrap(), 0);
}

#[test]
fn large_batches_are_split_but_complete() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path().join("j")).unwrap();
    let batch: Vec<_> = (0..(shuttle_audit::MAX_BATCH_RECORDS as u64 + 10))
        .map(allow)
        .collect();
    let seqs = journal.append_batch(&batch).unwrap();
    assert_eq!(seqs.len(), batch.len());
    assert_eq!(read_all(&journal).len(), batch.len());
}

fn deferred(path: &std::path::Path, segment_bytes: u64) -> Journal {
    Journal::open_with(
        path,
        JournalOptions {
            segment_bytes,
            durability: shuttle_audit::Durability::Deferred,
        },
    )
    .unwrap()
}

#[test]
fn deferred_appends_are_readable_at_once_and_a_flusher_syncs_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.journal");
    let mut journal = deferred(&path, 1 << 20);
    assert!(
        journal.pending_sync().unwrap().is_none(),
        "nothing written yet"
    );
    journal.append(&allow(1)).unwrap();
    journal.append(&allow(2)).unwrap();
    assert_eq!(journal.unsynced(), 2);
    // Written means readable by the collector, before any sync.
    let seen: Vec<u64> = JournalReader::new(&path)
        .read_from(0)
        .unwrap()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(seen, vec![1, 2]);

    let pending = journal.pending_sync().unwrap().expect("two records wait");
    // Appends go on while the flusher syncs.
    journal.append(&allow(3)).unwrap();
    let outcome = pending.run();
    assert_eq!(outcome.as_ref().ok(), Some(&3), "synced below seq 3");
    journal.record_sync(&outcome);
    assert_eq!(
        journal.unsynced(),
        1,
        "record 3 came after the sync was taken"
    );
    let outcome = journal.pending_sync().unwrap().unwrap().run();
    journal.record_sync(&outcome);
    assert_eq!(journal.unsynced(), 0);
    assert!(journal.pending_sync().unwrap().is_none());
}

#[test]
fn deferred_writer_syncs_in_line_past_the_bound_and_when_sealing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.journal");
    let mut journal = deferred(&path, 1 << 30);
    for i in 0..shuttle_audit::MAX_UNSYNCED_RECORDS + 1 {
        journal.append(&allow(i)).unwrap();
    }
    assert_eq!(journal.unsynced(), 0, "the bound forced an in-line sync");

    // A tiny segment size: every append seals the previous segment, which is synced then.
    let mut small = deferred(&dir.path().join("small.journal"), 1);
    small.append(&allow(1)).unwrap();
    assert_eq!(small.unsynced(), 1);
    small.append(&allow(2)).unwrap();
    assert_eq!(small.unsynced(), 1, "sealing segment 1 synced it");
}

#[test]
fn a_failed_flush_poisons_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = deferred(&dir.path().join("audit.journal"), 1 << 20);
    journal.append(&allow(1)).unwrap();
    journal.record_sync(&Err(JournalError::Poisoned {
        path: dir.path().to_path_buf(),
    }));
    assert!(
        journal.append(&allow(2)).is_err(),
        "no decision may follow a record that may not have reached the disk"
    );
}
