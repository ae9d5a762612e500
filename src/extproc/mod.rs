//! Envoy ext_proc server: one gRPC stream per HTTP request; picks from the snapshot, never a mailbox.

pub mod usage;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse, body_mutation, processing_request, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use futures::Stream;
use inferlane_epp::request::{self, ApiKind};
use inferlane_epp::scheduler::{Candidate, ModelPresence, PickInput, pool_saturation};
use inferlane_epp::{PickError, RuleError};
use serde_json::json;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::flow_control::{
    DEFAULT_FLOW, FAIRNESS_HEADER, FlowControl, FlowRequest, MAX_FAIRNESS_ID_BYTES, Pass,
};
use crate::pool::labels::{for_log, model_label};
use crate::pool::metrics::EppMetrics;
use crate::pool::metrics::{EndpointLabels, ErrorLabels, ModelLabels};
use crate::pool::state::{EndpointHandle, Shared};
use usage::UsageParser;

/// Header carrying the decision to the gateway (and Envoy's ORIGINAL_DST cluster).
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
const LB_NAMESPACE: &str = "envoy.lb";
const STREAM_CHUNK: usize = 64 * 1024;
/// Room kept after an announced body for in-place rewrites (target names are at most 256
/// bytes by the CRDs; a priority is a few).
const REWRITE_SLACK: usize = 1024;

/// Whether Envoy streams this request's body in FULL_DUPLEX_STREAMED mode (read from the
/// request headers message's protocol config; every later message follows that mode).
pub(crate) fn is_full_duplex(msg: &ProcessingRequest) -> bool {
    msg.protocol_config
        .as_ref()
        .is_some_and(|p| p.request_body_mode == BodySendMode::FullDuplexStreamed as i32)
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ExtProcOptions {
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// Put the client's model name back into responses of rewritten requests.
    pub restore_model_name: bool,
    /// Honour `x-gateway-model-name-rewrite` (only where the gateway owns that header).
    pub trust_model_rewrite_header: bool,
}

/// The ext_proc service.
#[derive(Clone)]
pub struct ExtProc {
    shared: Arc<Shared>,
    opts: ExtProcOptions,
    metrics: EppMetrics,
    flow: Option<Arc<FlowControl>>,
}

impl ExtProc {
    pub fn new(shared: Arc<Shared>, opts: ExtProcOptions, metrics: EppMetrics) -> Self {
        Self {
            shared,
            opts,
            metrics,
            flow: None,
        }
    }

    /// Admits requests through flow control (held while the pool is saturated).
    pub fn with_flow_control(mut self, flow: Arc<FlowControl>) -> Self {
        self.flow = Some(flow);
        self
    }
}

pub(crate) type Tx = mpsc::Sender<Result<ProcessingResponse, Status>>;

/// Decrements the endpoint's in-flight counter when the request's stream ends, and tells
/// flow control's dispatcher (if any, and if anything is held) that a server has room.
struct InFlight(Arc<EndpointHandle>, Option<Arc<FlowControl>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(fc) = &self.1 {
            fc.room_freed();
        }
    }
}

/// An answer sent instead of forwarding the request.
#[derive(Debug)]
struct Reject {
    status: u16,
    message: String,
    code: &'static str,
}

