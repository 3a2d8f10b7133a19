//! The public calls that start a completion operation: [`Proactor::accept`] and
//! [`Proactor::receive`]. What the operations do once started is in `crate::operations`.

use super::Proactor;
use crate::operations::{Accepted, Handler};
use crate::sys;
use std::io;
use std::os::fd::RawFd;

impl Proactor {
    /// Accepts connections on the listening socket `listener` and calls `on_accept` on the
    /// loop thread with each new socket (one per call), until `listener` is removed: once
    /// `remove` returns, or a completion that removed it returns, no further call comes. The
    /// listener is switched to non-blocking mode. When the process is out of descriptors
    /// (`EMFILE`, `ENFILE`), the library sheds one pending connection per call (it closes a
    /// reserve fd of its own, accepts, closes that connection, reopens the reserve) instead
    /// of spinning on a listener that stays readable, and `on_accept` gets that error each
    /// time. Errors of one pending connection (`ECONNABORTED`, `EPROTO`, `EPERM`…) are passed
    /// on and accepting goes on; an error of the listener itself (`EBADF`, `EINVAL`) ends the
    /// request: it is removed, and that error is its last call.
    ///
    /// Errors: as [`Proactor::add`]; `EINVAL` when `listener` is not listening, `ENOTSOCK`
    /// when it is not a socket; the kernel's error when the reserve fd cannot be opened.
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
    ///     let connection = result.expect("accepted");
    ///     let _ = accepted.send(TcpStream::from(connection.fd)); // the program owns it
    /// })?;
    /// proactor.run()?;
    /// let client = TcpStream::connect(listener.local_addr()?)?;
    /// let stream = connections.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    /// assert_eq!(stream.peer_addr()?, client.local_addr()?);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn accept<F>(&self, listener: RawFd, on_accept: F) -> io::Result<()>
    where
        F: FnMut(io::Result<Accepted>) + Send + 'static,
    {
        if listener < 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        sys::check_is_listening(listener)?;
        let handler = Handler::Accept {
            on_accept: Box::new(on_accept),
            reserve: Some(sys::open_reserve()?),
        };
        self.add_handler(listener, handler)?;
        if let Err(err) = sys::set_non_blocking(listener) {
            let _ = self.remove(listener);
            return Err(err);
        }
        Ok(())
    }

    /// Receives from the connected stream socket `fd` and calls `on_receive` on the loop
    /// thread with what arrived: `Ok(bytes)` (valid during the call only; on io_uring the
    /// kernel receives into 8 KiB buffers, one per call; on epoll the loop reads all that
    /// is there, up to 64 KiB), then once `Ok(&[])` when the peer has closed its side, or `Err` on an
    /// error (`ECONNRESET`…). That last call ends the request: `fd` is removed from the
    /// proactor by then (so the handler may close it, and output still queued for it is
    /// dropped). [`Proactor::remove`] ends the request early; if it returns `Ok`, no last call
    /// comes, and if it finds `fd` gone (`ENOENT`) the request ended by itself and its last
    /// call has run or is running. The library never closes `fd`.
    ///
    /// Errors: as [`Proactor::add`]; `ENOTSOCK` when `fd` is not a socket, `EPROTOTYPE` when
    /// it is not a stream socket.
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
    ///     received.send(result.map(|bytes| bytes.to_vec()).ok()).unwrap();
    /// })?;
    /// proactor.run()?;
    /// remote.write_all(b"hi")?;
    /// drop(remote);
    /// let wait = std::time::Duration::from_secs(5);
    /// assert_eq!(chunks.recv_timeout(wait).unwrap(), Some(b"hi".to_vec()));
    /// assert_eq!(chunks.recv_timeout(wait).unwrap(), Some(Vec::new())); // end of stream
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn receive<F>(&self, fd: RawFd, on_receive: F) -> io::Result<()>
    where
        F: FnMut(io::Result<&[u8]>) + Send + 'static,
    {
        if fd < 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        sys::check_is_stream_socket(fd)?;
        self.add_handler(fd, Handler::Receive(Box::new(on_receive)))
    }
}
