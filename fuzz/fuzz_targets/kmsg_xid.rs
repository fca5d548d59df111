//! /dev/kmsg records and the NVIDIA driver's XID lines in them (the kernel log is written by
//! drivers and, through /dev/kmsg, by any root process): each line of the input parsed as a
//! record, its message searched for an XID.
#![no_main]
use dcmon_agent::collector::gpu_xid::kmsg::{parse_record, parse_xid};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if let Some(record) = parse_record(line) {
            assert!(line.ends_with(record.message), "the message is the line's tail: {line:?}");
            if let Some(xid) = parse_xid(record.message) {
                assert!(record.message.contains("NVRM: Xid ("), "{xid:?} from {line:?}");
            }
        }
        // The message alone, as a reader that lost the header would hand it on.
        if let Some(xid) = parse_xid(line) {
            assert!(line.contains(&xid.xid.to_string()), "{xid:?} from {line:?}");
        }
    }
});
