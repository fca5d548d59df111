//! Disks coming and going on the live host, read from their /sys/block/DEV/stat files: loop
//! devices added and removed through /dev/loop-control (which needs root; CI runs as root).

mod common;

use std::time::Duration;

use common::{LoopDevice, require_root};
use dcmon_agent::batch::Sample;
use dcmon_agent::collector::Collector;
use dcmon_agent::collector::disk::{DiskCollector, RELIST_EVERY};
use dcmon_agent::config::DeviceFilter;
use dcmon_agent::filter::PatternList;
use dcmon_agent::host::Host;

fn devices(c: &mut DiskCollector) -> Vec<String> {
    let mut out: Vec<Sample> = Vec::new();
    c.collect(&mut out).unwrap_or_else(|e| panic!("collect: {e:#}"));
    out.iter().step_by(4).map(|s| s.labels[0].1.clone()).collect()
}

#[test]
fn disks_coming_and_going_are_followed() {
    require_root("adding and removing loop devices");
    let dev = LoopDevice::add();
    let name = dev.name();
    let filter = DeviceFilter { include: PatternList::new([name.as_str()]), exclude: PatternList::default() };
    let collector = |every: Duration| DiskCollector::new(Host::default(), filter.clone()).relist_every(every);
    // One disk of this host's block devices: read from its stat file.
    let (mut slow, mut fast) = (collector(RELIST_EVERY), collector(Duration::ZERO));
    assert_eq!(devices(&mut slow), [name.as_str()]);
    assert!(slow.is_per_disk(), "one disk of several devices");
    assert_eq!(devices(&mut fast), [name.as_str()]);

    // Removed: noticed at once (its open stat file answers ENODEV), and not an error.
    dev.remove();
    assert_eq!(devices(&mut slow), Vec::<String>::new());
    assert_eq!(devices(&mut fast), Vec::<String>::new());

    // Added again: found at the next listing of /sys/block, not before.
    dev.readd();
    assert_eq!(devices(&mut slow), Vec::<String>::new(), "listed again only every {RELIST_EVERY:?}");
    assert_eq!(devices(&mut fast), [name.as_str()]);

    // Replaced under the same name between two rounds: the stale open file is reopened.
    let mut holding = collector(RELIST_EVERY);
    assert_eq!(devices(&mut holding), [name.as_str()]);
    dev.remove();
    dev.readd();
    assert_eq!(devices(&mut holding), [name.as_str()]);
    assert_eq!(devices(&mut holding), [name.as_str()]);
}