impl Reject {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

#[derive(Default)]
struct RequestState {
    headers: RequestHeaders,
    full_duplex: bool,
    body: Vec<u8>,
    subset: Option<Vec<String>>,
    requested_model: String,
    target_model: String,
    /// Metric label values of the two: the name itself when a rule or a server knows it,
    /// otherwise [`crate::pool::labels::OTHER_MODEL`], so clients cannot mint series.
    model_label: String,
    target_label: String,
    in_flight: Option<InFlight>,
    usage: Option<UsageParser>,
    /// Set for rewritten requests when --restore-model-name is on.
    restorer: Option<usage::ModelRestorer>,
    response_status: u16,
    /// A request body phase was opened (a body message arrived): only then does a
    /// full-duplex request get its body streamed back.
    body_seen: bool,
    /// Flow control let it through (its flow is charged its usage at the end).
    flow_pass: Option<Pass>,
    /// When its request headers arrived (for the end-to-end duration).
    started: Option<Instant>,
}

/// The request headers routing reads; the others are left unread (no copies, no map).
#[derive(Default)]
struct RequestHeaders {
    path: Option<String>,
    /// The gateway's `x-request-id`, or the one the EPP generated; carried into the logs.
    request_id: Option<String>,
    objective: Option<String>,
    model_rewrite: Option<String>,
    /// `x-gateway-inference-fairness-id`: the request's flow for flow control.
    fairness_id: Option<String>,
    /// The body's announced size, to allocate for it once.
    content_length: Option<usize>,
}

impl RequestHeaders {
    /// Reads `h` into the wanted fields (names compared without case; a repeated header's
    /// last copy wins, as a map would have kept it).
    fn read(&mut self, h: &HttpHeaders) {
        let Some(map) = &h.headers else { return };
        for hv in &map.headers {
            let slot = if hv.key.eq_ignore_ascii_case(":path") {
                &mut self.path
            } else if hv.key.eq_ignore_ascii_case(REQUEST_ID_HEADER) {
                &mut self.request_id
            } else if hv.key.eq_ignore_ascii_case(OBJECTIVE_HEADER) {
                &mut self.objective
            } else if hv.key.eq_ignore_ascii_case(MODEL_REWRITE_HEADER) {
                &mut self.model_rewrite
            } else if hv.key.eq_ignore_ascii_case(FAIRNESS_HEADER) {
                &mut self.fairness_id
            } else if hv.key.eq_ignore_ascii_case("content-length") {
                self.content_length = header_value(hv).trim().parse().ok();
                continue;
            } else {
                continue;
            };
            *slot = Some(header_value(hv));
        }
    }

    fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("")
    }

    fn request_id(&self) -> &str {
        self.request_id.as_deref().unwrap_or("")
    }
}

const REQUEST_ID_HEADER: &str = "x-request-id";
const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";

fn header_value(h: &HeaderValue) -> String {
    if h.raw_value.is_empty() {
        h.value.clone()
    } else {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    }
}

pub(crate) fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            // Envoy 1.40 reads raw_value; `value` would arrive empty.
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> PbValue {
    PbValue {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn lb_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_HEADER.to_string(), string_value(destination))]
            .into_iter()
            .collect(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            PbValue {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into_iter()
        .collect(),
    }
}

fn subset_hint(req: &ProcessingRequest) -> Option<Vec<String>> {
    let md = req.metadata_context.as_ref()?;
    let ns = md.filter_metadata.get(SUBSET_NAMESPACE)?;
    let v = ns.fields.get(SUBSET_KEY)?;
    match v.kind.as_ref()? {
        Kind::ListValue(l) => Some(
            l.values
                .iter()
                .filter_map(|v| match v.kind.as_ref()? {
                    Kind::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
        ),
        Kind::StringValue(s) => Some(
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
        ),
        _ => None,
    }
}

fn immediate(r: &Reject) -> ProcessingResponse {
    immediate_error(r.status, r.code, &r.message)
}

/// An immediate answer to the client with a JSON error body (`{"error": {...}}`, as vLLM's).
pub(crate) fn immediate_error(status: u16, code: &str, message: &str) -> ProcessingResponse {
    let body = json!({"error": {"message": message, "type": code, "code": status}}).to_string();
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: Some(HeaderMutation {
                    set_headers: vec![set_header("content-type", "application/json")],
                    ..Default::default()
                }),
                body: body.into_bytes(),
                details: format!("epp_{code}"),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

pub(crate) fn reply(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

fn with_metadata(mut r: ProcessingResponse, md: Option<Struct>) -> ProcessingResponse {
    r.dynamic_metadata = md;
    r
}

/// The empty answer for a phase: continue unchanged.
pub(crate) fn pass_through(req: &processing_request::Request) -> ProcessingResponse {
    use processing_request::Request as Rq;
    use processing_response::Response as Rs;
    reply(match req {
        Rq::RequestHeaders(_) => Rs::RequestHeaders(HeadersResponse::default()),
        Rq::ResponseHeaders(_) => Rs::ResponseHeaders(HeadersResponse::default()),
        Rq::RequestBody(_) => Rs::RequestBody(BodyResponse::default()),
        Rq::ResponseBody(_) => Rs::ResponseBody(BodyResponse::default()),
        Rq::RequestTrailers(_) => Rs::RequestTrailers(TrailersResponse::default()),
        Rq::ResponseTrailers(_) => Rs::ResponseTrailers(TrailersResponse::default()),
    })
}

pub(crate) fn continue_headers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse::default(),
        )),
        ..Default::default()
    }
}

