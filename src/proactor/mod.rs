//! The proactor: the public [`Proactor`] API (this file), and in its submodules the thread
//! lifecycle (`lifecycle`), the loop turn and the flush of output (`turn`), handler dispatch,
//! completions and held input (`delivery`), and the calls that start accept and receive
//! (`start_operations`).
//!
//! The loop thread waits on the backend, then calls the handler of each ready registration,
//! one at a time, with no lock held. Other threads change registrations under the registry
//! mutex and wake the loop through the backend's wake-up; nothing polls with a timeout.
//!
//! Lock order (a thread holding one may take those after it, never those before): the
//! lifecycle mutex, the registry mutex, the io_uring backend's run (ring) mutex, its command
//! queue's mutex. The flow-handler slot's mutex is never held with another. No lock is held
//! while a handler of the program runs.

use crate::backend::{self, Backend, BackendKind};
use crate::flow::{FlowEvent, FlowHandlerSlot};
use crate::operations::Handler;
use crate::registry::{Registry, Resumed};
use crate::token::Operation;

mod delivery;
mod lifecycle;
mod start_operations;
#[cfg(test)]
mod tests;
mod turn;
use parking_lot::{Condvar, Mutex};
use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

/// An event loop on a thread of its own, calling a handler for each ready fd.
///
/// Every method takes `&self` and may be called from any thread, including from inside a
/// handler. Dropping the proactor cancels its loop (see [`Proactor::cancel`]) and forgets
/// every registration; it never closes a registered fd.
///
/// ```
/// use st_proactor::Proactor;
/// use std::os::fd::AsRawFd;
/// use std::io::{Read, Write};
/// use std::sync::mpsc;
///
/// let (mut reader, mut writer) = std::os::unix::net::UnixStream::pair()?;
/// let (tx, rx) = mpsc::channel();
/// let proactor = Proactor::new()?;
/// proactor.add(reader.as_raw_fd(), move |_fd| {
///     let mut buf = [0u8; 64];
///     let n = reader.read(&mut buf).unwrap_or(0);
///     let _ = tx.send(buf[..n].to_vec());
/// })?;
/// proactor.run()?;
/// writer.write_all(b"hello")?;
/// assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), b"hello");
/// proactor.cancel()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Proactor {
    shared: Arc<Shared>,
}

/// What the loop thread and the callers share.
struct Shared {
    /// Distinguishes this proactor's loop thread from all others (see `CURRENT_LOOP`).
    id: u64,
    backend: Box<dyn Backend>,
    registry: Mutex<Registry>,
    /// Signalled when a handler returns while a removal waits for it.
    handler_returned: Condvar,
    lifecycle: Mutex<Lifecycle>,
    /// Signalled when a join of the loop thread has finished.
    lifecycle_changed: Condvar,
    /// Set by cancel (and by the async-signal-safe request); the loop checks it after every
    /// wait and after every handler.
    stop_requested: AtomicBool,
    /// Set when the loop thread ended by a failure of its own (a panic outside the handlers,
    /// or a wait the backend could not make): the lifecycle calls report `EIO` from then on.
    loop_failed: AtomicBool,
    /// `FORK_GENERATION` when this proactor was made.
    fork_generation: u64,
    /// The send limit (kept in the registry's policy too, where queues are checked), read
    /// without the lock so that a message that can never fit is refused before it is copied.
    send_limit: AtomicUsize,
    /// The program's flow handler (see `Proactor::set_flow_handler`).
    flow_handler: Mutex<FlowHandlerSlot>,
}

enum Lifecycle {
    /// No loop thread.
    Stopped,
    /// A loop thread exists (it may be stopping, or have stopped, without being joined yet).
    Running(JoinHandle<()>),
    /// Some caller is joining the loop thread; others wait for `lifecycle_changed`.
    Joining,
}

static NEXT_PROACTOR_ID: AtomicU64 = AtomicU64::new(1);

/// How many `fork()`s separate this process from the first one that made a proactor: bumped
/// in the child by a `pthread_atfork` handler. A proactor made at another count belongs to
/// an ancestor process: its loop thread does not exist here, and its epoll set or ring is
/// shared with that process, so this process must not touch them.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static WATCH_FORKS: Once = Once::new();

