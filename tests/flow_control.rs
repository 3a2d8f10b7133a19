//! Flow control over real sockets (Unix stream pairs and TCP on 127.0.0.1), on the backend
//! `ST_PROACTOR_BACKEND` names (the Makefile runs this file once per backend): the watermark
//! events (`High`, `Drained`), pausing and resuming input, and stall detection (`Stalled`).
//! Each test checks one rule of the flow-control API, named in its doc comment.
//!
//! Timing: every wait is bounded by `PATIENCE`; delays are bounded upward generously, while a
//! "not before" is checked exactly (a lower bound cannot fail on a slow machine); "this does
//! not happen" is watched for a bounded quiet period.
//!
//! Drop order: a test declares its sockets before its proactor, so that the proactor (and its
//! loop) is gone before the sockets are closed.

mod common;

use common::{errno, join_all, last_errno, pattern, wait_until, PATIENCE};
use st_proactor::{
    FlowEvent, FlowEventKind, Proactor, DEFAULT_HIGH_WATERMARK, DEFAULT_LOW_WATERMARK,
    MESSAGE_OVERHEAD,
};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The longest any test waits for anything: a bound against hangs, generous for a loaded
/// 2-core machine; passing tests finish far sooner.
/// How long a test watches for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);
/// How late a `Stalled` event may be, beyond the stall timeout.
const STALL_MARGIN: Duration = Duration::from_secs(5);
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Sockets

fn set_int_option(fd: RawFd, level: i32, name: i32, value: i32) {
    // SAFETY: `value` is a live int of the size given, for a socket the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
}

