//! Control messages between nodes (everything except DSM page traffic), and their
//! byte encoding: a tag byte, then fixed little-endian fields. Decoding never panics.

use dvmm_irq::lapic::ApicView;
use dvmm_irq::msg::InterruptMessage;
use dvmm_layout::cpu_features::{CpuFeatures, CpuModel, WORD_COUNT};

/// Transport message kind of DSM protocol traffic (payload: `dvmm_dsm` encoding).
pub const KIND_DSM: u16 = 1;
/// Transport message kind of [`ControlMsg`]s.
pub const KIND_CONTROL: u16 = 2;

pub use dvmm_layout::IoSpace;

/// Why a VM stopped, as carried between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCode {
    /// The guest powered off.
    PowerOff = 0,
    /// The guest reset.
    Reset = 1,
    /// The guest panicked.
    Panic = 2,
    /// Stopped from outside.
    Stopped = 3,
    /// A node failed.
    Failed = 4,
    /// A test asked isa-debug-exit to end the VM; the reason is the value it wrote.
    DebugExit = 5,
}

/// A control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlMsg {
    /// The sender built its VM, started its DSM engine and waits for work.
    Ready,
    /// Deliver `msg` to the sender-chosen local APIC `apic_id` of the receiver.
    Irq {
        /// Target APIC id (owned by the receiver).
        apic_id: u32,
        /// The interrupt.
        msg: InterruptMessage,
    },
    /// A level-triggered vector was EOId (for node 0's IOAPIC).
    LevelEoi {
        /// The vector.
        vector: u8,
    },
    /// Perform an I/O access on the receiver's devices (node 0) and reply.
    IoRequest {
        /// Matches the reply to the request.
        id: u64,
        /// Port or MMIO.
        space: IoSpace,
        /// Port number or guest-physical address.
        addr: u64,
        /// Access size in bytes (1..=8).
        len: u8,
        /// Write (else read).
        write: bool,
        /// Data written (first `len` bytes).
        data: [u8; 8],
    },
    /// The result of an [`ControlMsg::IoRequest`].
    IoReply {
        /// The request's id.
        id: u64,
        /// Data read (first `len` bytes), zero for writes.
        data: [u8; 8],
    },
    /// The routing-relevant state of one of the sender's LAPICs changed.
    ApicView(ApicView),
    /// The CPU the sender's host can show the guest (to node 0, when joining).
    CpuOffer(CpuModel),
    /// The CPU every vCPU shows: what all nodes offer (from node 0, before any node
    /// builds its VM).
    CpuAgreed(CpuModel),
    /// A clock probe (to node 0, when joining): node 0 answers with
    /// [`ControlMsg::ClockEcho`] at once.
    ClockProbe {
        /// Matches the echo to its probe.
        seq: u32,
    },
    /// Node 0's host clocks, read when the probe `seq` arrived.
    ClockEcho {
        /// The probe's `seq`.
        seq: u32,
        /// Node 0's host TSC.
        tsc: u64,
        /// Node 0's host `CLOCK_BOOTTIME`, in ns.
        ns: u64,
        /// Node 0's TSC frequency in kHz.
        tsc_khz: u32,
    },
    /// The sender measured its clocks against node 0's and set its vCPUs' clocks
    /// (to node 0, ending the sender's part of the join).
    ClockSet {
        /// Node 0's host clock minus the sender's, in ns, as measured.
        offset_ns: i64,
        /// The measurement's bound: half the best probe's round trip, in ns.
        bound_ns: u64,
        /// Whether the sender applied the offset (false: it was within the bound).
        applied: bool,
    },
    /// Pause (`pause`) or resume this node's vCPUs (the control API of the sender was
    /// asked); answered with [`ControlMsg::Paused`].
    Pause {
        /// Matches the answer to the request.
        seq: u32,
        /// Pause (else resume).
        pause: bool,
        /// On resume: how far to set the guest's kvmclock back (the time the whole VM
        /// was paused, as the node that paused it measured), in ns.
        clock_shift_ns: u64,
    },
    /// The answer to [`ControlMsg::Pause`] `seq`: done, or why not.
    Paused {
        /// The request's `seq`.
        seq: u32,
        /// Empty when done; else what went wrong.
        error: String,
    },
    /// The VM is over.
    Stop {
        /// Why.
        code: StopCode,
        /// Human-readable detail.
        reason: String,
    },
}

