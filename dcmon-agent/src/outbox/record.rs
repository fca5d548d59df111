//! The record codec: how a batch, a "done" mark and an output's cursor are written into a
//! segment, and a reader that finds them again in bounded memory, whatever the file holds.
//!
//! ```text
//! DCMB2 B <seq:016x> <timestamp> <body length> <crc32:08x>\n<body>\n   a batch
//! DCMB2 D <seq:016x> <crc32:08x>\n                                      batch <seq> is done
//! DCMB2 C <seq:016x> <output> <crc32:08x>\n                             <output> is done with
//!                                                                        every batch up to <seq>
//! ```
//!
//! The CRC covers the header fields and the body, so a torn or damaged record is detected. A
//! body is compact JSON, which never holds a raw newline, so records are lines: after damage
//! the reader resumes at the next header line.
//!
//! `D` means done for every output (the only kind the first releases wrote, and still what a
//! batch gets once its last output is done with it). `C` records came with several outputs
//! (issue 16): an output delivers oldest first, so one number says how far it got. An
//! `<output>` name is 1 to [`OUTPUT_NAME_MAX`] printable ASCII bytes without spaces; a reader
//! that predates `C` records sets them aside as damage, which only means resending.

use std::io::{BufRead, Write as _};

pub(super) const MAGIC: &[u8] = b"DCMB2 ";

/// The longest body a record may declare: far beyond any batch (the server takes any size), so
/// a larger length is damage. The reader never allocates by a declared length anyway.
pub const MAX_BODY_BYTES: u64 = 256 << 20;

/// The longest output name a cursor record carries (config names are at most 64 bytes; a
/// name derived from a URL's `host:port` at most 253 + 6).
pub const OUTPUT_NAME_MAX: usize = 260;

/// A header line is at most 6 + 60 + 9 bytes for a batch, 6 + 2 + 16 + 1 + [`OUTPUT_NAME_MAX`]
/// + 9 for a cursor; a longer line is not a header.
const HEADER_MAX: usize = 6 + 2 + 16 + 1 + OUTPUT_NAME_MAX + 9;

/// Why a stored record cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// No valid header line.
    #[error("no valid header line")]
    Header,
    /// The segment ends inside the record: its write never completed.
    #[error("incomplete record at the end of the segment (torn write)")]
    Torn,
    /// The body line is not as long as the header says.
    #[error("body is {actual} bytes but the header says {expected}")]
    Length {
        /// From the header.
        expected: usize,
        /// On disk.
        actual: usize,
    },
    /// The header declares a body longer than [`MAX_BODY_BYTES`].
    #[error("the header declares a {declared}-byte body, more than the {max} bytes a record may hold")]
    Oversize {
        /// From the header.
        declared: u64,
        /// [`MAX_BODY_BYTES`].
        max: u64,
    },
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
}

/// One record of a segment, as [`parse_segment`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A batch.
    Batch {
        /// Its sequence number.
        seq: u64,
        /// Its collection timestamp.
        timestamp: i64,
        /// Offset of the body in the segment.
        body_offset: usize,
        /// The body.
        body: &'a [u8],
        /// The record's CRC.
        crc: u32,
    },
    /// Batch `seq` is done (delivered, rejected or dropped).
    Done {
        /// Its sequence number.
        seq: u64,
    },
    /// Output `output` is done with every batch up to and including `seq`.
    Cursor {
        /// The output's name.
        output: String,
        /// The last batch it is done with.
        seq: u64,
    },
    /// Bytes that are not a valid record.
    Damaged {
        /// Where they start in the segment.
        offset: usize,
        /// How many.
        len: usize,
        /// What is wrong.
        why: Corrupt,
    },
}

/// `seq` as 16 lowercase hex digits, zero-padded: `{seq:016x}` without the formatter, which
/// cost more than the rest of a record's encoding.
fn hex_seq(seq: u64) -> [u8; 16] {
    let mut digits = [0u8; 16];
    // Two digits per byte: the lengths match, so this cannot fail.
    let _ = hex::encode_to_slice(seq.to_be_bytes(), &mut digits);
    digits
}

