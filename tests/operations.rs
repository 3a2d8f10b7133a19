//! Completion operations (accept, receive) over real TCP sockets on 127.0.0.1, on the backend
//! `ST_PROACTOR_BACKEND` names (the Makefile runs this file once per backend).

mod common;

use common::{tcp_pair, PATIENCE};
use st_proactor::Proactor;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Duration;

/// The port of an IPv4 socket address as accept reported it.
fn peer_port(peer: &libc::sockaddr_storage) -> u16 {
    assert_eq!(i32::from(peer.ss_family), libc::AF_INET);
    // SAFETY: the family says the storage holds a sockaddr_in.
    let v4 = unsafe { &*(peer as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
    u16::from_be(v4.sin_port)
}

#[test]
fn accept_delivers_every_connection_with_its_peer_address_until_removed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (accepted, connections) = mpsc::channel();
    let proactor = Proactor::new().unwrap();
    proactor
        .accept(listener.as_raw_fd(), move |result| {
            let connection = result.expect("no accept error");
            let stream = TcpStream::from(connection.fd); // the program's: the stream closes it
            let _ = accepted.send((peer_port(&connection.peer), stream));
        })
        .unwrap();
    proactor.run().unwrap();
    let clients: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    let mut ports: Vec<u16> = Vec::new();
    for _ in &clients {
        let (port, stream) = connections
            .recv_timeout(PATIENCE)
            .expect("every connection");
        assert!(stream.peer_addr().is_ok());
        ports.push(port);
    }
    let mut expected: Vec<u16> = clients
        .iter()
        .map(|client| client.local_addr().unwrap().port())
        .collect();
    ports.sort();
    expected.sort();
    assert_eq!(ports, expected, "each peer address is the client's own");
    // The accepted sockets are non-blocking.
    let (_, stream) = {
        let _late = TcpStream::connect(address).unwrap();
        connections.recv_timeout(PATIENCE).unwrap()
    };
    // SAFETY: F_GETFL only reads the flags of a socket we own.
    let flags = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    // After removal nothing more is accepted by the proactor.
    proactor.remove(listener.as_raw_fd()).unwrap();
    let _unserved = TcpStream::connect(address).unwrap();
    assert!(connections
        .recv_timeout(Duration::from_millis(300))
        .is_err());
    proactor.cancel().unwrap();
}

#[test]
fn receive_delivers_every_byte_then_the_end_with_the_fd_already_removed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let proactor = std::sync::Arc::new(Proactor::new().unwrap());
    let (delivered, deliveries) = mpsc::channel();
    let weak = std::sync::Arc::downgrade(&proactor);
    let fd = server.as_raw_fd();
    proactor
        .receive(fd, move |result| {
            let registered = weak
                .upgrade()
                .map(|proactor| proactor.queued_bytes(fd).is_ok());
            let _ = delivered.send((result.map(<[u8]>::to_vec), registered));
        })
        .unwrap();
    proactor.run().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    client.write_all(&data).unwrap();
    drop(client);
    let mut received = Vec::new();
    loop {
        let (result, registered) = deliveries.recv_timeout(PATIENCE).expect("a delivery");
        let bytes = result.expect("no error");
        if bytes.is_empty() {
            assert_eq!(registered, Some(false), "removed before the last call");
            break;
        }
        assert_eq!(registered, Some(true));
        assert!(bytes.len() <= 64 * 1024);
        received.extend_from_slice(&bytes);
    }
    assert!(received == data, "every byte, in order");
    assert!(
        deliveries.recv_timeout(Duration::from_millis(200)).is_err(),
        "nothing after the end"
    );
    assert_eq!(
        proactor.remove(fd).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    proactor.cancel().unwrap();
}

#[test]
fn receive_reports_a_reset_as_its_last_call() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let proactor = Proactor::new().unwrap();
    let (delivered, deliveries) = mpsc::channel();
    proactor
        .receive(server.as_raw_fd(), move |result| {
            let _ = delivered.send(result.map(<[u8]>::to_vec).map_err(|err| err.raw_os_error()));
        })
        .unwrap();
    proactor.run().unwrap();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a live struct of the size given, for a socket we own.
    let set = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    drop(client); // an RST
    let last = deliveries.recv_timeout(PATIENCE).expect("the last call");
    assert_eq!(last, Err(Some(libc::ECONNRESET)));
    assert!(deliveries.recv_timeout(Duration::from_millis(200)).is_err());
    proactor.cancel().unwrap();
}

