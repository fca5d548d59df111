//! XID lines as drivers print them, /dev/kmsg records, the reader on a file and a FIFO standing
//! in for /dev/kmsg, and the ledger's matching and restarts.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::kmsg::{KmsgSink, XidLine, follow, parse_record, parse_xid};
use super::ledger::{GpuIdentity, Ledger, MATCH_WINDOW_US, PciAddr, Sighting, Source};

fn addr(domain: u32, bus: u8, device: u8) -> PciAddr {
    PciAddr { domain, bus, device }
}

fn xid(message: &str) -> Option<(PciAddr, u32)> {
    parse_xid(message).map(|l| (l.gpu, l.xid))
}

#[test]
fn xid_lines_of_each_driver_generation() {
    // R470 and later: pid and process name.
    assert_eq!(
        xid("NVRM: Xid (PCI:0000:18:00): 79, pid=1234, name=python, GPU has fallen off the bus."),
        Some((addr(0, 0x18, 0), 79))
    );
    // The process unknown (the driver's own work).
    assert_eq!(
        xid(
            "NVRM: Xid (PCI:0000:cb:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception on (GPC 7, TPC 7, SM 0): Illegal Instruction Parameter"
        ),
        Some((addr(0, 0xcb, 0), 13))
    );
    assert_eq!(
        xid(
            "NVRM: Xid (PCI:0000:cb:00): 109, pid=1797828, name=pt_main_thread, Ch 00000008, errorString CTX SWITCH TIMEOUT, Info 0x58005"
        ),
        Some((addr(0, 0xcb, 0), 109))
    );
    // Older drivers: no pid, hex words after the code.
    assert_eq!(
        xid("NVRM: Xid (PCI:0000:01:00): 31, Ch 00000003, engmask 00000101, intr 10000000"),
        Some((addr(0, 1, 0), 31))
    );
    assert_eq!(xid("NVRM: Xid (PCI:0000:06:00): 79, GPU has fallen off the bus."), Some((addr(0, 6, 0), 79)));
    // Older still: no `PCI:`.
    assert_eq!(xid("NVRM: Xid (0000:04:00): 8, Channel 00000001"), Some((addr(0, 4, 0), 8)));
    // Recent drivers: NVLink XIDs on Grace systems' non-zero domains, GSP timeouts, recovery.
    assert_eq!(
        xid(
            "NVRM: Xid (PCI:0019:01:00): 149, NETIR Fatal XC0 i0 Link -1 (0x000fe406 0x00000000 0x00000000 0x00000000 0x00000000 0x00000000)"
        ),
        Some((addr(0x19, 1, 0), 149))
    );
    assert_eq!(
        xid(
            "NVRM: Xid (PCI:0000:17:00): 119, pid=3456, name=python3, Timeout after 6s of waiting for RPC response from GPU0 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20802a02 0x8)."
        ),
        Some((addr(0, 0x17, 0), 119))
    );
    assert_eq!(
        xid(
            "NVRM: Xid (PCI:0000:9b:00): 94, pid=1234, name=python3, Contained: CE User Channel (0x2). RST: No, D-RST: No"
        ),
        Some((addr(0, 0x9b, 0), 94))
    );
    assert_eq!(xid("NVRM: Xid (PCI:0000:ed:00): 45"), Some((addr(0, 0xed, 0), 45)));
    // Not GPU XIDs: NVSwitch SXids, other NVRM lines, malformed codes.
    assert_eq!(xid("NVRM: SXid (PCI:0000:88:00.0): 12028, Non-fatal, Link 32 egress non-posted PRIV error"), None);
    assert_eq!(xid("NVRM: GPU at PCI:0000:18:00: GPU-11111111-2222-3333-4444-555555555555"), None);
    assert_eq!(xid("NVRM: GPU 0000:18:00.0: GPU has fallen off the bus."), None);
    assert_eq!(xid("NVRM: Xid (PCI:0000:18:00): x79, GPU has fallen off the bus."), None);
    assert_eq!(xid("NVRM: Xid (PCI:zz:18:00): 79, bad address"), None);
}

