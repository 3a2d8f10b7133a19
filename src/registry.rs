//! The registry: which handler belongs to which fd, and which handler is running right now.
//!
//! It is plain data behind the proactor's mutex; it never blocks and never calls user code.
//! A handler is moved out of its slot while it runs and moved back afterwards, so the loop
//! can call it without holding the lock, and a removal that happens meanwhile is seen when
//! the handler comes back (it is then dropped instead of being put back).

use crate::flow::{FlowCheck, FlowEventKind, FlowNote, FlowTimers};
use crate::output::{AfterWrite, FinishedWrite, Output, OutputPolicy, OutputState};
use crate::sendq::SendBatch;
use crate::sys::kernel_queued as kernel_queued_of;
use crate::sys::{check_is_stream_socket, kernel_queued};
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use crate::operations::Handler;
use crate::operations::HeldInput;
use crate::token::{Operation, Token};

struct Slot {
    token: Token,
    /// `None` while the handler is running on the loop thread.
    handler: Option<Handler>,
    reading: Reading,
    output: Output,
    /// What the backend watches or performs for this registration: `Ready`, or the
    /// operation of a receive or accept that the backend performs itself.
    operation: Operation,
    /// For an operation the backend performs: whether its request is in the kernel.
    armed: bool,
    /// What an operation's completions brought while they could not be delivered (paused,
    /// or the loop stopping), in order; delivered first when they can be.
    held: Option<Box<HeldInput>>,
}

/// Whether a registration's input is dispatched, and whether the backend still reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reading {
    /// Input is reported and the handler called.
    Active,
    /// Input is not dispatched. `watched`: the backend may still report input (pausing costs
    /// no system call; the first report while paused is when the backend stops watching).
    Paused { watched: bool },
}

/// What the backend must change for an fd after a flush.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteInterest {
    Start,
    Stop,
    Keep,
}

/// What the backend must do for a registration's input after a report.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WatchChange {
    /// Nothing (it watches already, or the registration is gone or quiet).
    Keep,
    /// Watch again, or re-arm the operation's request.
    Rearm(Operation),
    /// Stop reporting input: the registration is paused.
    Quiet { operation: Operation, writing: bool },
}

/// What a resume must be followed by.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resumed {
    /// Nothing: the backend still watches (or it was not paused).
    Nothing,
    /// The backend must watch the fd's readiness again.
    Rewatch { token: Token, writing: bool },
    /// The loop must deliver held input or re-arm the request: wake it.
    LoopDue,
}

/// What a completion of an operation should lead to.
pub(crate) enum Completion {
    /// Call this handler (taken out of its slot; give it back with `end_call`).
    Run(Handler),
    /// Hold the completion's result (`held_input`); with `quiet`, cancel the request of that
    /// operation too (the registration is paused).
    Hold { quiet: Option<Operation> },
    /// The registration is gone.
    Nothing,
}

/// What a readiness report of a registration should lead to.
pub(crate) enum Call {
    /// Call this handler (taken out of its slot; give it back with `end_call`).
    Run(Handler),
    /// The registration is paused: the backend should stop reporting its input.
    Quiet { writing: bool },
    /// Paused and quiet already, yet reported: an error or hang-up the write watch shows.
    /// Its output is flushed this turn, which finds the error and ends the write watch.
    Broken,
    /// The registration is gone, or its handler is running.
    Nothing,
}

/// fd -> registration, indexed by fd number (fds are small dense integers). Slots are boxed
/// so that the table costs 8 bytes per fd number below the highest registered one.
#[derive(Default)]
pub(crate) struct Registry {
    slots: Vec<Option<Box<Slot>>>,
    len: usize,
    next_generation: u32,
    running: Option<Token>,
    removals_waiting: usize,
    /// Registrations with output to flush at the end of the loop's current turn.
    pending_output: Vec<Token>,
    /// When `pending_output` last became non-empty (kept only with a flush delay).
    pending_since: Option<Instant>,
    pub(crate) policy: OutputPolicy,
    /// Registrations whose held input the loop should deliver now (resumed, or held while
    /// the loop was stopping).
    held_due: Vec<Token>,
    /// Flow events noted and not yet delivered by the loop.
    flow_notes: Vec<FlowNote>,
    flow_timers: FlowTimers,
    /// Writes still in the kernel's hands whose registration was removed: kept until their
    /// completion, because the kernel reads their buffers until then.
    retired_sends: Vec<(Token, Box<SendBatch>)>,
    /// Finished batches kept for the next writes (at most `SPARE_BATCHES`): a busy loop
    /// writes to the same fds turn after turn, and need not allocate for each write. Boxed,
    /// as batches always are: what is reused is the allocation the kernel was given.
    #[allow(clippy::vec_box)]
    spare_batches: Vec<Box<SendBatch>>,
    /// Registrations the loop is writing to without the lock (epoll): a removal waits.
    writing: Vec<Token>,
}

