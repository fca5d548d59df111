//! Reading the maps with bpf(2) on the map's fd: `BPF_MAP_LOOKUP_BATCH` reads the used slots of
//! a per-CPU array in one syscall (aya 0.14 has no batch API), and updates and program
//! counters. The arrays shared by all CPUs are read through a mapping instead ([`super::mapped`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr`'s `info` member.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Byte offsets in `struct bpf_prog_info` (include/uapi/linux/bpf.h; append-only ABI).
const PROG_INFO_RUN_TIME_NS: usize = 192;
const PROG_INFO_RUN_CNT: usize = 200;
const PROG_INFO_RECURSION_MISSES: usize = 208;

/// A program's counters from BPF_OBJ_GET_INFO_BY_FD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgCounters {
    /// Nanoseconds run while `kernel.bpf_stats_enabled` was on.
    pub run_time_ns: u64,
    /// Runs while `kernel.bpf_stats_enabled` was on.
    pub run_count: u64,
    /// Times the kernel skipped the program because it was already running on that CPU (an
    /// interrupt fired the same hook while it ran): events it did not count. Always counted;
    /// `None` on kernels before 5.12, which do not report it.
    pub recursion_misses: Option<u64>,
}

/// The run and miss counters of the program behind `prog_fd`.
pub fn prog_counters(prog_fd: BorrowedFd<'_>) -> io::Result<ProgCounters> {
    let mut info = [0u64; 32];
    let mut attr = InfoAttr {
        bpf_fd: prog_fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // The kernel writes back how much of the struct it knows and filled.
    let filled = attr.info_len as usize;
    let field = |off: usize| (filled >= off + 8).then(|| info[off / 8]);
    Ok(ProgCounters {
        run_time_ns: field(PROG_INFO_RUN_TIME_NS).unwrap_or(0),
        run_count: field(PROG_INFO_RUN_CNT).unwrap_or(0),
        recursion_misses: field(PROG_INFO_RECURSION_MISSES),
    })
}

/// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr`'s map element member.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the size passed; the kernel
    // writes only within it and within the buffers whose addresses it holds, which the caller
    // sized for the requested count.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut T as *mut libc::c_void, std::mem::size_of::<T>() as libc::c_uint)
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Number of possible CPUs: the per-CPU value array length the kernel copies out.
pub fn possible_cpus() -> io::Result<usize> {
    aya::util::nr_cpus().map_err(|(path, e)| io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// The sum of one entry's `ncpus` per-CPU values, laid out at `stride` bytes from the start of
/// `values`, with `add` adding one CPU's value into the total.
fn sum_percpu<V: Pod + Default>(values: &[u8], ncpus: usize, stride: usize, add: &impl Fn(&mut V, &V)) -> V {
    let mut total = V::default();
    for cpu in 0..ncpus {
        let one = &values[cpu * stride..][..std::mem::size_of::<V>()];
        // SAFETY: `one` holds size_of::<V>() bytes (the slicing checked it) and V is Pod.
        let v = unsafe { std::ptr::read_unaligned(one.as_ptr().cast::<V>()) };
        add(&mut total, &v);
    }
    total
}

/// The per-CPU sums of entries `0..n` of a per-CPU array, in index order: one batch lookup,
/// which copies `n * ncpus` values (the slots the agent handed out are the low ones).
pub fn lookup_prefix_percpu<V: Pod + Default>(
    fd: BorrowedFd<'_>,
    ncpus: usize,
    n: usize,
    add: impl Fn(&mut V, &V),
) -> io::Result<Vec<V>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let stride = std::mem::size_of::<V>().div_ceil(8) * 8;
    let mut keys = vec![0u32; n];
    let mut values = vec![0u8; n * stride * ncpus];
    let mut next: u32 = 0;
    let mut attr = BatchAttr {
        out_batch: &mut next as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: n as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        // ENOENT: the read reached the array's end; `count` says how many it returned.
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    let got = attr.count as usize;
    if got != n || keys.iter().enumerate().any(|(i, &k)| k as usize != i) {
        return Err(io::Error::other(format!("batch read of entries 0..{n} returned {got} entries, keys {keys:?}")));
    }
    Ok((0..n).map(|i| sum_percpu(&values[i * ncpus * stride..], ncpus, stride, &add)).collect())
}

/// Sets `key` to `value` (creating or replacing it; for an array, `key` is the index).
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value as *const V as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}