/// `crc` as 8 lowercase hex digits, zero-padded (`{crc:08x}`).
fn hex_crc(crc: u32) -> [u8; 8] {
    let mut digits = [0u8; 8];
    let _ = hex::encode_to_slice(crc.to_be_bytes(), &mut digits);
    digits
}

/// `B {seq:016x} {timestamp} {len}`: a batch record's header fields, which its CRC also covers.
/// At most 2 + 16 + 1 + 20 + 1 + 20 = 60 bytes.
fn batch_fields(seq: u64, timestamp: i64, len: usize) -> ([u8; 64], usize) {
    let mut buf = [0u8; 64];
    let mut rest = &mut buf[..];
    // 60 bytes at most fit in 64: these writes cannot fail.
    let _ = rest.write_all(b"B ");
    let _ = rest.write_all(&hex_seq(seq));
    let _ = write!(rest, " {timestamp} {len}");
    let used = 64 - rest.len();
    (buf, used)
}

/// The CRC a batch record of `body` carries.
pub(super) fn batch_crc(seq: u64, timestamp: i64, body: &[u8]) -> u32 {
    let mut h = batch_hasher(seq, timestamp, body.len());
    h.update(body);
    h.finalize()
}

/// A batch CRC fed with the header fields and the newline; the body follows.
fn batch_hasher(seq: u64, timestamp: i64, len: usize) -> crc32fast::Hasher {
    let (fields, used) = batch_fields(seq, timestamp, len);
    let mut h = crc32fast::Hasher::new();
    h.update(&fields[..used]);
    h.update(b"\n");
    h
}

/// `D {seq:016x}`: a done record's fields, which its CRC covers.
fn done_fields(seq: u64) -> [u8; 18] {
    let mut fields = [b'D'; 18];
    fields[1] = b' ';
    fields[2..].copy_from_slice(&hex_seq(seq));
    fields
}

/// Whether `output` can be written into a cursor record: 1 to [`OUTPUT_NAME_MAX`] printable
/// ASCII bytes, no space (fields are space-separated, records are lines).
pub fn valid_output_name(output: &str) -> bool {
    (1..=OUTPUT_NAME_MAX).contains(&output.len()) && output.bytes().all(|b| b.is_ascii_graphic())
}

/// `C {seq:016x} {output}`: a cursor record's fields, which its CRC covers.
fn cursor_fields(seq: u64, output: &str) -> Vec<u8> {
    let mut fields = Vec::with_capacity(2 + 16 + 1 + output.len());
    fields.extend_from_slice(b"C ");
    fields.extend_from_slice(&hex_seq(seq));
    fields.push(b' ');
    fields.extend_from_slice(output.as_bytes());
    fields
}

/// Append the record saying `output` is done with every batch up to `seq` to `out`. Returns
/// false (appending nothing) for a name a record cannot carry ([`valid_output_name`]).
pub fn encode_cursor(out: &mut Vec<u8>, output: &str, seq: u64) -> bool {
    if !valid_output_name(output) {
        return false;
    }
    let fields = cursor_fields(seq, output);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&fields);
    out.push(b' ');
    out.extend_from_slice(&hex_crc(crc32fast::hash(&fields)));
    out.push(b'\n');
    true
}

/// Append the record of a batch to `out`; returns its CRC.
pub fn encode_batch(out: &mut Vec<u8>, seq: u64, timestamp: i64, body: &[u8]) -> u32 {
    let (fields, len) = batch_fields(seq, timestamp, body.len());
    let crc = batch_crc(seq, timestamp, body);
    out.reserve(MAGIC.len() + len + 10 + body.len() + 1);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&fields[..len]);
    out.push(b' ');
    out.extend_from_slice(&hex_crc(crc));
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(b'\n');
    crc
}

/// Append the record saying batch `seq` is done to `out`.
pub fn encode_done(out: &mut Vec<u8>, seq: u64) {
    let fields = done_fields(seq);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&fields);
    out.push(b' ');
    out.extend_from_slice(&hex_crc(crc32fast::hash(&fields)));
    out.push(b'\n');
}

