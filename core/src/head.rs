//! Strict request heads: what an HTTP/1 request head must look like before Tollgate reads
//! anything from it.
//!
//! The parser (hyper, Envoy's) accepts heads that RFC 9112 refuses or that different hops read
//! differently. Each is refused with a 400 naming the problem, because Tollgate bills and decides
//! from these headers and forwards them to a next hop that may read them another way:
//! - `Host` missing, repeated, or carrying userinfo (`user@host`): RFC 9112 §3.2 requires a 400;
//! - more than one `Transfer-Encoding` line: the framing is ambiguous;
//! - a header Tollgate reads spelled with `_` (`x_cost_center`): upstreams that fold `_` into `-`
//!   would see a second value beside the one that was billed;
//! - `Connection` naming a header Tollgate reads (`Connection: x-cost-center`): the next hop
//!   would drop a header that was used for billing or authentication;
//! - an absolute-form target (`GET http://host/path`) where no forward proxy serves it: the
//!   authority would be ignored for routing but may be trusted by the next hop.
//!
//! HTTP/2 heads are not checked here: their authority and framing are pseudo-headers and frame
//! lengths, which the HTTP/2 parser validates.

use std::fmt;

use crate::attribution::Attribution;

/// Headers Tollgate reads end to end, besides the attribution headers (which are configured).
pub const READ_HEADERS: [&str; 8] = [
    "host",
    "authorization",
    "x-api-key",
    "content-length",
    "content-type",
    "content-encoding",
    "x-request-id",
    "x-tollgate-approval",
];

/// Request headers never forwarded upstream, by either engine: the ones that describe one
/// connection, not the message (RFC 9110 §7.6.1), and the client's credentials for a proxy
/// (`Proxy-Authorization`, and `Proxy-Authenticate`, which has no business in a request), plus
/// whatever `Connection` names.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// A request head refused before anything is read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    MissingHost,
    DuplicateHost,
    HostUserinfo,
    DuplicateTransferEncoding,
    /// The header as sent, and the name Tollgate reads.
    UnderscoreName {
        sent: String,
        reads: String,
    },
    /// The header `Connection` nominates.
    ConnectionNominates(String),
    AbsoluteForm,
}

impl HeadError {
    /// The refusal's machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            HeadError::MissingHost => "missing_host",
            HeadError::DuplicateHost => "duplicate_host",
            HeadError::HostUserinfo => "host_userinfo",
            HeadError::DuplicateTransferEncoding => "ambiguous_framing",
            HeadError::UnderscoreName { .. } => "underscore_header",
            HeadError::ConnectionNominates(_) => "connection_nominates_header",
            HeadError::AbsoluteForm => "absolute_form",
        }
    }
}

/// Every code a head refusal carries: after one the connection is closed, since what follows
/// on it cannot be trusted to be framed as the parser thought.
pub const CODES: [&str; 7] = [
    "missing_host",
    "duplicate_host",
    "host_userinfo",
    "ambiguous_framing",
    "underscore_header",
    "connection_nominates_header",
    "absolute_form",
];

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::MissingHost => f.write_str("the request has no Host header"),
            HeadError::DuplicateHost => f.write_str("the request has more than one Host header"),
            HeadError::HostUserinfo => f.write_str("the Host header carries userinfo (user@host)"),
            HeadError::DuplicateTransferEncoding => {
                f.write_str("the request has more than one Transfer-Encoding header")
            }
            HeadError::UnderscoreName { sent, reads } => {
                write!(f, "header {sent} is spelled with '_': send it as {reads}")
            }
            HeadError::ConnectionNominates(name) => write!(
                f,
                "Connection names {name}, a header Tollgate reads: it cannot be hop-by-hop"
            ),
            HeadError::AbsoluteForm => f.write_str(
                "an absolute-form request target (http://host/path) needs the forward proxy, \
                 which is not enabled here; send the path only",
            ),
        }
    }
}

/// What the adapter knows of the request line.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine {
    /// HTTP/1.0 or HTTP/1.1 (HTTP/2 heads are not checked).
    pub http1: bool,
    /// The target was absolute-form (`http://host/path`).
    pub absolute_form: bool,
    /// A forward proxy serves this request (absolute-form is then its normal form).
    pub forward: bool,
}

