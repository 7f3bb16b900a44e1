//! jq programs (route filters, target transforms), compiled with jaq and run in
//! a sandbox process that enforces a time and memory limit.
//!
//! - This file: compiling a program (errors with line and column), and
//!   running one on a payload ([`eval`]), pure and in-process. Only the
//!   sandbox's child process calls [`eval`] on a webhook.
//! - [`sandbox`]: the relay's side: a lane per source or target, a warm
//!   child process per lane, its requests pipelined.
//! - [`child`]: the child's side: `hookrelay jq-sandbox`.
//! - [`frame`]: the bytes on the pipe between them.
//! - [`direct`]: the simple programs (paths, comparisons, `and`/`or`) the
//!   relay answers itself on its own parse of the payload, jaq's answer or
//!   none (then the sandbox runs them).

pub mod child;
mod direct;
mod frame;
pub mod sandbox;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::native::{bome, run, v, Filter as NativeFilter, Fun};
use jaq_core::{Ctx, DataT, RunPtr, ValT, Vars};
use jaq_json::Val;

pub use sandbox::{set_worker_exe, Lane, SandboxError};

/// Time a program may run on one payload.
pub const TIME_LIMIT: Duration = Duration::from_millis(100);
/// Address space of a sandbox process: a program that allocates past it is
/// stopped (the process aborts and is replaced).
pub const MEMORY_LIMIT: u64 = 512 << 20;

/// What a program is for; it decides the variables the program sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `routes[].filter`, at ingest: `$source`, `$event`.
    Filter,
    /// `targets[].transform`, at each attempt: `$source`, `$event`, `$id`.
    Transform,
    /// `targets[].order_by` and `targets[].debounce.key`, at ingest:
    /// `$source`, `$event`.
    Key,
}

impl Kind {
    pub fn vars(self) -> &'static [&'static str] {
        match self {
            Kind::Filter | Kind::Key => &["$source", "$event"],
            Kind::Transform => &["$source", "$event", "$id"],
        }
    }

    fn code(self) -> u8 {
        match self {
            Kind::Filter => 0,
            Kind::Transform => 1,
            Kind::Key => 2,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        match code {
            0 => Some(Kind::Filter),
            1 => Some(Kind::Transform),
            2 => Some(Kind::Key),
            _ => None,
        }
    }
}

/// A jq program that compiles. It holds the text: the sandbox compiles it
/// again (once) in its own process, where it runs; and, when the program is
/// simple enough, its [`direct::Direct`] form, which the relay runs itself.
#[derive(Clone)]
pub struct Program {
    kind: Kind,
    text: Arc<str>,
    direct: Option<Arc<direct::Direct>>,
}

impl PartialEq for Program {
    fn eq(&self, other: &Self) -> bool {
        // The direct form follows from these two.
        self.kind == other.kind && self.text == other.text
    }
}

impl Eq for Program {}

impl Program {
    /// Compiles `text`; the error names what is wrong, with line and column.
    pub fn compile(kind: Kind, text: &str) -> Result<Program, String> {
        compile(kind, text)?;
        Ok(Program { kind, text: text.into(), direct: direct::Direct::compile(kind, text).map(Arc::new) })
    }

    /// Whether the relay answers this program itself (see [`direct`]) on
    /// payloads it has parsed, instead of the sandbox.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Program({:?}, {:?})", self.kind, self.text)
    }
}

/// The longest key (`order_by`, `debounce.key`) stored as it is.
pub const MAX_KEY: usize = 512;

/// A key as stores keep it: one no store can index (over [`MAX_KEY`]
/// bytes, or holding a NUL, which PostgreSQL's text refuses) stands as its
/// SHA-256, so that equal keys stay equal and one webhook's key cannot fail
/// the round that stores it.
pub fn storable_key(key: String) -> String {
    if key.len() > MAX_KEY || key.contains('\0') {
        use sha2::Digest;
        return format!("sha256:{:x}", sha2::Sha256::digest(key.as_bytes()));
    }
    key
}

/// What one run of a program gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The first output, as compact JSON.
    Value(Vec<u8>),
    /// No output at all (`empty`).
    Empty,
    Failed(Failure),
}

