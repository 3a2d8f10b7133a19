//! The io_uring backend: readiness through one-shot `IORING_OP_POLL_ADD` requests.
//!
//! A one-shot poll completes at once when its fd is ready at arming time, so re-arming it
//! after each handler call gives the level-triggered behaviour the contract promises (a
//! multishot poll only reports new wake-ups). Re-arming happens on the loop thread and is
//! submitted with the loop's next wait, so a busy turn costs one `io_uring_enter` in all.
//!
//! Any thread may add requests: pushes to the submission queue are serialised by a mutex.
//! New watches are left for the loop thread to submit with its next wait (the caller wakes
//! it), because the kernel cancels a thread's requests when that thread exits; removals are
//! submitted at once by the caller. Only the loop thread reads the completion queue. A poll
//! cancelled anyway (its loop thread ended with a cancel, or a full queue was submitted by a
//! thread that has ended since) comes back as `-ECANCELED`, and the loop re-arms it from its
//! own thread while the registration exists.

use super::eventfd::EventFd;
use super::{check, Backend, Event};
use crate::registry::Token;
use io_uring::{opcode, squeue, types, IoUring};
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

/// Set in the user data of a request that watches writability. Fds are below 2^31, so
/// bit 31 of a token (the top bit of its fd half) is free.
const WRITE_FLAG: u64 = 1 << 31;

/// User data of poll-removal requests, whose completions carry nothing the loop needs.
const REMOVAL: u64 = u64::MAX - 1;

const READ_EVENTS: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;
const WRITE_EVENTS: u32 = libc::POLLOUT as u32;

pub(crate) struct Uring {
    ring: IoUring,
    /// Held while pushing to the submission queue (the ring allows one producer at a time).
    submissions: Mutex<()>,
    waker: EventFd,
    /// An epoll instance used only to ask the kernel whether an fd can be watched, so that
    /// both backends accept and refuse the same fds (see `check_watchable`).
    probe: OwnedFd,
}

impl Uring {
    /// Opens a ring and arms the wake-up. Fails with the kernel's error where io_uring is not
    /// allowed (`ENOSYS`, `EPERM` in many containers), so that `auto` can fall back to epoll,
    /// and with `ENOSYS` on kernels before 5.11, whose `io_uring_enter` cannot wait with a
    /// timeout (the loop's stall timers need it).
    pub(crate) fn new() -> io::Result<Uring> {
        let ring = IoUring::builder()
            .setup_cqsize(COMPLETION_ENTRIES)
            .build(RING_ENTRIES)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let probe = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let backend = Uring {
            ring,
            submissions: Mutex::new(()),
            waker: EventFd::new()?,
            // SAFETY: `probe` was just returned by epoll_create1 and is owned by nobody else.
            probe: unsafe { OwnedFd::from_raw_fd(probe) },
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

    fn remove(&self, user_data: u64) -> io::Result<()> {
        let request = opcode::PollRemove::new(user_data)
            .build()
            .user_data(REMOVAL);
        self.push_and_submit(&request)
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

    fn watch(&self, fd: RawFd, token: Token) -> io::Result<()> {
        self.check_watchable(fd)?;
        let request = opcode::PollAdd::new(types::Fd(fd), READ_EVENTS)
            .build()
            .user_data(token.to_u64());
        // The loop thread submits it, so the request does not die with a short-lived caller.
        self.push(&request);
        self.waker.wake();
        Ok(())
    }

    fn unwatch(&self, _fd: RawFd, token: Token) -> io::Result<()> {
        // Not-found removals (the poll had completed) end with -ENOENT, which is ignored.
        self.remove(token.to_u64())?;
        self.remove(token.to_u64() | WRITE_FLAG)
    }

    fn rearm(&self, fd: RawFd, token: Token) {
        let request = opcode::PollAdd::new(types::Fd(fd), READ_EVENTS)
            .build()
            .user_data(token.to_u64());
        self.push(&request);
    }

    fn quiet_reading(&self, _fd: RawFd, _token: Token, _writing: bool) -> io::Result<()> {
        // The poll that reported the input was one-shot; it is simply not re-armed.
        Ok(())
    }

    fn resume_reading(&self, fd: RawFd, token: Token, _writing: bool) -> io::Result<()> {
        // As for a new watch, the loop thread submits it (the caller wakes it if need be).
        self.rearm(fd, token);
        Ok(())
    }

    fn watch_writable(&self, fd: RawFd, token: Token, on: bool, _reading: bool) -> io::Result<()> {
        let user_data = token.to_u64() | WRITE_FLAG;
        if !on {
            return self.remove(user_data);
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
            let user_data = completion.user_data();
            if user_data == REMOVAL {
                continue;
            }
            if user_data == Token::WAKE.to_u64() {
                self.waker.drain();
                rearm_waker = true;
                continue;
            }
            let token = Token::from_u64(user_data & !WRITE_FLAG);
            let writable = user_data & WRITE_FLAG != 0;
            let result = completion.result();
            if result == -libc::ECANCELED && !writable {
                // Cancelled by a removal (the registration is gone, and the loop will see
                // that), or because the thread that submitted the poll exited: the kernel
                // ties requests to their thread. The loop re-arms it from its own thread.
                events.push(Event {
                    token,
                    readable: false,
                    writable: false,
                    lost: true,
                });
                continue;
            }
            if result < 0 && !writable {
                // The fd cannot be polled any more (closed before its removal): re-arming
                // would fail again at once, so the registration goes quiet.
                continue;
            }
            // A cancelled or failed write watch is reported as writable too: the flush that
            // follows finds out, and re-arms the watch if the socket is still full.
            events.push(Event {
                token,
                readable: !writable,
                writable,
                lost: false,
            });
        }
        if rearm_waker {
            self.arm_waker();
        }
        Ok(())
    }

    fn wake(&self) {
        self.waker.wake();
    }
}
