//! `corelay run --processes N`: N gateway processes on one host that behave as one gateway.
//!
//! Why processes at all: a process can hold only as many sockets as its open-file limit allows, and where
//! that limit is a hard cap (20,000 on the development machine) one process cannot hold a million
//! connections however little each costs. Why cluster nodes over Redis rather than a new shared-memory bus:
//! every piece a multi-process gateway needs (a bus for fan-out across processes, user → node presence for
//! chat, a shared store, exactly-once claims) already exists and is tested in cluster mode; a child is a
//! cluster node whose id is `<node-id>-p<i>`, and clients cannot tell which one they reached.
//!
//! The children bind the same port with `SO_REUSEPORT` (the kernel spreads new connections over every
//! listening socket of every process). This process only supervises, as nginx's master does: it starts the
//! children with the same arguments, restarts one that dies (backoff 1 s doubling to 30 s, reset after a
//! minute up), forwards SIGTERM/SIGINT so that each drains its clients, and exits when all have ended.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Flags the supervisor sets per child (any value the operator gave is replaced).
const PER_CHILD: [&str; 5] = [
    "--processes",
    "--node-id",
    "--data-dir",
    "--auth-secret",
    "--api-key",
];

/// The command line minus the flags in [`PER_CHILD`] (`--flag value` and `--flag=value`).
pub fn child_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let s = a.to_string_lossy();
        if PER_CHILD.contains(&s.as_ref()) {
            skip_value = true;
            continue;
        }
        if PER_CHILD.iter().any(|f| s.starts_with(&format!("{f}="))) {
            continue;
        }
        out.push(a);
    }
    out
}

struct Slot {
    index: usize,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
}

/// Runs the supervisor until a signal and every child has ended. `secret`, `api_key`: resolved once here so
/// that every child verifies the same tokens and keys (passed in the environment, not on the command line).
pub fn run(
    processes: usize,
    node_id: &str,
    data_dir: &Path,
    secret: &str,
    api_key: &str,
    drain: Duration,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the corelay executable")?;
    let args = child_args(std::env::args_os().skip(1));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])?;
    let spawn = |i: usize| -> std::io::Result<Child> {
        use std::os::unix::process::CommandExt;
        let dir = data_dir.join(format!("p{i}"));
        let mut cmd = Command::new(&exe);
        // SAFETY: runs in the forked child before exec; prctl(2) is async-signal-safe and touches no memory
        // of ours. A child whose supervisor died (even by SIGKILL) gets SIGTERM and drains, instead of living
        // on unsupervised and holding the port.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        cmd.args(&args)
            .arg("--node-id")
            .arg(format!("{node_id}-p{i}"))
            .arg("--data-dir")
            .arg(&dir)
            .env("CORELAY_AUTH_SECRET", secret)
            .env("CORELAY_API_KEY", api_key)
            .spawn()
    };
    let mut slots: Vec<Slot> = (0..processes)
        .map(|index| Slot {
            index,
            child: None,
            started: Instant::now(),
            backoff: Duration::from_secs(1),
            restart_at: Some(Instant::now()),
        })
        .collect();
    tracing::info!(processes, node_id, "supervising gateway processes");
    let mut stopping: Option<Instant> = None;
    loop {
        let sig = signals.pending().next();
        if sig == Some(signal_hook::consts::SIGHUP) {
            // Reload (the TLS certificate): each process reads it again.
            tracing::info!("SIGHUP: forwarded to every process");
            for s in &slots {
                if let Some(c) = &s.child {
                    signal(c.id(), libc::SIGHUP);
                }
            }
        } else if stopping.is_none()
            && let Some(sig) = sig
        {
            tracing::info!(signal = sig, "stopping: every process drains its clients");
            for s in &slots {
                if let Some(c) = &s.child {
                    terminate(c.id());
                }
            }
            stopping = Some(Instant::now());
        }
        let now = Instant::now();
        for s in &mut slots {
            if let Some(c) = &mut s.child
                && let Ok(Some(status)) = c.try_wait()
            {
                s.child = None;
                if stopping.is_none() {
                    if s.started.elapsed() > Duration::from_secs(60) {
                        s.backoff = Duration::from_secs(1);
                    }
                    tracing::warn!(process = s.index, %status, backoff = ?s.backoff, "process ended; restarting it");
                    s.restart_at = Some(now + s.backoff);
                    s.backoff = (s.backoff * 2).min(Duration::from_secs(30));
                }
            }
            if stopping.is_none() && s.child.is_none() && s.restart_at.is_some_and(|t| t <= now) {
                match spawn(s.index) {
                    Ok(c) => {
                        tracing::info!(process = s.index, pid = c.id(), "process started");
                        s.child = Some(c);
                        s.started = now;
                        s.restart_at = None;
                    }
                    Err(e) => {
                        tracing::error!(process = s.index, error = %e, "could not start a process");
                        s.restart_at = Some(now + s.backoff);
                        s.backoff = (s.backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
        if let Some(t) = stopping {
            if slots.iter().all(|s| s.child.is_none()) {
                tracing::info!("every process ended");
                return Ok(());
            }
            if t.elapsed() > drain + Duration::from_secs(5) {
                for s in &mut slots {
                    if let Some(c) = &mut s.child {
                        tracing::warn!(
                            process = s.index,
                            "still running after the drain; killing it"
                        );
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    s.child = None;
                }
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends SIGTERM (a graceful drain) to a child.
fn terminate(pid: u32) {
    signal(pid, libc::SIGTERM);
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and has no memory effects; `pid` is a child we started and have
    // not reaped yet, so it cannot name another process.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::child_args;
    use std::ffi::OsString;

    fn v(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn per_child_flags_are_removed_in_both_spellings() {
        assert_eq!(
            child_args(v(&[
                "run",
                "--processes",
                "4",
                "--listen",
                "127.0.0.1:9000",
                "--node-id=n1",
                "--data-dir",
                "/d",
                "--auth-secret",
                "s",
                "--redis",
                "redis://x",
                "--api-key=k",
            ])),
            v(&["run", "--listen", "127.0.0.1:9000", "--redis", "redis://x"])
        );
    }
}