/// A control message that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than its tag requires.
    #[error("control message truncated ({got} bytes, {need} needed)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Unknown tag or field value.
    #[error("malformed control message: {0}")]
    Malformed(&'static str),
}

const MAX_REASON: usize = 1024;

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn need(b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        Err(WireError::Truncated {
            got: b.len(),
            need: n,
        })
    } else {
        Ok(())
    }
}

/// Vendor (12 bytes), signature (u32), the number of feature words (u8), the words.
fn encode_cpu(v: &mut Vec<u8>, m: &CpuModel) {
    v.extend_from_slice(&m.vendor);
    v.extend_from_slice(&m.signature.to_le_bytes());
    v.push(WORD_COUNT as u8);
    for w in m.features.words {
        v.extend_from_slice(&w.to_le_bytes());
    }
}

/// The inverse of [`encode_cpu`], after the tag byte.
fn decode_cpu(b: &[u8]) -> Result<CpuModel, WireError> {
    need(b, 18)?;
    if usize::from(b[17]) != WORD_COUNT {
        // Nodes of different dvmm versions compare different words.
        return Err(WireError::Malformed("CPU feature word count differs"));
    }
    need(b, 18 + 4 * WORD_COUNT)?;
    let mut m = CpuModel {
        signature: u32_at(b, 13),
        features: CpuFeatures::default(),
        ..CpuModel::default()
    };
    m.vendor.copy_from_slice(&b[1..13]);
    for (i, w) in m.features.words.iter_mut().enumerate() {
        *w = u32_at(b, 18 + 4 * i);
    }
    Ok(m)
}

