//! A receiver that behaves like the real dcmon server (see `shared/spec/server-api.md`).
//!
//! The receiver validates a batch the way the FastAPI server does, in the same order: schema
//! first (422, before the key is looked at), then the `Authorization` header (403 without a
//! Bearer token, 401 for an unknown key), then the machine id (403 on mismatch).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::wait_until;

/// A batch the receiver accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The raw request body, exactly as sent.
    pub body: Bytes,
    /// The body parsed.
    pub json: Value,
    /// The `Authorization` header as sent.
    pub authorization: String,
    /// When it arrived.
    pub at: Instant,
}

/// A request the receiver answered with an error.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The status sent back.
    pub status: u16,
    /// The `detail` sent back.
    pub detail: String,
    /// When it arrived.
    pub at: Instant,
    /// The batch timestamp, when the body had one.
    pub batch_timestamp: Option<i64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// API key -> machine id, as the server's clients table.
    keys: HashMap<String, String>,
    accepted: Vec<Accepted>,
    rejected: Vec<Rejected>,
    /// When set, every /api/metrics request gets this status (outage simulation).
    forced_status: Option<u16>,
    /// Answers for the next requests, used up one per request: (status, Retry-After value).
    scripted: std::collections::VecDeque<(u16, Option<String>)>,
    /// Queued commands (`{"id", "type", "params", "created_at", "machine_id"}`), pending until
    /// a result for their id is posted, as on the real server.
    commands: Vec<Value>,
    /// Results posted to /api/command-results and accepted, oldest first.
    results: Vec<Value>,
    /// When set, /api/command-results answers this status (outage simulation).
    results_forced_status: Option<u16>,
    /// When set, /api/commands/{id} answers exactly this body (garbage, oversized).
    commands_raw_answer: Option<Vec<u8>>,
    /// GETs of /api/commands/{id} answered.
    command_polls: usize,
}

