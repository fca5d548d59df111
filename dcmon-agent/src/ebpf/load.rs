//! Loading the embedded object, filling in the kernel's field offsets and attaching the
//! programs; failures are classified by kind and errno so the fallback log line says why.

use std::error::Error as StdError;
use std::io;
use std::path::Path;

use aya::programs::BtfTracePoint;
use aya::{Ebpf, EbpfLoader};
use dcmon_common::ebpf::{
    DISK_MAP, DISK_SLOTS, DROP_REASON_CONSUMED, DROP_REASONS, IssueStamps, NET_MAP, NET_SLOT_COUNT, NET_SLOT_MAP,
    NET_SLOT_MASK, NETNS_FILTER, OFF_CSS_SET_MEMCG, OFF_Q_QUEUE_FLAGS, OFF_RQ_IO_START, OFFSETS, PROGRAM_NEEDS,
    PROGRAM_OFFSETS, PROGRAMS, QUEUE_FLAG_STATS, QUEUE_STATS_MASK, STAMP_OFFSETS, TCP_RETRANSMIT_HAS_ERR, issue_stamps,
    net_slot_table_entries, net_slots_for, per_cpu_entries,
};

use super::btf::{Btf, BtfError};

/// The BPF object built by `cargo xtask build-ebpf` from dcmon-ebpf and committed in the repo,
/// so that building the agent needs no BPF toolchain.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../../ebpf/dcmon-ebpf.o");

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Why the programs could not be loaded, in the terms an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// EPERM/EACCES: needs root or CAP_BPF + CAP_PERFMON.
    NoPrivilege,
    /// ENOSYS: the kernel was built without the bpf() syscall.
    NoBpf,
    /// No /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF off): tp_btf cannot attach.
    NoBtf,
    /// A tracepoint the programs attach to does not exist in this kernel.
    MissingTracepoint,
    /// The kernel's structs lack a field the programs read.
    KernelLayout,
    /// EAGAIN, EINTR or EBUSY: the kernel refused for the moment (the verifier gives up with
    /// EAGAIN when a signal arrives, such as a SIGHUP during a reload); worth trying again.
    Transient,
    /// The kernel's verifier ran and refused a program (it answers EACCES or EINVAL, with its
    /// log; missing privilege fails before it runs, with no log).
    VerifierRefused,
    /// Anything else (resource limits...).
    Other,
}

impl Reason {
    fn describe(self) -> &'static str {
        match self {
            Self::NoPrivilege => "no privilege to load BPF programs (run as root or with CAP_BPF and CAP_PERFMON)",
            Self::NoBpf => "this kernel has no BPF support (bpf() returned ENOSYS)",
            Self::NoBtf => "this kernel has no BTF (CONFIG_DEBUG_INFO_BTF)",
            Self::MissingTracepoint => "a tracepoint the programs need is missing in this kernel",
            Self::KernelLayout => "this kernel's structs lack a field the programs read",
            Self::Transient => "the kernel kept refusing the BPF programs for the moment (EAGAIN, EINTR or EBUSY)",
            Self::VerifierRefused => "this kernel's BPF verifier refused the program",
            Self::Other => "loading the BPF programs failed",
        }
    }
}

/// A load or attach failure: the reason and the underlying detail (file, program, errno).
#[derive(Debug, thiserror::Error)]
#[error("{}: {detail}", reason.describe())]
pub struct LoadError {
    /// What kind of failure this is.
    pub reason: Reason,
    /// The step and the error it returned.
    pub detail: String,
}

/// The first errno found down an error's source chain.
fn errno_of(e: &(dyn StdError + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && let Some(n) = io.raw_os_error()
        {
            return Some(n);
        }
        cur = err.source();
    }
    None
}

