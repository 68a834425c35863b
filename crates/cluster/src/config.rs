//! The cluster file (TOML).
//!
//! ```toml
//! secret = "a long random string shared by all nodes"
//! insecure_transport = false     # optional: authenticate only, do not encrypt
//! rng = false                    # optional: a virtio-rng device
//! test_devices = false           # optional: fw_cfg, isa-debug-exit, pc-testdev (test suites)
//!
//! [guest]
//! kernel = "/path/to/bzImage"
//! initramfs = "/path/to/initramfs.cpio"   # optional
//! cmdline = "console=ttyS0"               # optional
//!
//! [[disk]]                # optional, repeatable: a virtio-blk device
//! path = "/path/to/disk.img"
//! readonly = false        # optional
//! node = 0                # optional: the node that serves it (0 for now)
//!
//! [[net]]                 # optional, repeatable: a virtio-net device on a host TAP
//! tap = "tap0"
//! mac = "52:54:00:12:34:56"  # optional (default: 52:54:00:d7:00:<index>)
//!
//! [console]               # optional: a virtio-console (the guest's /dev/hvc0)
//! socket = "/run/dvmm/hvc0.sock"   # or: file = "/var/log/dvmm/hvc0.log"
//!
//! [[node]]                # node 0: runs the boot vCPU and the devices
//! address = "10.0.0.1:7700"
//! vcpus = 2
//! memory = "1G"
//!
//! [[node]]
//! address = "10.0.0.2:7700"
//! vcpus = 2
//! memory = "1G"
//! ```
//!
//! vCPUs are numbered (= APIC ids) in node order, RAM is laid out in node order: node 0
//! is home of the first `memory` bytes of guest RAM, and so on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dvmm_layout::cpu_features::CpuFeatures;
use serde::Deserialize;

/// Errors reading a cluster file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read cluster file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or misses fields.
    #[error("cluster file {path} is invalid: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The values make no cluster.
    #[error("cluster file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// Kernel image (bzImage or PVH ELF); every node needs the same file.
    pub kernel: PathBuf,
    /// Optional initramfs; every node needs the same file.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
}

fn default_cmdline() -> String {
    "console=ttyS0".into()
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Where it listens for its peers.
    pub address: SocketAddr,
    /// How many vCPUs it runs.
    pub vcpus: u32,
    /// How many bytes of guest RAM it is home of.
    pub memory: u64,
    /// CPU features this node's host must not show the guest (`hide_cpuid = ["avx2"]`);
    /// since every vCPU shows what all nodes offer, no vCPU shows them.
    pub hide_cpuid: CpuFeatures,
}

/// The `key=value` pairs of a comma-separated device option; `example` shows the form.
fn key_values<'a>(s: &'a str, example: &str) -> Result<Vec<(&'a str, &'a str)>, String> {
    s.split(',')
        .map(|part| {
            part.split_once('=')
                .ok_or_else(|| format!("'{part}' is not key=value (e.g. {example})"))
        })
        .collect()
}

/// A `node=` value.
fn node_number(value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("node={value} is not a node number"))
}

/// A disk image the guest gets as a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Raw image file (or host block device), on the node that serves it.
    pub path: PathBuf,
    /// The guest may not write it.
    #[serde(default)]
    pub readonly: bool,
    /// The node that serves it.
    #[serde(default)]
    pub node: usize,
}

impl DiskSpec {
    /// Parses the command line's `path=FILE[,readonly=on|off][,node=N]`.
    pub fn parse_option(s: &str) -> Result<DiskSpec, String> {
        let mut path = None;
        let mut readonly = false;
        let mut node = 0;
        for (key, value) in key_values(s, "path=disk.img,readonly=on")? {
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "path" => return Err("path= is empty".into()),
                "readonly" => {
                    readonly = match value {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(format!("readonly={value}: use on or off")),
                    }
                }
                "node" => node = node_number(value)?,
                _ => {
                    return Err(format!(
                        "unknown disk option '{key}' (known: path, readonly, node)"
                    ))
                }
            }
        }
        let path = path.ok_or("no path= given (e.g. --disk path=disk.img)")?;
        Ok(DiskSpec {
            path,
            readonly,
            node,
        })
    }
}

