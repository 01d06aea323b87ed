//! A real browser: Chromium's `EventSource`, on a page from another origin, resumes an SSE stream from a
//! `Last-Event-ID` cursor (CORS, `id:` = the whole cursor, replay order). Needs `chromium` (`tests/run.sh`
//! installs it) and fails without it.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::*;

#[test]
fn chromium_event_source_resumes_from_last_event_id_across_origins() {
    // tests/run.sh installs chromium; without it this test fails rather than passing without a browser.
    assert!(
        Command::new("chromium").arg("--version").output().is_ok(),
        "chromium is not installed (apt-get install chromium): the browser EventSource test cannot run"
    );
    let node = Node::start(&[]);
    for i in 1..=3 {
        node.publish("scores:browser", json!({"goal": i}));
    }
    // The page comes from another origin (python's http.server on a free port).
    let www = fresh_dir();
    std::fs::create_dir_all(&www).unwrap();
    let url = format!(
        "http://{}/sse?channels=scores:browser&last_event_id=scores:browser%3D1&token={}",
        node.addr,
        token("web")
    );
    let page = format!(
        r#"<html><body><pre id="log"></pre><script>
const log = document.getElementById('log');
const es = new EventSource('{url}');
let n = 0;
es.addEventListener('message', e => {{ log.textContent += 'id=' + e.lastEventId + ' data=' + e.data + '\n'; if (++n == 2) es.close(); }});
es.onerror = () => {{ log.textContent += 'error\n'; es.close(); }};
</script></body></html>"#
    );
    std::fs::write(www.join("es.html"), page).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let page_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(page_addr).is_ok()
    }));
    let profile = fresh_dir();
    let out = Command::new("timeout")
        .arg("60")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://127.0.0.1:{port}/es.html"))
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&www);
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = dom
        .lines()
        .filter(|l| l.contains("data={\"type\""))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "two events replayed after the cursor: {dom}"
    );
    assert!(
        lines[0].contains("id=scores:browser=2") && lines[0].contains("\"offset\":2"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("id=scores:browser=3") && lines[1].contains("\"goal\":3"),
        "{}",
        lines[1]
    );
    assert!(!dom.contains("\nerror"), "{dom}");
}