/// Whether aya said a BTF type (`btf_trace_<name>`, the tp_btf attach target) is unknown.
fn unknown_btf_type(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        use aya::BtfError::UnknownBtfTypeName;
        // `#[error(transparent)]` wrappers hide the BtfError from source(), so look inside the
        // wrappers that carry one too.
        let btf = err
            .downcast_ref::<aya::BtfError>()
            .or_else(|| match err.downcast_ref::<aya::programs::ProgramError>() {
                Some(aya::programs::ProgramError::Btf(b)) => Some(b),
                _ => None,
            })
            .or_else(|| match err.downcast_ref::<aya::EbpfError>() {
                Some(aya::EbpfError::BtfError(b)) => Some(b),
                _ => None,
            });
        if let Some(UnknownBtfTypeName { .. }) = btf {
            return true;
        }
        cur = err.source();
    }
    false
}

fn classify(step: &str, e: &(dyn StdError + 'static), attaching: bool) -> LoadError {
    let errno = errno_of(e);
    if !matches!(errno, Some(libc::EAGAIN | libc::EINTR | libc::EBUSY))
        && let Some(log) = verifier_log(e)
    {
        let errno = errno.map_or_else(String::new, |n| format!(" ({})", io::Error::from_raw_os_error(n)));
        let detail = format!("{step}: BPF_PROG_LOAD{errno}, the verifier's last words: {}", verifier_log_tail(&log));
        return LoadError { reason: Reason::VerifierRefused, detail };
    }
    let reason = match errno {
        Some(libc::EPERM | libc::EACCES) => Reason::NoPrivilege,
        Some(libc::ENOSYS) => Reason::NoBpf,
        Some(libc::EAGAIN | libc::EINTR | libc::EBUSY) => Reason::Transient,
        Some(libc::ENOENT | libc::ESRCH) if attaching => Reason::MissingTracepoint,
        _ if unknown_btf_type(e) => Reason::MissingTracepoint,
        _ => Reason::Other,
    };
    let mut detail = format!("{step}: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        // aya's messages often embed their source's text already; don't say it twice.
        let text = s.to_string();
        if !detail.contains(&text) {
            detail.push_str(&format!(": {text}"));
        }
        src = s.source();
    }
    LoadError { reason, detail }
}

/// The verifier's log of a refused BPF_PROG_LOAD in `e`'s chain, when it wrote one.
fn verifier_log(e: &(dyn StdError + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(aya::programs::ProgramError::LoadError { verifier_log, .. }) = err.downcast_ref() {
            let log = verifier_log.to_string();
            return (!log.trim().is_empty()).then_some(log);
        }
        cur = err.source();
    }
    None
}

/// Lines of the verifier's log kept in the error: its log walks every instruction (thousands
/// of lines) and ends with why it refused and its statistics.
const VERIFIER_TAIL_LINES: usize = 4;

/// The last [`VERIFIER_TAIL_LINES`] non-empty lines of a verifier log, joined with " | ".
fn verifier_log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(VERIFIER_TAIL_LINES)..].join(" | ")
}

/// Largest BTF file read: kernels' are a few MB; a file far bigger is not one.
const BTF_MAX_BYTES: u64 = 256 << 20;

/// The kernel's BTF file, read once for our offset lookup.
fn read_btf(btf_path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read as _;
    let read = std::fs::File::open(btf_path).and_then(|f| {
        let mut data = Vec::with_capacity(f.metadata()?.len().min(BTF_MAX_BYTES) as usize);
        f.take(BTF_MAX_BYTES + 1).read_to_end(&mut data)?;
        Ok(data)
    });
    if let Ok(data) = &read
        && data.len() as u64 > BTF_MAX_BYTES
    {
        let detail = format!("{}: larger than {BTF_MAX_BYTES} bytes, not a kernel's BTF", btf_path.display());
        return Err(LoadError { reason: Reason::NoBtf, detail });
    }
    read.map_err(|e| LoadError {
        reason: match e.kind() {
            io::ErrorKind::NotFound => Reason::NoBtf,
            io::ErrorKind::PermissionDenied => Reason::NoPrivilege,
            _ => Reason::Other,
        },
        detail: format!("reading {}: {e}", btf_path.display()),
    })
}

/// Field offsets of the running kernel, `(global name, offset)` in [`OFFSETS`] order.
pub fn kernel_offsets(btf_path: &Path) -> Result<Vec<(&'static str, u32)>, LoadError> {
    let facts = kernel_facts(btf_path)?;
    match facts.missing.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(facts.offsets),
    }
}

