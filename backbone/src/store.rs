//! Crash-safe storage for the records a backbone keeps across restarts
//! (see [`crate::Directory::enable_persistence`]). This is the one part of
//! the crate that touches the file system; the [`crate::Directory`] core
//! stays sans-IO and only says what to keep ([`crate::PersistOp`]).
//!
//! Format: an append-only log `records.log` in the state directory. Each
//! entry is `len (u32 LE) | checksum (first 8 bytes of BLAKE3 of the
//! payload) | payload (postcard)`. Appends are followed by `fdatasync`
//! before [`Store::apply`] returns. On open, entries are read up to the
//! first torn or corrupt one (a crash mid-append), the file is rewritten
//! with only the live records (written to `records.log.tmp`, fsynced, then
//! renamed over the log and the directory fsynced), so a crash at any point
//! leaves either the old or the new log, never a mix. The log is compacted
//! the same way when it holds more than twice the live records.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meshtun_addr::MeshAddr;
use meshtun_proto::SignedRecord;
use serde::{Deserialize, Serialize};

use crate::{PersistOp, PersistedRecord};

const LOG: &str = "records.log";
const TMP: &str = "records.log.tmp";
/// Larger entries are corrupt (a record body is at most 1 KiB).
const MAX_ENTRY: usize = 16 * 1024;

#[derive(Serialize, Deserialize)]
enum LogEntry {
    Store { addr: MeshAddr, signed: SignedRecord, observed: SocketAddr, local: u32 },
    Forget { addr: MeshAddr },
}

/// What [`Store::open`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub records: usize,
    pub entries_read: usize,
    /// Bytes at the end of the log that did not form a whole, valid entry
    /// (a write cut short by a crash); dropped.
    pub torn_bytes: usize,
}

pub struct Store {
    dir: PathBuf,
    log: File,
    live: HashMap<MeshAddr, PersistedRecord>,
    entries: usize,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and returns the
    /// records it holds.
    pub fn open(dir: &Path) -> std::io::Result<(Store, Vec<PersistedRecord>, OpenReport)> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let _ = std::fs::remove_file(dir.join(TMP)); // an unfinished compaction
        let mut bytes = Vec::new();
        match File::open(dir.join(LOG)) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut live = HashMap::new();
        let mut report = OpenReport::default();
        let mut at = 0;
        while let Some((entry, next)) = read_entry(&bytes, at) {
            match entry {
                LogEntry::Store { addr, signed, observed, local } => {
                    live.insert(addr, PersistedRecord { signed, observed, local: local as usize });
                }
                LogEntry::Forget { addr } => {
                    live.remove(&addr);
                }
            }
            report.entries_read += 1;
            at = next;
        }
        report.torn_bytes = bytes.len() - at;
        report.records = live.len();
        write_compacted(dir, &live)?;
        let log = OpenOptions::new().append(true).open(dir.join(LOG))?;
        let records = live.values().cloned().collect();
        let entries = live.len();
        Ok((Store { dir: dir.to_path_buf(), log, live, entries }, records, report))
    }

    /// Records currently kept.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Appends `ops` and syncs them to disk (one `fdatasync` per call).
    pub fn apply(&mut self, ops: &[PersistOp]) -> std::io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for op in ops {
            let entry = match op {
                PersistOp::Store { addr, record } => {
                    self.live.insert(*addr, record.clone());
                    LogEntry::Store {
                        addr: *addr,
                        signed: record.signed.clone(),
                        observed: record.observed,
                        local: record.local as u32,
                    }
                }
                PersistOp::Forget { addr } => {
                    if self.live.remove(addr).is_none() {
                        continue;
                    }
                    LogEntry::Forget { addr: *addr }
                }
            };
            encode_entry(&entry, &mut buf);
            self.entries += 1;
        }
        self.log.write_all(&buf)?;
        self.log.sync_data()?;
        if self.entries > 2 * self.live.len() + 1024 {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the log with only the live records.
    pub fn compact(&mut self) -> std::io::Result<()> {
        write_compacted(&self.dir, &self.live)?;
        self.log = OpenOptions::new().append(true).open(self.dir.join(LOG))?;
        self.entries = self.live.len();
        Ok(())
    }
}

