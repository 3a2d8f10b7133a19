//! Beej's chat on st_proactor: every line a client sends goes to every other client.
//!
//! Usage: `LD_LIBRARY_PATH=. ./proact_server [port] [--bind ADDRESS] [--max-clients N]
//! [--max-per-ip N] [--max-lag SECONDS] [--stall-timeout SECONDS]` (defaults: port 9034,
//! every interface, no client limit but the descriptors, no per-address limit (0), max lag
//! 10 s, stall timeout 2 s; 0 s turns either timeout off), then `nc localhost 9034` in
//! several terminals. Flags take `--flag VALUE` or `--flag=VALUE`, in any order with the
//! port; `--help` describes each. Like a C program, this server uses only the C ABI of
//! `libst_proactor.so`, which it links dynamically. It is the proactor chat: the library
//! accepts (`acceptViaProactor`), receives (`receiveViaProactor`) and writes
//! (`broadcastViaProactor`); the server only decides who gets what. On io_uring the kernel
//! performs all three; on epoll the loop does.
//!
//! Flow control: when a client's queued output passes the library's high watermark, the
//! server pauses reading from every client whose bytes would go to it (all the others), so
//! TCP slows the senders down, and resumes once it is back under the low watermark.
//!
//! Hostile clients: the room waits for a slow reader, but not forever. A client whose
//! output makes no progress for the stall timeout, stays congested for the max lag however
//! slowly it reads, or passes the library's send limit is dropped: it leaves the room at
//! once, what it had not finished sending goes to nobody, and it is closed once, after the
//! broadcast or event that found it (a work list, so no drop runs inside another). New
//! connections past `--max-clients`, or past `--max-per-ip` for their IPv4 address or IPv6
//! /64, get one line saying so and are closed; refusals are logged at most once a second
//! per kind. Log lines go through a 64 KiB buffer that a thread of their own writes to
//! stdout, so a stdout nobody reads never blocks the chat (lines that find no room are
//! counted and reported), nor the exit (at most 1 s to finish writing).

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The C ABI of libst_proactor.so (include/st_proactor.h), declared here as a C program
/// would include it.
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    pub type ContextHandler =
        unsafe extern "C" fn(proactor: *mut c_void, fd: c_int, context: *mut c_void);
    pub type AcceptCompletion = unsafe extern "C" fn(
        proactor: *mut c_void,
        listen_fd: c_int,
        fd: c_int,
        peer: *const libc::sockaddr,
        peer_len: libc::socklen_t,
        context: *mut c_void,
    );
    pub type ReceiveCompletion = unsafe extern "C" fn(
        proactor: *mut c_void,
        fd: c_int,
        result: libc::ssize_t,
        data: *const c_void,
        context: *mut c_void,
    );
    pub type FlowHandler = unsafe extern "C" fn(
        proactor: *mut c_void,
        fd: c_int,
        event: c_int,
        queued: usize,
        context: *mut c_void,
    );

    pub const FLOW_HIGH: c_int = 1;
    pub const FLOW_DRAINED: c_int = 2;
    pub const FLOW_STALLED: c_int = 3;
    pub const FLOW_LAGGING: c_int = 4;

    #[link(name = "st_proactor")]
    extern "C" {
        pub fn createProactor() -> *mut c_void;
        pub fn addFD2ProactorWithContext(
            this: *mut c_void,
            fd: c_int,
            handler: Option<ContextHandler>,
            context: *mut c_void,
        ) -> c_int;
        pub fn acceptViaProactor(
            this: *mut c_void,
            listen_fd: c_int,
            handler: Option<AcceptCompletion>,
            context: *mut c_void,
        ) -> c_int;
        pub fn receiveViaProactor(
            this: *mut c_void,
            fd: c_int,
            handler: Option<ReceiveCompletion>,
            context: *mut c_void,
        ) -> c_int;
        pub fn removeHandler(this: *mut c_void, fd: c_int) -> c_int;
        pub fn runProactor(this: *mut c_void) -> c_int;
        pub fn requestCancelProactor(this: *mut c_void) -> c_int;
        pub fn waitProactor(this: *mut c_void) -> c_int;
        pub fn destroyProactor(this: *mut c_void) -> c_int;
        pub fn getProactorBackend(this: *mut c_void) -> *const c_char;
        pub fn broadcastViaProactor(
            this: *mut c_void,
            fds: *const c_int,
            count: usize,
            buf: *const c_void,
            len: usize,
            results: *mut c_int,
        ) -> c_int;
        pub fn getProactorSendLimit(this: *mut c_void) -> usize;
        pub fn pauseProactorReading(this: *mut c_void, fd: c_int) -> c_int;
        pub fn resumeProactorReading(this: *mut c_void, fd: c_int) -> c_int;
        pub fn setProactorFlowHandler(
            this: *mut c_void,
            handler: Option<FlowHandler>,
            context: *mut c_void,
        ) -> c_int;
        pub fn setProactorStallTimeout(this: *mut c_void, milliseconds: std::ffi::c_uint) -> c_int;
        pub fn setProactorLagTimeout(this: *mut c_void, milliseconds: std::ffi::c_uint) -> c_int;
    }
}

const NAME: &str = "proact_server";
const DEFAULT_PORT: &str = "9034";
/// A client whose queued output makes no progress for this long is disconnected.
const DEFAULT_STALL_TIMEOUT_MS: u32 = 2000;
/// A client whose queued output stays above the high watermark this long, reading or not,
/// is disconnected: it holds back the whole room, and a reader slow enough to stay behind
/// for that long would hold it back for good.
const DEFAULT_MAX_LAG_MS: u32 = 10_000;
/// An unfinished line (bytes after a chunk's last newline) waits for its end, so that two
/// senders' lines never interleave mid-line at a reader when TCP splits a sender's write,
/// until its sender has been read and quiet this long; then it goes out as it is (a prompt
/// without newline, binary data). Long enough for a busy sender to write the rest of a line
/// once the server reads it again after a pause.
const LINE_HOLD: Duration = Duration::from_millis(250);
/// ... and at most this many bytes: a longer unfinished line goes out at once.
const LINE_HOLD_LIMIT: usize = 16 * 1024;
/// At most this many held bytes are let go per run of the hold timer; the rest go on the
/// next run, at once. Flow events come between handler calls, not inside one, so a single
/// run that let go of thousands of held lines (a wave of clients that each sent an
/// unfinished line) would queue megabytes for every reader at once and drop even a reader
/// that keeps up as too slow; in small runs a reader that falls behind pauses the others
/// first. About what one receive passes on.
const RELEASE_BUDGET: usize = 64 * 1024;

/// Logs one line, `NAME: ...`, through the log buffer (see `log_line`): never blocks on
/// stdout, never panics.
macro_rules! log {
    ($($arg:tt)*) => {
        log_line(format_args!($($arg)*))
    };
}

/// How many bytes of log lines may wait for stdout (taken by the writer or not): a reader
/// of stdout that stops costs the server this much memory and no time.
const LOG_BUFFER_BYTES: usize = 64 * 1024;
/// How long a stopping server lets the log writer finish; a stdout that takes nothing must
/// not keep it from exiting.
const LOG_DRAIN_TIME: Duration = Duration::from_secs(1);

/// The lines on their way to stdout. The loop thread only appends to it (under the mutex)
/// and wakes the writer thread, which alone writes to fd 1, so a stdout that blocks (a full
/// pipe nobody reads) stops the log, never the chat.
struct LogBuffer {
    state: Mutex<LogState>,
    /// Signalled when lines are added (the writer waits for it).
    lines_added: Condvar,
    /// Signalled when the writer has written everything (a drain waits for it).
    all_written: Condvar,
}

