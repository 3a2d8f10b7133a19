//! Per-fd output queues: the bytes handed to the proactor for one fd, in the order they were
//! handed over, waiting for the loop to write them.
//!
//! A queued message is an `Arc<[u8]>`, so a broadcast to many fds holds one copy of its bytes.
//! A write carries the front of a queue as one gathered batch (an iovec per message, up to
//! 64), which is what makes a chat broadcast cheap: the cost of a send is the call, not its
//! size. The batch keeps its messages alive while it is written: by the loop with `sendmsg`
//! and no lock held (epoll), or by the kernel (io_uring) until its completion.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

/// The bookkeeping a queued message costs beyond its bytes (queue entry, `Arc` header,
/// allocator rounding), counted against the high-water mark so that a flood of one-byte
/// messages cannot hold much more memory than the limit says.
///
/// ```
/// use std::os::fd::AsRawFd;
/// let (socket, _peer) = std::os::unix::net::UnixStream::pair()?;
/// let proactor = st_proactor::Proactor::new()?;
/// proactor.add(socket.as_raw_fd(), |_fd| {})?;
/// proactor.send(socket.as_raw_fd(), b"hi")?;
/// assert_eq!(proactor.queued_bytes(socket.as_raw_fd())?, 2 + st_proactor::MESSAGE_OVERHEAD);
/// # Ok::<(), std::io::Error>(())
/// ```
pub const MESSAGE_OVERHEAD: usize = 64;

/// The per-fd high-water mark a new proactor starts with: 4 MiB.
///
/// ```
/// assert_eq!(st_proactor::Proactor::new()?.send_limit(), st_proactor::DEFAULT_SEND_LIMIT);
/// # Ok::<(), std::io::Error>(())
/// ```
pub const DEFAULT_SEND_LIMIT: usize = 4 << 20;

/// How many messages one `sendmsg` carries at most (well under the kernel's IOV_MAX of 1024).
const IOVECS_PER_SEND: usize = 64;

/// The ordered output of one fd.
#[derive(Default)]
pub(crate) struct SendQueue {
    messages: VecDeque<Arc<[u8]>>,
    /// Bytes of the front message already written.
    front_written: usize,
    /// Unwritten bytes plus `MESSAGE_OVERHEAD` per queued message.
    charged: usize,
}

impl SendQueue {
    pub(crate) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Unwritten bytes plus the per-message overhead: what the high-water mark is checked on.
    pub(crate) fn charged(&self) -> usize {
        self.charged
    }

