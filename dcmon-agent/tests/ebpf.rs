//! eBPF mode against the kernel: the committed object loads, and the counters equal /proc.
//!
//! These need root (CAP_BPF, CAP_SYS_ADMIN for loop devices and namespaces). Without it they
//! skip with a message, unless DCMON_REQUIRE_EBPF=1 (CI), where a skip would hide a broken
//! eBPF mode and so they fail instead.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dcmon_agent::collector::Collector;
use dcmon_agent::collector::disk::ebpf::EbpfDiskCollector;
use dcmon_agent::collector::disk::{
    DiskCollector, DiskCounters, RELIST_EVERY, WholeDisks, parse_block_stat, parse_diskstats,
};
use dcmon_agent::collector::net::ebpf::{EbpfNetCollector, header_adjust};
use dcmon_agent::collector::net::{NetCollector, parse_net_dev};
use dcmon_agent::config::DeviceFilter;
use dcmon_agent::ebpf::{Probes, load, maps};
use dcmon_agent::filter::PatternList;
use dcmon_agent::host::Host;
use dcmon_common::ebpf::{
    DISK_LAT_MAP, DISK_MAP, DISK_SLOT_MAP, DiskKey, IssueStamps, NET_DROP_MAP, NET_MAP, NET_SLOT_MAP, NET_SLOTS,
    NetKey, NetValue, OVERFLOW_SLOT, PROGRAMS, RQ_START_ENTRIES, RQ_START_MAP, issue_stamps,
};

fn required() -> bool {
    dcmon_tests::ebpf_required()
}

/// Loading BPF programs needs root: the test fails without it (README, Testing: root policy).
fn can_run(what: &str) -> bool {
    common::require_root(what);
    true
}

fn attach(what: &str) -> Option<Arc<Probes>> {
    attach_with(what, load::KernelStamps::Use)
}

/// [`attach`], choosing whether the I/O latency programs may take the kernel's issue stamps.
fn attach_with(what: &str, kernel_stamps: load::KernelStamps) -> Option<Arc<Probes>> {
    if !can_run(what) {
        return None;
    }
    match Probes::attach_with(std::path::Path::new(load::VMLINUX_BTF), None, kernel_stamps) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but eBPF failed: {e}");
            eprintln!("SKIP {what}: {e}");
            None
        }
    }
}

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn match_all() -> DeviceFilter {
    DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() }
}

#[test]
fn committed_object_has_every_program_and_map() {
    if !can_run("loading the committed object") {
        return;
    }
    let (ebpf, _, facts) = match load::load_object(load::OBJECT, None) {
        Ok(x) => x,
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but loading failed: {e}");
            eprintln!("SKIP: {e}");
            return;
        }
    };
    let programs: BTreeSet<&str> = ebpf.programs().map(|(n, _)| n).collect();
    let maps: BTreeSet<&str> = ebpf.maps().map(|(n, _)| n).collect();
    for (name, _) in PROGRAMS {
        assert!(programs.contains(name), "program {name} missing: {programs:?}");
    }
    for name in [DISK_MAP, NET_MAP, DISK_LAT_MAP, DISK_SLOT_MAP, RQ_START_MAP, NET_DROP_MAP, NET_SLOT_MAP] {
        assert!(maps.contains(name), "map {name} missing: {maps:?}");
    }
    assert_eq!(programs.len(), PROGRAMS.len(), "unexpected programs: {programs:?}");
    assert!(facts.missing.is_empty(), "this kernel has every field: {:?}", facts.missing);
}

#[test]
fn a_program_that_cannot_load_leaves_the_others_attached() {
    if !can_run("optional programs") {
        return;
    }
    let (mut ebpf, btf, _) = match load::load_object(load::OBJECT, None) {
        Ok(x) => x,
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but loading failed: {e}");
            return eprintln!("SKIP: {e}");
        }
    };
    // One tracepoint this kernel lacks, and one field it is made to lack.
    let programs: Vec<(&'static str, &'static str)> = PROGRAMS
        .iter()
        .map(|&(name, tp)| if name == "kfree_skb" { (name, "dcmon_no_such_tracepoint") } else { (name, tp) })
        .collect();
    let missing = [(
        "OFF_SK_FAMILY",
        load::LoadError { reason: load::Reason::KernelLayout, detail: "BTF `struct sock` has no field".into() },
    )];
    let failed = load::attach_programs(&mut ebpf, &btf, &programs, &missing);
    let why: HashMap<&str, load::Reason> = failed.iter().map(|(p, e)| (*p, e.reason)).collect();
    eprintln!("left out: {failed:?}");
    assert_eq!(
        why,
        HashMap::from([
            ("kfree_skb", load::Reason::MissingTracepoint),
            ("tcp_retransmit_skb", load::Reason::KernelLayout)
        ]),
    );
    assert!(failed.iter().all(|(p, e)| e.to_string().contains(p)), "each reason names its program: {failed:?}");
    // The rest run: loopback packets reach the network counting programs' map.
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    rx.connect(rx.local_addr().expect("addr")).expect("connect");
    rx.send(b"x").expect("send");
    // No interface has a slot here: the packets count in the overflow slot.
    let map = aya::maps::Array::<_, NetValue>::try_from(ebpf.map(NET_MAP).expect("net map")).expect("array");
    let cpus = dcmon_agent::ebpf::maps::possible_cpu_ids().expect("possible CPUs");
    let slots = map.len() / dcmon_agent::ebpf::maps::cpu_id_span(&cpus);
    let overflow = cpus.iter().map(|&cpu| {
        let index = dcmon_common::ebpf::per_cpu_index(cpu, slots, dcmon_common::ebpf::OVERFLOW_SLOT);
        map.get(&index, 0).expect("overflow slot")
    });
    let (rx, tx): (u64, u64) = overflow.fold((0, 0), |(r, t), v| (r + v.rx_packets, t + v.tx_packets));
    assert!(rx > 0 && tx > 0, "net_dev_xmit and netif_receive_skb attached and counting: rx {rx}, tx {tx}");
}

/// A loop device over a file on disk, detached on drop.
struct Loop {
    dev: String,
    _file: Option<tempfile::NamedTempFile>,
}

impl Loop {
    fn new(bytes: u64) -> Self {
        let file = tempfile::NamedTempFile::new_in("/var/tmp").expect("backing file");
        file.as_file().set_len(bytes).expect("size backing file");
        let path = file.path().to_str().expect("utf-8 path").to_owned();
        let dev = run(&["losetup", "--find", "--show", "--direct-io=on", &path]).trim().to_owned();
        Self { dev, _file: Some(file) }
    }
    /// A loop device over another block device, which it reads with direct I/O.
    fn over(backing: &Loop) -> Self {
        let dev = run(&["losetup", "--find", "--show", "--direct-io=on", &backing.dev]).trim().to_owned();
        Self { dev, _file: None }
    }
    /// `major:minor`.
    fn number(&self) -> String {
        std::fs::read_to_string(format!("/sys/block/{}/dev", self.name())).expect("dev").trim().to_owned()
    }
    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn proc_disk(name: &str) -> DiskCounters {
    let text = std::fs::read_to_string("/proc/diskstats").expect("read /proc/diskstats");
    parse_diskstats(&text, &WholeDisks::ByName, &match_all())
        .expect("parse /proc/diskstats")
        .into_iter()
        .find(|d| d.device == name)
        .unwrap_or_else(|| panic!("{name} not in /proc/diskstats"))
}

/// Requests completed by every device but `name` (reads, writes, discards and flushes of
/// /proc/diskstats; a partition's are counted again in its disk's line, which only loosens the
/// bound this is used for).
fn other_devices_requests(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/diskstats").expect("read /proc/diskstats");
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) != Some(&name))
                .then(|| [3, 7, 14, 18].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum::<u64>())
        })
        .sum()
}

fn ebpf_disk(probes: &Probes, key: DiskKey) -> (u64, u64, u64, u64) {
    let v = probes
        .disk_totals()
        .expect("read disk map")
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .unwrap_or_default();
    (v.reads, v.read_sectors * 512, v.writes, v.write_sectors * 512)
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// The map and /proc read while /proc stays the same from before to after: I/O by anything
/// else on the host completing between the two reads would otherwise count on one side only.
/// Both sources read while neither changes. The program counts a request in
/// blk_update_request and /proc a moment later in __blk_mq_end_request; the loop driver
/// completes from a kworker that can be preempted in between, so a snapshot taken in that
/// window (a stray reader such as udev's probe) has eBPF one request ahead of /proc. Both
/// unchanged over 100 ms means no completion was half done. The same holds for the TCP
/// counters against /proc/net/snmp. Panics naming `what` if they never settle.
fn stable_snapshot<E: PartialEq, P: PartialEq>(what: &str, ebpf: impl Fn() -> E, second: impl Fn() -> P) -> (E, P) {
    for _ in 0..20 {
        let (e0, p0) = (ebpf(), second());
        std::thread::sleep(Duration::from_millis(100));
        let (p1, e1) = (second(), ebpf());
        if p0 == p1 && e0 == e1 {
            return (e1, p1);
        }
    }
    panic!("{what}: the counters kept changing; something else is using it");
}

const READS: usize = 300;
const WRITES: usize = 70;

#[test]
fn disk_counts_equal_proc_diskstats_exactly() {
    let Some(probes) = attach("disk accuracy") else {
        return;
    };
    let lo = Loop::new(64 << 20);
    // Let udev's probe of the new device finish so it does not straddle the snapshots.
    let _ = Command::new("udevadm").arg("settle").status();
    std::thread::sleep(Duration::from_millis(500));
    let dev = std::fs::read_to_string(format!("/sys/block/{}/dev", lo.name())).expect("dev");
    let (major, minor) = dev.trim().split_once(':').expect("major:minor");
    let key = DiskKey::new(major.parse().expect("major"), minor.parse().expect("minor"));

    let mut collector = EbpfDiskCollector::new(Host::default(), match_all(), probes.clone()).expect("collector");
    let (e0, p0) = stable_snapshot(lo.name(), || ebpf_disk(&probes, key), || proc_disk(lo.name()));

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&lo.dev)
        .expect("open loop device O_DIRECT");
    let buf = Aligned::new(16384);
    for i in 0..WRITES {
        // SAFETY: buf is 16 KiB, aligned; fd is open.
        let n = unsafe { libc::pwrite(f.as_raw_fd(), buf.ptr.cast(), 16384, (i * 16384) as libc::off_t) };
        assert_eq!(n, 16384, "pwrite: {}", std::io::Error::last_os_error());
    }
    // A flush and a discard: /proc counts neither as a read or a write, and neither may we.
    f.sync_all().expect("fsync (flush)");
    let range: [u64; 2] = [32 << 20, 1 << 20];
    // SAFETY: BLKDISCARD takes a pointer to two u64 (start, length).
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), 0x1277, range.as_ptr()) };
    assert_eq!(rc, 0, "BLKDISCARD: {}", std::io::Error::last_os_error());
    for i in 0..READS {
        // SAFETY: as above, 4 KiB reads.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 4096, (i * 4096) as libc::off_t) };
        assert_eq!(n, 4096, "pread: {}", std::io::Error::last_os_error());
    }
    drop(f);
    std::thread::sleep(Duration::from_millis(200));
    let (e1, p1) = stable_snapshot(lo.name(), || ebpf_disk(&probes, key), || proc_disk(lo.name()));
    // The collector's view, read while /proc holds still (as in stable_snapshot).
    let continued = (0..20)
        .find_map(|_| {
            let before = proc_disk(lo.name());
            let c = collector
                .read_all()
                .expect("collector")
                .into_iter()
                .find(|d| d.device == lo.name())
                .expect("loop device in eBPF collector");
            (proc_disk(lo.name()) == before).then_some((c, before))
        })
        .expect("/proc/diskstats kept changing");

    let proc_delta =
        (p1.reads - p0.reads, p1.read_bytes - p0.read_bytes, p1.writes - p0.writes, p1.write_bytes - p0.write_bytes);
    let ebpf_delta = (e1.0 - e0.0, e1.1 - e0.1, e1.2 - e0.2, e1.3 - e0.3);
    eprintln!(
        "disk {}: /proc delta {proc_delta:?}, eBPF delta {ebpf_delta:?} (reads, read bytes, writes, write bytes)",
        lo.name()
    );
    assert!(
        proc_delta.0 >= READS as u64 && proc_delta.2 >= WRITES as u64,
        "workload not seen in /proc: {proc_delta:?}"
    );
    assert!(proc_delta.1 >= (READS * 4096) as u64 && proc_delta.3 >= (WRITES * 16384) as u64);
    if ebpf_delta != proc_delta {
        // Runs the kernel skipped (recursion on one CPU) are one way to lose completions.
        let stats = probes.program_stats().expect("program stats");
        panic!("eBPF {ebpf_delta:?} vs /proc/diskstats {proc_delta:?} deltas; programs: {stats:?}");
    }
    assert_eq!(continued.0, continued.1, "eBPF collector must continue the /proc counters");
}