#[test]
fn remove_ends_a_receive_early() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let proactor = Proactor::new().unwrap();
    let (delivered, deliveries) = mpsc::channel();
    proactor
        .receive(server.as_raw_fd(), move |result| {
            let _ = delivered.send(result.map(<[u8]>::to_vec).ok());
        })
        .unwrap();
    proactor.run().unwrap();
    client.write_all(b"first").unwrap();
    assert_eq!(
        deliveries.recv_timeout(PATIENCE).unwrap(),
        Some(b"first".to_vec())
    );
    proactor.remove(server.as_raw_fd()).unwrap();
    client.write_all(b"second").unwrap();
    assert!(deliveries.recv_timeout(Duration::from_millis(300)).is_err());
    // The bytes are still there for whoever reads the socket next.
    let mut rest = [0u8; 6];
    let mut server = server;
    server.set_read_timeout(Some(PATIENCE)).unwrap();
    server.read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"second");
    proactor.cancel().unwrap();
}

#[test]
fn completion_requests_refuse_what_a_registration_refuses() {
    let proactor = Proactor::new().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    proactor.accept(listener.as_raw_fd(), |_| {}).unwrap();
    let err = proactor.accept(listener.as_raw_fd(), |_| {}).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    let err = proactor.receive(-1, |_: io::Result<&[u8]>| {}).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
}

#[test]
fn a_completion_that_removes_the_listener_gets_no_further_call() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let proactor = std::sync::Arc::new(Proactor::new().unwrap());
    let weak = std::sync::Arc::downgrade(&proactor);
    let (called, calls) = mpsc::channel();
    let listener_fd = listener.as_raw_fd();
    // Several connections wait before the loop runs: the first call removes the request.
    let _clients: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    proactor
        .accept(listener_fd, move |result| {
            drop(result); // closes the accepted connection
            if let Some(proactor) = weak.upgrade() {
                let _ = called.send(proactor.remove(listener_fd).is_ok());
            }
        })
        .unwrap();
    proactor.run().unwrap();
    assert!(
        calls.recv_timeout(PATIENCE).unwrap(),
        "the removal succeeded"
    );
    assert!(
        calls.recv_timeout(Duration::from_millis(300)).is_err(),
        "a completion came after the request was removed"
    );
    proactor.cancel().unwrap();
}

#[test]
fn accept_refuses_a_socket_that_is_not_listening_and_leaves_it_as_it_was() {
    let proactor = Proactor::new().unwrap();
    // SAFETY: plain socket call; the fd is closed below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(socket >= 0);
    let err = proactor.accept(socket, |_| {}).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    // SAFETY: F_GETFL reads the flags of our socket.
    assert_eq!(
        unsafe { libc::fcntl(socket, libc::F_GETFL) } & libc::O_NONBLOCK,
        0
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    proactor.accept(listener.as_raw_fd(), |_| {}).unwrap();
    listener.set_nonblocking(false).unwrap();
    let err = proactor.accept(listener.as_raw_fd(), |_| {}).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    // SAFETY: F_GETFL reads the flags of our socket.
    let flags = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(
        flags & libc::O_NONBLOCK,
        0,
        "a refused request changed the listener"
    );
    let err = proactor.accept(-1, |_| {}).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    // SAFETY: closes the socket opened above, once.
    unsafe { libc::close(socket) };
}

#[test]
fn receive_refuses_what_is_not_a_stream_socket() {
    let proactor = Proactor::new().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = proactor
        .receive(udp.as_raw_fd(), |_: io::Result<&[u8]>| {})
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPROTOTYPE));
    assert_eq!(
        proactor.remove(udp.as_raw_fd()).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
}