struct LogState {
    /// Lines not yet taken by the writer.
    pending: Vec<u8>,
    /// Bytes the writer has taken and not yet written.
    writing: usize,
    /// Lines that found no room since the last report of them.
    dropped: u64,
    /// Whether the writer waits for lines: only then does a new line cost a wake-up call.
    writer_idle: bool,
}

impl LogState {
    /// Whether `bytes` more fit in the buffer.
    fn has_room_for(&self, bytes: usize) -> bool {
        self.pending.len() + self.writing + bytes <= LOG_BUFFER_BYTES
    }

    /// The line that reports the dropped lines, if some were.
    fn dropped_report(&self) -> Option<String> {
        (self.dropped > 0).then(|| format!("{NAME}: {} log lines dropped\n", self.dropped))
    }

    /// Stores the report of the dropped lines if there is room for it now, so that it goes
    /// out before any later line (the writer calls it each time it has made room).
    fn report_dropped(&mut self) {
        if let Some(report) = self.dropped_report() {
            if self.has_room_for(report.len()) {
                self.pending.extend_from_slice(report.as_bytes());
                self.dropped = 0;
            }
        }
    }

    /// Stores `line` (with its newline), after the report of the lines dropped before it;
    /// when the two do not fit, `line` is dropped too and counted.
    fn store(&mut self, line: &[u8]) {
        let report = self.dropped_report();
        let report_len = report.as_ref().map_or(0, String::len);
        if !self.has_room_for(report_len + line.len()) {
            self.dropped += 1;
            return;
        }
        if let Some(report) = report {
            self.pending.extend_from_slice(report.as_bytes());
            self.dropped = 0;
        }
        self.pending.extend_from_slice(line);
    }

    fn is_written(&self) -> bool {
        self.pending.is_empty() && self.writing == 0
    }
}

static LOG: LogBuffer = LogBuffer {
    state: Mutex::new(LogState {
        pending: Vec::new(),
        writing: 0,
        dropped: 0,
        writer_idle: false,
    }),
    lines_added: Condvar::new(),
    all_written: Condvar::new(),
};

/// The log's state, also after a panic elsewhere (the state is consistent at every unlock).
fn log_state() -> MutexGuard<'static, LogState> {
    LOG.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Appends the line `NAME: text` to the log buffer and wakes the writer; a line that does not
/// fit is dropped and counted. Takes a mutex only the writer also takes, briefly.
fn log_line(text: std::fmt::Arguments) {
    let line = format!("{NAME}: {text}\n");
    let writer_idle = {
        let mut state = log_state();
        state.store(line.as_bytes());
        state.writer_idle
    };
    if writer_idle {
        LOG.lines_added.notify_one();
    }
}

/// Starts the thread that writes the log to stdout.
fn start_log_writer() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("log writer".into())
        .spawn(write_log_forever)
        .map(drop)
}

/// The log writer thread: takes what the buffer holds and writes it to fd 1, for as long as
/// the process lives (it is never joined: exiting ends it, even in a blocked write).
fn write_log_forever() {
    let mut chunk = Vec::with_capacity(LOG_BUFFER_BYTES);
    loop {
        {
            let mut state = log_state();
            while state.pending.is_empty() {
                state.writer_idle = true;
                state = LOG
                    .lines_added
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.writer_idle = false;
            }
            std::mem::swap(&mut chunk, &mut state.pending);
            state.writing = chunk.len();
        }
        let mut done = 0;
        while done < chunk.len() {
            let written = write_stdout(&chunk[done..]);
            done += written;
            let mut state = log_state();
            state.writing -= written;
            state.report_dropped();
            if state.is_written() {
                LOG.all_written.notify_all();
            }
        }
        chunk.clear();
    }
}

/// Writes some of `bytes` to fd 1 with a plain blocking write(2); how many bytes are done
/// with (all of them when stdout fails for good: a closed pipe must not stop the server).
fn write_stdout(bytes: &[u8]) -> usize {
    loop {
        // SAFETY: `bytes` is a live slice of `bytes.len()` readable bytes.
        let written = unsafe { libc::write(1, bytes.as_ptr().cast(), bytes.len()) };
        if written > 0 {
            return written as usize;
        } else if written == 0 {
            return bytes.len(); // nothing taken, and no error to wait out: give up on these
        }
        match errno() {
            libc::EINTR => {}
            libc::EAGAIN => wait_until_stdout_writable(),
            _ => return bytes.len(),
        }
    }
}

/// Waits for room in a non-blocking stdout (one we inherited), instead of spinning.
fn wait_until_stdout_writable() {
    let mut stdout = libc::pollfd {
        fd: 1,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one live pollfd; no timeout, as a blocking write would wait.
    unsafe { libc::poll(&mut stdout, 1, -1) };
}

/// Gives the writer at most `LOG_DRAIN_TIME` to write what the log holds (the last lines of
/// a stopping server); true if it did.
fn drain_log() -> bool {
    let deadline = Instant::now() + LOG_DRAIN_TIME;
    let mut state = log_state();
    while !state.is_written() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        state = LOG
            .all_written
            .wait_timeout(state, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    true
}

/// The proactor the signal handler stops; set once before the signals are installed.
static PROACTOR: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());

/// The server's state: the context of every handler. Handlers run one at a time on the
/// proactor's loop thread, and `main` touches it only after the loop has stopped, so it
/// needs no lock.
struct Server {
    proactor: *mut c_void,
    listener: RawFd,
    /// The room: every client whose bytes go to the others (the targets of a broadcast).
    clients: Vec<RawFd>,
    /// By fd number: where a client of the room is in `clients`, so that membership and
    /// leaving cost O(1) however many clients there are.
    members: Vec<Option<Member>>,
    /// The limits on new clients.
    limits: Limits,
    /// How many clients of the room each address has (only addresses with some).
    per_address: HashMap<AddressKey, u32>,
    /// The rate-limited log of each kind of refusal, by `Refusal`.
    refusal_logs: [RefusalLog; 2],
    /// Clients that have left the room and wait to be closed and logged: the work list that
    /// keeps a drop from ever happening inside a broadcast (see `finish_leaving`).
    leaving: VecDeque<(RawFd, String)>,
    /// A held line and the bytes that follow it, joined (reused from call to call).
    buffer: Vec<u8>,
    /// Scratch lists for a broadcast: the other clients, and what each send did.
    targets: Vec<c_int>,
    results: Vec<c_int>,
    /// Out of descriptors (the library sheds connections meanwhile): logged once.
    descriptors_exhausted: bool,
    /// Clients whose queued output is above the high watermark (a handful at most). A client
    /// reads only while no OTHER client is in this list: its bytes would go to that one.
    congested: Vec<RawFd>,
    /// When reading last resumed: a held line's sender is quiet only from then on.
    resumed_at: Instant,
    /// For the stall log line, as the command line gave it.
    stall_timeout_text: String,
    /// For the lag log line, as the command line gave it.
    max_lag_text: String,
    /// Unfinished lines waiting for their end (see `LINE_HOLD`).
    held: HeldLines,
}

/// What the server knows of a client in the room.
#[derive(Clone, Copy)]
struct Member {
    /// Its index in `Server::clients`.
    position: usize,
    /// Whom it counts as for `--max-per-ip`.
    address: AddressKey,
}

/// The unfinished line of each client that has one, and the timer that lets them go.
struct HeldLines {
    /// By fd number: the bytes and when the client last sent any.
    lines: Vec<Option<(Vec<u8>, Instant)>>,
    /// The fds that have an entry in `lines`.
    holders: Vec<RawFd>,
    /// A timerfd registered with the proactor; armed while some line is held.
    timer: RawFd,
    armed: bool,
}

impl HeldLines {
    /// Makes the (unarmed) hold timer; an errno on failure.
    fn new() -> Result<HeldLines, c_int> {
        // SAFETY: plain call; the result is an fd we own or -1.
        let timer = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if timer < 0 {
            return Err(errno());
        }
        Ok(HeldLines {
            lines: Vec::new(),
            holders: Vec::new(),
            timer,
            armed: false,
        })
    }

    /// Holds `bytes` for `fd`, replacing what it held.
    fn put(&mut self, fd: RawFd, bytes: Vec<u8>) {
        let index = fd as usize;
        if index >= self.lines.len() {
            self.lines.resize_with(index + 1, || None);
        }
        if self.lines[index].is_none() {
            self.holders.push(fd);
        }
        self.lines[index] = Some((bytes, Instant::now()));
    }

    /// Takes what `fd` holds.
    fn take(&mut self, fd: RawFd) -> Option<Vec<u8>> {
        let (bytes, _) = self.lines.get_mut(fd as usize)?.take()?;
        if let Some(index) = self.holders.iter().position(|&holder| holder == fd) {
            self.holders.swap_remove(index);
        }
        Some(bytes)
    }

    /// When `fd` last sent bytes that it holds now.
    fn since(&self, fd: RawFd) -> Option<Instant> {
        self.lines
            .get(fd as usize)?
            .as_ref()
            .map(|(_, since)| *since)
    }

    /// Makes the timer fire once, after `wait`.
    fn arm(&mut self, wait: Duration) {
        let setting = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(wait.subsec_nanos().max(1)),
            },
        };
        // SAFETY: `setting` is a live itimerspec; the old value is not asked for.
        unsafe { libc::timerfd_settime(self.timer, 0, &setting, ptr::null_mut()) };
        self.armed = true;
    }

    /// Consumes the timer's expiry, so that it stops being readable.
    fn disarm(&mut self) {
        let mut expirations = 0u64;
        // SAFETY: reads at most 8 bytes into a live u64; the timerfd is non-blocking.
        unsafe { libc::read(self.timer, (&mut expirations as *mut u64).cast(), 8) };
        self.armed = false;
    }
}