fn set_timeout_option(fd: RawFd, name: i32, timeout: Duration) {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: `value` is a live timeval of the size given, for a socket the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// The peer of a registered socket, driven by the test: blocking, each read and write
/// bounded by `PATIENCE` (SO_RCVTIMEO, SO_SNDTIMEO).
struct Remote(OwnedFd);

impl Remote {
    fn new(fd: OwnedFd) -> Remote {
        set_timeout_option(fd.as_raw_fd(), libc::SO_RCVTIMEO, PATIENCE);
        set_timeout_option(fd.as_raw_fd(), libc::SO_SNDTIMEO, PATIENCE);
        Remote(fd)
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn write_all(&self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            // SAFETY: sends from a live slice of the length given.
            let n = unsafe {
                libc::send(
                    self.fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                assert_eq!(err.kind(), io::ErrorKind::Interrupted, "write to the peer");
                continue;
            }
            rest = &rest[n as usize..];
        }
    }

    /// One blocking read of at most `buffer.len()` bytes (bounded by `PATIENCE`); 0 at the
    /// end of the stream.
    fn read_some(&self, buffer: &mut [u8]) -> usize {
        loop {
            // SAFETY: reads into a live buffer of the length given.
            let n = unsafe { libc::recv(self.fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            if n >= 0 {
                return n as usize;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => panic!("nothing arrived within {PATIENCE:?}"),
                _ => panic!("read from the peer: {err}"),
            }
        }
    }

    /// Reads exactly `len` bytes, failing the test when they do not come within `PATIENCE`.
    fn read_exact(&self, len: usize) -> Vec<u8> {
        let deadline = Instant::now() + PATIENCE;
        let mut received = vec![0u8; len];
        let mut got = 0;
        while got < len {
            assert!(
                Instant::now() < deadline,
                "read {got} of {len} bytes within {PATIENCE:?}"
            );
            let n = self.read_some(&mut received[got..]);
            assert!(n > 0, "the stream ended after {got} of {len} bytes");
            got += n;
        }
        received
    }

    /// Reads, without waiting, all the bytes there are now; returns how many.
    fn read_available(&self) -> usize {
        let mut buffer = vec![0u8; 256 * KIB];
        let mut total = 0;
        loop {
            // SAFETY: reads into a live buffer of the length given.
            let n = unsafe {
                libc::recv(
                    self.fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                total += n as usize;
                continue;
            }
            if n < 0 && last_errno() == libc::EINTR {
                continue;
            }
            return total;
        }
    }

    /// Closes the socket with an RST (SO_LINGER with a zero timeout) instead of a FIN.
    fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `linger` is a live struct of the size given, for a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
        drop(self);
    }
}

/// A connected stream socket pair: `local` (non-blocking) is what the proactor handles,
/// `remote` its peer.
struct Pair {
    kind: &'static str,
    local: OwnedFd,
    remote: Remote,
}

impl Pair {
    fn fd(&self) -> RawFd {
        self.local.as_raw_fd()
    }
}

fn unix_pair() -> Pair {
    let (local, remote) = UnixStream::pair().expect("socketpair");
    local.set_nonblocking(true).unwrap();
    Pair {
        kind: "unix",
        local: OwnedFd::from(local),
        remote: Remote::new(OwnedFd::from(remote)),
    }
}

/// A TCP connection on 127.0.0.1 with small socket buffers (64 KiB asked for on the
/// writing side and on the reading one), so that it fills up after a few hundred KiB as a
/// Unix pair does, instead of after the megabytes loopback autotuning allows.
fn tcp_pair() -> Pair {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let remote = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (local, _) = listener.accept().expect("accept");
    local.set_nonblocking(true).unwrap();
    local.set_nodelay(true).unwrap();
    set_int_option(
        local.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        64 * KIB as i32,
    );
    set_int_option(
        remote.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        64 * KIB as i32,
    );
    Pair {
        kind: "tcp",
        local: OwnedFd::from(local),
        remote: Remote::new(OwnedFd::from(remote)),
    }
}

/// Writes to `fd` directly (not through a proactor) until its socket takes no more; returns
/// how many bytes it took. On a Unix stream socket, nothing more can then be written until
/// the peer reads.
fn fill_socket(fd: RawFd) -> usize {
    let chunk = vec![b'f'; 64 * KIB];
    let mut total = 0;
    loop {
        // SAFETY: sends from a live buffer of the length given.
        let n = unsafe {
            libc::send(
                fd,
                chunk.as_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            total += n as usize;
            continue;
        }
        match last_errno() {
            libc::EINTR => continue,
            libc::EAGAIN => return total,
            other => panic!("filling the socket: errno {other}"),
        }
    }
}

/// Bytes waiting to be read in `fd`'s socket.
fn pending_input(fd: RawFd) -> usize {
    let mut count: libc::c_int = 0;
    // SAFETY: FIONREAD stores an int into the live `count`.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut count) };
    assert_eq!(rc, 0, "FIONREAD: {}", io::Error::last_os_error());
    count as usize
}

/// Whether `fd`'s peer has closed or reset the connection (seen from this side, now).
fn peer_has_hung_up(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: polls one live pollfd without waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

// ---------------------------------------------------------------------------------------
// Flow events

/// A flow event as the flow handler saw it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    event: FlowEvent,
    at: Instant,
    on_loop_thread: bool,
}

/// Sets a flow handler that passes every event on, with when and where it came.
fn record_flow_events(proactor: &Proactor) -> Receiver<Seen> {
    let (sender, receiver) = mpsc::channel();
    proactor.set_flow_handler(move |event| {
        let on_loop_thread = thread::current().name() == Some("st_proactor");
        let _ = sender.send(Seen {
            event,
            at: Instant::now(),
            on_loop_thread,
        });
    });
    receiver
}

/// The next flow event, which must be `kind` for `fd` and come on the loop thread within
/// `PATIENCE`.
fn expect_event(events: &Receiver<Seen>, fd: RawFd, kind: FlowEventKind, what: &str) -> Seen {
    let seen = match events.recv_timeout(PATIENCE) {
        Ok(seen) => seen,
        Err(err) => panic!("{what}: no {kind:?} event for fd {fd} within {PATIENCE:?} ({err})"),
    };
    assert_eq!(
        (seen.event.fd, seen.event.kind),
        (fd, kind),
        "{what}: got {:?} instead",
        seen.event
    );
    assert!(
        seen.on_loop_thread,
        "{what}: the event was delivered on another thread than the loop's"
    );
    seen
}

/// Fails the test if a flow event comes within `quiet`.
fn assert_no_event(events: &Receiver<Seen>, quiet: Duration, what: &str) {
    match events.recv_timeout(quiet) {
        Ok(seen) => panic!("{what}: unexpected flow event {:?}", seen.event),
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
    }
}

/// The next event of `kind` within `within` (events of other kinds are skipped), if any.
fn wait_event(events: &Receiver<Seen>, kind: FlowEventKind, within: Duration) -> Option<Seen> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(seen) if seen.event.kind == kind => {
                assert!(
                    seen.on_loop_thread,
                    "{kind:?} delivered off the loop thread"
                );
                return Some(seen);
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Hands `data` to the proactor for `fd` in sends of `chunk` bytes.
fn send_in_chunks(proactor: &Proactor, fd: RawFd, data: &[u8], chunk: usize) {
    for piece in data.chunks(chunk) {
        proactor.send(fd, piece).expect("send");
    }
}

// ---------------------------------------------------------------------------------------
// Input

#[derive(Debug, PartialEq, Eq)]
enum Input {
    Data(Vec<u8>),
    End,
    Error(i32),
}

/// A readiness handler that reads what is there (one recv of up to 64 KiB per call) and
/// passes it on; at the end of the stream or on an error it passes that on and removes its
/// fd, so that a hung-up fd is not called on every loop turn.
fn reading_handler(proactor: &Arc<Proactor>, inputs: Sender<Input>) -> impl FnMut(RawFd) + Send {
    let weak = Arc::downgrade(proactor);
    move |fd| {
        let mut buffer = vec![0u8; 64 * KIB];
        // SAFETY: reads into a live buffer of the length given.
        let n = unsafe {
            libc::recv(
                fd,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let input = match n {
            1.. => Input::Data(buffer[..n as usize].to_vec()),
            0 => Input::End,
            _ => match last_errno() {
                libc::EAGAIN | libc::EINTR => return,
                other => Input::Error(other),
            },
        };
        let last = !matches!(input, Input::Data(_));
        let _ = inputs.send(input);
        if last {
            if let Some(proactor) = weak.upgrade() {
                let _ = proactor.remove(fd);
            }
        }
    }
}

/// Collects `Data` inputs until there are `len` bytes, failing on anything else or after
/// `PATIENCE`.
fn receive_bytes(inputs: &Receiver<Input>, len: usize, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + PATIENCE;
    let mut received = Vec::new();
    while received.len() < len {
        let left = deadline.saturating_duration_since(Instant::now());
        match inputs.recv_timeout(left) {
            Ok(Input::Data(bytes)) => received.extend_from_slice(&bytes),
            Ok(other) => panic!("{what}: {other:?} after {} of {len} bytes", received.len()),
            Err(err) => panic!(
                "{what}: {} of {len} bytes within {PATIENCE:?} ({err})",
                received.len()
            ),
        }
    }
    assert_eq!(received.len(), len, "{what}: more bytes than sent");
    received
}

fn next_input(inputs: &Receiver<Input>, what: &str) -> Input {
    inputs
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|err| panic!("{what}: no handler call within {PATIENCE:?} ({err})"))
}

fn assert_no_input(inputs: &Receiver<Input>, what: &str) {
    match inputs.try_recv() {
        Ok(input) => panic!("{what}: the handler was called and read {input:?}"),
        Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
    }
}

// ---------------------------------------------------------------------------------------
// The loop thread's CPU time

/// The kernel thread id of the proactor's loop thread (the loop must be running).
fn loop_thread_id(proactor: &Proactor) -> i32 {
    let (reader, writer) = UnixStream::pair().unwrap();
    let (sender, receiver) = mpsc::channel();
    proactor
        .add(reader.as_raw_fd(), move |fd| {
            let mut byte = [0u8; 1];
            // SAFETY: reads one byte into a live buffer from the registered socket.
            unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
            // SAFETY: gettid has no preconditions.
            let _ = sender.send(unsafe { libc::gettid() });
        })
        .unwrap();
    io::Write::write_all(&mut &writer, b"?").unwrap();
    let tid = receiver
        .recv_timeout(PATIENCE)
        .expect("the loop thread called the probe");
    proactor.remove(reader.as_raw_fd()).unwrap();
    tid
}

/// Returns after the loop has gone through two turns, each with a handler call: whatever
/// was due to the loop before this call has been done.
fn loop_turns(proactor: &Proactor) {
    loop_thread_id(proactor);
    loop_thread_id(proactor);
}

/// CPU time (user and system) thread `tid` of this process has used so far.
fn thread_cpu_time(tid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .expect("the loop thread's stat");
    // The fields after the name (which is in parentheses): state is field 3, utime 14,
    // stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf takes no pointer.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Watches thread `tid` for about a second and fails if it used more than a fifth of that
/// in CPU: a loop spinning on a ready fd uses all of it (far less than a fifth only on a
/// machine so loaded that the test cannot tell); an idle one uses next to nothing.
fn assert_thread_idle(tid: i32, what: &str) {
    let before = thread_cpu_time(tid);
    let started = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let used = thread_cpu_time(tid).saturating_sub(before);
    let wall = started.elapsed();
    assert!(
        used * 5 < wall,
        "{what}: the loop thread used {used:?} of CPU in {wall:?}: a busy loop"
    );
}

// =======================================================================================
// Watermarks: High and Drained

/// Rule: the defaults are 256 KiB (low) and 1 MiB (high); exactly one High when an fd's
/// queued bytes rise above high, however many sends follow while it stays above; exactly
/// one Drained when the reader brings them down to low; then a new crossing gives a new
/// pair. Events come on the loop thread with a plausible `queued`.
#[test]
fn one_high_above_the_high_mark_one_drained_at_the_low_mark_and_again_per_crossing() {
    for pair in [unix_pair(), tcp_pair()] {
        let kind = pair.kind;
        let proactor = Proactor::new().unwrap();
        assert_eq!(
            (DEFAULT_LOW_WATERMARK, DEFAULT_HIGH_WATERMARK),
            (256 * KIB, MIB)
        );
        assert_eq!(
            proactor.watermarks(),
            (DEFAULT_LOW_WATERMARK, DEFAULT_HIGH_WATERMARK)
        );
        let events = record_flow_events(&proactor);
        let fd = pair.fd();
        proactor.add(fd, |_fd| {}).unwrap();
        proactor.run().unwrap();
        for round in 0..2 {
            // 32 sends of 64 KiB: the socket takes a few hundred KiB, the rest waits.
            let data = pattern(2 * MIB, round);
            let sends = data.len() / (64 * KIB);
            send_in_chunks(&proactor, fd, &data, 64 * KIB);
            let high = expect_event(&events, fd, FlowEventKind::High, kind);
            assert!(
                high.event.queued > DEFAULT_HIGH_WATERMARK
                    && high.event.queued <= data.len() + sends * MESSAGE_OVERHEAD,
                "{kind}: High with {} bytes queued",
                high.event.queued
            );
            // More sends while above high: no second High.
            let more = pattern(256 * KIB, round + 10);
            send_in_chunks(&proactor, fd, &more, 64 * KIB);
            assert!(proactor.queued_bytes(fd).unwrap() > DEFAULT_HIGH_WATERMARK);
            assert_no_event(&events, QUIET, "sends while above high");
            // The reader reads everything: one Drained.
            let received = pair.remote.read_exact(data.len() + more.len());
            assert!(received[..data.len()] == data[..], "{kind}: bytes in order");
            assert!(received[data.len()..] == more[..], "{kind}: bytes in order");
            let drained = expect_event(&events, fd, FlowEventKind::Drained, kind);
            assert!(
                drained.event.queued <= DEFAULT_LOW_WATERMARK,
                "{kind}: Drained with {} bytes queued",
                drained.event.queued
            );
            assert!(drained.at >= high.at);
            wait_until("the queue is empty", || {
                proactor.queued_bytes(fd).unwrap() == 0
            });
            assert_no_event(&events, QUIET, "after Drained");
        }
    }
}

/// Rule: High means strictly above the high mark, in bytes counted as `queued_bytes` counts
/// them (each message's bytes plus 64): a queue of exactly `high` gives nothing, one byte
/// more gives High carrying that count; set_watermarks applies to an fd already registered.
#[test]
fn high_is_strictly_above_the_mark_counted_as_queued_bytes_counts() {
    let pair = unix_pair();
    let proactor = Proactor::new().unwrap();
    let events = record_flow_events(&proactor);
    let fd = pair.fd();
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.run().unwrap();
    // A full socket: nothing handed to the proactor can be written, so its queue is exact.
    let filled = fill_socket(fd);
    let message = vec![b'm'; 1000];
    let high = 5 * (message.len() + MESSAGE_OVERHEAD);
    proactor.set_watermarks(1000, high).unwrap();
    assert_eq!(proactor.watermarks(), (1000, high));
    for _ in 0..5 {
        proactor.send(fd, &message).unwrap();
    }
    assert_eq!(proactor.queued_bytes(fd).unwrap(), high);
    assert_no_event(&events, QUIET, "a queue of exactly the high mark");
    proactor.send(fd, b"!").unwrap();
    let crossing = expect_event(&events, fd, FlowEventKind::High, "one byte above");
    assert_eq!(crossing.event.queued, high + 1 + MESSAGE_OVERHEAD);
    let received = pair.remote.read_exact(filled + 5 * message.len() + 1);
    assert_eq!(received.last(), Some(&b'!'));
    let drained = expect_event(&events, fd, FlowEventKind::Drained, "read all");
    assert!(drained.event.queued <= 1000, "{:?}", drained.event);
    assert_no_event(&events, QUIET, "after Drained");
}

/// Rule: set_watermarks fails with EINVAL when low > high and keeps the marks it had;
/// low == high is allowed.
#[test]
fn set_watermarks_refuses_low_above_high_and_keeps_the_marks() {
    let proactor = Proactor::new().unwrap();
    proactor.set_watermarks(1000, 5000).unwrap();
    assert_eq!(proactor.watermarks(), (1000, 5000));
    let err = proactor.set_watermarks(5001, 5000).unwrap_err();
    assert_eq!(errno(&err), libc::EINVAL);
    assert_eq!(proactor.watermarks(), (1000, 5000));
    proactor.set_watermarks(3000, 3000).unwrap();
    assert_eq!(proactor.watermarks(), (3000, 3000));
    proactor.set_watermarks(0, usize::MAX).unwrap();
    assert_eq!(proactor.watermarks(), (0, usize::MAX));
}

/// Rule: events only go to a flow handler that is set: none after clear_flow_handler, and
/// a handler set later is not handed the events that came while none was set (it gets the
/// events that come after).
#[test]
fn no_flow_events_without_a_handler_and_none_handed_late_to_a_new_one() {
    let pair = unix_pair();
    let proactor = Proactor::new().unwrap();
    let fd = pair.fd();
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.run().unwrap();
    let cleared = record_flow_events(&proactor);
    proactor.clear_flow_handler();
    send_in_chunks(&proactor, fd, &pattern(2 * MIB, 0), 64 * KIB);
    wait_until("the queue is above high", || {
        proactor.queued_bytes(fd).unwrap() > DEFAULT_HIGH_WATERMARK
    });
    // The loop has turned since the crossing: its High was due then, to no handler.
    loop_turns(&proactor);
    assert_no_event(&cleared, QUIET, "a cleared flow handler");
    let late = record_flow_events(&proactor);
    if let Ok(seen) = late.recv_timeout(QUIET) {
        assert_ne!(
            seen.event.kind,
            FlowEventKind::High,
            "the High of a crossing without a handler was handed to a later one"
        );
    }
    // A crossing with the handler set reaches it (a Drained of the first one may come first).
    pair.remote.read_exact(2 * MIB);
    wait_until("the queue is empty", || {
        proactor.queued_bytes(fd).unwrap() == 0
    });
    send_in_chunks(&proactor, fd, &pattern(2 * MIB, 1), 64 * KIB);
    let high = wait_event(&late, FlowEventKind::High, PATIENCE).expect("High to the new handler");
    assert_eq!(high.event.fd, fd);
    assert_no_event(&cleared, Duration::ZERO, "a cleared flow handler");
}

/// Rule: a queue dropped after a write error (the peer closed, or reset the connection)
/// falls to 0, which gives Drained for an fd that was above high.
#[test]
fn a_queue_dropped_because_the_peer_went_away_gives_drained() {
    for pair in [unix_pair(), tcp_pair()] {
        let kind = pair.kind;
        let fd = pair.fd();
        let Pair { local, remote, .. } = pair;
        let proactor = Proactor::new().unwrap();
        let events = record_flow_events(&proactor);
        proactor.add(fd, |_fd| {}).unwrap();
        proactor.run().unwrap();
        send_in_chunks(&proactor, fd, &pattern(2 * MIB, 0), 64 * KIB);
        expect_event(&events, fd, FlowEventKind::High, kind);
        // Unread bytes in its socket: closing the peer makes TCP send an RST.
        drop(remote);
        let drained = expect_event(&events, fd, FlowEventKind::Drained, kind);
        assert!(
            drained.event.queued <= DEFAULT_LOW_WATERMARK,
            "{kind}: {drained:?}"
        );
        assert_eq!(proactor.queued_bytes(fd).unwrap(), 0);
        let err = proactor.send(fd, b"more").unwrap_err();
        assert!(
            [libc::EPIPE, libc::ECONNRESET].contains(&errno(&err)),
            "{kind}: {err}"
        );
        proactor.remove(fd).unwrap();
        drop(proactor);
        drop(local);
    }
}

/// Rule: events of an fd removed before their delivery are dropped, also when the fd number
/// is registered again at once (the new registration has its own, empty, queue).
#[test]
fn flow_events_of_an_fd_removed_before_delivery_are_dropped() {
    let trigger = unix_pair();
    let removed = unix_pair();
    let renewed = unix_pair();
    let control = unix_pair();
    let proactor = Arc::new(Proactor::new().unwrap());
    let events = record_flow_events(&proactor);
    let (removed_fd, renewed_fd, control_fd) = (removed.fd(), renewed.fd(), control.fd());
    for fd in [removed_fd, renewed_fd, control_fd] {
        proactor.add(fd, |_fd| {}).unwrap();
    }
    let (done, steps) = mpsc::channel();
    let weak = Arc::downgrade(&proactor);
    proactor
        .add(trigger.fd(), move |fd| {
            let mut byte = [0u8; 1];
            // SAFETY: reads one byte into a live buffer from the registered socket.
            if unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) } != 1 {
                return;
            }
            let Some(proactor) = weak.upgrade() else {
                return;
            };
            let burst = vec![0u8; 2 * MIB]; // one send: above high at once
            let outcome = match byte[0] {
                b'1' => proactor
                    .send(removed_fd, &burst)
                    .and_then(|()| proactor.remove(removed_fd)),
                b'2' => proactor
                    .send(renewed_fd, &burst)
                    .and_then(|()| proactor.remove(renewed_fd))
                    .and_then(|()| proactor.add(renewed_fd, |_fd| {})),
                _ => proactor.send(control_fd, &burst),
            };
            let _ = done.send((byte[0], outcome.map_err(|err| err.to_string())));
        })
        .unwrap();
    proactor.run().unwrap();
    trigger.remote.write_all(b"123");
    for step in [b'1', b'2', b'3'] {
        let (seen, outcome) = steps.recv_timeout(PATIENCE).expect("the trigger's calls");
        assert_eq!((seen, outcome), (step, Ok(())));
    }
    // The control's High comes right after the third call; none came for the other two.
    expect_event(&events, control_fd, FlowEventKind::High, "the fd kept");
    assert_no_event(&events, QUIET, "after the control's High");
    assert_eq!(proactor.queued_bytes(renewed_fd).unwrap(), 0);
    assert!(proactor.queued_bytes(removed_fd).is_err());
}

/// Rule: watermarks are per fd: a broadcast that takes several fds above high gives each
/// of them its own High, and each its own Drained as its reader catches up.
#[test]
fn a_broadcast_that_takes_several_fds_above_high_gives_each_its_own_events() {
    let pairs: Vec<Pair> = (0..3).map(|_| unix_pair()).collect();
    let proactor = Proactor::new().unwrap();
    let events = record_flow_events(&proactor);
    let fds: Vec<RawFd> = pairs.iter().map(Pair::fd).collect();
    for &fd in &fds {
        proactor.add(fd, |_fd| {}).unwrap();
    }
    proactor.run().unwrap();
    for piece in pattern(2 * MIB, 0).chunks(64 * KIB) {
        assert!(
            proactor.broadcast(&fds, piece).is_empty(),
            "a broadcast failed"
        );
    }
    let mut highs: Vec<RawFd> = (0..3)
        .map(|_| {
            let seen = wait_event(&events, FlowEventKind::High, PATIENCE).expect("a High");
            assert!(seen.event.queued > DEFAULT_HIGH_WATERMARK, "{seen:?}");
            seen.event.fd
        })
        .collect();
    highs.sort();
    let mut expected = fds.clone();
    expected.sort();
    assert_eq!(highs, expected, "one High per fd");
    assert_no_event(&events, QUIET, "all three above high");
    // The readers catch up one after the other: a Drained each, in that order.
    for pair in &pairs {
        pair.remote.read_exact(2 * MIB);
        expect_event(
            &events,
            pair.fd(),
            FlowEventKind::Drained,
            "its reader caught up",
        );
    }
    assert_no_event(&events, QUIET, "after the three Drained");
}

/// Rule: a send from another thread that takes a waiting queue above high gives High,
/// though nothing else happens on the loop (the loop is woken for it).
#[test]
fn a_send_from_another_thread_that_crosses_high_wakes_the_loop_for_high() {
    let pair = unix_pair();
    let proactor = Arc::new(Proactor::new().unwrap());
    let events = record_flow_events(&proactor);
    let fd = pair.fd();
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.run().unwrap();
    // The loop sleeps, the output of `fd` waiting for room and under high.
    fill_socket(fd);
    proactor.send(fd, &vec![1u8; 64 * KIB]).unwrap();
    assert_no_event(&events, QUIET, "a queue under high");
    assert_eq!(
        proactor.queued_bytes(fd).unwrap(),
        64 * KIB + MESSAGE_OVERHEAD
    );
    let sender = {
        let proactor = Arc::clone(&proactor);
        thread::spawn(move || proactor.send(fd, &vec![2u8; MIB]))
    };
    join_all("the send", vec![sender])
        .pop()
        .unwrap()
        .expect("send");
    let high = expect_event(
        &events,
        fd,
        FlowEventKind::High,
        "a send from another thread",
    );
    assert_eq!(high.event.queued, 64 * KIB + MIB + 2 * MESSAGE_OVERHEAD);
}

/// Rule: an event caused by a handler's sends is delivered right after that handler
/// returns, before the next handler of the same loop turn runs.
#[test]
fn a_high_caused_by_a_handler_comes_before_the_next_handler_runs() {
    let sources = [unix_pair(), unix_pair()];
    let sinks = [unix_pair(), unix_pair()];
    let proactor = Arc::new(Proactor::new().unwrap());
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let log = Arc::clone(&log);
        proactor.set_flow_handler(move |event| {
            log.lock()
                .unwrap()
                .push(format!("{:?} {}", event.kind, event.fd));
        });
    }
    for (source, sink) in sources.iter().zip(&sinks) {
        proactor.add(sink.fd(), |_fd| {}).unwrap();
        let log = Arc::clone(&log);
        let weak = Arc::downgrade(&proactor);
        let sink_fd = sink.fd();
        proactor
            .add(source.fd(), move |fd| {
                let mut byte = [0u8; 1];
                // SAFETY: reads one byte into a live buffer from the registered socket.
                if unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) } != 1 {
                    return;
                }
                log.lock().unwrap().push(format!("call {sink_fd}"));
                if let Some(proactor) = weak.upgrade() {
                    let sent = proactor.send(sink_fd, &vec![0u8; 2 * MIB]);
                    log.lock().unwrap().push(format!("sent {}", sent.is_ok()));
                }
            })
            .unwrap();
    }
    // Both sources are ready before the loop starts: their calls come in one turn.
    for source in &sources {
        source.remote.write_all(b"x");
    }
    proactor.run().unwrap();
    wait_until("both calls and both events", || {
        log.lock().unwrap().len() >= 6
    });
    thread::sleep(QUIET); // nothing more comes
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 6, "{log:?}");
    for step in log.chunks(3) {
        let sink = step[0].strip_prefix("call ").expect("a call first");
        assert_eq!(
            step[1..],
            ["sent true".to_owned(), format!("High {sink}")],
            "{log:?}"
        );
    }
}

/// Rule: a flow handler may pause and resume other fds: pausing the producer on High and
/// resuming it on Drained bounds the queue to about the high mark (the call that crossed
/// it adds at most one read's worth), with events alternating High, Drained, High...; flow
/// events and handlers never overlap; nothing is lost or reordered.
#[test]
fn pausing_the_producer_on_high_and_resuming_it_on_drained_bounds_the_queue() {
    const TOTAL: usize = 8 * MIB;
    const READ: usize = 64 * KIB;
    let (low, high) = (64 * KIB, 256 * KIB);
    for sink in [unix_pair(), tcp_pair()] {
        let kind = sink.kind;
        let source = unix_pair();
        let proactor = Arc::new(Proactor::new().unwrap());
        proactor.set_watermarks(low, high).unwrap();
        let inside = Arc::new(AtomicUsize::new(0));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let (source_fd, sink_fd) = (source.fd(), sink.fd());
        let kinds = Arc::new(Mutex::new(Vec::new()));
        let max_event_queued = Arc::new(AtomicUsize::new(0));
        {
            let weak = Arc::downgrade(&proactor);
            let (inside, overlaps, kinds) = (inside.clone(), overlaps.clone(), kinds.clone());
            let max_event_queued = max_event_queued.clone();
            proactor.set_flow_handler(move |event| {
                if inside.fetch_add(1, SeqCst) != 0 {
                    overlaps.fetch_add(1, SeqCst);
                }
                if event.fd == sink_fd {
                    kinds.lock().unwrap().push(event.kind);
                    max_event_queued.fetch_max(event.queued, SeqCst);
                    if let Some(proactor) = weak.upgrade() {
                        let _ = match event.kind {
                            FlowEventKind::High => proactor.pause_reading(source_fd),
                            FlowEventKind::Drained => proactor.resume_reading(source_fd),
                            _ => Ok(()),
                        };
                    }
                }
                inside.fetch_sub(1, SeqCst);
            });
        }
        let send_failures = Arc::new(AtomicUsize::new(0));
        let source_ended = Arc::new(AtomicBool::new(false));
        {
            let weak = Arc::downgrade(&proactor);
            let (inside, overlaps) = (inside.clone(), overlaps.clone());
            let (send_failures, source_ended) = (send_failures.clone(), source_ended.clone());
            proactor
                .add(source_fd, move |fd| {
                    if inside.fetch_add(1, SeqCst) != 0 {
                        overlaps.fetch_add(1, SeqCst);
                    }
                    let mut buffer = vec![0u8; READ];
                    // SAFETY: reads into a live buffer of the length given.
                    let n = unsafe {
                        libc::recv(fd, buffer.as_mut_ptr().cast(), READ, libc::MSG_DONTWAIT)
                    };
                    if let Some(proactor) = weak.upgrade() {
                        if n > 0 {
                            if proactor.send(sink_fd, &buffer[..n as usize]).is_err() {
                                send_failures.fetch_add(1, SeqCst);
                            }
                        } else if n == 0 || last_errno() != libc::EAGAIN {
                            source_ended.store(true, SeqCst);
                            let _ = proactor.remove(fd);
                        }
                    }
                    inside.fetch_sub(1, SeqCst);
                })
                .unwrap();
        }
        proactor.add(sink_fd, |_fd| {}).unwrap();
        proactor.run().unwrap();
        let data = pattern(TOTAL, 3);
        let Pair {
            remote: producer,
            local: source_local,
            ..
        } = source;
        let producer = {
            let data = data.clone();
            thread::spawn(move || {
                producer.write_all(&data);
                drop(producer); // the end of the stream
            })
        };
        // The consumer is slower than the producer: small reads with pauses.
        let mut received = Vec::with_capacity(TOTAL);
        let mut buffer = vec![0u8; 16 * KIB];
        let mut max_sampled = 0;
        let deadline = Instant::now() + PATIENCE;
        while received.len() < TOTAL {
            assert!(
                Instant::now() < deadline,
                "{kind}: {} of {TOTAL} bytes",
                received.len()
            );
            max_sampled = max_sampled.max(proactor.queued_bytes(sink_fd).unwrap());
            let n = sink.remote.read_some(&mut buffer);
            assert!(n > 0, "{kind}: the sink's stream ended early");
            received.extend_from_slice(&buffer[..n]);
            if received.len() % (256 * KIB) < n {
                thread::sleep(Duration::from_millis(2));
            }
        }
        join_all("the producer", vec![producer]);
        wait_until("the source's end is seen", || source_ended.load(SeqCst));
        assert!(received == data, "{kind}: every byte, in order");
        let bound = high + READ + MESSAGE_OVERHEAD;
        assert!(
            max_sampled <= bound,
            "{kind}: {max_sampled} bytes queued, above {bound}"
        );
        assert!(max_event_queued.load(SeqCst) <= bound, "{kind}");
        assert_eq!(send_failures.load(SeqCst), 0, "{kind}: sends failed");
        assert_eq!(overlaps.load(SeqCst), 0, "{kind}: calls overlapped");
        let kinds = kinds.lock().unwrap().clone();
        assert!(
            !kinds.is_empty(),
            "{kind}: the consumer never fell behind (no High)"
        );
        for (index, event) in kinds.iter().enumerate() {
            let expected = if index % 2 == 0 {
                FlowEventKind::High
            } else {
                FlowEventKind::Drained
            };
            assert_eq!(*event, expected, "{kind}: events {kinds:?}");
        }
        drop(proactor);
        drop(source_local);
    }
}

/// Rule: the flow handler may call every function: from inside it, a send to another fd,
/// queued_bytes, replacing itself (the new handler gets the following events), removing the
/// fd and clearing itself (no event after that).
#[test]
fn a_flow_handler_may_send_replace_itself_remove_the_fd_and_clear_itself() {
    let pair = unix_pair();
    let notice = unix_pair();
    let proactor = Arc::new(Proactor::new().unwrap());
    let fd = pair.fd();
    let notice_fd = notice.fd();
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.add(notice_fd, |_fd| {}).unwrap();
    let (first_saw, first_events) = mpsc::channel();
    let (second_saw, second_events) = mpsc::channel();
    {
        let weak = Arc::downgrade(&proactor);
        proactor.set_flow_handler(move |event| {
            let Some(proactor) = weak.upgrade() else {
                return;
            };
            let queued = proactor.queued_bytes(event.fd).ok();
            let sent = proactor.send(notice_fd, b"high!").is_ok();
            let second_saw = second_saw.clone();
            let weak = Arc::downgrade(&proactor);
            proactor.set_flow_handler(move |event| {
                let removed = weak
                    .upgrade()
                    .map(|proactor| {
                        let removed = proactor.remove(event.fd).is_ok();
                        proactor.clear_flow_handler();
                        removed
                    })
                    .unwrap_or(false);
                let _ = second_saw.send((event, removed));
            });
            let _ = first_saw.send((event, queued, sent));
        });
    }
    proactor.run().unwrap();
    send_in_chunks(&proactor, fd, &pattern(2 * MIB, 0), 64 * KIB);
    let (event, queued, sent) = first_events.recv_timeout(PATIENCE).expect("High");
    assert_eq!((event.fd, event.kind), (fd, FlowEventKind::High));
    // Some of it may have been written since; it is still above low (no Drained yet).
    assert!(
        queued.is_some_and(|queued| queued > DEFAULT_LOW_WATERMARK),
        "queued_bytes from the flow handler: {queued:?}"
    );
    assert!(sent);
    assert_eq!(notice.remote.read_exact(5), b"high!");
    // The reader reads until Drained, whose handler removes the fd (dropping the rest).
    let deadline = Instant::now() + PATIENCE;
    let (event, removed) = loop {
        pair.remote.read_available();
        if let Ok(drained) = second_events.recv_timeout(Duration::from_millis(5)) {
            break drained;
        }
        assert!(Instant::now() < deadline, "no Drained within {PATIENCE:?}");
    };
    assert_eq!((event.fd, event.kind), (fd, FlowEventKind::Drained));
    assert!(removed, "remove from the flow handler failed");
    assert!(first_events.recv_timeout(QUIET).is_err());
    assert!(second_events.recv_timeout(Duration::ZERO).is_err());
    assert_eq!(errno(&proactor.queued_bytes(fd).unwrap_err()), libc::ENOENT);
    // Cleared: a crossing on another fd reaches no handler (and nothing breaks).
    send_in_chunks(&proactor, notice_fd, &pattern(2 * MIB, 1), 64 * KIB);
    assert!(first_events.recv_timeout(QUIET).is_err());
    assert!(second_events.recv_timeout(Duration::ZERO).is_err());
}

// =======================================================================================
// Pause and resume

/// Rule: once pause_reading returns, the fd's handler is not called while data waits; the
/// bytes stay in the socket (and the loop does not spin on them); after resume they are
/// read, in order.
#[test]
fn a_paused_fd_is_not_called_while_its_data_waits_and_reads_it_in_order_after_resume() {
    for pair in [unix_pair(), tcp_pair()] {
        let kind = pair.kind;
        let fd = pair.fd();
        let proactor = Arc::new(Proactor::new().unwrap());
        let (inputs_to, inputs) = mpsc::channel();
        proactor
            .add(fd, reading_handler(&proactor, inputs_to))
            .unwrap();
        proactor.run().unwrap();
        let tid = loop_thread_id(&proactor);
        pair.remote.write_all(b"one");
        assert_eq!(receive_bytes(&inputs, 3, kind), b"one");
        proactor.pause_reading(fd).unwrap();
        assert!(proactor.is_reading_paused(fd).unwrap());
        let waiting = pattern(50_000, 1);
        pair.remote.write_all(&waiting);
        wait_until("the bytes reach the paused socket", || {
            pending_input(fd) == waiting.len()
        });
        assert_thread_idle(tid, &format!("{kind}: paused with data waiting"));
        assert_no_input(&inputs, &format!("{kind}: paused"));
        assert_eq!(pending_input(fd), waiting.len(), "{kind}: nothing read");
        proactor.resume_reading(fd).unwrap();
        assert!(!proactor.is_reading_paused(fd).unwrap());
        assert!(
            receive_bytes(&inputs, waiting.len(), kind) == waiting,
            "{kind}: in order"
        );
    }
}

/// Rule: registrations start unpaused; pause and resume are idempotent; is_reading_paused
/// follows them; they work while the loop is stopped as well as while it runs.
#[test]
fn pause_and_resume_are_idempotent_and_work_while_the_loop_is_stopped() {
    let pair = unix_pair();
    let fd = pair.fd();
    let proactor = Arc::new(Proactor::new().unwrap());
    let (inputs_to, inputs) = mpsc::channel();
    proactor
        .add(fd, reading_handler(&proactor, inputs_to))
        .unwrap();
    assert!(!proactor.is_reading_paused(fd).unwrap());
    // Paused (twice) before the loop runs.
    proactor.pause_reading(fd).unwrap();
    proactor.pause_reading(fd).unwrap();
    assert!(proactor.is_reading_paused(fd).unwrap());
    pair.remote.write_all(b"a");
    proactor.run().unwrap();
    thread::sleep(QUIET);
    assert_no_input(&inputs, "paused before the loop ran");
    proactor.resume_reading(fd).unwrap();
    proactor.resume_reading(fd).unwrap();
    assert!(!proactor.is_reading_paused(fd).unwrap());
    assert_eq!(receive_bytes(&inputs, 1, "resumed"), b"a");
    // Paused while running, resumed while stopped.
    proactor.pause_reading(fd).unwrap();
    proactor.cancel().unwrap();
    pair.remote.write_all(b"b");
    assert!(proactor.is_reading_paused(fd).unwrap());
    proactor.resume_reading(fd).unwrap();
    assert!(!proactor.is_reading_paused(fd).unwrap());
    proactor.run().unwrap();
    assert_eq!(receive_bytes(&inputs, 1, "resumed while stopped"), b"b");
}

/// Rule: pause_reading, resume_reading and is_reading_paused fail with ENOENT for an fd
/// that is not registered (never added, or removed).
#[test]
fn pause_resume_and_is_reading_paused_are_enoent_for_an_unregistered_fd() {
    let pair = unix_pair();
    let fd = pair.fd();
    let proactor = Proactor::new().unwrap();
    let check = |when: &str| {
        assert_eq!(
            errno(&proactor.pause_reading(fd).unwrap_err()),
            libc::ENOENT,
            "pause, {when}"
        );
        assert_eq!(
            errno(&proactor.resume_reading(fd).unwrap_err()),
            libc::ENOENT,
            "resume, {when}"
        );
        assert_eq!(
            errno(&proactor.is_reading_paused(fd).unwrap_err()),
            libc::ENOENT,
            "is_reading_paused, {when}"
        );
    };
    check("never added");
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.pause_reading(fd).unwrap();
    proactor.remove(fd).unwrap();
    check("removed");
}

/// Rule: a handler may pause its own fd (no new call after it returns, the rest of the data
/// waits) and another handler may resume or pause it; the test thread resumes it too.
#[test]
fn handlers_pause_and_resume_their_own_fd_and_other_fds() {
    let a = unix_pair();
    let b = unix_pair();
    let (a_fd, b_fd) = (a.fd(), b.fd());
    let proactor = Arc::new(Proactor::new().unwrap());
    let (bytes_to, bytes) = mpsc::channel();
    let (results_to, results) = mpsc::channel();
    {
        let weak = Arc::downgrade(&proactor);
        let results_to = results_to.clone();
        proactor
            .add(a_fd, move |fd| {
                let mut byte = [0u8; 1];
                // SAFETY: reads one byte into a live buffer from the registered socket.
                if unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) } != 1 {
                    return;
                }
                let _ = bytes_to.send(byte[0]);
                if byte[0] == b'p' {
                    if let Some(proactor) = weak.upgrade() {
                        let _ = results_to.send(("a pauses a", proactor.pause_reading(fd).is_ok()));
                    }
                }
            })
            .unwrap();
    }
    {
        let weak = Arc::downgrade(&proactor);
        proactor
            .add(b_fd, move |fd| {
                let mut byte = [0u8; 1];
                // SAFETY: reads one byte into a live buffer from the registered socket.
                if unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) } != 1 {
                    return;
                }
                let Some(proactor) = weak.upgrade() else {
                    return;
                };
                let result = match byte[0] {
                    b'r' => ("b resumes a", proactor.resume_reading(a_fd).is_ok()),
                    _ => ("b pauses a", proactor.pause_reading(a_fd).is_ok()),
                };
                let _ = results_to.send(result);
            })
            .unwrap();
    }
    proactor.run().unwrap();
    let next_result = || results.recv_timeout(PATIENCE).expect("a handler's call");
    let next_byte = || bytes.recv_timeout(PATIENCE).expect("a's handler call");
    a.remote.write_all(b"xpyz");
    assert_eq!((next_byte(), next_byte()), (b'x', b'p'));
    assert_eq!(next_result(), ("a pauses a", true));
    assert!(
        bytes.recv_timeout(QUIET).is_err(),
        "a was called after pausing itself"
    );
    assert!(proactor.is_reading_paused(a_fd).unwrap());
    assert_eq!(pending_input(a_fd), 2);
    b.remote.write_all(b"r");
    assert_eq!(next_result(), ("b resumes a", true));
    assert_eq!((next_byte(), next_byte()), (b'y', b'z'));
    b.remote.write_all(b"q");
    assert_eq!(next_result(), ("b pauses a", true));
    a.remote.write_all(b"w");
    assert!(
        bytes.recv_timeout(QUIET).is_err(),
        "a was called while paused"
    );
    proactor.resume_reading(a_fd).unwrap();
    assert_eq!(next_byte(), b'w');
}

