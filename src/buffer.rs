//! Request and response buffering, like nginx's `proxy_request_buffering` and
//! `proxy_buffering`, within process-wide memory and disk budgets.
//!
//! Every buffered byte is claimed from a [`Budgets`] (`server.buffer_memory`,
//! `server.buffer_disk`), shared by all requests and kept across reloads. A body
//! takes memory up to its route's limit while the memory budget has room, then goes
//! to an unlinked temporary file up to its route's file limit while the disk budget
//! has room. Past either, it is no longer buffered: what was held is sent and the
//! rest streams, back-pressuring the other side as pingora does by default. A
//! budget never makes a request fail.
//!
//! File I/O (creating, writing and reading spool files) runs on tokio's blocking
//! pool, never on the worker threads that serve connections.
//!
//! - A request body ([`Spool`]) is read in full before an upstream is chosen. Its
//!   contents come back as one `Bytes` so that every attempt (retries included) can
//!   send it; a spilled body is a read-only memory map of its file (page cache, not
//!   the process's heap). A body the budgets cannot hold comes back as the part read
//!   so far, and the proxy streams the rest from the client.
//! - A response body ([`BufferedBody`]) is read at upstream speed while a slow
//!   client is still reading, so the app server is released early. The held chunks
//!   are sent, in order, by [`BufferedBody::next_out`] (the async backlog hook of
//!   the proxy), a spilled part read back from its file in [`READ_CHUNK`] pieces.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

/// A spilled response is sent in pieces of this size.
pub const READ_CHUNK: usize = 256 << 10;

/// Bytes of buffered bodies held now, process-wide (runtime state: survives reloads).
#[derive(Debug, Default)]
pub struct BudgetUse {
    memory: AtomicU64,
    disk: AtomicU64,
}

impl BudgetUse {
    pub fn memory(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }

    pub fn disk(&self) -> u64 {
        self.disk.load(Ordering::Relaxed)
    }

    fn counter(&self, store: Store) -> &AtomicU64 {
        match store {
            Store::Memory => &self.memory,
            Store::Disk => &self.disk,
        }
    }
}

/// The budgets of one snapshot: the shared use and this config's limits.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub used: Arc<BudgetUse>,
    pub memory: u64,
    pub disk: u64,
}