/// Whether bytes wait to be read in socket `fd` (`FIONREAD`).
fn bytes_waiting(fd: RawFd) -> bool {
    let mut waiting: c_int = 0;
    // SAFETY: FIONREAD writes one int to the live `waiting`.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut waiting) == 0 && waiting > 0 }
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The C library's text for `code` ("Connection reset by peer"), as the C server logs it.
fn strerror(code: c_int) -> String {
    let mut text = [0 as c_char; 256];
    // SAFETY: the buffer holds `text.len()` bytes; strerror_r (the XSI one) NUL-terminates
    // what it writes there, and is thread-safe.
    if unsafe { libc::strerror_r(code, text.as_mut_ptr(), text.len()) } != 0 {
        return format!("error {code}");
    }
    // SAFETY: strerror_r succeeded, so `text` holds a NUL-terminated string.
    unsafe { CStr::from_ptr(text.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn usage() -> String {
    format!(
        "usage: {NAME} [port] [--bind ADDRESS] [--max-clients N] [--max-per-ip N] \
         [--max-lag SECONDS] [--stall-timeout SECONDS]"
    )
}

/// What `-h` prints: the usage line, what the program does, and every flag with its default.
fn help() -> String {
    format!(
        "{}\n\
         A chat server: every line a client sends goes to every other client. The room moves at\n\
         the pace of its slowest reader, within the bounds below.\n\
         \x20 port                     the TCP port (default {DEFAULT_PORT}; 0 = any free port)\n\
         \x20 --bind ADDRESS           listen on this IPv4 or IPv6 address or host name only\n\
         \x20                          (default: every interface, IPv6 and IPv4)\n\
         \x20 --max-clients N          refuse new connections while N clients are connected\n\
         \x20                          (default: no limit but the descriptors)\n\
         \x20 --max-per-ip N           refuse new connections from an IPv4 address or IPv6 /64\n\
         \x20                          that has N clients (default 0 = no limit)\n\
         \x20 --max-lag SECONDS        disconnect a client whose output stays congested (over\n\
         \x20                          the high watermark) this long, however slowly it reads\n\
         \x20                          (default {} s; 0 = never)\n\
         \x20 --stall-timeout SECONDS  disconnect a client whose output makes no progress\n\
         \x20                          for this long (default {} s; 0 = never)",
        usage(),
        DEFAULT_MAX_LAG_MS / 1000,
        DEFAULT_STALL_TIMEOUT_MS / 1000
    )
}

/// What the command line asks for.
struct Options {
    port: String,
    /// The address to listen on; `None`: every interface.
    bind: Option<String>,
    limits: Limits,
    max_lag: Seconds,
    stall_timeout: Seconds,
}

/// How many clients the server takes.
#[derive(Clone, Copy)]
struct Limits {
    /// Clients in the room at most; `None`: as many as descriptors allow.
    max_clients: Option<usize>,
    /// Clients per IPv4 address or IPv6 /64 at most; 0: no limit.
    max_per_ip: u32,
}

/// A number of seconds from the command line: milliseconds for the library, and the text as
/// given for the log lines (`2`, `2.5`).
struct Seconds {
    ms: u32,
    text: String,
}

/// The options that take a value (`--name VALUE` or `--name=VALUE`).
#[derive(Clone, Copy)]
enum Flag {
    Bind,
    MaxClients,
    MaxPerIp,
    MaxLag,
    StallTimeout,
}

impl Flag {
    const ALL: [Flag; 5] = [
        Flag::Bind,
        Flag::MaxClients,
        Flag::MaxPerIp,
        Flag::MaxLag,
        Flag::StallTimeout,
    ];

    fn name(self) -> &'static str {
        match self {
            Flag::Bind => "--bind",
            Flag::MaxClients => "--max-clients",
            Flag::MaxPerIp => "--max-per-ip",
            Flag::MaxLag => "--max-lag",
            Flag::StallTimeout => "--stall-timeout",
        }
    }

    /// What its value is, for the message when it is missing.
    fn value_kind(self) -> &'static str {
        match self {
            Flag::Bind => "an address",
            Flag::MaxClients | Flag::MaxPerIp => "a number",
            Flag::MaxLag | Flag::StallTimeout => "a number of seconds",
        }
    }

    /// The flag `arg` names, and the value it carries after `=`, if any.
    fn find(arg: &str) -> Option<(Flag, Option<String>)> {
        let (name, value) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (arg, None),
        };
        Flag::ALL
            .into_iter()
            .find(|flag| flag.name() == name)
            .map(|flag| (flag, value))
    }
}

impl Options {
    fn new() -> Options {
        Options {
            port: DEFAULT_PORT.to_string(),
            bind: None,
            limits: Limits {
                max_clients: None,
                max_per_ip: 0,
            },
            max_lag: Seconds {
                ms: DEFAULT_MAX_LAG_MS,
                text: (DEFAULT_MAX_LAG_MS / 1000).to_string(),
            },
            stall_timeout: Seconds {
                ms: DEFAULT_STALL_TIMEOUT_MS,
                text: (DEFAULT_STALL_TIMEOUT_MS / 1000).to_string(),
            },
        }
    }

    /// Takes the value of `flag`; the message for a bad one.
    fn set(&mut self, flag: Flag, value: String) -> Result<(), String> {
        match flag {
            Flag::Bind if value.is_empty() => return Err("--bind needs an address".into()),
            Flag::Bind => self.bind = Some(value),
            Flag::MaxClients => match parse_count(&value) {
                Some(count) if count >= 1 => self.limits.max_clients = Some(count as usize),
                _ => {
                    return Err(format!(
                        "invalid max clients '{value}': expected a whole number of at least 1"
                    ))
                }
            },
            Flag::MaxPerIp => match parse_count(&value) {
                Some(count) => self.limits.max_per_ip = count,
                None => {
                    return Err(format!(
                        "invalid max per ip '{value}': expected a whole number (0 = no limit)"
                    ))
                }
            },
            Flag::MaxLag => match parse_seconds(&value) {
                Some(ms) => self.max_lag = Seconds { ms, text: value },
                None => {
                    return Err(format!(
                        "invalid max lag '{value}': expected a number of seconds"
                    ))
                }
            },
            Flag::StallTimeout => match parse_seconds(&value) {
                Some(ms) => self.stall_timeout = Seconds { ms, text: value },
                None => {
                    return Err(format!(
                        "invalid stall timeout '{value}': expected a number of seconds"
                    ))
                }
            },
        }
        Ok(())
    }
}

/// A whole number as the count flags take it: digits only, at most `u32::MAX`.
fn parse_count(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A number of seconds as `--stall-timeout` takes it (digits, an optional fraction), in
/// milliseconds rounded up, so that any positive value is at least 1 ms.
fn parse_seconds(text: &str) -> Option<u32> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !digits(whole) || !digits(fraction) {
        return None;
    }
    let seconds: f64 = format!("0{whole}.{fraction}0").parse().ok()?;
    let ms = (seconds * 1000.0).ceil();
    (ms <= f64::from(u32::MAX)).then_some(ms as u32)
}

/// Prints to stderr; like `log!`, never panics on a closed stream.
macro_rules! complain {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// The options, `None` for `-h`, or the exit status and message for a bad command line.
/// Flags and the port come in any order; a flag given twice keeps its last value.
fn parse_args() -> Result<Option<Options>, (u8, String)> {
    let bad = |message: String| Err((2, format!("{NAME}: {message}\n{}", usage())));
    let mut options = Options::new();
    let mut port_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        if let Some((flag, value)) = Flag::find(&arg) {
            let Some(value) = value.or_else(|| args.next()) else {
                return bad(format!("{} needs {}", flag.name(), flag.value_kind()));
            };
            if let Err(message) = options.set(flag, value) {
                return bad(message);
            }
        } else if arg.starts_with('-')
            && arg.len() > 1
            && !arg[1..].bytes().all(|b| b.is_ascii_digit())
        {
            return bad(format!("unknown option '{arg}'"));
        } else if port_given {
            return bad("too many arguments".into());
        } else if arg.parse::<u16>().is_ok() && arg.bytes().all(|b| b.is_ascii_digit()) {
            options.port = arg;
            port_given = true;
        } else {
            return bad(format!(
                "invalid port '{arg}': expected a number from 0 to 65535"
            ));
        }
    }
    Ok(Some(options))
}

/// Raises the soft limit on open files to the hard limit: thousands of clients need fds.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit for getrlimit to fill and setrlimit to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Why the server cannot listen: getaddrinfo's error code, or the system's errno.
enum ListenError {
    Resolve(c_int),
    System(c_int),
}

impl ListenError {
    /// The C library's text for it, as the C server prints it.
    fn why(&self) -> String {
        match *self {
            // SAFETY: gai_strerror returns a static NUL-terminated string for any code.
            ListenError::Resolve(code) => unsafe { CStr::from_ptr(libc::gai_strerror(code)) }
                .to_string_lossy()
                .into_owned(),
            ListenError::System(code) => strerror(code),
        }
    }
}

/// Opens the listening socket the way Beej's guide does (getaddrinfo with AI_PASSIVE) on
/// `address` (every interface when `None`), binding the first result that works, IPv6 ones
/// first: on every interface that is one IPv6 socket that also takes IPv4 clients.
fn listen_on(address: Option<&str>, port: &str) -> Result<RawFd, ListenError> {
    let text = |value: &str| CString::new(value).map_err(|_| ListenError::System(libc::EINVAL));
    let node = address.map(text).transpose()?;
    let service = text(port)?;
    // SAFETY: addrinfo is plain data; all-zero is the "no hints" value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    hints.ai_flags = libc::AI_PASSIVE;
    let mut list: *mut libc::addrinfo = ptr::null_mut();
    let node_ptr = node.as_ref().map_or(ptr::null(), |node| node.as_ptr());
    // SAFETY: `node_ptr` is NULL or a live C string, `service` and `hints` are live;
    // getaddrinfo fills `list`, freed below.
    let status = unsafe { libc::getaddrinfo(node_ptr, service.as_ptr(), &hints, &mut list) };
    if status == libc::EAI_SYSTEM {
        return Err(ListenError::System(errno()));
    } else if status != 0 {
        return Err(ListenError::Resolve(status));
    }
    let mut last_error = libc::EADDRNOTAVAIL;
    let mut listener = None;
    'families: for family in [libc::AF_INET6, libc::AF_INET] {
        let mut entry = list;
        while !entry.is_null() {
            // SAFETY: `entry` is a node of the list getaddrinfo returned, not yet freed.
            let info = unsafe { &*entry };
            entry = info.ai_next;
            if info.ai_family != family {
                continue;
            }
            match bind_and_listen(info) {
                Ok(fd) => {
                    listener = Some(fd);
                    break 'families;
                }
                Err(code) => last_error = code,
            }
        }
    }
    // SAFETY: `list` came from getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(list) };
    listener.ok_or(ListenError::System(last_error))
}