extern "C" fn count_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// The longest stall timeout kept as given (about 30 years); longer ones are cut to it, so
/// that no deadline overflows an `Instant`.
const LONGEST_STALL_TIMEOUT: Duration = Duration::from_secs(1 << 30);

thread_local! {
    /// The id of the proactor whose loop runs on this thread, or 0.
    static CURRENT_LOOP: Cell<u64> = const { Cell::new(0) };
}

fn error(code: libc::c_int) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl Proactor {
    /// Creates a proactor with the backend `ST_PROACTOR_BACKEND` asks for (default `auto`).
    ///
    /// Errors: `EINVAL` for an unknown backend name; the kernel's error (`ENOSYS`, `EPERM`)
    /// for an explicit `uring` where the kernel forbids io_uring; the kernel's error
    /// (`EMFILE`, `ENOMEM`…) when the loop's own fds cannot be made.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// assert!(proactor.is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new() -> io::Result<Proactor> {
        Proactor::with_backend(BackendKind::from_env()?)
    }

    /// Creates a proactor with the given backend, ignoring `ST_PROACTOR_BACKEND`.
    /// Errors as for [`Proactor::new`].
    ///
    /// ```
    /// use st_proactor::{BackendKind, Proactor};
    /// let proactor = Proactor::with_backend(BackendKind::Epoll)?;
    /// assert_eq!(proactor.backend_name(), "epoll");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_backend(kind: BackendKind) -> io::Result<Proactor> {
        WATCH_FORKS.call_once(|| {
            // SAFETY: registers a child handler that only bumps an atomic (async-signal-safe,
            // as a handler run in the child of a multithreaded fork must be). A failure
            // (ENOMEM) leaves forks unseen, as they were before.
            unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
        });
        let backend = backend::open(kind)?;
        Ok(Proactor {
            shared: Arc::new(Shared {
                id: NEXT_PROACTOR_ID.fetch_add(1, Ordering::Relaxed),
                backend,
                registry: Mutex::new(Registry::default()),
                handler_returned: Condvar::new(),
                lifecycle: Mutex::new(Lifecycle::Stopped),
                lifecycle_changed: Condvar::new(),
                stop_requested: AtomicBool::new(false),
                loop_failed: AtomicBool::new(false),
                fork_generation: FORK_GENERATION.load(Ordering::SeqCst),
                send_limit: AtomicUsize::new(crate::sendq::DEFAULT_SEND_LIMIT),
                flow_handler: Mutex::new(FlowHandlerSlot::default()),
            }),
        })
    }

    /// Whether this proactor was made by another process than this one: an ancestor of this
    /// process, which then called `fork()`. Such a proactor is the parent's: its loop thread
    /// does not exist here and its epoll set or ring is shared with the parent. In the child,
    /// `run`, `cancel`, `wait`, `add`, `remove`, `pause_reading` and `resume_reading` fail with
    /// `ECHILD`, and dropping it frees nothing (its memory stays until the child exits or
    /// execs; the library's fds are close-on-exec) and touches nothing of the parent's. A
    /// child makes its own proactor if it needs one.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// assert!(!proactor.is_inherited());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_inherited(&self) -> bool {
        FORK_GENERATION.load(Ordering::SeqCst) != self.shared.fork_generation
    }

    /// `ECHILD` for a proactor of an ancestor process (see [`Proactor::is_inherited`]).
    fn check_same_process(&self) -> io::Result<()> {
        if self.is_inherited() {
            return Err(error(libc::ECHILD));
        }
        Ok(())
    }

    /// The backend in use: `"epoll"` or `"io_uring"`.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// assert!(["epoll", "io_uring"].contains(&proactor.backend_name()));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn backend_name(&self) -> &'static str {
        self.shared.backend.name()
    }

    /// Number of registered fds.
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// let (socket, _peer) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.add(socket.as_raw_fd(), |_fd| {})?;
    /// assert_eq!(proactor.len(), 1);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.shared.registry.lock().len()
    }

    /// Whether no fd is registered.
    ///
    /// ```
    /// assert!(st_proactor::Proactor::new()?.is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `handler(fd)` on the loop thread whenever `fd` is readable, has hung up or is
    /// in error, level-triggered: again on every loop turn while the condition holds.
    ///
    /// Errors: `EINVAL` for a negative fd, `EEXIST` when `fd` is registered already, and the
    /// kernel's error for an fd that cannot be watched (`EBADF` not open, `EPERM` a regular
    /// file, `ENOMEM`, `ENOSPC`).
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// let (reader, _writer) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.add(reader.as_raw_fd(), |fd| println!("fd {fd} is ready"))?;
    /// let again = proactor.add(reader.as_raw_fd(), |_fd| {}).unwrap_err();
    /// assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn add<F>(&self, fd: RawFd, handler: F) -> io::Result<()>
    where
        F: FnMut(RawFd) + Send + 'static,
    {
        self.add_handler(fd, Handler::Ready(Box::new(handler)))
    }

    /// Registers `handler` for `fd`; see [`Proactor::add`] for the errors.
    pub(crate) fn add_handler(&self, fd: RawFd, handler: Handler) -> io::Result<()> {
        self.check_same_process()?;
        if fd < 0 {
            return Err(error(libc::EINVAL));
        }
        // The registry grows to the fd number: a number that is not an open fd (say INT_MAX)
        // must be refused before it costs memory.
        // SAFETY: F_GETFD only reads the fd's flags; any int is a valid argument.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut registry = self.shared.registry.lock();
        // On EEXIST the early return unlocks before `handler` (a parameter, dropped after
        // the guard) is dropped: a refused closure's Drop may call back into the proactor.
        registry.check_insert(fd)?;
        let mut operation = handler.operation();
        if !self.shared.backend.performs(operation) {
            operation = Operation::Ready; // the loop performs it on readiness
        }
        let token = registry.insert(fd, handler, operation)?;
        // The lock is held across the kernel call so that concurrent add and remove of one
        // fd leave the kernel and the registry in agreement.
        if let Err(err) = self.shared.backend.watch(fd, token, operation) {
            let removed = registry.remove(fd);
            drop(registry);
            drop(removed);
            return Err(err);
        }
        drop(registry);
        // io_uring: the loop submits the new request with its next wait.
        if self.shared.backend.queues_requests() && !self.shared.on_loop_thread() {
            self.shared.backend.wake();
        }
        Ok(())
    }

    /// Forgets the registration of `fd`; once this returns no new call of its handler
    /// starts. Called from another thread while that handler runs, it waits until the
    /// handler returns (on io_uring also until requests for `fd` that the loop was submitting
    /// at that moment are in the kernel: normally a moment); called from a handler, it
    /// returns at once. It never closes `fd`.
    /// Remove before closing: while registered, the fd number is watched and written to,
    /// whatever file it names. After a close it still ends the registration.
    ///
    /// Errors: `ENOENT` when `fd` is not registered.
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// let (reader, _writer) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.add(reader.as_raw_fd(), |_fd| {})?;
    /// proactor.remove(reader.as_raw_fd())?; // then the fd may be closed
    /// let again = proactor.remove(reader.as_raw_fd()).unwrap_err();
    /// assert_eq!(again.raw_os_error(), Some(libc::ENOENT));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.check_same_process()?;
        self.shared.remove(fd)
    }

    /// Hands `bytes` (copied) to the loop, which writes them to `fd` after the handlers of its
    /// current turn, in the order of the calls, whatever thread made them. Partial writes are
    /// completed when the socket has room again; the loop never blocks on a write and never
    /// raises SIGPIPE. Bytes handed over while the loop is stopped are written once it runs.
    /// An empty `bytes` does nothing.
    ///
    /// Errors: `ENOENT` when `fd` is not registered; `ENOTSOCK` when it is not a socket;
    /// `EPROTOTYPE` when it is not a stream socket; `EBADF` when it was closed;
    /// `ENOBUFS` when the fd's queue would pass the send limit (see
    /// [`Proactor::set_send_limit`]), and then nothing is queued (a message over the limit
    /// by itself is refused before it is copied); `EPIPE`, `ECONNRESET`…
    /// once a write to `fd` failed (its queue was dropped; the handler still gets its
    /// hang-up call).
    ///
    /// ```
    /// use st_proactor::Proactor;
    /// use std::io::Read;
    /// use std::os::fd::AsRawFd;
    ///
    /// let (local, mut remote) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = Proactor::new()?;
    /// proactor.add(local.as_raw_fd(), |_fd| {})?;
    /// proactor.send(local.as_raw_fd(), b"hello")?;
    /// proactor.run()?;
    /// let mut greeting = [0u8; 5];
    /// remote.read_exact(&mut greeting)?;
    /// assert_eq!(&greeting, b"hello");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn send(&self, fd: RawFd, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.shared.check_fits(bytes.len())?;
        let message: Arc<[u8]> = Arc::from(bytes);
        let wake = self.shared.registry.lock().queue_output(fd, &message)?;
        self.shared.wake_for_output(wake);
        Ok(())
    }

    /// Hands the same `bytes` to the loop for every fd of `fds`, as [`Proactor::send`] does,
    /// keeping one shared copy of them. Returns the fds that did not get the bytes, as
    /// `(index in fds, error)` pairs with the errors of [`Proactor::send`]; all others did.
    ///
    /// ```
    /// use st_proactor::Proactor;
    /// use std::os::fd::AsRawFd;
    ///
    /// let (a, _a_peer) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = Proactor::new()?;
    /// proactor.add(a.as_raw_fd(), |_fd| {})?;
    /// let failures = proactor.broadcast(&[a.as_raw_fd(), 1000], b"hi");
    /// assert_eq!(failures.len(), 1);
    /// assert_eq!(failures[0].0, 1); // fd 1000 is not registered
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn broadcast(&self, fds: &[RawFd], bytes: &[u8]) -> Vec<(usize, io::Error)> {
        let mut failures = Vec::new();
        if bytes.is_empty() {
            return failures;
        }
        if let Err(err) = self.shared.check_fits(bytes.len()) {
            let errno = err.raw_os_error().unwrap_or(libc::ENOBUFS);
            failures.extend((0..fds.len()).map(|index| (index, error(errno))));
            return failures;
        }
        let message: Arc<[u8]> = Arc::from(bytes);
        let mut wake = false;
        let mut registry = self.shared.registry.lock();
        for (index, &fd) in fds.iter().enumerate() {
            match registry.queue_output(fd, &message) {
                Ok(first) => wake |= first,
                Err(err) => failures.push((index, err)),
            }
        }
        drop(registry);
        self.shared.wake_for_output(wake);
        failures
    }

    /// Sets the send limit, the hard cap on queued output, for every fd of this proactor: a
    /// send fails with `ENOBUFS` when the fd's unwritten bytes, plus 64 bytes of bookkeeping
    /// per queued message, would pass `bytes`. The default is 4 MiB. Queues already longer
    /// keep their bytes.
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// let (socket, _peer) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.add(socket.as_raw_fd(), |_fd| {})?;
    /// proactor.set_send_limit(1000);
    /// let refused = proactor.send(socket.as_raw_fd(), &[0u8; 1000]).unwrap_err();
    /// assert_eq!(refused.raw_os_error(), Some(libc::ENOBUFS)); // 1000 + 64 > 1000
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_send_limit(&self, bytes: usize) {
        let mut registry = self.shared.registry.lock();
        registry.policy.send_limit = bytes;
        self.shared.send_limit.store(bytes, Ordering::Relaxed);
    }

    /// The send limit set by [`Proactor::set_send_limit`].
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// assert_eq!(proactor.send_limit(), st_proactor::DEFAULT_SEND_LIMIT);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn send_limit(&self) -> usize {
        self.shared.registry.lock().policy.send_limit
    }

    /// Sets the watermarks of queued output for every fd of this proactor, in bytes counted as
    /// [`Proactor::queued_bytes`] counts them. When an fd's queue rises above `high`, the
    /// flow handler gets a [`FlowEventKind::High`](crate::FlowEventKind::High) event; when it
    /// falls back to `low` or below, a `Drained` one: once per crossing. The defaults are
    /// 256 KiB and 1 MiB ([`DEFAULT_LOW_WATERMARK`](crate::DEFAULT_LOW_WATERMARK),
    /// [`DEFAULT_HIGH_WATERMARK`](crate::DEFAULT_HIGH_WATERMARK)). The send limit stays the
    /// hard cap. New marks apply from the next send or write on.
    ///
    /// Errors: `EINVAL` when `low` is above `high`.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.set_watermarks(64 << 10, 512 << 10)?;
    /// assert_eq!(proactor.watermarks(), (64 << 10, 512 << 10));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_watermarks(&self, low: usize, high: usize) -> io::Result<()> {
        if low > high {
            return Err(error(libc::EINVAL));
        }
        let mut registry = self.shared.registry.lock();
        registry.policy.low_watermark = low;
        registry.policy.high_watermark = high;
        Ok(())
    }

    /// The watermarks, `(low, high)`, set by [`Proactor::set_watermarks`].
    ///
    /// ```
    /// use st_proactor::{DEFAULT_HIGH_WATERMARK, DEFAULT_LOW_WATERMARK};
    /// let proactor = st_proactor::Proactor::new()?;
    /// assert_eq!(proactor.watermarks(), (DEFAULT_LOW_WATERMARK, DEFAULT_HIGH_WATERMARK));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn watermarks(&self) -> (usize, usize) {
        let policy = self.shared.registry.lock().policy;
        (policy.low_watermark, policy.high_watermark)
    }

    /// Sets the handler the loop calls with each flow event: an fd's queued output rose above
    /// the high watermark, fell back to the low one, or stalled (see
    /// [`Proactor::set_stall_timeout`]). It runs on the loop thread, with no lock held, right
    /// after the handler call or the write that caused the event, so a handler whose sends
    /// push an fd above the high mark has the event delivered before the next handler of
    /// the same loop turn. It may call any method (pause, resume, remove, send). Events of an
    /// fd removed before their delivery are dropped, as are events while no handler is set
    /// (none is, at first). A handler that panics is dropped.
    ///
    /// ```
    /// use st_proactor::{FlowEventKind, Proactor};
    /// use std::os::fd::AsRawFd;
    ///
    /// let (local, _remote) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = Proactor::new()?;
    /// proactor.add(local.as_raw_fd(), |_fd| {})?;
    /// proactor.set_watermarks(0, 1000)?;
    /// let (events, received) = std::sync::mpsc::channel();
    /// proactor.set_flow_handler(move |event| events.send(event.kind).unwrap());
    /// proactor.run()?;
    /// proactor.send(local.as_raw_fd(), &[0u8; 2000])?; // above 1000 bytes until written
    /// let wait = std::time::Duration::from_secs(5);
    /// assert_eq!(received.recv_timeout(wait).unwrap(), FlowEventKind::High);
    /// assert_eq!(received.recv_timeout(wait).unwrap(), FlowEventKind::Drained);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_flow_handler<F>(&self, handler: F)
    where
        F: FnMut(FlowEvent) + Send + 'static,
    {
        let old = self
            .shared
            .flow_handler
            .lock()
            .replace(Some(Box::new(handler)));
        drop(old); // unlocked: its Drop may call back into the proactor
    }

    /// Removes the flow handler; later events are dropped.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.set_flow_handler(|event| println!("{event:?}"));
    /// proactor.clear_flow_handler();
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn clear_flow_handler(&self) {
        let old = self.shared.flow_handler.lock().replace(None);
        drop(old);
    }

    /// Sets the stall timeout (`None`, the default, turns stall detection off). With one set,
    /// the flow handler gets a [`FlowEventKind::Stalled`](crate::FlowEventKind::Stalled) event
    /// for an fd whose queued output has waited for room in its socket for `timeout` with no
    /// progress: no byte of it written, and nothing of what the socket holds taken by the
    /// reader (`SIOCOUTQ` did not shrink). The clock starts when the output starts waiting
    /// and restarts at every sign of progress. Once per stall: another comes only after progress. A
    /// reader that reads slowly keeps making progress and never stalls; one that has stopped
    /// reading does. The cost does not grow with the number of fds: only fds whose output
    /// waits have a timer. A timeout over about 30 years is cut to that.
    ///
    /// ```
    /// use std::time::Duration;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.set_stall_timeout(Some(Duration::from_secs(2)));
    /// assert_eq!(proactor.stall_timeout(), Some(Duration::from_secs(2)));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_stall_timeout(&self, timeout: Option<Duration>) {
        // Deadlines are instants: a timeout beyond any uptime is as good as none past it.
        let timeout = timeout.map(|timeout| timeout.min(LONGEST_STALL_TIMEOUT));
        self.shared.registry.lock().set_stall_timeout(timeout);
        // A sleeping loop must compute its wait again.
        if !self.shared.on_loop_thread() {
            self.shared.backend.wake();
        }
    }

    /// Sets the lag timeout (`None`, the default, turns lag detection off). With one set, the
    /// flow handler gets a [`FlowEventKind::Lagging`](crate::FlowEventKind::Lagging) event
    /// for an fd whose queued output has stayed congested for `timeout`: above the high
    /// watermark since its [`High`](crate::FlowEventKind::High) event, without its
    /// [`Drained`](crate::FlowEventKind::Drained) one, whether or not its reader made progress
    /// meanwhile. Once per congestion. This is the limit for a reader that reads, but too
    /// slowly to catch up, and so holds back everyone whose bytes go to it (the stall timeout
    /// never fires for it); Redis's soft output limit held for a time is the same idea. The
    /// clock of a congestion starts at its `High` event; a timeout set during a congestion
    /// counts from there too. Only congested fds have a timer. A timeout over about 30 years
    /// is cut to that.
    ///
    /// ```
    /// use std::time::Duration;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.set_lag_timeout(Some(Duration::from_secs(10)));
    /// assert_eq!(proactor.lag_timeout(), Some(Duration::from_secs(10)));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_lag_timeout(&self, timeout: Option<Duration>) {
        let timeout = timeout.map(|timeout| timeout.min(LONGEST_STALL_TIMEOUT));
        self.shared.registry.lock().set_lag_timeout(timeout);
        // A sleeping loop must compute its wait again.
        if !self.shared.on_loop_thread() {
            self.shared.backend.wake();
        }
    }

    /// The lag timeout set by [`Proactor::set_lag_timeout`].
    ///
    /// ```
    /// assert_eq!(st_proactor::Proactor::new()?.lag_timeout(), None); // off at first
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn lag_timeout(&self) -> Option<Duration> {
        self.shared.registry.lock().policy.lag_timeout
    }

    /// Sets the flush delay (zero, the default, writes queued output at the end of every loop
    /// turn). With a delay, output queued when nothing was waiting is written at most
    /// `delay` later, with everything queued meanwhile: under load a write then carries more
    /// (a loopback send costs about the same whatever its size), at the price of up to
    /// `delay` of latency. The idea of `TCP_CORK` or Kafka's `linger.ms`. A stop writes at
    /// once. Delays over a second are cut to a second. The epoll backend sleeps in whole
    /// milliseconds, so there a delay below one is rounded up to it.
    ///
    /// ```
    /// use std::time::Duration;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.set_flush_delay(Duration::from_micros(200));
    /// assert_eq!(proactor.flush_delay(), Duration::from_micros(200));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_flush_delay(&self, delay: Duration) {
        self.shared.registry.lock().policy.flush_delay = delay.min(Duration::from_secs(1));
        if !self.shared.on_loop_thread() {
            self.shared.backend.wake();
        }
    }

    /// The flush delay set by [`Proactor::set_flush_delay`].
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// assert!(proactor.flush_delay().is_zero()); // off at first
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn flush_delay(&self) -> Duration {
        self.shared.registry.lock().policy.flush_delay
    }

    /// The stall timeout set by [`Proactor::set_stall_timeout`].
    ///
    /// ```
    /// assert_eq!(st_proactor::Proactor::new()?.stall_timeout(), None); // off at first
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn stall_timeout(&self) -> Option<Duration> {
        self.shared.registry.lock().policy.stall_timeout
    }

    /// Pauses the reading of `fd`: once this returns, no new call of its handler (or of its
    /// receive or accept completion) starts until [`Proactor::resume_reading`]; a call
    /// running on the loop thread finishes. The bytes stay in the socket, and output queued
    /// for `fd` keeps being written. A hang-up of a paused fd is reported once it is resumed.
    /// Pausing twice is the same as once. It costs no system call: the backend stops watching
    /// the fd's input the first time it reports some while paused.
    ///
    /// Errors: `ENOENT` when `fd` is not registered.
    ///
    /// ```
    /// use st_proactor::Proactor;
    /// use std::io::Write;
    /// use std::os::fd::AsRawFd;
    ///
    /// let (local, mut remote) = std::os::unix::net::UnixStream::pair()?;
    /// let (received, chunks) = std::sync::mpsc::channel();
    /// let proactor = Proactor::new()?;
    /// proactor.receive(local.as_raw_fd(), move |result| {
    ///     let _ = received.send(result.map(<[u8]>::to_vec).unwrap_or_default());
    /// })?;
    /// proactor.pause_reading(local.as_raw_fd())?;
    /// proactor.run()?;
    /// remote.write_all(b"later")?;
    /// let wait = std::time::Duration::from_millis(200);
    /// assert!(chunks.recv_timeout(wait).is_err()); // paused: the bytes wait in the socket
    /// proactor.resume_reading(local.as_raw_fd())?;
    /// assert_eq!(chunks.recv_timeout(wait * 25).unwrap(), b"later");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn pause_reading(&self, fd: RawFd) -> io::Result<()> {
        self.check_same_process()?;
        let mut registry = self.shared.registry.lock();
        let Some((token, operation)) = registry.pause(fd)? else {
            return Ok(());
        };
        // A request the backend performs is cancelled (no system call: the loop submits the
        // cancel with its next wait; what completes before it is held).
        let _ = self
            .shared
            .backend
            .quiet_reading(fd, token, operation, false);
        drop(registry);
        if !self.shared.on_loop_thread() {
            self.shared.backend.wake();
        }
        Ok(())
    }

    /// Resumes the reading of `fd` paused by [`Proactor::pause_reading`]: its handler is
    /// called again for the bytes that wait, or for a hang-up that came meanwhile. Resuming
    /// an fd that is not paused does nothing.
    ///
    /// Errors: `ENOENT` when `fd` is not registered.
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// let (socket, _peer) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.add(socket.as_raw_fd(), |_fd| {})?;
    /// proactor.pause_reading(socket.as_raw_fd())?;
    /// proactor.resume_reading(socket.as_raw_fd())?;
    /// assert!(!proactor.is_reading_paused(socket.as_raw_fd())?);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn resume_reading(&self, fd: RawFd) -> io::Result<()> {
        self.check_same_process()?;
        let mut registry = self.shared.registry.lock();
        match registry.resume(fd)? {
            Resumed::Nothing => return Ok(()),
            Resumed::Rewatch { token, writing } => {
                // Under the lock, like every change of the backend's watches. A failure
                // means the fd was closed under us; its removal ends the registration anyway.
                let _ = self.shared.backend.resume_reading(fd, token, writing);
            }
            // The loop delivers what was held, then re-arms the request.
            Resumed::LoopDue => {}
        }
        drop(registry);
        // A one-shot backend's new watch reaches the kernel with the loop's next wait, and
        // held input is delivered by the loop: a sleeping loop must wake.
        self.shared.backend.wake();
        Ok(())
    }

    /// Whether the reading of `fd` is paused.
    ///
    /// Errors: `ENOENT` when `fd` is not registered.
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// let (socket, _peer) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.add(socket.as_raw_fd(), |_fd| {})?;
    /// assert!(!proactor.is_reading_paused(socket.as_raw_fd())?);
    /// proactor.pause_reading(socket.as_raw_fd())?;
    /// assert!(proactor.is_reading_paused(socket.as_raw_fd())?);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_reading_paused(&self, fd: RawFd) -> io::Result<bool> {
        self.shared
            .registry
            .lock()
            .is_paused(fd)
            .ok_or_else(|| error(libc::ENOENT))
    }

    /// Bytes queued for `fd` and not yet written, counted as the send limit counts them.
    ///
    /// Errors: `ENOENT` when `fd` is not registered.
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// let (socket, _peer) = std::os::unix::net::UnixStream::pair()?;
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.add(socket.as_raw_fd(), |_fd| {})?;
    /// proactor.send(socket.as_raw_fd(), b"hello")?; // the loop is not running: it waits
    /// let expected = 5 + st_proactor::MESSAGE_OVERHEAD;
    /// assert_eq!(proactor.queued_bytes(socket.as_raw_fd())?, expected);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn queued_bytes(&self, fd: RawFd) -> io::Result<usize> {
        self.shared
            .registry
            .lock()
            .queued_bytes(fd)
            .ok_or_else(|| error(libc::ENOENT))
    }
}

impl Shared {
    /// `ENOBUFS` for a message of `len` bytes that no queue could take under the send limit
    /// (checked before the bytes are copied).
    fn check_fits(&self, len: usize) -> io::Result<()> {
        let limit = self.send_limit.load(Ordering::Relaxed);
        if len.saturating_add(crate::sendq::MESSAGE_OVERHEAD) > limit {
            return Err(error(libc::ENOBUFS));
        }
        Ok(())
    }
}
