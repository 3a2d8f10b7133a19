//! The C ABI: argument checks, errno, panic catching and handle conversion, nothing else.
//!
//! Every function returns 0 on success, or -1 with `errno` set (pointer-returning ones return
//! NULL with `errno` set). A panic inside the library becomes -1 / `EIO` instead of unwinding
//! into C. The `void *` handle is a `Box<Proactor>` turned into a raw pointer.
#![allow(non_camel_case_types, non_snake_case)]

use crate::flow::FlowEventKind;
use crate::proactor::Proactor;
use std::ffi::{c_char, c_int, c_void};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A handler: called on the loop thread with the fd that is readable, hung up or in error.
pub type handler_t = Option<unsafe extern "C" fn(fd: c_int)>;

/// An accept completion: called on the loop thread with the proactor, the listening fd, the
/// new connection's fd (non-blocking, close-on-exec, owned by the program) or a negative
/// errno (`-EMFILE`…), the peer's address and its length (NULL and 0 on an error), and the
/// context given to `acceptViaProactor`.
pub type accept_completion_t = Option<
    unsafe extern "C" fn(
        proactor: *mut c_void,
        listen_fd: c_int,
        fd: c_int,
        peer: *const libc::sockaddr,
        peer_len: libc::socklen_t,
        context: *mut c_void,
    ),
>;

/// A receive completion: called on the loop thread with the proactor, the fd, the result
/// (bytes received, 0 when the peer closed its side, or a negative errno), the bytes (valid
/// during the call only; NULL when the result is not positive), and the context given to
/// `receiveViaProactor`.
pub type receive_completion_t = Option<
    unsafe extern "C" fn(
        proactor: *mut c_void,
        fd: c_int,
        result: libc::ssize_t,
        data: *const c_void,
        context: *mut c_void,
    ),
>;

/// A handler with context: called on the loop thread with the proactor it was registered
/// with, the fd that is readable, hung up or in error, and the context given at registration.
pub type context_handler_t =
    Option<unsafe extern "C" fn(proactor: *mut c_void, fd: c_int, context: *mut c_void)>;

fn set_errno(code: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    unsafe { *libc::__errno_location() = code };
}

fn errno_of(err: &io::Error) -> c_int {
    err.raw_os_error().unwrap_or(libc::EIO)
}

fn invalid() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Runs one exported call: 0 on success, -1 with errno on error or panic.
fn status_call(call: impl FnOnce() -> io::Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(())) => 0,
        Ok(Err(err)) => {
            set_errno(errno_of(&err));
            -1
        }
        Err(_) => {
            set_errno(libc::EIO);
            -1
        }
    }
}

/// Runs one exported call that returns a pointer: NULL with errno on error or panic.
fn pointer_call<T>(call: impl FnOnce() -> io::Result<*mut T>) -> *mut T {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(pointer)) => pointer,
        Ok(Err(err)) => {
            set_errno(errno_of(&err));
            std::ptr::null_mut()
        }
        Err(_) => {
            set_errno(libc::EIO);
            std::ptr::null_mut()
        }
    }
}

/// The proactor behind a handle: EINVAL for NULL, ECHILD for a proactor of the parent of a
/// `fork()`ed process (only `destroyProactor` is allowed on it; see `createProactor`).
///
/// # Safety
/// `handle` is NULL or a pointer returned by `createProactor` and not yet destroyed.
unsafe fn proactor<'a>(handle: *mut c_void) -> io::Result<&'a Proactor> {
    // SAFETY: the caller promises a live handle from createProactor, which is a Box<Proactor>.
    let proactor = unsafe { handle.cast::<Proactor>().as_ref() }.ok_or_else(invalid)?;
    if proactor.is_inherited() {
        return Err(io::Error::from_raw_os_error(libc::ECHILD));
    }
    Ok(proactor)
}

/// The proactor handle and the user's context that a C handler gets back. They travel to
/// the loop thread as addresses: the library hands them back and never dereferences them.
#[derive(Clone, Copy)]
struct HandedBack {
    handle: usize,
    context: usize,
}

impl HandedBack {
    fn new(handle: *mut c_void, context: *mut c_void) -> HandedBack {
        HandedBack {
            handle: handle as usize,
            context: context as usize,
        }
    }

    fn handle(self) -> *mut c_void {
        self.handle as *mut c_void
    }

    fn context(self) -> *mut c_void {
        self.context as *mut c_void
    }
}