#[test]
fn several_gpus_in_one_log() {
    let log = "\
kernel: NVRM: Xid (PCI:0000:dc:00): 45, pid=1818990, name=python3, Ch 00000001 caused by previous Xid 149
kernel: NVRM: Xid (PCI:0000:ed:00): 45, pid=1818992, name=python3, Ch 0000000c caused by previous Xid 145
kernel: NVRM: Xid (PCI:0000:ba:00): 45, pid=1818989, name=python3, Ch 00000002 caused by previous Xid 145
kernel: NVRM: Xid (PCI:0000:97:00): 45, pid=1818987, name=python3, Ch 00000003 caused by previous Xid 145
";
    let got: Vec<(PciAddr, u32)> = log.lines().filter_map(xid).collect();
    assert_eq!(got, [(addr(0, 0xdc, 0), 45), (addr(0, 0xed, 0), 45), (addr(0, 0xba, 0), 45), (addr(0, 0x97, 0), 45)]);
}

#[test]
fn kmsg_records_and_pci_addresses() {
    let r = parse_record("3,1234,5678901234,-;NVRM: Xid (PCI:0000:18:00): 79, GPU has fallen off the bus.")
        .expect("record");
    assert_eq!((r.seq, r.ts_us), (1234, 5_678_901_234));
    assert!(r.message.starts_with("NVRM: Xid"));
    // Facility and level together, the continuation flag, a ';' in the text.
    let r = parse_record("11,7,100,c;a;b").expect("record");
    assert_eq!((r.seq, r.ts_us, r.message), (7, 100, "a;b"));
    assert_eq!(parse_record(" SUBSYSTEM=pci"), None);
    assert_eq!(parse_record(" DEVICE=+pci:0000:18:00.0"), None);
    assert_eq!(parse_record("x,1,2,-;text"), None);

    for text in ["0000:18:00", "00000000:18:00.0", "PCI:0000:18:00", "0000:18:00.0", " 00000000:18:00.0\n"] {
        assert_eq!(PciAddr::parse(text), Some(addr(0, 0x18, 0)), "{text}");
    }
    assert_eq!(PciAddr::parse("00000000:3B:00.0"), PciAddr::parse("0000:3b:00"));
    assert_eq!(addr(0x19, 1, 0).to_string(), "00000019:01:00.0");
    for bad in ["", "18:00", "0000:18", "0000:118:00", "000000000:18:00.0", "0000:18:00:00"] {
        assert_eq!(PciAddr::parse(bad), None, "{bad}");
    }
}

fn sighting(source: Source, gpu: PciAddr, xid: u32, at_us: u64, live: bool) -> Sighting {
    Sighting { source, gpu, xid, at_us, live }
}

const GPU0: PciAddr = PciAddr { domain: 0, bus: 0x18, device: 0 };
const GPU1: PciAddr = PciAddr { domain: 0, bus: 0x3b, device: 0 };

#[test]
fn the_same_xid_from_both_sources_counts_once() {
    let mut ledger = Ledger::load(None, None);
    let t = 1_000_000_000;
    ledger.kmsg(1, sighting(Source::Kmsg, GPU0, 79, t, true));
    ledger.nvml(sighting(Source::Nvml, GPU0, 79, t + 3_000, true));
    assert_eq!(ledger.count(GPU0, 79), 1);
    // NVML first this time; a burst pairs one to one.
    for i in 0..3 {
        ledger.nvml(sighting(Source::Nvml, GPU1, 13, t + i * 1000, true));
    }
    for (seq, i) in (2..).zip(0..3) {
        ledger.kmsg(seq, sighting(Source::Kmsg, GPU1, 13, t + i * 1000 + 50, true));
    }
    assert_eq!(ledger.count(GPU1, 13), 3);
    // Another GPU, another code, or too far apart: separate XIDs.
    ledger.nvml(sighting(Source::Nvml, GPU1, 79, t, true));
    ledger.kmsg(10, sighting(Source::Kmsg, GPU0, 13, t, true));
    ledger.nvml(sighting(Source::Nvml, GPU0, 48, t, true));
    ledger.kmsg(11, sighting(Source::Kmsg, GPU0, 48, t + MATCH_WINDOW_US + 1, true));
    assert_eq!((ledger.count(GPU1, 79), ledger.count(GPU0, 13), ledger.count(GPU0, 48)), (1, 1, 2));
    // A line of the ring read at start is not this run's NVML event.
    ledger.nvml(sighting(Source::Nvml, GPU0, 63, t, true));
    ledger.kmsg(12, sighting(Source::Kmsg, GPU0, 63, t, false));
    assert_eq!(ledger.count(GPU0, 63), 2);
}

