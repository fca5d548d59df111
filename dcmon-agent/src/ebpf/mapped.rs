//! Read-only mappings of the BPF arrays created with `BPF_F_MMAPABLE`: the agent reads their
//! values as memory, with no bpf(2) call a cycle. The programs update these arrays with atomic
//! adds while the agent reads, so every read here is an atomic load of one 64-bit word.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::Pod;
use dcmon_common::ebpf::BPF_F_MMAPABLE;

/// A `BPF_F_MMAPABLE` array of `V` mapped read-only into this process; unmapped on drop.
///
/// `V` is made only of `u64` words (checked in [`MappedArray::new`]): each is read with its own
/// atomic load, so a value read while a program adds to it may mix words from before and after
/// that add (as a bpf(2) lookup's copy may), but never holds a torn word.
#[derive(Debug)]
pub struct MappedArray<V> {
    /// The first word of entry 0; the mapping starts here.
    base: NonNull<AtomicU64>,
    /// Bytes mapped (a whole number of pages).
    mapped_len: usize,
    /// The array's length as loaded.
    entries: u32,
    /// Words from one entry to the next: the kernel stores each value at `round_up(value_size, 8)`
    /// bytes from the last, which is the value's size here (see [`MappedArray::new`]).
    stride_words: usize,
    _value: PhantomData<V>,
}

// SAFETY: the mapping is shared memory that is only read, through atomic loads; nothing in it
// is tied to the thread that made it.
unsafe impl<V> Send for MappedArray<V> {}
// SAFETY: as above: concurrent reads are atomic loads.
unsafe impl<V> Sync for MappedArray<V> {}

/// The size of a memory page.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

impl<V: Pod + Default> MappedArray<V> {
    /// Maps array `name` (its fd, and its length, value size and flags as loaded) read-only.
    pub fn new(name: &str, fd: BorrowedFd<'_>, entries: u32, value_size: u32, flags: u32) -> io::Result<Self> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, format!("BPF map {name}: {what}"));
        if flags & BPF_F_MMAPABLE == 0 {
            return Err(invalid(format!("created without BPF_F_MMAPABLE (flags {flags:#x}), so it cannot be mapped")));
        }
        let size = std::mem::size_of::<V>();
        // Whole 64-bit words, aligned: every word is read with one atomic load, and the
        // kernel's stride (the value size rounded up to 8) is then the value's size.
        if value_size as usize != size || !size.is_multiple_of(8) || size == 0 || std::mem::align_of::<V>() != 8 {
            return Err(invalid(format!(
                "value size {value_size} bytes, expected {size} bytes of 64-bit words (the agent's {})",
                std::any::type_name::<V>()
            )));
        }
        if entries == 0 {
            return Err(invalid("no entries".to_owned()));
        }
        let stride = (value_size as usize).next_multiple_of(8);
        let mapped_len = (entries as usize * stride).next_multiple_of(page_size());
        // SAFETY: a new read-only shared mapping chosen by the kernel (no address given), of a
        // length no longer than the array's values (the kernel refuses a longer one); it aliases
        // no Rust object.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), mapped_len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if addr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("BPF map {name}: mmap of {mapped_len} bytes: {e}")));
        }
        let base = NonNull::new(addr.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other(format!("BPF map {name}: mmap returned address 0")))?;
        Ok(Self { base, mapped_len, entries, stride_words: stride / 8, _value: PhantomData })
    }

    /// The array's length.
    pub fn len(&self) -> u32 {
        self.entries
    }

    /// Whether the array has no entries (never: [`MappedArray::new`] refuses such a map).
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The words of entries `first..first + n`, or None past the end.
    fn words(&self, first: usize, n: usize) -> Option<&[AtomicU64]> {
        if first.checked_add(n)? > self.entries as usize {
            return None;
        }
        // SAFETY: the entries lie within the mapping (first + n <= entries, and the mapping holds
        // entries * stride bytes), page-aligned plus a multiple of 8, so every word is aligned.
        // The mapping lives as long as `self`. The kernel writes these words while we read: only
        // atomic loads read them (never a `&u64`), and an atomic load of a lock-free AtomicU64
        // is allowed on read-only memory (std::sync::atomic, "Atomic accesses to read-only
        // memory").
        Some(unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(first * self.stride_words), n * self.stride_words)
        })
    }

    /// Copies of entries `first..first + n` into `out` (n entries long), or None past the end.
    fn read_into(&self, first: usize, out: &mut [V]) -> Option<()> {
        let words = self.words(first, out.len())?;
        // The stride is the value's size (checked in `new`): the entries' words are the values'
        // words in order.
        let dst = out.as_mut_ptr().cast::<u64>();
        for (i, word) in words.iter().enumerate() {
            // SAFETY: `out` holds out.len() * size_of::<V>() bytes = words.len() words, 8-byte
            // aligned (checked in `new`), and V is Pod: any bytes are a valid V.
            unsafe { dst.add(i).write(word.load(Ordering::Relaxed)) };
        }
        Some(())
    }

    /// A copy of entry `index`, or None past the end.
    pub fn get(&self, index: u32) -> Option<V> {
        let mut value = [V::default()];
        self.read_into(index as usize, &mut value)?;
        Some(value[0])
    }

    /// Copies of entries `0..n` (fewer if the array is shorter), in index order.
    pub fn prefix(&self, n: usize) -> Vec<V> {
        let mut out = Vec::new();
        self.prefix_into(n, &mut out);
        out
    }

    /// [`MappedArray::prefix`] into `out` (replacing what it held), reusing its memory.
    pub fn prefix_into(&self, n: usize, out: &mut Vec<V>) {
        // Not cleared first: every entry kept is overwritten below, and a buffer of the same
        // length as last time is then written once, not zeroed and written (nor is a default
        // value made for `resize` to not use).
        let n = n.min(self.entries as usize);
        if out.len() != n {
            out.resize(n, V::default());
        }
        // In range: at most `entries` long.
        let _ = self.read_into(0, out);
    }
}

