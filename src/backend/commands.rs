//! The queue through which every thread hands io_uring requests to the loop thread, the only
//! thread that touches the ring (so the kernel may run it as a single issuer).
//!
//! Requests reach the kernel in the order they were pushed; while no loop runs they wait for
//! the next run. A removal `forget`s the queued requests of its registration: once it
//! returns, the fd may be closed and its number reused, so no request naming the fd may be
//! submitted after that. Requests the loop has taken already but not yet submitted are out
//! of reach: a removal from another thread then waits, with the ticket `taken_unsubmitted`
//! gives, until `settled(ticket)`, which the loop reports with `mark_submitted` right after
//! its next `io_uring_enter` (it is inside its wait then, not in a handler, and the caller
//! wakes it; the loop does not sleep while a caller waits), so that wait is short. Only
//! when the kernel refused a submission (short of memory, or of room for completions) can it
//! last a few loop turns, handler calls included.

use crate::token::Token;
use io_uring::squeue;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One queued request, with the registration it is about (a cancel names the request it
/// ends, not itself, in its user data) and its place in the order of pushes.
pub(crate) struct Command {
    pub(crate) token: Token,
    pub(crate) entry: squeue::Entry,
    sequence: u64,
}

#[derive(Default)]
struct Queue {
    commands: Vec<Command>,
    /// How many requests were ever pushed: the ticket of the last one.
    pushed: u64,
    /// The ticket of the last request the loop has taken.
    taken: u64,
    /// Registrations forgotten since the last `take`: requests of theirs that the loop took
    /// and puts back must be dropped then.
    forgotten: Vec<Token>,
}

#[derive(Default)]
pub(crate) struct CommandQueue {
    queue: Mutex<Queue>,
    /// Every request up to this ticket is in the kernel.
    submitted: AtomicU64,
    /// The highest ticket a caller waits for.
    awaited: AtomicU64,
    /// Whether a loop runs the ring (between `start_run` and `close_run` of the backend).
    live: AtomicBool,
}

impl CommandQueue {
    /// Queues `entry`, about registration `token`, behind every earlier one; returns its
    /// ticket.
    pub(crate) fn push(&self, token: Token, entry: squeue::Entry) -> u64 {
        let mut queue = self.queue.lock();
        queue.pushed += 1;
        let sequence = queue.pushed;
        queue.commands.push(Command {
            token,
            entry,
            sequence,
        });
        sequence
    }

    /// Drops the queued requests about `token`; returns whether one of them was picked by
    /// `is_write` (a write that will now never complete).
    pub(crate) fn forget(&self, token: Token, is_write: impl Fn(&squeue::Entry) -> bool) -> bool {
        let mut queue = self.queue.lock();
        queue.forgotten.push(token);
        let mut forgot_write = false;
        queue.commands.retain(|command| {
            let keep = command.token != token;
            forgot_write |= !keep && is_write(&command.entry);
            keep
        });
        forgot_write
    }

    /// The ticket to wait for (see `settled`) when requests taken by the loop may not be in
    /// the kernel yet; 0 (settled at once) when not.
    pub(crate) fn taken_unsubmitted(&self) -> u64 {
        let taken = self.queue.lock().taken;
        if self.live.load(Ordering::SeqCst) && taken > self.submitted.load(Ordering::SeqCst) {
            taken
        } else {
            0
        }
    }

    /// Whether a loop runs the ring.
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// Moves every queued request to `into` (empty on entry), in order; returns the ticket
    /// they go up to.
    pub(crate) fn take(&self, into: &mut Vec<Command>) -> u64 {
        let mut queue = self.queue.lock();
        std::mem::swap(&mut queue.commands, into);
        queue.taken = queue.pushed;
        queue.forgotten.clear();
        queue.pushed
    }

    /// Puts back, ahead of anything pushed since, the requests of a `take` that did not fit
    /// in the kernel's queue (but those of registrations forgotten meanwhile); returns the
    /// ticket that the requests before them went up to.
    pub(crate) fn put_back(&self, rest: &mut Vec<Command>) -> u64 {
        let Some(first) = rest.first().map(|command| command.sequence) else {
            return self.submitted.load(Ordering::SeqCst);
        };
        let mut queue = self.queue.lock();
        // A write dropped here keeps its batch in the registry's retired list until the
        // proactor goes: a removal racing with a full submission queue, which is rare.
        let forgotten = std::mem::take(&mut queue.forgotten);
        rest.retain(|command| !forgotten.contains(&command.token));
        queue.forgotten = forgotten;
        rest.append(&mut queue.commands);
        std::mem::swap(&mut queue.commands, rest);
        first.saturating_sub(1)
    }

    /// Whether requests wait to be taken.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.lock().commands.is_empty()
    }

    /// Notes that every request up to `ticket` is in the kernel. Returns whether a caller
    /// waits for a ticket that was not settled before (it is woken by the loop).
    pub(crate) fn mark_submitted(&self, ticket: u64) -> bool {
        let before = self.submitted.swap(ticket, Ordering::SeqCst);
        self.awaited.load(Ordering::SeqCst) > before.min(ticket)
    }

    /// Whether every request up to `ticket` is in the kernel (or no loop runs, so that none
    /// of them will reach a kernel that still holds older ones). Records that the caller
    /// waits for it, so that the loop wakes it once it is.
    pub(crate) fn settled(&self, ticket: u64) -> bool {
        self.awaited.fetch_max(ticket, Ordering::SeqCst);
        !self.live.load(Ordering::SeqCst) || self.submitted.load(Ordering::SeqCst) >= ticket
    }

    /// Whether a caller waits for requests that are not in the kernel yet: the loop must not
    /// sleep before it has submitted them.
    pub(crate) fn someone_waits(&self) -> bool {
        self.awaited.load(Ordering::SeqCst) > self.submitted.load(Ordering::SeqCst)
    }

    /// Marks the loop as running the ring (`true`) or gone (`false`).
    pub(crate) fn set_live(&self, live: bool) {
        let queue = self.queue.lock();
        if live {
            // Nothing taken by an earlier run is on its way to the kernel any more: it was
            // submitted, or put back (and is in the queue), or went with that run's ring.
            self.submitted.fetch_max(queue.taken, Ordering::SeqCst);
        }
        self.live.store(live, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;

    fn nop(user_data: u64) -> squeue::Entry {
        opcode::Nop::new().build().user_data(user_data)
    }

    fn token(raw: u64) -> Token {
        Token::from_u64(raw)
    }

    #[test]
    fn requests_come_out_in_push_order_with_their_tickets() {
        let queue = CommandQueue::default();
        assert_eq!(queue.push(token(1), nop(10)), 1);
        assert_eq!(queue.push(token(2), nop(20)), 2);
        let mut taken = Vec::new();
        assert_eq!(queue.take(&mut taken), 2);
        let data: Vec<u64> = taken.iter().map(|c| c.entry.get_user_data()).collect();
        assert_eq!(data, [10, 20]);
        assert!(queue.is_empty());
    }

    #[test]
    fn requests_put_back_go_first_and_settle_only_what_went_before_them() {
        let queue = CommandQueue::default();
        for raw in 1..=3 {
            queue.push(token(raw), nop(raw));
        }
        let mut taken = Vec::new();
        queue.take(&mut taken);
        let mut rest = taken.split_off(1);
        queue.push(token(4), nop(4));
        assert_eq!(queue.put_back(&mut rest), 1);
        let mut again = Vec::new();
        assert_eq!(queue.take(&mut again), 4);
        let data: Vec<u64> = again.iter().map(|c| c.entry.get_user_data()).collect();
        assert_eq!(data, [2, 3, 4]);
    }

    #[test]
    fn a_waiting_caller_is_settled_by_the_submission_of_its_ticket_or_by_the_loop_ending() {
        let queue = CommandQueue::default();
        queue.set_live(true);
        let ticket = queue.push(token(1), nop(1));
        assert!(!queue.settled(ticket));
        assert!(queue.mark_submitted(ticket), "the waiter must be woken");
        assert!(queue.settled(ticket));
        assert!(!queue.mark_submitted(ticket), "nobody waits for more");
        let next = queue.push(token(1), nop(2));
        assert!(!queue.settled(next));
        queue.set_live(false);
        assert!(queue.settled(next));
    }

    #[test]
    fn forgetting_drops_every_request_of_one_registration_and_says_if_a_write_was_one() {
        let queue = CommandQueue::default();
        queue.push(token(1), nop(1));
        queue.push(token(2), nop(2));
        queue.push(token(1), nop(3));
        assert!(!queue.forget(token(1), |entry| entry.get_user_data() == 9));
        let mut taken = Vec::new();
        queue.take(&mut taken);
        let data: Vec<u64> = taken.iter().map(|c| c.entry.get_user_data()).collect();
        assert_eq!(data, [2]);
        queue.push(token(1), nop(9));
        assert!(queue.forget(token(1), |entry| entry.get_user_data() == 9));
        assert!(queue.is_empty());
    }

    #[test]
    fn requests_of_a_registration_forgotten_while_taken_are_not_put_back() {
        let queue = CommandQueue::default();
        queue.push(token(1), nop(1));
        queue.push(token(2), nop(2));
        let mut taken = Vec::new();
        queue.take(&mut taken);
        assert!(!queue.forget(token(1), |_| true)); // not in the queue: taken
        assert_eq!(queue.put_back(&mut taken), 0);
        let mut again = Vec::new();
        queue.take(&mut again);
        let data: Vec<u64> = again.iter().map(|c| c.entry.get_user_data()).collect();
        assert_eq!(data, [2]);
    }

    #[test]
    fn a_removal_waits_only_for_requests_taken_and_not_yet_submitted() {
        let queue = CommandQueue::default();
        queue.set_live(true);
        queue.push(token(1), nop(1));
        assert_eq!(
            queue.taken_unsubmitted(),
            0,
            "queued requests are forgotten instead"
        );
        let mut taken = Vec::new();
        let through = queue.take(&mut taken);
        assert_eq!(queue.taken_unsubmitted(), through);
        queue.mark_submitted(through);
        assert_eq!(queue.taken_unsubmitted(), 0);
        queue.push(token(1), nop(2));
        taken.clear();
        queue.take(&mut taken);
        queue.set_live(false);
        assert_eq!(
            queue.taken_unsubmitted(),
            0,
            "no loop: nothing will be submitted"
        );
    }
}