/// A dcmon-server stand-in on 127.0.0.1, running on its own thread until dropped.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A test that panicked while holding the lock must not hide its own failure behind ours.
    inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Receiver {
    /// Start a receiver that knows the given `(api_key, machine_id)` clients.
    pub fn start(clients: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, clients)
    }

    /// Start on a given address (to bring a "crashed" server back on the same port).
    pub fn start_on(addr: SocketAddr, clients: &[(&str, &str)]) -> anyhow::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner {
            keys: clients.iter().map(|(k, m)| ((*k).to_owned(), (*m).to_owned())).collect(),
            ..Inner::default()
        }));
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/api/metrics", post(submit))
            .route("/api/register", post(register))
            .route("/health", get(health))
            .route("/api/commands", post(queue_command))
            .route("/api/commands/{machine_id}", get(poll_commands))
            .route("/api/command-results", post(command_result))
            // The real server has no body-size limit; axum's default of 2 MB would turn big
            // hosts' batches into 413s the server never sends.
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(Arc::clone(&inner));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        Ok(Self { addr, inner, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// The `server_url` for the agent's config.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Batches accepted so far, oldest first.
    pub fn accepted(&self) -> Vec<Accepted> {
        lock(&self.inner).accepted.clone()
    }

    /// Requests rejected so far, oldest first.
    pub fn rejected(&self) -> Vec<Rejected> {
        lock(&self.inner).rejected.clone()
    }

    /// Answer every batch with `status` (e.g. 503) until called again with `None`.
    pub fn force_status(&self, status: Option<u16>) {
        lock(&self.inner).forced_status = status;
    }

    /// Answer the next `n` batches with `status` (and a Retry-After header when given).
    pub fn fail_next(&self, n: usize, status: u16, retry_after_secs: Option<u64>) {
        self.script(n, status, retry_after_secs.map(|s| s.to_string()).as_deref());
    }

    /// Answer the next `n` batches with `status` and, when given, this Retry-After value as
    /// is (an HTTP-date, a huge number, anything a server might send).
    pub fn fail_next_with_retry_after(&self, n: usize, status: u16, retry_after: &str) {
        self.script(n, status, Some(retry_after));
    }

    fn script(&self, n: usize, status: u16, retry_after: Option<&str>) {
        let mut g = lock(&self.inner);
        for _ in 0..n {
            g.scripted.push_back((status, retry_after.map(str::to_owned)));
        }
    }

    /// Forget the scripted answers not used yet.
    pub fn clear_script(&self) {
        lock(&self.inner).scripted.clear();
    }

    /// Queue a command for `machine_id`, as `POST /api/commands` does (the real server asks no
    /// authentication for it).
    pub fn queue_command(&self, machine_id: &str, id: Value, kind: &str, params: Value) {
        lock(&self.inner).commands.push(json!({
            "id": id, "machine_id": machine_id, "type": kind, "params": params, "created_at": now_secs(),
        }));
    }

    /// Results accepted at /api/command-results, oldest first.
    pub fn command_results(&self) -> Vec<Value> {
        lock(&self.inner).results.clone()
    }

    /// Commands still pending (no result posted yet).
    pub fn pending_commands(&self) -> Vec<Value> {
        lock(&self.inner).commands.clone()
    }

    /// How many times the commands were polled.
    pub fn command_polls(&self) -> usize {
        lock(&self.inner).command_polls
    }

    /// Answer every result post with `status` until called again with `None`.
    pub fn force_results_status(&self, status: Option<u16>) {
        lock(&self.inner).results_forced_status = status;
    }

    /// Answer every commands poll with exactly `body` until called again with `None`.
    pub fn commands_raw_answer(&self, body: Option<Vec<u8>>) {
        lock(&self.inner).commands_raw_answer = body;
    }

    /// Wait until at least `n` command results were accepted, or `timeout` passes.
    pub fn wait_for_results(&self, n: usize, timeout: Duration) -> Vec<Value> {
        wait_until(timeout, || {
            let got = self.command_results();
            (got.len() >= n).then_some(got)
        })
        .unwrap_or_else(|| self.command_results())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait until at least `n` batches were accepted, or `timeout` passes.
    pub fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<Accepted> {
        wait_until(timeout, || {
            let got = self.accepted();
            (got.len() >= n).then_some(got)
        })
        .unwrap_or_else(|| self.accepted())
    }

    /// Wait until at least `n` requests were rejected, or `timeout` passes.
    pub fn wait_for_rejected(&self, n: usize, timeout: Duration) -> Vec<Rejected> {
        wait_until(timeout, || {
            let got = self.rejected();
            (got.len() >= n).then_some(got)
        })
        .unwrap_or_else(|| self.rejected())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn error(inner: &Mutex<Inner>, status: StatusCode, detail: Value) -> Response {
    error_for(inner, status, detail, None, None)
}

fn error_for(
    inner: &Mutex<Inner>,
    status: StatusCode,
    detail: Value,
    batch_timestamp: Option<i64>,
    retry_after: Option<String>,
) -> Response {
    let text = match &detail {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    lock(inner).rejected.push(Rejected { status: status.as_u16(), detail: text, at: Instant::now(), batch_timestamp });
    let mut resp = (status, axum::Json(json!({ "detail": detail }))).into_response();
    if let Some(value) = retry_after.and_then(|v| axum::http::HeaderValue::from_str(&v).ok()) {
        resp.headers_mut().insert("retry-after", value);
    }
    resp
}

async fn submit(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let batch_timestamp = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["timestamp"].as_i64());
    let forced = {
        let mut g = lock(&inner);
        g.scripted.pop_front().or(g.forced_status.map(|s| (s, None)))
    };
    if let Some((code, retry_after)) = forced {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return error_for(&inner, status, json!("answer scripted by the test"), batch_timestamp, retry_after);
    }
    if headers.get("content-encoding").is_some() {
        // The real server does not decode Content-Encoding and fails to parse the body.
        return error_for(
            &inner,
            StatusCode::BAD_REQUEST,
            json!("There was an error parsing the body"),
            batch_timestamp,
            None,
        );
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_for(
                &inner,
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{"type": "json_invalid", "msg": e.to_string()}]),
                batch_timestamp,
                None,
            );
        }
    };
    if let Err(problems) = validate_batch(&parsed) {
        return error_for(&inner, StatusCode::UNPROCESSABLE_ENTITY, json!(problems), batch_timestamp, None);
    }
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let Some(key) = authorization.strip_prefix("Bearer ") else {
        let detail = if authorization.is_empty() { "Not authenticated" } else { "Invalid authentication credentials" };
        return error_for(&inner, StatusCode::FORBIDDEN, json!(detail), batch_timestamp, None);
    };
    let machine = lock(&inner).keys.get(key).cloned();
    let Some(machine) = machine else {
        return error_for(&inner, StatusCode::UNAUTHORIZED, json!("Invalid API key"), batch_timestamp, None);
    };
    if parsed["machine_id"] != machine.as_str() {
        return error_for(&inner, StatusCode::FORBIDDEN, json!("Machine ID mismatch"), batch_timestamp, None);
    }
    let count = parsed["metrics"].as_array().map_or(0, Vec::len);
    lock(&inner).accepted.push(Accepted { body, json: parsed, authorization, at: Instant::now() });
    axum::Json(json!({"status": "accepted", "metrics_count": count, "timestamp": now_secs()})).into_response()
}

/// The machine id of a request's Bearer key, or the error the server answers.
fn authenticate(inner: &Mutex<Inner>, headers: &HeaderMap) -> Result<String, Box<Response>> {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(key) = authorization.strip_prefix("Bearer ") else {
        let detail = if authorization.is_empty() { "Not authenticated" } else { "Invalid authentication credentials" };
        return Err(Box::new(error(inner, StatusCode::FORBIDDEN, json!(detail))));
    };
    let machine = lock(inner).keys.get(key).cloned();
    machine.ok_or_else(|| Box::new(error(inner, StatusCode::UNAUTHORIZED, json!("Invalid API key"))))
}

async fn queue_command(State(inner): State<Arc<Mutex<Inner>>>, body: Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(&inner, StatusCode::UNPROCESSABLE_ENTITY, json!("invalid JSON"));
    };
    let (Some(machine_id), Some(kind)) = (v["machine_id"].as_str(), v["command_type"].as_str()) else {
        return error(&inner, StatusCode::UNPROCESSABLE_ENTITY, json!("machine_id and command_type required"));
    };
    let mut g = lock(&inner);
    let id = g.commands.len() + g.results.len() + 1;
    g.commands.push(json!({
        "id": id, "machine_id": machine_id, "type": kind, "params": v["params"].clone(), "created_at": now_secs(),
    }));
    axum::Json(json!({"status": "success", "command_id": id})).into_response()
}

