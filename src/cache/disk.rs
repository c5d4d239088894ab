//! Disk tier of the response cache: the on-disk object format, the in-memory index of the
//! cache directory, and the blocking file operations behind it.
//!
//! Everything here is synchronous and must run on a blocking thread
//! (`tokio::task::spawn_blocking`); [`super::storage`] owns the async side and decides when
//! to call in here.
//!
//! # Layout
//!
//! ```text
//! <dir>/objects/<hh>/<32 hex hash>-<16 hex generation>.wmc   committed objects
//! <dir>/tmp/<32 hex hash>-<16 hex generation>.tmp           writes in progress
//! ```
//!
//! `<hh>` is the first byte of the hash (256-way fan-out). The generation is random per write,
//! so a new version of an object never reuses the path of an old one: an old file can be
//! unlinked later (after a purge, an eviction or a replacement) without racing a newer write.
//! Files under `tmp/` are left-overs of interrupted writes and are deleted at startup.
//!
//! # File format (version 1, integers little-endian)
//!
//! ```text
//!  0..8   magic  b"WNGMCACH"
//!  8..12  format version (1)
//! 12..16  flags (0)
//! 16..20  primary key length  K
//! 20..24  meta part 0 length  M0   (CacheMeta::serialize().0, internal meta)
//! 24..28  meta part 1 length  M1   (CacheMeta::serialize().1, response header)
//! 28..32  reserved (0)
//! 32..40  body length         B
//! 40..56  combined cache-key hash (must match the file name)
//! 56..60  CRC-32 of the payload (key | meta0 | meta1 | body)
//! 60..64  CRC-32 of bytes 0..60
//! 64..    payload: key (K) | meta0 (M0) | meta1 (M1) | body (B)
//! ```
//!
//! A file is valid only if its length is exactly `64 + K + M0 + M1 + B` and both checksums
//! match. Writes go to `tmp/`, are fsynced, then renamed into `objects/` (and the directory
//! fsynced), so a crash leaves either the old state or the complete new file.
//!
//! # Accounting
//!
//! Each file is charged its length rounded up to 4 KiB (a filesystem block), so the number of
//! indexed files, and with it the RAM used by the index, is at most `max_bytes / 4096`.

use super::index::{BinaryMeta, PrimaryIndex};
use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use pingora::cache::key::HashBinary;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// File magic, first 8 bytes of every object file.
pub(crate) const MAGIC: [u8; 8] = *b"WNGMCACH";
/// Current (and only) file format version.
pub(crate) const VERSION: u32 = 1;
/// Length of the fixed header.
pub(crate) const HEADER_LEN: usize = 64;
/// Longest primary key the format accepts (the storage refuses longer keys up front).
pub(crate) const MAX_KEY_LEN: usize = 64 * 1024;
/// Longest serialized meta part the format accepts.
pub(crate) const MAX_META_LEN: usize = 4 * 1024 * 1024;
/// Disk usage is charged in units of this many bytes.
const BLOCK: u64 = 4096;
const OBJECT_EXT: &str = "wmc";
const TMP_EXT: &str = "tmp";

/// Why an object file was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskFormatError {
    /// Shorter than the fixed header.
    #[error("file is shorter than the {HEADER_LEN}-byte header ({0} bytes)")]
    ShortHeader(u64),
    /// Not a cache object file.
    #[error("bad magic")]
    BadMagic,
    /// Written by an incompatible version.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    /// The header bytes do not match their checksum.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// A section length is beyond what the format allows.
    #[error("section length out of range ({0})")]
    SectionTooLong(&'static str),
    /// The file is truncated or has trailing bytes.
    #[error("file length {actual} does not match the header ({expected})")]
    LengthMismatch {
        /// Length the header implies.
        expected: u64,
        /// Length of the file.
        actual: u64,
    },
    /// The payload does not match its checksum.
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    /// The hash inside the file is not the one its name says.
    #[error("object hash does not match the file name")]
    HashMismatch,
    /// The body is larger than the configured per-object limit.
    #[error("body of {0} bytes exceeds max_object_bytes")]
    BodyTooLarge(u64),
}

/// A failed read: either the file is bad (and should be removed) or the I/O failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("corrupt cache file: {0}")]
    Format(#[from] DiskFormatError),
    #[error("cache file I/O: {0}")]
    Io(#[from] io::Error),
}

/// The fixed header of an object file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub key_len: u32,
    pub meta0_len: u32,
    pub meta1_len: u32,
    pub body_len: u64,
    pub hash: HashBinary,
    pub payload_crc: u32,
}

