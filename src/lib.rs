//! st_proactor: a small, thread-safe event loop with a C ABI.
//!
//! A [`Proactor`] runs an event loop on a thread of its own and calls a handler for each
//! registered fd that is readable, has hung up or is in error. The same core is exported to C
//! as `libst_proactor.so` (see [`capi`] and `include/st_proactor.h`).
//!
//! Modules: [`capi`] is the C boundary; `proactor` the lifecycle and the loop thread;
//! `operations` the completion operations (accept, receive); `registry` the fd -> handler
//! table; `sendq` the per-fd output queues; `flow` the watermark and stall events of queued
//! output (flow control); `backend` the OS mechanisms (epoll and io_uring).
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

pub mod capi;

mod backend;
mod flow;
mod operations;
mod proactor;
mod registry;
mod sendq;

pub use backend::{BackendKind, BACKEND_ENV_VAR};
pub use flow::{FlowEvent, FlowEventKind, DEFAULT_HIGH_WATERMARK, DEFAULT_LOW_WATERMARK};
pub use operations::Accepted;
pub use proactor::Proactor;
pub use sendq::{DEFAULT_SEND_LIMIT, MESSAGE_OVERHEAD};

/// The Rust examples in README.md, compiled and run as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
