//! Work done behind the calls, on a thread of its own: closing what mediation leaves behind and
//! making sockets ahead of need.
//!
//! A mediator runs on the core of the VM thread it answers (synchronous wake-ups), and whatever
//! it does after answering delays that thread's next call: a client that connects in a loop
//! would pay for it every time. Two chores can wait, so they go to the housekeeper, which runs
//! on whatever core is free:
//! * closing a caller's old socket once an injected one replaced it (the monitor holds the
//!   last reference, and the socket is torn down right there), in batches;
//! * refilling a target's pool of fresh sockets (`TargetVm::socket_in_network`) before it runs
//!   dry, so that a mediated TCP connect finds its socket made.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use super::target::{SocketKind, TargetVm};

/// How long descriptors to close gather before the housekeeper closes them (a refill cuts it
/// short): one wake-up per batch.
const GATHER: Duration = Duration::from_millis(5);

/// At most this many descriptors wait; beyond it a mediator closes the batch itself, so the
/// descriptors the monitor holds stay a small part of its limit whatever the rate of calls
/// (at 16 000 connects a second, about 80 gather in a batch).
const MAX_WAITING: usize = 256;

#[derive(Debug, Default)]
pub struct Housekeeper {
    shared: Arc<Shared>,
    thread: OnceLock<bool>,
}

#[derive(Debug, Default)]
struct Shared {
    chores: Mutex<Chores>,
    /// Signalled when the first chore of a batch arrives, and for every refill.
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct Chores {
    to_close: Vec<OwnedFd>,
    to_refill: Vec<(Arc<TargetVm>, SocketKind)>,
}

impl Chores {
    fn is_empty(&self) -> bool {
        self.to_close.is_empty() && self.to_refill.is_empty()
    }
}

impl Housekeeper {
    /// Closes `fd` soon.
    pub fn close_later(&self, fd: OwnedFd) {
        let mut chores = self.shared.lock();
        let first = chores.is_empty();
        chores.to_close.push(fd);
        if chores.to_close.len() >= MAX_WAITING || !self.started() {
            let batch = std::mem::take(&mut chores.to_close);
            drop(chores);
            drop(batch);
            return;
        }
        drop(chores);
        if first {
            self.shared.arrived.notify_one();
        }
    }

    /// Refills `target`'s pool of fresh sockets of `kind` soon. False when there is no
    /// housekeeper to do it (the caller refills in line).
    pub fn refill_later(&self, target: Arc<TargetVm>, kind: SocketKind) -> bool {
        if !self.started() {
            return false;
        }
        self.shared.lock().to_refill.push((target, kind));
        self.shared.arrived.notify_one();
        true
    }

    /// Whether the housekeeping thread runs (started with the first chore).
    fn started(&self) -> bool {
        *self.thread.get_or_init(|| {
            let shared = Arc::clone(&self.shared);
            let started = std::thread::Builder::new()
                .name("housekeeper".into())
                .spawn(move || shared.work_forever());
            if let Err(e) = &started {
                // Nothing is lost: mediators do the chores in line.
                tracing::warn!(error = %e, "cannot start the housekeeping thread");
            }
            started.is_ok()
        })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Chores> {
        self.chores.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn work_forever(&self) {
        // Like the receivers: never act with a group of the monitor's.
        super::target::drop_supplementary_groups();
        loop {
            let mut chores = self.lock();
            while chores.is_empty() {
                chores = self.arrived.wait(chores).unwrap_or_else(|e| e.into_inner());
            }
            if chores.to_refill.is_empty() {
                // Only descriptors to close: let more gather, unless a refill comes.
                chores = self
                    .arrived
                    .wait_timeout_while(chores, GATHER, |c| c.to_refill.is_empty())
                    .map_or_else(|e| e.into_inner().0, |(c, _)| c);
            }
            let to_refill = std::mem::take(&mut chores.to_refill);
            let to_close = std::mem::take(&mut chores.to_close);
            drop(chores);
            for (target, kind) in to_refill {
                target.refill(kind);
            }
            drop(to_close);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn descriptors_handed_over_are_closed_soon() {
        let keeper = Housekeeper::default();
        let before = open_fds();
        for _ in 0..100 {
            keeper.close_later(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while open_fds() > before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(open_fds() <= before, "descriptors were left open");
    }
}
