//! The output of one registration: its queue, where its writing stands, and the one rule
//! by which a finished write moves it on, whichever backend made the write.
//!
//! | a write of `offered` bytes returned | the output | then |
//! | --- | --- | --- |
//! | all of them, nothing left | written | `Done` |
//! | all of them, more queued (one write carries at most 64 messages) | more to write | `Again` |
//! | fewer (0 included) | the socket is full | `Full` |
//! | `EAGAIN` | the socket is full | `WaitWritable` |
//! | `ENOBUFS`, `ENOMEM` | the kernel is short of memory for a moment | `WaitWritable` |
//! | `EINTR`, `ECANCELED` | nothing written (interrupted; cancelled at the end of a run) | `Again` |
//! | any other errno (`EPIPE`, `ECONNRESET`…) | the peer is gone: the queue is dropped, later sends fail with it | `Done` |
//!
//! `Full` waits for room: on epoll by a writable watch; where the kernel performs the writes
//! (io_uring) the next write itself waits in the kernel. `WaitWritable` waits for a writable
//! report on both backends, so that a kernel short of memory is not asked again at once.

use crate::flow::{FlowEventKind, FlowNote, DEFAULT_HIGH_WATERMARK, DEFAULT_LOW_WATERMARK};
use crate::sendq::{SendBatch, SendQueue, DEFAULT_SEND_LIMIT};
use crate::token::Token;
use std::time::{Duration, Instant};

/// The queued output of one registration and where it stands.
#[derive(Default)]
pub(crate) struct Output {
    pub(crate) queue: SendQueue,
    pub(crate) state: OutputState,
    /// Set once a write failed (the peer is gone): later sends fail with this errno.
    pub(crate) failure: Option<i32>,
    /// Whether the fd was found to be a stream socket (checked at the first send).
    pub(crate) is_socket: bool,
    /// Whether the backend reports writability of the fd (only while a write is blocked).
    pub(crate) watching_writable: bool,
    /// Above the high watermark since a `High` event, until the `Drained` one.
    pub(crate) above_high: bool,
    /// When the current congestion (`High` without its `Drained` yet) began.
    pub(crate) congested_since: Option<Instant>,
    /// Whether a lag timer entry for this registration is in the heap.
    pub(crate) lag_timer_queued: bool,
    /// Whether the current congestion was reported as lagging (once per congestion).
    pub(crate) lag_reported: bool,
    /// While the output waits for room: when it started waiting, or when a write last took
    /// some of it. A stall is this plus the stall timeout.
    pub(crate) last_progress: Option<Instant>,
    /// The socket's own unsent and unacknowledged bytes (`SIOCOUTQ`) at `last_progress`: a
    /// reader that reads frees them even while no write of ours fits, which is progress too
    /// (a socket buffer of megabytes makes room for a write only now and then).
    pub(crate) kernel_queued: Option<usize>,
    /// Whether a stall timer entry for this registration is in the heap.
    pub(crate) stall_timer_queued: bool,
    /// Whether the current stall was reported (cleared by progress).
    pub(crate) stall_reported: bool,
    /// The write the kernel performs now (io_uring), if any: at most one per fd, since
    /// several in flight on one socket may complete out of order.
    pub(crate) in_flight: Option<Box<SendBatch>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum OutputState {
    /// Nothing to write, or written already.
    #[default]
    Idle,
    /// In the list of fds the loop flushes at the end of this turn.
    Pending,
    /// The socket was full: the backend watches for writability, which makes it `Pending`.
    AwaitingWritable,
    /// The backend performs a write of it; its completion makes it `Pending` or `Idle`.
    Sending,
}

/// The per-fd output rules of a proactor, all checked under the registry lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OutputPolicy {
    /// The hard cap: a send that would pass it fails with ENOBUFS.
    pub(crate) send_limit: usize,
    pub(crate) low_watermark: usize,
    pub(crate) high_watermark: usize,
    /// `None`: stalls are not looked for.
    pub(crate) stall_timeout: Option<Duration>,
    /// `None`: lags (congestion held too long) are not looked for.
    pub(crate) lag_timeout: Option<Duration>,
    /// How long the loop may hold output back, after it was first queued, so that a write
    /// carries more (zero: it writes at the end of every turn).
    pub(crate) flush_delay: Duration,
}

impl Default for OutputPolicy {
    fn default() -> OutputPolicy {
        OutputPolicy {
            send_limit: DEFAULT_SEND_LIMIT,
            low_watermark: DEFAULT_LOW_WATERMARK,
            high_watermark: DEFAULT_HIGH_WATERMARK,
            stall_timeout: None,
            lag_timeout: None,
            flush_delay: Duration::ZERO,
        }
    }
}

