//! Delivery: handler dispatch, flow events, the completions of operations the backend
//! performed (receive, accept), and input held while a registration was paused or the loop
//! stopping.

use super::*;
use crate::flow::{FlowHandler, FlowNote};
use crate::operations;
use crate::operations::{Handler, HeldInput, Outcome, ReceiveHandler};
use crate::registry::{Call, Completion};
use crate::token::{Operation, Token};
use std::io;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};

impl Shared {
    /// Hands the flow events noted so far to the flow handler, with no lock held. A handler
    /// that replaces or clears itself gets no further event: the rest of the batch goes to
    /// the handler set now, if any. While it runs for an fd, a `remove` of that fd from
    /// another thread waits for it, as for any handler.
    pub(super) fn deliver_flow_events(&self) {
        let mut notes: Vec<FlowNote> = Vec::new();
        self.registry.lock().take_flow_notes(&mut notes);
        let mut notes = notes.into_iter().peekable();
        while notes.peek().is_some() {
            let (handler, version) = {
                let mut slot = self.flow_handler.lock();
                (slot.handler.take(), slot.version)
            };
            let Some(mut handler) = handler else {
                return; // no handler: the events are dropped
            };
            let mut panicked = false;
            for note in notes.by_ref() {
                if !self.registry.lock().begin_flow_call(note.token) {
                    continue; // removed since: its events are dropped
                }
                let outcome = catch_unwind(AssertUnwindSafe(|| handler(note.event())));
                let mut registry = self.registry.lock();
                registry.end_flow_call();
                if registry.has_waiting_removals() {
                    self.handler_returned.notify_all();
                }
                drop(registry);
                if outcome.is_err() {
                    // The program's panic hook has reported it; the handler is removed.
                    panicked = true;
                    break;
                }
                if self.flow_handler.lock().version != version {
                    break; // replaced or cleared by this call
                }
            }
            let mut slot = self.flow_handler.lock();
            // Put back unless it panicked or the program set another one meanwhile.
            let retired: Option<FlowHandler> = if !panicked && slot.version == version {
                slot.handler = Some(handler);
                None
            } else {
                Some(handler)
            };
            drop(slot);
            drop(retired);
            if panicked {
                return; // the rest of the batch is dropped with it
            }
        }
    }

