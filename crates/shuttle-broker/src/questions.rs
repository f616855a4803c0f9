//! `ask` rules: questions held for an operator (`shuttle pending`, `shuttle answer`), denied
//! when nobody answers in time, and answers remembered for a while when asked to (`--for`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use shuttle_proto::{PendingQuestion, Question};

struct Waiting {
    question: Question,
    since: Instant,
    reply: mpsc::Sender<bool>,
}

struct Remembered {
    vm: String,
    op: String,
    to: Option<String>,
    object: String,
    allow: bool,
    until: Instant,
}

impl Remembered {
    fn covers(&self, q: &Question) -> bool {
        self.vm == q.vm && self.op == q.op && self.to == q.to && self.object == q.object
    }
}

#[derive(Default)]
pub struct Questions {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
    remembered: Mutex<Vec<Remembered>>,
}

impl std::fmt::Debug for Questions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Questions").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    #[error("no question {0} is waiting (see `shuttle pending`); it may have timed out")]
    NoSuchQuestion(u64),
}

impl Questions {
    /// Holds `q` until it is answered or its timeout passes. Returns the answer and how it came.
    pub fn ask(&self, q: Question) -> (bool, String) {
        let now = Instant::now();
        {
            let mut remembered = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
            remembered.retain(|r| r.until > now);
            if let Some(r) = remembered.iter().find(|r| r.covers(&q)) {
                return (r.allow, "a remembered answer".into());
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let timeout = Duration::from_millis(q.timeout_ms);
        let (tx, rx) = mpsc::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Waiting {
                    question: q,
                    since: now,
                    reply: tx,
                },
            );
        let answer = rx.recv_timeout(timeout);
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match answer {
            Ok(allow) => (allow, format!("answered by an operator (question {id})")),
            Err(_) => (
                false,
                format!("no answer within {timeout:?} (question {id})"),
            ),
        }
    }

    pub fn pending(&self) -> Vec<PendingQuestion> {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<PendingQuestion> = waiting
            .iter()
            .map(|(id, w)| PendingQuestion {
                id: *id,
                question: w.question.clone(),
                waiting_ms: w.since.elapsed().as_millis() as u64,
            })
            .collect();
        list.sort_by_key(|p| p.id);
        list
    }

    /// Answers question `id`; with `remember`, the same question (same VM, op, target and
    /// object) gets the same answer without asking until the time is up.
    pub fn answer(
        &self,
        id: u64,
        allow: bool,
        remember: Option<Duration>,
    ) -> Result<(), AnswerError> {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let w = waiting.get(&id).ok_or(AnswerError::NoSuchQuestion(id))?;
        if let Some(d) = remember {
            let q = &w.question;
            self.remembered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Remembered {
                    vm: q.vm.clone(),
                    op: q.op.clone(),
                    to: q.to.clone(),
                    object: q.object.clone(),
                    allow,
                    until: Instant::now() + d,
                });
        }
        let _ = w.reply.send(allow);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;

    fn q(timeout_ms: u64) -> Question {
        Question {
            vm: "a".into(),
            op: "signal".into(),
            to: Some("b".into()),
            object: "sleep".into(),
            rule: "rule #1".into(),
            timeout_ms,
        }
    }

    #[test]
    fn unanswered_questions_are_denied() {
        let qs = Questions::default();
        let (allow, how) = qs.ask(q(20));
        assert!(!allow);
        assert!(how.contains("no answer"), "{how}");
        assert!(qs.pending().is_empty());
    }

    #[test]
    fn answers_arrive_and_can_be_remembered() {
        let qs = Arc::new(Questions::default());
        let asker = {
            let qs = Arc::clone(&qs);
            std::thread::spawn(move || qs.ask(q(5_000)))
        };
        let id = loop {
            if let Some(p) = qs.pending().first() {
                break p.id;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(
            qs.answer(id + 100, true, None),
            Err(AnswerError::NoSuchQuestion(id + 100))
        );
        qs.answer(id, true, Some(Duration::from_secs(60))).unwrap();
        assert!(asker.join().unwrap().0);
        // Remembered: no question this time.
        let (allow, how) = qs.ask(q(1));
        assert!(allow && how.contains("remembered"), "{how}");
        // Another object is asked anew (and times out).
        let mut other = q(1);
        other.object = "other".into();
        assert!(!qs.ask(other).0);
    }
}