/// Whether `info` is the IPv6 wildcard `::`, the one address whose socket is made to take
/// IPv4 clients too; any other IPv6 address keeps the system's IPV6_V6ONLY default.
fn is_ipv6_wildcard(info: &libc::addrinfo) -> bool {
    if info.ai_family != libc::AF_INET6
        || (info.ai_addrlen as usize) < std::mem::size_of::<libc::sockaddr_in6>()
    {
        return false;
    }
    // SAFETY: the family and length say `ai_addr` holds a sockaddr_in6.
    let v6 = unsafe { &*info.ai_addr.cast::<libc::sockaddr_in6>() };
    v6.sin6_addr.s6_addr == [0; 16]
}

fn bind_and_listen(info: &libc::addrinfo) -> Result<RawFd, c_int> {
    let kind = info.ai_socktype | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain socket call; the result is an fd we own or -1.
    let fd = unsafe { libc::socket(info.ai_family, kind, info.ai_protocol) };
    if fd < 0 {
        return Err(errno());
    }
    let yes: c_int = 1;
    let no: c_int = 0;
    let size = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: the option values are live ints of the size given; `info.ai_addr` is valid for
    // `ai_addrlen` bytes as getaddrinfo made it.
    let ok = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&yes as *const c_int).cast(),
            size,
        );
        if is_ipv6_wildcard(info) {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&no as *const c_int).cast(),
                size,
            );
        }
        libc::bind(fd, info.ai_addr, info.ai_addrlen) == 0 && libc::listen(fd, libc::SOMAXCONN) == 0
    };
    if ok {
        Ok(fd)
    } else {
        let code = errno();
        // SAFETY: `fd` was opened above and is closed once.
        unsafe { libc::close(fd) };
        Err(code)
    }
}

