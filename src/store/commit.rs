//! Group commit: one thread makes writes durable, and every writer that
//! arrived while a flush ran shares the next one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::StoreError;

/// How far durability has got: tickets up to `ok_through` are on disk;
/// those after it up to `failed_through` were in a flush that failed.
#[derive(Debug, Clone, Default)]
struct Progress {
    ok_through: u64,
    failed_through: u64,
    last_error: Option<String>,
}

pub struct GroupCommit {
    /// Tickets handed out; a writer takes one after its write is applied.
    issued: Arc<AtomicU64>,
    /// Wakes the flusher; capacity 1 because one pending wake covers all writers.
    wake: Mutex<Option<mpsc::SyncSender<()>>>,
    progress: watch::Receiver<Progress>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommit {
    /// Starts the flusher thread; `flush` makes everything written so far durable.
    pub fn start(
        mut flush: impl FnMut() -> Result<(), StoreError> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let issued = Arc::new(AtomicU64::new(0));
        let (wake_tx, wake_rx) = mpsc::sync_channel::<()>(1);
        let (progress_tx, progress) = watch::channel(Progress::default());
        let thread_issued = issued.clone();
        let thread = std::thread::Builder::new()
            .name("hookrelay-commit".into())
            .spawn(move || {
                let mut done = 0;
                // `recv` fails once the sender is dropped: one last flush, then stop.
                loop {
                    let closing = wake_rx.recv().is_err();
                    let through = thread_issued.load(Ordering::SeqCst);
                    if through > done {
                        let result = flush();
                        progress_tx.send_modify(|p| match result {
                            Ok(()) => p.ok_through = through,
                            Err(e) => {
                                tracing::error!(error = %e, "storage flush failed; the writes it covered are answered 503");
                                p.failed_through = through;
                                p.last_error = Some(e.to_string());
                            }
                        });
                        done = through;
                    }
                    if closing {
                        break;
                    }
                }
            })?;
        Ok(GroupCommit {
            issued,
            wake: Mutex::new(Some(wake_tx)),
            progress,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Waits until everything written before this call is durable.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let wake = self.wake.lock().map_err(|_| StoreError::Closed)?;
            match wake.as_ref() {
                // Full means a wake is already pending, and it covers this ticket.
                Some(tx) => match tx.try_send(()) {
                    Ok(()) | Err(mpsc::TrySendError::Full(())) => {}
                    Err(mpsc::TrySendError::Disconnected(())) => return Err(StoreError::Closed),
                },
                None => return Err(StoreError::Closed),
            }
        }
        let mut rx = self.progress.clone();
        loop {
            {
                let p = rx.borrow_and_update();
                if p.ok_through >= ticket {
                    return Ok(());
                }
                if p.failed_through >= ticket {
                    return Err(StoreError::Io(p.last_error.clone().unwrap_or_default()));
                }
            }
            rx.changed().await.map_err(|_| StoreError::Closed)?;
        }
    }

    /// Runs a last flush and stops the thread. Later calls to `durable` fail with `Closed`.
    pub fn stop(&self) {
        if let Ok(mut wake) = self.wake.lock() {
            wake.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the storage flush thread panicked");
            }
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_writers_share_flushes() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let counted = flushes.clone();
        let gc = Arc::new(
            GroupCommit::start(move || {
                std::thread::sleep(Duration::from_millis(20));
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap(),
        );
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let gc = gc.clone();
                tokio::spawn(async move { gc.durable().await })
            })
            .collect();
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..50).contains(&n), "50 writers took {n} flushes");
    }

    #[tokio::test]
    async fn a_failed_flush_fails_its_writers_and_a_later_one_recovers() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = fail.clone();
        let gc = GroupCommit::start(move || {
            if f.load(Ordering::SeqCst) {
                Err(StoreError::Io("disk full".into()))
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert!(matches!(gc.durable().await, Err(StoreError::Io(m)) if m.contains("disk full")));
        fail.store(false, Ordering::SeqCst);
        gc.durable().await.unwrap();
    }

    #[tokio::test]
    async fn after_stop_writes_are_refused() {
        let gc = GroupCommit::start(|| Ok(())).unwrap();
        gc.durable().await.unwrap();
        gc.stop();
        assert!(matches!(gc.durable().await, Err(StoreError::Closed)));
    }
}