/// Rule: pause and resume may be called from any thread at any time: four threads toggling
/// them while data streams in neither deadlock nor lose or reorder a byte, and after the
/// last resume the fd is read again.
#[test]
fn pause_and_resume_from_many_threads_lose_and_reorder_nothing() {
    let pair = unix_pair();
    let fd = pair.fd();
    let proactor = Arc::new(Proactor::new().unwrap());
    let (inputs_to, inputs) = mpsc::channel();
    proactor
        .add(fd, reading_handler(&proactor, inputs_to))
        .unwrap();
    proactor.run().unwrap();
    let togglers: Vec<_> = (0..4)
        .map(|_| {
            let proactor = Arc::clone(&proactor);
            thread::spawn(move || {
                for round in 0..500 {
                    proactor.pause_reading(fd).unwrap();
                    if round % 50 == 0 {
                        thread::sleep(Duration::from_millis(1));
                    }
                    proactor.resume_reading(fd).unwrap();
                }
            })
        })
        .collect();
    let data = pattern(200_000, 5);
    for piece in data.chunks(1000) {
        pair.remote.write_all(piece);
    }
    join_all("the togglers", togglers);
    proactor.resume_reading(fd).unwrap();
    assert!(!proactor.is_reading_paused(fd).unwrap());
    assert!(receive_bytes(&inputs, data.len(), "all of it") == data);
}

