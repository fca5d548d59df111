//! `dcmon-agent register`: ask the server for this machine's API key and store it, mode 0600.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use crate::upload::excerpt;

/// Longest key accepted from a server (the real server issues 49 characters).
const MAX_KEY_LEN: usize = 512;

/// Register `machine_id` with the server at `server_base` and write the key to `key_path`.
/// Refuses to replace an existing key unless `force`. Never prints the key.
pub async fn register(
    server_base: &str,
    machine_id: &str,
    hostname: &str,
    key_path: &Path,
    force: bool,
    timeout: Duration,
    ca: Option<&crate::upload::CaFile>,
) -> anyhow::Result<String> {
    if key_path.exists() && !force {
        anyhow::bail!(
            "API key file {} already exists; not replacing it (use --force to register again and overwrite it)",
            key_path.display()
        );
    }
    let url = format!("{server_base}/api/register");
    let client = crate::upload::client_builder(ca)?
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
    let body = serde_json::json!({
        "machine_id": machine_id,
        "hostname": hostname,
        "client_info": {"agent": "dcmon-agent", "version": env!("CARGO_PKG_VERSION")},
    });
    let resp = client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {}", crate::upload::error_chain(&e)))?;
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {}", excerpt(&bytes));
    }
    // The answer is untrusted: check the key's shape before it goes into a file and a header.
    let answer: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{url} answered 200 but not with JSON ({e}): {}", excerpt(&bytes)))?;
    let key = answer
        .get("api_key")
        .and_then(serde_json::Value::as_str)
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{url} answered without a usable `api_key` (expected printable ASCII, 1 to {MAX_KEY_LEN} characters)"
            )
        })?;
    if let Some(other) = answer.get("machine_id").and_then(serde_json::Value::as_str)
        && other != machine_id
    {
        anyhow::bail!("{url} registered machine id {other:?}, not ours ({machine_id:?}); key not written");
    }
    write_key_file(key_path, key)?;
    Ok(format!(
        "registered machine {machine_id} ({hostname}) with {server_base}; API key written to {} (mode 0600)",
        key_path.display()
    ))
}

/// Write the key through a temporary file created with mode 0600 (never briefly readable by
/// others), fsync it, and rename it into place.
fn write_key_file(path: &Path, key: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", tmp.display()))?;
    f.write_all(format!("{key}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("cannot move the key into {}: {e}", path.display()))
}
