//! Unit tests of the loop thread and its lifecycle.

use super::*;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(5);

#[test]
fn loop_calls_the_handler_of_a_readable_fd_on_its_own_thread() {
    let proactor = Proactor::with_backend(BackendKind::Epoll).unwrap();
    let (reader, writer) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    proactor
        .add(reader.as_raw_fd(), move |fd| {
            let mut byte = [0u8; 1];
            // SAFETY: reads one byte into a live buffer from the registered socket.
            unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
            let _ = tx.send((fd, thread::current().name().map(str::to_owned)));
        })
        .unwrap();
    proactor.run().unwrap();
    (&writer).write_all(b"x").unwrap();
    let (fd, name) = rx.recv_timeout(PATIENCE).unwrap();
    assert_eq!(fd, reader.as_raw_fd());
    assert_eq!(name.as_deref(), Some("st_proactor"));
    proactor.cancel().unwrap();
}

#[test]
fn stopped_loop_reports_esrch_on_cancel_and_wait_returns_at_once() {
    let proactor = Proactor::with_backend(BackendKind::Epoll).unwrap();
    assert_eq!(
        proactor.cancel().unwrap_err().raw_os_error(),
        Some(libc::ESRCH)
    );
    proactor.wait().unwrap();
    proactor.run().unwrap();
    assert_eq!(
        proactor.run().unwrap_err().raw_os_error(),
        Some(libc::EALREADY)
    );
    proactor.cancel().unwrap();
    assert_eq!(
        proactor.cancel().unwrap_err().raw_os_error(),
        Some(libc::ESRCH)
    );
}

#[test]
fn request_cancel_stops_the_loop_and_wait_joins_it() {
    let proactor = Proactor::with_backend(BackendKind::Epoll).unwrap();
    proactor.run().unwrap();
    proactor.request_cancel();
    proactor.wait().unwrap();
    assert_eq!(
        proactor.cancel().unwrap_err().raw_os_error(),
        Some(libc::ESRCH)
    );
    proactor.run().unwrap();
    proactor.cancel().unwrap();
}

#[test]
fn cancel_stops_a_loop_that_another_thread_is_waiting_for() {
    let proactor = Arc::new(Proactor::with_backend(BackendKind::Epoll).unwrap());
    proactor.run().unwrap();
    let waiter = {
        let proactor = Arc::clone(&proactor);
        thread::spawn(move || proactor.wait())
    };
    thread::sleep(Duration::from_millis(50)); // let the waiter start joining
    proactor.cancel().unwrap();
    waiter.join().unwrap().unwrap();
    assert_eq!(
        proactor.cancel().unwrap_err().raw_os_error(),
        Some(libc::ESRCH)
    );
}

#[test]
fn a_refused_handler_is_dropped_without_the_registry_lock_held() {
    /// Calls back into the proactor when dropped, as captured state may.
    struct CallsBackOnDrop(std::sync::Weak<Proactor>);
    impl Drop for CallsBackOnDrop {
        fn drop(&mut self) {
            if let Some(proactor) = self.0.upgrade() {
                let _ = proactor.len(); // would deadlock if the lock were held
            }
        }
    }
    let proactor = Arc::new(Proactor::with_backend(BackendKind::Epoll).unwrap());
    let (reader, _writer) = UnixStream::pair().unwrap();
    proactor.add(reader.as_raw_fd(), |_| {}).unwrap();
    let guard = CallsBackOnDrop(Arc::downgrade(&proactor));
    let err = proactor
        .add(reader.as_raw_fd(), move |_| {
            let _ = &guard;
        })
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert_eq!(
        proactor.add(-1, |_| {}).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
}

#[test]
fn a_handler_that_registers_its_fd_number_anew_hands_over_to_the_new_handler() {
    let proactor = Arc::new(Proactor::new().unwrap());
    let (old_reader, old_writer) = UnixStream::pair().unwrap();
    let (new_reader, new_writer) = UnixStream::pair().unwrap();
    (&new_writer).write_all(b"y").unwrap();
    let (calls, called) = mpsc::channel::<&'static str>();
    let weak = Arc::downgrade(&proactor);
    let replacement = new_reader.as_raw_fd();
    let old_calls = calls.clone();
    proactor
        .add(old_reader.as_raw_fd(), move |fd| {
            let _ = old_calls.send("old");
            let Some(proactor) = weak.upgrade() else {
                return;
            };
            proactor.remove(fd).unwrap();
            // The fd number now names another socket, registered from this very handler.
            // SAFETY: both fds are open; dup2 replaces `fd` (ours) with a copy.
            assert_eq!(unsafe { libc::dup2(replacement, fd) }, fd);
            let new_calls = old_calls.clone();
            proactor
                .add(fd, move |fd| {
                    let mut byte = [0u8; 1];
                    // SAFETY: reads one byte into a live buffer from the registered socket.
                    unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
                    let _ = new_calls.send("new");
                })
                .unwrap();
        })
        .unwrap();
    drop(calls);
    (&old_writer).write_all(b"x").unwrap();
    proactor.run().unwrap();
    assert_eq!(called.recv_timeout(PATIENCE).unwrap(), "old");
    assert_eq!(
        called.recv_timeout(PATIENCE).unwrap(),
        "new",
        "the old handler came back instead of the new one"
    );
    proactor.cancel().unwrap();
    drop(old_reader); // closes the duplicate, which the new registration watched
}

#[test]
fn panicking_handler_is_removed_and_the_loop_goes_on() {
    let proactor = Proactor::with_backend(BackendKind::Epoll).unwrap();
    let (bad_reader, bad_writer) = UnixStream::pair().unwrap();
    let (good_reader, good_writer) = UnixStream::pair().unwrap();
    proactor
        .add(bad_reader.as_raw_fd(), |_| panic!("handler bug"))
        .unwrap();
    let (tx, rx) = mpsc::channel();
    proactor
        .add(good_reader.as_raw_fd(), move |fd| {
            let mut byte = [0u8; 1];
            // SAFETY: reads one byte into a live buffer from the registered socket.
            unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
            let _ = tx.send(());
        })
        .unwrap();
    proactor.run().unwrap();
    (&bad_writer).write_all(b"x").unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while proactor.len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "panicking handler still registered"
        );
        thread::sleep(Duration::from_millis(1));
    }
    (&good_writer).write_all(b"y").unwrap();
    rx.recv_timeout(PATIENCE).unwrap();
    proactor.cancel().unwrap();
}
