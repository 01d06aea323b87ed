//! The JSON wire protocol v1 (`docs/PROTOCOL.md`): client requests and server messages.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The WebSocket subprotocol of this protocol.
pub const SUBPROTOCOL: &str = "corelay.v1";

/// A request from a client (a WebSocket text frame, or the body of `POST /send`).
#[derive(Debug)]
pub enum ClientMsg {
    Subscribe {
        channels: Vec<String>,
        cursor: BTreeMap<String, u64>,
    },
    Unsubscribe {
        channels: Vec<String>,
    },
    Send {
        conversation: String,
        client_id: String,
        /// The client's JSON, kept as text and passed through untouched.
        body: Box<RawValue>,
    },
    Ack {
        conversation: String,
        offset: u64,
    },
    Read {
        conversation: String,
        offset: u64,
    },
    History {
        conversation: String,
        before: Option<u64>,
        limit: Option<usize>,
    },
    /// A fresh token for this connection before the current one expires (handled on the loop).
    Refresh {
        token: String,
    },
    /// A push device of this user (`platform` is `apns` or `fcm`).
    RegisterDevice {
        platform: String,
        token: String,
    },
    UnregisterDevice {
        platform: String,
        token: String,
    },
    /// Application-level liveness: answered `{"type":"pong"}` at once by the connection's loop (browsers
    /// cannot see WebSocket ping frames). `id`, if given, is echoed.
    Ping {
        id: Option<String>,
    },
}

/// The request types a client may send.
const KNOWN_TYPES: [&str; 10] = [
    "ping",
    "subscribe",
    "unsubscribe",
    "send",
    "ack",
    "read",
    "history",
    "refresh",
    "register_device",
    "unregister_device",
];

/// Longest push device token accepted (APNs tokens are 64 hex digits, FCM registration tokens about 160).
pub const MAX_DEVICE_TOKEN: usize = 512;

/// A device registration's platform and token, as every entry point accepts them.
pub fn check_device(platform: &str, token: &str) -> Result<(), String> {
    if platform != "apns" && platform != "fcm" {
        return Err("platform is \"apns\" or \"fcm\"".into());
    }
    if token.is_empty()
        || token.len() > MAX_DEVICE_TOKEN
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!(
            "token is 1..={MAX_DEVICE_TOKEN} printable ASCII bytes"
        ));
    }
    Ok(())
}

/// Why a client frame could not be turned into a [`ClientMsg`]; each maps to an `error` code.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not a JSON object.
    BadJson,
    /// JSON without a known `type`.
    UnknownType,
    /// A known type with missing or mistyped fields.
    BadRequest(String),
}

impl ParseError {
    pub fn code(&self) -> &'static str {
        match self {
            ParseError::BadJson => "bad_json",
            ParseError::UnknownType => "unknown_type",
            ParseError::BadRequest(_) => "bad_request",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ParseError::BadJson => "frame is not a JSON object".into(),
            ParseError::UnknownType => {
                "unknown or missing \"type\" (subscribe, unsubscribe, send, ack, read, history, ping)"
                    .into()
            }
            ParseError::BadRequest(e) => e.clone(),
        }
    }
}

/// Every field any request has. (serde's internally tagged enums buffer their input, which `RawValue`
/// cannot come from, so the request is read flat and then checked per type.) Unknown fields are ignored so
/// that newer clients can talk to older nodes.
#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "type")]
    ty: Option<String>,
    channels: Option<Vec<String>>,
    cursor: Option<BTreeMap<String, u64>>,
    conversation: Option<String>,
    client_id: Option<String>,
    body: Option<Box<RawValue>>,
    offset: Option<u64>,
    before: Option<u64>,
    limit: Option<usize>,
    token: Option<String>,
    platform: Option<String>,
    id: Option<String>,
}

fn need<T>(v: Option<T>, field: &str, ty: &str) -> Result<T, ParseError> {
    v.ok_or_else(|| ParseError::BadRequest(format!("{ty}: missing field \"{field}\"")))
}

