//! Informs the store's group-commit and fsync policy: messages appended per second by the embedded store
//! (redb) for group sizes 1, 16, 256 with fsync on every commit, and with fsync at most every 10 ms.
//! Run: `cargo bench --bench store` (writes to a temp dir on the machine's disk).

use std::time::Duration;

use corelay::store::embedded::{Embedded, Fsync};
use corelay::store::{NewMessage, Store, Write};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn batch(n: usize, seq: &mut u64) -> Vec<Write> {
    (0..n)
        .map(|_| {
            *seq += 1;
            Write::Append(NewMessage {
                channel: format!("conversation:c{}", *seq % 64),
                from: Some("alice".into()),
                client_id: Some(format!("k{seq}")),
                ts: *seq,
                json: r#"{"text":"a typical short chat message, about a hundred bytes of JSON body text"}"#.into(),
                offline: vec!["bob".into()],
                push: Vec::new(),
            })
        })
        .collect()
}

fn appends(c: &mut Criterion) {
    let mut g = c.benchmark_group("store/append");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for (policy, fsync) in [
        ("fsync_always", Fsync::Always),
        ("fsync_10ms", Fsync::Interval(Duration::from_millis(10))),
    ] {
        for n in [1usize, 16, 256] {
            let dir = std::env::temp_dir().join(format!(
                "corelay-bench-store-{policy}-{n}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let mut store = Embedded::open(&dir, fsync).unwrap();
            let mut seq = 0;
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new(policy, n), &n, |b, &n| {
                b.iter(|| store.commit(&batch(n, &mut seq)).unwrap())
            });
            drop(store);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    g.finish();
}

criterion_group!(benches, appends);
criterion_main!(benches);
