//! Map updates and program counters with bpf(2) on the fd, and the possible CPU ids the
//! arrays laid out per CPU are sized for. The counters are read through a mapping of their
//! arrays instead ([`super::mapped`]), with no syscall.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
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

/// Where the kernel lists the CPU ids it may ever run on.
pub const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// The possible CPU ids, ascending, from [`POSSIBLE_CPUS`] (ids may have gaps: "0-3,8-11").
pub fn possible_cpu_ids() -> io::Result<Vec<u32>> {
    let text = std::fs::read_to_string(POSSIBLE_CPUS)
        .map_err(|e| io::Error::new(e.kind(), format!("{POSSIBLE_CPUS}: {e}")))?;
    parse_cpu_list(text.trim()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{POSSIBLE_CPUS}: {e}")))
}

/// The CPU ids of a kernel cpu list ("0-3,8,10-11"), ascending: ranges and single ids,
/// comma-separated. An error names the part that is not an id or an ascending range.
pub fn parse_cpu_list(list: &str) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    for part in list.split(',') {
        let id = |s: &str| {
            s.parse::<u32>().map_err(|_| format!("`{part}` in cpu list `{list}` is not a CPU id or id range"))
        };
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (id(a)?, id(b)?),
            None => (id(part)?, id(part)?),
        };
        if first > last || ids.last().is_some_and(|&prev| prev >= first) {
            return Err(format!("`{part}` in cpu list `{list}` is not an ascending range after the ones before"));
        }
        ids.extend(first..=last);
    }
    Ok(ids)
}

/// The CPU ids below which every id in `ids` lies: the highest + 1 (0 for none). The kernel's
/// `bpf_get_smp_processor_id` returns any of them, so an array laid out per CPU needs that
/// many regions, not one per possible CPU.
pub fn cpu_id_span(ids: &[u32]) -> u32 {
    ids.iter().max().map_or(0, |&max| max.saturating_add(1))
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

/// The value at `key` (for an array, `key` is the index).
pub fn lookup<K: Pod, V: Pod + Default>(fd: BorrowedFd<'_>, key: &K) -> io::Result<V> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges, single ids and gaps; the span is the highest id + 1, not the count.
    #[test]
    fn cpu_lists_with_gaps_span_to_the_highest_id() {
        assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
        assert_eq!(parse_cpu_list("0-3"), Ok(vec![0, 1, 2, 3]));
        let ids = parse_cpu_list("0-3,8-11").expect("list with a gap");
        assert_eq!(ids, vec![0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!((ids.len(), cpu_id_span(&ids)), (8, 12), "8 CPUs, ids up to 11");
        assert_eq!(cpu_id_span(&parse_cpu_list("0,2,5-6").expect("list")), 7);
        assert_eq!(cpu_id_span(&[]), 0);
        for bad in ["", "0-", "a", "3-1", "0-3,2", "0,,1", "0-1-2"] {
            let e = parse_cpu_list(bad).expect_err(bad);
            assert!(e.contains(&format!("cpu list `{bad}`")), "{bad}: {e}");
        }
    }

    /// This host's list parses, and its span covers every possible CPU.
    #[test]
    fn this_hosts_possible_cpus_parse() {
        let ids = possible_cpu_ids().expect("possible CPU ids");
        assert_eq!(ids.len(), possible_cpus().expect("count"), "{ids:?}");
        assert!(cpu_id_span(&ids) as usize >= ids.len());
    }
}