/// A guest network card: a virtio-net device on a host TAP device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The host TAP device (it must exist).
    pub tap: String,
    /// The card's MAC address, if one was given (see [`NetSpec::mac_for`]).
    pub mac: Option<[u8; 6]>,
    /// The node that serves it.
    pub node: usize,
}

/// The MAC address card `index` gets when none is given: locally administered, in
/// the range QEMU-style tools use.
pub fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0xd7,
        0x00,
        u8::try_from(index % 256).unwrap_or(0),
    ]
}

/// Parses a MAC address written `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac={s}: write a MAC address as six hex pairs, e.g. 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={s} is a multicast address; a card needs a unicast one"
        ));
    }
    Ok(mac)
}

impl NetSpec {
    /// Parses the command line's `tap=NAME[,mac=MAC][,node=N]`.
    pub fn parse_option(s: &str) -> Result<NetSpec, String> {
        let mut tap = None;
        let mut mac = None;
        let mut node = 0;
        for (key, value) in key_values(s, "tap=tap0")? {
            match key {
                "tap" if !value.is_empty() => tap = Some(value.to_string()),
                "tap" => return Err("tap= is empty".into()),
                "mac" => mac = Some(parse_mac(value)?),
                "node" => node = node_number(value)?,
                _ => {
                    return Err(format!(
                        "unknown net option '{key}' (known: tap, mac, node)"
                    ))
                }
            }
        }
        Ok(NetSpec {
            tap: tap.ok_or("no tap= given (e.g. --net tap=tap0)")?,
            mac,
            node,
        })
    }

    /// The MAC address of card `index`: the one given, else [`default_mac`].
    pub fn mac_for(&self, index: usize) -> [u8; 6] {
        self.mac.unwrap_or(default_mac(index))
    }
}

/// A MAC address written `52:54:00:12:34:56`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Where the guest's virtio-console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// Output appended to a file.
    File(PathBuf),
    /// A Unix socket (created; it must not exist) for one client at a time.
    Socket(PathBuf),
}

