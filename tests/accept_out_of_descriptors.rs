//! Accept when the process is out of descriptors: the library sheds connections instead of
//! spinning, reports EMFILE, and accepts again once fds free up. Alone in its own test binary
//! (so its own process), because it lowers the process's limit on open files.

use st_proactor::Proactor;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(10);

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

/// A new TCP socket, not connected yet.
fn tcp_socket() -> i32 {
    // SAFETY: plain socket call; the fd is owned by the stream `connect` makes of it.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    fd
}

/// Connects `socket` to 127.0.0.1:`port` and wraps it in a stream that closes it.
fn connect(socket: i32, port: u16) -> TcpStream {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid start.
    let mut address: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    address.sin_family = libc::AF_INET as libc::sa_family_t;
    address.sin_port = port.to_be();
    address.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    // SAFETY: `address` is a live sockaddr_in of the size given.
    let result = unsafe {
        libc::connect(
            socket,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "connect: {}", std::io::Error::last_os_error());
    // SAFETY: `socket` is ours and is closed by the stream only.
    unsafe { TcpStream::from_raw_fd(socket) }
}

fn process_cpu() -> Duration {
    // SAFETY: `usage` is a live rusage for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let micros = |time: libc::timeval| time.tv_sec as u64 * 1_000_000 + time.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

#[test]
fn out_of_descriptors_accept_sheds_reports_emfile_and_recovers() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let proactor = Proactor::new().unwrap();
    // The clients' sockets are made first, so that under the lowered limit only the
    // accepted connections compete for fds, as in a server whose clients are elsewhere.
    let sockets: Vec<i32> = (0..20).map(|_| tcp_socket()).collect();
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both rlimits are live; this lowers the soft limit of this test process only.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut old);
        let limit = libc::rlimit {
            rlim_cur: open_fds() + 3,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    // Accepting starts under the lowered limit: io_uring's accept takes the limit in force
    // when its request is armed.
    let accepted: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let (errors, error_seen) = mpsc::channel();
    let kept = Arc::clone(&accepted);
    proactor
        .accept(listener.as_raw_fd(), move |result| match result {
            Ok(connection) => kept.lock().unwrap().push(TcpStream::from(connection.fd)),
            Err(err) => {
                let _ = errors.send(err.raw_os_error());
            }
        })
        .unwrap();
    proactor.run().unwrap();
    std::thread::sleep(Duration::from_millis(50)); // the loop arms the accept

    let clients: Vec<TcpStream> = sockets
        .into_iter()
        .map(|socket| connect(socket, address.port()))
        .collect();
    assert_eq!(
        error_seen.recv_timeout(PATIENCE).unwrap(),
        Some(libc::EMFILE),
        "accept reported the shortage"
    );

    // No spinning on a listener that stays readable: an idle second costs little CPU.
    std::thread::sleep(Duration::from_millis(100));
    let before = process_cpu();
    std::thread::sleep(Duration::from_secs(1));
    let spent = process_cpu() - before;
    assert!(
        spent < Duration::from_millis(300),
        "the loop spun: {spent:?} of CPU in 1 s"
    );

    // Free descriptors: new connections are accepted again.
    accepted.lock().unwrap().clear();
    drop(clients);
    // SAFETY: restores the limit saved above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    let served_before = accepted.lock().unwrap().len();
    let _late = TcpStream::connect(address).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while accepted.lock().unwrap().len() == served_before {
        assert!(
            Instant::now() < deadline,
            "no connection accepted after fds freed up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    proactor.cancel().unwrap();
}
