//! Where a request's issue time comes from: the kernel's own stamp or the programs' table.
//!
//! `blk_mq_start_request` fires `block_rq_issue` and then, on a queue with `QUEUE_FLAG_STATS`
//! (which writeback throttling, on by default on every blk-mq disk, turns on), stamps the
//! request itself: `rq->io_start_time_ns = blk_time_get_ns()`, the clock `bpf_ktime_get_ns`
//! reads. A request is zeroed there when allocated, so a non-zero stamp is this issue's.
//! Taking it costs the completion one load instead of a table lookup, and the issue program
//! only a test of the queue's flag; the stamp table ([`super::RQ_START_MAP`]) is left for the
//! requests the kernel does not stamp.

/// `.rodata` global: the byte offset of `io_start_time_ns` in `struct request`, or 0 when the
/// completion program is not to read it (the field is never at 0: `q` is).
pub const OFF_RQ_IO_START: &str = "OFF_RQ_IO_START";
/// `.rodata` global: the byte offset of `queue_flags` in `struct request_queue`.
pub const OFF_Q_QUEUE_FLAGS: &str = "OFF_Q_QUEUE_FLAGS";
/// `.rodata` global (u64): the bit of `QUEUE_FLAG_STATS` in `queue_flags`, or 0 when the issue
/// program is to stamp every request itself.
pub const QUEUE_STATS_MASK: &str = "QUEUE_STATS_MASK";
/// The enumerator of the kernel's queue flags whose value is the bit [`QUEUE_STATS_MASK`]
/// holds. Kernels that define it with `#define` (before 6.x's enum) have no BTF for it.
pub const QUEUE_FLAG_STATS: &str = "QUEUE_FLAG_STATS";
/// The fields the kernel-stamp path reads, `(global, struct, field, bytes read)`: optional,
/// unlike [`super::OFFSETS`]; a kernel without them times every request from the table.
pub const STAMP_OFFSETS: [(&str, &str, &str, u32); 2] =
    [(OFF_RQ_IO_START, "request", "io_start_time_ns", 8), (OFF_Q_QUEUE_FLAGS, "request_queue", "queue_flags", 8)];

/// Which issue times the programs use, chosen at load from the running kernel's BTF.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IssueStamps {
    /// The kernel's where it stamps (queues with `QUEUE_FLAG_STATS`, which the issue program
    /// skips); the table for requests of the other queues.
    Kernel,
    /// The kernel's where a completing request has one, but every request is also stamped in
    /// the table: the kernel's BTF has `io_start_time_ns` but no `QUEUE_FLAG_STATS` value, so
    /// the issue program cannot tell which requests the kernel will stamp.
    KernelAtCompletion,
    /// The table only: turned off at load, or the kernel lacks `io_start_time_ns`.
    Table,
}

impl IssueStamps {
    /// What the log and `check` say about it.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Kernel => {
                "the kernel's own issue stamps (io_start_time_ns) where the queue has QUEUE_FLAG_STATS, the stamp table for the rest"
            }
            Self::KernelAtCompletion => {
                "the kernel's own issue stamps (io_start_time_ns) where present, every request also in the stamp table (no QUEUE_FLAG_STATS in this kernel's BTF)"
            }
            Self::Table => "the programs' stamp table only",
        }
    }

    /// Which requests `block_rq_complete` times on this path, with `block_rq_issue` attached
    /// or not. Without it the table is never stamped, but the completion still takes the
    /// kernel's stamp on the kernel-stamp paths.
    pub const fn timed(self, issue_attached: bool) -> TimedRequests {
        match (self, issue_attached) {
            (_, true) => TimedRequests::All,
            (Self::Kernel | Self::KernelAtCompletion, false) => TimedRequests::KernelStamped,
            (Self::Table, false) => TimedRequests::Nothing,
        }
    }
}

/// Which requests the I/O latency histograms time (`block_rq_complete` attached).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TimedRequests {
    /// Every read, write, flush and discard (less the table's collisions, README).
    All,
    /// Only the requests the kernel stamps itself (queues with `QUEUE_FLAG_STATS`):
    /// `block_rq_issue` is not attached.
    KernelStamped,
    /// None: the table path without `block_rq_issue`.
    Nothing,
}

/// The values of [`OFF_RQ_IO_START`], [`OFF_Q_QUEUE_FLAGS`] and [`QUEUE_STATS_MASK`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StampGlobals {
    /// See [`OFF_RQ_IO_START`].
    pub off_rq_io_start: u32,
    /// See [`OFF_Q_QUEUE_FLAGS`].
    pub off_q_queue_flags: u32,
    /// See [`QUEUE_STATS_MASK`].
    pub queue_stats_mask: u64,
}