impl Registry {
    /// Number of registered fds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn slot(&self, fd: RawFd) -> Option<&Slot> {
        self.slots.get(usize::try_from(fd).ok()?)?.as_deref()
    }

    /// Registers `handler` for `fd` and returns the new registration's token.
    /// Fails with EEXIST when `fd` is registered already, EINVAL when `fd` is negative.
    pub(crate) fn insert(
        &mut self,
        fd: RawFd,
        handler: Handler,
        operation: Operation,
    ) -> io::Result<Token> {
        self.check_insert(fd)?;
        let index = fd as usize;
        if index >= self.slots.len() {
            self.slots.resize_with(index + 1, || None);
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let token = Token::new(fd, self.next_generation);
        // A receive was checked to be on a stream socket: its first send needs no check
        // (a system call) under the lock.
        let is_socket = matches!(handler, Handler::Receive(_));
        self.slots[index] = Some(Box::new(Slot {
            token,
            handler: Some(handler),
            reading: Reading::Active,
            output: Output {
                is_socket,
                ..Output::default()
            },
            operation,
            armed: operation != Operation::Ready,
            held: None,
        }));
        self.len += 1;
        Ok(token)
    }

    /// Whether `fd` could be inserted: EINVAL when negative, EEXIST when registered. Callers
    /// check first so that a refused handler is not dropped under their lock.
    pub(crate) fn check_insert(&self, fd: RawFd) -> io::Result<()> {
        if fd < 0 {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        } else if self.slot(fd).is_some() {
            Err(io::Error::from_raw_os_error(libc::EEXIST))
        } else {
            Ok(())
        }
    }

    /// Forgets the registration of `fd`. Returns its token, its operation, and its handler
    /// (`None` when the handler is running right now: the loop drops it when the call
    /// returns).
    pub(crate) fn remove(&mut self, fd: RawFd) -> Option<(Token, Operation, Option<Handler>)> {
        let mut slot = self.slots.get_mut(usize::try_from(fd).ok()?)?.take()?;
        self.len -= 1;
        if let Some(batch) = slot.output.in_flight.take() {
            self.retired_sends.push((slot.token, batch));
        }
        Some((slot.token, slot.operation, slot.handler))
    }

    /// Forgets every registration; returns their tokens and handlers (to drop outside the
    /// lock).
    pub(crate) fn remove_all(&mut self) -> Vec<(Token, Operation, Option<Handler>)> {
        self.len = 0;
        let retired = &mut self.retired_sends;
        self.slots
            .drain(..)
            .flatten()
            .map(|mut slot| {
                if let Some(batch) = slot.output.in_flight.take() {
                    retired.push((slot.token, batch));
                }
                (slot.token, slot.operation, slot.handler)
            })
            .collect()
    }

    /// The write of removed registration `token` finished (or will never start): its batch
    /// is not needed any more.
    pub(crate) fn release_retired(&mut self, token: Token) {
        if let Some(index) = self
            .retired_sends
            .iter()
            .position(|(retired, _)| *retired == token)
        {
            let (_, batch) = self.retired_sends.swap_remove(index);
            let mut in_flight = Some(batch);
            finish_batch(&mut in_flight, &mut self.spare_batches);
        }
    }

    /// Whether registration `token` still exists.
    pub(crate) fn is_registered(&self, token: Token) -> bool {
        self.slot(token.fd())
            .is_some_and(|slot| slot.token == token)
    }

    /// Decides what a readiness report of registration `token` leads to. For `Run`, the
    /// handler is taken out of its slot and the registration marked running; for `Quiet`,
    /// the registration is marked as no longer watched for input.
    pub(crate) fn begin_call(&mut self, token: Token) -> Call {
        let Some(slot) = slot_of(&mut self.slots, token) else {
            return Call::Nothing;
        };
        match slot.reading {
            Reading::Active => {}
            Reading::Paused { watched: true } => {
                slot.reading = Reading::Paused { watched: false };
                return Call::Quiet {
                    writing: slot.output.watching_writable,
                };
            }
            Reading::Paused { watched: false } => {
                if !slot.output.watching_writable {
                    return Call::Quiet { writing: false };
                }
                self.output_writable(token, false);
                return Call::Broken;
            }
        }
        let Some(handler) = slot.handler.take() else {
            return Call::Nothing;
        };
        self.running = Some(token);
        Call::Run(handler)
    }

    /// After a handler call, or a report the loop did not dispatch: what the backend must
    /// do for the input of registration `token` (nothing when it is gone).
    pub(crate) fn read_watch_after_report(&mut self, token: Token) -> WatchChange {
        let Some(slot) = self.slot_of_token(token) else {
            return WatchChange::Keep;
        };
        let operation = slot.operation;
        if operation != Operation::Ready {
            // A multishot request goes on by itself while armed; one that ended is re-armed
            // only while reading is active (resume re-arms the others).
            if slot.armed {
                return WatchChange::Keep;
            }
            return match slot.reading {
                Reading::Active => {
                    slot.armed = true;
                    WatchChange::Rearm(operation)
                }
                Reading::Paused { .. } => {
                    slot.reading = Reading::Paused { watched: false };
                    WatchChange::Keep
                }
            };
        }
        match slot.reading {
            Reading::Active => WatchChange::Rearm(operation),
            Reading::Paused { watched: true } => {
                slot.reading = Reading::Paused { watched: false };
                WatchChange::Quiet {
                    operation,
                    writing: slot.output.watching_writable,
                }
            }
            Reading::Paused { watched: false } => WatchChange::Keep,
        }
    }

    /// The backend's request for registration `token` ended (a completion without "more",
    /// or a lost request): it must be re-armed to go on.
    pub(crate) fn request_ended(&mut self, token: Token) {
        if let Some(slot) = self.slot_of_token(token) {
            slot.armed = false;
        }
    }

    /// Decides what a completion of registration `token`'s operation leads to: the handler
    /// runs (`Run`), or the completion is held (`Hold`: paused, stopping, or earlier input
    /// waits to be delivered), or it is for a registration that is gone.
    pub(crate) fn begin_completion(&mut self, token: Token, stopping: bool) -> Completion {
        let Some(slot) = slot_of(&mut self.slots, token) else {
            return Completion::Nothing;
        };
        let dispatchable = slot.reading == Reading::Active && !stopping && slot.held.is_none();
        if !dispatchable || slot.handler.is_none() {
            // A request that goes on while paused is cancelled at its first completion.
            let quiet = slot.reading == Reading::Paused { watched: true } && slot.armed;
            if let Reading::Paused { .. } = slot.reading {
                slot.reading = Reading::Paused { watched: false };
            }
            if slot.held.is_none() {
                slot.held = Some(Box::default());
                if slot.reading == Reading::Active {
                    self.held_due.push(token); // stopping: delivered when the loop runs
                }
            }
            return Completion::Hold {
                quiet: quiet.then_some(slot.operation),
            };
        }
        let handler = slot.handler.take().expect("checked above");
        self.running = Some(token);
        Completion::Run(handler)
    }

    /// The held input of registration `token`, to add a completion's result to (it exists
    /// after `begin_completion` said `Hold`).
    pub(crate) fn held_input(&mut self, token: Token) -> Option<&mut HeldInput> {
        self.slot_of_token(token)?.held.as_deref_mut()
    }

    /// Takes the list of registrations whose held input is due.
    pub(crate) fn take_held_due(&mut self) -> Vec<Token> {
        std::mem::take(&mut self.held_due)
    }

    /// For delivering held input: when registration `token` is active and not running,
    /// takes its handler (marking it running) and its held input.
    pub(crate) fn begin_held_delivery(&mut self, token: Token) -> Option<(Handler, HeldInput)> {
        let slot = slot_of(&mut self.slots, token)?;
        if slot.reading != Reading::Active {
            return None;
        }
        let held = slot.held.take()?;
        let Some(handler) = slot.handler.take() else {
            slot.held = Some(held);
            return None;
        };
        self.running = Some(token);
        Some((handler, *held))
    }

    /// Gives back the part of the held input of `token` that was not delivered (the handler
    /// paused its reading meanwhile); it goes before anything held since.
    pub(crate) fn put_back_held(&mut self, token: Token, mut rest: HeldInput) {
        if let Some(slot) = self.slot_of_token(token) {
            if let Some(newer) = slot.held.take() {
                rest.append(*newer);
            }
            if !rest.is_empty() {
                slot.held = Some(Box::new(rest));
            }
        }
    }

    /// Whether registration `token` exists and its reading is active.
    pub(crate) fn is_reading(&self, token: Token) -> bool {
        self.slot(token.fd())
            .is_some_and(|slot| slot.token == token && slot.reading == Reading::Active)
    }

    /// Pauses the reading of `fd`. Fails with ENOENT when it is not registered.
    ///
    /// Returns the token and operation of a multishot request the backend performs, which
    /// must be cancelled now: it would otherwise go on receiving (or accepting) until its
    /// next completion, and all that it brought meanwhile would be held, not left in the
    /// socket where TCP slows the peer down.
    pub(crate) fn pause(&mut self, fd: RawFd) -> io::Result<Option<(Token, Operation)>> {
        let slot = self.slot_mut(fd).ok_or_else(not_registered)?;
        if slot.reading != Reading::Active {
            return Ok(None);
        }
        if slot.operation != Operation::Ready && slot.armed {
            slot.reading = Reading::Paused { watched: false };
            return Ok(Some((slot.token, slot.operation)));
        }
        slot.reading = Reading::Paused { watched: true };
        Ok(None)
    }

    /// Resumes the reading of `fd` and says what must follow. Fails with ENOENT when `fd`
    /// is not registered.
    pub(crate) fn resume(&mut self, fd: RawFd) -> io::Result<Resumed> {
        let index = usize::try_from(fd).map_err(|_| not_registered())?;
        let slot = self
            .slots
            .get_mut(index)
            .and_then(|slot| slot.as_deref_mut())
            .ok_or_else(not_registered)?;
        let was = slot.reading;
        slot.reading = Reading::Active;
        if was == Reading::Active {
            return Ok(Resumed::Nothing);
        }
        if slot.operation != Operation::Ready {
            // The loop delivers what was held, then re-arms the request if it ended.
            if slot.held.is_some() || !slot.armed {
                self.held_due.push(slot.token);
                return Ok(Resumed::LoopDue);
            }
            return Ok(Resumed::Nothing);
        }
        if was == (Reading::Paused { watched: false }) {
            return Ok(Resumed::Rewatch {
                token: slot.token,
                writing: slot.output.watching_writable,
            });
        }
        Ok(Resumed::Nothing)
    }

    /// Whether the reading of `fd` is paused, or `None` when it is not registered.
    pub(crate) fn is_paused(&self, fd: RawFd) -> Option<bool> {
        Some(self.slot(fd)?.reading != Reading::Active)
    }

    /// Whether the backend watches the input of registration `token` (for the epoll
    /// backend, which keeps one interest set for input and output).
    pub(crate) fn reading_watched(&self, token: Token) -> bool {
        self.slot(token.fd()).is_some_and(|slot| {
            slot.token == token && slot.reading != Reading::Paused { watched: false }
        })
    }

    /// Ends the call begun by `begin_call`: puts the handler back if its registration still
    /// exists, else hands it back to the caller to drop (outside the lock).
    pub(crate) fn end_call(&mut self, token: Token, handler: Handler) -> Option<Handler> {
        self.running = None;
        match self.slots.get_mut(token.fd() as usize) {
            Some(Some(slot)) if slot.token == token => {
                slot.handler = Some(handler);
                None
            }
            _ => Some(handler),
        }
    }

    fn slot_mut(&mut self, fd: RawFd) -> Option<&mut Slot> {
        self.slots
            .get_mut(usize::try_from(fd).ok()?)?
            .as_deref_mut()
    }

    fn slot_of_token(&mut self, token: Token) -> Option<&mut Slot> {
        slot_of(&mut self.slots, token)
    }

    /// Queues `message` for `fd`, noting a `High` flow event when the queue rises above the
    /// high watermark. Returns whether the loop has news it had not (output to flush, or a
    /// flow event), i.e. whether a loop that sleeps must be woken.
    ///
    /// Errors: `ENOENT` when `fd` is not registered, `ENOTSOCK` when it is not a socket,
    /// `EPROTOTYPE` when it is not a stream socket,
    /// `ENOBUFS` past the send limit, and the errno of an earlier failed write (`EPIPE`…).
    pub(crate) fn queue_output(&mut self, fd: RawFd, message: &Arc<[u8]>) -> io::Result<bool> {
        let had_news = !self.pending_output.is_empty() || !self.flow_notes.is_empty();
        let policy = self.policy;
        let slot = usize::try_from(fd)
            .ok()
            .and_then(|index| self.slots.get_mut(index)?.as_mut())
            .ok_or_else(not_registered)?;
        let output = &mut slot.output;
        if let Some(errno) = output.failure {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if !output.is_socket {
            check_is_stream_socket(fd)?;
            output.is_socket = true;
        }
        output.queue.push(message, policy.send_limit)?;
        let queued = output.queue.charged();
        let mut news = false;
        if !output.above_high && queued > policy.high_watermark {
            output.above_high = true;
            let now = Instant::now(); // once per congestion, not per send
            output.congested_since = Some(now);
            if let (Some(lag), false) = (policy.lag_timeout, output.lag_timer_queued) {
                self.flow_timers.push(now + lag, slot.token, FlowCheck::Lag);
                output.lag_timer_queued = true;
            }
            self.flow_notes.push(FlowNote {
                token: slot.token,
                kind: FlowEventKind::High,
                queued,
            });
            news = true;
        }
        if output.state == OutputState::Idle {
            output.state = OutputState::Pending;
            mark_pending(
                &mut self.pending_output,
                &mut self.pending_since,
                &policy,
                slot.token,
            );
            news = true;
        }
        Ok(news && !had_news)
    }

    /// Bytes queued for `fd` and not yet written (with the per-message overhead), or
    /// `None` when `fd` is not registered.
    pub(crate) fn queued_bytes(&self, fd: RawFd) -> Option<usize> {
        Some(self.slot(fd)?.output.queue.charged())
    }

    /// The backend found registration `token` writable: its output is flushed this turn.
    /// `watch_ended` says that the backend's writable watch ended with this report.
    pub(crate) fn output_writable(&mut self, token: Token, watch_ended: bool) {
        let Some(slot) = self.slot_of_token(token) else {
            return;
        };
        if watch_ended {
            slot.output.watching_writable = false;
        }
        if slot.output.state == OutputState::AwaitingWritable {
            slot.output.state = OutputState::Pending;
            mark_pending(
                &mut self.pending_output,
                &mut self.pending_since,
                &self.policy,
                token,
            );
        }
    }

    /// With a flush delay: the moment the output queued now is due, if that is still to come
    /// (`None`: flush now, or there is nothing to flush).
    pub(crate) fn flush_deferred_until(&self) -> Option<Instant> {
        let deadline = self.pending_since? + self.policy.flush_delay;
        (deadline > Instant::now()).then_some(deadline)
    }

    /// Moves the list of registrations with output to flush into `into` (which must be
    /// empty), leaving an empty list that keeps `into`'s old buffer.
    pub(crate) fn take_pending_output(&mut self, into: &mut Vec<Token>) {
        debug_assert!(into.is_empty());
        self.pending_since = None;
        std::mem::swap(&mut self.pending_output, into);
    }

    /// Starts the backend's write of what is queued for registration `token`: returns the
    /// header to hand to the kernel, which stays valid until `send_completed`; `None` when
    /// there is nothing to write, or a write is in the kernel already (its completion asks
    /// for the next one).
    pub(crate) fn start_send(&mut self, token: Token) -> Option<*const libc::msghdr> {
        let header = self.start_write(token)?;
        let output = &mut slot_of(&mut self.slots, token)?.output;
        // Until the write completes the output waits: a stall if that lasts. Without stall
        // detection nobody asks, and the clock is not read (twice per write otherwise).
        let Some(timeout) = self.policy.stall_timeout else {
            return Some(header);
        };
        if output.last_progress.is_none() {
            output.last_progress = Some(Instant::now());
            output.kernel_queued = None; // sampled if the wait grows long
        }
        if !output.stall_timer_queued {
            let since = output.last_progress.unwrap_or_else(Instant::now);
            self.flow_timers
                .push(since + timeout, token, FlowCheck::Stall);
            output.stall_timer_queued = true;
        }
        Some(header)
    }

    /// Takes a gathered write of what is queued for registration `token` into its slot (the
    /// write in flight) and returns its header: valid until the write is finished
    /// (`send_completed` or `write_finished`), also past a removal of the registration.
    /// `None` when there is nothing to write or a write is in flight already.
    fn start_write(&mut self, token: Token) -> Option<*const libc::msghdr> {
        let slot = slot_of(&mut self.slots, token)?;
        let output = &mut slot.output;
        if matches!(output.state, OutputState::Idle | OutputState::Sending) {
            return None;
        }
        if output.queue.is_empty() {
            output.state = OutputState::Idle;
            return None;
        }
        let batch = output.queue.gather(self.spare_batches.pop())?;
        let header = batch.header();
        output.in_flight = Some(batch);
        output.state = OutputState::Sending;
        Some(header)
    }

    /// For the writes the loop makes itself (epoll): starts the write of registration
    /// `token`, which the loop then performs without the lock (`write_now`); a removal of the
    /// registration meanwhile waits for `write_finished` (see `is_writing`).
    /// Also returns the bytes the write offers.
    pub(crate) fn start_loop_write(
        &mut self,
        token: Token,
    ) -> Option<(*const libc::msghdr, usize)> {
        let header = self.start_write(token)?;
        self.writing.push(token);
        let offered = slot_of(&mut self.slots, token)?
            .output
            .in_flight
            .as_ref()
            .map_or(0, |batch| batch.offered);
        Some((header, offered))
    }

    /// Whether the loop is writing to registration `token` without the lock right now.
    pub(crate) fn is_writing(&self, token: Token) -> bool {
        self.writing.contains(&token)
    }

    /// The write of registration `token` (started by `start_send` or `start_loop_write`)
    /// returned `result` (bytes written, or -errno); `kernel_queued` is the socket's
    /// `SIOCOUTQ` sampled just after a write of the loop that found the socket full while
    /// stalls are looked for. `kernel_waits`: the kernel performed the write (io_uring), so
    /// after a short write the next write waits for room in the kernel, and no writable watch
    /// is needed. The one rule for every backend is `Output::finish_write`'s; this applies it
    /// and returns how the backend's writable watch of the fd must change.
    pub(crate) fn finish_write(
        &mut self,
        token: Token,
        result: isize,
        kernel_queued: Option<usize>,
        kernel_waits: bool,
    ) -> WriteInterest {
        let policy = self.policy;
        let Some(slot) = slot_of(&mut self.slots, token) else {
            // Removed meanwhile: the kernel is done with the batch now.
            self.release_retired(token);
            return WriteInterest::Keep;
        };
        let output = &mut slot.output;
        let offered = finish_batch(&mut output.in_flight, &mut self.spare_batches);
        let now = policy.stall_timeout.map(|_| Instant::now());
        let kernel_queued = match kernel_queued {
            // A write of the kernel's that found the socket full: sampled here (as the
            // loop samples its own after the write).
            None if kernel_waits && now.is_some() && FinishedWrite::found_full(result, offered) => {
                kernel_queued_of(token.fd())
            }
            sampled => sampled,
        };
        let write = FinishedWrite {
            result,
            offered,
            now,
            kernel_queued,
        };
        let after = output.finish_write(write, &policy, token, &mut self.flow_notes);
        let wait_writable = match after {
            AfterWrite::Done | AfterWrite::Again => false,
            AfterWrite::Full => !kernel_waits,
            AfterWrite::WaitWritable => true,
        };
        output.state = if wait_writable {
            OutputState::AwaitingWritable
        } else if after == AfterWrite::Done {
            OutputState::Idle
        } else {
            // Due now, not held back by a flush delay again: the write just made was the
            // wait (or more than one write carries).
            self.pending_output.push(token);
            OutputState::Pending
        };
        if let (Some(timeout), Some(since), false) = (
            policy.stall_timeout,
            output.last_progress,
            output.stall_timer_queued,
        ) {
            self.flow_timers
                .push(since + timeout, token, FlowCheck::Stall);
            output.stall_timer_queued = true;
        }
        let change = match (output.watching_writable, wait_writable) {
            (false, true) => WriteInterest::Start,
            (true, false) => WriteInterest::Stop,
            _ => WriteInterest::Keep,
        };
        output.watching_writable = wait_writable;
        change
    }

    /// Ends the loop's own writes of this turn (see `start_loop_write`): removals of their
    /// fds need not wait for them any more.
    pub(crate) fn end_loop_writes(&mut self) {
        self.writing.clear();
    }

    /// Whether output waits to be flushed (the loop then does not sleep).
    pub(crate) fn has_pending_output(&self) -> bool {
        !self.pending_output.is_empty()
    }

    /// Checks the flow timers that are due: notes a `Stalled` flow event for every
    /// registration whose output has waited for room, with no byte written, for the stall
    /// timeout, and a `Lagging` one for every registration congested for the lag timeout.
    /// Returns the next deadline to wake up for (`None`: no timer is queued).
    pub(crate) fn collect_flow_timers(&mut self) -> Option<Instant> {
        self.flow_timers.next_deadline()?;
        let now = Instant::now();
        while let Some((token, check)) = self.flow_timers.pop_due(now) {
            match check {
                FlowCheck::Stall => self.check_stall(token, now),
                FlowCheck::Lag => self.check_lag(token, now),
            }
        }
        self.flow_timers.next_deadline()
    }

    /// A stall timer of registration `token` is due at `now`.
    fn check_stall(&mut self, token: Token, now: Instant) {
        let Some(timeout) = self.policy.stall_timeout else {
            return;
        };
        let Some(slot) = slot_of(&mut self.slots, token) else {
            return;
        };
        let output = &mut slot.output;
        output.stall_timer_queued = false;
        let Some(since) = output.last_progress else {
            return; // it drained since
        };
        if since + timeout <= now && output.kernel_queued.is_none() {
            // A write the kernel performs gave no sample when it started: take one now
            // and decide a moment later whether the reader took any of it.
            output.kernel_queued = kernel_queued(token.fd());
            if output.kernel_queued.is_some() {
                self.flow_timers
                    .push(now + STALL_SAMPLE_GRACE, token, FlowCheck::Stall);
                output.stall_timer_queued = true;
                return;
            }
        }
        let kernel_now = if since + timeout > now {
            None
        } else {
            kernel_queued(token.fd())
        };
        let reader_read = matches!((kernel_now, output.kernel_queued), (Some(now_queued), Some(then)) if now_queued < then);
        if reader_read {
            output.last_progress = Some(now);
            output.kernel_queued = kernel_now;
        }
        let since = output.last_progress.unwrap_or(now);
        if since + timeout > now {
            // It wrote, or its reader read, since this entry was queued: wait for the
            // new deadline.
            self.flow_timers
                .push(since + timeout, token, FlowCheck::Stall);
            output.stall_timer_queued = true;
        } else if !output.stall_reported {
            output.stall_reported = true;
            let queued = output.queue.charged();
            self.flow_notes.push(FlowNote {
                token,
                kind: FlowEventKind::Stalled,
                queued,
            });
        }
    }

    /// A lag timer of registration `token` is due at `now`: progress does not matter, only
    /// how long its current congestion has lasted.
    fn check_lag(&mut self, token: Token, now: Instant) {
        let Some(timeout) = self.policy.lag_timeout else {
            return;
        };
        let Some(slot) = slot_of(&mut self.slots, token) else {
            return;
        };
        let output = &mut slot.output;
        output.lag_timer_queued = false;
        let Some(since) = output.congested_since else {
            return; // it drained since
        };
        if since + timeout > now {
            // A later congestion than the one this entry was queued for.
            self.flow_timers
                .push(since + timeout, token, FlowCheck::Lag);
            output.lag_timer_queued = true;
        } else if !output.lag_reported {
            output.lag_reported = true;
            let queued = output.queue.charged();
            self.flow_notes.push(FlowNote {
                token,
                kind: FlowEventKind::Lagging,
                queued,
            });
        }
    }

    /// Sets the stall timeout (`None`: stalls are not looked for) and queues a stall timer
    /// for every registration whose output waits for room now.
    pub(crate) fn set_stall_timeout(&mut self, timeout: Option<Duration>) {
        self.policy.stall_timeout = timeout;
        self.flow_timers.forget(FlowCheck::Stall);
        for slot in self.slots.iter_mut().flatten() {
            let output = &mut slot.output;
            output.stall_timer_queued = false;
            let waits = output.in_flight.is_some() || output.state == OutputState::AwaitingWritable;
            if timeout.is_some() && output.last_progress.is_none() && waits {
                // Output that waits for room, untimed while stalls were not looked for.
                output.last_progress = Some(Instant::now());
            }
            if let (Some(timeout), Some(since)) = (timeout, output.last_progress) {
                self.flow_timers
                    .push(since + timeout, slot.token, FlowCheck::Stall);
                output.stall_timer_queued = true;
                // The reader's progress from now on is measured against this.
                output.kernel_queued = kernel_queued(slot.token.fd());
            }
        }
    }

    /// Sets the lag timeout (`None`: lags are not looked for) and queues a lag timer for
    /// every registration congested now, counted from the start of its congestion.
    pub(crate) fn set_lag_timeout(&mut self, timeout: Option<Duration>) {
        self.policy.lag_timeout = timeout;
        self.flow_timers.forget(FlowCheck::Lag);
        for slot in self.slots.iter_mut().flatten() {
            let output = &mut slot.output;
            output.lag_timer_queued = false;
            if let (Some(timeout), Some(since)) = (timeout, output.congested_since) {
                self.flow_timers
                    .push(since + timeout, slot.token, FlowCheck::Lag);
                output.lag_timer_queued = true;
            }
        }
    }

    /// Whether flow events wait to be delivered.
    pub(crate) fn has_flow_notes(&self) -> bool {
        !self.flow_notes.is_empty()
    }

    /// Moves the flow events noted so far into `into` (which must be empty).
    pub(crate) fn take_flow_notes(&mut self, into: &mut Vec<FlowNote>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut self.flow_notes, into);
    }

    /// Marks registration `token` as running for a flow-handler call, if it still exists;
    /// returns whether it does.
    pub(crate) fn begin_flow_call(&mut self, token: Token) -> bool {
        let registered = self.is_registered(token);
        if registered {
            self.running = Some(token);
        }
        registered
    }

    /// Ends the call begun by `begin_flow_call`.
    pub(crate) fn end_flow_call(&mut self) {
        self.running = None;
    }

    /// Whether the handler of registration `token` is running now.
    pub(crate) fn is_running(&self, token: Token) -> bool {
        self.running == Some(token)
    }

    /// Whether some thread waits in `removeHandler` for a running handler to return.
    pub(crate) fn has_waiting_removals(&self) -> bool {
        self.removals_waiting > 0
    }

    pub(crate) fn removal_starts_waiting(&mut self) {
        self.removals_waiting += 1;
    }

    pub(crate) fn removal_stops_waiting(&mut self) {
        self.removals_waiting -= 1;
    }
}