impl Budgets {
    fn claim(&self, store: Store) -> Claim {
        let limit = match store {
            Store::Memory => self.memory,
            Store::Disk => self.disk,
        };
        Claim {
            used: self.used.clone(),
            store,
            limit,
            held: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Memory,
    Disk,
}

/// One body's share of one budget; given back when dropped.
#[derive(Debug)]
struct Claim {
    used: Arc<BudgetUse>,
    store: Store,
    limit: u64,
    held: u64,
}

impl Claim {
    /// Claims `n` more bytes if the budget has room for them.
    fn try_grow(&mut self, n: u64) -> bool {
        let counter = self.used.counter(self.store);
        let mut cur = counter.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(n) > self.limit {
                return false;
            }
            match counter.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.held += n;
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Claims `n` more bytes even past the budget.
    fn force_grow(&mut self, n: u64) {
        self.used.counter(self.store).fetch_add(n, Ordering::AcqRel);
        self.held += n;
    }

    /// Gives `n` bytes back (at most what is held).
    fn shrink(&mut self, n: u64) {
        let n = n.min(self.held);
        self.held -= n;
        self.used.counter(self.store).fetch_sub(n, Ordering::AcqRel);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shrink(self.held);
    }
}

/// Per-body limits of buffering.
#[derive(Debug, Clone)]
pub struct SpoolLimits {
    pub memory: usize,
    /// 0: never spill to a file.
    pub file: u64,
    pub dir: PathBuf,
}

/// Why a spool refused more bytes.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Past the body's own limits (for a request: client_max_body_size).
    #[error("body larger than the buffering limits")]
    Full,
    /// The process-wide budgets have no room left: stream the rest.
    #[error("the buffering budgets are spent")]
    Budget,
    #[error("temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// Which budgets refused a body at some point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    /// The memory budget was full: the body went to a file sooner.
    pub memory: bool,
    /// The disk budget was full: the body was not (fully) buffered.
    pub disk: bool,
}

impl Refusals {
    /// The `storage` labels of the refusals, for metrics.
    pub fn labels(&self) -> impl Iterator<Item = &'static str> {
        [(self.memory, "memory"), (self.disk, "disk")]
            .into_iter()
            .filter_map(|(hit, l)| hit.then_some(l))
    }
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

/// An unlinked temporary file being written at its end.
#[derive(Debug)]
struct SpoolFile {
    file: Arc<File>,
    len: u64,
}

impl SpoolFile {
    /// Creates a file in `dir` holding `chunks`.
    async fn create(dir: PathBuf, chunks: Vec<Bytes>) -> std::io::Result<SpoolFile> {
        let (file, len) = blocking(move || {
            let file = tempfile::tempfile_in(&dir)?;
            let len = write_at(&file, 0, &chunks)?;
            Ok((file, len))
        })
        .await?;
        Ok(SpoolFile {
            file: Arc::new(file),
            len,
        })
    }

    async fn append(&mut self, chunks: Vec<Bytes>) -> std::io::Result<()> {
        let (file, at) = (self.file.clone(), self.len);
        self.len += blocking(move || write_at(&file, at, &chunks)).await?;
        Ok(())
    }

    /// Up to `max` bytes from `at`.
    async fn read(&self, at: u64, max: usize) -> std::io::Result<Bytes> {
        let file = self.file.clone();
        let n = (self.len.saturating_sub(at)).min(max as u64) as usize;
        blocking(move || {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, at)?;
            Ok(Bytes::from(buf))
        })
        .await
    }
}

fn write_at(file: &File, mut at: u64, chunks: &[Bytes]) -> std::io::Result<u64> {
    let start = at;
    for c in chunks {
        file.write_all_at(c, at)?;
        at += c.len() as u64;
    }
    Ok(at - start)
}

/// Keeps a body's budget claims for as long as its bytes live.
struct Owned<T> {
    data: T,
    _claims: Vec<Claim>,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Owned<T> {
    fn as_ref(&self) -> &[u8] {
        self.data.as_ref()
    }
}

/// A request body being collected.
#[derive(Debug)]
pub struct Spool {
    limits: SpoolLimits,
    mem: BytesMut,
    mem_claim: Claim,
    file: Option<SpoolFile>,
    disk_claim: Claim,
    len: u64,
    refused: Refusals,
}

impl Spool {
    pub fn new(limits: SpoolLimits, budgets: &Budgets) -> Spool {
        Spool {
            limits,
            mem: BytesMut::new(),
            mem_claim: budgets.claim(Store::Memory),
            file: None,
            disk_claim: budgets.claim(Store::Disk),
            len: 0,
            refused: Refusals::default(),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    pub fn refusals(&self) -> Refusals {
        self.refused
    }

    /// Appends bytes. [`SpoolError::Full`] when they fit neither in memory nor in the
    /// file (the body is too large); [`SpoolError::Budget`] when the budgets have no
    /// room for them. Either way nothing of `data` was taken.
    pub async fn push(&mut self, data: Bytes) -> Result<(), SpoolError> {
        let n = data.len() as u64;
        let after = self.len + n;
        if after > (self.limits.memory as u64).max(self.limits.file) {
            return Err(SpoolError::Full);
        }
        if self.file.is_none() {
            if after <= self.limits.memory as u64 {
                if self.mem_claim.try_grow(n) {
                    self.mem.extend_from_slice(&data);
                    self.len = after;
                    return Ok(());
                }
                self.refused.memory = true;
            }
            // spill: what memory holds and `data` go to a new file
            if after > self.limits.file {
                return Err(if self.refused.memory {
                    SpoolError::Budget
                } else {
                    SpoolError::Full
                });
            }
            if !self.disk_claim.try_grow(after) {
                self.refused.disk = true;
                return Err(SpoolError::Budget);
            }
            let held = std::mem::take(&mut self.mem).freeze();
            let file = SpoolFile::create(self.limits.dir.clone(), vec![held, data]).await?;
            self.mem_claim.shrink(u64::MAX);
            self.file = Some(file);
        } else {
            if after > self.limits.file {
                return Err(SpoolError::Full);
            }
            if !self.disk_claim.try_grow(n) {
                self.refused.disk = true;
                return Err(SpoolError::Budget);
            }
            if let Some(f) = self.file.as_mut() {
                f.append(vec![data]).await?;
            }
        }
        self.len = after;
        Ok(())
    }

    /// Appends bytes the budgets refused (see [`SpoolError::Budget`]) anyway, so
    /// that the body read so far is whole: the budgets are overshot by at most
    /// one read chunk per body, which then stops being buffered.
    pub async fn push_over_budget(&mut self, data: Bytes) -> Result<(), SpoolError> {
        let n = data.len() as u64;
        match self.file.as_mut() {
            Some(f) => {
                self.disk_claim.force_grow(n);
                f.append(vec![data]).await?;
            }
            None => {
                self.mem_claim.force_grow(n);
                self.mem.extend_from_slice(&data);
            }
        }
        self.len += n;
        Ok(())
    }

    /// Everything collected, as one buffer that keeps its budget claims until the
    /// last copy of it is dropped.
    pub fn take(self) -> Result<Bytes, SpoolError> {
        let claims = vec![self.mem_claim, self.disk_claim];
        match self.file {
            None => Ok(Bytes::from_owner(Owned {
                data: self.mem.freeze(),
                _claims: claims,
            })),
            Some(f) => {
                // SAFETY: the file is anonymous (unlinked at creation) and owned by
                // this spool alone; nothing else can change or truncate it while the
                // map lives.
                let map = unsafe { memmap2::Mmap::map(&*f.file)? };
                Ok(Bytes::from_owner(Owned {
                    data: map,
                    _claims: claims,
                }))
            }
        }
    }
}

/// Limits of response buffering for one route.
#[derive(Debug, Clone)]
pub struct ResponseBuffering {
    pub limits: SpoolLimits,
}

/// What a buffered response turned into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Held in memory until the end.
    Memory,
    /// Held in memory and a temporary file until the end.
    File,
    /// Outgrew its limits or the budgets: the buffered part was sent and the rest
    /// streamed.
    Streamed,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Memory => "memory",
            Outcome::File => "file",
            Outcome::Streamed => "streamed",
        }
    }
}

/// Response buffering state of one response.
///
/// [`push`](Self::push) (from the synchronous body filter) takes each chunk: it is
/// held in memory, queued for the file, or passed on once the body streams.
/// [`next_out`](Self::next_out) (from the async backlog hook, before each response
/// task is written) writes queued chunks to the file, and once the body ends or
/// streams, hands out what is held, in order: memory, file, queue.
#[derive(Debug)]
pub struct BufferedBody {
    limits: SpoolLimits,
    held: VecDeque<Bytes>,
    held_len: u64,
    mem_claim: Claim,
    file: Option<SpoolFile>,
    /// How much of the file was sent.
    sent_from_file: u64,
    disk_claim: Claim,
    /// Chunks received after the body started spilling, not yet in the file.
    queue: VecDeque<Bytes>,
    /// The body outgrew its limits or the budgets: it streams from now on.
    streaming: bool,
    /// The last chunk was received.
    ended: bool,
    spilled: bool,
    refused: Refusals,
}

impl BufferedBody {
    pub fn new(cfg: &ResponseBuffering, budgets: &Budgets) -> BufferedBody {
        BufferedBody {
            limits: cfg.limits.clone(),
            held: VecDeque::new(),
            held_len: 0,
            mem_claim: budgets.claim(Store::Memory),
            file: None,
            sent_from_file: 0,
            disk_claim: budgets.claim(Store::Disk),
            queue: VecDeque::new(),
            streaming: false,
            ended: false,
            spilled: false,
            refused: Refusals::default(),
        }
    }

