//! What the forward proxy checks before it connects anywhere on a client's behalf: the address
//! (never loopback, link-local, cloud metadata, unspecified or multicast, in any spelling —
//! IPv4-mapped, IPv4-compatible or NAT64 IPv6 included), and the attribution a client may give
//! as proxy credentials.
//!
//! Pure functions and the request's destination ([`Target`]); the sockets are in the parent
//! module.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::{HeaderMap, HeaderName, HeaderValue, PROXY_AUTHORIZATION};
use tollgate_core::attribution::{Attribute, Attribution};

use crate::deny::{Class, Denial};

/// Why an address may not be connected to, or `None` when it may.
pub fn forbidden(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4, allow_loopback),
        IpAddr::V6(v6) => forbidden_v6(v6, allow_loopback),
    }
}

fn forbidden_v4(ip: Ipv4Addr, allow_loopback: bool) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        Some("a cloud metadata address")
    } else if a == 169 && b == 254 {
        Some("a link-local address")
    } else if ip.is_loopback() || a == 0 {
        // 0.0.0.0/8 reaches this host on Linux, like loopback.
        (!allow_loopback).then_some("a loopback address")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some("a multicast or broadcast address")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr, allow_loopback: bool) -> Option<&'static str> {
    let segments = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some("a cloud metadata address");
    }
    if ip.is_loopback() || ip.is_unspecified() {
        return (!allow_loopback).then_some("a loopback address");
    }
    // ::ffff:a.b.c.d (mapped), ::a.b.c.d (compatible), 64:ff9b::a.b.c.d (NAT64) all reach the
    // IPv4 address inside.
    let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if let Some(v4) = ip.to_ipv4().or_else(|| nat64.then(|| embedded_v4(segments))) {
        return forbidden_v4(v4, allow_loopback);
    }
    if segments[0] & 0xffc0 == 0xfe80 {
        return Some("a link-local address");
    }
    if ip.is_multicast() {
        return Some("a multicast or broadcast address");
    }
    None
}

fn embedded_v4(segments: [u16; 8]) -> Ipv4Addr {
    let [hi, lo] = [segments[6], segments[7]];
    Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
}

/// A host as an IP address, if it is an IP literal (`[::1]` brackets allowed).
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Attribution given as proxy credentials: header name and value pairs to add to each request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials(pub Vec<(HeaderName, HeaderValue)>);

/// A `Proxy-Authorization` header Tollgate cannot read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("Proxy-Authorization must be `Basic` credentials")]
    NotBasic,
    #[error("Proxy-Authorization is not valid base64 of `user:password`")]
    Encoding,
    #[error(
        "proxy credentials: `{item}` is not `attribute=value` (attributes: agent, cost_center, \
         project, business_unit, tier, owner)"
    )]
    Item { item: String },
}

