//! The thread lifecycle: `run`, `cancel`, `wait` and drop of a [`Proactor`], the join of
//! its loop thread, and a removal's wait for a handler that runs.

use super::*;
use crate::sys::spawn_with_signals_blocked;
use parking_lot::MutexGuard;
use std::io;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Proactor {
    /// Starts the loop on a new thread and returns at once.
    ///
    /// Errors: `EALREADY` when the loop is running (including when called from a handler),
    /// `EAGAIN` when no thread can be made, and on io_uring the kernel's error when the run's
    /// ring cannot be made (`ENOMEM`, `EMFILE`), `EIO` when an earlier run failed (see
    /// [`Proactor::wait`]). A loop stopped by a cancel may be run again.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.run()?;
    /// let again = proactor.run().unwrap_err();
    /// assert_eq!(again.raw_os_error(), Some(libc::EALREADY));
    /// proactor.cancel()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn run(&self) -> io::Result<()> {
        self.check_same_process()?;
        if self.shared.on_loop_thread() {
            return Err(error(libc::EALREADY));
        }
        let mut lifecycle = self.shared.lifecycle.lock();
        // A loop that was asked to stop (or ended by itself) is joined first, then restarted.
        loop {
            let ended = match &*lifecycle {
                Lifecycle::Stopped => break,
                Lifecycle::Running(thread) => thread.is_finished(),
                Lifecycle::Joining => false,
            };
            if !ended && !self.shared.stopping() {
                return Err(error(libc::EALREADY));
            }
            self.shared.finish_join(&mut lifecycle);
        }
        self.shared.check_loop_health()?;
        self.shared.stop_requested.store(false, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        let (report, started) = std::sync::mpsc::sync_channel(1);
        let thread = spawn_with_signals_blocked(move || {
            // A panic of the loop's own code (handlers' panics are caught around each call)
            // must not look like a normal stop.
            if catch_unwind(AssertUnwindSafe(|| shared.run_loop(report))).is_err() {
                shared.loop_failed.store(true, Ordering::SeqCst);
                shared.handler_returned.notify_all(); // removals waiting stop waiting
            }
        })?;
        // The loop thread makes what the run needs (io_uring: its ring) and says whether it
        // could; without, it ends at once.
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                let _ = thread.join();
                return Err(err);
            }
            Err(_) => {
                let _ = thread.join();
                self.shared.check_loop_health()?;
                return Err(error(libc::EAGAIN));
            }
        }
        *lifecycle = Lifecycle::Running(thread);
        Ok(())
    }

    /// Stops the loop. From another thread it also waits for the loop thread to end, so no
    /// handler runs once it returns; from a handler it only asks the loop to stop after that
    /// handler returns. Registrations stay: [`Proactor::run`] starts the loop again.
    ///
    /// Errors: `ESRCH` when the loop is not running, `EIO` when it failed (see
    /// [`Proactor::wait`]). A loop that stopped by itself and was not joined yet is joined,
    /// and gives `Ok`.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.run()?;
    /// proactor.cancel()?; // no handler runs after this
    /// let again = proactor.cancel().unwrap_err();
    /// assert_eq!(again.raw_os_error(), Some(libc::ESRCH));
    /// proactor.run()?; // a cancelled loop may run again
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn cancel(&self) -> io::Result<()> {
        self.check_same_process()?;
        if self.shared.on_loop_thread() {
            self.request_cancel();
            return Ok(());
        }
        let mut lifecycle = self.shared.lifecycle.lock();
        if matches!(*lifecycle, Lifecycle::Stopped) {
            self.shared.check_loop_health()?;
            return Err(error(libc::ESRCH));
        }
        // Even when another thread is joining already (it may be `wait`, which does not
        // stop the loop), the stop must be asked for here.
        self.request_cancel();
        self.shared.finish_join(&mut lifecycle);
        self.shared.check_loop_health()
    }

    /// Asks the loop to stop and returns at once, without waiting. Async-signal-safe: it
    /// only sets an atomic flag and writes the loop's eventfd, so it may be called from a
    /// signal handler. It has no effect on a loop that is not running.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.run()?;
    /// proactor.request_cancel(); // what a SIGINT handler would do
    /// proactor.wait()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn request_cancel(&self) {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.shared.backend.wake();
    }

    /// Blocks until the loop has stopped (after a cancel from a handler, or a
    /// [`Proactor::request_cancel`] from a signal handler). Returns at once when the loop is
    /// not running.
    ///
    /// Errors: `EDEADLK` when called from a handler of this proactor; `EIO` when the loop
    /// ended by a failure of its own rather than a stop: a panic in the library's loop code
    /// (handlers' panics are caught around each call) or a wait the backend could not make
    /// (its epoll or io_uring fd closed or replaced under it). From then on `wait`, `cancel`
    /// and `run` fail with `EIO` too.
    ///
    /// ```
    /// let proactor = st_proactor::Proactor::new()?;
    /// proactor.wait()?; // not running: returns at once
    /// proactor.run()?;
    /// proactor.request_cancel();
    /// proactor.wait()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wait(&self) -> io::Result<()> {
        self.check_same_process()?;
        if self.shared.on_loop_thread() {
            return Err(error(libc::EDEADLK));
        }
        let mut lifecycle = self.shared.lifecycle.lock();
        self.shared.finish_join(&mut lifecycle);
        self.shared.check_loop_health()
    }
}