/// How long after a late `SIOCOUTQ` sample a stall is decided (see `check_stall`).
const STALL_SAMPLE_GRACE: Duration = Duration::from_millis(250);

/// How many finished batches the registry keeps for reuse (about 2 KiB each, with the
/// room for their messages).
const SPARE_BATCHES: usize = 64;

/// Ends the write in flight of an output: returns the bytes it offered, and keeps its
/// batch's memory for a later write.
#[allow(clippy::vec_box)] // the boxes are the reused allocations (see `spare_batches`)
fn finish_batch(in_flight: &mut Option<Box<SendBatch>>, spare: &mut Vec<Box<SendBatch>>) -> usize {
    let Some(batch) = in_flight.take() else {
        return 0;
    };
    let offered = batch.offered;
    if spare.len() < SPARE_BATCHES {
        spare.push(batch.finished());
    }
    offered
}

/// Adds `token` to the registrations whose output the loop flushes, noting when the list
/// stopped being empty if output may be held back (a flush delay).
fn mark_pending(
    pending: &mut Vec<Token>,
    since: &mut Option<Instant>,
    policy: &OutputPolicy,
    token: Token,
) {
    if pending.is_empty() && !policy.flush_delay.is_zero() {
        *since = Some(Instant::now());
    }
    pending.push(token);
}

