//! What a registration does when its fd has news: a readiness handler is called with the
//! fd; for the completion operations (accept, receive) the library performs the I/O and
//! hands the result to a completion handler.
//!
//! Both operations are multishot: one request keeps delivering until its fd is removed, or
//! (for a receive) until the end of the stream or an error, which is the request's last call.
//! Where the backend performs them (io_uring's accept and receive requests), the loop gets
//! their completions; elsewhere the loop performs them itself when the fd is ready
//! (`perform_on_readiness`). Either way the handler runs on the loop thread like any other.

use crate::token::Operation;
use std::cell::RefCell;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Size of the loop thread's receive buffer, shared by every receive of that thread: an
/// idle connection holds no buffer, and a busy one reads all that is there, up to this.
pub(crate) const RECEIVE_BUFFER: usize = 64 * 1024;

/// A readiness handler: called with the fd that is ready.
pub(crate) type ReadyHandler = Box<dyn FnMut(RawFd) + Send>;
/// A receive completion handler: the bytes that arrived, `Ok(&[])` at the end, or the error.
pub(crate) type ReceiveHandler = Box<dyn FnMut(io::Result<&[u8]>) + Send>;
/// An accept completion handler: one new connection, or the error of one accept.
pub(crate) type AcceptHandler = Box<dyn FnMut(io::Result<Accepted>) + Send>;

/// What a registration runs, as the registry stores it.
pub(crate) enum Handler {
    /// `add`: the program does its own I/O when the fd is ready.
    Ready(ReadyHandler),
    /// `receive`: the library receives.
    Receive(ReceiveHandler),
    /// `accept`: the library accepts; `reserve` is the fd it closes to make room to shed a
    /// connection when the process is out of descriptors.
    Accept {
        on_accept: AcceptHandler,
        reserve: Option<OwnedFd>,
    },
}

impl Handler {
    /// The operation the backend may perform for this registration.
    pub(crate) fn operation(&self) -> Operation {
        match self {
            Handler::Ready(_) => Operation::Ready,
            Handler::Receive(_) => Operation::Receive,
            Handler::Accept { .. } => Operation::Accept,
        }
    }
}

/// What an operation's completions brought while they could not be delivered (the fd was
/// paused, or the loop stopping), kept in order until they can be. Accepted sockets still
/// held when the registration goes are closed.
#[derive(Default)]
pub(crate) struct HeldInput {
    /// Received bytes.
    pub(crate) bytes: Vec<u8>,
    /// The receive's last result after them: 0 (end of stream) or -errno.
    pub(crate) end: Option<i32>,
    /// Accept results: new fds, or -errno.
    pub(crate) accepted: Vec<i32>,
}

impl HeldInput {
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.end.is_none() && self.accepted.is_empty()
    }

    /// Appends what `later` holds (held after this).
    pub(crate) fn append(&mut self, mut later: HeldInput) {
        if self.end.is_none() {
            self.bytes.append(&mut later.bytes);
            self.end = later.end.take();
        }
        self.accepted.append(&mut later.accepted);
    }
}

impl Drop for HeldInput {
    fn drop(&mut self) {
        for &fd in self.accepted.iter().filter(|&&fd| fd >= 0) {
            // SAFETY: an accepted fd still held belongs to nobody but this holder.
            unsafe { libc::close(fd) };
        }
    }
}

/// What the loop does after an operation's handler call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The request goes on.
    Continue,
    /// That was the request's last call; its registration was removed before it.
    Ended,
}

