//! The io_uring backend: the kernel performs receives (into a ring of buffers the library
//! provides), accepts (multishot) and writes, and reports readiness for the registrations of
//! `add` through one-shot `IORING_OP_POLL_ADD` requests.
//!
//! A one-shot poll completes at once when its fd is ready at arming time, so re-arming it
//! after each handler call gives the level-triggered behaviour the contract promises (a
//! multishot poll only reports new wake-ups). A multishot accept posts one completion per
//! connection until it ends (no `IORING_CQE_F_MORE`); a receive posts one per chunk and is
//! one-shot (see `request`); the loop re-arms each where it should go on.
//!
//! Only the loop thread touches the ring. Every thread, the loop's own included, queues its
//! requests in a command queue (`commands.rs`), and the loop moves them to the submission
//! queue before each wait, so a busy turn's requests reach the kernel with the enter that
//! waits. The ring is made for each run of the loop, by the loop thread (`start_run`), which
//! makes it the ring's single issuer where the kernel has `IORING_SETUP_SINGLE_ISSUER` and
//! `IORING_SETUP_DEFER_TASKRUN` (6.1; completions are then processed only when the loop asks
//! for them). A ring made by another thread would make the kernel interrupt that thread's
//! system calls when the ring goes (it notifies every thread that used a ring). At the end of
//! a run every request is cancelled, and the loop waits until each has ended (it counts
//! them: `RunRing::outstanding`); what completed meanwhile is reported to the loop: a
//! receive's bytes or an accepted socket are held for the next run, and the cancelled
//! requests are re-armed through the command queue, where they wait for the next run's ring.
//!
//! What the kernel offers is probed once per process, on a thread of its own (see `probe`):
//! the backend needs the synchronous cancel that the end of a run relies on (6.0); receives
//! need buffer rings (5.19), accepts multishot accept (5.19), writes `SEND` and `SENDMSG`;
//! where one is missing (or `ST_PROACTOR_URING_DISABLE` names it) the loop performs it on
//! readiness instead.
//!
//! Writes: at most one write per fd is in the kernel at a time (several on one socket may
//! complete out of order), carrying everything queued for the fd: a `SEND` for one buffer, a
//! gathered `SENDMSG` for several; a short write sends the rest with the next. The kernel
//! waits for room itself, so no writable watch is needed. All the writes of a turn reach the
//! kernel with the loop's wait.

use super::buffers::{self, BufferRing};
use super::commands::{Command, CommandQueue};
use super::eventfd::EventFd;
use super::{Backend, Event, URING_DISABLE_ENV_VAR};
use crate::sys::check;
use crate::token::Operation;
use crate::token::Token;
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use parking_lot::Mutex;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Submission queue size; a full queue is submitted and pushed to again, so this only
/// bounds how much one `io_uring_enter` carries.
const RING_ENTRIES: u32 = 1024;

/// How long the end of a run waits for its cancelled requests to end (they end at once,
/// unless the kernel misbehaves).
const END_OF_RUN_PATIENCE: Duration = Duration::from_secs(2);

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
    /// The ring of the current run (see the module docs); `None` between runs. Only the
    /// loop thread locks it.
    run: Mutex<Option<RunRing>>,
    /// Requests waiting for the loop thread to submit them.
    commands: CommandQueue,
    waker: EventFd,
    /// An epoll instance used only to ask the kernel whether an fd can be watched, so that
    /// both backends accept and refuse the same fds (see `check_watchable`).
    probe: OwnedFd,
    /// How rings are set up on this kernel.
    setup: Setup,
    /// Whether the kernel performs receives (into the buffer ring).
    receives: bool,
    /// Whether the kernel performs accepts (multishot accept).
    accepts: bool,
    /// Whether the kernel performs writes (`IORING_OP_SEND`, `IORING_OP_SENDMSG`).
    sends: bool,
    /// Listeners whose accept ended out of descriptors: re-armed as a readability poll.
    short_of_fds: Mutex<Vec<Token>>,
}

/// The ring of one run of the loop, with what only the loop thread uses.
struct RunRing {
    /// Declared first, so dropped first: the kernel is done with the buffers before they go.
    ring: IoUring,
    /// The receive buffers, where the kernel performs receives (shared with the handlers
    /// that read them, which run without the `run` lock).
    buffers: Option<Arc<BufferRing>>,
    /// Requests moved from the command queue (kept to reuse its memory).
    taken: Vec<Command>,
    /// The ticket of the last request moved to the submission queue.
    moved_through: u64,
    /// Requests in the submission queue or the kernel whose last completion has not come:
    /// the end of the run waits until there are none, so that no request outlives the
    /// memory it uses.
    outstanding: usize,
    /// Set when requests outlived the end of the run: the ring and the buffers are then kept
    /// (leaked) rather than freed under the kernel.
    leaked: bool,
}

