//! Persistent build slots: evcxr's tmpdir (generated crate + target dir with tch, torch-sys and
//! the prelude compiled) kept across kernel starts, so heavy dependencies compile once.
//!
//! Two evcxr instances cannot share a tmpdir (evcxr #302), so each running kernel holds an
//! exclusive `flock` on its slot; the lock dies with the process, so a crashed kernel never
//! leaves a slot blocked. A new slot starts as a copy of a warm one when possible.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "pivot-slot.lock";
/// Written after the prelude built successfully in a slot: it may be cloned.
pub const WARM_MARK: &str = "pivot-warm";
/// The configuration `pivot-kernel warm` warmed the slot for (`Slot::warmed_for`).
const WARMED_FOR: &str = "pivot-warmed-for";
const MAX_SLOTS: usize = 32;

pub struct Slot {
    pub index: usize,
    pub dir: PathBuf,
    _lock: File,
}

impl Slot {
    pub fn is_warm(&self) -> bool {
        self.dir.join(WARM_MARK).exists()
    }
    /// A slot that never built starts as a copy of a warm one (seconds instead of minutes).
    pub fn seed_if_cold(&self) {
        if !self.is_warm() {
            if let Some(slots) = self.dir.parent() {
                seed_from_warm(slots, self);
            }
        }
    }
    pub fn mark_warm(&self) {
        let _ = std::fs::write(self.dir.join(WARM_MARK), env!("CARGO_PKG_VERSION"));
    }
    /// The configuration key (`spare::Config::key`) `pivot-kernel warm` last warmed this slot
    /// for, if the slot is still warm.
    pub fn warmed_for(&self) -> Option<String> {
        self.is_warm().then(|| std::fs::read_to_string(self.dir.join(WARMED_FOR)).ok()).flatten()
    }
    pub fn mark_warmed_for(&self, key: &str) {
        let _ = std::fs::write(self.dir.join(WARMED_FOR), key);
    }
}

fn try_lock(dir: &Path) -> std::io::Result<Option<File>> {
    std::fs::create_dir_all(dir)?;
    let f = File::options().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE))?;
    // SAFETY: flock on an open descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    Ok(if r == 0 { Some(f) } else { None })
}

/// Takes slot `want` (waiting for it if busy) or else the first free slot.
pub fn acquire(root: &Path, want: Option<usize>) -> anyhow::Result<Slot> {
    let slots = root.join("slots");
    if let Some(k) = want {
        let dir = slots.join(k.to_string());
        std::fs::create_dir_all(&dir)?;
        let f = File::options().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE))?;
        // SAFETY: blocking flock on an open descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            anyhow::bail!("cannot lock {}: {}", dir.display(), std::io::Error::last_os_error());
        }
        return Ok(Slot { index: k, dir, _lock: f });
    }
    for k in 0..MAX_SLOTS {
        let dir = slots.join(k.to_string());
        if let Some(lock) = try_lock(&dir)? {
            return Ok(Slot { index: k, dir, _lock: lock });
        }
    }
    anyhow::bail!("all {MAX_SLOTS} build slots under {} are in use", slots.display())
}

/// For a spare engine, which has time to spare: a free warm slot, waiting up to `patience` for one
/// (the kernel whose notebook just ended frees its slot within seconds) before `acquire` takes the
/// first free slot, which may be new. A new slot is a copy of a warm one (gigabytes) and, when the
/// prelude changed since, another build of it.
pub fn acquire_warm(root: &Path, want: Option<usize>, patience: std::time::Duration) -> anyhow::Result<Slot> {
    if want.is_some() {
        return acquire(root, want);
    }
    let slots = root.join("slots");
    let t0 = std::time::Instant::now();
    loop {
        for k in 0..MAX_SLOTS {
            let dir = slots.join(k.to_string());
            if !dir.join(WARM_MARK).exists() {
                continue;
            }
            if let Some(lock) = try_lock(&dir)? {
                return Ok(Slot { index: k, dir, _lock: lock });
            }
        }
        if t0.elapsed() >= patience {
            return acquire(root, None);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Copies a warm slot's build products into a fresh one. cargo's fingerprints decide what is
/// still valid, so a bad copy costs a rebuild, never a wrong result.
fn seed_from_warm(slots: &Path, slot: &Slot) {
    if slot.dir.join("target").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(slots) else { return };
    let mut warm: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p != &slot.dir && p.join(WARM_MARK).exists())
        .collect();
    warm.sort();
    let Some(src) = warm.first() else { return };
    let status = std::process::Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(src.join("."))
        .arg(&slot.dir)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        let _ = std::fs::remove_dir_all(slot.dir.join("target"));
        return;
    }
    // The copied lock file is ours already (same name); the warm mark is earned by building.
    let _ = std::fs::remove_file(slot.dir.join(WARM_MARK));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_acquires_get_different_slots_and_release_on_drop() {
        let root = std::env::temp_dir().join(format!("pivot-slots-test-{}", std::process::id()));
        let a = acquire(&root, None).unwrap();
        let b = acquire(&root, None).unwrap();
        assert_ne!(a.index, b.index);
        let ai = a.index;
        drop(a);
        let c = acquire(&root, None).unwrap();
        assert_eq!(c.index, ai);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_spare_waits_for_a_warm_slot_rather_than_open_a_new_one() {
        let root = std::env::temp_dir().join(format!("pivot-slots-warm-{}", std::process::id()));
        let a = acquire(&root, None).unwrap();
        a.mark_warm();
        let (ai, held) = (a.index, std::sync::Arc::new(std::sync::Mutex::new(Some(a))));
        let h = held.clone();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            h.lock().unwrap().take();
        });
        let b = acquire_warm(&root, None, std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(b.index, ai, "took the warm slot once it was free");
        release.join().unwrap();
        drop(b);
        let c = acquire(&root, None).unwrap();
        let d = acquire_warm(&root, None, std::time::Duration::from_millis(100)).unwrap();
        assert_ne!(c.index, d.index, "no free warm slot within the patience: a new one");
        let _ = std::fs::remove_dir_all(&root);
    }
}
