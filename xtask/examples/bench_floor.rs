//! The floor under the agent's cost, measured by `cargo xtask bench` beside it: the least a
//! process can spend on this host to do the agent's per-second job, so the table shows how much
//! of the agent's CPU is its own and how much is the host's price for waking, reading procfs and
//! posting at all.
//!
//! `bench_floor wake`: wakes once a second on a periodic timerfd and does nothing else.
//! `bench_floor job ADDR KEY DIR`: each second, the same job as the agent in its procfs mode with
//! the OS collectors, as a bare blocking loop: `pread` the same kept-open files (/proc/loadavg,
//! /proc/stat, /proc/meminfo, /proc/net/dev and /sys/block/X/stat for every disk the agent's
//! default filter reports), parse every number in them, put the first 12 of each file in a dcmon
//! batch, append the batch to a file in DIR (the outbox's one write), POST it over one kept-alive
//! connection to the receiver at ADDR, and read the answer. No labels, no checks, no retries, no
//! async runtime: it is a measuring stick, not an agent.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use dcmon_agent::config::DeviceFilter;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ticks = Ticks::every_second()?;
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["wake"] => loop {
            ticks.wait()?;
        },
        ["job", addr, key, dir] => job(&ticks, addr, key, Path::new(dir)),
        _ => bail!("usage: bench_floor wake | bench_floor job ADDR KEY DIR"),
    }
}

fn job(ticks: &Ticks, addr: &str, key: &str, dir: &Path) -> anyhow::Result<()> {
    let mut paths: Vec<String> =
        ["/proc/loadavg", "/proc/stat", "/proc/meminfo", "/proc/net/dev"].map(String::from).to_vec();
    let disks = DeviceFilter::default_disks();
    for entry in std::fs::read_dir("/sys/block").context("listing /sys/block")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if disks.allows(&name) {
            paths.push(format!("/sys/block/{name}/stat"));
        }
    }
    let files = paths.iter().map(|p| File::open(p).with_context(|| p.clone())).collect::<Result<Vec<_>, _>>()?;
    let mut outbox = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("floor-outbox"))
        .context("opening the outbox file")?;
    let mut conn = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    conn.set_nodelay(true)?;
    let (mut text, mut body, mut request, mut answer) =
        (vec![0u8; 64 * 1024], String::new(), Vec::new(), vec![0u8; 4096]);
    loop {
        ticks.wait()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        body.clear();
        write!(body, r#"{{"machine_id":"bench","timestamp":{now},"metrics":["#)?;
        let mut n = 0;
        for file in &files {
            let len = file.read_at(&mut text, 0)?;
            let numbers = std::str::from_utf8(&text[..len])?
                .split_ascii_whitespace()
                .filter(|w| w.bytes().all(|b| b.is_ascii_digit()));
            // Every number is parsed; the first 12 of each file are sent, which keeps the batch
            // near the agent's size (/proc/stat alone holds hundreds of interrupt counters).
            for (i, value) in numbers.enumerate() {
                let value: u64 = value.parse()?;
                if i < 12 {
                    body.push_str(if n == 0 { "" } else { "," });
                    write!(body, r#"{{"name":"floor_{n}","value":{value},"labels":{{}},"timestamp":{now}}}"#)?;
                    n += 1;
                }
            }
        }
        body.push_str("]}");
        outbox.write_all(body.as_bytes())?;
        request.clear();
        write!(
            request,
            "POST /api/metrics HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )?;
        request.extend_from_slice(body.as_bytes());
        conn.write_all(&request)?;
        // The receiver's answers are small and arrive in one segment on loopback.
        if conn.read(&mut answer)? == 0 {
            bail!("the receiver closed the connection");
        }
    }
}

/// A periodic 1 s timerfd, as the agent's cadence uses: the kernel re-arms it, so a tick costs
/// one blocking read.
struct Ticks(File);

impl Ticks {
    fn every_second() -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain syscalls; the fd is owned by the File from here on.
        unsafe {
            let fd = libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("timerfd_create");
            }
            let file = File::from_raw_fd(fd);
            let second = libc::timespec { tv_sec: 1, tv_nsec: 0 };
            let spec = libc::itimerspec { it_interval: second, it_value: second };
            if libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) < 0 {
                return Err(std::io::Error::last_os_error()).context("timerfd_settime");
            }
            Ok(Self(file))
        }
    }

    fn wait(&self) -> anyhow::Result<()> {
        let mut expirations = [0u8; 8];
        (&self.0).read_exact(&mut expirations).context("reading the timerfd")
    }
}