/// The routing decision: where to send the request and how to change it.
struct Decision {
    destination: String,
    extra_headers: Vec<HeaderValueOption>,
    /// The request body (rewritten in place) must be sent on.
    body_changed: bool,
}

/// A request read and resolved through the model rules, before it is admitted and picked.
struct Prepared {
    started: Instant,
    parsed: Option<request::ParsedRequest>,
    resolved: Option<inferlane_epp::rules::Resolved>,
    extra_headers: Vec<HeaderValueOption>,
}

impl ExtProc {
    /// Reads the body and resolves the model through the rules (what flow control needs to
    /// queue it: its priority and size).
    fn prepare(&self, st: &mut RequestState) -> Result<Prepared, Reject> {
        let started = Instant::now();
        let api = ApiKind::from_path(st.headers.path());
        let snap = self.shared.snapshot.load();
        let cfg = self.shared.scheduler.load();
        let mut extra_headers = Vec::new();
        if st.headers.request_id.is_none() {
            let id = format!("{:032x}", rand::random::<u128>());
            extra_headers.push(set_header(REQUEST_ID_HEADER, &id));
            st.headers.request_id = Some(id);
        }
        let parsed = if st.body.is_empty() {
            None
        } else {
            // Prefix routing hashes at most this much of the prompt: keep no more of it.
            let prompt_cap = if cfg.prefix_cache_weight > 0.0 {
                cfg.prefix_block_chars.saturating_mul(cfg.prefix_max_blocks)
            } else {
                0
            };
            Some(
                request::parse_body_capped(api, &st.body, prompt_cap)
                    .map_err(|e| Reject::new(400, "BadRequest", e.to_string()))?,
            )
        };
        let resolved = match &parsed {
            Some(p) => {
                // Named before anything can reject the request, so its errors (404, 429,
                // 503) are counted under the model, as upstream does.
                st.requested_model.clone_from(&p.model);
                st.model_label = model_label(&snap, &p.model);
                let objective = st.headers.objective.as_deref();
                let rewrite = st
                    .headers
                    .model_rewrite
                    .as_deref()
                    .filter(|_| self.opts.trust_model_rewrite_header);
                let r = snap
                    .rules
                    .resolve(&p.model, objective, rewrite, rand::random::<f64>())
                    .map_err(|e| match e {
                        RuleError::UnknownModel(_) => {
                            Reject::new(404, "ModelNotFound", e.to_string())
                        }
                        _ => Reject::new(400, "BadRequest", e.to_string()),
                    })?;
                st.requested_model.clone_from(&r.requested);
                st.target_model.clone_from(&r.target);
                st.target_label = if r.target == r.requested {
                    st.model_label.clone()
                } else {
                    model_label(&snap, &r.target)
                };
                Some(r)
            }
            None => None,
        };
        Ok(Prepared {
            started,
            parsed,
            resolved,
            extra_headers,
        })
    }

