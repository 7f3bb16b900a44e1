//! The relay's side of the sandbox: a [`Lane`] per source (its filters) or
//! per target (its transform) sends program runs to a warm child process of
//! its own and hands back the answers in order. A runaway program costs its
//! own lane at most [`TIME_LIMIT`]; other lanes, and the relay, go on.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::frame::{self, HELLO};
use super::{Failure, FailureKind, Output, Program, MEMORY_LIMIT, TIME_LIMIT};

/// A child that neither answers nor dies for this long while runs wait is
/// stopped (its own watchdog ends a run at [`TIME_LIMIT`]; this is the
/// backstop for a process that is wedged as a whole).
const BACKSTOP: Duration = Duration::from_secs(2);
/// After a child could not be started, runs are refused for this long
/// instead of trying to start one for each.
const START_RETRY: Duration = Duration::from_secs(1);

static WORKER_EXE: OnceLock<PathBuf> = OnceLock::new();

/// The executable started as `EXE jq-sandbox`: by default the running one.
/// Tests and benchmarks that run the relay inside their own process point
/// it at the `hookrelay` binary.
pub fn set_worker_exe(path: PathBuf) {
    let _ = WORKER_EXE.set(path);
}

fn worker_exe() -> std::io::Result<PathBuf> {
    match WORKER_EXE.get() {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe(),
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SandboxError {
    /// Nothing ran: the sandbox process could not be started or reached.
    /// Not the program's fault: a transform is tried again later.
    #[error("the jq sandbox is unavailable: {0}")]
    Unavailable(String),
}

/// One program run, waiting for its answer.
struct Job {
    /// The request's frame up to the input.
    head: Vec<u8>,
    input: Bytes,
    reply: oneshot::Sender<Result<Output, SandboxError>>,
}

/// Runs programs for one source or one target, in a child process of its
/// own, started on first use; while that child is busy with a slow run (it
/// answered nothing for [`SLOW`]), in the next one, and so on (as many as
/// the machine runs at once, 2 to 4), so that a slow run holds up only the
/// runs sent with it. Dropping the lane ends its tasks and their children.
#[derive(Debug)]
pub struct Lane {
    name: String,
    seats: Vec<Seat>,
    /// What the seats' times count from.
    epoch: Instant,
}

/// A child busy this long without an answer is on a slow run: the lane's
/// next runs go to another. Quick runs stay together in one child, where a
/// batch of them costs one pipe write and one wake-up.
const SLOW: Duration = Duration::from_millis(5);

/// One child of a lane: the task that owns it, started on first use.
#[derive(Debug, Default)]
struct Seat {
    jobs: OnceLock<mpsc::UnboundedSender<Job>>,
    /// Runs sent to it and not yet answered.
    load: AtomicUsize,
    /// When it last answered, or was given work while idle (ms from the
    /// lane's epoch).
    progress_ms: AtomicU64,
}

/// Milliseconds since a lane's epoch: the seats' times.
fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// A run on its seat: taken off the seat's load when it ends, answered or
/// dropped.
struct Seated<'a> {
    seat: &'a Seat,
    epoch: Instant,
}

impl Drop for Seated<'_> {
    fn drop(&mut self) {
        self.seat.progress_ms.store(ms_since(self.epoch), Ordering::Relaxed);
        self.seat.load.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lane {
    pub fn new(name: impl Into<String>) -> Lane {
        let seats = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4);
        Lane { name: name.into(), seats: (0..seats).map(|_| Seat::default()).collect(), epoch: Instant::now() }
    }

    /// The seat for the next run: the first that is idle or answering, else
    /// the least loaded.
    fn seat(&self) -> usize {
        let now = ms_since(self.epoch);
        let answering = |s: &Seat| {
            s.load.load(Ordering::Relaxed) == 0
                || now.saturating_sub(s.progress_ms.load(Ordering::Relaxed)) < SLOW.as_millis() as u64
        };
        let least = || (0..self.seats.len()).min_by_key(|i| self.seats[*i].load.load(Ordering::Relaxed));
        self.seats.iter().position(answering).or_else(least).unwrap_or(0)
    }

    /// A route filter's verdict on a webhook (`$source`, `$event`): whether
    /// its first output is truthy, or why it failed. Given the relay's parse
    /// of the body (`json`), a simple program is answered at once, without
    /// the sandbox.
    pub async fn filter(
        &self,
        filter: &Program,
        source: &str,
        event: &str,
        body: &Bytes,
        json: Option<&Value>,
    ) -> Result<bool, Failure> {
        let direct = filter.direct.as_ref().zip(json).and_then(|(d, json)| d.filter(json, &[source, event]));
        if let Some(verdict) = direct {
            return Ok(verdict);
        }
        match self.run(filter, &[source, event], body).await {
            Ok(Output::Failed(f)) => Err(f),
            Ok(output) => Ok(output.truthy() == Some(true)),
            Err(e) => Err(Failure::new(FailureKind::Unavailable, e.to_string())),
        }
    }

    /// A delivery's key (`order_by`, `debounce.key`; `$source`, `$event`):
    /// `None` for no output or `null`; the failure when it failed. Given
    /// `json`, answered at once when simple, as [`Lane::filter`].
    pub async fn key(
        &self,
        key: &Program,
        source: &str,
        event: &str,
        body: &Bytes,
        json: Option<&Value>,
    ) -> Result<Option<String>, Failure> {
        let direct = key.direct.as_ref().zip(json).and_then(|(d, json)| d.key(json, &[source, event]));
        if let Some(key) = direct {
            return Ok(key.map(super::storable_key));
        }
        match self.run(key, &[source, event], body).await {
            Ok(Output::Failed(f)) => Err(f),
            Ok(output) => Ok(output.key().map(super::storable_key)),
            Err(e) => Err(Failure::new(FailureKind::Unavailable, e.to_string())),
        }
    }

    /// A target's transform of an event (`$source`, `$event`, `$id`).
    pub async fn transform(
        &self,
        transform: &Program,
        event: &crate::store::StoredEvent,
    ) -> Result<Output, SandboxError> {
        let id = event.id.to_string();
        self.run(transform, &[&event.meta.source, &event.meta.event, &id], &event.body).await
    }

    /// Runs `program` on `input` with its variables' values (in
    /// [`super::Kind::vars`] order). Must be called within a Tokio runtime.
    pub async fn run(&self, program: &Program, vars: &[&str], input: &Bytes) -> Result<Output, SandboxError> {
        let at = self.seat();
        let seat = self.seats.get(at).ok_or_else(|| SandboxError::Unavailable("the lane has no child".into()))?;
        let jobs = seat.jobs.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let name = if at == 0 { self.name.clone() } else { format!("{} #{}", self.name, at + 1) };
            tokio::spawn(lane_task(name, rx));
            tx
        });
        if seat.load.fetch_add(1, Ordering::Relaxed) == 0 {
            seat.progress_ms.store(ms_since(self.epoch), Ordering::Relaxed);
        }
        let _seated = Seated { seat, epoch: self.epoch };
        let head = frame::encode_request_head(program.kind(), program.text(), vars, input.len());
        let (reply, answer) = oneshot::channel();
        jobs.send(Job { head, input: input.clone(), reply })
            .map_err(|_| SandboxError::Unavailable("the lane has stopped".into()))?;
        answer.await.map_err(|_| SandboxError::Unavailable("the lane has stopped".into()))?
    }
}