thread_local! {
    /// The receive buffer of the loop thread this runs on (allocated at its first receive).
    static RECEIVE_SPACE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A connection taken by [`Proactor::accept`](crate::Proactor::accept): the new socket (non-blocking, close-on-exec),
/// which belongs to the program, and its peer's address. The library never closes the socket;
/// dropping the `Accepted` (or the [`OwnedFd`] taken out of it) does.
///
/// ```
/// use st_proactor::Proactor;
/// use std::net::{TcpListener, TcpStream};
/// use std::os::fd::AsRawFd;
///
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let (accepted, connections) = std::sync::mpsc::channel();
/// let proactor = Proactor::new()?;
/// proactor.accept(listener.as_raw_fd(), move |result| {
///     let _ = accepted.send(result.expect("a connection"));
/// })?;
/// proactor.run()?;
/// let client = TcpStream::connect(listener.local_addr()?)?;
/// let connection = connections.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
/// assert_eq!(connection.peer_addr(), Some(client.local_addr()?));
/// let stream = TcpStream::from(connection.fd); // closed when `stream` is dropped
/// assert_eq!(stream.peer_addr()?, client.local_addr()?);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Accepted {
    /// The new connection's socket, owned: dropping it closes the connection.
    pub fd: OwnedFd,
    /// The peer's address (`sockaddr_in` or `sockaddr_in6` for TCP, by `ss_family`); see
    /// [`Accepted::peer_addr`] for it as a [`SocketAddr`].
    pub peer: libc::sockaddr_storage,
    /// How many bytes of `peer` the address fills.
    pub peer_len: libc::socklen_t,
}

impl Accepted {
    /// The peer's address, for an IPv4 or IPv6 peer; `None` for other address families (a
    /// Unix-domain peer, whose address `peer` still holds).
    ///
    /// ```
    /// use st_proactor::Proactor;
    /// use std::net::{TcpListener, TcpStream};
    /// use std::os::fd::AsRawFd;
    ///
    /// let listener = TcpListener::bind("127.0.0.1:0")?;
    /// let (peers, addresses) = std::sync::mpsc::channel();
    /// let proactor = Proactor::new()?;
    /// proactor.accept(listener.as_raw_fd(), move |result| {
    ///     let _ = peers.send(result.ok().and_then(|connection| connection.peer_addr()));
    /// })?;
    /// proactor.run()?;
    /// let client = TcpStream::connect(listener.local_addr()?)?;
    /// let peer = addresses.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    /// assert_eq!(peer, Some(client.local_addr()?));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        let len = self.peer_len as usize;
        match i32::from(self.peer.ss_family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: sockaddr_storage is aligned and sized for every address type, and
                // the kernel filled a sockaddr_in (its family says so, its length suffices).
                let v4 = unsafe {
                    &*(&self.peer as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(v4.sin_port),
                )))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for a sockaddr_in6.
                let v6 = unsafe {
                    &*(&self.peer as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(v6.sin6_addr.s6_addr),
                    u16::from_be(v6.sin6_port),
                    v6.sin6_flowinfo,
                    v6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

impl fmt::Debug for Accepted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accepted")
            .field("fd", &self.fd)
            .field("peer", &self.peer_addr())
            .finish()
    }
}

/// Runs `handler` for its fd, which the backend found ready: a readiness handler is called;
/// for a receive or an accept, the loop performs one `recv` or `accept4` and hands the result
/// over (it calls again while the fd stays ready). `remove` removes the registration (true:
/// this call removed it); it comes before a request's last call, so that the handler may
/// close the fd, and a request another thread removed meanwhile gets no last call.
pub(crate) fn perform_on_readiness(
    handler: &mut Handler,
    fd: RawFd,
    remove: &mut dyn FnMut(RawFd) -> bool,
) -> Outcome {
    match handler {
        Handler::Ready(on_ready) => {
            on_ready(fd);
            Outcome::Continue
        }
        Handler::Receive(on_receive) => receive_on_readiness(on_receive, fd, remove),
        Handler::Accept { on_accept, reserve } => {
            accept_on_readiness(on_accept, reserve, fd, remove)
        }
    }
}

fn receive_on_readiness(
    on_receive: &mut ReceiveHandler,
    fd: RawFd,
    remove: &mut dyn FnMut(RawFd) -> bool,
) -> Outcome {
    let mut buffer = RECEIVE_SPACE.with(|space| std::mem::take(&mut *space.borrow_mut()));
    buffer.resize(RECEIVE_BUFFER, 0);
    // SAFETY: `buffer` has `len` writable bytes; MSG_DONTWAIT keeps a blocking socket from
    // blocking the loop.
    let received = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    let outcome = if received > 0 {
        on_receive(Ok(&buffer[..received as usize]));
        Outcome::Continue
    } else {
        let result = if received == 0 {
            Ok(0)
        } else {
            Err(io::Error::last_os_error())
        };
        received_end(on_receive, fd, result, remove)
    };
    RECEIVE_SPACE.with(|space| *space.borrow_mut() = buffer);
    outcome
}

/// A receive that brought no bytes: `Ok(0)` is the end of the stream. A transient error
/// (`EAGAIN`…) changes nothing; the end or another error is the request's last call.
pub(crate) fn received_end(
    on_receive: &mut ReceiveHandler,
    fd: RawFd,
    result: io::Result<usize>,
    remove: &mut dyn FnMut(RawFd) -> bool,
) -> Outcome {
    if let Err(err) = &result {
        if matches!(
            err.raw_os_error(),
            Some(libc::EAGAIN | libc::EINTR | libc::ENOMEM | libc::ENOBUFS)
        ) {
            return Outcome::Continue;
        }
    }
    // The registration goes first, so the handler may close the fd; if another thread
    // removed it meanwhile, that removal ended the request and there is no last call.
    if remove(fd) {
        on_receive(result.map(|_| &[][..]));
    }
    Outcome::Ended
}

fn accept_on_readiness(
    on_accept: &mut AcceptHandler,
    reserve: &mut Option<OwnedFd>,
    listener: RawFd,
    remove: &mut dyn FnMut(RawFd) -> bool,
) -> Outcome {
    match accept_one(listener) {
        Ok(accepted) => {
            on_accept(Ok(accepted));
            Outcome::Continue
        }
        Err(err) => accept_failed(on_accept, reserve, listener, err, remove),
    }
}

/// An accept that failed with `err`: out of descriptors, one pending connection is shed;
/// an error of the listener itself ends the request; others are passed on.
pub(crate) fn accept_failed(
    on_accept: &mut AcceptHandler,
    reserve: &mut Option<OwnedFd>,
    listener: RawFd,
    err: io::Error,
    remove: &mut dyn FnMut(RawFd) -> bool,
) -> Outcome {
    if reserve.is_none() {
        *reserve = crate::sys::open_reserve().ok(); // it could not be reopened after a shed
    }
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR) => Outcome::Continue,
        Some(libc::EMFILE | libc::ENFILE) => {
            shed_one(listener, reserve);
            on_accept(Err(err));
            Outcome::Continue
        }
        // The listener itself is broken: the request ends with this call.
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP) => {
            if remove(listener) {
                on_accept(Err(err));
            }
            Outcome::Ended
        }
        // An error of one pending connection (ECONNABORTED, EPROTO, EPERM…): reported, and
        // accepting goes on.
        _ => {
            on_accept(Err(err));
            Outcome::Continue
        }
    }
}

