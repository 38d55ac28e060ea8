//! One lock per run, so that two workers of a sweep (local processes, Slurm tasks, machines
//! sharing a file system) never run the same run.
//!
//! A lock is a file `<runs_dir>/<id>.lock.<g>` created exclusively (a hard link of a complete
//! temporary file, which fails if the name exists, like `O_CREAT | O_EXCL`; plain `create_new`
//! where links are unsupported), so exactly one worker creates each name. It holds the owner's host, pid, the
//! process start time (to tell a live process from a reused pid) and a random nonce, and its
//! holder touches it every few seconds (a heartbeat).
//!
//! **Generations.** The lock of a run is its highest generation `g` (names are probed
//! `0, 1, 2, …` up to the first missing one; no directory listing, whose view of concurrent
//! creations is unspecified). A lock whose owner is gone is *stale*: on the same host, its pid
//! no longer runs or runs another process (different start time); on another host, or when
//! the process table cannot be read, its heartbeat is older than `stale_after`. Breaking a stale
//! lock creates generation `g + 1` exclusively: of two workers that find the same stale
//! lock, only one creates the next name, and nobody deletes a lock another worker may hold. A
//! lock file that does not parse (its owner died between creating and writing it) counts as
//! stale once its modification time is older than a grace period.
//!
//! **Release.** A holder of generation 0 (the usual case: no crash before it) removes its file.
//! A holder of a higher generation replaces its file, in one atomic rename, by the same record
//! marked `released`, which counts as stale at once; the next worker takes the generation above
//! it. Generations below a holder are never removed: removing one while another worker is
//! between probing the names and creating the next one could leave a missing generation under a
//! held lock, where a third worker would take a lock of its own (two holders of one run). So
//! every name only ever goes from absent to a live record to a stale one (or, for generation 0
//! alone, back to absent while its own holder still runs), and a worker creates generation
//! `g + 1` only after finding generation `g` stale, which stays so. The cost: after a crash,
//! a run keeps one small file per later acquisition.
//!
//! A worker that acquired a lock must check again whether the run finished (a holder may have
//! finished and released it in between).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How long an unparseable lock file (being written, or left by a crash mid-write) counts as
/// held.
const GRACE: Duration = Duration::from_secs(10);

/// What a lock file records about its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Host name of the owner.
    pub host: String,
    /// Process id of the owner.
    pub pid: u32,
    /// Start time of the owner process (clock ticks after boot, from `/proc/<pid>/stat`; 0 when
    /// unknown).
    pub start: u64,
    /// Random value telling two owners apart.
    pub nonce: u64,
    /// Seconds since the Unix epoch when the lock was taken.
    pub created: u64,
    /// Whether the owner released the lock (the record then counts as stale).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