/// The `len` bytes at `buf`, or EINVAL for a NULL `buf` with `len` > 0 or a `len` over PTRDIFF_MAX.
///
/// # Safety
/// `buf` is NULL or points to `len` readable bytes that outlive the returned slice's use.
unsafe fn bytes<'a>(buf: *const c_void, len: usize) -> io::Result<&'a [u8]> {
    if len == 0 {
        Ok(&[])
    } else if buf.is_null() || len > isize::MAX as usize {
        // No object is larger than PTRDIFF_MAX: such a length is a caller's bug (a negative
        // ssize_t passed on), and no slice may be made of it.
        Err(invalid())
    } else {
        // SAFETY: the caller promises `len` readable bytes at a non-NULL `buf`.
        Ok(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) })
    }
}

fn valid_fd(fd: c_int) -> io::Result<c_int> {
    if fd < 0 {
        Err(invalid())
    } else {
        Ok(fd)
    }
}

/// Creates a proactor: an event loop, not yet running, with no fd registered.
///
/// The backend is the one `ST_PROACTOR_BACKEND` names (`epoll`, `uring` or `auto`; unset
/// means `auto`); `getProactorBackend` tells which one it is.
///
/// Returns the proactor handle, or NULL with errno set: `EINVAL` when `ST_PROACTOR_BACKEND`
/// holds an unknown name; the kernel's error (`ENOSYS`, `EPERM`) when it asks for `uring`
/// and the kernel does not allow io_uring; `EMFILE`/`ENFILE`/`ENOMEM` when the kernel refuses
/// the loop's own fds.
///
/// Thread-safety: may be called from any thread. Free the handle with `destroyProactor`.
///
/// `fork()`: a proactor belongs to the process that created it. In a child process, the
/// loop thread does not exist and the proactor's epoll set or io_uring ring is shared with
/// the parent, so the child may only call `destroyProactor` on it, which then returns 0 and
/// frees nothing (nor changes anything of the parent's); every other function fails with
/// `ECHILD` (`getProactorBackend` returns NULL). The registered fds are the child's copies to
/// close as it likes. A child that needs an event loop creates its own proactor.
#[no_mangle]
pub extern "C" fn createProactor() -> *mut c_void {
    pointer_call(|| Ok(Box::into_raw(Box::new(Proactor::new()?)).cast::<c_void>()))
}

/// Registers `handler` for `fd`: from then on the loop calls `handler(fd)` whenever `fd` is
/// readable, has hung up or is in error. Level-triggered: it is called again on every loop
/// turn while unread data (or the hang-up) remains, so one `recv` per call sees every byte
/// and, at the end, the 0 or -1. The library never closes `fd`.
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor, a negative fd or a NULL
/// handler; `EEXIST` when `fd` is registered already; `EBADF` when `fd` is not open;
/// `EPERM` when `fd` cannot be watched (a regular file); `ENOMEM`/`ENOSPC` from the kernel.
///
/// Thread-safety: may be called from any thread, while the loop runs or not, including from
/// inside a handler; the new registration takes effect at once.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn addFD2Proactor(
    thisPtr: *mut c_void,
    fd: c_int,
    handler: handler_t,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        let handler = handler.ok_or_else(invalid)?;
        // SAFETY: the caller gave a C function that takes an fd; it runs on the loop thread.
        proactor.add(valid_fd(fd)?, move |fd| unsafe { handler(fd) })
    })
}

/// Like `addFD2Proactor`, but the loop calls `handler(thisPtr, fd, context)`, so a handler
/// can reach its own state and its proactor without globals. The library never reads or
/// frees `context`; it must stay valid until the registration is removed.
///
/// Returns 0, or -1 with errno set, exactly as `addFD2Proactor`.
///
/// Thread-safety: as `addFD2Proactor`. The handler runs on the loop thread, so `context`
/// must be safe to use from there.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn addFD2ProactorWithContext(
    thisPtr: *mut c_void,
    fd: c_int,
    handler: context_handler_t,
    context: *mut c_void,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        let handler = handler.ok_or_else(invalid)?;
        let pointers = HandedBack::new(thisPtr, context);
        proactor.add(valid_fd(fd)?, move |fd| {
            // SAFETY: the caller gave a C function of this type; it runs on the loop thread
            // with the pointers it registered.
            unsafe { handler(pointers.handle(), fd, pointers.context()) }
        })
    })
}

