//! The collector's side of the Envoy filters' oversight reports:
//! `POST /v1/fleet/oversight/reports` (`tollgate_core::guardrails::report`). A filter reports
//! each of its circuit breakers that opened and each agent its error escalation disabled; the
//! collector does what a sidecar does for its own ([`crate::oversight::Oversight::settle`]):
//! the `circuit_open` and `agent_disabled` alerts (its own `alerts:`), the `agent_disabled`
//! audit record (actor `envoy/<VM>`), and the agent in the disabled set it serves at
//! `GET /v1/fleet/agents/disabled`, from which an operator re-enables it
//! (`POST /admin/agents/{agent}/enable`): the fleet's set in Redis with `store.redis`, else
//! this proxy's own `oversight.escalation` (a collector with neither refuses such a report,
//! saying so).
//!
//! A bad body is a 400 naming the field; every report is answered in order (accepted,
//! refused for good, or unavailable: the filter offers it again).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tollgate_core::guardrails::report::{Answer, Report, Reports, Taken};
use tollgate_core::time::UnixMillis;

use crate::oversight::Reported;
use crate::state::Shared;

/// The largest request body taken.
const MAX_BODY: usize = 256 * 1024;

/// Takes a filter VM's reports.
pub async fn serve(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Answer, (StatusCode, String)> {
    let body = super::read_body(req, MAX_BODY, "a batch of oversight reports").await?;
    let reports = Reports::parse(&body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let source = format!("envoy/{}", reports.source);
    let mut results = Vec::with_capacity(reports.reports.len());
    for report in reports.reports {
        results.push(match report {
            Report::CircuitOpen { upstream, open_for_ms, at_ms } => {
                let at = UnixMillis(at_ms);
                let o = &shared.oversight;
                o.reported_circuit_open(&shared.alerts, &source, &upstream, open_for_ms, at);
                Taken::Accepted
            }
            Report::AgentDisabled { agent, action, status, .. } => {
                let what = (agent.as_str(), action.as_str(), status);
                let o = &shared.oversight;
                match o.reported_disabled(&shared.ledger, &shared.alerts, &source, what).await {
                    Reported::Taken => Taken::Accepted,
                    Reported::Refused(error) => Taken::Refused { error },
                    Reported::Unavailable(error) => Taken::Unavailable { error },
                }
            }
        });
    }
    Ok(Answer { results })
}