/// The connection `fd` that the kernel accepted for the library (a multishot accept gives
/// no address, so the peer's is asked for).
pub(crate) fn accepted_socket(fd: RawFd) -> Accepted {
    // SAFETY: `fd` was just accepted for the library and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut peer_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `peer` has `peer_len` bytes of room for the address.
    let asked = unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            (&mut peer as *mut libc::sockaddr_storage).cast(),
            &mut peer_len,
        )
    };
    if asked != 0 {
        peer_len = 0; // the peer is gone already; its reads will say so
    }
    Accepted { fd, peer, peer_len }
}

fn accept_one(listener: RawFd) -> io::Result<Accepted> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut peer_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `peer` has `peer_len` bytes of room for the address.
    let fd = unsafe {
        libc::accept4(
            listener,
            (&mut peer as *mut libc::sockaddr_storage).cast(),
            &mut peer_len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just accepted and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Accepted { fd, peer, peer_len })
}

/// Out of descriptors, the pending connection would keep the listener readable and the loop
/// spinning: the reserve fd makes room to take that connection off the queue and close it.
fn shed_one(listener: RawFd, reserve: &mut Option<OwnedFd>) {
    drop(reserve.take());
    // SAFETY: NULL address pointers are allowed; the fd accepted here is closed at once.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: `fd` was just accepted by the library and is closed once.
        unsafe { libc::close(fd) };
    }
    *reserve = crate::sys::open_reserve().ok();
}

impl AsFd for Accepted {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Accepted {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Accepted> for OwnedFd {
    fn from(accepted: Accepted) -> OwnedFd {
        accepted.fd
    }
}
