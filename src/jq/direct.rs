//! Programs the relay answers itself, on the parse of the payload it already
//! made for the payload's format, without a round trip to the sandbox.
//!
//! Most route filters and key programs are a few paths compared with
//! literals: `.data.page_type == "landing" and .data.locale == null`,
//! `.data.id`. Such a program cannot loop, recurse or allocate, so it needs
//! no time or memory limit; running it in the sandbox costs a pipe round
//! trip and a second parse of the payload into jaq's values, a fifth of the
//! relay's throughput at saturation.
//!
//! The subset is decided on jaq's own syntax tree: `.`, paths of literal
//! keys and non-negative indexes (`.a.b`, `."a b"`, `.["a"]`, `.[0]`),
//! integer and string literals, `true`, `false`, `null`, the program's
//! variables, `==`, `!=`, `<`, `<=`, `>`, `>=`, `and`, `or`, `//`, `not`,
//! `|` and parentheses. The answer is jaq's answer or none at all: wherever
//! jaq's result could differ or depend on more than this code knows (any
//! error, a float, an integer past 64 bits, two arrays or two objects
//! compared), [`Direct::filter`] and [`Direct::key`] give `None` and the
//! program runs in the sandbox as any other. `tests` checks this against jaq
//! on generated programs and payloads.

use std::cmp::Ordering;

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Term};
use jaq_core::ops::Cmp;
use jaq_core::path::Part;
use serde_json::Value;

use super::Kind;

/// Deepest program taken: a deeper one runs in the sandbox (no recursion
/// here goes deeper than this).
const MAX_DEPTH: usize = 32;

