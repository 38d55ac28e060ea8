//! Small file systems for tests of full disks and read-only directories: a tmpfs of a given
//! size mounted on a temporary directory, which can be remounted read-only, read-write or with
//! another size. Mounting needs `CAP_SYS_ADMIN` (root on a machine, not in most CI containers);
//! where it is refused, [`Tmpfs::mount`] prints `SKIP: <test>: <reason>` and returns `None`, and
//! the test returns early. Permission bits cannot stand in for a read-only directory: root
//! writes through them.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs, unmounted when dropped.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

fn mount(args: &[&str], dir: &Path) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Tmpfs {
    /// A tmpfs of `bytes` (rounded up to whole pages), or `None` (with a SKIP line naming
    /// `test`) where this process may not mount.
    pub fn mount(test: &str, bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let size = format!("size={bytes},mode=0755");
        match mount(&["-t", "tmpfs", "-o", &size, "optlab-test"], dir.path()) {
            Ok(()) => Some(Self { dir }),
            Err(e) => {
                eprintln!("SKIP: {test}: cannot mount a tmpfs here ({e})");
                None
            }
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `path()/rel`.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Remounts read-only (`true`) or read-write.
    pub fn read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        mount(&["-o", opt], self.path()).unwrap();
    }

    /// Changes the size (at least what is in use).
    pub fn resize(&self, bytes: u64) {
        mount(&["-o", &format!("remount,size={bytes}")], self.path()).unwrap();
    }

    /// Fills the file system with `filler` (a file at the mount point) until a write fails, then
    /// gives back `free` bytes (whole pages) by shortening it. Returns the filler's path.
    pub fn fill_leaving(&self, free: u64) -> PathBuf {
        let path = self.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let page = vec![0xa5u8; 4096];
        loop {
            match f.write(&page) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let len = f.metadata().unwrap().len();
        assert!(len >= free, "only {len} bytes were free");
        f.set_len((len - free) / 4096 * 4096).unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a file a failed test still holds open must not keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}
