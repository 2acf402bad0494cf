//! The storage that the usage ledger and the audit log are both built on: numbered segment files
//! (`<data_dir>/ledger/00000001.seg`, `<data_dir>/audit/00000001.seg`, …) of framed records, each
//! linked to the one before it ([`chain`]), and the retirement checkpoint that says where each
//! log's kept segments start ([`retired`]). Each log encodes its own records and owns its writer;
//! what they share is here: how records are framed, chained and walked, which segments a
//! directory holds, how a writer continues the last one, and which a retirement has covered.

use std::io::{self, Write};
use std::path::Path;

use chain::{segment_path, Encoding};
use tollgate_core::record::compact::{self, Encoder};

pub mod chain;
pub mod retired;

/// The segment numbers in `dir`, in order.
pub fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Opens segment `last` of `dir` (its torn tail already cut) to append `encoding` records: the
/// same segment when it is empty or holds that encoding (JSON lines, or compact records whose
/// strings `ctx` holds), else a new one, so a segment never mixes encodings. A new or empty
/// compact segment gets its [`chain::MAGIC`]. Returns the segment, its file, its length and the
/// encoder to continue with.
pub(crate) fn continue_segment(
    dir: &Path,
    last: u64,
    encoding: Encoding,
    ctx: compact::Context,
) -> io::Result<(u64, std::fs::File, u64, Encoder)> {
    let path = segment_path(dir, last);
    let mut head = Vec::new();
    if let Ok(file) = std::fs::File::open(&path) {
        use std::io::Read;
        file.take(chain::MAGIC.len() as u64).read_to_end(&mut head)?;
    }
    // The torn tail (a cut-off magic too) is already gone.
    let same = head.is_empty() || Encoding::of(&head) == encoding;
    let (segment, encoder) = match same {
        true => (last, Encoder::continuing(ctx)),
        false => (last + 1, Encoder::default()),
    };
    let path = segment_path(dir, segment);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let mut len = file.metadata()?.len();
    if len == 0 && encoding == Encoding::Compact {
        file.write_all(chain::MAGIC)?;
        file.sync_data()?;
        len = chain::MAGIC.len() as u64;
    }
    Ok((segment, file, len, encoder))
}

/// Removes segment files of `dir` the retirement checkpoint already covers (up to `through`: a
/// retirement cut short by a crash, see [`retired`]).
pub fn remove_covered(dir: &Path, through: u64) -> std::io::Result<()> {
    for n in segments(dir)?.into_iter().filter(|&n| n <= through) {
        std::fs::remove_file(chain::segment_path(dir, n))?;
    }
    Ok(())
}
