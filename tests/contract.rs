//! The C contract of libst_proactor (the doc comments of `src/capi.rs` and the "contract in
//! plain words" section of README.md), one test per rule, driven through the exported C
//! functions over real pipes and sockets.
//!
//! Tests run in parallel threads of one process, so no state is shared between tests: each
//! test keeps its own state in structs it owns (reached by handlers through the context
//! pointer of `addFD2ProactorWithContext`), or in statics declared inside the test itself.
//! Every wait is bounded by `PATIENCE`; every fd opened is closed and every loop started is
//! stopped (a `Loop` destroys its proactor when dropped).
//!
//! Drop order matters: a test declares the state its handlers use, then its fds, then the
//! `Loop`, so that the proactor is destroyed (its loop joined) before the fds are closed and
//! before the state its handlers point at is freed.

mod common;

use common::{join_all, wait_until, PATIENCE};
use st_proactor::capi::{
    addFD2Proactor, addFD2ProactorWithContext, cancelProactor, createProactor, destroyProactor,
    getProactorBackend, removeHandler, requestCancelProactor, runProactor, waitProactor,
};
use std::collections::{BTreeSet, VecDeque};
use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::Duration;

/// The longest any test waits for anything.
/// An upper bound against hangs, generous for a loaded 2-core CI machine; passing tests
/// finish far sooner.
/// How long a test watches for something that must not happen (a call after a removal...).
const QUIET: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------
// Results of C calls

/// What a C call returned, with errno when it returned -1.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Status {
    ret: c_int,
    errno: c_int,
}

/// Success: 0 (errno is not looked at).
const OK: Status = Status { ret: 0, errno: 0 };

/// Failure: -1 with `errno`.
fn failed(errno: c_int) -> Status {
    Status { ret: -1, errno }
}

