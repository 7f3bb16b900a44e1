//! The bytes on the pipes between the relay and a sandbox process: each
//! message is a big-endian `u32` length and that many bytes. The child first
//! writes [`HELLO`], so that the relay knows it started the right program.

use std::io::{self, Read};

use super::{Failure, FailureKind, Kind, Output};

/// The child's first line.
pub const HELLO: &[u8; 16] = b"hookrelay-jq/1.0";
/// A request or answer larger than this is refused (a payload is at most
/// `server.max_body`; an output this large is not a webhook body).
pub const MAX_FRAME: usize = 64 << 20;

/// One program run, as the child receives it, borrowed from its frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub kind: Kind,
    pub program: &'a str,
    pub vars: Vec<&'a str>,
    pub input: &'a [u8],
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A request frame up to its input, which follows it (`input_len` bytes):
/// the input is written after it without being copied first.
pub fn encode_request_head(kind: Kind, program: &str, vars: &[&str], input_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + program.len() + vars.iter().map(|v| v.len() + 4).sum::<usize>());
    out.extend_from_slice(&[0; 4]);
    out.push(kind.code());
    put(&mut out, program.as_bytes());
    out.push(vars.len() as u8);
    for v in vars {
        put(&mut out, v.as_bytes());
    }
    let len = (out.len() - 4 + input_len) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Appends a whole request frame to `out`.
#[cfg(test)]
pub fn encode_request(out: &mut Vec<u8>, kind: Kind, program: &str, vars: &[&str], input: &[u8]) {
    out.extend_from_slice(&encode_request_head(kind, program, vars, input.len()));
    out.extend_from_slice(input);
}

/// Appends an answer frame to `out`.
pub fn encode_output(out: &mut Vec<u8>, output: &Output) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match output {
        Output::Value(json) => {
            out.push(0);
            out.extend_from_slice(json);
        }
        Output::Empty => out.push(1),
        Output::Failed(f) => {
            out.push(2);
            out.push(f.kind.code());
            out.extend_from_slice(f.message.as_bytes());
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Reads one frame's body into `body` (its buffer reused); false at a
/// clean end of input.
pub fn read_frame(r: &mut impl Read, body: &mut Vec<u8>) -> io::Result<bool> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    body.clear();
    body.resize(frame_len(len)?, 0);
    r.read_exact(body)?;
    Ok(true)
}

/// A frame's length, refused past [`MAX_FRAME`].
pub fn frame_len(len: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes is too large")));
    }
    Ok(len)
}

/// Splits `n` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
    if rest.len() < n {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a frame ends early"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_str<'a>(rest: &mut &'a [u8]) -> io::Result<&'a str> {
    let len = take(rest, 4)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let bytes = take(rest, len)?;
    std::str::from_utf8(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "text is not UTF-8"))
}

pub fn decode_request(body: &[u8]) -> io::Result<Request<'_>> {
    let mut rest = body;
    let kind = Kind::from_code(take(&mut rest, 1)?[0])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown program kind"))?;
    let program = take_str(&mut rest)?;
    let count = take(&mut rest, 1)?[0];
    let vars = (0..count).map(|_| take_str(&mut rest)).collect::<io::Result<Vec<_>>>()?;
    Ok(Request { kind, program, vars, input: rest })
}

pub fn decode_output(body: &[u8]) -> io::Result<Output> {
    let mut rest = body;
    Ok(match take(&mut rest, 1)?[0] {
        0 => Output::Value(rest.to_vec()),
        1 => Output::Empty,
        2 => {
            let kind = FailureKind::from_code(take(&mut rest, 1)?[0]);
            Output::Failed(Failure::new(kind, String::from_utf8_lossy(rest).into_owned()))
        }
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "unknown answer")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_read_back_as_written() {
        let mut buf = Vec::new();
        encode_request(&mut buf, Kind::Transform, ".a", &["src", "page.published", "evt_1"], b"{\"a\":1}");
        let mut body = Vec::new();
        assert!(read_frame(&mut buf.as_slice(), &mut body).unwrap());
        let req = decode_request(&body).unwrap();
        assert_eq!(
            req,
            Request {
                kind: Kind::Transform,
                program: ".a",
                vars: vec!["src", "page.published", "evt_1"],
                input: b"{\"a\":1}",
            }
        );
        for output in [
            Output::Value(b"[1,2]".to_vec()),
            Output::Empty,
            Output::Failed(Failure::new(FailureKind::TimeLimit, "too slow")),
        ] {
            let mut buf = Vec::new();
            encode_output(&mut buf, &output);
            let mut body = Vec::new();
            assert!(read_frame(&mut buf.as_slice(), &mut body).unwrap());
            assert_eq!(decode_output(&body).unwrap(), output);
        }
    }

    #[test]
    fn truncated_and_oversized_frames_are_errors() {
        let mut buf = Vec::new();
        encode_request(&mut buf, Kind::Filter, ".", &["a"], b"{}");
        assert!(decode_request(&buf[4..8]).is_err());
        let mut body = Vec::new();
        assert!(read_frame(&mut &buf[..buf.len() - 1], &mut body).is_err());
        assert!(read_frame(&mut &[0xff, 0xff, 0xff, 0xff][..], &mut body).is_err());
        assert!(!read_frame(&mut &[][..], &mut body).unwrap());
    }
}
