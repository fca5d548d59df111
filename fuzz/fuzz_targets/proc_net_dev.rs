//! /proc/net/dev, with every interface kept and with the default filter.
#![no_main]
use dcmon_agent::collector::net::{InterfaceCounters, parse_net_dev};
use dcmon_agent::config::DeviceFilter;
use dcmon_agent::filter::PatternList;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(text) = common::text(data) else { return };
    let everything =
        DeviceFilter { include: PatternList::match_all(), exclude: PatternList::new(Vec::<String>::new()) };
    let all = parse_net_dev(text, &everything);
    let default = parse_net_dev(text, &DeviceFilter::default_interfaces());
    if let Ok(all) = &all {
        assert!(all.is_sorted_by(|a, b| a.interface <= b.interface), "sorted by name");
        let samples: Vec<_> = all.iter().flat_map(InterfaceCounters::samples).collect();
        common::check_samples("/proc/net/dev", &samples);
        // The default filter only drops interfaces: it cannot fail where keeping all works.
        let default = default.expect("default filter fails where match-all parses");
        assert!(default.iter().all(|i| all.contains(i)), "filtered interfaces are a subset");
    }
});