/// A blkio (cgroup v1) group of this test, removed on drop.
struct BlkioGroup {
    dir: std::path::PathBuf,
}

const BLKIO_ROOT: &str = "/sys/fs/cgroup/blkio";

impl BlkioGroup {
    fn new(tag: &str) -> Self {
        let dir = std::path::Path::new(BLKIO_ROOT).join(format!("dcmon-t{}-{tag}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self { dir }
    }
    /// Limits reads from block device `number` (`major:minor`) by this group to `iops`.
    fn throttle_reads(&self, number: &str, iops: u32) {
        let file = self.dir.join("blkio.throttle.read_iops_device");
        std::fs::write(&file, format!("{number} {iops}")).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    /// Moves the calling thread (not the process) into `dir`'s group.
    fn move_this_thread(dir: &std::path::Path) {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        std::fs::write(dir.join("tasks"), tid.to_string()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
}

impl Drop for BlkioGroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The `disk_io_latency_seconds` histogram of `device` and `op` that the collector reports now:
/// (cumulative bucket counts by `le`, sum, count); zeros while the series is absent (no I/O).
fn latency_histogram(collector: &mut EbpfDiskCollector, device: &str, op: &str) -> (Vec<(String, u64)>, f64, u64) {
    let mut samples = Vec::new();
    collector.collect(&mut samples).expect("collect");
    histogram_in(&samples, device, op)
}

/// [`latency_histogram`] of `device` and `op` among `samples`.
fn histogram_in(samples: &[dcmon_agent::batch::Sample], device: &str, op: &str) -> (Vec<(String, u64)>, f64, u64) {
    let ours = |s: &&dcmon_agent::batch::Sample| {
        s.labels.iter().any(|(k, v)| *k == "device" && v == device)
            && s.labels.iter().any(|(k, v)| *k == "op" && v == op)
    };
    let mut buckets = Vec::new();
    let (mut sum, mut count) = (0.0, 0);
    for s in samples.iter().filter(ours) {
        match s.name {
            "disk_io_latency_seconds_bucket" => {
                let le = s.labels.iter().find(|(k, _)| *k == "le").expect("le label").1.to_string();
                buckets.push((le, s.value.as_f64() as u64));
            }
            "disk_io_latency_seconds_sum" => sum = s.value.as_f64(),
            "disk_io_latency_seconds_count" => count = s.value.as_f64() as u64,
            _ => {}
        }
    }
    (buckets, sum, count)
}

const TIMED_READS: usize = 12;
/// The throttle that makes some reads slow (tens of milliseconds) and lets others through in
/// microseconds, so the reads fill buckets far apart.
const THROTTLE_IOPS: u32 = 20;
/// How much longer a read may take in the test than from issue to completion in the kernel:
/// the syscall, the loop device's queueing, the wake-up.
const USER_OVERHEAD: Duration = Duration::from_millis(10);

/// Where issue times come from when the programs may take the kernel's: what this kernel's BTF
/// allows (on this VM's 6.18 every field and flag is there: the kernel path).
fn expected_issue_stamps() -> IssueStamps {
    let facts = load::kernel_facts(std::path::Path::new(load::VMLINUX_BTF)).expect("kernel BTF");
    let [io_start, queue_flags, stats_flag] = facts.stamp_facts;
    issue_stamps(io_start, queue_flags, stats_flag, true).0
}

#[test]
fn read_latency_histogram_agrees_with_the_latencies_the_reads_took() {
    let Some(probes) = attach("I/O latency histogram") else {
        return;
    };
    assert_eq!(probes.issue_stamps(), expected_issue_stamps());
    read_latency_known_answer(&probes, "latency-kernel");
}

/// The same known answer with the kernel's stamps turned off: the stamp table's path, which
/// kernels without them take, is exact too.
#[test]
fn read_latency_histogram_agrees_from_the_stamp_table() {
    let Some(probes) = attach_with("I/O latency histogram, stamp table", load::KernelStamps::Off) else {
        return;
    };
    assert_eq!(probes.issue_stamps(), IssueStamps::Table);
    read_latency_known_answer(&probes, "latency-table");
}

/// Reads through a blkio throttle whose latencies the test measures itself, against the
/// histogram `probes` keep of them; `tag` names the test's blkio group.
fn read_latency_known_answer(probes: &Arc<Probes>, tag: &str) {
    if !std::path::Path::new(BLKIO_ROOT).join("blkio.throttle.read_iops_device").exists() {
        assert!(!required(), "DCMON_REQUIRE_EBPF=1 but there is no cgroup v1 blkio throttling");
        eprintln!("SKIP: no cgroup v1 blkio throttling at {BLKIO_ROOT}");
        return;
    }
    // The reads go to `outer`, whose requests the loop driver serves by reading `inner` in
    // the reader's blkio group, where they wait for the throttle: the wait is inside the
    // outer request's issue-to-completion time, which the histogram measures.
    let inner = Loop::new(16 << 20);
    let outer = Loop::over(&inner);
    let _ = Command::new("udevadm").arg("settle").status();
    std::thread::sleep(Duration::from_millis(500));
    let group = BlkioGroup::new(tag);
    group.throttle_reads(&inner.number(), THROTTLE_IOPS);

    let mut collector = EbpfDiskCollector::new(Host::default(), match_all(), Arc::clone(probes)).expect("collector");
    // The first round gives the disk its slot.
    let (before, sum0, count0) = latency_histogram(&mut collector, outer.name(), "read");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&outer.dev)
        .expect("open loop device O_DIRECT");
    let buf = Aligned::new(4096);
    let mut took = Vec::with_capacity(TIMED_READS);
    BlkioGroup::move_this_thread(&group.dir);
    for i in 0..TIMED_READS {
        let t = std::time::Instant::now();
        // SAFETY: buf is 4 KiB, aligned; fd is open.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 4096, (i * 4096) as libc::off_t) };
        took.push(t.elapsed());
        assert_eq!(n, 4096, "pread: {}", std::io::Error::last_os_error());
    }
    BlkioGroup::move_this_thread(std::path::Path::new(BLKIO_ROOT));
    drop(f);
    let (after, sum1, count1) = latency_histogram(&mut collector, outer.name(), "read");
    eprintln!("reads took {took:?}; histogram {after:?}, sum {sum1}, count {count1}");

    assert_eq!(count1 - count0, TIMED_READS as u64, "one completion timed per read");
    let slow = took.iter().filter(|t| **t >= Duration::from_millis(20)).count();
    // The throttle lets a read or two through per slice, then holds the next ones.
    assert!(slow >= TIMED_READS / 3, "the throttle did not slow the reads: {took:?}");
    let was = |le: &str| before.iter().find(|(l, _)| l == le).map_or(0, |(_, n)| *n);
    assert_eq!(after.last().map(|(le, n)| (le.as_str(), *n - was(le))), Some(("+Inf", TIMED_READS as u64)));
    // Each read's kernel time lies in [took - USER_OVERHEAD, took], so the count below a bound
    // is at least the reads that took less, and at most those that took less plus overhead.
    for (le, n) in &after[..after.len() - 1] {
        let bound = Duration::from_secs_f64(le.parse().expect("le is a number"));
        let n = n - was(le);
        let at_least = took.iter().filter(|t| **t < bound).count() as u64;
        let at_most = took.iter().filter(|t| t.saturating_sub(USER_OVERHEAD) < bound).count() as u64;
        assert!(
            (at_least..=at_most).contains(&n),
            "le={le}: {n} reads, expected {at_least} to {at_most}; took {took:?}"
        );
    }
    let total: f64 = took.iter().map(Duration::as_secs_f64).sum();
    let sum = sum1 - sum0;
    let slack = USER_OVERHEAD.as_secs_f64() * TIMED_READS as f64;
    assert!(sum <= total && sum >= total - slack, "sum {sum} s against {total} s measured");
}

/// Reads per CPU in `histograms_shared_by_every_cpu_lose_no_count`.
const READS_PER_CPU: usize = 2000;

#[test]
fn histograms_shared_by_every_cpu_lose_no_count() {
    let Some(probes) = attach("shared latency histograms") else {
        return;
    };
    // One value for all CPUs: the agent copies one value per slot whatever the CPU count.
    {
        let (ebpf, _, _) = load::load_object(load::OBJECT, None).expect("load the committed object");
        for name in [DISK_LAT_MAP, NET_DROP_MAP] {
            let map = ebpf.map(name).unwrap_or_else(|| panic!("map {name} missing"));
            assert!(matches!(map, aya::maps::Map::Array(_)), "{name} must be a plain array, is {map:?}");
        }
    }
    let disk = Loop::new(16 << 20);
    let _ = Command::new("udevadm").arg("settle").status();
    let mut collector = EbpfDiskCollector::new(Host::default(), match_all(), probes.clone()).expect("collector");
    // The first round gives the disk its slot.
    let (_, _, count0) = latency_histogram(&mut collector, disk.name(), "read");
    let misses = |probes: &Probes| -> u64 {
        let stats = probes.program_stats().expect("program stats");
        stats.iter().filter(|s| s.program.starts_with("block_rq")).map(|s| s.recursion_misses.unwrap_or(0)).sum()
    };
    let missed0 = misses(&probes);
    let others0 = other_devices_requests(disk.name());
    let ncpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // One reader pinned to each CPU, all at once: their completions add to the same buckets
    // of the same histogram from every CPU.
    std::thread::scope(|scope| {
        for cpu in 0..ncpus {
            let dev = disk.dev.clone();
            scope.spawn(move || {
                // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    assert_eq!(libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set), 0, "pin to CPU {cpu}");
                }
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&dev)
                    .expect("open loop device O_DIRECT");
                let buf = Aligned::new(4096);
                for i in 0..READS_PER_CPU {
                    let off = ((i * 7 + cpu) % 4096) * 4096;
                    // SAFETY: buf is 4 KiB, aligned; fd is open.
                    let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 4096, off as libc::off_t) };
                    assert_eq!(n, 4096, "pread: {}", std::io::Error::last_os_error());
                }
            });
        }
    });
    let others = other_devices_requests(disk.name()) - others0;
    let (buckets, _, count1) = latency_histogram(&mut collector, disk.name(), "read");
    let issued = (READS_PER_CPU * ncpus) as u64;
    let missed = misses(&probes) - missed0;
    eprintln!(
        "{ncpus} CPUs: {issued} reads, {} timed, {missed} program runs skipped by the kernel, {others} requests of other devices meanwhile",
        count1 - count0
    );
    // Every read is timed once, less any the kernel skipped (a program already running on that
    // CPU), which it reports, and any whose issue stamp a request of another device took: the
    // stamp table is direct-mapped and shared by every disk (dcmon_common::ebpf::RQ_START_MAP),
    // so this host's own disk I/O meanwhile can leave a read untimed (1 to 4 of 4,000 in 5 of
    // 88 runs here while builds wrote to the disk, on bc83a92 too), at most one per such
    // request. None is lost to two CPUs adding at once.
    assert!(count1 - count0 <= issued, "more completions than reads: {}", count1 - count0);
    // With the kernel's own stamps no read goes through the table: none may be lost to it.
    let others = if probes.issue_stamps() == IssueStamps::Kernel { 0 } else { others };
    assert!(
        issued - (count1 - count0) <= missed + others,
        "{} of {issued} reads timed, {missed} skipped, {others} requests of other devices meanwhile",
        count1 - count0
    );
    assert_eq!(buckets.last().map(|(_, n)| *n), Some(count1), "+Inf bucket equals the count");
}