/// A mapped array laid out per CPU by hand (`dcmon_common::ebpf::per_cpu_index`): `slots`
/// entries a CPU id, CPU after CPU, each CPU's program adding to its own copy without atomics.
/// `V` is made of `u64` counters, summed word by word over the CPUs.
#[derive(Debug)]
pub struct MappedPerCpuArray<V> {
    array: MappedArray<V>,
    /// Entries a CPU id: the stride from one CPU's copy of a slot to the next.
    slots: u32,
    /// The possible CPU ids: only their regions are read (a gap's regions stay zero).
    cpus: Vec<u32>,
}

impl<V: Pod + Default> MappedPerCpuArray<V> {
    /// `array` laid out for the CPU ids `cpus` (ascending): its length must be a whole number
    /// of regions, one per id below the highest + 1.
    pub fn new(name: &str, array: MappedArray<V>, cpus: Vec<u32>) -> io::Result<Self> {
        let span = super::maps::cpu_id_span(&cpus);
        if span == 0 || !array.len().is_multiple_of(span) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "BPF map {name}: {} entries are not a whole number of regions for CPU ids 0..{span}",
                    array.len()
                ),
            ));
        }
        Ok(Self { slots: array.len() / span, array, cpus })
    }

    /// Entries a CPU id.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Slots `0..n` (fewer if a CPU has fewer), each summed over the CPUs' copies.
    pub fn sum_prefix(&self, n: usize) -> Vec<V> {
        let mut out = Vec::new();
        self.sum_prefix_into(n, &mut out);
        out
    }

    /// [`MappedPerCpuArray::sum_prefix`] into `out` (replacing what it held), so that a caller
    /// reading every round reuses one buffer instead of allocating two.
    pub fn sum_prefix_into(&self, n: usize, out: &mut Vec<V>) {
        let n = n.min(self.slots as usize);
        if out.len() != n {
            out.resize(n, V::default());
        }
        let words_per_value = std::mem::size_of::<V>() / 8;
        // SAFETY: `out` holds n values of V, V is made of u64 words only, 8-byte aligned (checked
        // in MappedArray::new) and Pod (any words are a valid V): n * words_per_value words.
        let sums = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u64>(), n * words_per_value) };
        // Zero whatever V's Default is: the sums start from nothing.
        sums.fill(0);
        for &cpu in &self.cpus {
            let Some(words) = self.array.words(cpu as usize * self.slots as usize, n) else { continue };
            for (sum, word) in sums.iter_mut().zip(words) {
                *sum = sum.wrapping_add(word.load(Ordering::Relaxed));
            }
        }
    }
}

