//! One blocking HTTP/1.1 request to the gateway's internal API (`/api/conversations`, `/api/publish`).

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::net::{Target, Transport};

/// POSTs `body` as JSON to `{api}{path}` with `Authorization: Bearer {key}` and returns the status and
/// the response body. `Connection: close`; 10 s bounds the connect, each write and each read.
pub fn post_json(api: &str, key: &str, path: &str, body: &Value) -> anyhow::Result<(u16, String)> {
    let t = Target::parse(api, Transport::Sse, false)?;
    let path = format!("{}{path}", t.path.trim_end_matches('/'));
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect_timeout(&t.addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {}", t.addr))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        t.host,
        body.len()
    );
    s.write_all(req.as_bytes())
        .with_context(|| format!("POST {path}: sending"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .context("malformed response")?;
                let text = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return Ok((status, text));
            }
        }
        let n = s
            .read(&mut chunk)
            .with_context(|| format!("POST {path}: reading the response"))?;
        if n == 0 {
            bail!("POST {path}: connection closed before a complete response");
        }
        buf.extend_from_slice(&chunk[..n]);
        anyhow::ensure!(buf.len() < (1 << 20), "POST {path}: response too large");
    }
}
