//! Log capture in unit tests, which run in parallel threads of one process.
//!
//! tracing caches each call site's interest process-wide, once, when a thread first reaches it.
//! With one dispatcher alive, the interest comes from the reaching thread's own subscriber: a
//! test thread without one caches "never", and a test capturing the same line with
//! `with_default` on its own thread then finds it missing. A global subscriber that takes every
//! call site (and keeps nothing) makes every thread's answer "yes"; each event still goes to
//! the subscriber of the thread that logs it.

/// Installs that global subscriber, once per test process; call it before capturing a log.
pub(crate) fn anchor() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only if a global subscriber is set already, which then answers for every thread.
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// Logs a line from a call site no other code reaches.
    fn log_the_probe_line() {
        tracing::warn!("test_log probe line");
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_first_reached_on_a_thread_without_a_subscriber_is_still_captured() {
        super::anchor();
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || {
            // Another test's thread, with no subscriber of its own, reaches the line first.
            std::thread::spawn(log_the_probe_line).join().expect("thread");
            log_the_probe_line();
        });
        let text = String::from_utf8_lossy(&buffer.0.lock().expect("buffer")).into_owned();
        assert_eq!(text.matches("test_log probe line").count(), 1, "{text:?}");
    }
}