    fn file_unsent(&self) -> u64 {
        self.file
            .as_ref()
            .map_or(0, |f| f.len - self.sent_from_file)
    }

    fn holds_anything(&self) -> bool {
        !self.held.is_empty() || self.file_unsent() > 0 || !self.queue.is_empty()
    }

    /// Takes one chunk (already transformed, e.g. compressed); returns what to send
    /// downstream with it now (the rest comes out of [`Self::next_out`]).
    pub fn push(&mut self, chunk: Bytes, end: bool) -> Option<Bytes> {
        if end {
            self.ended = true;
        }
        if !self.holds_anything() && (self.streaming || end) {
            // nothing held before it: a body in one chunk is never copied
            return Some(chunk);
        }
        if chunk.is_empty() {
            return None;
        }
        let n = chunk.len() as u64;
        if self.file.is_none()
            && self.queue.is_empty()
            && !self.streaming
            && self.held_len + n <= self.limits.memory as u64
        {
            if self.mem_claim.try_grow(n) {
                self.held.push_back(chunk);
                self.held_len += n;
                return None;
            }
            self.refused.memory = true;
        }
        self.queue.push_back(chunk);
        None
    }

    /// Whether [`Self::next_out`] has work: chunks to write to the file, or held
    /// chunks to send now that the body ended or streams.
    pub fn has_backlog(&self) -> bool {
        if self.streaming || self.ended {
            self.holds_anything()
        } else {
            !self.queue.is_empty()
        }
    }

