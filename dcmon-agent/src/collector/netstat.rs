//! TCP and UDP health from /proc/net/snmp and /proc/net/netstat: segments in, out and
//! retransmitted, retransmission timeouts, listen queue overflows and drops, UDP datagrams
//! and receive errors. Counters of the agent's network namespace (the host's, for an agent
//! that is not in a container).

use super::attr::{excerpt, round_result};
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::host::{Host, OpenFile, served_from_kernel_memory};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "netstat",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: None,
    build: Some(|host, _| Box::new(NetstatCollector::new(host))),
};

/// One counter reported: the line prefix and field name in the file, and the metric.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// `Tcp`, `Udp` or `TcpExt`: the word before the colon.
    pub group: &'static str,
    /// The column's name in the header line.
    pub field: &'static str,
    /// The metric it is reported as.
    pub metric: &'static str,
}

const fn field(group: &'static str, field: &'static str, metric: &'static str) -> Field {
    Field { group, field, metric }
}

/// What /proc/net/snmp gives.
pub const SNMP: [Field; 7] = [
    field("Tcp", "InSegs", "tcp_received_segments_total"),
    field("Tcp", "OutSegs", "tcp_sent_segments_total"),
    field("Tcp", "RetransSegs", "tcp_retransmitted_segments_total"),
    field("Udp", "InDatagrams", "udp_received_datagrams_total"),
    field("Udp", "OutDatagrams", "udp_sent_datagrams_total"),
    field("Udp", "InErrors", "udp_receive_errors_total"),
    field("Udp", "RcvbufErrors", "udp_receive_buffer_errors_total"),
];

/// What /proc/net/netstat gives.
pub const NETSTAT: [Field; 3] = [
    field("TcpExt", "TCPTimeouts", "tcp_timeouts_total"),
    field("TcpExt", "ListenOverflows", "tcp_listen_overflows_total"),
    field("TcpExt", "ListenDrops", "tcp_listen_drops_total"),
];

/// ```text
/// Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens ... InSegs OutSegs RetransSegs ...
/// Tcp: 1 200 120000 -1 4017 ... 48570 44710 1 ...
/// ```
/// (/proc/net/snmp and /proc/net/netstat: each group a header line of names and a line of
/// values with the same prefix) into one counter sample per entry of `fields`, in that order.
pub fn parse_snmp(text: &str, fields: &[Field]) -> anyhow::Result<Vec<Sample>> {
    let mut values: Vec<Option<u64>> = vec![None; fields.len()];
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    while let Some((n, header)) = lines.next() {
        let Some((group, names)) = header.split_once(':') else {
            anyhow::bail!("line {}: expected \"<Group>: <names>\", got {:?}", n + 1, excerpt(header));
        };
        let Some((m, row)) = lines.next() else {
            anyhow::bail!("line {}: the header of {group} has no line of values after it", n + 1);
        };
        let Some(numbers) = row.strip_prefix(group).and_then(|r| r.strip_prefix(':')) else {
            anyhow::bail!("line {}: expected the values of {group}, got {:?}", m + 1, excerpt(row));
        };
        let wanted: Vec<usize> = (0..fields.len()).filter(|&i| fields[i].group == group).collect();
        if wanted.is_empty() {
            continue;
        }
        let (names, numbers): (Vec<&str>, Vec<&str>) =
            (names.split_whitespace().collect(), numbers.split_whitespace().collect());
        if names.len() != numbers.len() {
            anyhow::bail!("line {}: {group} has {} names but {} values", m + 1, names.len(), numbers.len());
        }
        for i in wanted {
            let Some(col) = names.iter().position(|name| *name == fields[i].field) else { continue };
            let v = numbers[col].parse::<u64>().map_err(|_| {
                anyhow::anyhow!(
                    "line {}: {group} {}: expected a counter, got {:?}",
                    m + 1,
                    fields[i].field,
                    numbers[col]
                )
            })?;
            values[i] = Some(v);
        }
    }
    fields
        .iter()
        .zip(values)
        .map(|(f, v)| {
            v.map(|v| Sample::count(f.metric, v))
                .ok_or_else(|| anyhow::anyhow!("expected a {} {} column, found none", f.group, f.field))
        })
        .collect()
}

/// TCP and UDP counters.
#[derive(Debug)]
pub struct NetstatCollector {
    snmp: OpenFile,
    netstat: OpenFile,
    buf: String,
    inline: bool,
}

impl NetstatCollector {
    /// A collector reading `host`'s /proc/net/snmp and /proc/net/netstat.
    pub fn new(host: &Host) -> Self {
        let (snmp, netstat) = (OpenFile::new(host, "/proc/net/snmp"), OpenFile::new(host, "/proc/net/netstat"));
        let inline = served_from_kernel_memory(SOURCE.name, [snmp.path(), netstat.path()]);
        Self { snmp, netstat, buf: String::new(), inline }
    }
}