/// A started child.
struct Running {
    process: Child,
    /// Requests for its input, written by a task of their own: a child
    /// reads a long batch as it runs it, and the lane meanwhile takes its
    /// answers and new runs.
    requests: mpsc::UnboundedSender<Vec<u8>>,
    /// Its answers, in order; closed when it exits or breaks the protocol.
    /// An error when it never greeted: it is not a working sandbox.
    answers: mpsc::UnboundedReceiver<Result<Output, String>>,
    /// Its last answer was a time limit, after which it ends by itself: the
    /// runs still waiting did not start, and are sent again.
    timed_out: bool,
    /// The lane stopped it for not answering within [`BACKSTOP`].
    stopped: bool,
}

/// A lane's state, owned by its task.
struct LaneState {
    lane: String,
    child: Option<Running>,
    /// Not yet sent to the current child.
    unsent: VecDeque<Job>,
    /// Sent to it, waiting for their answers, in order.
    sent: VecDeque<Job>,
    /// After a child could not start, runs are refused until then.
    refuse_until: Option<Instant>,
    /// When the child last answered (or was first given work).
    progress: Instant,
}

/// Owns the lane's child: sends it the runs, matches answers to runs in
/// order, and replaces it when it dies. Ends when the [`Lane`] is dropped
/// and the runs sent are answered.
async fn lane_task(lane: String, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut state = LaneState {
        lane,
        child: None,
        unsent: VecDeque::new(),
        sent: VecDeque::new(),
        refuse_until: None,
        progress: Instant::now(),
    };
    let mut open = true;
    loop {
        state.send_unsent().await;
        if !open && state.sent.is_empty() && state.unsent.is_empty() {
            break;
        }
        let backstop = state.progress + BACKSTOP;
        tokio::select! {
            job = jobs.recv(), if open => match job {
                Some(job) => {
                    state.unsent.push_back(job);
                    while let Ok(job) = jobs.try_recv() {
                        state.unsent.push_back(job);
                    }
                }
                None => open = false,
            },
            answer = next_answer(&mut state.child) => match answer {
                Some(Ok(output)) => state.on_answer(output),
                Some(Err(e)) => state.on_not_started(e),
                None => state.on_death(),
            },
            _ = tokio::time::sleep_until(backstop), if !state.sent.is_empty() => {
                if let Some(c) = state.child.as_mut() {
                    tracing::warn!(lane = state.lane, "the jq sandbox stopped answering; it is replaced");
                    stop(c).await;
                }
                state.progress = Instant::now();
            }
        }
    }
}

