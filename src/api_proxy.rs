//! The control API of a local cluster (`dvmm run --nodes K --api-socket PATH`): one
//! socket for the whole VM. The launcher answers it by asking the nodes' own sockets
//! (in its private directory): pause, resume and shutdown go to node 0, which carries
//! them to the others; counters are every node's.

use dvmm_api::client::ApiClient;
use dvmm_api::{ApiError, ApiFailure, Counters, VmApi, VmInfo};
use std::path::PathBuf;

/// The launcher's API backend.
pub struct ClusterApi {
    /// Node `i`'s API socket.
    pub nodes: Vec<PathBuf>,
}

fn failure(node: usize, e: ApiError) -> ApiFailure {
    match e {
        ApiError::Refused { status, message } => ApiFailure { status, message },
        other => ApiFailure {
            status: 503,
            message: format!("node {node} does not answer (still starting, or gone): {other}"),
        },
    }
}

impl ClusterApi {
    fn node(&self, i: usize) -> ApiClient {
        ApiClient::new(&self.nodes[i])
    }
}

impl VmApi for ClusterApi {
    fn info(&self) -> Result<VmInfo, ApiFailure> {
        let mut info = self.node(0).info().map_err(|e| failure(0, e))?;
        info.node = None;
        info.local_vcpus = (0..info.vcpus).collect();
        Ok(info)
    }

    fn pause(&self) -> Result<(), ApiFailure> {
        self.node(0).pause().map_err(|e| failure(0, e))
    }

    fn resume(&self) -> Result<(), ApiFailure> {
        self.node(0).resume().map_err(|e| failure(0, e))
    }

    fn shutdown(&self) -> Result<(), ApiFailure> {
        self.node(0).shutdown().map_err(|e| failure(0, e))
    }

    fn counters(&self) -> Result<Counters, ApiFailure> {
        let mut all = Counters::default();
        for i in 0..self.nodes.len() {
            let c = self.node(i).counters().map_err(|e| failure(i, e))?;
            all.nodes.extend(c.nodes);
        }
        Ok(all)
    }
}
