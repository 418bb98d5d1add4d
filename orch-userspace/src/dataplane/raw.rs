//! The few bpf(2) calls aya does not offer, made directly.
//!
//! - [`next_key`]: `BPF_MAP_GET_NEXT_KEY` from any key, so that the expiry sweep resumes
//!   where it stopped (aya's iterator always starts at the beginning).
//! - [`Batches`]: `BPF_MAP_LOOKUP_BATCH`, a hash map read many entries per syscall. It
//!   walks the map bucket by bucket, so a deletion during the walk cannot send it back to
//!   the start (as it does `BPF_MAP_GET_NEXT_KEY`, and with it aya's iterator).
//! - [`link_update`]: `BPF_LINK_UPDATE` on a pinned link of any kind (aya swaps programs
//!   into XDP and TC links only), so a restarted daemon's socket programs replace the old
//!   ones in their cgroup links without a moment unattached.
//! - [`ElemCount`]: the exact number of elements in a hash map. The kernel keeps that count
//!   (for every hash map since Linux 6.6) but gives it only to BPF programs, through the
//!   kfunc `bpf_map_sum_elem_count`, and aya cannot emit a kfunc call. So this is a
//!   three-instruction program, assembled here and run with `BPF_PROG_TEST_RUN`.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use orch_common::maps::FlowKey;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `src_reg` of a `ld_imm64` whose immediate is a map fd, which the kernel turns into the
/// map's pointer.
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `src_reg` of a `call` whose immediate is a kernel function's BTF id.
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
/// The kernel function that sums a map's per-CPU element counters (kernel/bpf/map_iter.c).
pub const ELEM_COUNT_KFUNC: &str = "bpf_map_sum_elem_count";

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` in `fd`'s map (the first with `None`), or
/// `None` at the end.
pub fn next_key(fd: BorrowedFd<'_>, key: Option<&FlowKey>) -> io::Result<Option<FlowKey>> {
    let mut next = FlowKey::default();
    // `union bpf_attr` for this command: map_fd (u32), pad, key (u64), next_key (u64).
    let mut attr = [0u64; 3];
    attr[0] = fd.as_raw_fd() as u32 as u64;
    attr[1] = key.map_or(0, |k| k as *const FlowKey as u64);
    attr[2] = &mut next as *mut FlowKey as u64;
    // SAFETY: the attribute points at a key and a buffer of the map's key size, both alive
    // for the call.
    match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
        Ok(_) => Ok(Some(next)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The head of `union bpf_attr` for the batch commands.
#[repr(C)]
#[derive(Default)]
struct Batch {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A walk of a hash map with `BPF_MAP_LOOKUP_BATCH`, `chunk` entries per syscall at most.
///
/// Each call to [`Batches::next_batch`] fills the buffers with the next entries; the walk
/// sees every entry that stays in the map throughout, once.
pub struct Batches<'a, K, V> {
    fd: BorrowedFd<'a>,
    /// The kernel's cursor: the next bucket (a u32 for hash maps).
    token: u32,
    started: bool,
    done: bool,
    pub keys: Vec<K>,
    pub values: Vec<V>,
}

impl<'a, K: Copy + Default, V: Copy + Default> Batches<'a, K, V> {
    /// `K` and `V` must be the map's key and value types (`#[repr(C)]`, the map's sizes).
    pub fn new(fd: BorrowedFd<'a>, chunk: usize) -> Self {
        Batches {
            fd,
            token: 0,
            started: false,
            done: false,
            keys: vec![K::default(); chunk],
            values: vec![V::default(); chunk],
        }
    }

    /// Reads the next entries; returns how many of `keys` and `values` hold them, 0 at the
    /// end. A bucket holding more entries than the buffers doubles them and is read again.
    pub fn next_batch(&mut self) -> io::Result<usize> {
        loop {
            if self.done {
                return Ok(0);
            }
            let mut out_token = 0u32;
            let mut attr = Batch {
                in_batch: if self.started {
                    &self.token as *const u32 as u64
                } else {
                    0
                },
                out_batch: &mut out_token as *mut u32 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: self.keys.len() as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: the buffers hold `count` keys and values of the map's sizes and the
            // tokens are u32 (a hash map's batch token), all alive for the call.
            let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
            let n = attr.count as usize;
            match result {
                Ok(_) => {}
                // The end: the last entries (if any) came with it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.done = true,
                // One bucket holds more entries than fit: make room and read it again.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                    let len = self.keys.len() * 2;
                    self.keys.resize(len, K::default());
                    self.values.resize(len, V::default());
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.started = true;
            self.token = out_token;
            if n > 0 || self.done {
                return Ok(n);
            }
        }
    }
}

/// Puts `prog` into the BPF link pinned at `pin`, in place of the program it runs: one
/// atomic switch (`BPF_LINK_UPDATE` after `BPF_OBJ_GET`).
pub fn link_update(pin: &std::path::Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // `union bpf_attr` for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    // SAFETY: the attribute points at a NUL-terminated path alive for the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut get) }?;
    // SAFETY: the kernel returned a new descriptor, now ours alone.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // For BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd (all u32).
    let mut update = [0u32; 4];
    update[0] = link.as_raw_fd() as u32;
    update[1] = prog.as_raw_fd() as u32;
    // SAFETY: plain integers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut update) }.map(drop)
}

/// One BPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel zero-fills the rest.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The head of `union bpf_attr` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

/// Counts the elements of one hash map, exactly, in one syscall: a program that returns
/// `bpf_map_sum_elem_count(map)`.
#[derive(Debug)]
pub struct ElemCount {
    prog: OwnedFd,
}

impl ElemCount {
    /// Builds the counting program for the map `map` (which it keeps referenced).
    /// `kfunc_btf_id` is [`ELEM_COUNT_KFUNC`]'s id in the kernel's BTF. Fails where the
    /// kernel lacks the kfunc or refuses the call from an XDP program; the error carries the
    /// verifier's log.
    pub fn new(map: BorrowedFd<'_>, kfunc_btf_id: u32) -> io::Result<Self> {
        let insn = |code, dst: u8, src: u8, imm| Insn {
            code,
            regs: src << 4 | dst,
            off: 0,
            imm,
        };
        let insns = [
            // r1 = map (ld_imm64: two slots)
            insn(0x18, 1, BPF_PSEUDO_MAP_FD, map.as_raw_fd()),
            insn(0, 0, 0, 0),
            // r0 = bpf_map_sum_elem_count(r1)
            insn(0x85, 0, BPF_PSEUDO_KFUNC_CALL, kfunc_btf_id as i32),
            // return r0
            insn(0x95, 0, 0, 0),
        ];
        let license = c"GPL";
        let mut log = vec![0u8; 4096];
        let mut name = [0u8; 16];
        name[..10].copy_from_slice(b"orch_count");
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
        };
        // SAFETY: the attribute points at the instructions, the license and the log buffer,
        // all alive for the call, with their lengths.
        let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr) }.map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let log = String::from_utf8_lossy(&log[..end]);
            io::Error::new(e.kind(), format!("{e}; verifier: {}", log.trim()))
        })?;
        // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(ElemCount { prog })
    }

    /// The map's element count now.
    pub fn read(&self) -> io::Result<u64> {
        // XDP runs need an Ethernet header's worth of data; its content is never read.
        let data = [0u8; 64];
        let mut attr = TestRun {
            prog_fd: self.prog.as_raw_fd() as u32,
            retval: 0,
            data_size_in: data.len() as u32,
            data_size_out: 0,
            data_in: data.as_ptr() as u64,
            data_out: 0,
            repeat: 1,
            duration: 0,
        };
        // SAFETY: the attribute points at `data`, alive for the call, with its length.
        unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
        // The count of a map whose capacity is a u32 fits the program's 32-bit return value.
        Ok(u64::from(attr.retval))
    }
}

/// bpf(2) with the attribute `attr`.
///
/// # Safety
/// `attr` must be the head of `union bpf_attr` for `cmd`, and every pointer in it valid for
/// the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller's contract.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
