//! The sandbox process (`hookrelay jq-sandbox`, started by the relay, never
//! by hand): reads program runs from stdin, answers each on stdout, in
//! order. Its address space is capped at [`MEMORY_LIMIT`], programs run on
//! a thread with a stack of its own, and a watchdog ends the process when one
//! run passes [`TIME_LIMIT`], after answering it: jaq has no bound of its own
//! on time, memory or recursion, so the bound is the process.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::frame::{self, HELLO};
use super::{compile, eval, Compiled, Failure, FailureKind, Kind, Output, MEMORY_LIMIT, TIME_LIMIT};

/// Stack of the thread that runs programs: deep enough for any sane
/// program; a runaway recursion overflows it and ends the process.
const STACK: usize = 64 << 20;
/// How often the watchdog looks at the run in progress.
const WATCH_EVERY: Duration = Duration::from_millis(5);
/// Compiled programs kept; a reload brings new ones, so the cache is bounded.
const CACHED_PROGRAMS: usize = 256;

/// The answers' side, shared by the runner and the watchdog.
struct Outgoing {
    out: BufWriter<io::Stdout>,
    /// When the run in progress started.
    running: Option<Instant>,
}

fn lock(m: &Mutex<Outgoing>) -> MutexGuard<'_, Outgoing> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The process's main: exit 0 at the end of input or after a time limit, 1
/// when the pipes fail.
pub fn run() -> ExitCode {
    if let Err(e) = rlimit::setrlimit(rlimit::Resource::AS, MEMORY_LIMIT, MEMORY_LIMIT) {
        eprintln!("jq-sandbox: cannot limit memory: {e}");
        return ExitCode::FAILURE;
    }
    let outgoing =
        Arc::new(Mutex::new(Outgoing { out: BufWriter::with_capacity(64 << 10, io::stdout()), running: None }));
    {
        let mut o = lock(&outgoing);
        if o.out.write_all(HELLO).and_then(|_| o.out.flush()).is_err() {
            return ExitCode::FAILURE;
        }
    }
    let runner = {
        let outgoing = outgoing.clone();
        std::thread::Builder::new().name("jq".into()).stack_size(STACK).spawn(move || serve(&outgoing))
    };
    let runner = match runner {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jq-sandbox: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    while !runner.is_finished() {
        std::thread::sleep(WATCH_EVERY);
        let mut o = lock(&outgoing);
        if o.running.is_some_and(|started| started.elapsed() > TIME_LIMIT) {
            // Answer for the run, then end the process while holding the
            // lock, so that the runner can write nothing after it.
            let limit = Failure::new(
                FailureKind::TimeLimit,
                format!("the program ran past its time limit of {} ms", TIME_LIMIT.as_millis()),
            );
            let mut buf = Vec::new();
            frame::encode_output(&mut buf, &Output::Failed(limit));
            let _ = o.out.write_all(&buf).and_then(|_| o.out.flush());
            std::process::exit(0);
        }
    }
    match runner.join() {
        Ok(Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Answers requests until the input ends.
fn serve(outgoing: &Mutex<Outgoing>) -> io::Result<()> {
    let mut input = BufReader::with_capacity(64 << 10, io::stdin().lock());
    let mut programs = Programs::default();
    let (mut body, mut answer) = (Vec::new(), Vec::new());
    loop {
        if !frame::read_frame(&mut input, &mut body)? {
            return lock(outgoing).out.flush();
        }
        let request = frame::decode_request(&body)?;
        lock(outgoing).running = Some(Instant::now());
        let output = programs.run(request);
        answer.clear();
        frame::encode_output(&mut answer, &output);
        // Each answer goes out as it is made, even with more runs waiting:
        // held back behind them, answers would be lost with the process if
        // a later run kills it (and the lane would blame the oldest run it
        // has no answer for), and a long batch would look stuck.
        let mut o = lock(outgoing);
        o.running = None;
        o.out.write_all(&answer)?;
        o.out.flush()?;
    }
}

/// Compiled programs by kind and text, so that each compiles once.
#[derive(Default)]
struct Programs {
    filters: HashMap<String, Result<Compiled, String>>,
    transforms: HashMap<String, Result<Compiled, String>>,
    keys: HashMap<String, Result<Compiled, String>>,
}

impl Programs {
    fn run(&mut self, request: frame::Request) -> Output {
        let cache = match request.kind {
            Kind::Filter => &mut self.filters,
            Kind::Transform => &mut self.transforms,
            Kind::Key => &mut self.keys,
        };
        if !cache.contains_key(request.program) {
            if cache.len() >= CACHED_PROGRAMS {
                cache.clear();
            }
            cache.insert(request.program.to_string(), compile(request.kind, request.program));
        }
        match cache.get(request.program) {
            Some(Ok(program)) => eval(program, request.input, &request.vars),
            Some(Err(e)) => {
                Output::Failed(Failure::new(FailureKind::Runtime, format!("the program does not compile: {e}")))
            }
            None => Output::Failed(Failure::new(FailureKind::Runtime, "the program was not compiled")),
        }
    }
}