async fn poll_commands(
    State(inner): State<Arc<Mutex<Inner>>>,
    axum::extract::Path(machine_id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let machine = match authenticate(&inner, &headers) {
        Ok(m) => m,
        Err(resp) => return *resp,
    };
    if machine != machine_id {
        return error(&inner, StatusCode::FORBIDDEN, json!("Machine ID mismatch"));
    }
    let mut g = lock(&inner);
    g.command_polls += 1;
    if let Some(raw) = g.commands_raw_answer.clone() {
        return (StatusCode::OK, [("content-type", "application/json")], raw).into_response();
    }
    let commands: Vec<Value> = g
        .commands
        .iter()
        .filter(|c| c["machine_id"] == machine_id.as_str())
        .map(|c| json!({"id": c["id"], "type": c["type"], "params": c["params"], "created_at": c["created_at"]}))
        .collect();
    axum::Json(json!({"commands": commands, "count": commands.len(), "timestamp": now_secs()})).into_response()
}

async fn command_result(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let forced = lock(&inner).results_forced_status;
    if let Some(code) = forced {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return error(&inner, status, json!("answer scripted by the test"));
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(&inner, StatusCode::UNPROCESSABLE_ENTITY, json!("invalid JSON"));
    };
    let well_formed = v["machine_id"].is_string()
        && (v["command_id"].is_string() || v["command_id"].is_u64())
        && v["timestamp"].is_i64()
        && v["result"]["success"].is_boolean()
        && v["result"]["message"].is_string();
    if !well_formed {
        return error(&inner, StatusCode::UNPROCESSABLE_ENTITY, json!(format!("bad command result: {v}")));
    }
    let machine = match authenticate(&inner, &headers) {
        Ok(m) => m,
        Err(resp) => return *resp,
    };
    if v["machine_id"] != machine.as_str() {
        return error(&inner, StatusCode::FORBIDDEN, json!("Machine ID mismatch"));
    }
    let mut g = lock(&inner);
    g.commands.retain(|c| c["id"] != v["command_id"]);
    g.results.push(v);
    axum::Json(json!({"status": "success"})).into_response()
}

async fn register(State(inner): State<Arc<Mutex<Inner>>>, body: Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(&inner, StatusCode::UNPROCESSABLE_ENTITY, json!("invalid JSON"));
    };
    let Some(machine_id) = v["machine_id"].as_str().map(str::to_owned) else {
        return error(&inner, StatusCode::UNPROCESSABLE_ENTITY, json!("machine_id: field required"));
    };
    let mut g = lock(&inner);
    let existing = g.keys.iter().find(|(_, m)| **m == machine_id).map(|(k, _)| k.clone());
    let key = existing.unwrap_or_else(|| {
        let k = format!("dcmon_{:0>43}", g.keys.len() + 1);
        g.keys.insert(k.clone(), machine_id.clone());
        k
    });
    axum::Json(json!({"message": "registered", "api_key": key, "machine_id": machine_id})).into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "healthy", "timestamp": now_secs(), "database": {"status": "ok"}})).into_response()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The server's pydantic model, checked strictly where the real server is strict:
