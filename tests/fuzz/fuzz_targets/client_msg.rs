//! Arbitrary bytes into the client request parser (`corelay_proto::msg::parse_client`).
//!
//! The target is a full model of the parser for every input that `serde_json::Value` accepts, and checks
//! the ids for the rest. Properties:
//! - never panics; `BadJson` never carries a `client_id`; anything but `BadJson` needs input whose first
//!   non-whitespace byte is `{`;
//! - when the input parses as a `serde_json::Value` (the reference), the result is exactly what the
//!   reference predicts:
//!   - an object whose `type` is missing, `null`, mistyped or not one of subscribe, unsubscribe, send, ack,
//!     read, history, refresh, register_device, unregister_device is `UnknownType`, whatever its other
//!     fields hold, carrying its `client_id` string;
//!   - an object of a known type with a known field mistyped (a `cursor` entry included, even one whose key
//!     is repeated later, which `Value` hides by keeping the last), or a known field given twice (serde's
//!     `duplicate field`, hidden the same way; the last `type` decides whether it is known), is
//!     `BadRequest` carrying the object's `client_id`;
//!   - a well-typed object of a known type lacking a required field (or giving it as `null`) is
//!     `BadRequest("{type}: missing field \"{field}\"")` naming the first one missing, with its `client_id`;
//!     a device request checks in order: `platform` present, `platform` is `apns` or `fcm`, `token`
//!     present, `token` 1..=`MAX_DEVICE_TOKEN` printable ASCII bytes, each with its own `BadRequest`;
//!   - otherwise it is `Ok`, and every field of the message (`type`, `conversation`, `client_id`,
//!     `channels`, `cursor`, `offset`, `before`, `limit`, `token`, `platform`) equals the reference's;
//!     `body` is the input's own text, verbatim, and parses to the reference's `body`;
//!   - anything that is not an object is `BadJson` (a JSON array too: serde's positional struct form is
//!     refused since finding 2 of `docs/FUZZING.md` was fixed);
//! - when the reference rejects the input but the parser does not (serde_json skips unknown fields and
//!   `body` without checking them: lone surrogates, invalid UTF-8 inside their strings, numbers out of
//!   f64 range), a mirror struct with the parser's field layout gives the same `type`, `conversation`,
//!   `client_id`, `token` and `platform`;
//! - every `Ok` message re-serialised as a canonical JSON object parses back to the same message.
//!
//! Seeds: `tests/fuzz/seeds/client_msg/`; run with
//! `cargo fuzz run --fuzz-dir tests/fuzz client_msg tests/fuzz/corpus/client_msg tests/fuzz/seeds/client_msg`
//! (the first directory receives new inputs: keep it the git-ignored corpus; see `docs/FUZZING.md`).
#![no_main]

use std::collections::BTreeMap;
use std::fmt;

use corelay_proto::msg::{ClientMsg, MAX_DEVICE_TOKEN, ParseError, parse_client};
use libfuzzer_sys::fuzz_target;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The request's fields, in the order the parser declares them.
const FIELDS: [&str; N] = [
    "type",
    "channels",
    "cursor",
    "conversation",
    "client_id",
    "body",
    "offset",
    "before",
    "limit",
    "token",
    "platform",
];
const N: usize = 11;
const TYPE: usize = 0;
const CHANNELS: usize = 1;
const CURSOR: usize = 2;
const CONVERSATION: usize = 3;
const CLIENT_ID: usize = 4;
const BODY: usize = 5;
const OFFSET: usize = 6;
const BEFORE: usize = 7;
const LIMIT: usize = 8;
const TOKEN: usize = 9;
const PLATFORM: usize = 10;

/// Required fields per known type, in the order the parser asks for them.
fn required(ty: &str) -> Option<&'static [usize]> {
    Some(match ty {
        "subscribe" | "unsubscribe" => &[CHANNELS],
        "send" => &[CONVERSATION, CLIENT_ID, BODY],
        "ack" | "read" => &[CONVERSATION, OFFSET],
        "history" => &[CONVERSATION],
        "refresh" => &[TOKEN],
        "register_device" | "unregister_device" => &[PLATFORM, TOKEN],
        _ => return None,
    })
}

