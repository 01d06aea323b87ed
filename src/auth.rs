//! Client tokens (JWT HS256, `sub` = user id) and the internal API key.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const SECRET_FILE: &str = "auth-secret";
pub const API_KEY_FILE: &str = "api-key";
/// Shortest operator secret (`--auth-secret`, `--api-key`, or the files in the data dir) we accept: HS256
/// keys shorter than the hash output (RFC 7518 §3.2) and short API keys are guessable.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest user id we accept in a token (ids travel in every message and key).
pub const MAX_USER_LEN: usize = corelay_proto::cursor::MAX_ID_LEN;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
}

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("expired token")]
    Expired,
    #[error("token subject is not a valid user id")]
    BadSubject,
}

/// Verifies tokens on the event loops (one HMAC-SHA256 per connection open; no I/O).
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Set only for the demo (`--demo`): the gateway may mint tokens itself.
    signer: Option<EncodingKey>,
}

impl Verifier {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` means the same on every transport: an open connection is closed at `exp` (not later), so a
        // new request is refused from `exp` on too.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            signer: None,
        }
    }

    /// A verifier that may also mint tokens (`--demo` only: anyone may then become anyone).
    pub fn with_minting(secret: &str) -> Self {
        Verifier {
            signer: Some(EncodingKey::from_secret(secret.as_bytes())),
            ..Verifier::new(secret)
        }
    }

    /// A token for `user` valid for `ttl`, if this verifier may mint (`with_minting`).
    pub fn mint(&self, user: &str, ttl: Duration) -> Option<String> {
        let key = self.signer.as_ref()?;
        let now = unix_now();
        let claims = Claims {
            sub: user.to_string(),
            iat: now,
            exp: now + ttl.as_secs().max(1),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).ok()
    }

    /// Returns the user id (`sub`) of a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.verify_until(token).map(|(sub, _)| sub)
    }

    /// Returns the user id (`sub`) and the expiry (`exp`, Unix seconds) of a valid, unexpired token.
    pub fn verify_until(&self, token: &str) -> Result<(String, u64), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            },
        )?;
        let sub = data.claims.sub;
        if !valid_id(&sub) {
            return Err(AuthError::BadSubject);
        }
        Ok((sub, data.claims.exp))
    }
}

pub use corelay_proto::cursor::valid_id;

/// Mints a token for `user`, valid for `ttl`.
pub fn mint(
    secret: &str,
    user: &str,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = unix_now();
    let claims = Claims {
        sub: user.to_string(),
        iat: now,
        exp: now + ttl.as_secs().max(1),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Loop milliseconds (`now_ms` on the clock of `now_loop_ms`) at which a token with `exp` (Unix seconds)
/// expires.
pub fn expiry_ms(exp: u64, now_loop_ms: u64) -> u64 {
    let left_s = exp.saturating_sub(unix_now());
    now_loop_ms.saturating_add(left_s.saturating_mul(1000))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a secret came from, so `main` can tell the operator.
#[derive(Debug, PartialEq, Eq)]
pub enum SecretSource {
    Given,
    Loaded(PathBuf),
    Generated(PathBuf),
}

/// Uses `given` if set; otherwise reads `data_dir/name`, or generates 32 random bytes (hex) into it (mode 0600).
/// A given or stored secret shorter than [`MIN_SECRET_BYTES`] is refused with an error that says which.
pub fn resolve_secret(
    given: Option<&str>,
    data_dir: &Path,
    name: &str,
) -> std::io::Result<(String, SecretSource)> {
    let too_short = |what: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{what} is shorter than {MIN_SECRET_BYTES} bytes; use a longer random value \
                 (e.g. `openssl rand -hex 32`), or leave it unset to have one generated in the data dir"
            ),
        )
    };
    if let Some(s) = given.filter(|s| !s.is_empty()) {
        if s.len() < MIN_SECRET_BYTES {
            return Err(too_short(format!("the given {name}")));
        }
        return Ok((s.to_string(), SecretSource::Given));
    }
    let path = data_dir.join(name);
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            if s.len() < MIN_SECRET_BYTES {
                return Err(too_short(format!("{}", path.display())));
            }
            return Ok((s, SecretSource::Loaded(path)));
        }
    }
    std::fs::create_dir_all(data_dir)?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &hex)?;
    Ok((hex, SecretSource::Generated(path)))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")
}

/// Constant-time comparison for the API key.
pub fn key_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_and_verify() {
        let t = mint("s3cret", "alice", Duration::from_secs(60)).unwrap();
        let v = Verifier::new("s3cret");
        assert_eq!(v.verify(&t).unwrap(), "alice");
        assert_eq!(Verifier::new("other").verify(&t), Err(AuthError::Invalid));
        assert_eq!(v.verify("not.a.token"), Err(AuthError::Invalid));
    }

    #[test]
    fn expired_is_refused() {
        let claims = Claims {
            sub: "bob".into(),
            iat: 1,
            exp: 2,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert_eq!(Verifier::new("k").verify(&t), Err(AuthError::Expired));
    }

    #[test]
    fn ids() {
        assert!(valid_id("alice_01@x.y-z"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id("a:b"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[test]
    fn secret_is_generated_once() {
        let dir = std::env::temp_dir().join(format!("corelay-auth-{}", std::process::id()));
        let (a, src) = resolve_secret(None, &dir, SECRET_FILE).unwrap();
        assert!(matches!(src, SecretSource::Generated(_)));
        let (b, src) = resolve_secret(None, &dir, SECRET_FILE).unwrap();
        assert!(matches!(src, SecretSource::Loaded(_)));
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn short_secrets_are_refused_given_or_stored() {
        let dir = std::env::temp_dir().join(format!("corelay-auth-short-{}", std::process::id()));
        let e = resolve_secret(Some("s3cret"), &dir, SECRET_FILE).unwrap_err();
        assert!(e.to_string().contains("shorter than 32 bytes"), "{e}");
        let long = "x".repeat(MIN_SECRET_BYTES);
        assert!(resolve_secret(Some(&long), &dir, API_KEY_FILE).is_ok());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(API_KEY_FILE), "short\n").unwrap();
        let e = resolve_secret(None, &dir, API_KEY_FILE).unwrap_err();
        assert!(e.to_string().contains(API_KEY_FILE), "names the file: {e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn api_key_compare() {
        assert!(key_matches("abc", "abc"));
        assert!(!key_matches("abc", "abd"));
        assert!(!key_matches("abc", "ab"));
    }
}