    /// Picks for a prepared request; the only shared writes are atomics and the prefix index.
    fn decide(
        &self,
        st: &mut RequestState,
        prepared: Prepared,
        admitted: bool,
    ) -> Result<Decision, Reject> {
        let Prepared {
            started,
            parsed,
            resolved,
            mut extra_headers,
        } = prepared;
        let snap = self.shared.snapshot.load();
        let cfg = self.shared.scheduler.load();
        let prompt = parsed.as_ref().map_or("", |p| p.prompt.as_str());
        let target = resolved.as_ref().map(|r| r.target.clone());
        let endpoints: Vec<&Arc<EndpointHandle>> = match &st.subset {
            Some(list) => {
                if list.is_empty() {
                    return Err(Reject::new(
                        503,
                        "ServiceUnavailable",
                        "the gateway's subset hint lists no endpoints",
                    ));
                }
                snap.endpoints
                    .iter()
                    .filter(|h| list.iter().any(|a| *a == h.address))
                    .collect()
            }
            None => snap.endpoints.iter().collect(),
        };
        let now = Instant::now();
        let scraped: Vec<_> = endpoints.iter().map(|h| h.scraped.load_full()).collect();
        let models: Vec<_> = endpoints.iter().map(|h| h.models.load_full()).collect();
        let is_adapter = target.as_ref().is_some_and(|t| {
            models.iter().flatten().any(|m| m.adapters.contains(t))
                && !models.iter().flatten().any(|m| m.base.contains(t))
        });
        let candidates: Vec<Candidate<'_>> = endpoints
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let has_model = match (&target, &models[i]) {
                    (None, _) => ModelPresence::Yes,
                    (Some(_), None) => ModelPresence::Unknown,
                    (Some(t), Some(m)) => {
                        if m.contains(t) {
                            ModelPresence::Yes
                        } else {
                            ModelPresence::No
                        }
                    }
                };
                h.candidate(&scraped[i], now, has_model)
            })
            .collect();
        let seed = target.as_deref().unwrap_or("");
        let blocks = if cfg.prefix_cache_weight > 0.0 {
            request::prefix_blocks(seed, prompt, cfg.prefix_block_chars, cfg.prefix_max_blocks)
        } else {
            Vec::new()
        };
        let matches = if blocks.is_empty() {
            HashMap::new()
        } else {
            self.shared
                .prefix
                .lock()
                .expect("prefix lock")
                .match_lengths(&blocks)
        };
        let affinity_key = match blocks.len().min(cfg.rendezvous_blocks) {
            0 => None,
            n => Some(blocks[n - 1]),
        };
        // Where the prefix lives: a function of the active prefixes and the endpoints that
        // can serve it, the same on every replica (adapters follow LoRA affinity instead).
        let affinity_home = match affinity_key {
            Some(key) if cfg.prefix_balance_factor > 0.0 && !is_adapter => {
                let keys: Vec<u64> = candidates
                    .iter()
                    .filter(|c| c.healthy && c.has_model != ModelPresence::No)
                    .map(|c| c.key)
                    .collect();
                let mut placement = crate::pool::state::lock_placement(&self.shared);
                placement.set_factor(cfg.prefix_balance_factor);
                placement.place(key, &keys, self.shared.epoch.elapsed().as_secs_f64())
            }
            _ => None,
        };
        let input = PickInput {
            target: seed,
            is_adapter,
            sheddable: resolved.as_ref().is_some_and(|r| r.sheddable()),
            prefix_matches: &matches,
            total_blocks: blocks.len(),
            tie_break: rand::random(),
            admitted,
            affinity_key,
            affinity_home,
        };
        let picked = inferlane_epp::pick(&cfg, &candidates, &input).map_err(|e| {
            // A model no rule names and no server lists does not exist here: 404, as vLLM
            // answers it (a named model whose servers lack it is a 503: it may come back).
            if let PickError::ModelUnavailable(m) = &e
                && !snap.rules.knows(&st.requested_model)
            {
                return Reject::new(
                    404,
                    "ModelNotFound",
                    format!("The model `{m}` does not exist in this pool: no InferenceModel names it and no model server lists it."),
                );
            }
            let code = match e {
                PickError::Saturated => "TooManyRequests",
                _ => "ServiceUnavailable",
            };
            if matches!(e, PickError::Saturated) {
                tracing::debug!(saturation = pool_saturation(&cfg, &candidates), "shedding");
            }
            Reject::new(e.status(), code, e.to_string())
        })?;
        let chosen = endpoints[picked[0]];
        chosen
            .dispatched_since_scrape
            .fetch_add(1, Ordering::Relaxed);
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        st.in_flight = Some(InFlight(chosen.clone(), self.flow.clone()));
        if !blocks.is_empty() {
            self.shared
                .prefix
                .lock()
                .expect("prefix lock")
                .insert(&blocks, chosen.id);
        }
        let destination = picked
            .iter()
            .map(|&i| endpoints[i].address.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut body_changed = false;
        if let (Some(r), Some(_)) = (&resolved, &parsed) {
            if r.rewritten() && self.opts.restore_model_name {
                st.restorer = Some(usage::ModelRestorer::new(&r.target, &r.requested));
            }
            let priority =
                (cfg.forward_priority && r.priority != 0).then(|| -i64::from(r.priority));
            if r.rewritten() || priority.is_some() {
                request::rewrite_in_place(&mut st.body, &r.target, priority)
                    .map_err(|e| Reject::new(400, "BadRequest", e.to_string()))?;
                if !st.full_duplex {
                    extra_headers.push(set_header("content-length", &st.body.len().to_string()));
                }
                body_changed = true;
            }
            self.metrics
                .requests
                .get_or_create(&ModelLabels {
                    model_name: st.model_label.clone(),
                    target_model_name: st.target_label.clone(),
                })
                .inc();
            st.usage = Some(UsageParser::default());
        }
        self.metrics
            .picks
            .get_or_create(&EndpointLabels {
                endpoint: chosen.address.clone(),
            })
            .inc();
        self.metrics
            .scheduler_e2e
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(request_id = for_log(st.headers.request_id()), model = for_log(&st.requested_model), target = for_log(&st.target_model), endpoint = %destination, "picked");
        Ok(Decision {
            destination,
            extra_headers,
            body_changed,
        })
    }

    fn record_error(&self, st: &RequestState, status: u16) {
        self.metrics
            .errors
            .get_or_create(&ErrorLabels {
                model_name: st.model_label.clone(),
                target_model_name: st.target_label.clone(),
                error_code: status.to_string(),
            })
            .inc();
    }

    /// Flow control's admission: `Ok(false)` without flow control, `Ok(true)` once admitted
    /// (possibly after being held), or the answer the client gets.
    async fn admit(&self, st: &mut RequestState, p: &Prepared) -> Result<bool, Reject> {
        let Some(fc) = &self.flow else {
            return Ok(false);
        };
        let fairness_id = match st.headers.fairness_id.as_deref() {
            None | Some("") => DEFAULT_FLOW.to_string(),
            Some(id) if id.len() > MAX_FAIRNESS_ID_BYTES => {
                return Err(Reject::new(
                    400,
                    "BadRequest",
                    format!(
                        "{FAIRNESS_HEADER} is longer than {MAX_FAIRNESS_ID_BYTES} bytes; use a shorter tenant id"
                    ),
                ));
            }
            Some(id) => id.to_string(),
        };
        let req = FlowRequest {
            fairness_id,
            priority: p.resolved.as_ref().map_or(0, |r| r.priority),
            bytes: st.body.len() as u64,
            // ~4 bytes per token: the charge at dispatch, corrected by the reported usage.
            prompt_tokens: st.body.len() as f64 / 4.0,
            model_label: st.model_label.clone(),
            target_label: st.target_label.clone(),
        };
        match fc.admit(req).await {
            Ok(pass) => {
                st.flow_pass = Some(pass);
                Ok(true)
            }
            Err(e) => {
                let (status, code) = e.status();
                Err(Reject::new(status, code, e.to_string()))
            }
        }
    }

    /// Answers for the request once its body (if any) is complete.
    async fn route(&self, st: &mut RequestState, tx: &Tx) -> Result<bool, Status> {
        let decided = match self.prepare(st) {
            Err(r) => Err(r),
            Ok(prepared) => match self.admit(st, &prepared).await {
                Err(r) => Err(r),
                Ok(admitted) => {
                    let d = self.decide(st, prepared, admitted);
                    if let Some(p) = st.flow_pass.as_mut() {
                        p.picked();
                    }
                    d
                }
            },
        };
        match decided {
            Ok(d) => {
                let mut set_headers = vec![set_header(DESTINATION_HEADER, &d.destination)];
                set_headers.extend(d.extra_headers);
                let mut remove_headers = Vec::new();
                if self.flow.is_some() && st.headers.fairness_id.is_some() {
                    // Upstream strips it: it is the gateway's, not the model server's.
                    remove_headers.push(FAIRNESS_HEADER.to_string());
                }
                if st.full_duplex {
                    // The body goes upstream chunked.
                    remove_headers.push("content-length".to_string());
                }
                let common = CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers,
                        remove_headers,
                    }),
                    clear_route_cache: true,
                    ..Default::default()
                };
                let metadata = Some(lb_metadata(&d.destination));
                if st.full_duplex || st.body.is_empty() {
                    // Full duplex holds the headers answer for the decision; a request without
                    // a body gets it on the headers message.
                    send(
                        tx,
                        with_metadata(
                            reply(processing_response::Response::RequestHeaders(
                                HeadersResponse {
                                    response: Some(common),
                                },
                            )),
                            metadata,
                        ),
                    )
                    .await?;
                    // A request without a body has no body phase to answer: an answer
                    // there is a protocol error to Envoy ("spurious response message").
                    if st.full_duplex && st.body_seen {
                        let body = std::mem::take(&mut st.body);
                        send_streamed_body(tx, &body).await?;
                    }
                } else {
                    let mut common = common;
                    if d.body_changed {
                        common.body_mutation = Some(BodyMutation {
                            mutation: Some(body_mutation::Mutation::Body(std::mem::take(
                                &mut st.body,
                            ))),
                        });
                    }
                    send(
                        tx,
                        with_metadata(
                            reply(processing_response::Response::RequestBody(BodyResponse {
                                response: Some(common),
                            })),
                            metadata,
                        ),
                    )
                    .await?;
                }
                Ok(true)
            }
            Err(r) => {
                self.record_error(st, r.status);
                tracing::info!(
                    request_id = for_log(st.headers.request_id()),
                    model = for_log(&st.requested_model),
                    status = r.status,
                    reason = %r.message,
                    path = %st.headers.path(),
                    "request rejected"
                );
                send(tx, immediate(&r)).await?;
                Ok(false)
            }
        }
    }

    async fn handle_stream(
        &self,
        inbound: &mut Streaming<ProcessingRequest>,
        tx: &Tx,
    ) -> Result<(), Status> {
        let mut st = RequestState::default();
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                // Envoy resets the stream once the HTTP exchange is over; that is the normal
                // end of a request we already routed.
                Err(e) if st.in_flight.is_some() => {
                    tracing::trace!(error = %e, "gateway ended the stream");
                    break;
                }
                Err(e) => return Err(e),
            };
            if matches!(
                msg.request,
                Some(processing_request::Request::RequestHeaders(_))
            ) {
                st.full_duplex = is_full_duplex(&msg);
                st.subset = subset_hint(&msg);
            }
            // Owned, so a body chunk is moved into the request state, not copied.
            let Some(req) = msg.request else {
                continue;
            };
            match req {
                processing_request::Request::RequestHeaders(ref h) => {
                    st.started = Some(Instant::now());
                    st.headers.read(h);
                    // A streamed body arrives in chunks: room for all of it at once (no
                    // doubling copies), within the limit, plus slack for a rewrite to patch
                    // it in place. A buffered body arrives whole and is moved, not copied.
                    if st.full_duplex
                        && let Some(n) = st.headers.content_length
                        && n <= self.opts.max_body_bytes
                    {
                        st.body.reserve_exact(n + REWRITE_SLACK);
                    }
                    if h.end_of_stream {
                        if !self.route(&mut st, tx).await? {
                            return Ok(());
                        }
                    } else if !st.full_duplex {
                        send(tx, continue_headers()).await?;
                    }
                }
                processing_request::Request::RequestBody(b) => {
                    if st.body.len() + b.body.len() > self.opts.max_body_bytes {
                        let r = Reject::new(
                            413,
                            "PayloadTooLarge",
                            format!(
                                "request body larger than {} bytes (--max-body-bytes)",
                                self.opts.max_body_bytes
                            ),
                        );
                        self.record_error(&st, 413);
                        send(tx, immediate(&r)).await?;
                        return Ok(());
                    }
                    st.body_seen = true;
                    if st.body.is_empty() && st.body.capacity() < b.body.len() {
                        // Moved, not copied; a rewrite that needs more room grows it then.
                        st.body = b.body;
                    } else {
                        st.body.extend_from_slice(&b.body);
                    }
                    if b.end_of_stream && !self.route(&mut st, tx).await? {
                        return Ok(());
                    }
                }
                processing_request::Request::RequestTrailers(_) => {
                    if st.in_flight.is_none() && !self.route(&mut st, tx).await? {
                        return Ok(());
                    }
                    send(tx, pass_through(&req)).await?;
                }
                processing_request::Request::ResponseHeaders(ref h) => {
                    st.response_status = find_header(h, ":status")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    if st.response_status >= 400 {
                        self.record_error(&st, st.response_status);
                        if st.response_status == 404
                            && let Some(f) = &st.in_flight
                        {
                            // The server no longer has the model: re-read its list now.
                            f.0.models_stale.store(true, Ordering::Relaxed);
                        }
                    }
                    if let Some(f) = &st.in_flight {
                        self.shared.observe_answer(&f.0, st.response_status);
                    }
                    // Upstream's EPP marks every response it saw; some tooling checks for it.
                    let mut mutation = HeaderMutation {
                        set_headers: vec![set_header("x-went-into-resp-headers", "true")],
                        ..Default::default()
                    };
                    if st.restorer.is_some() {
                        // The body changes size when the model name is put back.
                        mutation.remove_headers.push("content-length".into());
                    }
                    let common = CommonResponse {
                        header_mutation: Some(mutation),
                        ..Default::default()
                    };
                    send(
                        tx,
                        reply(processing_response::Response::ResponseHeaders(
                            HeadersResponse {
                                response: Some(common),
                            },
                        )),
                    )
                    .await?;
                }
                processing_request::Request::ResponseBody(b) => {
                    let mut out = None;
                    if let Some(u) = st.usage.as_mut() {
                        u.feed(&b.body);
                    }
                    if let Some(r) = st.restorer.as_mut() {
                        out = Some(r.feed(&b.body, b.end_of_stream));
                    }
                    // A routed request (its usage parser is set when it was counted): its
                    // duration, and its token counts when the response carried usage.
                    if b.end_of_stream
                        && let Some(u) = st.usage.take()
                    {
                        let l = ModelLabels {
                            model_name: st.model_label.clone(),
                            target_model_name: st.target_label.clone(),
                        };
                        if let Some(t) = st.started {
                            self.metrics
                                .request_duration
                                .get_or_create(&l)
                                .observe(t.elapsed().as_secs_f64());
                        }
                        if let Some((prompt, completion)) = u.finish() {
                            self.metrics
                                .input_tokens
                                .get_or_create(&l)
                                .observe(prompt as f64);
                            self.metrics
                                .output_tokens
                                .get_or_create(&l)
                                .observe(completion as f64);
                            if let Some(pass) = &st.flow_pass {
                                pass.charge_usage(prompt, completion);
                            }
                        }
                    }
                    let common = CommonResponse {
                        body_mutation: out.map(|b| BodyMutation {
                            mutation: Some(body_mutation::Mutation::Body(b)),
                        }),
                        ..Default::default()
                    };
                    send(
                        tx,
                        reply(processing_response::Response::ResponseBody(BodyResponse {
                            response: Some(common),
                        })),
                    )
                    .await?;
                }
                processing_request::Request::ResponseTrailers(_) => {
                    send(tx, pass_through(&req)).await?;
                }
            }
        }
        Ok(())
    }
}

