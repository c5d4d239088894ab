//! Request and response buffering, like nginx's `proxy_request_buffering` and
//! `proxy_buffering`.
//!
//! A [`Spool`] collects a body: in memory up to its memory limit, then in an
//! unlinked temporary file up to its file limit. Its contents come back as one
//! `Bytes`; a spilled body is a read-only memory map of the file, so it lives in the
//! page cache (which the kernel can evict and write back) rather than in the
//! process's anonymous memory.
//!
//! Response buffering reads the upstream at upstream speed while a slow client is
//! still reading, so the app server is released early. Past `max_temp_file` the
//! buffered part is sent and the rest of the response streams (back-pressuring the
//! upstream as pingora does by default).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};

/// Where buffered bodies go once they outgrow memory.
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
    #[error("body larger than the buffering limits")]
    Full,
    #[error("temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// A body being collected.
#[derive(Debug)]
pub struct Spool {
    limits: SpoolLimits,
    mem: BytesMut,
    file: Option<File>,
    len: u64,
}

impl Spool {
    pub fn new(limits: SpoolLimits) -> Spool {
        Spool {
            limits,
            mem: BytesMut::new(),
            file: None,
            len: 0,
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

    /// Whether `more` bytes would still fit.
    pub fn fits(&self, more: usize) -> bool {
        let after = self.len + more as u64;
        after <= self.limits.memory as u64 || after <= self.limits.file
    }

    /// Appends bytes. Fails with [`SpoolError::Full`] (taking nothing) when they fit
    /// neither in memory nor in the file; the caller then streams instead.
    pub fn push(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        if !self.fits(data.len()) {
            return Err(SpoolError::Full);
        }
        let after = self.len + data.len() as u64;
        if self.file.is_none() && after > self.limits.memory as u64 {
            let mut f = tempfile::tempfile_in(&self.limits.dir)?;
            f.write_all(&self.mem)?;
            self.mem = BytesMut::new();
            self.file = Some(f);
        }
        match &mut self.file {
            Some(f) => f.write_all(data)?,
            None => self.mem.extend_from_slice(data),
        }
        self.len = after;
        Ok(())
    }

    /// Everything collected, as one buffer.
    pub fn take(&mut self) -> Result<Bytes, SpoolError> {
        self.len = 0;
        match self.file.take() {
            None => Ok(std::mem::take(&mut self.mem).freeze()),
            Some(f) => {
                f.sync_data().ok();
                // SAFETY: the file is anonymous (unlinked at creation) and owned by
                // this spool alone; nothing else can change or truncate it while the
                // map lives.
                let map = unsafe { memmap2::Mmap::map(&f)? };
                Ok(Bytes::from_owner(map))
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
    /// Outgrew the limits: the buffered part was sent and the rest streamed.
    Streamed,
}

/// Response buffering state of one response.
#[derive(Debug)]
pub struct BufferedBody {
    /// The first chunk, kept as is: a body that arrives in one chunk is never copied.
    first: Option<Bytes>,
    spool: Spool,
    streaming: bool,
    /// The body went to a temporary file at some point.
    spilled: bool,
}

impl BufferedBody {
    pub fn new(cfg: &ResponseBuffering) -> BufferedBody {
        BufferedBody {
            first: None,
            spool: Spool::new(cfg.limits.clone()),
            streaming: false,
            spilled: false,
        }
    }

    /// Takes one chunk (already transformed, e.g. compressed); returns what to send
    /// downstream now.
    pub fn push(&mut self, chunk: Bytes, end: bool) -> Result<Option<Bytes>, SpoolError> {
        if self.streaming {
            return Ok(Some(chunk));
        }
        if self.spool.is_empty() && self.first.is_none() {
            if end {
                return Ok(Some(chunk));
            }
            if chunk.len() <= self.spool.limits.memory {
                self.first = Some(chunk);
                return Ok(None);
            }
        }
        if let Some(first) = self.first.take() {
            if end && chunk.is_empty() {
                return Ok(Some(first));
            }
            self.push_spool(&first)?;
            if self.streaming {
                let mut out = BytesMut::with_capacity(first.len() + chunk.len());
                out.extend_from_slice(&first);
                out.extend_from_slice(&chunk);
                return Ok(Some(out.freeze()));
            }
        }
        self.push_spool_then(chunk, end)
    }

    /// Appends to the spool; on overflow switches to streaming (keeping the bytes).
    fn push_spool(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        match self.spool.push(data) {
            Ok(()) => {
                self.spilled |= self.spool.spilled();
                Ok(())
            }
            Err(SpoolError::Full) => {
                // cannot happen for the first chunk (it fits in memory); be safe anyway
                self.streaming = true;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn push_spool_then(&mut self, chunk: Bytes, end: bool) -> Result<Option<Bytes>, SpoolError> {
        let pushed = self.spool.push(&chunk);
        self.spilled |= self.spool.spilled();
        match pushed {
            Ok(()) => {}
            Err(SpoolError::Full) => {
                // send what we hold plus this chunk, then stream the rest
                self.streaming = true;
                let held = self.spool.take()?;
                let mut out = BytesMut::with_capacity(held.len() + chunk.len());
                out.extend_from_slice(&held);
                out.extend_from_slice(&chunk);
                return Ok(Some(out.freeze()));
            }
            Err(e) => return Err(e),
        }
        if end {
            return self.spool.take().map(Some);
        }
        Ok(None)
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

    #[test]
    fn a_small_body_stays_in_memory() {
        let mut s = Spool::new(limits(100, 0));
        s.push(b"hello ").unwrap();
        s.push(b"world").unwrap();
        assert!(!s.spilled());
        assert_eq!(s.take().unwrap(), Bytes::from_static(b"hello world"));
    }

    #[test]
    fn a_larger_body_spills_to_a_file_and_reads_back_whole() {
        let mut s = Spool::new(limits(10, 1 << 20));
        let mut want = Vec::new();
        for i in 0..1000u32 {
            let chunk = format!("chunk {i};");
            s.push(chunk.as_bytes()).unwrap();
            want.extend_from_slice(chunk.as_bytes());
        }
        assert!(s.spilled());
        assert_eq!(s.len(), want.len() as u64);
        assert_eq!(s.take().unwrap().as_ref(), want.as_slice());
    }

    #[test]
    fn a_body_beyond_both_limits_is_refused_without_loss() {
        let mut s = Spool::new(limits(4, 8));
        s.push(b"12345678").unwrap();
        assert!(matches!(s.push(b"9"), Err(SpoolError::Full)));
        assert_eq!(s.take().unwrap().as_ref(), b"12345678");
    }

    #[test]
    fn a_buffered_response_falls_back_to_streaming_past_its_limits() {
        let cfg = ResponseBuffering {
            limits: limits(4, 0),
        };
        let mut b = BufferedBody::new(&cfg);
        assert_eq!(b.push(Bytes::from_static(b"ab"), false).unwrap(), None);
        assert_eq!(
            b.push(Bytes::from_static(b"cde"), false).unwrap(),
            Some(Bytes::from_static(b"abcde"))
        );
        assert_eq!(
            b.push(Bytes::from_static(b"f"), true).unwrap(),
            Some(Bytes::from_static(b"f"))
        );
        assert_eq!(b.outcome(), Outcome::Streamed);
    }

    #[test]
    fn a_body_in_one_chunk_is_passed_on_without_a_copy() {
        let cfg = ResponseBuffering {
            limits: limits(1024, 0),
        };
        let mut b = BufferedBody::new(&cfg);
        let chunk = Bytes::from(vec![7u8; 100]);
        let ptr = chunk.as_ptr();
        assert_eq!(b.push(chunk, false).unwrap(), None);
        let out = b.push(Bytes::new(), true).unwrap().unwrap();
        assert_eq!(out.as_ptr(), ptr);
        assert_eq!(out.len(), 100);
        assert_eq!(b.outcome(), Outcome::Memory);
    }

    #[test]
    fn a_buffered_response_comes_out_whole_at_the_end() {
        let cfg = ResponseBuffering {
            limits: limits(4, 1 << 20),
        };
        let mut b = BufferedBody::new(&cfg);
        assert_eq!(b.push(Bytes::from_static(b"abc"), false).unwrap(), None);
        assert_eq!(b.push(Bytes::from_static(b"defg"), false).unwrap(), None);
        assert_eq!(
            b.push(Bytes::from_static(b"h"), true).unwrap(),
            Some(Bytes::from_static(b"abcdefgh"))
        );
        assert_eq!(b.outcome(), Outcome::File);
    }
}