#[test]
fn unmatched_sightings_are_forgotten_after_a_while() {
    let mut ledger = Ledger::load(None, None);
    ledger.nvml(sighting(Source::Nvml, GPU0, 79, 1_000_000, true));
    ledger.prune(1_000_000 + 3_600_000_000);
    ledger.kmsg(1, sighting(Source::Kmsg, GPU0, 79, 1_000_000, true));
    assert_eq!(ledger.count(GPU0, 79), 2);
}

fn identity(index: u32, bus_id: &str) -> GpuIdentity {
    GpuIdentity { index, model: "NVIDIA H100 80GB HBM3".into(), bus_id: bus_id.into(), uuid: format!("GPU-{index}") }
}

#[test]
fn counts_survive_a_restart_within_a_boot_and_reset_on_a_new_boot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state/gpu-xid.state");
    let boot = "6d6f6f6e-0000-4000-8000-000000000001";
    let mut ledger = Ledger::load(Some(&path), Some(boot));
    ledger.set_gpus(vec![identity(0, "00000000:18:00.0")]);
    ledger.kmsg(100, sighting(Source::Kmsg, GPU0, 79, 5_000_000, false));
    ledger.kmsg(101, sighting(Source::Kmsg, GPU0, 79, 6_000_000, false));
    // An NVML event whose line the kernel had not yet handed over when the agent stopped.
    ledger.nvml(sighting(Source::Nvml, GPU0, 48, 9_000_000, true));
    ledger.save_if_changed().expect("save");

    // Restart: the ring is read again from its start.
    let mut ledger = Ledger::load(Some(&path), Some(boot));
    ledger.kmsg(100, sighting(Source::Kmsg, GPU0, 79, 5_000_000, false));
    ledger.kmsg(101, sighting(Source::Kmsg, GPU0, 79, 6_000_000, false));
    ledger.kmsg(102, sighting(Source::Kmsg, GPU0, 48, 9_000_400, false));
    ledger.past_read();
    assert_eq!((ledger.count(GPU0, 79), ledger.count(GPU0, 48)), (2, 1));
    // A new line after the restart counts.
    ledger.kmsg(103, sighting(Source::Kmsg, GPU0, 79, 20_000_000, false));
    assert_eq!(ledger.count(GPU0, 79), 3);
    ledger.save_if_changed().expect("save");
    let samples = ledger.samples();
    let labels: Vec<String> = samples[1].labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(labels, ["gpu=0", "model=NVIDIA H100 80GB HBM3", "bus_id=00000000:18:00.0", "uuid=GPU-0", "xid=79"]);
    assert_eq!(samples[1].value.as_f64(), 3.0);

    // A new boot: from zero, the labels kept.
    let ledger = Ledger::load(Some(&path), Some("6d6f6f6e-0000-4000-8000-000000000002"));
    assert_eq!(ledger.count(GPU0, 79), 0);
    assert!(ledger.samples().is_empty());

    // A corrupt file: afresh.
    std::fs::write(&path, b"{not json").expect("write");
    assert_eq!(Ledger::load(Some(&path), Some(boot)).count(GPU0, 79), 0);
}

#[test]
fn an_unknown_gpu_is_reported_by_its_bus_id() {
    let mut ledger = Ledger::load(None, None);
    ledger.kmsg(1, sighting(Source::Kmsg, addr(0x19, 1, 0), 149, 1, false));
    let samples = ledger.samples();
    let labels: Vec<String> = samples[0].labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(labels, ["bus_id=00000019:01:00.0", "xid=149"]);
}

