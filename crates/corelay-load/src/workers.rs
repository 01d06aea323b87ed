//! Coordinator and workers. The coordinator (the process the user started) samples the server, drives
//! the phases and prints the final `RESULT` line; the workers hold the connections. With `--procs 1`
//! the one worker is a thread of the coordinator; with `--procs P > 1` each worker is a child process
//! (this same executable with `--child-index i --child-count P` appended to the parent's arguments).
//!
//! Both kinds talk the same line protocol. Worker → coordinator (child: stdout): `READY {json}` when its
//! connections are set up, `PROGRESS {json}` while opening, `SAMPLE {json}` for per-event reports
//! (fanout, idle broadcast), `RESULT {json}` last. Coordinator → worker (child: stdin): `go`, `mark`,
//! `stop`; end of input means stop.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::Waker;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Go,
    Stop,
    /// Take a snapshot of the counters now (idle: the end of the hold).
    Mark,
}

impl Cmd {
    fn word(self) -> &'static str {
        match self {
            Cmd::Go => "go",
            Cmd::Stop => "stop",
            Cmd::Mark => "mark",
        }
    }
}

enum Out {
    Stdout,
    Channel(Sender<(usize, String)>, Option<Arc<Waker>>),
}

/// A worker's end.
pub struct Link {
    out: Out,
    cmds: Receiver<Cmd>,
    pub index: usize,
    pub count: usize,
}

impl Link {
    /// The link of a child process: lines on stdout, commands from stdin.
    pub fn child(index: usize, count: usize) -> Link {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                let cmd = match line.trim() {
                    "go" => Cmd::Go,
                    "stop" => Cmd::Stop,
                    "mark" => Cmd::Mark,
                    _ => continue,
                };
                if tx.send(cmd).is_err() {
                    return;
                }
            }
            let _ = tx.send(Cmd::Stop);
        });
        Link {
            out: Out::Stdout,
            cmds: rx,
            index,
            count,
        }
    }

    pub fn emit(&self, kind: &str, v: &Value) {
        let line = format!("{kind} {v}");
        match &self.out {
            Out::Stdout => {
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{line}");
                let _ = o.flush();
            }
            Out::Channel(tx, waker) => {
                let _ = tx.send((self.index, line));
                if let Some(w) = waker {
                    let _ = w.wake();
                }
            }
        }
    }

    /// The next command, if one came; a vanished coordinator means stop.
    pub fn try_cmd(&self) -> Option<Cmd> {
        match self.cmds.try_recv() {
            Ok(c) => Some(c),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Cmd::Stop),
        }
    }
}

/// A line from a worker.
#[derive(Debug)]
pub enum Line {
    Ready(Value),
    Progress(Value),
    Sample(Value),
    Result(Value),
    /// The worker ended (its thread returned, or the child closed its stdout).
    Exit,
}

fn parse_line(s: &str) -> Option<Line> {
    if s == "EXIT" {
        return Some(Line::Exit);
    }
    let (kind, json) = s.split_once(' ')?;
    let v: Value = serde_json::from_str(json).ok()?;
    Some(match kind {
        "READY" => Line::Ready(v),
        "PROGRESS" => Line::Progress(v),
        "SAMPLE" => Line::Sample(v),
        "RESULT" => Line::Result(v),
        _ => return None,
    })
}

enum Ctl {
    Pipe(Option<ChildStdin>),
    Chan(Sender<Cmd>),
}

/// The coordinator's end.
pub struct Workers {
    rx: Receiver<(usize, String)>,
    ctl: Vec<Ctl>,
    children: Vec<Child>,
    pub count: usize,
    /// Each worker's RESULT, once it came.
    results: Vec<Option<Value>>,
    /// Workers that ended (thread returned, child closed its stdout).
    exited: Vec<bool>,
}

/// Sends "EXIT" when the worker thread ends, panicking or not.
struct ExitGuard(Sender<(usize, String)>, Option<Arc<Waker>>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = self.0.send((0, "EXIT".into()));
        if let Some(w) = &self.1 {
            let _ = w.wake();
        }
    }
}

