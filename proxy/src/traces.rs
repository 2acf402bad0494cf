//! Traces (`traces:`): one OpenTelemetry span per proxied call, after the GenAI semantic
//! conventions, exported as OTLP over HTTP with protobuf bodies.
//!
//! Off by default, and then [`Traces::begin`] answers `None` at once: no span, no id, no header
//! added; a caller's `traceparent` goes upstream untouched like any other header.
//!
//! On, the span starts when the request's head is in ([`Traces::begin`]): a caller's
//! `traceparent` (and `tracestate`) makes it that trace's child, else it starts a trace. The
//! upstream gets a `traceparent` naming this span as its parent ([`CallSpan::inject`]), whether
//! it is sampled or not (an unsampled one says so in its flags). Once the body is read the span
//! gets its name and the request's attributes ([`CallSpan::request`]); it ends when the request
//! ends: after metering and settlement, with the ledger record's usage, cost and attribution
//! ([`CallSpan::settled`]), or with the refusal ([`CallSpan::refused`]).
//!
//! Ending a span only queues it: the SDK's batch processor exports from its own thread, through
//! [`Transport`], which sends on the proxy's runtime with the proxy's upstream client, so no
//! request ever waits for the collector. A full queue drops spans (never blocks).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, ShouldSample,
};
use opentelemetry_sdk::Resource;

use tollgate_core::inspect::RequestInfo;
use tollgate_core::metering::Api;
use tollgate_core::record::UsageRecord;

use crate::body::StreamEnd;
use crate::config::{Route, Sampling, UpstreamKind};
use crate::deny::Denial;
use crate::upstream::UpstreamClient;

/// The tracer, when traces are on.
pub struct Traces {
    on: Option<On>,
}

struct On {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    sampling: Arc<ArcSwap<Sampler>>,
    propagator: TraceContextPropagator,
}

impl Traces {
    /// Traces off: every request skips them.
    pub fn off() -> Traces {
        Traces { on: None }
    }

    /// Starts the exporter when `config.enabled` (on the current Tokio runtime).
    pub fn start(config: &crate::config::Traces, client: UpstreamClient) -> anyhow::Result<Traces> {
        if !config.enabled {
            return Ok(Traces::off());
        }
        let transport = Transport {
            client,
            runtime: tokio::runtime::Handle::current(),
            timeout: config.export_timeout,
            failing: Arc::default(),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(config.endpoint.to_string())
            .with_timeout(config.export_timeout)
            .with_http_client(transport)
            .build()?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue)
            .with_max_export_batch_size(config.max_queue.min(512))
            .with_scheduled_delay(config.export_interval)
            .build();
        let sampling = Arc::new(ArcSwap::from_pointee(sampler(config.sampling)));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter).with_batch_config(batch).build(),
            )
            .with_sampler(Live(sampling.clone()))
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("tollgate");
        tracing::info!(endpoint = %config.endpoint, ratio = config.sampling.ratio,
            parent_based = config.sampling.parent_based, "traces exported over OTLP/HTTP");
        Ok(Traces {
            on: Some(On { provider, tracer, sampling, propagator: TraceContextPropagator::new() }),
        })
    }

    /// Applies a reloaded config's sampling to the next requests.
    pub fn set_sampling(&self, sampling: Sampling) {
        if let Some(on) = &self.on {
            on.sampling.store(Arc::new(sampler(sampling)));
        }
    }

    /// The span of a request whose head is `headers` (`None` when traces are off).
    pub fn begin(&self, headers: &HeaderMap) -> Option<CallSpan> {
        let on = self.on.as_ref()?;
        let parent = on.propagator.extract(&HeaderExtractor(headers));
        let span = on
            .tracer
            .span_builder("tollgate")
            .with_kind(SpanKind::Client)
            .start_with_context(&on.tracer, &parent);
        Some(CallSpan { span, named: false })
    }

    /// Sends the spans still queued (at shutdown), waiting at most `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        let Some(on) = &self.on else { return };
        let provider = on.provider.clone();
        // The SDK's shutdown blocks until its export thread is done: off the runtime, whose
        // threads the export itself needs.
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        if let Ok(Err(e)) = done.await {
            tracing::warn!(error = %e, "flushing traces at shutdown");
        }
    }
}

