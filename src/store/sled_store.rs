//! The embedded store: one sled tree, so that an event and its deliveries are
//! written in one atomic batch.
//!
//! Keys (ids are 16 bytes, big-endian times 8 bytes):
//! - `e/{id}`: [`EventMeta`] as JSON
//! - `b/{id}`: the body, raw
//! - `d/{target}\0{id}`: [`DeliveryRecord`] as JSON
//! - `q/{target}\0{due}{id}`: empty; the queue of pending deliveries, by due time
//! - `k/{source}\0{sha256 of dedup key}`: `{id}{expires}`

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::commit::GroupCommit;
use super::*;

pub struct SledStore {
    db: sled::Db,
    /// Makes the dedup check and the write one step: two copies of one
    /// webhook arriving together must not both be stored. Held only for
    /// in-memory work, never across an `.await`.
    ingest_lock: Mutex<()>,
    commit: GroupCommit,
}

impl SledStore {
    /// Opens (or creates) the store in `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| {
                StoreError::Io(format!("cannot open storage at {}: {e}", path.display()))
            })?;
        let mut syncer = DiskSync::new(path, db.clone())?;
        let commit = GroupCommit::start(move || syncer.sync())?;
        Ok(SledStore {
            db,
            ingest_lock: Mutex::new(()),
            commit,
        })
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.db.get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| corrupt(key, e)),
        }
    }

    /// The dedup check and the write, under the ingest lock.
    fn write_new(&self, ev: &NewEvent) -> Result<Ingested, StoreError> {
        let dedup_key = dedup_key(&ev.source, &ev.dedup_key);
        let _guard = self.ingest_lock.lock().map_err(|_| StoreError::Closed)?;
        if let Some(found) = self.db.get(&dedup_key)? {
            if found.len() == 24 {
                let expires = u64::from_be_bytes(found[16..24].try_into().unwrap_or_default());
                if let (true, Some(id)) =
                    (expires > ev.received_ms, EventId::from_slice(&found[..16]))
                {
                    return Ok(Ingested::Duplicate { id });
                }
            }
        }
        let meta = EventMeta {
            source: ev.source.clone(),
            event: ev.event.clone(),
            received_ms: ev.received_ms,
            content_type: ev.content_type.clone(),
            targets: ev.targets.clone(),
        };
        let pending = DeliveryRecord {
            state: DeliveryState::Pending {
                due_ms: ev.received_ms,
            },
            attempts: vec![],
        };
        let pending = serde_json::to_vec(&pending).map_err(|e| StoreError::Io(e.to_string()))?;
        let id = ev.id.as_bytes();
        let mut batch = sled::Batch::default();
        batch.insert(
            key(b"e/", &[id]),
            serde_json::to_vec(&meta).map_err(|e| StoreError::Io(e.to_string()))?,
        );
        batch.insert(key(b"b/", &[id]), ev.body.as_ref());
        for target in &ev.targets {
            batch.insert(
                key(b"d/", &[target.as_bytes(), b"\0", id]),
                pending.as_slice(),
            );
            batch.insert(
                key(
                    b"q/",
                    &[target.as_bytes(), b"\0", &ev.received_ms.to_be_bytes(), id],
                ),
                &[],
            );
        }
        let expires = ev
            .received_ms
            .saturating_add(ev.dedup_window.as_millis() as u64);
        batch.insert(dedup_key, key(id, &[&expires.to_be_bytes()]));
        self.db.apply_batch(batch)?;
        Ok(Ingested::Accepted {
            id: ev.id,
            targets: ev.targets.len(),
        })
    }
}

fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    k.extend_from_slice(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn dedup_key(source: &str, dedup: &str) -> Vec<u8> {
    key(
        b"k/",
        &[source.as_bytes(), b"\0", &Sha256::digest(dedup.as_bytes())],
    )
}

fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    }
}

#[async_trait]
impl Store for SledStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        // The batch is applied in memory (sled writes its log in the
        // background); only the flush below waits for the disk.
        let outcome = self.write_new(&event)?;
        // A duplicate waits too: the first copy may still be on its way to disk.
        self.commit.durable().await?;
        Ok(outcome)
    }

    async fn event(&self, id: EventId) -> Result<Option<StoredEvent>, StoreError> {
        let Some(meta) = self.get_json::<EventMeta>(&key(b"e/", &[id.as_bytes()]))? else {
            return Ok(None);
        };
        let body_key = key(b"b/", &[id.as_bytes()]);
        let body = self
            .db
            .get(&body_key)?
            .ok_or_else(|| corrupt(&body_key, "body missing"))?;
        Ok(Some(StoredEvent {
            id,
            meta,
            body: bytes::Bytes::copy_from_slice(&body),
        }))
    }

    async fn recent_events(
        &self,
        source: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(EventId, EventMeta)>, StoreError> {
        // Ids are UUIDv7, so key order is arrival order: walk it backwards.
        let mut out = Vec::new();
        for item in self.db.scan_prefix(b"e/").rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let id = EventId::from_slice(&k[2..]).ok_or_else(|| corrupt(&k, "bad event id"))?;
            let meta: EventMeta = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
            if source.is_none_or(|s| s == meta.source) {
                out.push((id, meta));
            }
        }
        Ok(out)
    }

    async fn deliveries(&self, id: EventId) -> Result<Vec<Delivery>, StoreError> {
        let Some(meta) = self.get_json::<EventMeta>(&key(b"e/", &[id.as_bytes()]))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(meta.targets.len());
        for target in meta.targets {
            let k = key(b"d/", &[target.as_bytes(), b"\0", id.as_bytes()]);
            if let Some(record) = self.get_json::<DeliveryRecord>(&k)? {
                out.push(Delivery {
                    event_id: id,
                    target,
                    record,
                });
            }
        }
        Ok(out)
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.commit.stop();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??;
        Ok(())
    }
}

/// Makes sled's writes survive a power cut. sled 0.34's `flush` ends with
/// `sync_file_range`, which leaves data in the disk's volatile cache, and it
/// writes large values to files under `blobs/` without syncing them at all.
/// So after each flush: `fdatasync` the log file, and `fsync` every new blob
/// file and the `blobs` folder that names it.
struct DiskSync {
    db: sled::Db,
    log: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<std::ffi::OsString>,
}

impl DiskSync {
    fn new(path: &Path, db: sled::Db) -> Result<Self, StoreError> {
        // fdatasync works on the inode, so a read-only handle of our own suffices.
        let log = File::open(path.join("db"))?;
        // sled may just have created its files: make their names durable too.
        File::open(path)?.sync_all()?;
        Ok(DiskSync {
            db,
            log,
            blobs_dir: path.join("blobs"),
            synced_blobs: HashSet::new(),
        })
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.log.sync_data()?;
        self.sync_blobs()
    }

    fn sync_blobs(&mut self) -> Result<(), StoreError> {
        let mut present = HashSet::new();
        let mut new_blob = false;
        for entry in std::fs::read_dir(&self.blobs_dir)? {
            let name = entry?.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(self.blobs_dir.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // sled removed it between read_dir and open: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                new_blob = true;
            }
            present.insert(name);
        }
        if new_blob {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}
