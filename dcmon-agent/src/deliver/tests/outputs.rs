//! Several outputs: one failing does not delay another, and each names its answers.

use super::*;

/// A failed send of a non-dcmon output, as a remote_write client would report it.
#[derive(Debug)]
struct ReceiverError(Verdict, String);

impl std::fmt::Display for ReceiverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl SendFailure for ReceiverError {
    fn verdict(&self) -> Verdict {
        self.0
    }

    fn status(&self) -> String {
        "none".to_owned()
    }
}

/// An output's receiver that answers 503 until `fail_until`, then takes every batch; it
/// records when each batch (by its timestamp) was taken. No API key: the trait's defaults.
#[derive(Debug, Clone)]
struct TimedReceiver {
    fail_until: VirtualInstant,
    taken: Arc<Mutex<Vec<(i64, VirtualInstant)>>>,
    attempts: Arc<Mutex<u64>>,
}

impl TimedReceiver {
    fn new(fail_until: VirtualInstant) -> Self {
        Self { fail_until, taken: Arc::default(), attempts: Arc::default() }
    }

    fn taken(&self) -> Vec<(i64, VirtualInstant)> {
        self.taken.lock().expect("taken").clone()
    }
}

/// The test receiver says nothing about a batch it took.
impl SendSuccess for () {
    fn status(&self) -> String {
        "2xx".to_owned()
    }
}

impl BatchSender for TimedReceiver {
    type Sent = ();
    type Error = ReceiverError;

    fn uses_api_key(&self) -> bool {
        false
    }

    fn send(&mut self, body: Bytes) -> impl Future<Output = Result<(), ReceiverError>> + Send {
        *self.attempts.lock().expect("attempts") += 1;
        let now = VirtualInstant::now();
        let result = if now < self.fail_until {
            Err(ReceiverError(Verdict::RetryLater { retry_after: None }, "HTTP 503 Service Unavailable".to_owned()))
        } else {
            let timestamp = serde_json::from_slice::<serde_json::Value>(&body).expect("json")["timestamp"]
                .as_i64()
                .expect("timestamp");
            self.taken.lock().expect("taken").push((timestamp, now));
            Ok(())
        };
        async move { result }
    }
}

/// How long after its push each batch reached `receiver`, in push order; panics on a batch
/// taken twice or out of order.
fn delays(receiver: &TimedReceiver, pushed: &[(i64, VirtualInstant)]) -> Vec<Duration> {
    let taken = receiver.taken();
    let order: Vec<i64> = taken.iter().map(|(ts, _)| *ts).collect();
    assert_eq!(order, pushed.iter().map(|(ts, _)| *ts).collect::<Vec<_>>(), "every batch once, in order");
    taken.iter().zip(pushed).map(|((_, at), (_, pushed_at))| *at - *pushed_at).collect()
}

