//! HTTP_PROXY / HTTPS_PROXY mode on the proxy listener: `CONNECT host:port` and absolute-form
//! requests (`POST http://host/path`).
//!
//! A `CONNECT` to the host and port of some route's upstream is **intercepted**: the proxy
//! answers 200, terminates the client's TLS with a certificate for that host minted from
//! Tollgate's CA ([`crate::ca`]), serves the decrypted HTTP/1.1 or HTTP/2 (by ALPN) requests
//! with the same handler as reverse mode ([`Proxy::serve`] — attribution, decision, limits,
//! budgets, metering, ledger), and the shared upstream client re-encrypts to the real host,
//! verifying its certificate. An absolute-form request to such a host goes the same way
//! without TLS on the client side.
//!
//! Any other host is refused (403, the default) or tunnelled unmetered, per
//! `forward_proxy.other_hosts`; a tunnel never reaches loopback, link-local or metadata
//! addresses ([`target::forbidden`]), checked on the resolved address that is then dialled.
//!
//! Attribution may come with each inner request's headers or once per connection as proxy
//! credentials ([`target::Credentials`]); `Proxy-Authorization` itself is never forwarded.

pub mod intercepted;
pub mod target;
mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::config::OtherHosts;
use crate::deny::{self, Class, Denial, Shape};
use crate::framing::FramingGuard;
use crate::pipeline::Proxy;
use crate::state::Shared;
use crate::upstream::{Body, BoxError};

pub use intercepted::Forward;
pub use target::{contradiction, Credentials, Target};

/// Whether `req` is a forward-proxy request (a `CONNECT`, or an HTTP/1 absolute-form request;
/// HTTP/2 requests always carry an authority, so they are never taken for one).
pub fn is_forward(req: &Request<Incoming>) -> bool {
    req.method() == Method::CONNECT
        || (req.version() <= http::Version::HTTP_11 && req.uri().scheme().is_some())
}

/// Serves a forward-proxy request (see [`is_forward`]).
pub async fn handle(
    proxy: &Proxy,
    forward: &Arc<Forward>,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() == Method::CONNECT {
        connect(proxy, forward, req).await
    } else {
        absolute(proxy, req).await
    }
}

async fn connect(
    proxy: &Proxy,
    forward: &Arc<Forward>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let shared = proxy.shared();
    let authority = req.uri().authority();
    let Some((host, port)) =
        authority.and_then(|a| Some((a.host().to_ascii_lowercase(), a.port_u16()?)))
    else {
        return refuse(shared, bad_request("bad_connect_target", "CONNECT needs host:port"));
    };
    if shared.current().config.intercepts(&host, port) {
        let credentials = match credentials(shared, req.headers()) {
            Ok(c) => c,
            Err(denial) => return refuse(shared, denial),
        };
        let tls = match forward.ca.server_config(&host) {
            Ok(tls) => tls,
            Err(e) => {
                tracing::error!(%host, error = %format!("{e:#}"), "minting a certificate");
                return refuse(
                    shared,
                    Denial::new(
                        Class::Unavailable,
                        "certificate_unavailable",
                        "cannot intercept this host now",
                    ),
                );
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let target = Arc::new(Target { host, port: Some(port), credentials });
        let (proxy, forward) = (proxy.clone(), forward.clone());
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            intercept(proxy, forward, tls, TokioIo::new(upgraded), target).await;
        });
        return Response::new(deny::full(bytes::Bytes::new()));
    }
    let tunnel = match other_host(shared, &host, port).await {
        Ok(stream) => stream,
        Err(denial) => return refuse(shared, denial),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let idle = shared.current().config.forward.tunnel_idle_timeout;
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        tunnel::relay(TokioIo::new(upgraded), tunnel, idle).await;
    });
    Response::new(deny::full(bytes::Bytes::new()))
}

/// Terminates the client's TLS on an accepted `CONNECT` and serves its requests through the
/// proxy's own handler, each carrying the `CONNECT`'s target.
async fn intercept<IO>(
    proxy: Proxy,
    forward: Arc<Forward>,
    tls: Arc<rustls::ServerConfig>,
    io: IO,
    target: Arc<Target>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limits = &forward.limits;
    let stream = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // Typically a client that does not trust Tollgate's CA.
            tracing::info!(host = %target.host, error = %e, "client TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(host = %target.host, "client TLS handshake timed out");
            return;
        }
    };
    let Some(stopping) = forward.watcher() else { return }; // shutting down
    let service = service_fn(move |req| {
        let (proxy, target) = (proxy.clone(), target.clone());
        async move { Ok::<_, Infallible>(proxy.serve(req, Some(&target)).await) }
    });
    let guard = FramingGuard::new(stream, limits.max_head_bytes, limits.header_read_timeout);
    if let Err(e) = forward.builders.serve(guard, service, stopping).await {
        tracing::debug!(error = %e, "intercepted connection ended with an error");
    }
}