/// Removes the registration of `fd`, and frees its queued output. Once it returns, no new
/// call of its handler starts. Called from another thread while that handler runs, it waits
/// until the handler returns (and, on io_uring, until requests for `fd` that the loop was
/// submitting at that moment are in the kernel: normally a moment), so the caller may
/// `close(fd)` right after. Called from inside a handler (its own or another's), it returns at once. It does
/// not close `fd`.
///
/// Remove before you close: while `fd` is registered the library acts on that fd number
/// (it watches it and writes queued output to it), so a registered fd that is closed and
/// whose number is reused by a new file may get the old registration's output or calls.
/// `removeHandler` on an fd already closed still returns 0 and ends the registration.
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor or a negative fd,
/// `ENOENT` when `fd` is not registered.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn removeHandler(thisPtr: *mut c_void, fd: c_int) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        proactor.remove(valid_fd(fd)?)
    })
}

/// Starts the event loop on a thread the proactor owns and returns 0 at once. Handlers run
/// on that thread, one at a time. The loop thread blocks asynchronous signals, so signals
/// reach the program's own threads.
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor, `EALREADY` when the loop
/// is running already (or when called from one of its handlers), `EAGAIN` when no thread
/// can be created, `EIO` when an earlier run failed (see `waitProactor`). After a cancel,
/// `runProactor` starts the loop again with the same registrations.
///
/// Thread-safety: may be called from any thread.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn runProactor(thisPtr: *mut c_void) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }?.run()
    })
}

/// Stops the event loop. Called from another thread, it also joins the loop thread before
/// it returns, so no handler is running or will run afterwards. Called from inside a
/// handler, it only asks the loop to stop once that handler returns. Registrations are
/// kept: `runProactor` may start the loop again.
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor, `ESRCH` when the loop is
/// not running, `EIO` when the loop failed (see `waitProactor`). A loop that stopped by
/// itself (a handler cancelled it, or `requestCancelProactor`) and that no `waitProactor` has
/// joined yet is joined, and gives 0.
///
/// Thread-safety: may be called from any thread, including from inside a handler. Not
/// async-signal-safe: from a signal handler use `requestCancelProactor`.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn cancelProactor(thisPtr: *mut c_void) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }?.cancel()
    })
}

/// Asks the loop to stop and returns at once, without waiting for it: the loop stops after
/// the handler that is running, if any. Async-signal-safe: it only sets an atomic flag and
/// writes the loop's eventfd, so it may be called from a SIGINT handler; then
/// `waitProactor` (on a normal thread) returns once the loop has stopped. It has no effect
/// on a loop that is not running, and leaves errno alone on success.
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread, from a handler and from a signal handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn requestCancelProactor(thisPtr: *mut c_void) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }?.request_cancel();
        Ok(())
    })
}

/// Blocks until the loop has stopped: after a cancel from a handler, or after
/// `requestCancelProactor`. Returns at once when the loop is not running.
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor, `EDEADLK` when called
/// from a handler of this proactor (the loop cannot wait for itself), `EIO` when the loop
/// ended by a failure of its own rather than a stop: a panic in the library's loop code
/// (outside the program's handlers, whose panics are caught around each call) or a wait
/// the backend could not make (its epoll or io_uring fd closed or replaced under it). The
/// loop has then stopped; from then on `waitProactor`, `cancelProactor` and `runProactor`
/// fail with `EIO` too, and only `destroyProactor` is left to do.
///
/// Thread-safety: may be called from any thread but the loop's own.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn waitProactor(thisPtr: *mut c_void) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }?.wait()
    })
}

/// Destroys a proactor: stops its loop if it runs (joining the loop thread, as
/// `cancelProactor` does), forgets every registration, closes the library's own fds and
/// frees the handle. It never closes a registered fd. Called from inside one of its
/// handlers, the registrations are forgotten at once (no other handler is called), the
/// loop thread ends once that handler returns, and it closes the library's fds as it ends;
/// nothing joins it. The handle must not be used after this call in any case.
///
/// In a child process (after `fork()`) of the process that created the proactor, it
/// returns 0 at once and frees nothing: it neither waits for the loop thread (which does
/// not exist in the child) nor touches the epoll set or io_uring ring, which the child
/// shares with its parent. See `createProactor` on `fork()`.
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread, including from inside a handler, but no
/// other call on the same proactor may run at the same time or follow.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`, destroyed at most once.
#[no_mangle]
pub unsafe extern "C" fn destroyProactor(thisPtr: *mut c_void) -> c_int {
    status_call(|| {
        if thisPtr.is_null() {
            return Err(invalid());
        }
        // SAFETY: a non-NULL handle is a Box<Proactor> from createProactor, not yet freed.
        drop(unsafe { Box::from_raw(thisPtr.cast::<Proactor>()) });
        Ok(())
    })
}

