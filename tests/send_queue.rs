//! Queued, non-blocking sends over real sockets, on the backend `ST_PROACTOR_BACKEND` names
//! (the Makefile runs this file once per backend).

mod common;

use common::{errno, tcp_pair, wait_until, PATIENCE};
use st_proactor::{Proactor, MESSAGE_OVERHEAD};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// Reads exactly `len` bytes, failing the test after `PATIENCE`.
fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut received = vec![0u8; len];
    stream
        .read_exact(&mut received)
        .expect("the bytes arrive in time");
    received
}

#[test]
fn sends_from_several_threads_keep_each_callers_order() {
    let (local, mut remote) = tcp_pair();
    let proactor = Arc::new(Proactor::new().unwrap());
    proactor.add(local.as_raw_fd(), |_fd| {}).unwrap();
    proactor.run().unwrap();
    const THREADS: usize = 4;
    const MESSAGES: usize = 2000;
    let senders: Vec<_> = (0..THREADS)
        .map(|sender| {
            let proactor = Arc::clone(&proactor);
            let fd = local.as_raw_fd();
            thread::spawn(move || {
                for index in 0..MESSAGES {
                    let line = format!("{sender}:{index:05}\n");
                    proactor.send(fd, line.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    let text = String::from_utf8(read_exactly(&mut remote, THREADS * MESSAGES * 8)).unwrap();
    let mut next = [0usize; THREADS];
    for line in text.lines() {
        let (sender, index) = line
            .split_once(':')
            .expect("whole lines, never interleaved");
        let sender: usize = sender.parse().unwrap();
        assert_eq!(
            index.parse::<usize>().unwrap(),
            next[sender],
            "order of sender {sender}"
        );
        next[sender] += 1;
    }
    assert_eq!(next, [MESSAGES; THREADS]);
    proactor.cancel().unwrap();
}

#[test]
fn partial_writes_complete_for_a_slow_reader_without_blocking_the_loop() {
    let (local, mut remote) = tcp_pair();
    let (ping_reader, mut ping_writer) = std::os::unix::net::UnixStream::pair().unwrap();
    let proactor = Proactor::new().unwrap();
    proactor.set_send_limit(usize::MAX);
    proactor.add(local.as_raw_fd(), |_fd| {}).unwrap();
    let (pinged, ping_seen) = mpsc::channel();
    let mut ping_reader_owned = ping_reader;
    proactor
        .add(ping_reader_owned.as_raw_fd(), move |_fd| {
            let mut byte = [0u8; 1];
            if ping_reader_owned.read(&mut byte).unwrap_or(0) == 1 {
                let _ = pinged.send(());
            }
        })
        .unwrap();
    proactor.run().unwrap();
    // Far more than the socket buffers hold, so most of it waits in the queue.
    let data: Vec<u8> = (0..16_000_000u32).map(|i| (i % 253) as u8).collect();
    for chunk in data.chunks(100_000) {
        proactor.send(local.as_raw_fd(), chunk).unwrap();
    }
    // The loop still answers other fds while the queue waits for the reader.
    let started = Instant::now();
    ping_writer.write_all(b"!").unwrap();
    ping_seen.recv_timeout(PATIENCE).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the loop was blocked"
    );
    assert!(proactor.queued_bytes(local.as_raw_fd()).unwrap() > 0);
    // Read slowly: small reads with pauses.
    remote.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut received = Vec::with_capacity(data.len());
    let mut chunk = vec![0u8; 256 * 1024];
    while received.len() < data.len() {
        let n = remote.read(&mut chunk).unwrap();
        assert!(n > 0, "the stream ended early");
        received.extend_from_slice(&chunk[..n]);
        if received.len() < 2_000_000 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(received == data, "the bytes arrive whole and in order");
    wait_until("the queue is empty", || {
        proactor.queued_bytes(local.as_raw_fd()).unwrap() == 0
    });
    proactor.cancel().unwrap();
}

#[test]
fn a_send_past_the_limit_fails_with_enobufs_and_queues_nothing() {
    let (local, _never_reads) = tcp_pair();
    let proactor = Proactor::new().unwrap();
    let limit = 200_000;
    proactor.set_send_limit(limit);
    assert_eq!(proactor.send_limit(), limit);
    proactor.add(local.as_raw_fd(), |_fd| {}).unwrap();
    let fd = local.as_raw_fd();
    let chunk = vec![7u8; 10_000];
    // The loop is not running: everything stays queued.
    let mut accepted = 0;
    let err = loop {
        match proactor.send(fd, &chunk) {
            Ok(()) => accepted += 1,
            Err(err) => break err,
        }
        assert!(accepted < 1000, "the limit never applied");
    };
    assert_eq!(errno(&err), libc::ENOBUFS);
    let queued = proactor.queued_bytes(fd).unwrap();
    assert_eq!(queued, accepted * (chunk.len() + MESSAGE_OVERHEAD));
    assert!(queued <= limit);
    assert!(queued + chunk.len() + MESSAGE_OVERHEAD > limit);
    // A send that still fits is taken; the failed one left no trace.
    let room = limit - queued - MESSAGE_OVERHEAD;
    if room > 0 {
        proactor.send(fd, &vec![1u8; room]).unwrap();
        assert_eq!(proactor.queued_bytes(fd).unwrap(), limit);
    }
}

#[test]
fn a_peer_that_resets_drops_the_queue_and_the_handler_sees_the_hang_up() {
    let (local, remote) = tcp_pair();
    let proactor = Proactor::new().unwrap();
    proactor.set_send_limit(usize::MAX);
    let hang_ups = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&hang_ups);
    let mut local_owned = local.try_clone().unwrap();
    proactor
        .add(local.as_raw_fd(), move |_fd| {
            let mut buffer = [0u8; 4096];
            match local_owned.read(&mut buffer) {
                Ok(0) | Err(_) => {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
            }
        })
        .unwrap();
    proactor.run().unwrap();
    // Reset: SO_LINGER with a zero timeout makes close send an RST.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a live struct of the size given, for a socket we own.
    let set = unsafe {
        libc::setsockopt(
            remote.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    drop(remote);
    wait_until("the handler saw the hang-up", || {
        hang_ups.load(Ordering::SeqCst) > 0
    });
    // Sends are flushed and fail: the queue is dropped and later sends report the error.
    let deadline = Instant::now() + PATIENCE;
    let err = loop {
        if let Err(err) = proactor.send(local.as_raw_fd(), &[0u8; 65536]) {
            break err;
        }
        assert!(
            Instant::now() < deadline,
            "sends to a reset peer never failed"
        );
        thread::sleep(Duration::from_millis(5));
    };
    assert!(
        [libc::EPIPE, libc::ECONNRESET].contains(&errno(&err)),
        "unexpected error {err}"
    );
    assert_eq!(proactor.queued_bytes(local.as_raw_fd()).unwrap(), 0);
    proactor.remove(local.as_raw_fd()).unwrap();
    proactor.cancel().unwrap();
}

#[test]
fn removing_an_fd_frees_its_queue_and_a_new_registration_starts_empty() {
    let (local, mut remote) = tcp_pair();
    let proactor = Proactor::new().unwrap();
    let fd = local.as_raw_fd();
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.send(fd, &vec![9u8; 1_000_000]).unwrap();
    assert!(proactor.queued_bytes(fd).unwrap() >= 1_000_000);
    proactor.remove(fd).unwrap();
    assert_eq!(errno(&proactor.queued_bytes(fd).unwrap_err()), libc::ENOENT);
    assert_eq!(errno(&proactor.send(fd, b"x").unwrap_err()), libc::ENOENT);
    proactor.add(fd, |_fd| {}).unwrap();
    assert_eq!(proactor.queued_bytes(fd).unwrap(), 0);
    proactor.send(fd, b"fresh").unwrap();
    proactor.run().unwrap();
    // Only the new registration's bytes arrive: the old queue was never written.
    assert_eq!(read_exactly(&mut remote, 5), b"fresh");
    remote
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut extra = [0u8; 16];
    let extra_read = remote.read(&mut extra);
    assert!(
        matches!(&extra_read, Err(err) if err.kind() == io::ErrorKind::WouldBlock),
        "{extra_read:?} {:?}",
        &extra[..]
    );
    proactor.cancel().unwrap();
}

#[test]
fn sends_that_cannot_be_queued_say_why() {
    let proactor = Proactor::new().unwrap();
    assert_eq!(errno(&proactor.send(999, b"x").unwrap_err()), libc::ENOENT);
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    proactor.add(fds[0], |_fd| {}).unwrap();
    assert_eq!(
        errno(&proactor.send(fds[0], b"x").unwrap_err()),
        libc::ENOTSOCK
    );
    // Nothing to queue, nothing to check.
    proactor.send(fds[0], b"").unwrap();
    // Datagrams would be merged by the byte-stream queue: refused.
    let (datagrams, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
    proactor.add(datagrams.as_raw_fd(), |_fd| {}).unwrap();
    assert_eq!(
        errno(&proactor.send(datagrams.as_raw_fd(), b"x").unwrap_err()),
        libc::EPROTOTYPE
    );
    proactor.remove(datagrams.as_raw_fd()).unwrap();
    proactor.remove(fds[0]).unwrap();
    // SAFETY: both fds were opened above and are closed once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

#[test]
fn output_queued_by_a_handler_is_written_after_it_returns() {
    // An echo server: the handler reads and queues the bytes back.
    let (local, mut remote) = tcp_pair();
    let proactor = Arc::new(Proactor::new().unwrap());
    let weak = Arc::downgrade(&proactor);
    let mut local_owned = local.try_clone().unwrap();
    proactor
        .add(local.as_raw_fd(), move |fd| {
            let mut buffer = [0u8; 4096];
            if let Ok(n @ 1..) = local_owned.read(&mut buffer) {
                if let Some(proactor) = weak.upgrade() {
                    proactor.send(fd, &buffer[..n]).unwrap();
                }
            }
        })
        .unwrap();
    proactor.run().unwrap();
    for round in 0..100 {
        let line = format!("round {round}\n");
        remote.write_all(line.as_bytes()).unwrap();
        assert_eq!(read_exactly(&mut remote, line.len()), line.as_bytes());
    }
    proactor.cancel().unwrap();
}

/// Raises the soft limit on open files as far as the hard limit allows.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit for getrlimit to fill and setrlimit to read.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

#[test]
fn a_broadcast_reaches_a_thousand_sockets_from_one_copy() {
    const SOCKETS: usize = 1000;
    assert!(
        raise_fd_limit() >= 3 * SOCKETS as u64,
        "the hard limit on open files is too low for this test"
    );
    let proactor = Proactor::new().unwrap();
    let pairs: Vec<_> = (0..SOCKETS)
        .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
        .collect();
    let fds: Vec<i32> = pairs.iter().map(|(local, _)| local.as_raw_fd()).collect();
    for &fd in &fds {
        proactor.add(fd, |_fd| {}).unwrap();
    }
    proactor.run().unwrap();
    let message = b"to everyone\n";
    let mut with_a_stranger = fds.clone();
    with_a_stranger.push(pairs[0].1.as_raw_fd()); // a socket not registered
    let failures = proactor.broadcast(&with_a_stranger, message);
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, SOCKETS);
    assert_eq!(errno(&failures[0].1), libc::ENOENT);
    for (_, remote) in &pairs {
        let mut remote = remote;
        remote.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut received = [0u8; 12];
        remote.read_exact(&mut received).unwrap();
        assert_eq!(&received, message);
    }
    proactor.cancel().unwrap();
}

#[test]
fn a_flush_delay_holds_output_back_and_writes_it_together() {
    let (local, mut remote) = std::os::unix::net::UnixStream::pair().unwrap();
    let proactor = Arc::new(Proactor::new().unwrap());
    proactor.add(local.as_raw_fd(), |_fd| {}).unwrap();
    let delay = Duration::from_millis(150);
    proactor.set_flush_delay(delay);
    assert_eq!(proactor.flush_delay(), delay);
    proactor.run().unwrap();
    let started = Instant::now();
    proactor.send(local.as_raw_fd(), b"first ").unwrap();
    let later = {
        let proactor = Arc::clone(&proactor);
        let fd = local.as_raw_fd();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            proactor.send(fd, b"second").unwrap();
        })
    };
    remote.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut first = [0u8; 1];
    remote.read_exact(&mut first).unwrap();
    let waited = started.elapsed();
    // A lower bound, which no scheduling delay can break: the output was held back.
    assert!(
        waited >= Duration::from_millis(100),
        "written after {waited:?}"
    );
    later.join().unwrap();
    let mut rest = [0u8; 11];
    remote.read_exact(&mut rest).unwrap();
    assert_eq!(&[&first[..], &rest[..]].concat(), b"first second");
    proactor.cancel().unwrap();
}

#[test]
fn a_stop_writes_output_held_back_by_a_flush_delay_at_once() {
    let (local, mut remote) = std::os::unix::net::UnixStream::pair().unwrap();
    let proactor = Proactor::new().unwrap();
    proactor.add(local.as_raw_fd(), |_fd| {}).unwrap();
    proactor.set_flush_delay(Duration::from_secs(1));
    proactor.run().unwrap();
    proactor
        .send(local.as_raw_fd(), b"before the stop")
        .unwrap();
    proactor.cancel().unwrap();
    // The loop wrote it as it stopped: it is in the socket now, not a second later.
    remote.set_nonblocking(true).unwrap();
    let mut received = [0u8; 15];
    remote.read_exact(&mut received).unwrap();
    assert_eq!(&received, b"before the stop");
}

/// The TCP state (`/proc/net/tcp`, hex: 01 established, 04 FIN-wait-1…) of the IPv4 socket
/// bound to local port `local` and connected to port `remote`, if it exists.
fn tcp_state(local: u16, remote: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (local, remote) = (format!(":{local:04X}"), format!(":{remote:04X}"));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 3 && fields[1].ends_with(&local) && fields[2].ends_with(&remote))
            .then(|| fields[3].to_string())
    })
}

/// A socket removed and closed while its output waits for a reader that does not read (on
/// io_uring: while a write of it is in the kernel's hands) is really closed: its TCP
/// connection leaves the established state at once, as after any close with unsent data.
#[test]
fn a_socket_removed_and_closed_while_its_write_waits_is_closed() {
    let (server, client) = tcp_pair();
    let fd = server.as_raw_fd();
    let ports = (
        server.local_addr().unwrap().port(),
        client.local_addr().unwrap().port(),
    );
    let proactor = Proactor::new().unwrap();
    proactor.add(fd, |_fd| {}).unwrap();
    proactor.set_send_limit(64 << 20);
    proactor.run().unwrap();
    // More than loopback socket buffers hold (several MiB each way); the client never reads.
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..32 {
        proactor.send(fd, &chunk).unwrap();
    }
    wait_until("output waits for room", || {
        thread::sleep(Duration::from_millis(20));
        proactor.queued_bytes(fd).unwrap() > 0
    });
    assert_eq!(
        tcp_state(ports.0, ports.1).as_deref(),
        Some("01"),
        "established"
    );
    proactor.remove(fd).unwrap();
    drop(server);
    wait_until("the connection is closed on the server's side", || {
        tcp_state(ports.0, ports.1).as_deref() != Some("01")
    });
    proactor.cancel().unwrap();
    drop(client);
}