/// Whether a present (non-null) value has the JSON type the parser wants for field `i` (`data`: the
/// whole input, for `cursor`).
fn well_typed(i: usize, v: &Value, data: &[u8]) -> bool {
    match i {
        TYPE | CONVERSATION | CLIENT_ID | TOKEN | PLATFORM => v.is_string(),
        CHANNELS => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        // `Value` keeps the last of repeated keys, the parser's map reads them all: `{"a":"x","a":1}`
        // is mistyped. The mirror reads the cursor with the parser's type.
        CURSOR => v.is_object() && serde_json::from_slice::<CursorMirror>(data).is_ok(),
        BODY => true,
        OFFSET | BEFORE => v.as_u64().is_some(),
        LIMIT => v.as_u64().is_some_and(|n| usize::try_from(n).is_ok()),
        _ => unreachable!(),
    }
}

/// The top-level keys of a JSON object in input order, repeats kept (`Value` keeps only the last).
struct Keys(Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// Same field layout as the parser's, only the ids typed: for inputs `Value` refuses.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Ids {
    #[serde(rename = "type")]
    ty: Option<String>,
    channels: Option<IgnoredAny>,
    cursor: Option<IgnoredAny>,
    conversation: Option<String>,
    client_id: Option<String>,
    body: Option<IgnoredAny>,
    offset: Option<IgnoredAny>,
    before: Option<IgnoredAny>,
    limit: Option<IgnoredAny>,
    token: Option<String>,
    platform: Option<String>,
}

/// Same field layout as the parser's, only `cursor` typed: whether the cursor is well-typed, repeated
/// keys included (checked where no known field is repeated).
#[derive(Deserialize)]
#[allow(dead_code)]
struct CursorMirror {
    #[serde(rename = "type")]
    ty: Option<IgnoredAny>,
    channels: Option<IgnoredAny>,
    cursor: Option<BTreeMap<String, u64>>,
    conversation: Option<IgnoredAny>,
    client_id: Option<IgnoredAny>,
    body: Option<IgnoredAny>,
    offset: Option<IgnoredAny>,
    before: Option<IgnoredAny>,
    limit: Option<IgnoredAny>,
    token: Option<IgnoredAny>,
    platform: Option<IgnoredAny>,
}

/// A message in the canonical object form.
#[derive(Serialize, Default)]
struct Out<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<&'a BTreeMap<String, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conversation: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<&'a str>,
}

fn type_name(m: &ClientMsg) -> &'static str {
    match m {
        ClientMsg::Subscribe { .. } => "subscribe",
        ClientMsg::Unsubscribe { .. } => "unsubscribe",
        ClientMsg::Send { .. } => "send",
        ClientMsg::Ack { .. } => "ack",
        ClientMsg::Read { .. } => "read",
        ClientMsg::History { .. } => "history",
        ClientMsg::Refresh { .. } => "refresh",
        ClientMsg::RegisterDevice { .. } => "register_device",
        ClientMsg::UnregisterDevice { .. } => "unregister_device",
    }
}

fn canonical(m: &ClientMsg) -> String {
    let mut o = Out {
        ty: type_name(m),
        ..Out::default()
    };
    match m {
        ClientMsg::Subscribe { channels, cursor } => {
            o.channels = Some(channels);
            o.cursor = Some(cursor);
        }
        ClientMsg::Unsubscribe { channels } => o.channels = Some(channels),
        ClientMsg::Send {
            conversation,
            client_id,
            body,
        } => {
            o.conversation = Some(conversation);
            o.client_id = Some(client_id);
            o.body = Some(body);
        }
        ClientMsg::Ack {
            conversation,
            offset,
        }
        | ClientMsg::Read {
            conversation,
            offset,
        } => {
            o.conversation = Some(conversation);
            o.offset = Some(*offset);
        }
        ClientMsg::History {
            conversation,
            before,
            limit,
        } => {
            o.conversation = Some(conversation);
            o.before = *before;
            o.limit = *limit;
        }
        ClientMsg::Refresh { token } => o.token = Some(token),
        ClientMsg::RegisterDevice { platform, token }
        | ClientMsg::UnregisterDevice { platform, token } => {
            o.platform = Some(platform);
            o.token = Some(token);
        }
    }
    serde_json::to_string(&o).expect("serialises")
}

