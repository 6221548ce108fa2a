//! Real English text for experiments, found on the machine (no download).
//!
//! The default document is the GNU GPL version 3 (`/usr/share/common-licenses/GPL-3`, shipped by
//! Debian's base-files on every machine of this project), with Python's `pydoc_data/topics.py` as
//! a fallback. Any other file can be given instead.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Places searched, in order, for the default document.
pub const DEFAULT_DOCUMENTS: &[&str] = &[
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/GPL-2",
];

/// The default document's path: the first of [`DEFAULT_DOCUMENTS`] that exists, else Python's
/// `pydoc_data/topics.py` next to the `python3` found on `PATH`.
pub fn default_document() -> Result<PathBuf> {
    if let Some(p) = DEFAULT_DOCUMENTS
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
    {
        return Ok(p.to_path_buf());
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import pydoc_data.topics as t; print(t.__file__)"])
        .output()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && path.is_file() {
        return Ok(path);
    }
    Err(Error::ModelFile {
        path: PathBuf::from(DEFAULT_DOCUMENTS[0]),
        reason: "no default document found; pass one with --text".into(),
    })
}

/// The text of `path`, or of the default document when there is none (what every `--text`
/// option means).
pub fn text_or_default(path: Option<&Path>) -> Result<String> {
    match path {
        Some(p) => read_text(p),
        None => read_text(&default_document()?),
    }
}

/// Reads a text file, replacing invalid UTF-8.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::ModelFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
