//! The provided-buffer ring of the io_uring backend: the buffers its receives fill, shared
//! by every connection of a proactor, so an idle connection holds none.
//!
//! The kernel takes a buffer from the ring's head for each receive completion and names it
//! in the completion (its buffer id); the loop hands the bytes to the receive handler and
//! puts the buffer back at the tail as soon as the handler returns. When the ring is empty
//! a receive ends with `ENOBUFS` (the bytes stay in the socket) and the loop re-arms it; by
//! then the buffers of the batch it was in are back.

use io_uring::types::BufRingEntry;
use io_uring::IoUring;
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

/// Number of buffers: a power of two, as the kernel requires. Each armed receive holds at
/// most one, for one completion, so this is how many connections' data one loop turn can
/// take in; more only wait for a re-arm. The loop touches every buffer in turn (the ring is
/// a queue), so the pool (2 MiB) is resident once the server has been busy.
pub(crate) const BUFFER_COUNT: u16 = 256;

/// Bytes per buffer: what one receive completion brings at most. A bigger read comes as
/// several completions.
pub(crate) const BUFFER_SIZE: usize = 8192;

/// Bytes of all the buffers.
const MEMORY_LEN: usize = BUFFER_COUNT as usize * BUFFER_SIZE;

/// The buffer group id the receives select from.
pub(crate) const GROUP: u16 = 0;

pub(crate) struct BufferRing {
    /// BUFFER_COUNT ring entries, page-aligned (mmap), shared with the kernel.
    entries: *mut BufRingEntry,
    entries_len: usize,
    /// The bytes of every buffer, buffer id `i` at `i * BUFFER_SIZE` (an anonymous mapping:
    /// the kernel writes to it behind Rust's back, so it is only reached through this raw
    /// pointer; pages are resident once used).
    memory: *mut u8,
    /// Our copy of the tail: the next entry to fill. Only the loop thread recycles.
    tail: AtomicU16,
}

// SAFETY: the entries are only written by the loop thread (`recycle`) and the kernel; the
// raw pointer is what makes the type not Send/Sync by default, not shared mutable state.
unsafe impl Send for BufferRing {}
// SAFETY: as above.
unsafe impl Sync for BufferRing {}

impl BufferRing {
    /// Maps the ring, fills it with every buffer and registers it with `ring`. Fails with
    /// the kernel's error where buffer rings are missing (before 5.19: `EINVAL`).
    pub(crate) fn register(ring: &IoUring) -> io::Result<BufferRing> {
        let entries_len = usize::from(BUFFER_COUNT) * std::mem::size_of::<BufRingEntry>();
        let entries = map_anonymous(entries_len)?;
        let memory = match map_anonymous(MEMORY_LEN) {
            Ok(memory) => memory,
            Err(err) => {
                // SAFETY: the entries were mapped above with this length, and are unmapped once.
                unsafe { libc::munmap(entries, entries_len) };
                return Err(err);
            }
        };
        let buffers = BufferRing {
            entries: entries.cast(),
            entries_len,
            memory: memory.cast(),
            tail: AtomicU16::new(0),
        };
        // SAFETY: the mapping is page-aligned, holds BUFFER_COUNT entries and lives until
        // `buffers` is dropped, which the backend does only after the ring itself.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                buffers.entries as u64,
                BUFFER_COUNT,
                GROUP,
                0,
            )?;
        }
        for id in 0..BUFFER_COUNT {
            buffers.recycle(id);
        }
        Ok(buffers)
    }

    /// The `len` bytes the kernel received into buffer `id`.
    ///
    /// # Safety
    /// `id` was named by a completion and not recycled since: until then the kernel does not
    /// write to it.
    pub(crate) unsafe fn bytes(&self, id: u16, len: usize) -> &[u8] {
        let start = usize::from(id % BUFFER_COUNT) * BUFFER_SIZE;
        // SAFETY: the range lies in the live mapping, and (the caller guarantees) the kernel
        // does not write it until the buffer is recycled.
        unsafe { std::slice::from_raw_parts(self.memory.add(start), len.min(BUFFER_SIZE)) }
    }

    /// Puts buffer `id` back at the tail of the ring, for the kernel to fill again.
    pub(crate) fn recycle(&self, id: u16) {
        let id = id % BUFFER_COUNT;
        let tail = self.tail.load(Ordering::Relaxed);
        let index = usize::from(tail % BUFFER_COUNT);
        // SAFETY: `index` < BUFFER_COUNT entries of the live mapping; the kernel only reads
        // entries between its head and the published tail, and this one is past the tail.
        let entry = unsafe { &mut *self.entries.add(index) };
        let address = self.memory as u64 + (usize::from(id) * BUFFER_SIZE) as u64;
        entry.set_addr(address);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(id);
        let tail = tail.wrapping_add(1);
        self.tail.store(tail, Ordering::Relaxed);
        // SAFETY: the tail field lives in the first entry of the live mapping; the kernel
        // reads it with acquire ordering, so the entry written above is seen before it.
        unsafe {
            let shared_tail = BufRingEntry::tail(self.entries).cast_mut();
            AtomicU16::from_ptr(shared_tail).store(tail, Ordering::Release);
        }
    }
}

/// A private anonymous read-write mapping of `len` bytes (page-aligned, zeroed, resident
/// only once touched).
fn map_anonymous(len: usize) -> io::Result<*mut libc::c_void> {
    // SAFETY: an anonymous private mapping takes no pointers; MAP_FAILED is checked.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(mapped)
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        // SAFETY: both mappings were made in `register` with these lengths, and are unmapped
        // once, after the ring (see the backend's field order).
        unsafe {
            libc::munmap(self.entries.cast(), self.entries_len);
            libc::munmap(self.memory.cast(), MEMORY_LEN);
        }
    }
}
