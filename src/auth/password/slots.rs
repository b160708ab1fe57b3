//! Hashing slots with two waiting lines.
//!
//! At most `max_concurrent` hashes run at once. A caller that finds every slot taken waits in one
//! of two lines, each holding at most `max_queued` callers (beyond that: [`Busy`] at once):
//!
//! - [`Lane::Known`], for a sign-in from a known device of the very account it names. Such
//!   attempts are few (each device has its own failure budget, taken before the hash), and a
//!   freed slot goes to this line first, so a flood that keeps the other line full can neither
//!   turn the account's owner away with 503 nor make them wait behind it.
//! - [`Lane::Other`], for everything else, first come first served.
//!
//! A waiter that gives up (its request was dropped) leaves its line at once, and a slot handed
//! to a waiter that has gone in the meantime passes on to the next one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Which line a caller waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A sign-in from a known device of the account it names: served first.
    Known,
    /// Everything else.
    Other,
}

/// Every slot is taken and the caller's line is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Busy;

#[derive(Debug, Default)]
struct State {
    free: usize,
    next_ticket: u64,
    known: VecDeque<(u64, oneshot::Sender<Permit>)>,
    other: VecDeque<(u64, oneshot::Sender<Permit>)>,
}

impl State {
    fn line(&mut self, lane: Lane) -> &mut VecDeque<(u64, oneshot::Sender<Permit>)> {
        match lane {
            Lane::Known => &mut self.known,
            Lane::Other => &mut self.other,
        }
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // The state stays consistent at every unlock (no code that can panic runs under the lock),
    // so a poisoned lock is still usable.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The slots.
pub(super) struct Slots {
    shared: Shared,
    max_concurrent: usize,
    max_queued: usize,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("max_concurrent", &self.max_concurrent)
            .field("max_queued", &self.max_queued)
            .field("running", &self.running())
            .field("waiting", &self.waiting())
            .finish()
    }
}

/// One running hash's slot; dropping it hands the slot to the next waiter.
#[derive(Debug)]
pub(super) struct Permit {
    /// `None` once disarmed (a permit that never reached its waiter).
    shared: Option<Shared>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut state = lock(&shared);
        loop {
            let next = match state.known.pop_front() {
                Some(w) => Some(w),
                None => state.other.pop_front(),
            };
            let Some((_, waiter)) = next else {
                state.free += 1;
                return;
            };
            let handed = Permit {
                shared: Some(Arc::clone(&shared)),
            };
            match waiter.send(handed) {
                Ok(()) => return,
                // The waiter went away after all: disarm the permit it did not take (its drop
                // would lock again) and try the next one.
                Err(mut unclaimed) => unclaimed.shared = None,
            }
        }
    }
}

/// A place in a line; leaving it (dropped before a slot came) takes the caller out of the line.
struct Place<'a> {
    shared: &'a Shared,
    lane: Lane,
    ticket: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut state = lock(self.shared);
        let ticket = self.ticket;
        state.line(self.lane).retain(|(t, _)| *t != ticket);
    }
}

impl Slots {
    pub(super) fn new(max_concurrent: usize, max_queued: usize) -> Self {
        Self {
            shared: Arc::new(Mutex::new(State {
                free: max_concurrent,
                ..State::default()
            })),
            max_concurrent,
            max_queued,
        }
    }

    /// A free slot now, if there is one.
    #[cfg(test)]
    pub(super) fn try_acquire(&self) -> Option<Permit> {
        let mut state = lock(&self.shared);
        (state.free > 0).then(|| {
            state.free -= 1;
            Permit {
                shared: Some(Arc::clone(&self.shared)),
            }
        })
    }

