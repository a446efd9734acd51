//! The node's change sequence: one number per committed-or-failed write, node-wide.
//!
//! Numbers are handed out from an atomic counter and reserved on disk in blocks, so a
//! restarted node never reuses one even if a shard that held the highest is down. Every
//! number handed out must be reported to the EventHub exactly once, as committed or as
//! void: the hub delivers events in order and waits for each number. Gaps are allowed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

/// How many numbers one disk reservation covers.
const BLOCK: i64 = 10_000;

/// Hands out change sequence numbers.
#[derive(Debug)]
pub struct Sequencer {
    next: AtomicI64,
    reserved: Mutex<i64>,
    path: PathBuf,
}

impl Sequencer {
    /// Opens the reservation file (`<data-dir>/seq`), starting after anything a previous
    /// run may have handed out.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let start = match std::fs::read_to_string(path) {
            Ok(s) => s.trim().parse::<i64>().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e),
        };
        let seq = Self { next: AtomicI64::new(start), reserved: Mutex::new(start), path: path.to_owned() };
        seq.reserve_through(start)?;
        Ok(seq)
    }

    /// The number the next allocation returns (the hub starts waiting there).
    pub fn peek(&self) -> i64 {
        self.next.load(Ordering::SeqCst)
    }

    /// The next number. Fails only if the reservation cannot be written to disk; the
    /// error carries the number that was taken all the same, which the caller must report
    /// void (it is never handed out again, and the hub must not wait for it).
    pub fn allocate(&self) -> Result<i64, (i64, std::io::Error)> {
        let s = self.next.fetch_add(1, Ordering::SeqCst);
        // Test builds: `FAILPOINTS=sequencer-allocate=…return` makes a reservation fail.
        fail::fail_point!("sequencer-allocate", |_| Err((
            s,
            std::io::Error::other("the sequence file cannot be written")
        )));
        self.reserve_through(s).map_err(|e| (s, e))?;
        Ok(s)
    }

    /// Makes sure no number `<= floor` is handed out again (a shard reported it holds
    /// `floor`). Returns the range of numbers skipped, which the caller must report void.
    pub fn raise_floor(&self, floor: i64) -> std::ops::Range<i64> {
        let prev = self.next.fetch_max(floor + 1, Ordering::SeqCst);
        prev..(floor + 1).max(prev)
    }

    fn reserve_through(&self, s: i64) -> std::io::Result<()> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        if s < *reserved {
            return Ok(());
        }
        let upto = s + BLOCK;
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{upto}")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        *reserved = upto;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_reuses_a_number_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq");
        let first = Sequencer::open(&path).unwrap();
        let a = first.allocate().unwrap();
        let b = first.allocate().unwrap();
        assert!(b > a);
        drop(first);
        let second = Sequencer::open(&path).unwrap();
        assert!(second.allocate().unwrap() > b);
    }

    #[test]
    fn reserves_new_blocks_as_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq");
        let s = Sequencer::open(&path).unwrap();
        let mut last = 0;
        for _ in 0..(BLOCK + 5) {
            last = s.allocate().unwrap();
        }
        let on_disk: i64 = std::fs::read_to_string(&path).unwrap().trim().parse().unwrap();
        assert!(on_disk > last);
    }

    #[test]
    fn raising_the_floor_reports_the_skipped_range() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sequencer::open(&dir.path().join("seq")).unwrap();
        let start = s.peek();
        assert_eq!(s.raise_floor(start + 9), start..start + 10);
        assert_eq!(s.allocate().unwrap(), start + 10);
        assert!(s.raise_floor(3).is_empty());
    }
}
