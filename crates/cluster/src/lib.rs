//! A dvmm cluster: its description (the cluster file every node reads) and the control
//! messages nodes exchange besides DSM traffic (interrupts, forwarded device I/O,
//! APIC views, start and stop).

#![forbid(unsafe_code)]

pub mod config;
pub mod wire;

pub use config::{ClusterConfig, ConfigError, ConsoleSpec, DiskSpec, GuestSpec, NetSpec, NodeSpec};
pub use wire::{ControlMsg, IoSpace, WireError};
