//! Backends: the OS mechanism that tells the loop which registered fds are ready, and, where
//! it can, performs their operations (receive, accept) and reports the completions.
//!
//! A backend must:
//! - `performs(operation)`: say whether it performs `Receive` or `Accept` itself (io_uring's
//!   requests); where it does not, the loop performs them on readiness. Fixed for
//!   the backend's life.
//! - `watch(fd, token, operation)`: for `Ready` (and any operation it does not perform),
//!   report `token` whenever `fd` is readable, has hung up or is in error, level-triggered
//!   (again and again while the condition holds); for an operation it performs, start it and
//!   report its completions. Callable from any thread while the loop waits; the proactor
//!   serialises `watch` and `unwatch` calls.
//! - `unwatch(fd, token, operation)`: stop reporting `fd`; once it returns (and, from another
//!   thread, once `settled(ticket())`), no request naming `fd` reaches the kernel any more.
//!   Events already collected may still carry its old token; the registry's generation check
//!   makes those harmless.
//! - `rearm(fd, token, operation)`: called on the loop thread after each handler call of a
//!   registration that still exists (and for a report the loop did not dispatch because it
//!   was stopping), and after an operation's request ended while it should go on. A backend
//!   whose reports are one-shot re-arms here; epoll does nothing.
//! - `quiet_reading(fd, token, operation, writing)`: stop reporting input of a paused
//!   registration, called on the loop thread when it reported input while paused (pausing
//!   itself costs no system call). `writing` says whether its writability is watched, which
//!   stays on. A one-shot report ended its watch by itself; a request the backend performs is
//!   cancelled (pausing does that at once for those).
//! - `resume_reading(fd, token, writing)`: report input of a resumed readiness registration
//!   again, from any thread, after `quiet_reading` had stopped it; the caller wakes the loop
//!   when it is another thread (a one-shot backend's new request is submitted by the loop).
//!   Operations the backend performs are re-armed by the loop instead (`rearm`), after it
//!   has delivered what came while they were paused.
//! - `watch_writable(fd, token, on, reading)`: also report (`on`) or stop reporting when `fd`
//!   is writable. Used only while queued output waits for room in a full socket buffer.
//!   `reading` says whether input is watched too (not after `quiet_reading`). When
//!   `writable_is_one_shot` is true, a writable report ends that watch by itself.
//! - `wait(events, timeout)`: block the loop thread until at least one watched fd is ready
//!   or an operation completed, `wake` was called, or `timeout` (if any) has passed, then
//!   append one [`Event`] per report (possibly none, after a wake, a timeout or a signal).
//!   Called only from the loop thread.
//! - `received(buffer, len, f)`: call `f` with the bytes of a receive completion's buffer,
//!   then give the buffer back to the kernel. Loop thread only.
//! - `sends()`: whether it performs writes (`send`) itself; elsewhere the loop writes with
//!   `sendmsg` and watches writability while a socket is full.
//! - `send(fd, token, header)`: start a gathered write of `header` to `fd` (loop thread, no
//!   system call: it reaches the kernel with the next wait), reported as `Event::Sent`.
//! - `wake()`: make a blocked or the next `wait` return. Async-signal-safe: no lock, no
//!   allocation, one `write` at most.
//! - `start_run()`, first thing on the loop thread, `end_run(events)` (the last reports of a
//!   run: what completed while its requests were cancelled) and `close_run()` last: the life
//!   of one run. io_uring makes a ring per run, so that the loop thread is its only issuer;
//!   epoll keeps its instance.
//! - `ticket()` / `settled(ticket)`: after an `unwatch` from another thread, which must not
//!   return while a request naming the fd could still reach the kernel (the fd may be
//!   closed and its number reused then): the ticket of requests the loop has taken but not
//!   yet submitted (0: none), and whether they are in the kernel now (or no loop runs). The
//!   loop reports `Event::Submitted` when a waiting caller's requests are.
//! - close its own fds (and only those) when dropped.
//!
//! The backend is chosen when a proactor is created: `ST_PROACTOR_BACKEND=epoll|uring|auto`
//! (unset means `auto`). `ST_PROACTOR_URING_DISABLE` (a comma-separated list of `receive`,
//! `accept`, `send`, or `all`) makes the io_uring backend leave those operations to the loop, as on
//! a kernel that lacks them.