impl LaneState {
    /// Sends the waiting runs to the child in one write, starting one if
    /// needed; refuses them when none can start.
    async fn send_unsent(&mut self) {
        if self.unsent.is_empty() {
            return;
        }
        if self.child.is_none() && self.refuse_until.is_none_or(|t| Instant::now() >= t) {
            match start().await {
                Ok(c) => self.child = Some(c),
                Err(e) => {
                    tracing::error!(lane = self.lane, error = %e, "cannot start the jq sandbox");
                    self.refuse_until = Some(Instant::now() + START_RETRY);
                }
            }
        }
        let Some(c) = self.child.as_mut() else {
            for job in self.unsent.drain(..) {
                let _ = job.reply.send(Err(SandboxError::Unavailable("cannot start the sandbox process".into())));
            }
            return;
        };
        if self.sent.is_empty() {
            self.progress = Instant::now();
        }
        let mut batch = Vec::new();
        for job in self.unsent.drain(..) {
            batch.extend_from_slice(&job.head);
            batch.extend_from_slice(&job.input);
            self.sent.push_back(job);
        }
        // A child that does not read answers nothing and is stopped after
        // the backstop. A dead one (its writer gone with the pipe) shows as
        // its answers ending, and its runs go to the next child: not
        // stopped here, which would blame its last run on the time limit.
        let _ = c.requests.send(batch);
    }

    /// The answer to the oldest run sent.
    fn on_answer(&mut self, output: Output) {
        self.progress = Instant::now();
        let timed_out = matches!(&output, Output::Failed(f) if f.kind == FailureKind::TimeLimit);
        if let Some(c) = self.child.as_mut() {
            c.timed_out = timed_out;
        }
        if timed_out {
            tracing::warn!(
                lane = self.lane,
                limit_ms = TIME_LIMIT.as_millis() as u64,
                "a jq program ran past its time limit and was stopped"
            );
        }
        match self.sent.pop_front() {
            Some(job) => drop(job.reply.send(Ok(output))),
            None => tracing::error!(lane = self.lane, "the jq sandbox answered a run it was not given"),
        }
    }

