//! The server's answer to an upload: status, headers (Retry-After among them), body, through
//! `upload::classify_answer`, the function the agent's upload path calls.
//!
//! Input: two bytes of status, one byte of header count, then `len, name, len, value` header
//! entries, the rest is the body.
#![no_main]
use std::time::{Duration, SystemTime};

use dcmon_agent::upload::{Verdict, classify_answer, excerpt};
use libfuzzer_sys::fuzz_target;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// At most this many characters of the body reach a log line (upload.rs' BODY_EXCERPT_BYTES),
/// plus the ellipsis.
const EXCERPT_CHARS: usize = 200;

/// Take a length-prefixed field off the front of `data`.
fn field<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&len, rest) = data.split_first()?;
    let (value, rest) = rest.split_at_checked(usize::from(len))?;
    *data = rest;
    Some(value)
}

fuzz_target!(|input: &[u8]| {
    let Some((head, mut data)) = input.split_at_checked(3) else { return };
    let code = u16::from_le_bytes([head[0], head[1]]);
    let mut headers = HeaderMap::new();
    for _ in 0..head[2] % 8 {
        let (Some(name), Some(value)) = (field(&mut data), field(&mut data)) else { break };
        // A name byte of 0 stands for Retry-After, so the fuzzer reaches its parser often.
        let name = if name == [0] { Ok(reqwest::header::RETRY_AFTER) } else { HeaderName::from_bytes(name) };
        if let (Ok(name), Ok(value)) = (name, HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    let body = data;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);

    let text = excerpt(body);
    assert!(!text.trim().is_empty(), "an excerpt is never blank");
    assert!(!text.chars().any(char::is_control), "control characters reach the log: {text:?}");
    assert!(text.chars().count() <= EXCERPT_CHARS + 1, "{} characters", text.chars().count());

    match classify_answer(code, &headers, body, now) {
        Ok(_) => assert!((200..300).contains(&code), "status {code} taken as delivered"),
        Err(e) => {
            assert!(!(200..300).contains(&code), "a 2xx ({code}) classified as failed: {e}");
            let message = e.to_string();
            assert!(message.contains(&code.to_string()), "the log line names the status: {message}");
            assert!(!message.chars().any(char::is_control), "control characters reach the log: {message:?}");
            let expected = match code {
                401 | 403 => Some(Verdict::NotAuthorized),
                400 | 413 | 422 => Some(Verdict::Rejected),
                _ => None,
            };
            match (e.verdict(), expected) {
                (v, Some(want)) => assert_eq!(v, want, "status {code}"),
                (Verdict::RetryLater { retry_after }, None) => {
                    assert!(retry_after.is_none() || matches!(code, 429 | 503), "Retry-After honoured on {code}");
                }
                (v, None) => panic!("status {code} gave {v:?}: only 400, 413, 422, 401, 403 may"),
            }
        }
    }
});
