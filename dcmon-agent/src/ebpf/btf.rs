//! Struct field offsets, enum values and tracepoint type ids from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! The BPF programs read a handful of fields of `struct request`, `sk_buff` and `net_device`;
//! their offsets depend on the kernel version and config, so the loader looks them up here and
//! hands them to the programs as `.rodata` globals. Only the small part of the BTF format that
//! this needs is read, in place: one pass over the type section records where each type starts
//! (4 bytes a type), and lookups decode the few records they visit and compare names in the
//! string section without copying it, so the parse costs little beyond the blob itself.

use std::collections::HashSet;

/// A BTF blob that could not be used, with what was expected.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// Header or type section malformed.
    #[error("malformed BTF: {0}")]
    Malformed(String),
    /// No struct of that name (a kernel too old or too different).
    #[error("BTF has no `struct {0}`")]
    NoStruct(String),
    /// No enum of that name.
    #[error("BTF has no `enum {0}`")]
    NoEnum(String),
    /// The struct lacks the field.
    #[error("BTF `struct {strukt}` has no field `{field}`")]
    NoField {
        /// Struct name.
        strukt: String,
        /// Dotted field path.
        field: String,
    },
    /// The field is there but not the size the program reads.
    #[error("BTF `struct {strukt}` field `{field}`: expected {want} bytes, kernel has {got}")]
    Size {
        /// Struct name.
        strukt: String,
        /// Dotted field path.
        field: String,
        /// Size the program reads.
        want: u32,
        /// Size in this kernel (0 for bitfields).
        got: u32,
    },
}

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
/// How deep lookups follow typedefs, anonymous members and arrays; the kernel's types nest a
/// few levels, a malformed blob can nest forever.
const NESTING_LIMIT: u32 = 32;
/// Bytes of the common part of each type record (name, info, size or type).
const RECORD: usize = 12;

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// The common part of one type record.
#[derive(Debug, Clone, Copy)]
struct Type {
    /// Where the record starts in the type section.
    at: usize,
    name_off: u32,
    kind: u32,
    /// Members, enumerators or parameters that follow the common part.
    vlen: usize,
    kind_flag: bool,
    /// `size` for INT/STRUCT/UNION/ENUM, referenced type id for PTR/TYPEDEF/modifiers.
    size_or_type: u32,
}

/// One BTF blob, borrowed, with where each of its types starts.
#[derive(Debug)]
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Offset in `types` of each type's record (index = type id - 1).
    starts: Vec<u32>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// Bytes that follow the common part of a record of `kind` with `vlen` entries; None for a
/// kind this parser does not know.
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_INT => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION => vlen * 12,
        KIND_ENUM => vlen * 8,
        KIND_FUNC_PROTO => vlen * 8,
        14 => 4,         // VAR
        15 => vlen * 12, // DATASEC
        17 => 4,         // DECL_TAG
        KIND_ENUM64 => vlen * 12,
        KIND_PTR | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12 | 16 | KIND_TYPE_TAG => 0,
        _ => return None,
    })
}