/// What a finished write leaves its output waiting for (see the module docs for the rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfterWrite {
    /// Nothing: all is written, or the output failed.
    Done,
    /// A write now: more is queued than the write carried, or it wrote nothing and may be
    /// made again.
    Again,
    /// Room: a short write found the socket full.
    Full,
    /// A writable report: the socket or the kernel had no room for any of it.
    WaitWritable,
}

/// A write of an output that has finished.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FinishedWrite {
    /// Bytes written, or -errno.
    pub(crate) result: isize,
    /// Bytes the write offered.
    pub(crate) offered: usize,
    /// The time now, when stalls are looked for (`None` otherwise: the clock is not read).
    pub(crate) now: Option<Instant>,
    /// The socket's `SIOCOUTQ` just after the write, when it found the socket full and
    /// stalls are looked for.
    pub(crate) kernel_queued: Option<usize>,
}

impl FinishedWrite {
    /// Whether the write found the socket full (a short write, or `EAGAIN`).
    pub(crate) fn found_full(result: isize, offered: usize) -> bool {
        result == -(libc::EAGAIN as isize) || (result >= 0 && (result as usize) < offered)
    }
}

impl Output {
    /// Moves the output on after `write` (the rule of the module docs): the written bytes
    /// leave the queue; the stall clock (`last_progress`) starts when the output starts
    /// waiting for room and restarts at each write that took some of it, and stops when it
    /// no longer waits; a failure drops the queue and is kept for later sends; a queue back
    /// at the low watermark notes `Drained`. The caller sets `state` from the result.
    pub(crate) fn finish_write(
        &mut self,
        write: FinishedWrite,
        policy: &OutputPolicy,
        token: Token,
        notes: &mut Vec<FlowNote>,
    ) -> AfterWrite {
        let FinishedWrite {
            result,
            offered,
            now,
            kernel_queued,
        } = write;
        let after = if result >= 0 {
            self.queue.consume(result as usize);
            if (result as usize) < offered {
                AfterWrite::Full
            } else if self.queue.is_empty() {
                AfterWrite::Done
            } else {
                AfterWrite::Again
            }
        } else {
            match -result as i32 {
                libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM => AfterWrite::WaitWritable,
                libc::EINTR | libc::ECANCELED => AfterWrite::Again,
                errno => {
                    // The handler sees the hang-up through its own call.
                    self.failure = Some(errno);
                    self.queue.clear();
                    AfterWrite::Done
                }
            }
        };
        match after {
            AfterWrite::Full | AfterWrite::WaitWritable => {
                if self.last_progress.is_none() || result > 0 {
                    self.last_progress = now;
                    self.stall_reported = false;
                    self.kernel_queued = kernel_queued;
                }
            }
            AfterWrite::Done | AfterWrite::Again => self.last_progress = None,
        }
        note_drained(self, policy, token, notes);
        if self.queue.is_empty() {
            self.queue.release_idle_capacity();
        }
        after
    }
}