/// What the loader reads from the kernel's BTF file `btf_path`.
pub fn kernel_facts(btf_path: &Path) -> Result<KernelFacts, LoadError> {
    facts_from(btf_path, &read_btf(btf_path)?)
}

/// What the loader reads from the kernel's BTF.
#[derive(Debug)]
pub struct KernelFacts {
    /// `(global, offset)` of every offset global; 0 for the missing ones.
    pub offsets: Vec<(&'static str, u32)>,
    /// The globals whose field this kernel lacks, with why: their programs are not loaded.
    pub missing: Vec<(&'static str, LoadError)>,
    /// See [`drop_reasons`].
    pub drop_reasons: DropReasonNames,
    /// `SKB_CONSUMED`'s value (u32::MAX if none).
    pub consumed: u32,
    /// 1 when the `tcp_retransmit_skb` tracepoint passes the attempt's error (see
    /// `dcmon_common::ebpf::TCP_RETRANSMIT_HAS_ERR`).
    pub retransmit_has_err: u32,
    /// `(tracepoint, type id of its btf_trace_<tracepoint> typedef)` for each tracepoint of
    /// [`PROGRAMS`] this kernel has: all a tp_btf program needs of the kernel's BTF.
    pub tracepoint_ids: Vec<(&'static str, u32)>,
    /// The offsets of `request.io_start_time_ns` and `request_queue.queue_flags`
    /// (`dcmon_common::ebpf::STAMP_OFFSETS`) and the value of `QUEUE_FLAG_STATS`, each None
    /// when this kernel's BTF lacks it.
    pub stamp_facts: [Option<u32>; 3],
    /// Where the programs take issue times from: chosen by [`load_object_with`] from
    /// `stamp_facts` ([`IssueStamps::Table`] until then).
    pub issue_stamps: IssueStamps,
}

/// Whether the programs may time requests from the kernel's own issue stamps where it has
/// them (`dcmon_common::ebpf::IssueStamps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelStamps {
    /// Where this kernel's BTF has what they need: the agent's choice.
    Use,
    /// Never: every request is stamped in the table, as on a kernel without them (tests run
    /// that path this way).
    Off,
}

/// The label of drop reason counter `i` (see `dcmon_common::ebpf::DROP_REASONS`): the kernel's
/// enumerator name without `SKB_DROP_REASON_`; `OTHER` for the shared last counter.
pub type DropReasonNames = Vec<String>;

/// The names of `enum skb_drop_reason`'s values as the running kernel has them, by value, and
/// its `SKB_CONSUMED` value (u32::MAX if none). A kernel without the enum (before 5.17) gives
/// no names.
fn drop_reasons(btf: &Btf) -> (DropReasonNames, u32) {
    let Ok(values) = btf.enum_values("skb_drop_reason") else { return (Vec::new(), u32::MAX) };
    let last = DROP_REASONS as usize - 1;
    let mut names: Vec<String> = (0..last).map(|v| format!("UNKNOWN_{v}")).collect();
    names.push("OTHER".to_owned());
    let mut consumed = u32::MAX;
    for (name, value) in values {
        if name == "SKB_CONSUMED" {
            consumed = value;
        }
        let short = name.strip_prefix("SKB_DROP_REASON_").or_else(|| name.strip_prefix("SKB_")).unwrap_or(&name);
        if (value as usize) < last {
            names[value as usize] = short.to_owned();
        }
    }
    (names, consumed)
}

/// The offsets ([`kernel_offsets`]), drop reasons ([`drop_reasons`]) and tracepoint type ids
/// from one BTF parse.
fn facts_from(btf_path: &Path, data: &[u8]) -> Result<KernelFacts, LoadError> {
    let btf = Btf::parse(data)
        .map_err(|e| LoadError { reason: Reason::NoBtf, detail: format!("{}: {e}", btf_path.display()) })?;
    let (drop_reasons, consumed) = drop_reasons(&btf);
    let found = OFFSETS
        .iter()
        .map(|&(global, strukt, field, size)| (global, btf.field_offset(strukt, field, size)))
        .chain([(OFF_CSS_SET_MEMCG, memcg_offset(&btf))]);
    let (mut offsets, mut missing) = (Vec::new(), Vec::new());
    for (global, off) in found {
        match off {
            Ok(off) => offsets.push((global, off)),
            Err(e) => {
                offsets.push((global, 0));
                let detail = format!("{}: {e}", btf_path.display());
                missing.push((global, LoadError { reason: Reason::KernelLayout, detail }));
            }
        }
    }
    let retransmit_has_err = u32::from(btf.tracepoint_args("tcp_retransmit_skb").is_some_and(|n| n >= 3));
    let tracepoint_ids = PROGRAMS.iter().filter_map(|&(_, tp)| Some((tp, btf.tracepoint_type_id(tp)?))).collect();
    let [(_, rq_strukt, rq_field, rq_size), (_, q_strukt, q_field, q_size)] = STAMP_OFFSETS;
    let stamp_facts = [
        btf.field_offset(rq_strukt, rq_field, rq_size).ok(),
        btf.field_offset(q_strukt, q_field, q_size).ok(),
        btf.enumerator(QUEUE_FLAG_STATS),
    ];
    Ok(KernelFacts {
        offsets,
        missing,
        drop_reasons,
        consumed,
        retransmit_has_err,
        tracepoint_ids,
        stamp_facts,
        issue_stamps: IssueStamps::Table,
    })
}

/// A stand-in for the kernel's BTF holding only what attaching tp_btf programs reads of it:
/// each `btf_trace_<tracepoint>` typedef of `tracepoint_ids` at the type id the kernel gives
/// it, every other id a nameless pointer. aya keeps a parsed BTF as one enum of every type
/// with its names, several times the size of the file (README, Performance); this one costs
/// a few bytes per id.
pub fn attach_btf(tracepoint_ids: &[(&str, u32)]) -> Result<aya::Btf, LoadError> {
    let last = tracepoint_ids.iter().map(|&(_, id)| id).max().unwrap_or(0);
    let mut strings = vec![0u8];
    let mut names = std::collections::HashMap::new();
    for &(tp, id) in tracepoint_ids {
        names.insert(id, strings.len() as u32);
        strings.extend_from_slice(format!("btf_trace_{tp}").as_bytes());
        strings.push(0);
    }
    let mut types = Vec::with_capacity(last as usize * 12);
    for id in 1..=last {
        // (name, kind << 24, referenced type): a TYPEDEF or a PTR, both to `void`.
        let (name, kind) = names.get(&id).map_or((0, 2u32), |&name| (name, 8));
        for word in [name, kind << 24, 0] {
            types.extend_from_slice(&word.to_le_bytes());
        }
    }
    let mut blob = Vec::with_capacity(24 + types.len() + strings.len());
    blob.extend_from_slice(&0xeb9f_u16.to_le_bytes());
    blob.extend_from_slice(&[1, 0]);
    for word in [24, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
        blob.extend_from_slice(&word.to_le_bytes());
    }
    blob.extend_from_slice(&types);
    drop(types);
    blob.extend_from_slice(&strings);
    aya::Btf::parse(&blob, aya::Endianness::Little)
        .map_err(|e| LoadError { reason: Reason::Other, detail: format!("building the tracepoints' BTF: {e}") })
}

/// The offset of `subsys[memory_cgrp_id]` in `struct css_set`: the array's place, and the
/// memory controller's index from `enum cgroup_subsys_id`.
fn memcg_offset(btf: &Btf) -> Result<u32, BtfError> {
    let ids = btf.enum_values("cgroup_subsys_id")?;
    let id = |name: &str| {
        ids.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| BtfError::NoField { strukt: "enum cgroup_subsys_id".to_owned(), field: name.to_owned() })
    };
    let (memory, count) = (id("memory_cgrp_id")?, id("CGROUP_SUBSYS_COUNT")?);
    Ok(btf.field_offset("css_set", "subsys", 8 * count)? + 8 * memory)
}

/// Best-effort RLIMIT_MEMLOCK to infinity: kernels before 5.11 charge BPF maps against it,
/// and a low limit would show up as a confusing EPERM.
fn raise_memlock() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct; failure is harmless (newer kernels use memcg).
    unsafe {
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim);
    }
}

