//! The command journal: every command id this host has taken, written and fsynced BEFORE the
//! command runs, and its result until the server has taken it. A command id is therefore run at
//! most once across restarts and kill -9, and its result is delivered at least once.
//!
//! The file is one small JSON document, replaced whole on each change (temp file, fsync, rename,
//! fsync of the directory). It is bounded: delivered entries older than [`FORGET_AFTER_SECS`]
//! are forgotten, and at most [`MAX_ENTRIES`] are kept (the oldest delivered ones go first).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::parse::CommandId;

/// Delivered entries are forgotten after 30 days: the server does not offer a command again
/// once it has its result.
pub const FORGET_AFTER_SECS: i64 = 30 * 86_400;
/// The most entries kept.
pub const MAX_ENTRIES: usize = 1000;
/// The most bytes the journal file may hold when read back.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// What a command did, as posted to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Whether it did what was asked.
    pub success: bool,
    /// What happened, or why it was refused.
    pub message: String,
}

/// One command id's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// [`CommandId::key`].
    pub id: String,
    /// When it was taken (Unix seconds).
    pub taken_at: i64,
    /// Its result; `None` while it runs (or when the agent died while it ran).
    pub outcome: Option<Outcome>,
    /// Whether the server answered 2xx to the result.
    pub delivered: bool,
}

/// The journal file and its entries, oldest first.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl Journal {
    /// Open the journal at `path` (empty when the file does not exist). An entry left without
    /// a result by an agent that died while the command ran gets a failed result: the command
    /// is not run again.
    pub fn open(path: &Path) -> Result<Self, String> {
        let entries = match crate::secure_file::read(path, MAX_FILE_BYTES) {
            Ok((bytes, _)) => serde_json::from_slice::<Vec<Entry>>(&bytes)
                .map_err(|e| format!("command journal {}: {e}", path.display()))?,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(format!("command journal {}: {e}", path.display())),
        };
        let mut journal = Self { path: path.to_owned(), entries };
        let mut interrupted = false;
        for entry in journal.entries.iter_mut().filter(|e| e.outcome.is_none()) {
            entry.outcome = Some(Outcome {
                success: false,
                message: "the agent stopped while this command ran; it was not run again".into(),
            });
            interrupted = true;
        }
        if interrupted {
            journal.save()?;
        }
        Ok(journal)
    }

    /// Whether command `id` was taken before.
    pub fn contains(&self, id: &CommandId) -> bool {
        let key = id.key();
        self.entries.iter().any(|e| e.id == key)
    }

    /// Record that command `id` is about to run (or be refused), durably. Call before running it.
    pub fn take(&mut self, id: &CommandId, now: i64) -> Result<(), String> {
        self.prune(now);
        self.entries.push(Entry { id: id.key(), taken_at: now, outcome: None, delivered: false });
        self.save()
    }

    /// Record command `id`'s result, durably.
    pub fn finish(&mut self, id: &CommandId, outcome: Outcome) -> Result<(), String> {
        let key = id.key();
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == key) {
            entry.outcome = Some(outcome);
        }
        self.save()
    }

    /// The server offered command `id` again: it did not record the result, so post it again.
    pub fn redeliver(&mut self, id: &CommandId) -> Result<(), String> {
        let key = id.key();
        match self.entries.iter_mut().find(|e| e.id == key && e.delivered) {
            Some(entry) => {
                entry.delivered = false;
                self.save()
            }
            None => Ok(()),
        }
    }

    /// The results not yet delivered, oldest first.
    pub fn undelivered(&self) -> Vec<(CommandId, Outcome)> {
        self.entries
            .iter()
            .filter(|e| !e.delivered)
            .filter_map(|e| Some((CommandId::from_key(&e.id)?, e.outcome.clone()?)))
            .collect()
    }

    /// The server took command `id`'s result.
    pub fn delivered(&mut self, id: &CommandId) -> Result<(), String> {
        let key = id.key();
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == key) {
            entry.delivered = true;
        }
        self.save()
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn prune(&mut self, now: i64) {
        self.entries.retain(|e| !(e.delivered && now.saturating_sub(e.taken_at) > FORGET_AFTER_SECS));
        while self.entries.len() >= MAX_ENTRIES {
            // The oldest delivered entry, else the oldest (its result is then lost: the
            // server has been unreachable for a thousand commands).
            let i = self.entries.iter().position(|e| e.delivered).unwrap_or(0);
            self.entries.remove(i);
        }
    }

    fn save(&self) -> Result<(), String> {
        let err = |what: &str, e: std::io::Error| format!("command journal {}: {what}: {e}", self.path.display());
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(|e| err("create directory", e))?;
        let bytes = serde_json::to_vec(&self.entries).map_err(|e| format!("command journal: {e}"))?;
        let tmp = self.path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).map_err(|e| err("create", e))?;
        file.write_all(&bytes).map_err(|e| err("write", e))?;
        file.sync_all().map_err(|e| err("fsync", e))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(|e| err("rename", e))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err("fsync directory", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(n: u64) -> CommandId {
        CommandId(json!(n))
    }

    #[test]
    fn taken_ids_survive_reopen_and_interrupted_runs_get_a_failed_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/commands.journal");
        let mut j = Journal::open(&path).expect("new");
        j.take(&id(1), 100).expect("take 1");
        j.finish(&id(1), Outcome { success: true, message: "ok".into() }).expect("finish");
        j.take(&id(2), 101).expect("take 2");
        // "kill -9" while 2 runs: nothing but the file is left.
        drop(j);
        let mut j = Journal::open(&path).expect("reopen");
        assert!(j.contains(&id(1)) && j.contains(&id(2)) && !j.contains(&id(3)));
        let pending = j.undelivered();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0], (id(1), Outcome { success: true, message: "ok".into() }));
        assert!(!pending[1].1.success && pending[1].1.message.contains("not run again"), "{pending:?}");
        j.delivered(&id(1)).expect("delivered");
        let j2 = Journal::open(&path).expect("reopen again");
        assert_eq!(j2.undelivered().len(), 1);
        let mut j = j2;
        j.redeliver(&id(1)).expect("again");
        assert_eq!(j.undelivered().len(), 2);
    }

    #[test]
    fn bounded_by_age_and_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::open(&dir.path().join("j")).expect("new");
        j.take(&id(0), 0).expect("take");
        j.finish(&id(0), Outcome { success: true, message: String::new() }).expect("finish");
        j.delivered(&id(0)).expect("delivered");
        j.take(&id(1), FORGET_AFTER_SECS + 1).expect("take later");
        assert!(!j.contains(&id(0)), "delivered and older than the bound: forgotten");
        for n in 2..(MAX_ENTRIES as u64 + 10) {
            j.entries.push(Entry { id: id(n).key(), taken_at: 5, outcome: None, delivered: n % 2 == 0 });
        }
        j.take(&id(99_999), 10).expect("take");
        assert!(j.entries().len() <= MAX_ENTRIES);
        assert!(j.contains(&id(1)) && j.contains(&id(99_999)), "undelivered ones are kept first");
    }

    #[test]
    fn a_corrupt_journal_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        std::fs::write(&path, b"{not json").expect("write");
        assert!(Journal::open(&path).expect_err("corrupt").contains("command journal"));
    }
}
