//! Measurements: latency histograms (and their transport between processes), failure tallies, a wall
//! clock shared by processes, and the server's RSS and CPU time from `/proc`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Latencies in µs, 1 µs .. 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// A histogram as `[[value, count], …]` (what a child sends its parent).
pub fn encode(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
            .collect(),
    )
}

/// Adds an [`encode`]d histogram into `h`.
pub fn merge(h: &mut Histogram<u64>, v: &Value) {
    for pair in v.as_array().into_iter().flatten() {
        if let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) {
            let _ = h.record_n(value.clamp(1, h.high()), count);
        }
    }
}

/// `{prefix}_p50_us`, `_p99_us`, `_p999_us`, `_max_us`, `_mean_us` (null when empty).
pub fn percentiles(h: &Histogram<u64>, prefix: &str, out: &mut Report) {
    let empty = h.is_empty();
    let q = |q: f64| {
        if empty {
            Value::Null
        } else {
            json!(h.value_at_quantile(q))
        }
    };
    out.insert(format!("{prefix}_p50_us"), q(0.5));
    out.insert(format!("{prefix}_p99_us"), q(0.99));
    out.insert(format!("{prefix}_p999_us"), q(0.999));
    out.insert(
        format!("{prefix}_max_us"),
        if empty { Value::Null } else { json!(h.max()) },
    );
    out.insert(
        format!("{prefix}_mean_us"),
        if empty {
            Value::Null
        } else {
            json!((h.mean() * 10.0).round() / 10.0)
        },
    );
}

/// The final report: a JSON object whose keys keep their insertion order (serde_json's own map sorts
/// them), so that `scenario` and the parameters come first.
#[derive(Default)]
pub struct Report(Vec<(String, Value)>);

impl Report {
    pub fn insert(&mut self, key: impl Into<String>, v: Value) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = v,
            None => self.0.push((key, v)),
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{v}", Value::String(k.clone()))?;
        }
        f.write_str("}")
    }
}

/// Failure reasons and how often each happened.
#[derive(Default)]
pub struct Tally(pub BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, reason: &str, n: u64) {
        *self.0.entry(reason.to_string()).or_default() += n;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn to_json(&self) -> Value {
        json!(self.0)
    }

    pub fn merge(&mut self, v: &Value) {
        for (k, n) in v.as_object().into_iter().flatten() {
            self.add(k, n.as_u64().unwrap_or(0));
        }
    }
}

/// Wall-clock µs since the Unix epoch, advanced by the monotonic clock from one reading of the system
/// clock: comparable between processes on one machine, and never going backwards within one.
pub struct Clock {
    base: Instant,
    base_us: u64,
}

impl Clock {
    pub fn new() -> Clock {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Clock {
            base: Instant::now(),
            base_us,
        }
    }

    pub fn us(&self, t: Instant) -> u64 {
        self.base_us + t.saturating_duration_since(self.base).as_micros() as u64
    }

    pub fn now_us(&self) -> u64 {
        self.us(Instant::now())
    }
}

