//! `gpu_expected`: the NVIDIA GPUs the PCI bus shows (vendor 0x10de, class VGA 0x0300 or 3D
//! 0x0302), whatever NVML says; fewer visible than expected is a GPU the driver lost.

use crate::collector::attr::{is_gone, sorted_names};
use crate::collector::pcie::parse_class;
use crate::host::Host;

const PCI_DEVICES: &str = "sys/bus/pci/devices";
const NVIDIA: &str = "0x10de";

/// The NVIDIA display and 3D controllers under `host`'s /sys/bus/pci/devices; `None` when
/// there is no PCI bus to look at (a container without sysfs).
pub fn expected_gpus(host: &Host) -> anyhow::Result<Option<u64>> {
    let names = match sorted_names(host, PCI_DEVICES) {
        Ok(n) => n,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut count = 0;
    for name in names {
        let dir = format!("{PCI_DEVICES}/{name}");
        let vendor = match host.read_to_string(format!("{dir}/vendor")) {
            Ok(v) => v,
            // A device removed while listing, or a fixture device without the file.
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        if vendor.trim() != NVIDIA {
            continue;
        }
        let class = host.read_to_string(format!("{dir}/class"))?;
        let code =
            parse_class(&class).map_err(|e| anyhow::anyhow!("{}: {e}", host.path(format!("{dir}/class")).display()))?;
        if matches!(code >> 8, 0x0300 | 0x0302) {
            count += 1;
        }
    }
    Ok(Some(count))
}