/// What the reader reported.
#[derive(Debug, Default)]
struct Seen {
    xids: Vec<(u64, PciAddr, u32, u64, bool)>,
    caught_up: usize,
}

#[derive(Clone, Default)]
struct SeenSink(Arc<Mutex<Seen>>);

impl KmsgSink for SeenSink {
    fn xid(&mut self, seq: u64, line: XidLine, ts_us: u64, live: bool) {
        self.0.lock().expect("lock").xids.push((seq, line.gpu, line.xid, ts_us, live));
    }
    fn caught_up(&mut self) {
        self.0.lock().expect("lock").caught_up += 1;
    }
}

/// Records as /dev/kmsg hands them out: continuation lines, other messages, an SXid.
const RING: &str = "\
6,1,0,-;Linux version 6.18.0 (builder@debian) #1 SMP PREEMPT_DYNAMIC
4,2050,5123456,-;NVRM: Xid (PCI:0000:18:00): 79, pid=1234, name=python, GPU has fallen off the bus.
 SUBSYSTEM=pci
 DEVICE=+pci:0000:18:00.0
4,2051,5123999,-;NVRM: GPU 0000:18:00.0: GPU has fallen off the bus.
4,2052,6000000,-;NVRM: SXid (PCI:0000:88:00.0): 12028, Non-fatal, Link 32 egress non-posted PRIV error
4,2053,7000000,-;NVRM: Xid (PCI:0000:3b:00): 13, pid='<unknown>', name=<unknown>, Graphics Exception: ESR 0x405840=0x0
";

fn wait_for(seen: &Arc<Mutex<Seen>>, what: &str, done: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(&seen.lock().expect("lock")) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}", seen.lock().expect("lock"));
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn reader_reads_the_ring_then_follows_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kmsg");
    std::fs::write(&path, RING).expect("write");
    let sink = SeenSink::default();
    let seen = Arc::clone(&sink.0);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, stop, mut sink) = (path.clone(), Arc::clone(&stop), sink.clone());
        std::thread::spawn(move || follow(&path, &mut sink, &stop))
    };
    wait_for(&seen, "the ring", |s| s.caught_up == 1);
    assert_eq!(
        seen.lock().expect("lock").xids,
        [(2050, GPU0, 79, 5_123_456, false), (2053, GPU1, 13, 7_000_000, false)]
    );
    // A record written after: live. Written in two pieces, as a slow writer might.
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("open");
    std::io::Write::write_all(&mut f, b"4,2054,9000000,-;NVRM: Xid (PCI:0000:3b:00): 48, pid=77,").expect("write");
    std::thread::sleep(Duration::from_millis(250));
    std::io::Write::write_all(&mut f, b" name=x, An uncorrectable double bit error\n").expect("write");
    wait_for(&seen, "the live line", |s| s.xids.len() == 3);
    assert_eq!(seen.lock().expect("lock").xids[2], (2054, GPU1, 48, 9_000_000, true));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().expect("reader ends when stopped");
    assert_eq!(seen.lock().expect("lock").caught_up, 1);
}

#[test]
fn reader_on_a_fifo_and_without_a_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = crate::secure_file::test_support::mkfifo(dir.path(), "kmsg");
    let sink = SeenSink::default();
    let seen = Arc::clone(&sink.0);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, stop, mut sink) = (fifo.clone(), Arc::clone(&stop), sink.clone());
        std::thread::spawn(move || follow(&path, &mut sink, &stop))
    };
    wait_for(&seen, "an empty FIFO to be caught up", |s| s.caught_up == 1);
    std::fs::write(&fifo, "4,9,1,-;NVRM: Xid (PCI:0000:18:00): 79, GPU has fallen off the bus.\n").expect("write");
    wait_for(&seen, "the FIFO's line", |s| s.xids.len() == 1);
    assert_eq!(seen.lock().expect("lock").xids[0], (9, GPU0, 79, 1, true));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().expect("reader ends when stopped");

    // No log at all: caught up at once, the reader ends.
    let mut sink = SeenSink::default();
    follow(&dir.path().join("missing"), &mut sink, &AtomicBool::new(false));
    assert_eq!(sink.0.lock().expect("lock").caught_up, 1);
}

