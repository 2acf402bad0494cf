//! The export's cursor (`ledger/export.cursor`: segment and byte offset): how far the records
//! have been shipped to, and acknowledged by, the collector. Written by the export task, read
//! by retention (a segment is retired only once the cursor is past it).

use std::path::{Path, PathBuf};

/// Where the export has got to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub segment: u64,
    pub offset: u64,
}

fn cursor_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ledger").join("export.cursor")
}

/// The persisted cursor; the start of the ledger if there is none.
pub fn load_cursor(data_dir: &Path) -> Cursor {
    let text = std::fs::read_to_string(cursor_path(data_dir)).unwrap_or_default();
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(segment)), Some(Ok(offset))) => Cursor { segment, offset },
        _ => Cursor::default(),
    }
}

pub fn save_cursor(data_dir: &Path, cursor: Cursor) -> std::io::Result<()> {
    let path = cursor_path(data_dir);
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{} {}", cursor.segment, cursor.offset)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)
}