/// The path and its globals from what the kernel's BTF gave: the offsets of
/// `request.io_start_time_ns` and `request_queue.queue_flags` and the value of
/// `QUEUE_FLAG_STATS`, each `None` when absent. `use_kernel` false forces the table path (so
/// tests can run it on a kernel that stamps). A flag value that is not a bit of a 64-bit word
/// is treated as absent.
pub const fn issue_stamps(
    io_start: Option<u32>,
    queue_flags: Option<u32>,
    stats_flag: Option<u32>,
    use_kernel: bool,
) -> (IssueStamps, StampGlobals) {
    let off = StampGlobals { off_rq_io_start: 0, off_q_queue_flags: 0, queue_stats_mask: 0 };
    let io_start = match io_start {
        Some(at) if use_kernel && at != 0 => at,
        _ => return (IssueStamps::Table, off),
    };
    match (queue_flags, stats_flag) {
        (Some(flags_at), Some(bit)) if bit < 64 => (
            IssueStamps::Kernel,
            StampGlobals { off_rq_io_start: io_start, off_q_queue_flags: flags_at, queue_stats_mask: 1 << bit },
        ),
        _ => (IssueStamps::KernelAtCompletion, StampGlobals { off_rq_io_start: io_start, ..off }),
    }
}

/// The issue-to-completion time of a request the kernel stamped at `started_ns` (its
/// `io_start_time_ns`), completing at `now_ns`: `None` when it has no stamp (0) or the stamp
/// lies in the future, which a monotonic clock never gives for this issue.
#[inline(always)]
pub const fn kernel_stamp_latency(started_ns: u64, now_ns: u64) -> Option<u64> {
    if started_ns == 0 || now_ns < started_ns {
        return None;
    }
    Some(now_ns - started_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_path_needs_both_fields_and_the_flag() {
        let (path, g) = issue_stamps(Some(112), Some(32), Some(7), true);
        assert_eq!(path, IssueStamps::Kernel);
        assert_eq!(g, StampGlobals { off_rq_io_start: 112, off_q_queue_flags: 32, queue_stats_mask: 0x80 });
        // No flag value in BTF (a #define), or no queue_flags field: completion only.
        for (flags, bit) in [(Some(32), None), (None, Some(7)), (Some(32), Some(64))] {
            let (path, g) = issue_stamps(Some(112), flags, bit, true);
            assert_eq!(path, IssueStamps::KernelAtCompletion, "{flags:?} {bit:?}");
            assert_eq!(g, StampGlobals { off_rq_io_start: 112, off_q_queue_flags: 0, queue_stats_mask: 0 });
        }
        // No io_start_time_ns, or turned off: the table, every global 0 (the programs' "off").
        let zero = StampGlobals { off_rq_io_start: 0, off_q_queue_flags: 0, queue_stats_mask: 0 };
        assert_eq!(issue_stamps(None, Some(32), Some(7), true), (IssueStamps::Table, zero));
        assert_eq!(issue_stamps(Some(112), Some(32), Some(7), false), (IssueStamps::Table, zero));
        assert_eq!(issue_stamps(Some(0), Some(32), Some(7), true), (IssueStamps::Table, zero));
    }

    #[test]
    fn without_the_issue_program_only_the_kernels_stamps_time() {
        for path in [IssueStamps::Kernel, IssueStamps::KernelAtCompletion, IssueStamps::Table] {
            assert_eq!(path.timed(true), TimedRequests::All, "{path:?}");
        }
        assert_eq!(IssueStamps::Kernel.timed(false), TimedRequests::KernelStamped);
        assert_eq!(IssueStamps::KernelAtCompletion.timed(false), TimedRequests::KernelStamped);
        assert_eq!(IssueStamps::Table.timed(false), TimedRequests::Nothing);
    }

    #[test]
    fn kernel_stamps_time_forward_only() {
        assert_eq!(kernel_stamp_latency(1_000, 41_000), Some(40_000));
        assert_eq!(kernel_stamp_latency(5, 5), Some(0));
        assert_eq!(kernel_stamp_latency(0, 41_000), None, "never stamped");
        assert_eq!(kernel_stamp_latency(41_001, 41_000), None, "a stamp after now");
        assert_eq!(kernel_stamp_latency(u64::MAX, 1), None);
    }
}