    /// The next held chunk to send before the response task now due, if the body
    /// ended or streams; `None` when there is nothing to send yet. Writes queued
    /// chunks to the file first (blocking pool), switching to streaming when the
    /// file limit or the disk budget is reached.
    pub async fn next_out(&mut self) -> std::io::Result<Option<Bytes>> {
        // also at the end: what is held beyond memory waits for the client in the
        // file, never unaccounted in memory
        if !self.streaming && !self.queue.is_empty() {
            self.spill().await?;
        }
        if !(self.streaming || self.ended) {
            return Ok(None);
        }
        if let Some(c) = self.held.pop_front() {
            self.held_len -= c.len() as u64;
            self.mem_claim.shrink(c.len() as u64);
            return Ok(Some(c));
        }
        if self.file_unsent() > 0 {
            let f = self.file.as_ref().expect("a file with unsent bytes");
            let c = f.read(self.sent_from_file, READ_CHUNK).await?;
            self.sent_from_file += c.len() as u64;
            if self.file_unsent() == 0 {
                // all sent: the file goes, and its disk space with it
                self.file = None;
                self.disk_claim.shrink(u64::MAX);
            }
            return Ok(Some(c));
        }
        Ok(self.queue.pop_front())
    }

    /// Moves queued chunks into the file while its limit and the disk budget allow.
    async fn spill(&mut self) -> std::io::Result<()> {
        let mut batch = Vec::new();
        let mut file_len = self.file.as_ref().map_or(0, |f| f.len);
        while let Some(c) = self.queue.front() {
            let n = c.len() as u64;
            if file_len + n > self.limits.file {
                self.streaming = true;
                break;
            }
            if !self.disk_claim.try_grow(n) {
                self.refused.disk = true;
                self.streaming = true;
                break;
            }
            file_len += n;
            batch.extend(self.queue.pop_front());
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.spilled = true;
        match self.file.as_mut() {
            Some(f) => f.append(batch).await,
            None => {
                self.file = Some(SpoolFile::create(self.limits.dir.clone(), batch).await?);
                Ok(())
            }
        }
    }

    pub fn outcome(&self) -> Outcome {
        if self.streaming {
            Outcome::Streamed
        } else if self.spilled {
            Outcome::File
        } else {
            Outcome::Memory
        }
    }

    pub fn spilled(&self) -> bool {
        self.spilled
    }

    pub fn refusals(&self) -> Refusals {
        self.refused
    }

    /// The last chunk was received.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(memory: usize, file: u64) -> SpoolLimits {
        SpoolLimits {
            memory,
            file,
            dir: std::env::temp_dir(),
        }
    }

