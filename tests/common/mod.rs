//! Helpers the integration tests share; each test binary includes them with `mod common;`.
//! Every wait is bounded by `PATIENCE`: a bound against hangs, never a timing to meet.

#![allow(dead_code)] // each test binary uses some of them

use std::io;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The errno of `err` (0 when it has none).
pub fn errno(err: &io::Error) -> i32 {
    err.raw_os_error().unwrap_or(0)
}

/// The errno the last failed libc call of this thread left.
pub fn last_errno() -> i32 {
    errno(&io::Error::last_os_error())
}

/// `len` bytes of a pattern that shows reordering and loss, different for each `seed`.
pub fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i + seed * 31) % 251) as u8).collect()
}

/// Polls `condition` until it holds, failing the test after `PATIENCE`.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting until {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (bounded) for all `threads` to finish, then joins them.
pub fn join_all<T>(what: &str, threads: Vec<thread::JoinHandle<T>>) -> Vec<T> {
    wait_until(what, || threads.iter().all(|thread| thread.is_finished()));
    threads
        .into_iter()
        .map(|thread| thread.join().expect("thread panicked"))
        .collect()
}

/// A TCP connection on 127.0.0.1: `(accepted, connected)`, both blocking.
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let connected = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    (accepted, connected)
}
