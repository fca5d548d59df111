//! Device and interface name patterns for include/exclude lists.

use serde::Deserialize;

/// A list of shell-style name patterns: `*` matches any run of characters, `?` one character.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct PatternList(Vec<String>);

impl PatternList {
    /// A list of the given patterns.
    pub fn new<S: Into<String>>(patterns: impl IntoIterator<Item = S>) -> Self {
        Self(patterns.into_iter().map(Into::into).collect())
    }

    /// `["*"]`: matches every name.
    pub fn match_all() -> Self {
        Self::new(["*"])
    }

    /// Whether any pattern matches the whole of `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| wildcard_match(p.as_bytes(), name.as_bytes()))
    }
}

/// Iterative glob match with backtracking to the last `*` (linear in practice, no recursion).
/// Kept over the `wildmatch` crate, which took more CPU time per name, outside the noise, in a
/// same-run bench (benches/filter.rs).
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let cases = [
            ("*", "", true),
            ("*", "eth0", true),
            ("lo", "lo", true),
            ("lo", "lo0", false),
            ("veth*", "veth1234", true),
            ("veth*", "eveth", false),
            ("br-*", "br-1a2b", true),
            ("br-*", "br0", false),
            ("nvme?n*", "nvme0n1", true),
            ("nvme?n*", "nvme10n1", false),
            ("*n*p*", "nvme0n1p2", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("", "", true),
            ("", "x", false),
            ("**", "", true),
            ("a**b", "ab", true),
            ("*?", "", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(PatternList::new([pattern]).matches(name), want, "{pattern:?} vs {name:?}");
        }
        assert!(!PatternList::default().matches("eth0"));
    }
}