impl Output {
    /// A key from the first output: a string as it is, any other value as
    /// its JSON text; `None` for no output, `null` or a failure.
    pub fn key(&self) -> Option<String> {
        match self {
            Output::Value(json) if json.as_slice() == b"null" => None,
            Output::Value(json) => match serde_json::from_slice::<String>(json) {
                Ok(s) => Some(s),
                Err(_) => Some(String::from_utf8_lossy(json).into_owned()),
            },
            Output::Empty | Output::Failed(_) => None,
        }
    }

    /// jq's truthiness of the first output: anything but `false` and `null`;
    /// no output is false. `None` when the program failed.
    pub fn truthy(&self) -> Option<bool> {
        match self {
            Output::Value(json) => Some(!matches!(json.as_slice(), b"false" | b"null")),
            Output::Empty => Some(false),
            Output::Failed(_) => None,
        }
    }
}

/// Why a program gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// What went wrong. A runtime error's message can quote the payload
    /// (`cannot use "…" as number`): it is shown where the payload is (the
    /// admin API, `preview`, `check`), never logged; logs take [`FailureKind`].
    pub message: String,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure { kind, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The kind of a [`Failure`]: what a log line may say of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An error raised while running (`error`, a type error, ...).
    Runtime,
    /// The payload is not JSON.
    Input,
    /// The output has no JSON text (`nan`, `infinite`, a byte string).
    Output,
    /// Ran past [`TIME_LIMIT`].
    TimeLimit,
    /// The sandbox process died running it: past [`MEMORY_LIMIT`] or out of stack.
    Crashed,
    /// It did not run: the sandbox could not be started.
    Unavailable,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Runtime => "runtime error",
            FailureKind::Input => "payload is not JSON",
            FailureKind::Output => "output is not JSON",
            FailureKind::TimeLimit => "time limit",
            FailureKind::Crashed => "memory or stack limit",
            FailureKind::Unavailable => "sandbox unavailable",
        }
    }

    fn code(self) -> u8 {
        match self {
            FailureKind::Runtime => 0,
            FailureKind::Input => 1,
            FailureKind::Output => 2,
            FailureKind::TimeLimit => 3,
            FailureKind::Crashed => 4,
            FailureKind::Unavailable => 5,
        }
    }

    fn from_code(code: u8) -> FailureKind {
        match code {
            1 => FailureKind::Input,
            2 => FailureKind::Output,
            3 => FailureKind::TimeLimit,
            4 => FailureKind::Crashed,
            5 => FailureKind::Unavailable,
            _ => FailureKind::Runtime,
        }
    }
}

pub(crate) type Compiled = jaq_core::Filter<jaq_core::data::JustLut<Val>>;

/// The standard library, less what a program must not reach: `env` (the
/// process environment holds the secrets) and the logging filters
/// (`debug`, `stderr`: payloads never reach a log). `halt` stays: it ends
/// the program with an error, never the process (see [`eval`]).
fn functions() -> impl Iterator<Item = Fun<jaq_core::data::JustLut<Val>>> {
    const REPLACED: &[&str] = &["env", "debug_empty", "stderr_empty"];
    let std = jaq_core::funs().chain(jaq_std::funs()).chain(jaq_json::funs());
    std.filter(|(name, _, _)| !REPLACED.contains(name)).chain(replacements().into_vec().into_iter().map(run))
}

fn replacements<D: DataT>() -> Box<[NativeFilter<RunPtr<D>>]>
where
    for<'a> D::V<'a>: ValT,
{
    Box::new([
        ("env", v(0), |_| bome(Err(jaq_core::Error::str("env is not available to hookrelay programs")))),
        ("debug_empty", v(0), |_| Box::new(std::iter::empty())),
        ("stderr_empty", v(0), |_| Box::new(std::iter::empty())),
    ])
}

