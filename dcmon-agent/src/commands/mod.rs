//! Remote commands from the dcmon server: off by default, and only the types listed in the
//! config's `commands.allow` run (README, Remote commands).
//!
//! Here: [`parse`] (the server's answer as untrusted input, each command checked into an
//! action or refused with the reason), [`journal`] (at most once: ids fsynced before they run,
//! results kept until delivered), [`run`] (the actions), [`poll`] (the task that polls, runs
//! and posts results, and the self-metrics).

pub use journal::{Journal, Outcome};
pub use poll::{CommandStats, Poller, PollerParts, SharedJournal};
pub use run::Runner;

pub mod journal;
pub mod parse;
pub mod poll;
pub mod run;
