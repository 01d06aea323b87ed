//! The server under test as a set of processes: pids named with `--server-pid` (repeatable or
//! comma-separated) and, with `--server-children-of PID`, every current child of that process, looked up
//! again at each sample so that children started (or restarted) during the run count. RSS and CPU time
//! are summed over the set.

use std::collections::BTreeMap;

use crate::stats::procfs;

#[derive(Clone, Debug, Default)]
pub struct Servers {
    pub explicit: Vec<u32>,
    pub parent: Option<u32>,
}

/// CPU time (utime + stime, clock ticks) of each process at one instant.
#[derive(Clone, Debug, Default)]
pub struct CpuSnap(BTreeMap<u32, u64>);

impl CpuSnap {
    /// Ticks spent between `self` and `later` by the processes alive at `later`: a process that was not
    /// there at `self` (started or restarted since) counts with all of its CPU time; one that ended in
    /// between is missing (its last ticks cannot be read any more).
    pub fn ticks_until(&self, later: &CpuSnap) -> u64 {
        later
            .0
            .iter()
            .map(|(pid, t)| t.saturating_sub(self.0.get(pid).copied().unwrap_or(0)))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Servers {
    pub fn new(explicit: Vec<u32>, parent: Option<u32>) -> Servers {
        let mut explicit = explicit;
        explicit.sort_unstable();
        explicit.dedup();
        Servers { explicit, parent }
    }

    /// Whether anything is to be measured at all.
    pub fn any(&self) -> bool {
        !self.explicit.is_empty() || self.parent.is_some()
    }

    /// Checks that the named processes exist (and that the parent has children).
    pub fn check(&self) -> anyhow::Result<()> {
        for &pid in &self.explicit {
            anyhow::ensure!(procfs::alive(pid), "--server-pid {pid}: no such process");
        }
        if let Some(p) = self.parent {
            anyhow::ensure!(
                procfs::alive(p),
                "--server-children-of {p}: no such process"
            );
            anyhow::ensure!(
                !procfs::children_of(p).is_empty(),
                "--server-children-of {p}: the process has no children"
            );
        }
        Ok(())
    }

    /// The processes right now (the named ones that are alive, and the parent's current children).
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .explicit
            .iter()
            .copied()
            .filter(|&p| procfs::alive(p))
            .collect();
        if let Some(p) = self.parent {
            v.extend(procfs::children_of(p));
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Summed RSS (KiB) and the number of processes it covers; None when no process could be read.
    pub fn rss_kib(&self) -> Option<(u64, usize)> {
        if !self.any() {
            return None;
        }
        let mut sum = 0;
        let mut n = 0;
        for pid in self.pids() {
            if let Some(r) = procfs::rss_kib(pid) {
                sum += r;
                n += 1;
            }
        }
        (n > 0).then_some((sum, n))
    }

    pub fn cpu(&self) -> CpuSnap {
        CpuSnap(
            self.pids()
                .into_iter()
                .filter_map(|p| Some((p, procfs::cpu_ticks(p)?)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_of_restarted_processes() {
        let a = CpuSnap([(1, 100), (2, 50), (3, 10)].into_iter().collect());
        // 1 used 20 ticks, 2 ended, 3 restarted as 4 (all of its 5 ticks count).
        let b = CpuSnap([(1, 120), (4, 5)].into_iter().collect());
        assert_eq!(a.ticks_until(&b), 25);
    }

    #[test]
    fn finds_itself_as_a_child() {
        let me = std::process::id();
        let parent = procfs::ppid(me).unwrap();
        let s = Servers::new(vec![], Some(parent));
        assert!(s.pids().contains(&me));
        let (rss, n) = s.rss_kib().unwrap();
        assert!(rss > 0 && n >= 1);
        assert!(!s.cpu().is_empty());
        let none = Servers::new(vec![], None);
        assert!(none.rss_kib().is_none());
    }
}
