//! The few calls into the C library that the rest of the crate needs and std does not offer on
//! the oldest Rust the crate supports. They live here, with the crate's other `unsafe`.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Takes an exclusive advisory lock (`flock(LOCK_EX | LOCK_NB)`) on `file` without waiting:
/// `Ok(true)` when taken, `Ok(false)` when another open file description holds it. The lock is
/// released when the file is closed (std's `File::try_lock`, which does the same, needs Rust
/// 1.89).
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // EINTR (a signal before the call finished) is asked again: it does not wait, so a few
    // tries are plenty.
    let mut interrupted = 0;
    loop {
        // SAFETY: flock takes a file descriptor and flags only; the descriptor is open for as
        // long as `file` is borrowed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) if interrupted < 100 => interrupted += 1,
            _ => return Err(e),
        }
    }
}
