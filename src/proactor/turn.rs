//! The loop turn: the loop thread's body, the backend's events, the read watches, and the
//! flush of queued output (the writes the loop makes itself on epoll, the requests io_uring
//! performs).

use super::*;
use crate::backend::Event;
use crate::output::FinishedWrite;
use crate::registry::{Registry, WatchChange, WriteInterest};
use crate::sendq::SendQueue;
use crate::token::Token;
use parking_lot::MutexGuard;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Shared {
    /// The loop thread's body: flush queued output, deliver flow events, wait, call the
    /// handlers of ready fds.
    pub(super) fn run_loop(&self, report: std::sync::mpsc::SyncSender<io::Result<()>>) {
        if let Err(err) = self.backend.start_run() {
            let _ = report.send(Err(err));
            return;
        }
        let _ = report.send(Ok(()));
        CURRENT_LOOP.with(|current| current.set(self.id));
        let mut events = Vec::with_capacity(256);
        let mut pending = Vec::new();
        loop {
            if !self.stopping() {
                self.deliver_held();
            }
            let (next_deadline, flow_news) = self.flush_output(&mut pending, self.stopping());
            if flow_news {
                self.deliver_flow_events();
                // The flow handler may have queued output: flush it before sleeping.
                if !self.stopping() {
                    continue;
                }
            }
            if self.stopping() {
                // What a flush delay held back goes out with the stop: as many writes as it
                // takes, while the sockets take them.
                for _ in 0..1024 {
                    self.flush_output(&mut pending, true);
                    if !self.registry.lock().has_pending_output() {
                        break;
                    }
                }
                if self.backend.sends() {
                    // Writes the kernel performs reach it now: those with room complete at
                    // once; one still waiting for room is cancelled when this thread ends,
                    // and its bytes stay queued for the next run.
                    events.clear();
                    let _ = self.backend.wait(&mut events, Some(Duration::ZERO));
                    self.handle_events(&events);
                }
                break;
            }
            events.clear();
            let timeout =
                next_deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
            if self.backend.wait(&mut events, timeout).is_err() {
                // The backend's own fd is broken (closed or replaced under the library): the
                // run cannot go on, and `wait`, `cancel` and `run` report it.
                self.loop_failed.store(true, Ordering::SeqCst);
                self.stop_requested.store(true, Ordering::SeqCst);
                break;
            }
            self.handle_events(&events);
        }
        // What completed while the run's requests were cancelled is held for the next run.
        events.clear();
        self.backend.end_run(&mut events);
        self.handle_events(&events);
        self.backend.close_run();
        self.wake_waiting_removals();
        CURRENT_LOOP.with(|current| current.set(0));
    }

    /// Wakes the removals from other threads that wait, so that they check again.
    pub(super) fn wake_waiting_removals(&self) {
        if self.registry.lock().has_waiting_removals() {
            self.handler_returned.notify_all();
        }
    }

    pub(super) fn handle_events(&self, events: &[Event]) {
        let one_shot = self.backend.writable_is_one_shot();
        for event in events {
            match *event {
                Event::Ready {
                    token,
                    readable,
                    writable,
                } => {
                    if writable {
                        self.registry.lock().output_writable(token, one_shot);
                    }
                    if readable {
                        if self.stopping() {
                            // Not dispatched now: keep the fd watched for the next run.
                            self.restore_read_watch(token);
                        } else {
                            self.dispatch(token);
                        }
                    }
                }
                Event::Lost { token } => {
                    let mut registry = self.registry.lock();
                    registry.request_ended(token);
                    self.update_read_watch(&mut registry, token);
                }
                Event::Received {
                    token,
                    result,
                    buffer,
                    more,
                } => self.complete_receive(token, result, buffer, more),
                Event::Accepted {
                    token,
                    result,
                    more,
                } => self.complete_accept(token, result, more),
                Event::Sent { token, result } => {
                    let mut registry = self.registry.lock();
                    let change = registry.finish_write(token, result as isize, None, true);
                    self.apply_write_interest(&registry, token, change);
                }
                Event::Submitted => self.wake_waiting_removals(),
            }
        }
    }

    /// After a report of `token` that was not dispatched (or whose watch was lost): re-arms
    /// a one-shot backend's read watch, or stops watching the input of a paused fd.
    pub(super) fn restore_read_watch(&self, token: Token) {
        let mut registry = self.registry.lock();
        self.update_read_watch(&mut registry, token);
    }

    /// See `restore_read_watch`; the caller holds the registry lock, so that a concurrent
    /// removal cannot slip between the check and the backend call.
    pub(super) fn update_read_watch(&self, registry: &mut Registry, token: Token) {
        match registry.read_watch_after_report(token) {
            WatchChange::Rearm(operation) => self.backend.rearm(token.fd(), token, operation),
            // A failure means the fd was closed under us; its removal ends the watch anyway.
            WatchChange::Quiet { operation, writing } => {
                let _ = self
                    .backend
                    .quiet_reading(token.fd(), token, operation, writing);
            }
            WatchChange::Keep => {}
        }
    }

    /// Writes the output queued since the last flush: one `sendmsg` per fd carrying
    /// everything queued for it, unless a flush delay holds it back (not when `now`); then
    /// looks for stalled output. `pending` is a reusable buffer, empty on entry and exit.
    /// Returns the next deadline to wake up for (a stall, or held-back output), and whether
    /// flow events wait to be delivered.
    pub(super) fn flush_output(
        &self,
        pending: &mut Vec<Token>,
        now: bool,
    ) -> (Option<Instant>, bool) {
        let mut registry = self.registry.lock();
        let held_until = if now {
            None
        } else {
            registry.flush_deferred_until()
        };
        if held_until.is_none() {
            registry.take_pending_output(pending);
        }
        if self.backend.sends() {
            for &token in pending.iter() {
                if let Some(header) = registry.start_send(token) {
                    // SAFETY: the registry keeps the batch behind `header` alive until its
                    // completion (also when the registration is removed meanwhile).
                    unsafe { self.backend.send(token.fd(), token, header) };
                }
            }
        } else {
            registry = self.write_pending(registry, pending);
        }
        let next_timer = registry.collect_flow_timers();
        let flow_news = registry.has_flow_notes();
        // Writes that need more than one `sendmsg`: the loop must not sleep before them.
        let more_now = registry.has_pending_output() && held_until.is_none();
        drop(registry);
        pending.clear();
        let next_deadline = match (next_timer, held_until) {
            (Some(timer), Some(flush)) => Some(timer.min(flush)),
            (timer, flush) => timer.or(flush),
        };
        let next_deadline = if more_now {
            Some(Instant::now())
        } else {
            next_deadline
        };
        (next_deadline, flow_news)
    }

    /// The loop's own writes (epoll): one `sendmsg` per fd of `pending`, carrying what is
    /// queued for it, made without the registry lock, so that a send from another thread
    /// never waits behind them. The batches stay in the registry meanwhile, and a removal of
    /// one of these fds waits until its write is finished. Returns the lock, held again.
    pub(super) fn write_pending<'a>(
        &'a self,
        mut registry: MutexGuard<'a, Registry>,
        pending: &[Token],
    ) -> MutexGuard<'a, Registry> {
        let writes: Vec<(Token, (*const libc::msghdr, usize))> = pending
            .iter()
            .filter_map(|&token| Some((token, registry.start_loop_write(token)?)))
            .collect();
        if writes.is_empty() {
            return registry;
        }
        let sample_full_sockets = registry.policy.stall_timeout.is_some();
        drop(registry);
        let results: Vec<(isize, Option<usize>)> = writes
            .iter()
            .map(|&(token, (header, offered))| {
                // SAFETY: the batch behind `header` stays in the registry (or its retired
                // list) until `finish_write` below, which needs the lock this thread holds
                // next; removals wait for it.
                let result = unsafe { SendQueue::write_now(token.fd(), header) };
                let sample = (sample_full_sockets && FinishedWrite::found_full(result, offered))
                    .then(|| crate::sys::kernel_queued(token.fd()))
                    .flatten();
                (result, sample)
            })
            .collect();
        let mut registry = self.registry.lock();
        for (&(token, _), &(result, sample)) in writes.iter().zip(&results) {
            let change = registry.finish_write(token, result, sample, false);
            self.apply_write_interest(&registry, token, change);
        }
        registry.end_loop_writes();
        if registry.has_waiting_removals() {
            self.handler_returned.notify_all();
        }
        registry
    }

    /// Starts or stops the backend's writable watch of `token` as a finished write asks.
    /// Under the registry lock, like every change of the backend's watches (a concurrent
    /// removal must not be undone). A failure means the fd was closed under us; its removal
    /// ends the watch anyway.
    pub(super) fn apply_write_interest(
        &self,
        registry: &Registry,
        token: Token,
        change: WriteInterest,
    ) {
        let on = match change {
            WriteInterest::Start => true,
            WriteInterest::Stop => false,
            WriteInterest::Keep => return,
        };
        let reading = registry.reading_watched(token);
        let _ = self.backend.watch_writable(token.fd(), token, on, reading);
    }
}