/// Rule: once pause_reading returns (from another thread), no new handler call starts; only
/// a call already under way may finish (at most one: handlers run one at a time). Checked
/// over many pauses of an fd that always has input.
#[test]
fn no_handler_call_starts_once_pause_reading_returns() {
    let pair = unix_pair();
    let fd = pair.fd();
    let proactor = Proactor::new().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let calls = Arc::clone(&calls);
        proactor
            .add(fd, move |fd| {
                calls.fetch_add(1, SeqCst);
                let mut byte = [0u8; 1];
                // SAFETY: reads one byte into a live buffer from the registered socket.
                unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
            })
            .unwrap();
    }
    proactor.run().unwrap();
    let mut late_calls = 0;
    for round in 0..100 {
        // One byte per call: the fd stays readable across the pause (unless the loop reads
        // all 64 first, which only makes the round vacuous).
        let started = calls.load(SeqCst);
        pair.remote.write_all(&[b'.'; 64]);
        wait_until("the handler runs", || calls.load(SeqCst) > started);
        proactor.pause_reading(fd).unwrap();
        let at_pause = calls.load(SeqCst);
        thread::sleep(Duration::from_millis(if round % 10 == 0 { 50 } else { 5 }));
        let after = calls.load(SeqCst) - at_pause;
        assert!(
            after <= 1,
            "round {round}: {after} calls started after the pause"
        );
        late_calls += after;
        proactor.resume_reading(fd).unwrap();
        // The rest of the bytes, then the next round.
        wait_until("the handler reads the rest", || pending_input(fd) == 0);
    }
    // A call under way at the pause is rare; most rounds saw none.
    assert!(late_calls < 100, "{late_calls} late calls in 100 rounds");
}