/// Hands `len` bytes from `buf` to the proactor, which writes them to `fd` on its loop
/// thread: after the handlers of the current loop turn, in the order of the calls (also
/// across threads), with one non-blocking `sendmsg` per fd and turn carrying everything
/// queued for it (up to 64 queued messages per call). Partial writes are completed when the socket has room again; the loop never
/// blocks on a write and SIGPIPE is never raised. The bytes are copied: `buf` may be reused
/// at once. Bytes handed over while the loop is stopped are written once it runs. `len` 0
/// does nothing and returns 0. The queue of `fd` is freed when `fd` is removed.
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor, a negative fd, a NULL
/// `buf` with `len` > 0, or a `len` over `PTRDIFF_MAX`; `ENOENT` when `fd` is not
/// registered with this proactor;
/// `ENOTSOCK` when `fd` is not a socket, `EPROTOTYPE` when it is not a stream socket (the
/// queue joins messages into one byte stream), `EBADF` when it was closed before its
/// removal; `ENOBUFS` when the bytes would take the fd's queue
/// past the send limit (`setProactorSendLimit`), and then nothing is queued, so the program
/// can drop that slow consumer (a `len` that, with the 64 bytes of bookkeeping, is over the
/// limit by itself is refused before anything is copied); `EPIPE`, `ECONNRESET` (or another write error) once a
/// write to `fd` failed: its queue was dropped, and its handler still gets the hang-up call.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`; `buf` points to `len` readable
/// bytes (or is NULL with `len` 0).
#[no_mangle]
pub unsafe extern "C" fn sendViaProactor(
    thisPtr: *mut c_void,
    fd: c_int,
    buf: *const c_void,
    len: usize,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        // SAFETY: the caller promises `len` readable bytes at `buf`.
        let bytes = unsafe { bytes(buf, len) }?;
        proactor.send(valid_fd(fd)?, bytes)
    })
}

/// Hands the same `len` bytes to the proactor for each of the `count` fds in `fds`, as
/// `sendViaProactor` does for one, keeping one shared copy of the bytes: this is a chat
/// broadcast. If `results` is not NULL, `results[i]` is set to 0 when `fds[i]` got the
/// bytes, or to the errno `sendViaProactor` would have set for it (`ENOBUFS` for a
/// consumer past the send limit, `ENOENT`, `EPIPE`…).
///
/// Returns 0 when every fd got the bytes. Returns -1 with errno set to the first failing
/// fd's errno when some did not (the others still got them; `results` says which). Returns
/// -1 with errno `EINVAL`, having queued nothing, for a NULL proactor, a NULL `fds` with
/// `count` > 0, a NULL `buf` with `len` > 0, or a `len` over `PTRDIFF_MAX`. A `len` that,
/// with the 64 bytes of bookkeeping, is over the send limit by itself fails for every fd
/// with `ENOBUFS` before anything is copied.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`; `fds` points to `count` ints,
/// `buf` to `len` readable bytes, and `results`, if not NULL, to `count` writable ints.
#[no_mangle]
pub unsafe extern "C" fn broadcastViaProactor(
    thisPtr: *mut c_void,
    fds: *const c_int,
    count: usize,
    buf: *const c_void,
    len: usize,
    results: *mut c_int,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        // SAFETY: the caller promises `len` readable bytes at `buf`.
        let bytes = unsafe { bytes(buf, len) }?;
        let fds = if count == 0 {
            &[][..]
        } else if fds.is_null() {
            return Err(invalid());
        } else {
            // SAFETY: the caller promises `count` ints at `fds`.
            unsafe { std::slice::from_raw_parts(fds, count) }
        };
        let failures = proactor.broadcast(fds, bytes);
        if !results.is_null() {
            // SAFETY: the caller promises `count` writable ints at `results`.
            let results = unsafe { std::slice::from_raw_parts_mut(results, count) };
            results.fill(0);
            for (index, err) in &failures {
                results[*index] = errno_of(err);
            }
        }
        match failures.into_iter().next() {
            None => Ok(()),
            Some((_, err)) => Err(err),
        }
    })
}

