//! A loop that fails by itself (here: its backend's own fd replaced under it, a real fault a
//! buggy program can cause) is not mistaken for a stop: `wait`, `cancel` and `run` report
//! `EIO`, and dropping the proactor neither hangs nor panics. Alone in its own test binary
//! (so its own process), because it finds the backend's fd among the process's fds.

use st_proactor::Proactor;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// The fds of this process whose link reads `target` (such as `anon_inode:[eventpoll]`).
fn fds_linking_to(target: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue; // the directory's own fd, closed since
        };
        if link.to_string_lossy() == target {
            if let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok())
            {
                found.push(fd);
            }
        }
    }
    found
}

#[test]
fn a_loop_whose_backend_fd_is_replaced_reports_eio_from_wait_cancel_and_run() {
    let proactor = Proactor::new().unwrap();
    let target = match proactor.backend_name() {
        "epoll" => "anon_inode:[eventpoll]",
        _ => "anon_inode:[io_uring]",
    };
    let before = fds_linking_to(target);
    proactor.run().unwrap();
    // The io_uring ring is made by the loop thread for the run; epoll's fd exists already.
    let ours: Vec<i32> = fds_linking_to(target)
        .into_iter()
        .filter(|fd| proactor.backend_name() == "epoll" || !before.contains(fd))
        .collect();
    assert_eq!(ours.len(), 1, "the backend's fd among {ours:?}");
    let devnull = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: replaces the backend's fd number with /dev/null; the library closes that
    // number later, which closes only the duplicate.
    assert_eq!(unsafe { libc::dup2(devnull.as_raw_fd(), ours[0]) }, ours[0]);
    // A wake-up makes the loop wait again, on the replaced fd, which fails.
    proactor.set_stall_timeout(Some(Duration::from_secs(1)));
    let started = Instant::now();
    let waited = proactor.wait().unwrap_err();
    assert_eq!(waited.raw_os_error(), Some(libc::EIO), "wait: {waited}");
    assert!(started.elapsed() < Duration::from_secs(10));
    for (what, result) in [
        ("wait", proactor.wait()),
        ("cancel", proactor.cancel()),
        ("run", proactor.run()),
    ] {
        let err = result.unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "{what} after the failure: {err}"
        );
    }
    let started = Instant::now();
    drop(proactor);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drop took {:?}",
        started.elapsed()
    );
}