/// What the stamp table is filled with in `kernel_stamps_time_requests_whose_table_entries_are_clobbered`:
/// no request's stamp but by a 1-in-65,536 chance of its check bits.
const CLOBBERED: u64 = 0x5a5a_0000_0000_0001;
/// Reads in that test.
const CLOBBERED_READS: usize = 300;

/// Every entry of the stamp table of `probes`.
fn stamp_table(probes: &Probes) -> Vec<u64> {
    probes
        .with_map_fd(RQ_START_MAP, |fd| (0..RQ_START_ENTRIES).map(|i| maps::lookup::<u32, u64>(fd, &i)).collect())
        .expect("read the stamp table")
}

/// On the kernel path the completion takes the request's own `io_start_time_ns` and the issue
/// program writes nothing: with every stamp-table entry overwritten by garbage, each read is
/// still timed, and the garbage is still there after. A completion that looked in the table
/// would time none of them; an issue program that stamped the table would overwrite entries.
#[test]
fn kernel_stamps_time_requests_whose_table_entries_are_clobbered() {
    let Some(probes) = attach("kernel issue stamps") else {
        return;
    };
    if probes.issue_stamps() != IssueStamps::Kernel {
        assert!(!required() || expected_issue_stamps() != IssueStamps::Kernel, "{:?}", probes.issue_stamps());
        return eprintln!("SKIP: this kernel's BTF does not allow the kernel-stamp path");
    }
    let (timed, sum, took, written) = reads_over_a_clobbered_table(&probes);
    assert_eq!(timed, CLOBBERED_READS as u64, "every read timed from its kernel stamp");
    assert!(sum > 0.0 && sum <= took.as_secs_f64(), "sum {sum} s of reads that took {took:?} together");
    // Every block device here has writeback throttling, so QUEUE_FLAG_STATS: no request of any
    // disk, this test's or another's, is stamped in the table.
    assert_eq!(written, 0, "the issue program wrote {written} table entries");
}

/// A kernel whose BTF has `io_start_time_ns` but no `QUEUE_FLAG_STATS` enumerator (older
/// kernels `#define` it): the issue program stamps every request in the table, and each
/// completion still takes the kernel's stamp. Here the loader reads a copy of this kernel's BTF
/// with the enumerator renamed.
#[test]
fn without_the_flag_in_btf_every_request_is_stamped_and_the_kernels_stamp_still_used() {
    if !can_run("kernel stamps without QUEUE_FLAG_STATS") {
        return;
    }
    let btf = std::fs::read(load::VMLINUX_BTF).expect("read the kernel's BTF");
    let name = b"\0QUEUE_FLAG_STATS\0";
    let Some(at) = btf.windows(name.len()).position(|w| w == name) else {
        return eprintln!("SKIP: this kernel's BTF has no QUEUE_FLAG_STATS enumerator to take away");
    };
    let mut renamed = btf.clone();
    renamed[at + name.len() - 2] = b'Z';
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &renamed).expect("write the renamed BTF");
    let probes = match Probes::attach_with(file.path(), None, load::KernelStamps::Use) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but eBPF failed: {e}");
            return eprintln!("SKIP: {e}");
        }
    };
    assert_eq!(probes.issue_stamps(), IssueStamps::KernelAtCompletion);
    let (timed, _, _, written) = reads_over_a_clobbered_table(&probes);
    assert_eq!(timed, CLOBBERED_READS as u64, "every read timed from its kernel stamp");
    assert!(written > 0, "the issue program stamped no request in the table");
}

/// Reads a fresh loop device (writeback throttling on) [`CLOBBERED_READS`] times with the
/// stamp table of `probes` overwritten by [`CLOBBERED`] first: (reads timed, their `_sum`,
/// the time the reads took together, table entries changed since).
fn reads_over_a_clobbered_table(probes: &Arc<Probes>) -> (u64, f64, Duration, usize) {
    let disk = Loop::new(16 << 20);
    let _ = Command::new("udevadm").arg("settle").status();
    let wbt = std::fs::read_to_string(format!("/sys/block/{}/queue/wbt_lat_usec", disk.name())).unwrap_or_default();
    assert!(wbt.trim().parse::<u64>().is_ok_and(|usec| usec > 0), "{}: wbt off ({wbt:?})", disk.name());
    let mut collector = EbpfDiskCollector::new(Host::default(), match_all(), Arc::clone(probes)).expect("collector");
    let (_, sum0, count0) = latency_histogram(&mut collector, disk.name(), "read");
    probes
        .with_map_fd(RQ_START_MAP, |fd| (0..RQ_START_ENTRIES).try_for_each(|i| maps::update(fd, &i, &CLOBBERED)))
        .expect("clobber the stamp table");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&disk.dev)
        .expect("open loop device O_DIRECT");
    let buf = Aligned::new(4096);
    let t = std::time::Instant::now();
    for i in 0..CLOBBERED_READS {
        // SAFETY: buf is 4 KiB, aligned; fd is open.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 4096, (i * 4096) as libc::off_t) };
        assert_eq!(n, 4096, "pread: {}", std::io::Error::last_os_error());
    }
    let took = t.elapsed();
    drop(f);
    let (buckets, sum1, count1) = latency_histogram(&mut collector, disk.name(), "read");
    let written = stamp_table(probes).iter().filter(|&&e| e != CLOBBERED).count();
    let (timed, sum) = (count1 - count0, sum1 - sum0);
    eprintln!("{CLOBBERED_READS} reads in {took:?}: {timed} timed, sum {sum} s; {written} table entries written");
    assert_eq!(buckets.last().map(|(_, n)| *n), Some(count1), "+Inf bucket equals the count");
    (timed, sum, took, written)
}

/// [`Probes`] attached with a copy of this kernel's BTF in which tracepoint `block_rq_issue` is
/// missing (its `btf_trace_` typedef renamed, as in tests/ebpf_partial.rs): every program but
/// that one loads, as on a kernel that lacks it or whose verifier refuses it.
fn attach_without_the_issue_program(what: &str, kernel_stamps: load::KernelStamps) -> Option<Arc<Probes>> {
    if !can_run(what) {
        return None;
    }
    let mut btf = std::fs::read(load::VMLINUX_BTF).expect("read the kernel's BTF");
    let name = b"\0btf_trace_block_rq_issue\0";
    let at: Vec<usize> = btf.windows(name.len()).enumerate().filter(|(_, w)| w == name).map(|(i, _)| i).collect();
    assert_eq!(at.len(), 1, "btf_trace_block_rq_issue once in the string section");
    btf[at[0] + name.len() - 2] = b'#';
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &btf).expect("write the BTF copy");
    let probes = match Probes::attach_with(file.path(), None, kernel_stamps) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but eBPF failed: {e}");
            eprintln!("SKIP {what}: {e}");
            return None;
        }
    };
    let failed: Vec<&str> = probes.failed_programs().iter().map(|(p, _)| *p).collect();
    assert_eq!(failed, ["block_rq_issue"], "{:?}", probes.failed_programs());
    Some(probes)
}

/// `n` reads of 4 KiB with O_DIRECT from block device `dev`.
fn direct_reads(dev: &str, n: usize) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {dev} O_DIRECT: {e}"));
    let buf = Aligned::new(4096);
    for i in 0..n {
        // SAFETY: buf is 4 KiB, aligned; fd is open.
        let r = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 4096, (i * 4096) as libc::off_t) };
        assert_eq!(r, 4096, "pread {dev}: {}", std::io::Error::last_os_error());
    }
}

/// The values of `dcmon_ebpf_overflow_total{map}` among `samples`: one, or none when absent.
fn overflow_in(samples: &[dcmon_agent::batch::Sample], map: &str) -> Vec<u64> {
    samples
        .iter()
        .filter(|s| s.name == "dcmon_ebpf_overflow_total" && s.labels.iter().any(|(k, v)| *k == "map" && v == map))
        .map(|s| s.value.as_f64() as u64)
        .collect()
}

/// Without `block_rq_issue` the kernel-stamp path still times every request the kernel stamps
/// (every loop device here has writeback throttling, so QUEUE_FLAG_STATS): each read of a
/// slotted loop device is in its histogram, and the overflow slot's count, where the reads of
/// a loop device the filter leaves out are timed, is reported and holds them.
#[test]
fn without_the_issue_program_the_kernels_stamps_time_every_read() {
    let Some(probes) = attach_without_the_issue_program("I/O latency without block_rq_issue", load::KernelStamps::Use)
    else {
        return;
    };
    if probes.issue_stamps() != IssueStamps::Kernel {
        assert!(!required() || expected_issue_stamps() != IssueStamps::Kernel, "{:?}", probes.issue_stamps());
        return eprintln!("SKIP: this kernel's BTF does not allow the kernel-stamp path");
    }
    assert_eq!(probes.latency_timing().timed(), dcmon_common::ebpf::TimedRequests::KernelStamped);
    let (slotted, left_out) = (Loop::new(16 << 20), Loop::new(16 << 20));
    let _ = Command::new("udevadm").arg("settle").status();
    for disk in [&slotted, &left_out] {
        let wbt = std::fs::read_to_string(format!("/sys/block/{}/queue/wbt_lat_usec", disk.name())).unwrap_or_default();
        assert!(wbt.trim().parse::<u64>().is_ok_and(|usec| usec > 0), "{}: wbt off ({wbt:?})", disk.name());
    }
    let filter = DeviceFilter { include: PatternList::new([slotted.name()]), exclude: PatternList::default() };
    let mut collector = EbpfDiskCollector::new(Host::default(), filter, Arc::clone(&probes)).expect("collector");
    let round = |collector: &mut EbpfDiskCollector| {
        let mut samples = Vec::new();
        collector.collect(&mut samples).expect("collect");
        (histogram_in(&samples, slotted.name(), "read").2, overflow_in(&samples, "disk_latency"))
    };
    let (count0, overflow0) = round(&mut collector);
    direct_reads(&slotted.dev, CLOBBERED_READS);
    direct_reads(&left_out.dev, CLOBBERED_READS);
    let (count1, overflow1) = round(&mut collector);
    eprintln!(
        "{CLOBBERED_READS} reads each: {} timed in the slot, overflow {overflow0:?} -> {overflow1:?}",
        count1 - count0
    );
    assert_eq!(count1 - count0, CLOBBERED_READS as u64, "every read of {} timed", slotted.name());
    let ([overflow0], [overflow1]) = (overflow0.as_slice(), overflow1.as_slice()) else {
        panic!("dcmon_ebpf_overflow_total{{map=\"disk_latency\"}} once a round: {overflow0:?}, {overflow1:?}");
    };
    // Other disks the filter leaves out (the host's) add to it too: at least ours.
    assert!(
        overflow1 - overflow0 >= CLOBBERED_READS as u64,
        "reads of {} in the overflow: {}",
        left_out.name(),
        overflow1 - overflow0
    );
}

