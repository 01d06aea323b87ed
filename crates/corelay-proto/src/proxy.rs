//! The PROXY protocol, versions 1 (text) and 2 (binary), as HAProxy specifies it in "The PROXY protocol".
//!
//! An L4 load balancer that terminates nothing still hides the client's address: the gateway sees the
//! balancer's. With the PROXY protocol the balancer sends one header before the client's bytes, carrying the
//! original source and destination. [`parse`] is sans-IO: it looks at the first bytes of a connection, says
//! `Ok(None)` while the header is incomplete, and otherwise returns the header and how many bytes it took.
//! Whatever follows belongs to HTTP.
//!
//! Strictness, on the receiving side:
//! - The header is mandatory once configured: a connection that starts with neither `"PROXY "` nor the v2
//!   signature fails with "missing PROXY header" as soon as the bytes present rule both out (after 1 to 6
//!   bytes for a plain `GET ` request), rather than waiting for more.
//! - v1: exactly `PROXY <TCP4|TCP6> <src> <dst> <sport> <dport>\r\n`, single spaces, at most 107 bytes
//!   including the CRLF, or `PROXY UNKNOWN` followed by anything printable up to the CRLF. Addresses must be
//!   of the announced family. Leading zeros are **rejected**, in ports (`"0"` itself is fine) and in IPv4
//!   octets (`01.2.3.4`), since a conforming sender never emits them. Only printable ASCII may appear before
//!   the CRLF, and a bare CR or LF fails at once.
//! - v2: the 12-byte signature, version 2, command LOCAL or PROXY, then family/protocol. LOCAL (health checks
//!   from the balancer itself) is [`ProxyHeader::Local`] whatever the family. PROXY with `AF_UNSPEC` (0x00)
//!   is `Local`; with TCP over IPv4 (0x11) or IPv6 (0x21) it carries addresses; anything else (UDP, AF_UNIX,
//!   undefined values) is "unsupported address family". The length covers the addresses and any TLVs, which
//!   are skipped unread; a length too small for the address block is an error, and so is a header longer
//!   than [`MAX_V2_LEN`] in all (the spec allows 16 + 65535 bytes, but no balancer we talk to sends more
//!   than a few hundred).
//! - Errors are final: once `parse` fails on some bytes, it fails on any longer buffer starting with them.
//!
//! About 290 lines of parser and encoders; the rest of the file is their tests.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyHeader {
    /// Addresses of the original connection, as the balancer saw it.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v1 `PROXY UNKNOWN`, or v2 LOCAL command / `AF_UNSPEC`: keep the socket's own addresses.
    Local,
}

/// A header the gateway refuses; the connection should be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("PROXY protocol: {0}")]
pub struct ProxyError(pub &'static str);

/// The v2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 header, CRLF included (from the spec).
pub const MAX_V1_LEN: usize = 107;

/// The longest v2 header accepted, fixed 16 bytes, addresses and TLVs included.
pub const MAX_V2_LEN: usize = 4096;

const V1_PREFIX: &[u8; 6] = b"PROXY ";
const V2_FIXED_LEN: usize = 16;
const V2_IPV4_LEN: usize = 12;
const V2_IPV6_LEN: usize = 36;

/// Parses a PROXY header (v1 or v2) at the start of `buf`.
///
/// `Ok(None)`: the bytes so far are a valid start of a header, more are needed. `Ok(Some((header, n)))`: the
/// header took the first `n` bytes; the rest belong to HTTP. `Err`: not a header we accept (final).
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first == V1_PREFIX[0] {
        check_prefix(buf, V1_PREFIX)?;
        if buf.len() < V1_PREFIX.len() {
            return Ok(None);
        }
        parse_v1(buf)
    } else if first == V2_SIGNATURE[0] {
        check_prefix(buf, &V2_SIGNATURE)?;
        if buf.len() < V2_SIGNATURE.len() {
            return Ok(None);
        }
        parse_v2(buf)
    } else {
        Err(ProxyError("missing PROXY header"))
    }
}