/// The best set-up the kernel accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// Single issuer, completions processed only when the loop asks (6.1).
    DeferTaskrun,
    /// Completions processed when the loop enters the kernel, not by interrupting it (5.19).
    CoopTaskrun,
    Plain,
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

/// Puts `entry` in the submission queue, submitting the queue first when it is full; false
/// when the kernel refused that submission (too many completions wait, or no memory).
///
/// # Safety
/// Whatever `entry` points to stays valid until its completion.
unsafe fn push_to_kernel(ring: &mut IoUring, entry: &squeue::Entry) -> bool {
    let (submitter, mut queue, _) = ring.split();
    loop {
        // SAFETY: the caller keeps what `entry` points to alive until its completion.
        if unsafe { queue.push(entry) }.is_ok() {
            queue.sync();
            return true;
        }
        queue.sync();
        if submitter.submit().is_err() {
            return false;
        }
        queue.sync();
    }
}

/// Makes a ring set up as `setup` says.
fn build_ring(setup: Setup) -> io::Result<IoUring> {
    let mut builder = IoUring::builder();
    builder.setup_cqsize(COMPLETION_ENTRIES);
    match setup {
        Setup::DeferTaskrun => {
            builder.setup_single_issuer().setup_defer_taskrun();
        }
        Setup::CoopTaskrun => {
            builder.setup_coop_taskrun();
        }
        Setup::Plain => {}
    }
    builder.build(RING_ENTRIES)
}

/// Finds the best set-up this kernel accepts (it refuses unknown flags with `EINVAL`).
fn first_ring() -> io::Result<(Setup, IoUring)> {
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    for setup in [Setup::DeferTaskrun, Setup::CoopTaskrun, Setup::Plain] {
        match build_ring(setup) {
            Ok(ring) => return Ok((setup, ring)),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => last = err,
            Err(err) => return Err(err),
        }
    }
    Err(last)
}

/// What the kernel offers, as `probe` found it.
#[derive(Clone, Copy, Debug)]
struct Probed {
    setup: Setup,
    receives: bool,
    accepts: bool,
    sends: bool,
}

/// Probes the kernel once per process (it does not change), on a short-lived thread of its
/// own: the kernel notifies the threads that used a ring when it goes, interrupting their
/// blocking system calls, and a caller's thread must not get that. The error is an errno.
fn probed() -> Result<Probed, i32> {
    static PROBED: OnceLock<Result<Probed, i32>> = OnceLock::new();
    *PROBED.get_or_init(|| {
        let errno = |err: io::Error| err.raw_os_error().unwrap_or(libc::EIO);
        match std::thread::Builder::new()
            .name("st_proactor_probe".into())
            .spawn(move || probe().map_err(errno))
        {
            Ok(thread) => thread.join().unwrap_or(Err(libc::EIO)),
            Err(_) => probe().map_err(errno),
        }
    })
}