/// A program in the subset, ready to run on a parsed payload.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Direct(Expr);

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    /// `.`
    Input,
    Literal(Value),
    /// The program's variable at this position of [`Kind::vars`].
    Var(usize),
    Path(Box<Expr>, Vec<Step>),
    Cmp(Box<Expr>, Cmp, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    /// `l // r`
    Alt(Box<Expr>, Box<Expr>),
    /// `not`, of its input.
    Not,
    Pipe(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// jaq's result could differ from what this code would say: ask jaq.
struct Defer;

/// A value met while running: borrowed from the payload or the program, a
/// variable's text, or a truth value made by `and`, `or`, `not` or a comparison.
#[derive(Clone, Copy)]
enum Val<'a> {
    Json(&'a Value),
    Str(&'a str),
    Bool(bool),
}

static NULL: Value = Value::Null;

impl Direct {
    /// The program in the subset, or `None` when it is not (it then always
    /// runs in the sandbox). Transforms are never taken: they build values.
    pub(crate) fn compile(kind: Kind, text: &str) -> Option<Direct> {
        if kind == Kind::Transform {
            return None;
        }
        let term = jaq_core::load::parse(text, |p| p.term())?;
        expr(kind, &term, 0).map(Direct)
    }

    /// A filter's verdict (truthiness of its first and only output), or
    /// `None`: run it in the sandbox.
    pub(crate) fn filter(&self, input: &Value, vars: &[&str]) -> Option<bool> {
        eval(&self.0, Val::Json(input), vars).ok().map(truthy)
    }

    /// A key (as [`super::Output::key`] gives it: a string as it is, `true`
    /// or `false`, no key for `null`), or `None`: run it in the sandbox.
    pub(crate) fn key(&self, input: &Value, vars: &[&str]) -> Option<Option<String>> {
        match eval(&self.0, Val::Json(input), vars).ok()? {
            Val::Json(Value::Null) => Some(None),
            Val::Json(Value::String(s)) => Some(Some(s.clone())),
            Val::Str(s) => Some(Some(s.to_string())),
            Val::Json(Value::Bool(b)) => Some(Some(b.to_string())),
            Val::Bool(b) => Some(Some(b.to_string())),
            // jaq's text of a number or a container is its own: ask it.
            Val::Json(_) => None,
        }
    }
}

fn expr(kind: Kind, term: &Term<&str>, depth: usize) -> Option<Expr> {
    if depth > MAX_DEPTH {
        return None;
    }
    let sub = |t: &Term<&str>| expr(kind, t, depth + 1).map(Box::new);
    Some(match term {
        Term::Id => Expr::Input,
        Term::Num(n) => Expr::Literal(Value::from(n.parse::<i64>().ok()?)),
        Term::Neg(t) => match &**t {
            Term::Num(n) => Expr::Literal(Value::from(format!("-{n}").parse::<i64>().ok()?)),
            _ => return None,
        },
        Term::Str(None, parts) => Expr::Literal(Value::String(text(parts)?)),
        Term::Call(name, args) if args.is_empty() => match *name {
            "true" => Expr::Literal(Value::Bool(true)),
            "false" => Expr::Literal(Value::Bool(false)),
            "null" => Expr::Literal(Value::Null),
            "not" => Expr::Not,
            _ => return None,
        },
        Term::Var(name) => Expr::Var(kind.vars().iter().position(|v| v == name)?),
        Term::Path(base, path) => {
            let mut steps = Vec::new();
            for (part, _optional) in &path.0 {
                // An optional step (`.a?`) that fails gives no output; a step
                // that fails defers, so both behave as jaq's.
                let Part::Index(index) = part else { return None };
                steps.push(match index {
                    Term::Str(None, parts) => Step::Key(text(parts)?),
                    Term::Num(n) => Step::Index(n.parse::<usize>().ok()?),
                    _ => return None,
                });
            }
            Expr::Path(sub(base)?, steps)
        }
        Term::BinOp(l, op, r) => {
            let (l, r) = (sub(l)?, sub(r)?);
            match op {
                BinaryOp::Pipe(None) => Expr::Pipe(l, r),
                BinaryOp::And => Expr::And(l, r),
                BinaryOp::Or => Expr::Or(l, r),
                BinaryOp::Alt => Expr::Alt(l, r),
                BinaryOp::Cmp(op) => Expr::Cmp(l, *op, r),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// A string literal without interpolation or format.
fn text(parts: &[StrPart<&str, Term<&str>>]) -> Option<String> {
    let mut s = String::new();
    for part in parts {
        match part {
            StrPart::Str(t) => s.push_str(t),
            StrPart::Char(c) => s.push(*c),
            StrPart::Term(_) => return None,
        }
    }
    Some(s)
}

fn eval<'a>(e: &'a Expr, input: Val<'a>, vars: &[&'a str]) -> Result<Val<'a>, Defer> {
    Ok(match e {
        Expr::Input => input,
        Expr::Literal(v) => Val::Json(v),
        Expr::Var(n) => Val::Str(vars.get(*n).ok_or(Defer)?),
        Expr::Path(base, steps) => {
            let mut at = eval(base, input, vars)?;
            for step in steps {
                at = match (at, step) {
                    (Val::Json(Value::Object(map)), Step::Key(k)) => Val::Json(map.get(k).unwrap_or(&NULL)),
                    (Val::Json(Value::Array(list)), Step::Index(n)) => Val::Json(list.get(*n).unwrap_or(&NULL)),
                    (Val::Json(Value::Null), _) => Val::Json(&NULL),
                    _ => return Err(Defer),
                };
            }
            at
        }
        Expr::Cmp(l, op, r) => {
            let (l, r) = (eval(l, input, vars)?, eval(r, input, vars)?);
            let order = compare(l, r)?;
            Val::Bool(match op {
                Cmp::Eq => order == Ordering::Equal,
                Cmp::Ne => order != Ordering::Equal,
                Cmp::Lt => order == Ordering::Less,
                Cmp::Le => order != Ordering::Greater,
                Cmp::Gt => order == Ordering::Greater,
                Cmp::Ge => order != Ordering::Less,
            })
        }
        Expr::And(l, r) => Val::Bool(truthy(eval(l, input, vars)?) && truthy(eval(r, input, vars)?)),
        Expr::Or(l, r) => Val::Bool(truthy(eval(l, input, vars)?) || truthy(eval(r, input, vars)?)),
        Expr::Alt(l, r) => match eval(l, input, vars)? {
            v if truthy(v) => v,
            _ => eval(r, input, vars)?,
        },
        Expr::Not => Val::Bool(!truthy(input)),
        Expr::Pipe(l, r) => eval(r, eval(l, input, vars)?, vars)?,
    })
}

fn truthy(v: Val<'_>) -> bool {
    !matches!(v, Val::Json(Value::Null | Value::Bool(false)) | Val::Bool(false))
}

/// jq's order of values: null < booleans < numbers < strings < arrays <
/// objects; within a type, the values' own order.
fn compare(l: Val<'_>, r: Val<'_>) -> Result<Ordering, Defer> {
    let (rl, rr) = (rank(l), rank(r));
    if rl != rr {
        return Ok(rl.cmp(&rr));
    }
    Ok(match (l, r) {
        (Val::Json(Value::Null), Val::Json(Value::Null)) => Ordering::Equal,
        (Val::Json(Value::Number(a)), Val::Json(Value::Number(b))) => integer(a)?.cmp(&integer(b)?),
        _ => match (boolean(l), boolean(r), string(l), string(r)) {
            (Some(a), Some(b), _, _) => a.cmp(&b),
            (_, _, Some(a), Some(b)) => a.cmp(b),
            // Two arrays or two objects.
            _ => return Err(Defer),
        },
    })
}

fn rank(v: Val<'_>) -> u8 {
    match v {
        Val::Json(Value::Null) => 0,
        Val::Json(Value::Bool(_)) | Val::Bool(_) => 1,
        Val::Json(Value::Number(_)) => 2,
        Val::Json(Value::String(_)) | Val::Str(_) => 3,
        Val::Json(Value::Array(_)) => 4,
        Val::Json(Value::Object(_)) => 5,
    }
}

/// A number written as an integer: compared exactly, as jaq does. A float
/// defers (its parse and comparison are jaq's own to decide).
fn integer(n: &serde_json::Number) -> Result<i128, Defer> {
    n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from)).ok_or(Defer)
}

fn boolean(v: Val<'_>) -> Option<bool> {
    match v {
        Val::Json(Value::Bool(b)) => Some(*b),
        Val::Bool(b) => Some(b),
        _ => None,
    }
}

fn string(v: Val<'_>) -> Option<&str> {
    match v {
        Val::Json(Value::String(s)) => Some(s),
        Val::Str(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
#[path = "direct_tests.rs"]
mod tests;