/// Loads `object` with the running kernel's offsets, without attaching anything. `netns`:
/// count only that network namespace's interfaces (None: every namespace). Also returns the
/// BTF for attaching ([`attach_btf`]) and what was read from the kernel's BTF.
///
/// aya is given no kernel BTF: it would use it only for CO-RE relocations, and the object has
/// none (its programs read fields through the offset globals set here; a test checks this).
/// What attaching needs of it comes from [`attach_btf`].
pub fn load_object(object: &[u8], netns: Option<u32>) -> Result<(Ebpf, aya::Btf, KernelFacts), LoadError> {
    load_object_with(Path::new(VMLINUX_BTF), object, netns, KernelStamps::Use)
}

/// [`load_object`] with the kernel's BTF read from `btf_path` (under the configured host root).
pub fn load_object_with(
    btf_path: &Path,
    object: &[u8],
    netns: Option<u32>,
    kernel_stamps: KernelStamps,
) -> Result<(Ebpf, aya::Btf, KernelFacts), LoadError> {
    // `EbpfLoader::new` parses the whole kernel BTF into aya's types whatever is set later,
    // the biggest allocation of the load: made first and dropped at once, before anything else
    // is held, so the later steps reuse its freed heap instead of adding to the peak.
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    let mut facts = kernel_facts(btf_path)?;
    let tracepoints_btf = attach_btf(&facts.tracepoint_ids)?;
    raise_memlock();
    for (global, off) in &facts.offsets {
        loader.override_global(global, off, true);
    }
    let netns = netns.unwrap_or(0);
    loader.override_global(NETNS_FILTER, &netns, true);
    loader.override_global(TCP_RETRANSMIT_HAS_ERR, &facts.retransmit_has_err, true);
    loader.override_global(DROP_REASON_CONSUMED, &facts.consumed, true);
    let [io_start, queue_flags, stats_flag] = facts.stamp_facts;
    let (stamps, globals) = issue_stamps(io_start, queue_flags, stats_flag, kernel_stamps == KernelStamps::Use);
    loader.override_global(OFF_RQ_IO_START, &globals.off_rq_io_start, true);
    loader.override_global(OFF_Q_QUEUE_FLAGS, &globals.off_q_queue_flags, true);
    loader.override_global(QUEUE_STATS_MASK, &globals.queue_stats_mask, true);
    facts.issue_stamps = stamps;
    // The counters are laid out per CPU id (highest possible + 1: the list may have gaps), and
    // the interface counters take slots x CPU ids of kernel memory: as many slots as the budget
    // allows on this host, and the programs told the lengths they index.
    let cpu_ids = super::maps::possible_cpu_ids()
        .map_err(|e| LoadError { reason: Reason::Other, detail: format!("listing possible CPUs: {e}") })?;
    let span = super::maps::cpu_id_span(&cpu_ids);
    let net_slots = net_slots_for(span);
    let net_slot_mask = net_slot_table_entries(net_slots) - 1;
    let entries = |name: &str, slots: u32| {
        per_cpu_entries(span, slots).ok_or_else(|| LoadError {
            reason: Reason::Other,
            detail: format!("BPF map {name}: {slots} slots for each of {span} CPU ids overflow an array's length"),
        })
    };
    loader.map_max_entries(DISK_MAP, entries(DISK_MAP, DISK_SLOTS)?);
    loader.map_max_entries(NET_MAP, entries(NET_MAP, net_slots)?);
    loader.map_max_entries(NET_SLOT_MAP, net_slot_mask + 1);
    loader.override_global(NET_SLOT_COUNT, &net_slots, true);
    loader.override_global(NET_SLOT_MASK, &net_slot_mask, true);
    let ebpf = loader.load(object).map_err(|e| classify("loading the BPF object", &e, false))?;
    Ok((ebpf, tracepoints_btf, facts))
}

