//! The proxy listener's front door: forward-proxy requests (`CONNECT`, absolute-form) go to
//! [`crate::forward`] when HTTPS_PROXY mode is on; every other request goes to the pipeline.

use std::net::SocketAddr;

use http::header::{self, HeaderValue};
use http::Request;
use hyper::body::Incoming;
use hyper::Response;

use crate::pipeline::Proxy;
use crate::server::Handler;
use crate::upstream::Body;

impl Handler for Proxy {
    async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        if let Some(forward) = &self.shared().forward {
            if crate::forward::is_forward(&req) {
                // Boxed like the pipeline's `handle`: the slot hyper keeps per connection stays
                // small.
                return Box::pin(crate::forward::handle(self, forward, req)).await;
            }
        }
        let connect = req.method() == http::Method::CONNECT;
        let mut response = self.serve(req, None).await;
        if connect {
            // Without the forward proxy a CONNECT is just refused; the connection is closed
            // because the framing guard stops following a connection after a CONNECT head.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