/// `traces.sample_ratio` (by trace id), under the caller's decision when `parent_based`.
fn sampler(s: Sampling) -> Sampler {
    let root = Sampler::TraceIdRatioBased(s.ratio);
    if s.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}

/// The provider's sampler: the one the config in force names, swapped on reload.
#[derive(Clone, Debug)]
struct Live(Arc<ArcSwap<Sampler>>);

impl ShouldSample for Live {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        self.0.load().should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// One proxied call's span. Dropping it without [`CallSpan::settled`] or
/// [`CallSpan::refused`] still ends it (the SDK ends a dropped span).
pub struct CallSpan {
    span: opentelemetry_sdk::trace::Span,
    /// [`CallSpan::request`] named it (the body was read).
    named: bool,
}

/// Attribute names (GenAI semantic conventions, then Tollgate's own).
mod key {
    pub const OPERATION: &str = "gen_ai.operation.name";
    pub const PROVIDER: &str = "gen_ai.provider.name";
    pub const REQUEST_MODEL: &str = "gen_ai.request.model";
    pub const MAX_TOKENS: &str = "gen_ai.request.max_tokens";
    pub const RESPONSE_MODEL: &str = "gen_ai.response.model";
    pub const FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
    pub const INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    pub const OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
    pub const CACHE_READ: &str = "gen_ai.usage.cache_read.input_tokens";
    pub const CACHE_CREATION: &str = "gen_ai.usage.cache_creation.input_tokens";
    pub const REASONING: &str = "gen_ai.usage.reasoning.output_tokens";
    pub const TOOL_NAME: &str = "gen_ai.tool.name";
    pub const MCP_METHOD: &str = "mcp.method.name";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const STATUS_CODE: &str = "http.response.status_code";
    pub const ERROR_TYPE: &str = "error.type";
    pub const DECISION: &str = "tollgate.decision";
    pub const REASON: &str = "tollgate.reason";
    pub const CLAUSE: &str = "tollgate.clause";
    pub const POLICY_VERSION: &str = "tollgate.policy_version";
    pub const COST_USD: &str = "tollgate.cost_usd";
    pub const COST_NANO_USD: &str = "tollgate.cost_nano_usd";
    pub const AGENT: &str = "tollgate.agent";
    pub const COST_CENTER: &str = "tollgate.cost_center";
    pub const PROJECT: &str = "tollgate.project";
    pub const REQUEST_ID: &str = "tollgate.request_id";
    pub const ROUTE: &str = "tollgate.route";
    pub const USAGE_SOURCE: &str = "tollgate.usage_source";
    pub const END: &str = "tollgate.end";
}

/// `gen_ai.operation.name` of a model API.
fn operation(api: Api) -> &'static str {
    match api {
        Api::ChatCompletions | Api::Responses | Api::Messages => "chat",
        Api::Completions => "text_completion",
        Api::Embeddings => "embeddings",
    }
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl CallSpan {
    /// Whether this span is recorded (sampled); an unrecorded one still propagates its ids.
    pub fn recording(&self) -> bool {
        self.span.is_recording()
    }

    /// Sets the `traceparent` (and `tracestate`, if any) of the upstream request: this span's
    /// trace, with this span as the parent.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let sc = self.span.span_context();
        if !sc.is_valid() {
            return;
        }
        headers.remove("tracestate");
        let cx = Context::new().with_remote_span_context(sc.clone());
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
            headers.remove("tracestate");
        }
    }

    /// Names the span and sets what the request says: operation, provider, requested model,
    /// output cap or tool, upstream address, route.
    pub fn request(
        &mut self,
        route: &Route,
        api: Option<Api>,
        info: &RequestInfo,
        tool: Option<&str>,
        request_id: &str,
    ) {
        if !self.recording() {
            return;
        }
        let s = &mut self.span;
        let mut attrs = Vec::with_capacity(8);
        let name = match (api, tool) {
            (Some(api), _) if route.kind.is_llm() => {
                let op = operation(api);
                attrs.push(KeyValue::new(key::OPERATION, op));
                attrs.push(KeyValue::new(key::PROVIDER, route.kind.provider()));
                if let Some(max) = info.max_output_tokens {
                    attrs.push(KeyValue::new(key::MAX_TOKENS, int(max)));
                }
                match &info.model {
                    Some(model) => {
                        attrs.push(KeyValue::new(key::REQUEST_MODEL, model.clone()));
                        format!("{op} {model}")
                    }
                    None => op.to_string(),
                }
            }
            (_, Some(tool)) => {
                attrs.push(KeyValue::new(key::OPERATION, "execute_tool"));
                attrs.push(KeyValue::new(key::TOOL_NAME, tool.to_string()));
                format!("execute_tool {tool}")
            }
            _ => match info.rpc.first() {
                Some(call) if route.kind == UpstreamKind::Mcp => {
                    attrs.push(KeyValue::new(key::MCP_METHOD, call.method.clone()));
                    call.method.clone()
                }
                _ => route.name.clone(),
            },
        };
        if route.kind == UpstreamKind::Mcp {
            if let Some(call) = info.rpc.first().filter(|_| tool.is_some()) {
                attrs.push(KeyValue::new(key::MCP_METHOD, call.method.clone()));
            }
        }
        if let Some(host) = route.upstream.host() {
            attrs.push(KeyValue::new(key::SERVER_ADDRESS, host.to_string()));
            let default = if route.upstream.scheme_str() == Some("http") { 80 } else { 443 };
            let port = route.upstream.port_u16().unwrap_or(default);
            attrs.push(KeyValue::new(key::SERVER_PORT, i64::from(port)));
        }
        attrs.push(KeyValue::new(key::ROUTE, route.name.clone()));
        attrs.push(KeyValue::new(key::REQUEST_ID, request_id.to_string()));
        s.update_name(name);
        s.set_attributes(attrs);
        self.named = true;
    }

    /// Ends the span of an admitted call with what the ledger records of it. `answered`: the
    /// upstream answered (else `record.status` is the proxy's own 502 or 504);
    /// `response_model`: the model the upstream named.
    pub fn settled(
        mut self,
        record: &UsageRecord,
        response_model: Option<&str>,
        finish_reasons: Vec<String>,
        answered: bool,
        end: StreamEnd,
        llm: bool,
    ) {
        if !self.recording() {
            return;
        }
        let mut attrs = Vec::with_capacity(24);
        if llm {
            let u = record.tokens;
            let input = u.input.saturating_add(u.cached_input).saturating_add(u.cache_write);
            // The conventions count cached input in the input tokens, and reasoning in the
            // output tokens; the ledger's buckets are disjoint.
            attrs.push(KeyValue::new(key::INPUT_TOKENS, int(input)));
            attrs
                .push(KeyValue::new(key::OUTPUT_TOKENS, int(u.output.saturating_add(u.reasoning))));
            for (name, n) in [
                (key::CACHE_READ, u.cached_input),
                (key::CACHE_CREATION, u.cache_write),
                (key::REASONING, u.reasoning),
            ] {
                if n > 0 {
                    attrs.push(KeyValue::new(name, int(n)));
                }
            }
            if let Some(model) = response_model {
                attrs.push(KeyValue::new(key::RESPONSE_MODEL, model.to_string()));
            }
            if !finish_reasons.is_empty() {
                let reasons = finish_reasons.into_iter().map(StringValue::from).collect();
                attrs
                    .push(KeyValue::new(key::FINISH_REASONS, Value::Array(Array::String(reasons))));
            }
            attrs.push(KeyValue::new(key::USAGE_SOURCE, record.usage_source.as_str()));
        }
        attrs.push(KeyValue::new(key::DECISION, record.decision.as_str()));
        attrs.push(KeyValue::new(key::REASON, record.reason.clone()));
        attrs.push(KeyValue::new(key::CLAUSE, record.clause.clone()));
        attrs.push(KeyValue::new(key::POLICY_VERSION, record.policy_version.clone()));
        // Exact: the nano-USD integer printed as a decimal, never a float.
        attrs.push(KeyValue::new(key::COST_USD, record.cost_usd.to_string()));
        attrs.push(KeyValue::new(key::COST_NANO_USD, record.cost_nano_usd));
        attrs.push(KeyValue::new(key::AGENT, record.agent.clone()));
        attrs.push(KeyValue::new(key::COST_CENTER, record.cost_center.clone()));
        attrs.push(KeyValue::new(key::PROJECT, record.project.clone()));
        attrs.push(KeyValue::new(key::STATUS_CODE, i64::from(record.status)));
        attrs.push(KeyValue::new(key::END, end.as_str()));
        let error = if !answered {
            Some(
                if record.status == 504 { "upstream_timeout" } else { "upstream_unavailable" }
                    .to_string(),
            )
        } else if record.status >= 500 {
            Some(record.status.to_string())
        } else {
            matches!(end, StreamEnd::UpstreamError | StreamEnd::IdleTimeout)
                .then(|| end.as_str().to_string())
        };
        if let Some(error) = error {
            self.span.set_status(Status::error(format!(
                "{error} (HTTP {}, {})",
                record.status,
                end.as_str()
            )));
            attrs.push(KeyValue::new(key::ERROR_TYPE, error));
        }
        self.span.set_attributes(attrs);
        self.span.end();
    }

    /// Ends the span of a refused call: the decision, reason, clause and the attribution the
    /// request claimed. A refusal in the 5xx range (the proxy overloaded or not ready) is an
    /// error; a policy's refusal is not.
    pub fn refused(mut self, denial: &Denial, who: [String; 3], route: &str, request_id: &str) {
        if !self.recording() {
            return;
        }
        let status = denial.class.status();
        let [agent, cost_center, project] = who;
        let mut attrs = vec![
            KeyValue::new(key::DECISION, denial.class.decision()),
            KeyValue::new(key::REASON, denial.code.clone()),
            KeyValue::new(key::AGENT, agent),
            KeyValue::new(key::COST_CENTER, cost_center),
            KeyValue::new(key::PROJECT, project),
            KeyValue::new(key::STATUS_CODE, i64::from(status)),
            KeyValue::new(key::COST_USD, "0.00"),
            KeyValue::new(key::COST_NANO_USD, 0i64),
            KeyValue::new(key::REQUEST_ID, request_id.to_string()),
        ];
        if !route.is_empty() {
            attrs.push(KeyValue::new(key::ROUTE, route.to_string()));
        }
        if !self.named {
            // Refused from the request head (attribution, no route, too large): no operation
            // or model is known.
            self.span.update_name(if route.is_empty() { "tollgate" } else { route }.to_string());
        }
        if let Some(clause) = &denial.clause {
            attrs.push(KeyValue::new(key::CLAUSE, clause.clone()));
        }
        if let Some(version) = &denial.policy_version {
            attrs.push(KeyValue::new(key::POLICY_VERSION, version.clone()));
        }
        if status >= 500 {
            self.span.set_status(Status::error(denial.message.clone()));
            attrs.push(KeyValue::new(key::ERROR_TYPE, denial.code.clone()));
        }
        self.span.set_attributes(attrs);
        self.span.end();
    }
}