#[test]
fn caught_up_is_reported_at_the_end_of_the_ring_not_after_the_wait() {
    use std::io::Write as _;
    // A FIFO held open for writing reads like /dev/kmsg at its end: EAGAIN, then poll(2).
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = crate::secure_file::test_support::mkfifo(dir.path(), "kmsg");
    let mut writer = std::fs::File::options().read(true).write(true).open(&fifo).expect("open FIFO");
    writer.write_all(b"4,3,1,-;NVRM: Xid (PCI:0000:18:00): 79, GPU has fallen off the bus.\n").expect("write");
    let sink = SeenSink::default();
    let seen = Arc::clone(&sink.0);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let reader = {
        let (path, stop, mut sink) = (fifo.clone(), Arc::clone(&stop), sink.clone());
        std::thread::spawn(move || follow(&path, &mut sink, &stop))
    };
    wait_for(&seen, "the FIFO to be caught up", |s| s.caught_up == 1);
    let waited = started.elapsed();
    // The agent's first round waits for this: it must not take the poll's timeout.
    let poll_timeout = Duration::from_millis(super::kmsg::POLL_TIMEOUT_MS.unsigned_abs().into());
    assert!(waited < poll_timeout / 2, "caught up after {waited:?}, poll timeout {poll_timeout:?}");
    assert_eq!(seen.lock().expect("lock").xids, [(3, GPU0, 79, 1, false)]);
    writer.write_all(b"4,4,2,-;NVRM: Xid (PCI:0000:18:00): 48, DBE.\n").expect("write");
    wait_for(&seen, "the live line", |s| s.xids.len() == 2);
    assert_eq!(seen.lock().expect("lock").xids[1], (4, GPU0, 48, 2, true));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.write_all(b"4,5,3,-;wake up\n").expect("write");
    reader.join().expect("reader ends when stopped");
}

#[test]
fn this_hosts_kernel_log_parses_when_readable() {
    use std::io::BufRead as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // /dev/kmsg of the machine running the tests (root in CI): every record well-formed.
    let Ok(file) = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map(std::io::BufReader::new)
    else {
        return;
    };
    let mut records = 0;
    for line in file.lines() {
        let Ok(line) = line else { break };
        if !line.starts_with(' ') {
            assert!(parse_record(&line).is_some(), "{line:?}");
            records += 1;
        }
    }
    assert!(records > 0);
    // The reader on it: the ring to its end (EAGAIN), then waiting in poll(2) until stopped.
    let sink = SeenSink::default();
    let seen = Arc::clone(&sink.0);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, mut sink) = (Arc::clone(&stop), sink.clone());
        std::thread::spawn(move || follow(std::path::Path::new("/dev/kmsg"), &mut sink, &stop))
    };
    wait_for(&seen, "this host's ring to be read", |s| s.caught_up == 1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // A record wakes the reader's poll(2) at once instead of at its timeout (root can write the
    // log; without the permission the join waits that timeout out).
    let _ = std::fs::write("/dev/kmsg", "dcmon test: waking the kernel log reader\n");
    reader.join().expect("reader ends when stopped");
}

proptest::proptest! {
    /// Any line: no panic, and an XID found names the code written after the address.
    #[test]
    fn any_line_parses_without_panicking(prefix in "\\PC{0,40}", bus in 0u8.., code in 0u32.., rest in "\\PC{0,40}") {
        let _ = parse_record(&prefix);
        let _ = parse_xid(&prefix);
        let line = format!("{prefix}NVRM: Xid (PCI:0000:{bus:02x}:00): {code}, {rest}");
        let found = parse_xid(&line).expect("an XID line");
        proptest::prop_assert_eq!((found.gpu, found.xid), (addr(0, bus, 0), code));
    }
}
