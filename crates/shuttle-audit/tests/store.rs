#![allow(clippy::unwrap_used)]

mod common;

use common::{allow, copy_dir, rec};
use shuttle_audit::{
    AuditStore, EdgeCount, Filter, Journal, JournalReader, Limits, Outcome, StoreError,
};

fn store(dir: &tempfile::TempDir, max_records: u64) -> AuditStore {
    AuditStore::open(dir.path().join("audit.db"), Limits { max_records }).unwrap()
}

#[test]
fn insert_and_query_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store(&dir, 100);
    let mut r = rec(5, "web", "db", Outcome::Deny);
    r.reason = Some("no rule matched: default deny".into());
    r.seq = 3;
    let id = store.insert(&r).unwrap();
    let mut a = rec(6, "@host", "db", Outcome::AskAllow);
    a.to = None;
    let ids = store.insert_batch(&[allow(7), a.clone()]).unwrap();
    assert!(ids.iter().all(|&i| i > id));

    // Ordered by time, then id.
    let all = store.query(&Filter::default()).unwrap();
    assert_eq!(all, vec![(id, r), (ids[1], a), (ids[0], allow(7))]);
    assert_eq!(store.len().unwrap(), 3);
}

#[test]
fn reopen_keeps_records_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = store(&dir, 100);
        store.insert(&allow(1)).unwrap();
    }
    let store = store(&dir, 100);
    assert_eq!(store.len().unwrap(), 1);
    let ro = AuditStore::open_read_only(dir.path().join("audit.db")).unwrap();
    assert_eq!(ro.query(&Filter::default()).unwrap().len(), 1);
}

#[test]
fn zero_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = AuditStore::open(dir.path().join("a.db"), Limits { max_records: 0 }).unwrap_err();
    assert!(matches!(err, StoreError::InvalidLimits));
}

#[test]
fn collect_moves_records_and_truncates_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let jpath = dir.path().join("vms/web/audit.journal");
    let mut journal = Journal::open(&jpath).unwrap();
    for t in 1..=10 {
        journal.append(&allow(t)).unwrap();
    }
    let mut store = store(&dir, 1000);
    assert_eq!(store.collect_from(&mut journal, "web").unwrap(), 10);
    assert_eq!(store.len().unwrap(), 10);
    assert_eq!(
        journal.read_from(0).unwrap().count(),
        0,
        "journal truncated"
    );
    let (_, last) = store.high_water_mark("web").unwrap().unwrap();
    assert_eq!(last, 10);
    // Nothing new: nothing collected.
    assert_eq!(store.collect_from(&mut journal, "web").unwrap(), 0);
    journal.append(&allow(11)).unwrap();
    assert_eq!(store.collect_from(&mut journal, "web").unwrap(), 1);
    let seqs: Vec<u64> = store
        .query(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.seq)
        .collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
}

/// A crash between the commit and the journal truncation leaves the records in both places;
/// collecting the untruncated journal again must not duplicate anything.
#[test]
fn collect_is_exactly_once_across_a_crash_before_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let jpath = dir.path().join("j");
    let backup = dir.path().join("j.before-truncate");
    {
        let mut journal = Journal::open(&jpath).unwrap();
        for t in 1..=5 {
            journal.append(&allow(t)).unwrap();
        }
    }
    // Reopen seals the segment, so the collector (a JournalReader) may delete it.
    let mut journal = Journal::open(&jpath).unwrap();
    journal.append(&allow(6)).unwrap();
    copy_dir(&jpath, &backup);

    let mut store = store(&dir, 1000);
    // By path, as the broker does.
    assert_eq!(store.collect_from(&jpath, "web").unwrap(), 6);
    let mut reader = JournalReader::new(&jpath);

    // "Crash": the truncation never happened.
    let mut untruncated = JournalReader::new(&backup);
    assert_eq!(untruncated.read_from(0).unwrap().count(), 6);
    assert_eq!(store.collect_from(&mut untruncated, "web").unwrap(), 0);
    assert_eq!(store.len().unwrap(), 6);

    // A record written after the crash is collected once, exactly.
    journal.append(&allow(7)).unwrap();
    assert_eq!(store.collect_from(&mut reader, "web").unwrap(), 1);
    assert_eq!(store.collect_from(&mut reader, "web").unwrap(), 0);
    assert_eq!(store.len().unwrap(), 7);
}

#[test]
fn high_water_marks_are_per_source_and_per_journal_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store(&dir, 1000);
    let mut web = Journal::open(dir.path().join("web")).unwrap();
    let mut db = Journal::open(dir.path().join("db")).unwrap();
    for t in 1..=3 {
        web.append(&rec(t, "web", "db", Outcome::Allow)).unwrap();
    }
    db.append(&rec(10, "db", "web", Outcome::Deny)).unwrap();
    assert_eq!(store.collect_from(&mut web, "web").unwrap(), 3);
    // db's journal also starts at seq 1: web's mark must not hide it.
    assert_eq!(store.collect_from(&mut db, "db").unwrap(), 1);
    assert_eq!(store.high_water_mark("web").unwrap().unwrap().1, 3);
    assert_eq!(store.high_water_mark("db").unwrap().unwrap().1, 1);

    // VM "web" removed and created again: a new journal, numbering from 1 again.
    drop(web);
    std::fs::remove_dir_all(dir.path().join("web")).unwrap();
    let mut web = Journal::open(dir.path().join("web")).unwrap();
    web.append(&rec(20, "web", "db", Outcome::Allow)).unwrap();
    assert_eq!(store.collect_from(&mut web, "web").unwrap(), 1);
    assert_eq!(store.len().unwrap(), 5);
}