/// Sets the send limit (high-water mark) of every fd of this proactor, in bytes: a send
/// fails with `ENOBUFS` when the fd's unwritten bytes, plus 64 bytes of bookkeeping per
/// queued message, would pass it. The default is 4 MiB (4194304). Queues already longer
/// keep what they hold.
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn setProactorSendLimit(thisPtr: *mut c_void, bytes: usize) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }?.set_send_limit(bytes);
        Ok(())
    })
}

/// Returns the send limit set by `setProactorSendLimit` (4194304 by default), or 0 with
/// errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn getProactorSendLimit(thisPtr: *mut c_void) -> usize {
    match catch_unwind(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }.map(Proactor::send_limit)
    }) {
        Ok(Ok(limit)) => limit,
        Ok(Err(err)) => {
            set_errno(errno_of(&err));
            0
        }
        Err(_) => {
            set_errno(libc::EIO);
            0
        }
    }
}

/// Stores in `*bytes` how many bytes are queued for `fd` and not yet written, counted as
/// the send limit counts them (64 bytes of bookkeeping per queued message included).
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor, a negative fd or a NULL
/// `bytes`; `ENOENT` when `fd` is not registered.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn getProactorQueuedBytes(
    thisPtr: *mut c_void,
    fd: c_int,
    bytes: *mut usize,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        let queued = proactor.queued_bytes(valid_fd(fd)?)?;
        // SAFETY: the caller passes NULL or a writable size_t.
        let out = unsafe { bytes.as_mut() }.ok_or_else(invalid)?;
        *out = queued;
        Ok(())
    })
}

/// Starts accepting connections on the listening socket `listen_fd`: for each one the loop
/// calls `handler(thisPtr, listen_fd, fd, peer, peer_len, context)` with the new socket
/// (non-blocking and close-on-exec; the program owns it and closes it). Multishot: it goes
/// on until `removeHandler(thisPtr, listen_fd)`; once that returns (or a handler call that
/// made it returns) no further call comes, and `context` may be freed. The listening socket
/// is switched to non-blocking mode. Out of descriptors, the library sheds one pending
/// connection per call (a reserve fd of its own makes room to accept and close it) instead
/// of spinning, and the handler gets `fd` = `-EMFILE` (or `-ENFILE`) each time. Errors of
/// one pending connection (`-ECONNABORTED`, `-EPROTO`, `-EPERM`…) are passed on and accepting
/// goes on; an error of the listener itself (`-EBADF`, `-EINVAL`) ends the request: it is
/// removed, and that call is its last. Who accepts depends on the backend: on io_uring
/// with multishot accept (Linux 5.19 and later) the kernel does, with one request that
/// goes on delivering (no system call of the loop per connection); on epoll, or where
/// io_uring lacks it, the loop calls a non-blocking `accept4` when the listener is readable.
///
/// Returns 0, or -1 with errno set, as `addFD2Proactor` (`EEXIST` when `listen_fd` is
/// registered already); `EINVAL` when `listen_fd` is not listening, `ENOTSOCK` when it is
/// not a socket; the kernel's error when the reserve fd cannot be opened.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`; `context` stays valid until
/// `listen_fd` is removed.
#[no_mangle]
pub unsafe extern "C" fn acceptViaProactor(
    thisPtr: *mut c_void,
    listen_fd: c_int,
    handler: accept_completion_t,
    context: *mut c_void,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        let handler = handler.ok_or_else(invalid)?;
        let pointers = HandedBack::new(thisPtr, context);
        proactor.accept(valid_fd(listen_fd)?, move |result| {
            let (handle, context) = (pointers.handle(), pointers.context());
            match result {
                // SAFETY: the caller gave a C function of this type; the address lives on
                // this stack frame for the whole call.
                Ok(accepted) => unsafe {
                    handler(
                        handle,
                        listen_fd,
                        std::os::fd::IntoRawFd::into_raw_fd(accepted.fd), // the program's now
                        (&accepted.peer as *const libc::sockaddr_storage).cast(),
                        accepted.peer_len,
                        context,
                    )
                },
                // SAFETY: as above, with no address.
                Err(err) => unsafe {
                    handler(
                        handle,
                        listen_fd,
                        -errno_of(&err),
                        std::ptr::null(),
                        0,
                        context,
                    )
                },
            }
        })
    })
}