/// The length of a batch's record.
pub fn batch_record_len(seq: u64, timestamp: i64, body: &[u8]) -> u64 {
    let (_, len) = batch_fields(seq, timestamp, body.len());
    // magic, fields, " crc8\n", body, "\n"
    (MAGIC.len() + len + 10 + body.len() + 1) as u64
}

pub(super) fn parse_hex_seq(s: &str) -> Option<u64> {
    (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten()
}

fn parse_crc(s: &str) -> Option<u32> {
    (s.len() == 8).then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

/// Every record of a segment, in order, damaged stretches included. Never fails.
pub fn parse_segment(data: &[u8]) -> Vec<Record<'_>> {
    let mut reader = RecordReader::new(data);
    let mut records = Vec::new();
    // Reading a slice cannot fail.
    while let Ok(Some(found)) = reader.next_record() {
        let at = |offset: u64| usize::try_from(offset).unwrap_or(usize::MAX);
        records.push(match found {
            Found::Batch { seq, timestamp, body_offset, body_len, crc } => {
                let start = at(body_offset);
                Record::Batch { seq, timestamp, body_offset: start, body: &data[start..start + at(body_len)], crc }
            }
            Found::Done { seq } => Record::Done { seq },
            Found::Cursor { output, seq } => Record::Cursor { output, seq },
            Found::Damaged { offset, len, why } => Record::Damaged { offset: at(offset), len: at(len), why },
        });
    }
    records
}

/// A record as [`RecordReader`] finds it: where it is, not its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Found {
    Batch { seq: u64, timestamp: i64, body_offset: u64, body_len: u64, crc: u32 },
    Done { seq: u64 },
    Cursor { output: String, seq: u64 },
    Damaged { offset: u64, len: u64, why: Corrupt },
}

/// The length of a batch's record, from its header fields.
pub(super) fn record_len(seq: u64, timestamp: i64, body_len: u64) -> u64 {
    // Only the body's length matters, not its bytes.
    let digits = body_len.checked_ilog10().map_or(1, |d| u64::from(d) + 1);
    batch_record_len(seq, timestamp, b"") - 1 + digits + body_len
}

/// One line: where it starts, its first [`HEADER_MAX`] bytes, its whole length (newline
/// included) and whether it ends in a newline (else the input ended inside it).
#[derive(Debug)]
struct Line {
    offset: u64,
    head: Vec<u8>,
    len: u64,
    complete: bool,
}

/// Reads the records of a segment one at a time, keeping at most a header line in memory: a
/// body is checked as it streams past, so neither a huge file nor a huge declared length can
/// make it allocate.
#[derive(Debug)]
pub(super) struct RecordReader<R> {
    input: R,
    /// Bytes consumed so far.
    pos: u64,
    /// A header line read while looking for the end of a damaged stretch.
    pending: Option<Line>,
}

impl<R: BufRead> RecordReader<R> {
    pub(super) fn new(input: R) -> Self {
        Self { input, pos: 0, pending: None }
    }

