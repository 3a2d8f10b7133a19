//! The proactor: lifecycle (create, run, cancel, wait, destroy) and the loop thread.
//!
//! The loop thread waits on the backend, then calls the handler of each ready registration,
//! one at a time, with no lock held. Other threads change registrations under the registry
//! mutex and wake the loop through the backend's wake-up; nothing polls with a timeout.

use crate::backend::{self, Backend, BackendKind, Event};
use crate::flow::{FlowEvent, FlowHandler, FlowHandlerSlot, FlowNote};
use crate::operations;
use crate::operations::{Handler, HeldInput, Outcome, ReceiveHandler};
use crate::output::FinishedWrite;
use crate::registry::{Call, Completion, Registry, Resumed, WatchChange, WriteInterest};
use crate::sendq::SendQueue;
use crate::sys::spawn_with_signals_blocked;
use crate::token::{Operation, Token};

mod start_operations;
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

    /// Starts the loop on a new thread and returns at once.
    ///
    /// Errors: `EALREADY` when the loop is running (including when called from a handler),
    /// `EAGAIN` when no thread can be made, and on io_uring the kernel's error when the run's
    /// ring cannot be made (`ENOMEM`, `EMFILE`), `EIO` when an earlier run failed (see
    /// [`Proactor::wait`]). A loop stopped by a cancel may be run again.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.run()?;
    /// let again = proactor.run().unwrap_err();
    /// assert_eq!(again.raw_os_error(), Some(libc::EALREADY));
    /// proactor.cancel()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn run(&self) -> io::Result<()> {
        self.check_same_process()?;
        if self.shared.on_loop_thread() {
            return Err(error(libc::EALREADY));
        }
        let mut lifecycle = self.shared.lifecycle.lock();
        // A loop that was asked to stop (or ended by itself) is joined first, then restarted.
        loop {
            let ended = match &*lifecycle {
                Lifecycle::Stopped => break,
                Lifecycle::Running(thread) => thread.is_finished(),
                Lifecycle::Joining => false,
            };
            if !ended && !self.shared.stopping() {
                return Err(error(libc::EALREADY));
            }
            self.shared.finish_join(&mut lifecycle);
        }
        self.shared.check_loop_health()?;
        self.shared.stop_requested.store(false, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        let (report, started) = std::sync::mpsc::sync_channel(1);
        let thread = spawn_with_signals_blocked(move || {
            // A panic of the loop's own code (handlers' panics are caught around each call)
            // must not look like a normal stop.
            if catch_unwind(AssertUnwindSafe(|| shared.run_loop(report))).is_err() {
                shared.loop_failed.store(true, Ordering::SeqCst);
                shared.handler_returned.notify_all(); // removals waiting stop waiting
            }
        })?;
        // The loop thread makes what the run needs (io_uring: its ring) and says whether it
        // could; without, it ends at once.
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                let _ = thread.join();
                return Err(err);
            }
            Err(_) => {
                let _ = thread.join();
                self.shared.check_loop_health()?;
                return Err(error(libc::EAGAIN));
            }
        }
        *lifecycle = Lifecycle::Running(thread);
        Ok(())
    }

    /// Stops the loop. From another thread it also waits for the loop thread to end, so no
    /// handler runs once it returns; from a handler it only asks the loop to stop after that
    /// handler returns. Registrations stay: [`Proactor::run`] starts the loop again.
    ///
    /// Errors: `ESRCH` when the loop is not running, `EIO` when it failed (see
    /// [`Proactor::wait`]). A loop that stopped by itself and was not joined yet is joined,
    /// and gives `Ok`.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.run()?;
    /// proactor.cancel()?; // no handler runs after this
    /// let again = proactor.cancel().unwrap_err();
    /// assert_eq!(again.raw_os_error(), Some(libc::ESRCH));
    /// proactor.run()?; // a cancelled loop may run again
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn cancel(&self) -> io::Result<()> {
        self.check_same_process()?;
        if self.shared.on_loop_thread() {
            self.request_cancel();
            return Ok(());
        }
        let mut lifecycle = self.shared.lifecycle.lock();
        if matches!(*lifecycle, Lifecycle::Stopped) {
            self.shared.check_loop_health()?;
            return Err(error(libc::ESRCH));
        }
        // Even when another thread is joining already (it may be `wait`, which does not
        // stop the loop), the stop must be asked for here.
        self.request_cancel();
        self.shared.finish_join(&mut lifecycle);
        self.shared.check_loop_health()
    }

    /// Asks the loop to stop and returns at once, without waiting. Async-signal-safe: it
    /// only sets an atomic flag and writes the loop's eventfd, so it may be called from a
    /// signal handler. It has no effect on a loop that is not running.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.run()?;
    /// proactor.request_cancel(); // what a SIGINT handler would do
    /// proactor.wait()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn request_cancel(&self) {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.shared.backend.wake();
    }

    /// Blocks until the loop has stopped (after a cancel from a handler, or a
    /// [`Proactor::request_cancel`] from a signal handler). Returns at once when the loop is
    /// not running.
    ///
    /// Errors: `EDEADLK` when called from a handler of this proactor; `EIO` when the loop
    /// ended by a failure of its own rather than a stop: a panic in the library's loop code
    /// (handlers' panics are caught around each call) or a wait the backend could not make
    /// (its epoll or io_uring fd closed or replaced under it). From then on `wait`, `cancel`
    /// and `run` fail with `EIO` too.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.wait()?; // not running: returns at once
    /// proactor.run()?;
    /// proactor.request_cancel();
    /// proactor.wait()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wait(&self) -> io::Result<()> {
        self.check_same_process()?;
        if self.shared.on_loop_thread() {
            return Err(error(libc::EDEADLK));
        }
        let mut lifecycle = self.shared.lifecycle.lock();
        self.shared.finish_join(&mut lifecycle);
        self.shared.check_loop_health()
    }
}