/// Starts receiving on the connected stream socket `fd`: each time bytes arrive the loop
/// calls `handler(thisPtr, fd, n, data, context)` with the bytes (`data` is valid during
/// the call only). Multishot: it goes on until the peer closes its
/// side, which gives one last call with `n` = 0, or an error, which gives one last call with
/// `n` = -errno (`-ECONNRESET`…). Before that last call `fd` is removed from the proactor, so
/// the handler may `close(fd)` in it; output still queued for `fd` is dropped then, so a
/// reply to a half-closed peer cannot go through `sendViaProactor`. `removeHandler(thisPtr,
/// fd)` ends the request early: if it returns 0, no last call comes; if it fails with
/// `ENOENT`, the request ended by itself and its last call has run or is running (that call
/// is where `context` is released). The library never closes `fd`, and holds no buffer for
/// an idle connection. Who receives depends on the backend: on io_uring with buffer rings
/// (Linux 5.19 and later) the kernel does, into one of the library's 8 KiB buffers per
/// completion (so a call brings up to 8 KiB, and a large arrival takes several calls, in
/// order); on epoll, or where io_uring lacks them, the loop calls a non-blocking `recv` when
/// `fd` is readable, and a call brings all that was there, up to 64 KiB.
///
/// Returns 0, or -1 with errno set, as `addFD2Proactor`; `ENOTSOCK` when `fd` is not a
/// socket, `EPROTOTYPE` when it is not a stream socket.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`; `context` stays valid until
/// the request ends.
#[no_mangle]
pub unsafe extern "C" fn receiveViaProactor(
    thisPtr: *mut c_void,
    fd: c_int,
    handler: receive_completion_t,
    context: *mut c_void,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        let handler = handler.ok_or_else(invalid)?;
        let pointers = HandedBack::new(thisPtr, context);
        proactor.receive(valid_fd(fd)?, move |result| {
            let (handle, context) = (pointers.handle(), pointers.context());
            let (count, data) = match result {
                Ok(bytes) if !bytes.is_empty() => (
                    bytes.len() as libc::ssize_t,
                    bytes.as_ptr().cast::<c_void>(),
                ),
                Ok(_) => (0, std::ptr::null()),
                Err(err) => (-(errno_of(&err) as libc::ssize_t), std::ptr::null()),
            };
            // SAFETY: the caller gave a C function of this type; `data` stays valid for the
            // whole call.
            unsafe { handler(handle, fd, count, data, context) }
        })
    })
}

/// Names the backend the proactor uses: `"epoll"` or `"io_uring"`, a static string.
///
/// Returns the name, or NULL with errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn getProactorBackend(thisPtr: *mut c_void) -> *const c_char {
    pointer_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let name = match unsafe { proactor(thisPtr) }?.backend_name() {
            "io_uring" => c"io_uring",
            _ => c"epoll",
        };
        Ok(name.as_ptr().cast_mut())
    })
    .cast_const()
}

/// A flow handler: called on the loop thread with the proactor, the fd, the event
/// (`ST_PROACTOR_FLOW_HIGH`, `ST_PROACTOR_FLOW_DRAINED`, `ST_PROACTOR_FLOW_STALLED` or
/// `ST_PROACTOR_FLOW_LAGGING`), the
/// fd's queued bytes at that moment (counted as `getProactorQueuedBytes` counts them), and
/// the context given to `setProactorFlowHandler`.
pub type flow_handler_t = Option<
    unsafe extern "C" fn(
        proactor: *mut c_void,
        fd: c_int,
        event: c_int,
        queued: usize,
        context: *mut c_void,
    ),
>;

/// Flow event: the fd's queued output rose above the high watermark (once per crossing).
pub const ST_PROACTOR_FLOW_HIGH: c_int = 1;
/// Flow event: the queued output of an fd that had risen above the high watermark fell to
/// the low watermark or below (by writes, or because it was dropped after a write error).
pub const ST_PROACTOR_FLOW_DRAINED: c_int = 2;
/// Flow event: the fd's queued output has waited for room in its socket, with no byte
/// written, for the stall timeout (once per stall).
pub const ST_PROACTOR_FLOW_STALLED: c_int = 3;
/// Flow event: the fd's queued output has stayed above the high watermark (from its
/// `ST_PROACTOR_FLOW_HIGH` on, without its `ST_PROACTOR_FLOW_DRAINED`) for the lag timeout,
/// progress or not (once per congestion): its reader reads, but too slowly to catch up.
pub const ST_PROACTOR_FLOW_LAGGING: c_int = 4;