    /// The child never greeted: every run waiting is refused, and no new
    /// child is tried for a moment.
    fn on_not_started(&mut self, e: String) {
        tracing::error!(lane = self.lane, error = %e, "the jq sandbox did not start");
        if let Some(mut c) = self.child.take() {
            let _ = c.process.start_kill();
        }
        self.refuse_until = Some(Instant::now() + START_RETRY);
        for job in self.sent.drain(..).chain(self.unsent.drain(..)) {
            let _ = job.reply.send(Err(SandboxError::Unavailable(e.clone())));
        }
    }

    /// The child's answers ended. Unless its last answer was a time limit
    /// (after which it ends by itself), the run it was on killed it: that run
    /// fails. The others never ran: they go to the next child, first.
    fn on_death(&mut self) {
        let Some(mut dead) = self.child.take() else { return };
        let _ = dead.process.start_kill();
        if !dead.timed_out {
            if let Some(job) = self.sent.pop_front() {
                let failure = if dead.stopped {
                    let limit = TIME_LIMIT.as_millis();
                    Failure::new(FailureKind::TimeLimit, format!("the program ran past its time limit of {limit} ms"))
                } else {
                    let memory = MEMORY_LIMIT >> 20;
                    let message = format!("the program was stopped: it passed the sandbox's memory limit ({memory} MiB) or ran out of stack");
                    Failure::new(FailureKind::Crashed, message)
                };
                tracing::warn!(
                    lane = self.lane,
                    reason = failure.kind.as_str(),
                    "a jq program was stopped; its sandbox process is replaced"
                );
                let _ = job.reply.send(Ok(Output::Failed(failure)));
            }
        }
        while let Some(job) = self.sent.pop_back() {
            self.unsent.push_front(job);
        }
    }
}

/// Kills a child that does not answer; its answers then end.
async fn stop(c: &mut Running) {
    c.stopped = true;
    let _ = c.process.start_kill();
}

/// The current child's next answer; pending while there is none.
async fn next_answer(child: &mut Option<Running>) -> Option<Result<Output, String>> {
    match child {
        Some(c) => c.answers.recv().await,
        None => std::future::pending().await,
    }
}

async fn start() -> std::io::Result<Running> {
    let exe = worker_exe()?;
    // No environment: the relay's holds its secrets.
    let mut process = Command::new(&exe)
        .arg("jq-sandbox")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
        return Err(std::io::Error::other("the sandbox's pipes are missing"));
    };
    let (tx, answers) = mpsc::unbounded_channel();
    tokio::spawn(read_answers(exe, stdout, tx));
    let (requests, to_write) = mpsc::unbounded_channel();
    tokio::spawn(write_requests(stdin, to_write));
    Ok(Running { process, requests, answers, timed_out: false, stopped: false })
}

/// Writes the lane's batches to a child's input, until either ends.
async fn write_requests(mut stdin: ChildStdin, mut batches: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(batch) = batches.recv().await {
        if stdin.write_all(&batch).await.is_err() {
            return;
        }
    }
}

/// Reads a child's greeting, then its answers, until it ends.
async fn read_answers(exe: PathBuf, stdout: ChildStdout, answers: mpsc::UnboundedSender<Result<Output, String>>) {
    let mut r = BufReader::with_capacity(64 << 10, stdout);
    let mut hello = [0u8; HELLO.len()];
    match r.read_exact(&mut hello).await {
        Ok(_) if &hello == HELLO => {}
        _ => {
            let _ = answers.send(Err(format!("{} jq-sandbox did not answer as a hookrelay sandbox", exe.display())));
            return;
        }
    }
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).await.is_err() {
            return;
        }
        let Ok(len) = frame::frame_len(len) else { return };
        let mut body = vec![0; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        match frame::decode_output(&body) {
            Ok(output) => {
                if answers.send(Ok(output)).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
