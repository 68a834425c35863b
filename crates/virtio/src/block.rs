//! virtio-blk on a raw image file (or a host block device): read, write, flush, get-id,
//! discard and write-zeroes; `readonly` offers `VIRTIO_BLK_F_RO` and refuses writes.
//!
//! The image is locked while the VM has it (`flock`: exclusive, or shared when read-only),
//! so a second VM cannot open it underneath the first.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use dvmm_devices::GuestAccess;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use crate::queue::{read_guest, write_guest, Descriptor, Queue, QueueError};
use crate::VirtioDevice;

/// Bytes per sector, as virtio-blk counts them.
pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Largest piece moved between the file and guest memory at once.
const CHUNK: usize = 1 << 20;

/// Why a disk image cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}{hint}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process (another VM) holds the image.
    #[error(
        "disk image {path} is in use by another process (it holds a lock on it); stop that \
         VM or give this one a copy"
    )]
    InUse {
        /// The image.
        path: PathBuf,
    },
    /// The image's size could not be read, or it is empty.
    #[error("disk image {path} is unusable: {why}")]
    Unusable {
        /// The image.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// A virtio block device on an image file.
#[derive(Debug)]
pub struct Block {
    file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    id: [u8; 20],
}

impl Block {
    /// Opens and locks `path` (read-only if `readonly`).
    pub fn open(path: &Path, readonly: bool) -> Result<Block, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                hint: match source.kind() {
                    std::io::ErrorKind::PermissionDenied if !readonly => {
                        " for writing (readonly=on attaches it read-only)"
                    }
                    _ => "",
                },
                source,
            })?;
        let locked = if readonly {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(BlockError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(TryLockError::Error(e)) => {
                return Err(BlockError::Unusable {
                    path: path.to_path_buf(),
                    why: format!("cannot lock it: {e}"),
                })
            }
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| BlockError::Unusable {
                path: path.to_path_buf(),
                why: format!("cannot read its size: {e}"),
            })?;
        if size < SECTOR {
            return Err(BlockError::Unusable {
                path: path.to_path_buf(),
                why: format!("it holds {size} bytes, less than one 512-byte sector"),
            });
        }
        if size % SECTOR != 0 {
            tracing::warn!(
                path = %path.display(),
                size,
                "disk image size is not a multiple of 512 bytes: the guest sees the whole sectors only"
            );
        }
        // The serial number the guest reads (GET_ID): the image's file name, cut to 20 bytes.
        let mut id = [0u8; 20];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            path: path.to_path_buf(),
            sectors: size / SECTOR,
            readonly,
            id,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        // seg_max: a chain holds the header, the status and at most this many data buffers.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        // Discard and write-zeroes: up to 4 GiB - 512 per segment, one segment, any sector.
        let max_sectors = u32::MAX >> 9;
        c[36..40].copy_from_slice(&max_sectors.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&max_sectors.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Serves one request; returns the bytes written into the driver's buffers.
    fn request(&mut self, chain: &[Descriptor], mem: &dyn GuestAccess) -> Result<u32, QueueError> {
        let (readable, writable): (Vec<Descriptor>, Vec<Descriptor>) =
            chain.iter().partition(|d| !d.writable);
        let Some((status, data_out)) = writable.split_last() else {
            // No room for a status: nothing can be reported back.
            return Ok(0);
        };
        if status.len == 0 {
            return Ok(0);
        }
        let mut header = [0u8; 16];
        let mut filled = 0usize;
        let mut rest: Vec<Descriptor> = Vec::new();
        for d in &readable {
            let take = (16 - filled).min(d.len as usize);
            if take > 0 {
                read_guest(mem, d.addr, &mut header[filled..filled + take])?;
                filled += take;
            }
            if (d.len as usize) > take {
                rest.push(Descriptor {
                    addr: d.addr + take as u64,
                    len: d.len - take as u32,
                    writable: false,
                });
            }
        }
        let (code, written) = if filled < 16 {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            let ty = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
            self.serve(ty, sector, &rest, data_out, mem)?
        };
        write_guest(mem, status.addr, &[code as u8])?;
        Ok(written + 1)
    }

    /// Whether `[sector, +bytes)` lies inside the disk.
    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(bytes))
            .is_some_and(|end| end <= self.sectors * SECTOR)
    }

    fn serve(
        &mut self,
        ty: u32,
        sector: u64,
        data_in: &[Descriptor],
        data_out: &[Descriptor],
        mem: &dyn GuestAccess,
    ) -> Result<(u32, u32), QueueError> {
        let total = |ds: &[Descriptor]| ds.iter().map(|d| u64::from(d.len)).sum::<u64>();
        match ty {
            VIRTIO_BLK_T_IN => {
                let len = total(data_out);
                if !self.in_range(sector, len) {
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                }
                let mut at = sector * SECTOR;
                let mut buf = Vec::new();
                let mut written = 0u32;
                for d in data_out {
                    let mut done = 0u64;
                    while done < u64::from(d.len) {
                        let n = (u64::from(d.len) - done).min(CHUNK as u64) as usize;
                        buf.resize(n, 0);
                        if let Err(e) = self.file.read_exact_at(&mut buf, at) {
                            tracing::warn!(path = %self.path.display(), at, error = %e, "disk read failed");
                            return Ok((VIRTIO_BLK_S_IOERR, written));
                        }
                        write_guest(mem, d.addr + done, &buf)?;
                        done += n as u64;
                        at += n as u64;
                        written = written.saturating_add(n as u32);
                    }
                }
                Ok((VIRTIO_BLK_S_OK, written))
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly || !self.in_range(sector, total(data_in)) {
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                }
                let mut at = sector * SECTOR;
                let mut buf = Vec::new();
                for d in data_in {
                    let mut done = 0u64;
                    while done < u64::from(d.len) {
                        let n = (u64::from(d.len) - done).min(CHUNK as u64) as usize;
                        buf.resize(n, 0);
                        read_guest(mem, d.addr + done, &mut buf)?;
                        if let Err(e) = self.file.write_all_at(&buf, at) {
                            tracing::warn!(path = %self.path.display(), at, error = %e, "disk write failed");
                            return Ok((VIRTIO_BLK_S_IOERR, 0));
                        }
                        done += n as u64;
                        at += n as u64;
                    }
                }
                Ok((VIRTIO_BLK_S_OK, 0))
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => Ok((VIRTIO_BLK_S_OK, 0)),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "disk flush failed");
                    Ok((VIRTIO_BLK_S_IOERR, 0))
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut left = &self.id[..];
                let mut written = 0u32;
                for d in data_out {
                    let n = left.len().min(d.len as usize);
                    write_guest(mem, d.addr, &left[..n])?;
                    left = &left[n..];
                    written += n as u32;
                }
                Ok((VIRTIO_BLK_S_OK, written))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if !self.readonly => {
                let mut seg = [0u8; 16];
                let mut ok = true;
                for d in data_in {
                    let mut off = 0u64;
                    while off + 16 <= u64::from(d.len) {
                        read_guest(mem, d.addr + off, &mut seg)?;
                        off += 16;
                        let start = u64::from_le_bytes(seg[..8].try_into().unwrap_or([0; 8]));
                        let count =
                            u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
                        if !self.in_range(start, count * SECTOR) {
                            ok = false;
                            continue;
                        }
                        let zero_only = ty == VIRTIO_BLK_T_WRITE_ZEROES;
                        ok &= self.clear(start * SECTOR, count * SECTOR, zero_only);
                    }
                }
                Ok((
                    if ok {
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    },
                    0,
                ))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => Ok((VIRTIO_BLK_S_IOERR, 0)),
            _ => Ok((VIRTIO_BLK_S_UNSUPP, 0)),
        }
    }

    /// Discards (punches a hole) or zeroes `[at, +len)`; falls back to writing zeros
    /// where the file system cannot, for write-zeroes (a discard may do nothing).
    fn clear(&self, at: u64, len: u64, zero_only: bool) -> bool {
        if len == 0 {
            return true;
        }
        if punch_hole(&self.file, at, len).is_ok() {
            return true;
        }
        if !zero_only {
            return true;
        }
        let zeros = vec![0u8; CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            if self.file.write_all_at(&zeros[..n], at + done).is_err() {
                return false;
            }
            done += n as u64;
        }
        true
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range reads as zeros and frees its blocks.
#[allow(unsafe_code)]
fn punch_hole(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: fallocate on a file descriptor we own, with plain integer arguments; it
    // touches no memory of ours.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at,
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        crate::device_type::BLOCK
    }

    fn features(&self) -> u64 {
        let mut f =
            1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &dyn GuestAccess,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop(mem)? {
            let written = self.request(&chain.descriptors, mem)?;
            queue.push_used(mem, chain.head, written)?;
            used = true;
        }
        Ok(used)
    }
}
