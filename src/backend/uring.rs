//! The io_uring backend: the kernel performs receives (into a ring of buffers the library
//! provides), accepts (multishot) and writes, and reports readiness for the registrations of
//! `add` through one-shot `IORING_OP_POLL_ADD` requests.
//!
//! A one-shot poll completes at once when its fd is ready at arming time, so re-arming it
//! after each handler call gives the level-triggered behaviour the contract promises (a
//! multishot poll only reports new wake-ups). A multishot accept posts one completion per
//! connection until it ends (no `IORING_CQE_F_MORE`); a receive posts one per chunk and is
//! one-shot (see `request`); the loop re-arms each where it should go on. Re-arming happens on the loop thread and is submitted
//! with the loop's next wait, so a busy turn costs one `io_uring_enter` in all.
//!
//! Any thread may add requests: pushes to the submission queue are serialised by a mutex.
//! New watches are left for the loop thread to submit with its next wait (the caller wakes
//! it), because the kernel cancels a thread's requests when that thread exits; removals are
//! submitted at once by the caller. Only the loop thread reads the completion queue. A request
//! cancelled anyway (its loop thread ended with a cancel, or a full queue was submitted by a
//! thread that has ended since) comes back as `-ECANCELED`, and the loop re-arms it from its
//! own thread while the registration exists.
//!
//! What the kernel offers is probed when the ring is made: receives need buffer rings (5.19)
//! and the synchronous cancel that `drop` relies on (6.0), accepts multishot accept (5.19), writes `SENDMSG` (and the
//! synchronous cancel of 6.0); where one is missing (or `ST_PROACTOR_URING_DISABLE` names
//! it) the loop performs it on readiness instead.
//!
//! Writes: at most one `SENDMSG` per fd is in the kernel at a time (several on one socket
//! may complete out of order), carrying everything queued for the fd as one gathered write;
//! a short write sends the rest with the next. The kernel waits for room itself, so no
//! writable watch is needed. All the writes of a turn reach the kernel with the loop's wait.

use super::buffers::{self, BufferRing};
use super::eventfd::EventFd;
use super::{check, Backend, Event, URING_DISABLE_ENV_VAR};
use crate::operations::Operation;
use crate::registry::Token;
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use parking_lot::Mutex;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Submission queue size; a full queue is submitted and pushed to again, so this only
/// bounds how much one `io_uring_enter` carries.
const RING_ENTRIES: u32 = 1024;

/// Completion queue size: room for a poll completion of every fd of a server with thousands
/// of clients in one turn, so the kernel rarely has to hold completions back.
const COMPLETION_ENTRIES: u32 = 16 * 1024;

/// What a request is, in the top byte of its user data (a token fits in the low 56 bits).
const KIND_SHIFT: u32 = 56;
const TOKEN_MASK: u64 = (1 << KIND_SHIFT) - 1;
const READ_POLL: u64 = 0;
const WRITE_POLL: u64 = 1;
const RECEIVE: u64 = 2;
const ACCEPT: u64 = 3;
/// Out of descriptors, an accept fails at once, before it even looks for a connection, so it
/// is re-armed as this readability poll, lest the loop spin (the loop sheds one connection
/// per failure); when it reports, the loop re-arms the accept.
const ACCEPT_POLL: u64 = 5;
/// Removals and cancels, whose completions carry nothing the loop needs.
const IGNORED: u64 = 4;
const SEND: u64 = 6;
const REMOVAL: u64 = IGNORED << KIND_SHIFT;

fn user_data(token: Token, kind: u64) -> u64 {
    token.to_u64() | (kind << KIND_SHIFT)
}

const READ_EVENTS: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;
const WRITE_EVENTS: u32 = libc::POLLOUT as u32;

pub(crate) struct Uring {
    /// Declared first, so dropped first: the kernel is done with the buffers before they go.
    ring: IoUring,
    /// Held while pushing to the submission queue (the ring allows one producer at a time).
    submissions: Mutex<()>,
    waker: EventFd,
    /// An epoll instance used only to ask the kernel whether an fd can be watched, so that
    /// both backends accept and refuse the same fds (see `check_watchable`).
    probe: OwnedFd,
    /// The receive buffers, where the kernel performs receives.
    buffers: Option<BufferRing>,
    /// Whether the kernel performs accepts (multishot accept).
    accepts: bool,
    /// Whether the kernel performs writes (`IORING_OP_SENDMSG`).
    sends: bool,
    /// Listeners whose accept ended out of descriptors: re-armed as a readability poll.
    short_of_fds: Mutex<Vec<Token>>,
}