/// Checks a request head, given as `(lower-case name, value)` pairs in order.
pub fn check<'a>(
    line: RequestLine,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    attribution: &Attribution,
) -> Result<(), HeadError> {
    if !line.http1 {
        return Ok(());
    }
    if line.absolute_form && !line.forward {
        return Err(HeadError::AbsoluteForm);
    }
    let reads = |name: &str| {
        READ_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(name))
            || attribution.header_names().any(|a| a.eq_ignore_ascii_case(name))
    };
    let (mut hosts, mut transfer_encodings) = (0usize, 0usize);
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if value.contains(&b'@') {
                return Err(HeadError::HostUserinfo);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encodings += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            let nominated = value.split(|&b| b == b',').map(|n| n.trim_ascii());
            for n in nominated.filter_map(|n| std::str::from_utf8(n).ok()) {
                if reads(n) {
                    return Err(HeadError::ConnectionNominates(n.to_ascii_lowercase()));
                }
            }
        }
        if name.contains('_') {
            let dashed = name.replace('_', "-");
            if reads(&dashed) {
                return Err(HeadError::UnderscoreName {
                    sent: name.to_owned(),
                    reads: dashed.to_ascii_lowercase(),
                });
            }
        }
    }
    match hosts {
        0 => return Err(HeadError::MissingHost),
        1 => {}
        _ => return Err(HeadError::DuplicateHost),
    }
    if transfer_encodings > 1 {
        return Err(HeadError::DuplicateTransferEncoding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: RequestLine = RequestLine { http1: true, absolute_form: false, forward: false };

    fn run(line: RequestLine, headers: &[(&str, &str)]) -> Result<(), HeadError> {
        let attribution = Attribution::from_yaml_str("{}").unwrap();
        check(line, headers.iter().map(|(n, v)| (*n, v.as_bytes())), &attribution)
    }

    #[test]
    fn a_plain_head_passes() {
        let head = [("host", "api"), ("x-cost-center", "CC-1"), ("connection", "keep-alive, te")];
        assert_eq!(run(LINE, &head), Ok(()));
        // Underscores in headers Tollgate does not read are the upstream's business.
        assert_eq!(run(LINE, &[("host", "api"), ("x_trace_id", "1")]), Ok(()));
    }

    #[test]
    fn host_must_be_there_once_and_without_userinfo() {
        assert_eq!(run(LINE, &[("accept", "*/*")]), Err(HeadError::MissingHost));
        assert_eq!(run(LINE, &[("host", "a"), ("host", "b")]), Err(HeadError::DuplicateHost));
        assert_eq!(run(LINE, &[("host", "u:p@api")]), Err(HeadError::HostUserinfo));
    }

    #[test]
    fn framing_and_hop_by_hop_tricks_are_refused() {
        let te =
            [("host", "a"), ("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")];
        assert_eq!(run(LINE, &te), Err(HeadError::DuplicateTransferEncoding));
        let conn = [("host", "a"), ("connection", "close, X-Cost-Center")];
        assert_eq!(run(LINE, &conn), Err(HeadError::ConnectionNominates("x-cost-center".into())));
        let auth = [("host", "a"), ("connection", "authorization")];
        assert!(matches!(run(LINE, &auth), Err(HeadError::ConnectionNominates(_))));
    }

    #[test]
    fn underscore_spellings_of_read_headers_are_named() {
        let err = run(LINE, &[("host", "a"), ("x_cost_center", "CC-0001")]).unwrap_err();
        assert_eq!(
            err,
            HeadError::UnderscoreName {
                sent: "x_cost_center".into(),
                reads: "x-cost-center".into()
            }
        );
        assert!(err.to_string().contains("x_cost_center"), "{err}");
        assert_eq!(err.code(), "underscore_header");
        let key = run(LINE, &[("host", "a"), ("x_api_key", "k")]).unwrap_err();
        assert!(matches!(key, HeadError::UnderscoreName { .. }));
    }

    #[test]
    fn absolute_form_only_through_the_forward_proxy() {
        let absolute = RequestLine { absolute_form: true, ..LINE };
        assert_eq!(run(absolute, &[("host", "a")]), Err(HeadError::AbsoluteForm));
        let forward = RequestLine { forward: true, ..absolute };
        assert_eq!(run(forward, &[("host", "a")]), Ok(()));
    }

    #[test]
    fn every_code_is_listed() {
        let errors = [
            HeadError::MissingHost,
            HeadError::DuplicateHost,
            HeadError::HostUserinfo,
            HeadError::DuplicateTransferEncoding,
            HeadError::UnderscoreName { sent: String::new(), reads: String::new() },
            HeadError::ConnectionNominates(String::new()),
            HeadError::AbsoluteForm,
        ];
        let codes: Vec<&str> = errors.iter().map(HeadError::code).collect();
        assert_eq!(codes, CODES);
    }

    #[test]
    fn http2_heads_are_left_to_the_http2_parser() {
        let h2 = RequestLine { http1: false, absolute_form: true, forward: false };
        assert_eq!(run(h2, &[]), Ok(()));
    }
}
