//! What kind of kernel an image is, for choices that only make sense for one OS (e.g.
//! Linux command-line options).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The OS a kernel image says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOs {
    /// Linux: a bzImage (setup header "HdrS"), or an ELF with Linux's notes.
    Linux,
    /// Anything else (or unreadable).
    Other,
}

const PT_NOTE: u32 = 4;
/// Xen's note type naming the guest OS (`XEN_ELFNOTE_GUEST_OS`).
const XEN_ELFNOTE_GUEST_OS: u32 = 6;

/// Looks at the image's header (bzImage) or ELF notes.
pub fn kernel_os(path: &Path) -> KernelOs {
    let Ok(mut f) = File::open(path) else {
        return KernelOs::Other;
    };
    let mut head = vec![0u8; 0x400];
    let n = f.read(&mut head).unwrap_or(0);
    head.truncate(n);
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return KernelOs::Linux;
    }
    if !head.starts_with(b"\x7FELF") || head.get(4) != Some(&2) {
        return KernelOs::Other;
    }
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .map(|x| u64::from_le_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(&head, 0x20), u16_at(0x36), u16_at(0x38))
    else {
        return KernelOs::Other;
    };
    let mut ph = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
    if f.seek(SeekFrom::Start(phoff)).is_err() || f.read_exact(&mut ph).is_err() {
        return KernelOs::Other;
    }
    for e in ph.chunks(usize::from(phentsize.max(1))) {
        let kind = e
            .get(0..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let (Some(PT_NOTE), Some(off), Some(size)) = (kind, u64_at(e, 8), u64_at(e, 32)) else {
            continue;
        };
        if size > 1 << 20 {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        if f.seek(SeekFrom::Start(off)).is_err() || f.read_exact(&mut notes).is_err() {
            continue;
        }
        if notes_say_linux(&notes) {
            return KernelOs::Linux;
        }
    }
    KernelOs::Other
}

/// Whether a PT_NOTE segment has a note named "Linux", or a Xen guest-OS note "linux".
fn notes_say_linux(notes: &[u8]) -> bool {
    let mut at = 0usize;
    let word = |o: usize| {
        notes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    while let (Some(namesz), Some(descsz), Some(kind)) = (word(at), word(at + 4), word(at + 8)) {
        let name_at = at + 12;
        let desc_at = name_at + namesz.next_multiple_of(4);
        let (Some(name), Some(desc)) = (
            notes.get(name_at..name_at + namesz),
            notes.get(desc_at..desc_at + descsz),
        ) else {
            return false;
        };
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        if name == b"Linux" {
            return true;
        }
        if name == b"Xen" && kind == XEN_ELFNOTE_GUEST_OS as usize {
            let d = desc.strip_suffix(&[0]).unwrap_or(desc);
            if d.eq_ignore_ascii_case(b"linux") {
                return true;
            }
        }
        at = desc_at + descsz.next_multiple_of(4);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((name.len() as u32).to_le_bytes());
        v.extend((desc.len() as u32).to_le_bytes());
        v.extend(kind.to_le_bytes());
        v.extend(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    #[test]
    fn linux_notes_are_recognised() {
        let mut n = note(b"Xen\0", 18, &[0; 4]);
        assert!(!notes_say_linux(&n));
        n.extend(note(b"Xen\0", XEN_ELFNOTE_GUEST_OS, b"linux\0"));
        assert!(notes_say_linux(&n));
        assert!(notes_say_linux(&note(b"Linux\0", 0x100, &[1, 2])));
        assert!(!notes_say_linux(&[1, 2, 3]), "truncated");
    }

    #[test]
    fn bzimage_header_and_other_files() {
        let dir = std::env::temp_dir().join(format!("dvmm-identify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bz = dir.join("bz");
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&bz, &img).unwrap();
        assert_eq!(kernel_os(&bz), KernelOs::Linux);
        std::fs::write(&bz, b"\x7FELF\x02 too short").unwrap();
        assert_eq!(kernel_os(&bz), KernelOs::Other);
        assert_eq!(kernel_os(&dir.join("missing")), KernelOs::Other);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
