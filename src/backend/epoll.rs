//! The epoll backend: level-triggered readiness, the portable fallback.
//!
//! `watch` and `unwatch` are plain `epoll_ctl` calls, which the kernel allows from any thread
//! while the loop sleeps in `epoll_wait`, so cross-thread registration needs no wake-up here.

use super::eventfd::EventFd;
use super::{Backend, Event};
use crate::sys::check;
use crate::token::Operation;
use crate::token::Token;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// How many ready fds one `epoll_wait` may return; more wait for the next turn.
const EVENTS_PER_WAIT: usize = 256;

/// Readable, hung up (EPOLLHUP and EPOLLERR are always reported), or peer closed its side.
const INTEREST: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

/// Writability, watched while queued output waits for room.
const OUTPUT: u32 = libc::EPOLLOUT as u32;

/// The events that make a handler due.
const HANDLER_DUE: u32 =
    (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

pub(crate) struct Epoll {
    epoll: OwnedFd,
    waker: EventFd,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let raw = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` was just returned by epoll_create1 and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        let backend = Epoll {
            epoll,
            waker: EventFd::new()?,
        };
        backend.control(
            libc::EPOLL_CTL_ADD,
            backend.waker.as_raw_fd(),
            Token::WAKE,
            libc::EPOLLIN as u32,
        )?;
        Ok(backend)
    }

    /// Takes `fd` out of the interest set.
    fn forget(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer, so NULL is allowed.
        check(unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        })?;
        Ok(())
    }

    fn control(&self, op: libc::c_int, fd: RawFd, token: Token, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events,
            u64: token.to_u64(),
        };
        // SAFETY: `event` is a live epoll_event for the duration of the call.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) })?;
        Ok(())
    }
}

impl Backend for Epoll {
    fn name(&self) -> &'static str {
        "epoll"
    }

    fn performs(&self, _operation: Operation) -> bool {
        false // the loop receives and accepts on readiness
    }

    fn watch(&self, fd: RawFd, token: Token, _operation: Operation) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, token, INTEREST)
    }

    fn rearm(&self, _fd: RawFd, _token: Token, _operation: Operation) {
        // Level-triggered: epoll reports the fd again by itself.
    }

    fn writable_is_one_shot(&self) -> bool {
        false
    }

    // An fd is in the interest set while its input or its output is watched: a paused fd
    // with nothing to write is taken out, since epoll reports hang-ups and errors of every fd
    // in the set whatever its events say.
    fn watch_writable(&self, fd: RawFd, token: Token, on: bool, reading: bool) -> io::Result<()> {
        match (reading, on) {
            (true, true) => self.control(libc::EPOLL_CTL_MOD, fd, token, INTEREST | OUTPUT),
            (true, false) => self.control(libc::EPOLL_CTL_MOD, fd, token, INTEREST),
            (false, true) => self.control(libc::EPOLL_CTL_ADD, fd, token, OUTPUT),
            (false, false) => self.forget(fd),
        }
    }

    fn quiet_reading(
        &self,
        fd: RawFd,
        token: Token,
        _operation: Operation,
        writing: bool,
    ) -> io::Result<()> {
        if writing {
            self.control(libc::EPOLL_CTL_MOD, fd, token, OUTPUT)
        } else {
            self.forget(fd)
        }
    }

    fn resume_reading(&self, fd: RawFd, token: Token, writing: bool) -> io::Result<()> {
        if writing {
            self.control(libc::EPOLL_CTL_MOD, fd, token, INTEREST | OUTPUT)
        } else {
            self.control(libc::EPOLL_CTL_ADD, fd, token, INTEREST)
        }
    }

    fn unwatch(&self, fd: RawFd, _token: Token, _operation: Operation) -> io::Result<bool> {
        self.forget(fd)?;
        Ok(false) // the loop's own writes finish before a removal returns
    }

    fn wait(&self, ready: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let mut events = [MaybeUninit::<libc::epoll_event>::uninit(); EVENTS_PER_WAIT];
        let timeout_ms = timeout.map_or(-1, milliseconds_rounded_up);
        // SAFETY: the buffer holds EVENTS_PER_WAIT events and outlives the call; the kernel
        // writes the first `count` of them.
        let count = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr().cast(),
                EVENTS_PER_WAIT as libc::c_int,
                timeout_ms,
            )
        };
        if count < 0 {
            let err = io::Error::last_os_error();
            // A signal interrupted the wait: return so the loop can look at its stop flag.
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(err)
            };
        }
        for event in &events[..count as usize] {
            // SAFETY: epoll_wait initialised the first `count` entries.
            let event = unsafe { event.assume_init() };
            let token = Token::from_u64(event.u64);
            if token == Token::WAKE {
                self.waker.drain();
            } else {
                ready.push(Event::Ready {
                    token,
                    readable: event.events & HANDLER_DUE != 0,
                    writable: event.events & OUTPUT != 0,
                });
            }
        }
        Ok(())
    }

    fn received(&self, _buffer: u16, _len: usize, _f: &mut dyn FnMut(&[u8])) {
        // Never called: epoll performs no receive, so no completion names a buffer.
    }

    fn sends(&self) -> bool {
        false // the loop writes with sendmsg
    }

    unsafe fn send(&self, _fd: RawFd, _token: Token, _header: *const libc::msghdr) {
        // Never called: `sends` is false.
    }

    fn wake(&self) {
        self.waker.wake();
    }
}

/// `timeout` in whole milliseconds, rounded up (so the loop never wakes before a deadline and
/// spins), at most `c_int::MAX`.
fn milliseconds_rounded_up(timeout: Duration) -> libc::c_int {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
}
