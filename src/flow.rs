//! Flow control: the watermark, stall and lag events of queued output, and the timers behind
//! stalls and lags.
//!
//! The registry decides when an fd's queue crosses a watermark, stalls or lags and notes a
//! [`FlowNote`]; the loop thread hands the notes to the program's flow handler after the
//! handler call or the flush that caused them, with no lock held. Stalls and lags are found
//! through one heap of deadlines, with at most one entry of each kind per fd whose output
//! waits for room or is congested, so the cost follows the number of blocked or congested
//! writers, never the number of idle fds.

use crate::token::Token;
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
///     FlowEventKind::Lagging => println!("fd {} has been behind too long: drop it", event.fd),
///     _ => {} // kinds a later version may add
/// });
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlowEventKind {
    /// The queue rose above the high watermark (once per crossing).
    High,
    /// The queue of an fd that had risen above the high watermark fell to the low one or
    /// below (by writes, or because it was dropped after a write error).
    Drained,
    /// The queue has waited for room in the socket, with no byte written, for the stall
    /// timeout (once per stall).
    Stalled,
    /// The queue has stayed above the high watermark, from its `High` event on without its
    /// `Drained` one, for the lag timeout (once per congestion), whether or not the reader
    /// made progress meanwhile: a reader that reads, but too slowly to catch up.
    Lagging,
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

/// What a flow timer checks when it is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum FlowCheck {
    /// Whether the fd's output, waiting for room, made no progress for the stall timeout.
    Stall,
    /// Whether the fd's output stayed congested for the lag timeout.
    Lag,
}

/// Deadlines of the fds whose output waits for room (stall checks) or is congested (lag
/// checks): the earliest first. An entry may be stale (the fd wrote since, drained, or went
/// away); the registry checks each one it pops.
#[derive(Default)]
pub(crate) struct FlowTimers {
    heap: BinaryHeap<Reverse<(Instant, Token, FlowCheck)>>,
}

impl FlowTimers {
    pub(crate) fn push(&mut self, deadline: Instant, token: Token, check: FlowCheck) {
        self.heap.push(Reverse((deadline, token, check)));
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Token, FlowCheck)> {
        let Reverse((deadline, _, _)) = *self.heap.peek()?;
        if deadline > now {
            return None;
        }
        self.heap
            .pop()
            .map(|Reverse((_, token, check))| (token, check))
    }

    /// The earliest deadline, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((deadline, _, _))| *deadline)
    }

    /// Forgets every entry of one kind (its timeout changed).
    pub(crate) fn forget(&mut self, check: FlowCheck) {
        self.heap.retain(|Reverse((_, _, kind))| *kind != check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn flow_timers_pop_the_earliest_due_deadline_first() {
        let mut timers = FlowTimers::default();
        let start = Instant::now();
        let late = Token::from_u64(2);
        let early = Token::from_u64(1);
        timers.push(start + Duration::from_millis(20), late, FlowCheck::Lag);
        timers.push(start + Duration::from_millis(10), early, FlowCheck::Stall);
        assert_eq!(
            timers.next_deadline(),
            Some(start + Duration::from_millis(10))
        );
        assert_eq!(timers.pop_due(start), None);
        assert_eq!(
            timers.pop_due(start + Duration::from_millis(15)),
            Some((early, FlowCheck::Stall))
        );
        assert_eq!(timers.pop_due(start + Duration::from_millis(15)), None);
        assert_eq!(
            timers.pop_due(start + Duration::from_millis(20)),
            Some((late, FlowCheck::Lag))
        );
        assert_eq!(timers.next_deadline(), None);
    }

    #[test]
    fn forgetting_one_kind_keeps_the_other() {
        let mut timers = FlowTimers::default();
        let start = Instant::now();
        timers.push(start, Token::from_u64(1), FlowCheck::Stall);
        timers.push(start, Token::from_u64(2), FlowCheck::Lag);
        timers.forget(FlowCheck::Stall);
        assert_eq!(
            timers.pop_due(start),
            Some((Token::from_u64(2), FlowCheck::Lag))
        );
        assert_eq!(timers.pop_due(start), None);
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