impl ControlMsg {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        match self {
            ControlMsg::Ready => v.push(0),
            ControlMsg::Irq { apic_id, msg } => {
                v.push(1);
                v.extend_from_slice(&apic_id.to_le_bytes());
                v.extend_from_slice(&msg.to_wire().to_le_bytes());
            }
            ControlMsg::LevelEoi { vector } => {
                v.push(2);
                v.push(*vector);
            }
            ControlMsg::IoRequest {
                id,
                space,
                addr,
                len,
                write,
                data,
            } => {
                v.push(3);
                v.extend_from_slice(&id.to_le_bytes());
                v.push(match space {
                    IoSpace::Pio => 0,
                    IoSpace::Mmio => 1,
                });
                v.extend_from_slice(&addr.to_le_bytes());
                v.push(*len);
                v.push(u8::from(*write));
                v.extend_from_slice(data);
            }
            ControlMsg::IoReply { id, data } => {
                v.push(4);
                v.extend_from_slice(&id.to_le_bytes());
                v.extend_from_slice(data);
            }
            ControlMsg::ApicView(a) => {
                v.push(5);
                v.extend_from_slice(&a.apic_id.to_le_bytes());
                v.push(u8::from(a.x2apic));
                v.extend_from_slice(&a.ldr.to_le_bytes());
                v.extend_from_slice(&a.dfr.to_le_bytes());
                v.push(a.arbitration_priority);
                v.push(u8::from(a.enabled));
            }
            ControlMsg::Stop { code, reason } => {
                v.push(6);
                v.push(*code as u8);
                let r = reason.as_bytes();
                let r = &r[..r.len().min(MAX_REASON)];
                v.extend_from_slice(&(r.len() as u16).to_le_bytes());
                v.extend_from_slice(r);
            }
            ControlMsg::CpuOffer(m) => {
                v.push(7);
                encode_cpu(&mut v, m);
            }
            ControlMsg::CpuAgreed(m) => {
                v.push(8);
                encode_cpu(&mut v, m);
            }
            ControlMsg::ClockProbe { seq } => {
                v.push(9);
                v.extend_from_slice(&seq.to_le_bytes());
            }
            ControlMsg::ClockEcho {
                seq,
                tsc,
                ns,
                tsc_khz,
            } => {
                v.push(10);
                v.extend_from_slice(&seq.to_le_bytes());
                v.extend_from_slice(&tsc.to_le_bytes());
                v.extend_from_slice(&ns.to_le_bytes());
                v.extend_from_slice(&tsc_khz.to_le_bytes());
            }
            ControlMsg::ClockSet {
                offset_ns,
                bound_ns,
                applied,
            } => {
                v.push(11);
                v.extend_from_slice(&offset_ns.to_le_bytes());
                v.extend_from_slice(&bound_ns.to_le_bytes());
                v.push(u8::from(*applied));
            }
            ControlMsg::Pause {
                seq,
                pause,
                clock_shift_ns,
            } => {
                v.push(12);
                v.extend_from_slice(&seq.to_le_bytes());
                v.push(u8::from(*pause));
                v.extend_from_slice(&clock_shift_ns.to_le_bytes());
            }
            ControlMsg::Paused { seq, error } => {
                v.push(13);
                v.extend_from_slice(&seq.to_le_bytes());
                let r = error.as_bytes();
                let r = &r[..r.len().min(MAX_REASON)];
                v.extend_from_slice(&(r.len() as u16).to_le_bytes());
                v.extend_from_slice(r);
            }
        }
        v
    }

    /// Decodes a message; never panics.
    pub fn decode(b: &[u8]) -> Result<ControlMsg, WireError> {
        need(b, 1)?;
        let bool_at = |o: usize| match b[o] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed("boolean out of range")),
        };
        match b[0] {
            0 => Ok(ControlMsg::Ready),
            1 => {
                need(b, 13)?;
                let msg = InterruptMessage::from_wire(u64_at(b, 5))
                    .ok_or(WireError::Malformed("bad interrupt message"))?;
                Ok(ControlMsg::Irq {
                    apic_id: u32_at(b, 1),
                    msg,
                })
            }
            2 => {
                need(b, 2)?;
                Ok(ControlMsg::LevelEoi { vector: b[1] })
            }
            3 => {
                // tag, id u64, space u8, addr u64, len u8, write u8, data [8]
                need(b, 28)?;
                let space = match b[9] {
                    0 => IoSpace::Pio,
                    1 => IoSpace::Mmio,
                    _ => return Err(WireError::Malformed("unknown I/O space")),
                };
                let len = b[18];
                if !(1..=8).contains(&len) {
                    return Err(WireError::Malformed("I/O length out of range"));
                }
                let mut data = [0u8; 8];
                data.copy_from_slice(&b[20..28]);
                Ok(ControlMsg::IoRequest {
                    id: u64_at(b, 1),
                    space,
                    addr: u64_at(b, 10),
                    len,
                    write: bool_at(19)?,
                    data,
                })
            }
            4 => {
                need(b, 17)?;
                let mut data = [0u8; 8];
                data.copy_from_slice(&b[9..17]);
                Ok(ControlMsg::IoReply {
                    id: u64_at(b, 1),
                    data,
                })
            }
            5 => {
                need(b, 16)?;
                Ok(ControlMsg::ApicView(ApicView {
                    apic_id: u32_at(b, 1),
                    x2apic: bool_at(5)?,
                    ldr: u32_at(b, 6),
                    dfr: u32_at(b, 10),
                    arbitration_priority: b[14],
                    enabled: bool_at(15)?,
                }))
            }
            6 => {
                need(b, 4)?;
                let code = match b[1] {
                    0 => StopCode::PowerOff,
                    1 => StopCode::Reset,
                    2 => StopCode::Panic,
                    3 => StopCode::Stopped,
                    4 => StopCode::Failed,
                    5 => StopCode::DebugExit,
                    _ => return Err(WireError::Malformed("unknown stop code")),
                };
                let n = usize::from(u16::from_le_bytes([b[2], b[3]]));
                if n > MAX_REASON {
                    return Err(WireError::Malformed("stop reason too long"));
                }
                need(b, 4 + n)?;
                let reason = String::from_utf8_lossy(&b[4..4 + n]).into_owned();
                Ok(ControlMsg::Stop { code, reason })
            }
            7 => Ok(ControlMsg::CpuOffer(decode_cpu(b)?)),
            8 => Ok(ControlMsg::CpuAgreed(decode_cpu(b)?)),
            9 => {
                need(b, 5)?;
                Ok(ControlMsg::ClockProbe { seq: u32_at(b, 1) })
            }
            10 => {
                need(b, 25)?;
                Ok(ControlMsg::ClockEcho {
                    seq: u32_at(b, 1),
                    tsc: u64_at(b, 5),
                    ns: u64_at(b, 13),
                    tsc_khz: u32_at(b, 21),
                })
            }
            11 => {
                need(b, 18)?;
                Ok(ControlMsg::ClockSet {
                    offset_ns: u64_at(b, 1) as i64,
                    bound_ns: u64_at(b, 9),
                    applied: bool_at(17)?,
                })
            }
            12 => {
                need(b, 14)?;
                Ok(ControlMsg::Pause {
                    seq: u32_at(b, 1),
                    pause: bool_at(5)?,
                    clock_shift_ns: u64_at(b, 6),
                })
            }
            13 => {
                need(b, 7)?;
                let n = usize::from(u16::from_le_bytes([b[5], b[6]]));
                if n > MAX_REASON {
                    return Err(WireError::Malformed("pause error too long"));
                }
                need(b, 7 + n)?;
                Ok(ControlMsg::Paused {
                    seq: u32_at(b, 1),
                    error: String::from_utf8_lossy(&b[7..7 + n]).into_owned(),
                })
            }
            _ => Err(WireError::Malformed("unknown tag")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvmm_irq::msg::{DeliveryMode, DestinationMode, Shorthand, TriggerMode};
    use proptest::prelude::*;

    fn samples() -> Vec<ControlMsg> {
        vec![
            ControlMsg::Ready,
            ControlMsg::Irq {
                apic_id: 3,
                msg: InterruptMessage {
                    vector: 0x40,
                    delivery: DeliveryMode::Fixed,
                    dest_mode: DestinationMode::Physical,
                    destination: 3,
                    shorthand: Shorthand::None,
                    trigger: TriggerMode::Edge,
                    level: true,
                },
            },
            ControlMsg::LevelEoi { vector: 0x61 },
            ControlMsg::Pause {
                seq: 9,
                pause: false,
                clock_shift_ns: 1_500_000_000,
            },
            ControlMsg::Paused {
                seq: 9,
                error: "vCPU 3 did not stop".into(),
            },
            ControlMsg::IoRequest {
                id: 77,
                space: IoSpace::Mmio,
                addr: 0xfec0_0010,
                len: 4,
                write: true,
                data: [1, 2, 3, 4, 0, 0, 0, 0],
            },
            ControlMsg::IoRequest {
                id: 78,
                space: IoSpace::Pio,
                addr: 0x3f8,
                len: 1,
                write: false,
                data: [0; 8],
            },
            ControlMsg::IoReply {
                id: 77,
                data: [9; 8],
            },
            ControlMsg::ApicView(ApicView {
                apic_id: 2,
                x2apic: true,
                ldr: 0x10004,
                dfr: 0xffff_ffff,
                arbitration_priority: 0x20,
                enabled: true,
            }),
            ControlMsg::Stop {
                code: StopCode::Failed,
                reason: "lost node 2".into(),
            },
            ControlMsg::Stop {
                code: StopCode::DebugExit,
                reason: "3".into(),
            },
            ControlMsg::CpuOffer(CpuModel {
                vendor: *b"AuthenticAMD",
                signature: 0x00a2_0f12,
                features: CpuFeatures {
                    words: std::array::from_fn(|i| 0x0101_0101 * i as u32),
                },
            }),
            ControlMsg::CpuAgreed(CpuModel {
                vendor: *b"GenuineIntel",
                signature: 0x906ea,
                features: CpuFeatures::from_names(&["sse2", "avx2"]).unwrap(),
            }),
            ControlMsg::ClockProbe { seq: 7 },
            ControlMsg::ClockEcho {
                seq: 7,
                tsc: 0x1234_5678_9abc,
                ns: 987_654_321,
                tsc_khz: 2_445_428,
            },
            ControlMsg::ClockSet {
                offset_ns: -1_000_000_000,
                bound_ns: 21_000,
                applied: true,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            assert_eq!(ControlMsg::decode(&m.encode()), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn truncations_are_errors() {
        for m in samples() {
            let b = m.encode();
            for n in 0..b.len() {
                assert!(ControlMsg::decode(&b[..n]).is_err(), "{m:?} cut at {n}");
            }
        }
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(m) = ControlMsg::decode(&b) {
                // Whatever decodes re-encodes to something that decodes the same.
                prop_assert_eq!(ControlMsg::decode(&m.encode()), Ok(m));
            }
        }
    }
}
