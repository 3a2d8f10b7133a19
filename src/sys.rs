//! Every system-call wrapper the library shares, in one place (as mio's `sys` does): socket
//! options, the socket's own send queue, non-blocking mode, the reserve descriptor, the
//! signal-blocked spawn of the loop thread, and the one spot where a -1 becomes an error. A
//! leaf: it imports nothing of the crate.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::thread::{self, JoinHandle};

/// Turns a -1 return of a libc call into the `io::Error` for `errno`.
pub(crate) fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Checks that `fd` is a stream socket: queued output is written with `sendmsg`, and
/// messages are joined into one byte stream, which would merge datagrams. Fails with
/// `ENOTSOCK` for other fds, `EPROTOTYPE` for datagram and seqpacket sockets, or the kernel's
/// error (`EBADF`) for a closed fd.
pub(crate) fn check_is_stream_socket(fd: RawFd) -> io::Result<()> {
    if socket_option(fd, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(io::Error::from_raw_os_error(libc::EPROTOTYPE));
    }
    Ok(())
}

/// An integer `SOL_SOCKET` option of `fd`; fails with `ENOTSOCK` for an fd that is not a
/// socket, `EBADF` for one that is not open.
pub(crate) fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `size` are live and `size` is the size of `value`.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut size,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Refuses a socket that is not listening (EINVAL) or not a socket (ENOTSOCK): accept on
/// it would fail at every readiness call, for ever.
pub(crate) fn check_is_listening(fd: RawFd) -> io::Result<()> {
    if socket_option(fd, libc::SO_ACCEPTCONN)? == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// Bytes the kernel holds in `fd`'s send queue (sent but not yet acknowledged by the reader,
/// or not yet sent), or `None` where the socket cannot tell (`SIOCOUTQ`).
pub(crate) fn kernel_queued(fd: RawFd) -> Option<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to the live `queued`.
    let result = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    (result == 0).then_some(queued.max(0) as usize)
}

/// A descriptor on `/dev/null` held in reserve: closed to make room to shed a connection
/// when the process is out of descriptors, then reopened.
pub(crate) fn open_reserve() -> io::Result<OwnedFd> {
    // SAFETY: the path is a NUL-terminated literal; a non-negative result is a new fd we own.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets `O_NONBLOCK` on `fd`.
pub(crate) fn set_non_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL read and set flags of `fd`; no pointers are involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Spawns the loop thread with asynchronous signals blocked, so that signals go to the
/// program's own threads (a `pause()` or `sigwait()` there sees them) and handlers are not
/// interrupted by them. The caller's mask is restored before returning.
pub(crate) fn spawn_with_signals_blocked<F>(body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    // SAFETY: sigset_t is plain data; sigfillset/sigdelset initialise and edit it in place.
    let mut blocked: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the signal numbers are valid.
    unsafe {
        libc::sigfillset(&mut blocked);
        for synchronous in [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL] {
            libc::sigdelset(&mut blocked, synchronous);
        }
    }
    // SAFETY: as above.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are live; pthread_sigmask only changes this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, &mut previous) };
    let spawned = thread::Builder::new()
        .name("st_proactor".into())
        .spawn(body);
    // SAFETY: restores the mask saved above, on this thread only.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    spawned.map_err(|err| match err.raw_os_error() {
        Some(_) => err,
        None => io::Error::from_raw_os_error(libc::EAGAIN),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_stream_sockets_can_have_output_queued() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let err = check_is_stream_socket(fds[1]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
        let (socket, _peer) = UnixStream::pair().unwrap();
        check_is_stream_socket(socket.as_raw_fd()).unwrap();
        let (datagrams, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let err = check_is_stream_socket(datagrams.as_raw_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPROTOTYPE));
        // SAFETY: both fds were opened above and are closed once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
