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

mod keys;
mod outputs;
mod timing;