impl Collector for NetstatCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn may_block(&self) -> bool {
        !self.inline
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let mut errors = Vec::new();
        let mut missing = 0;
        for (file, fields) in [(&mut self.snmp, &SNMP[..]), (&mut self.netstat, &NETSTAT[..])] {
            match file.read_into(&mut self.buf) {
                Ok(()) => match parse_snmp(&self.buf, fields) {
                    Ok(samples) => out.extend(samples),
                    Err(e) => errors.push(e.context(format!("parsing {}", file.path().display()))),
                },
                Err(e) => {
                    missing += usize::from(e.is_not_found());
                    errors.push(e.into());
                }
            }
        }
        if missing == 2 {
            return Err(CollectError::NotPresent(format!("{:#}", errors.remove(0))));
        }
        round_result(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Value;

    const SNMP_TEXT: &str = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 2 64 48443
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 4017 3870 125 26 0 48570 44710 7 0 150 0
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 40 0 3 41 2 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 9 9 9 9 9 9 9 9 9
";

    fn pairs(samples: &[Sample]) -> Vec<(&str, Value)> {
        samples.iter().map(|s| (s.name, s.value)).collect()
    }

    #[test]
    fn snmp_counters_by_column_name() {
        let s = parse_snmp(SNMP_TEXT, &SNMP).expect("parse");
        assert_eq!(
            pairs(&s),
            [
                ("tcp_received_segments_total", Value::Count(48570)),
                ("tcp_sent_segments_total", Value::Count(44710)),
                ("tcp_retransmitted_segments_total", Value::Count(7)),
                ("udp_received_datagrams_total", Value::Count(40)),
                ("udp_sent_datagrams_total", Value::Count(41)),
                ("udp_receive_errors_total", Value::Count(3)),
                ("udp_receive_buffer_errors_total", Value::Count(2)),
            ]
        );
    }

    #[test]
    fn netstat_counters_from_tcpext() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPTimeouts\nTcpExt: 0 11 12 13\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        let s = parse_snmp(text, &NETSTAT).expect("parse");
        assert_eq!(
            pairs(&s),
            [
                ("tcp_timeouts_total", Value::Count(13)),
                ("tcp_listen_overflows_total", Value::Count(11)),
                ("tcp_listen_drops_total", Value::Count(12)),
            ]
        );
    }

    #[test]
    fn malformed_files_say_what_was_expected() {
        let e = parse_snmp("Tcp: InSegs OutSegs\nTcp: 1\n", &SNMP).expect_err("short");
        assert_eq!(e.to_string(), "line 2: Tcp has 2 names but 1 values");
        let e = parse_snmp("Tcp: InSegs\nUdp: 1\n", &SNMP).expect_err("mismatched");
        assert_eq!(e.to_string(), "line 2: expected the values of Tcp, got \"Udp: 1\"");
        let e = parse_snmp("Tcp: InSegs\n", &SNMP).expect_err("no values");
        assert_eq!(e.to_string(), "line 1: the header of Tcp has no line of values after it");
        let e = parse_snmp("no colon\n", &SNMP).expect_err("no colon");
        assert_eq!(e.to_string(), "line 1: expected \"<Group>: <names>\", got \"no colon\"");
        let e = parse_snmp("Tcp: InSegs\nTcp: -5\n", &SNMP).expect_err("negative");
        assert_eq!(e.to_string(), "line 2: Tcp InSegs: expected a counter, got \"-5\"");
        let e = parse_snmp("Ip: X\nIp: 1\n", &NETSTAT).expect_err("no TcpExt");
        assert_eq!(e.to_string(), "expected a TcpExt TCPTimeouts column, found none");
    }

    #[test]
    fn this_hosts_counters_match_an_independent_read() {
        let mut c = NetstatCollector::new(&Host::default());
        assert!(!c.may_block());
        // Counters move with traffic: compare while the files hold still around the collection.
        for _ in 0..200 {
            let before = std::fs::read_to_string("/proc/net/snmp").expect("snmp")
                + &std::fs::read_to_string("/proc/net/netstat").expect("netstat");
            let mut out = Vec::new();
            c.collect(&mut out).expect("collect");
            let after = std::fs::read_to_string("/proc/net/snmp").expect("snmp")
                + &std::fs::read_to_string("/proc/net/netstat").expect("netstat");
            if before != after {
                continue;
            }
            let get = |group: &str, name: &str| -> u64 {
                let mut lines = before.lines().filter(|l| l.starts_with(&format!("{group}:")));
                let (h, v) = (lines.next().expect("header"), lines.next().expect("values"));
                let col = h.split_whitespace().position(|n| n == name).expect("column");
                v.split_whitespace().nth(col).expect("value").parse().expect("number")
            };
            let want: Vec<(&str, Value)> =
                SNMP.iter().chain(&NETSTAT).map(|f| (f.metric, Value::Count(get(f.group, f.field)))).collect();
            assert_eq!(pairs(&out), want);
            return;
        }
        panic!("the counters kept changing");
    }
}
