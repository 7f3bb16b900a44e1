//! Log lines, written to stderr by a thread of their own.
//!
//! A `write` to stderr blocks while whoever reads it (a terminal, journald,
//! a container's log driver, a pipe into another program) is behind or
//! stopped. Written where they were made, the lines of a stopped reader
//! stopped every worker within a few hundred webhooks, and the acks with
//! them. Here a line is queued (at most [`QUEUE_LINES`]) and a thread
//! writes the queue out, a batch at a time, at most one batch per 10 ms
//! (so that it is not woken for every line). A line that finds the queue
//! full is dropped and counted, and the count is logged as a warning once
//! there is room again: acks never wait for the log.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lines the queue holds (a few MB: lines carry no bodies).
pub const QUEUE_LINES: usize = 16_384;

/// How long the writing thread rests after each batch.
const BATCH_PAUSE: Duration = Duration::from_millis(10);

/// How long [`Flusher`] waits for the queued lines to be written at exit.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

enum Msg {
    Line(Vec<u8>),
    /// Answered once everything queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// Lines waiting in the queue, and lines dropped since the last report.
#[derive(Default)]
struct Counts {
    queued: AtomicUsize,
    dropped: AtomicU64,
}

/// Where the formatter writes: each `write` is one whole line (the
/// formatter writes an event at once), queued without waiting.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Msg>,
    counts: Arc<Counts>,
}

impl std::io::Write for &Queue {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        // Counted before it is sent, so that the writer never counts below zero.
        self.counts.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(Msg::Line(line.to_vec())) {
            self.counts.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => {
                    self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                }
                // The writing thread is gone: write it here rather than lose it.
                TrySendError::Disconnected(_) => std::io::stderr().write_all(line)?,
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Queue {
    type Writer = &'a Queue;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Writes out what is queued when dropped (waiting [`FLUSH_WAIT`] at most:
/// a reader that never reads again must not hold the exit).
pub struct Flusher {
    tx: SyncSender<Msg>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        let (done, written) = mpsc::channel();
        let mut msg = Msg::Flush(done);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// Starts the thread writing to `out`, with a queue of `lines`. Lines that
/// found the queue full are counted, and `report` is called with their
/// count once the queue is no more than half full (so that what it logs
/// finds room).
pub fn start(out: impl Write + Send + 'static, lines: usize, report: fn(u64)) -> std::io::Result<(Queue, Flusher)> {
    let (tx, rx) = mpsc::sync_channel(lines);
    let counts = Arc::new(Counts::default());
    let writer = Writer { rx, requeue: tx.clone(), counts: counts.clone(), room: lines / 2, report };
    std::thread::Builder::new().name("hookrelay-log".into()).spawn(move || writer.run(out))?;
    Ok((Queue { tx: tx.clone(), counts }, Flusher { tx }))
}

struct Writer {
    rx: Receiver<Msg>,
    /// For a flush that must wait for the report just queued.
    requeue: SyncSender<Msg>,
    counts: Arc<Counts>,
    /// Queued lines at most for a report to be made.
    room: usize,
    report: fn(u64),
}

impl Writer {
    /// A batch is what is queued when the thread wakes, written through one
    /// buffer and flushed.
    fn run(self, out: impl Write) {
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
        let mut unreported = 0;
        while let Ok(first) = self.rx.recv() {
            let mut flushed = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg {
                    Msg::Line(line) => {
                        self.counts.queued.fetch_sub(1, Ordering::Relaxed);
                        // Nowhere to report a failed write to stderr; the next may work.
                        let _ = out.write_all(&line);
                    }
                    Msg::Flush(done) => flushed.push(done),
                }
                next = self.rx.try_recv().ok();
            }
            let _ = out.flush();
            unreported += self.counts.dropped.swap(0, Ordering::Relaxed);
            if unreported > 0 && self.counts.queued.load(Ordering::Relaxed) <= self.room {
                (self.report)(unreported);
                unreported = 0;
                // Queued behind the report's line, so answered once it is written.
                for done in flushed.drain(..) {
                    if let Err(TrySendError::Full(Msg::Flush(done)) | TrySendError::Disconnected(Msg::Flush(done))) =
                        self.requeue.try_send(Msg::Flush(done))
                    {
                        let _ = done.send(());
                    }
                }
            }
            for done in flushed {
                let _ = done.send(());
            }
            // Lines queued meanwhile wait for the next batch: a line sent to
            // a thread that is waiting wakes it (a system call and a switch
            // of threads), and under load that would be every line.
            std::thread::sleep(BATCH_PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer that blocks while `gate` is held, keeping what it is given.
    #[derive(Clone, Default)]
    struct Gated {
        gate: Arc<Mutex<()>>,
        got: Arc<Mutex<Vec<u8>>>,
        /// Set once a write has started.
        entered: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Write for Gated {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.entered.store(true, Ordering::SeqCst);
            let _open = self.gate.lock().map_err(|_| std::io::Error::other("poisoned"))?;
            self.got.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn unreported(_: u64) {}

    fn text(g: &Gated) -> String {
        String::from_utf8(g.got.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_are_written_in_order_and_all_of_them_by_the_flush() {
        let out = Gated::default();
        let (queue, flusher) = start(out.clone(), 512, unreported).unwrap();
        for i in 0..500 {
            (&queue).write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(flusher);
        let want: String = (0..500).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text(&out), want, "500 lines through a queue of 512: none dropped, all written by the flush");
    }

    /// What [`report`] was given, for the one test that drops lines.
    static REPORTED: AtomicU64 = AtomicU64::new(0);

    fn report(n: u64) {
        REPORTED.fetch_add(n, Ordering::Relaxed);
    }

    #[test]
    fn a_blocked_writer_never_blocks_a_line_and_the_dropped_ones_are_reported() {
        let out = Gated::default();
        let held = out.gate.lock().unwrap();
        let (queue, flusher) = start(out.clone(), 8, report).unwrap();
        (&queue).write_all(b"line 0\n").unwrap();
        for _ in 0..500 {
            if out.entered.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(out.entered.load(Ordering::SeqCst), "the first line was not written within 5 s");
        // The thread is blocked writing line 0: the queue takes 8 more, and
        // the other 91 are counted.
        let started = Instant::now();
        for i in 1..100 {
            (&queue).write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "a line waited for the blocked writer");
        let dropped = queue.counts.dropped.load(Ordering::Relaxed);
        assert_eq!(dropped, 91);
        assert_eq!(REPORTED.load(Ordering::Relaxed), 0, "reported before the writer wrote again");
        drop(held);
        drop(flusher);
        assert_eq!(REPORTED.load(Ordering::Relaxed), dropped, "reported once the writer wrote again");
        let got = text(&out);
        assert!(got.starts_with("line 0\n"), "{got}");
        assert_eq!(got.lines().count() as u64, 100 - dropped, "{got}");
    }

    #[test]
    fn the_flush_gives_up_on_a_writer_that_never_returns() {
        let out = Gated::default();
        let held = out.gate.lock().unwrap();
        let (queue, flusher) = start(out.clone(), 2, unreported).unwrap();
        for _ in 0..10 {
            (&queue).write_all(b"line\n").unwrap();
        }
        let started = Instant::now();
        drop(flusher);
        let waited = started.elapsed();
        assert!(waited >= FLUSH_WAIT && waited < FLUSH_WAIT * 3, "the flush waited {waited:?}");
        drop(held);
    }
}