impl<V> Drop for MappedArray<V> {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, of this length; no reference into it outlives `self`
        // (`words` borrows `self`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_len) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    use super::*;
    use crate::ebpf::maps::update;

    /// A new BPF array of `entries` values of `value_size` bytes with `flags`; None (the test
    /// skipped) where this process may not create one, unless DCMON_REQUIRE_EBPF=1.
    fn scratch_array(value_size: u32, entries: u32, flags: u32) -> Option<OwnedFd> {
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_ARRAY: u64 = 2;
        // union bpf_attr's map_create member: map_type, key_size, value_size, max_entries, map_flags.
        let mut attr = [0u64; 8];
        attr[0] = BPF_MAP_TYPE_ARRAY | 4 << 32;
        attr[1] = u64::from(value_size) | u64::from(entries) << 32;
        attr[2] = u64::from(flags);
        // SAFETY: a zeroed bpf_attr prefix of the size passed, with map_create's fields set.
        let fd = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_mut_ptr(), std::mem::size_of_val(&attr) as u32)
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            assert!(!dcmon_tests::privilege::ebpf_required(), "DCMON_REQUIRE_EBPF=1 but BPF_MAP_CREATE failed: {e}");
            eprintln!("SKIP: BPF_MAP_CREATE (needs root or CAP_BPF): {e}");
            return None;
        }
        // SAFETY: the kernel just returned this fd to us.
        Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Whether a mapping of this process starts at `addr` (/proc/self/maps).
    fn mapped_at(addr: usize) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
        maps.lines().any(|l| l.split('-').next().is_some_and(|start| usize::from_str_radix(start, 16) == Ok(addr)))
    }

    /// Entry `i`'s value in the scratch array: each word says which entry and which word it is.
    fn value(i: u32) -> [u64; 3] {
        [u64::from(i) << 32 | 0xa, u64::from(i) << 32 | 0xb, u64::from(i) << 32 | 0xc]
    }

    /// Values written with bpf(2) are read back through the mapping at their own entry, those
    /// that straddle a page boundary included; a later update is seen without mapping again;
    /// the mapping is gone once dropped.
    #[test]
    fn reads_each_entry_the_kernel_wrote() {
        // 600 entries of 24 bytes: four pages, entries 170 and 341 across page boundaries.
        let Some(fd) = scratch_array(24, 600, BPF_F_MMAPABLE) else { return };
        let written = [0u32, 1, 169, 170, 171, 341, 598, 599];
        for i in written {
            update(fd.as_fd(), &i, &value(i)).expect("BPF_MAP_UPDATE_ELEM");
        }
        let array = MappedArray::<[u64; 3]>::new("scratch", fd.as_fd(), 600, 24, BPF_F_MMAPABLE).expect("mmap");
        assert_eq!(array.len(), 600);
        for i in 0..600 {
            let want = if written.contains(&i) { value(i) } else { [0; 3] };
            assert_eq!(array.get(i), Some(want), "entry {i}");
        }
        assert_eq!(array.get(600), None);
        assert_eq!(array.prefix(3), vec![value(0), value(1), [0; 3]]);
        assert_eq!(array.prefix(1000).len(), 600);
        // A buffer reused from an earlier, longer read holds just the entries asked for.
        let mut reused = vec![[7u64; 3]; 5];
        array.prefix_into(3, &mut reused);
        assert_eq!(reused, vec![value(0), value(1), [0; 3]]);
        // And one of the same length: every entry overwritten.
        reused.iter_mut().for_each(|v| *v = [7; 3]);
        array.prefix_into(3, &mut reused);
        assert_eq!(reused, vec![value(0), value(1), [0; 3]]);
        update(fd.as_fd(), &2u32, &value(2)).expect("BPF_MAP_UPDATE_ELEM");
        assert_eq!(array.get(2), Some(value(2)), "shared memory, not a copy made at mmap");
        let start = array.base.as_ptr() as usize;
        assert!(mapped_at(start), "mapped at {start:#x}");
        drop(array);
        assert!(!mapped_at(start), "still mapped at {start:#x} after drop");
    }

    /// A map made without BPF_F_MMAPABLE, or whose value is not what the agent reads, is a clear
    /// error naming the map; so is a kernel refusing the mmap.
    #[test]
    fn a_map_that_cannot_be_mapped_is_an_error_naming_it() {
        let Some(plain) = scratch_array(24, 4, 0) else { return };
        let e = MappedArray::<[u64; 3]>::new("DCMON_X", plain.as_fd(), 4, 24, 0).expect_err("not mmapable");
        assert!(e.to_string().starts_with("BPF map DCMON_X: created without BPF_F_MMAPABLE"), "{e}");
        // Told it is mmapable, the kernel still refuses.
        let e = MappedArray::<[u64; 3]>::new("DCMON_X", plain.as_fd(), 4, 24, BPF_F_MMAPABLE).expect_err("kernel");
        assert!(e.to_string().starts_with("BPF map DCMON_X: mmap of 4096 bytes: "), "{e}");
        let Some(fd) = scratch_array(24, 4, BPF_F_MMAPABLE) else { return };
        let e = MappedArray::<[u64; 2]>::new("DCMON_Y", fd.as_fd(), 4, 24, BPF_F_MMAPABLE).expect_err("size");
        assert!(e.to_string().starts_with("BPF map DCMON_Y: value size 24 bytes, expected 16 bytes"), "{e}");
        // Longer than the array: the kernel refuses to map past its values.
        let e = MappedArray::<[u64; 3]>::new("DCMON_Y", fd.as_fd(), 4096, 24, BPF_F_MMAPABLE).expect_err("length");
        assert!(e.to_string().contains("mmap of 98304 bytes"), "{e}");
    }

    /// Each slot is the sum of its copies in the regions of the possible CPU ids (`slots`
    /// entries a region, ids with a gap), never of a neighbouring slot or of a gap's region.
    #[test]
    fn per_cpu_copies_are_summed_per_slot_over_the_possible_ids() {
        // CPU ids 0, 1 and 3 (2 is not possible): four regions of 4 slots of 16 bytes.
        let Some(fd) = scratch_array(16, 16, BPF_F_MMAPABLE) else { return };
        let copy = |cpu: u32, slot: u32| [u64::from(cpu + 1) << 8 | u64::from(slot), u64::from(cpu + 1) * 1000];
        for cpu in 0..4 {
            for slot in 0..4 {
                update(fd.as_fd(), &(cpu * 4 + slot), &copy(cpu, slot)).expect("BPF_MAP_UPDATE_ELEM");
            }
        }
        let array = MappedArray::<[u64; 2]>::new("DCMON_Z", fd.as_fd(), 16, 16, BPF_F_MMAPABLE).expect("mmap");
        let per_cpu = MappedPerCpuArray::new("DCMON_Z", array, vec![0, 1, 3]).expect("layout");
        assert_eq!(per_cpu.slots(), 4);
        let want =
            |slot: u32| [0u32, 1, 3].iter().fold([0u64; 2], |s, &c| [s[0] + copy(c, slot)[0], s[1] + copy(c, slot)[1]]);
        assert_eq!(per_cpu.sum_prefix(3), vec![want(0), want(1), want(2)]);
        assert_eq!(want(1), [(1 << 8 | 1) + (2 << 8 | 1) + (4 << 8 | 1), 7000], "the gap's region left out");
        assert_eq!(per_cpu.sum_prefix(9).len(), 4, "no further than a region");
        // A buffer reused from an earlier read: summed from zero, its old values and length gone.
        let mut reused = vec![[9u64; 2]; 6];
        per_cpu.sum_prefix_into(3, &mut reused);
        assert_eq!(reused, vec![want(0), want(1), want(2)]);
        reused.iter_mut().for_each(|v| *v = [9; 2]);
        per_cpu.sum_prefix_into(3, &mut reused);
        assert_eq!(reused, vec![want(0), want(1), want(2)], "the same length");
        // A length that is not whole regions for the ids is refused, naming the map.
        let fd = scratch_array(16, 10, BPF_F_MMAPABLE).expect("created above");
        let array = MappedArray::<[u64; 2]>::new("DCMON_Z", fd.as_fd(), 10, 16, BPF_F_MMAPABLE).expect("mmap");
        let e = MappedPerCpuArray::new("DCMON_Z", array, vec![0, 1, 3]).expect_err("10 entries, 4 ids");
        assert!(e.to_string().starts_with("BPF map DCMON_Z: 10 entries are not a whole number of regions"), "{e}");
    }
}