/// Which operations `ST_PROACTOR_URING_DISABLE` leaves to the loop.
#[derive(Debug, Default, PartialEq, Eq)]
struct Disabled {
    receive: bool,
    accept: bool,
    send: bool,
}

fn disabled_operations() -> Disabled {
    parse_disabled(&std::env::var(URING_DISABLE_ENV_VAR).unwrap_or_default())
}

/// See `disabled_operations`; unknown names are ignored.
fn parse_disabled(value: &str) -> Disabled {
    let mut disabled = Disabled::default();
    for name in value.split(',').map(str::trim) {
        match name {
            "receive" => disabled.receive = true,
            "accept" => disabled.accept = true,
            "send" => disabled.send = true,
            "all" => {
                disabled = Disabled {
                    receive: true,
                    accept: true,
                    send: true,
                }
            }
            _ => {}
        }
    }
    disabled
}

/// Whether the running kernel is at least `major.minor` (multishot receive and accept have
/// no probe bit of their own: their opcodes are older than the multishot flag).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: utsname is plain data; uname fills it.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a live utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return false;
    }
    let release: String = name
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse::<u32>().ok());
    let found = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    found >= (major, minor)
}

/// Builds the ring: with `COOP_TASKRUN` where the kernel has it (5.19; completions are then
/// run when the loop enters the kernel, not by interrupting it), plain elsewhere.
fn build_ring() -> io::Result<IoUring> {
    let cooperative = IoUring::builder()
        .setup_cqsize(COMPLETION_ENTRIES)
        .setup_coop_taskrun()
        .build(RING_ENTRIES);
    match cooperative {
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .setup_cqsize(COMPLETION_ENTRIES)
            .build(RING_ENTRIES),
        built => built,
    }
}

impl Uring {
    /// Opens a ring and arms the wake-up. Fails with the kernel's error where io_uring is not
    /// allowed (`ENOSYS`, `EPERM` in many containers), so that `auto` can fall back to epoll,
    /// and with `ENOSYS` on kernels before 5.11, whose `io_uring_enter` cannot wait with a
    /// timeout (the loop's stall timers need it).
    pub(crate) fn new() -> io::Result<Uring> {
        let ring = build_ring()?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let mut probe = Probe::new();
        let probed = ring.submitter().register_probe(&mut probe).is_ok();
        let disabled = disabled_operations();
        let receive_supported = probed
            && probe.is_supported(opcode::Recv::CODE)
            && probe.is_supported(opcode::AsyncCancel::CODE)
            && kernel_at_least(6, 0);
        let buffers = if receive_supported && !disabled.receive {
            BufferRing::register(&ring).ok()
        } else {
            None
        };
        let accepts = probed
            && !disabled.accept
            && probe.is_supported(opcode::AcceptMulti::CODE)
            && probe.is_supported(opcode::AsyncCancel::CODE)
            && kernel_at_least(5, 19);
        // 6.0 also brings the synchronous cancel that `drop` needs to know the kernel is
        // done with the batches before they are freed.
        let sends = probed
            && !disabled.send
            && probe.is_supported(opcode::SendMsg::CODE)
            && kernel_at_least(6, 0);
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let probe_fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let backend = Uring {
            ring,
            submissions: Mutex::new(()),
            waker: EventFd::new()?,
            // SAFETY: `probe` was just returned by epoll_create1 and is owned by nobody else.
            probe: unsafe { OwnedFd::from_raw_fd(probe_fd) },
            buffers,
            accepts,
            sends,
            short_of_fds: Mutex::new(Vec::new()),
        };
        backend.arm_waker();
        // Where seccomp forbids io_uring_enter (but not io_uring_setup), this fails, and
        // `auto` falls back to epoll.
        backend.ring.submitter().submit()?;
        Ok(backend)
    }

    fn arm_waker(&self) {
        let request = opcode::PollAdd::new(types::Fd(self.waker.as_raw_fd()), READ_EVENTS)
            .build()
            .user_data(Token::WAKE.to_u64());
        self.push(&request);
    }

