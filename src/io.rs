//! File helpers: every file optlab writes is written atomically.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory, synced and then
/// renamed, so a crash leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, e));
    }
    Ok(())
}

/// The process id in the name of a temporary file of [`write_atomic`] (`.<name>.tmp.<pid>`).
fn temporary_owner(file_name: &str) -> Option<u32> {
    let (stem, pid) = file_name.rsplit_once(".tmp.")?;
    if !stem.starts_with('.') || stem.len() < 2 {
        return None;
    }
    pid.parse().ok()
}

/// Removes the temporary files [`write_atomic`] left in `dir` (not below it) when its process
/// was killed between creating and renaming them: `.<name>.tmp.<pid>` whose process no longer
/// runs on this machine. Files of a live process are kept, and nothing is removed where the
/// process table cannot be read (`/proc`). Returns the files removed.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut removed = Vec::new();
    if !Path::new("/proc/self").exists() {
        return Ok(removed);
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::file(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::file(dir, e))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_owner) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::file(&path, e)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised() {
        assert_eq!(temporary_owner(".summary.json.tmp.123"), Some(123));
        assert_eq!(temporary_owner(".a.tmp.b.tmp.7"), Some(7));
        for other in [
            "summary.json",
            "x.tmp.12",
            ".tmp.12",
            ".a.tmp.",
            ".a.tmp.x1",
        ] {
            assert_eq!(temporary_owner(other), None, "{other}");
        }
    }

    #[test]
    fn stale_temporaries_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        // A process that has exited: its pid is free (until reused, which this test avoids by
        // checking).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        if Path::new(&format!("/proc/{dead}")).exists() || !Path::new("/proc/self").exists() {
            eprintln!("SKIP: stale_temporaries_go_and_live_ones_stay: pid reused or no /proc");
            return;
        }
        let stale = dir.path().join(format!(".summary.json.tmp.{dead}"));
        let own = dir
            .path()
            .join(format!(".env.json.tmp.{}", std::process::id()));
        let keep = dir.path().join("metrics.jsonl");
        for p in [&stale, &own, &keep] {
            std::fs::write(p, b"x").unwrap();
        }
        write_atomic(&dir.path().join("summary.json"), b"{}").unwrap();
        let removed = remove_stale_temporaries(dir.path()).unwrap();
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists() && own.exists() && keep.exists());
        assert!(dir.path().join("summary.json").is_file());
        assert!(remove_stale_temporaries(&dir.path().join("absent"))
            .unwrap()
            .is_empty());
    }
}