impl Credentials {
    /// Reads `Proxy-Authorization: Basic base64(user:password)`: the user is the agent id, the
    /// password a comma-separated list of `attribute=value` (`cost_center=CC-1234,project=…`;
    /// an attribute may also be named by its header). Percent-escapes are decoded. Values are
    /// checked later, like headers, by the attribution rules.
    pub fn from_headers(
        headers: &HeaderMap,
        attribution: &Attribution,
    ) -> Result<Credentials, CredentialsError> {
        let Some(value) = headers.get(PROXY_AUTHORIZATION) else {
            return Ok(Credentials::default());
        };
        let text = value.to_str().map_err(|_| CredentialsError::Encoding)?.trim();
        let (scheme, encoded) = text.split_once(' ').ok_or(CredentialsError::NotBasic)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(CredentialsError::NotBasic);
        }
        let decoded = base64_decode(encoded.trim()).ok_or(CredentialsError::Encoding)?;
        let decoded = String::from_utf8(decoded).map_err(|_| CredentialsError::Encoding)?;
        let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
        let mut out = Vec::new();
        let mut push = |attribute: Attribute, value: &str| -> Result<(), CredentialsError> {
            let name = HeaderName::from_bytes(attribution.header_name(attribute).as_bytes());
            let value = HeaderValue::from_str(value);
            match (name, value) {
                (Ok(name), Ok(value)) => {
                    out.retain(|(n, _)| *n != name);
                    out.push((name, value));
                    Ok(())
                }
                _ => Err(CredentialsError::Encoding),
            }
        };
        let user = percent_decode(user);
        if !user.is_empty() {
            push(Attribute::Agent, &user)?;
        }
        for item in password.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = || CredentialsError::Item { item: sanitise(item) };
            let (key, value) = item.split_once('=').ok_or_else(bad)?;
            let key = percent_decode(key.trim());
            let attribute = Attribute::parse(&key)
                .or_else(|| {
                    Attribute::ALL
                        .into_iter()
                        .find(|a| attribution.header_name(*a).eq_ignore_ascii_case(&key))
                })
                .ok_or_else(bad)?;
            push(attribute, &percent_decode(value.trim()))?;
        }
        Ok(Credentials(out))
    }

    /// Adds each credential to `headers` where the request has no such header. A request header
    /// that says otherwise is returned as `(header, request value, credential value)`: one
    /// connection's requests cannot bill someone else.
    pub fn apply(&self, headers: &mut HeaderMap) -> Result<(), (String, String, String)> {
        for (name, value) in &self.0 {
            match headers.get(name) {
                None => {
                    headers.insert(name.clone(), value.clone());
                }
                Some(given) if given == value => {}
                Some(given) => {
                    return Err((
                        name.to_string(),
                        sanitise(&String::from_utf8_lossy(given.as_bytes())),
                        sanitise(value.to_str().unwrap_or("?")),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Printable ASCII, at most 64 characters, for error messages.
fn sanitise(text: &str) -> String {
    text.chars().take(64).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect()
}

/// `%XX` escapes decoded (RFC 3986); invalid UTF-8 becomes U+FFFD, which the header value check
/// then refuses.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// The longest `Proxy-Authorization` credentials decoded (base64 text, in bytes).
const MAX_CREDENTIALS: usize = 8192;

/// Standard base64 with optional padding; `None` for anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{general_purpose, DecodePaddingMode, Engine as _, GeneralPurpose};
    const STANDARD: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        general_purpose::PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    if text.len() > MAX_CREDENTIALS {
        return None;
    }
    STANDARD.decode(text).ok()
}

/// Where a forwarded request is going: the `CONNECT` authority (or the absolute URI's host),
/// and the attribution its connection brought.
#[derive(Debug)]
pub struct Target {
    pub host: String,
    /// The `CONNECT` port; `None` for absolute-form requests (any port of the host matches).
    pub port: Option<u16>,
    pub credentials: Credentials,
}

/// The refusal of a request whose connection's credentials contradict its own headers.
pub fn contradiction(name: &str, given: &str, credential: &str) -> Denial {
    Denial::new(
        Class::Attribution,
        "attribution_rejected",
        format!("{name}: `{given}` contradicts the proxy credentials of this connection (`{credential}`)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn metadata_link_local_and_loopback_are_refused_in_every_spelling() {
        for (addr, reason) in [
            ("169.254.169.254", "a cloud metadata address"),
            ("::ffff:169.254.169.254", "a cloud metadata address"),
            ("::169.254.169.254", "a cloud metadata address"),
            ("64:ff9b::a9fe:a9fe", "a cloud metadata address"),
            ("fd00:ec2::254", "a cloud metadata address"),
            ("169.254.1.2", "a link-local address"),
            ("fe80::1", "a link-local address"),
            ("127.0.0.1", "a loopback address"),
            ("127.8.9.10", "a loopback address"),
            ("::ffff:127.0.0.1", "a loopback address"),
            ("0.0.0.0", "a loopback address"),
            ("::", "a loopback address"),
            ("::1", "a loopback address"),
            ("224.0.0.1", "a multicast or broadcast address"),
        ] {
            assert_eq!(forbidden(ip(addr), false), Some(reason), "{addr}");
        }
        for addr in ["8.8.8.8", "10.0.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(forbidden(ip(addr), false), None, "{addr}");
        }
        assert_eq!(forbidden(ip("127.0.0.1"), true), None);
        assert_eq!(forbidden(ip("::1"), true), None);
        assert_eq!(forbidden(ip("169.254.169.254"), true), Some("a cloud metadata address"));
        assert_eq!(ip_literal("[::1]"), Some(ip("::1")));
        assert_eq!(ip_literal("api.openai.com"), None);
    }

    fn basic(userpass: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let encoded = encode(userpass.as_bytes());
        h.insert(PROXY_AUTHORIZATION, format!("Basic {encoded}").parse().unwrap());
        h
    }

    /// A reference encoder for the tests only.
    fn encode(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut n = [0u8; 3];
            n[..chunk.len()].copy_from_slice(chunk);
            let v = u32::from_be_bytes([0, n[0], n[1], n[2]]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[(v >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn credentials_carry_attribution_and_never_invent_it() {
        let rules = Attribution::from_yaml_str("{}").unwrap();
        let creds = Credentials::from_headers(
            &basic("sdk-agent:cost_center=CC-1234,x-project-id=PROJ-ABC123,tier=2"),
            &rules,
        )
        .unwrap();
        let got: Vec<(String, String)> =
            creds.0.iter().map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string())).collect();
        assert_eq!(
            got,
            [
                ("x-agent-id", "sdk-agent"),
                ("x-cost-center", "CC-1234"),
                ("x-project-id", "PROJ-ABC123"),
                ("x-agent-tier", "2"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        // Percent-escapes, any split of base64 padding.
        for (text, agent) in [("a%2Db:", "a-b"), ("ab", "ab"), ("abc:", "abc"), ("abcd:", "abcd")] {
            let c = Credentials::from_headers(&basic(text), &rules).unwrap();
            assert_eq!(c.0[0].1, agent, "{text}");
        }
        assert_eq!(Credentials::from_headers(&HeaderMap::new(), &rules).unwrap().0, []);

        let mut bearer = HeaderMap::new();
        bearer.insert(PROXY_AUTHORIZATION, "Bearer x".parse().unwrap());
        assert_eq!(Credentials::from_headers(&bearer, &rules), Err(CredentialsError::NotBasic));
        let mut junk = HeaderMap::new();
        junk.insert(PROXY_AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(Credentials::from_headers(&junk, &rules), Err(CredentialsError::Encoding));
        let err = Credentials::from_headers(&basic("a:colour=red"), &rules).unwrap_err();
        assert!(err.to_string().contains("colour=red"), "{err}");

        // Applied only where the request is silent; a contradiction is refused.
        let mut headers = HeaderMap::new();
        headers.insert("x-cost-center", "CC-1234".parse().unwrap());
        creds.apply(&mut headers).unwrap();
        assert_eq!(headers["x-agent-id"], "sdk-agent");
        headers.insert("x-agent-id", "other".parse().unwrap());
        let (name, given, pinned) = creds.apply(&mut headers).unwrap_err();
        assert_eq!(
            (name.as_str(), given.as_str(), pinned.as_str()),
            ("x-agent-id", "other", "sdk-agent")
        );
    }
}