/// Fails unless the bytes present agree with `prefix`.
fn check_prefix(buf: &[u8], prefix: &[u8]) -> Result<(), ProxyError> {
    let n = buf.len().min(prefix.len());
    if buf[..n] == prefix[..n] {
        Ok(())
    } else {
        Err(ProxyError("missing PROXY header"))
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    // Find the CRLF within the first 107 bytes, failing early on bytes no valid header contains.
    let window = &buf[..buf.len().min(MAX_V1_LEN)];
    let mut end = None;
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => match window.get(i + 1) {
                Some(b'\n') => {
                    end = Some(i);
                    break;
                }
                Some(_) => return Err(ProxyError("v1: bare CR")),
                None => {}
            },
            b'\n' => return Err(ProxyError("v1: bare LF")),
            0x20..=0x7e => {}
            _ => return Err(ProxyError("v1: non-printable byte")),
        }
    }
    let Some(end) = end else {
        return if buf.len() >= MAX_V1_LEN {
            Err(ProxyError("v1: no CRLF within 107 bytes"))
        } else {
            Ok(None)
        };
    };
    // The window was all printable ASCII up to the CRLF.
    let line =
        std::str::from_utf8(&buf[V1_PREFIX.len()..end]).map_err(|_| ProxyError("v1: not ASCII"))?;
    let consumed = end + 2;

    if let Some(rest) = line.strip_prefix("UNKNOWN") {
        // The spec: the receiver ignores anything after UNKNOWN up to the CRLF.
        return if rest.is_empty() || rest.starts_with(' ') {
            Ok(Some((ProxyHeader::Local, consumed)))
        } else {
            Err(ProxyError("v1: bad protocol"))
        };
    }

    let mut fields = line.split(' ');
    let (Some(proto), Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError("v1: wrong number of fields"));
    };
    let (source_ip, destination_ip) = match proto {
        "TCP4" => (IpAddr::V4(parse_v4(src)?), IpAddr::V4(parse_v4(dst)?)),
        "TCP6" => (IpAddr::V6(parse_v6(src)?), IpAddr::V6(parse_v6(dst)?)),
        _ => return Err(ProxyError("v1: bad protocol")),
    };
    let source = SocketAddr::new(source_ip, parse_port(sport)?);
    let destination = SocketAddr::new(destination_ip, parse_port(dport)?);
    Ok(Some((
        ProxyHeader::Proxied {
            source,
            destination,
        },
        consumed,
    )))
}

fn parse_v4(s: &str) -> Result<Ipv4Addr, ProxyError> {
    // std's parser already rejects leading zeros in octets, signs and other forms.
    s.parse().map_err(|_| ProxyError("v1: bad IPv4 address"))
}

fn parse_v6(s: &str) -> Result<Ipv6Addr, ProxyError> {
    s.parse().map_err(|_| ProxyError("v1: bad IPv6 address"))
}