    /// Appends `message`, unless that would take the queue past `limit` bytes (counting
    /// `MESSAGE_OVERHEAD` per message): then fails with `ENOBUFS` and queues nothing.
    pub(crate) fn push(&mut self, message: &Arc<[u8]>, limit: usize) -> io::Result<()> {
        let cost = message.len() + MESSAGE_OVERHEAD;
        if self.charged + cost > limit {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        self.charged += cost;
        self.messages.push_back(Arc::clone(message));
        Ok(())
    }

    /// Forgets everything queued and gives the memory back.
    pub(crate) fn clear(&mut self) {
        *self = SendQueue::default();
    }

    /// Gives back the memory of a queue that grew and is empty now: an idle fd keeps no
    /// buffer.
    pub(crate) fn release_idle_capacity(&mut self) {
        if self.messages.is_empty() && self.messages.capacity() > 32 {
            self.messages = VecDeque::new();
        }
    }

    /// Writes a batch (see `gather`) to `fd` now, without blocking (`MSG_DONTWAIT`) and without
    /// SIGPIPE (`MSG_NOSIGNAL`): the bytes written, or -errno.
    ///
    /// # Safety
    /// `header` is the header of a live batch, which stays alive until this returns.
    pub(crate) unsafe fn write_now(fd: RawFd, header: *const libc::msghdr) -> isize {
        loop {
            // SAFETY: the caller keeps the batch behind `header` alive for the call; the
            // kernel only reads it.
            let sent =
                unsafe { libc::sendmsg(fd, header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if sent >= 0 {
                return sent;
            }
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return -(errno as isize);
            }
        }
    }

    /// A gathered write of the front of the queue (up to `IOVECS_PER_SEND` messages) for the
    /// kernel to perform, in `spare` (a finished batch, whose memory is reused) if given;
    /// `None` when nothing is queued. The queue is unchanged until the write completes
    /// (`consume`).
    pub(crate) fn gather(&self, spare: Option<Box<SendBatch>>) -> Option<Box<SendBatch>> {
        if self.messages.is_empty() {
            return None;
        }
        let mut batch = spare.unwrap_or_else(SendBatch::empty);
        batch.messages.clear();
        batch.offered = 0;
        batch
            .messages
            .extend(self.messages.iter().take(IOVECS_PER_SEND).cloned());
        for (index, message) in batch.messages.iter().enumerate() {
            let skip = if index == 0 { self.front_written } else { 0 };
            let bytes = &message[skip..];
            batch.iovecs[index] = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            batch.offered += bytes.len();
        }
        batch.header.msg_iovlen = batch.messages.len();
        batch.header.msg_iov = batch.iovecs.as_mut_ptr();
        Some(batch)
    }

    /// Drops `sent` written bytes from the front of the queue.
    pub(crate) fn consume(&mut self, mut sent: usize) {
        while sent > 0 {
            let Some(front) = self.messages.front() else {
                break;
            };
            let left = front.len() - self.front_written;
            if sent < left {
                self.front_written += sent;
                self.charged -= sent;
                return;
            }
            sent -= left;
            self.charged -= left + MESSAGE_OVERHEAD;
            self.front_written = 0;
            self.messages.pop_front();
        }
        // Zero-length messages are never queued, so nothing is left to skip here.
    }
}

/// A gathered write in the kernel's hands (an io_uring `SENDMSG`): its header, its iovecs and
/// the messages they point into, which it keeps alive until the write completes, even when
/// the fd's registration is removed meanwhile. Boxed, so that the addresses the kernel was
/// given do not move.
pub(crate) struct SendBatch {
    header: libc::msghdr,
    iovecs: [libc::iovec; IOVECS_PER_SEND],
    messages: Vec<Arc<[u8]>>,
    /// Bytes the write offers: a completion with fewer found the socket full.
    pub(crate) offered: usize,
}

// SAFETY: the raw pointers in `header` and `iovecs` point into the batch itself and into the
// messages it owns; nothing else refers to them, so the batch may move between threads.
unsafe impl Send for SendBatch {}

impl SendBatch {
    fn empty() -> Box<SendBatch> {
        Box::new(SendBatch {
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            header: unsafe { std::mem::zeroed() },
            iovecs: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; IOVECS_PER_SEND],
            messages: Vec::with_capacity(IOVECS_PER_SEND),
            offered: 0,
        })
    }

    /// Lets go of the messages of a finished write, keeping the memory for the next one.
    pub(crate) fn finished(mut self: Box<Self>) -> Box<SendBatch> {
        self.messages.clear();
        self
    }

    /// The header to hand to the kernel; valid while the batch lives.
    pub(crate) fn header(&self) -> *const libc::msghdr {
        &self.header
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn message(bytes: &[u8]) -> Arc<[u8]> {
        Arc::from(bytes)
    }

    /// What a flush achieved.
    #[derive(Debug)]
    enum Flushed {
        Drained,
        Blocked,
        Failed(i32),
    }

    /// Writes as the loop does: one gathered batch per `sendmsg`, until the queue is drained,
    /// the socket is full, or the write fails (which drops the queue).
    fn flush(queue: &mut SendQueue, fd: RawFd) -> Flushed {
        while let Some(batch) = queue.gather(None) {
            // SAFETY: `batch` lives until the end of this iteration.
            let sent = unsafe { SendQueue::write_now(fd, batch.header()) };
            if sent < 0 {
                if sent == -(libc::EAGAIN as isize) {
                    return Flushed::Blocked;
                }
                queue.clear();
                return Flushed::Failed(-sent as i32);
            }
            queue.consume(sent as usize);
            if (sent as usize) < batch.offered {
                return Flushed::Blocked;
            }
        }
        queue.release_idle_capacity();
        Flushed::Drained
    }

    #[test]
    fn push_past_the_limit_fails_with_enobufs_and_queues_nothing() {
        let mut queue = SendQueue::default();
        let limit = 2 * (10 + MESSAGE_OVERHEAD);
        queue.push(&message(&[1; 10]), limit).unwrap();
        queue.push(&message(&[2; 10]), limit).unwrap();
        let err = queue.push(&message(&[3; 1]), limit).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS));
        assert_eq!(queue.charged(), limit);
    }

    #[test]
    fn flush_writes_messages_in_order_and_empties_the_queue() {
        let (writer, mut reader) = UnixStream::pair().unwrap();
        let mut queue = SendQueue::default();
        for part in [&b"one "[..], b"two ", b"three"] {
            queue.push(&message(part), DEFAULT_SEND_LIMIT).unwrap();
        }
        assert!(matches!(
            flush(&mut queue, writer.as_raw_fd()),
            Flushed::Drained
        ));
        assert!(queue.is_empty());
        assert_eq!(queue.charged(), 0);
        drop(writer);
        let mut received = String::new();
        reader.read_to_string(&mut received).unwrap();
        assert_eq!(received, "one two three");
    }

    #[test]
    fn flush_stops_at_a_full_socket_and_resumes_where_it_stopped() {
        let (writer, mut reader) = UnixStream::pair().unwrap();
        let mut queue = SendQueue::default();
        let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        queue.push(&message(&big), usize::MAX).unwrap();
        assert!(matches!(
            flush(&mut queue, writer.as_raw_fd()),
            Flushed::Blocked
        ));
        assert!(queue.charged() < big.len() + MESSAGE_OVERHEAD);
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        for _ in 0..10_000 {
            if received.len() == big.len() {
                break;
            }
            let n = reader.read(&mut chunk).unwrap();
            received.extend_from_slice(&chunk[..n]);
            let _ = flush(&mut queue, writer.as_raw_fd());
        }
        assert!(queue.is_empty());
        assert_eq!(received, big);
    }

    #[test]
    fn flush_to_a_closed_peer_fails_and_drops_the_queue() {
        let (writer, reader) = UnixStream::pair().unwrap();
        drop(reader);
        let mut queue = SendQueue::default();
        queue.push(&message(b"lost"), DEFAULT_SEND_LIMIT).unwrap();
        match flush(&mut queue, writer.as_raw_fd()) {
            Flushed::Failed(errno) => assert_eq!(errno, libc::EPIPE),
            other => panic!("expected EPIPE, got {other:?}"),
        }
        assert!(queue.is_empty());
        assert_eq!(queue.charged(), 0);
    }
}