fn flow_event_code(kind: FlowEventKind) -> c_int {
    match kind {
        FlowEventKind::High => ST_PROACTOR_FLOW_HIGH,
        FlowEventKind::Drained => ST_PROACTOR_FLOW_DRAINED,
        FlowEventKind::Stalled => ST_PROACTOR_FLOW_STALLED,
        FlowEventKind::Lagging => ST_PROACTOR_FLOW_LAGGING,
    }
}

/// Pauses the reading of `fd`: once this returns, no new call of its handler (or of its
/// receive or accept completion) starts until `resumeProactorReading`; a call already
/// running on the loop thread finishes. Nothing is read: the bytes stay in the socket, where
/// TCP's own flow control slows the peer down. Output queued for `fd` keeps being written
/// while it is paused. A hang-up of a paused fd is reported once it is resumed (the handler
/// then gets its call). Pausing a paused fd does nothing. It costs no system call: the
/// backend stops watching the fd's input the first time it reports some while paused.
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor or a negative fd, `ENOENT`
/// when `fd` is not registered.
///
/// Thread-safety: may be called from any thread, including from inside a handler (for its
/// own fd or another), while the loop runs or not.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn pauseProactorReading(thisPtr: *mut c_void, fd: c_int) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }?.pause_reading(valid_fd(fd)?)
    })
}

/// Resumes the reading of `fd` paused by `pauseProactorReading`: its handler is called
/// again for the bytes that waited in the socket, in order, or for a hang-up that came
/// meanwhile. Resuming an fd that is not paused does nothing.
///
/// Returns 0, or -1 with errno set: `EINVAL` for a NULL proactor or a negative fd, `ENOENT`
/// when `fd` is not registered.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn resumeProactorReading(thisPtr: *mut c_void, fd: c_int) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }?.resume_reading(valid_fd(fd)?)
    })
}

/// Sets the watermarks of queued output for every fd of this proactor, in bytes counted as
/// `getProactorQueuedBytes` counts them: when an fd's queue rises above `high`, the flow
/// handler gets `ST_PROACTOR_FLOW_HIGH`; when it falls back to `low` or below,
/// `ST_PROACTOR_FLOW_DRAINED`; once per crossing. The defaults are 262144 (256 KiB) and
/// 1048576 (1 MiB). The send limit (`setProactorSendLimit`) stays the hard cap. New marks
/// apply from the next send or write on.
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor or `low` above `high`.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn setProactorWatermarks(
    thisPtr: *mut c_void,
    low: usize,
    high: usize,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        unsafe { proactor(thisPtr) }?.set_watermarks(low, high)
    })
}

/// Stores the watermarks set by `setProactorWatermarks` in `*low` and `*high`.
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor or a NULL `low` or `high`.
///
/// Thread-safety: may be called from any thread.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`; `low` and `high` are NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn getProactorWatermarks(
    thisPtr: *mut c_void,
    low: *mut usize,
    high: *mut usize,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let (low_mark, high_mark) = unsafe { proactor(thisPtr) }?.watermarks();
        // SAFETY: the caller passes NULL or writable size_t pointers.
        let (low, high) = unsafe { (low.as_mut(), high.as_mut()) };
        let (Some(low), Some(high)) = (low, high) else {
            return Err(invalid());
        };
        *low = low_mark;
        *high = high_mark;
        Ok(())
    })
}

