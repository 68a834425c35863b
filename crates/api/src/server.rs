//! The API server: a Unix socket made 0600 before it listens, a thread that answers one
//! request per connection by asking the [`VmApi`] backend.

use crate::http::{self, BadRequest, Request};
use crate::model::{ErrorBody, Ping};
use crate::{Action, ApiError, ApiFailure, VmApi, ROUTES};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A listening API socket. Dropping it stops answering and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Creates a Unix stream socket at `path`, readable and writable by its owner only
/// from the moment anyone could connect (the mode is set before `listen`).
fn bind_private(path: &Path) -> Result<UnixListener, ApiError> {
    use std::os::unix::ffi::OsStrExt;
    // `symlink_metadata`: a dangling symlink exists too.
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ApiError::SocketExists(path.to_path_buf()));
    }
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(ApiError::PathTooLong(path.to_path_buf()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let create = |source| ApiError::Create {
        path: path.to_path_buf(),
        source,
    };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(create(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    // SAFETY: `addr` is a valid sockaddr_un of the size given; `fd` is open.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            return Err(ApiError::SocketExists(path.to_path_buf()));
        }
        return Err(create(e));
    }
    use std::os::unix::fs::PermissionsExt;
    let made = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    let listening = made.and_then(|()| {
        // SAFETY: `fd` is a bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    });
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(create(e));
    }
    Ok(UnixListener::from(fd))
}

/// A socket bound and listening, not yet answering (connections wait in its backlog):
/// made early so that a bad path fails before anything else starts. Dropped unserved,
/// it removes its socket file.
pub struct ApiListener {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ApiListener {
    /// Creates the socket at `path` (refused if the path exists).
    pub fn bind(path: &Path) -> Result<ApiListener, ApiError> {
        Ok(ApiListener {
            path: path.to_path_buf(),
            listener: Some(bind_private(path)?),
        })
    }

    /// Starts answering from `backend`.
    pub fn serve(mut self, backend: Arc<dyn VmApi>) -> Result<ApiServer, ApiError> {
        let Some(listener) = self.listener.take() else {
            return Err(ApiError::Thread(std::io::Error::other(
                "listener already served",
            )));
        };
        let path = std::mem::take(&mut self.path);
        let listener = Arc::new(listener);
        let l = listener.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                http::serve_each(l.incoming(), "API socket", |s| {
                    serve_connection(s, &*backend)
                })
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(ApiError::Thread(e));
            }
        };
        tracing::info!(path = %path.display(), "control API listening");
        Ok(ApiServer {
            path,
            listener,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ApiServer {
    /// Serves the API on a new socket at `path` (refused if the path exists), answering
    /// from `backend`.
    pub fn start(path: &Path, backend: Arc<dyn VmApi>) -> Result<ApiServer, ApiError> {
        ApiListener::bind(path)?.serve(backend)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: shutting down a listening socket we own wakes the accept thread
        // (Linux: accept returns EINVAL); the descriptor stays open until `listener` goes.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_connection(mut s: UnixStream, backend: &dyn VmApi) {
    let _ = s.set_read_timeout(Some(READ_TIMEOUT));
    let _ = s.set_write_timeout(Some(READ_TIMEOUT));
    let (status, body) = match http::read_request(&mut s) {
        Ok(req) => answer(&req, backend),
        Err(BadRequest::TooLarge) => (413, error_json(&BadRequest::TooLarge.to_string())),
        Err(e) => (400, error_json(&e.to_string())),
    };
    if let Err(e) = http::write_response(&mut s, status, &body) {
        tracing::debug!(error = %e, "API: the client left before the answer");
    }
}

fn error_json(message: &str) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody {
        error: message.to_string(),
    })
    .unwrap_or_default()
}

fn json<T: serde::Serialize>(status: u16, v: &T) -> (u16, Vec<u8>) {
    match serde_json::to_vec(v) {
        Ok(b) => (status, b),
        Err(e) => (500, error_json(&format!("cannot encode the answer: {e}"))),
    }
}

/// The status and body that answer `req`.
pub fn answer(req: &Request, backend: &dyn VmApi) -> (u16, Vec<u8>) {
    let on_path: Vec<_> = ROUTES.iter().filter(|(_, p, _)| *p == req.path).collect();
    if on_path.is_empty() {
        let known: Vec<&str> = ROUTES.iter().map(|(_, p, _)| *p).collect();
        return (
            404,
            error_json(&format!(
                "no such endpoint: {}; the API has {}",
                req.path,
                known.join(", ")
            )),
        );
    }
    let Some((_, _, action)) = on_path.iter().find(|(m, _, _)| m.as_str() == req.method) else {
        let allowed: Vec<&str> = on_path.iter().map(|(m, _, _)| m.as_str()).collect();
        return (
            405,
            error_json(&format!(
                "{} does not take {}; use {}",
                req.path,
                req.method,
                allowed.join(" or ")
            )),
        );
    };
    // No endpoint takes a body; an empty JSON object is accepted for clients that
    // always send one.
    let body = std::str::from_utf8(&req.body).map(str::trim);
    if !matches!(body, Ok("") | Ok("{}")) {
        return (
            400,
            error_json(&format!("{} takes no request body", req.path)),
        );
    }
    let done = |r: Result<(), ApiFailure>| match r {
        Ok(()) => (204, Vec::new()),
        Err(f) => (f.status, error_json(&f.message)),
    };
    match action {
        Action::Ping => json(
            200,
            &Ping {
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
        ),
        Action::Info => match backend.info() {
            Ok(i) => json(200, &i),
            Err(f) => (f.status, error_json(&f.message)),
        },
        Action::Counters => match backend.counters() {
            Ok(c) => json(200, &c),
            Err(f) => (f.status, error_json(&f.message)),
        },
        Action::Pause => done(backend.pause()),
        Action::Resume => done(backend.resume()),
        Action::Shutdown => done(backend.shutdown()),
    }
}
