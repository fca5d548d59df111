//! The set-aside folders: `corrupt/` for damaged records and oversized segments, `rejected/`
//! for batches the server refused for good, each pruned to the newest [`SET_ASIDE_KEEP`].

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use super::Outbox;
use super::record::Corrupt;
use super::segment::SEGMENT_READ_MAX;

/// Files kept in `rejected/` and in `corrupt/` each, for an operator to inspect.
pub(super) const SET_ASIDE_KEEP: usize = 100;
/// The most of one damaged stretch copied to `corrupt/`.
const DAMAGE_COPY_MAX: u64 = 1 << 20;

impl Outbox {
    /// Copy batch `seq`, which the server will never accept, to `rejected/` with the server's
    /// `answer` beside it.
    pub(super) fn set_aside_rejected(&self, seq: u64, timestamp: i64, body: std::io::Result<Vec<u8>>, answer: &str) {
        let folder = self.dir.join("rejected");
        let name = format!("{seq:016x}-{timestamp}.batch");
        let copied = body.and_then(|body| {
            std::fs::create_dir_all(&folder)?;
            std::fs::write(folder.join(&name), body)?;
            std::fs::write(folder.join(format!("{name}.reason")), answer)
        });
        match copied {
            Ok(()) => prune(&folder, SET_ASIDE_KEEP),
            Err(e) => tracing::warn!("outbox: cannot copy the rejected batch to {}: {e}", folder.display()),
        }
    }

    /// A `*.seg` far longer than any segment: not read, moved to `corrupt/` for an operator.
    pub(super) fn set_aside_oversized(&mut self, path: &Path, size: u64) {
        self.stats.corrupt_total += 1;
        let folder = self.dir.join("corrupt");
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let target = folder.join(format!("{name}.oversized"));
        let moved = std::fs::create_dir_all(&folder).and_then(|()| std::fs::rename(path, &target));
        match moved {
            Ok(()) => tracing::error!(
                "outbox: {} is {size} bytes, more than a segment can be ({SEGMENT_READ_MAX}); moved it unread to {}",
                path.display(),
                target.display()
            ),
            Err(e) => tracing::error!(
                "outbox: {} is {size} bytes, more than a segment can be ({SEGMENT_READ_MAX}); ignoring it (cannot move it to {}: {e})",
                path.display(),
                folder.display()
            ),
        }
    }

    /// Copy each damaged stretch of `segment` to `corrupt/` and count it, once: a copy already
    /// there means an earlier run reported it. One log line for the segment.
    pub(super) fn set_aside_damage(&mut self, segment: &Path, file: &File, damage: &[(u64, u64, Corrupt)]) {
        let mut new = 0usize;
        let mut bytes = 0u64;
        let mut kinds: Vec<(&'static str, usize)> = Vec::new();
        for (offset, len, why) in damage {
            let copy_len = (*len).min(DAMAGE_COPY_MAX);
            let mut copy = vec![0; usize::try_from(copy_len).unwrap_or(0)];
            let copy = match file.read_exact_at(&mut copy, *offset) {
                Ok(()) => copy,
                Err(_) => Vec::new(),
            };
            let note = (copy_len < *len).then(|| format!("; only its first {copy_len} of {len} bytes are copied"));
            if self.copy_damage(segment, *offset, &copy, why, note.as_deref()) {
                new += 1;
                bytes += len;
                match kinds.iter_mut().find(|(k, _)| *k == kind_of(why)) {
                    Some((_, n)) => *n += 1,
                    None => kinds.push((kind_of(why), 1)),
                }
            }
        }
        if new > 0 {
            let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            tracing::warn!(
                "outbox: {new} damaged record(s), {bytes} bytes, in {} are unusable ({}); copied to {}",
                segment.display(),
                kinds.join(", "),
                self.dir.join("corrupt").display()
            );
            prune(&self.dir.join("corrupt"), SET_ASIDE_KEEP);
        }
    }

    /// Copy one damaged stretch to `corrupt/` and count it, unless a copy is already there.
    /// Returns whether it is new.
    pub(super) fn copy_damage(
        &mut self,
        segment: &Path,
        offset: u64,
        bytes: &[u8],
        why: &Corrupt,
        note: Option<&str>,
    ) -> bool {
        let stem = segment.file_stem().and_then(|s| s.to_str()).unwrap_or("segment");
        let folder = self.dir.join("corrupt");
        let name = format!("{stem}-at{offset:010}.batch");
        if folder.join(&name).exists() {
            return false;
        }
        self.stats.corrupt_total += 1;
        let reason = format!("{why}{}", note.unwrap_or(""));
        let copied = std::fs::create_dir_all(&folder)
            .and_then(|()| std::fs::write(folder.join(&name), bytes))
            .and_then(|()| std::fs::write(folder.join(format!("{name}.reason")), reason));
        if let Err(e) = copied {
            tracing::warn!("outbox: cannot copy damaged bytes of {} to {}: {e}", segment.display(), folder.display());
        }
        true
    }
}

/// A short name for a kind of damage, for the one log line per segment.
fn kind_of(why: &Corrupt) -> &'static str {
    match why {
        Corrupt::Header => "without a valid header line",
        Corrupt::Torn => "torn write",
        Corrupt::Length { .. } => "with the wrong body length",
        Corrupt::Oversize { .. } => "declaring an impossible length",
        Corrupt::Checksum => "checksum mismatch",
    }
}

