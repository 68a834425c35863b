//! dvmm's control API: HTTP/1.1 over a Unix socket with JSON bodies, in the style of
//! Firecracker's and Cloud Hypervisor's (`/api/v1/vm.info`, `/api/v1/vm.pause`, ...);
//! and its metrics endpoint (Prometheus text format over HTTP, [`metrics`]).
//!
//! This crate owns the wire side only: the routes ([`ROUTES`]), the JSON documents
//! ([`model`]), a server that answers requests by asking a [`VmApi`] backend
//! ([`server::ApiServer`]) and a client ([`client::ApiClient`], used by `dvmm ctl`).
//! What a request *does* is the backend's: `dvmm-node` implements it for a node of a
//! cluster, the `dvmm` binary for a local cluster's launcher. `docs/api/openapi.json`
//! describes the same routes; a test checks the server against it.

pub mod client;
pub mod http;
pub mod metrics;
pub mod model;
pub mod server;

pub use model::{
    Counters, HotPage, NodeCounters, PeerCounters, Ping, VcpuCounters, VmInfo, VmState,
};

/// An HTTP method the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Read something.
    Get,
    /// Do something.
    Put,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// What a route asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `GET /api/v1/vmm.ping`: the API answers (and its version).
    Ping,
    /// `GET /api/v1/vm.info`: the VM's shape and state.
    Info,
    /// `PUT /api/v1/vm.pause`: stop every vCPU on every node.
    Pause,
    /// `PUT /api/v1/vm.resume`: let them run again.
    Resume,
    /// `PUT /api/v1/vm.shutdown`: end the VM (every node exits).
    Shutdown,
    /// `GET /api/v1/vm.counters`: the live counters.
    Counters,
}

/// Every route: method, path and what it asks for.
pub const ROUTES: &[(Method, &str, Action)] = &[
    (Method::Get, "/api/v1/vmm.ping", Action::Ping),
    (Method::Get, "/api/v1/vm.info", Action::Info),
    (Method::Put, "/api/v1/vm.pause", Action::Pause),
    (Method::Put, "/api/v1/vm.resume", Action::Resume),
    (Method::Put, "/api/v1/vm.shutdown", Action::Shutdown),
    (Method::Get, "/api/v1/vm.counters", Action::Counters),
];

/// The route of `action`.
pub fn route_of(action: Action) -> (Method, &'static str) {
    ROUTES
        .iter()
        .find(|(_, _, a)| *a == action)
        .map(|(m, p, _)| (*m, *p))
        .unwrap_or((Method::Get, "/"))
}

/// Why a backend could not do what was asked: an HTTP status and a message for the user.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiFailure {
    /// 4xx: the request cannot be done now or as asked; 5xx: the VMM failed.
    pub status: u16,
    /// What went wrong, for the user.
    pub message: String,
}

impl ApiFailure {
    /// A request that conflicts with the VM's state (e.g. pausing a paused VM): 409.
    pub fn conflict(message: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status: 409,
            message: message.into(),
        }
    }

    /// The VMM could not do it: 500.
    pub fn internal(message: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status: 500,
            message: message.into(),
        }
    }
}

/// What the API asks of a VM; implemented by whoever runs it.
pub trait VmApi: Send + Sync {
    /// The VM's shape and state.
    fn info(&self) -> Result<VmInfo, ApiFailure>;
    /// Stops every vCPU of the VM (on every node); returns once they are stopped.
    fn pause(&self) -> Result<(), ApiFailure>;
    /// Lets the vCPUs run again.
    fn resume(&self) -> Result<(), ApiFailure>;
    /// Ends the VM.
    fn shutdown(&self) -> Result<(), ApiFailure>;
    /// The live counters.
    fn counters(&self) -> Result<Counters, ApiFailure>;
}

/// Why the API socket could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path exists: dvmm never takes over (or deletes) a path it did not make.
    #[error("the API socket path {0} already exists: remove it, or choose another --api-socket")]
    SocketExists(std::path::PathBuf),
    /// The path does not fit a Unix socket address.
    #[error("the API socket path {0} is too long for a Unix socket (at most 107 bytes)")]
    PathTooLong(std::path::PathBuf),
    /// Creating the socket failed.
    #[error("cannot create the API socket {path}: {source}")]
    Create {
        /// The socket path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Connecting to a socket failed.
    #[error("cannot reach the dvmm API at {path}: {source} (is the VM running, and is this its --api-socket?)")]
    Connect {
        /// The socket path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The exchange failed after connecting.
    #[error("the dvmm API at {path} failed mid-request: {source}")]
    Exchange {
        /// The socket path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The answer was not HTTP or not the JSON expected.
    #[error("the dvmm API at {path} gave an answer that cannot be read: {why}")]
    BadResponse {
        /// The socket path.
        path: std::path::PathBuf,
        /// What was wrong with it.
        why: String,
    },
    /// The server refused the request.
    #[error("the VM refused: {message} (HTTP {status})")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The metrics address cannot be listened on.
    #[error("cannot serve metrics on {addr}: {source} (is the port in use? choose another --metrics-addr)")]
    MetricsBind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

#[cfg(test)]
mod tests;