mod buffers;
mod commands;
mod epoll;
mod eventfd;
mod uring;

use crate::token::Operation;
use crate::token::Token;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// One report of `wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The fd is ready.
    Ready {
        token: Token,
        /// Readable, hung up or in error: the handler is due.
        readable: bool,
        /// Room in the socket buffer for queued output.
        writable: bool,
    },
    /// The backend's watch of the fd, or its operation's request, ended without news (io_uring
    /// cancels the requests of a thread that exits; a receive ends when the buffers ran out):
    /// the loop re-arms it if the registration still exists.
    Lost { token: Token },
    /// A receive the backend performed: `result` bytes in `buffer` (0: the peer closed its
    /// side; negative: -errno). `more`: the request goes on.
    Received {
        token: Token,
        result: i32,
        buffer: Option<u16>,
        more: bool,
    },
    /// An accept the backend performed: the new fd, or -errno. `more`: the request goes on.
    Accepted {
        token: Token,
        result: i32,
        more: bool,
    },
    /// A write the backend performed (`send`): bytes written, or -errno.
    Sent { token: Token, result: i32 },
    /// Requests a caller waits for (see `settled`) reached the kernel: the loop wakes it.
    Submitted,
}

/// The interface the loop uses; see the module docs for what each method must do.
pub(crate) trait Backend: Send + Sync {
    /// Short name reported to users: `"epoll"` or `"io_uring"`.
    fn name(&self) -> &'static str;
    fn performs(&self, operation: Operation) -> bool;
    /// First thing on the loop thread. Default: nothing to do.
    fn start_run(&self) -> io::Result<()> {
        Ok(())
    }
    /// Last wait of a run, on the loop thread. Default: nothing to do.
    fn end_run(&self, _events: &mut Vec<Event>) {}
    /// After the last events of a run were handled, on the loop thread. Default: nothing.
    fn close_run(&self) {}
    /// After an `unwatch` from another thread: the ticket to wait for with `settled`.
    /// Default: nothing to wait for.
    fn ticket(&self) -> u64 {
        0
    }
    /// Whether `watch`, `unwatch` and the like only queue requests that the loop submits
    /// with its next wait (so the loop must be woken). Default: they act at once.
    fn queues_requests(&self) -> bool {
        false
    }
    /// After an `unwatch` on the loop thread: submits requests that an earlier enter left
    /// in the submission queue (loop thread). Default: nothing is left.
    fn submit_leftovers(&self) {}
    /// Whether every request up to `ticket` reached the kernel. Default: at once.
    fn settled(&self, _ticket: u64) -> bool {
        true
    }
    fn watch(&self, fd: RawFd, token: Token, operation: Operation) -> io::Result<()>;
    /// `Ok(true)`: a write of `token` that was started will never complete (it was dropped
    /// before it reached the kernel), so its batch may go.
    fn unwatch(&self, fd: RawFd, token: Token, operation: Operation) -> io::Result<bool>;
    fn rearm(&self, fd: RawFd, token: Token, operation: Operation);
    fn quiet_reading(
        &self,
        fd: RawFd,
        token: Token,
        operation: Operation,
        writing: bool,
    ) -> io::Result<()>;
    fn resume_reading(&self, fd: RawFd, token: Token, writing: bool) -> io::Result<()>;
    fn watch_writable(&self, fd: RawFd, token: Token, on: bool, reading: bool) -> io::Result<()>;
    fn writable_is_one_shot(&self) -> bool;
    fn wait(&self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()>;
    fn received(&self, buffer: u16, len: usize, f: &mut dyn FnMut(&[u8]));
    fn sends(&self) -> bool;
    /// # Safety
    /// `header` and everything it points to stay valid until the `Sent` event of `token`.
    unsafe fn send(&self, fd: RawFd, token: Token, header: *const libc::msghdr);
    fn wake(&self);
}

/// Name of the environment variable that makes the io_uring backend leave operations to the
/// loop (see the module docs).
pub(crate) const URING_DISABLE_ENV_VAR: &str = "ST_PROACTOR_URING_DISABLE";

/// Which backend a proactor should use.
///
/// ```
/// use st_proactor::{BackendKind, Proactor};
/// let proactor = Proactor::with_backend(BackendKind::Auto)?;
/// assert!(["epoll", "io_uring"].contains(&proactor.backend_name()));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// io_uring where the kernel allows it, else epoll.
    #[default]
    Auto,
    /// Readiness through epoll(7).
    Epoll,
    /// io_uring(7); fails to open where the kernel forbids it (`ENOSYS`, `EPERM`).
    Uring,
}

