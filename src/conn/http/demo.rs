//! The demo chat (`--demo`): a page built on the JavaScript SDK, served at `/demo/`, and the one endpoint that
//! mints client tokens without the operator (`/demo/token?user=…`). Both exist only with `--demo`: never turn
//! it on where real users connect (anyone can become anyone).

use super::super::{Conn, Cx};
use super::respond::{self, Framing, Reply};
use super::{ErrorKind, HttpError};
use corelay_proto::http1::RequestHead;

const INDEX: &str = include_str!("demo/index.html");
const APP: &str = include_str!("demo/app.js");
const STYLE: &str = include_str!("demo/style.css");
/// The SDK itself, as published in `clients/js`.
const SDK: &str = include_str!("../../../clients/js/src/corelay.js");

/// The demo's conversations (created at start by `corelay run --demo`): id and members.
pub const CONVERSATIONS: &[(&str, &[&str])] = &[
    ("general", &["alice", "bob", "carol", "dave"]),
    ("alice-bob", &["alice", "bob"]),
    ("bob-carol", &["bob", "carol"]),
    ("carol-dave", &["carol", "dave"]),
];

/// Tokens the demo hands out live this long.
const TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Answers a `/demo…` path; false when it is not one of the demo's (the caller answers 404).
pub(crate) fn serve(
    conn: &mut Conn,
    head: &RequestHead,
    framing: Framing,
    cx: &mut Cx<'_>,
) -> bool {
    let asset = |ct: &'static str, body: &'static str| {
        let mut r = Reply::new(200, ct, body.as_bytes());
        r.headers.push("Cache-Control: no-cache".into());
        r
    };
    let reply = match head.path.as_str() {
        "/demo" => {
            let mut r = Reply::new(308, "text/plain", b"/demo/\n");
            r.headers.push("Location: /demo/".into());
            r
        }
        "/demo/" | "/demo/index.html" => asset("text/html; charset=utf-8", INDEX),
        "/demo/app.js" => asset("text/javascript; charset=utf-8", APP),
        "/demo/corelay.js" => asset("text/javascript; charset=utf-8", SDK),
        "/demo/style.css" => asset("text/css; charset=utf-8", STYLE),
        "/demo/token" => return token(conn, head, framing, cx),
        _ => return false,
    };
    respond::answer(conn, cx, reply, framing);
    true
}

/// `GET /demo/token?user=alice` → `{"token","user","conversations":[{"id","members"}]}`.
fn token(conn: &mut Conn, head: &RequestHead, framing: Framing, cx: &mut Cx<'_>) -> bool {
    let user = head.query_param("user");
    let minted = match user.as_deref() {
        Some(u) if crate::auth::valid_id(u) => cx.env.verifier().mint(u, TOKEN_TTL),
        _ => None,
    };
    let (Some(user), Some(token)) = (user, minted) else {
        let e = HttpError::of(ErrorKind::BadRequest, "user= must be a valid user id");
        respond::answer(conn, cx, Reply::error(&e), framing);
        return true;
    };
    let conversations: Vec<serde_json::Value> = CONVERSATIONS
        .iter()
        .filter(|(_, members)| members.contains(&user.as_str()))
        .map(|(id, members)| serde_json::json!({"id": id, "members": members}))
        .collect();
    let body = serde_json::json!({"token": token, "user": user, "conversations": conversations})
        .to_string();
    let mut r = Reply::new(200, "application/json", body.as_bytes());
    r.headers.push("Cache-Control: no-store".into());
    respond::answer(conn, cx, r, framing);
    true
}
