//! What the delivery loop does with each answer and when: backoff, Retry-After, the catch-up
//! pace, fsync before a wait, logging and shutdown.

use super::*;

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