    /// Calls the handler of registration `token`, if it still exists and is not paused,
    /// with no lock held; then delivers the flow events that call caused.
    pub(super) fn dispatch(&self, token: Token) {
        let fd = token.fd();
        let mut registry = self.registry.lock();
        let mut handler = match registry.begin_call(token) {
            Call::Run(handler) => handler,
            Call::Quiet { writing } => {
                // A failure means the fd was closed under us; its removal ends the watch.
                let _ = self
                    .backend
                    .quiet_reading(fd, token, Operation::Ready, writing);
                return;
            }
            // Gone (removed, or the fd registered anew since the event was collected), or
            // broken while paused (its output is flushed this turn).
            Call::Broken | Call::Nothing => return,
        };
        drop(registry);
        let mut remove = |fd: RawFd| self.remove(fd).is_ok();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            operations::perform_on_readiness(&mut handler, fd, &mut remove)
        }));
        self.finish_call(token, handler, outcome.is_err());
    }

    /// After a handler call (`panicked`: it panicked): puts the handler back, re-arms or
    /// quiets the fd's watch, and delivers the flow events the call caused.
    pub(super) fn finish_call(&self, token: Token, handler: Handler, panicked: bool) {
        let fd = token.fd();
        let mut registry = self.registry.lock();
        let orphan = registry.end_call(token, handler);
        if registry.has_waiting_removals() {
            self.handler_returned.notify_all();
        }
        let removed = if panicked && orphan.is_none() {
            // A handler that panicked would likely panic again: it is forgotten.
            let removed = registry.remove(fd);
            if let Some((token, operation, _)) = &removed {
                if let Ok(true) = self.backend.unwatch(fd, *token, *operation) {
                    registry.release_retired(*token);
                }
            }
            removed
        } else {
            if orphan.is_none() {
                self.update_read_watch(&mut registry, token);
            }
            None
        };
        let flow_news = registry.has_flow_notes();
        drop(registry);
        // A panic was reported by the program's panic hook; its registration is gone now.
        drop(orphan);
        drop(removed);
        if flow_news {
            self.deliver_flow_events();
        }
    }

    /// A receive the backend performed: hands the bytes (or the end) to the handler, or holds
    /// them while the fd is paused or the loop stopping. The buffer goes back to the kernel
    /// as soon as the handler returns.
    pub(super) fn complete_receive(
        &self,
        token: Token,
        result: i32,
        buffer: Option<u16>,
        more: bool,
    ) {
        let fd = token.fd();
        let mut registry = self.registry.lock();
        if !more {
            registry.request_ended(token);
        }
        let len = usize::try_from(result).unwrap_or(0);
        let mut handler = match registry.begin_completion(token, self.stopping()) {
            Completion::Run(handler) => handler,
            Completion::Hold { quiet } => {
                if let Some(held) = registry.held_input(token) {
                    match buffer {
                        Some(buffer) if len > 0 => self.backend.received(buffer, len, &mut |b| {
                            held.bytes.extend_from_slice(b);
                        }),
                        _ => {
                            held.end = Some(result);
                            if let Some(buffer) = buffer {
                                self.backend.received(buffer, 0, &mut |_| {});
                            }
                        }
                    }
                }
                if let Some(operation) = quiet {
                    let _ = self.backend.quiet_reading(fd, token, operation, false);
                }
                return;
            }
            Completion::Nothing => {
                drop(registry);
                if let Some(buffer) = buffer {
                    self.backend.received(buffer, 0, &mut |_| {});
                }
                return;
            }
        };
        drop(registry);
        let mut panicked = false;
        if let Handler::Receive(on_receive) = &mut handler {
            match buffer {
                Some(buffer) if len > 0 => self.backend.received(buffer, len, &mut |bytes| {
                    panicked = catch_unwind(AssertUnwindSafe(|| on_receive(Ok(bytes)))).is_err();
                }),
                _ => {
                    if let Some(buffer) = buffer {
                        self.backend.received(buffer, 0, &mut |_| {});
                    }
                    panicked = self.receive_ended(on_receive, fd, result).is_err();
                }
            }
        }
        self.finish_call(token, handler, panicked);
    }

    /// The last call of a receive (`result` 0 or -errno), unless `result` is transient.
    pub(super) fn receive_ended(
        &self,
        on_receive: &mut ReceiveHandler,
        fd: RawFd,
        result: i32,
    ) -> std::thread::Result<Outcome> {
        let result = if result == 0 {
            Ok(0)
        } else {
            Err(io::Error::from_raw_os_error(-result))
        };
        let mut remove = |fd: RawFd| self.remove(fd).is_ok();
        catch_unwind(AssertUnwindSafe(|| {
            operations::received_end(on_receive, fd, result, &mut remove)
        }))
    }

    /// An accept the backend performed: hands the new socket (or the error) to the handler,
    /// or holds it while the listener is paused or the loop stopping.
    pub(super) fn complete_accept(&self, token: Token, result: i32, more: bool) {
        let fd = token.fd();
        let mut registry = self.registry.lock();
        if !more {
            registry.request_ended(token);
        }
        let mut handler = match registry.begin_completion(token, self.stopping()) {
            Completion::Run(handler) => handler,
            Completion::Hold { quiet } => {
                match registry.held_input(token) {
                    Some(held) => held.accepted.push(result),
                    None => close_accepted(result),
                }
                if let Some(operation) = quiet {
                    let _ = self.backend.quiet_reading(fd, token, operation, false);
                }
                return;
            }
            Completion::Nothing => {
                drop(registry);
                close_accepted(result); // nobody is there to own it
                return;
            }
        };
        drop(registry);
        let panicked = self.accepted(&mut handler, fd, result).is_err();
        self.finish_call(token, handler, panicked);
    }

    /// Hands one accept result to an accept handler.
    pub(super) fn accepted(
        &self,
        handler: &mut Handler,
        listener: RawFd,
        result: i32,
    ) -> std::thread::Result<Outcome> {
        let Handler::Accept { on_accept, reserve } = handler else {
            close_accepted(result);
            return Ok(Outcome::Continue);
        };
        let mut remove = |fd: RawFd| self.remove(fd).is_ok();
        catch_unwind(AssertUnwindSafe(|| {
            if result >= 0 {
                on_accept(Ok(operations::accepted_socket(result)));
                Outcome::Continue
            } else {
                let err = io::Error::from_raw_os_error(-result);
                operations::accept_failed(on_accept, reserve, listener, err, &mut remove)
            }
        }))
    }

    /// Delivers the input held for registrations that were resumed (or held while the loop
    /// was stopping), in order, before anything newer; then re-arms their requests.
    pub(super) fn deliver_held(&self) {
        let due = self.registry.lock().take_held_due();
        for token in due {
            let taken = self.registry.lock().begin_held_delivery(token);
            let Some((mut handler, mut held)) = taken else {
                // Nothing held (a request that ended while paused): re-arm it.
                self.restore_read_watch(token);
                continue;
            };
            let panicked = self.deliver_held_input(token, &mut handler, &mut held);
            if !held.is_empty() && !panicked {
                self.registry.lock().put_back_held(token, held);
            }
            self.finish_call(token, handler, panicked);
        }
    }

    /// Hands `held` to `handler` piece by piece while the registration stays active; what is
    /// left in `held` could not be delivered. Returns whether the handler panicked.
    pub(super) fn deliver_held_input(
        &self,
        token: Token,
        handler: &mut Handler,
        held: &mut HeldInput,
    ) -> bool {
        let fd = token.fd();
        while !held.is_empty() {
            let still_reading = self.registry.lock().is_reading(token);
            if !still_reading {
                return false; // paused or removed by the handler: the rest waits or goes
            }
            let outcome = if !held.accepted.is_empty() {
                let result = held.accepted.remove(0);
                self.accepted(handler, fd, result)
            } else if let Handler::Receive(on_receive) = handler {
                if !held.bytes.is_empty() {
                    let piece = held.bytes.len().min(operations::RECEIVE_BUFFER);
                    let bytes: Vec<u8> = held.bytes.drain(..piece).collect();
                    catch_unwind(AssertUnwindSafe(|| {
                        on_receive(Ok(&bytes));
                        Outcome::Continue
                    }))
                } else {
                    let result = held.end.take().unwrap_or(0);
                    self.receive_ended(on_receive, fd, result)
                }
            } else {
                *held = HeldInput::default();
                Ok(Outcome::Continue)
            };
            match outcome {
                Err(_) => return true,
                Ok(Outcome::Ended) => {
                    *held = HeldInput::default();
                    return false;
                }
                Ok(Outcome::Continue) => {}
            }
        }
        false
    }
}

/// Closes an accepted socket (`result` >= 0) that no handler will own.
pub(super) fn close_accepted(result: i32) {
    if result >= 0 {
        // SAFETY: the kernel just made this fd for the library, and nobody else has it.
        unsafe { libc::close(result) };
    }
}