/// Compiles a program for `kind`'s variables.
pub(crate) fn compile(kind: Kind, text: &str) -> Result<Compiled, String> {
    if text.trim().is_empty() {
        return Err("the program is empty".into());
    }
    let defs = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
    let arena = Arena::default();
    let modules = Loader::new(defs).load(&arena, File { code: text, path: () }).map_err(|errs| {
        let mut messages = Vec::new();
        for (_, e) in errs {
            match e {
                jaq_core::load::Error::Io(list) => {
                    messages.extend(list.into_iter().map(|(at, m)| format!("{m} {}", place(text, at))))
                }
                jaq_core::load::Error::Lex(list) => messages.extend(
                    list.into_iter().map(|(expect, at)| format!("expected {} {}", expect.as_str(), place(text, at))),
                ),
                jaq_core::load::Error::Parse(list) => messages.extend(
                    list.into_iter().map(|(expect, at)| format!("expected {} {}", expect.as_str(), place(text, at))),
                ),
            }
        }
        messages.join("; ")
    })?;
    jaq_core::Compiler::default()
        .with_funs(functions())
        .with_global_vars(kind.vars().iter().copied())
        .compile(modules)
        .map_err(|errs| {
            let messages: Vec<String> = errs
                .into_iter()
                .flat_map(|(_, list)| list)
                .map(|(name, what)| format!("undefined {} {name} {}", what.as_str(), place(text, name)))
                .collect();
            messages.join("; ")
        })
}

/// "at line L, column C" of a piece of `code` (jaq reports a position as a
/// slice of the program text; the end of the text when it ran out).
fn place(code: &str, at: &str) -> String {
    let offset = (at.as_ptr() as usize).wrapping_sub(code.as_ptr() as usize);
    if offset > code.len() {
        return "in the program".into();
    }
    let before = &code[..code.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    if offset == code.len() {
        format!("at the end of the program (line {line}, column {column})")
    } else {
        format!("at line {line}, column {column}")
    }
}

/// Runs a compiled program on a JSON payload with its variables' values (in
/// [`Kind::vars`] order) and keeps the first output. Without a time or
/// memory bound: only the sandbox calls it on a webhook.
pub(crate) fn eval(program: &Compiled, input: &[u8], vars: &[&str]) -> Output {
    let input = match jaq_json::read::parse_single(input) {
        Ok(v) => v,
        Err(e) => return Output::Failed(Failure::new(FailureKind::Input, format!("the payload is not JSON: {e}"))),
    };
    let vars = Vars::new(vars.iter().map(|v| Val::from(v.to_string())));
    let ctx = Ctx::<jaq_core::data::JustLut<Val>>::new(&program.lut, vars);
    let first = program.id.run((ctx, input)).next();
    match first {
        None => Output::Empty,
        Some(Ok(value)) => to_json(&value),
        Some(Err(exn)) => Output::Failed(Failure::new(
            FailureKind::Runtime,
            match exn.get_err() {
                Ok(e) => error_text(&e),
                Err(other) => match other.get_halt() {
                    Ok(code) => format!("the program called halt (exit code {code})"),
                    Err(_) => "the program stopped abnormally".into(),
                },
            },
        )),
    }
}

/// The message of a runtime error, cut to a readable length: an error built
/// from the payload (`error(.)`) must not fill the logs or the store.
fn error_text(e: &jaq_core::Error<Val>) -> String {
    const MAX: usize = 300;
    let text = e.to_string();
    if text.len() <= MAX {
        return text;
    }
    format!("{}…", &text[..text.floor_char_boundary(MAX)])
}

/// The largest output a program may give: a body for one request, not a
/// way to make the relay send and hold hundreds of MiB per attempt.
pub const MAX_OUTPUT: usize = 16 << 20;

/// Compact JSON of a value; jaq can make values JSON has no text for
/// (`nan`, `infinite`, byte strings), which cannot be sent.
fn to_json(value: &Val) -> Output {
    let text = value.to_string();
    if text.len() > MAX_OUTPUT {
        let message =
            format!("the output is {} bytes, over the {} MiB a program may give", text.len(), MAX_OUTPUT >> 20);
        return Output::Failed(Failure::new(FailureKind::Output, message));
    }
    match serde_json::from_str::<serde::de::IgnoredAny>(&text) {
        Ok(_) => Output::Value(text.into_bytes()),
        Err(_) => {
            Output::Failed(Failure::new(FailureKind::Output, "the output is not JSON (nan, infinite or a byte string)"))
        }
    }
}

#[cfg(test)]
mod tests;