/// One header's value (names compared without case), without building a map of them all.
fn find_header(h: &HttpHeaders, name: &str) -> Option<String> {
    h.headers
        .as_ref()?
        .headers
        .iter()
        .find(|hv| hv.key.eq_ignore_ascii_case(name))
        .map(header_value)
}

/// The answers to a FULL_DUPLEX_STREAMED request body: the (possibly rewritten) body echoed
/// back in <= 64 KiB `streamed_response` chunks, the last one marked end of stream.
pub(crate) fn streamed_body(body: &[u8]) -> impl Iterator<Item = ProcessingResponse> + '_ {
    let n = body.len().div_ceil(STREAM_CHUNK).max(1);
    // An empty body still gets its one end-of-stream answer.
    let empty = body.is_empty().then_some(&[][..]);
    body.chunks(STREAM_CHUNK)
        .chain(empty)
        .enumerate()
        .map(move |(i, chunk)| {
            let r = CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::StreamedResponse(
                        StreamedBodyResponse {
                            body: chunk.to_vec(),
                            end_of_stream: i + 1 == n,
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            };
            reply(processing_response::Response::RequestBody(BodyResponse {
                response: Some(r),
            }))
        })
}

/// Sends [`streamed_body`]'s answers.
pub(crate) async fn send_streamed_body(tx: &Tx, body: &[u8]) -> Result<(), Status> {
    for r in streamed_body(body) {
        send(tx, r).await?;
    }
    Ok(())
}