/// The stamp-table path without `block_rq_issue` times nothing: the completions are still
/// counted, but no histogram and no latency overflow count is reported.
#[test]
fn without_the_issue_program_the_table_path_reports_no_latency() {
    let Some(probes) = attach_without_the_issue_program("table path without block_rq_issue", load::KernelStamps::Off)
    else {
        return;
    };
    assert_eq!(probes.issue_stamps(), IssueStamps::Table);
    assert_eq!(probes.latency_timing().timed(), dcmon_common::ebpf::TimedRequests::Nothing);
    let disk = Loop::new(16 << 20);
    let _ = Command::new("udevadm").arg("settle").status();
    let mut collector = EbpfDiskCollector::new(Host::default(), match_all(), Arc::clone(&probes)).expect("collector");
    let mut samples = Vec::new();
    collector.collect(&mut samples).expect("collect");
    direct_reads(&disk.dev, READS);
    samples.clear();
    collector.collect(&mut samples).expect("collect");
    let reads = samples
        .iter()
        .find(|s| s.name == "disk_reads_total" && s.labels.iter().any(|(k, v)| *k == "device" && v == disk.name()))
        .map(|s| s.value.as_f64() as u64);
    assert!(reads.is_some_and(|n| n >= READS as u64), "{} reads counted: {reads:?}", disk.name());
    let latency: Vec<&str> =
        samples.iter().filter(|s| s.name.starts_with("disk_io_latency_seconds")).map(|s| s.name).collect();
    assert!(latency.is_empty(), "nothing is timed, yet {latency:?}");
    assert_eq!(overflow_in(&samples, "disk_latency"), Vec::<u64>::new());
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("dcmon-t{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        // No IPv6: its router solicitations and MLD reports would send packets at random
        // moments, straddling the snapshots.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }
    fn exec(&self, cmd: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run(&full)
    }
    fn inode(&self) -> u32 {
        std::fs::metadata(format!("/run/netns/{}", self.name)).expect("stat netns").ino() as u32
    }
    /// (ifindex, ARPHRD type) of `iface` in this namespace.
    fn iface(&self, iface: &str) -> (u32, u32) {
        let ifindex = self.exec(&["cat", &format!("/sys/class/net/{iface}/ifindex")]);
        let kind = self.exec(&["cat", &format!("/sys/class/net/{iface}/type")]);
        (ifindex.trim().parse().expect("ifindex"), kind.trim().parse().expect("type"))
    }
    /// /proc/net/dev of this namespace: name -> (rx bytes, tx bytes).
    fn proc_net_dev(&self) -> HashMap<String, (u64, u64)> {
        let text = self.exec(&["cat", "/proc/net/dev"]);
        parse_net_dev(&text, &match_all())
            .expect("parse /proc/net/dev")
            .into_iter()
            .map(|i| (i.interface, (i.receive_bytes, i.transmit_bytes)))
            .collect()
    }
    /// Runs `f` on a thread that has joined this namespace (sockets it opens live there).
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a namespace fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn net_value(probes: &Probes, key: NetKey) -> NetValue {
    probes.net_totals().expect("read net map").into_iter().find(|(k, _)| *k == key).map(|(_, v)| v).unwrap_or_default()
}

const PACKETS: usize = 500;
const PAYLOAD: usize = 1000;

/// Sends PACKETS datagrams from `from` to `to` and waits until all arrived.
fn udp_exchange(bind_rx: &str, bind_tx: &str, to: &str) {
    let rx = std::net::UdpSocket::bind(bind_rx).expect("bind receiver");
    rx.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let tx = std::net::UdpSocket::bind(bind_tx).expect("bind sender");
    let payload = [0x5au8; PAYLOAD];
    let mut buf = [0u8; 2048];
    for _ in 0..PACKETS {
        tx.send_to(&payload, to).expect("send");
        // One at a time, so nothing is dropped for a full socket buffer.
        let n = rx.recv(&mut buf).expect("receive");
        assert_eq!(n, PAYLOAD);
    }
}

#[test]
fn net_counts_equal_proc_net_dev_for_veth_and_loopback() {
    let Some(probes) = attach("network accuracy") else {
        return;
    };
    let a = Netns::new("a");
    let b = Netns::new("b");
    let (va, vb) = (format!("dca{}", std::process::id()), format!("dcb{}", std::process::id()));
    run(&["ip", "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name]);
    a.exec(&["ip", "addr", "add", "10.213.0.1/24", "dev", &va]);
    b.exec(&["ip", "addr", "add", "10.213.0.2/24", "dev", &vb]);
    a.exec(&["ip", "link", "set", &va, "up"]);
    b.exec(&["ip", "link", "set", &vb, "up"]);
    // Warm up ARP both ways so its exchange happens before the snapshot.
    a.within(|| udp_exchange("10.213.0.1:40000", "10.213.0.1:0", "10.213.0.1:40000"));
    b.within(|| {
        let s = std::net::UdpSocket::bind("10.213.0.2:0").expect("bind");
        s.send_to(b"warm", "10.213.0.1:9").expect("send");
    });
    std::thread::sleep(Duration::from_millis(300));

    let ifaces = [(&a, va.clone(), a.iface(&va)), (&b, vb.clone(), b.iface(&vb)), (&a, "lo".to_owned(), a.iface("lo"))];
    // The programs count an interface in its slot: give these theirs, as the agent's collector
    // does for the interfaces of its namespace.
    for (ns, name, (ifindex, _)) in &ifaces {
        let key = NetKey { ifindex: *ifindex, netns: ns.inode() };
        probes.net_slot(key).expect("slot").unwrap_or_else(|| panic!("no slot for {name}"));
    }
    let snapshot = |probes: &Probes| {
        let procs = [a.proc_net_dev(), b.proc_net_dev()];
        ifaces
            .iter()
            .map(|(ns, name, (ifindex, kind))| {
                let key = NetKey { ifindex: *ifindex, netns: ns.inode() };
                let e = header_adjust(*kind, &net_value(probes, key));
                let p = procs[usize::from(ns.name != a.name)][name.as_str()];
                (name.clone(), e, p)
            })
            .collect::<Vec<_>>()
    };
    let before = snapshot(&probes);

    // veth: A -> B and B -> A (the receiver's socket lives in the other namespace).
    let rx_b = std::thread::spawn({
        let path = format!("/run/netns/{}", b.name);
        move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let s = std::net::UdpSocket::bind("10.213.0.2:40001").expect("bind b");
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut buf = [0u8; 2048];
            for _ in 0..PACKETS {
                let (n, from) = s.recv_from(&mut buf).expect("b receives");
                s.send_to(&buf[..n], from).expect("b replies");
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    a.within(|| {
        let s = std::net::UdpSocket::bind("10.213.0.1:0").expect("bind a");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let payload = [0xa5u8; PAYLOAD];
        let mut buf = [0u8; 2048];
        for _ in 0..PACKETS {
            s.send_to(&payload, "10.213.0.2:40001").expect("a sends");
            assert_eq!(s.recv(&mut buf).expect("a gets the reply"), PAYLOAD);
        }
    });
    rx_b.join().expect("b thread");
    // Loopback in A.
    a.within(|| udp_exchange("127.0.0.1:40002", "127.0.0.1:0", "127.0.0.1:40002"));
    std::thread::sleep(Duration::from_millis(300));
    let after = snapshot(&probes);

    for ((name, e0, p0), (_, e1, p1)) in before.iter().zip(&after) {
        let ebpf = (e1.0 - e0.0, e1.1 - e0.1);
        let proc = (p1.0 - p0.0, p1.1 - p0.1);
        eprintln!("{name}: /proc (rx, tx) bytes delta {proc:?}, eBPF {ebpf:?}");
        let min = (PACKETS * PAYLOAD) as u64;
        assert!(proc.0 >= min && proc.1 >= min, "{name}: workload not in /proc: {proc:?}");
        assert_eq!(ebpf, proc, "{name}: eBPF vs /proc/net/dev (rx, tx) byte deltas");
    }
}

/// The loader sizes the interface counters from the possible CPUs (far beyond the object's
/// compiled 256 slots on this host), and the programs index them by that length: an interface
/// whose slot lies beyond the compiled length is counted in its own slot, exactly.
#[test]
fn an_interface_beyond_the_compiled_slots_is_counted_in_its_own_slot() {
    let Some(probes) = attach("interface slots sized at load") else {
        return;
    };
    let slots = probes.net_slot_count().expect("slot count");
    let ids = dcmon_agent::ebpf::maps::possible_cpu_ids().expect("possible CPUs");
    let cpus = dcmon_agent::ebpf::maps::cpu_id_span(&ids);
    assert_eq!(slots, dcmon_common::ebpf::net_slots_for(cpus), "the counters' length as loaded");
    assert!(slots > NET_SLOTS + 8, "{cpus} possible CPUs give {slots} slots, no more than the compiled {NET_SLOTS}");
    // Interfaces that do not exist take every slot the object was compiled with.
    for i in 0..NET_SLOTS {
        probes.net_slot(NetKey { ifindex: 3_000_000 + i, netns: 1 }).expect("slot").expect("a free slot");
    }
    let a = Netns::new("s");
    let (ifindex, kind) = a.iface("lo");
    let key = NetKey { ifindex, netns: a.inode() };
    let slot = probes.net_slot(key).expect("slot").expect("a free slot");
    assert!(slot >= NET_SLOTS, "lo got slot {slot}, within the compiled length");
    let snapshot = || (header_adjust(kind, &net_value(&probes, key)), a.proc_net_dev()["lo"]);
    let (e0, p0) = snapshot();
    a.within(|| udp_exchange("127.0.0.1:40003", "127.0.0.1:0", "127.0.0.1:40003"));
    std::thread::sleep(Duration::from_millis(300));
    let (e1, p1) = snapshot();
    let ebpf = (e1.0 - e0.0, e1.1 - e0.1);
    let proc = (p1.0 - p0.0, p1.1 - p0.1);
    assert!(proc.0 >= (PACKETS * PAYLOAD) as u64, "workload not in /proc: {proc:?}");
    // Counted in its slot: had the programs sent them to the overflow (a bound at the compiled
    // length), the slot's deltas would be zero. (The overflow itself is not checked: the other
    // tests' host traffic lands there, as no host interface has a slot in these probes.)
    assert_eq!(ebpf, proc, "lo in slot {slot}: eBPF vs /proc/net/dev (rx, tx) byte deltas");
}

/// Pins the calling thread to CPU `cpu` and checks it runs there.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        assert_eq!(rc, 0, "sched_setaffinity to CPU {cpu}: {}", std::io::Error::last_os_error());
        assert_eq!(libc::sched_getcpu(), cpu as i32, "running on CPU {cpu} after pinning");
    }
}

/// The counters are laid out per CPU in one array and summed by the agent: datagrams sent on
/// loopback from the first CPU and then the last (loopback receives them in the softirq of the
/// sending CPU), in a namespace with nothing else on it, are counted exactly in lo's slot. A
/// sum that read one CPU's copy, or a copy at the wrong stride, would miss one CPU's count.
#[test]
fn traffic_on_two_cpus_is_summed_exactly_in_one_slot() {
    if !can_run("per-CPU layout") {
        return;
    }
    let ids = dcmon_agent::ebpf::maps::possible_cpu_ids().expect("possible CPUs");
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online < 2 {
        assert!(!required(), "DCMON_REQUIRE_EBPF=1 but this host has {online} CPU: the layout needs two");
        eprintln!("SKIP per-CPU layout: one CPU");
        return;
    }
    let a = Netns::new("cpus");
    let Some(probes) = (match Probes::attach(Some(a.inode())) {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but eBPF failed: {e}");
            eprintln!("SKIP per-CPU layout: {e}");
            None
        }
    }) else {
        return;
    };
    let (ifindex, _) = a.iface("lo");
    let key = NetKey { ifindex, netns: a.inode() };
    let slot = probes.net_slot(key).expect("slot").expect("a free slot");
    let before = net_value(&probes, key);
    // The first and the last CPU this process may run on.
    let allowed: Vec<usize> = (0..ids.len().max(online))
        .filter(|&cpu| {
            // SAFETY: a zeroed set filled by sched_getaffinity for this thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) == 0 && libc::CPU_ISSET(cpu, &set)
            }
        })
        .collect();
    let (first, last) = (allowed[0], allowed[allowed.len() - 1]);
    assert_ne!(first, last, "two CPUs allowed: {allowed:?}");
    let sends = [(first, 3usize), (last, 5usize)];
    a.within(move || {
        let rx = std::net::UdpSocket::bind("127.0.0.1:40007").expect("bind receiver");
        rx.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind sender");
        let mut buf = [0u8; 64];
        for (cpu, n) in sends {
            pin_to_cpu(cpu);
            for _ in 0..n {
                tx.send_to(b"per-cpu", "127.0.0.1:40007").expect("send");
                assert_eq!(rx.recv(&mut buf).expect("receive"), 7);
            }
        }
    });
    let after = net_value(&probes, key);
    let packets = (after.rx_packets - before.rx_packets, after.tx_packets - before.tx_packets);
    assert_eq!(packets, (8, 8), "lo in slot {slot}: (rx, tx) packets sent 3 on CPU {first} and 5 on CPU {last}");
    // 7 bytes of payload + 8 UDP + 20 IPv4 + 14 Ethernet a datagram.
    let bytes = (after.rx_bytes - before.rx_bytes, after.tx_bytes - before.tx_bytes);
    assert_eq!(bytes, (8 * 35, 8 * 49), "lo in slot {slot}: (rx, tx) bytes (rx without the link header)");
}

fn names_and_labels(collector: &mut dyn Collector) -> BTreeSet<String> {
    let mut out = Vec::new();
    collector.collect(&mut out).expect("collect");
    out.iter().map(|s| format!("{} {:?}", s.name, s.labels)).collect()
}

#[test]
fn ebpf_and_procfs_report_the_same_names_and_labels() {
    let Some(probes) = attach("same metrics in both modes") else {
        return;
    };
    let host = Host::default();
    let pairs: [(Box<dyn Collector>, Box<dyn Collector>); 2] = [
        (
            Box::new(DiskCollector::new(host.clone(), DeviceFilter::default_disks())),
            Box::new(
                EbpfDiskCollector::new(host.clone(), DeviceFilter::default_disks(), probes.clone()).expect("eBPF disk"),
            ),
        ),
        (
            Box::new(NetCollector::new(host.clone(), DeviceFilter::default_interfaces())),
            Box::new(EbpfNetCollector::new(host, DeviceFilter::default_interfaces(), probes).expect("eBPF net")),
        ),
    ];
    // What only the programs can see comes on top: the latency histograms and the overflow
    // slot's count.
    let ebpf_only = |s: &String| {
        ["disk_io_latency_seconds_", "network_drops_total ", "dcmon_ebpf_overflow_total ", "tcp_"]
            .iter()
            .any(|p| s.starts_with(p))
    };
    for (mut procfs, mut ebpf) in pairs {
        let p = names_and_labels(procfs.as_mut());
        let e: BTreeSet<String> = names_and_labels(ebpf.as_mut()).into_iter().filter(|s| !ebpf_only(s)).collect();
        assert!(!p.is_empty(), "{} reported nothing", procfs.name());
        assert_eq!(p, e, "{}: procfs vs eBPF metric names and labels", procfs.name());
        assert_eq!(procfs.name(), ebpf.name());
    }
}

/// Runs the agent binary as `nobody` with `setpriv`, no capabilities.
fn unprivileged_once(mode: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let config = dir.path().join("config.json");
    std::fs::write(&config, format!(r#"{{"machine_id": "t", "ebpf": "{mode}"}}"#)).expect("write config");
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            env!("CARGO_BIN_EXE_dcmon-agent"),
            "--config",
        ])
        .arg(&config)
        .arg("once")
        .output()
        .expect("run setpriv")
}

#[test]
fn unprivileged_auto_falls_back_and_on_refuses() {
    if !can_run("unprivileged fallback (setpriv needs root to drop privileges)") {
        return;
    }
    let auto = unprivileged_once("auto");
    let stderr = String::from_utf8_lossy(&auto.stderr);
    assert!(auto.status.success(), "auto must fall back, not fail: {stderr}");
    let fallback_lines: Vec<&str> = stderr.lines().filter(|l| l.contains("eBPF unavailable")).collect();
    assert_eq!(fallback_lines.len(), 1, "one fallback line expected: {stderr}");
    assert!(fallback_lines[0].contains("no privilege"), "the reason must say privilege: {stderr}");
    let batch: serde_json::Value = serde_json::from_slice(&auto.stdout).expect("batch JSON");
    let names: BTreeSet<&str> =
        batch["metrics"].as_array().expect("metrics").iter().filter_map(|m| m["name"].as_str()).collect();
    for want in ["disk_reads_total", "network_receive_bytes_total", "dcmon_ebpf_active"] {
        assert!(names.contains(want), "{want} missing in fallback batch: {names:?}");
    }
    let active = batch["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .find(|m| m["name"] == "dcmon_ebpf_active")
        .map(|m| m["value"].as_f64());
    assert_eq!(active, Some(Some(0.0)));

    let on = unprivileged_once("on");
    let stderr = String::from_utf8_lossy(&on.stderr);
    assert!(!on.status.success(), "\"on\" must refuse to start: {stderr}");
    assert!(
        stderr.contains("`ebpf` is \"on\"") && stderr.contains("no privilege"),
        "message must name the setting and the reason: {stderr}"
    );
}

/// Bio-based disks (zram here; dm, md and NVMe multipath heads elsewhere) never complete a
/// `struct request`, so the eBPF collector must report their /proc values, not a frozen
/// baseline.
#[test]
fn bio_based_disk_follows_proc() {
    let Some(probes) = attach("bio-based disk") else {
        return;
    };
    let size = std::fs::read_to_string("/sys/block/zram0/disksize").map(|s| s.trim().to_owned());
    if size.as_deref().ok() != Some("0") {
        // Not an eBPF problem: this host has no idle zram device to test with.
        eprintln!("SKIP bio-based disk: no unused /sys/block/zram0 ({size:?})");
        return;
    }
    std::fs::write("/sys/block/zram0/disksize", "16M").expect("size zram0");
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = std::fs::write("/sys/block/zram0/reset", "1");
        }
    }
    let _reset = Reset;
    assert!(!std::path::Path::new("/sys/block/zram0/mq").exists(), "zram0 is expected to be bio-based");
    let mut collector = EbpfDiskCollector::new(Host::default(), match_all(), probes).expect("collector");
    let p0 = proc_disk("zram0");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open("/dev/zram0")
        .expect("open /dev/zram0");
    let buf = Aligned::new(4096);
    for i in 0..50 {
        // SAFETY: 4 KiB aligned buffer, open fd.
        let n = unsafe { libc::pwrite(f.as_raw_fd(), buf.ptr.cast(), 4096, i * 4096) };
        assert_eq!(n, 4096, "pwrite: {}", std::io::Error::last_os_error());
        // SAFETY: as above.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 4096, i * 4096) };
        assert_eq!(n, 4096, "pread: {}", std::io::Error::last_os_error());
    }
    drop(f);
    let got =
        collector.read_all().expect("collector").into_iter().find(|d| d.device == "zram0").expect("zram0 reported");
    let p1 = proc_disk("zram0");
    eprintln!("zram0: /proc {p1:?}, eBPF collector {got:?}");
    assert!(p1.writes >= p0.writes + 50 && p1.reads >= p0.reads + 50, "workload: {p1:?}");
    assert_eq!(got, p1);
}

/// Copies namespace `ns`'s view of /proc/net/dev and /sys/class/net/*/{ifindex,type} into a
/// host tree at `root`, with /proc/self/ns/net pointing at the namespace: the eBPF net
/// collector then reports that namespace as if the agent ran there.
fn mirror_netns(ns: &Netns, root: &std::path::Path) {
    let _ = std::fs::remove_dir_all(root.join("sys/class/net"));
    std::fs::create_dir_all(root.join("proc/self/ns")).expect("mkdir");
    let link = root.join("proc/self/ns/net");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink(format!("/run/netns/{}", ns.name), &link).expect("symlink");
    }
    std::fs::write(root.join("proc/net/dev"), ns.exec(&["cat", "/proc/net/dev"])).unwrap_or_else(|_| {
        std::fs::create_dir_all(root.join("proc/net")).expect("mkdir");
        std::fs::write(root.join("proc/net/dev"), ns.exec(&["cat", "/proc/net/dev"])).expect("write net/dev");
    });
    for name in ns.exec(&["ls", "/sys/class/net"]).split_whitespace() {
        let dir = root.join("sys/class/net").join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let (ifindex, kind) = ns.iface(name);
        std::fs::write(dir.join("ifindex"), format!("{ifindex}\n")).expect("ifindex");
        std::fs::write(dir.join("type"), format!("{kind}\n")).expect("type");
    }
}

/// A renamed interface keeps its counters under its new name (the kernel key is the ifindex),
/// and the reported values keep equalling /proc/net/dev across the rename.
#[test]
fn renamed_interface_continues_under_new_name() {
    let Some(probes) = attach("interface rename") else {
        return;
    };
    let a = Netns::new("r");
    let b = Netns::new("s");
    let (v1, v2, v3) = (
        format!("dcr{}", std::process::id()),
        format!("dcs{}", std::process::id()),
        format!("dcz{}", std::process::id()),
    );
    run(&["ip", "link", "add", &v1, "netns", &a.name, "type", "veth", "peer", "name", &v2, "netns", &b.name]);
    a.exec(&["ip", "addr", "add", "10.214.0.1/24", "dev", &v1]);
    b.exec(&["ip", "addr", "add", "10.214.0.2/24", "dev", &v2]);
    a.exec(&["ip", "link", "set", &v1, "up"]);
    b.exec(&["ip", "link", "set", &v2, "up"]);
    let root = tempfile::tempdir().expect("tempdir");
    mirror_netns(&a, root.path());
    let mut collector = EbpfNetCollector::new(Host::new(root.path()), match_all(), probes).expect("collector");
    // Traffic from A to B over the veth pair, in two halves around a rename of v1 (B answers
    // with ICMP port unreachable, so v1 receives too).
    let send = |a: &Netns| {
        a.within(|| {
            let s = std::net::UdpSocket::bind("10.214.0.1:0").expect("bind");
            for _ in 0..100 {
                s.send_to(&[1u8; 200], "10.214.0.2:9").expect("send");
            }
        })
    };
    // Resolve the neighbour first: until ARP answers, the kernel queues only 3 packets and
    // drops the rest, so the byte threshold below would depend on timing.
    a.within(|| {
        let s = std::net::UdpSocket::bind("10.214.0.1:0").expect("bind");
        s.send_to(&[0u8; 1], "10.214.0.2:9").expect("send");
    });
    std::thread::sleep(Duration::from_millis(300));
    send(&a);
    a.exec(&["ip", "link", "set", &v1, "down"]);
    a.exec(&["ip", "link", "set", &v1, "name", &v3]);
    a.exec(&["ip", "link", "set", &v3, "up"]);
    send(&a);
    std::thread::sleep(Duration::from_millis(300));
    mirror_netns(&a, root.path());
    let got: HashMap<String, (u64, u64)> = collector
        .read_all()
        .expect("collector")
        .into_iter()
        .map(|i| (i.interface, (i.receive_bytes, i.transmit_bytes)))
        .collect();
    let want = a.proc_net_dev();
    assert!(!got.contains_key(&v1), "old name still reported: {got:?}");
    assert!(want[&v3].1 >= 200 * 200, "traffic not on {v3}: {want:?}");
    for name in [&v3, &"lo".to_owned()] {
        eprintln!("{name}: /proc {:?}, eBPF collector {:?}", want.get(name), got.get(name));
        assert_eq!(got.get(name), want.get(name), "{name}");
    }
}

/// On the real host root the collector re-lists interfaces only on rtnetlink link events:
/// an interface added, renamed or removed in the agent's own namespace shows in the very next
/// round. (A veth pair with both ends here: it carries no traffic.)
#[test]
fn link_changes_in_the_agents_namespace_show_in_the_next_round() {
    let Some(probes) = attach("link events") else {
        return;
    };
    let pid = std::process::id();
    let (first, peer, renamed) = (format!("dcla{pid}"), format!("dclp{pid}"), format!("dclb{pid}"));
    let mut collector = EbpfNetCollector::new(Host::default(), match_all(), probes).expect("collector");
    // Both ways of reading a round: `read_all`, and `collect`, whose samples carry label sets
    // made at the last re-list (a round after read_all's, with no link change between).
    let names = |c: &mut EbpfNetCollector| -> Vec<String> {
        let read: Vec<String> = c
            .read_all()
            .expect("collector")
            .into_iter()
            .map(|i| i.interface)
            .filter(|n| n.starts_with("dcl"))
            .collect();
        let mut samples = Vec::new();
        c.collect(&mut samples).expect("collect");
        for metric in ["network_receive_bytes_total", "network_transmit_bytes_total"] {
            let labelled: Vec<String> = samples
                .iter()
                .filter(|s| s.name == metric)
                .filter_map(|s| s.labels.iter().find(|(k, _)| *k == "interface").map(|(_, v)| v.to_string()))
                .filter(|n| n.starts_with("dcl"))
                .collect();
            assert_eq!(labelled, read, "{metric}");
        }
        read
    };
    assert_eq!(names(&mut collector), Vec::<String>::new());
    run(&["ip", "link", "add", &first, "type", "veth", "peer", "name", &peer]);
    let added = names(&mut collector);
    run(&["ip", "link", "set", &first, "name", &renamed]);
    let after_rename = names(&mut collector);
    let unchanged = names(&mut collector);
    run(&["ip", "link", "del", &renamed]);
    let after_delete = names(&mut collector);
    assert_eq!(added, [first.clone(), peer.clone()]);
    assert_eq!(after_rename, [renamed.clone(), peer.clone()]);
    assert_eq!(unchanged, [renamed, peer]);
    assert_eq!(after_delete, Vec::<String>::new());
}

/// With a namespace filter (what the agent uses: its own namespace), other namespaces'
/// interfaces are not counted at all.
#[test]
fn netns_filter_counts_only_that_namespace() {
    if !can_run("namespace filter") {
        return;
    }
    let a = Netns::new("f");
    let b = Netns::new("g");
    let probes = match Probes::attach(Some(a.inode())) {
        Ok(p) => p,
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but eBPF failed: {e}");
            return eprintln!("SKIP: {e}");
        }
    };
    let (va, vb) = (format!("dcf{}", std::process::id()), format!("dcg{}", std::process::id()));
    run(&["ip", "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name]);
    let ((ia, _), (ib, _)) = (a.iface(&va), b.iface(&vb));
    // Both have slots, so only the namespace filter can keep B's packets out.
    for key in [NetKey { ifindex: ia, netns: a.inode() }, NetKey { ifindex: ib, netns: b.inode() }] {
        probes.net_slot(key).expect("slot").expect("a free slot");
    }
    a.exec(&["ip", "addr", "add", "10.215.0.1/24", "dev", &va]);
    b.exec(&["ip", "addr", "add", "10.215.0.2/24", "dev", &vb]);
    a.exec(&["ip", "link", "set", &va, "up"]);
    b.exec(&["ip", "link", "set", &vb, "up"]);
    a.within(|| {
        let s = std::net::UdpSocket::bind("10.215.0.1:0").expect("bind");
        for _ in 0..20 {
            s.send_to(&[1u8; 100], "10.215.0.2:9").expect("send");
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let totals = probes.net_totals().expect("read map");
    assert!(
        totals.iter().any(|(k, v)| *k == NetKey { ifindex: ia, netns: a.inode() } && v.tx_packets >= 20),
        "A's veth not counted: {totals:?}"
    );
    // B's veth received the 20 packets (and sent its own IPv6 link-up packets), uncounted.
    let others: Vec<_> =
        totals.iter().filter(|(k, v)| k.netns != a.inode() && v.rx_packets + v.tx_packets > 0).collect();
    assert!(others.is_empty(), "other namespaces counted: {others:?}");
}

/// A disk with statistics switched off (queue/iostats = 0) stands still in /proc; the eBPF
/// collector must too, although its requests still complete.
#[test]
fn disk_with_iostats_off_follows_proc() {
    let Some(probes) = attach("iostats off") else {
        return;
    };
    let lo = Loop::new(16 << 20);
    std::fs::write(format!("/sys/block/{}/queue/iostats", lo.name()), "0").expect("iostats 0");
    let mut collector = EbpfDiskCollector::new(Host::default(), match_all(), probes.clone()).expect("collector");
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&lo.dev).expect("open loop device");
    let buf = Aligned::new(4096);
    for i in 0..20 {
        // SAFETY: 4 KiB aligned buffer, open fd.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 4096, i * 4096) };
        assert_eq!(n, 4096, "pread: {}", std::io::Error::last_os_error());
    }
    drop(f);
    let got = collector
        .read_all()
        .expect("collector")
        .into_iter()
        .find(|d| d.device == lo.name())
        .expect("loop device reported");
    let want = proc_disk(lo.name());
    // Restore the default for the next user of this loop device.
    let _ = std::fs::write(format!("/sys/block/{}/queue/iostats", lo.name()), "1");
    assert_eq!(got, want);
}

/// A loop device's (reads, sectors read) from its /sys/block stat file once udev's probing
/// holds still, and what `collector` reports for it meanwhile.
fn loop_reads_settled(name: &str, collector: &mut EbpfDiskCollector) -> ((u64, u64), Option<(u64, u64)>) {
    settled(name, || {
        collector.read_all().expect("collector").into_iter().find(|d| d.device == name).map(|d| (d.reads, d.read_bytes))
    })
}

/// A disk's (reads, sectors read) from its /sys/block stat file once udev's probing holds
/// still, and what `read` returned meanwhile.
fn settled<T>(name: &str, mut read: impl FnMut() -> T) -> ((u64, u64), T) {
    let stat = || {
        let text = std::fs::read_to_string(format!("/sys/block/{name}/stat")).expect("stat");
        let c = parse_block_stat(name, &text).unwrap_or_else(|e| panic!("/sys/block/{name}/stat: {e:#}"));
        (c.reads, c.read_bytes)
    };
    for _ in 0..20 {
        let before = stat();
        let got = read();
        if stat() == before {
            return (before, got);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name}'s counters kept moving for 2 s");
}

/// What a round of `collector.collect` reports for disk `name`: its (reads, bytes read) if
/// reported, and the count of its read latency histogram (0 while absent).
fn collected_reads(collector: &mut EbpfDiskCollector, name: &str) -> (Option<(u64, u64)>, u64) {
    let mut samples = Vec::new();
    collector.collect(&mut samples).expect("collect");
    let value = |metric: &str| {
        samples
            .iter()
            .find(|s| s.name == metric && s.labels.iter().any(|(k, v)| *k == "device" && v == name))
            .map(|s| s.value.as_f64() as u64)
    };
    (value("disk_reads_total").zip(value("disk_read_bytes_total")), histogram_in(&samples, name, "read").2)
}

/// `count` direct 4 KiB reads of block device `dev` (`/dev/loopN`).
fn direct_reads_of(dev: &str, count: u32) {
    run(&["dd", &format!("if={dev}"), "of=/dev/null", "bs=4096", &format!("count={count}"), "iflag=direct"]);
}

/// A disk that appears after the collector started is reported from the next listing on, its
/// counters and its latency histograms both: the rounds reuse what a listing decided, so each
/// listing must decide again, and the latency slots must follow it.
#[test]
fn a_disk_that_appears_is_reported_with_its_latency_from_the_next_listing() {
    let Some(probes) = attach("disk appearing") else {
        return;
    };
    let mut collector =
        EbpfDiskCollector::new(Host::default(), match_all(), probes).expect("collector").relist_every(Duration::ZERO);
    // A round before the disk exists: its latency slots are synced to the disks then.
    let _ = collected_reads(&mut collector, "none");
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("disk.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).expect("backing file");
    let dev = common::LoopDevice::add();
    let (name, path) = (dev.name(), format!("/dev/{}", dev.name()));
    run(&["losetup", &path, backing.to_str().expect("utf-8 path")]);
    let _ = Command::new("udevadm").arg("settle").status();
    // The round that lists it gives it its slots; the reads after are timed.
    let _ = collected_reads(&mut collector, &name);
    direct_reads_of(&path, 8);
    let (want, (got, timed)) = settled(&name, || collected_reads(&mut collector, &name));
    run(&["losetup", "-d", &path]);
    assert_eq!(got, Some(want), "{name}'s counters from the listing after it appeared");
    assert!(timed >= 8, "{name}'s 8 reads timed in its latency histogram: {timed}");
}

/// queue/iostats switched off (the disk is read from its stat file) and on again (from its
/// slot, counted afresh from /proc): what a round reports equals /proc throughout. The slot's
/// start that a round reuses is dropped while the disk is read from its stat file, so the reads
/// made meanwhile, which /proc did not count, are not added when it is back.
#[test]
fn iostats_switched_off_and_on_again_follows_proc_throughout() {
    let Some(probes) = attach("iostats switched") else {
        return;
    };
    let lo = Loop::new(16 << 20);
    let name = lo.name().to_owned();
    let iostats = format!("/sys/block/{name}/queue/iostats");
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, "1");
        }
    }
    let _restore = Restore(iostats.clone());
    let filter = DeviceFilter { include: PatternList::new([name.as_str()]), exclude: PatternList::default() };
    let mut collector = EbpfDiskCollector::new(Host::default(), filter, probes).expect("collector");
    for (step, set) in [("on", None), ("off", Some("0")), ("on again", Some("1"))] {
        if let Some(value) = set {
            std::fs::write(&iostats, value).expect("set queue/iostats");
        }
        direct_reads_of(&lo.dev, 8);
        let (want, (got, _)) = settled(&name, || collected_reads(&mut collector, &name));
        assert_eq!(got, Some(want), "iostats {step}");
    }
}

/// The eBPF disk collector's re-list when a disk vanishes: a loop device removed is dropped in
/// the very next round (not after the 10 s listing period), and a new device that reuses its
/// number counts from its own zero, not on top of the old device's total.
#[test]
fn a_vanished_disk_is_dropped_at_once_and_its_number_reused_from_zero() {
    let Some(probes) = attach("disk hotplug") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("disk.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).expect("backing file");
    let backing = backing.to_str().expect("utf-8 path").to_owned();
    let dev = common::LoopDevice::add();
    let name = dev.name();
    let path = format!("/dev/{name}");
    let read_blocks = |count: u32| {
        run(&["dd", &format!("if={path}"), "of=/dev/null", "bs=4096", &format!("count={count}"), "iflag=direct"]);
    };
    let settle = || {
        let _ = Command::new("udevadm").arg("settle").status();
    };
    run(&["losetup", &path, &backing]);
    settle();
    read_blocks(16);
    let filter = DeviceFilter { include: PatternList::new([name.as_str()]), exclude: PatternList::default() };
    let mut slow = EbpfDiskCollector::new(Host::default(), filter.clone(), probes.clone()).expect("collector");
    let mut fast =
        EbpfDiskCollector::new(Host::default(), filter, probes).expect("collector").relist_every(Duration::ZERO);
    read_blocks(8);
    for c in [&mut slow, &mut fast] {
        let (want, got) = loop_reads_settled(&name, c);
        assert!(want.0 >= 24, "{want:?}");
        assert_eq!(got, Some(want), "before removal");
    }

    run(&["losetup", "-d", &path]);
    dev.remove();
    let names = |c: &mut EbpfDiskCollector| -> Vec<String> {
        c.read_all().expect("collector").into_iter().map(|d| d.device).collect()
    };
    assert_eq!(
        names(&mut slow),
        Vec::<String>::new(),
        "removed: dropped in the next round, not after {RELIST_EVERY:?}"
    );
    assert_eq!(names(&mut fast), Vec::<String>::new());

    dev.readd();
    run(&["losetup", &path, &backing]);
    settle();
    read_blocks(4);
    let (want, got) = loop_reads_settled(&name, &mut fast);
    assert!(want.0 >= 4 && want.0 < 24, "the new device's own reads: {want:?}");
    assert_eq!(got, Some(want), "the new device counts from its own zero");
    assert_eq!(names(&mut slow), Vec::<String>::new(), "a new disk waits for the next listing");
    run(&["losetup", "-d", &path]);
}

/// The config of an agent on this host in eBPF mode, reporting every disk and interface
/// (loop devices and lo included, so there is something to report), no exporters.
fn ebpf_config() -> dcmon_agent::config::Config {
    dcmon_agent::config::Config {
        ebpf: dcmon_agent::config::EbpfMode::On,
        disks: match_all(),
        interfaces: match_all(),
        exporters: dcmon_agent::config::Exporters::none(),
        ..dcmon_agent::config::Config::default()
    }
}

/// Each collector's `name()` is its `collector` label and decides which procfs collector the
/// eBPF one replaces: with a wrong name both would run and every disk or network series would
/// be reported twice. Checked as built at start (`collector::build`) and as rebuilt by a
/// reload that keeps the loaded programs (`collector::rebuild`).
#[test]
fn ebpf_mode_reports_each_disk_and_network_series_once() {
    if !can_run("eBPF mode's series") {
        return;
    }
    let config = ebpf_config();
    let collectors = match dcmon_agent::collector::build(&config) {
        Ok(c) => c,
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but eBPF failed: {e:#}");
            return eprintln!("SKIP: {e:#}");
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut scheduler = dcmon_agent::agent::Scheduler::new(collectors, "m".into(), Duration::from_secs(5));
    assert_each_series_once("built", &runtime.block_on(scheduler.collect(1)));
    let kept = scheduler.take_bpf_collectors();
    let kept_names: BTreeSet<&str> = kept.iter().map(|c| c.name()).collect();
    assert_eq!(kept_names, BTreeSet::from(["disk", "ebpf", "net"]), "the collectors holding BPF programs");
    let collectors = dcmon_agent::collector::rebuild(&config, kept);
    let mut scheduler = dcmon_agent::agent::Scheduler::new(collectors, "m".into(), Duration::from_secs(5));
    assert_each_series_once("rebuilt", &runtime.block_on(scheduler.collect(2)));
}

fn assert_each_series_once(when: &str, batch: &dcmon_agent::batch::Batch) {
    let mut series: HashMap<(&str, &dcmon_agent::batch::Labels), usize> = HashMap::new();
    for s in batch.samples() {
        *series.entry((s.name, &s.labels)).or_default() += 1;
    }
    let repeated: Vec<_> = series.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "{when}: series reported more than once: {repeated:?}");
    let names: BTreeSet<&str> = series.keys().map(|(name, _)| *name).collect();
    for name in
        ["disk_reads_total", "disk_write_bytes_total", "network_receive_bytes_total", "network_transmit_bytes_total"]
    {
        assert!(names.contains(name), "{when}: no {name} in eBPF mode: {names:?}");
    }
    let success = |collector: &str| {
        batch
            .samples()
            .iter()
            .filter(|s| s.name == "dcmon_collector_success" && s.labels.iter().any(|(_, v)| v == collector))
            .map(|s| s.value.as_f64())
            .collect::<Vec<_>>()
    };
    for collector in ["os", "disk", "net", "ebpf"] {
        assert_eq!(success(collector), [1.0], "{when}: dcmon_collector_success{{collector={collector:?}}}");
    }
    let active: Vec<f64> =
        batch.samples().iter().filter(|s| s.name == "dcmon_ebpf_active").map(|s| s.value.as_f64()).collect();
    assert_eq!(active, [1.0], "{when}");
}

/// Ids of the BPF programs process `pid` holds open (the `prog_id` of its fds' fdinfo).
fn bpf_prog_ids(pid: u32) -> BTreeSet<u32> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return BTreeSet::new() };
    fds.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok()))
        .collect()
}

/// The batches in the outbox at `dir`, oldest first.
fn outbox_batches(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .expect("outbox")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let mut batches = Vec::new();
    for path in segments {
        let data = std::fs::read(&path).expect("segment");
        for record in dcmon_agent::outbox::parse_segment(&data) {
            if let dcmon_agent::outbox::Record::Batch { body, .. } = record {
                batches.push(serde_json::from_slice(body).expect("batch json"));
            }
        }
    }
    batches
}

/// A SIGHUP storm (50 reloads asked for, 10 ms apart) against an agent in eBPF mode: reloads
/// that leave the eBPF settings alone keep the loaded programs (the same program ids before
/// and after) and eBPF mode, rather than loading the programs again each time (a load that
/// a signal interrupts fails with EAGAIN).
#[test]
fn a_sighup_storm_keeps_the_loaded_programs_and_ebpf_mode() {
    if !can_run("SIGHUP storm") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("api_key");
    std::fs::write(&key, "dcmon_stormKeyStormKeyStormKeyStormKeyStormKe\n").expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    // Nothing listens there: the batches stay in the outbox, where the test reads them.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let outbox = dir.path().join("outbox");
    let config = dir.path().join("config.json");
    let settings = serde_json::json!({
        "server_url": format!("http://127.0.0.1:{port}"), "collection_interval": 1, "machine_id": "storm",
        "api_key_file": key, "outbox_dir": outbox, "ebpf": "on",
        "exporters": {"ipmi": false, "apt": false, "nvme": false, "nvsmi": false},
    });
    std::fs::write(&config, settings.to_string()).expect("config");
    let stderr_path = dir.path().join("agent.stderr");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_dcmon-agent"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start the agent");
    let log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    // Signals before the handlers are installed would kill it: wait for "started".
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !log().contains(" started ") {
        if let Some(status) = agent.try_wait().expect("wait") {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but the agent exited ({status}):\n{}", log());
            return eprintln!("SKIP: the agent cannot run in eBPF mode here:\n{}", log());
        }
        assert!(std::time::Instant::now() < deadline, "not started in 30 s:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = agent.id();
    let programs = bpf_prog_ids(pid);
    assert_eq!(programs.len(), PROGRAMS.len(), "the agent's BPF programs: {programs:?}");
    for _ in 0..50 {
        // SAFETY: kill with a valid signal number; the child is ours and still running.
        assert_eq!(unsafe { libc::kill(libc::pid_t::try_from(pid).expect("pid"), libc::SIGHUP) }, 0);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Past the last reload, a few rounds on.
    std::thread::sleep(Duration::from_secs(3));
    let after = bpf_prog_ids(pid);
    assert!(agent.try_wait().expect("wait").is_none(), "the agent died in the storm:\n{}", log());
    // SAFETY: as above.
    unsafe { libc::kill(libc::pid_t::try_from(pid).expect("pid"), libc::SIGTERM) };
    let stopped = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(100));
        agent.try_wait().expect("wait")
    });
    let log = log();
    if stopped.is_none() {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    assert!(stopped.is_some_and(|s| s.success()), "no clean exit within 10 s of SIGTERM:\n{log}");
    assert!(log.contains("config reloaded"), "no reload happened:\n{log}");
    assert!(!log.contains("eBPF unavailable") && !log.contains("reload rejected"), "{log}");
    assert_eq!(after, programs, "the reloads replaced the BPF programs:\n{log}");
    let batches = outbox_batches(&outbox);
    let last = batches.last().unwrap_or_else(|| panic!("no batch in the outbox:\n{log}"));
    let value = |name: &str, collector: Option<&str>| {
        last["metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .find(|m| m["name"] == name && collector.is_none_or(|c| m["labels"]["collector"] == c))
            .map(|m| m["value"].clone())
    };
    assert_eq!(value("dcmon_ebpf_active", None).and_then(|v| v.as_f64()), Some(1.0), "{last}");
    for collector in ["ebpf", "disk", "net"] {
        assert_eq!(
            value("dcmon_collector_success", Some(collector)),
            Some(serde_json::json!(1)),
            "{collector}: {last}"
        );
    }
}

/// An nftables table of this test, deleted on drop.
struct NftTable {
    name: String,
}

impl NftTable {
    /// A table with an input chain that drops (and counts) UDP to port 9 arriving on `iface`.
    fn drop_udp_from(iface: &str) -> Self {
        let name = format!("dcmon_t{}", std::process::id());
        run(&["nft", "add", "table", "inet", &name]);
        let table = Self { name };
        let chain = "{ type filter hook input priority 0; policy accept; }";
        run(&["nft", "add", "chain", "inet", &table.name, "input", chain]);
        let rule = ["iifname", iface, "udp", "dport", "9", "counter", "drop"];
        run(&[&["nft", "add", "rule", "inet", &table.name, "input"][..], &rule[..]].concat());
        table
    }
    /// Packets the drop rule's counter has seen.
    fn dropped(&self) -> u64 {
        let text = run(&["nft", "list", "table", "inet", &self.name]);
        let after = text.split("counter packets ").nth(1).expect("rule counter in nft output");
        after.split_whitespace().next().and_then(|n| n.parse().ok()).expect("packet count")
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.name]).status();
    }
}