/// Two outputs on one outbox, one of them answering 503 for the first 60 s, a batch pushed
/// every second for 120 s: the healthy one gets each batch at once, the failing one catches
/// up after, and every batch leaves the outbox once both have it. Returns the failing
/// output's delays and the healthy one's.
async fn one_output_failing(failing: &str, healthy: &str) -> (Vec<Duration>, Vec<Duration>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = OutboxLimits { max_bytes: 64 << 20, max_age: Duration::from_secs(7 * 86400) };
    let outbox = SharedOutbox::new(Outbox::open(dir.path().join("outbox"), limits, 1_700_000_000));
    outbox.lock().set_outputs(&[failing.to_owned(), healthy.to_owned()]);
    let t0 = VirtualInstant::now();
    let bad = TimedReceiver::new(t0 + Duration::from_secs(60));
    let good = TimedReceiver::new(t0);
    let (stop, stop_rx) = watch::channel(false);
    let policy = policy(&dir.path().join("api_key"));
    let tasks = [
        tokio::spawn(deliver(outbox.clone(), failing.to_owned(), bad.clone(), policy.clone(), stop_rx.clone())),
        tokio::spawn(deliver(outbox.clone(), healthy.to_owned(), good.clone(), policy, stop_rx)),
    ];
    let mut pushed = Vec::new();
    for i in 0..120 {
        let timestamp = 1_700_000_000 + i;
        let _ = outbox.push(timestamp, batch_body(timestamp, 3));
        pushed.push((timestamp, VirtualInstant::now()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The failing output's last backoff before the outage ends is at most the 300 s cap, then
    // the backlog goes at 10 batches a second.
    tokio::time::sleep(Duration::from_secs(400)).await;
    let _ = stop.send(true);
    for t in tasks {
        t.await.expect("delivery task");
    }
    assert_eq!(outbox.stats().batches, 0, "every batch left once both outputs had it");
    let o = outbox.lock();
    assert_eq!(o.output_stats(healthy), crate::outbox::OutputStats { sent: 120, failed: 0, dropped: 0 });
    let bad_stats = o.output_stats(failing);
    assert_eq!(bad_stats.sent, 120);
    assert!(bad_stats.failed >= 3, "{bad_stats:?}");
    drop(o);
    (delays(&bad, &pushed), delays(&good, &pushed))
}

#[tokio::test(start_paused = true)]
async fn a_failing_output_does_not_delay_the_other() {
    // A subscriber of its own, as the other tests that log have: events on the shared
    // callsites from a thread without one made tracing's interest cache drop their lines.
    let log = CapturedLog::start(tracing::Level::INFO);
    for (failing, healthy) in [("dcmon", "prom"), ("prom", "dcmon")] {
        let (bad, good) = one_output_failing(failing, healthy).await;
        let good_max = good.iter().max().copied().unwrap_or_default();
        let bad_max = bad.iter().max().copied().unwrap_or_default();
        let in_time = bad.iter().filter(|d| d.is_zero()).count();
        eprintln!(
            "{failing} failing 60 s: {healthy} delivered 120/120, slowest {good_max:?} after its push; \
             {failing} delivered 120/120, first (pushed at 0 s) after {:?}, {in_time} at once",
            bad[0]
        );
        assert!(good.iter().all(Duration::is_zero), "{healthy} was delayed by {failing}: {good:?}");
        assert!(bad_max >= Duration::from_secs(60) - Duration::from_secs(1), "{failing} failed for 60 s: {bad:?}");
        assert!(bad_max <= Duration::from_secs(60 + 300 + 13), "{failing} caught up: {bad:?}");
    }
    // Each output logs its own outage once (the same answer is throttled) and its recovery.
    let text = log.text();
    assert_eq!(log.count("upload failed"), 2, "{text}");
    assert_eq!(log.count("uploads succeeding again"), 2, "{text}");
}

/// Issue 22: the debug line of each post names the answer's status as each output's types
/// report it ("none" where nothing answered).
#[test]
fn each_outputs_answers_name_their_status() {
    use reqwest::StatusCode;
    let upload = |e: UploadError| SendFailure::status(&e);
    let status = StatusCode::SERVICE_UNAVAILABLE;
    assert_eq!(upload(UploadError::Status { status, excerpt: String::new(), retry_after: None }), "503");
    assert_eq!(upload(UploadError::InvalidStatus { code: 999 }), "999");
    assert_eq!(upload(UploadError::Unreachable { url: "u".into(), reason: "r".into() }), "none");
    assert_eq!(SendSuccess::status(&Delivered { status: StatusCode::ACCEPTED, metrics_count: None }), "202");

    let rw = |e: RemoteWriteError| SendFailure::status(&e);
    let output = || "prom".to_owned();
    let status = StatusCode::TOO_MANY_REQUESTS;
    let refused = RemoteWriteError::Status {
        output: output(),
        status,
        excerpt: String::new(),
        retry_after: None,
        part: 1,
        parts: 2,
    };
    assert_eq!(rw(refused), "429");
    assert_eq!(rw(RemoteWriteError::InvalidStatus { output: output(), code: 600 }), "600");
    assert_eq!(rw(RemoteWriteError::Unreachable { output: output(), url: "u".into(), reason: "r".into() }), "none");
    assert_eq!(rw(RemoteWriteError::Batch { output: output(), reason: "r".into() }), "none");
    let sent = RemoteWriteSent {
        requests: 1,
        series: 1,
        samples: 1,
        stale_markers: 0,
        dropped: 0,
        bytes: 10,
        status: Some(StatusCode::NO_CONTENT),
    };
    assert_eq!(SendSuccess::status(&sent), "204");
    assert_eq!(SendSuccess::status(&RemoteWriteSent { status: None, ..sent }), "none");
}