impl Drop for Proactor {
    /// Stops the loop (joining it, unless dropped from one of its own handlers, in which case
    /// the loop ends after that handler returns) and forgets every registration. In a child
    /// process of the one that made the proactor it does nothing but leak it (see
    /// [`Proactor::is_inherited`]).
    fn drop(&mut self) {
        if self.is_inherited() {
            // Its loop thread is not in this process (a join would wait forever), and its
            // epoll set or ring is the parent's too: removals or cancels would change the
            // parent's. Its memory is left to this process's exit or exec.
            std::mem::forget(Arc::clone(&self.shared));
            return;
        }
        if self.shared.on_loop_thread() {
            self.request_cancel();
        } else {
            let _ = self.cancel();
        }
        let mut registry = self.shared.registry.lock();
        let registrations = registry.remove_all();
        // Closing the backend ends every watch anyway; removing them first releases, on
        // io_uring, the references pending polls hold on the files without waiting for the
        // ring's teardown.
        for (token, operation, _) in &registrations {
            if let Ok(true) = self.shared.backend.unwatch(token.fd(), *token, *operation) {
                registry.release_retired(*token);
            }
        }
        drop(registry);
        drop(registrations);
    }
}

impl Shared {
    /// See [`Proactor::remove`].
    fn remove(&self, fd: RawFd) -> io::Result<()> {
        let mut registry = self.registry.lock();
        let (token, operation, handler) = registry.remove(fd).ok_or_else(|| error(libc::ENOENT))?;
        // EBADF here means the fd was closed first (a misuse the docs warn about); the
        // registration is gone either way.
        if let Ok(true) = self.backend.unwatch(fd, token, operation) {
            registry.release_retired(token); // a write that never reached the kernel
        }
        if self.on_loop_thread() {
            drop(registry);
            // Requests an earlier enter could not submit go now, before the fd can be closed.
            self.backend.submit_leftovers();
        } else {
            let ticket = self.backend.ticket();
            // io_uring: the loop submits the removal's cancels (which let the kernel close a
            // socket its requests hold) with its next wait, and its wait may be long.
            if self.backend.queues_requests() {
                MutexGuard::unlocked(&mut registry, || self.backend.wake());
            }
            registry.removal_starts_waiting();
            // Until its handler returns, until a write of the loop to it is finished, and
            // until requests the loop took before the removal are in the kernel: the fd
            // number may be closed and reused once this returns.
            loop {
                let settled = self.backend.settled(ticket);
                if settled && !registry.is_running(token) && !registry.is_writing(token) {
                    break;
                }
                if self.loop_failed.load(Ordering::SeqCst) {
                    break; // nothing will run on that loop any more
                }
                self.handler_returned.wait(&mut registry);
            }
            registry.removal_stops_waiting();
            drop(registry);
        }
        // The handler (and whatever it owns) is dropped without the lock held.
        drop(handler);
        Ok(())
    }

