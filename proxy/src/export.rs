//! The usage export: ships ledger records to a collector, at least once, in order.
//!
//! A task reads the ledger segments from a persisted cursor (`ledger/export.cursor`: segment and
//! byte offset), posts up to `batch` records as NDJSON (each carries its unique `event_id`,
//! `<ledger id>-<seq>`), and advances the cursor only after a 2xx answer, so a crash or a failed
//! post re-sends rather than loses; collectors deduplicate by `event_id`. Only complete,
//! checksummed records are shipped, always as JSON lines (a compact record as the JSON line it
//! stands for), whatever the segment's encoding. Failures back off up to 30 s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::config::Export;
use crate::ledger::cursor::save_cursor;
pub use crate::ledger::cursor::{load_cursor, Cursor};
use crate::store::chain::{self, Context, Encoding};
use crate::upstream::UpstreamClient;

/// What a reader of the export knows of the segment it is in: the strings its compact records
/// defined up to the cursor, so that the next batch continues without decoding the segment from
/// its start again.
#[derive(Default)]
pub struct Reader {
    at: Option<(Cursor, Context)>,
}

/// Up to `max` complete records after `cursor`, as NDJSON (a compact record as the JSON line it
/// stands for), and the cursor after them.
pub fn read_batch(
    data_dir: &Path,
    cursor: Cursor,
    max: usize,
    reader: &mut Reader,
) -> std::io::Result<(Vec<u8>, usize, Cursor)> {
    let dir = data_dir.join("ledger");
    let segments = crate::store::segments(&dir)?;
    let mut cursor = cursor;
    if cursor.segment == 0 {
        cursor = Cursor { segment: segments.first().copied().unwrap_or(1), offset: 0 };
    }
    let mut out = Vec::new();
    let mut n = 0;
    let start = cursor.segment;
    for &seg in segments.iter().filter(|&&s| s >= start) {
        if seg > cursor.segment {
            cursor = Cursor { segment: seg, offset: 0 };
        }
        let bytes = std::fs::read(chain::segment_path(&dir, seg))?;
        let encoding = Encoding::of(&bytes);
        let (mut offset, mut ctx) = match (encoding, reader.at.take()) {
            (Encoding::Json, _) => (cursor.offset as usize, Context::default()),
            (Encoding::Compact, Some((at, ctx))) if at == cursor && at.offset > 0 => {
                (at.offset as usize, ctx)
            }
            (Encoding::Compact, _) => (chain::MAGIC.len().min(bytes.len()), Context::default()),
        };
        while n < max && offset < bytes.len() {
            let next = match encoding {
                Encoding::Json => chain::next_line(&bytes[offset..]),
                Encoding::Compact => chain::next_frame(&bytes[offset..]),
            };
            let (len, parsed) = match next {
                chain::Next::Record { len, parsed, .. } => (len, parsed),
                chain::Next::Incomplete => break, // being written
                chain::Next::Unreadable(what) => {
                    tracing::error!(
                        segment = seg,
                        offset,
                        what,
                        "export: an unreadable ledger record"
                    );
                    break;
                }
            };
            // Records before the cursor (a compact segment is read from its start for the
            // strings they define).
            let shipped = offset as u64 >= cursor.offset;
            match (parsed, encoding) {
                (Ok(line), Encoding::Json) => {
                    out.extend_from_slice(line.record);
                    out.push(b'\n');
                    n += 1;
                }
                (Ok(line), Encoding::Compact) => {
                    let record =
                        ctx.define(line.record).map_err(|e| e.to_string()).and_then(|fields| {
                            crate::ledger::codec::decode(chain::Body::Compact(fields, &mut ctx))
                        });
                    match record.and_then(|r| crate::ledger::codec::to_json(&r)) {
                        Ok(json) if shipped => {
                            let _ = serde_json::to_writer(&mut out, &json);
                            out.push(b'\n');
                            n += 1;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(segment = seg, offset, error = %e, "export: skipping a ledger record that does not decode")
                        }
                    }
                }
                (Err(_), _) if shipped => {
                    tracing::error!(segment = seg, offset, "export: skipping a corrupt ledger line")
                }
                (Err(_), _) => {}
            }
            offset += len;
        }
        cursor.offset = offset as u64;
        if encoding == Encoding::Compact {
            reader.at = Some((cursor, ctx));
        }
        if n >= max || offset < bytes.len() {
            break;
        }
    }
    Ok((out, n, cursor))
}

/// Ships records until `stop` turns true.
/// How long the export goes on shipping after it is told to stop.
const FINAL_PASS: Duration = Duration::from_secs(5);

pub async fn run(
    client: UpstreamClient,
    data_dir: PathBuf,
    export: Export,
    mut stop: watch::Receiver<bool>,
) {
    let mut cursor = load_cursor(&data_dir);
    let mut backoff = export.interval;
    let reader = Arc::new(std::sync::Mutex::new(Reader::default()));
    // Once told to stop, it ships what is left (the drain's records) and stops when nothing is
    // left, a post fails, or `FINAL_PASS` is over: what is not shipped then is the next start's.
    let mut stopping: Option<tokio::time::Instant> = None;
    loop {
        let dir = data_dir.clone();
        let reader = reader.clone();
        let batch = tokio::task::spawn_blocking(move || {
            let mut reader = reader.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            read_batch(&dir, cursor, export.batch, &mut reader)
        })
        .await;
        let mut wait = export.interval;
        match batch {
            Ok(Ok((body, n, next))) if n > 0 => match post(&client, &export, body).await {
                Ok(()) => {
                    cursor = next;
                    if let Err(e) = save_cursor(&data_dir, cursor) {
                        tracing::error!(error = %e, "export: saving the cursor");
                    }
                    backoff = export.interval;
                    wait = Duration::ZERO; // more may be waiting
                }
                Err(e) => {
                    tracing::warn!(error = %e, records = n, "export: post failed; will retry");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    wait = backoff;
                }
            },
            Ok(Ok(_)) if stopping.is_some() => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "export: reading the ledger"),
            Err(e) => tracing::error!(error = %e, "export: reader task"),
        }
        if let Some(since) = stopping {
            if wait > Duration::ZERO || since.elapsed() > FINAL_PASS {
                break;
            }
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    stopping = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

async fn post(client: &UpstreamClient, export: &Export, body: Vec<u8>) -> Result<(), String> {
    let mut req = http::Request::post(export.url.clone())
        .header(http::header::CONTENT_TYPE, "application/x-ndjson");
    if let Some(name) = &export.token_env {
        // Read at each post, so that a missing variable is logged with the failed post.
        let token = std::env::var(name)
            .ok()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("chargeback.export.token_env: ${name} is not set"))?;
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(crate::deny::full(Bytes::from(body))).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {}", response.status()))
    }
}