impl ConsoleSpec {
    /// Parses the command line's `off`, `file=PATH` or `socket=PATH`.
    pub fn parse_option(s: &str) -> Result<Option<ConsoleSpec>, String> {
        match s.split_once('=') {
            None if s == "off" => Ok(None),
            Some(("file", p)) if !p.is_empty() => Ok(Some(ConsoleSpec::File(p.into()))),
            Some(("socket", p)) if !p.is_empty() => Ok(Some(ConsoleSpec::Socket(p.into()))),
            _ => Err(format!(
                "'{s}': use off, file=PATH (the guest's output appended to PATH) or \
                 socket=PATH (a Unix socket to connect to)"
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNet {
    tap: String,
    mac: Option<String>,
    #[serde(default)]
    node: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    file: Option<PathBuf>,
    socket: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    address: String,
    vcpus: u32,
    memory: String,
    #[serde(default)]
    hide_cpuid: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    secret: String,
    #[serde(default)]
    insecure_transport: bool,
    guest: GuestSpec,
    #[serde(default)]
    disk: Vec<DiskSpec>,
    #[serde(default)]
    net: Vec<RawNet>,
    #[serde(default)]
    rng: bool,
    #[serde(default)]
    test_devices: bool,
    console: Option<RawConsole>,
    node: Vec<RawNode>,
}

/// A whole cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Shared secret that authenticates (and keys) all node-to-node traffic.
    pub secret: String,
    /// Authenticate but do not encrypt node traffic.
    pub insecure_transport: bool,
    /// The guest.
    pub guest: GuestSpec,
    /// Disk images, in the order the guest sees them.
    pub disks: Vec<DiskSpec>,
    /// Network cards, in the order the guest sees them.
    pub nets: Vec<NetSpec>,
    /// A virtio-rng device.
    pub rng: bool,
    /// QEMU's test devices (fw_cfg, isa-debug-exit, pc-testdev) for test suites.
    pub test_devices: bool,
    /// A virtio-console.
    pub console: Option<ConsoleSpec>,
    /// The nodes, in id order.
    pub nodes: Vec<NodeSpec>,
}

/// Parses sizes like `4096`, `256M`, `1G`, `512MiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; use e.g. 256M or 2G"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("'{s}' has an unknown unit; use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

impl ClusterConfig {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ClusterConfig::parse(&text, path)
    }

    /// Parses and checks the text of a cluster file (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<ClusterConfig, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawCluster = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if raw.secret.len() < 16 {
            return Err(invalid(
                "the secret must be at least 16 characters (use a long random string)".into(),
            ));
        }
        if raw.node.is_empty() {
            return Err(invalid("no [[node]] entries".into()));
        }
        let mut nodes = Vec::with_capacity(raw.node.len());
        for (i, n) in raw.node.iter().enumerate() {
            let address: SocketAddr = n.address.parse().map_err(|_| {
                invalid(format!(
                    "node {i}: address '{}' is not IP:port (e.g. 10.0.0.1:7700)",
                    n.address
                ))
            })?;
            if address.port() == 0 {
                // Port 0 would make the node listen on a random port no peer knows.
                return Err(invalid(format!(
                    "node {i}: address {address} has port 0; give the port the node listens on"
                )));
            }
            if n.vcpus == 0 {
                return Err(invalid(format!("node {i}: vcpus must be at least 1")));
            }
            let memory = parse_size(&n.memory).map_err(|e| invalid(format!("node {i}: {e}")))?;
            if memory == 0 || !memory.is_multiple_of(2 << 20) {
                return Err(invalid(format!(
                    "node {i}: memory must be a non-zero multiple of 2 MiB"
                )));
            }
            if nodes.iter().any(|p: &NodeSpec| p.address == address) {
                return Err(invalid(format!(
                    "node {i}: address {address} is used twice"
                )));
            }
            let hide_cpuid = CpuFeatures::from_names(&n.hide_cpuid)
                .map_err(|e| invalid(format!("node {i}: hide_cpuid: {e}")))?;
            nodes.push(NodeSpec {
                address,
                vcpus: n.vcpus,
                memory,
                hide_cpuid,
            });
        }
        let total: u32 = nodes.iter().map(|n| n.vcpus).sum();
        if total > dvmm_layout::MAX_VCPUS {
            return Err(invalid(format!(
                "{total} vCPUs in all; at most {} are supported",
                dvmm_layout::MAX_VCPUS
            )));
        }
        for (i, d) in raw.disk.iter().enumerate() {
            if d.node >= nodes.len() {
                return Err(invalid(format!(
                    "disk {i} ({}): node {} does not exist ({} nodes)",
                    d.path.display(),
                    d.node,
                    nodes.len()
                )));
            }
        }
        let mut nets = Vec::with_capacity(raw.net.len());
        for (i, n) in raw.net.iter().enumerate() {
            let mac = match &n.mac {
                Some(m) => Some(parse_mac(m).map_err(|e| invalid(format!("net {i}: {e}")))?),
                None => None,
            };
            if n.node >= nodes.len() {
                return Err(invalid(format!(
                    "net {i} ({}): node {} does not exist ({} nodes)",
                    n.tap,
                    n.node,
                    nodes.len()
                )));
            }
            nets.push(NetSpec {
                tap: n.tap.clone(),
                mac,
                node: n.node,
            });
        }
        let console = match raw.console {
            None => None,
            Some(RawConsole {
                file: Some(f),
                socket: None,
            }) => Some(ConsoleSpec::File(f)),
            Some(RawConsole {
                file: None,
                socket: Some(s),
            }) => Some(ConsoleSpec::Socket(s)),
            Some(_) => {
                return Err(invalid(
                    "[console] takes one of file = \"PATH\" or socket = \"PATH\"".into(),
                ))
            }
        };
        Ok(ClusterConfig {
            secret: raw.secret,
            insecure_transport: raw.insecure_transport,
            guest: raw.guest,
            disks: raw.disk,
            nets,
            rng: raw.rng,
            test_devices: raw.test_devices,
            console,
            nodes,
        })
    }

    /// Total vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.nodes.iter().map(|n| n.vcpus).sum()
    }

