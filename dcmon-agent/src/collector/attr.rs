//! What the sysfs and procfs families share: one-value attribute files read and parsed with
//! errors that name the file, directory listings in a stable order, a relisting timer, and
//! the errors of a round joined into one.
//!
//! A family whose hardware is absent sends nothing: its directory missing (or empty at the
//! first listing) is [`CollectError::NotPresent`]. A file that cannot be parsed fails that
//! round, naming the file and what was expected, after the rest was read.

use std::time::{Duration, Instant};

use super::CollectError;
use crate::host::{Host, ReadError};

/// How often a family lists its devices again (PCI functions, InfiniBand ports, hwmon chips,
/// interfaces, memory controllers): the set is stable while the host runs, so the listing is
/// not paid every round.
pub const RELIST_EVERY: Duration = Duration::from_secs(60);

/// When a listing is due.
#[derive(Debug)]
pub struct Relist {
    every: Duration,
    at: Option<Instant>,
}

impl Relist {
    /// Due at once, then every `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, at: None }
    }

    /// Whether to list now: never listed, or listed `every` ago.
    pub fn is_due(&self) -> bool {
        self.at.is_none_or(|t| t.elapsed() >= self.every)
    }

    /// Whether this is the first listing.
    pub fn is_first(&self) -> bool {
        self.at.is_none()
    }

    /// Listed now.
    pub fn done(&mut self) {
        self.at = Some(Instant::now());
    }

    /// List again at the next round (a device went away).
    pub fn soon(&mut self) {
        self.at = None;
    }
}

/// The names in host directory `rel` in [`natural_cmp`] order (names that are not UTF-8 are
/// left out). Not for PCI addresses: their fixed-width hex sorts as plain text.
pub fn sorted_names(host: &Host, rel: impl AsRef<std::path::Path>) -> Result<Vec<String>, ReadError> {
    let mut names = host.dir_names(rel)?;
    names.sort_unstable_by(|a, b| natural_cmp(a, b));
    Ok(names)
}

/// `hwmon2` before `hwmon10`: runs of digits compare as numbers.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                (a, b) = (&a[da..], &b[db..]);
            }
            (Some(x), Some(y)) if x != y => return x.cmp(y),
            _ => (a, b) = (&a[1..], &b[1..]),
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros.min(digits.len().saturating_sub(1))..]
}

/// The number after `prefix` in a directory name (`thermal_zone3` -> `3`, `mc0` -> `0`);
/// `None` when the name is not `prefix` and digits.
pub fn index_of(name: &str, prefix: &str) -> Option<String> {
    let digits = name.strip_prefix(prefix)?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.to_owned())
}

/// The start of `text` for an error message: its first line, at most 80 characters.
pub fn excerpt(text: &str) -> String {
    text.lines().next().unwrap_or_default().chars().take(80).collect()
}

/// An unsigned decimal attribute (`1234\n`).
pub fn parse_u64(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    t.parse().map_err(|_| anyhow::anyhow!("expected an unsigned integer, got {:?}", excerpt(t)))
}

/// A signed decimal attribute (`-1\n`, `45000\n`).
pub fn parse_i64(text: &str) -> anyhow::Result<i64> {
    let t = text.trim();
    t.parse().map_err(|_| anyhow::anyhow!("expected an integer, got {:?}", excerpt(t)))
}

/// Whether a read failed because the file or its device is gone (ENOENT, ENODEV, ENXIO).
pub fn is_gone(e: &ReadError) -> bool {
    e.is_not_found() || matches!(e.error.raw_os_error(), Some(libc::ENODEV | libc::ENXIO))
}

/// Whether the kernel has no value to give right now: a link that is down answers EINVAL for
/// its speed, a sensor that is not ready ENODATA or EAGAIN, a driver without the callback
/// EOPNOTSUPP.
pub fn is_no_value(e: &ReadError) -> bool {
    matches!(
        e.error.raw_os_error(),
        Some(libc::EINVAL | libc::ENODATA | libc::EAGAIN | libc::EOPNOTSUPP | libc::EIO | libc::ETIMEDOUT)
    )
}

/// The errors of one round as one: `Ok` when there were none, else the first with the others
/// in its context, so the log names every bad file once.
pub fn round_result(errors: Vec<anyhow::Error>) -> Result<(), CollectError> {
    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(()),
        Some(first) => {
            let rest: Vec<String> = errors.map(|e| format!("{e:#}")).collect();
            Err(CollectError::Failed(if rest.is_empty() { first } else { first.context(rest.join("; ")) }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_sorts_numbers_as_numbers() {
        let mut names = vec!["hwmon10", "hwmon2", "mc1", "hwmon0", "dimm02", "dimm1", "hwmon"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["dimm1", "dimm02", "hwmon", "hwmon0", "hwmon2", "hwmon10", "mc1"]);
        assert_eq!(natural_cmp("a00", "a0"), std::cmp::Ordering::Equal);
    }

    #[test]
    fn numbers_parse_and_errors_quote_the_text() {
        assert_eq!(parse_u64("1234\n").expect("u64"), 1234);
        assert_eq!(parse_i64("-1\n").expect("i64"), -1);
        assert_eq!(
            parse_u64("N/A (no PMA)\n").expect_err("text").to_string(),
            "expected an unsigned integer, got \"N/A (no PMA)\""
        );
        assert_eq!(parse_i64("x").expect_err("text").to_string(), "expected an integer, got \"x\"");
        assert!(parse_u64("-1").is_err());
    }

    #[test]
    fn round_result_joins_every_error() {
        assert!(round_result(Vec::new()).is_ok());
        let e = round_result(vec![anyhow::anyhow!("a"), anyhow::anyhow!("b"), anyhow::anyhow!("c")]).expect_err("3");
        assert_eq!(format!("{e:#}"), "b; c: a");
    }
}
