//! A client of the API (`dvmm ctl`, the local cluster's launcher, tests).

use crate::http;
use crate::model::{Counters, ErrorBody, Ping, VmInfo};
use crate::{route_of, Action, ApiError};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one request may take (a pause waits for every node).
const TIMEOUT: Duration = Duration::from_secs(15);

/// Talks to one API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    path: PathBuf,
}

impl ApiClient {
    /// A client of the socket at `path` (nothing is connected yet).
    pub fn new(path: &Path) -> ApiClient {
        ApiClient {
            path: path.to_path_buf(),
        }
    }

    /// Sends one request; returns the status and body whatever the status.
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> Result<http::Response, ApiError> {
        let mut s = UnixStream::connect(&self.path).map_err(|source| ApiError::Connect {
            path: self.path.clone(),
            source,
        })?;
        let exchange = |source| ApiError::Exchange {
            path: self.path.clone(),
            source,
        };
        s.set_read_timeout(Some(TIMEOUT)).map_err(exchange)?;
        s.set_write_timeout(Some(TIMEOUT)).map_err(exchange)?;
        http::write_request(&mut s, method, path, body).map_err(exchange)?;
        http::read_response(&mut s).map_err(|e| match e {
            http::BadRequest::Io(source) => ApiError::Exchange {
                path: self.path.clone(),
                source,
            },
            other => ApiError::BadResponse {
                path: self.path.clone(),
                why: other.to_string(),
            },
        })
    }

    /// Performs `action`; a 4xx/5xx becomes [`ApiError::Refused`] with the server's
    /// message. Returns the body of a 200 (empty for 204).
    pub fn call(&self, action: Action) -> Result<Vec<u8>, ApiError> {
        let (method, path) = route_of(action);
        let r = self.raw(method.as_str(), path, b"")?;
        match r.status {
            200 | 204 => Ok(r.body),
            status => {
                let message = serde_json::from_slice::<ErrorBody>(&r.body)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&r.body).into_owned());
                Err(ApiError::Refused { status, message })
            }
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, body: &[u8]) -> Result<T, ApiError> {
        serde_json::from_slice(body).map_err(|e| ApiError::BadResponse {
            path: self.path.clone(),
            why: e.to_string(),
        })
    }

    /// `vmm.ping`.
    pub fn ping(&self) -> Result<Ping, ApiError> {
        let b = self.call(Action::Ping)?;
        self.decode(&b)
    }

    /// `vm.info`.
    pub fn info(&self) -> Result<VmInfo, ApiError> {
        let b = self.call(Action::Info)?;
        self.decode(&b)
    }

    /// `vm.counters`.
    pub fn counters(&self) -> Result<Counters, ApiError> {
        let b = self.call(Action::Counters)?;
        self.decode(&b)
    }

    /// `vm.pause`.
    pub fn pause(&self) -> Result<(), ApiError> {
        self.call(Action::Pause).map(drop)
    }

    /// `vm.resume`.
    pub fn resume(&self) -> Result<(), ApiError> {
        self.call(Action::Resume).map(drop)
    }

    /// `vm.shutdown`.
    pub fn shutdown(&self) -> Result<(), ApiError> {
        self.call(Action::Shutdown).map(drop)
    }
}