    /// Puts `request` in the submission queue (submitting first if the queue is full). It
    /// reaches the kernel with the next submit: `submit_now`, or the loop's next wait.
    fn push(&self, request: &squeue::Entry) {
        let _guard = self.submissions.lock();
        loop {
            // SAFETY: the `submissions` lock makes this the only submission queue in use.
            let mut queue = unsafe { self.ring.submission_shared() };
            // SAFETY: poll requests carry no pointers, so no buffer must outlive them.
            if unsafe { queue.push(request) }.is_ok() {
                queue.sync();
                return;
            }
            drop(queue);
            // A full queue: hand it to the kernel to make room. On failure (EBUSY: too many
            // completions waiting) the loop's next wait submits it instead.
            if self.ring.submitter().submit().is_err() {
                std::thread::yield_now();
            }
        }
    }

    /// Pushes `request` and submits it at once, so that it is in effect when this returns.
    fn push_and_submit(&self, request: &squeue::Entry) -> io::Result<()> {
        self.push(request);
        self.ring.submitter().submit()?;
        Ok(())
    }

    /// The request that watches or performs `operation` for `fd`.
    fn request(fd: RawFd, token: Token, operation: Operation) -> squeue::Entry {
        match operation {
            Operation::Ready => opcode::PollAdd::new(types::Fd(fd), READ_EVENTS)
                .build()
                .user_data(user_data(token, READ_POLL)),
            // One-shot, re-armed by the loop after each completion while reading is active:
            // a multishot receive reads ahead into the shared buffers (measured: megabytes
            // per pause under a flood), bytes TCP should have kept in the socket to slow the
            // sender down. The re-arm costs a queue entry, no system call.
            Operation::Receive => opcode::Recv::new(
                types::Fd(fd),
                std::ptr::null_mut(),
                buffers::BUFFER_SIZE as u32,
            )
            .buf_group(buffers::GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data(token, RECEIVE)),
            Operation::Accept => opcode::AcceptMulti::new(types::Fd(fd))
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build()
                .user_data(user_data(token, ACCEPT)),
        }
    }

    /// The request that ends the read request of `operation` (it is pushed, not submitted).
    fn cancel(token: Token, operation: Operation) -> squeue::Entry {
        match operation {
            Operation::Ready => opcode::PollRemove::new(user_data(token, READ_POLL)),
            Operation::Receive => {
                return opcode::AsyncCancel::new(user_data(token, RECEIVE))
                    .build()
                    .user_data(REMOVAL)
            }
            Operation::Accept => {
                return opcode::AsyncCancel::new(user_data(token, ACCEPT))
                    .build()
                    .user_data(REMOVAL)
            }
        }
        .build()
        .user_data(REMOVAL)
    }

    /// Cancels the read request of `operation` (for an accept, also the poll that may stand
    /// in for it).
    fn push_cancel(&self, token: Token, operation: Operation) {
        self.push(&Self::cancel(token, operation));
        if operation == Operation::Accept {
            let poll = opcode::PollRemove::new(user_data(token, ACCEPT_POLL))
                .build()
                .user_data(REMOVAL);
            self.push(&poll);
        }
    }
}

impl Uring {
    /// Refuses the fds epoll refuses, with its errno: EBADF (not open), EPERM (a regular
    /// file, a directory, a device without poll support). A poll request would accept them
    /// and report them ready forever.
    fn check_watchable(&self, fd: RawFd) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        let probe = self.probe.as_raw_fd();
        // SAFETY: `event` is a live epoll_event; EPOLL_CTL_DEL ignores its event pointer.
        unsafe {
            check(libc::epoll_ctl(probe, libc::EPOLL_CTL_ADD, fd, &mut event))?;
            libc::epoll_ctl(probe, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
        }
        Ok(())
    }
}

impl Backend for Uring {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn performs(&self, operation: Operation) -> bool {
        match operation {
            Operation::Ready => false,
            Operation::Receive => self.buffers.is_some(),
            Operation::Accept => self.accepts,
        }
    }

    fn watch(&self, fd: RawFd, token: Token, operation: Operation) -> io::Result<()> {
        if operation == Operation::Ready {
            // Receives and accepts were checked to be on sockets, which can be watched.
            self.check_watchable(fd)?;
        }
        // The loop thread submits it, so the request does not die with a short-lived caller.
        self.push(&Self::request(fd, token, operation));
        self.waker.wake();
        Ok(())
    }

