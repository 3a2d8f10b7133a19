//! Flow control: the watermark and stall events of queued output, and the timers behind
//! stalls.
//!
//! The registry decides when an fd's queue crosses a watermark or stalls and notes a
//! [`FlowNote`]; the loop thread hands the notes to the program's flow handler after the
//! handler call or the flush that caused them, with no lock held. Stalls are found through a
//! heap of deadlines, one entry per fd whose output waits for room, so the cost follows the
//! number of blocked writers, never the number of idle fds.

use crate::registry::Token;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::RawFd;
use std::time::Instant;

/// The high watermark a new proactor starts with: 1 MiB of queued output per fd.
///
/// ```
/// let (_low, high) = st_proactor::Proactor::new()?.watermarks();
/// assert_eq!(high, st_proactor::DEFAULT_HIGH_WATERMARK);
/// # Ok::<(), std::io::Error>(())
/// ```
pub const DEFAULT_HIGH_WATERMARK: usize = 1 << 20;

/// The low watermark a new proactor starts with: 256 KiB of queued output per fd.
///
/// ```
/// let (low, _high) = st_proactor::Proactor::new()?.watermarks();
/// assert_eq!(low, st_proactor::DEFAULT_LOW_WATERMARK);
/// # Ok::<(), std::io::Error>(())
/// ```
pub const DEFAULT_LOW_WATERMARK: usize = 256 << 10;

/// What happened to an fd's queued output.
///
/// ```
/// use st_proactor::{FlowEventKind, Proactor};
/// let proactor = Proactor::new()?;
/// proactor.set_flow_handler(|event| match event.kind {
///     FlowEventKind::High => println!("fd {} is behind: pause its senders", event.fd),
///     FlowEventKind::Drained => println!("fd {} caught up: resume them", event.fd),
///     FlowEventKind::Stalled => println!("fd {} stopped reading: drop it", event.fd),
/// });
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEventKind {
    /// The queue rose above the high watermark (once per crossing).
    High,
    /// The queue of an fd that had risen above the high watermark fell to the low one or
    /// below (by writes, or because it was dropped after a write error).
    Drained,
    /// The queue has waited for room in the socket, with no byte written, for the stall
    /// timeout (once per stall).
    Stalled,
}

/// One flow event, as the flow handler gets it.
///
/// ```
/// use st_proactor::{FlowEvent, FlowEventKind};
/// let event = FlowEvent { fd: 7, kind: FlowEventKind::High, queued: 2 << 20 };
/// assert!(event.queued > st_proactor::DEFAULT_HIGH_WATERMARK);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// The fd whose output it is about.
    pub fd: RawFd,
    /// What happened.
    pub kind: FlowEventKind,
    /// The fd's queued bytes when the event was noted, counted as
    /// [`Proactor::queued_bytes`](crate::Proactor::queued_bytes) counts them.
    pub queued: usize,
}

/// A flow event waiting in the registry for the loop to deliver it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlowNote {
    pub(crate) token: Token,
    pub(crate) kind: FlowEventKind,
    pub(crate) queued: usize,
}

impl FlowNote {
    pub(crate) fn event(self) -> FlowEvent {
        FlowEvent {
            fd: self.token.fd(),
            kind: self.kind,
            queued: self.queued,
        }
    }
}

/// The program's flow handler, as the core stores it.
pub(crate) type FlowHandler = Box<dyn FnMut(FlowEvent) + Send>;

/// Where the flow handler lives. The loop takes it out to call it (so that it may replace
/// itself or call anything else); `version` tells the loop whether it was replaced meanwhile.
#[derive(Default)]
pub(crate) struct FlowHandlerSlot {
    pub(crate) handler: Option<FlowHandler>,
    pub(crate) version: u64,
}

impl FlowHandlerSlot {
    /// Installs `handler` (or none), returning the one it replaces (to drop unlocked).
    pub(crate) fn replace(&mut self, handler: Option<FlowHandler>) -> Option<FlowHandler> {
        self.version += 1;
        std::mem::replace(&mut self.handler, handler)
    }
}

/// Deadlines of the fds whose output waits for room: the earliest first. An entry may be
/// stale (the fd wrote since, drained, or went away); the registry checks each one it pops.
#[derive(Default)]
pub(crate) struct StallTimers {
    heap: BinaryHeap<Reverse<(Instant, Token)>>,
}

impl StallTimers {
    pub(crate) fn push(&mut self, deadline: Instant, token: Token) {
        self.heap.push(Reverse((deadline, token)));
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Token> {
        let Reverse((deadline, _)) = *self.heap.peek()?;
        if deadline > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, token))| token)
    }

    /// The earliest deadline, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((deadline, _))| *deadline)
    }

    pub(crate) fn clear(&mut self) {
        self.heap.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stall_timers_pop_the_earliest_due_deadline_first() {
        let mut timers = StallTimers::default();
        let start = Instant::now();
        let late = Token::from_u64(2);
        let early = Token::from_u64(1);
        timers.push(start + Duration::from_millis(20), late);
        timers.push(start + Duration::from_millis(10), early);
        assert_eq!(
            timers.next_deadline(),
            Some(start + Duration::from_millis(10))
        );
        assert_eq!(timers.pop_due(start), None);
        assert_eq!(
            timers.pop_due(start + Duration::from_millis(15)),
            Some(early)
        );
        assert_eq!(timers.pop_due(start + Duration::from_millis(15)), None);
        assert_eq!(
            timers.pop_due(start + Duration::from_millis(20)),
            Some(late)
        );
        assert_eq!(timers.next_deadline(), None);
    }

    #[test]
    fn replacing_the_flow_handler_changes_its_version() {
        let mut slot = FlowHandlerSlot::default();
        let before = slot.version;
        assert!(slot.replace(Some(Box::new(|_| {}))).is_none());
        assert!(slot.version > before);
        assert!(slot.replace(None).is_some());
    }
}