/// Wall-clock µs since the Unix epoch (CLOCK_REALTIME), read now: what crosses processes when a single
/// instant (the broadcast) is compared between them.
pub fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Rounds to 3 decimals for the report.
pub fn r3(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

/// Sums field `key` over `values`.
pub fn sum(values: &[Value], key: &str) -> u64 {
    values.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum()
}

/// The server process seen through `/proc`.
pub mod procfs {
    use std::process::Command;

    /// Resident set size in KiB (`VmRSS`).
    pub fn rss_kib(pid: u32) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The fields of `/proc/PID/stat` after the command name (field 3, the state, is index 0).
    fn stat_fields(pid: u32) -> Option<Vec<String>> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses; the rest follows its last ')'.
        let rest = &s[s.rfind(')')? + 1..];
        Some(rest.split_whitespace().map(str::to_string).collect())
    }

    /// utime + stime, in clock ticks.
    pub fn cpu_ticks(pid: u32) -> Option<u64> {
        let f = stat_fields(pid)?;
        let utime: u64 = f.get(11)?.parse().ok()?;
        let stime: u64 = f.get(12)?.parse().ok()?;
        Some(utime + stime)
    }

    /// The parent's pid (field 4 of `/proc/PID/stat`).
    #[cfg(test)]
    pub fn ppid(pid: u32) -> Option<u32> {
        stat_fields(pid)?.get(1)?.parse().ok()
    }

    /// The processes whose parent is `parent` right now (a scan of `/proc/*/stat`), sorted. Zombies are
    /// left out (they hold no memory and their CPU time is final).
    pub fn children_of(parent: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(f) = stat_fields(pid)
                && f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent)
                && f.first().map(String::as_str) != Some("Z")
            {
                out.push(pid);
            }
        }
        out.sort_unstable();
        out
    }

    /// `key: N kB` lines of `/proc/meminfo` (or any file of that shape), in KiB.
    fn kib_field(text: &str, key: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// What `/proc/meminfo` and `/proc/net/sockstat` say about the whole machine.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Kernel {
        pub slab_kib: u64,
        pub sunreclaim_kib: u64,
        pub mem_available_kib: u64,
        /// `sockets: used` (all sockets of the network namespace).
        pub sockets_used: u64,
        /// `TCP: inuse`.
        pub tcp_inuse: u64,
        /// `TCP: mem`, in pages.
        pub tcp_mem_pages: u64,
    }

    pub fn parse_kernel(meminfo: &str, sockstat: &str) -> Option<Kernel> {
        let mut k = Kernel {
            slab_kib: kib_field(meminfo, "Slab")?,
            sunreclaim_kib: kib_field(meminfo, "SUnreclaim")?,
            mem_available_kib: kib_field(meminfo, "MemAvailable")?,
            ..Kernel::default()
        };
        for line in sockstat.lines() {
            let mut it = line.split_whitespace();
            match it.next() {
                Some("sockets:") => {
                    let f: Vec<&str> = it.collect();
                    k.sockets_used = value_after(&f, "used")?;
                }
                Some("TCP:") => {
                    let f: Vec<&str> = it.collect();
                    k.tcp_inuse = value_after(&f, "inuse")?;
                    k.tcp_mem_pages = value_after(&f, "mem")?;
                }
                _ => {}
            }
        }
        Some(k)
    }

    fn value_after(f: &[&str], key: &str) -> Option<u64> {
        let i = f.iter().position(|w| *w == key)?;
        f.get(i + 1)?.parse().ok()
    }

    pub fn kernel() -> Option<Kernel> {
        let m = std::fs::read_to_string("/proc/meminfo").ok()?;
        let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
        parse_kernel(&m, &s)
    }

    /// Of several readings, the one least used in every figure (min usage, max `MemAvailable`): the
    /// same rule as the minimum of the RSS samples, to leave out transient allocations.
    pub fn least_used(samples: &[Kernel]) -> Option<Kernel> {
        let first = *samples.first()?;
        Some(samples.iter().fold(first, |a, b| Kernel {
            slab_kib: a.slab_kib.min(b.slab_kib),
            sunreclaim_kib: a.sunreclaim_kib.min(b.sunreclaim_kib),
            mem_available_kib: a.mem_available_kib.max(b.mem_available_kib),
            sockets_used: a.sockets_used.min(b.sockets_used),
            tcp_inuse: a.tcp_inuse.min(b.tcp_inuse),
            tcp_mem_pages: a.tcp_mem_pages.min(b.tcp_mem_pages),
        }))
    }

    /// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
    pub fn clk_tck() -> u64 {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    }

    /// This process's soft open-file limit.
    pub fn nofile_limit() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = s.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Whether the process exists.
    pub fn alive(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip() {
        let mut a = histogram();
        for v in [1u64, 10, 100, 1000, 12_345, 1_000_000] {
            a.record(v).unwrap();
        }
        let mut b = histogram();
        merge(&mut b, &encode(&a));
        merge(&mut b, &encode(&a));
        assert_eq!(b.len(), 2 * a.len());
        assert_eq!(b.value_at_quantile(0.5), a.value_at_quantile(0.5));
        assert_eq!(b.max(), a.max());
    }

    #[test]
    fn report_keeps_order() {
        let mut r = Report::default();
        r.insert("scenario", json!("idle"));
        r.insert("b", json!(1));
        r.insert("a", json!([1, 2]));
        r.insert("b", json!(2));
        let s = r.to_string();
        assert_eq!(s, r#"{"scenario":"idle","b":2,"a":[1,2]}"#);
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["b"], 2);
    }

    #[test]
    fn reads_own_proc() {
        let me = std::process::id();
        assert!(procfs::rss_kib(me).unwrap() > 0);
        assert!(procfs::cpu_ticks(me).is_some());
        assert!(procfs::nofile_limit().is_some());
        let parent = procfs::ppid(me).unwrap();
        assert!(procfs::children_of(parent).contains(&me));
        assert!(procfs::kernel().is_some());
    }

    #[test]
    fn parses_kernel_figures() {
        let meminfo = "MemTotal: 100 kB\nMemAvailable:   2400 kB\nSlab:  507 kB\nSReclaimable: 400 kB\nSUnreclaim:  53 kB\n";
        let sockstat =
            "sockets: used 10\nTCP: inuse 1 orphan 0 tw 3 alloc 1 mem 7\nUDP: inuse 0 mem 0\n";
        let k = procfs::parse_kernel(meminfo, sockstat).unwrap();
        assert_eq!(
            k,
            procfs::Kernel {
                slab_kib: 507,
                sunreclaim_kib: 53,
                mem_available_kib: 2400,
                sockets_used: 10,
                tcp_inuse: 1,
                tcp_mem_pages: 7,
            }
        );
        let mut k2 = k;
        k2.slab_kib = 500;
        k2.mem_available_kib = 2500;
        let l = procfs::least_used(&[k, k2]).unwrap();
        assert_eq!(
            (l.slab_kib, l.mem_available_kib, l.tcp_mem_pages),
            (500, 2500, 7)
        );
    }
}
