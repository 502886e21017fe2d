//! Saving controller state to files: atomically (a temporary file, flushed, renamed over the
//! old one, and the directory flushed), in a versioned JSON format. Every controller that
//! saves state goes through here.
use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, Result};

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `path` with `.tmp` appended: the temporary file beside it.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes `bytes` to `path` atomically: after a crash or a power loss the file holds either
/// the old or the new content, never a mix. The directory must exist: one that disappeared
/// under a running daemon is an error, not something to re-create silently.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let persistence = |source| Error::Persistence {
        path: path.to_path_buf(),
        source,
    };
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(persistence(e));
    }
    // Past the rename the file holds the new content; undoing the change now would make the
    // daemon and the file disagree. A failed directory flush only risks the rename on power
    // loss, so it is reported, not rolled back.
    if let Err(e) = File::open(parent_dir(path)).and_then(|d| d.sync_all()) {
        tracing::warn!(
            path = %path.display(),
            error = %e,
            "saved, but the directory could not be flushed; the last change may not survive a power loss"
        );
    }
    Ok(())
}

/// Writes `value` as pretty JSON with a top-level `"version": version` beside its fields
/// (`value` must serialize to a JSON object), creating the directory if missing.
pub fn save_versioned<T: Serialize>(path: &Path, version: u32, value: &T) -> Result<()> {
    let persistence = |e: serde_json::Error| Error::Persistence {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    fs::create_dir_all(parent_dir(path)).map_err(|source| Error::Persistence {
        path: path.to_path_buf(),
        source,
    })?;
    let mut object = serde_json::Map::new();
    object.insert("version".into(), version.into());
    match serde_json::to_value(value).map_err(persistence)? {
        serde_json::Value::Object(fields) => object.extend(fields),
        _ => {
            return Err(Error::Internal(format!(
                "{} must be saved as a JSON object",
                path.display()
            )));
        }
    }
    let mut json =
        serde_json::to_vec_pretty(&serde_json::Value::Object(object)).map_err(persistence)?;
    json.push(b'\n');
    write_atomic(path, &json)
}

/// Reads a file written by [`save_versioned`]: `None` when it does not exist. A file without
/// a version is read as version `unversioned` (files of builds before versioning); a version
/// above `current` is refused, naming both.
pub fn load_versioned<T: DeserializeOwned>(
    path: &Path,
    current: u32,
    unversioned: Option<u32>,
) -> Result<Option<(u32, T)>> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    };
    let corrupt = |reason: String| Error::CorruptState {
        path: path.to_path_buf(),
        reason,
    };
    let mut value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| corrupt("not a JSON object".into()))?;
    let version = match object.remove("version") {
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| corrupt(format!("\"version\" is not a number: {v}")))?,
        None => unversioned.ok_or_else(|| corrupt("no \"version\" field".into()))?,
    };
    if version > current {
        return Err(corrupt(format!(
            "format version {version} is not supported (this datapathd reads up to version {current})"
        )));
    }
    let parsed = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
    Ok(Some((version, parsed)))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Saved {
        items: Vec<u32>,
    }

    #[test]
    fn round_trip_unversioned_files_and_newer_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert!(load_versioned::<Saved>(&path, 1, None).unwrap().is_none());
        save_versioned(&path, 1, &Saved { items: vec![1, 2] }).unwrap();
        assert!(
            !tmp_path(&path).exists(),
            "the temporary file is renamed away"
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        let (v, got) = load_versioned::<Saved>(&path, 1, None).unwrap().unwrap();
        assert_eq!((v, got), (1, Saved { items: vec![1, 2] }));

        fs::write(&path, r#"{"items": [3]}"#).unwrap();
        let (v, got) = load_versioned::<Saved>(&path, 2, Some(1)).unwrap().unwrap();
        assert_eq!(
            (v, got.items),
            (1, vec![3]),
            "a file from before versioning"
        );
        let e = load_versioned::<Saved>(&path, 2, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no \"version\""), "{e}");
        fs::write(&path, r#"{"version": 3, "items": []}"#).unwrap();
        let e = load_versioned::<Saved>(&path, 2, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 3 is not supported"), "{e}");
        fs::write(&path, "{not json").unwrap();
        assert!(load_versioned::<Saved>(&path, 2, None).is_err());
    }
}
