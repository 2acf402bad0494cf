//! The proxy's own answers on the wire: refusals from `tollgate_core::refusal` (one mapping
//! from class to status, provider error shape and decision headers, shared with the Envoy
//! filter) turned into hyper responses, plus small body helpers.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

pub use tollgate_core::refusal::{Class, Denial, Shape};

use crate::upstream::Body;

/// The response for `denial`, in `shape`, with the decision headers and the request id.
pub fn response(denial: &Denial, shape: Shape, request_id: &str) -> Response<Body> {
    let reply = denial.render(shape, request_id);
    let mut response = Response::new(full(Bytes::from(reply.body)));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::FORBIDDEN);
    let headers = response.headers_mut();
    for (name, value) in reply.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    response
}

/// Sets a header if the value is a valid header value (config-derived strings always are; a
/// value that is not is left out rather than failing the response).
pub fn put(headers: &mut http::HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// A complete body from bytes.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}
