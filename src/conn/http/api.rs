//! The internal API's requests (`/api/...`, behind the API key): query strings and JSON bodies parsed into
//! `ApiRequest`s for the backplane. Pure: no connection, no context; a refusal is a 400 with the shape wanted.

use serde::Deserialize;

use super::{ErrorKind, HttpError};
use crate::backplane::ApiRequest;
use corelay_proto::http1::{Method, RequestHead};

fn bad(reason: &'static str) -> HttpError {
    HttpError::of(ErrorKind::BadRequest, reason)
}

/// `GET /api/history?conversation=…&before=…&limit=…`. The numbers are whole u64s (a number past u64, or
/// anything else, is a 400); `limit` is clamped by the router, here it only has to fit a usize.
pub fn history(head: &RequestHead) -> Result<ApiRequest, HttpError> {
    let conversation = head
        .query_param("conversation")
        .ok_or_else(|| bad("conversation= is required"))?;
    let number = |name: &str| -> Result<Option<u64>, HttpError> {
        head.query_param(name)
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| bad("before= and limit= must be numbers"))
    };
    let before = number("before")?;
    let limit = number("limit")?.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    Ok(ApiRequest::History {
        conversation,
        before,
        limit,
    })
}

/// The body of `POST /api/conversations`, `POST /api/publish`, `POST`/`DELETE /api/devices`; None for another
/// path.
pub fn body(path: &str, method: Method, body: &[u8]) -> Option<Result<ApiRequest, HttpError>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewConversation {
        id: String,
        members: Vec<String>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Publish {
        channel: String,
        body: Box<serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Device {
        user: String,
        platform: String,
        token: String,
        /// Accepted for the documented shape; one app (`--apns-topic`) per gateway for now.
        #[allow(dead_code)]
        app: Option<String>,
    }
    Some(match path {
        "/api/devices" => serde_json::from_slice::<Device>(body)
            .map(|d| ApiRequest::Device {
                register: method == Method::Post,
                user: d.user,
                platform: d.platform,
                token: d.token,
            })
            .map_err(|_| {
                bad("body must be {\"user\": \"…\", \"platform\": \"apns\"|\"fcm\", \"token\": \"…\"}")
            }),
        "/api/conversations" => serde_json::from_slice::<NewConversation>(body)
            .map(|c| ApiRequest::CreateConversation {
                id: c.id,
                members: c.members,
            })
            .map_err(|_| bad("body must be {\"id\": \"…\", \"members\": [\"…\"]}")),
        "/api/publish" => serde_json::from_slice::<Publish>(body)
            .map(|p| ApiRequest::Publish {
                channel: p.channel,
                body: p.body,
            })
            .map_err(|_| bad("body must be {\"channel\": \"…\", \"body\": …}")),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use corelay_proto::http1::{HeadLimits, parse_request};

    fn head(target: &str) -> RequestHead {
        let req = format!("GET {target} HTTP/1.1\r\n\r\n");
        let limits = HeadLimits {
            max_header_bytes: 4096,
            max_headers: 8,
        };
        parse_request(req.as_bytes(), &limits).unwrap().unwrap().0
    }

    fn history_of(target: &str) -> Result<(Option<u64>, Option<usize>), u16> {
        match history(&head(target)) {
            Ok(ApiRequest::History { before, limit, .. }) => Ok((before, limit)),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.status()),
        }
    }

    #[test]
    fn history_numbers_are_whole_u64s() {
        assert_eq!(history_of("/api/history"), Err(400));
        assert_eq!(history_of("/api/history?conversation=c1"), Ok((None, None)));
        assert_eq!(
            history_of("/api/history?conversation=c1&before=7&limit=20"),
            Ok((Some(7), Some(20)))
        );
        assert_eq!(
            history_of(&format!("/api/history?conversation=c1&before={}", u64::MAX)),
            Ok((Some(u64::MAX), None))
        );
        // One past u64::MAX is refused, not wrapped or truncated.
        assert_eq!(
            history_of("/api/history?conversation=c1&before=18446744073709551616"),
            Err(400)
        );
        assert_eq!(
            history_of("/api/history?conversation=c1&limit=18446744073709551616"),
            Err(400)
        );
        assert_eq!(
            history_of("/api/history?conversation=c1&limit=-1"),
            Err(400)
        );
        assert_eq!(history_of("/api/history?conversation=c1&limit=x"), Err(400));
    }

    #[test]
    fn bodies_have_their_shape_or_a_400() {
        let ok = body(
            "/api/publish",
            Method::Post,
            br#"{"channel":"scores:a","body":{"x":1}}"#,
        );
        assert!(matches!(ok, Some(Ok(ApiRequest::Publish { .. }))));
        let e = body("/api/publish", Method::Post, b"{}")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e.body(),
            r#"{"error":"body must be {\"channel\": \"…\", \"body\": …}","status":400}"#
        );
        let del = body(
            "/api/devices",
            Method::Delete,
            br#"{"user":"a","platform":"fcm","token":"t"}"#,
        );
        assert!(matches!(
            del,
            Some(Ok(ApiRequest::Device {
                register: false,
                ..
            }))
        ));
        assert!(body("/send", Method::Post, b"{}").is_none());
    }
}
