//! A ledger record as read back from a segment: the typed record from either encoding
//! ([`decode`]), and the JSON line it stands for ([`to_json`]).

use crate::store::chain::Body;
use tollgate_core::record::compact;
use tollgate_core::record::Stored;

/// A record as the typed record, from either encoding (the one place that knows them).
pub fn decode(body: Body<'_>) -> Result<Stored, String> {
    match body {
        Body::Json(json) => Stored::decode(json).map_err(|e| e.to_string()),
        Body::Compact(fields, ctx) => {
            compact::Reader::new(ctx, fields).stored().map_err(|e| e.to_string())
        }
    }
    .map_err(|e| format!("the record does not decode: {e}"))
}

/// A record as the JSON the ledger's JSON lines hold.
pub fn to_json(stored: &Stored) -> Result<serde_json::Value, String> {
    let view = Stored { seq: stored.seq, event_id: stored.event_id.clone(), entry: &stored.entry };
    serde_json::to_value(&view).map_err(|e| e.to_string())
}
