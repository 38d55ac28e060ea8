//! Run locks contended by real processes (this test binary started again as workers), some of
//! which exit while holding the lock, as a worker killed with `kill -9` would: at no moment may
//! two processes hold the same run, and the lock must end up free.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use optlab::sweep::lock::RunLock;

const CHILD_DIR: &str = "OPTLAB_LOCK_TEST_DIR";
const CHILD_ABANDON: &str = "OPTLAB_LOCK_TEST_ABANDON";
const LONG: Duration = Duration::from_secs(3600);

/// The worker side: does nothing unless started by `processes_never_hold_a_run_twice`.
/// Takes the lock (retrying while it is held), marks itself as the holder with an exclusively
/// created file (a second holder finds the mark and records the fault), holds it a few
/// milliseconds, then releases it, or exits without releasing it when told to abandon it.
#[test]
fn lock_worker() {
    let Some(dir) = std::env::var_os(CHILD_DIR).map(PathBuf::from) else {
        return;
    };
    let abandon = std::env::var_os(CHILD_ABANDON).is_some();
    let base = dir.join("run.lock");
    let deadline = Instant::now() + Duration::from_secs(60);
    let lock = loop {
        match RunLock::acquire(&base, LONG) {
            Ok(Ok(lock)) => break lock,
            Ok(Err(_)) => {}
            Err(e) => {
                eprintln!("acquire failed: {e}");
                std::process::exit(2);
            }
        }
        if Instant::now() > deadline {
            eprintln!("never got the lock");
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    let mark = dir.join("holder");
    let alone = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&mark)
        .is_ok();
    if !alone {
        let note = dir.join(format!("doubled.{}", std::process::id()));
        std::fs::write(note, lock.path().display().to_string()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(3));
    if alone {
        std::fs::remove_file(&mark).unwrap();
    }
    if abandon {
        // No destructor runs: the lock file stays behind, its owner dead.
        std::process::exit(0);
    }
    lock.release().unwrap();
    std::process::exit(0);
}

fn spawn_worker(dir: &Path, abandon: bool) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "lock_worker",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CHILD_DIR, dir)
    .stdout(std::process::Stdio::null());
    if abandon {
        cmd.env(CHILD_ABANDON, "1");
    }
    cmd.spawn().unwrap()
}

#[test]
fn processes_never_hold_a_run_twice() {
    let dir = tempfile::tempdir().unwrap();
    const TOTAL: usize = 120;
    const AT_ONCE: usize = 8;
    let mut running: Vec<Child> = Vec::new();
    let mut started = 0;
    let mut failed = 0;
    while started < TOTAL || !running.is_empty() {
        while started < TOTAL && running.len() < AT_ONCE {
            // Three in five abandon the lock, so that stale generations pile up and are broken
            // while others release theirs.
            running.push(spawn_worker(dir.path(), started % 5 < 3));
            started += 1;
        }
        // Reap promptly: an exited but unreaped worker still looks alive.
        running.retain_mut(|c| match c.try_wait().unwrap() {
            Some(status) => {
                failed += usize::from(!status.success());
                false
            }
            None => true,
        });
        std::thread::sleep(Duration::from_micros(200));
    }
    let doubled: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("doubled."))
        .collect();
    assert!(
        doubled.is_empty(),
        "{} workers found the run already held: {doubled:?}",
        doubled.len()
    );
    assert_eq!(failed, 0, "workers exited with an error");
    let last = RunLock::acquire(&dir.path().join("run.lock"), LONG).unwrap();
    assert!(last.is_ok(), "the lock is not free at the end: {last:?}");
}