/// Sets the flow handler: the loop calls `handler(thisPtr, fd, event, queued, context)` on
/// its thread for each flow event of an fd's queued output: `ST_PROACTOR_FLOW_HIGH` (above
/// the high watermark), `ST_PROACTOR_FLOW_DRAINED` (back to the low one) and
/// `ST_PROACTOR_FLOW_STALLED` (no progress for the stall timeout, see
/// `setProactorStallTimeout`). It is called with no library lock held, right after the
/// handler call or the write that caused the event: a handler whose sends push an fd above
/// the high mark has the event delivered before the next handler of the same loop turn. It
/// may call every function (pause, resume, remove, send). Events of an fd removed before
/// their delivery are dropped, as are events while no flow handler is set (none is at
/// first). A NULL `handler` removes the flow handler; `context` may then be freed once the
/// call returns, except from another thread while a flow event is being delivered (set
/// the new handler from the loop thread, or after the loop stopped, to be sure).
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`; `context` stays valid while
/// the handler is set.
#[no_mangle]
pub unsafe extern "C" fn setProactorFlowHandler(
    thisPtr: *mut c_void,
    handler: flow_handler_t,
    context: *mut c_void,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        let Some(handler) = handler else {
            proactor.clear_flow_handler();
            return Ok(());
        };
        let pointers = HandedBack::new(thisPtr, context);
        proactor.set_flow_handler(move |event| {
            let code = flow_event_code(event.kind);
            // SAFETY: the caller gave a C function of this type; it runs on the loop thread
            // with the pointers it registered.
            unsafe {
                handler(
                    pointers.handle(),
                    event.fd,
                    code,
                    event.queued,
                    pointers.context(),
                )
            }
        });
        Ok(())
    })
}

/// Sets the stall timeout, in milliseconds (0, the default, turns stall detection off).
/// With one set, the flow handler gets `ST_PROACTOR_FLOW_STALLED` for an fd whose queued
/// output has waited for room in its socket that long with no progress: no byte of it
/// written, and nothing of what the socket holds taken by the reader (the socket's
/// `SIOCOUTQ` did not shrink). The clock starts when the output starts waiting and restarts
/// at every sign of progress.
/// Once per stall: another comes only after progress. A reader that reads slowly keeps
/// making progress and never stalls; one that has stopped reading does. The cost does not
/// grow with the number of fds: only fds whose output waits have a timer.
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn setProactorStallTimeout(
    thisPtr: *mut c_void,
    milliseconds: libc::c_uint,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        let timeout =
            (milliseconds > 0).then(|| std::time::Duration::from_millis(u64::from(milliseconds)));
        proactor.set_stall_timeout(timeout);
        Ok(())
    })
}

/// Sets the lag timeout, in milliseconds (0, the default, turns lag detection off). With one
/// set, the flow handler gets `ST_PROACTOR_FLOW_LAGGING` for an fd whose queued output has
/// stayed congested that long: above the high watermark since its `ST_PROACTOR_FLOW_HIGH`,
/// without its `ST_PROACTOR_FLOW_DRAINED`, whether or not its reader made progress
/// meanwhile. Once per congestion. This is the limit for a reader that reads, but too slowly
/// to catch up, and so holds back everyone whose bytes go to it while the stall timeout never
/// fires (Redis's soft output-buffer limit held for a time is the same idea). The clock of a
/// congestion starts at its `ST_PROACTOR_FLOW_HIGH`; a timeout set during a congestion counts
/// from there too. Only congested fds have a timer: no cost for the others.
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn setProactorLagTimeout(
    thisPtr: *mut c_void,
    milliseconds: libc::c_uint,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        let timeout =
            (milliseconds > 0).then(|| std::time::Duration::from_millis(u64::from(milliseconds)));
        proactor.set_lag_timeout(timeout);
        Ok(())
    })
}

/// Returns the version of the library the program runs with, `"MAJOR.MINOR.PATCH"` (such
/// as `"0.1.0"`): a static string, never NULL. The header it was compiled with has
/// `ST_PROACTOR_VERSION_STRING` (and `_MAJOR`, `_MINOR`, `_PATCH`), so a program can check at
/// start that the two agree: the SONAME keeps a program from loading a library of another
/// major version, and a library older than the header (a smaller minor) may lack functions
/// the program uses. Never fails; leaves errno alone; needs no proactor.
///
/// Thread-safety: may be called from any thread, at any time.
#[no_mangle]
pub extern "C" fn getProactorVersion() -> *const c_char {
    // Cargo.toml's version, the one the header's macros come from (tools/generate_header.rs).
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}

/// Sets the flush delay, in microseconds (0, the default, writes queued output at the end of
/// every loop turn). With a delay, output queued when nothing was waiting is written at most
/// that long later, together with everything queued meanwhile: under load one write then
/// carries more (a loopback send costs about the same whatever its size), at the price of up
/// to that much latency; the idea of `TCP_CORK` or Kafka's `linger.ms`. A stop of the loop
/// writes at once. Delays over 1000000 (one second) are cut to one second. The epoll backend
/// sleeps in whole milliseconds, so there a delay below 1000 is rounded up to it.
///
/// Returns 0, or -1 with errno `EINVAL` for a NULL proactor.
///
/// Thread-safety: may be called from any thread, including from inside a handler.
///
/// # Safety
/// `thisPtr` is NULL or a live handle from `createProactor`.
#[no_mangle]
pub unsafe extern "C" fn setProactorFlushDelay(
    thisPtr: *mut c_void,
    microseconds: libc::c_uint,
) -> c_int {
    status_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let proactor = unsafe { proactor(thisPtr) }?;
        proactor.set_flush_delay(std::time::Duration::from_micros(u64::from(microseconds)));
        Ok(())
    })
}
