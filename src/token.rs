//! The names every layer shares: the token of a registration and the operation the backend
//! watches or performs for it. A leaf: it imports nothing of the crate, so that the backends,
//! the registry and the loop can all depend on it without depending on each other.

use std::os::fd::RawFd;

/// The identity of one registration: the fd number plus a generation that changes every time
/// a registration is made, so an event for an earlier registration of the same fd number
/// (stale in a batch, or for a closed and reused fd) never reaches the new handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Token(u64);

impl Token {
    /// Reserved for the loop's wake-up; no registration can have it because fds are < 2^31.
    pub(crate) const WAKE: Token = Token(u64::MAX);

    /// The generation keeps 24 bits, so that a token fits in 56 bits and the io_uring
    /// backend may tag its requests in the top byte of their user data.
    pub(crate) fn new(fd: RawFd, generation: u32) -> Token {
        Token((u64::from(generation & 0xff_ffff) << 32) | u64::from(fd as u32))
    }

    pub(crate) fn fd(self) -> RawFd {
        (self.0 & 0xffff_ffff) as u32 as RawFd
    }

    pub(crate) fn to_u64(self) -> u64 {
        self.0
    }

    pub(crate) fn from_u64(raw: u64) -> Token {
        Token(raw)
    }
}

/// What the backend is asked to watch or perform for a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    /// Report readiness (input, hang-up, error).
    Ready,
    /// Receive into the library's buffers and report the bytes.
    Receive,
    /// Accept connections and report the new sockets.
    Accept,
}
