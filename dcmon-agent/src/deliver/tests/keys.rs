//! The API key: read again before a retry after 401/403, and only for the dcmon upload.

use super::*;

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
