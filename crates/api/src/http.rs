//! Just enough HTTP/1.1 for the API: one request per connection, bodies sized by
//! `Content-Length`, the answer followed by `Connection: close`. Headers are parsed by
//! `httparse`; this module only frames them and bounds what it reads.

use std::io::{Read, Write};

/// The most a request's or response's head may take.
pub const MAX_HEAD: usize = 16 * 1024;
/// The most a body may take.
pub const MAX_BODY: usize = 1024 * 1024;

/// A request as read from the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without a query.
    pub path: String,
    /// The body (empty without one).
    pub body: Vec<u8>,
}

/// A request that cannot be read: answered with a 4xx.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    /// The connection failed or timed out before a whole request arrived.
    #[error("the request did not arrive whole: {0}")]
    Io(#[from] std::io::Error),
    /// Not HTTP/1.x.
    #[error("not an HTTP/1.1 request: {0}")]
    Parse(String),
    /// Head or body over the limits.
    #[error("request too large (head at most {MAX_HEAD} bytes, body at most {MAX_BODY})")]
    TooLarge,
}

/// Reads until the head is complete; returns the bytes read and the head's length.
fn read_head(stream: &mut impl Read) -> Result<(Vec<u8>, usize), BadRequest> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_head_end(&buf) {
            return Ok((buf, end));
        }
        if buf.len() > MAX_HEAD {
            return Err(BadRequest::TooLarge);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(BadRequest::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, BadRequest> {
    match headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        None => Ok(0),
        Some(h) => {
            let n: usize = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| BadRequest::Parse("Content-Length is not a number".into()))?;
            if n > MAX_BODY {
                return Err(BadRequest::TooLarge);
            }
            Ok(n)
        }
    }
}

fn read_body(stream: &mut impl Read, mut have: Vec<u8>, len: usize) -> Result<Vec<u8>, BadRequest> {
    if have.len() < len {
        let start = have.len();
        have.resize(len, 0);
        stream.read_exact(&mut have[start..])?;
    }
    have.truncate(len);
    Ok(have)
}

fn parsed(r: httparse::Result<usize>) -> Result<(), BadRequest> {
    match r {
        Ok(httparse::Status::Complete(_)) => Ok(()),
        Ok(httparse::Status::Partial) => Err(BadRequest::Parse("incomplete head".into())),
        Err(e) => Err(BadRequest::Parse(e.to_string())),
    }
}

/// Reads one request.
pub fn read_request(stream: &mut impl Read) -> Result<Request, BadRequest> {
    let (buf, head_len) = read_head(stream)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    parsed(req.parse(&buf[..head_len]))?;
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let len = content_length(req.headers)?;
    let body = read_body(stream, buf[head_len..].to_vec(), len)?;
    Ok(Request { method, path, body })
}

/// The reason phrase of the statuses the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a response; `body` is JSON (or empty with 204).
pub fn write_response(stream: &mut impl Write, status: u16, body: &[u8]) -> std::io::Result<()> {
    write_response_typed(stream, status, "application/json", body)
}

/// Writes a response whose body is of type `content_type`.
pub fn write_response_typed(
    stream: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status} {}\r\nServer: dvmm\r\n", reason(status));
    write_message(stream, head, content_type, body)
}

/// Writes `head` (the first line and fixed headers), the body's headers, the body.
fn write_message(
    stream: &mut impl Write,
    mut head: String,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// Writes a request.
pub fn write_request(
    stream: &mut impl Write,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    write_message(stream, head, "application/json", body)
}

/// A response as read by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// Reads one response.
pub fn read_response(stream: &mut impl Read) -> Result<Response, BadRequest> {
    let (buf, head_len) = read_head(stream)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    parsed(resp.parse(&buf[..head_len]))?;
    let status = resp.code.unwrap_or(0);
    let len = content_length(resp.headers)?;
    let body = read_body(stream, buf[head_len..].to_vec(), len)?;
    Ok(Response { status, body })
}

/// Answers each connection of `incoming` with `serve`, one at a time, until the listener
/// is shut down (Linux then fails `accept` with EINVAL). A failed accept is logged and
/// retried after a pause.
pub fn serve_each<S>(
    incoming: impl Iterator<Item = std::io::Result<S>>,
    what: &str,
    mut serve: impl FnMut(S),
) {
    for conn in incoming {
        match conn {
            Ok(s) => serve(s),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => {
                tracing::warn!(error = %e, "{what}: accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