/// Rule: output keeps flowing to a paused fd: megabytes sent to it while it is paused (and
/// has input waiting) reach the peer, without a call of its handler.
#[test]
fn output_keeps_flowing_to_a_paused_fd() {
    for pair in [unix_pair(), tcp_pair()] {
        let kind = pair.kind;
        let fd = pair.fd();
        let proactor = Arc::new(Proactor::new().unwrap());
        let (inputs_to, inputs) = mpsc::channel();
        proactor
            .add(fd, reading_handler(&proactor, inputs_to))
            .unwrap();
        proactor.run().unwrap();
        proactor.pause_reading(fd).unwrap();
        pair.remote.write_all(b"unread");
        let data = pattern(3 * MIB, 2);
        send_in_chunks(&proactor, fd, &data, 64 * KIB);
        assert!(
            pair.remote.read_exact(data.len()) == data,
            "{kind}: the output, in order"
        );
        wait_until("the queue is empty", || {
            proactor.queued_bytes(fd).unwrap() == 0
        });
        assert_no_input(&inputs, &format!("{kind}: paused"));
        assert_eq!(pending_input(fd), 6);
        proactor.resume_reading(fd).unwrap();
        assert_eq!(receive_bytes(&inputs, 6, kind), b"unread");
    }
}

/// Rule: a hang-up of a paused fd (peer closed; peer reset) is reported after resume (the
/// handler gets its call: the bytes that came before, then the end or the error), and is
/// not a busy loop while the fd is paused.
#[test]
fn a_hang_up_of_a_paused_fd_is_reported_after_resume_without_spinning_meanwhile() {
    for (case, pair, reset) in [
        ("unix, peer closed", unix_pair(), false),
        ("tcp, peer closed", tcp_pair(), false),
        ("tcp, peer reset", tcp_pair(), true),
    ] {
        let fd = pair.fd();
        let Pair { local, remote, .. } = pair;
        let proactor = Arc::new(Proactor::new().unwrap());
        let (inputs_to, inputs) = mpsc::channel();
        proactor
            .add(fd, reading_handler(&proactor, inputs_to))
            .unwrap();
        proactor.run().unwrap();
        let tid = loop_thread_id(&proactor);
        proactor.pause_reading(fd).unwrap();
        if reset {
            remote.reset();
        } else {
            remote.write_all(b"bye");
            drop(remote);
        }
        wait_until("the hang-up reaches the socket", || peer_has_hung_up(fd));
        assert_thread_idle(tid, &format!("{case}: paused and hung up"));
        assert_no_input(&inputs, &format!("{case}: paused"));
        assert!(proactor.is_reading_paused(fd).unwrap());
        proactor.resume_reading(fd).unwrap();
        if reset {
            let last = next_input(&inputs, case);
            assert!(
                matches!(last, Input::End | Input::Error(_)),
                "{case}: {last:?}"
            );
        } else {
            assert_eq!(receive_bytes(&inputs, 3, case), b"bye");
            assert_eq!(next_input(&inputs, case), Input::End, "{case}");
        }
        // The handler removed its fd at the end.
        wait_until("the fd is removed", || proactor.is_empty());
        drop(proactor);
        drop(local);
    }
}