impl LockInfo {
    /// The description of this process.
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            host: host_name(),
            pid,
            start: process_start(pid).unwrap_or(0),
            nonce: nonce(),
            created: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            released: false,
        }
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`, `$HOSTNAME`, or `unknown`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// The start time of process `pid` in clock ticks after boot (field 22 of `/proc/<pid>/stat`),
/// or `None` when it does not run or `/proc` cannot be read.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Why a lock could not be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Another live worker holds it.
    By(LockInfo),
    /// A lock file is being written (or was left unreadable less than the grace period ago).
    Unreadable,
}

/// A held run lock; released (its files removed) by [`RunLock::release`] or on drop.
#[derive(Debug)]
pub struct RunLock {
    base: PathBuf,
    path: PathBuf,
    info: LockInfo,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
    released: bool,
}

fn generation_path(base: &Path, g: u64) -> PathBuf {
    let mut s = base.as_os_str().to_os_string();
    s.push(format!(".{g}"));
    PathBuf::from(s)
}

/// The state of an existing lock file.
enum Found {
    Live(LockInfo),
    Stale,
    Unreadable,
}

fn judge(path: &Path, stale_after: Duration) -> Found {
    let age = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or(Duration::ZERO);
    let info: Option<LockInfo> = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let Some(info) = info else {
        return if age > GRACE {
            Found::Stale
        } else {
            Found::Unreadable
        };
    };
    if info.released {
        return Found::Stale;
    }
    if info.host == host_name() && Path::new("/proc/self/stat").exists() {
        // Same host with a process table: exact answer.
        return match process_start(info.pid) {
            Some(start) if info.start == 0 || start == info.start => Found::Live(info),
            _ => Found::Stale,
        };
    }
    if age > stale_after {
        Found::Stale
    } else {
        Found::Live(info)
    }
}

/// The private temporary file `<lock>.<kind>.<host>.<pid>.<nonce>` through which a worker
/// writes the lock file `path` (`kind`: `tmp` when taking it, `rel` when marking it released).
fn temporary_path(path: &Path, kind: &str, info: &LockInfo) -> PathBuf {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(
        ".{kind}.{}.{}.{:x}",
        info.host, info.pid, info.nonce
    ));
    PathBuf::from(tmp)
}

/// The owner (host, pid) of a lock's temporary file named
/// `<base>.<g>.<kind>.<host>.<pid>.<nonce>` (see [`temporary_path`]) whose `<base>` is `base`
/// (any base ending in `.lock` when `None`).
fn temporary_owner<'a>(file: &'a str, base: Option<&str>) -> Option<(&'a str, u32)> {
    let mut tail = file.rsplitn(3, '.');
    let (_nonce, pid, head) = (tail.next()?, tail.next()?, tail.next()?);
    let pid: u32 = pid.parse().ok()?;
    // `head` is `<base>.<g>.<kind>.<host>`; the host name may hold dots, the base ends in
    // `.lock` (`<run id>.lock`).
    let (lock_base, rest) = head.split_once(".lock.")?;
    if base.is_some_and(|b| b.strip_suffix(".lock") != Some(lock_base)) {
        return None;
    }
    let (g, rest) = rest.split_once('.')?;
    g.parse::<u64>().ok()?;
    let (kind, host) = rest.split_once('.')?;
    (kind == "tmp" || kind == "rel").then_some((host, pid))
}

/// Removes the temporary lock files in `dir` (those of the lock `base` only, when given) that
/// a worker of this host left when it was killed between writing and linking (or renaming)
/// them: those of processes that no longer run. Files of other hosts are left alone (their
/// pids mean nothing here), and nothing is removed where the process table cannot be read.
fn remove_stale_temporaries(dir: &Path, base: Option<&str>) {
    if !Path::new("/proc/self/stat").exists() {
        return;
    }
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let host = host_name();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some((owner, pid)) = file.to_str().and_then(|f| temporary_owner(f, base)) else {
            continue;
        };
        if owner == host && process_start(pid).is_none() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes the temporary lock files of every run in `runs_dir` left by killed workers of this
/// host (a worker killed while marking its lock released, after its run finished, leaves one
/// that no later acquisition of that run would clear).
pub fn remove_stale_lock_temporaries(runs_dir: &Path) {
    remove_stale_temporaries(runs_dir, None);
}

/// Creates `path` holding `info` if it does not exist; `false` if it does. The record is written
/// to a private temporary file first and hard-linked to `path` (an exclusive create, like
/// `O_EXCL`, that also works on NFS), so the lock never exists without its content; where hard
/// links are not supported, `create_new` (`O_CREAT | O_EXCL`) and a write.
fn create_exclusive(path: &Path, info: &LockInfo) -> Result<bool> {
    let text = serde_json::to_string(info).map_err(|e| Error::file(path, e))?;
    let tmp = temporary_path(path, "tmp", info);
    std::fs::write(&tmp, &text)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .map_err(|e| Error::file(&tmp, e))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(_) => {}
    }
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(mut f) => match f.write_all(text.as_bytes()).and_then(|_| f.sync_all()) {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(Error::file(path, e))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::file(path, e)),
    }
}

impl RunLock {
    /// Tries to take the lock `base` (e.g. `<runs_dir>/<id>.lock`), breaking a stale one.
    /// `Ok(Err(held))` when a live worker holds it. `stale_after`: how old a heartbeat must be
    /// for a lock of another host to count as abandoned.
    pub fn acquire(base: &Path, stale_after: Duration) -> Result<std::result::Result<Self, Held>> {
        if let Some(dir) = base.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        }
        if let (Some(dir), Some(name)) = (base.parent(), base.file_name().and_then(|n| n.to_str()))
        {
            remove_stale_temporaries(dir, Some(name));
        }
        loop {
            // The highest existing generation.
            let mut g = 0u64;
            while generation_path(base, g).exists() {
                g += 1;
            }
            let next = if g == 0 {
                0
            } else {
                let top = generation_path(base, g - 1);
                match judge(&top, stale_after) {
                    Found::Live(info) => return Ok(Err(Held::By(info))),
                    Found::Unreadable => return Ok(Err(Held::Unreadable)),
                    Found::Stale => g,
                }
            };
            let path = generation_path(base, next);
            let info = LockInfo::current();
            match create_exclusive(&path, &info)? {
                true => {
                    let mut lock = RunLock {
                        base: base.to_path_buf(),
                        path,
                        info,
                        stop: Arc::new(AtomicBool::new(false)),
                        lost: Arc::new(AtomicBool::new(false)),
                        heartbeat: None,
                        released: false,
                    };
                    lock.start_heartbeat(stale_after);
                    return Ok(Ok(lock));
                }
                // Another worker created this generation first: look again.
                false => continue,
            }
        }
    }

    /// Touches the lock file every `stale_after / 4` (at most every 30 s) so that workers on
    /// other hosts see its owner alive, and notes if the file stopped being ours.
    fn start_heartbeat(&mut self, stale_after: Duration) {
        let period = (stale_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
        let (path, stop, lost) = (self.path.clone(), self.stop.clone(), self.lost.clone());
        let mine = serde_json::to_string(&self.info).unwrap_or_default();
        self.heartbeat = Some(std::thread::spawn(move || {
            let step = Duration::from_millis(100);
            let mut waited = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(step);
                waited += step;
                if waited < period {
                    continue;
                }
                waited = Duration::ZERO;
                match std::fs::read_to_string(&path) {
                    Ok(s) if s == mine => {
                        let _ = File::options()
                            .write(true)
                            .open(&path)
                            .and_then(|f| f.set_modified(SystemTime::now()));
                    }
                    _ => lost.store(true, Ordering::Relaxed),
                }
            }
        }));
    }

    /// The owner record.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the lock file was found changed or removed by someone else (a worker that
    /// wrongly judged this one stale, e.g. because its heartbeat could not be written).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Stops the heartbeat and removes every generation of the lock.
    pub fn release(mut self) -> Result<()> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        // Leave the files alone if they stopped being ours (see `lost`).
        let mine = serde_json::to_string(&self.info).map_err(|e| Error::file(&self.path, e))?;
        match std::fs::read_to_string(&self.path) {
            Ok(s) if s == mine => {}
            _ => return Ok(()),
        }
        if self.path == generation_path(&self.base, 0) && !generation_path(&self.base, 1).exists() {
            // Nothing below to expose: the name goes back to absent.
            return match std::fs::remove_file(&self.path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::file(&self.path, e)),
            };
        }
        // Mark it released in place, atomically: the name never goes missing.
        let released = LockInfo {
            released: true,
            ..self.info.clone()
        };
        let text = serde_json::to_string(&released).map_err(|e| Error::file(&self.path, e))?;
        let tmp = temporary_path(&self.path, "rel", &self.info);
        let written = std::fs::write(&tmp, &text)
            .and_then(|_| File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::file(&self.path, e));
        }
        Ok(())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = self.release_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn one_holder_at_a_time_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        let a = RunLock::acquire(&base, LONG).unwrap().unwrap();
        match RunLock::acquire(&base, LONG).unwrap() {
            Err(Held::By(info)) => assert_eq!(info, *a.info()),
            other => panic!("{other:?}"),
        }
        a.release().unwrap();
        assert!(!generation_path(&base, 0).exists());
        let b = RunLock::acquire(&base, LONG).unwrap().unwrap();
        assert_eq!(b.path(), generation_path(&base, 0));
    }

    #[test]
    fn temporaries_of_killed_workers_of_this_host_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        let me = LockInfo::current();
        let dead = LockInfo {
            pid: 4_000_000_000,
            ..me.clone()
        };
        let elsewhere = LockInfo {
            host: format!("{}.other.example", me.host),
            ..dead.clone()
        };
        let stale = [
            temporary_path(&generation_path(&base, 0), "tmp", &dead),
            temporary_path(&generation_path(&base, 3), "rel", &dead),
        ];
        let kept = [
            temporary_path(&generation_path(&base, 0), "tmp", &me),
            temporary_path(&generation_path(&base, 1), "tmp", &elsewhere),
            temporary_path(&dir.path().join("other.lock.0"), "tmp", &dead),
            dir.path().join("run.lock.0.tmp.4000000000.ff"), // no host: not ours to judge
        ];
        for p in stale.iter().chain(&kept) {
            std::fs::write(p, "{}").unwrap();
        }
        let lock = RunLock::acquire(&base, LONG).unwrap().unwrap();
        for p in &stale {
            assert!(!p.exists(), "{} left", p.display());
        }
        for p in &kept {
            assert!(p.exists(), "{} removed", p.display());
        }
        lock.release().unwrap();
        // The whole runs directory: another run's temporary of a dead worker of this host.
        remove_stale_lock_temporaries(dir.path());
        assert!(!kept[2].exists());
        assert!(kept[0].exists() && kept[1].exists() && kept[3].exists());
    }

    #[test]
    fn a_dead_owner_is_stale_and_the_next_generation_breaks_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        // A lock of this host whose process does not run (pid beyond any pid_max).
        let dead = LockInfo {
            pid: 4_000_000_000,
            ..LockInfo::current()
        };
        std::fs::write(
            generation_path(&base, 0),
            serde_json::to_string(&dead).unwrap(),
        )
        .unwrap();
        let a = RunLock::acquire(&base, LONG).unwrap().unwrap();
        assert_eq!(a.path(), generation_path(&base, 1));
        assert!(matches!(
            RunLock::acquire(&base, LONG).unwrap(),
            Err(Held::By(_))
        ));
        a.release().unwrap();
        // Generation 1 stays, marked released; the next worker takes generation 2.
        let left: LockInfo =
            serde_json::from_str(&std::fs::read_to_string(generation_path(&base, 1)).unwrap())
                .unwrap();
        assert!(left.released);
        let b = RunLock::acquire(&base, LONG).unwrap().unwrap();
        assert_eq!(b.path(), generation_path(&base, 2));
    }

    /// After a release over a stale generation, every generation below the next holder exists,
    /// so a third worker finds the next holder's lock rather than a free name under it.
    #[test]
    fn a_release_over_a_stale_generation_leaves_no_gap() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        let dead = LockInfo {
            pid: 4_000_000_000,
            ..LockInfo::current()
        };
        std::fs::write(
            generation_path(&base, 0),
            serde_json::to_string(&dead).unwrap(),
        )
        .unwrap();
        let a = RunLock::acquire(&base, LONG).unwrap().unwrap();
        assert_eq!(a.path(), generation_path(&base, 1));
        a.release().unwrap();
        let b = RunLock::acquire(&base, LONG).unwrap().unwrap();
        // Whatever generation B got, every generation below it exists, so C sees B's lock.
        let mut g = 0;
        while generation_path(&base, g) != b.path() {
            assert!(generation_path(&base, g).exists(), "generation {g} missing");
            g += 1;
        }
        assert!(matches!(
            RunLock::acquire(&base, LONG).unwrap(),
            Err(Held::By(info)) if info == *b.info()
        ));
    }

    #[test]
    fn a_lost_lock_is_not_touched_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        let a = RunLock::acquire(&base, LONG).unwrap().unwrap();
        let other = LockInfo {
            nonce: a.info().nonce ^ 1,
            ..a.info().clone()
        };
        let text = serde_json::to_string(&other).unwrap();
        std::fs::write(a.path(), &text).unwrap();
        let p = a.path().to_path_buf();
        a.release().unwrap();
        assert_eq!(std::fs::read_to_string(p).unwrap(), text);
    }

    #[test]
    fn a_reused_pid_is_told_apart_by_its_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        let mut other = LockInfo::current();
        other.start += 1;
        std::fs::write(
            generation_path(&base, 0),
            serde_json::to_string(&other).unwrap(),
        )
        .unwrap();
        let a = RunLock::acquire(&base, LONG).unwrap().unwrap();
        assert_eq!(a.path(), generation_path(&base, 1));
    }

    #[test]
    fn another_hosts_lock_is_live_until_its_heartbeat_is_old() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        let remote = LockInfo {
            host: "elsewhere-host-that-is-not-this-one".into(),
            ..LockInfo::current()
        };
        let p = generation_path(&base, 0);
        std::fs::write(&p, serde_json::to_string(&remote).unwrap()).unwrap();
        assert!(matches!(
            RunLock::acquire(&base, LONG).unwrap(),
            Err(Held::By(_))
        ));
        let old = SystemTime::now() - Duration::from_secs(120);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let a = RunLock::acquire(&base, Duration::from_secs(60))
            .unwrap()
            .unwrap();
        assert_eq!(a.path(), generation_path(&base, 1));
    }

    #[test]
    fn an_unreadable_lock_is_held_during_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        let p = generation_path(&base, 0);
        std::fs::write(&p, "").unwrap();
        assert_eq!(
            RunLock::acquire(&base, LONG).unwrap().unwrap_err(),
            Held::Unreadable
        );
        let old = SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(RunLock::acquire(&base, LONG).unwrap().is_ok());
    }

    #[test]
    fn racing_threads_get_one_lock() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run.lock");
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (b, base) = (barrier.clone(), base.clone());
                std::thread::spawn(move || {
                    b.wait();
                    RunLock::acquire(&base, LONG).unwrap().ok()
                })
            })
            .collect();
        let got: Vec<RunLock> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn process_start_reads_this_process() {
        if Path::new("/proc/self/stat").exists() {
            assert!(process_start(std::process::id()).is_some());
            assert_eq!(process_start(4_000_000_000), None);
        }
    }
}