#[test]
fn a_receive_removed_from_another_thread_gets_no_last_call_after_the_removal() {
    let proactor = Proactor::new().unwrap();
    for _ in 0..300 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (called, calls) = mpsc::channel();
        proactor
            .receive(server.as_raw_fd(), move |result| {
                let _ = called.send(result.map(<[u8]>::is_empty).ok());
            })
            .unwrap();
        let _ = proactor.run();
        drop(client); // the end of the stream races with the removal below
        if proactor.remove(server.as_raw_fd()).is_ok() {
            // The removal ended the request: the last call, if any, came before it returned.
            while let Ok(call) = calls.try_recv() {
                assert_ne!(call, None, "an error call");
            }
            assert!(calls.recv_timeout(Duration::from_millis(2)).is_err());
        } else {
            assert_eq!(calls.recv_timeout(PATIENCE).unwrap(), Some(true));
        }
    }
    proactor.cancel().unwrap();
}

/// Pausing and resuming a receive again and again, from another thread and from its own
/// handler, while the peer writes flat out: every byte arrives once, in order, and none
/// while paused (on io_uring the bytes a multishot receive brought after the pause are held
/// and delivered first after the resume).
#[test]
fn a_receive_paused_and_resumed_again_and_again_loses_and_reorders_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let fd = server.as_raw_fd();
    let proactor = Arc::new(Proactor::new().unwrap());
    let paused = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (delivered, deliveries) = mpsc::channel();
    {
        let (paused, calls) = (Arc::clone(&paused), Arc::clone(&calls));
        let weak = Arc::downgrade(&proactor);
        proactor
            .receive(fd, move |result| {
                let while_paused = paused.load(SeqCst);
                let last = !matches!(&result, Ok(bytes) if !bytes.is_empty());
                let _ = delivered.send((result.map(<[u8]>::to_vec), while_paused));
                // Every 7th call pauses its own fd (not the last, which removed it); the test
                // thread resumes it.
                if calls.fetch_add(1, SeqCst) % 7 == 6 && !last {
                    if let Some(proactor) = weak.upgrade() {
                        let _ = proactor.pause_reading(fd);
                        paused.store(true, SeqCst);
                    }
                }
            })
            .unwrap();
    }
    proactor.run().unwrap();
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            for chunk in data.chunks(1000) {
                client.write_all(chunk).unwrap();
            }
        })
    };
    let mut received = Vec::new();
    let deadline = std::time::Instant::now() + PATIENCE * 3;
    while received.len() < data.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "stuck at {}",
            received.len()
        );
        if paused.load(SeqCst) {
            std::thread::sleep(Duration::from_micros(300));
            paused.store(false, SeqCst);
            proactor.resume_reading(fd).unwrap();
        }
        if let Ok((result, while_paused)) = deliveries.recv_timeout(Duration::from_millis(1)) {
            assert!(!while_paused, "a delivery while paused");
            received.extend_from_slice(&result.expect("no error"));
        }
    }
    writer.join().unwrap();
    assert!(received == data, "every byte once, in order");
    let calls = calls.load(SeqCst);
    assert!(calls >= 14, "paused only {} times", calls / 7);
    proactor.cancel().unwrap();
}

/// Makes `fd` name the file of `other` (closing what it named), as a reused fd number does.
fn reuse_fd_number(fd: i32, other: &TcpStream) {
    // SAFETY: both fds are open; dup2 replaces `fd` with a copy of `other`'s file.
    assert_eq!(unsafe { libc::dup2(other.as_raw_fd(), fd) }, fd);
}

/// A receive registration whose handler passes every chunk on.
fn receive_into(proactor: &Proactor, fd: i32) -> mpsc::Receiver<Vec<u8>> {
    let (delivered, deliveries) = mpsc::channel();
    proactor
        .receive(fd, move |result| {
            if let Ok(bytes) = result {
                let _ = delivered.send(bytes.to_vec());
            }
        })
        .unwrap();
    deliveries
}

