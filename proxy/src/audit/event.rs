//! A decision as the audit log records it ([`Event`]), and its record in either encoding: a JSON
//! object, or compact fields (versioned by a tag; optional fields flagged, strings interned per
//! segment, the time relative to the record before).

use serde::{Deserialize, Serialize};
use tollgate_core::policy::Effect;
use tollgate_core::record::compact::{self, Encoder};
use tollgate_core::record::AuditKind;

use crate::store::chain::Body;

/// What happened, as recorded. Everything but `seq`, `prev` and `hash` is filled by the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub ts: String,
    /// `decision`, `approval_granted`, `approval_denied`, `approval_expired_approved`,
    /// `approval_expired_denied`, `approval_expired`, `approval_used`, `proposal`,
    /// `agent_disabled`, `agent_reenabled`.
    pub kind: AuditKind,
    pub request_id: String,
    pub agent: String,
    pub cost_center: String,
    pub project: String,
    pub route: String,
    /// `allow`, `deny` or `require_approval`.
    pub effect: Effect,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The approval a record is about (oversight events and approval-required decisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// The risk score, when one was computed (`78.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<String>,
    /// Who acted: an operator's name, `timeout`, or `proxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// A guardrail refusal: the JSON path of the argument at fault (`$.cmd`, `$query.q`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argument: Option<String>,
    /// A guardrail refusal: the forbidden pattern that matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// A guardrail refusal: a short excerpt of the offending value (never the whole value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excerpt: Option<String>,
    /// An operator's note on an approval they granted or denied (the reason given in the
    /// console, or the API's `note`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A decision by default (denied): callers set the kind and effect they record.
impl Default for Event {
    fn default() -> Self {
        Event {
            ts: String::new(),
            kind: AuditKind::Decision,
            request_id: String::new(),
            agent: String::new(),
            cost_center: String::new(),
            project: String::new(),
            route: String::new(),
            effect: Effect::Deny,
            reason: String::new(),
            clause: None,
            policy_version: None,
            model: None,
            tool: None,
            approval_id: None,
            risk: None,
            actor: None,
            argument: None,
            pattern: None,
            excerpt: None,
            note: None,
        }
    }
}

/// The tag of a compact audit record (version 1 of its fields).
const TAG_EVENT: u8 = 1;

/// A record as the event, from either encoding.
pub(super) fn decode(body: Body<'_>) -> Result<Event, String> {
    match body {
        Body::Json(json) => serde_json::from_slice(json).map_err(|e| e.to_string()),
        Body::Compact(fields, ctx) => {
            decode_compact(compact::Reader::new(ctx, fields)).map_err(|e| e.to_string())
        }
    }
    .map_err(|e| format!("the audit record does not decode: {e}"))
}

/// The `ts` of a record (for retention).
pub(crate) fn decode_ts(body: Body<'_>) -> Result<String, String> {
    decode(body).map(|e| e.ts)
}

/// The compact fields of an event: flags for the optional fields, the time relative to the record
/// before, interned strings and ids.
pub(super) fn encode(enc: &mut Encoder, e: &Event, out: &mut Vec<u8>) -> bool {
    let mut f = enc.record();
    f.byte(TAG_EVENT);
    // Bits 7.. were added later (guardrail refusals, then the operator's note): a record without
    // them decodes as before.
    let options = [
        &e.clause,
        &e.policy_version,
        &e.model,
        &e.tool,
        &e.approval_id,
        &e.risk,
        &e.actor,
        &e.argument,
        &e.pattern,
        &e.excerpt,
        &e.note,
    ];
    let flags = options.iter().enumerate().fold(0u64, |f, (i, o)| f | u64::from(o.is_some()) << i);
    f.varint(flags);
    f.ts_chained(&e.ts);
    f.byte(compact::code(&AuditKind::ALL, e.kind));
    f.id(&e.request_id);
    f.str(&e.agent);
    f.str(&e.cost_center);
    f.str(&e.project);
    f.str(&e.route);
    f.byte(compact::code(&Effect::ALL, e.effect));
    f.str(&e.reason);
    for (i, o) in options.iter().enumerate() {
        match (i, o) {
            (_, None) => {}
            (4, Some(id)) => f.id(id),
            (_, Some(s)) => f.str(s),
        }
    }
    f.finish(out);
    true
}

fn decode_compact(mut r: compact::Reader<'_>) -> Result<Event, compact::Error> {
    if r.byte()? != TAG_EVENT {
        return Err(compact::Error::Malformed("audit record (an unknown version)"));
    }
    let flags = r.varint()?;
    let mut e = Event {
        ts: r.ts_chained()?,
        kind: r.code(&AuditKind::ALL, "an audit kind")?,
        request_id: r.id()?,
        agent: r.str()?,
        cost_center: r.str()?,
        project: r.str()?,
        route: r.str()?,
        effect: r.code(&Effect::ALL, "an effect")?,
        reason: r.str()?,
        ..Event::default()
    };
    let mut next = |i: u32| -> Result<Option<String>, compact::Error> {
        match flags >> i & 1 {
            0 => Ok(None),
            _ if i == 4 => r.id().map(Some),
            _ => r.str().map(Some),
        }
    };
    e.clause = next(0)?;
    e.policy_version = next(1)?;
    e.model = next(2)?;
    e.tool = next(3)?;
    e.approval_id = next(4)?;
    e.risk = next(5)?;
    e.actor = next(6)?;
    e.argument = next(7)?;
    e.pattern = next(8)?;
    e.excerpt = next(9)?;
    e.note = next(10)?;
    r.end()?;
    Ok(e)
}