    /// `ENOBUFS` for a message of `len` bytes that no queue could take under the send limit
    /// (checked before the bytes are copied).
    fn check_fits(&self, len: usize) -> io::Result<()> {
        let limit = self.send_limit.load(Ordering::Relaxed);
        if len.saturating_add(crate::sendq::MESSAGE_OVERHEAD) > limit {
            return Err(error(libc::ENOBUFS));
        }
        Ok(())
    }

    /// `EIO` once the loop thread has failed (see `loop_failed`).
    fn check_loop_health(&self) -> io::Result<()> {
        if self.loop_failed.load(Ordering::SeqCst) {
            return Err(error(libc::EIO));
        }
        Ok(())
    }

    fn on_loop_thread(&self) -> bool {
        CURRENT_LOOP.with(|current| current.get() == self.id)
    }

    /// Returns once the loop thread has ended and been joined (at once when `Stopped`).
    /// The caller that finds it `Running` joins it, with the lifecycle lock released
    /// meanwhile (a handler that calls `cancel` or `run` needs that lock); callers that find
    /// it `Joining` wait for that join to finish.
    fn finish_join(&self, lifecycle: &mut MutexGuard<'_, Lifecycle>) {
        loop {
            match std::mem::replace(&mut **lifecycle, Lifecycle::Joining) {
                Lifecycle::Stopped => {
                    **lifecycle = Lifecycle::Stopped;
                    return;
                }
                Lifecycle::Joining => self.lifecycle_changed.wait(lifecycle),
                Lifecycle::Running(thread) => {
                    MutexGuard::unlocked(lifecycle, || {
                        // The loop thread catches handler panics, so join reports none.
                        let _ = thread.join();
                    });
                    **lifecycle = Lifecycle::Stopped;
                    self.lifecycle_changed.notify_all();
                    return;
                }
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Wakes a sleeping loop so that it flushes new output. The loop thread itself needs no
    /// wake: it flushes after the handler that queued the output returns.
    fn wake_for_output(&self, first_pending: bool) {
        if first_pending && !self.on_loop_thread() {
            self.backend.wake();
        }
    }

    /// The loop thread's body: flush queued output, deliver flow events, wait, call the
    /// handlers of ready fds.
    fn run_loop(&self, report: std::sync::mpsc::SyncSender<io::Result<()>>) {
        if let Err(err) = self.backend.start_run() {
            let _ = report.send(Err(err));
            return;
        }
        let _ = report.send(Ok(()));
        CURRENT_LOOP.with(|current| current.set(self.id));
        let mut events = Vec::with_capacity(256);
        let mut pending = Vec::new();
        loop {
            if !self.stopping() {
                self.deliver_held();
            }
            let (next_deadline, flow_news) = self.flush_output(&mut pending, self.stopping());
            if flow_news {
                self.deliver_flow_events();
                // The flow handler may have queued output: flush it before sleeping.
                if !self.stopping() {
                    continue;
                }
            }
            if self.stopping() {
                // What a flush delay held back goes out with the stop: as many writes as it
                // takes, while the sockets take them.
                for _ in 0..1024 {
                    self.flush_output(&mut pending, true);
                    if !self.registry.lock().has_pending_output() {
                        break;
                    }
                }
                if self.backend.sends() {
                    // Writes the kernel performs reach it now: those with room complete at
                    // once; one still waiting for room is cancelled when this thread ends,
                    // and its bytes stay queued for the next run.
                    events.clear();
                    let _ = self.backend.wait(&mut events, Some(Duration::ZERO));
                    self.handle_events(&events);
                }
                break;
            }
            events.clear();
            let timeout =
                next_deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
            if self.backend.wait(&mut events, timeout).is_err() {
                // The backend's own fd is broken (closed or replaced under the library): the
                // run cannot go on, and `wait`, `cancel` and `run` report it.
                self.loop_failed.store(true, Ordering::SeqCst);
                self.stop_requested.store(true, Ordering::SeqCst);
                break;
            }
            self.handle_events(&events);
        }
        // What completed while the run's requests were cancelled is held for the next run.
        events.clear();
        self.backend.end_run(&mut events);
        self.handle_events(&events);
        self.backend.close_run();
        self.wake_waiting_removals();
        CURRENT_LOOP.with(|current| current.set(0));
    }

    /// Wakes the removals from other threads that wait, so that they check again.
    fn wake_waiting_removals(&self) {
        if self.registry.lock().has_waiting_removals() {
            self.handler_returned.notify_all();
        }
    }

    fn handle_events(&self, events: &[Event]) {
        let one_shot = self.backend.writable_is_one_shot();
        for event in events {
            match *event {
                Event::Ready {
                    token,
                    readable,
                    writable,
                } => {
                    if writable {
                        self.registry.lock().output_writable(token, one_shot);
                    }
                    if readable {
                        if self.stopping() {
                            // Not dispatched now: keep the fd watched for the next run.
                            self.restore_read_watch(token);
                        } else {
                            self.dispatch(token);
                        }
                    }
                }
                Event::Lost { token } => {
                    let mut registry = self.registry.lock();
                    registry.request_ended(token);
                    self.update_read_watch(&mut registry, token);
                }
                Event::Received {
                    token,
                    result,
                    buffer,
                    more,
                } => self.complete_receive(token, result, buffer, more),
                Event::Accepted {
                    token,
                    result,
                    more,
                } => self.complete_accept(token, result, more),
                Event::Sent { token, result } => {
                    let mut registry = self.registry.lock();
                    let change = registry.finish_write(token, result as isize, None, true);
                    self.apply_write_interest(&registry, token, change);
                }
                Event::Submitted => self.wake_waiting_removals(),
            }
        }
    }

    /// After a report of `token` that was not dispatched (or whose watch was lost): re-arms
    /// a one-shot backend's read watch, or stops watching the input of a paused fd.
    fn restore_read_watch(&self, token: Token) {
        let mut registry = self.registry.lock();
        self.update_read_watch(&mut registry, token);
    }

    /// See `restore_read_watch`; the caller holds the registry lock, so that a concurrent
    /// removal cannot slip between the check and the backend call.
    fn update_read_watch(&self, registry: &mut Registry, token: Token) {
        match registry.read_watch_after_report(token) {
            WatchChange::Rearm(operation) => self.backend.rearm(token.fd(), token, operation),
            // A failure means the fd was closed under us; its removal ends the watch anyway.
            WatchChange::Quiet { operation, writing } => {
                let _ = self
                    .backend
                    .quiet_reading(token.fd(), token, operation, writing);
            }
            WatchChange::Keep => {}
        }
    }

    /// Writes the output queued since the last flush: one `sendmsg` per fd carrying
    /// everything queued for it, unless a flush delay holds it back (not when `now`); then
    /// looks for stalled output. `pending` is a reusable buffer, empty on entry and exit.
    /// Returns the next deadline to wake up for (a stall, or held-back output), and whether
    /// flow events wait to be delivered.
    fn flush_output(&self, pending: &mut Vec<Token>, now: bool) -> (Option<Instant>, bool) {
        let mut registry = self.registry.lock();
        let held_until = if now {
            None
        } else {
            registry.flush_deferred_until()
        };
        if held_until.is_none() {
            registry.take_pending_output(pending);
        }
        if self.backend.sends() {
            for &token in pending.iter() {
                if let Some(header) = registry.start_send(token) {
                    // SAFETY: the registry keeps the batch behind `header` alive until its
                    // completion (also when the registration is removed meanwhile).
                    unsafe { self.backend.send(token.fd(), token, header) };
                }
            }
        } else {
            registry = self.write_pending(registry, pending);
        }
        let next_timer = registry.collect_flow_timers();
        let flow_news = registry.has_flow_notes();
        // Writes that need more than one `sendmsg`: the loop must not sleep before them.
        let more_now = registry.has_pending_output() && held_until.is_none();
        drop(registry);
        pending.clear();
        let next_deadline = match (next_timer, held_until) {
            (Some(timer), Some(flush)) => Some(timer.min(flush)),
            (timer, flush) => timer.or(flush),
        };
        let next_deadline = if more_now {
            Some(Instant::now())
        } else {
            next_deadline
        };
        (next_deadline, flow_news)
    }

    /// The loop's own writes (epoll): one `sendmsg` per fd of `pending`, carrying what is
    /// queued for it, made without the registry lock, so that a send from another thread
    /// never waits behind them. The batches stay in the registry meanwhile, and a removal of
    /// one of these fds waits until its write is finished. Returns the lock, held again.
    fn write_pending<'a>(
        &'a self,
        mut registry: MutexGuard<'a, Registry>,
        pending: &[Token],
    ) -> MutexGuard<'a, Registry> {
        let writes: Vec<(Token, (*const libc::msghdr, usize))> = pending
            .iter()
            .filter_map(|&token| Some((token, registry.start_loop_write(token)?)))
            .collect();
        if writes.is_empty() {
            return registry;
        }
        let sample_full_sockets = registry.policy.stall_timeout.is_some();
        drop(registry);
        let results: Vec<(isize, Option<usize>)> = writes
            .iter()
            .map(|&(token, (header, offered))| {
                // SAFETY: the batch behind `header` stays in the registry (or its retired
                // list) until `finish_write` below, which needs the lock this thread holds
                // next; removals wait for it.
                let result = unsafe { SendQueue::write_now(token.fd(), header) };
                let sample = (sample_full_sockets && FinishedWrite::found_full(result, offered))
                    .then(|| crate::sys::kernel_queued(token.fd()))
                    .flatten();
                (result, sample)
            })
            .collect();
        let mut registry = self.registry.lock();
        for (&(token, _), &(result, sample)) in writes.iter().zip(&results) {
            let change = registry.finish_write(token, result, sample, false);
            self.apply_write_interest(&registry, token, change);
        }
        registry.end_loop_writes();
        if registry.has_waiting_removals() {
            self.handler_returned.notify_all();
        }
        registry
    }

    /// Starts or stops the backend's writable watch of `token` as a finished write asks.
    /// Under the registry lock, like every change of the backend's watches (a concurrent
    /// removal must not be undone). A failure means the fd was closed under us; its removal
    /// ends the watch anyway.
    fn apply_write_interest(&self, registry: &Registry, token: Token, change: WriteInterest) {
        let on = match change {
            WriteInterest::Start => true,
            WriteInterest::Stop => false,
            WriteInterest::Keep => return,
        };
        let reading = registry.reading_watched(token);
        let _ = self.backend.watch_writable(token.fd(), token, on, reading);
    }

    /// Hands the flow events noted so far to the flow handler, with no lock held. A handler
    /// that replaces or clears itself gets no further event: the rest of the batch goes to
    /// the handler set now, if any. While it runs for an fd, a `remove` of that fd from
    /// another thread waits for it, as for any handler.
    fn deliver_flow_events(&self) {
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
    fn dispatch(&self, token: Token) {
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
    fn finish_call(&self, token: Token, handler: Handler, panicked: bool) {
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
    fn complete_receive(&self, token: Token, result: i32, buffer: Option<u16>, more: bool) {
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
    fn receive_ended(
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
    fn complete_accept(&self, token: Token, result: i32, more: bool) {
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
    fn accepted(
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
    fn deliver_held(&self) {
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
    fn deliver_held_input(
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
fn close_accepted(result: i32) {
    if result >= 0 {
        // SAFETY: the kernel just made this fd for the library, and nobody else has it.
        unsafe { libc::close(result) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    const PATIENCE: Duration = Duration::from_secs(5);

    #[test]
    fn loop_calls_the_handler_of_a_readable_fd_on_its_own_thread() {
        let proactor = Proactor::with_backend(BackendKind::Epoll).unwrap();
        let (reader, writer) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        proactor
            .add(reader.as_raw_fd(), move |fd| {
                let mut byte = [0u8; 1];
                // SAFETY: reads one byte into a live buffer from the registered socket.
                unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
                let _ = tx.send((fd, thread::current().name().map(str::to_owned)));
            })
            .unwrap();
        proactor.run().unwrap();
        (&writer).write_all(b"x").unwrap();
        let (fd, name) = rx.recv_timeout(PATIENCE).unwrap();
        assert_eq!(fd, reader.as_raw_fd());
        assert_eq!(name.as_deref(), Some("st_proactor"));
        proactor.cancel().unwrap();
    }

    #[test]
    fn stopped_loop_reports_esrch_on_cancel_and_wait_returns_at_once() {
        let proactor = Proactor::with_backend(BackendKind::Epoll).unwrap();
        assert_eq!(
            proactor.cancel().unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
        proactor.wait().unwrap();
        proactor.run().unwrap();
        assert_eq!(
            proactor.run().unwrap_err().raw_os_error(),
            Some(libc::EALREADY)
        );
        proactor.cancel().unwrap();
        assert_eq!(
            proactor.cancel().unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
    }

    #[test]
    fn request_cancel_stops_the_loop_and_wait_joins_it() {
        let proactor = Proactor::with_backend(BackendKind::Epoll).unwrap();
        proactor.run().unwrap();
        proactor.request_cancel();
        proactor.wait().unwrap();
        assert_eq!(
            proactor.cancel().unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
        proactor.run().unwrap();
        proactor.cancel().unwrap();
    }

    #[test]
    fn cancel_stops_a_loop_that_another_thread_is_waiting_for() {
        let proactor = Arc::new(Proactor::with_backend(BackendKind::Epoll).unwrap());
        proactor.run().unwrap();
        let waiter = {
            let proactor = Arc::clone(&proactor);
            thread::spawn(move || proactor.wait())
        };
        thread::sleep(Duration::from_millis(50)); // let the waiter start joining
        proactor.cancel().unwrap();
        waiter.join().unwrap().unwrap();
        assert_eq!(
            proactor.cancel().unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
    }

    #[test]
    fn a_refused_handler_is_dropped_without_the_registry_lock_held() {
        /// Calls back into the proactor when dropped, as captured state may.
        struct CallsBackOnDrop(std::sync::Weak<Proactor>);
        impl Drop for CallsBackOnDrop {
            fn drop(&mut self) {
                if let Some(proactor) = self.0.upgrade() {
                    let _ = proactor.len(); // would deadlock if the lock were held
                }
            }
        }
        let proactor = Arc::new(Proactor::with_backend(BackendKind::Epoll).unwrap());
        let (reader, _writer) = UnixStream::pair().unwrap();
        proactor.add(reader.as_raw_fd(), |_| {}).unwrap();
        let guard = CallsBackOnDrop(Arc::downgrade(&proactor));
        let err = proactor
            .add(reader.as_raw_fd(), move |_| {
                let _ = &guard;
            })
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(
            proactor.add(-1, |_| {}).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn a_handler_that_registers_its_fd_number_anew_hands_over_to_the_new_handler() {
        let proactor = Arc::new(Proactor::new().unwrap());
        let (old_reader, old_writer) = UnixStream::pair().unwrap();
        let (new_reader, new_writer) = UnixStream::pair().unwrap();
        (&new_writer).write_all(b"y").unwrap();
        let (calls, called) = mpsc::channel::<&'static str>();
        let weak = Arc::downgrade(&proactor);
        let replacement = new_reader.as_raw_fd();
        let old_calls = calls.clone();
        proactor
            .add(old_reader.as_raw_fd(), move |fd| {
                let _ = old_calls.send("old");
                let Some(proactor) = weak.upgrade() else {
                    return;
                };
                proactor.remove(fd).unwrap();
                // The fd number now names another socket, registered from this very handler.
                // SAFETY: both fds are open; dup2 replaces `fd` (ours) with a copy.
                assert_eq!(unsafe { libc::dup2(replacement, fd) }, fd);
                let new_calls = old_calls.clone();
                proactor
                    .add(fd, move |fd| {
                        let mut byte = [0u8; 1];
                        // SAFETY: reads one byte into a live buffer from the registered socket.
                        unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
                        let _ = new_calls.send("new");
                    })
                    .unwrap();
            })
            .unwrap();
        drop(calls);
        (&old_writer).write_all(b"x").unwrap();
        proactor.run().unwrap();
        assert_eq!(called.recv_timeout(PATIENCE).unwrap(), "old");
        assert_eq!(
            called.recv_timeout(PATIENCE).unwrap(),
            "new",
            "the old handler came back instead of the new one"
        );
        proactor.cancel().unwrap();
        drop(old_reader); // closes the duplicate, which the new registration watched
    }

    #[test]
    fn panicking_handler_is_removed_and_the_loop_goes_on() {
        let proactor = Proactor::with_backend(BackendKind::Epoll).unwrap();
        let (bad_reader, bad_writer) = UnixStream::pair().unwrap();
        let (good_reader, good_writer) = UnixStream::pair().unwrap();
        proactor
            .add(bad_reader.as_raw_fd(), |_| panic!("handler bug"))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        proactor
            .add(good_reader.as_raw_fd(), move |fd| {
                let mut byte = [0u8; 1];
                // SAFETY: reads one byte into a live buffer from the registered socket.
                unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
                let _ = tx.send(());
            })
            .unwrap();
        proactor.run().unwrap();
        (&bad_writer).write_all(b"x").unwrap();
        let deadline = std::time::Instant::now() + PATIENCE;
        while proactor.len() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "panicking handler still registered"
            );
            thread::sleep(Duration::from_millis(1));
        }
        (&good_writer).write_all(b"y").unwrap();
        rx.recv_timeout(PATIENCE).unwrap();
        proactor.cancel().unwrap();
    }
}