    /// Consume bytes up to and including the next newline, passing each chunk (without the
    /// newline) to `chunk`; returns how many bytes were consumed and whether a newline ended them.
    fn consume_line(&mut self, mut chunk: impl FnMut(&[u8])) -> std::io::Result<(u64, bool)> {
        let mut consumed = 0u64;
        loop {
            let buf = match self.input.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                self.pos += consumed;
                return Ok((consumed, false));
            }
            let (take, complete) = match memchr::memchr(b'\n', buf) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            chunk(&buf[..take - usize::from(complete)]);
            self.input.consume(take);
            consumed += take as u64;
            if complete {
                self.pos += consumed;
                return Ok((consumed, true));
            }
        }
    }

    fn read_line(&mut self) -> std::io::Result<Option<Line>> {
        if let Some(line) = self.pending.take() {
            return Ok(Some(line));
        }
        let offset = self.pos;
        let mut head = Vec::new();
        let (len, complete) = self.consume_line(|c| {
            let room = (HEADER_MAX + 1).saturating_sub(head.len());
            head.extend_from_slice(&c[..c.len().min(room)]);
        })?;
        Ok((len > 0).then_some(Line { offset, head, len, complete }))
    }

    /// A damaged stretch from `start` over the lines that follow it, up to the next line that
    /// starts with the magic (kept for the next record) or the end.
    fn damaged_until_next_header(&mut self, start: &Line, why: Corrupt) -> std::io::Result<Found> {
        let mut end = start.offset + start.len;
        while let Some(line) = self.read_line()? {
            if line.head.starts_with(MAGIC) {
                self.pending = Some(line);
                break;
            }
            end = line.offset + line.len;
        }
        Ok(Found::Damaged { offset: start.offset, len: end - start.offset, why })
    }

    /// The next record, or `None` at the end of the input. Fails only if reading fails.
    pub(super) fn next_record(&mut self) -> std::io::Result<Option<Found>> {
        let Some(line) = self.read_line()? else { return Ok(None) };
        if !line.complete {
            return Ok(Some(Found::Damaged { offset: line.offset, len: line.len, why: Corrupt::Torn }));
        }
        let header = (line.head.len() <= HEADER_MAX)
            .then(|| std::str::from_utf8(&line.head).ok()?.strip_prefix("DCMB2 "))
            .flatten();
        let fields: Vec<&str> = header.map(|h| h.split(' ').collect()).unwrap_or_default();
        let found = match fields.as_slice() {
            ["B", seq, ts, len, crc] => {
                let parsed = (parse_hex_seq(seq), ts.parse::<i64>().ok(), len.parse::<u64>().ok(), parse_crc(crc));
                let (Some(seq), Some(timestamp), Some(expected), Some(crc)) = parsed else {
                    return self.damaged_until_next_header(&line, Corrupt::Header).map(Some);
                };
                if expected > MAX_BODY_BYTES {
                    let why = Corrupt::Oversize { declared: expected, max: MAX_BODY_BYTES };
                    return self.damaged_until_next_header(&line, why).map(Some);
                }
                let body_offset = self.pos;
                // Checked below: `expected` fits in usize, as it is at most MAX_BODY_BYTES.
                let mut hasher = batch_hasher(seq, timestamp, usize::try_from(expected).unwrap_or(usize::MAX));
                let mut hashed = 0u64;
                let (len, complete) = self.consume_line(|c| {
                    let take = usize::try_from((expected - hashed).min(c.len() as u64)).unwrap_or(c.len());
                    hasher.update(&c[..take]);
                    hashed += take as u64;
                })?;
                let record_len = line.len + len;
                let body_len = len - u64::from(complete);
                if !complete {
                    Found::Damaged { offset: line.offset, len: record_len, why: Corrupt::Torn }
                } else if body_len != expected {
                    let (expected, actual) = (usize::try_from(expected), usize::try_from(body_len));
                    let why = Corrupt::Length {
                        expected: expected.unwrap_or(usize::MAX),
                        actual: actual.unwrap_or(usize::MAX),
                    };
                    Found::Damaged { offset: line.offset, len: record_len, why }
                } else if hasher.finalize() != crc {
                    Found::Damaged { offset: line.offset, len: record_len, why: Corrupt::Checksum }
                } else {
                    Found::Batch { seq, timestamp, body_offset, body_len, crc }
                }
            }
            ["D", seq, crc] => match (parse_hex_seq(seq), parse_crc(crc)) {
                (Some(seq), Some(crc)) if crc32fast::hash(&done_fields(seq)) == crc => Found::Done { seq },
                (Some(_), Some(_)) => Found::Damaged { offset: line.offset, len: line.len, why: Corrupt::Checksum },
                _ => Found::Damaged { offset: line.offset, len: line.len, why: Corrupt::Header },
            },
            ["C", seq, output, crc] if valid_output_name(output) => match (parse_hex_seq(seq), parse_crc(crc)) {
                (Some(seq), Some(crc)) if crc32fast::hash(&cursor_fields(seq, output)) == crc => {
                    Found::Cursor { output: (*output).to_owned(), seq }
                }
                (Some(_), Some(_)) => Found::Damaged { offset: line.offset, len: line.len, why: Corrupt::Checksum },
                _ => Found::Damaged { offset: line.offset, len: line.len, why: Corrupt::Header },
            },
            _ => return self.damaged_until_next_header(&line, Corrupt::Header).map(Some),
        };
        Ok(Some(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn body(i: u32) -> Vec<u8> {
        format!("{{\"batch\": {i}}}").into_bytes()
    }

    #[test]
    fn the_record_format_is_stable() {
        // Segments outlive upgrades: these bytes were written by the format!-based encoder
        // that the first releases shipped, and must read (and be written) the same forever.
        let pinned = "DCMB2 B 000000000000001f -5 7 f154f0fe\n{\"a\":1}\n\
                      DCMB2 B ffffffffffffffff 9223372036854775807 0 5a4d36f1\n\n\
                      DCMB2 D 000000000000001f 2d35bf60\n";
        let mut seg = Vec::new();
        encode_batch(&mut seg, 0x1f, -5, b"{\"a\":1}");
        encode_batch(&mut seg, u64::MAX, i64::MAX, b"");
        encode_done(&mut seg, 0x1f);
        assert_eq!(String::from_utf8(seg).expect("utf8"), pinned);
        assert_eq!(batch_record_len(0x1f, -5, b"{\"a\":1}"), 47);
        assert_eq!(batch_record_len(u64::MAX, i64::MAX, b""), 57);
        let records = parse_segment(pinned.as_bytes());
        assert!(
            matches!(
                records[..],
                [
                    Record::Batch { seq: 0x1f, timestamp: -5, body: b"{\"a\":1}", crc: 0xf154_f0fe, .. },
                    Record::Batch { seq: u64::MAX, timestamp: i64::MAX, body: b"", .. },
                    Record::Done { seq: 0x1f }
                ]
            ),
            "{records:?}"
        );
    }

    #[test]
    fn the_cursor_record_format_is_pinned_and_its_damage_named() {
        // Issue 16: segments written now must read the same in later releases.
        let pinned = "DCMB2 C 000000000000001f prom-1:9090 00e141fd\n";
        let mut seg = Vec::new();
        assert!(encode_cursor(&mut seg, "prom-1:9090", 0x1f));
        assert_eq!(String::from_utf8(seg.clone()).expect("utf8"), pinned);
        assert_eq!(parse_segment(&seg), [Record::Cursor { output: "prom-1:9090".to_owned(), seq: 0x1f }]);
        let mut flipped = seg.clone();
        flipped[10] ^= 1; // in the seq
        assert!(matches!(parse_segment(&flipped)[..], [Record::Damaged { offset: 0, why: Corrupt::Checksum, .. }]));
        let mut flipped = seg.clone();
        flipped[26] ^= 1; // in the name
        assert!(matches!(parse_segment(&flipped)[..], [Record::Damaged { offset: 0, why: Corrupt::Checksum, .. }]));
        let mut cut = seg.clone();
        cut.truncate(seg.len() - 1);
        assert!(matches!(parse_segment(&cut)[..], [Record::Damaged { why: Corrupt::Torn, .. }]));
    }

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let mut seg = Vec::new();
        encode_batch(&mut seg, 7, 100, b"{\"a\":1}");
        encode_done(&mut seg, 7);
        assert_eq!(batch_record_len(7, 100, b"{\"a\":1}"), (seg.len() - 34) as u64, "a D record is 34 bytes");
        let records = parse_segment(&seg);
        assert!(
            matches!(
                records[..],
                [Record::Batch { seq: 7, timestamp: 100, body: b"{\"a\":1}", .. }, Record::Done { seq: 7 }]
            ),
            "{records:?}"
        );

        let mut flipped = seg.clone();
        flipped[45] ^= 1; // in the body
        assert!(matches!(parse_segment(&flipped)[0], Record::Damaged { offset: 0, why: Corrupt::Checksum, .. }));
        let mut flipped = seg.clone();
        flipped[12] ^= 1; // in the header's seq
        assert!(matches!(parse_segment(&flipped)[0], Record::Damaged { why: Corrupt::Checksum, .. }));
        let mut flipped = seg.clone();
        flipped[1] = b'x'; // the magic itself: resume at the next header line
        let records = parse_segment(&flipped);
        assert!(matches!(
            records[..],
            [Record::Damaged { offset: 0, why: Corrupt::Header, .. }, Record::Done { seq: 7 }]
        ));

        let mut longer = seg.clone();
        longer.splice(0..0, b"garbage\nmore garbage\n".iter().copied());
        let records = parse_segment(&longer);
        assert!(matches!(
            records[..],
            [Record::Damaged { offset: 0, len: 21, .. }, Record::Batch { .. }, Record::Done { .. }]
        ));
    }

    #[test]
    fn every_cut_of_a_segment_keeps_the_complete_records() {
        // A power cut can leave any prefix of a segment: each must read as the records wholly
        // inside it, plus at most a torn tail.
        let mut seg = Vec::new();
        let mut ends = Vec::new();
        for i in 0..3 {
            encode_batch(&mut seg, i, 1000 + i as i64, &body(i as u32));
            ends.push((seg.len(), 1u32));
        }
        encode_done(&mut seg, 0);
        ends.push((seg.len(), 0));
        assert!(encode_cursor(&mut seg, "prom", 1));
        ends.push((seg.len(), 0));
        for cut in 0..=seg.len() {
            let records = parse_segment(&seg[..cut]);
            let complete = ends.iter().filter(|(end, _)| *end <= cut).count();
            let whole: Vec<_> = records.iter().filter(|r| !matches!(r, Record::Damaged { .. })).collect();
            assert_eq!(whole.len(), complete, "cut at {cut}: {records:?}");
            let torn = records.iter().filter(|r| matches!(r, Record::Damaged { why: Corrupt::Torn, .. })).count();
            assert_eq!(torn, usize::from(!ends.iter().any(|(end, _)| *end == cut) && cut > 0), "cut at {cut}");
            assert!(
                records.iter().all(|r| !matches!(r, Record::Damaged { why: Corrupt::Checksum | Corrupt::Header, .. }))
            );
        }
    }

    /// A batch header line for `body` whose timestamp `1` is written with leading zeros up to
    /// `len` bytes (newline excluded); its checksum is that of the record.
    fn padded_header(len: usize, body: &[u8]) -> Vec<u8> {
        let crc = batch_crc(3, 1, body);
        let short = format!("DCMB2 B {:016x} 1 {} {crc:08x}", 3, body.len());
        let ts = format!("{:0>w$}", 1, w = 1 + len - short.len());
        format!("DCMB2 B {:016x} {ts} {} {crc:08x}", 3, body.len()).into_bytes()
    }

    #[test]
    fn header_lines_are_bounded_at_exactly_header_max() {
        // The longest header line a writer makes: a cursor with the longest name.
        let mut longest = Vec::new();
        assert!(encode_cursor(&mut longest, &"x".repeat(OUTPUT_NAME_MAX), u64::MAX));
        assert_eq!(HEADER_MAX, longest.len() - 1);
        // `i64` parsing takes leading zeros, so a valid header can be padded to any length.
        let at_max = padded_header(HEADER_MAX, b"{}");
        assert_eq!(at_max.len(), HEADER_MAX);
        let mut seg = at_max.clone();
        seg.extend_from_slice(b"\n{}\n");
        assert!(matches!(parse_segment(&seg)[..], [Record::Batch { seq: 3, timestamp: 1, body: b"{}", .. }]));
        // One byte longer, whether the valid header is padded or followed by a space: not a
        // header (and not read as its first HEADER_MAX bytes).
        for mut line in [padded_header(HEADER_MAX + 1, b"{}"), [at_max, b" ".to_vec()].concat()] {
            assert_eq!(line.len(), HEADER_MAX + 1);
            line.extend_from_slice(b"\n{}\n");
            let records = parse_segment(&line);
            assert_eq!(
                records,
                [Record::Damaged { offset: 0, len: line.len(), why: Corrupt::Header }],
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn the_record_length_from_header_fields_is_the_encoded_length() {
        // `record_len` counts the digits of the body length: check each change of width.
        for len in [0usize, 1, 9, 10, 99, 100, 999, 1000, 12_345] {
            let body = vec![b'x'; len];
            for (seq, ts) in [(0, 0), (u64::MAX, i64::MIN), (7, 1_700_000_000)] {
                let mut seg = Vec::new();
                encode_batch(&mut seg, seq, ts, &body);
                assert_eq!(record_len(seq, ts, len as u64), seg.len() as u64, "body {len}, seq {seq}, ts {ts}");
                assert_eq!(batch_record_len(seq, ts, &body), seg.len() as u64);
            }
        }
    }

    #[test]
    fn a_cursor_name_no_record_can_carry_is_damage_even_with_a_matching_checksum() {
        for name in ["caf\u{e9}", "tab\there", "bell\u{7}"] {
            let fields = cursor_fields(5, name);
            let line = format!("DCMB2 C {:016x} {name} {:08x}\n", 5, crc32fast::hash(&fields));
            assert_eq!(
                parse_segment(line.as_bytes()),
                [Record::Damaged { offset: 0, len: line.len(), why: Corrupt::Header }],
                "{name:?}"
            );
        }
    }

    /// A reader whose every other `fill_buf` is interrupted by a signal.
    struct Interrupted<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl std::io::Read for Interrupted<'_> {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            unreachable!("read through BufRead")
        }
    }

    impl BufRead for Interrupted<'_> {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            // A few bytes at a time, so that lines span several reads.
            Ok(&self.data[..self.data.len().min(5)])
        }
        fn consume(&mut self, n: usize) {
            self.data = &self.data[n..];
        }
    }

    #[test]
    fn an_interrupted_read_is_retried() {
        let mut seg = Vec::new();
        encode_batch(&mut seg, 7, 100, b"{\"a\":1}");
        encode_done(&mut seg, 7);
        seg.extend_from_slice(b"garbage\n");
        encode_batch(&mut seg, 8, 100, b"{\"a\":2}");
        let mut reader = RecordReader::new(Interrupted { data: &seg, interrupt: false });
        let mut found = Vec::new();
        while let Some(f) = reader.next_record().expect("an interrupted read is retried") {
            found.push(f);
        }
        let at = batch_record_len(7, 100, b"{\"a\":1}");
        assert_eq!(
            found,
            [
                Found::Batch {
                    seq: 7,
                    timestamp: 100,
                    body_offset: at - 8,
                    body_len: 7,
                    crc: batch_crc(7, 100, b"{\"a\":1}")
                },
                Found::Done { seq: 7 },
                Found::Damaged { offset: at + 34, len: 8, why: Corrupt::Header },
                Found::Batch {
                    seq: 8,
                    timestamp: 100,
                    body_offset: at + 42 + at - 8,
                    body_len: 7,
                    crc: batch_crc(8, 100, b"{\"a\":2}")
                },
            ]
        );
    }

    #[test]
    fn a_bit_flip_anywhere_never_yields_a_record_that_was_not_written() {
        // A flip is detected (damage) or changes nothing read (a hex digit's case): it never
        // turns into another batch, another batch marked done, or a cursor further on.
        let mut seg = Vec::new();
        encode_batch(&mut seg, 0x1f, 1_700_000_000, b"{\"a\":[1,2]}");
        encode_done(&mut seg, 0x1e);
        assert!(encode_cursor(&mut seg, "prom", 0x1d));
        let written = parse_segment(&seg);
        assert_eq!(written.len(), 3);
        for at in 0..seg.len() {
            for bit in 0..8 {
                let mut flipped = seg.clone();
                flipped[at] ^= 1 << bit;
                let records = parse_segment(&flipped);
                let read: Vec<&Record<'_>> = records.iter().filter(|r| !matches!(r, Record::Damaged { .. })).collect();
                assert!(read.iter().all(|r| written.contains(r)), "flip of bit {bit} at {at}: {records:?}");
                assert!(
                    read.len() < 3 || flipped[at].eq_ignore_ascii_case(&seg[at]),
                    "flip of bit {bit} at {at} undetected: {records:?}"
                );
            }
        }
    }
}