    fn unwatch(&self, _fd: RawFd, token: Token, operation: Operation) -> io::Result<()> {
        // Not-found removals (the request had ended) end with -ENOENT, which is ignored.
        self.push_cancel(token, operation);
        if operation == Operation::Accept {
            self.short_of_fds.lock().retain(|&waiting| waiting != token);
        }
        // A write in flight holds the socket open (the peer would see no end) until the
        // reader reads: it is cancelled; its batch lives until the completion.
        let write = opcode::AsyncCancel::new(user_data(token, SEND))
            .build()
            .user_data(REMOVAL);
        self.push(&write);
        let write_watch = opcode::PollRemove::new(user_data(token, WRITE_POLL))
            .build()
            .user_data(REMOVAL);
        self.push_and_submit(&write_watch)
    }

    fn rearm(&self, fd: RawFd, token: Token, operation: Operation) {
        if operation == Operation::Accept {
            let mut short = self.short_of_fds.lock();
            if let Some(index) = short.iter().position(|&waiting| waiting == token) {
                short.swap_remove(index);
                drop(short);
                // Out of descriptors an accept fails at once: wait for a connection first.
                let poll = opcode::PollAdd::new(types::Fd(fd), READ_EVENTS)
                    .build()
                    .user_data(user_data(token, ACCEPT_POLL));
                self.push(&poll);
                return;
            }
        }
        self.push(&Self::request(fd, token, operation));
    }

    fn quiet_reading(
        &self,
        _fd: RawFd,
        token: Token,
        operation: Operation,
        _writing: bool,
    ) -> io::Result<()> {
        // The poll that reported the input was one-shot; it is simply not re-armed. A
        // multishot request is cancelled (with the loop's next wait); what it brings until
        // then is held.
        if operation != Operation::Ready {
            self.push_cancel(token, operation);
        }
        Ok(())
    }

    fn resume_reading(&self, fd: RawFd, token: Token, _writing: bool) -> io::Result<()> {
        // As for a new watch, the loop thread submits it (the caller wakes it if need be).
        self.rearm(fd, token, Operation::Ready);
        Ok(())
    }

    fn watch_writable(&self, fd: RawFd, token: Token, on: bool, _reading: bool) -> io::Result<()> {
        let user_data = user_data(token, WRITE_POLL);
        if !on {
            let removal = opcode::PollRemove::new(user_data)
                .build()
                .user_data(REMOVAL);
            return self.push_and_submit(&removal);
        }
        let request = opcode::PollAdd::new(types::Fd(fd), WRITE_EVENTS)
            .build()
            .user_data(user_data);
        self.push(&request);
        Ok(())
    }

    fn writable_is_one_shot(&self) -> bool {
        true
    }

