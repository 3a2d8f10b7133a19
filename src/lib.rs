//! st_proactor: a small, thread-safe event loop with a C ABI.
//!
//! A [`Proactor`] runs an event loop on a thread of its own and calls a handler for each
//! registered fd that is readable, has hung up or is in error. It can also perform the I/O
//! itself and hand over the result: [`Proactor::accept`] gives each new connection as an
//! [`Accepted`] (an owned socket and its peer's address), [`Proactor::receive`] the bytes that
//! arrived, and [`Proactor::send`] writes without ever blocking the loop.
//!
//! The same core is exported to C as `libst_proactor.so` and `libst_proactor.a`; its API is
//! the C header `include/st_proactor.h` (and `include/st_proactor.hpp` for C++), not this page.
//!
//! Modules: `capi` is the C boundary; `proactor` the public API, the lifecycle and the loop
//! thread; `operations` the completion operations (accept, receive); `registry` the fd ->
//! handler table; `output` one fd's output and the rule a finished write follows; `sendq`
//! the per-fd output queues; `flow` the watermark, stall and lag events of queued output
//! (flow control); `backend` the OS mechanisms (epoll and io_uring); `token` and `sys` the
//! leaves every layer shares (names; system-call wrappers).
//!
//! ```
//! use st_proactor::Proactor;
//! use std::io::{Read, Write};
//! use std::os::fd::AsRawFd;
//!
//! let (mut reader, mut writer) = std::os::unix::net::UnixStream::pair()?;
//! let (done, finished) = std::sync::mpsc::channel();
//! let proactor = Proactor::new()?;
//! proactor.add(reader.as_raw_fd(), move |_fd| {
//!     let mut line = String::new();
//!     reader.read_to_string(&mut line).unwrap(); // ends when the writer is dropped
//!     done.send(line).unwrap();
//! })?;
//! proactor.run()?;
//! writer.write_all(b"hi")?;
//! drop(writer);
//! assert_eq!(finished.recv().unwrap(), "hi");
//! # Ok::<(), std::io::Error>(())
//! ```

#![warn(missing_docs)]

// The C ABI: public so that the Rust tests of the C contract can call it, hidden from these
// docs because its reference is the C header, which cbindgen generates from it.
#[doc(hidden)]
pub mod capi;

mod backend;
mod flow;
mod operations;
mod output;
mod proactor;
mod registry;
mod sendq;
mod sys;
mod token;

pub use backend::{BackendKind, BACKEND_ENV_VAR};
pub use flow::{FlowEvent, FlowEventKind, DEFAULT_HIGH_WATERMARK, DEFAULT_LOW_WATERMARK};
pub use operations::Accepted;
pub use proactor::Proactor;
pub use sendq::{DEFAULT_SEND_LIMIT, MESSAGE_OVERHEAD};

/// The Rust examples in README.md, compiled and run as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
