//! The wiping allocator: the system allocator, except that every block is overwritten with
//! zeros before it goes back (on `dealloc`, and the old block on `realloc`).
//!
//! The library's own secret types (`Secret`, the key types) wipe themselves on drop, but the
//! bytes of a key or a token also pass through buffers the library does not own: rumqttc's
//! packet buffers, rustls's record buffers, serde_json's and ciborium's scratch strings, `Vec`s
//! that grow and leave their old block behind. With this allocator in force none of those heap
//! blocks keeps its contents after it is freed. Memory that is still allocated is not touched,
//! and stacks are not heap: the library's worker threads clear theirs with [`scrub_stack`]
//! before they exit (an exited thread's stack stays mapped in glibc's cache).
//!
//! With the `wipe-heap` cargo feature (on by default) it is the global allocator of every
//! program that links the library: the C library (cdylib, staticlib), the Python binding that
//! loads it, Rust programs and the library's tests. A Rust program that wants its own global
//! allocator turns the feature off and may wrap [`WipingAllocator`] around nothing but `System`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{compiler_fence, Ordering};

/// The system allocator, wiping each block when it is freed or moved by `realloc`.
pub struct WipingAllocator;

/// Overwrites `len` bytes at `ptr` with zeros. Volatile writes, word by word, so that the
/// compiler cannot drop them as stores to memory that is about to be freed.
///
/// # Safety
/// `ptr..ptr + len` must be writable memory owned by the caller.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    const WORD: usize = std::mem::size_of::<usize>();
    let mut p = ptr;
    // SAFETY: every write below stays inside `ptr..ptr + len`, which the caller owns; the word
    // writes are aligned (the loop before them advances `p` to a word boundary).
    unsafe {
        let end = ptr.add(len);
        while p < end && (p as usize) % WORD != 0 {
            p.write_volatile(0);
            p = p.add(1);
        }
        while (end as usize) - (p as usize) >= WORD {
            p.cast::<usize>().write_volatile(0);
            p = p.add(WORD);
        }
        while p < end {
            p.write_volatile(0);
            p = p.add(1);
        }
    }
    compiler_fence(Ordering::SeqCst);
}

// SAFETY: every method delegates to `System`, which upholds the GlobalAlloc contract; the only
// additions are writes to a block the caller hands back (which it owns until the call returns)
// and, in `realloc`, a copy between two distinct live blocks.
unsafe impl GlobalAlloc for WipingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in alloc().
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes that the caller gives back.
        unsafe {
            wipe(ptr, layout.size());
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Never the system's realloc: it may move the block and free the old one unwiped.
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, does not
        // overflow isize, so the new layout is valid; `ptr` is live with `layout`; the new block
        // is distinct from it, and the copy is the smaller of the two sizes.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new = System.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

/// The stack size of the library's worker threads (Rust's default, made explicit so that
/// [`scrub_stack`] knows how much it may clear).
pub(crate) const WORKER_STACK: usize = 2 << 20;

/// Clears `bytes` of stack below the caller's frame with volatile writes, 16 KiB per frame of
/// recursion: what deeper calls left there (a parser's scratch buffer, a decrypted record) is
/// gone. The caller must have that much stack left below it.
#[inline(never)]
pub(crate) fn scrub_stack(bytes: usize) {
    use zeroize::Zeroize;
    let mut chunk = [0u64; 2048];
    chunk.zeroize();
    if bytes > std::mem::size_of_val(&chunk) {
        scrub_stack(bytes - std::mem::size_of_val(&chunk));
    }
    // Keeps the chunk (and so this frame) alive across the call: no tail call reuses it.
    std::hint::black_box(&chunk);
}

/// Clears what the worker thread's stack holds below the caller: call it last thing on a
/// library worker thread. How much is measured, not assumed: the thread's stack may be smaller
/// than asked (glibc puts static TLS at its top; a sanitizer's runtime takes more), and the
/// scrub stops 64 KiB short of the stack's end, so it never reaches the guard page.
pub(crate) fn scrub_worker_stack() {
    if let Some(room) = stack_room_below_here() {
        scrub_stack(room.saturating_sub(64 << 10).min(WORKER_STACK));
    }
}

/// Bytes of this thread's stack between the current frame and the stack's lowest address, from
/// the thread's own attributes; None where they cannot be read.
fn stack_room_below_here() -> Option<usize> {
    let here = 0u8;
    let here = std::hint::black_box(&here) as *const u8 as usize;
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    let mut base: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: pthread_getattr_np initialises `attr` for the calling thread when it returns 0;
    // pthread_attr_getstack then only writes the two out-parameters; the attribute object is
    // destroyed once, after use.
    unsafe {
        if libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) != 0 {
            return None;
        }
        let r = libc::pthread_attr_getstack(attr.as_ptr(), &mut base, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        if r != 0 {
            return None;
        }
    }
    let low = base as usize;
    (here > low && here <= low.saturating_add(size)).then(|| here - low)
}

#[cfg(feature = "wipe-heap")]
#[global_allocator]
static GLOBAL: WipingAllocator = WipingAllocator;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_clears_every_byte_whatever_the_alignment() {
        let mut buf = [0xAAu8; 64];
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 17, 40] {
                buf.fill(0xAA);
                // SAFETY: start + len <= 49 < 64: inside `buf`.
                unsafe { wipe(buf.as_mut_ptr().add(start), len) };
                assert!(buf[..start].iter().all(|b| *b == 0xAA));
                assert!(buf[start..start + len].iter().all(|b| *b == 0));
                assert!(buf[start + len..].iter().all(|b| *b == 0xAA));
            }
        }
    }

    #[test]
    fn a_worker_stack_can_be_scrubbed_whole() {
        std::thread::Builder::new()
            .stack_size(WORKER_STACK)
            .spawn(scrub_worker_stack)
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn realloc_keeps_the_contents() {
        let layout = Layout::from_size_align(24, 8).unwrap();
        // SAFETY: a block allocated, grown, shrunk and freed with matching layouts.
        unsafe {
            let p = WipingAllocator.alloc(layout);
            assert!(!p.is_null());
            for i in 0..24 {
                p.add(i).write(i as u8);
            }
            let q = WipingAllocator.realloc(p, layout, 4096);
            assert!(!q.is_null());
            assert!((0..24).all(|i| *q.add(i) == i as u8));
            let r = WipingAllocator.realloc(q, Layout::from_size_align(4096, 8).unwrap(), 10);
            assert!((0..10).all(|i| *r.add(i) == i as u8));
            WipingAllocator.dealloc(r, Layout::from_size_align(10, 8).unwrap());
        }
    }
}
