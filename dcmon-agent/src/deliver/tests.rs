//! The delivery loop's unit tests, with their scripted fake sender.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use reqwest::header::{HeaderMap, HeaderValue};
use tokio::time::Instant as VirtualInstant;

use super::*;
use crate::batch::{Batch, Sample};
use crate::outbox::{Outbox, OutboxLimits};
use crate::upload::classify_answer;

const GOOD_KEY: &str = "dcmon_goodKeyGoodKeyGoodKeyGoodKeyGoodKeyGood";
const BAD_KEY: &str = "dcmon_badKeyBadKeyBadKeyBadKeyBadKeyBadKeyBadK";
/// The wall clock the scripted server's HTTP-dates are measured from.
const SERVER_NOW_SECS: u64 = 1_700_000_000;
/// Longer than any wait a test expects: a loop that never posts again fails the test
/// instead of hanging it (paused time jumps to this timer).
const GIVE_UP: Duration = Duration::from_secs(10 * 365 * 86400);

fn policy(api_key_file: &Path) -> DeliveryPolicy {
    DeliveryPolicy {
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(300),
        auth_retry: Duration::from_secs(60),
        catchup_batches_per_sec: 10,
        api_key_file: api_key_file.to_owned(),
    }
}

fn write_key(path: &Path, key: &str) {
    std::fs::write(path, format!("{key}\n")).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// One post as the scripted server saw it.
#[derive(Debug, Clone)]
struct Post {
    at: VirtualInstant,
    body: Bytes,
    key: String,
}

/// An answer: status and headers; the body is the server's usual one for the status.
type Answer = (u16, Vec<(&'static str, String)>);

/// In a script: no HTTP answer at all (connection refused, timeout).
const NO_ANSWER: u16 = 0;

#[derive(Debug, Default)]
struct ServerState {
    script: VecDeque<Answer>,
    posts: Vec<Post>,
    /// Answers wait for [`ScriptedServer::release`] (a post in flight at shutdown).
    hold: bool,
}

/// A dcmon server in process for the delivery loop: each post gets the next scripted
/// answer, or, when the script is used up, 200 for the right key and 401 for another. The
/// answer goes through the agent's own [`classify_answer`], as [`Uploader::send`] does.
#[derive(Debug, Clone)]
struct ScriptedServer {
    state: Arc<Mutex<ServerState>>,
    posted: watch::Sender<usize>,
    /// One permit per held answer let go.
    released: Arc<tokio::sync::Semaphore>,
}

impl ScriptedServer {
    fn new(script: Vec<Answer>) -> Self {
        let state = ServerState { script: script.into(), ..ServerState::default() };
        let released = Arc::new(tokio::sync::Semaphore::new(0));
        Self { state: Arc::new(Mutex::new(state)), posted: watch::channel(0).0, released }
    }

    /// Hold every answer from now on until [`ScriptedServer::release`].
    fn hold(&self) {
        self.state.lock().expect("state").hold = true;
    }

    /// Let one held answer go.
    fn release(&self) {
        self.released.add_permits(1);
    }

    fn posts(&self) -> Vec<Post> {
        self.state.lock().expect("state").posts.clone()
    }

    /// Wait (in virtual time) until `n` posts have come.
    async fn wait_for_posts(&self, n: usize) -> Vec<Post> {
        let mut rx = self.posted.subscribe();
        let waited = tokio::time::timeout(GIVE_UP, rx.wait_for(|got| *got >= n)).await;
        assert!(waited.is_ok(), "only {} of {n} posts came", self.posts().len());
        self.posts()
    }

    fn client(&self, key: &str) -> ScriptedClient {
        ScriptedClient { server: self.clone(), key: key.to_owned() }
    }
}

#[derive(Debug)]
struct ScriptedClient {
    server: ScriptedServer,
    key: String,
}

impl BatchSender for ScriptedClient {
    type Sent = Delivered;
    type Error = UploadError;

    fn uses_api_key(&self) -> bool {
        true
    }

    fn send(&mut self, body: Bytes) -> impl Future<Output = Result<Delivered, UploadError>> + Send {
        let (code, headers, hold) = {
            let mut state = self.server.state.lock().expect("state");
            state.posts.push(Post { at: VirtualInstant::now(), body: body.clone(), key: self.key.clone() });
            let (code, headers) =
                state.script.pop_front().unwrap_or_else(|| (if self.key == GOOD_KEY { 200 } else { 401 }, Vec::new()));
            (code, headers, state.hold)
        };
        self.server.posted.send_modify(|n| *n += 1);
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(name, HeaderValue::from_str(&value).expect("header value"));
        }
        let answer = match code {
            200 => format!(r#"{{"status":"accepted","metrics_count":{}}}"#, count_metrics(&body)),
            401 => r#"{"detail":"Invalid API key"}"#.to_owned(),
            _ => r#"{"detail":"scripted"}"#.to_owned(),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(SERVER_NOW_SECS);
        let result = if code == NO_ANSWER {
            let reason = "error sending request: tcp connect error: Connection refused (os error 111)".to_owned();
            Err(UploadError::Unreachable { url: "http://127.0.0.1:9/api/metrics".to_owned(), reason })
        } else {
            classify_answer(code, &map, answer.as_bytes(), now)
        };
        let released = Arc::clone(&self.server.released);
        async move {
            if hold {
                released.acquire().await.expect("semaphore").forget();
            }
            result
        }
    }

    fn set_key(&mut self, key: &ApiKey) -> anyhow::Result<()> {
        self.key = key.expose().to_owned();
        Ok(())
    }
}

/// A real batch body with `samples` metrics.
fn batch_body(timestamp: i64, samples: usize) -> Bytes {
    let mut batch = Batch::new("deliver-test", timestamp);
    for i in 0..samples {
        batch.push(Sample::count("disk_reads_total", i as u64).label("device", format!("sd{i}")));
    }
    Bytes::from(batch.to_json())
}

/// The delivery loop on a real outbox in a temporary directory, posting to a scripted server.
struct Running {
    dir: tempfile::TempDir,
    outbox: SharedOutbox,
    server: ScriptedServer,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    fn key_path(&self) -> PathBuf {
        self.dir.path().join("api_key")
    }

    fn push(&self, timestamp: i64, samples: usize) {
        let _ = self.outbox.push(timestamp, batch_body(timestamp, samples));
    }

    async fn stop(self) -> tempfile::TempDir {
        let _ = self.stop.send(true);
        self.task.await.expect("delivery task");
        self.dir
    }
}

/// Start delivery of `batches` batches (of 3 samples) with `key` in the key file.
/// `tune` adjusts the policy; `key_file` replaces the key file when given.
fn start(
    batches: usize,
    script: Vec<Answer>,
    key: &str,
    tune: impl FnOnce(&mut DeliveryPolicy),
    key_file: Option<PathBuf>,
) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("api_key");
    write_key(&key_path, key);
    let limits = OutboxLimits { max_bytes: 64 << 20, max_age: Duration::from_secs(7 * 86400) };
    let outbox = SharedOutbox::new(Outbox::open(dir.path().join("outbox"), limits, 1_700_000_000));
    for n in 0..batches {
        let _ = outbox.push(1_700_000_000 + n as i64, batch_body(1_700_000_000 + n as i64, 3));
    }
    let server = ScriptedServer::new(script);
    let mut policy = policy(&key_file.unwrap_or(key_path));
    tune(&mut policy);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(deliver(outbox.clone(), DCMON_OUTPUT.to_owned(), server.client(key), policy, stop_rx));
    Running { dir, outbox, server, stop, task }
}

fn answer(code: u16, retry_after: Option<&str>) -> Answer {
    (code, retry_after.map(|v| ("retry-after", v.to_owned())).into_iter().collect())
}

fn gaps(posts: &[Post]) -> Vec<Duration> {
    posts.windows(2).map(|w| w[1].at - w[0].at).collect()
}

/// Everything logged while it lives, for tests that check what the loop says.
struct CapturedLog {
    text: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    /// Capture this thread's log (the test runtime's only thread) at `level` and above.
    fn start(level: tracing::Level) -> Self {
        let text = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&text);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .finish();
        Self { text, _guard: tracing::subscriber::set_default(subscriber) }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().expect("log")).into_owned()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

#[test]
fn backoff_doubles_from_the_base_up_to_the_cap_with_full_jitter() {
    let policy = policy(Path::new("unused"));
    for failures in 0..40 {
        let ceiling = Duration::from_secs(1u64 << failures.min(20)).min(Duration::from_secs(300));
        let draws: Vec<Duration> = (0..200).map(|_| backoff_delay(&policy, failures)).collect();
        assert!(draws.iter().all(|d| *d < ceiling), "{failures}: a draw at or over {ceiling:?}: {draws:?}");
        // Uniform below the ceiling: 200 draws all in its lower half has odds of 2^-200.
        assert!(draws.iter().any(|d| *d >= ceiling / 2), "{failures}: all draws under {:?}", ceiling / 2);
    }
    let draws: std::collections::HashSet<Duration> = (0..20).map(|_| backoff_delay(&policy, 10)).collect();
    assert!(draws.len() > 10, "not random: {draws:?}");
}

#[test]
fn retry_after_is_held_between_the_backoff_floor_and_the_cap() {
    let policy = policy(Path::new("unused"));
    let secs = Duration::from_secs;
    assert_eq!(retry_delay(&policy, 1, Some(Duration::ZERO)), secs(1));
    assert_eq!(retry_delay(&policy, 1, Some(Duration::from_millis(300))), secs(1));
    assert_eq!(retry_delay(&policy, 1, Some(secs(42))), secs(42));
    assert_eq!(retry_delay(&policy, 1, Some(secs(999_999_999))), secs(300));
    assert_eq!(retry_delay(&policy, 1, Some(Duration::MAX)), secs(300));
    let crossed = DeliveryPolicy { backoff_max: Duration::from_millis(500), ..policy.clone() };
    assert_eq!(retry_delay(&crossed, 1, Some(Duration::ZERO)), Duration::from_millis(500), "the cap wins");
    assert!(retry_delay(&policy, 3, None) < secs(8), "no hint: the backoff");
}

#[test]
fn slow_log_repeats_only_on_change_or_when_due() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("rt");
    rt.block_on(async {
        let mut l = SlowLog { every: Duration::from_secs(600), last: None };
        assert!(l.should_log("a"));
        assert!(!l.should_log("a"));
        assert!(l.should_log("b"));
        tokio::time::advance(Duration::from_secs(599)).await;
        assert!(!l.should_log("b"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(l.should_log("b"), "due again after `every`");
    });
}

#[test]
fn metrics_are_counted_in_the_body() {
    assert_eq!(count_metrics(&batch_body(1, 0)), 0);
    assert_eq!(count_metrics(&batch_body(1, 7)), 7);
    assert_eq!(count_metrics(br#"{"metrics": [1, {"a": [2, 3]}, "x"], "other": []}"#), 3);
    assert_eq!(count_metrics(b"not json"), 0);
    assert_eq!(count_metrics(br#"{"metrics": 5}"#), 0);
}

/// Issue 14: a `Retry-After: 0` must not turn into a post storm; the hint is held at the floor.
#[tokio::test(start_paused = true)]
async fn retry_after_zero_waits_the_backoff_floor() {
    let script = vec![answer(429, Some("0")), answer(503, Some("0")), answer(429, Some("0")), answer(503, Some("0"))];
    let run = start(1, script, GOOD_KEY, |_| {}, None);
    let posts = run.server.wait_for_posts(5).await;
    assert_eq!(gaps(&posts), [Duration::from_secs(1); 4]);
    run.stop().await;
}

/// Issue 14: a huge Retry-After stopped delivery until a restart. It is capped at
/// `retry_max_backoff`; an HTTP-date is honoured, a past one means the floor.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_is_capped_and_an_http_date_is_honoured() {
    let script = vec![
        answer(429, Some("3")),
        answer(503, Some("999999999")),
        answer(429, Some("18446744073709551615")),
        answer(503, Some("99999999999999999999999")),
        // SERVER_NOW_SECS is Tue, 14 Nov 2023 22:13:20 GMT.
        answer(503, Some("Tue, 14 Nov 2023 22:13:50 GMT")),
        answer(429, Some("Tuesday, 14-Nov-23 22:15:00 GMT")),
        answer(503, Some("Tue Nov 14 22:14:00 2023")),
        answer(503, Some("Wed, 15 Nov 2023 22:13:20 GMT")),
        answer(429, Some("Sun, 06 Nov 1994 08:49:37 GMT")),
    ];
    let run = start(1, script, GOOD_KEY, |p| p.backoff_max = Duration::from_secs(120), None);
    let posts = run.server.wait_for_posts(10).await;
    let secs = Duration::from_secs;
    assert_eq!(
        gaps(&posts),
        [secs(3), secs(120), secs(120), secs(120), secs(30), secs(100), secs(40), secs(120), secs(1)]
    );
    tokio::task::yield_now().await;
    assert_eq!(run.outbox.lock().stats().batches, 0, "delivered by the last post");
    run.stop().await;
}

/// Issue 14: every 4xx but 401/403 set the batch aside in `rejected/`, where only the
/// newest 100 are kept. Only 400, 413 and 422 mean the batch can never be accepted.
#[tokio::test(start_paused = true)]
async fn a_4xx_about_the_way_to_the_server_keeps_the_batch() {
    let codes = [404, 405, 407, 408, 409, 421, 425, 431, 451, 499];
    let log = CapturedLog::start(tracing::Level::INFO);
    let run = start(1, codes.iter().map(|c| answer(*c, None)).collect(), GOOD_KEY, |_| {}, None);
    let posts = run.server.wait_for_posts(codes.len() + 1).await;
    assert!(posts.iter().all(|p| p.body == posts[0].body), "the same batch each time");
    for (n, gap) in gaps(&posts).iter().enumerate() {
        let ceiling = Duration::from_secs(1 << (n + 1)).min(Duration::from_secs(300));
        assert!(*gap < ceiling, "retry {n}: waited {gap:?}, not a backoff under {ceiling:?}");
    }
    tokio::task::yield_now().await;
    let stats = run.outbox.lock().stats();
    assert_eq!((stats.batches, stats.rejected_total), (0, 0), "delivered, none set aside");
    let text = log.text();
    assert!(text.contains("404 Not Found (no POST /api/metrics there: is the path in server_url right"), "{text}");
    assert!(text.contains("a proxy on the way wants authentication"), "{text}");
    assert_eq!(log.count("upload failed"), codes.len(), "one line per distinct answer: {text}");
    let dir = run.stop().await;
    assert!(!dir.path().join("outbox/rejected").exists(), "nothing in rejected/");
}

#[tokio::test(start_paused = true)]
async fn only_400_413_and_422_set_a_batch_aside_and_delivery_goes_on_at_once() {
    let log = CapturedLog::start(tracing::Level::INFO);
    let run = start(4, vec![answer(400, None), answer(413, None), answer(422, None)], GOOD_KEY, |_| {}, None);
    let posts = run.server.wait_for_posts(4).await;
    assert_eq!(gaps(&posts), [Duration::ZERO; 3], "no wait after a batch set aside");
    let bodies: Vec<&Bytes> = posts.iter().map(|p| &p.body).collect();
    assert!(bodies.windows(2).all(|w| w[0] != w[1]), "each batch once");
    tokio::task::yield_now().await;
    assert_eq!(run.outbox.stats().rejected_total, 3);
    assert_eq!(log.count("server refused a batch for good: server answered 4"), 3, "{}", log.text());
    let dir = run.stop().await;
    assert_eq!(std::fs::read_dir(dir.path().join("outbox/rejected")).expect("rejected/").count(), 6);
}

/// Issue 14: the key file was read right after the failed attempt, so a key fixed during
/// the wait was sent only one `auth_retry_interval` later.
#[tokio::test(start_paused = true)]
async fn a_fixed_key_is_read_right_before_the_next_attempt() {
    let run = start(2, Vec::new(), BAD_KEY, |_| {}, None);
    let first = run.server.wait_for_posts(1).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    write_key(&run.key_path(), GOOD_KEY);
    let posts = run.server.wait_for_posts(3).await;
    let keys: Vec<&str> = posts.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, [BAD_KEY, GOOD_KEY, GOOD_KEY]);
    assert_eq!(posts[1].at - first[0].at, Duration::from_secs(60), "one auth_retry after the 401");
    assert_eq!(posts[2].at - posts[1].at, Duration::from_millis(100), "the backlog at the catch-up pace");
    run.stop().await;
}

/// A key file that never answers (a FIFO with no writer) holds up one retry by at most
/// the read timeout, with an error naming the file, and never the runtime thread. In real
/// time: paused time stands still while a blocking read runs.
#[tokio::test]
async fn a_key_file_that_blocks_does_not_stop_delivery() {
    let fifo_dir = tempfile::tempdir().expect("tempdir");
    let fifo = fifo_dir.path().join("api_key_fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    // Opening the write end lets a reader blocked on the FIFO go on. Done at the end, or
    // after 30 s if the reader blocked the runtime thread (the defect), so the test fails
    // instead of hanging.
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    let unblock = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::os::unix::fs::OpenOptionsExt as _;
            let timed_out = done_rx.recv_timeout(Duration::from_secs(30)).is_err();
            let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&fifo);
            timed_out
        })
    };
    let log = CapturedLog::start(tracing::Level::INFO);
    let auth_retry = Duration::from_secs(1);
    let run = start(1, Vec::new(), BAD_KEY, |p| p.auth_retry = auth_retry, Some(fifo.clone()));
    // In real time here, so bounded in real time: a loop that never posts fails the test.
    let posts = tokio::time::timeout(Duration::from_secs(45), run.server.wait_for_posts(2)).await;
    let _ = done.send(());
    let posts = posts.expect("no retry within 45 s");
    assert!(!unblock.join().expect("unblocking thread"), "the key read blocked the runtime thread");
    let late = posts[1].at - posts[0].at;
    assert!(late < auth_retry + KEY_READ_TIMEOUT + Duration::from_secs(10), "retried after {late:?}");
    let text = log.text();
    assert!(text.lines().any(|l| l.contains("ERROR") && l.contains(&fifo.display().to_string())), "{text}");
    run.stop().await;
}

/// Issue 14: README says `--log-level debug` shows every batch; nothing was logged.
#[tokio::test(start_paused = true)]
async fn debug_logs_one_line_per_post() {
    let log = CapturedLog::start(tracing::Level::DEBUG);
    let run = start(0, vec![answer(503, Some("1"))], GOOD_KEY, |_| {}, None);
    run.push(1_700_000_000, 7);
    run.push(1_700_000_001, 2);
    let posts = run.server.wait_for_posts(3).await;
    tokio::task::yield_now().await;
    let lines: Vec<String> = log.text().lines().filter(|l| l.contains("batch posted")).map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "{}", log.text());
    let bytes = |n: usize| posts[n].body.len();
    for (line, want) in lines.iter().zip([
        format!("seq=0 samples=7 bytes={} status=503 took=", bytes(0)),
        format!("seq=0 samples=7 bytes={} status=200 took=", bytes(1)),
        format!("seq=1 samples=2 bytes={} status=200 took=", bytes(2)),
    ]) {
        assert!(line.contains("DEBUG") && line.contains(&want) && line.contains("took="), "{line:?}: want {want:?}");
    }
    run.stop().await;
}

/// Issue 22: a single batch that has to wait (nothing behind it) is fsynced before the
/// retry wait, so it survives a power loss during the outage.
#[tokio::test(start_paused = true)]
async fn a_single_waiting_batch_is_fsynced_before_the_retry_wait() {
    let run = start(1, vec![answer(503, Some("10"))], GOOD_KEY, |_| {}, None);
    assert!(run.outbox.lock().sync_job().is_some(), "written, not yet synced");
    run.server.wait_for_posts(1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(run.server.posts().len(), 1, "still waiting");
    assert!(run.outbox.lock().sync_job().is_none(), "the waiting batch is on disk");
    run.stop().await;
}

/// Issue 22: after an outage the backlog goes out at `catchup_batches_per_second`, and a
/// batch pushed once it is empty goes at once.
#[tokio::test(start_paused = true)]
async fn the_backlog_goes_out_at_the_catchup_pace() {
    let run = start(20, Vec::new(), GOOD_KEY, |p| p.catchup_batches_per_sec = 4, None);
    let posts = run.server.wait_for_posts(20).await;
    assert_eq!(gaps(&posts), [Duration::from_millis(250); 19]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pushed = VirtualInstant::now();
    run.push(1_700_000_100, 1);
    let posts = run.server.wait_for_posts(21).await;
    assert_eq!(posts[20].at, pushed, "nothing waiting behind it: no pacing");
    run.stop().await;
}

/// Issue 22: the pause after the last batch of a backlog is not paced either: a batch pushed
/// right after the backlog drained goes at once, not a catch-up interval later.
#[tokio::test(start_paused = true)]
async fn a_batch_pushed_just_after_the_backlog_drained_goes_at_once() {
    let run = start(3, Vec::new(), GOOD_KEY, |p| p.catchup_batches_per_sec = 4, None);
    run.server.wait_for_posts(3).await;
    // Let the loop take the third answer and find nothing waiting.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let pushed = VirtualInstant::now();
    run.push(1_700_000_100, 1);
    let posts = run.server.wait_for_posts(4).await;
    assert_eq!(posts[3].at, pushed, "the backlog had drained: no pacing");
    run.stop().await;
}

/// Issue 22: the backoff grows after each failure up to the cap, and starts over after a
/// success.
#[tokio::test(start_paused = true)]
async fn backoff_doubles_up_to_the_cap_and_resets_after_a_success() {
    let failing = 40;
    let mut script: Vec<Answer> = (0..failing).map(|_| answer(503, None)).collect();
    script.push((200, Vec::new()));
    script.extend((0..3).map(|_| answer(502, None)));
    let run = start(2, script, GOOD_KEY, |_| {}, None);
    let posts = run.server.wait_for_posts(failing + 5).await;
    let gaps = gaps(&posts);
    let cap = Duration::from_secs(300);
    for (n, gap) in gaps[..failing].iter().enumerate() {
        let ceiling = Duration::from_secs(1 << (n + 1).min(20)).min(cap);
        assert!(*gap < ceiling, "after failure {}: {gap:?} >= {ceiling:?}", n + 1);
    }
    // 30 draws at the cap all under half of it has odds of 2^-30.
    assert!(gaps[10..failing].iter().any(|g| *g >= cap / 2), "the cap is reached: {gaps:?}");
    assert_eq!(gaps[failing], Duration::from_millis(100), "accepted: the next batch at the catch-up pace");
    for (n, gap) in gaps[failing + 1..].iter().enumerate() {
        let ceiling = Duration::from_secs(1 << (n + 1));
        assert!(*gap < ceiling, "after the success, failure {}: {gap:?} >= {ceiling:?}", n + 1);
    }
    run.stop().await;
}

/// Issue 22: "uploads succeeding again" follows a failure, a 401 or 403 included, and
/// resets the throttle so the next failure is logged at once.
#[tokio::test(start_paused = true)]
async fn recovery_is_logged_and_resets_the_log_throttle() {
    for code in [401, 403] {
        let log = CapturedLog::start(tracing::Level::INFO);
        let script =
            vec![answer(code, None), (200, Vec::new()), answer(code, None), (200, Vec::new()), answer(503, Some("5"))];
        let run = start(3, script, GOOD_KEY, |p| p.auth_retry = Duration::from_secs(1), None);
        run.server.wait_for_posts(6).await;
        tokio::task::yield_now().await;
        let text = log.text();
        let refused = format!("upload refused: server answered {code}");
        assert_eq!(log.count(&refused), 2, "the second {code} is not throttled: {text}");
        assert_eq!(log.count("upload failed: server answered 503"), 1, "{text}");
        assert_eq!(log.count("uploads succeeding again"), 3, "{text}");
        let order: Vec<&str> = text
            .lines()
            .filter_map(|l| ["refused", "succeeding", "failed"].into_iter().find(|w| l.contains(*w)))
            .collect();
        assert_eq!(order, ["refused", "succeeding", "refused", "succeeding", "failed", "succeeding"], "{text}");
        run.stop().await;
    }

    // A success with no failure before says nothing; the same failure twice is said once.
    let log = CapturedLog::start(tracing::Level::INFO);
    let run = start(3, vec![(200, Vec::new()), answer(503, Some("5")), answer(503, Some("5"))], GOOD_KEY, |_| {}, None);
    run.server.wait_for_posts(4).await;
    tokio::task::yield_now().await;
    assert_eq!(log.count("upload failed"), 1, "{}", log.text());
    assert_eq!(log.count("uploads succeeding again"), 1, "{}", log.text());
    run.stop().await;
}

/// No answer at all (a refused connection, a timeout): the batch is kept and retried with
/// the jittered backoff, the log names the URL once, and every batch goes out in order.
#[tokio::test(start_paused = true)]
async fn no_answer_is_retried_with_backoff_and_every_batch_goes_out_in_order() {
    let log = CapturedLog::start(tracing::Level::INFO);
    let outage = 6;
    let run = start(3, (0..outage).map(|_| (NO_ANSWER, Vec::new())).collect(), GOOD_KEY, |_| {}, None);
    let posts = run.server.wait_for_posts(outage + 3).await;
    for (n, gap) in gaps(&posts)[..outage].iter().enumerate() {
        let ceiling = Duration::from_secs(1 << (n + 1));
        assert!(*gap < ceiling, "after failure {}: {gap:?} >= {ceiling:?}", n + 1);
    }
    let bodies: Vec<&Bytes> = posts.iter().map(|p| &p.body).collect();
    assert!(bodies[..=outage].iter().all(|b| *b == bodies[0]), "the same batch until it is accepted");
    assert!(bodies[outage..].windows(2).all(|w| w[0] != w[1]), "then each of the others once");
    tokio::task::yield_now().await;
    assert_eq!(run.outbox.stats().batches, 0);
    assert_eq!(log.count("upload failed: cannot reach http://127.0.0.1:9/api/metrics"), 1, "{}", log.text());
    assert_eq!(log.count("uploads succeeding again"), 1, "{}", log.text());
    run.stop().await;
}

/// A Retry-After that is neither seconds nor an HTTP-date is no hint: the jittered backoff.
#[tokio::test(start_paused = true)]
async fn a_garbage_retry_after_means_the_jittered_backoff() {
    let garbage = ["soon", "-5", "1.5", "", "Tue, 99 Nov 2023 25:61:61 GMT", "3 s"];
    let run = start(1, garbage.iter().map(|g| answer(503, Some(g))).collect(), GOOD_KEY, |_| {}, None);
    let posts = run.server.wait_for_posts(garbage.len() + 1).await;
    let gaps = gaps(&posts);
    for (n, gap) in gaps.iter().enumerate() {
        let ceiling = Duration::from_secs(1 << (n + 1));
        assert!(*gap < ceiling, "after {:?}: {gap:?} >= {ceiling:?}", garbage[n]);
    }
    // Read as a number the hint would give the same wait every time; jitter never does.
    assert!(gaps.iter().any(|g| *g != gaps[0]), "not jittered: {gaps:?}");
    run.stop().await;
}

/// 401 and 403 keep every batch and are logged at a slow rate; the key file is read again
/// before each retry, so once the key is fixed the backlog goes out, oldest first.
#[tokio::test(start_paused = true)]
async fn a_refused_key_keeps_every_batch_until_the_key_is_fixed() {
    for code in [401, 403] {
        let log = CapturedLog::start(tracing::Level::INFO);
        let refusals = 5;
        let run = start(3, (0..refusals).map(|_| answer(code, None)).collect(), BAD_KEY, |_| {}, None);
        let posts = run.server.wait_for_posts(refusals).await;
        assert_eq!(gaps(&posts), [Duration::from_secs(60); 4], "{code}: every auth_retry");
        assert!(posts.iter().all(|p| p.body == posts[0].body && p.key == BAD_KEY), "{code}");
        let stats = run.outbox.stats();
        assert_eq!((stats.batches, stats.rejected_total), (3, 0), "{code}: every batch kept");
        assert_eq!(log.count("upload refused"), 1, "{code}: one line in 4 min: {}", log.text());
        write_key(&run.key_path(), GOOD_KEY);
        let posts = run.server.wait_for_posts(refusals + 3).await;
        let delivered: Vec<&Post> = posts[refusals..].iter().collect();
        assert_eq!(delivered[0].body, posts[0].body, "{code}: the first refused batch first");
        assert!(delivered.iter().all(|p| p.key == GOOD_KEY), "{code}");
        assert!(delivered.windows(2).all(|w| w[0].body != w[1].body), "{code}: each once");
        tokio::task::yield_now().await;
        assert_eq!(run.outbox.stats().batches, 0, "{code}");
        run.stop().await;
    }
}

/// A shutdown while a post is in flight lets that post finish (an accepted batch leaves
/// the outbox, so it is not sent again at the next start) and sends nothing more.
#[tokio::test(start_paused = true)]
async fn shutdown_mid_send_finishes_that_post_and_sends_no_other() {
    let run = start(3, Vec::new(), GOOD_KEY, |_| {}, None);
    run.server.hold();
    run.server.wait_for_posts(1).await;
    let _ = run.stop.send(true);
    run.server.release();
    let (server, outbox) = (run.server.clone(), run.outbox.clone());
    let dir = tokio::time::timeout(Duration::from_secs(1), run.stop())
        .await
        .expect("delivery stops once the post in flight is answered");
    assert_eq!(server.posts().len(), 1, "nothing posted after the shutdown");
    assert_eq!(outbox.stats().batches, 2, "the accepted batch left the outbox");
    drop(outbox);
    let left = crate::outbox::inspect(&dir.path().join("outbox")).expect("inspect");
    assert_eq!(left.iter().map(|b| b.timestamp).collect::<Vec<_>>(), [1_700_000_001, 1_700_000_002]);
}

/// A shutdown during a retry wait ends delivery at once, the batch kept for the next start.
#[tokio::test(start_paused = true)]
async fn shutdown_during_a_retry_wait_stops_at_once_and_keeps_the_batch() {
    let run = start(1, vec![answer(503, Some("300"))], GOOD_KEY, |_| {}, None);
    run.server.wait_for_posts(1).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (asked, outbox) = (VirtualInstant::now(), run.outbox.clone());
    let dir = tokio::time::timeout(Duration::from_secs(1), run.stop()).await.expect("no wait for the retry");
    assert_eq!(VirtualInstant::now(), asked, "no wait for the retry");
    assert_eq!(outbox.stats().batches, 1);
    drop(outbox);
    assert_eq!(crate::outbox::inspect(&dir.path().join("outbox")).expect("inspect").len(), 1);
}

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

/// Issue 22: after a 401/403 the loop reads the API key file again only for the dcmon server's
/// upload; a remote_write receiver's refusal has nothing to do with that key.
#[test]
fn only_the_dcmon_upload_reads_the_api_key_again_after_a_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("api_key");
    std::fs::write(&path, GOOD_KEY).expect("write key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (key, _) = crate::api_key::load(&path).expect("key");
    let uploader = Uploader::new("http://127.0.0.1:9", key, Duration::from_secs(1), Duration::from_secs(1), None)
        .expect("uploader");
    assert!(BatchSender::uses_api_key(&uploader));
    let config = serde_json::from_value(serde_json::json!({"name": "prom", "url": "http://127.0.0.1:9/api/v1/write"}))
        .expect("a remote_write entry");
    let client = RemoteWriteClient::new(&config).expect("client");
    assert!(!BatchSender::uses_api_key(&client));
}