impl<'a> Btf<'a> {
    /// Indexes a little-endian BTF blob such as /sys/kernel/btf/vmlinux.
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let bad = |what: &str| BtfError::Malformed(what.to_owned());
        let magic = u16_at(data, 0).ok_or_else(|| bad("shorter than its header"))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Malformed(format!("magic {magic:#x}, expected {BTF_MAGIC:#x} (little-endian BTF)")));
        }
        let field = |at| u32_at(data, at).map(|v| v as usize).ok_or_else(|| bad("truncated header"));
        let hdr_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        let section = |off: usize, len: usize, what: &str| {
            let start = hdr_len.checked_add(off).ok_or_else(|| bad(what))?;
            data.get(start..start.checked_add(len).ok_or_else(|| bad(what))?).ok_or_else(|| bad(what))
        };
        let types = section(type_off, type_len, "type section outside the blob")?;
        let strings = section(str_off, str_len, "string section outside the blob")?;
        if types.len() > u32::MAX as usize {
            return Err(bad("type section over 4 GiB"));
        }
        let mut starts = Vec::new();
        let mut at = 0;
        while at < types.len() {
            let info = u32_at(types, at + 4).filter(|_| at + RECORD <= types.len());
            let info = info.ok_or_else(|| bad("type record truncated"))?;
            let kind = (info >> 24) & 0x1f;
            let extra = extra_len(kind, (info & 0xffff) as usize).ok_or_else(|| {
                BtfError::Malformed(format!("unknown type kind {kind} at type id {}", starts.len() + 1))
            })?;
            let end = at + RECORD + extra;
            if end > types.len() {
                return Err(BtfError::Malformed(format!("type id {} truncated", starts.len() + 1)));
            }
            starts.push(at as u32);
            at = end;
        }
        Ok(Self { types, strings, starts })
    }

    fn name(&self, off: u32) -> &'a str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// The word `i` after the common part of `t` (records were checked whole by `parse`).
    fn word(&self, t: &Type, i: usize) -> u32 {
        u32_at(self.types, t.at + RECORD + i * 4).unwrap_or(0)
    }

    fn get(&self, id: u32) -> Option<Type> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)? as usize;
        let word = |i: usize| u32_at(self.types, at + i * 4);
        let info = word(1)?;
        Some(Type {
            at,
            name_off: word(0)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: word(2)?,
        })
    }

    /// The id and record of the first type of `kind` named `name` that `accept`s.
    fn find(&self, kind: u32, name: &str, accept: impl Fn(&Type) -> bool) -> Option<(u32, Type)> {
        (1..=self.starts.len() as u32).find_map(|id| {
            let t = self.get(id)?;
            (t.kind == kind && accept(&t) && self.name(t.name_off) == name).then_some((id, t))
        })
    }

    fn members(&self, t: &Type) -> impl Iterator<Item = Member> + '_ {
        let t = *t;
        (0..t.vlen).map(move |m| {
            let off = self.word(&t, m * 3 + 2);
            Member {
                name_off: self.word(&t, m * 3),
                type_id: self.word(&t, m * 3 + 1),
                bit_offset: if t.kind_flag { off & 0xff_ffff } else { off },
                bitfield_size: if t.kind_flag { off >> 24 } else { 0 },
            }
        })
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<(u32, Type)> {
        for _ in 0..NESTING_LIMIT {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Some((id, t)),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> u32 {
        self.size_within(id, NESTING_LIMIT)
    }

    /// [`Btf::size_of`], looking at most `depth` arrays deep (a malformed blob can make an
    /// array of itself).
    fn size_within(&self, id: u32, depth: u32) -> u32 {
        match self.resolve(id) {
            Some((_, t)) => match t.kind {
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => t.size_or_type,
                KIND_PTR => 8,
                KIND_ARRAY if depth > 0 => {
                    let (elem, count) = (self.word(&t, 0), self.word(&t, 2));
                    self.size_within(elem, depth - 1).saturating_mul(count)
                }
                _ => 0,
            },
            None => 0,
        }
    }

    /// Finds member `name` of struct/union `id`, looking inside anonymous members (the kernel
    /// wraps many fields in unnamed unions). Returns (bit offset, member).
    fn member(&self, id: u32, name: &str) -> Option<(u32, Member)> {
        self.member_within(id, name, NESTING_LIMIT, &mut HashSet::new())
    }

    /// [`Btf::member`], looking at most `depth` anonymous members deep (a malformed blob can
    /// make a struct an anonymous member of itself).
    fn member_within(&self, id: u32, name: &str, depth: u32, searched: &mut HashSet<u32>) -> Option<(u32, Member)> {
        let (resolved, t) = self.resolve(id)?;
        // A type already searched has no such member this time either; a blob can reach one
        // type through many anonymous members, and searching it on each path is exponential.
        if !searched.insert(resolved) {
            return None;
        }
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        for m in self.members(&t) {
            let mname = self.name(m.name_off);
            if mname == name {
                return Some((m.bit_offset, m));
            }
            if mname.is_empty()
                && depth > 0
                && let Some((off, found)) = self.member_within(m.type_id, name, depth - 1, searched)
            {
                return m.bit_offset.checked_add(off).map(|bits| (bits, found));
            }
        }
        None
    }

    /// The type id of tracepoint `name`'s `btf_trace_<name>` typedef, which a tp_btf program
    /// names as its attach target. `None` when this kernel has no such tracepoint.
    pub fn tracepoint_type_id(&self, name: &str) -> Option<u32> {
        self.find(KIND_TYPEDEF, &format!("btf_trace_{name}"), |_| true).map(|(id, _)| id)
    }

    /// How many arguments tracepoint `name` hands a tp_btf program: the parameters of the
    /// function prototype that its `btf_trace_<name>` typedef points to, less the leading
    /// `void *__data`. `None` when this kernel has no such tracepoint.
    pub fn tracepoint_args(&self, name: &str) -> Option<u32> {
        let (_, t) = self.find(KIND_TYPEDEF, &format!("btf_trace_{name}"), |_| true)?;
        let ptr = self.get(t.size_or_type).filter(|p| p.kind == KIND_PTR)?;
        let proto = self.get(ptr.size_or_type).filter(|p| p.kind == KIND_FUNC_PROTO)?;
        (proto.vlen as u32).checked_sub(1)
    }

    /// The enumerators of `enum name` as (name, value), in BTF order.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, u32)>, BtfError> {
        let (_, t) = self.find(KIND_ENUM, name, |t| t.vlen > 0).ok_or_else(|| BtfError::NoEnum(name.to_owned()))?;
        Ok((0..t.vlen).map(|e| (self.name(self.word(&t, e * 2)).to_owned(), self.word(&t, e * 2 + 1))).collect())
    }

    /// The value of enumerator `name` in whichever enum holds it, named or anonymous (the
    /// kernel declares many flag bits in anonymous enums); `None` when no enum has it.
    pub fn enumerator(&self, name: &str) -> Option<u32> {
        (1..=self.starts.len() as u32).find_map(|id| {
            let t = self.get(id).filter(|t| t.kind == KIND_ENUM)?;
            (0..t.vlen).find(|&e| self.name(self.word(&t, e * 2)) == name).map(|e| self.word(&t, e * 2 + 1))
        })
    }

    /// Byte offset of `path` (dotted, e.g. `nd_net.net`) in `struct strukt`, checking that the
    /// field is `size` bytes wide.
    pub fn field_offset(&self, strukt: &str, path: &str, size: u32) -> Result<u32, BtfError> {
        let no_field = || BtfError::NoField { strukt: strukt.to_owned(), field: path.to_owned() };
        // A struct with no members may be a forward declaration in a module's BTF; take the
        // first full definition.
        let (mut id, _) =
            self.find(KIND_STRUCT, strukt, |t| t.vlen > 0).ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut bits = 0;
        let mut last = None;
        for part in path.split('.') {
            let (off, m) = self.member(id, part).ok_or_else(no_field)?;
            bits = u32::checked_add(bits, off).ok_or_else(no_field)?;
            id = m.type_id;
            last = Some(m);
        }
        let m = last.ok_or_else(no_field)?;
        let got = if m.bitfield_size != 0 { 0 } else { self.size_of(m.type_id) };
        if got != size || bits % 8 != 0 {
            return Err(BtfError::Size { strukt: strukt.to_owned(), field: path.to_owned(), want: size, got });
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF: `struct s { int a; union { struct { long p; }; int q; }; };`
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0long\0s\0a\0p\0q\0".to_vec();
        let (int, long, s, a, p, q) = (1u32, 5, 10, 12, 14, 16);
        let types: [&[u32]; 6] = [
            &[int, KIND_INT << 24, 4, 32],                      // 1: int
            &[long, KIND_INT << 24, 8, 64],                     // 2: long
            &[0, KIND_STRUCT << 24 | 1, 8, p, 2, 0],            // 3: struct { long p; }
            &[0, KIND_UNION << 24 | 2, 8, 0, 3, 0, q, 1, 0],    // 4: union { struct; int q }
            &[s, KIND_STRUCT << 24 | 2, 16, a, 1, 0, 0, 4, 64], // 5: struct s
            &[0, KIND_TYPEDEF << 24, 5],                        // 6: typedef
        ];
        blob_of(&types, &strings)
    }

    #[test]
    fn finds_fields_through_anonymous_members() {
        let blob = sample();
        let btf = Btf::parse(&blob).expect("parse");
        assert_eq!(btf.field_offset("s", "a", 4).expect("a"), 0);
        assert_eq!(btf.field_offset("s", "p", 8).expect("p"), 8);
        assert_eq!(btf.field_offset("s", "q", 4).expect("q"), 8);
        assert!(matches!(btf.field_offset("s", "a", 8), Err(BtfError::Size { got: 4, .. })));
        assert!(matches!(btf.field_offset("s", "zz", 4), Err(BtfError::NoField { .. })));
        assert!(matches!(btf.field_offset("nope", "a", 4), Err(BtfError::NoStruct(_))));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 255, 255]).is_err());
        let mut blob = sample();
        blob.truncate(40);
        assert!(Btf::parse(&blob).is_err());
    }

    /// The kernel this runs on: every offset the programs need must resolve.
    #[test]
    fn running_kernel_has_every_field() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            assert!(
                std::env::var_os("DCMON_REQUIRE_EBPF").is_none(),
                "DCMON_REQUIRE_EBPF is set but /sys/kernel/btf/vmlinux is unreadable"
            );
            return;
        };
        let btf = Btf::parse(&data).expect("parse vmlinux BTF");
        for (global, strukt, field, size) in dcmon_common::ebpf::OFFSETS {
            btf.field_offset(strukt, field, size).unwrap_or_else(|e| panic!("{global}: {e}"));
        }
        let reasons = btf.enum_values("skb_drop_reason").expect("enum skb_drop_reason");
        let value = |name: &str| reasons.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        assert_eq!(value("SKB_NOT_DROPPED_YET"), Some(0), "{reasons:?}");
        assert_eq!(value("SKB_DROP_REASON_NOT_SPECIFIED"), Some(2), "{reasons:?}");
        assert!(value("SKB_DROP_REASON_NETFILTER_DROP").is_some(), "{reasons:?}");
        eprintln!("skb_drop_reason: {} values, max {:?}", reasons.len(), reasons.iter().map(|r| r.1).max());
        assert!(matches!(btf.enum_values("no_such_enum"), Err(BtfError::NoEnum(_))));
        assert_eq!(btf.enumerator("SKB_DROP_REASON_NOT_SPECIFIED"), Some(2));
        // A bit of `queue_flags`: an enum value on recent kernels, a #define (no BTF) on older.
        if let Some(bit) = btf.enumerator("QUEUE_FLAG_STATS") {
            assert!(bit < 64, "QUEUE_FLAG_STATS = {bit}");
        }
        for (global, strukt, field, size) in dcmon_common::ebpf::STAMP_OFFSETS {
            let at = btf.field_offset(strukt, field, size);
            eprintln!("{global}: {at:?}");
            assert!(at.is_ok_and(|at| at > 0), "{global}: {strukt}.{field}");
        }
        // (rq, error, nr_bytes); the retransmit tracepoint passes the attempt's error since 6.x.
        assert_eq!(btf.tracepoint_args("block_rq_complete"), Some(3));
        assert_eq!(btf.tracepoint_args("tcp_retransmit_skb"), Some(3));
        assert_eq!(btf.tracepoint_args("dcmon_no_such_tracepoint"), None);
        assert!(btf.tracepoint_type_id("block_rq_complete").is_some_and(|id| id > 0));
        assert_eq!(btf.tracepoint_type_id("dcmon_no_such_tracepoint"), None);
    }

    /// A blob of the `sample()` layout with `types` as its type section.
    fn blob_of(types: &[&[u32]], strings: &[u8]) -> Vec<u8> {
        let t: Vec<u8> = types.iter().flat_map(|w| w.iter()).flat_map(|x| x.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&t);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn enumerators_are_found_in_anonymous_enums() {
        // 1: enum e { A = 3 }, 2: enum { B = 7, C = 9 } (anonymous, like the queue flags).
        let strings = b"\0e\0A\0B\0C\0";
        let (e, a, b, c) = (1u32, 3, 5, 7);
        let blob = blob_of(&[&[e, KIND_ENUM << 24 | 1, 4, a, 3], &[0, KIND_ENUM << 24 | 2, 4, b, 7, c, 9]], strings);
        let btf = Btf::parse(&blob).expect("parse");
        assert_eq!((btf.enumerator("A"), btf.enumerator("B"), btf.enumerator("C")), (Some(3), Some(7), Some(9)));
        assert_eq!(btf.enumerator("e"), None, "an enum's own name is not an enumerator");
        assert_eq!(btf.enumerator("D"), None);
    }

    #[test]
    fn types_that_contain_themselves_end_the_lookup() {
        // 1: struct s { <anonymous> struct s; }: an anonymous member of its own type.
        let strings = b"\0s\0a\0";
        let own = blob_of(&[&[1, KIND_STRUCT << 24 | 1, 8, 0, 1, 0]], strings);
        let btf = Btf::parse(&own).expect("parse");
        assert!(matches!(btf.field_offset("s", "a", 4), Err(BtfError::NoField { .. })));
        // 1: struct s { t a; }, 2: t is an array of itself.
        let array = blob_of(&[&[1, KIND_STRUCT << 24 | 1, 8, 3, 2, 0], &[0, KIND_ARRAY << 24, 0, 2, 1, 4]], strings);
        let btf = Btf::parse(&array).expect("parse");
        assert!(matches!(btf.field_offset("s", "a", 4), Err(BtfError::Size { .. })));
        // Bit offsets that add up past 2^32.
        let far = blob_of(
            &[
                &[1, KIND_STRUCT << 24 | 1, 8, 0, 2, u32::MAX],
                &[0, KIND_STRUCT << 24 | 1, 8, 3, 3, u32::MAX],
                &[0, KIND_INT << 24, 4, 32],
            ],
            strings,
        );
        let btf = Btf::parse(&far).expect("parse");
        assert!(btf.field_offset("s", "a", 4).is_err());
    }

    /// Found by the `btf` fuzz target: types reached through many anonymous members each (a
    /// lookup searched each path again, exponential in the nesting). Fails by not finishing.
    #[test]
    fn types_reached_by_many_paths_are_searched_once() {
        let hex = [
            "9feb090018000000000000008c0000008c0000001200000001000000000000010400f8ff200000000500000000000001",
            "080000004000000000000000010000040854555555555555050000000000000008000000020000040800000000000060",
            "03000000000000001700000001000008000000000a000000020000041000000000f50000030000000054555555555555",
            "0500000040000000000000000000000805ffff0f0500000000699feb01001800d2d1d1d100008c000000000000000000",
        ]
        .concat();
        let blob: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
        let btf = Btf::parse(&blob).expect("parse");
        // 30 levels of `struct { struct next; struct next; }` (anonymous members): 2^30 paths to
        // the last level, one of each type.
        let levels: Vec<Vec<u32>> = (1..=30u32)
            .map(|i| vec![if i == 1 { 1 } else { 0 }, KIND_STRUCT << 24 | 2, 8, 0, i + 1, 0, 0, i + 1, 0])
            .chain(std::iter::once(vec![0, KIND_INT << 24, 4, 32]))
            .collect();
        let levels: Vec<&[u32]> = levels.iter().map(Vec::as_slice).collect();
        let deep_blob = blob_of(&levels, b"\0s\0");
        let deep = Btf::parse(&deep_blob).expect("parse");
        assert!(matches!(deep.field_offset("s", "absent", 4), Err(BtfError::NoField { .. })));
        let names: Vec<&str> = blob.split(|&b| b == 0).filter_map(|s| std::str::from_utf8(s).ok()).take(8).collect();
        for strukt in &names {
            for field in &names {
                // Before the fix this took minutes per lookup; now the whole loop takes milliseconds.
                let _ = btf.field_offset(strukt, field, 4);
            }
        }
    }
}
