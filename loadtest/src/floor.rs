//! The bare hyper floor: the least a hyper 1.x pass-through proxy costs, as a `compare` row
//! (`hyper-floor`).
//!
//! A hyper HTTP/1.1 server whose every request goes, unchanged apart from its URI, through a
//! pooled hyper-util client to the mock upstream, and whose response (head and streaming body)
//! goes back unchanged. The same stack as Tollgate (tokio's multi-thread runtime, sized by the
//! CPUs the process may use, so one worker when pinned; hyper-util's legacy client with
//! `TCP_NODELAY`; keep-alive on both sides) and nothing else: no policy, no metering, no
//! ledger, no body buffering, no frame joining. What Tollgate costs above this row is its own
//! work; what this row costs above `direct` is hyper's.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type FloorClient = Client<HttpConnector, Incoming>;
/// The upstream's body, or nothing (when the upstream could not be asked).
type FloorBody = Either<Incoming, Empty<Bytes>>;

/// Serves on `listen` forever, forwarding to `upstream`. Prints `listening on <addr>` once bound.
pub async fn serve(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: FloorClient = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let service = service_fn(move |req| forward(client.clone(), upstream, req));
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request: the URI made absolute for the upstream, everything else as it came.
async fn forward(
    client: FloorClient,
    upstream: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<FloorBody>, Infallible> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    match format!("http://{upstream}{path}").parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return Ok(failed(StatusCode::BAD_REQUEST)),
    }
    Ok(match client.request(req).await {
        Ok(response) => response.map(Either::Left),
        Err(_) => failed(StatusCode::BAD_GATEWAY),
    })
}

/// An empty answer with `status`.
fn failed(status: StatusCode) -> Response<FloorBody> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = status;
    response
}