/// An absolute-form request: through the pipeline if its host is a route's upstream, else
/// refused or passed on unmetered.
async fn absolute(proxy: &Proxy, mut req: Request<Incoming>) -> Response<Body> {
    let shared = proxy.shared();
    if req.uri().scheme_str() != Some("http") {
        return refuse(
            shared,
            bad_request(
                "bad_proxy_request",
                "only http:// URLs can be proxied directly; use CONNECT for https",
            ),
        );
    }
    let host = req.uri().host().unwrap_or_default().to_ascii_lowercase();
    let port = req.uri().port_u16().unwrap_or(80);
    if shared.current().config.routes.iter().any(|r| r.upstream_is(&host, None)) {
        let credentials = match credentials(shared, req.headers()) {
            Ok(c) => c,
            Err(denial) => return refuse(shared, denial),
        };
        let target = Target { host, port: None, credentials };
        return proxy.serve(req, Some(&target)).await;
    }
    let stream = match other_host(shared, &host, port).await {
        Ok(stream) => stream,
        Err(denial) => return refuse(shared, denial),
    };
    // Unmetered pass-through on a connection of its own (the address was checked; the
    // shared client would resolve the name again).
    crate::pipeline::strip_hop_by_hop(req.headers_mut());
    let origin_form = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    *req.uri_mut() = origin_form.parse().unwrap_or_else(|_| Uri::from_static("/"));
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => return refuse(shared, unreachable(&host, e)),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    match sender.send_request(req.map(|b| b.map_err(BoxError::from).boxed())).await {
        Ok(mut response) => {
            crate::pipeline::strip_hop_by_hop(response.headers_mut());
            response.map(|b| b.map_err(BoxError::from).boxed())
        }
        Err(e) => refuse(shared, unreachable(&host, e)),
    }
}

/// A connection to a host no route names, if policy allows: `other_hosts: tunnel`, and every
/// address the name resolves to is allowed (the first one that answers is used).
async fn other_host(
    shared: &Shared,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, Denial> {
    let settings = &shared.current().config.forward;
    let forbidden = |ip| target::forbidden(ip, settings.allow_loopback);
    if let Some(why) = target::ip_literal(host).and_then(forbidden) {
        return Err(forbidden_target(host, why));
    }
    if settings.other_hosts == OtherHosts::Refuse {
        return Err(Denial::new(
            Class::Policy,
            "host_not_allowed",
            format!(
                "{host} is not an upstream of any route; this proxy refuses other hosts \
                 (forward_proxy.other_hosts: refuse)"
            ),
        ));
    }
    let timeout = shared.current().config.upstream.connect_timeout;
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port)),
    )
    .await
    {
        Ok(Ok(addrs)) => addrs.collect(),
        _ => return Err(unreachable(host, "the name does not resolve")),
    };
    // One forbidden address refuses the name: DNS must not steer a tunnel inside.
    if let Some(why) = addrs.iter().find_map(|a| forbidden(a.ip())) {
        return Err(forbidden_target(host, why));
    }
    for addr in &addrs {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await
        {
            let _ = stream.set_nodelay(true);
            return Ok(stream);
        }
    }
    Err(unreachable(host, "no address answered"))
}

/// The attribution in a request's proxy credentials. Read only for hosts Tollgate meters: a
/// tunnel to another host ignores them (and never forwards them).
fn credentials(shared: &Shared, headers: &http::HeaderMap) -> Result<Credentials, Denial> {
    Credentials::from_headers(headers, shared.current().engine().attribution())
        .map_err(|e| bad_request("bad_proxy_authorization", e.to_string()))
}

fn forbidden_target(host: &str, why: &str) -> Denial {
    Denial::new(
        Class::Policy,
        "forbidden_target",
        format!("{host} is {why}; the proxy never connects there"),
    )
}

fn unreachable(host: &str, error: impl std::fmt::Display) -> Denial {
    tracing::info!(%host, %error, "forward target unreachable");
    Denial::new(
        Class::UpstreamUnavailable,
        "upstream_unavailable",
        format!("{host} could not be reached"),
    )
}

fn bad_request(code: &str, message: impl Into<String>) -> Denial {
    Denial::new(Class::BadRequest, code, message.into())
}

/// The proxy's own refusal of a forward request: counted, audited, and the connection closed
/// (after a refused `CONNECT` the client may not know where the next request begins).
fn refuse(shared: &Arc<Shared>, denial: Denial) -> Response<Body> {
    let request_id = crate::pipeline::new_id();
    shared.metrics.request(denial.class.decision(), &denial.code, None, "none");
    tracing::info!(request_id = %request_id, status = denial.class.status(), reason = %denial.code, "forward request refused");
    if denial.class != Class::UpstreamUnavailable {
        crate::pipeline::audit_refusal(
            shared,
            &request_id,
            &[None, None, None],
            "-".into(),
            &denial,
        );
    }
    let mut response = deny::response(&denial, Shape::OpenAi, &request_id);
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