    fn budgets(memory: u64, disk: u64) -> Budgets {
        Budgets {
            used: Arc::default(),
            memory,
            disk,
        }
    }

    fn roomy() -> Budgets {
        budgets(u64::MAX, u64::MAX)
    }

    /// Pushes `chunks` (the last one ends the body) and collects what comes out, as
    /// the proxy does: the chunk passed on, after the backlog before it.
    async fn run(b: &mut BufferedBody, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let end = i + 1 == chunks.len();
            let passed = b.push(Bytes::copy_from_slice(c), end);
            while b.has_backlog() {
                match b.next_out().await.unwrap() {
                    Some(c) => out.extend_from_slice(&c),
                    None => break,
                }
            }
            if let Some(p) = passed {
                out.extend_from_slice(&p);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_small_body_stays_in_memory() {
        let mut s = Spool::new(limits(100, 0), &roomy());
        s.push(Bytes::from_static(b"hello ")).await.unwrap();
        s.push(Bytes::from_static(b"world")).await.unwrap();
        assert!(!s.spilled());
        assert_eq!(s.take().unwrap(), Bytes::from_static(b"hello world"));
    }

    #[tokio::test]
    async fn a_larger_body_spills_to_a_file_and_reads_back_whole() {
        let mut s = Spool::new(limits(10, 1 << 20), &roomy());
        let mut want = Vec::new();
        for i in 0..1000u32 {
            let chunk = format!("chunk {i};");
            s.push(Bytes::from(chunk.clone())).await.unwrap();
            want.extend_from_slice(chunk.as_bytes());
        }
        assert!(s.spilled());
        assert_eq!(s.len(), want.len() as u64);
        assert_eq!(s.take().unwrap().as_ref(), want.as_slice());
    }

    #[tokio::test]
    async fn a_body_beyond_both_limits_is_refused_without_loss() {
        let mut s = Spool::new(limits(4, 8), &roomy());
        s.push(Bytes::from_static(b"12345678")).await.unwrap();
        assert!(matches!(
            s.push(Bytes::from_static(b"9")).await,
            Err(SpoolError::Full)
        ));
        assert_eq!(s.take().unwrap().as_ref(), b"12345678");
    }

    #[tokio::test]
    async fn a_request_body_holds_its_budget_claims_until_its_last_copy_is_dropped() {
        let b = budgets(8, 16);
        let mut s = Spool::new(limits(100, 100), &b);
        s.push(Bytes::from_static(b"1234")).await.unwrap();
        assert_eq!((b.used.memory(), b.used.disk()), (4, 0));
        // past the memory budget: memory and the new bytes move to a file
        s.push(Bytes::from_static(b"567890")).await.unwrap();
        assert!(s.refusals().memory && s.spilled());
        assert_eq!((b.used.memory(), b.used.disk()), (0, 10));
        // past the disk budget: refused, nothing taken
        assert!(matches!(
            s.push(Bytes::from_static(b"abcdefg")).await,
            Err(SpoolError::Budget)
        ));
        assert!(s.refusals().disk);
        // the refused chunk joins the body anyway (it was read), past the budget
        s.push_over_budget(Bytes::from_static(b"abcdefg"))
            .await
            .unwrap();
        let body = s.take().unwrap();
        let copy = body.clone();
        drop(body);
        assert_eq!(copy.as_ref(), b"1234567890abcdefg");
        assert_eq!(b.used.disk(), 17);
        drop(copy);
        assert_eq!((b.used.memory(), b.used.disk()), (0, 0));
    }

    #[tokio::test]
    async fn a_buffered_response_falls_back_to_streaming_past_its_limits() {
        let cfg = ResponseBuffering {
            limits: limits(4, 0),
        };
        let mut b = BufferedBody::new(&cfg, &roomy());
        assert_eq!(b.push(Bytes::from_static(b"ab"), false), None);
        assert_eq!(b.push(Bytes::from_static(b"cde"), false), None);
        assert!(b.has_backlog());
        assert_eq!(b.next_out().await.unwrap().unwrap().as_ref(), b"ab");
        assert_eq!(b.next_out().await.unwrap().unwrap().as_ref(), b"cde");
        assert!(!b.has_backlog());
        assert_eq!(
            b.push(Bytes::from_static(b"f"), true),
            Some(Bytes::from_static(b"f"))
        );
        assert_eq!(b.outcome(), Outcome::Streamed);
    }

    #[tokio::test]
    async fn a_body_in_one_chunk_is_passed_on_without_a_copy() {
        let cfg = ResponseBuffering {
            limits: limits(1024, 0),
        };
        let mut b = BufferedBody::new(&cfg, &roomy());
        let chunk = Bytes::from(vec![7u8; 100]);
        let ptr = chunk.as_ptr();
        assert_eq!(b.push(chunk, false), None);
        assert_eq!(b.push(Bytes::new(), true), None);
        let out = b.next_out().await.unwrap().unwrap();
        assert_eq!(out.as_ptr(), ptr);
        assert_eq!(out.len(), 100);
        assert_eq!(b.next_out().await.unwrap(), None);
        assert_eq!(b.outcome(), Outcome::Memory);
    }

    #[tokio::test]
    async fn a_spilled_response_comes_out_whole_in_pieces_and_frees_its_budgets() {
        let budget = budgets(1 << 20, 1 << 30);
        let cfg = ResponseBuffering {
            limits: limits(4, 1 << 30),
        };
        let mut b = BufferedBody::new(&cfg, &budget);
        let big = vec![9u8; 3 * READ_CHUNK + 5];
        let mut held_back = 0;
        for c in [&b"abc"[..], b"defg", &big] {
            assert_eq!(b.push(Bytes::copy_from_slice(c), false), None);
            while b.has_backlog() {
                assert_eq!(b.next_out().await.unwrap(), None, "nothing before the end");
            }
            held_back += c.len();
        }
        assert_eq!(budget.used.memory(), 3);
        assert_eq!(budget.used.disk(), (held_back - 3) as u64);
        assert_eq!(b.push(Bytes::from_static(b"h"), true), None);
        let mut pieces = Vec::new();
        while b.has_backlog() {
            let Some(c) = b.next_out().await.unwrap() else {
                break;
            };
            assert!(c.len() <= READ_CHUNK);
            pieces.push(c);
        }
        let mut want = b"abcdefg".to_vec();
        want.extend_from_slice(&big);
        want.push(b'h');
        assert_eq!(pieces.concat(), want);
        assert!(pieces.len() >= 4, "{} pieces", pieces.len());
        assert_eq!(b.outcome(), Outcome::File);
        assert_eq!((budget.used.memory(), budget.used.disk()), (0, 0));
    }

    #[tokio::test]
    async fn a_response_past_the_budgets_spills_sooner_then_streams_in_order() {
        let budget = budgets(2, 6);
        let cfg = ResponseBuffering {
            limits: limits(100, 100),
        };
        let mut b = BufferedBody::new(&cfg, &budget);
        let out = run(&mut b, &[b"ab", b"cd", b"efgh", b"ij", b"k"]).await;
        assert_eq!(out, b"abcdefghijk");
        assert_eq!(b.outcome(), Outcome::Streamed);
        assert_eq!(
            b.refusals(),
            Refusals {
                memory: true,
                disk: true
            }
        );
        drop(b);
        assert_eq!((budget.used.memory(), budget.used.disk()), (0, 0));
    }

    #[tokio::test]
    async fn a_dropped_response_gives_its_budgets_back() {
        let budget = budgets(1 << 20, 1 << 20);
        let cfg = ResponseBuffering {
            limits: limits(4, 1 << 20),
        };
        let mut b = BufferedBody::new(&cfg, &budget);
        for c in [&b"abc"[..], b"defghij"] {
            assert_eq!(b.push(Bytes::copy_from_slice(c), false), None);
            while b.has_backlog() {
                assert_eq!(b.next_out().await.unwrap(), None);
            }
        }
        assert_eq!((budget.used.memory(), budget.used.disk()), (3, 7));
        drop(b);
        assert_eq!((budget.used.memory(), budget.used.disk()), (0, 0));
    }
}