    fn wait(&self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let submitted = match timeout {
            None => self.ring.submitter().submit_and_wait(1),
            Some(timeout) => {
                let timespec = types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match submitted {
            Ok(_) => {}
            // A signal, the timeout, completions the kernel could not post yet, or a moment
            // without memory for the submission: read what is there, and try again next turn.
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EINTR | libc::ETIME | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(err) => return Err(err),
        }
        let mut rearm_waker = false;
        // SAFETY: only the loop thread, which is the only caller of `wait`, reads completions.
        for completion in unsafe { self.ring.completion_shared() } {
            let tagged = completion.user_data();
            if tagged == Token::WAKE.to_u64() {
                self.waker.drain();
                rearm_waker = true;
                continue;
            }
            let kind = tagged >> KIND_SHIFT;
            let token = Token::from_u64(tagged & TOKEN_MASK);
            let result = completion.result();
            let flags = completion.flags();
            let more = cqueue::more(flags);
            let event = match kind {
                READ_POLL if result == -libc::ECANCELED => Event::Lost { token },
                // The fd cannot be polled any more (closed before its removal): re-arming
                // would fail again at once, so the registration goes quiet.
                READ_POLL if result < 0 => continue,
                READ_POLL => Event::Ready {
                    token,
                    readable: true,
                    writable: false,
                },
                // A cancelled or failed write watch is reported as writable too: the flush
                // that follows finds out, and re-arms the watch if the socket is still full.
                WRITE_POLL => Event::Ready {
                    token,
                    readable: false,
                    writable: true,
                },
                // Cancelled (as for a poll), or out of buffers: the bytes wait in the socket,
                // and the request is re-armed once the buffers of this batch are back.
                RECEIVE | ACCEPT if !more && matches!(-result, libc::ECANCELED | libc::ENOBUFS) => {
                    Event::Lost { token }
                }
                ACCEPT if !more && matches!(-result, libc::EMFILE | libc::ENFILE) => {
                    // The loop re-arms it as a poll first (see ACCEPT_POLL and `rearm`).
                    self.short_of_fds.lock().push(token);
                    Event::Accepted {
                        token,
                        result,
                        more: false,
                    }
                }
                // Readable (or cancelled): the loop re-arms the accept itself, under its lock,
                // if the listener is still registered and reading.
                ACCEPT_POLL => Event::Lost { token },
                SEND => Event::Sent { token, result },
                RECEIVE => Event::Received {
                    token,
                    result,
                    buffer: cqueue::buffer_select(flags),
                    more,
                },
                ACCEPT => Event::Accepted {
                    token,
                    result,
                    more,
                },
                _ => continue, // removals and cancels
            };
            events.push(event);
        }
        if rearm_waker {
            self.arm_waker();
        }
        Ok(())
    }

    fn received(&self, buffer: u16, len: usize, f: &mut dyn FnMut(&[u8])) {
        let Some(buffers) = &self.buffers else {
            return;
        };
        // SAFETY: `buffer` was named by a completion and is recycled only below.
        f(unsafe { buffers.bytes(buffer, len) });
        buffers.recycle(buffer);
    }

    fn sends(&self) -> bool {
        self.sends
    }

    unsafe fn send(&self, fd: RawFd, token: Token, header: *const libc::msghdr) {
        let request = opcode::SendMsg::new(types::Fd(fd), header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data(token, SEND));
        self.push(&request);
    }

    fn wake(&self) {
        self.waker.wake();
    }
}

impl Drop for Uring {
    /// Cancels every request and waits until the kernel is done with them, before the ring
    /// (then the receive buffers, then the proactor's send batches) go: a request submitted by
    /// a thread that still lives could otherwise go on using that memory.
    fn drop(&mut self) {
        let _ = self
            .ring
            .submitter()
            .register_sync_cancel(None, types::CancelBuilder::any());
        // Connections accepted for nobody: the loop is gone, so they are closed.
        // SAFETY: the loop thread has ended; nothing else reads the completion queue.
        for completion in unsafe { self.ring.completion_shared() } {
            let accepted = completion.user_data() >> KIND_SHIFT == ACCEPT;
            if accepted && completion.result() >= 0 {
                // SAFETY: the kernel made this fd for the library, and nobody has it.
                unsafe { libc::close(completion.result()) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disable_variable_names_operations_or_all() {
        let only = |receive, accept, send| Disabled {
            receive,
            accept,
            send,
        };
        assert_eq!(parse_disabled(""), only(false, false, false));
        assert_eq!(parse_disabled("receive"), only(true, false, false));
        assert_eq!(parse_disabled("accept, send"), only(false, true, true));
        assert_eq!(parse_disabled("all"), only(true, true, true));
        assert_eq!(parse_disabled("bogus"), only(false, false, false));
    }

    #[test]
    fn a_recent_kernel_performs_receive_accept_and_send_unless_told_not_to() {
        let Ok(backend) = Uring::new() else {
            return; // io_uring is not allowed here: auto uses epoll
        };
        let disabled = disabled_operations();
        assert!(!backend.performs(Operation::Ready));
        if kernel_at_least(6, 0) {
            assert_eq!(backend.performs(Operation::Receive), !disabled.receive);
            assert_eq!(backend.performs(Operation::Accept), !disabled.accept);
            assert_eq!(backend.sends(), !disabled.send);
        }
    }

    #[test]
    fn tokens_leave_the_top_byte_to_the_request_kind() {
        let token = Token::from_u64(0x00ff_ffff_7fff_ffff);
        let tagged = user_data(token, ACCEPT_POLL);
        assert_eq!(tagged >> KIND_SHIFT, ACCEPT_POLL);
        assert_eq!(Token::from_u64(tagged & TOKEN_MASK), token);
        assert_ne!(tagged, Token::WAKE.to_u64());
    }
}
