//! The kernel's BTF (/sys/kernel/btf/vmlinux): parsing, and looking up every field the BPF
//! programs need plus a path taken from the input, and the enums the loader reads.
#![no_main]
use dcmon_agent::ebpf::btf::Btf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else { return };
    for (_, strukt, field, size) in dcmon_common::ebpf::OFFSETS {
        let _ = btf.field_offset(strukt, field, size);
    }
    let _ = btf.enum_values("skb_drop_reason");
    let _ = btf.enum_values("cgroup_subsys_id");
    // Names from the blob's own string section reach structs the fixed list never names.
    let names: Vec<&str> = data.split(|&b| b == 0).filter_map(|s| std::str::from_utf8(s).ok()).take(8).collect();
    for strukt in &names {
        let _ = btf.enum_values(strukt);
        for field in &names {
            for size in [1, 2, 4, 8] {
                let _ = btf.field_offset(strukt, field, size);
                let _ = btf.field_offset(strukt, &format!("{field}.{field}"), size);
            }
        }
    }
});