/// The slot of registration `token` in `slots`, if it still exists. A free function, so that
/// callers may borrow the registry's other fields while they hold the slot.
fn slot_of(slots: &mut [Option<Box<Slot>>], token: Token) -> Option<&mut Slot> {
    let slot = slots
        .get_mut(usize::try_from(token.fd()).ok()?)?
        .as_deref_mut()?;
    (slot.token == token).then_some(slot)
}

fn not_registered() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn handler_to_run(call: Call) -> Handler {
        match call {
            Call::Run(handler) => handler,
            _ => panic!("the registration's handler is not due"),
        }
    }

    fn counting_handler(calls: &Arc<AtomicUsize>) -> Handler {
        let calls = Arc::clone(calls);
        Handler::Ready(Box::new(move |_fd| {
            calls.fetch_add(1, Ordering::SeqCst);
        }))
    }

    fn call(handler: &mut Handler, fd: RawFd) {
        match handler {
            Handler::Ready(on_ready) => on_ready(fd),
            _ => panic!("not a readiness handler"),
        }
    }

    #[test]
    fn insert_rejects_a_second_registration_of_the_same_fd() {
        let mut registry = Registry::default();
        let calls = Arc::new(AtomicUsize::new(0));
        registry
            .insert(5, counting_handler(&calls), Operation::Ready)
            .unwrap();
        let err = registry
            .insert(5, counting_handler(&calls), Operation::Ready)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn insert_rejects_negative_fds() {
        let mut registry = Registry::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let err = registry
            .insert(-1, counting_handler(&calls), Operation::Ready)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn token_carries_the_fd_and_changes_with_each_registration() {
        let mut registry = Registry::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let first = registry
            .insert(7, counting_handler(&calls), Operation::Ready)
            .unwrap();
        registry.remove(7).unwrap();
        let second = registry
            .insert(7, counting_handler(&calls), Operation::Ready)
            .unwrap();
        assert_eq!(first.fd(), 7);
        assert_eq!(second.fd(), 7);
        assert_ne!(first, second);
        assert_ne!(first, Token::WAKE);
        assert_eq!(Token::from_u64(second.to_u64()), second);
    }

    #[test]
    fn stale_token_of_a_reused_fd_does_not_reach_the_new_handler() {
        let mut registry = Registry::default();
        let old_calls = Arc::new(AtomicUsize::new(0));
        let new_calls = Arc::new(AtomicUsize::new(0));
        let old = registry
            .insert(3, counting_handler(&old_calls), Operation::Ready)
            .unwrap();
        registry.remove(3).unwrap();
        registry
            .insert(3, counting_handler(&new_calls), Operation::Ready)
            .unwrap();
        assert!(matches!(registry.begin_call(old), Call::Nothing));
        assert!(!registry.is_running(old));
    }

    #[test]
    fn handler_removed_while_running_is_returned_for_dropping() {
        let mut registry = Registry::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let token = registry
            .insert(4, counting_handler(&calls), Operation::Ready)
            .unwrap();
        let mut handler = handler_to_run(registry.begin_call(token));
        assert!(registry.is_running(token));
        call(&mut handler, 4);
        let (removed_token, _, removed_handler) = registry.remove(4).unwrap();
        assert_eq!(removed_token, token);
        assert!(
            removed_handler.is_none(),
            "the running handler is out of its slot"
        );
        assert!(registry.end_call(token, handler).is_some());
        assert!(!registry.is_running(token));
        assert_eq!(registry.len(), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn handler_goes_back_to_its_slot_after_a_call() {
        let mut registry = Registry::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let token = registry
            .insert(9, counting_handler(&calls), Operation::Ready)
            .unwrap();
        for _ in 0..3 {
            let mut handler = handler_to_run(registry.begin_call(token));
            call(&mut handler, 9);
            assert!(registry.end_call(token, handler).is_none());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(matches!(registry.begin_call(token), Call::Run(_)));
    }

    #[test]
    fn remove_all_empties_the_registry() {
        let mut registry = Registry::default();
        let calls = Arc::new(AtomicUsize::new(0));
        for fd in [1, 10, 100] {
            registry
                .insert(fd, counting_handler(&calls), Operation::Ready)
                .unwrap();
        }
        let mut fds: Vec<RawFd> = registry
            .remove_all()
            .into_iter()
            .map(|(token, _, _)| token.fd())
            .collect();
        fds.sort();
        assert_eq!(fds, vec![1, 10, 100]);
        assert_eq!(registry.len(), 0);
        assert!(registry.remove(10).is_none());
    }
}