impl Header {
    /// Header for an object, with the payload checksum computed over the parts.
    pub fn for_object(hash: HashBinary, key: &[u8], meta: &BinaryMeta, body: &[u8]) -> Self {
        let mut crc = crc32fast::Hasher::new();
        crc.update(key);
        crc.update(&meta.0);
        crc.update(&meta.1);
        crc.update(body);
        Header {
            key_len: key.len() as u32,
            meta0_len: meta.0.len() as u32,
            meta1_len: meta.1.len() as u32,
            body_len: body.len() as u64,
            hash,
            payload_crc: crc.finalize(),
        }
    }

    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64
            + u64::from(self.key_len)
            + u64::from(self.meta0_len)
            + u64::from(self.meta1_len)
            + self.body_len
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        // 12..16 flags, 28..32 reserved: zero
        b[16..20].copy_from_slice(&self.key_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.meta0_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.meta1_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.body_len.to_le_bytes());
        b[40..56].copy_from_slice(&self.hash);
        b[56..60].copy_from_slice(&self.payload_crc.to_le_bytes());
        let hcrc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&hcrc.to_le_bytes());
        b
    }

    /// Parse and validate a header. `max_body` is the per-object body limit.
    pub fn decode(b: &[u8; HEADER_LEN], max_body: u64) -> Result<Self, DiskFormatError> {
        if b[0..8] != MAGIC {
            return Err(DiskFormatError::BadMagic);
        }
        let hcrc = le_u32(&b[60..64]);
        if crc32fast::hash(&b[0..60]) != hcrc {
            return Err(DiskFormatError::HeaderChecksum);
        }
        let version = le_u32(&b[8..12]);
        if version != VERSION {
            return Err(DiskFormatError::UnsupportedVersion(version));
        }
        let key_len = le_u32(&b[16..20]);
        let meta0_len = le_u32(&b[20..24]);
        let meta1_len = le_u32(&b[24..28]);
        let body_len = u64::from_le_bytes(b[32..40].try_into().unwrap_or([0xff; 8]));
        if key_len as usize > MAX_KEY_LEN {
            return Err(DiskFormatError::SectionTooLong("key"));
        }
        if meta0_len as usize > MAX_META_LEN || meta1_len as usize > MAX_META_LEN {
            return Err(DiskFormatError::SectionTooLong("meta"));
        }
        if body_len > max_body {
            return Err(DiskFormatError::BodyTooLarge(body_len));
        }
        let mut hash = HashBinary::default();
        hash.copy_from_slice(&b[40..56]);
        Ok(Header {
            key_len,
            meta0_len,
            meta1_len,
            body_len,
            hash,
            payload_crc: le_u32(&b[56..60]),
        })
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// A complete object read back from disk and validated.
#[derive(Debug)]
pub(crate) struct DiskObject {
    pub primary: Arc<str>,
    pub meta: BinaryMeta,
    pub body: Bytes,
}

fn read_vec(f: &mut File, len: usize, crc: &mut crc32fast::Hasher) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    f.read_exact(&mut v)?;
    crc.update(&v);
    Ok(v)
}

/// Open `path` and validate the header against the file length and the expected hash.
fn open_checked(
    path: &Path,
    hash: &HashBinary,
    max_body: u64,
) -> Result<(File, Header), ReadError> {
    let mut f = File::open(path)?;
    let actual = f.metadata()?.len();
    if actual < HEADER_LEN as u64 {
        return Err(DiskFormatError::ShortHeader(actual).into());
    }
    let mut hb = [0u8; HEADER_LEN];
    f.read_exact(&mut hb)?;
    let header = Header::decode(&hb, max_body)?;
    if &header.hash != hash {
        return Err(DiskFormatError::HashMismatch.into());
    }
    if header.file_len() != actual {
        return Err(DiskFormatError::LengthMismatch {
            expected: header.file_len(),
            actual,
        }
        .into());
    }
    Ok((f, header))
}