fn encode_entry(entry: &LogEntry, out: &mut Vec<u8>) {
    let payload = postcard::to_allocvec(entry).unwrap_or_default();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&blake3::hash(&payload).as_bytes()[..8]);
    out.extend_from_slice(&payload);
}

/// The entry at `at` and where the next one starts, or None at the end or
/// at a torn or corrupt entry.
fn read_entry(bytes: &[u8], at: usize) -> Option<(LogEntry, usize)> {
    let header = bytes.get(at..at + 12)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    if len > MAX_ENTRY {
        return None;
    }
    let payload = bytes.get(at + 12..at + 12 + len)?;
    if blake3::hash(payload).as_bytes()[..8] != header[4..12] {
        return None;
    }
    let entry = postcard::from_bytes(payload).ok()?;
    Some((entry, at + 12 + len))
}

fn write_compacted(dir: &Path, live: &HashMap<MeshAddr, PersistedRecord>) -> std::io::Result<()> {
    let tmp = dir.join(TMP);
    let mut w = BufWriter::new(File::create(&tmp)?);
    let mut buf = Vec::new();
    for (addr, r) in live {
        buf.clear();
        let entry = LogEntry::Store { addr: *addr, signed: r.signed.clone(), observed: r.observed, local: r.local as u32 };
        encode_entry(&entry, &mut buf);
        w.write_all(&buf)?;
    }
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(LOG))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtun_addr::{NetworkId, NodeAddr};

    fn record(n: u8) -> (MeshAddr, PersistedRecord) {
        let addr = MeshAddr::new(NetworkId::PUBLIC, NodeAddr::new(0x1000 + n as u64).unwrap());
        let signed = SignedRecord { body: vec![n; 40], signature: vec![n; 64] };
        (addr, PersistedRecord { signed, observed: format!("198.18.0.{n}:51820").parse().unwrap(), local: 0 })
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshtun-store-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn stored_records_survive_a_reopen_and_forgotten_ones_do_not() {
        let dir = temp_dir("reopen");
        let (mut store, found, _) = Store::open(&dir).unwrap();
        assert!(found.is_empty());
        let (a, ra) = record(1);
        let (b, rb) = record(2);
        store.apply(&[PersistOp::Store { addr: a, record: ra.clone() }, PersistOp::Store { addr: b, record: rb }]).unwrap();
        store.apply(&[PersistOp::Forget { addr: b }]).unwrap();
        drop(store);
        let (_, found, report) = Store::open(&dir).unwrap();
        assert_eq!(found, vec![ra]);
        assert_eq!(report.torn_bytes, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_dropped_and_everything_before_it_kept() {
        let dir = temp_dir("torn");
        let (mut store, _, _) = Store::open(&dir).unwrap();
        let (a, ra) = record(1);
        let (b, rb) = record(2);
        store.apply(&[PersistOp::Store { addr: a, record: ra.clone() }]).unwrap();
        store.apply(&[PersistOp::Store { addr: b, record: rb }]).unwrap();
        drop(store);
        let log = dir.join(LOG);
        let full = std::fs::read(&log).unwrap();
        // Every cut inside the second entry keeps exactly the first.
        let first_len = 12 + u32::from_le_bytes(full[..4].try_into().unwrap()) as usize;
        for cut in first_len..full.len() {
            std::fs::write(&log, &full[..cut]).unwrap();
            let (_, found, report) = Store::open(&dir).unwrap();
            assert_eq!(found, vec![ra.clone()], "cut at {cut}");
            assert_eq!(report.torn_bytes, cut - first_len);
        }
        // A flipped bit in the second entry: dropped too.
        let mut flipped = full.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&log, &flipped).unwrap();
        let (_, found, _) = Store::open(&dir).unwrap();
        assert_eq!(found, vec![ra]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_log_is_compacted_when_mostly_dead() {
        let dir = temp_dir("compact");
        let (mut store, _, _) = Store::open(&dir).unwrap();
        let (a, ra) = record(1);
        let batch = vec![PersistOp::Store { addr: a, record: ra.clone() }; 100];
        for _ in 0..30 {
            store.apply(&batch).unwrap();
        }
        assert!(store.entries <= 2 * store.len() + 1024);
        drop(store);
        let (_, found, report) = Store::open(&dir).unwrap();
        assert_eq!(found.len(), 1);
        assert!(report.entries_read < 1100, "{}", report.entries_read);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