/// How many times a load that failed with a [`Reason::Transient`] error is tried in all, and
/// the wait before the first retry (doubled before each next one).
pub const LOAD_ATTEMPTS: u32 = 4;
const FIRST_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// `attempt()` until it succeeds, fails for good, or has failed with a transient error
/// [`LOAD_ATTEMPTS`] times (each retry logged at debug level).
pub fn retry_transient<T>(mut attempt: impl FnMut() -> Result<T, LoadError>) -> Result<T, LoadError> {
    let mut wait = FIRST_RETRY_WAIT;
    let mut tries = 1;
    loop {
        match attempt() {
            Err(e) if e.reason == Reason::Transient && tries < LOAD_ATTEMPTS => {
                tracing::debug!("BPF load refused for the moment, trying again in {wait:?}: {e}");
                std::thread::sleep(wait);
                wait *= 2;
                tries += 1;
            }
            Err(mut e) if e.reason == Reason::Transient => {
                e.detail.push_str(&format!(" (tried {tries} times)"));
                return Err(e);
            }
            other => return other,
        }
    }
}

/// The loaded object, and the programs that could not be loaded or attached.
#[derive(Debug)]
pub struct Attached {
    /// The object; dropping it detaches its programs.
    pub ebpf: Ebpf,
    /// See [`drop_reasons`].
    pub drop_reasons: DropReasonNames,
    /// Optional programs left out, with why (each leaves only its own metrics absent).
    pub failed: Vec<(&'static str, LoadError)>,
    /// Where the I/O latency programs take issue times from.
    pub issue_stamps: IssueStamps,
}

/// Loads `object` with the kernel's BTF from `btf_path` and attaches every program in
/// [`PROGRAMS`] it can, trying again on a transient error ([`retry_transient`]). A program that
/// cannot be attached is left out and listed in [`Attached::failed`]; the caller decides what
/// runs without it (see `dcmon_common::ebpf::DISK_PROGRAMS`).
pub fn load_and_attach(
    btf_path: &Path,
    object: &[u8],
    netns: Option<u32>,
    kernel_stamps: KernelStamps,
) -> Result<Attached, LoadError> {
    // A failed attempt's `Ebpf` is dropped, detaching whatever it had attached.
    retry_transient(|| load_and_attach_once(btf_path, object, netns, kernel_stamps))
}

fn load_and_attach_once(
    btf_path: &Path,
    object: &[u8],
    netns: Option<u32>,
    kernel_stamps: KernelStamps,
) -> Result<Attached, LoadError> {
    let (mut ebpf, btf, facts) = load_object_with(btf_path, object, netns, kernel_stamps)?;
    let failed = attach_programs(&mut ebpf, &btf, &PROGRAMS, &facts.missing);
    if let Some((_, e)) = failed.iter().find(|(_, e)| e.reason == Reason::Transient) {
        return Err(LoadError { reason: e.reason, detail: e.detail.clone() });
    }
    Ok(Attached { ebpf, drop_reasons: facts.drop_reasons, failed, issue_stamps: facts.issue_stamps })
}

/// Loads and attaches each of `programs` (name, tracepoint) that it can, and says why for the
/// others: a field in `missing` that it reads, a tracepoint this kernel lacks, the verifier.
pub fn attach_programs(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    programs: &[(&'static str, &'static str)],
    missing: &[(&'static str, LoadError)],
) -> Vec<(&'static str, LoadError)> {
    let mut failed = Vec::new();
    for &(name, tracepoint) in programs {
        let step = format!("program {name} (tp_btf/{tracepoint})");
        let needs = PROGRAM_OFFSETS.iter().find(|(p, _)| *p == name).map_or(&[][..], |(_, n)| *n);
        if let Some((_, e)) = missing.iter().find(|(global, _)| needs.contains(global)) {
            failed.push((name, LoadError { reason: e.reason, detail: format!("{step}: {}", e.detail) }));
            continue;
        }
        let works_for = PROGRAM_NEEDS.iter().find(|(p, _)| *p == name).map(|(_, other)| *other);
        if let Some((other, e)) = failed.iter().find(|(f, _)| Some(*f) == works_for) {
            let detail = format!("{step}: left out, it only works for {other}, which did not load: {}", e.detail);
            failed.push((name, LoadError { reason: e.reason, detail }));
            continue;
        }
        let attached = (|| {
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| LoadError {
                    reason: Reason::Other,
                    detail: format!("{step}: not in the embedded object"),
                })?
                .try_into()
                .map_err(|e| classify(&step, &e, false))?;
            prog.load(tracepoint, btf).map_err(|e| classify(&format!("{step}: load"), &e, false))?;
            prog.attach().map_err(|e| classify(&format!("{step}: attach"), &e, true))?;
            Ok(())
        })();
        if let Err(e) = attached {
            failed.push((name, e));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(errno: i32) -> aya::programs::ProgramError {
        aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_prog_load",
            io_error: io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn failures_are_classified_by_errno_and_kind() {
        let reason = |errno, attaching| classify("s", &io(errno), attaching).reason;
        assert_eq!(reason(libc::EPERM, false), Reason::NoPrivilege);
        assert_eq!(reason(libc::EACCES, false), Reason::NoPrivilege);
        assert_eq!(reason(libc::ENOSYS, false), Reason::NoBpf);
        assert_eq!(reason(libc::ENOENT, true), Reason::MissingTracepoint);
        assert_eq!(reason(libc::ENOENT, false), Reason::Other);
        assert_eq!(reason(libc::EINVAL, false), Reason::Other);
        assert_eq!(reason(libc::EAGAIN, false), Reason::Transient);
        assert_eq!(reason(libc::EINTR, true), Reason::Transient);
        assert_eq!(reason(libc::EBUSY, true), Reason::Transient);
        let missing = aya::programs::ProgramError::Btf(aya::BtfError::UnknownBtfTypeName {
            type_name: "btf_trace_block_rq_complete".into(),
        });
        let e = classify("program block_rq_complete", &missing, false);
        assert_eq!(e.reason, Reason::MissingTracepoint);
        assert!(e.to_string().contains("btf_trace_block_rq_complete"), "{e}");
    }

    /// The verifier answers EACCES for a program it refuses, the errno of missing privilege: its
    /// log tells the two apart. Reported as "no privilege" with the whole log before.
    #[test]
    fn a_verifier_refusal_is_not_taken_for_missing_privilege() {
        let mut log = String::from("0: R1=ctx() R10=fp0\n");
        for i in 0..2000 {
            log.push_str(&format!("{i}: (bf) r1 = r9 ; R1=trusted_ptr_request()\n"));
        }
        log.push_str(
            "154: (77) r1 >>= 33\nR1 pointer arithmetic with >>= operator prohibited\nverification time 1546 usec\n\
             stack depth 40\nprocessed 133 insns (limit 1000000) max_states_per_insn 0 total_states 10\n",
        );
        let refused = |errno| aya::programs::ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(log.clone()),
        };
        for errno in [libc::EACCES, libc::EINVAL] {
            let e = classify("program block_rq_issue (tp_btf/block_rq_issue): load", &refused(errno), false);
            assert_eq!(e.reason, Reason::VerifierRefused);
            let text = e.to_string();
            assert!(
                text.starts_with(
                    "this kernel's BPF verifier refused the program: program block_rq_issue (tp_btf/block_rq_issue): \
                     load: BPF_PROG_LOAD ("
                ),
                "{text}"
            );
            assert!(
                text.ends_with(
                    "the verifier's last words: R1 pointer arithmetic with >>= operator prohibited | verification \
                     time 1546 usec | stack depth 40 | processed 133 insns (limit 1000000) max_states_per_insn 0 \
                     total_states 10"
                ),
                "{text}"
            );
            assert!(text.len() < 400, "the instruction walk is left out: {} bytes", text.len());
        }
        // No log: the load was refused before the verifier ran.
        let unprivileged = aya::programs::ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(libc::EPERM),
            verifier_log: aya_obj::VerifierLog::new(String::new()),
        };
        assert_eq!(classify("s", &unprivileged, false).reason, Reason::NoPrivilege);
        // A verifier interrupted by a signal is still worth another try.
        let interrupted = aya::programs::ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(libc::EAGAIN),
            verifier_log: aya_obj::VerifierLog::new(log.clone()),
        };
        assert_eq!(classify("s", &interrupted, false).reason, Reason::Transient);
    }

    #[test]
    fn transient_errors_are_retried_and_others_are_not() {
        let error = |reason| LoadError { reason, detail: "s".into() };
        let mut calls = 0;
        let r = retry_transient(|| {
            calls += 1;
            if calls < 3 { Err(error(Reason::Transient)) } else { Ok(calls) }
        });
        assert_eq!(r.expect("third try succeeds"), 3);
        let mut calls = 0;
        let e = retry_transient(|| -> Result<(), _> {
            calls += 1;
            Err(error(Reason::Transient))
        })
        .expect_err("always refused");
        assert_eq!(calls, LOAD_ATTEMPTS);
        assert!(e.to_string().contains(&format!("tried {LOAD_ATTEMPTS} times")), "{e}");
        let mut calls = 0;
        let e = retry_transient(|| -> Result<(), _> {
            calls += 1;
            Err(error(Reason::NoPrivilege))
        })
        .expect_err("no privilege");
        assert_eq!((calls, e.reason), (1, Reason::NoPrivilege));
    }

    /// `load_object` gives aya no kernel BTF, which is right only while the object has no
    /// CO-RE relocations for aya to resolve against it.
    #[test]
    fn object_has_no_core_relocations() {
        let object = aya_obj::Object::parse(OBJECT).expect("parse the committed object");
        assert!(
            !object.has_btf_relocations(),
            "the object has CO-RE relocations: load_object must pass aya the kernel BTF"
        );
    }

    /// The stand-in BTF gives each tracepoint the kernel's type id and knows no other.
    #[test]
    fn attach_btf_has_each_typedef_at_its_id() {
        let btf = attach_btf(&[("block_rq_issue", 70_000), ("kfree_skb", 3)]).expect("build");
        let id = |name| btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Typedef);
        assert_eq!(id("btf_trace_block_rq_issue").expect("block_rq_issue"), 70_000);
        assert_eq!(id("btf_trace_kfree_skb").expect("kfree_skb"), 3);
        assert!(matches!(id("btf_trace_net_dev_xmit"), Err(aya::BtfError::UnknownBtfTypeName { .. })));
        assert!(attach_btf(&[]).is_ok());
    }

    /// Against the running kernel: the ids are those of the kernel's own typedefs, as aya finds
    /// them in the whole BTF.
    #[test]
    fn tracepoint_ids_match_the_kernels_btf() {
        let Ok(data) = std::fs::read(VMLINUX_BTF) else {
            assert!(
                std::env::var_os("DCMON_REQUIRE_EBPF").is_none(),
                "DCMON_REQUIRE_EBPF is set but {VMLINUX_BTF} is unreadable"
            );
            return;
        };
        let facts = facts_from(Path::new(VMLINUX_BTF), &data).expect("facts");
        assert_eq!(facts.tracepoint_ids.len(), PROGRAMS.len(), "{:?}", facts.tracepoint_ids);
        let full = aya::Btf::parse(&data, aya::Endianness::default()).expect("aya parse");
        let small = attach_btf(&facts.tracepoint_ids).expect("build");
        for (tp, id) in &facts.tracepoint_ids {
            let name = format!("btf_trace_{tp}");
            let kind = aya_obj::btf::BtfKind::Typedef;
            assert_eq!(full.id_by_type_name_kind(&name, kind).expect("in the kernel"), *id, "{tp}");
            assert_eq!(small.id_by_type_name_kind(&name, kind).expect("in the stand-in"), *id, "{tp}");
        }
    }

    #[test]
    fn missing_btf_file_is_no_btf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = kernel_offsets(&dir.path().join("vmlinux")).expect_err("no file");
        assert_eq!(e.reason, Reason::NoBtf);
        assert!(e.to_string().contains("vmlinux"), "{e}");
        std::fs::write(dir.path().join("vmlinux"), b"not btf").expect("write");
        let e = kernel_offsets(&dir.path().join("vmlinux")).expect_err("garbage");
        assert_eq!(e.reason, Reason::NoBtf);
    }
}
