//! Cursors (text form), backoff with full jitter, client ids, query encoding.

use std::collections::BTreeMap;
use std::time::Duration;

/// Channel → last offset seen. Resuming from it yields exactly the messages after it.
pub type Cursor = BTreeMap<String, u64>;

/// Durable channels (`conversation:…`, `user:…`) resume at connect with `?cursor=`; topics resume through
/// `subscribe` with a cursor.
pub fn is_durable(channel: &str) -> bool {
    channel.starts_with("conversation:") || channel.starts_with("user:")
}

/// `{channel: offset}` → `channel=offset;…` (the text form of a cursor), keeping the channels `only` accepts.
pub fn cursor_text(cursor: &Cursor, only: impl Fn(&str) -> bool) -> String {
    cursor
        .iter()
        .filter(|(ch, _)| only(ch))
        .map(|(ch, off)| format!("{ch}={off}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// `channel=offset;…` → `{channel: offset}`; parts that do not parse are skipped.
pub fn parse_cursor(text: &str) -> Cursor {
    let mut out = Cursor::new();
    for part in text.split(';') {
        let Some(i) = part.rfind('=') else { continue };
        let digits = &part[i + 1..];
        if i > 0
            && (1..=16).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = digits.parse()
        {
            out.insert(part[..i].to_string(), n);
        }
    }
    out
}

/// Full jitter: `unit` (in `[0, 1)`) times `min(max, base * 2^attempt)`.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let cap = base.saturating_mul(1u32 << attempt.min(30)).min(max);
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

/// A random number in `[0, 1)` from the OS generator.
pub(crate) fn random_unit() -> f64 {
    let r = getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15);
    (r >> 11) as f64 / (1u64 << 53) as f64
}

/// A random client id for a send (128 bits, hex): the server dedupes retries by it.
pub(crate) fn client_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: time and a counter still make the id unique to this process.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b[..8].copy_from_slice(&t.to_be_bytes());
        b[8..].copy_from_slice(
            &N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_be_bytes(),
        );
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_text_round_trips() {
        let c: Cursor = [
            ("conversation:c1".to_string(), 118),
            ("scores:m42".to_string(), 7),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            cursor_text(&c, |_| true),
            "conversation:c1=118;scores:m42=7"
        );
        assert_eq!(parse_cursor(&cursor_text(&c, |_| true)), c);
        assert_eq!(cursor_text(&c, is_durable), "conversation:c1=118");
        let odd = parse_cursor("garbage;x=;=3;a:b=5;c=12345678901234567");
        assert_eq!(odd, [("a:b".to_string(), 5)].into_iter().collect());
    }

    #[test]
    fn backoff_is_full_jitter_and_bounded() {
        let ms = Duration::from_millis;
        let top = 0.999_999;
        assert_eq!(backoff_delay(0, ms(100), ms(1000), top).as_millis(), 99);
        assert_eq!(backoff_delay(3, ms(100), ms(1000), top).as_millis(), 799);
        assert_eq!(backoff_delay(40, ms(100), ms(1000), top).as_millis(), 999);
        assert_eq!(backoff_delay(5, ms(100), ms(1000), 0.0), Duration::ZERO);
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn client_ids_are_random_hex() {
        let (a, b) = (client_id(), client_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_eq!(enc("a=1;b c"), "a%3D1%3Bb%20c");
    }
}