/// Rule: flow events keep coming for a paused fd (its output is still written and watched):
/// High, then Stalled for a peer that does not read; when the peer goes away the failed
/// write drops the queue, which gives Drained, still while paused; the hang-up itself
/// reaches the handler only after resume.
#[test]
fn a_paused_fd_gets_its_flow_events_and_its_hang_up_after_resume() {
    let timeout = Duration::from_millis(200);
    for pair in [unix_pair(), tcp_pair()] {
        let kind = pair.kind;
        let fd = pair.fd();
        let Pair { local, remote, .. } = pair;
        let proactor = Arc::new(Proactor::new().unwrap());
        proactor.set_stall_timeout(Some(timeout));
        let events = record_flow_events(&proactor);
        let (inputs_to, inputs) = mpsc::channel();
        proactor
            .add(fd, reading_handler(&proactor, inputs_to))
            .unwrap();
        proactor.run().unwrap();
        proactor.pause_reading(fd).unwrap();
        remote.write_all(b"unread");
        send_in_chunks(&proactor, fd, &pattern(2 * MIB, 0), 64 * KIB);
        expect_event(&events, fd, FlowEventKind::High, kind);
        let stalled = expect_event(&events, fd, FlowEventKind::Stalled, kind);
        assert!(
            stalled.event.queued > DEFAULT_LOW_WATERMARK,
            "{kind}: {stalled:?}"
        );
        drop(remote); // unread bytes in its socket: TCP sends an RST
        expect_event(&events, fd, FlowEventKind::Drained, kind);
        assert_eq!(proactor.queued_bytes(fd).unwrap(), 0, "{kind}");
        thread::sleep(QUIET);
        assert_no_input(&inputs, &format!("{kind}: paused"));
        assert!(proactor.is_reading_paused(fd).unwrap());
        proactor.resume_reading(fd).unwrap();
        // The bytes that waited (a reset may discard them), then the end or the error.
        let mut received = Vec::new();
        let last = loop {
            match next_input(&inputs, kind) {
                Input::Data(bytes) => received.extend_from_slice(&bytes),
                other => break other,
            }
        };
        assert!(
            b"unread".starts_with(&received),
            "{kind}: read {received:?}"
        );
        assert!(
            matches!(last, Input::End | Input::Error(_)),
            "{kind}: {last:?}"
        );
        assert_no_event(&events, QUIET, kind);
        drop(proactor);
        drop(local);
    }
}

/// Rule: a receive completion (Proactor::receive) pauses and resumes too: nothing is
/// delivered while paused, the bytes and the end come after resume, the final Ok(&[])
/// call last.
#[test]
fn a_paused_receive_delivers_nothing_and_its_last_call_comes_after_resume() {
    for pair in [unix_pair(), tcp_pair()] {
        let kind = pair.kind;
        let fd = pair.fd();
        let Pair { local, remote, .. } = pair;
        let proactor = Proactor::new().unwrap();
        let allowed = Arc::new(AtomicBool::new(true));
        let (delivered, deliveries) = mpsc::channel();
        {
            let allowed = Arc::clone(&allowed);
            proactor
                .receive(fd, move |result| {
                    let _ = delivered.send((
                        result.map(<[u8]>::to_vec).map_err(|err| errno(&err)),
                        allowed.load(SeqCst),
                    ));
                })
                .unwrap();
        }
        proactor.run().unwrap();
        remote.write_all(b"first");
        let (first, _) = deliveries.recv_timeout(PATIENCE).expect("a delivery");
        assert_eq!(first, Ok(b"first".to_vec()), "{kind}");
        allowed.store(false, SeqCst);
        proactor.pause_reading(fd).unwrap();
        remote.write_all(b"second");
        drop(remote);
        wait_until("the end reaches the socket", || peer_has_hung_up(fd));
        thread::sleep(QUIET);
        assert!(
            deliveries.try_recv().is_err(),
            "{kind}: a delivery while paused"
        );
        assert!(proactor.is_reading_paused(fd).unwrap());
        allowed.store(true, SeqCst);
        proactor.resume_reading(fd).unwrap();
        let mut received = Vec::new();
        loop {
            let (result, allowed) = deliveries.recv_timeout(PATIENCE).expect("a delivery");
            assert!(allowed, "{kind}: delivered while paused");
            let bytes = result.unwrap_or_else(|err| panic!("{kind}: errno {err}"));
            if bytes.is_empty() {
                break;
            }
            received.extend_from_slice(&bytes);
        }
        assert_eq!(received, b"second", "{kind}");
        assert!(
            deliveries.recv_timeout(QUIET).is_err(),
            "{kind}: after the end"
        );
        assert_eq!(
            errno(&proactor.is_reading_paused(fd).unwrap_err()),
            libc::ENOENT,
            "{kind}: removed by its last call"
        );
        drop(proactor);
        drop(local);
    }
}

/// Rule: a removed and re-added fd starts unpaused (the pause belonged to the old
/// registration).
#[test]
fn a_removed_and_re_added_fd_starts_unpaused() {
    let pair = unix_pair();
    let fd = pair.fd();
    let proactor = Arc::new(Proactor::new().unwrap());
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.run().unwrap();
    proactor.pause_reading(fd).unwrap();
    proactor.remove(fd).unwrap();
    let (inputs_to, inputs) = mpsc::channel();
    proactor
        .add(fd, reading_handler(&proactor, inputs_to))
        .unwrap();
    assert!(!proactor.is_reading_paused(fd).unwrap());
    pair.remote.write_all(b"new");
    assert_eq!(receive_bytes(&inputs, 3, "the new registration"), b"new");
}

/// Rule: a paused accept listener (Proactor::accept) accepts nothing until resumed; then
/// every connection that waited is accepted.
#[test]
fn a_paused_listener_accepts_nothing_until_resumed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let proactor = Proactor::new().unwrap();
    let (accepted, connections) = mpsc::channel();
    proactor
        .accept(listener.as_raw_fd(), move |result| {
            let connection = result.expect("no accept error");
            let _ = accepted.send(connection.fd); // an OwnedFd: the program's, closed on drop
        })
        .unwrap();
    proactor.run().unwrap();
    let _first = TcpStream::connect(address).unwrap();
    connections.recv_timeout(PATIENCE).expect("the first one");
    proactor.pause_reading(listener.as_raw_fd()).unwrap();
    let _waiting: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    assert!(
        connections.recv_timeout(QUIET).is_err(),
        "accepted while paused"
    );
    assert!(proactor.is_reading_paused(listener.as_raw_fd()).unwrap());
    proactor.resume_reading(listener.as_raw_fd()).unwrap();
    for index in 0..3 {
        connections
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("connection {index} after resume"));
    }
    proactor.remove(listener.as_raw_fd()).unwrap();
}

