//! Whether to pin the event loops to cores (`--pin auto|on|off`).
//!
//! Pinning pays when each loop owns a core: no migrations, warm caches. On a shared host it hurts: a pinned loop
//! cannot move away from a core that a noisy neighbour keeps busy, and under a CPU quota (containers) the
//! scheduler throttles the whole process anyway. `auto` (the default) pins only when the process's allowed CPU
//! set gives every loop a core of its own **and leaves at least one more** (for the backplane and store threads,
//! and the kernel's network work that runs in whatever thread is on the core), and no CPU quota applies; the
//! decision and its reason are logged. Measured on a 2-core host with 2 loops (the load generator beside them,
//! docs/BENCHMARKS.md): pinned, an echo cost 10.1–10.9 µs of server CPU; unpinned 8.2–9.2 µs, with 24–40 % more
//! echoes per second. A loop pinned to a core that something else needs cannot move; unpinned, the scheduler
//! puts the woken loop beside its peer.

use std::path::Path;

pub use crate::config::Pin;

/// What the host allows this process.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    /// CPUs in the affinity mask.
    pub allowed_cpus: usize,
    /// A CPU quota in CPUs (cgroup `cpu.max` / `cfs_quota_us`), if one applies.
    pub quota_cpus: Option<f64>,
}

/// The decision: pin or not, and why.
pub fn decide(mode: Pin, host: &Host, loops: usize) -> (bool, String) {
    match mode {
        Pin::On => (true, "--pin on".into()),
        Pin::Off => (false, "--pin off".into()),
        Pin::Auto => {
            if let Some(q) = host.quota_cpus {
                return (
                    false,
                    format!("a CPU quota of {q:.2} CPUs applies: the scheduler places the loops"),
                );
            }
            if host.allowed_cpus <= loops {
                return (
                    false,
                    format!(
                        "{} allowed CPUs for {loops} loops: no core is left for the rest of the process and the \
                         kernel, so cores are shared; the scheduler places the loops",
                        host.allowed_cpus
                    ),
                );
            }
            (
                true,
                format!(
                    "{} allowed CPUs for {loops} loops and no CPU quota: each loop owns a core, one is left over",
                    host.allowed_cpus
                ),
            )
        }
    }
}

/// Reads the host: the affinity mask and the cgroup (v2, or v1) CPU quota of this process.
pub fn host() -> Host {
    let allowed_cpus = core_affinity::get_core_ids().map_or(0, |c| c.len());
    Host {
        allowed_cpus,
        quota_cpus: quota(Path::new("/")),
    }
}

/// The CPU quota of this process's cgroup, under `root` (a test can point it elsewhere).
fn quota(root: &Path) -> Option<f64> {
    let cgroup = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: cpu.max is "max PERIOD" or "QUOTA PERIOD".
            let f = root.join("sys/fs/cgroup").join(rel).join("cpu.max");
            if let Ok(text) = std::fs::read_to_string(f) {
                return parse_cpu_max(&text);
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            let dir = root.join("sys/fs/cgroup/cpu,cpuacct").join(rel);
            let q: i64 = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let p: i64 = std::fs::read_to_string(dir.join("cpu.cfs_period_us"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            return (q > 0 && p > 0).then(|| q as f64 / p as f64);
        }
    }
    None
}

/// `cpu.max`: "max 100000" (no quota) or "150000 100000" (1.5 CPUs).
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next()?.parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    Some(quota.parse::<f64>().ok()? / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pins_only_with_a_core_per_loop_one_to_spare_and_no_quota() {
        let free = Host {
            allowed_cpus: 4,
            quota_cpus: None,
        };
        assert!(decide(Pin::Auto, &free, 3).0);
        assert!(
            !decide(Pin::Auto, &free, 4).0,
            "as many loops as cores: none left for the backplane and the kernel"
        );
        assert!(!decide(Pin::Auto, &free, 8).0, "more loops than cores");
        let quota = Host {
            allowed_cpus: 16,
            quota_cpus: Some(2.0),
        };
        assert!(!decide(Pin::Auto, &quota, 2).0, "a quota throttles anyway");
        assert!(decide(Pin::On, &quota, 2).0);
        assert!(!decide(Pin::Off, &free, 1).0);
        assert_eq!("auto".parse::<Pin>(), Ok(Pin::Auto));
        assert!("yes".parse::<Pin>().is_err());
    }

    #[test]
    fn cgroup_v2_and_v1_quotas_are_read() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        let root = std::env::temp_dir().join(format!("corelay-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::create_dir_all(root.join("sys/fs/cgroup/app")).unwrap();
        std::fs::write(root.join("proc/self/cgroup"), "0::/app\n").unwrap();
        std::fs::write(root.join("sys/fs/cgroup/app/cpu.max"), "50000 100000\n").unwrap();
        assert_eq!(quota(&root), Some(0.5));
        std::fs::write(root.join("sys/fs/cgroup/app/cpu.max"), "max 100000\n").unwrap();
        assert_eq!(quota(&root), None);
        std::fs::write(root.join("proc/self/cgroup"), "4:cpu,cpuacct:/svc\n").unwrap();
        let v1 = root.join("sys/fs/cgroup/cpu,cpuacct/svc");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cpu.cfs_quota_us"), "200000\n").unwrap();
        std::fs::write(v1.join("cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(quota(&root), Some(2.0));
        std::fs::write(v1.join("cpu.cfs_quota_us"), "-1\n").unwrap();
        assert_eq!(quota(&root), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