impl Workers {
    /// Starts `count` workers: a thread running `in_process` when `count == 1`, else child processes.
    /// `waker` (optional) is woken whenever a worker line arrives.
    pub fn start<F>(
        count: usize,
        waker: Option<Arc<Waker>>,
        in_process: F,
    ) -> anyhow::Result<Workers>
    where
        F: FnOnce(Link) + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let mut ctl = Vec::new();
        let mut children = Vec::new();
        if count <= 1 {
            let (ctx, crx) = mpsc::channel();
            let link = Link {
                out: Out::Channel(tx.clone(), waker.clone()),
                cmds: crx,
                index: 0,
                count: 1,
            };
            let guard = ExitGuard(tx, waker);
            std::thread::Builder::new()
                .name("worker".into())
                .spawn(move || {
                    let _guard = guard;
                    in_process(link);
                })
                .context("spawning the worker thread")?;
            ctl.push(Ctl::Chan(ctx));
        } else {
            let exe = std::env::current_exe().context("finding my own executable")?;
            let args: Vec<_> = std::env::args_os().skip(1).collect();
            for i in 0..count {
                let mut child = Command::new(&exe)
                    .args(&args)
                    .arg("--child-index")
                    .arg(i.to_string())
                    .arg("--child-count")
                    .arg(count.to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .with_context(|| format!("starting child process {i}"))?;
                let stdout = child.stdout.take().context("child stdout")?;
                let tx = tx.clone();
                let waker = waker.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        if tx.send((i, line)).is_err() {
                            return;
                        }
                        if let Some(w) = &waker {
                            let _ = w.wake();
                        }
                    }
                    let _ = tx.send((i, "EXIT".into()));
                    if let Some(w) = &waker {
                        let _ = w.wake();
                    }
                });
                ctl.push(Ctl::Pipe(child.stdin.take()));
                children.push(child);
            }
        }
        let count = count.max(1);
        Ok(Workers {
            rx,
            ctl,
            children,
            count,
            results: vec![None; count],
            exited: vec![false; count],
        })
    }

    /// Sends a command to every worker.
    pub fn send(&mut self, cmd: Cmd) {
        for c in &mut self.ctl {
            match c {
                Ctl::Chan(tx) => {
                    let _ = tx.send(cmd);
                }
                Ctl::Pipe(stdin) => {
                    if let Some(s) = stdin {
                        let word = format!("{}\n", cmd.word());
                        if s.write_all(word.as_bytes())
                            .and_then(|_| s.flush())
                            .is_err()
                        {
                            *stdin = None;
                        }
                    }
                }
            }
        }
    }

    /// The next worker line, waiting at most `timeout`. RESULT and end-of-worker are also remembered
    /// (see [`Workers::collect`]).
    pub fn recv(&mut self, timeout: Duration) -> Option<(usize, Line)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, s)) => match parse_line(&s) {
                    Some(l) => {
                        let i = i.min(self.count - 1);
                        match &l {
                            Line::Result(v) => self.results[i] = Some(v.clone()),
                            Line::Exit => self.exited[i] = true,
                            _ => {}
                        }
                        return Some((i, l));
                    }
                    None => eprintln!("corelay-load: worker {i}: {s}"),
                },
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// A worker line if one is waiting.
    pub fn try_recv(&mut self) -> Option<(usize, Line)> {
        self.recv(Duration::ZERO)
    }

    /// Whether worker `i` has sent its RESULT or ended.
    pub fn finished(&self, i: usize) -> bool {
        self.results[i].is_some() || self.exited[i]
    }

    /// Collects one RESULT per worker (a worker that ends without one counts as lost), until
    /// `deadline`. Other lines go to `other`. Returns the results and how many workers were lost.
    pub fn collect(
        &mut self,
        deadline: Instant,
        mut other: impl FnMut(usize, Line),
    ) -> (Vec<Value>, usize) {
        while (0..self.count).any(|i| !self.finished(i)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.recv(left.min(Duration::from_millis(200))) {
                Some((_, Line::Result(_) | Line::Exit)) | None => {}
                Some((i, l)) => other(i, l),
            }
        }
        let lost = self.results.iter().filter(|r| r.is_none()).count();
        (self.results.iter().flatten().cloned().collect(), lost)
    }

    /// Tells every worker to stop and waits (at most `grace`) for the child processes to exit; kills
    /// those that do not.
    pub fn finish(mut self, grace: Duration) {
        self.send(Cmd::Stop);
        for c in &mut self.ctl {
            if let Ctl::Pipe(stdin) = c {
                *stdin = None; // end of input
            }
        }
        let deadline = Instant::now() + grace;
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!(
                            "corelay-load: child {} did not exit; killing it",
                            child.id()
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// The share `[n*i/p, n*(i+1)/p)` of worker `i` out of `p`.
pub fn share(n: usize, i: usize, p: usize) -> std::ops::Range<usize> {
    let p = p.max(1);
    (n * i / p)..(n * (i + 1) / p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for (n, p) in [(10, 3), (10_000, 2), (1, 4), (7, 7)] {
            let mut next = 0;
            for i in 0..p {
                let r = share(n, i, p);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn parses_lines() {
        assert!(matches!(
            parse_line("READY {\"open\":3}"),
            Some(Line::Ready(_))
        ));
        assert!(matches!(parse_line("RESULT {}"), Some(Line::Result(_))));
        assert!(matches!(parse_line("EXIT"), Some(Line::Exit)));
        assert!(parse_line("hello world").is_none());
    }
}
