//! Who is asking: a client's token (`Authorization: Bearer` or `?token=`), or the internal API's key.

use std::sync::Arc;

use super::super::Cx;
use super::{ErrorKind, HttpError};
use corelay_proto::http1::RequestHead;

/// The user of a client request's token, and the loop ms at which the token expires.
pub fn user(head: &RequestHead, cx: &Cx<'_>) -> Result<(Arc<str>, u64), HttpError> {
    let verified = match head.bearer_token() {
        None => Err(crate::auth::AuthError::Missing),
        Some(t) => cx.env.verifier().verify_until(&t),
    };
    verified
        .map(|(user, exp)| (Arc::from(user), crate::auth::expiry_ms(exp, cx.now_ms)))
        .map_err(|e| {
            tracing::debug!(worker = cx.id(), conn = cx.me.index, error = %e, "unauthorized");
            HttpError::of(
                ErrorKind::Unauthorized,
                match e {
                    crate::auth::AuthError::Missing => {
                        "missing token (Authorization: Bearer or ?token=)"
                    }
                    crate::auth::AuthError::Expired => "expired token",
                    _ => "invalid token",
                },
            )
        })
}

/// The internal API's key (`Authorization: Bearer KEY`), compared in constant time.
pub fn api_key(head: &RequestHead, cx: &Cx<'_>) -> Result<(), HttpError> {
    let given = head
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .ok_or_else(|| {
            HttpError::of(
                ErrorKind::Unauthorized,
                "missing API key (Authorization: Bearer KEY)",
            )
        })?;
    if crate::auth::key_matches(cx.env.api_key(), given.trim()) {
        Ok(())
    } else {
        Err(HttpError::of(ErrorKind::Unauthorized, "invalid API key"))
    }
}
