//! The outbox's property test: random pushes, deliveries, rejections, crashes and cut files.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    /// A batch with this much padding.
    Push(usize),
    Deliver,
    Reject,
    /// Drop the outbox without a shutdown (kill -9) and open it again.
    Crash,
    /// Truncate a segment (picked by the number) at this many thousandths of its length.
    Cut(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..600).prop_map(Op::Push),
        3 => Just(Op::Deliver),
        1 => Just(Op::Reject),
        1 => Just(Op::Crash),
        1 => (any::<usize>(), 0u64..1000).prop_map(|(s, at)| Op::Cut(s, at)),
    ]
}

/// What an outbox instance counted as lost.
fn counted(o: &Outbox) -> u64 {
    o.stats().dropped_total + o.stats().corrupt_total
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn every_batch_pushed_is_delivered_queued_or_counted(
        ops in prop::collection::vec(op(), 1..48),
        small_bound in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let max_bytes = if small_bound { 4096 } else { 1 << 30 };
        let limits = OutboxLimits { max_bytes, max_age: Duration::from_secs(86_400) };
        let mut o = Outbox::open(dir.path(), limits, 0);
        let mut pushed: HashMap<Bytes, usize> = HashMap::new();
        let mut delivered: Vec<usize> = Vec::new();
        let mut reported = 0u64;
        let mut at_risk: HashSet<usize> = HashSet::new();
        let mut cuts = 0;
        for op in ops {
            match op {
                Op::Push(pad) => {
                    let n = pushed.len();
                    let b = Bytes::from(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(pad)));
                    pushed.insert(b.clone(), n);
                    o.push(0, b);
                }
                Op::Deliver | Op::Reject => {
                    if let Some((seq, b)) = o.oldest() {
                        let n = pushed.get(&b).copied();
                        prop_assert!(n.is_some(), "delivered a body never pushed: {b:?}");
                        delivered.push(n.unwrap_or_default());
                        if matches!(op, Op::Reject) { o.reject(seq, "422: no") } else { o.remove(seq) }
                    }
                }
                Op::Crash => {
                    reported += counted(&o);
                    drop(o);
                    o = Outbox::open(dir.path(), limits, 0);
                }
                Op::Cut(pick, thousandths) => {
                    let segs = segments(dir.path());
                    if segs.is_empty() { continue; }
                    let seg = &segs[pick % segs.len()];
                    let data = std::fs::read(seg).expect("read segment");
                    let cut = data.len() as u64 * thousandths / 1000;
                    for r in parse_segment(&data) {
                        if let Record::Batch { body_offset, body, .. } = r
                            && (body_offset + body.len() + 1) as u64 > cut
                            && let Some(n) = pushed.get(body)
                        {
                            at_risk.insert(*n);
                        }
                    }
                    File::options().write(true).open(seg).and_then(|f| f.set_len(cut)).expect("cut");
                    cuts += 1;
                }
            }
        }
        reported += counted(&o);
        drop(o);
        let mut o = Outbox::open(dir.path(), limits, 0);
        while let Some((seq, b)) = o.oldest() {
            let n = pushed.get(&b).copied();
            prop_assert!(n.is_some(), "delivered a body never pushed: {b:?}");
            delivered.push(n.unwrap_or_default());
            o.remove(seq);
        }
        reported += counted(&o);

        let seen: HashSet<usize> = delivered.iter().copied().collect();
        let lost: Vec<usize> = (0..pushed.len()).filter(|n| !seen.contains(n)).collect();
        if cuts == 0 {
            prop_assert_eq!(seen.len(), delivered.len(), "nothing delivered twice: {:?}", delivered);
            prop_assert!(delivered.windows(2).all(|w| w[0] < w[1]), "in order: {:?}", delivered);
            prop_assert_eq!(lost.len() as u64, reported, "every loss is a counted drop: lost {:?}", lost);
            if !small_bound {
                prop_assert!(lost.is_empty(), "nothing lost inside the bounds: {:?}", lost);
            }
        } else {
            // A cut can destroy batches before the outbox looks (a crash right after it);
            // every other loss is counted.
            let unexplained = lost.iter().filter(|n| !at_risk.contains(n)).count() as u64;
            prop_assert!(unexplained <= reported, "lost {:?}, at risk of a cut {:?}, counted {}", lost, at_risk, reported);
        }
    }
}