/// `{machine_id: str, timestamp: int, metrics: [{name: str, value: float, labels: {str: str}, timestamp: int}]}`.
/// Returns the list of problems (the `detail` of a 422).
pub fn validate_batch(v: &Value) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let obj = match v.as_object() {
        Some(o) => o,
        None => return Err(vec!["body: expected an object".into()]),
    };
    if !obj.get("machine_id").is_some_and(Value::is_string) {
        problems.push("machine_id: expected a string".into());
    }
    check_int(obj.get("timestamp"), "timestamp", &mut problems);
    match obj.get("metrics").and_then(Value::as_array) {
        None => problems.push("metrics: expected a list".into()),
        Some(metrics) => {
            for (i, m) in metrics.iter().enumerate() {
                if !m.get("name").is_some_and(Value::is_string) {
                    problems.push(format!("metrics.{i}.name: expected a string"));
                }
                // JSON from serde_json cannot hold NaN or Infinity; a number that is not an
                // f64 (too large) is the only other way to be non-finite.
                if !m.get("value").and_then(Value::as_f64).is_some_and(f64::is_finite) {
                    problems.push(format!("metrics.{i}.value: expected a finite number"));
                }
                check_int(m.get("timestamp"), &format!("metrics.{i}.timestamp"), &mut problems);
                match m.get("labels") {
                    None => {}
                    Some(Value::Object(labels)) => {
                        for (k, lv) in labels {
                            if !lv.is_string() {
                                problems.push(format!("metrics.{i}.labels.{k}: expected a string, got {lv}"));
                            }
                        }
                    }
                    Some(other) => problems.push(format!("metrics.{i}.labels: expected an object, got {other}")),
                }
            }
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// pydantic's int accepts integers and floats without a fraction; 123.5 is a 422.
fn check_int(v: Option<&Value>, field: &str, problems: &mut Vec<String>) {
    let ok = match v {
        Some(Value::Number(n)) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => false,
    };
    if !ok {
        problems.push(format!("{field}: expected an integer"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_matches_the_server() {
        let good = json!({"machine_id": "m", "timestamp": 1,
            "metrics": [{"name": "x", "value": 1.5, "labels": {"a": "b"}, "timestamp": 1}]});
        assert!(validate_batch(&good).is_ok());
        let mut bad = good.clone();
        bad["metrics"][0]["labels"]["a"] = json!(1);
        assert!(validate_batch(&bad).is_err(), "numeric label value");
        let mut bad = good.clone();
        bad["metrics"][0]["timestamp"] = json!(1.5);
        assert!(validate_batch(&bad).is_err(), "fractional timestamp");
        let mut bad = good.clone();
        bad["timestamp"] = json!("1");
        assert!(validate_batch(&bad).is_err(), "string timestamp");
        let mut bad = good;
        bad["metrics"][0]["value"] = json!(null);
        assert!(validate_batch(&bad).is_err(), "null value");
    }
}