/// Parses one client request. On failure it also returns the request's `client_id` when it can find one,
/// so the error can carry `ref`.
pub fn parse_client(bytes: &[u8]) -> Result<ClientMsg, (ParseError, Option<String>)> {
    // Only an object is a request: serde would also read a JSON array positionally into `Wire`, an
    // undocumented second format tied to the order of its fields (found by the client_msg fuzz target).
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err((ParseError::BadJson, None));
    }
    let w: Wire = match serde_json::from_slice(bytes) {
        Ok(w) => w,
        Err(e) if e.is_data() => {
            // Valid JSON, wrong shape (a mistyped field, or not an object).
            return Err(match serde_json::from_slice::<serde_json::Value>(bytes) {
                Ok(v) if v.is_object() => {
                    let cid = v["client_id"].as_str().map(str::to_string);
                    // An unknown type is that, whatever its other fields hold.
                    let known = v["type"].as_str().is_some_and(|t| KNOWN_TYPES.contains(&t));
                    if known {
                        (ParseError::BadRequest(e.to_string()), cid)
                    } else {
                        (ParseError::UnknownType, cid)
                    }
                }
                _ => (ParseError::BadJson, None),
            });
        }
        Err(_) => return Err((ParseError::BadJson, None)),
    };
    let cid = w.client_id.clone();
    let ty = w.ty.as_deref().unwrap_or("");
    let m = (|| {
        Ok(match ty {
            "ping" => ClientMsg::Ping { id: w.id },
            "subscribe" => ClientMsg::Subscribe {
                channels: need(w.channels, "channels", ty)?,
                cursor: w.cursor.unwrap_or_default(),
            },
            "unsubscribe" => ClientMsg::Unsubscribe {
                channels: need(w.channels, "channels", ty)?,
            },
            "send" => ClientMsg::Send {
                conversation: need(w.conversation, "conversation", ty)?,
                client_id: need(w.client_id, "client_id", ty)?,
                body: need(w.body, "body", ty)?,
            },
            "ack" | "read" => {
                let conversation = need(w.conversation, "conversation", ty)?;
                let offset = need(w.offset, "offset", ty)?;
                if ty == "ack" {
                    ClientMsg::Ack {
                        conversation,
                        offset,
                    }
                } else {
                    ClientMsg::Read {
                        conversation,
                        offset,
                    }
                }
            }
            "history" => ClientMsg::History {
                conversation: need(w.conversation, "conversation", ty)?,
                before: w.before,
                limit: w.limit,
            },
            "refresh" => ClientMsg::Refresh {
                token: need(w.token, "token", ty)?,
            },
            "register_device" | "unregister_device" => {
                let platform = need(w.platform, "platform", ty)?;
                let token = need(w.token, "token", ty)?;
                check_device(&platform, &token)
                    .map_err(|e| ParseError::BadRequest(format!("{ty}: {e}")))?;
                if ty == "register_device" {
                    ClientMsg::RegisterDevice { platform, token }
                } else {
                    ClientMsg::UnregisterDevice { platform, token }
                }
            }
            _ => return Err(ParseError::UnknownType),
        })
    })();
    m.map_err(|e| (e, cid))
}

/// The `"stream"` field of a `POST /send` body (the SSE stream a `subscribe`, `unsubscribe` or `refresh` is
/// for), if it has one.
pub fn stream_of(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct S {
        stream: Option<String>,
    }
    serde_json::from_slice::<S>(bytes).ok()?.stream
}

/// `{"type":"welcome",…}`, the first frame on every WebSocket: who, where, and the liveness contract (the
/// server pings after `heartbeat_s` of silence and gives up `heartbeat_timeout_s` later; a client that sees
/// nothing for that long may presume the connection dead).
pub fn welcome(user: &str, node: &str, heartbeat_s: u64, heartbeat_timeout_s: u64) -> String {
    serde_json::json!({"type": "welcome", "user": user, "node": node, "heartbeat_s": heartbeat_s,
        "heartbeat_timeout_s": heartbeat_timeout_s})
    .to_string()
}

/// `{"type":"pong"}`, with the ping's `id` when it had one.
pub fn pong(id: Option<&str>) -> String {
    match id {
        Some(id) => serde_json::json!({"type": "pong", "id": id}).to_string(),
        None => r#"{"type":"pong"}"#.to_string(),
    }
}

