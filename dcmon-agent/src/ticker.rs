//! The collection cadence on a timerfd, so the runtime thread wakes once per tick.
//!
//! tokio's timer wheel files a deadline a second away in 64 ms slots and wakes the thread at the
//! slot, then again at the deadline: two or three wakeups per 1 s cycle, each a context switch
//! that costs more than reading a /proc file on a VM. A timerfd armed with an absolute first
//! expiry and a period fires exactly at each tick, and the kernel counts expiries the thread
//! missed, so a stalled host skips rounds instead of bursting them.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// A fixed-cadence ticker: [`Ticker::tick`] resolves at `first`, `first + period`, ...
#[derive(Debug)]
pub struct Ticker {
    fd: AsyncFd<OwnedFd>,
    /// The scheduled instant of the next expiry.
    next: Instant,
    period: Duration,
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        // time_t is i64 on every 64-bit target (musl deprecates naming the alias).
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos().cast_signed()),
    }
}

fn monotonic_now() -> io::Result<Duration> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0)))
}

impl Ticker {
    /// A ticker whose first tick is at `first` (now if that is past) and then every `period`.
    /// Must be called within a tokio runtime with IO enabled.
    pub fn new(first: Instant, period: Duration) -> io::Result<Self> {
        if period.is_zero() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "ticker period must be above zero"));
        }
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // tokio's Instant is CLOCK_MONOTONIC too; translate through "now" on both.
        let first_mono = monotonic_now()? + first.saturating_duration_since(Instant::now());
        let spec = libc::itimerspec { it_value: timespec(first_mono), it_interval: timespec(period) };
        // SAFETY: `fd` is a timerfd, `spec` a valid itimerspec, the old value is not wanted.
        if unsafe {
            libc::timerfd_settime(fd.as_raw_fd(), libc::TFD_TIMER_ABSTIME, &raw const spec, std::ptr::null_mut())
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the timerfd is owned by the AsyncFd and closed only when it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
        Ok(Self { fd, next: first.max(Instant::now()), period })
    }

    /// The time between ticks.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Wait for the next tick and return its scheduled instant. After a stall the missed ticks
    /// are skipped and the latest one is returned.
    pub async fn tick(&mut self) -> io::Result<Instant> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expiries = [0u8; 8];
            // SAFETY: reads at most 8 bytes into `expiries` from the timerfd.
            let n = unsafe { libc::read(guard.get_inner().as_raw_fd(), expiries.as_mut_ptr().cast(), expiries.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(e);
            }
            // The read took every expiry so far: the fd is not readable until the next one.
            // Saying so saves the read that would return EAGAIN (tokio keeps a readiness event
            // that arrives meanwhile).
            guard.clear_ready();
            let count = u32::try_from(u64::from_ne_bytes(expiries).max(1)).unwrap_or(u32::MAX);
            let scheduled = self.next + self.period * (count - 1);
            self.next = scheduled + self.period;
            return Ok(scheduled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn ticks_on_the_cadence_and_skips_missed_rounds() {
        let period = Duration::from_millis(40);
        let first = Instant::now() + Duration::from_millis(30);
        let mut t = Ticker::new(first, period).expect("timerfd");
        let a = t.tick().await.expect("tick");
        assert_eq!(a, first);
        assert!(Instant::now() >= first, "fired early");
        let b = t.tick().await.expect("tick");
        assert_eq!(b - a, period);
        assert!(
            Instant::now() >= b && Instant::now() - b < Duration::from_millis(30),
            "late by {:?}",
            Instant::now() - b
        );
        // A stall of 3.5 periods: the next tick is the latest one due, not a burst of three.
        std::thread::sleep(period * 7 / 2);
        let c = t.tick().await.expect("tick");
        assert_eq!(c - b, period * 3);
        let d = t.tick().await.expect("tick");
        assert_eq!(d - c, period);
        assert!(Instant::now() >= d);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_first_tick_in_the_past_fires_now() {
        let mut t = Ticker::new(Instant::now(), Duration::from_secs(3600)).expect("timerfd");
        let started = Instant::now();
        t.tick().await.expect("tick");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(Ticker::new(Instant::now(), Duration::ZERO).is_err());
    }
}
