//! The guest's PCI bus 0: configuration spaces with their write masks, MSI-X, the host
//! bridge, configuration access through ECAM and through ports 0xCF8/0xCFC, and the
//! routing of memory accesses to the BARs wherever the guest placed them.
//!
//! Like `dvmm-devices`, nothing here knows about KVM or nodes: the VMM puts
//! [`bus::ConfigAddressPort`], [`bus::ConfigDataPort`], [`bus::EcamWindow`] and
//! [`bus::BarWindow`] on its port and MMIO buses, and implements [`msix::MsiSink`] with
//! its interrupt controllers. A function another node serves has a
//! [`remote::RemoteFunction`] stand-in on node 0's bus and a reserved number on the
//! serving node's ([`PciBus::reserve`]), so both agree on numbers and BAR addresses.

#![forbid(unsafe_code)]

pub mod bus;
pub mod config;
pub mod msix;
pub mod remote;

pub use bus::{PciBus, PciDevice, PciError, SharedPciDevice};
pub use config::{ConfigSpace, Identity};
pub use msix::{MsiSink, Msix};
pub use remote::{FunctionLink, RemoteFunction};
