//! Hands back memory that only start-up used, once the daemon runs.
//!
//! Parsing the command line and config, building the collectors and loading eBPF run code that
//! the steady loop never touches again, yet those pages stay mapped (and in the resident set)
//! for the agent's life, along with the neighbours the kernel mapped around each fault. Asking
//! the kernel to page out the agent's own read-only mappings drops them; the pages the loop
//! uses fault back in on the next round, from the page cache. Writable mappings (data, heap)
//! are never touched. The kernel maps 64 KiB around each fault, so most of the binary comes
//! back; what is saved is in README's Performance section.

use std::io;

/// Page out this executable's read-only mappings (code, constants). Returns the bytes advised.
pub fn page_out_own_code() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for line in maps.lines() {
        // `start-end perms offset dev inode path`
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let path = fields.nth(3);
        if path != Some(&*exe) || perms.as_bytes().get(1) != Some(&b'-') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
            continue;
        };
        // SAFETY: the range is one of this process's own file-backed, non-writable mappings;
        // MADV_PAGEOUT only changes which pages are resident, never their contents.
        if unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) } != 0 {
            // EINVAL before Linux 5.4: nothing to do there.
            return Err(io::Error::last_os_error());
        }
        advised += end - start;
    }
    Ok(advised)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_file_kb() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("RssFile")
    }

    #[test]
    fn drops_resident_code_and_the_process_keeps_running() {
        let before = resident_file_kb();
        let advised = page_out_own_code().expect("MADV_PAGEOUT (Linux 5.4+)");
        assert!(advised > 0, "no read-only mapping of the test executable found");
        let after = resident_file_kb();
        assert!(after < before, "RssFile {before} kB -> {after} kB");
        // Code paged out comes back on use.
        let v: Vec<u64> = (0..1000).map(|i| i * i).collect();
        assert_eq!(v.iter().sum::<u64>(), 332_833_500);
    }
}