pub(crate) async fn send(tx: &Tx, resp: ProcessingResponse) -> Result<(), Status> {
    tx.send(Ok(resp))
        .await
        .map_err(|_| Status::cancelled("gateway closed the stream"))
}

/// The stream type both ext_proc services answer with.
pub(crate) type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

/// Runs one ext_proc stream's handler inside its response stream and returns its answers as
/// that stream. A handler error ends the stream with that gRPC status: never silently, or
/// Envoy would forward the request without a decision.
///
/// The handler is polled by the task that writes the answers (hyper's per-stream task), not
/// spawned as a task of its own: no second task per request and no cross-task wake-up per
/// answer (measured: docs/benchmarks.md). It makes progress whenever hyper polls for the next
/// answer, which it does until the stream ends; when the gateway resets the stream, hyper
/// drops the response stream and with it the handler and its request state.
pub(crate) fn driven_processor<F, Fut>(span: tracing::Span, run: F) -> Response<ResponseStream>
where
    F: FnOnce(Tx) -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    Response::new(Box::pin(Driven {
        handler: Some(Box::pin(run(tx).instrument(span))),
        answers: rx,
        failed: None,
    }))
}

/// A response stream that drives its own handler: see [`driven_processor`].
struct Driven<Fut> {
    handler: Option<Pin<Box<tracing::instrument::Instrumented<Fut>>>>,
    answers: mpsc::Receiver<Result<ProcessingResponse, Status>>,
    /// The handler's error, sent after the answers it queued before failing.
    failed: Option<Status>,
}

