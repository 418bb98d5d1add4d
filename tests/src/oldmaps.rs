//! Maps in an earlier layout, made with the raw `bpf(2)` system call, for the upgrade tests:
//! they pin maps as a previous release left them and check that the daemon of this one
//! carries their contents over.
//!
//! Deliberately not aya: these helpers must build maps of a layout the current code no
//! longer declares, byte for byte.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

/// `enum bpf_map_type` values used here.
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;

/// `union bpf_attr` is larger, but the kernel accepts any size up to it as long as the
/// bytes past the fields a command uses are zero.
type Attr = [u8; 128];

fn put_u32(attr: &mut Attr, off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut Attr, off: usize, v: u64) {
    attr[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn bpf(cmd: libc::c_long, attr: &Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid buffer of the size passed; pointers inside it point to
    // buffers that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A map created by [`OldMap::create`], pinned at `path`.
pub struct OldMap {
    fd: OwnedFd,
    pub path: PathBuf,
    value_size: usize,
}

impl OldMap {
    /// Creates a map and pins it at `path` (on a bpffs).
    pub fn create(
        path: &Path,
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> io::Result<OldMap> {
        let mut attr: Attr = [0; 128];
        put_u32(&mut attr, 0, map_type);
        put_u32(&mut attr, 4, key_size);
        put_u32(&mut attr, 8, value_size);
        put_u32(&mut attr, 12, max_entries);
        let fd = bpf(BPF_MAP_CREATE, &attr)? as RawFd;
        // SAFETY: a new fd the kernel just gave us, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut attr: Attr = [0; 128];
        put_u64(&mut attr, 0, cpath.as_ptr() as u64);
        put_u32(&mut attr, 8, raw(&fd));
        bpf(BPF_OBJ_PIN, &attr)?;
        Ok(OldMap {
            fd,
            path: path.to_owned(),
            value_size: value_size as usize,
        })
    }

    /// Writes one entry; `value` is the whole value (for per-CPU maps: one per possible CPU,
    /// each padded to 8 bytes).
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut attr: Attr = [0; 128];
        put_u32(&mut attr, 0, raw(&self.fd));
        put_u64(&mut attr, 8, key.as_ptr() as u64);
        put_u64(&mut attr, 16, value.as_ptr() as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
    }

    /// The size of one value as declared.
    pub fn value_size(&self) -> usize {
        self.value_size
    }
}

fn raw(fd: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd() as u32
}

/// The bytes of a `#[repr(C)]` value without padding holes (every map type here has
/// explicit padding fields).
pub fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is a plain repr(C) value with no uninitialised bytes (explicit padding).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
}