// =======================================================================================
// Stalls

/// Rule: no stall timeout by default; set_stall_timeout sets it and None disables it.
#[test]
fn the_stall_timeout_is_off_by_default_and_reads_back_as_set() {
    let proactor = Proactor::new().unwrap();
    assert_eq!(proactor.stall_timeout(), None);
    proactor.set_stall_timeout(Some(Duration::from_millis(250)));
    assert_eq!(proactor.stall_timeout(), Some(Duration::from_millis(250)));
    proactor.set_stall_timeout(None);
    assert_eq!(proactor.stall_timeout(), None);
}

/// Rule: with a stall timeout, a reader that never reads gets exactly one Stalled once its
/// socket is full: not before the timeout has passed since its output started waiting,
/// within a generous margin after; no second one while the stall goes on.
#[test]
fn a_reader_that_never_reads_gets_one_stalled_after_the_timeout() {
    let timeout = Duration::from_millis(200);
    for pair in [unix_pair(), tcp_pair()] {
        let kind = pair.kind;
        let fd = pair.fd();
        let proactor = Proactor::new().unwrap();
        proactor.set_stall_timeout(Some(timeout));
        let events = record_flow_events(&proactor);
        proactor.add(fd, |_fd| {}).unwrap();
        proactor.run().unwrap();
        let started = Instant::now();
        let data = pattern(MIB, 0);
        send_in_chunks(&proactor, fd, &data, 64 * KIB);
        let stalled = wait_event(&events, FlowEventKind::Stalled, timeout + STALL_MARGIN)
            .unwrap_or_else(|| panic!("{kind}: no Stalled within {:?}", timeout + STALL_MARGIN));
        assert_eq!(stalled.event.fd, fd, "{kind}");
        let after = stalled.at - started;
        assert!(
            after >= timeout,
            "{kind}: Stalled {after:?} after the output started, before the timeout"
        );
        assert!(
            stalled.event.queued > 0 && stalled.event.queued <= data.len() + 16 * MESSAGE_OVERHEAD,
            "{kind}: {:?}",
            stalled.event
        );
        let again = wait_event(&events, FlowEventKind::Stalled, 5 * timeout);
        assert!(again.is_none(), "{kind}: a second Stalled: {again:?}");
    }
}

/// Rule: a reader that reads slowly but steadily keeps making progress and never stalls,
/// over many timeouts, though its output waits for room all along.
#[test]
fn a_reader_that_reads_slowly_but_steadily_never_stalls() {
    let timeout = Duration::from_millis(400);
    for pair in [unix_pair(), tcp_pair()] {
        let kind = pair.kind;
        let fd = pair.fd();
        let proactor = Proactor::new().unwrap();
        proactor.set_stall_timeout(Some(timeout));
        let events = record_flow_events(&proactor);
        proactor.add(fd, |_fd| {}).unwrap();
        proactor.run().unwrap();
        let refill = pattern(256 * KIB, 0);
        // More than the socket holds: the output waits for room from the start.
        send_in_chunks(&proactor, fd, &pattern(MIB, 1), 256 * KIB);
        let mut buffer = vec![0u8; 32 * KIB];
        let mut read = 0;
        let mut empty_samples = 0;
        let started = Instant::now();
        while started.elapsed() < 5 * timeout {
            let queued = proactor.queued_bytes(fd).unwrap();
            if queued == 0 {
                empty_samples += 1;
            }
            if queued < 512 * KIB {
                proactor.send(fd, &refill).unwrap();
            }
            read += pair.remote.read_some(&mut buffer);
            thread::sleep(Duration::from_millis(1));
        }
        let stalled = wait_event(&events, FlowEventKind::Stalled, Duration::ZERO);
        assert!(
            stalled.is_none(),
            "{kind}: {stalled:?} after reading {read} bytes"
        );
        assert_eq!(
            empty_samples, 0,
            "{kind}: the output did not wait all along"
        );
        assert!(read > MIB, "{kind}: only {read} bytes read");
    }
}

/// Rule: no Stalled without a stall timeout, nor once it is set back to None (even for
/// output waiting already), nor for fds with nothing queued or whose output was written at
/// once.
#[test]
fn no_stalled_without_a_timeout_once_disabled_or_for_fds_whose_output_does_not_wait() {
    // Each case on a proactor of its own, all watched over the same quiet period.
    let never_set = unix_pair();
    let set_and_unset = unix_pair();
    let unset_while_waiting = unix_pair();
    let idle: Vec<Pair> = (0..5).map(|_| unix_pair()).collect();
    let proactors: Vec<Proactor> = (0..4).map(|_| Proactor::new().unwrap()).collect();
    let events: Vec<Receiver<Seen>> = proactors.iter().map(record_flow_events).collect();
    for proactor in &proactors {
        proactor.run().unwrap();
    }
    let blocked = pattern(MIB, 0);
    // No timeout ever set.
    proactors[0].add(never_set.fd(), |_fd| {}).unwrap();
    send_in_chunks(&proactors[0], never_set.fd(), &blocked, 64 * KIB);
    // Set, then disabled before the output waits.
    proactors[1].set_stall_timeout(Some(Duration::from_millis(100)));
    proactors[1].set_stall_timeout(None);
    proactors[1].add(set_and_unset.fd(), |_fd| {}).unwrap();
    send_in_chunks(&proactors[1], set_and_unset.fd(), &blocked, 64 * KIB);
    // Disabled while the output waits (long before its timeout).
    proactors[2].set_stall_timeout(Some(Duration::from_secs(1)));
    proactors[2]
        .add(unset_while_waiting.fd(), |_fd| {})
        .unwrap();
    send_in_chunks(&proactors[2], unset_while_waiting.fd(), &blocked, 64 * KIB);
    proactors[2].set_stall_timeout(None);
    // A short timeout, and fds with nothing queued or a small output written at once.
    proactors[3].set_stall_timeout(Some(Duration::from_millis(100)));
    for pair in &idle {
        proactors[3].add(pair.fd(), |_fd| {}).unwrap();
    }
    proactors[3].send(idle[0].fd(), b"small").unwrap();
    assert_eq!(idle[0].remote.read_exact(5), b"small");
    thread::sleep(Duration::from_secs(2));
    for (case, events) in ["never set", "set and unset", "unset while waiting", "idle"]
        .iter()
        .zip(&events)
    {
        let stalled = wait_event(events, FlowEventKind::Stalled, Duration::ZERO);
        assert!(stalled.is_none(), "{case}: {stalled:?}");
    }
    for (proactor, fd) in
        proactors
            .iter()
            .zip([never_set.fd(), set_and_unset.fd(), unset_while_waiting.fd()])
    {
        assert!(proactor.queued_bytes(fd).unwrap() > 0, "the output waited");
    }
    drop(events);
    drop(proactors);
}

/// Rule: a stall timeout set (or shortened) from another thread while output already waits
/// applies to that output: the sleeping loop is woken for the new deadline, and the Stalled
/// comes within a margin of the new timeout, not of the old one (none, or 60 s).
#[test]
fn a_stall_timeout_set_or_shortened_while_output_waits_applies_to_it() {
    let timeout = Duration::from_millis(200);
    let unset = unix_pair();
    let long = unix_pair();
    let proactors = [Proactor::new().unwrap(), Proactor::new().unwrap()];
    proactors[1].set_stall_timeout(Some(Duration::from_secs(60)));
    let events: Vec<Receiver<Seen>> = proactors.iter().map(record_flow_events).collect();
    for (proactor, pair) in proactors.iter().zip([&unset, &long]) {
        proactor.add(pair.fd(), |_fd| {}).unwrap();
        proactor.run().unwrap();
        send_in_chunks(proactor, pair.fd(), &pattern(MIB, 0), 64 * KIB);
    }
    // Both loops sleep now, their output waiting: one without a deadline, one with a far one.
    thread::sleep(QUIET);
    let changed = Instant::now();
    for proactor in &proactors {
        proactor.set_stall_timeout(Some(timeout));
    }
    for (case, (events, pair)) in ["no timeout before", "60 s before"]
        .iter()
        .zip(events.iter().zip([&unset, &long]))
    {
        let left = STALL_MARGIN.saturating_sub(changed.elapsed()) + timeout;
        let stalled = wait_event(events, FlowEventKind::Stalled, left)
            .unwrap_or_else(|| panic!("{case}: no Stalled within {STALL_MARGIN:?}"));
        assert_eq!(stalled.event.fd, pair.fd(), "{case}");
    }
}

/// Rule: an fd whose output waited for room and then drained gets no Stalled afterwards
/// (its stall timer, if any, is stale); nor after a later small send written at once.
#[test]
fn an_fd_whose_output_drained_gets_no_stalled() {
    let timeout = Duration::from_millis(700);
    let pair = unix_pair();
    let fd = pair.fd();
    let Pair { local, remote, .. } = pair;
    let proactor = Proactor::new().unwrap();
    proactor.set_stall_timeout(Some(timeout));
    let events = record_flow_events(&proactor);
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.run().unwrap();
    let data = pattern(3 * MIB, 4);
    let expected = data.clone();
    // The reader reads as fast as it can: the output waits for room again and again, but
    // never for long.
    let reader = thread::spawn(move || {
        let received = remote.read_exact(expected.len());
        assert!(received == expected, "every byte, in order");
        remote
    });
    send_in_chunks(&proactor, fd, &data, 64 * KIB);
    let remote = join_all("the reader", vec![reader]).pop().unwrap();
    wait_until("the queue is empty", || {
        proactor.queued_bytes(fd).unwrap() == 0
    });
    proactor.send(fd, b"tail").unwrap();
    assert_eq!(remote.read_exact(4), b"tail");
    let stalled = wait_event(&events, FlowEventKind::Stalled, 3 * timeout);
    assert!(stalled.is_none(), "{stalled:?}");
    drop(proactor);
    drop(local);
}

