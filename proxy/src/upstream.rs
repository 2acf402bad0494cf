//! The upstream client: pooled HTTP/1.1 and HTTP/2 connections over rustls.
//!
//! One client is shared by every route. TLS trusts the webpki roots plus an optional extra CA
//! file (a corporate CA, or the test suite's own). Timeouts: connect (here), response head and
//! stream idle (in the pipeline and the metered body), because hyper's pool has no per-request
//! deadlines of its own.
//!
//! Plain `http://` upstreams go through [`h1`] instead: HTTP/1.1 connections polled by the
//! request's own task, so that events read together leave together.
//!
//! Upstream overrides (`forward_proxy.upstream_overrides`) make the connector dial a fixed
//! address for a host instead of resolving it; TLS still sends that host's name (SNI) and
//! verifies the certificate for it, so an override cannot weaken verification.

pub mod h1;

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Boxed error of any body the proxy sends or receives.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type Body = BoxBody<Bytes, BoxError>;
pub type UpstreamClient = Client<HttpsConnector<Connector>, Body>;

/// Settings for the shared upstream client.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// PEM file with extra CA certificates to trust besides the webpki roots.
    pub extra_ca_file: Option<std::path::PathBuf>,
    /// Host (lower case) → address dialled instead of resolving the host; each may bring a CA
    /// file to trust as well.
    pub overrides: Vec<(String, std::net::SocketAddr, Option<std::path::PathBuf>)>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 64,
            extra_ca_file: None,
            overrides: Vec::new(),
        }
    }
}

/// The shared client and the pool for plain-HTTP upstreams, built from the same settings.
pub fn clients(
    settings: &ClientSettings,
) -> anyhow::Result<(UpstreamClient, std::sync::Arc<h1::Pool>)> {
    let client = client(settings)?;
    let pool = h1::Pool::new(
        connector(settings),
        settings.pool_max_idle_per_host,
        settings.pool_idle_timeout,
    );
    Ok((client, pool))
}

/// The TCP connector both use: connect timeout, `TCP_NODELAY`, the overrides.
fn connector(settings: &ClientSettings) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_nodelay(true);
    let overrides = settings.overrides.iter().map(|(h, a, _)| (h.clone(), *a)).collect();
    Connector { http, overrides: std::sync::Arc::new(overrides) }
}

/// Sends a proxied request: `http://` through `pool`, anything else through `client`.
pub async fn send(
    client: &UpstreamClient,
    pool: &std::sync::Arc<h1::Pool>,
    req: http::Request<Body>,
) -> Result<http::Response<UpstreamBody>, BoxError> {
    if req.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
        Ok(pool.request(req).await?.map(UpstreamBody::Own))
    } else {
        Ok(client.request(req).await?.map(UpstreamBody::Shared))
    }
}

/// An upstream response body, from either path of [`send`].
pub enum UpstreamBody {
    Shared(hyper::body::Incoming),
    Own(h1::OwnBody),
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Shared(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Own(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Shared(b) => b.is_end_stream(),
            UpstreamBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::Shared(b) => b.size_hint(),
            UpstreamBody::Own(b) => b.size_hint(),
        }
    }
}

/// Builds the client. Fails (at startup) if the extra CA file cannot be read or holds no
/// certificate.
pub fn client(settings: &ClientSettings) -> anyhow::Result<UpstreamClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.extra_ca_file {
        add_cas(&mut roots, path, "upstream.extra_ca_file")?;
    }
    for (host, _, ca_file) in &settings.overrides {
        if let Some(path) = ca_file {
            add_cas(&mut roots, path, &format!("forward_proxy.upstream_overrides.{host}.ca_file"))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let http = connector(settings);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);

    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Adds every certificate of the PEM file at `path` to `roots`; `what` names the setting.
fn add_cas(
    roots: &mut rustls::RootCertStore,
    path: &std::path::Path,
    what: &str,
) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("parsing PEM in {}", path.display()))?;
        roots.add(cert).with_context(|| format!("adding a CA from {}", path.display()))?;
        added += 1;
    }
    anyhow::ensure!(added > 0, "{what} {} has no certificate", path.display());
    Ok(())
}

/// The TCP connector under TLS: hyper-util's, except that an overridden host is dialled at its
/// configured address (the URI handed to TLS above keeps the real host name).
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    overrides: std::sync::Arc<std::collections::HashMap<String, std::net::SocketAddr>>,
}

type Connecting = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>, BoxError>,
            > + Send,
    >,
>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(BoxError::from)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let target = uri
            .host()
            .and_then(|h| self.overrides.get(&h.to_ascii_lowercase()))
            .and_then(|addr| format!("http://{addr}").parse::<http::Uri>().ok());
        let connecting = self.http.call(target.unwrap_or(uri));
        Box::pin(async move { connecting.await.map_err(BoxError::from) })
    }
}