impl Status {
    /// Call this right after the C call, before anything else can change errno.
    fn of(ret: c_int) -> Status {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        Status {
            ret,
            errno: if ret == -1 { errno } else { 0 },
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ret == -1 {
            let err = io::Error::from_raw_os_error(self.errno);
            write!(f, "-1 with errno {} ({err})", self.errno)
        } else {
            write!(f, "{}", self.ret)
        }
    }
}

fn errno() -> c_int {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn set_errno(value: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    unsafe { *libc::__errno_location() = value };
}

// ---------------------------------------------------------------------------------------
// Proactor handles

/// A proactor handle, as C holds it. Only ever built from NULL, by `Loop::new` (and used
/// only while that `Loop` lives, since each test drops its `Loop` after everything that uses
/// the handle), or from the handle the loop passes to a handler (live during that call).
/// Each method clears errno first, so a stale errno cannot pass for the call's own.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Raw(*mut c_void);

// SAFETY: a handle is an address that the C contract lets every thread use: every function
// may be called from any thread.
unsafe impl Send for Raw {}
// SAFETY: as for Send: the functions taking a handle are thread-safe.
unsafe impl Sync for Raw {}

impl Raw {
    fn null() -> Raw {
        Raw(std::ptr::null_mut())
    }

    fn add(self, fd: RawFd, handler: extern "C" fn(c_int)) -> Status {
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle (see `Raw`).
        Status::of(unsafe { addFD2Proactor(self.0, fd, Some(handler)) })
    }

    fn add_callback(self, fd: RawFd, callback: &Callback) -> Status {
        let context = (callback as *const Callback).cast_mut().cast::<c_void>();
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle; `context` points at a Callback that the
        // test keeps alive until this registration is removed or the proactor destroyed.
        Status::of(unsafe { addFD2ProactorWithContext(self.0, fd, Some(trampoline), context) })
    }

    fn remove(self, fd: RawFd) -> Status {
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle (see `Raw`).
        Status::of(unsafe { removeHandler(self.0, fd) })
    }

    fn run(self) -> Status {
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle (see `Raw`).
        Status::of(unsafe { runProactor(self.0) })
    }

    fn cancel(self) -> Status {
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle (see `Raw`).
        Status::of(unsafe { cancelProactor(self.0) })
    }

    fn request_cancel(self) -> Status {
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle (see `Raw`).
        Status::of(unsafe { requestCancelProactor(self.0) })
    }

    fn wait(self) -> Status {
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle (see `Raw`).
        Status::of(unsafe { waitProactor(self.0) })
    }

    /// Destroys the proactor; the handle must not be used afterwards.
    fn destroy(self) -> Status {
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle, and each test destroys a handle once.
        Status::of(unsafe { destroyProactor(self.0) })
    }

    /// The backend name, or the errno of the NULL result.
    fn backend(self) -> Result<String, c_int> {
        set_errno(0);
        // SAFETY: `self` is NULL or a live handle (see `Raw`).
        let name = unsafe { getProactorBackend(self.0) };
        if name.is_null() {
            return Err(errno());
        }
        // SAFETY: a non-NULL result is a static NUL-terminated string.
        Ok(unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned())
    }
}

/// A proactor made by `createProactor`, destroyed (loop stopped and joined) when dropped.
struct Loop(Raw);

impl Loop {
    fn new() -> Loop {
        set_errno(0);
        let handle = createProactor();
        assert!(
            !handle.is_null(),
            "createProactor: {}",
            io::Error::last_os_error()
        );
        Loop(Raw(handle))
    }

    /// Gives up ownership: the caller destroys the proactor itself.
    fn into_raw(self) -> Raw {
        let raw = self.0;
        std::mem::forget(self);
        raw
    }
}

impl Deref for Loop {
    type Target = Raw;
    fn deref(&self) -> &Raw {
        &self.0
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let status = self.0.destroy();
        if !thread::panicking() {
            assert_eq!(status, OK, "destroyProactor");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handlers

/// A Rust closure registered through `addFD2ProactorWithContext`: the context pointer is the
/// address of this struct, which the test owns. It is called with the handle the loop passes
/// and the ready fd. It must not panic (it runs under an `extern "C"` frame): handlers record
/// what they see and the test thread asserts.
struct Callback(Box<dyn Fn(Raw, RawFd) + Send + Sync>);

fn callback(body: impl Fn(Raw, RawFd) + Send + Sync + 'static) -> Arc<Callback> {
    Arc::new(Callback(Box::new(body)))
}

extern "C" fn trampoline(proactor: *mut c_void, fd: c_int, context: *mut c_void) {
    // SAFETY: `context` is the address of the Callback given to `Raw::add_callback`, which the
    // test keeps alive until the registration is removed or its proactor destroyed.
    let callback = unsafe { &*context.cast_const().cast::<Callback>() };
    (callback.0)(Raw(proactor), fd);
}

extern "C" fn ignore(_fd: c_int) {}

/// Reads at most one byte: (what read returned, the byte).
fn read_one(fd: RawFd) -> (isize, u8) {
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into a live u8.
    let n = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
    (n, byte)
}

// ---------------------------------------------------------------------------------------
// Fds

fn set_nonblocking(fd: RawFd) {
    // SAFETY: F_GETFL and F_SETFL on an fd the caller owns take no pointers.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert!(flags >= 0, "F_GETFL: {}", io::Error::last_os_error());
        assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK), 0);
    }
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD takes no pointer; on an fd that is not open it fails with EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// A pipe: its read end (non-blocking, so a handler never blocks) and its write end.
fn pipe() -> (OwnedFd, File) {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: pipe2 succeeded: both are new fds that nothing else owns.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_nonblocking(reader.as_raw_fd());
    (reader, File::from(writer))
}

/// A byte channel whose read end a proactor watches.
struct Channel {
    kind: &'static str,
    reader: OwnedFd,
    writer: Option<Box<dyn Write + Send>>,
}

impl Channel {
    fn fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }

    fn send(&mut self, bytes: &[u8]) {
        let writer = self.writer.as_mut().expect("writer open");
        writer.write_all(bytes).expect("write to the channel");
        writer.flush().expect("flush the channel");
    }

    fn close_writer(&mut self) {
        self.writer = None;
    }
}

/// One channel of each kind: a pipe, a Unix socket pair, a TCP connection on 127.0.0.1.
fn channels() -> Vec<Channel> {
    let (pipe_reader, pipe_writer) = pipe();
    let (unix_reader, unix_writer) = UnixStream::pair().expect("socketpair");
    unix_reader.set_nonblocking(true).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let tcp_writer = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    tcp_writer.set_nodelay(true).unwrap();
    let (tcp_reader, _) = listener.accept().expect("accept");
    tcp_reader.set_nonblocking(true).unwrap();
    vec![
        Channel {
            kind: "pipe",
            reader: pipe_reader,
            writer: Some(Box::new(pipe_writer)),
        },
        Channel {
            kind: "unix socket",
            reader: OwnedFd::from(unix_reader),
            writer: Some(Box::new(unix_writer)),
        },
        Channel {
            kind: "tcp socket",
            reader: OwnedFd::from(tcp_reader),
            writer: Some(Box::new(tcp_writer)),
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Bounded waiting

/// Runs `call` on a thread of its own and returns its result, failing the test when it has
/// not returned after `PATIENCE` (a call that blocks forever is then left behind).
fn within<T: Send + 'static>(what: &str, call: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let _ = sender.send(call());
    });
    match receiver.recv_timeout(PATIENCE) {
        Ok(value) => value,
        Err(RecvTimeoutError::Timeout) => panic!("{what} did not return within {PATIENCE:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

// ---------------------------------------------------------------------------------------
// Child processes: for rules about the environment, and calls that could kill the process

/// Set in a child process to the part of a test it must run.
const CHILD_MODE: &str = "ST_PROACTOR_CONTRACT_CHILD";
const BACKEND_VAR: &str = "ST_PROACTOR_BACKEND";

fn child_mode() -> Option<String> {
    std::env::var(CHILD_MODE).ok()
}

/// Runs test `test` of this binary again in a child process, with `CHILD_MODE=mode` and
/// `ST_PROACTOR_BACKEND` set to `backend` (or unset), and asserts that it passed.
fn run_in_child(test: &str, mode: &str, backend: Option<&str>) {
    let mut command = Command::new(std::env::current_exe().expect("test binary path"));
    command
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_MODE, mode)
        .env_remove(BACKEND_VAR)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(backend) = backend {
        command.env(BACKEND_VAR, backend);
    }
    let child = command.spawn().expect("spawn the test binary");
    let pid = child.id() as libc::pid_t;
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let output = match receiver.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("wait for the child"),
        Err(_) => {
            // SAFETY: `pid` is our child and has not been reaped (the wait has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("child {mode} did not finish within {PATIENCE:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child {mode} ({backend:?}) failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

// =======================================================================================
// Errors: every misuse returns -1 with the documented errno

#[test]
fn null_proactor_is_einval_for_every_function() {
    let (reader, _writer) = pipe();
    let fd = reader.as_raw_fd();
    let never = callback(|_, _| {});
    let null = Raw::null();
    assert_eq!(null.add(fd, ignore), failed(libc::EINVAL), "addFD2Proactor");
    assert_eq!(
        null.add_callback(fd, &never),
        failed(libc::EINVAL),
        "addFD2ProactorWithContext"
    );
    assert_eq!(null.remove(fd), failed(libc::EINVAL), "removeHandler");
    assert_eq!(null.run(), failed(libc::EINVAL), "runProactor");
    assert_eq!(null.cancel(), failed(libc::EINVAL), "cancelProactor");
    assert_eq!(
        null.request_cancel(),
        failed(libc::EINVAL),
        "requestCancelProactor"
    );
    assert_eq!(null.wait(), failed(libc::EINVAL), "waitProactor");
    assert_eq!(null.destroy(), failed(libc::EINVAL), "destroyProactor");
    assert_eq!(null.backend(), Err(libc::EINVAL), "getProactorBackend");
}

#[test]
fn negative_fd_is_einval() {
    let never = callback(|_, _| {});
    let proactor = Loop::new();
    for fd in [-1, c_int::MIN] {
        assert_eq!(proactor.add(fd, ignore), failed(libc::EINVAL), "add {fd}");
        assert_eq!(
            proactor.add_callback(fd, &never),
            failed(libc::EINVAL),
            "add with context {fd}"
        );
        assert_eq!(proactor.remove(fd), failed(libc::EINVAL), "remove {fd}");
    }
    // The same while the loop runs.
    assert_eq!(proactor.run(), OK);
    assert_eq!(proactor.add(-1, ignore), failed(libc::EINVAL));
    assert_eq!(proactor.remove(-1), failed(libc::EINVAL));
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn null_handler_is_einval_and_registers_nothing() {
    let (reader, _writer) = pipe();
    let fd = reader.as_raw_fd();
    let proactor = Loop::new();
    set_errno(0);
    // SAFETY: `proactor` is a live handle; a NULL handler is what is being checked.
    let status = Status::of(unsafe { addFD2Proactor(proactor.0 .0, fd, None) });
    assert_eq!(
        status,
        failed(libc::EINVAL),
        "addFD2Proactor with NULL handler"
    );
    set_errno(0);
    // SAFETY: as above; the context is never used since the handler is NULL.
    let status = Status::of(unsafe {
        addFD2ProactorWithContext(proactor.0 .0, fd, None, std::ptr::null_mut())
    });
    assert_eq!(
        status,
        failed(libc::EINVAL),
        "addFD2ProactorWithContext with NULL handler"
    );
    assert_eq!(
        proactor.remove(fd),
        failed(libc::ENOENT),
        "nothing registered"
    );
}

#[test]
fn adding_a_registered_fd_again_is_eexist_and_keeps_the_first_handler() {
    let first_calls = Arc::new(AtomicUsize::new(0));
    let second_calls = Arc::new(AtomicUsize::new(0));
    let (reader, mut writer) = pipe();
    let fd = reader.as_raw_fd();
    let first = callback({
        let calls = Arc::clone(&first_calls);
        move |_, fd| {
            read_one(fd);
            calls.fetch_add(1, SeqCst);
        }
    });
    let second = callback({
        let calls = Arc::clone(&second_calls);
        move |_, fd| {
            read_one(fd);
            calls.fetch_add(1, SeqCst);
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(fd, &first), OK);
    assert_eq!(proactor.add_callback(fd, &second), failed(libc::EEXIST));
    assert_eq!(proactor.add(fd, ignore), failed(libc::EEXIST));
    assert_eq!(proactor.run(), OK);
    assert_eq!(
        proactor.add_callback(fd, &second),
        failed(libc::EEXIST),
        "while running"
    );
    writer.write_all(b"x").unwrap();
    wait_until("the first handler", || first_calls.load(SeqCst) == 1);
    assert_eq!(
        second_calls.load(SeqCst),
        0,
        "the refused handler was called"
    );
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn removing_an_fd_that_is_not_registered_is_enoent() {
    let (reader, _writer) = pipe();
    let fd = reader.as_raw_fd();
    let proactor = Loop::new();
    assert_eq!(
        proactor.remove(fd),
        failed(libc::ENOENT),
        "never registered"
    );
    assert_eq!(proactor.add(fd, ignore), OK);
    assert_eq!(proactor.remove(fd), OK);
    assert_eq!(proactor.remove(fd), failed(libc::ENOENT), "removed twice");
    assert_eq!(proactor.run(), OK);
    assert_eq!(proactor.remove(fd), failed(libc::ENOENT), "while running");
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn adding_a_closed_fd_is_ebadf_and_registers_nothing() {
    // A closed fd number that no other test can get meanwhile: fds are handed out lowest
    // first, and this one is far above what the tests use.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit for getrlimit to fill.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
    let floor = (limit.rlim_cur / 2).min(10_000) as c_int;
    let (reader, _writer) = pipe();
    // SAFETY: F_DUPFD_CLOEXEC takes no pointer; it makes a new fd that this test owns.
    let high = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
    assert!(high >= floor, "F_DUPFD: {}", io::Error::last_os_error());
    // SAFETY: `high` was made just above and nothing else uses it.
    drop(unsafe { OwnedFd::from_raw_fd(high) });
    assert!(!is_open(high));

    let never = callback(|_, _| {});
    let proactor = Loop::new();
    assert_eq!(proactor.add(high, ignore), failed(libc::EBADF));
    assert_eq!(proactor.add_callback(high, &never), failed(libc::EBADF));
    assert_eq!(
        proactor.remove(high),
        failed(libc::ENOENT),
        "left registered"
    );
}

/// A huge fd number is just another fd that is not open: EBADF, not a crash. Checked in a
/// child process with its address space limited, since a failure here aborts the process.
#[test]
fn adding_the_largest_fd_number_is_ebadf_not_an_abort() {
    if child_mode().as_deref() == Some("largest fd") {
        // A failed allocation then fails fast instead of eating the machine's memory, and
        // an abort leaves no core file behind.
        for (resource, bytes) in [(libc::RLIMIT_AS, 4 << 30), (libc::RLIMIT_CORE, 0)] {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            // SAFETY: `limit` is a live rlimit; this only lowers this child process's limits.
            let rc = unsafe { libc::setrlimit(resource, &limit) };
            assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
        }
        let proactor = Loop::new();
        assert_eq!(proactor.add(c_int::MAX, ignore), failed(libc::EBADF));
        assert_eq!(proactor.remove(c_int::MAX), failed(libc::ENOENT));
        return;
    }
    run_in_child(
        "adding_the_largest_fd_number_is_ebadf_not_an_abort",
        "largest fd",
        None,
    );
}

#[test]
fn adding_a_regular_file_is_eperm_and_registers_nothing() {
    let file = File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let fd = file.as_raw_fd();
    let never = callback(|_, _| {});
    let proactor = Loop::new();
    assert_eq!(proactor.add(fd, ignore), failed(libc::EPERM));
    assert_eq!(proactor.add_callback(fd, &never), failed(libc::EPERM));
    assert_eq!(proactor.remove(fd), failed(libc::ENOENT), "left registered");
}

#[test]
fn adding_a_device_without_poll_support_is_eperm_on_every_backend() {
    let device = File::open("/dev/null").unwrap();
    let fd = device.as_raw_fd();
    let proactor = Loop::new();
    assert_eq!(proactor.add(fd, ignore), failed(libc::EPERM));
    assert_eq!(proactor.remove(fd), failed(libc::ENOENT), "left registered");
}

#[test]
fn running_a_running_loop_is_ealready() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (reader, mut writer) = pipe();
    let counter = callback({
        let calls = Arc::clone(&calls);
        move |_, fd| {
            read_one(fd);
            calls.fetch_add(1, SeqCst);
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), &counter), OK);
    assert_eq!(proactor.run(), OK);
    assert_eq!(proactor.run(), failed(libc::EALREADY));
    let raw = proactor.0;
    assert_eq!(
        within("runProactor", move || raw.run()),
        failed(libc::EALREADY),
        "from another thread"
    );
    // The loop still runs.
    writer.write_all(b"x").unwrap();
    wait_until("a handler call", || calls.load(SeqCst) == 1);
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn cancelling_a_stopped_loop_is_esrch() {
    let proactor = Loop::new();
    assert_eq!(proactor.cancel(), failed(libc::ESRCH), "never run");
    assert_eq!(proactor.run(), OK);
    assert_eq!(proactor.cancel(), OK);
    assert_eq!(proactor.cancel(), failed(libc::ESRCH), "cancelled already");
}

#[test]
fn waiting_from_a_handler_is_edeadlk() {
    let seen = Arc::new(Mutex::new(None::<Status>));
    let (reader, mut writer) = pipe();
    let waits = callback({
        let seen = Arc::clone(&seen);
        move |proactor, fd| {
            read_one(fd);
            let status = proactor.wait();
            seen.lock().unwrap().get_or_insert(status);
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), &waits), OK);
    assert_eq!(proactor.run(), OK);
    writer.write_all(b"x").unwrap();
    wait_until("the handler", || seen.lock().unwrap().is_some());
    assert_eq!(*seen.lock().unwrap(), Some(failed(libc::EDEADLK)));
    assert_eq!(proactor.cancel(), OK, "the loop went on running");
}

#[test]
fn running_from_a_handler_is_ealready() {
    let seen = Arc::new(Mutex::new(None::<Status>));
    let (reader, mut writer) = pipe();
    let runs = callback({
        let seen = Arc::clone(&seen);
        move |proactor, fd| {
            read_one(fd);
            let status = proactor.run();
            seen.lock().unwrap().get_or_insert(status);
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), &runs), OK);
    assert_eq!(proactor.run(), OK);
    writer.write_all(b"x").unwrap();
    wait_until("the handler", || seen.lock().unwrap().is_some());
    assert_eq!(*seen.lock().unwrap(), Some(failed(libc::EALREADY)));
    assert_eq!(proactor.cancel(), OK, "the loop went on running");
}

// =======================================================================================
// Threads

#[test]
fn run_returns_at_once_and_handlers_run_on_another_thread() {
    // State of this test only, reached by a plain C handler.
    static HANDLER_THREAD: Mutex<Option<ThreadId>> = Mutex::new(None);
    extern "C" fn record_thread(fd: c_int) {
        read_one(fd);
        HANDLER_THREAD
            .lock()
            .unwrap()
            .get_or_insert(thread::current().id());
    }

    let (reader, mut writer) = pipe();
    let proactor = Loop::new();
    assert_eq!(proactor.add(reader.as_raw_fd(), record_thread), OK);
    // Data is pending before the loop starts, so a loop run on the caller's thread would
    // call the handler before runProactor returns.
    writer.write_all(b"x").unwrap();
    let raw = proactor.0;
    let (status, caller) = within("runProactor", move || {
        let status = raw.run();
        (status, thread::current().id())
    });
    assert_eq!(status, OK);
    wait_until("the handler", || HANDLER_THREAD.lock().unwrap().is_some());
    let handler = HANDLER_THREAD.lock().unwrap().expect("recorded");
    assert_ne!(handler, caller, "handler ran on runProactor's caller");
    assert_ne!(
        handler,
        thread::current().id(),
        "handler ran on the test thread"
    );
    assert_eq!(proactor.cancel(), OK);
}

fn sigint_blocked() -> bool {
    // SAFETY: sigset_t is plain data; pthread_sigmask fills it with this thread's mask.
    unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask),
            0
        );
        libc::sigismember(&mask, libc::SIGINT) == 1
    }
}

#[test]
fn loop_thread_blocks_asynchronous_signals_and_the_callers_mask_is_kept() {
    let seen = Arc::new(Mutex::new(None::<bool>));
    let (reader, mut writer) = pipe();
    let records = callback({
        let seen = Arc::clone(&seen);
        move |_, fd| {
            read_one(fd);
            seen.lock().unwrap().get_or_insert(sigint_blocked());
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), &records), OK);
    let before = sigint_blocked();
    assert_eq!(proactor.run(), OK);
    assert_eq!(
        sigint_blocked(),
        before,
        "runProactor changed the caller's mask"
    );
    writer.write_all(b"x").unwrap();
    wait_until("the handler", || seen.lock().unwrap().is_some());
    assert_eq!(
        *seen.lock().unwrap(),
        Some(true),
        "SIGINT is not blocked on the loop thread"
    );
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn handlers_of_one_proactor_run_one_at_a_time() {
    struct Shared {
        busy: AtomicBool,
        overlaps: AtomicUsize,
        calls: [AtomicUsize; 4],
    }
    let shared = Arc::new(Shared {
        busy: AtomicBool::new(false),
        overlaps: AtomicUsize::new(0),
        calls: Default::default(),
    });
    let mut fds = Vec::new();
    let mut handlers = Vec::new();
    for index in 0..4 {
        let (reader, mut writer) = pipe();
        writer.write_all(b"x").unwrap(); // never read: ready on every loop turn
        fds.push((reader, writer));
        let shared = Arc::clone(&shared);
        handlers.push(callback(move |_, _| {
            if shared.busy.swap(true, SeqCst) {
                shared.overlaps.fetch_add(1, SeqCst);
            }
            thread::sleep(Duration::from_micros(200));
            shared.busy.store(false, SeqCst);
            shared.calls[index].fetch_add(1, SeqCst);
        }));
    }
    let proactor = Loop::new();
    for ((reader, _), handler) in fds.iter().zip(&handlers) {
        assert_eq!(proactor.add_callback(reader.as_raw_fd(), handler), OK);
    }
    assert_eq!(proactor.run(), OK);
    wait_until("20 calls of every handler", || {
        shared.calls.iter().all(|calls| calls.load(SeqCst) >= 20)
    });
    assert_eq!(proactor.cancel(), OK);
    assert_eq!(shared.overlaps.load(SeqCst), 0, "two handlers ran at once");
}

// =======================================================================================
// When a handler is called

#[test]
fn level_triggered_handler_reading_one_byte_per_call_sees_every_byte_then_eof() {
    #[derive(Default)]
    struct Seen {
        bytes: Mutex<Vec<u8>>,
        eof: AtomicBool,
        calls_after_eof: AtomicUsize,
        removal: Mutex<Option<Status>>,
    }
    let message: Vec<u8> = (0..=255u8).collect();
    let mut channels = channels();
    let seen: Vec<Arc<Seen>> = channels.iter().map(|_| Arc::default()).collect();
    let handlers: Vec<_> = seen
        .iter()
        .map(|seen| {
            let seen = Arc::clone(seen);
            callback(move |proactor, fd| {
                if seen.eof.load(SeqCst) {
                    seen.calls_after_eof.fetch_add(1, SeqCst);
                    return;
                }
                match read_one(fd) {
                    (1, byte) => seen.bytes.lock().unwrap().push(byte),
                    (0, _) => {
                        // Else the hang-up would call the handler on every loop turn.
                        let status = proactor.remove(fd);
                        *seen.removal.lock().unwrap() = Some(status);
                        // Last: the test reads `removal` as soon as it sees the end.
                        seen.eof.store(true, SeqCst);
                    }
                    _ => {} // EAGAIN: nothing to read this time
                }
            })
        })
        .collect();
    let proactor = Loop::new();
    for (channel, handler) in channels.iter().zip(&handlers) {
        assert_eq!(
            proactor.add_callback(channel.fd(), handler),
            OK,
            "{}",
            channel.kind
        );
    }
    assert_eq!(proactor.run(), OK);
    // One write, so one readiness edge: only level triggering brings every byte.
    for channel in &mut channels {
        channel.send(&message);
    }
    for (channel, seen) in channels.iter().zip(&seen) {
        wait_until(&format!("every byte over the {}", channel.kind), || {
            seen.bytes.lock().unwrap().len() >= message.len()
        });
        assert!(
            !seen.eof.load(SeqCst),
            "{}: end of input too early",
            channel.kind
        );
    }
    for channel in &mut channels {
        channel.close_writer();
    }
    for (channel, seen) in channels.iter().zip(&seen) {
        wait_until(&format!("the end of input on the {}", channel.kind), || {
            seen.eof.load(SeqCst)
        });
        assert_eq!(*seen.bytes.lock().unwrap(), message, "{}", channel.kind);
        assert_eq!(*seen.removal.lock().unwrap(), Some(OK), "{}", channel.kind);
    }
    thread::sleep(QUIET);
    for (channel, seen) in channels.iter().zip(&seen) {
        assert_eq!(seen.calls_after_eof.load(SeqCst), 0, "{}", channel.kind);
    }
    assert_eq!(proactor.cancel(), OK);
}

// =======================================================================================
// Re-entrancy

#[test]
fn handler_removing_its_own_fd_is_never_called_again_though_data_remains() {
    let calls = Arc::new(AtomicUsize::new(0));
    let removal = Arc::new(Mutex::new(None::<Status>));
    let other_calls = Arc::new(AtomicUsize::new(0));
    let (reader, mut writer) = pipe();
    let (other_reader, mut other_writer) = pipe();
    let removes_itself = callback({
        let (calls, removal) = (Arc::clone(&calls), Arc::clone(&removal));
        move |proactor, fd| {
            calls.fetch_add(1, SeqCst);
            read_one(fd);
            let status = proactor.remove(fd);
            removal.lock().unwrap().get_or_insert(status);
        }
    });
    let counts = callback({
        let calls = Arc::clone(&other_calls);
        move |_, fd| {
            read_one(fd);
            calls.fetch_add(1, SeqCst);
        }
    });
    let proactor = Loop::new();
    assert_eq!(
        proactor.add_callback(reader.as_raw_fd(), &removes_itself),
        OK
    );
    assert_eq!(proactor.add_callback(other_reader.as_raw_fd(), &counts), OK);
    assert_eq!(proactor.run(), OK);
    writer.write_all(b"0123456789").unwrap();
    wait_until("the handler", || removal.lock().unwrap().is_some());
    assert_eq!(*removal.lock().unwrap(), Some(OK));
    thread::sleep(QUIET);
    assert_eq!(calls.load(SeqCst), 1, "called again after removing itself");
    // The data is still there, and the loop is alive (no deadlock).
    let mut rest = Vec::new();
    let _ = File::from(reader.try_clone().unwrap()).read_to_end(&mut rest);
    assert_eq!(rest, b"123456789");
    other_writer.write_all(b"x").unwrap();
    wait_until("another handler", || other_calls.load(SeqCst) == 1);
    assert_eq!(proactor.remove(reader.as_raw_fd()), failed(libc::ENOENT));
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn handler_adding_a_new_fd_gets_the_new_handler_called() {
    let added = Arc::new(Mutex::new(None::<Status>));
    let second_calls = Arc::new(AtomicUsize::new(0));
    let (first_reader, mut first_writer) = pipe();
    let (second_reader, mut second_writer) = pipe();
    second_writer.write_all(b"y").unwrap();
    let second_fd = second_reader.as_raw_fd();
    let second = callback({
        let calls = Arc::clone(&second_calls);
        move |_, fd| {
            read_one(fd);
            calls.fetch_add(1, SeqCst);
        }
    });
    let first = callback({
        let added = Arc::clone(&added);
        // The second handler lives as long as the first (and the test keeps both).
        let second = Arc::clone(&second);
        move |proactor, fd| {
            read_one(fd);
            let mut added = added.lock().unwrap();
            if added.is_none() {
                *added = Some(proactor.add_callback(second_fd, &second));
            }
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(first_reader.as_raw_fd(), &first), OK);
    assert_eq!(proactor.run(), OK);
    first_writer.write_all(b"x").unwrap();
    wait_until("the first handler", || added.lock().unwrap().is_some());
    assert_eq!(*added.lock().unwrap(), Some(OK));
    wait_until("the handler added by a handler", || {
        second_calls.load(SeqCst) == 1
    });
    assert_eq!(proactor.remove(second_fd), OK, "the new fd is registered");
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn handler_cancelling_its_own_proactor_stops_the_loop_and_run_starts_it_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cancels = Arc::new(Mutex::new(Vec::<Status>::new()));
    let bystander_calls = Arc::new(AtomicUsize::new(0));
    let (reader, mut writer) = pipe();
    let (bystander_reader, mut bystander_writer) = pipe();
    let cancels_loop = callback({
        let (calls, cancels) = (Arc::clone(&calls), Arc::clone(&cancels));
        move |proactor, fd| {
            read_one(fd);
            calls.fetch_add(1, SeqCst);
            let status = proactor.cancel();
            cancels.lock().unwrap().push(status);
        }
    });
    // Another registration, called in every run before the cancel: it must survive too.
    let bystander = callback({
        let calls = Arc::clone(&bystander_calls);
        move |_, fd| {
            if read_one(fd).0 == 1 {
                calls.fetch_add(1, SeqCst);
            }
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), &cancels_loop), OK);
    let bystander_fd = bystander_reader.as_raw_fd();
    assert_eq!(proactor.add_callback(bystander_fd, &bystander), OK);
    for round in 1..=3 {
        assert_eq!(proactor.run(), OK, "round {round}");
        bystander_writer.write_all(b"b").unwrap();
        wait_until(&format!("the other handler in round {round}"), || {
            bystander_calls.load(SeqCst) == round
        });
        writer.write_all(b"x").unwrap();
        let raw = proactor.0;
        assert_eq!(within("waitProactor", move || raw.wait()), OK);
        assert_eq!(calls.load(SeqCst), round);
        assert_eq!(*cancels.lock().unwrap(), vec![OK; round]);
        assert_eq!(
            proactor.cancel(),
            failed(libc::ESRCH),
            "the loop has stopped"
        );
        writer.write_all(b"z").unwrap();
        thread::sleep(QUIET);
        assert_eq!(calls.load(SeqCst), round, "called after the loop stopped");
        let mut stale = [0u8; 1];
        let mut unread = File::from(reader.try_clone().unwrap());
        assert_eq!(unread.read(&mut stale).ok(), Some(1));
    }
}

// =======================================================================================
// Cancel and restart

#[test]
fn run_cancel_run_again_keeps_the_registrations() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (reader, mut writer) = pipe();
    let counts = callback({
        let calls = Arc::clone(&calls);
        move |_, fd| {
            if read_one(fd).0 == 1 {
                calls.fetch_add(1, SeqCst);
            }
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), &counts), OK);
    for round in 1..=3 {
        assert_eq!(proactor.run(), OK, "round {round}");
        writer.write_all(b"x").unwrap();
        wait_until(&format!("the handler in round {round}"), || {
            calls.load(SeqCst) == round
        });
        assert_eq!(proactor.cancel(), OK);
        // Stopped: data waits for the next run.
        writer.write_all(b"y").unwrap();
        thread::sleep(QUIET);
        assert_eq!(calls.load(SeqCst), round, "called while stopped");
        let mut pending = [0u8; 1];
        assert_eq!(
            File::from(reader.try_clone().unwrap())
                .read(&mut pending)
                .ok(),
            Some(1)
        );
    }
    assert_eq!(proactor.remove(reader.as_raw_fd()), OK, "still registered");
}

#[test]
fn cancel_from_another_thread_returns_after_the_running_handler_and_none_runs_after() {
    let in_handler = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (reader, mut writer) = pipe();
    writer.write_all(b"x").unwrap(); // never read: called on every loop turn
    let slow = callback({
        let (in_handler, calls) = (Arc::clone(&in_handler), Arc::clone(&calls));
        move |_, _| {
            in_handler.store(true, SeqCst);
            thread::sleep(Duration::from_millis(20));
            calls.fetch_add(1, SeqCst);
            in_handler.store(false, SeqCst);
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), &slow), OK);
    assert_eq!(proactor.run(), OK);
    wait_until("a handler in progress", || in_handler.load(SeqCst));
    let raw = proactor.0;
    let flag = Arc::clone(&in_handler);
    let (status, running_at_return) = within("cancelProactor", move || {
        let status = raw.cancel();
        (status, flag.load(SeqCst))
    });
    assert_eq!(status, OK);
    assert!(
        !running_at_return,
        "cancelProactor returned while a handler ran"
    );
    let count = calls.load(SeqCst);
    thread::sleep(QUIET);
    assert_eq!(
        calls.load(SeqCst),
        count,
        "a handler ran after cancelProactor"
    );
}

#[test]
fn request_cancel_and_wait_stop_the_loop() {
    let calls = Arc::new(AtomicUsize::new(0));
    let later_calls = Arc::new(AtomicUsize::new(0));
    let (reader, mut writer) = pipe();
    let (later_reader, mut later_writer) = pipe();
    let counter = |calls: &Arc<AtomicUsize>| {
        let calls = Arc::clone(calls);
        callback(move |_, fd| {
            if read_one(fd).0 == 1 {
                calls.fetch_add(1, SeqCst);
            }
        })
    };
    let (counts, later_counts) = (counter(&calls), counter(&later_calls));
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), &counts), OK);
    assert_eq!(proactor.run(), OK);
    writer.write_all(b"x").unwrap();
    wait_until("the handler", || calls.load(SeqCst) == 1);

    // Succeeds and leaves errno alone.
    set_errno(libc::ENOTTY);
    // SAFETY: `proactor` is a live handle.
    let ret = unsafe { requestCancelProactor(proactor.0 .0) };
    let after = errno();
    assert_eq!(ret, 0);
    assert_eq!(after, libc::ENOTTY, "requestCancelProactor changed errno");
    let raw = proactor.0;
    assert_eq!(within("waitProactor", move || raw.wait()), OK);
    assert_eq!(
        proactor.cancel(),
        failed(libc::ESRCH),
        "the loop has stopped"
    );
    writer.write_all(b"y").unwrap();
    thread::sleep(QUIET);
    assert_eq!(calls.load(SeqCst), 1, "called after the loop stopped");

    // On a stopped loop a request has no effect: the next run runs. (A registration made
    // now, so that this checks the request alone; that registrations survive a stop is
    // `run_cancel_run_again_keeps_the_registrations`.)
    assert_eq!(proactor.request_cancel(), OK);
    assert_eq!(
        within("waitProactor", move || raw.wait()),
        OK,
        "not running"
    );
    assert_eq!(
        proactor.add_callback(later_reader.as_raw_fd(), &later_counts),
        OK
    );
    assert_eq!(proactor.run(), OK);
    later_writer.write_all(b"z").unwrap();
    wait_until("a handler after a new run", || {
        later_calls.load(SeqCst) == 1
    });
    assert_eq!(proactor.cancel(), OK);
}

// =======================================================================================
// Removal

#[test]
fn remove_from_another_thread_waits_for_the_running_handler() {
    // State of this test only, reached by a plain C handler.
    static STARTED: AtomicBool = AtomicBool::new(false);
    static FINISHED: AtomicBool = AtomicBool::new(false);
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    extern "C" fn slow(fd: c_int) {
        CALLS.fetch_add(1, SeqCst);
        read_one(fd);
        STARTED.store(true, SeqCst);
        thread::sleep(Duration::from_millis(50));
        FINISHED.store(true, SeqCst);
    }

    let (reader, mut writer) = pipe();
    let proactor = Loop::new();
    let fd = reader.as_raw_fd();
    assert_eq!(proactor.add(fd, slow), OK);
    assert_eq!(proactor.run(), OK);
    writer.write_all(b"xy").unwrap();
    wait_until("the handler to start", || STARTED.load(SeqCst));
    let raw = proactor.0;
    let (status, finished) = within("removeHandler", move || {
        let status = raw.remove(fd);
        (status, FINISHED.load(SeqCst))
    });
    assert_eq!(status, OK);
    assert!(
        finished,
        "removeHandler returned while the handler was running"
    );
    drop(reader); // closing right after removeHandler is allowed
    thread::sleep(QUIET);
    assert_eq!(CALLS.load(SeqCst), 1, "called after removeHandler returned");
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn handler_is_never_entered_after_remove_returns_even_when_fd_numbers_are_reused() {
    const ITERATIONS: usize = 2000;
    #[derive(Default)]
    struct Watch {
        removed: AtomicBool,
        calls: AtomicUsize,
        late_calls: AtomicUsize,
    }
    let mut watches: Vec<Arc<Watch>> = Vec::with_capacity(ITERATIONS);
    let mut handlers: Vec<Arc<Callback>> = Vec::with_capacity(ITERATIONS);
    let mut fd_numbers = BTreeSet::new();
    let proactor = Loop::new();
    assert_eq!(proactor.run(), OK);
    for iteration in 0..ITERATIONS {
        let watch = Arc::new(Watch::default());
        let handler = callback({
            let watch = Arc::clone(&watch);
            move |_, fd| {
                // Entered after removeHandler returned, or still running when it returned.
                let late_entry = watch.removed.load(SeqCst);
                watch.calls.fetch_add(1, SeqCst);
                read_one(fd);
                if late_entry || watch.removed.load(SeqCst) {
                    watch.late_calls.fetch_add(1, SeqCst);
                }
            }
        });
        let (reader, mut writer) = pipe();
        let fd = reader.as_raw_fd();
        fd_numbers.insert(fd);
        assert_eq!(
            proactor.add_callback(fd, &handler),
            OK,
            "iteration {iteration}"
        );
        writer.write_all(&[0u8; 64]).unwrap(); // 64 calls' worth: data flows at removal
        if iteration % 2 == 0 {
            wait_until("the handler to be called", || watch.calls.load(SeqCst) > 0);
        }
        assert_eq!(proactor.remove(fd), OK, "iteration {iteration}");
        watch.removed.store(true, SeqCst);
        drop(reader);
        drop(writer);
        watches.push(watch);
        handlers.push(handler);
    }
    assert_eq!(proactor.cancel(), OK);
    let late: Vec<usize> = (0..ITERATIONS)
        .filter(|&index| watches[index].late_calls.load(SeqCst) > 0)
        .collect();
    assert!(
        late.is_empty(),
        "handlers entered after removeHandler returned, in iterations {late:?}"
    );
    assert!(
        fd_numbers.len() < ITERATIONS / 2,
        "fd numbers were hardly reused ({} distinct)",
        fd_numbers.len()
    );
    drop(proactor);
}

#[test]
fn remove_after_the_fd_was_closed_returns_0() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (reader, _writer) = pipe();
    let (other_reader, mut other_writer) = pipe();
    let counts = callback({
        let calls = Arc::clone(&calls);
        move |_, fd| {
            read_one(fd);
            calls.fetch_add(1, SeqCst);
        }
    });
    let proactor = Loop::new();
    let fd = reader.as_raw_fd();
    assert_eq!(proactor.add(fd, ignore), OK);
    assert_eq!(proactor.add_callback(other_reader.as_raw_fd(), &counts), OK);
    assert_eq!(proactor.run(), OK);
    drop(reader);
    assert_eq!(proactor.remove(fd), OK);
    assert_eq!(proactor.remove(fd), failed(libc::ENOENT));
    other_writer.write_all(b"x").unwrap();
    wait_until("another handler", || calls.load(SeqCst) == 1);
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn registration_made_by_a_thread_that_has_ended_still_calls_its_handler() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (reader, mut writer) = pipe();
    let counts = callback({
        let calls = Arc::clone(&calls);
        move |_, fd| {
            if read_one(fd).0 == 1 {
                calls.fetch_add(1, SeqCst);
            }
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.run(), OK);
    let (raw, fd, handler) = (proactor.0, reader.as_raw_fd(), Arc::clone(&counts));
    let adder = thread::spawn(move || raw.add_callback(fd, &handler));
    let status = join_all("the adding thread", vec![adder]);
    assert_eq!(status, vec![OK]);
    // The thread that registered the fd is gone; the registration must not be.
    writer.write_all(b"x").unwrap();
    wait_until("the handler of an fd added by an ended thread", || {
        calls.load(SeqCst) == 1
    });
    assert_eq!(proactor.cancel(), OK);
}

#[test]
fn eight_threads_adding_and_removing_thousands_of_pipes_while_handlers_fire() {
    const THREADS: usize = 8;
    const PIPES_PER_THREAD: usize = 500;
    const WINDOW: usize = 8; // pipes each thread keeps registered at once
    let calls = Arc::new(AtomicUsize::new(0));
    let counts = callback({
        let calls = Arc::clone(&calls);
        move |_, fd| {
            read_one(fd);
            calls.fetch_add(1, SeqCst);
        }
    });
    let proactor = Loop::new();
    assert_eq!(proactor.run(), OK);
    let workers: Vec<_> = (0..THREADS)
        .map(|worker| {
            let raw = proactor.0;
            let counts = Arc::clone(&counts);
            thread::spawn(move || {
                let mut failures = Vec::new();
                let mut fd_numbers = BTreeSet::new();
                let mut window = VecDeque::new();
                let retire = |(reader, writer): (OwnedFd, File), failures: &mut Vec<String>| {
                    let fd = reader.as_raw_fd();
                    let status = raw.remove(fd);
                    if status != OK {
                        failures.push(format!("thread {worker}: removeHandler({fd}): {status:?}"));
                    }
                    drop((reader, writer));
                };
                for _ in 0..PIPES_PER_THREAD {
                    let (reader, mut writer) = pipe();
                    let fd = reader.as_raw_fd();
                    fd_numbers.insert(fd);
                    let status = raw.add_callback(fd, &counts);
                    if status != OK {
                        failures.push(format!("thread {worker}: add({fd}): {status:?}"));
                    }
                    writer.write_all(b"x").unwrap();
                    window.push_back((reader, writer));
                    if window.len() > WINDOW {
                        retire(window.pop_front().unwrap(), &mut failures);
                    }
                }
                while let Some(pipe) = window.pop_front() {
                    retire(pipe, &mut failures);
                }
                (failures, fd_numbers)
            })
        })
        .collect();
    let results = join_all("the adding and removing threads", workers);
    let failures: Vec<&String> = results.iter().flat_map(|(f, _)| f).collect();
    assert!(failures.is_empty(), "calls failed: {failures:#?}");
    assert!(calls.load(SeqCst) > 0, "no handler fired");
    let fd_numbers: BTreeSet<RawFd> = results.iter().flat_map(|(_, n)| n).copied().collect();
    for fd in fd_numbers {
        assert_eq!(
            proactor.remove(fd),
            failed(libc::ENOENT),
            "fd {fd} left registered"
        );
    }
    assert_eq!(proactor.cancel(), OK);
}

// =======================================================================================
// Several proactors

#[test]
fn two_proactors_side_by_side_call_only_their_own_handlers() {
    #[derive(Default)]
    struct Seen {
        calls: Mutex<Vec<(usize, RawFd, ThreadId)>>,
    }
    let seen: [Arc<Seen>; 2] = Default::default();
    let (readers, mut writers): (Vec<OwnedFd>, Vec<File>) = (0..2).map(|_| pipe()).unzip();
    let handlers: Vec<_> = seen
        .iter()
        .map(|seen| {
            let seen = Arc::clone(seen);
            callback(move |proactor, fd| {
                read_one(fd);
                let call = (proactor.0 as usize, fd, thread::current().id());
                seen.calls.lock().unwrap().push(call);
            })
        })
        .collect();
    let proactors = [Loop::new(), Loop::new()];
    for side in 0..2 {
        let fd = readers[side].as_raw_fd();
        assert_eq!(proactors[side].add_callback(fd, &handlers[side]), OK);
        assert_eq!(proactors[side].run(), OK);
    }
    writers[0].write_all(b"a").unwrap();
    wait_until("the first proactor's handler", || {
        !seen[0].calls.lock().unwrap().is_empty()
    });
    thread::sleep(QUIET);
    assert!(
        seen[1].calls.lock().unwrap().is_empty(),
        "the other handler ran"
    );
    writers[1].write_all(b"b").unwrap();
    wait_until("the second proactor's handler", || {
        !seen[1].calls.lock().unwrap().is_empty()
    });
    for proactor in &proactors {
        assert_eq!(proactor.cancel(), OK);
    }
    let mut threads = Vec::new();
    for side in 0..2 {
        let calls = seen[side].calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "side {side}: {calls:?}");
        let (handle, fd, thread) = calls[0];
        assert_eq!(
            handle, proactors[side].0 .0 as usize,
            "side {side}: wrong proactor"
        );
        assert_eq!(fd, readers[side].as_raw_fd(), "side {side}: wrong fd");
        threads.push(thread);
    }
    assert_ne!(threads[0], threads[1], "both loops ran on one thread");
}

// =======================================================================================
// Destroy and ownership

#[test]
fn destroy_on_a_running_proactor_stops_it_and_leaves_registered_fds_open() {
    let mut channels = channels();
    let calls: Vec<Arc<AtomicUsize>> = channels.iter().map(|_| Arc::default()).collect();
    let handlers: Vec<_> = calls
        .iter()
        .map(|calls| {
            let calls = Arc::clone(calls);
            callback(move |_, fd| {
                if read_one(fd).0 == 1 {
                    calls.fetch_add(1, SeqCst);
                }
            })
        })
        .collect();
    let proactor = Loop::new();
    for (channel, handler) in channels.iter().zip(&handlers) {
        assert_eq!(
            proactor.add_callback(channel.fd(), handler),
            OK,
            "{}",
            channel.kind
        );
    }
    assert_eq!(proactor.run(), OK);
    for channel in &mut channels {
        channel.send(b"x");
    }
    for (channel, calls) in channels.iter().zip(&calls) {
        wait_until(&format!("the {} handler", channel.kind), || {
            calls.load(SeqCst) == 1
        });
    }
    let raw = proactor.into_raw();
    assert_eq!(within("destroyProactor", move || raw.destroy()), OK);
    for (channel, calls) in channels.iter_mut().zip(&calls) {
        assert!(is_open(channel.fd()), "{}: destroy closed it", channel.kind);
        channel.send(b"after");
        thread::sleep(QUIET);
        assert_eq!(
            calls.load(SeqCst),
            1,
            "{}: called after destroy",
            channel.kind
        );
        let mut received = Vec::new();
        wait_until(&format!("data over the {}", channel.kind), || {
            let mut byte = [0u8; 16];
            // SAFETY: reads into a live 16-byte buffer from an fd the test owns.
            let n = unsafe { libc::read(channel.fd(), byte.as_mut_ptr().cast(), byte.len()) };
            if n > 0 {
                received.extend_from_slice(&byte[..n as usize]);
            }
            received.len() >= 5
        });
        assert_eq!(received, b"after", "{}", channel.kind);
    }
}

#[test]
fn destroy_from_inside_a_handler_stops_the_loop() {
    let calls = Arc::new(AtomicUsize::new(0));
    let destroyed = Arc::new(Mutex::new(None::<Status>));
    let (reader, mut writer) = pipe();
    // Leaked: the test cannot know when the loop thread, which outlives the handle, ends.
    let destroys: &'static Callback = Box::leak(Box::new(Callback(Box::new({
        let (calls, destroyed) = (Arc::clone(&calls), Arc::clone(&destroyed));
        move |proactor: Raw, fd| {
            calls.fetch_add(1, SeqCst);
            read_one(fd);
            let mut destroyed = destroyed.lock().unwrap();
            if destroyed.is_none() {
                *destroyed = Some(proactor.destroy());
            }
        }
    }))));
    let proactor = Loop::new();
    assert_eq!(proactor.add_callback(reader.as_raw_fd(), destroys), OK);
    assert_eq!(proactor.run(), OK);
    let _handed_to_the_handler = proactor.into_raw();
    writer.write_all(b"x").unwrap();
    wait_until("the handler", || destroyed.lock().unwrap().is_some());
    assert_eq!(*destroyed.lock().unwrap(), Some(OK));
    writer.write_all(b"yz").unwrap();
    thread::sleep(QUIET);
    assert_eq!(calls.load(SeqCst), 1, "called after destroyProactor");
    assert!(
        is_open(reader.as_raw_fd()),
        "destroy closed a registered fd"
    );
}

// =======================================================================================
// Backends

#[test]
fn backend_is_epoll_or_io_uring_and_follows_st_proactor_backend() {
    let test = "backend_is_epoll_or_io_uring_and_follows_st_proactor_backend";
    let proactor = Loop::new();
    let name = proactor.backend().expect("getProactorBackend");
    assert!(name == "epoll" || name == "io_uring", "backend {name:?}");
    match child_mode().as_deref() {
        Some("epoll") => assert_eq!(name, "epoll", "with {BACKEND_VAR}=epoll"),
        Some(mode) => panic!("unknown child mode {mode}"),
        None => {
            if std::env::var(BACKEND_VAR).as_deref() == Ok("epoll") {
                assert_eq!(name, "epoll", "with {BACKEND_VAR}=epoll");
            }
            run_in_child(test, "epoll", Some("epoll"));
        }
    }
}

#[test]
fn create_is_einval_for_an_unknown_backend_and_uring_is_io_uring_or_the_kernels_refusal() {
    let test =
        "create_is_einval_for_an_unknown_backend_and_uring_is_io_uring_or_the_kernels_refusal";
    let create = || {
        set_errno(0);
        let handle = createProactor();
        let errno = errno();
        (handle, errno)
    };
    match child_mode().as_deref() {
        Some("unknown") => {
            let (handle, errno) = create();
            assert!(handle.is_null(), "created with {BACKEND_VAR}=kqueue");
            assert_eq!(errno, libc::EINVAL);
        }
        Some("uring") => match create() {
            (handle, errno) if handle.is_null() => assert!(
                errno == libc::ENOSYS || errno == libc::EPERM,
                "{BACKEND_VAR}=uring refused with errno {errno}"
            ),
            (handle, _) => {
                let proactor = Loop(Raw(handle));
                assert_eq!(proactor.backend().as_deref(), Ok("io_uring"));
            }
        },
        Some(mode) => panic!("unknown child mode {mode}"),
        None => {
            run_in_child(test, "unknown", Some("kqueue"));
            run_in_child(test, "uring", Some("uring"));
        }
    }
}

// =======================================================================================
// Panics

#[test]
fn panicking_rust_handler_does_not_take_the_process_down() {
    let entered = Arc::new(AtomicBool::new(false));
    let good_calls = Arc::new(AtomicUsize::new(0));
    let (bad_reader, mut bad_writer) = pipe();
    let (good_reader, mut good_writer) = pipe();
    let proactor = st_proactor::Proactor::new().expect("Proactor::new");
    {
        let entered = Arc::clone(&entered);
        proactor
            .add(bad_reader.as_raw_fd(), move |_| {
                entered.store(true, SeqCst);
                panic!("a deliberate panic in a handler");
            })
            .unwrap();
    }
    {
        let calls = Arc::clone(&good_calls);
        proactor
            .add(good_reader.as_raw_fd(), move |fd| {
                read_one(fd);
                calls.fetch_add(1, SeqCst);
            })
            .unwrap();
    }
    proactor.run().unwrap();
    bad_writer.write_all(b"x").unwrap();
    wait_until("the panicking handler", || entered.load(SeqCst));
    // The process and the loop live on.
    good_writer.write_all(b"y").unwrap();
    wait_until("the other handler after the panic", || {
        good_calls.load(SeqCst) == 1
    });
    proactor.cancel().unwrap();
}