/// `network_drops_total` of `interface` by reason, as the collector reports it now.
fn drops_by_reason(collector: &mut EbpfNetCollector, interface: &str) -> HashMap<String, u64> {
    let mut samples = Vec::new();
    collector.collect(&mut samples).expect("collect");
    samples
        .iter()
        .filter(|s| {
            s.name == "network_drops_total" && s.labels.iter().any(|(k, v)| *k == "interface" && v == interface)
        })
        .map(|s| {
            let reason = s.labels.iter().find(|(k, _)| *k == "reason").expect("reason label").1.to_string();
            (reason, s.value.as_f64() as u64)
        })
        .collect()
}

const DROPPED_PACKETS: usize = 40;

#[test]
fn netfilter_drops_are_counted_with_their_reason_and_interface() {
    let Some(probes) = attach("drops by reason") else {
        return;
    };
    if Command::new("nft").arg("--version").output().is_err() {
        assert!(!required(), "DCMON_REQUIRE_EBPF=1 but nft (Debian package nftables) is not installed");
        eprintln!("SKIP: nft is not installed");
        return;
    }
    // A veth with one end here (the agent's namespace) and the peer in a namespace of its own;
    // packets from the peer to port 9 are dropped by an input rule on our end.
    let peer_ns = Netns::new("drops");
    let (here, peer) = (format!("dcd{}", std::process::id()), format!("dce{}", std::process::id()));
    run(&["ip", "link", "add", &here, "type", "veth", "peer", "name", &peer, "netns", &peer_ns.name]);
    let _cleanup = scopeguard_link(&here);
    run(&["ip", "addr", "add", "10.214.0.1/30", "dev", &here]);
    run(&["ip", "link", "set", &here, "up"]);
    peer_ns.exec(&["ip", "addr", "add", "10.214.0.2/30", "dev", &peer]);
    peer_ns.exec(&["ip", "link", "set", &peer, "up"]);
    let table = NftTable::drop_udp_from(&here);

    let mut collector = EbpfNetCollector::new(Host::default(), match_all(), probes).expect("collector");
    // The first round gives the interface its slot.
    let before = drops_by_reason(&mut collector, &here);
    let nft_before = table.dropped();
    peer_ns.within(|| {
        let s = std::net::UdpSocket::bind("10.214.0.2:0").expect("bind");
        for _ in 0..DROPPED_PACKETS {
            s.send_to(b"dropped", "10.214.0.1:9").expect("send");
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let after = drops_by_reason(&mut collector, &here);
    let nft = table.dropped() - nft_before;
    eprintln!("drops on {here}: before {before:?}, after {after:?}; nft counted {nft}");
    let delta = after.get("NETFILTER_DROP").copied().unwrap_or(0) - before.get("NETFILTER_DROP").copied().unwrap_or(0);
    assert_eq!(nft, DROPPED_PACKETS as u64, "nft rule counter");
    assert_eq!(delta, nft, "network_drops_total{{reason=NETFILTER_DROP}} against the rule's counter");
    for reason in ["CONSUMED", "NOT_DROPPED_YET"] {
        assert!(!after.contains_key(reason), "{reason} is not a drop: {after:?}");
    }
}

/// Only the first NET_DROP_SLOTS interface slots have drop counters: an interface with a higher
/// slot (more interfaces than that) counts its drops in the overflow slot, not nowhere, and
/// reports no drop series of its own.
#[test]
fn drops_of_an_interface_beyond_the_drop_slots_count_in_the_overflow() {
    let Some(probes) = attach("drops beyond the drop slots") else {
        return;
    };
    if Command::new("nft").arg("--version").output().is_err() {
        assert!(!required(), "DCMON_REQUIRE_EBPF=1 but nft (Debian package nftables) is not installed");
        eprintln!("SKIP: nft is not installed");
        return;
    }
    // Interfaces that do not exist take every slot with drop counters.
    for i in 0..dcmon_common::ebpf::NET_DROP_SLOTS {
        probes.net_slot(NetKey { ifindex: 4_000_000 + i, netns: 1 }).expect("slot").expect("a free slot");
    }
    let peer_ns = Netns::new("dover");
    let (here, peer) = (format!("dco{}", std::process::id()), format!("dcp{}", std::process::id()));
    run(&["ip", "link", "add", &here, "type", "veth", "peer", "name", &peer, "netns", &peer_ns.name]);
    let _cleanup = scopeguard_link(&here);
    run(&["ip", "addr", "add", "10.216.0.1/30", "dev", &here]);
    run(&["ip", "link", "set", &here, "up"]);
    peer_ns.exec(&["ip", "addr", "add", "10.216.0.2/30", "dev", &peer]);
    peer_ns.exec(&["ip", "link", "set", &peer, "up"]);
    let table = NftTable::drop_udp_from(&here);

    let mut collector = EbpfNetCollector::new(Host::default(), match_all(), probes.clone()).expect("collector");
    let ifindex: u32 = std::fs::read_to_string(format!("/sys/class/net/{here}/ifindex"))
        .expect("ifindex")
        .trim()
        .parse()
        .expect("an ifindex");
    let own = dcmon_agent::collector::net::ebpf::own_netns(&Host::default()).expect("own netns");
    let slot = probes.net_slot(NetKey { ifindex, netns: own }).expect("slot").expect("a counter slot");
    assert!(slot >= dcmon_common::ebpf::NET_DROP_SLOTS, "{here} got slot {slot}, one with drop counters");
    let reason = (0..dcmon_common::ebpf::DROP_REASONS as usize)
        .find(|&i| probes.drop_reason_name(i) == Some("NETFILTER_DROP"))
        .expect("this kernel names NETFILTER_DROP");
    let overflow = || probes.net_drops(OVERFLOW_SLOT).expect("read drops").reasons[reason];
    let (before, nft_before) = (overflow(), table.dropped());
    peer_ns.within(|| {
        let s = std::net::UdpSocket::bind("10.216.0.2:0").expect("bind");
        for _ in 0..DROPPED_PACKETS {
            s.send_to(b"dropped", "10.216.0.1:9").expect("send");
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let nft = table.dropped() - nft_before;
    assert_eq!(nft, DROPPED_PACKETS as u64, "nft rule counter");
    // Other tests' netfilter drops on interfaces without a slot here land there too: at least ours.
    let delta = overflow() - before;
    assert!(delta >= nft, "{nft} drops on {here} (slot {slot}) not in the overflow: {delta}");
    let own_series = drops_by_reason(&mut collector, &here);
    assert!(own_series.is_empty(), "{here} has no drop counters, yet reports {own_series:?}");
}

/// Deletes link `name` (in this namespace) on drop.
fn scopeguard_link(name: &str) -> impl Drop {
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    Link(name.to_owned())
}

/// RetransSegs of /proc/net/snmp in namespace `ns` (the counter is per namespace).
fn retrans_segs(ns: &Netns) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/snmp"]);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().expect("Tcp: header"), tcp.next().expect("Tcp: values"));
    let i = names.split_whitespace().position(|n| n == "RetransSegs").expect("RetransSegs column");
    values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).expect("RetransSegs value")
}

#[test]
fn tcp_retransmits_equal_retrans_segs() {
    if !can_run("TCP retransmits") {
        return;
    }
    // Count only namespace A's sockets, whose /proc/net/snmp the test compares with.
    let a = Netns::new("rtxa");
    let b = Netns::new("rtxb");
    let probes = match Probes::attach(Some(a.inode())) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            assert!(!required(), "DCMON_REQUIRE_EBPF=1 but eBPF failed: {e}");
            return eprintln!("SKIP: {e}");
        }
    };
    let (va, vb) = (format!("dcr{}", std::process::id()), format!("dcs{}", std::process::id()));
    run(&["ip", "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name]);
    a.exec(&["ip", "addr", "add", "10.215.0.1/30", "dev", &va]);
    b.exec(&["ip", "addr", "add", "10.215.0.2/30", "dev", &vb]);
    a.exec(&["ip", "link", "set", &va, "up"]);
    b.exec(&["ip", "link", "set", &vb, "up"]);
    let listener = b.within(|| std::net::TcpListener::bind("10.215.0.2:7000").expect("listen"));
    let client = a.within(|| std::net::TcpStream::connect("10.215.0.2:7000").expect("connect"));
    let (_server, _) = listener.accept().expect("accept");
    client.set_nodelay(true).expect("nodelay");
    (&client).write_all(b"before the drop").expect("write");
    std::thread::sleep(Duration::from_millis(200));

    let before = stable_snapshot(
        &format!("TCP in namespace {}", a.name),
        || probes.tcp_counts().expect("tcp map"),
        || retrans_segs(&a),
    );
    // B drops everything from A: A's data is never acknowledged and its timer retransmits it.
    b.exec(&["nft", "add", "table", "inet", "dcmon_rtx"]);
    b.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "dcmon_rtx",
        "input",
        "{ type filter hook input priority 0; policy accept; }",
    ]);
    b.exec(&["nft", "add", "rule", "inet", "dcmon_rtx", "input", "ip", "saddr", "10.215.0.1", "drop"]);
    for _ in 0..3 {
        (&client).write_all(b"dropped").expect("write");
    }
    std::thread::sleep(Duration::from_millis(1700));
    // A reset ends the connection and its timer, so nothing retransmits between the reads.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: SO_LINGER with a valid struct linger of the size passed, on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(client);
    std::thread::sleep(Duration::from_millis(100));
    let after = stable_snapshot(
        &format!("TCP in namespace {}", a.name),
        || probes.tcp_counts().expect("tcp map"),
        || retrans_segs(&a),
    );
    let ebpf = after.0.retrans_segs[0] - before.0.retrans_segs[0];
    let snmp = after.1 - before.1;
    eprintln!(
        "retransmits: eBPF {ebpf}, RetransSegs {snmp}; resets sent {}",
        after.0.resets_sent - before.0.resets_sent
    );
    assert!(snmp >= 2, "the drop forced too few retransmits: {snmp}");
    assert_eq!(ebpf, snmp, "tcp_retransmits_total{{family=ipv4}} against RetransSegs");
    assert_eq!(after.0.retrans_segs[1], before.0.retrans_segs[1], "no IPv6 retransmits in namespace A");
    assert_eq!(after.0.resets_sent - before.0.resets_sent, 1, "the linger-0 close sends one reset");
}

#[test]
fn an_oom_kill_is_counted_once_with_its_job() {
    let Some(probes) = attach("OOM kills") else {
        return;
    };
    let memory = std::path::Path::new("/sys/fs/cgroup/memory");
    if !memory.join("memory.limit_in_bytes").exists() {
        assert!(!required(), "DCMON_REQUIRE_EBPF=1 but there is no cgroup v1 memory controller");
        return eprintln!("SKIP: no cgroup v1 memory controller");
    }
    // A Slurm job's layout, so the kill's job is `slurm:<id>`.
    let id = std::process::id();
    let top = memory.join(format!("slurm_dcmon_t{id}"));
    let job = top.join(format!("job_{id}"));
    std::fs::create_dir_all(&job).expect("mkdir memory cgroup");
    struct Remove(Vec<std::path::PathBuf>);
    impl Drop for Remove {
        fn drop(&mut self) {
            for dir in &self.0 {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    let _remove = Remove(vec![job.clone(), top.clone()]);
    std::fs::write(job.join("memory.limit_in_bytes"), "16M").expect("memory limit");
    let _ = std::fs::write(job.join("memory.memsw.limit_in_bytes"), "16M");

    let mut collector = dcmon_agent::collector::ebpf_status::EbpfStatusCollector::new(Host::default(), Some(probes));
    let kills = |collector: &mut dcmon_agent::collector::ebpf_status::EbpfStatusCollector| {
        let mut samples = Vec::new();
        collector.collect(&mut samples).expect("collect");
        samples
            .into_iter()
            .filter(|s| s.name == "oom_kills_total")
            .map(|s| (s.labels[0].1.to_string(), s.value.as_f64() as u64))
            .collect::<Vec<_>>()
    };
    assert_eq!(kills(&mut collector), vec![], "no kills before");
    // `tail` keeps an endless line of /dev/zero in memory until the limit kills it.
    let procs = job.join("cgroup.procs");
    let status = Command::new("sh")
        .args(["-c", &format!("echo $$ > {} && exec tail /dev/zero", procs.display())])
        .status()
        .expect("run the memory hog");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{status:?}");
    let control = std::fs::read_to_string(job.join("memory.oom_control")).expect("oom_control");
    assert!(control.contains("oom_kill 1"), "the cgroup's own count: {control}");
    assert_eq!(kills(&mut collector), vec![(format!("slurm:{id}"), 1)]);
}

/// `dcmon_ebpf_overflow_total{map}` as `collector` reports it now.
fn overflow_total(collector: &mut dyn Collector, map: &str) -> u64 {
    let mut samples = Vec::new();
    collector.collect(&mut samples).expect("collect");
    let found: Vec<u64> = samples
        .iter()
        .filter(|s| s.name == "dcmon_ebpf_overflow_total" && s.labels.iter().any(|(k, v)| *k == "map" && v == map))
        .map(|s| s.value.as_f64() as u64)
        .collect();
    assert_eq!(found.len(), 1, "one dcmon_ebpf_overflow_total{{map={map}}}: {found:?}");
    found[0]
}

/// With every disk and interface slot taken (by device numbers and interface indexes no device
/// has), a new loop disk and the host's interfaces get none: their I/O is counted in the
/// overflow slots, and their counters come from /proc and sysfs, still exact.
#[test]
fn devices_beyond_the_slots_are_counted_in_the_overflow_and_read_from_proc() {
    let Some(probes) = attach("devices beyond the slots") else {
        return;
    };
    let mut minor = 0;
    while probes.disk_slot(DiskKey::new(4095, minor)).expect("disk slot").is_some() {
        minor += 1;
    }
    assert_eq!(minor, dcmon_common::ebpf::DISK_SLOTS - 1, "every disk slot but the overflow handed out");
    let mut ifindex = 1_000_000;
    while probes.net_slot(NetKey { ifindex, netns: 1 }).expect("interface slot").is_some() {
        ifindex += 1;
    }
    let slots = probes.net_slot_count().expect("slot count");
    assert_eq!(ifindex - 1_000_000, slots - 2, "every interface slot handed out");

    let lo = Loop::new(16 << 20);
    let _ = Command::new("udevadm").arg("settle").status();
    let mut disks = EbpfDiskCollector::new(Host::default(), match_all(), probes.clone()).expect("disk collector");
    let mut nets = EbpfNetCollector::new(Host::default(), match_all(), probes.clone()).expect("net collector");
    let (disk0, net0) = (overflow_total(&mut disks, "disk"), overflow_total(&mut nets, "net"));

    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&lo.dev)
        .expect("open loop device O_DIRECT");
    let buf = Aligned::new(4096);
    for i in 0..READS {
        // SAFETY: 4 KiB aligned buffer, open fd.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.ptr.cast(), 4096, (i * 4096) as libc::off_t) };
        assert_eq!(n, 4096, "pread: {}", std::io::Error::last_os_error());
    }
    drop(f);
    // A port of its own: this test runs in the host's namespace, beside anything else there.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free port").port();
    let addr = format!("127.0.0.1:{port}");
    udp_exchange(&addr, "127.0.0.1:0", &addr);

    // Other I/O on the host lands in the overflow too: at least ours.
    let disk_overflow = overflow_total(&mut disks, "disk") - disk0;
    let net_overflow = overflow_total(&mut nets, "net") - net0;
    eprintln!("overflow: disk {disk_overflow} completions, net {net_overflow} packets");
    assert!(disk_overflow >= READS as u64, "{READS} reads of {} not in the overflow: {disk_overflow}", lo.name());
    assert!(net_overflow >= 2 * PACKETS as u64, "{PACKETS} loopback round trips not in the overflow: {net_overflow}");

    let reported = (0..20)
        .find_map(|_| {
            let before = proc_disk(lo.name());
            let c = disks.read_all().expect("read").into_iter().find(|d| d.device == lo.name()).expect("loop reported");
            (proc_disk(lo.name()) == before).then_some((c, before))
        })
        .expect("/proc/diskstats kept changing");
    assert_eq!(reported.0, reported.1, "a disk without a slot reports /proc's counters");
    assert!(reported.1.reads >= READS as u64);
    let lo_net = nets.read_all().expect("read").into_iter().find(|i| i.interface == "lo").expect("lo reported");
    assert!(lo_net.receive_bytes >= (PACKETS * PAYLOAD) as u64, "lo from /proc/net/dev: {lo_net:?}");
}