/// Read and fully validate an object file (lengths and both checksums).
pub(crate) fn read_object(
    path: &Path,
    hash: &HashBinary,
    max_body: u64,
) -> Result<DiskObject, ReadError> {
    let (mut f, h) = open_checked(path, hash, max_body)?;
    let mut crc = crc32fast::Hasher::new();
    let key = read_vec(&mut f, h.key_len as usize, &mut crc)?;
    let meta0 = read_vec(&mut f, h.meta0_len as usize, &mut crc)?;
    let meta1 = read_vec(&mut f, h.meta1_len as usize, &mut crc)?;
    let body_len = usize::try_from(h.body_len)
        .map_err(|_| ReadError::Format(DiskFormatError::BodyTooLarge(h.body_len)))?;
    let body = read_vec(&mut f, body_len, &mut crc)?;
    if crc.finalize() != h.payload_crc {
        return Err(DiskFormatError::PayloadChecksum.into());
    }
    Ok(DiskObject {
        primary: String::from_utf8_lossy(&key).into(),
        meta: (meta0, meta1),
        body: Bytes::from(body),
    })
}

/// Read only what the index needs: the header (validated against the file length) and the key.
fn read_index_info(
    path: &Path,
    hash: &HashBinary,
    max_body: u64,
) -> Result<(Header, Arc<str>), ReadError> {
    let (mut f, h) = open_checked(path, hash, max_body)?;
    let mut key = vec![0u8; h.key_len as usize];
    f.read_exact(&mut key)?;
    Ok((h, String::from_utf8_lossy(&key).into()))
}

/// Write a complete object file to `path` (which must not exist) and fsync it.
fn write_file(
    path: &Path,
    header: &Header,
    key: &[u8],
    meta: &BinaryMeta,
    body: &[u8],
) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(&header.encode())?;
    f.write_all(key)?;
    f.write_all(&meta.0)?;
    f.write_all(&meta.1)?;
    f.write_all(body)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cache: cannot remove {}: {e}", path.display()),
    }
}

/// Remove files (blocking).
pub(crate) fn remove_files(paths: &[PathBuf]) {
    for p in paths {
        remove_quietly(p);
    }
}

fn charge(file_len: u64) -> u64 {
    file_len.div_ceil(BLOCK).max(1) * BLOCK
}

