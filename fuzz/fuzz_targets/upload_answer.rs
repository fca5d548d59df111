//! The server's answer to an upload: status, Retry-After, body.
//!
//! Input: two bytes of status, nine of Retry-After (a flag and the seconds), the body.
//!
//! upload.rs reads the Retry-After header inside the transport; when the answer handling
//! becomes a pure function of (status, headers, body), call it here with headers built from
//! the input and check its verdict against the rules in `verdict_rules` below.
#![no_main]
use std::time::Duration;

use dcmon_agent::upload::{UploadError, Verdict, excerpt};
use libfuzzer_sys::fuzz_target;
use reqwest::StatusCode;

/// At most this many characters of the body reach a log line (upload.rs' BODY_EXCERPT_BYTES),
/// plus the ellipsis.
const EXCERPT_CHARS: usize = 200;

fn verdict_rules(status: u16, retry_after_secs: Option<u64>, verdict: Verdict) {
    let expected = match status {
        401 | 403 => Verdict::NotAuthorized,
        429 | 503 => Verdict::RetryLater { retry_after: retry_after_secs.map(Duration::from_secs) },
        408 | 300..=399 | 500.. => Verdict::RetryLater { retry_after: None },
        _ => Verdict::Rejected,
    };
    assert_eq!(verdict, expected, "status {status}");
}

fuzz_target!(|data: &[u8]| {
    let (Some(head), body) = (data.get(..11), data.get(11..).unwrap_or_default()) else { return };
    let code = u16::from_le_bytes([head[0], head[1]]) % 1000;
    let Ok(status) = StatusCode::from_u16(code) else { return };
    let retry_after_secs = (head[2] & 1 == 1).then(|| u64::from_le_bytes(head[3..11].try_into().unwrap_or_default()));

    let text = excerpt(body);
    assert!(!text.trim().is_empty(), "an excerpt is never blank");
    assert!(!text.chars().any(char::is_control), "control characters reach the log: {text:?}");
    assert!(text.chars().count() <= EXCERPT_CHARS + 1, "{} characters", text.chars().count());

    let error = UploadError::Status { status, excerpt: text.clone(), retry_after_secs };
    let message = error.to_string();
    assert!(message.contains(status.as_str()) && message.contains(&text), "{message}");
    if !status.is_success() {
        verdict_rules(code, retry_after_secs, error.verdict());
    }
});