/// Notes a `Drained` flow event when `output`, above the high watermark since its `High`
/// event, has fallen to the low one or below (once per crossing).
pub(crate) fn note_drained(
    output: &mut Output,
    policy: &OutputPolicy,
    token: Token,
    notes: &mut Vec<FlowNote>,
) {
    let queued = output.queue.charged();
    if output.above_high && queued <= policy.low_watermark {
        output.above_high = false;
        output.congested_since = None;
        output.lag_reported = false;
        notes.push(FlowNote {
            token,
            kind: FlowEventKind::Drained,
            queued,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const TOKEN: Token = Token::WAKE;

    fn policy(stall: bool) -> OutputPolicy {
        OutputPolicy {
            low_watermark: 100,
            high_watermark: 1000,
            stall_timeout: stall.then_some(Duration::from_secs(2)),
            ..OutputPolicy::default()
        }
    }

    /// An output holding `messages` messages of `len` bytes each.
    fn output_with(messages: usize, len: usize) -> Output {
        let mut output = Output::default();
        let message: Arc<[u8]> = Arc::from(vec![7u8; len]);
        for _ in 0..messages {
            output.queue.push(&message, usize::MAX).unwrap();
        }
        output
    }

    fn finish(
        output: &mut Output,
        result: isize,
        offered: usize,
        now: Option<Instant>,
    ) -> (AfterWrite, Vec<FlowNote>) {
        let mut notes = Vec::new();
        let write = FinishedWrite {
            result,
            offered,
            now,
            kernel_queued: Some(5),
        };
        let after = output.finish_write(write, &policy(now.is_some()), TOKEN, &mut notes);
        (after, notes)
    }

    #[test]
    fn a_write_of_everything_is_done_and_stops_the_stall_clock() {
        let mut output = output_with(2, 10);
        output.last_progress = Some(Instant::now());
        let (after, _) = finish(&mut output, 20, 20, Some(Instant::now()));
        assert_eq!(after, AfterWrite::Done);
        assert!(output.queue.is_empty());
        assert_eq!(output.last_progress, None);
    }

    #[test]
    fn a_full_write_with_more_queued_writes_again() {
        let mut output = output_with(3, 10);
        let (after, _) = finish(&mut output, 20, 20, None);
        assert_eq!(after, AfterWrite::Again);
        assert_eq!(output.queue.charged(), 10 + crate::sendq::MESSAGE_OVERHEAD);
        assert_eq!(output.last_progress, None);
    }

    #[test]
    fn a_short_write_is_full_and_starts_or_restarts_the_stall_clock() {
        let start = Instant::now();
        let mut output = output_with(2, 10);
        let (after, _) = finish(&mut output, 5, 20, Some(start));
        assert_eq!(after, AfterWrite::Full);
        assert_eq!(output.last_progress, Some(start));
        assert_eq!(output.kernel_queued, Some(5));
        // Nothing taken: the clock keeps its start.
        let later = start + Duration::from_secs(1);
        let (after, _) = finish(&mut output, 0, 15, Some(later));
        assert_eq!(after, AfterWrite::Full);
        assert_eq!(output.last_progress, Some(start));
        // Some taken: it restarts, and a reported stall is forgotten.
        output.stall_reported = true;
        let (after, _) = finish(&mut output, 3, 15, Some(later));
        assert_eq!(after, AfterWrite::Full);
        assert_eq!(output.last_progress, Some(later));
        assert!(!output.stall_reported);
    }

    #[test]
    fn eagain_enobufs_and_enomem_wait_for_a_writable_report() {
        for errno in [libc::EAGAIN, libc::ENOBUFS, libc::ENOMEM] {
            let mut output = output_with(1, 10);
            let (after, _) = finish(&mut output, -(errno as isize), 10, Some(Instant::now()));
            assert_eq!(after, AfterWrite::WaitWritable, "errno {errno}");
            assert!(output.last_progress.is_some());
            assert_eq!(output.failure, None);
            assert!(!output.queue.is_empty());
        }
    }

    #[test]
    fn eintr_and_ecanceled_write_again_and_keep_the_queue() {
        for errno in [libc::EINTR, libc::ECANCELED] {
            let mut output = output_with(1, 10);
            let (after, _) = finish(&mut output, -(errno as isize), 10, None);
            assert_eq!(after, AfterWrite::Again, "errno {errno}");
            assert_eq!(output.failure, None);
            assert!(!output.queue.is_empty());
        }
    }

    #[test]
    fn other_errors_drop_the_queue_and_are_kept_for_later_sends() {
        for errno in [libc::EPIPE, libc::ECONNRESET, libc::EBADF] {
            let mut output = output_with(2, 10);
            let (after, _) = finish(&mut output, -(errno as isize), 20, None);
            assert_eq!(after, AfterWrite::Done, "errno {errno}");
            assert_eq!(output.failure, Some(errno));
            assert!(output.queue.is_empty());
        }
    }

    #[test]
    fn a_write_that_brings_a_congested_queue_to_the_low_mark_notes_drained_once() {
        let mut output = output_with(20, 100); // 20 * 164 charged: above the high mark
        output.above_high = true;
        output.congested_since = Some(Instant::now());
        output.lag_reported = true;
        let (_, notes) = finish(&mut output, 1700, 1700, None); // 3 left: 3 * 164 > 100
        assert!(notes.is_empty());
        let (after, notes) = finish(&mut output, 300, 300, None);
        assert_eq!(after, AfterWrite::Done);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].kind, FlowEventKind::Drained);
        assert!(!output.above_high && !output.lag_reported);
        assert_eq!(output.congested_since, None);
    }

    #[test]
    fn found_full_means_a_short_write_or_eagain() {
        assert!(FinishedWrite::found_full(5, 10));
        assert!(FinishedWrite::found_full(-(libc::EAGAIN as isize), 10));
        assert!(!FinishedWrite::found_full(10, 10));
        assert!(!FinishedWrite::found_full(-(libc::EPIPE as isize), 10));
    }
}