fn hex(hash: &HashBinary) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(32);
    for b in hash {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parse `<32 hex>-<16 hex>.<ext>`.
fn parse_name(name: &str, ext: &str) -> Option<(HashBinary, u64)> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    let (h, g) = stem.split_once('-')?;
    if h.len() != 32 || g.len() != 16 {
        return None;
    }
    let mut hash = HashBinary::default();
    for (i, out) in hash.iter_mut().enumerate() {
        *out = u8::from_str_radix(h.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    let gen = u64::from_str_radix(g, 16).ok()?;
    Some((hash, gen))
}

#[derive(Debug, Clone)]
pub(crate) struct DiskEntry {
    pub gen: u64,
    charge: u64,
    primary: Arc<str>,
}

struct DiskIndex {
    lru: LruCache<HashBinary, DiskEntry>,
    used: u64,
    by_primary: PrimaryIndex,
    evictions: u64,
}

impl DiskIndex {
    fn remove(&mut self, hash: &HashBinary) -> Option<DiskEntry> {
        let e = self.lru.pop(hash)?;
        self.used = self.used.saturating_sub(e.charge);
        self.by_primary.remove(&e.primary, hash);
        Some(e)
    }
}

/// When [`DiskTier::store`] may make its file visible.
pub(crate) enum StoreCond {
    /// Store unless the flag is set (the fill was purged). Checked under the index lock.
    NotDoomed(Arc<AtomicBool>),
    /// Store only if the index still holds exactly this generation (a rewrite of that file).
    ReplaceGen(u64),
}

/// Counters of the disk tier.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DiskStats {
    pub bytes: u64,
    pub objects: u64,
    pub evictions: u64,
    pub rejected: u64,
    pub errors: u64,
}

/// The disk tier: a directory of object files and its index.
pub(crate) struct DiskTier {
    objects: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    max_body: u64,
    index: Mutex<DiskIndex>,
    rejected: AtomicU64,
    errors: AtomicU64,
}

struct Scanned {
    hash: HashBinary,
    gen: u64,
    file_len: u64,
    primary: Arc<str>,
    mtime: SystemTime,
}

impl DiskTier {
    /// Open (creating if needed) the cache directory and index what is in it (blocking).
    ///
    /// Left-over temporary files are deleted; files that fail validation are deleted; if the
    /// valid files exceed `max_bytes` the least recently written ones are deleted.
    pub fn open(dir: &Path, max_bytes: u64, max_body: u64) -> io::Result<DiskTier> {
        let objects = dir.join("objects");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&objects)?;
        fs::create_dir_all(&tmp)?;
        let tier = DiskTier {
            objects,
            tmp,
            max_bytes,
            max_body,
            index: Mutex::new(DiskIndex {
                lru: LruCache::unbounded(),
                used: 0,
                by_primary: PrimaryIndex::default(),
                evictions: 0,
            }),
            rejected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        };
        tier.scan()?;
        Ok(tier)
    }

    fn scan(&self) -> io::Result<()> {
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                remove_quietly(&entry.path());
            }
        }
        let mut found = Vec::new();
        for sub in fs::read_dir(&self.objects)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            let entries = match fs::read_dir(sub.path()) {
                Ok(it) => it,
                Err(e) => {
                    log::warn!("cache: cannot list {}: {e}", sub.path().display());
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            for entry in entries {
                let Ok(entry) = entry else {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let path = entry.path();
                let name = entry.file_name();
                let Some((hash, gen)) = name.to_str().and_then(|n| parse_name(n, OBJECT_EXT))
                else {
                    continue; // not ours
                };
                match read_index_info(&path, &hash, self.max_body) {
                    Ok((h, primary)) => {
                        let mtime = entry
                            .metadata()
                            .and_then(|m| m.modified())
                            .unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push(Scanned {
                            hash,
                            gen,
                            file_len: h.file_len(),
                            primary,
                            mtime,
                        });
                    }
                    Err(ReadError::Format(e)) => {
                        log::warn!("cache: removing invalid file {}: {e}", path.display());
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                        remove_quietly(&path);
                    }
                    Err(ReadError::Io(e)) => {
                        log::warn!("cache: cannot read {}: {e}", path.display());
                        self.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        // Oldest first, so that the most recently written files end up most recently used.
        found.sort_by_key(|s| (s.mtime, s.gen));
        let mut stale = Vec::new();
        {
            let mut idx = self.index.lock();
            for s in found {
                if let Some(old) = idx.remove(&s.hash) {
                    stale.push(self.object_path(&s.hash, old.gen));
                }
                let entry = DiskEntry {
                    gen: s.gen,
                    charge: charge(s.file_len),
                    primary: s.primary,
                };
                idx.used += entry.charge;
                idx.by_primary.insert(&entry.primary, s.hash);
                idx.lru.push(s.hash, entry);
            }
            while idx.used > self.max_bytes {
                let Some((hash, e)) = idx.lru.pop_lru() else {
                    break;
                };
                idx.used = idx.used.saturating_sub(e.charge);
                idx.by_primary.remove(&e.primary, &hash);
                stale.push(self.object_path(&hash, e.gen));
            }
        }
        remove_files(&stale);
        Ok(())
    }

    fn object_dir(&self, hash: &HashBinary) -> PathBuf {
        self.objects.join(format!("{:02x}", hash[0]))
    }

    pub fn object_path(&self, hash: &HashBinary, gen: u64) -> PathBuf {
        self.object_dir(hash)
            .join(format!("{}-{gen:016x}.{OBJECT_EXT}", hex(hash)))
    }

    fn tmp_path(&self, hash: &HashBinary, gen: u64) -> PathBuf {
        self.tmp.join(format!("{}-{gen:016x}.{TMP_EXT}", hex(hash)))
    }

    /// The generation indexed for `hash`, marking it recently used.
    pub fn touch(&self, hash: &HashBinary) -> Option<u64> {
        self.index.lock().lru.get(hash).map(|e| e.gen)
    }

    /// The generation indexed for `hash`, without touching recency.
    pub fn peek(&self, hash: &HashBinary) -> Option<u64> {
        self.index.lock().lru.peek(hash).map(|e| e.gen)
    }

    /// Run `f` while holding the index lock, if `hash` is still indexed at generation `gen`.
    ///
    /// Used to promote a disk hit to memory without resurrecting an object purged meanwhile.
    pub fn if_current<R>(&self, hash: &HashBinary, gen: u64, f: impl FnOnce() -> R) -> Option<R> {
        let idx = self.index.lock();
        match idx.lru.peek(hash) {
            Some(e) if e.gen == gen => Some(f()),
            _ => None,
        }
    }

    /// Read generation `gen` of `hash` (blocking). A file that fails validation is removed
    /// together with its index entry and `Ok(None)` is returned; so is a file that vanished.
    pub fn read(&self, hash: &HashBinary, gen: u64) -> io::Result<Option<DiskObject>> {
        let path = self.object_path(hash, gen);
        match read_object(&path, hash, self.max_body) {
            Ok(obj) => Ok(Some(obj)),
            Err(ReadError::Format(e)) => {
                self.reject(hash, gen, &e);
                Ok(None)
            }
            Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(hash, gen);
                Ok(None)
            }
            Err(ReadError::Io(e)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Remove generation `gen` of `hash` as invalid (blocking): index entry and file.
    pub fn reject(&self, hash: &HashBinary, gen: u64, why: &dyn std::fmt::Display) {
        let path = self.object_path(hash, gen);
        log::warn!("cache: removing invalid file {}: {why}", path.display());
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.forget(hash, gen);
        remove_quietly(&path);
    }

    /// Count an I/O failure that happened outside this module (e.g. a failed blocking task).
    pub fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Drop the index entry for `hash` if it is still generation `gen`.
    fn forget(&self, hash: &HashBinary, gen: u64) {
        let mut idx = self.index.lock();
        if idx.lru.peek(hash).is_some_and(|e| e.gen == gen) {
            idx.remove(hash);
        }
    }

    /// Remove `hash` from the index; returns the file to unlink (the caller unlinks it, on a
    /// blocking thread). The file name is unique to that generation, so unlinking it later
    /// never touches a newer write.
    pub fn remove(&self, hash: &HashBinary) -> Option<PathBuf> {
        let e = self.index.lock().remove(hash)?;
        Some(self.object_path(hash, e.gen))
    }

    /// Add the hashes whose primary key starts with `prefix` (or equals it, if `exact`).
    pub fn collect(&self, prefix: &str, exact: bool, out: &mut HashSet<HashBinary>) {
        let idx = self.index.lock();
        if exact {
            idx.by_primary.exact(prefix, out);
        } else {
            idx.by_primary.with_prefix(prefix, out);
        }
    }

    /// Write an object (blocking): temp file, fsync, then, if `cond` still holds, rename into
    /// place and index it, evicting least recently used files beyond `max_bytes`.
    ///
    /// Returns `Ok(false)` if the object was not stored (too large for the tier, or `cond`
    /// failed).
    pub fn store(
        &self,
        hash: HashBinary,
        primary: &Arc<str>,
        meta: &BinaryMeta,
        body: &[u8],
        cond: StoreCond,
    ) -> io::Result<bool> {
        let res = self.store_inner(hash, primary, meta, body, cond);
        if res.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn store_inner(
        &self,
        hash: HashBinary,
        primary: &Arc<str>,
        meta: &BinaryMeta,
        body: &[u8],
        cond: StoreCond,
    ) -> io::Result<bool> {
        let key = primary.as_bytes();
        if key.len() > MAX_KEY_LEN
            || meta.0.len() > MAX_META_LEN
            || meta.1.len() > MAX_META_LEN
            || body.len() as u64 > self.max_body
        {
            return Ok(false);
        }
        let header = Header::for_object(hash, key, meta, body);
        let file_charge = charge(header.file_len());
        if file_charge > self.max_bytes {
            return Ok(false);
        }
        let gen: u64 = rand::random();
        let tmp = self.tmp_path(&hash, gen);
        let dest_dir = self.object_dir(&hash);
        let dest = self.object_path(&hash, gen);
        if let Err(e) = write_file(&tmp, &header, key, meta, body) {
            remove_quietly(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::create_dir_all(&dest_dir) {
            remove_quietly(&tmp);
            return Err(e);
        }
        let mut unlink = Vec::new();
        {
            let mut idx = self.index.lock();
            let allowed = match &cond {
                StoreCond::NotDoomed(doomed) => !doomed.load(Ordering::Acquire),
                StoreCond::ReplaceGen(g) => idx.lru.peek(&hash).is_some_and(|e| e.gen == *g),
            };
            if !allowed {
                drop(idx);
                remove_quietly(&tmp);
                return Ok(false);
            }
            if let Err(e) = fs::rename(&tmp, &dest) {
                drop(idx);
                remove_quietly(&tmp);
                return Err(e);
            }
            if let Some(old) = idx.remove(&hash) {
                unlink.push(self.object_path(&hash, old.gen));
            }
            let entry = DiskEntry {
                gen,
                charge: file_charge,
                primary: primary.clone(),
            };
            idx.used += file_charge;
            idx.by_primary.insert(primary, hash);
            idx.lru.push(hash, entry);
            while idx.used > self.max_bytes {
                let Some((h, e)) = idx.lru.pop_lru() else {
                    break;
                };
                idx.used = idx.used.saturating_sub(e.charge);
                idx.by_primary.remove(&e.primary, &h);
                idx.evictions += 1;
                unlink.push(self.object_path(&h, e.gen));
            }
        }
        if let Err(e) = sync_dir(&dest_dir) {
            log::warn!("cache: fsync of {} failed: {e}", dest_dir.display());
        }
        remove_files(&unlink);
        Ok(true)
    }

    pub fn stats(&self) -> DiskStats {
        let idx = self.index.lock();
        DiskStats {
            bytes: idx.used,
            objects: idx.lru.len() as u64,
            evictions: idx.evictions,
            rejected: self.rejected.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (HashBinary, Vec<u8>, BinaryMeta, Vec<u8>) {
        (
            [7u8; 16],
            b"https\nexample.com\n/x".to_vec(),
            (vec![1, 2, 3], vec![4, 5]),
            b"hello body".to_vec(),
        )
    }

    #[test]
    fn header_round_trip() {
        let (hash, key, meta, body) = sample();
        let h = Header::for_object(hash, &key, &meta, &body);
        let enc = h.encode();
        assert_eq!(Header::decode(&enc, 1 << 20), Ok(h.clone()));
        assert_eq!(
            h.file_len(),
            (HEADER_LEN + key.len() + 3 + 2 + body.len()) as u64
        );
    }

    #[test]
    fn header_rejects_bad_magic_version_and_checksum() {
        let (hash, key, meta, body) = sample();
        let enc = Header::for_object(hash, &key, &meta, &body).encode();

        let mut bad = enc;
        bad[0] ^= 0xff;
        assert_eq!(
            Header::decode(&bad, 1 << 20),
            Err(DiskFormatError::BadMagic)
        );

        let mut bad = enc;
        bad[17] ^= 0x01; // key length changed, header checksum no longer matches
        assert_eq!(
            Header::decode(&bad, 1 << 20),
            Err(DiskFormatError::HeaderChecksum)
        );

        let mut bad = enc;
        bad[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&bad[0..60]);
        bad[60..64].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Header::decode(&bad, 1 << 20),
            Err(DiskFormatError::UnsupportedVersion(2))
        );

        assert_eq!(
            Header::decode(&enc, 3),
            Err(DiskFormatError::BodyTooLarge(body.len() as u64))
        );
    }

    #[test]
    fn file_round_trip_and_validation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (hash, key, meta, body) = sample();
        let path = dir.path().join("obj");
        let h = Header::for_object(hash, &key, &meta, &body);
        write_file(&path, &h, &key, &meta, &body).expect("write");

        let obj = read_object(&path, &hash, 1 << 20).expect("valid file");
        assert_eq!(&*obj.primary, "https\nexample.com\n/x");
        assert_eq!(obj.meta, meta);
        assert_eq!(&obj.body[..], &body[..]);

        // wrong expected hash
        assert!(matches!(
            read_object(&path, &[8u8; 16], 1 << 20),
            Err(ReadError::Format(DiskFormatError::HashMismatch))
        ));

        // flip one body byte
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&path, &bytes).expect("write");
        assert!(matches!(
            read_object(&path, &hash, 1 << 20),
            Err(ReadError::Format(DiskFormatError::PayloadChecksum))
        ));

        // truncate
        bytes.truncate(bytes.len() - 3);
        fs::write(&path, &bytes).expect("write");
        assert!(matches!(
            read_object(&path, &hash, 1 << 20),
            Err(ReadError::Format(DiskFormatError::LengthMismatch { .. }))
        ));

        // shorter than a header
        fs::write(&path, b"WNGM").expect("write");
        assert!(matches!(
            read_object(&path, &hash, 1 << 20),
            Err(ReadError::Format(DiskFormatError::ShortHeader(4)))
        ));
    }

    #[test]
    fn names_parse_and_charge_rounds_up() {
        let hash = [0xabu8; 16];
        let name = format!("{}-{:016x}.wmc", hex(&hash), 42u64);
        assert_eq!(parse_name(&name, OBJECT_EXT), Some((hash, 42)));
        assert_eq!(parse_name("README", OBJECT_EXT), None);
        assert_eq!(
            parse_name(&format!("{}-zz.wmc", hex(&hash)), OBJECT_EXT),
            None
        );
        assert_eq!(charge(1), 4096);
        assert_eq!(charge(4096), 4096);
        assert_eq!(charge(4097), 8192);
    }
}
