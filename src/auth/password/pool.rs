//! The threads that compute password hashes.
//!
//! argon2 runs on a few threads of its own rather than on the runtime's blocking pool, so their
//! scheduling priority can be lowered without touching any other work: at a nice value above 0
//! the kernel gives the CPU to the gateway's request threads first whenever both want it, and a
//! flood of sign-ins then delays sign-ins instead of the proxied traffic of signed-in users. An
//! idle machine still hashes at full speed.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of hashing threads. Jobs are taken in order by whichever thread is free; the
/// threads end when the pool is dropped.
pub(super) struct Pool {
    jobs: mpsc::Sender<Job>,
}

impl Pool {
    /// Starts `threads` threads at scheduling priority `nice` (0–19). A priority that cannot be
    /// set is logged once per thread and the thread hashes at normal priority.
    pub(super) fn start(threads: usize, nice: i32) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("portcullis-hash-{n}"))
                .spawn(move || {
                    lower_priority(nice);
                    loop {
                        // The lock is held only while waiting for the next job, never while one
                        // runs, so the other threads keep taking jobs.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job loses its answer (the caller sees an error), not
                            // the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                            }
                            Err(mpsc::RecvError) => return,
                        }
                    }
                })?;
        }
        Ok(Self { jobs: tx })
    }

    /// Runs `f` on a hashing thread and waits for its result without blocking the runtime.
    /// `None` if the pool is gone or the job panicked.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}

/// Sets the calling thread's nice value (Linux: `setpriority(PRIO_PROCESS, tid)` applies to one
/// thread only).
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
            tracing::warn!(error = %e, nice, "could not lower the priority of a hashing thread");
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::warn!(
        nice,
        "password.hashing_nice is applied on Linux only; hashing at normal priority"
    );
}

/// The calling thread's nice value, for tests.
#[cfg(all(test, target_os = "linux"))]
pub(super) fn current_nice() -> i32 {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(i32::MIN)
}