    /// Total guest RAM.
    pub fn memory(&self) -> u64 {
        self.nodes.iter().map(|n| n.memory).sum()
    }

    /// First vCPU (APIC id) of node `id`.
    pub fn first_vcpu(&self, id: usize) -> u32 {
        self.nodes.iter().take(id).map(|n| n.vcpus).sum()
    }

    /// Renders the configuration as a cluster file.
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "secret = {:?}\ninsecure_transport = {}\nrng = {}\ntest_devices = {}\n\n[guest]\nkernel = {:?}\n",
            self.secret, self.insecure_transport, self.rng, self.test_devices, self.guest.kernel
        );
        if let Some(i) = &self.guest.initramfs {
            s.push_str(&format!("initramfs = {i:?}\n"));
        }
        s.push_str(&format!("cmdline = {:?}\n", self.guest.cmdline));
        for d in &self.disks {
            s.push_str(&format!(
                "\n[[disk]]\npath = {:?}\nreadonly = {}\nnode = {}\n",
                d.path, d.readonly, d.node
            ));
        }
        for n in &self.nets {
            s.push_str(&format!(
                "\n[[net]]\ntap = {:?}\nnode = {}\n",
                n.tap, n.node
            ));
            if let Some(m) = &n.mac {
                s.push_str(&format!("mac = \"{}\"\n", mac_string(m)));
            }
        }
        match &self.console {
            Some(ConsoleSpec::File(p)) => s.push_str(&format!("\n[console]\nfile = {p:?}\n")),
            Some(ConsoleSpec::Socket(p)) => s.push_str(&format!("\n[console]\nsocket = {p:?}\n")),
            None => {}
        }
        for n in &self.nodes {
            s.push_str(&format!(
                "\n[[node]]\naddress = \"{}\"\nvcpus = {}\nmemory = \"{}\"\n",
                n.address, n.vcpus, n.memory
            ));
            if !n.hide_cpuid.is_empty() {
                s.push_str(&format!("hide_cpuid = {:?}\n", n.hide_cpuid.names()));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
secret = "0123456789abcdef0123"
[guest]
kernel = "/boot/vmlinuz"
[[node]]
address = "127.0.0.1:7000"
vcpus = 2
memory = "128M"
[[node]]
address = "127.0.0.1:7001"
vcpus = 1
memory = "64M"
"#;

    fn parse(s: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn parses_a_cluster() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.vcpus(), 3);
        assert_eq!(c.memory(), 192 << 20);
        assert_eq!(c.first_vcpu(1), 2);
        assert_eq!(c.guest.cmdline, "console=ttyS0");
        assert!(!c.insecure_transport);
    }

    #[test]
    fn round_trips_through_toml() {
        let c = parse(GOOD).unwrap();
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        let with_disks = GOOD.replacen(
            "[[node]]",
            "[[disk]]\npath = \"/a.img\"\n[[disk]]\npath = \"/b.img\"\nreadonly = true\n[[node]]",
            1,
        );
        let c = parse(&with_disks).unwrap();
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[1].readonly && !c.disks[0].readonly);
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn a_node_hides_cpu_features_by_name() {
        let text = GOOD.replacen(
            "memory = \"64M\"",
            "memory = \"64M\"\nhide_cpuid = [\"avx2\", \"ssse3\"]",
            1,
        );
        let c = parse(&text).unwrap();
        assert!(c.nodes[0].hide_cpuid.is_empty());
        assert_eq!(c.nodes[1].hide_cpuid.names(), ["ssse3", "avx2"]);
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        let e = parse(&text.replace("ssse3", "sse9"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node 1: hide_cpuid: 'sse9' is not a CPU feature"),
            "{e}"
        );
    }

    #[test]
    fn nets_rng_and_console_round_trip() {
        let text = GOOD.replacen("[guest]", "rng = true\n[guest]", 1).replacen(
            "[[node]]",
            "[[net]]\ntap = \"tap0\"\n[[net]]\ntap = \"tap1\"\nmac = \"02:00:00:00:00:aa\"\n\
                 [console]\nsocket = \"/run/c.sock\"\n[[node]]",
            1,
        );
        let c = parse(&text).unwrap();
        assert!(c.rng);
        assert_eq!(c.nets[0].mac_for(0), default_mac(0));
        assert_eq!(c.nets[1].mac_for(1), [2, 0, 0, 0, 0, 0xaa]);
        assert_eq!(c.console, Some(ConsoleSpec::Socket("/run/c.sock".into())));
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        for (bad, says) in [
            ("[console]\nfile = \"/a\"\nsocket = \"/b\"\n", "one of"),
            (
                "[[net]]\ntap = \"t\"\nmac = \"01:00:00:00:00:01\"\n",
                "multicast",
            ),
            ("[[net]]\ntap = \"t\"\nnode = 9\n", "does not exist"),
        ] {
            let e = parse(&GOOD.replacen("[[node]]", &format!("{bad}[[node]]"), 1)).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        // Any node may serve a card or a disk.
        let placed = "[[net]]\ntap = \"t\"\nnode = 1\n[[disk]]\npath = \"/d\"\nnode = 1\n";
        let c = parse(&GOOD.replacen("[[node]]", &format!("{placed}[[node]]"), 1)).unwrap();
        assert_eq!((c.nets[0].node, c.disks[0].node), (1, 1));
    }

    #[test]
    fn net_and_console_options_parse_and_bad_ones_say_why() {
        let n = NetSpec::parse_option("tap=tap0,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(
            (n.tap.as_str(), n.mac_for(3), n.node),
            ("tap0", [0x52, 0x54, 0, 0, 0, 1], 0)
        );
        assert_eq!(
            NetSpec::parse_option("tap=t").unwrap().mac_for(3),
            default_mac(3)
        );
        assert_eq!(mac_string(&default_mac(3)), "52:54:00:d7:00:03");
        for (bad, says) in [
            ("tap0", "not key=value"),
            ("mac=52:54:00:00:00:01", "no tap="),
            ("tap=t,mac=52:54", "six hex pairs"),
            ("tap=t,queues=2", "unknown net option"),
        ] {
            let e = NetSpec::parse_option(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(ConsoleSpec::parse_option("off"), Ok(None));
        assert_eq!(
            ConsoleSpec::parse_option("file=/x"),
            Ok(Some(ConsoleSpec::File("/x".into())))
        );
        assert!(ConsoleSpec::parse_option("pty").is_err());
        assert!(ConsoleSpec::parse_option("socket=").is_err());
    }

    #[test]
    fn disk_options_parse_and_bad_ones_say_why() {
        let d = DiskSpec::parse_option("path=/x/disk.img,readonly=on").unwrap();
        assert_eq!(
            d,
            DiskSpec {
                path: "/x/disk.img".into(),
                readonly: true,
                node: 0
            }
        );
        assert_eq!(DiskSpec::parse_option("path=d,node=1").unwrap().node, 1);
        for (bad, needle) in [
            ("disk.img", "not key=value"),
            ("path=", "empty"),
            ("readonly=on", "no path"),
            ("path=d,readonly=maybe", "on or off"),
            ("path=d,node=x", "not a node number"),
            ("path=d,cache=none", "unknown disk option"),
        ] {
            let e = DiskSpec::parse_option(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: '{e}' should mention '{needle}'");
        }
    }

    #[test]
    fn rejects_bad_files() {
        let cases = [
            (GOOD.replace("0123456789abcdef0123", "short"), "at least 16"),
            (
                GOOD.replace("127.0.0.1:7001", "127.0.0.1:7000"),
                "used twice",
            ),
            (GOOD.replace("vcpus = 1", "vcpus = 0"), "at least 1"),
            (GOOD.replace("64M", "3M"), "multiple of 2 MiB"),
            (GOOD.replace("64M", "lots"), "not a size"),
            (GOOD.replace("127.0.0.1:7001", "nowhere"), "not IP:port"),
            (GOOD.replace("127.0.0.1:7001", "127.0.0.1:0"), "port 0"),
            (GOOD.replace("[guest]", "[gust]"), "invalid"),
            (
                GOOD.replace("[[node]]", "[[disk]]\npath = \"/d\"\nnode = 5\n[[node]]"),
                "node 5 does not exist",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "'{e}' should mention '{needle}'");
        }
    }
}