fn parse_port(s: &str) -> Result<u16, ProxyError> {
    let digits_only = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (s.len() > 1 && s.starts_with('0')) {
        return Err(ProxyError("v1: bad port"));
    }
    s.parse().map_err(|_| ProxyError("v1: bad port"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    // Validate each fixed byte as soon as it is present, so garbage fails without waiting.
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(None);
    };
    if ver_cmd >> 4 != 0x2 {
        return Err(ProxyError("v2: unsupported version"));
    }
    let local = match ver_cmd & 0x0f {
        0x0 => true,
        0x1 => false,
        _ => return Err(ProxyError("v2: unsupported command")),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // LOCAL: the receiver must accept the connection and ignore the protocol block, family included.
    let addr_len = match (local, family) {
        (true, _) | (false, 0x00) => 0,
        (false, 0x11) => V2_IPV4_LEN,
        (false, 0x21) => V2_IPV6_LEN,
        (false, _) => return Err(ProxyError("unsupported address family")),
    };
    if buf.len() < V2_FIXED_LEN {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len < addr_len {
        return Err(ProxyError("v2: length too small for the addresses"));
    }
    let total = V2_FIXED_LEN + len;
    if total > MAX_V2_LEN {
        return Err(ProxyError("v2: header too long"));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let a = &buf[V2_FIXED_LEN..V2_FIXED_LEN + addr_len];
    let header = match addr_len {
        V2_IPV4_LEN => {
            let ip = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
            ProxyHeader::Proxied {
                source: SocketAddr::V4(SocketAddrV4::new(ip(0), be16(a, 8))),
                destination: SocketAddr::V4(SocketAddrV4::new(ip(4), be16(a, 10))),
            }
        }
        V2_IPV6_LEN => {
            let ip = |o: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[o..o + 16]);
                Ipv6Addr::from(octets)
            };
            ProxyHeader::Proxied {
                source: SocketAddr::V6(SocketAddrV6::new(ip(0), be16(a, 32), 0, 0)),
                destination: SocketAddr::V6(SocketAddrV6::new(ip(16), be16(a, 34), 0, 0)),
            }
        }
        _ => ProxyHeader::Local,
    };
    // TLVs (if any) fill the rest of `len`; nothing here needs them.
    Ok(Some((header, total)))
}

fn be16(a: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([a[o], a[o + 1]])
}

/// `ip` as IPv6: an IPv4 address becomes its IPv4-mapped form `::ffff:a.b.c.d`.
fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A v1 header for a TCP connection from `source` to `destination`. A header carries one family, so mixed
/// families are sent as `TCP6` with the IPv4 side mapped (`::ffff:a.b.c.d`); IPv6 flow info and scope ids are
/// not carried.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (sport, dport) = (source.port(), destination.port());
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => format!("PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
        (s, d) => format!("PROXY TCP6 {} {} {sport} {dport}\r\n", as_v6(s), as_v6(d)),
    }
    .into_bytes()
}

/// A v2 header (PROXY command, TCP, no TLVs) for a connection from `source` to `destination`. Mixed
/// families are sent as IPv6 with the IPv4 side mapped; IPv6 flow info and scope ids are not carried.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + V2_IPV6_LEN);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // TCP over IPv4
            out.extend_from_slice(&(V2_IPV4_LEN as u16).to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21); // TCP over IPv6
            out.extend_from_slice(&(V2_IPV6_LEN as u16).to_be_bytes());
            out.extend_from_slice(&as_v6(s).octets());
            out.extend_from_slice(&as_v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            source: sa(source),
            destination: sa(destination),
        }
    }

    /// A v2 header with the given version/command and family bytes and `body` (addresses and TLVs).
    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        v2_len(ver_cmd, family, body.len() as u16, body)
    }

    fn v2_len(ver_cmd: u8, family: u8, len: u16, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(family);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    const V4_BODY: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 0, 111, 0, 222];

    fn v6_body() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        b.extend_from_slice(&443u16.to_be_bytes());
        b.extend_from_slice(&8080u16.to_be_bytes());
        b
    }

    /// TLVs: PP2_TYPE_ALPN "h2", PP2_TYPE_AUTHORITY "example.com", PP2_TYPE_NOOP with 3 bytes.
    fn tlvs() -> Vec<u8> {
        let mut t = vec![0x01, 0x00, 0x02];
        t.extend_from_slice(b"h2");
        t.extend_from_slice(&[0x02, 0x00, 11]);
        t.extend_from_slice(b"example.com");
        t.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]);
        t
    }

    /// (input, expected header, expected consumed length).
    fn valid_cases() -> Vec<(Vec<u8>, ProxyHeader, usize)> {
        let max_v6 = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        let unknown_107 = format!("PROXY UNKNOWN {}\r\n", "x".repeat(107 - 16));
        let with_tlvs = [V4_BODY.as_slice(), &tlvs()].concat();
        let mut cases: Vec<(Vec<u8>, ProxyHeader, usize)> = vec![
            // v1
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\r\n".to_vec(),
                proxied("1.2.3.4:111", "5.6.7.8:222"),
                36,
            ),
            (
                b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n".to_vec(),
                proxied("255.255.255.255:65535", "0.0.0.0:0"),
                44,
            ),
            (
                b"PROXY TCP6 2001:db8::1 ::1 443 8080\r\n".to_vec(),
                proxied("[2001:db8::1]:443", "[::1]:8080"),
                37,
            ),
            (
                b"PROXY TCP6 ::ffff:10.0.0.1 fe80::1 1 2\r\n".to_vec(),
                proxied("[::ffff:10.0.0.1]:1", "[fe80::1]:2"),
                40,
            ),
            (
                max_v6.as_bytes().to_vec(),
                proxied(
                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                ),
                max_v6.len(),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), ProxyHeader::Local, 15),
            (
                b"PROXY UNKNOWN ::1 ::1 1 2\r\n".to_vec(),
                ProxyHeader::Local,
                27,
            ),
            (
                unknown_107.as_bytes().to_vec(),
                ProxyHeader::Local,
                MAX_V1_LEN,
            ),
            // v2
            (
                v2(0x21, 0x11, &V4_BODY),
                proxied("1.2.3.4:111", "5.6.7.8:222"),
                28,
            ),
            (
                v2(0x21, 0x21, &v6_body()),
                proxied("[2001:db8::1]:443", "[::1]:8080"),
                52,
            ),
            (
                v2(0x21, 0x11, &with_tlvs),
                proxied("1.2.3.4:111", "5.6.7.8:222"),
                16 + with_tlvs.len(),
            ),
            (v2(0x20, 0x00, &[]), ProxyHeader::Local, 16),
            // LOCAL ignores the family and whatever address block it has.
            (v2(0x20, 0x11, &V4_BODY), ProxyHeader::Local, 28),
            (v2(0x20, 0x12, &V4_BODY), ProxyHeader::Local, 28),
            (v2(0x20, 0x31, &[0; 216]), ProxyHeader::Local, 232),
            (
                v2(0x20, 0x00, &tlvs()),
                ProxyHeader::Local,
                16 + tlvs().len(),
            ),
            // PROXY with AF_UNSPEC: keep the socket's addresses.
            (v2(0x21, 0x00, &[]), ProxyHeader::Local, 16),
            (v2(0x21, 0x00, &[9; 7]), ProxyHeader::Local, 23),
            // The largest accepted v2 header.
            (
                v2(
                    0x21,
                    0x11,
                    &[V4_BODY.as_slice(), &[0; MAX_V2_LEN - 28]].concat(),
                ),
                proxied("1.2.3.4:111", "5.6.7.8:222"),
                MAX_V2_LEN,
            ),
        ];
        // The same headers with HTTP bytes after them: the consumed length stops at the header.
        let http = b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n";
        let with_http: Vec<_> = cases
            .iter()
            .map(|(b, h, n)| ([b.as_slice(), http].concat(), h.clone(), *n))
            .collect();
        cases.extend(with_http);
        cases
    }

    #[test]
    fn valid_headers_parse() {
        for (input, header, consumed) in valid_cases() {
            assert_eq!(
                parse(&input),
                Ok(Some((header, consumed))),
                "{:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn every_prefix_of_a_valid_header_needs_more() {
        for (input, header, consumed) in valid_cases() {
            for k in 0..consumed {
                assert_eq!(
                    parse(&input[..k]),
                    Ok(None),
                    "prefix {k} of {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
            for k in consumed..=input.len() {
                assert_eq!(parse(&input[..k]), Ok(Some((header.clone(), consumed))));
            }
        }
    }

    #[test]
    fn encoders_match_the_spec_examples() {
        assert_eq!(
            encode_v1(sa("1.2.3.4:111"), sa("5.6.7.8:222")),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\r\n"
        );
        assert_eq!(
            encode_v1(sa("[2001:db8::1]:443"), sa("[::1]:8080")),
            b"PROXY TCP6 2001:db8::1 ::1 443 8080\r\n"
        );
        assert_eq!(
            encode_v2(sa("1.2.3.4:111"), sa("5.6.7.8:222")),
            v2(0x21, 0x11, &V4_BODY)
        );
        assert_eq!(
            encode_v2(sa("[2001:db8::1]:443"), sa("[::1]:8080")),
            v2(0x21, 0x21, &v6_body())
        );
        // Mixed families: both sides as IPv6, the IPv4 one mapped.
        let mixed = proxied("[::ffff:1.2.3.4]:1", "[::1]:2");
        assert_eq!(
            encode_v1(sa("1.2.3.4:1"), sa("[::1]:2")),
            b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n"
        );
        for enc in [encode_v1, encode_v2] {
            let bytes = enc(sa("1.2.3.4:1"), sa("[::1]:2"));
            assert_eq!(parse(&bytes), Ok(Some((mixed.clone(), bytes.len()))));
        }
    }

    /// (input, expected error).
    fn invalid_cases() -> Vec<(Vec<u8>, &'static str)> {
        let missing = "missing PROXY header";
        let mut cases: Vec<(Vec<u8>, &'static str)> = vec![
            // Neither signature.
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), missing),
            (b"G".to_vec(), missing),
            (b"PROXX TCP4".to_vec(), missing),
            (b"proxy TCP4".to_vec(), missing),
            (b"PROXYTCP4".to_vec(), missing),
            (b"\x16\x03\x01\x02\x00".to_vec(), missing), // a TLS ClientHello
            (b"\r\n\r\n\0\r\nQUIX\n".to_vec(), missing),
            (b"\r\n\r\n\0\r\nQUIT\r".to_vec(), missing),
            (b"\r\nGET".to_vec(), missing),
            // v1 garbage.
            (
                b"PROXY TCP5 1.2.3.4 5.6.7.8 111 222\r\n".to_vec(),
                "v1: bad protocol",
            ),
            (
                b"PROXY tcp4 1.2.3.4 5.6.7.8 111 222\r\n".to_vec(),
                "v1: bad protocol",
            ),
            (b"PROXY UNKNOWNX\r\n".to_vec(), "v1: bad protocol"),
            (b"PROXY \r\n".to_vec(), "v1: wrong number of fields"),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111\r\n".to_vec(),
                "v1: wrong number of fields",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222 333\r\n".to_vec(),
                "v1: wrong number of fields",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222 \r\n".to_vec(),
                "v1: wrong number of fields",
            ),
            (
                b"PROXY TCP4  1.2.3.4 5.6.7.8 111 222\r\n".to_vec(),
                "v1: wrong number of fields",
            ),
            (
                b"PROXY TCP4 1.2.3 5.6.7.8 111 222\r\n".to_vec(),
                "v1: bad IPv4 address",
            ),
            (
                b"PROXY TCP4 1.2.3.256 5.6.7.8 111 222\r\n".to_vec(),
                "v1: bad IPv4 address",
            ),
            (
                b"PROXY TCP4 01.2.3.4 5.6.7.8 111 222\r\n".to_vec(),
                "v1: bad IPv4 address",
            ),
            (
                b"PROXY TCP4 ::1 5.6.7.8 111 222\r\n".to_vec(),
                "v1: bad IPv4 address",
            ),
            (
                b"PROXY TCP6 1.2.3.4 ::1 111 222\r\n".to_vec(),
                "v1: bad IPv6 address",
            ),
            (
                b"PROXY TCP6 ::1 [::2] 111 222\r\n".to_vec(),
                "v1: bad IPv6 address",
            ),
            (
                b"PROXY TCP6 ::1%eth0 ::2 111 222\r\n".to_vec(),
                "v1: bad IPv6 address",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111 65536\r\n".to_vec(),
                "v1: bad port",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111 100000\r\n".to_vec(),
                "v1: bad port",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 +111 222\r\n".to_vec(),
                "v1: bad port",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 0111 222\r\n".to_vec(),
                "v1: bad port",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 222\r\n".to_vec(),
                "v1: bad port",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111 2x2\r\n".to_vec(),
                "v1: bad port",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\n".to_vec(),
                "v1: bare LF",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\rX".to_vec(),
                "v1: bare CR",
            ),
            (b"PROXY TCP4\t1.2.3.4".to_vec(), "v1: non-printable byte"),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.\xc3\xa9".to_vec(),
                "v1: non-printable byte",
            ),
            // No CRLF within 107 bytes.
            (
                format!("PROXY UNKNOWN {}\r\n", "x".repeat(107 - 15)).into_bytes(),
                "v1: no CRLF within 107 bytes",
            ),
            (
                format!("PROXY {}", "x".repeat(200)).into_bytes(),
                "v1: no CRLF within 107 bytes",
            ),
            // v2: version, command, family.
            (v2(0x11, 0x11, &V4_BODY), "v2: unsupported version"),
            (v2(0x31, 0x11, &V4_BODY), "v2: unsupported version"),
            (v2(0x01, 0x11, &V4_BODY), "v2: unsupported version"),
            (v2(0x22, 0x11, &V4_BODY), "v2: unsupported command"),
            (v2(0x2f, 0x11, &V4_BODY), "v2: unsupported command"),
            (v2(0x21, 0x12, &V4_BODY), "unsupported address family"), // UDP over IPv4
            (v2(0x21, 0x22, &v6_body()), "unsupported address family"), // UDP over IPv6
            (v2(0x21, 0x31, &[0; 216]), "unsupported address family"), // AF_UNIX stream
            (v2(0x21, 0x32, &[0; 216]), "unsupported address family"), // AF_UNIX datagram
            (v2(0x21, 0x10, &V4_BODY), "unsupported address family"),
            (v2(0x21, 0x41, &V4_BODY), "unsupported address family"),
            // v2: lengths.
            (
                v2(0x21, 0x11, &V4_BODY[..11]),
                "v2: length too small for the addresses",
            ),
            (
                v2(0x21, 0x21, &v6_body()[..35]),
                "v2: length too small for the addresses",
            ),
            (
                v2(0x21, 0x21, &V4_BODY),
                "v2: length too small for the addresses",
            ),
            (
                v2_len(0x21, 0x11, (MAX_V2_LEN - 15) as u16, &V4_BODY),
                "v2: header too long",
            ),
            (v2_len(0x20, 0x00, u16::MAX, &[]), "v2: header too long"),
        ];
        // The same with more bytes after: still an error.
        let longer: Vec<_> = cases
            .iter()
            .map(|(b, e)| ([b.as_slice(), b"\r\n\r\nmore bytes\r\n"].concat(), *e))
            .collect();
        cases.extend(longer);
        cases
    }

    #[test]
    fn invalid_headers_fail_and_stay_failed() {
        for (input, error) in invalid_cases() {
            let show = String::from_utf8_lossy(&input).into_owned();
            assert_eq!(parse(&input), Err(ProxyError(error)), "{show:?}");
            // Errors are final: once a prefix fails, every longer prefix fails the same way; before that,
            // prefixes wait for more.
            let first = (0..=input.len())
                .find(|&k| parse(&input[..k]).is_err())
                .unwrap();
            for k in 0..first {
                assert_eq!(parse(&input[..k]), Ok(None), "prefix {k} of {show:?}");
            }
            for k in first..=input.len() {
                assert_eq!(
                    parse(&input[..k]),
                    Err(ProxyError(error)),
                    "prefix {k} of {show:?}"
                );
            }
        }
    }

    #[test]
    fn fails_as_soon_as_it_is_certain() {
        let missing = Err(ProxyError("missing PROXY header"));
        assert_eq!(parse(b"G"), missing);
        assert_eq!(parse(b"P"), Ok(None));
        assert_eq!(parse(b"POST"), missing);
        assert_eq!(parse(b"PROXY"), Ok(None));
        assert_eq!(parse(b"PROXY\r"), missing);
        assert_eq!(parse(b"\r\n\r\n"), Ok(None));
        assert_eq!(parse(b"\r\n\r\nG"), missing);
        assert_eq!(
            parse(b"\r\n\r\n\0\r\nQUIT\n\x11"),
            Err(ProxyError("v2: unsupported version"))
        );
        assert_eq!(
            parse(b"\r\n\r\n\0\r\nQUIT\n\x21\x12"),
            Err(ProxyError("unsupported address family"))
        );
        assert_eq!(
            parse(&v2_len(0x21, 0x11, 4, &[])),
            Err(ProxyError("v2: length too small for the addresses"))
        );
        assert_eq!(
            parse(&v2_len(0x21, 0x11, 5000, &[])),
            Err(ProxyError("v2: header too long"))
        );
        assert_eq!(parse(&[]), Ok(None));
    }

    #[test]
    fn errors_display_with_context() {
        assert_eq!(
            ProxyError("missing PROXY header").to_string(),
            "PROXY protocol: missing PROXY header"
        );
    }

    fn addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        let v4 =
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port)));
        let v6 =
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port)));
        prop_oneof![(v4.clone(), v4), (v6.clone(), v6)]
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(
            (source, destination) in addr_pair(),
            v1 in any::<bool>(),
            after in proptest::collection::vec(any::<u8>(), 0..64),
            split in any::<prop::sample::Index>(),
        ) {
            let header = if v1 { encode_v1(source, destination) } else { encode_v2(source, destination) };
            let max = if v1 { MAX_V1_LEN } else { MAX_V2_LEN };
            prop_assert!(header.len() <= max);
            let n = header.len();
            let expected = Ok(Some((ProxyHeader::Proxied { source, destination }, n)));
            let buf = [header.as_slice(), &after].concat();
            prop_assert_eq!(parse(&buf), expected.clone());
            // A split anywhere: before the end of the header, wait for more; after it, the same result.
            let k = split.index(buf.len() + 1);
            let part = parse(&buf[..k]);
            if k < n {
                prop_assert_eq!(part, Ok(None));
            } else {
                prop_assert_eq!(part, expected);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            start in prop_oneof![
                Just(Vec::new()),
                Just(b"PROXY ".to_vec()),
                Just(b"PROXY TCP4 ".to_vec()),
                Just(b"PROXY TCP6 ".to_vec()),
                Just(V2_SIGNATURE.to_vec()),
                Just([V2_SIGNATURE.as_slice(), &[0x21]].concat()),
                Just([V2_SIGNATURE.as_slice(), &[0x21, 0x11, 0x00]].concat()),
            ],
            rest in proptest::collection::vec(any::<u8>(), 0..300),
            split in any::<prop::sample::Index>(),
        ) {
            let buf = [start, rest].concat();
            let whole = parse(&buf);
            let k = split.index(buf.len() + 1);
            let part = parse(&buf[..k]);
            // Errors are final.
            if part.is_err() {
                prop_assert_eq!(part.clone(), whole.clone());
            }
            match &whole {
                Ok(Some((_, n))) => {
                    prop_assert!(*n <= buf.len());
                    if k < *n {
                        prop_assert_eq!(part, Ok(None));
                    } else {
                        prop_assert_eq!(part, whole.clone());
                    }
                }
                Ok(None) => prop_assert_eq!(part, Ok(None)),
                Err(_) => prop_assert!(part.is_err() || part == Ok(None)),
            }
        }
    }
}