/// Keep the newest `keep` set-aside batches (and their reasons) in `folder`.
fn prune(folder: &Path, keep: usize) {
    let Ok(read) = std::fs::read_dir(folder) else {
        return;
    };
    let mut batches: Vec<PathBuf> =
        read.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "batch")).collect();
    if batches.len() <= keep {
        return;
    }
    batches.sort();
    for p in &batches[..batches.len() - keep] {
        let _ = std::fs::remove_file(p);
        let mut reason = p.clone().into_os_string();
        reason.push(".reason");
        let _ = std::fs::remove_file(reason);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::outbox::OutboxLimits;
    use crate::outbox::tests::logged;

    /// A damaged stretch of `len` bytes set aside from a scratch segment: what `corrupt/` holds
    /// for it, (copy, reason).
    fn set_aside(len: u64) -> (Vec<u8>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = OutboxLimits { max_bytes: 64 << 20, max_age: Duration::from_secs(86400) };
        let mut outbox = Outbox::open(dir.path().join("outbox"), limits, 0);
        let segment = dir.path().join("scratch.seg");
        let bytes: Vec<u8> = (0..len + 10).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(&segment, &bytes).expect("segment");
        let file = File::open(&segment).expect("open");
        let damage = [(10, len, Corrupt::Header)];
        let ((), log) = logged(|| outbox.set_aside_damage(&segment, &file, &damage));
        let line = format!(
            "outbox: 1 damaged record(s), {len} bytes, in {} are unusable (1 without a valid header line); copied to {}",
            segment.display(),
            dir.path().join("outbox/corrupt").display()
        );
        assert!(log.contains(&line), "{log}");
        assert_eq!(outbox.stats().corrupt_total, 1);
        // Found again (the next start reads the same segment): already reported, so neither
        // counted nor logged again.
        let ((), log) = logged(|| outbox.set_aside_damage(&segment, &file, &damage));
        assert_eq!((outbox.stats().corrupt_total, log.as_str()), (1, ""));
        let copy = dir.path().join("outbox/corrupt/scratch-at0000000010.batch");
        let mut reason = copy.clone().into_os_string();
        reason.push(".reason");
        let copied = std::fs::read(&copy).expect("copy");
        assert_eq!(copied[..], bytes[10..10 + copied.len()], "the damaged bytes, from their offset");
        (copied, std::fs::read_to_string(reason).expect("reason"))
    }

    /// Up to DAMAGE_COPY_MAX bytes of a damaged stretch are copied, and the reason says when
    /// the copy is cut; one log line counts the records and their bytes, once.
    #[test]
    fn a_damaged_stretch_is_copied_up_to_the_limit_and_a_cut_copy_says_so() {
        let (copy, reason) = set_aside(DAMAGE_COPY_MAX);
        assert_eq!((copy.len() as u64, reason.as_str()), (DAMAGE_COPY_MAX, "no valid header line"));
        let (copy, reason) = set_aside(DAMAGE_COPY_MAX + 1);
        assert_eq!(copy.len() as u64, DAMAGE_COPY_MAX);
        assert_eq!(
            reason,
            format!(
                "no valid header line; only its first {DAMAGE_COPY_MAX} of {} bytes are copied",
                DAMAGE_COPY_MAX + 1
            )
        );
    }
}