/// A field's value when present and not `null` (the parser reads `null` as absent).
fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

fn string(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
}

fn strings(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Checks an `Ok` message field by field against the reference's fields (present and non-null).
fn check_ok(m: &ClientMsg, f: &[Option<&Value>; N], input: &str) {
    assert_eq!(Some(type_name(m)), string(f[TYPE]), "type");
    let conv = |c: &str| assert_eq!(Some(c), string(f[CONVERSATION]), "conversation");
    match m {
        ClientMsg::Subscribe { channels, cursor } => {
            assert_eq!(channels, &strings(f[CHANNELS]), "channels");
            let want: BTreeMap<String, u64> = f[CURSOR]
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(cursor, &want, "cursor");
        }
        ClientMsg::Unsubscribe { channels } => {
            assert_eq!(channels, &strings(f[CHANNELS]), "channels")
        }
        ClientMsg::Send {
            conversation,
            client_id,
            body,
        } => {
            conv(conversation);
            assert_eq!(Some(client_id.as_str()), string(f[CLIENT_ID]), "client_id");
            assert!(input.contains(body.get()), "body passed through verbatim");
            let b: Value = serde_json::from_str(body.get()).expect("body is JSON");
            assert_eq!(Some(&b), f[BODY], "body");
        }
        ClientMsg::Ack {
            conversation,
            offset,
        }
        | ClientMsg::Read {
            conversation,
            offset,
        } => {
            conv(conversation);
            assert_eq!(Some(*offset), f[OFFSET].and_then(Value::as_u64), "offset");
        }
        ClientMsg::History {
            conversation,
            before,
            limit,
        } => {
            conv(conversation);
            assert_eq!(*before, f[BEFORE].and_then(Value::as_u64), "before");
            assert_eq!(
                *limit,
                f[LIMIT].and_then(Value::as_u64).map(|n| n as usize),
                "limit"
            );
        }
        ClientMsg::Refresh { token } => {
            assert_eq!(Some(token.as_str()), string(f[TOKEN]), "token")
        }
        ClientMsg::RegisterDevice { platform, token }
        | ClientMsg::UnregisterDevice { platform, token } => {
            assert_eq!(Some(platform.as_str()), string(f[PLATFORM]), "platform");
            assert_eq!(Some(token.as_str()), string(f[TOKEN]), "token");
        }
    }
}

/// Why a well-typed device request is refused, if it is (the parser's checks, in its order).
fn device_refusal(ty: &str, platform: Option<&str>, token: Option<&str>) -> Option<String> {
    let missing = |field: &str| Some(format!("{ty}: missing field \"{field}\""));
    let Some(platform) = platform else {
        return missing("platform");
    };
    if platform != "apns" && platform != "fcm" {
        return Some(format!("{ty}: platform is \"apns\" or \"fcm\""));
    }
    let Some(token) = token else {
        return missing("token");
    };
    if token.is_empty()
        || token.len() > MAX_DEVICE_TOKEN
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Some(format!(
            "{ty}: token is 1..={MAX_DEVICE_TOKEN} printable ASCII bytes"
        ));
    }
    None
}