#[test]
fn a_receive_removed_while_the_loop_is_stopped_leaves_its_fd_number_to_the_program() {
    let (old_server, mut old_client) = tcp_pair();
    let fd = old_server.as_raw_fd();
    let proactor = Proactor::new().unwrap();
    let deliveries = receive_into(&proactor, fd);
    proactor.run().unwrap();
    old_client.write_all(b"first").unwrap();
    assert_eq!(deliveries.recv_timeout(PATIENCE).unwrap(), b"first");
    // The stop ends the receive request; the next run would arm it again.
    proactor.cancel().unwrap();
    proactor.remove(fd).unwrap();
    let (new_server, mut new_client) = tcp_pair();
    reuse_fd_number(fd, &new_server);
    proactor.run().unwrap();
    new_client.write_all(b"mine").unwrap();
    let mut mine = [0u8; 4];
    old_server.set_read_timeout(Some(PATIENCE)).unwrap();
    (&old_server).read_exact(&mut mine).unwrap();
    assert_eq!(
        &mine, b"mine",
        "the old registration took the new file's bytes"
    );
    proactor.cancel().unwrap();
    assert!(deliveries.try_recv().is_err());
}

#[test]
fn a_receive_removed_from_another_thread_leaves_its_fd_number_to_the_program() {
    let proactor = Proactor::new().unwrap();
    proactor.run().unwrap();
    for round in 0..50u8 {
        let (old_server, mut old_client) = tcp_pair();
        let fd = old_server.as_raw_fd();
        let deliveries = receive_into(&proactor, fd);
        old_client.write_all(&[round]).unwrap();
        assert_eq!(deliveries.recv_timeout(PATIENCE).unwrap(), [round]);
        // The handler returned: its next receive is armed, or about to be.
        proactor.remove(fd).unwrap();
        let (new_server, mut new_client) = tcp_pair();
        reuse_fd_number(fd, &new_server);
        new_client.write_all(&[round; 100]).unwrap();
        let mut mine = [0u8; 100];
        old_server.set_read_timeout(Some(PATIENCE)).unwrap();
        (&old_server).read_exact(&mut mine).unwrap();
        assert_eq!(
            mine, [round; 100],
            "round {round}: bytes went to the old registration"
        );
        assert!(deliveries.try_recv().is_err());
    }
    proactor.cancel().unwrap();
}

#[test]
fn after_each_restart_every_one_of_many_receives_and_readiness_handlers_still_works() {
    const PAIRS: usize = 200;
    let pairs: Vec<(TcpStream, TcpStream)> = (0..PAIRS).map(|_| tcp_pair()).collect();
    let proactor = Proactor::new().unwrap();
    let (delivered, deliveries) = mpsc::channel::<(i32, Vec<u8>)>();
    for (index, (server, _)) in pairs.iter().enumerate() {
        let fd = server.as_raw_fd();
        let delivered = delivered.clone();
        if index % 2 == 0 {
            proactor
                .receive(fd, move |result| {
                    if let Ok(bytes) = result {
                        let _ = delivered.send((fd, bytes.to_vec()));
                    }
                })
                .unwrap();
        } else {
            proactor
                .add(fd, move |fd| {
                    let mut byte = [0u8; 1];
                    // SAFETY: reads one byte into a live buffer from the registered socket.
                    if unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) } == 1 {
                        let _ = delivered.send((fd, byte.to_vec()));
                    }
                })
                .unwrap();
        }
    }
    for round in 0..3u8 {
        proactor.run().unwrap();
        for (_, client) in &pairs {
            (&*client).write_all(&[round]).unwrap();
        }
        let mut seen = std::collections::HashSet::new();
        while seen.len() < PAIRS {
            let (fd, bytes) = deliveries
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|_| panic!("run {round}: {} of {PAIRS} fds delivered", seen.len()));
            assert_eq!(bytes, [round], "run {round}, fd {fd}");
            assert!(seen.insert(fd), "run {round}: fd {fd} twice");
        }
        // The stop cancels every request; the next run must arm each one again.
        proactor.cancel().unwrap();
    }
}