/// The OTLP exporter's HTTP client: the proxy's own (pooled, rustls, the same extra CA), run on
/// the proxy's runtime. The SDK's batch thread waits for the answer; requests never do.
#[derive(Clone)]
pub struct Transport {
    client: UpstreamClient,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    /// The last export failed: logged once when exports start failing and once when they work
    /// again, not at every batch.
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("timeout", &self.timeout).finish()
    }
}

/// Most bytes of a collector's answer read (it is only looked at for errors).
const MAX_ANSWER: usize = 64 * 1024;

#[async_trait::async_trait]
impl HttpClient for Transport {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let request = request.map(crate::deny::full);
        let sent = self.runtime.spawn(async move {
            let exchange = async {
                let response = client.request(request).await?;
                let (parts, body) = response.into_parts();
                let body = http_body_util::Limited::new(body, MAX_ANSWER).collect().await?;
                Ok::<_, HttpError>(http::Response::from_parts(parts, body.to_bytes()))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer from the collector within {timeout:?}").into()),
            }
        });
        let answer = sent.await?;
        let ok = answer.as_ref().is_ok_and(|r| r.status().is_success());
        if ok == self.failing.swap(!ok, std::sync::atomic::Ordering::Relaxed) {
            match &answer {
                Ok(r) if ok => {
                    tracing::info!(status = r.status().as_u16(), "exporting traces works again")
                }
                Ok(r) => tracing::warn!(
                    status = r.status().as_u16(),
                    "the traces collector refused a batch; spans are dropped while it does"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "exporting traces failed; spans are dropped while it does")
                }
            }
        }
        answer
    }
}
