//! virtio-net (virtio 1.x, 5.1) on a host TAP device: queue 0 receives, queue 1
//! transmits; the MAC address is offered (`VIRTIO_NET_F_MAC`), and the checksum and
//! TCP segmentation offloads both ways.
//!
//! The TAP is opened with `IFF_VNET_HDR` and a 12-byte header, the size of virtio 1's
//! `virtio_net_hdr_v1`, so frames pass between the queues and the TAP with their header
//! as they are: the header's checksum and segmentation fields mean the same to the
//! host's TUN driver as to the guest's virtio driver. What the TAP may hand over
//! follows what the driver accepted (`TUNSETOFFLOAD` at DRIVER_OK): a driver that took
//! no offloads gets whole frames with their checksums done, one that took
//! `GUEST_TSO4` gets TCP segments of up to 64 KiB with the checksum left partial.
//! Offloads matter most where the guest's kernel is slow (emulated, as on PVM hosts):
//! its TCP stack then handles one 64 KiB segment where it would handle 45 frames, and
//! checksums no byte. A reader thread takes frames from the TAP and serves queue 0
//! through the transport's [`Waker`]; transmitted frames are written to the TAP on the
//! thread that notified.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dvmm_devices::GuestAccess;
use dvmm_sync::MutexExt;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
};

use crate::pci::Waker;
use crate::queue::{Queue, QueueError};
use crate::VirtioDevice;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HEADER: usize = 12;
/// Largest frame with its header: an IP packet's largest (a TSO segment, or a frame on
/// a TAP with a 64 KiB MTU) behind an Ethernet header with a VLAN tag.
const FRAME_MAX: usize = HEADER + 18 + 65_535;
/// Frames held for the guest before the reader waits for it to post buffers.
const RX_FRAMES_MAX: usize = 256;
/// How often the reader looks whether the device is gone.
const POLL_MS: i32 = 100;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_TSO_ECN: u32 = 0x08;

/// The offloads offered: checksums and TCP segmentation, both ways.
const OFFERED: u64 = 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN;

/// What the TAP may hand the guest (`TUNSETOFFLOAD`'s flags) once its driver accepted
/// `features`: a receive offload without the checksum offload it rests on (which the
/// spec forbids a driver to take) counts for nothing, as the TUN driver would refuse it.
fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
        flags |= TUN_F_TSO_ECN;
    }
    flags
}

/// Why the network device cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No such network interface on this host.
    #[error(
        "TAP device {0} does not exist on this host; create it first, e.g. \
         `ip tuntap add dev {0} mode tap && ip link set {0} up`"
    )]
    NoSuchTap(String),
    /// The name cannot be an interface name.
    #[error("'{0}' is not a network interface name (1 to 15 characters, no '/' or spaces)")]
    BadName(String),
    /// Opening or configuring the TAP failed.
    #[error("cannot open TAP device {name} ({what}): {source}")]
    Open {
        /// The interface.
        name: String,
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Of those to the guest, segments the host left whole (TSO, `gso_type` set).
    pub rx_segments: u64,
    /// Of those from the guest, segments it left to the host to cut (TSO).
    pub tx_segments: u64,
    /// Bytes to the guest, headers included.
    pub rx_bytes: u64,
    /// Bytes from the guest, headers included.
    pub tx_bytes: u64,
    /// Frames dropped: larger than the guest's buffer, or the TAP refused them.
    pub dropped: u64,
    /// Frames read from the TAP (given to the guest, waiting, or discarded at a reset):
    /// beside `rx_frames`, it tells a host that sent nothing from a guest that took
    /// nothing.
    pub tap_frames: u64,
    /// Frames read from the TAP that a device reset discarded before the guest had them.
    pub discarded_at_reset: u64,
}

#[derive(Default)]
struct State {
    rx: VecDeque<Vec<u8>>,
    counters: NetCounters,
    closed: bool,
}

/// The network device.
pub struct Net {
    tap: Arc<File>,
    name: String,
    mac: [u8; 6],
    /// `TUNSETOFFLOAD` flags in force.
    offloads: u32,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("tap", &self.name).finish()
    }
}