/// The port a socket is bound to (the real one when 0 was asked for).
fn local_port(fd: RawFd) -> u16 {
    // SAFETY: sockaddr_storage is plain data big enough for any address.
    let mut address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut size = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `address` has `size` bytes of room.
    unsafe {
        libc::getsockname(
            fd,
            (&mut address as *mut libc::sockaddr_storage).cast(),
            &mut size,
        )
    };
    peer_text(&address).1
}

/// The IP address and port in `address` (an IPv4 client of a dual-stack listener comes as
/// an IPv4-mapped IPv6 address); `None` for another family.
fn peer_ip(address: &libc::sockaddr_storage) -> Option<(IpAddr, u16)> {
    match c_int::from(address.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let v4 =
                unsafe { &*(address as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some((IpAddr::V4(ip), u16::from_be(v4.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let v6 = unsafe {
                &*(address as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some((IpAddr::V6(ip), u16::from_be(v6.sin6_port)))
        }
        _ => None,
    }
}

/// An address as a log shows it: `a.b.c.d` for IPv4 (also IPv4-mapped IPv6), `[v6]` else.
fn peer_text(address: &libc::sockaddr_storage) -> (String, u16) {
    match peer_ip(address) {
        Some((IpAddr::V4(ip), port)) => (ip.to_string(), port),
        Some((IpAddr::V6(ip), port)) => match ip.to_ipv4_mapped() {
            Some(v4) => (v4.to_string(), port),
            None => (format!("[{ip}]"), port),
        },
        None => ("?".to_string(), 0),
    }
}

/// Who a client counts as for `--max-per-ip`: an IPv4 address (also when it comes
/// IPv4-mapped) as its mapped IPv6 form, an IPv6 address as its /64 (the rest zero; a
/// holder of one /64 can use any address in it). The two never collide: a mapped address
/// has 0xffff in bytes 10 and 11.
type AddressKey = [u8; 16];

fn address_key(address: &libc::sockaddr_storage) -> AddressKey {
    match peer_ip(address) {
        Some((IpAddr::V4(ip), _)) => ip.to_ipv6_mapped().octets(),
        Some((IpAddr::V6(ip), _)) if ip.to_ipv4_mapped().is_some() => ip.octets(),
        Some((IpAddr::V6(ip), _)) => {
            let mut key = [0; 16];
            key[..8].copy_from_slice(&ip.octets()[..8]);
            key
        }
        None => [0; 16],
    }
}

/// The peer address the library passed with an accepted connection, copied.
///
/// # Safety
/// `peer` is NULL or points to `peer_len` readable bytes.
unsafe fn copy_peer(
    peer: *const libc::sockaddr,
    peer_len: libc::socklen_t,
) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data, for which all-zero is valid.
    let mut address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    if !peer.is_null() {
        let len = (peer_len as usize).min(std::mem::size_of_val(&address));
        // SAFETY: the caller vouches for `peer_len` bytes at `peer`; at most the storage's
        // size is copied into it.
        unsafe {
            ptr::copy_nonoverlapping(
                peer.cast::<u8>(),
                (&mut address as *mut libc::sockaddr_storage).cast::<u8>(),
                len,
            )
        };
    }
    address
}

/// Why a new connection is turned away.
#[derive(Clone, Copy)]
enum Refusal {
    /// `--max-clients` clients are connected.
    Full,
    /// Its address has `--max-per-ip` clients.
    TooManyFromAddress,
}

impl Refusal {
    /// The bytes the refused client gets before it is closed.
    fn reply(self) -> &'static [u8] {
        match self {
            Refusal::Full => b"server full\n",
            Refusal::TooManyFromAddress => b"too many connections from your address\n",
        }
    }
}

/// The refusals of one kind, logged at most once per `REFUSAL_LOG_INTERVAL`: a flood of
/// connections must not become a flood of log lines.
#[derive(Default)]
struct RefusalLog {
    /// When the last line was logged.
    logged_at: Option<Instant>,
    /// Refusals since then that got no line.
    unreported: u64,
}

const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

impl RefusalLog {
    /// Whether a refusal at `now` gets a log line; if so, how many went unreported before it.
    fn report(&mut self, now: Instant) -> Option<u64> {
        if self
            .logged_at
            .is_some_and(|logged| now.saturating_duration_since(logged) < REFUSAL_LOG_INTERVAL)
        {
            self.unreported += 1;
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

impl Server {
    /// A new connection (`fd` >= 0) or a failed accept (`fd` = -errno): the library accepted
    /// it; the server turns it away if a limit says so, else starts receiving from it.
    fn accepted(&mut self, fd: RawFd, address: &libc::sockaddr_storage) {
        if fd < 0 {
            self.accept_failed(-fd);
            return;
        }
        self.descriptors_exhausted = false;
        let key = address_key(address);
        if let Some(refusal) = self.refusal_for(&key) {
            self.refuse(fd, address, refusal);
            return;
        }
        let context = (self as *mut Server).cast::<c_void>();
        // SAFETY: the proactor is live; `context` is this Server, which outlives the loop.
        if unsafe { ffi::receiveViaProactor(self.proactor, fd, Some(on_received), context) } != 0 {
            log!("cannot receive from socket {fd}: {}", strerror(errno()));
            // SAFETY: `fd` was accepted for us and is ours to close.
            unsafe { libc::close(fd) };
            return;
        }
        // The proactor already gathers a turn's output into one send per client, so Nagle's
        // algorithm would only add delay (up to a delayed-ACK timeout) to each line.
        let one: c_int = 1;
        // SAFETY: `one` is a live int of the size given; `fd` is our socket.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const c_int).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        };
        self.join_room(fd, key);
        if !self.congested.is_empty() {
            // Its bytes would go to a client that is behind already.
            // SAFETY: the proactor is live and `fd` registered.
            unsafe { ffi::pauseProactorReading(self.proactor, fd) };
        }
        let (ip, port) = peer_text(address);
        log!("new connection from {ip}:{port} on socket {fd}");
    }

    /// Whether a limit turns away a new client from `key`.
    fn refusal_for(&self, key: &AddressKey) -> Option<Refusal> {
        let limits = self.limits;
        if limits
            .max_clients
            .is_some_and(|max| self.clients.len() >= max)
        {
            Some(Refusal::Full)
        } else if limits.max_per_ip > 0
            && self.per_address.get(key).copied().unwrap_or(0) >= limits.max_per_ip
        {
            Some(Refusal::TooManyFromAddress)
        } else {
            None
        }
    }

    /// Tells a client why it is turned away (one non-blocking send: it may get nothing)
    /// and closes it; it never joins the room. Logged rate-limited.
    fn refuse(&mut self, fd: RawFd, address: &libc::sockaddr_storage, refusal: Refusal) {
        let reply = refusal.reply();
        // SAFETY: `reply` is a live static slice; `fd` was accepted for us, is registered
        // nowhere, and is closed once, here.
        unsafe {
            libc::send(
                fd,
                reply.as_ptr().cast(),
                reply.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            libc::close(fd);
        }
        let Some(unreported) = self.refusal_logs[refusal as usize].report(Instant::now()) else {
            return;
        };
        let why = match refusal {
            Refusal::Full => format!(
                "server full ({} clients)",
                self.limits.max_clients.unwrap_or(self.clients.len())
            ),
            Refusal::TooManyFromAddress => format!(
                "too many connections from that address ({})",
                self.limits.max_per_ip
            ),
        };
        let more = if unreported > 0 {
            format!(" (and {unreported} more refused since the last report)")
        } else {
            String::new()
        };
        let (ip, port) = peer_text(address);
        log!("refused a connection from {ip}:{port}: {why}{more}");
    }

    fn accept_failed(&mut self, code: c_int) {
        match code {
            libc::EAGAIN | libc::ECONNABORTED | libc::EINTR => {}
            // The library sheds one pending connection per call until descriptors free up.
            libc::EMFILE | libc::ENFILE => {
                if !self.descriptors_exhausted {
                    self.descriptors_exhausted = true;
                    log!(
                        "accept: {}; shedding new connections until descriptors free up",
                        strerror(code)
                    );
                }
            }
            _ => log!("accept: {}", strerror(code)),
        }
    }

    /// What a client sent (`bytes`), or its end: `result` is 0 when it hung up, -errno on
    /// an error (the library has removed it then). Everything up to the last newline goes to
    /// every other client; the unfinished line after it waits for its end (see `LINE_HOLD`).
    fn received(&mut self, fd: RawFd, result: libc::ssize_t, bytes: &[u8]) {
        if !self.is_member(fd) {
            return; // not ours any more (cannot happen: a removed fd gets no call)
        }
        if result <= 0 {
            self.hung_up(fd, result);
        } else {
            self.relay(fd, bytes);
        }
        self.finish_leaving();
    }

    /// A client's end of the connection: it leaves the room, and nothing it sent is lost:
    /// its unfinished line goes to the others.
    fn hung_up(&mut self, fd: RawFd, result: libc::ssize_t) {
        if !self.leave_room(fd) {
            return; // left already, and closed or about to be: once is enough
        }
        let held = self.held.take(fd).unwrap_or_default();
        self.broadcast(fd, &held);
        let why = if result == 0 {
            "hung up".to_string()
        } else {
            format!("closed: {}", strerror(-result as c_int))
        };
        self.leaving.push_back((fd, why));
    }

    /// Sends the complete lines of what `fd` sent (after what it held) to the others, and
    /// holds the unfinished rest.
    fn relay(&mut self, fd: RawFd, bytes: &[u8]) {
        let held = self.held.take(fd).unwrap_or_default();
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        buffer.extend_from_slice(&held);
        buffer.extend_from_slice(bytes);
        let end = match buffer.iter().rposition(|&byte| byte == b'\n') {
            Some(newline) => newline + 1,
            None => 0,
        };
        let (lines, unfinished) = buffer.split_at(end);
        if unfinished.len() > LINE_HOLD_LIMIT {
            self.broadcast(fd, &buffer);
        } else {
            self.broadcast(fd, lines);
            self.hold(fd, unfinished);
        }
        self.buffer = buffer;
    }

    /// Keeps `bytes` (an unfinished line of `fd`, possibly empty) until its end comes, or
    /// `LINE_HOLD` passes without news from `fd`.
    fn hold(&mut self, fd: RawFd, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.held.put(fd, bytes.to_vec());
        if !self.held.armed {
            self.held.arm(LINE_HOLD);
        }
    }

    /// The hold timer's handler: sends the unfinished lines whose client is being read and
    /// has been quiet for `LINE_HOLD` since it was last read or resumed (the end of a paused
    /// client's line, or of one whose bytes wait to be read, may be in its socket), at most
    /// `RELEASE_BUDGET` bytes of them per run.
    fn release_held_lines(&mut self) {
        self.held.disarm();
        let now = Instant::now();
        let mut next = None::<Duration>;
        let mut released = 0;
        for fd in self.held.holders.clone() {
            if released >= RELEASE_BUDGET {
                next = Some(Duration::ZERO); // the rest after the flow events, at once
                break;
            }
            let Some(since) = self.held.since(fd) else {
                continue;
            };
            let quiet_for = now.saturating_duration_since(since.max(self.resumed_at));
            if self.reading_paused(fd) || quiet_for < LINE_HOLD || bytes_waiting(fd) {
                let wait = match LINE_HOLD.checked_sub(quiet_for) {
                    Some(left) if !left.is_zero() => left,
                    _ => LINE_HOLD, // paused, or its bytes wait: look again later
                };
                next = Some(next.map_or(wait, |next| next.min(wait)));
            } else if let Some(bytes) = self.held.take(fd) {
                released += bytes.len();
                self.broadcast(fd, &bytes);
            }
        }
        if let Some(wait) = next {
            self.held.arm(wait);
        }
        self.finish_leaving();
    }

    /// Whether the server has paused reading `fd` (some other client is behind).
    fn reading_paused(&self, fd: RawFd) -> bool {
        self.congested.iter().any(|&client| client != fd)
    }

    /// Sends `bytes` to every client of the room but `sender`. A target past the send limit
    /// is dropped as too slow: it leaves the room at once, so that nothing more is sent to
    /// it, and is closed later by `finish_leaving` (never from in here).
    fn broadcast(&mut self, sender: RawFd, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.targets.clear();
        self.targets
            .extend(self.clients.iter().copied().filter(|&fd| fd != sender));
        self.results.clear();
        self.results.resize(self.targets.len(), 0);
        // SAFETY: the lists hold `targets.len()` ints each; `bytes` is a live slice.
        let status = unsafe {
            ffi::broadcastViaProactor(
                self.proactor,
                self.targets.as_ptr(),
                self.targets.len(),
                bytes.as_ptr().cast(),
                bytes.len(),
                self.results.as_mut_ptr(),
            )
        };
        if status == 0 {
            return;
        }
        // SAFETY: the proactor is live.
        let limit = unsafe { ffi::getProactorSendLimit(self.proactor) };
        // Other failures (EPIPE, ECONNRESET) are the target's own hang-up, which its handler
        // sees and handles.
        for index in 0..self.targets.len() {
            if self.results[index] == libc::ENOBUFS {
                let fd = self.targets[index];
                self.drop_client(
                    fd,
                    format!("too slow (over {limit} bytes queued), disconnected"),
                );
            }
        }
    }

    /// Disconnects a client the room cannot wait for (stalled, too slow, lagging): it leaves
    /// the room first, its unfinished line is discarded (it goes to nobody), and it joins
    /// the work list that `finish_leaving` closes. Once per client: a client that has left
    /// already is not dropped again.
    fn drop_client(&mut self, fd: RawFd, why: String) {
        if self.leave_room(fd) {
            self.held.take(fd);
            self.leaving.push_back((fd, why));
        }
    }

    /// Closes every client that has left the room, once each, with its one log line. The
    /// outermost caller of each handler runs it when the handler's work is done, so that no
    /// drop ever runs inside a broadcast or another drop.
    fn finish_leaving(&mut self) {
        while let Some((fd, why)) = self.leaving.pop_front() {
            self.close_client(fd);
            log!("socket {fd} {why}");
        }
    }

    /// A flow event of a client's queued output.
    fn on_flow(&mut self, fd: RawFd, event: c_int) {
        if !self.is_member(fd) {
            return; // left the room already: its events mean nothing now
        }
        match event {
            ffi::FLOW_HIGH => self.set_congested(fd, true),
            ffi::FLOW_DRAINED => self.set_congested(fd, false),
            ffi::FLOW_STALLED => self.drop_client(
                fd,
                format!(
                    "stalled (no progress for {} s), disconnected",
                    self.stall_timeout_text
                ),
            ),
            // A reader too slow to catch up: the room resumes as it leaves the congested set.
            ffi::FLOW_LAGGING => self.drop_client(
                fd,
                format!(
                    "too slow (congested for {} s), disconnected",
                    self.max_lag_text
                ),
            ),
            _ => {}
        }
        self.finish_leaving();
    }

    /// Marks a client as behind (its queue is above the high watermark) or not, and pauses
    /// or resumes the readers this changes: a client reads only while no other client is
    /// behind. Only the changes between none, one and two clients behind touch any reader.
    fn set_congested(&mut self, fd: RawFd, behind: bool) {
        let before = self.congested.len();
        match self.congested.iter().position(|&client| client == fd) {
            Some(index) if !behind => {
                self.congested.swap_remove(index);
            }
            None if behind => self.congested.push(fd),
            _ => return,
        }
        let proactor = self.proactor;
        // SAFETY (both closures): the proactor is live; an fd that is no longer registered
        // gives ENOENT, which changes nothing.
        let pause = |fd: RawFd| unsafe { ffi::pauseProactorReading(proactor, fd) };
        let resume = |fd: RawFd| unsafe { ffi::resumeProactorReading(proactor, fd) };
        match (before, self.congested.len()) {
            // The first one behind: everybody else waits for it.
            (0, 1) => self.clients.iter().filter(|&&c| c != fd).for_each(|&c| {
                pause(c);
            }),
            // A second one: the first waits too, since its bytes go to the second.
            (1, 2) => self.congested.iter().for_each(|&c| {
                pause(c);
            }),
            // One left behind: it may send again, to the others, which keep up.
            (2, 1) => {
                resume(self.congested[0]);
                self.resumed_at = Instant::now();
            }
            // Nobody behind any more.
            (1, 0) => {
                self.clients.iter().for_each(|&c| {
                    resume(c);
                });
                self.resumed_at = Instant::now();
            }
            _ => {}
        }
    }

    /// Whether `fd` is a client of the room.
    fn is_member(&self, fd: RawFd) -> bool {
        usize::try_from(fd)
            .ok()
            .and_then(|index| self.members.get(index))
            .is_some_and(Option::is_some)
    }

    /// Adds a new client to the room.
    fn join_room(&mut self, fd: RawFd, address: AddressKey) {
        let Ok(index) = usize::try_from(fd) else {
            return;
        };
        if index >= self.members.len() {
            self.members.resize(index + 1, None);
        }
        self.members[index] = Some(Member {
            position: self.clients.len(),
            address,
        });
        self.clients.push(fd);
        *self.per_address.entry(address).or_insert(0) += 1;
    }

    /// Takes a client out of the room (the clients list, its address's count, and the
    /// congested set, which may resume the others), before anything else is sent; false if
    /// it was not in it.
    fn leave_room(&mut self, fd: RawFd) -> bool {
        let Some(member) = usize::try_from(fd)
            .ok()
            .and_then(|index| self.members.get_mut(index))
            .and_then(Option::take)
        else {
            return false;
        };
        self.clients.swap_remove(member.position);
        if let Some(&moved) = self.clients.get(member.position) {
            if let Some(Some(other)) = self.members.get_mut(moved as usize) {
                other.position = member.position;
            }
        }
        if let Some(count) = self.per_address.get_mut(&member.address) {
            *count -= 1;
            if *count == 0 {
                self.per_address.remove(&member.address);
            }
        }
        self.set_congested(fd, false);
        true
    }

    /// Stops watching a client that has left the room (freeing its queued output) and closes
    /// it. Only `finish_leaving` and the shutdown call it, once per client.
    fn close_client(&mut self, fd: RawFd) {
        // SAFETY: the proactor is live; `fd` is a client this server accepted and owns, and
        // it is closed here only once (it left the room once).
        unsafe {
            ffi::removeHandler(self.proactor, fd);
            libc::close(fd);
        }
    }
}

unsafe extern "C" fn on_accepted(
    _proactor: *mut c_void,
    _listen_fd: c_int,
    fd: c_int,
    peer: *const libc::sockaddr,
    peer_len: libc::socklen_t,
    context: *mut c_void,
) {
    // SAFETY: the library passes `peer_len` readable bytes at `peer` (or NULL) for this call.
    let address = unsafe { copy_peer(peer, peer_len) };
    // SAFETY: the context is the Server registered with this handler; handlers run one at a
    // time, so this is the only reference in use.
    unsafe { &mut *context.cast::<Server>() }.accepted(fd, &address);
}

unsafe extern "C" fn on_received(
    _proactor: *mut c_void,
    fd: c_int,
    result: libc::ssize_t,
    data: *const c_void,
    context: *mut c_void,
) {
    let bytes: &[u8] = if result > 0 && !data.is_null() {
        // SAFETY: the library passes `result` readable bytes at `data`, valid for this call.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), result as usize) }
    } else {
        &[]
    };
    // SAFETY: as in `on_accepted`.
    unsafe { &mut *context.cast::<Server>() }.received(fd, result, bytes);
}

unsafe extern "C" fn on_hold_timer(_proactor: *mut c_void, _fd: c_int, context: *mut c_void) {
    // SAFETY: as in `on_accepted`.
    unsafe { &mut *context.cast::<Server>() }.release_held_lines();
}

unsafe extern "C" fn on_flow(
    _proactor: *mut c_void,
    fd: c_int,
    event: c_int,
    _queued: usize,
    context: *mut c_void,
) {
    // SAFETY: as in `on_accepted`: flow handlers run on the loop thread too, one at a time.
    unsafe { &mut *context.cast::<Server>() }.on_flow(fd, event);
}

extern "C" fn on_stop_signal(_signal: c_int) {
    // Async-signal-safe: an atomic load and the library's async-signal-safe stop request.
    let proactor = PROACTOR.load(Ordering::SeqCst);
    if !proactor.is_null() {
        // SAFETY: the proactor stays alive until after the signals are reset to default.
        unsafe { ffi::requestCancelProactor(proactor) };
    }
}

/// Blocks or unblocks SIGINT and SIGTERM for this thread; a signal that came while they
/// were blocked is delivered when they are unblocked.
fn block_stop_signals(block: bool) {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, ptr::null_mut());
    }
}

/// Sets `action` for `signal` (a handler address or SIG_IGN). The stop handlers stay until
/// the end: they find no proactor once shutdown has begun, and do nothing.
fn set_signal(signal: c_int, action: libc::sighandler_t) {
    // SAFETY: sigaction is plain data; the handler, if any, is async-signal-safe.
    unsafe {
        let mut setting: libc::sigaction = std::mem::zeroed();
        setting.sa_sigaction = action;
        libc::sigemptyset(&mut setting.sa_mask);
        libc::sigaction(signal, &setting, ptr::null_mut());
    }
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(Some(options)) => options,
        Ok(None) => {
            let _ = writeln!(std::io::stdout().lock(), "{}", help());
            return ExitCode::SUCCESS;
        }
        Err((status, message)) => {
            complain!("{message}");
            return ExitCode::from(status);
        }
    };
    let port = options.port;
    set_signal(libc::SIGPIPE, libc::SIG_IGN);
    raise_fd_limit();
    let listener = match listen_on(options.bind.as_deref(), &port) {
        Ok(fd) => fd,
        Err(error) => {
            let place = match &options.bind {
                Some(address) => format!("{address} port {port}"),
                None => format!("port {port}"),
            };
            complain!("{NAME}: cannot listen on {place}: {}", error.why());
            return ExitCode::from(1);
        }
    };
    let held = match HeldLines::new() {
        Ok(held) => held,
        Err(code) => {
            complain!("{NAME}: cannot make a timer: {}", strerror(code));
            return ExitCode::from(1);
        }
    };
    // SAFETY: plain call; NULL is reported below.
    let proactor = unsafe { ffi::createProactor() };
    if proactor.is_null() {
        complain!("{NAME}: cannot create the proactor: {}", strerror(errno()));
        return ExitCode::from(1);
    }
    let mut server = Box::new(Server {
        proactor,
        listener,
        clients: Vec::new(),
        members: Vec::new(),
        limits: options.limits,
        per_address: HashMap::new(),
        refusal_logs: Default::default(),
        leaving: VecDeque::new(),
        buffer: Vec::new(),
        targets: Vec::new(),
        results: Vec::new(),
        descriptors_exhausted: false,
        congested: Vec::new(),
        resumed_at: Instant::now(),
        stall_timeout_text: options.stall_timeout.text,
        max_lag_text: options.max_lag.text,
        held,
    });
    let context = (&mut *server as *mut Server).cast::<c_void>();
    // SAFETY: the proactor is live; `server` outlives the loop (it is dropped after destroy).
    unsafe {
        ffi::setProactorStallTimeout(proactor, options.stall_timeout.ms);
        ffi::setProactorLagTimeout(proactor, options.max_lag.ms);
        ffi::setProactorFlowHandler(proactor, Some(on_flow), context);
    }
    // SAFETY: the proactor is live; `server` outlives the loop (it is dropped after destroy).
    if unsafe { ffi::acceptViaProactor(proactor, listener, Some(on_accepted), context) } != 0 {
        complain!(
            "{NAME}: cannot accept on the listener: {}",
            strerror(errno())
        );
        return ExitCode::from(1);
    }
    let timer = server.held.timer;
    // SAFETY: as above.
    if unsafe { ffi::addFD2ProactorWithContext(proactor, timer, Some(on_hold_timer), context) } != 0
    {
        complain!("{NAME}: cannot watch the timer: {}", strerror(errno()));
        return ExitCode::from(1);
    }
    PROACTOR.store(proactor, Ordering::SeqCst);
    // A stop request only reaches a running loop: signals wait until the loop runs.
    block_stop_signals(true);
    // Started with the stop signals blocked, which it inherits: they reach only this thread.
    if let Err(error) = start_log_writer() {
        complain!("{NAME}: cannot start the log writer: {error}");
        return ExitCode::from(1);
    }
    let stop_handler = on_stop_signal as extern "C" fn(c_int) as *const () as libc::sighandler_t;
    set_signal(libc::SIGINT, stop_handler);
    set_signal(libc::SIGTERM, stop_handler);
    // SAFETY: the proactor is live.
    if unsafe { ffi::runProactor(proactor) } != 0 {
        complain!("{NAME}: cannot start the loop: {}", strerror(errno()));
        return ExitCode::from(1);
    }
    block_stop_signals(false);
    // SAFETY: the proactor is live; the backend name is a static C string.
    let backend = unsafe { CStr::from_ptr(ffi::getProactorBackend(proactor).cast::<c_char>()) };
    log!(
        "listening on port {} (backend {})",
        local_port(listener),
        backend.to_string_lossy()
    );

    // SAFETY: the proactor is live; this thread is not its loop thread.
    unsafe { ffi::waitProactor(proactor) };
    shut_down(&mut server)
}

/// After the loop stopped: close the listener and every client, free the proactor.
fn shut_down(server: &mut Server) -> ExitCode {
    let count = server.clients.len();
    // SAFETY: the loop has stopped, so no handler uses `server`; the fds are ours.
    unsafe {
        ffi::removeHandler(server.proactor, server.listener);
        libc::close(server.listener);
        ffi::removeHandler(server.proactor, server.held.timer);
        libc::close(server.held.timer);
    }
    while let Some(&fd) = server.clients.last() {
        server.leave_room(fd);
        server.close_client(fd);
    }
    PROACTOR.store(ptr::null_mut(), Ordering::SeqCst);
    // SAFETY: the proactor is live and destroyed once; nothing uses it afterwards.
    unsafe { ffi::destroyProactor(server.proactor) };
    log!("shutting down ({count} clients closed)");
    // Exiting ends a writer still blocked on stdout; nothing here waits for stdout longer.
    drain_log();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    //! The pure parts: `cargo test --example proact_server` runs these.
    use super::*;

    fn storage_of(ip: IpAddr) -> libc::sockaddr_storage {
        // SAFETY: sockaddr_storage is plain data, for which all-zero is valid.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        match ip {
            IpAddr::V4(v4) => {
                // SAFETY: sockaddr_storage is big enough and aligned for a sockaddr_in.
                let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_addr.s_addr = u32::from(v4).to_be();
            }
            IpAddr::V6(v6) => {
                // SAFETY: sockaddr_storage is big enough and aligned for a sockaddr_in6.
                let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_addr.s6_addr = v6.octets();
            }
        }
        storage
    }

    fn key(text: &str) -> AddressKey {
        address_key(&storage_of(text.parse().unwrap()))
    }

    #[test]
    fn an_ipv4_client_counts_the_same_plain_or_mapped() {
        assert_eq!(key("192.0.2.7"), key("::ffff:192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("::"), key("0.0.0.0"));
    }

    #[test]
    fn counts_take_digits_only() {
        assert_eq!(parse_count("0"), Some(0));
        assert_eq!(parse_count("4294967295"), Some(u32::MAX));
        for bad in ["", "-1", "+1", "1.5", "4294967296", "1 "] {
            assert_eq!(parse_count(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn seconds_round_up_to_milliseconds() {
        assert_eq!(parse_seconds("10"), Some(10_000));
        assert_eq!(parse_seconds("2.5"), Some(2_500));
        assert_eq!(parse_seconds(".0001"), Some(1));
        for bad in ["", ".", "1.5x", "-1", "1e3", "99999999"] {
            assert_eq!(parse_seconds(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn refusals_are_reported_once_a_second_with_the_count_between() {
        let mut log = RefusalLog::default();
        let start = Instant::now();
        assert_eq!(log.report(start), Some(0));
        assert_eq!(log.report(start + Duration::from_millis(10)), None);
        assert_eq!(log.report(start + Duration::from_millis(999)), None);
        assert_eq!(log.report(start + Duration::from_secs(1)), Some(2));
        assert_eq!(log.report(start + Duration::from_secs(3)), Some(0));
    }

    #[test]
    fn a_full_log_counts_its_dropped_lines_and_reports_them_first() {
        let mut state = LogState {
            pending: Vec::new(),
            writing: 0,
            dropped: 0,
            writer_idle: false,
        };
        let line = vec![b'x'; 1000];
        for _ in 0..70 {
            state.store(&line);
        }
        assert_eq!(state.pending.len(), 65 * 1000);
        assert_eq!(state.dropped, 5);
        state.pending.clear(); // the writer took it all
        state.store(b"next\n");
        let text = String::from_utf8(state.pending.clone()).unwrap();
        assert_eq!(text, format!("{NAME}: 5 log lines dropped\nnext\n"));
        assert_eq!(state.dropped, 0);
    }
}