#[test]
fn rotation_keeps_the_newest_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store(&dir, 10);
    for t in 0..25 {
        store.insert(&allow(1000 + t)).unwrap();
        assert!(store.len().unwrap() <= 10);
    }
    // A batch larger than the limit, with times older than some kept records.
    let batch: Vec<_> = (0..15).map(|t| allow(1020 + t)).collect();
    store.insert_batch(&batch).unwrap();
    assert_eq!(store.len().unwrap(), 10);
    let times: Vec<u64> = store
        .query(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.time)
        .collect();
    assert_eq!(times, (1025..1035).collect::<Vec<_>>());

    // Collection rotates too.
    let mut journal = Journal::open(dir.path().join("j")).unwrap();
    for t in 0..30 {
        journal.append(&allow(2000 + t)).unwrap();
    }
    store.collect_from(&mut journal, "j").unwrap();
    let times: Vec<u64> = store
        .query(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.time)
        .collect();
    assert_eq!(times, (2020..2030).collect::<Vec<_>>());
    // The counter the triggers keep agrees with the table.
    assert_eq!(store.len().unwrap(), 10);
}

fn sample_store(dir: &tempfile::TempDir) -> (AuditStore, Vec<i64>) {
    let mut store = store(dir, 1000);
    let ids = store
        .insert_batch(&[
            rec(100, "web", "db", Outcome::Allow),
            rec(200, "web", "db", Outcome::Deny),
            rec(300, "mail", "viewer", Outcome::AskAllow),
            rec(400, "db", "web", Outcome::Error),
            rec(500, "mail", "viewer", Outcome::AskDeny),
            rec(600, "web", "db", Outcome::Allow),
        ])
        .unwrap();
    (store, ids)
}

fn times(store: &AuditStore, filter: &Filter) -> Vec<u64> {
    store
        .query(filter)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.time)
        .collect()
}

#[test]
fn query_filters() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ids) = sample_store(&dir);
    let vm = |name: &str| Filter {
        vm: Some(name.into()),
        ..Filter::default()
    };
    assert_eq!(times(&store, &vm("web")), vec![100, 200, 400, 600]);
    assert_eq!(times(&store, &vm("viewer")), vec![300, 500]);
    assert_eq!(times(&store, &vm("nobody")), Vec::<u64>::new());
    let denied = Filter {
        denied_only: true,
        ..Filter::default()
    };
    assert_eq!(times(&store, &denied), vec![200, 400, 500]);
    let since = Filter {
        since: Some(400),
        ..Filter::default()
    };
    assert_eq!(times(&store, &since), vec![400, 500, 600]);
    let after = Filter {
        after_id: Some(ids[3]),
        ..Filter::default()
    };
    assert_eq!(times(&store, &after), vec![500, 600]);
    let combined = Filter {
        vm: Some("web".into()),
        denied_only: true,
        since: Some(300),
        after_id: None,
        limit: Some(1),
    };
    assert_eq!(times(&store, &combined), vec![400]);
    let limited = Filter {
        limit: Some(2),
        ..Filter::default()
    };
    assert_eq!(times(&store, &limited), vec![100, 200]);
}

/// A follower polling with `after_id` sees every record once, even one collected late with an
/// older time.
#[test]
fn follow_by_id_never_skips_late_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store(&dir, 1000);
    store.insert(&allow(500)).unwrap();
    store.insert(&allow(100)).unwrap(); // collected late, older time
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .query(&Filter {
                after_id: Some(after),
                limit: Some(1),
                ..Filter::default()
            })
            .unwrap();
        let Some((id, r)) = page.into_iter().next() else {
            break;
        };
        after = id;
        seen.push(r.time);
    }
    assert_eq!(seen, vec![500, 100]);
}

#[test]
fn counts_and_edges() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = sample_store(&dir);
    let all = store.counts(&Filter::default()).unwrap();
    assert_eq!((all.allowed, all.denied), (3, 3));
    let web = store
        .counts(&Filter {
            vm: Some("web".into()),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!((web.allowed, web.denied), (2, 2));
    let edges = store.counts_by_edge(&Filter::default()).unwrap();
    let edge = |from: &str, to: &str, allowed, denied| EdgeCount {
        op: "connect".into(),
        from: from.into(),
        to: Some(to.into()),
        allowed,
        denied,
    };
    assert_eq!(
        edges,
        vec![
            edge("db", "web", 0, 1),
            edge("mail", "viewer", 1, 1),
            edge("web", "db", 2, 1),
        ]
    );
    let empty = store
        .counts(&Filter {
            since: Some(10_000),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!((empty.allowed, empty.denied), (0, 0));
}