/// `{"type":"error",…}` with `ref` = the client id when there is one.
pub fn error(code: &str, message: &str, reference: Option<&str>) -> String {
    let mut v = serde_json::json!({"type": "error", "code": code, "message": message});
    if let Some(r) = reference {
        v["ref"] = serde_json::Value::String(r.to_string());
    }
    v.to_string()
}

#[derive(Serialize)]
pub struct Sent<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub client_id: &'a str,
    pub conversation: &'a str,
    pub offset: u64,
    pub ts: u64,
}

/// A message on a channel. `body` is the client's JSON, passed through untouched.
#[derive(Serialize)]
pub struct Message<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub channel: &'a str,
    pub offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a str>,
    pub ts: u64,
    pub body: &'a RawValue,
}

#[derive(Serialize)]
pub struct Receipt<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub conversation: &'a str,
    pub offset: u64,
    pub state: &'static str,
    pub by: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_object_is_a_request() {
        let e = parse_client(br#"["history",null,null,"c1",null,null,null,7,null,null,null]"#);
        assert_eq!(e.unwrap_err().0, ParseError::BadJson);
        assert!(parse_client(b"  \n{\"type\":\"history\",\"conversation\":\"c1\"}").is_ok());
    }

    #[test]
    fn ping_with_and_without_id() {
        assert!(matches!(
            parse_client(br#"{"type":"ping","id":"x"}"#),
            Ok(ClientMsg::Ping { id: Some(ref i) }) if i == "x"
        ));
        assert!(matches!(
            parse_client(br#"{"type":"ping"}"#),
            Ok(ClientMsg::Ping { id: None })
        ));
        assert!(matches!(
            parse_client(br#"{"type":"ping","id":7}"#),
            Err((ParseError::BadRequest(_), None))
        ));
        let v: serde_json::Value = serde_json::from_str(&pong(Some("x"))).unwrap();
        assert_eq!(v, serde_json::json!({"type": "pong", "id": "x"}));
        assert_eq!(pong(None), r#"{"type":"pong"}"#);
    }

    #[test]
    fn an_unknown_type_is_unknown_whatever_its_other_fields() {
        // Found by the client_msg fuzz target: a mistyped known field used to win over the unknown type.
        let e = parse_client(br#"{"type":"nope","offset":"k1","client_id":"c"}"#).unwrap_err();
        assert_eq!(e, (ParseError::UnknownType, Some("c".to_string())));
        let e = parse_client(br#"{"type":"ack","offset":"k1"}"#).unwrap_err();
        assert!(matches!(e.0, ParseError::BadRequest(_)), "{e:?}");
    }

    #[test]
    fn parses_every_type() {
        let m = parse_client(
            br#"{"type":"send","conversation":"c1","client_id":"x","body":{"a":[1,2]}}"#,
        )
        .unwrap();
        match m {
            ClientMsg::Send { body, .. } => assert_eq!(body.get(), r#"{"a":[1,2]}"#),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_client(
                br#"{"type":"subscribe","channels":["scores:m42"],"cursor":{"scores:m42":7}}"#
            ),
            Ok(ClientMsg::Subscribe { .. })
        ));
        assert!(matches!(
            parse_client(br#"{"type":"ack","conversation":"c1","offset":3}"#),
            Ok(ClientMsg::Ack { offset: 3, .. })
        ));
        assert!(matches!(
            parse_client(br#"{"type":"history","conversation":"c1"}"#),
            Ok(ClientMsg::History { before: None, .. })
        ));
    }

    #[test]
    fn classifies_errors() {
        assert_eq!(parse_client(b"{nope").unwrap_err().0, ParseError::BadJson);
        assert_eq!(
            parse_client(br#"{"type":"dance"}"#).unwrap_err().0,
            ParseError::UnknownType
        );
        assert_eq!(parse_client(br#"[1]"#).unwrap_err().0, ParseError::BadJson);
        let (e, cid) =
            parse_client(br#"{"type":"send","client_id":"k1","conversation":5}"#).unwrap_err();
        assert_eq!(e.code(), "bad_request");
        assert_eq!(cid.as_deref(), Some("k1"));
    }

    #[test]
    fn error_carries_ref() {
        let v: serde_json::Value =
            serde_json::from_str(&error("not_member", "no", Some("k"))).unwrap();
        assert_eq!(v["ref"], "k");
        assert_eq!(v["code"], "not_member");
    }
}