    /// A slot: at once if one is free, after waiting in `lane` if that line has room, else
    /// [`Busy`].
    pub(super) async fn acquire(&self, lane: Lane) -> Result<Permit, Busy> {
        let (ticket, rx) = {
            let mut state = lock(&self.shared);
            if state.free > 0 {
                // A slot is only ever free while nobody waits (a freed slot goes to a waiter).
                state.free -= 1;
                return Ok(Permit {
                    shared: Some(Arc::clone(&self.shared)),
                });
            }
            if state.line(lane).len() >= self.max_queued {
                return Err(Busy);
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let (tx, rx) = oneshot::channel();
            state.line(lane).push_back((ticket, tx));
            (ticket, rx)
        };
        let place = Place {
            shared: &self.shared,
            lane,
            ticket,
        };
        let permit = rx.await;
        drop(place);
        // The sender is only dropped unsent by `Place` itself, which has not run yet.
        permit.map_err(|_| Busy)
    }

    /// Hashes running now.
    pub(super) fn running(&self) -> usize {
        self.max_concurrent.saturating_sub(lock(&self.shared).free)
    }

    /// Callers waiting now, in both lines.
    pub(super) fn waiting(&self) -> usize {
        let state = lock(&self.shared);
        state.known.len() + state.other.len()
    }
}

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// Spawns a waiter in `lane` that reports `id` once it holds a slot, then keeps the slot
    /// until told to let go.
    fn waiter(
        slots: &Arc<Slots>,
        lane: Lane,
        id: usize,
        order: &tokio::sync::mpsc::UnboundedSender<usize>,
    ) -> (tokio::task::JoinHandle<()>, oneshot::Sender<()>) {
        let (slots, order) = (Arc::clone(slots), order.clone());
        let (release, released) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let permit = slots.acquire(lane).await.unwrap();
            order.send(id).unwrap();
            let _ = released.await;
            drop(permit);
        });
        (task, release)
    }

    async fn wait_for_waiters(slots: &Slots, n: usize) {
        while slots.waiting() < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn known_devices_are_served_first_and_never_turned_away_by_the_other_line() {
        let slots = Arc::new(Slots::new(1, 2));
        let running = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut releases = Vec::new();
        for id in [1, 2] {
            releases.push(waiter(&slots, Lane::Other, id, &order_tx));
            wait_for_waiters(&slots, id).await;
        }
        // The other line is full: one more of it is turned away, a known device is not.
        assert_eq!(slots.acquire(Lane::Other).await.unwrap_err(), Busy);
        releases.push(waiter(&slots, Lane::Known, 3, &order_tx));
        wait_for_waiters(&slots, 3).await;
        assert_eq!(slots.running(), 1);

        drop(running);
        assert_eq!(order.recv().await, Some(3), "the known device goes first");
        let Ok([w1, w2, w3]) = <[_; 3]>::try_from(releases) else {
            panic!("three waiters")
        };
        // Then the other line, first come first served.
        for ((task, release), next) in [(w3, Some(1)), (w1, Some(2)), (w2, None)] {
            let _ = release.send(());
            task.await.unwrap();
            if let Some(n) = next {
                assert_eq!(order.recv().await, Some(n));
            }
        }
        assert_eq!((slots.running(), slots.waiting()), (0, 0));
        assert!(slots.try_acquire().is_some());
    }

    #[tokio::test]
    async fn each_line_is_bounded() {
        let slots = Arc::new(Slots::new(1, 1));
        let _running = slots.try_acquire().unwrap();
        let (order_tx, _order) = tokio::sync::mpsc::unbounded_channel();
        let _known = waiter(&slots, Lane::Known, 1, &order_tx);
        wait_for_waiters(&slots, 1).await;
        assert_eq!(slots.acquire(Lane::Known).await.unwrap_err(), Busy);
        let _other = waiter(&slots, Lane::Other, 2, &order_tx);
        wait_for_waiters(&slots, 2).await;
        assert_eq!(slots.acquire(Lane::Other).await.unwrap_err(), Busy);
    }

    #[tokio::test]
    async fn a_slot_handed_to_a_waiter_that_left_goes_to_the_next() {
        let slots = Arc::new(Slots::new(1, 4));
        let running = slots.try_acquire().unwrap();
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let (gone, _) = waiter(&slots, Lane::Known, 1, &order_tx);
        wait_for_waiters(&slots, 1).await;
        let (_task, _release) = waiter(&slots, Lane::Other, 2, &order_tx);
        wait_for_waiters(&slots, 2).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(slots.waiting(), 1, "a waiter that gave up leaves its line");
        drop(running);
        assert_eq!(order.recv().await, Some(2));
        assert_eq!(slots.running(), 1);
    }
}