/// Makes a ring as each run's will be and asks it what it can do (see `probed`). Fails with
/// the kernel's error where io_uring is not allowed (`ENOSYS`, `EPERM` in many containers),
/// and with `ENOSYS` on kernels before 5.11, whose `io_uring_enter` cannot wait with a
/// timeout (the loop's stall timers need it).
fn probe() -> io::Result<Probed> {
    let (setup, ring) = first_ring()?;
    if !ring.params().is_feature_ext_arg() {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    // The end of every run cancels its requests with the synchronous cancel (6.0); without
    // it (EINVAL) the loop could not be stopped and run again, so `auto` uses epoll.
    let sync_cancel = ring
        .submitter()
        .register_sync_cancel(None, types::CancelBuilder::any());
    if let Err(err) = sync_cancel {
        if err.raw_os_error() != Some(libc::ENOENT) {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
    }
    let mut probe = Probe::new();
    let probed = ring.submitter().register_probe(&mut probe).is_ok();
    let receives = probed
        && probe.is_supported(opcode::Recv::CODE)
        && probe.is_supported(opcode::AsyncCancel::CODE)
        && kernel_at_least(6, 0)
        && BufferRing::register(&ring).is_ok();
    let accepts = probed
        && probe.is_supported(opcode::AcceptMulti::CODE)
        && probe.is_supported(opcode::AsyncCancel::CODE)
        && kernel_at_least(5, 19);
    let sends = probed
        && probe.is_supported(opcode::SendMsg::CODE)
        && probe.is_supported(opcode::Send::CODE)
        && kernel_at_least(6, 0);
    // Where seccomp forbids io_uring_enter (but not io_uring_setup), this fails, and `auto`
    // falls back to epoll.
    ring.submitter().submit()?;
    Ok(Probed {
        setup,
        receives,
        accepts,
        sends,
    })
}

impl Uring {
    /// A backend with what the kernel offers (see `probe` for the errors), less what
    /// `ST_PROACTOR_URING_DISABLE` names. The ring itself is made by each run.
    pub(crate) fn new() -> io::Result<Uring> {
        let probed = probed().map_err(io::Error::from_raw_os_error)?;
        let disabled = disabled_operations();
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let probe_fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Uring {
            run: Mutex::new(None),
            commands: CommandQueue::default(),
            waker: EventFd::new()?,
            // SAFETY: `probe_fd` was just returned by epoll_create1 and is owned by nobody else.
            probe: unsafe { OwnedFd::from_raw_fd(probe_fd) },
            setup: probed.setup,
            receives: probed.receives && !disabled.receive,
            accepts: probed.accepts && !disabled.accept,
            sends: probed.sends && !disabled.send,
            short_of_fds: Mutex::new(Vec::new()),
        })
    }

    /// Queues `request`, about registration `token`, for the loop thread to submit.
    fn push(&self, token: Token, request: squeue::Entry) {
        self.commands.push(token, request);
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

    /// The request that ends the read request of `operation`.
    fn cancel(token: Token, operation: Operation) -> squeue::Entry {
        match operation {
            Operation::Ready => opcode::PollRemove::new(user_data(token, READ_POLL))
                .build()
                .user_data(REMOVAL),
            Operation::Receive => opcode::AsyncCancel::new(user_data(token, RECEIVE))
                .build()
                .user_data(REMOVAL),
            Operation::Accept => opcode::AsyncCancel::new(user_data(token, ACCEPT))
                .build()
                .user_data(REMOVAL),
        }
    }

    /// Cancels the read request of `operation` (for an accept, also the poll that may stand
    /// in for it).
    fn push_cancel(&self, token: Token, operation: Operation) {
        self.push(token, Self::cancel(token, operation));
        if operation == Operation::Accept {
            let poll = opcode::PollRemove::new(user_data(token, ACCEPT_POLL))
                .build()
                .user_data(REMOVAL);
            self.push(token, poll);
        }
    }

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

    /// Moves the queued requests to the submission queue, submitting whenever it is full.
    /// Returns false when some had to stay queued (the kernel refused a submission: too many
    /// completions wait), for the next turn.
    fn move_commands(&self, run: &mut RunRing) -> bool {
        let through = self.commands.take(&mut run.taken);
        let mut moved = 0;
        // SAFETY: requests carry no pointers but those of `send`, whose caller keeps the
        // batch alive until its completion.
        while moved < run.taken.len()
            && unsafe { push_to_kernel(&mut run.ring, &run.taken[moved].entry) }
        {
            moved += 1;
        }
        run.outstanding += moved;
        if moved == run.taken.len() {
            run.taken.clear();
            run.moved_through = through;
            return true;
        }
        let mut rest = run.taken.split_off(moved);
        run.taken.clear();
        run.moved_through = self.commands.put_back(&mut rest);
        false
    }

    /// After an `io_uring_enter`: once the kernel has taken every request moved to it, tells
    /// the callers waiting for them (by an `Event::Submitted`).
    fn note_submitted(&self, run: &mut RunRing, events: &mut Vec<Event>) {
        if run.ring.submission().is_empty() && self.commands.mark_submitted(run.moved_through) {
            events.push(Event::Submitted);
        }
    }

    /// The loop's wake-up request, straight into the submission queue (through the command
    /// queue, for the next turn, when the kernel refuses a submission to make room).
    fn arm_waker(&self, run: &mut RunRing) {
        let request = opcode::PollAdd::new(types::Fd(self.waker.as_raw_fd()), READ_EVENTS)
            .build()
            .user_data(Token::WAKE.to_u64());
        // SAFETY: a poll request carries no pointers.
        if unsafe { push_to_kernel(&mut run.ring, &request) } {
            run.outstanding += 1;
        } else {
            self.push(Token::WAKE, request);
        }
    }

    /// Reads the completion queue: appends what it tells the loop to `events`, counts the
    /// requests that ended, and says whether the wake-up fired (its poll then needs arming).
    fn reap(&self, run: &mut RunRing, events: &mut Vec<Event>) -> bool {
        let mut woken = false;
        for completion in run.ring.completion() {
            let flags = completion.flags();
            if !cqueue::more(flags) {
                run.outstanding = run.outstanding.saturating_sub(1);
            }
            let tagged = completion.user_data();
            if tagged == Token::WAKE.to_u64() {
                woken = true;
                continue;
            }
            if let Some(event) = self.event_of(tagged, completion.result(), flags) {
                events.push(event);
            }
        }
        woken
    }

    /// What completion `tagged`/`result`/`flags` tells the loop, if anything.
    fn event_of(&self, tagged: u64, result: i32, flags: u32) -> Option<Event> {
        let kind = tagged >> KIND_SHIFT;
        let token = Token::from_u64(tagged & TOKEN_MASK);
        let more = cqueue::more(flags);
        let event = match kind {
            READ_POLL if result == -libc::ECANCELED => Event::Lost { token },
            // The fd cannot be polled any more (closed before its removal): re-arming
            // would fail again at once, so the registration goes quiet.
            READ_POLL if result < 0 => return None,
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
            _ => return None, // removals and cancels
        };
        Some(event)
    }
}

impl Backend for Uring {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn performs(&self, operation: Operation) -> bool {
        match operation {
            Operation::Ready => false,
            Operation::Receive => self.receives,
            Operation::Accept => self.accepts,
        }
    }

    fn start_run(&self) -> io::Result<()> {
        // Made here, the ring has the loop thread as its single issuer.
        let ring = build_ring(self.setup)?;
        let buffers = if self.receives {
            Some(Arc::new(BufferRing::register(&ring)?))
        } else {
            None
        };
        let mut run = RunRing {
            ring,
            buffers,
            taken: Vec::new(),
            moved_through: 0,
            outstanding: 0,
            leaked: false,
        };
        self.arm_waker(&mut run);
        *self.run.lock() = Some(run);
        self.commands.set_live(true);
        Ok(())
    }

    fn end_run(&self, events: &mut Vec<Event>) {
        let mut run = self.run.lock();
        let Some(run) = run.as_mut() else {
            return;
        };
        // What is still in the submission queue goes first, to be cancelled with the rest
        // (a request submitted after the cancel would outlive the run).
        for _ in 0..1000 {
            if run.ring.submission().is_empty() {
                break;
            }
            if run.ring.submitter().submit().is_err() {
                // Too many completions wait: read them to make room.
                let no_wait = types::Timespec::new();
                let args = types::SubmitArgs::new().timespec(&no_wait);
                let _ = run.ring.submitter().submit_with_args(1, &args);
                self.reap(run, events);
            }
        }
        // Cancels every request. Those waiting on a socket end later, in task work that the
        // kernel runs only inside an enter that asks for completions (a few dozen per enter
        // on recent kernels): the loop below enters until every request has ended.
        let _ = run
            .ring
            .submitter()
            .register_sync_cancel(None, types::CancelBuilder::any());
        let deadline = Instant::now() + END_OF_RUN_PATIENCE;
        let slice = types::Timespec::new().nsec(10_000_000);
        let args = types::SubmitArgs::new().timespec(&slice);
        while run.outstanding > 0 && Instant::now() < deadline {
            let _ = run.ring.submitter().submit_with_args(1, &args);
            self.reap(run, events);
        }
        if run.outstanding > 0 {
            // Requests the kernel did not end in time may still write into the ring's
            // memory: it is kept (leaked), never freed under them. The library prints
            // nothing; this has not been seen with kernels that pass the probe.
            run.leaked = true;
        }
    }

    fn close_run(&self) {
        let run = self.run.lock().take();
        self.commands.set_live(false);
        match run {
            // The kernel may still use the buffers and the batches: they must not be freed.
            Some(run) if run.leaked => std::mem::forget(run),
            run => drop(run),
        }
    }

    fn ticket(&self) -> u64 {
        self.commands.taken_unsubmitted()
    }

    fn queues_requests(&self) -> bool {
        true
    }

    fn submit_leftovers(&self) {
        let mut run = self.run.lock();
        let Some(run) = run.as_mut() else {
            return;
        };
        // Only after an enter that could not submit everything (the kernel short of memory,
        // or of room for completions): the loop submits them before a handler closes an fd.
        if !run.ring.submission().is_empty() {
            let _ = run.ring.submitter().submit();
        }
    }

    fn settled(&self, ticket: u64) -> bool {
        self.commands.settled(ticket)
    }

    fn watch(&self, fd: RawFd, token: Token, operation: Operation) -> io::Result<()> {
        if operation == Operation::Ready {
            // Receives and accepts were checked to be on sockets, which can be watched.
            self.check_watchable(fd)?;
        }
        // The caller wakes the loop if need be: the loop submits it with its next wait.
        self.push(token, Self::request(fd, token, operation));
        Ok(())
    }

    fn unwatch(&self, _fd: RawFd, token: Token, operation: Operation) -> io::Result<bool> {
        if operation == Operation::Accept {
            self.short_of_fds.lock().retain(|&waiting| waiting != token);
        }
        // Queued requests would be submitted after the removal returns, maybe to another file
        // by then with this fd number: they are dropped.
        let forgot_write = self
            .commands
            .forget(token, |entry| entry.get_user_data() >> KIND_SHIFT == SEND);
        if !self.commands.is_live() {
            return Ok(forgot_write); // between runs no ring holds a request
        }
        // Not-found removals (the request had ended) end with -ENOENT, which is ignored.
        self.push_cancel(token, operation);
        // A write in flight holds the socket open (the peer would see no end) until the
        // reader reads: it is cancelled; its batch lives until the completion.
        let write = opcode::AsyncCancel::new(user_data(token, SEND))
            .build()
            .user_data(REMOVAL);
        self.push(token, write);
        let write_watch = opcode::PollRemove::new(user_data(token, WRITE_POLL))
            .build()
            .user_data(REMOVAL);
        self.push(token, write_watch);
        Ok(forgot_write)
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
                self.push(token, poll);
                return;
            }
        }
        self.push(token, Self::request(fd, token, operation));
    }

    fn quiet_reading(
        &self,
        _fd: RawFd,
        token: Token,
        operation: Operation,
        _writing: bool,
    ) -> io::Result<()> {
        // The poll that reported the input was one-shot; it is simply not re-armed. A
        // request the kernel performs is cancelled (with the loop's next wait); what it
        // brings until then is held.
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
        let request = if on {
            opcode::PollAdd::new(types::Fd(fd), WRITE_EVENTS)
                .build()
                .user_data(user_data)
        } else {
            opcode::PollRemove::new(user_data)
                .build()
                .user_data(REMOVAL)
        };
        self.push(token, request);
        Ok(())
    }

    fn writable_is_one_shot(&self) -> bool {
        true
    }

    fn wait(&self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let mut run = self.run.lock();
        let Some(run) = run.as_mut() else {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        };
        // Requests left queued must not wait for a timeout, nor may a removal that waits for
        // requests to reach the kernel: the next turn comes at once.
        let all_moved = self.move_commands(run);
        let timeout = if all_moved && !self.commands.someone_waits() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let submitted = match timeout {
            None => run.ring.submitter().submit_and_wait(1),
            Some(timeout) => {
                let timespec = types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&timespec);
                run.ring.submitter().submit_with_args(1, &args)
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
        self.note_submitted(run, events);
        if self.reap(run, events) {
            self.waker.drain();
            self.arm_waker(run);
        }
        Ok(())
    }

    fn received(&self, buffer: u16, len: usize, f: &mut dyn FnMut(&[u8])) {
        let buffers = self.run.lock().as_ref().and_then(|run| run.buffers.clone());
        let Some(buffers) = buffers else {
            // Completions naming a buffer come only from a run, which has its buffers.
            debug_assert!(false, "a receive completion outside a run");
            return;
        };
        // SAFETY: `buffer` was named by a completion of this run and is recycled only below.
        f(unsafe { buffers.bytes(buffer, len) });
        buffers.recycle(buffer);
    }

    fn sends(&self) -> bool {
        self.sends
    }

    unsafe fn send(&self, fd: RawFd, token: Token, header: *const libc::msghdr) {
        // SAFETY: the caller keeps `header` and its iovecs alive until the completion.
        let single = unsafe { ((*header).msg_iovlen == 1).then(|| *(*header).msg_iov) }
            .filter(|buffer| u32::try_from(buffer.iov_len).is_ok());
        // One buffer (one line, on a chat's steady load) goes as a plain SEND: the kernel
        // then has no header and iovec array to copy in.
        let request = match single {
            Some(buffer) => opcode::Send::new(
                types::Fd(fd),
                buffer.iov_base.cast::<u8>(),
                buffer.iov_len as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build(),
            None => opcode::SendMsg::new(types::Fd(fd), header)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build(),
        };
        self.push(token, request.user_data(user_data(token, SEND)));
    }

    fn wake(&self) {
        self.waker.wake();
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