impl Drop for Proactor {
    /// Stops the loop (joining it, unless dropped from one of its own handlers, in which case
    /// the loop ends after that handler returns) and forgets every registration. In a child
    /// process of the one that made the proactor it does nothing but leak it (see
    /// [`Proactor::is_inherited`]).
    fn drop(&mut self) {
        if self.is_inherited() {
            // Its loop thread is not in this process (a join would wait forever), and its
            // epoll set or ring is the parent's too: removals or cancels would change the
            // parent's. Its memory is left to this process's exit or exec.
            std::mem::forget(Arc::clone(&self.shared));
            return;
        }
        if self.shared.on_loop_thread() {
            self.request_cancel();
        } else {
            let _ = self.cancel();
        }
        let mut registry = self.shared.registry.lock();
        let registrations = registry.remove_all();
        // Closing the backend ends every watch anyway; removing them first releases, on
        // io_uring, the references pending polls hold on the files without waiting for the
        // ring's teardown.
        for (token, operation, _) in &registrations {
            if let Ok(true) = self.shared.backend.unwatch(token.fd(), *token, *operation) {
                registry.release_retired(*token);
            }
        }
        drop(registry);
        drop(registrations);
    }
}

impl Shared {
    /// See [`Proactor::remove`].
    pub(super) fn remove(&self, fd: RawFd) -> io::Result<()> {
        let mut registry = self.registry.lock();
        let (token, operation, handler) = registry.remove(fd).ok_or_else(|| error(libc::ENOENT))?;
        // EBADF here means the fd was closed first (a misuse the docs warn about); the
        // registration is gone either way.
        if let Ok(true) = self.backend.unwatch(fd, token, operation) {
            registry.release_retired(token); // a write that never reached the kernel
        }
        if self.on_loop_thread() {
            drop(registry);
            // Requests an earlier enter could not submit go now, before the fd can be closed.
            self.backend.submit_leftovers();
        } else {
            let ticket = self.backend.ticket();
            // io_uring: the loop submits the removal's cancels (which let the kernel close a
            // socket its requests hold) with its next wait, and its wait may be long.
            if self.backend.queues_requests() {
                MutexGuard::unlocked(&mut registry, || self.backend.wake());
            }
            registry.removal_starts_waiting();
            // Until its handler returns, until a write of the loop to it is finished, and
            // until requests the loop took before the removal are in the kernel: the fd
            // number may be closed and reused once this returns.
            loop {
                let settled = self.backend.settled(ticket);
                if settled && !registry.is_running(token) && !registry.is_writing(token) {
                    break;
                }
                if self.loop_failed.load(Ordering::SeqCst) {
                    break; // nothing will run on that loop any more
                }
                self.handler_returned.wait(&mut registry);
            }
            registry.removal_stops_waiting();
            drop(registry);
        }
        // The handler (and whatever it owns) is dropped without the lock held.
        drop(handler);
        Ok(())
    }

    /// `EIO` once the loop thread has failed (see `loop_failed`).
    pub(super) fn check_loop_health(&self) -> io::Result<()> {
        if self.loop_failed.load(Ordering::SeqCst) {
            return Err(error(libc::EIO));
        }
        Ok(())
    }

    pub(super) fn on_loop_thread(&self) -> bool {
        CURRENT_LOOP.with(|current| current.get() == self.id)
    }

    /// Returns once the loop thread has ended and been joined (at once when `Stopped`).
    /// The caller that finds it `Running` joins it, with the lifecycle lock released
    /// meanwhile (a handler that calls `cancel` or `run` needs that lock); callers that find
    /// it `Joining` wait for that join to finish.
    pub(super) fn finish_join(&self, lifecycle: &mut MutexGuard<'_, Lifecycle>) {
        loop {
            match std::mem::replace(&mut **lifecycle, Lifecycle::Joining) {
                Lifecycle::Stopped => {
                    **lifecycle = Lifecycle::Stopped;
                    return;
                }
                Lifecycle::Joining => self.lifecycle_changed.wait(lifecycle),
                Lifecycle::Running(thread) => {
                    MutexGuard::unlocked(lifecycle, || {
                        // The loop thread catches handler panics, so join reports none.
                        let _ = thread.join();
                    });
                    **lifecycle = Lifecycle::Stopped;
                    self.lifecycle_changed.notify_all();
                    return;
                }
            }
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Wakes a sleeping loop so that it flushes new output. The loop thread itself needs no
    /// wake: it flushes after the handler that queued the output returns.
    pub(super) fn wake_for_output(&self, first_pending: bool) {
        if first_pending && !self.on_loop_thread() {
            self.backend.wake();
        }
    }
}
