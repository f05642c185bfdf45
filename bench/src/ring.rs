//! What the load generator and the sink share about driving an io_uring by hand.

use io_uring::{squeue, types, IoUring};
use std::io;
use std::time::{Duration, Instant};

/// Queues a request, submitting first when the submission queue is full.
///
/// # Safety
/// Every buffer the entry points to must stay valid and in place until its
/// completion has been taken off the ring.
pub unsafe fn push(ring: &mut IoUring, e: &squeue::Entry) {
    // SAFETY: the caller keeps the entry's buffers alive until completion.
    while unsafe { ring.submission().push(e) }.is_err() {
        ring.submit()
            .expect("submit to make room in the submission queue");
    }
}

/// Submits what is queued, waits up to `timeout` for at least one completion, and
/// returns every completion there is as (user_data, result).
pub fn wait(ring: &mut IoUring, timeout: Duration) -> io::Result<Vec<(u64, i32)>> {
    let ts = types::Timespec::from(timeout);
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => {}
        // ETIME: nothing completed in time; EINTR: a signal; EBUSY: the completion
        // queue is full, which the caller is about to drain.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
            ) => {}
        Err(e) => return Err(e),
    }
    Ok(ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect())
}

/// Like [`wait`], but first polls the completion queue from user space for up to
/// `spin` (no system call unless the kernel flags pending completion work, which
/// needs `setup_taskrun_flag`). A sleeping thread is woken by an interrupt, which in
/// a virtual machine costs tens of microseconds per wake-up; a client that must
/// keep a server saturated cannot afford that on every reply.
pub fn wait_spinning(
    ring: &mut IoUring,
    timeout: Duration,
    spin: Duration,
) -> io::Result<Vec<(u64, i32)>> {
    ring.submit()?;
    let start = Instant::now();
    loop {
        if !ring.completion().is_empty() {
            return Ok(ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect());
        }
        if ring.submission().taskrun() {
            // Completions are waiting for this thread to enter the kernel.
            ring.submit()?;
            continue;
        }
        if start.elapsed() >= spin {
            return wait(ring, timeout.saturating_sub(spin));
        }
        std::hint::spin_loop();
    }
}