/// What the parser must do with fields that are all well-typed (`f`: present and non-null only).
fn check_typed(
    r: &Result<ClientMsg, (ParseError, Option<String>)>,
    f: &[Option<&Value>; N],
    input: &str,
) {
    let cid = string(f[CLIENT_ID]).map(str::to_string);
    let ty = string(f[TYPE]).unwrap_or("");
    let Some(req) = required(ty) else {
        assert_eq!(r.as_ref().err(), Some(&(ParseError::UnknownType, cid)));
        return;
    };
    let refusal = if matches!(ty, "register_device" | "unregister_device") {
        device_refusal(ty, string(f[PLATFORM]), string(f[TOKEN]))
    } else {
        req.iter()
            .find(|&&i| f[i].is_none())
            .map(|&i| format!("{ty}: missing field \"{}\"", FIELDS[i]))
    };
    if let Some(want) = refusal {
        assert_eq!(r.as_ref().err(), Some(&(ParseError::BadRequest(want), cid)));
        return;
    }
    match r {
        Ok(m) => check_ok(m, f, input),
        Err(e) => panic!("well-typed complete {ty:?} refused: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let r = parse_client(data);
    match &r {
        Err((ParseError::BadJson, cid)) => assert_eq!(cid, &None, "BadJson carries no client_id"),
        _ => assert_eq!(
            data.trim_ascii_start().first(),
            Some(&b'{'),
            "only an object is a request"
        ),
    }

    match serde_json::from_slice::<Value>(data) {
        Ok(v) => {
            // `Value` accepted it, so it is UTF-8.
            let input = std::str::from_utf8(data).expect("JSON text is UTF-8");
            match &v {
                Value::Object(o) => {
                    let keys = serde_json::from_slice::<Keys>(data).expect("object keys").0;
                    let repeated = FIELDS
                        .iter()
                        .any(|name| keys.iter().filter(|k| k == name).count() > 1);
                    let f: [Option<&Value>; N] = FIELDS.map(|name| present(o.get(name)));
                    let mistyped = (0..N).any(|i| f[i].is_some_and(|x| !well_typed(i, x, data)));
                    let cid = v["client_id"].as_str().map(str::to_string);
                    if v["type"].as_str().is_none_or(|t| required(t).is_none()) {
                        // Unknown whatever the other fields hold (mistyped or repeated ones too).
                        assert_eq!(r.as_ref().err(), Some(&(ParseError::UnknownType, cid)));
                    } else if repeated || mistyped {
                        match &r {
                            Err((ParseError::BadRequest(_), c)) => assert_eq!(c, &cid),
                            other => panic!("mistyped or repeated field not refused: {other:?}"),
                        }
                    } else {
                        check_typed(&r, &f, input);
                    }
                }
                _ => assert_eq!(
                    r.as_ref().err(),
                    Some(&(ParseError::BadJson, None)),
                    "not an object"
                ),
            }
        }
        Err(_) => {
            // Only the parser's lenient skipping can accept what `Value` refuses: the request's own
            // fields were read, so the mirror reads them too.
            if !matches!(r, Err((ParseError::BadJson, _))) {
                let ids: Ids =
                    serde_json::from_slice(data).expect("mirror parses what the parser did");
                match &r {
                    Ok(m) => {
                        assert_eq!(Some(type_name(m)), ids.ty.as_deref());
                        match m {
                            ClientMsg::Send {
                                conversation,
                                client_id,
                                ..
                            } => {
                                assert_eq!(Some(conversation), ids.conversation.as_ref());
                                assert_eq!(Some(client_id), ids.client_id.as_ref());
                            }
                            ClientMsg::Ack { conversation, .. }
                            | ClientMsg::Read { conversation, .. }
                            | ClientMsg::History { conversation, .. } => {
                                assert_eq!(Some(conversation), ids.conversation.as_ref())
                            }
                            ClientMsg::Refresh { token } => {
                                assert_eq!(Some(token), ids.token.as_ref())
                            }
                            ClientMsg::RegisterDevice { platform, token }
                            | ClientMsg::UnregisterDevice { platform, token } => {
                                assert_eq!(Some(platform), ids.platform.as_ref());
                                assert_eq!(Some(token), ids.token.as_ref());
                            }
                            ClientMsg::Subscribe { .. } | ClientMsg::Unsubscribe { .. } => {}
                        }
                    }
                    Err((e, cid)) => {
                        assert_eq!(cid, &ids.client_id, "client_id on error");
                        let ty = ids.ty.as_deref().unwrap_or("");
                        match e {
                            ParseError::UnknownType => assert!(required(ty).is_none()),
                            ParseError::BadRequest(msg) => {
                                assert!(required(ty).is_some());
                                assert!(msg.starts_with(&format!("{ty}: ")), "{msg}");
                            }
                            ParseError::BadJson => unreachable!(),
                        }
                    }
                }
            }
        }
    }

    if let Ok(m) = &r {
        let text = canonical(m);
        match parse_client(text.as_bytes()) {
            Ok(back) => assert_eq!(format!("{back:?}"), format!("{m:?}"), "{text}"),
            Err(e) => panic!("canonical form {text} refused: {e:?}"),
        }
    }
});