impl<Fut> Stream for Driven<Fut>
where
    Fut: std::future::Future<Output = Result<(), Status>>,
{
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(h) = this.handler.as_mut()
            && let Poll::Ready(done) = h.as_mut().poll(cx)
        {
            // Dropping the handler drops its sender: the channel ends once drained.
            this.handler = None;
            if let Err(status) = done {
                if status.code() != tonic::Code::Cancelled {
                    tracing::warn!(error = %status, "ext_proc stream failed");
                }
                this.failed = Some(status);
            }
        }
        match this.answers.poll_recv(cx) {
            Poll::Ready(Some(answer)) => Poll::Ready(Some(answer)),
            Poll::Ready(None) => Poll::Ready(this.failed.take().map(Err)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let this = self.clone();
        Ok(driven_processor(
            tracing::debug_span!("ext_proc"),
            move |tx| async move { this.handle_stream(&mut inbound, &tx).await },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;

    fn headers(pairs: &[(&str, &str)]) -> HttpHeaders {
        HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).into(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn request_headers_keep_only_what_routing_reads() {
        let mut h = RequestHeaders::default();
        h.read(&headers(&[
            (":path", "/v1/chat/completions"),
            ("X-Request-Id", "abc"),
            ("x-gateway-inference-objective", "first"),
            ("X-Gateway-Inference-Objective", "critical"),
            ("user-agent", "curl"),
        ]));
        assert_eq!(h.path(), "/v1/chat/completions");
        assert_eq!(h.request_id(), "abc");
        assert_eq!(h.objective.as_deref(), Some("critical"));
        assert_eq!(h.model_rewrite, None);

        let mut h = RequestHeaders::default();
        h.read(&headers(&[("x-gateway-model-name-rewrite", "fast")]));
        assert_eq!(h.path(), "");
        assert_eq!(h.request_id, None);
        assert_eq!(h.model_rewrite.as_deref(), Some("fast"));
    }

    fn chunks(body: &[u8]) -> Vec<(usize, bool)> {
        streamed_body(body)
            .map(|r| match r.response {
                Some(processing_response::Response::RequestBody(BodyResponse {
                    response: Some(c),
                })) => match c.body_mutation.and_then(|m| m.mutation) {
                    Some(body_mutation::Mutation::StreamedResponse(s)) => {
                        (s.body.len(), s.end_of_stream)
                    }
                    other => panic!("not a streamed body: {other:?}"),
                },
                other => panic!("not a body answer: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn streamed_bodies_go_back_in_64_kib_chunks_the_last_marked() {
        assert_eq!(chunks(b""), [(0, true)]);
        assert_eq!(chunks(&[b'x'; 10]), [(10, true)]);
        assert_eq!(chunks(&[b'x'; STREAM_CHUNK]), [(STREAM_CHUNK, true)]);
        assert_eq!(
            chunks(&vec![b'x'; 2 * STREAM_CHUNK + 1]),
            [(STREAM_CHUNK, false), (STREAM_CHUNK, false), (1, true)]
        );
    }
}