/// `ioctl(fd, request, arg)` on the TAP, as an io::Result.
#[allow(unsafe_code)]
fn tap_ioctl(fd: &File, request: libc::c_ulong, arg: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: the TUN ioctls used here read (and for TUNSETIFF write) at most the
    // `ifreq`/int `arg` points to, which the caller keeps alive for the call; the fd is
    // ours.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `TUNSETOFFLOAD`, which takes its flags by value.
fn set_tap_offloads(tap: &File, flags: u32) -> std::io::Result<()> {
    tap_ioctl(tap, TUNSETOFFLOAD, flags as usize as *mut libc::c_void)
}

impl Net {
    /// Opens the existing TAP device `name` for a guest NIC with address `mac`.
    pub fn open(name: &str, mac: [u8; 6]) -> Result<Net, NetError> {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(NetError::BadName(name.to_string()));
        }
        // TUNSETIFF would create a missing TAP (as root): the user asked for one that
        // exists.
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(NetError::NoSuchTap(name.to_string()));
        }
        let open_err = |what: &'static str| {
            let name = name.to_string();
            move |source| NetError::Open { name, what, source }
        };
        let tap = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(open_err("opening /dev/net/tun"))?;
        // struct ifreq: the name, then the flags (a short), padded to 40 bytes.
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        tap_ioctl(&tap, TUNSETIFF, ifreq.as_mut_ptr().cast())
            .map_err(open_err("TUNSETIFF: is it a TAP device, and not in use?"))?;
        let mut size = HEADER as libc::c_int;
        tap_ioctl(
            &tap,
            TUNSETVNETHDRSZ,
            (&mut size as *mut libc::c_int).cast(),
        )
        .map_err(open_err("TUNSETVNETHDRSZ"))?;
        // Until a driver says what it takes: whole frames, checksums done.
        set_tap_offloads(&tap, 0).map_err(open_err("TUNSETOFFLOAD"))?;
        Ok(Net {
            tap: Arc::new(tap),
            name: name.to_string(),
            mac,
            offloads: 0,
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    /// The TAP's name.
    pub fn tap_name(&self) -> &str {
        &self.name
    }

    /// The device's counters so far.
    pub fn counters(&self) -> NetCounters {
        self.state.locked().counters
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.state.locked().closed = true;
    }
}

/// Waits up to `POLL_MS` for the TAP to be readable.
#[allow(unsafe_code)]
fn wait_readable(tap: &File) {
    let mut pfd = libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives on this stack for the call.
    let _ = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
}

/// Moves frames from the TAP to the guest until the device is gone.
fn reader(tap: Arc<File>, state: Arc<Mutex<State>>, waker: Waker) {
    let mut buf = vec![0u8; FRAME_MAX];
    loop {
        {
            let st = state.locked();
            if st.closed {
                return;
            }
            if st.rx.len() >= RX_FRAMES_MAX {
                // The guest has no buffers posted: it asks again when it posts some.
                drop(st);
                std::thread::sleep(Duration::from_millis(1));
                if !waker.wake(RX) {
                    return;
                }
                continue;
            }
        }
        match (&*tap).read(&mut buf) {
            Ok(n) if n >= HEADER => {
                let mut frame = buf[..n].to_vec();
                // Without VIRTIO_NET_F_MRG_RXBUF every frame takes one buffer.
                frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                let mut st = state.locked();
                st.rx.push_back(frame);
                st.counters.tap_frames += 1;
                drop(st);
                if !waker.wake(RX) {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(&tap),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // The TAP went away (deleted on the host): the link is down for good.
                tracing::warn!(error = %e, "virtio-net: reading the TAP failed; receiving stops");
                return;
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        crate::device_type::NET
    }

    fn features(&self) -> u64 {
        OFFERED
    }

    fn activate(&mut self, features: u64) {
        let flags = tap_offloads(features);
        tracing::debug!(
            tap = %self.name,
            features = format_args!("{features:#x}"),
            flags,
            "virtio-net: driver ready"
        );
        if flags == self.offloads {
            return;
        }
        match set_tap_offloads(&self.tap, flags) {
            Ok(()) => self.offloads = flags,
            // The TAP keeps handing over whole frames, which every driver takes.
            Err(e) => tracing::warn!(
                tap = %self.name,
                flags,
                error = %e,
                "virtio-net: the TAP refused the receive offloads; it sends whole frames"
            ),
        }
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], then status, max_virtqueue_pairs, mtu (not offered: zero).
        for (i, d) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(i);
            *d = self.mac.get(at).copied().unwrap_or(0);
        }
    }

    fn set_waker(&mut self, waker: Waker) {
        let (tap, state) = (self.tap.clone(), self.state.clone());
        if let Err(e) = std::thread::Builder::new()
            .name(format!("virtio-net-{}", self.name))
            .spawn(move || reader(tap, state, waker))
        {
            tracing::warn!(error = %e, "virtio-net: no receive thread");
        }
    }

    fn reset(&mut self) {
        let mut st = self.state.locked();
        st.counters.discarded_at_reset += st.rx.len() as u64;
        st.rx.clear();
        drop(st);
        // The next driver may take fewer offloads. Frames the TAP queued before this
        // may still carry them; a driver that took fewer drops those few as malformed,
        // as after any NIC reset.
        if self.offloads != 0 && set_tap_offloads(&self.tap, 0).is_ok() {
            self.offloads = 0;
        }
    }

    fn summary(&self) -> Option<String> {
        let st = self.state.locked();
        let c = st.counters;
        Some(format!(
            "{} frames to the guest ({} TSO, {} bytes), {} from it ({} TSO, {} bytes), \
             {} dropped, {} waiting for a buffer; {} read from the TAP, {} discarded at a reset",
            c.rx_frames,
            c.rx_segments,
            c.rx_bytes,
            c.tx_frames,
            c.tx_segments,
            c.tx_bytes,
            c.dropped,
            st.rx.len(),
            c.tap_frames,
            c.discarded_at_reset
        ))
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &dyn GuestAccess,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        match index {
            RX => loop {
                let mut st = self.state.locked();
                let Some(frame) = st.rx.front() else {
                    break;
                };
                let Some(chain) = queue.pop(mem)? else {
                    break;
                };
                if chain.writable_len() < frame.len() as u64 {
                    // Its buffer cannot hold the frame: the frame is dropped, and the
                    // buffer goes back empty (Linux discards a zero-length frame).
                    st.rx.pop_front();
                    st.counters.dropped += 1;
                    drop(st);
                    queue.push_used(mem, chain.head, 0)?;
                    used = true;
                    continue;
                }
                let n = chain.write_all(mem, frame)?;
                let segment = frame[1] != 0;
                st.rx.pop_front();
                st.counters.rx_frames += 1;
                st.counters.rx_bytes += n as u64;
                st.counters.rx_segments += u64::from(segment);
                drop(st);
                queue.push_used(mem, chain.head, u32::try_from(n).unwrap_or(0))?;
                used = true;
            },
            TX => {
                while let Some(chain) = queue.pop(mem)? {
                    let frame = chain.read_all(mem, FRAME_MAX)?;
                    let sent = frame.len() > HEADER && (&*self.tap).write(&frame).is_ok();
                    let mut st = self.state.locked();
                    if sent {
                        st.counters.tx_frames += 1;
                        st.counters.tx_bytes += frame.len() as u64;
                        st.counters.tx_segments += u64::from(frame[1] != 0);
                    } else {
                        st.counters.dropped += 1;
                    }
                    drop(st);
                    queue.push_used(mem, chain.head, 0)?;
                    used = true;
                }
            }
            _ => {}
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tap_hands_over_only_what_the_driver_took() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_CSUM)),
            0
        );
        // Segments without the checksum offload they rest on: nothing.
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)),
            TUN_F_CSUM | TUN_F_TSO4
        );
        // ECN only with a segmentation offload.
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
            TUN_F_CSUM
        );
        assert_eq!(
            tap_offloads(OFFERED),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
    }

    #[test]
    fn a_missing_tap_or_a_bad_name_is_named() {
        let e = Net::open("dvmm-no-such0", [0; 6]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = Net::open("a/b", [0; 6]).unwrap_err();
        assert!(matches!(e, NetError::BadName(_)), "{e}");
    }
}