/// Rule: once per stall: after a Stalled, progress (the reader reads, the loop writes) and
/// then a new stall give a second Stalled, not before the timeout has passed since the
/// progress.
#[test]
fn after_a_stalled_progress_then_a_new_stall_gives_a_second_one() {
    let timeout = Duration::from_millis(200);
    let pair = unix_pair();
    let fd = pair.fd();
    let proactor = Proactor::new().unwrap();
    proactor.set_stall_timeout(Some(timeout));
    let events = record_flow_events(&proactor);
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.run().unwrap();
    send_in_chunks(&proactor, fd, &pattern(3 * MIB, 0), 64 * KIB);
    let first = wait_event(&events, FlowEventKind::Stalled, timeout + STALL_MARGIN)
        .expect("the first Stalled");
    assert_eq!(first.event.fd, fd);
    assert!(
        wait_event(&events, FlowEventKind::Stalled, 3 * timeout).is_none(),
        "a second Stalled without progress"
    );
    let before = proactor.queued_bytes(fd).unwrap();
    let progress = Instant::now();
    // One read, of at most 256 KiB: the socket empties, the loop writes, the queue (of
    // megabytes) stays.
    let read = pair.remote.read_some(&mut vec![0u8; 256 * KIB]);
    assert!(read > 0);
    wait_until("the loop writes more", || {
        proactor.queued_bytes(fd).unwrap() < before
    });
    let second = wait_event(&events, FlowEventKind::Stalled, timeout + STALL_MARGIN)
        .unwrap_or_else(|| {
            panic!(
                "no second Stalled within {:?} after progress: read {read} bytes, queued {} \
                 before and {} now",
                timeout + STALL_MARGIN,
                before,
                proactor.queued_bytes(fd).unwrap()
            )
        });
    assert_eq!(second.event.fd, fd);
    let after = second.at - progress;
    assert!(
        after >= timeout,
        "the second Stalled came {after:?} after the progress"
    );
    assert!(second.event.queued < first.event.queued);
}

/// Rule: each stalled fd gets its own single Stalled; idle fds of the same proactor get
/// none.
#[test]
fn several_stalled_fds_get_one_stalled_each_and_idle_fds_none() {
    let timeout = Duration::from_millis(200);
    let stalled: Vec<Pair> = (0..3).map(|_| unix_pair()).collect();
    let idle: Vec<Pair> = (0..20).map(|_| unix_pair()).collect();
    let proactor = Proactor::new().unwrap();
    proactor.set_stall_timeout(Some(timeout));
    let events = record_flow_events(&proactor);
    for pair in stalled.iter().chain(&idle) {
        proactor.add(pair.fd(), |_fd| {}).unwrap();
    }
    proactor.run().unwrap();
    let data = pattern(MIB, 0);
    for pair in &stalled {
        send_in_chunks(&proactor, pair.fd(), &data, 64 * KIB);
    }
    let mut fds = Vec::new();
    for _ in &stalled {
        let seen = wait_event(&events, FlowEventKind::Stalled, timeout + STALL_MARGIN)
            .expect("a Stalled per stalled fd");
        fds.push(seen.event.fd);
    }
    assert!(wait_event(&events, FlowEventKind::Stalled, 5 * timeout).is_none());
    fds.sort();
    let mut expected: Vec<RawFd> = stalled.iter().map(Pair::fd).collect();
    expected.sort();
    assert_eq!(fds, expected);
}

// ---------------------------------------------------------------------------------------
// Lags: congestion held too long, progress or not

#[test]
fn the_lag_timeout_is_off_by_default_and_reads_back_as_set() {
    let proactor = Proactor::new().unwrap();
    assert_eq!(proactor.lag_timeout(), None);
    proactor.set_lag_timeout(Some(Duration::from_millis(250)));
    assert_eq!(proactor.lag_timeout(), Some(Duration::from_millis(250)));
    proactor.set_lag_timeout(None);
    assert_eq!(proactor.lag_timeout(), None);
}

/// Rule: a reader that reads steadily, but too slowly to bring its queue back to the low
/// watermark, gets exactly one Lagging once its congestion has lasted the lag timeout (never
/// a Stalled: it makes progress), and a second congestion gets its own Lagging.
#[test]
fn a_slow_but_steady_reader_gets_one_lagging_per_congestion() {
    let timeout = Duration::from_millis(300);
    let pair = unix_pair();
    let fd = pair.fd();
    let proactor = Proactor::new().unwrap();
    proactor.set_lag_timeout(Some(timeout));
    proactor.set_stall_timeout(Some(Duration::from_millis(200)));
    let events = record_flow_events(&proactor);
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.run().unwrap();
    for congestion in 0..2 {
        let data = pattern(2 * MIB, congestion);
        let before_high = Instant::now();
        send_in_chunks(&proactor, fd, &data, 64 * KIB);
        expect_event(&events, fd, FlowEventKind::High, "the queue passed high");
        // About 320 KB/s: always some progress, far too little to drain 1.75 MiB in time.
        let mut buffer = vec![0u8; 16 * KIB];
        let mut lagging = None;
        let mut others = Vec::new();
        let started = Instant::now();
        while started.elapsed() < timeout * 4 {
            pair.remote.read_some(&mut buffer);
            while let Ok(seen) = events.try_recv() {
                match seen.event.kind {
                    FlowEventKind::Lagging if lagging.is_none() => lagging = Some(seen),
                    _ => others.push(seen.event),
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        let lagging = lagging.unwrap_or_else(|| {
            panic!(
                "congestion {congestion}: no Lagging within {:?}",
                timeout * 4
            )
        });
        assert_eq!(lagging.event.fd, fd);
        assert!(lagging.on_loop_thread);
        assert!(
            lagging.at - before_high >= timeout,
            "congestion {congestion}: Lagging {:?} after the sends began",
            lagging.at - before_high
        );
        assert!(lagging.event.queued > DEFAULT_LOW_WATERMARK);
        assert!(
            others.is_empty(),
            "congestion {congestion}: other events while lagging: {others:?}"
        );
        // Drain the rest: the congestion ends with Drained; no second Lagging came.
        let mut left = proactor.queued_bytes(fd).unwrap();
        let deadline = Instant::now() + PATIENCE;
        while left > 0 {
            assert!(Instant::now() < deadline, "the queue did not drain");
            pair.remote.read_available();
            thread::sleep(Duration::from_millis(5));
            left = proactor.queued_bytes(fd).unwrap();
        }
        expect_event(&events, fd, FlowEventKind::Drained, "the queue drained");
        pair.remote.read_available();
        assert_no_event(&events, QUIET, "after the drain");
    }
    proactor.cancel().unwrap();
}

/// Rule: no Lagging for an fd whose congestion ends before the lag timeout, nor for an fd
/// that never passes the high watermark; a timeout set during a congestion counts from its
/// High event.
#[test]
fn no_lagging_for_a_congestion_that_drains_in_time_and_a_late_timeout_counts_from_high() {
    let pair = unix_pair();
    let idle = unix_pair();
    let fd = pair.fd();
    let proactor = Proactor::new().unwrap();
    proactor.set_lag_timeout(Some(Duration::from_millis(800)));
    let events = record_flow_events(&proactor);
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.add(idle.fd(), |_fd| {}).unwrap();
    proactor.run().unwrap();
    proactor.send(idle.fd(), b"small").unwrap();
    assert_eq!(idle.remote.read_exact(5), b"small");
    // Congested, then read at once: Drained long before the timeout.
    let data = pattern(2 * MIB, 3);
    send_in_chunks(&proactor, fd, &data, 64 * KIB);
    expect_event(&events, fd, FlowEventKind::High, "the queue passed high");
    assert_eq!(pair.remote.read_exact(data.len()), data);
    expect_event(&events, fd, FlowEventKind::Drained, "the queue drained");
    assert_no_event(
        &events,
        Duration::from_millis(1200),
        "a congestion that drained in time",
    );
    // Without a lag timeout a congestion is not timed; set later, it counts from High.
    proactor.set_lag_timeout(None);
    let before_high = Instant::now();
    send_in_chunks(&proactor, fd, &data, 64 * KIB);
    expect_event(
        &events,
        fd,
        FlowEventKind::High,
        "the queue passed high again",
    );
    thread::sleep(Duration::from_millis(600));
    let set_at = Instant::now();
    proactor.set_lag_timeout(Some(Duration::from_millis(700)));
    let lagging = expect_event(&events, fd, FlowEventKind::Lagging, "a late timeout");
    // Counted from High (noted between `before_high` and its delivery), not from the call.
    let after = lagging.at - before_high;
    assert!(
        after >= Duration::from_millis(700) && lagging.at - set_at < Duration::from_millis(700),
        "Lagging {after:?} after the sends began, {:?} after the timeout was set",
        lagging.at - set_at
    );
    proactor.cancel().unwrap();
}