/// Name of the environment variable that picks the backend.
///
/// ```
/// assert_eq!(st_proactor::BACKEND_ENV_VAR, "ST_PROACTOR_BACKEND");
/// # Ok::<(), std::io::Error>(())
/// ```
pub const BACKEND_ENV_VAR: &str = "ST_PROACTOR_BACKEND";

impl BackendKind {
    /// Parses a backend name as `ST_PROACTOR_BACKEND` accepts it: `epoll`, `uring`
    /// (or `io_uring`), `auto` (or empty). Anything else is `None`.
    ///
    /// ```
    /// use st_proactor::BackendKind;
    /// assert_eq!(BackendKind::parse("io_uring"), Some(BackendKind::Uring));
    /// assert_eq!(BackendKind::parse("kqueue"), None);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn parse(name: &str) -> Option<BackendKind> {
        match name {
            "" | "auto" => Some(BackendKind::Auto),
            "epoll" => Some(BackendKind::Epoll),
            "uring" | "io_uring" => Some(BackendKind::Uring),
            _ => None,
        }
    }

    /// The choice made by `ST_PROACTOR_BACKEND` (`Auto` when unset).
    /// Fails with `EINVAL` when the variable holds an unknown name (the library writes
    /// nothing to stderr: the error is the report).
    ///
    /// ```
    /// let kind = st_proactor::BackendKind::from_env()?; // Auto when the variable is unset
    /// let _proactor = st_proactor::Proactor::with_backend(kind)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn from_env() -> io::Result<BackendKind> {
        let Some(value) = std::env::var_os(BACKEND_ENV_VAR) else {
            return Ok(BackendKind::Auto);
        };
        let value = value.to_string_lossy();
        BackendKind::parse(&value).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// Opens the backend `kind` asks for. `Auto` falls back to epoll, silently, where io_uring
/// cannot start (containers often forbid it).
pub(crate) fn open(kind: BackendKind) -> io::Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Epoll => Ok(Box::new(epoll::Epoll::new()?)),
        BackendKind::Uring => Ok(Box::new(uring::Uring::new()?)),
        BackendKind::Auto => match uring::Uring::new() {
            Ok(backend) => Ok(Box::new(backend)),
            Err(_) => Ok(Box::new(epoll::Epoll::new()?)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_the_documented_names_only() {
        assert_eq!(BackendKind::parse("epoll"), Some(BackendKind::Epoll));
        assert_eq!(BackendKind::parse("uring"), Some(BackendKind::Uring));
        assert_eq!(BackendKind::parse("io_uring"), Some(BackendKind::Uring));
        assert_eq!(BackendKind::parse("auto"), Some(BackendKind::Auto));
        assert_eq!(BackendKind::parse(""), Some(BackendKind::Auto));
        assert_eq!(BackendKind::parse("kqueue"), None);
        assert_eq!(BackendKind::parse("EPOLL"), None);
    }

    #[test]
    fn auto_opens_io_uring_where_the_kernel_allows_it_and_epoll_elsewhere() {
        let expected = match open(BackendKind::Uring) {
            Ok(_) => "io_uring",
            Err(_) => "epoll",
        };
        assert_eq!(open(BackendKind::Auto).unwrap().name(), expected);
        assert_eq!(open(BackendKind::Epoll).unwrap().name(), "epoll");
    }
}
