//! Access log, like nginx's `access_log`: one line per request, in nginx `combined`
//! format (with optional extra fields) or as JSON, to a file or stdout.
//!
//! This module owns the line formats ([`LogFormat`]), the bounded queue between the
//! request path and the disk, and the writer thread. The caller fills a
//! [`LogRecord`] in its `logging` hook and hands it to [`AccessLog::log`], which
//! never blocks and never does I/O: it moves the record into a bounded channel, or
//! drops it and counts the drop ([`AccessLog::dropped`]) when the writer has fallen
//! that far behind. Formatting (including the time stamp) happens on the writer
//! thread.
//!
//! The writer thread batches lines through a 64 KiB buffer and writes it when it is
//! full, after the queue has been idle for 100 ms, and at least every
//! `flush_interval` (nginx `buffer=64k flush=1s`). [`AccessLog::reopen`] makes it
//! reopen the file by path between two lines, for logrotate's rename-and-signal.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Local, SecondsFormat};
use parking_lot::Mutex;

/// Default capacity of the queue between the request path and the writer, in records.
pub const DEFAULT_BUFFER_RECORDS: usize = 65_536;
/// Default longest time a line waits in memory before it is written.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The writer writes its buffer after the queue has been empty this long.
const IDLE_FLUSH: Duration = Duration::from_millis(100);
/// Size of the writer's buffer.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// The access log could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error(
        "unknown access log field {name:?}; known fields: {}",
        Field::known_names()
    )]
    UnknownField { name: String },
    #[error("unknown access log format {name:?}; expected \"combined\" or \"json\"")]
    UnknownFormat { name: String },
    #[error("access log buffer must hold at least one record")]
    ZeroCapacity,
    #[error("opening access log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the access log writer thread: {0}")]
    Spawn(#[source] io::Error),
}

/// One loggable field of a request. Names are those of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    RemoteAddr,
    Time,
    Method,
    Uri,
    Protocol,
    Status,
    BytesSent,
    Referer,
    UserAgent,
    RequestId,
    Route,
    Upstream,
    UpstreamTimeMs,
    RequestTimeMs,
    CacheStatus,
    Compression,
    Host,
}

impl Field {
    /// Every field, in the default JSON order.
    pub const ALL: [Field; 17] = [
        Field::Time,
        Field::RemoteAddr,
        Field::Host,
        Field::Method,
        Field::Uri,
        Field::Protocol,
        Field::Status,
        Field::BytesSent,
        Field::RequestTimeMs,
        Field::Route,
        Field::Upstream,
        Field::UpstreamTimeMs,
        Field::CacheStatus,
        Field::Compression,
        Field::RequestId,
        Field::Referer,
        Field::UserAgent,
    ];

    /// Fields the nginx combined line already contains; in the combined format,
    /// only other fields are appended.
    pub const COMBINED: [Field; 9] = [
        Field::RemoteAddr,
        Field::Time,
        Field::Method,
        Field::Uri,
        Field::Protocol,
        Field::Status,
        Field::BytesSent,
        Field::Referer,
        Field::UserAgent,
    ];

    /// The configuration name, also the JSON key and the `key=` of combined extras.
    pub fn name(self) -> &'static str {
        match self {
            Field::RemoteAddr => "remote_addr",
            Field::Time => "time",
            Field::Method => "method",
            Field::Uri => "uri",
            Field::Protocol => "protocol",
            Field::Status => "status",
            Field::BytesSent => "bytes_sent",
            Field::Referer => "referer",
            Field::UserAgent => "user_agent",
            Field::RequestId => "request_id",
            Field::Route => "route",
            Field::Upstream => "upstream",
            Field::UpstreamTimeMs => "upstream_time_ms",
            Field::RequestTimeMs => "request_time_ms",
            Field::CacheStatus => "cache_status",
            Field::Compression => "compression",
            Field::Host => "host",
        }
    }

    fn known_names() -> String {
        let mut names: Vec<&str> = Field::ALL.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.join(", ")
    }
}

impl FromStr for Field {
    type Err = AccessLogError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Field::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| AccessLogError::UnknownField { name: s.to_owned() })
    }
}

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// nginx `combined`, then `key=value` for each configured field it lacks.
    Combined,
    /// One JSON object per line with the configured fields, in order.
    Json,
}

impl Format {
    /// The fields used when none are configured: nothing extra for combined (plain
    /// nginx combined), every field for JSON.
    pub fn default_fields(self) -> Vec<Field> {
        match self {
            Format::Combined => Vec::new(),
            Format::Json => Field::ALL.to_vec(),
        }
    }
}

impl FromStr for Format {
    type Err = AccessLogError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "combined" => Ok(Format::Combined),
            "json" => Ok(Format::Json),
            _ => Err(AccessLogError::UnknownFormat { name: s.to_owned() }),
        }
    }
}

/// Parses a list of field names, naming the first unknown one in the error.
pub fn parse_fields<S: AsRef<str>>(names: &[S]) -> Result<Vec<Field>, AccessLogError> {
    names.iter().map(|n| n.as_ref().parse()).collect()
}

/// What is known about one request when it is logged. Optional fields print as `-`
/// (combined) or `null` (JSON) when `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Client address (after [`crate::ratelimit::client_ip`] if proxies are trusted);
    /// `None` for a Unix socket peer.
    pub remote_addr: Option<IpAddr>,
    /// When the request arrived.
    pub time: SystemTime,
    pub method: String,
    /// Request target as received (path and query).
    pub uri: String,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub protocol: String,
    pub status: u16,
    /// Response body bytes sent to the client (nginx `$body_bytes_sent`).
    pub bytes_sent: u64,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    /// Name of the matched route.
    pub route: Option<String>,
    /// Address of the upstream server that answered, e.g. `10.0.0.5:8080`.
    pub upstream: Option<String>,
    /// Time spent on the upstream exchange, in milliseconds.
    pub upstream_time_ms: Option<f64>,
    /// Time from the first request byte to the last response byte, in milliseconds.
    pub request_time_ms: f64,
    /// `HIT`, `MISS`, `STALE`, `BYPASS`, ...
    pub cache_status: Option<String>,
    /// Content coding the edge applied to the response (`br`, `gzip`, `zstd`).
    pub compression: Option<String>,
    /// Host header (or :authority).
    pub host: Option<String>,
}

impl Default for LogRecord {
    /// An empty record; `time` is the Unix epoch, so set it.
    fn default() -> Self {
        LogRecord {
            remote_addr: None,
            time: SystemTime::UNIX_EPOCH,
            method: String::new(),
            uri: String::new(),
            protocol: String::new(),
            status: 0,
            bytes_sent: 0,
            referer: None,
            user_agent: None,
            request_id: None,
            route: None,
            upstream: None,
            upstream_time_ms: None,
            request_time_ms: 0.0,
            cache_status: None,
            compression: None,
            host: None,
        }
    }
}

/// A line format with its fields: turns a [`LogRecord`] into one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFormat {
    format: Format,
    fields: Vec<Field>,
}

/// A field's value, before quoting for one format.
enum Value<'a> {
    Str(Option<&'a str>),
    Int(u64),
    Millis(Option<f64>),
    Addr(Option<IpAddr>),
    Time(SystemTime),
}

impl LogFormat {
    /// `fields` are appended to the combined line (those it already has are skipped),
    /// or are the keys of the JSON object, in order.
    pub fn new(format: Format, fields: Vec<Field>) -> Self {
        LogFormat { format, fields }
    }

    pub fn format_kind(&self) -> Format {
        self.format
    }

    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// The line for `rec`, without the trailing newline. It never contains a raw
    /// newline or control character, whatever the record holds.
    pub fn format(&self, rec: &LogRecord) -> String {
        let mut out = String::with_capacity(256);
        self.format_into(rec, &mut out);
        out
    }

    /// Appends the line for `rec` to `out`, without the trailing newline.
    pub fn format_into(&self, rec: &LogRecord, out: &mut String) {
        match self.format {
            Format::Combined => self.combined(rec, out),
            Format::Json => self.json(rec, out),
        }
    }

    fn combined(&self, rec: &LogRecord, out: &mut String) {
        // $remote_addr - - [$time_local] "$request" $status $body_bytes_sent
        // "$http_referer" "$http_user_agent"
        match rec.remote_addr {
            Some(ip) => {
                let _ = write!(out, "{ip}");
            }
            None => out.push('-'),
        }
        out.push_str(" - - [");
        let local: DateTime<Local> = rec.time.into();
        let _ = write!(out, "{}", local.format("%d/%b/%Y:%H:%M:%S %z"));
        out.push_str("] \"");
        nginx_escape(&rec.method, out);
        out.push(' ');
        nginx_escape(&rec.uri, out);
        out.push(' ');
        nginx_escape(&rec.protocol, out);
        let _ = write!(out, "\" {} {} ", rec.status, rec.bytes_sent);
        combined_quoted(rec.referer.as_deref(), out);
        out.push(' ');
        combined_quoted(rec.user_agent.as_deref(), out);
        for &field in &self.fields {
            if Field::COMBINED.contains(&field) {
                continue;
            }
            out.push(' ');
            out.push_str(field.name());
            out.push('=');
            match value(rec, field) {
                Value::Str(s) => combined_quoted(s, out),
                Value::Int(n) => {
                    let _ = write!(out, "{n}");
                }
                Value::Millis(Some(ms)) if ms.is_finite() => {
                    let _ = write!(out, "{ms:.3}");
                }
                Value::Millis(_) | Value::Addr(None) => out.push('-'),
                Value::Addr(Some(ip)) => {
                    let _ = write!(out, "{ip}");
                }
                Value::Time(t) => {
                    let local: DateTime<Local> = t.into();
                    out.push_str(&local.to_rfc3339_opts(SecondsFormat::Millis, false));
                }
            }
        }
    }

    fn json(&self, rec: &LogRecord, out: &mut String) {
        out.push('{');
        for (i, &field) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(field.name()); // names are plain ASCII identifiers
            out.push_str("\":");
            match value(rec, field) {
                Value::Str(Some(s)) => json_string(s, out),
                Value::Str(None) | Value::Addr(None) => out.push_str("null"),
                Value::Int(n) => {
                    let _ = write!(out, "{n}");
                }
                Value::Millis(Some(ms)) if ms.is_finite() => {
                    let _ = write!(out, "{ms:.3}");
                }
                Value::Millis(_) => out.push_str("null"),
                Value::Addr(Some(ip)) => {
                    let _ = write!(out, "\"{ip}\"");
                }
                Value::Time(t) => {
                    let local: DateTime<Local> = t.into();
                    json_string(&local.to_rfc3339_opts(SecondsFormat::Millis, false), out);
                }
            }
        }
        out.push('}');
    }
}

fn value(rec: &LogRecord, field: Field) -> Value<'_> {
    match field {
        Field::RemoteAddr => Value::Addr(rec.remote_addr),
        Field::Time => Value::Time(rec.time),
        Field::Method => Value::Str(Some(&rec.method)),
        Field::Uri => Value::Str(Some(&rec.uri)),
        Field::Protocol => Value::Str(Some(&rec.protocol)),
        Field::Status => Value::Int(u64::from(rec.status)),
        Field::BytesSent => Value::Int(rec.bytes_sent),
        Field::Referer => Value::Str(rec.referer.as_deref()),
        Field::UserAgent => Value::Str(rec.user_agent.as_deref()),
        Field::RequestId => Value::Str(rec.request_id.as_deref()),
        Field::Route => Value::Str(rec.route.as_deref()),
        Field::Upstream => Value::Str(rec.upstream.as_deref()),
        Field::UpstreamTimeMs => Value::Millis(rec.upstream_time_ms),
        Field::RequestTimeMs => Value::Millis(Some(rec.request_time_ms)),
        Field::CacheStatus => Value::Str(rec.cache_status.as_deref()),
        Field::Compression => Value::Str(rec.compression.as_deref()),
        Field::Host => Value::Str(rec.host.as_deref()),
    }
}

/// `"value"` with nginx escaping, `"-"` for a missing or empty value.
fn combined_quoted(s: Option<&str>, out: &mut String) {
    out.push('"');
    match s {
        Some(s) if !s.is_empty() => nginx_escape(s, out),
        _ => out.push('-'),
    }
    out.push('"');
}

/// nginx's default `escape=default`: `"`, `\`, control characters, DEL and every
/// non-ASCII byte become `\xHH`. The result is printable ASCII, so a quoted value
/// can never end early or break the line.
fn nginx_escape(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.push_str("\\x");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push(char::from(b));
        }
    }
}

/// A JSON string literal (serde_json's escaping: quotes, backslashes and control
/// characters; other characters stay UTF-8).
fn json_string(s: &str, out: &mut String) {
    match serde_json::to_string(s) {
        Ok(lit) => out.push_str(&lit),
        // serializing a str cannot fail; keep the line valid JSON regardless
        Err(_) => out.push_str("null"),
    }
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    /// Appended to; created if missing; reopened by path on [`AccessLog::reopen`].
    File(PathBuf),
}

impl Destination {
    /// `stdout` or `-` is standard output; anything else is a file path.
    pub fn parse(s: &str) -> Destination {
        match s {
            "stdout" | "-" => Destination::Stdout,
            path => Destination::File(PathBuf::from(path)),
        }
    }
}

/// Everything the access log needs; see the module docs for the behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub destination: Destination,
    pub format: LogFormat,
    /// Records the queue holds before new ones are dropped.
    pub buffer_records: usize,
    /// Longest time a line stays in memory before it is written.
    pub flush_interval: Duration,
}

impl Default for AccessLogConfig {
    /// Plain nginx combined to stdout, 65536 records of queue, 1 s flush.
    fn default() -> Self {
        AccessLogConfig {
            destination: Destination::Stdout,
            format: LogFormat::new(Format::Combined, Vec::new()),
            buffer_records: DEFAULT_BUFFER_RECORDS,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
        }
    }
}

enum Msg {
    Record(Box<LogRecord>),
    /// Reopen the file before the records queued after this.
    Reopen,
    /// Write everything queued before this, then stop and answer.
    Shutdown(SyncSender<()>),
}

/// Counters shared by the request path and the writer thread.
#[derive(Default)]
struct Stats {
    dropped: AtomicU64,
    written: AtomicU64,
    write_errors: AtomicU64,
    reopens: AtomicU64,
    reopen_failures: AtomicU64,
    /// A reopen was asked for while the queue was full, so no `Msg::Reopen` is queued.
    reopen_pending: AtomicBool,
}

/// The running access log: a bounded queue and its writer thread.
///
/// Share it (`Arc<AccessLog>`) between request threads. Dropping it, or
/// [`shutdown`](Self::shutdown), writes out everything queued and stops the thread.
pub struct AccessLog {
    tx: SyncSender<Msg>,
    stats: Arc<Stats>,
    writer: Mutex<Option<JoinHandle<()>>>,
    format: LogFormat,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .field("dropped", &self.dropped())
            .field("written", &self.written())
            .finish()
    }
}

impl AccessLog {
    /// Opens the destination (so a bad path fails now, not on the first request) and
    /// starts the writer thread.
    pub fn start(cfg: &AccessLogConfig) -> Result<AccessLog, AccessLogError> {
        let sink = match &cfg.destination {
            Destination::Stdout => Sink::Stdout(io::stdout()),
            Destination::File(path) => Sink::File {
                file: open_append(path)?,
                path: path.clone(),
            },
        };
        Self::spawn(cfg, sink)
    }

    /// Like [`start`](Self::start) but writes to `out`, ignoring `cfg.destination`;
    /// [`reopen`](Self::reopen) does nothing. For embedding and tests.
    pub fn start_with_writer(
        cfg: &AccessLogConfig,
        out: Box<dyn Write + Send>,
    ) -> Result<AccessLog, AccessLogError> {
        Self::spawn(cfg, Sink::Writer(out))
    }

    fn spawn(cfg: &AccessLogConfig, sink: Sink) -> Result<AccessLog, AccessLogError> {
        if cfg.buffer_records == 0 {
            return Err(AccessLogError::ZeroCapacity);
        }
        let (tx, rx) = mpsc::sync_channel(cfg.buffer_records);
        let stats = Arc::new(Stats::default());
        let writer = Writer {
            rx,
            out: BufWriter::with_capacity(WRITE_BUFFER_BYTES, sink),
            stats: Arc::clone(&stats),
            format: cfg.format.clone(),
            flush_interval: cfg.flush_interval.max(Duration::from_millis(1)),
            line: String::with_capacity(512),
            dirty_since: None,
        };
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())
            .map_err(AccessLogError::Spawn)?;
        Ok(AccessLog {
            tx,
            stats,
            writer: Mutex::new(Some(handle)),
            format: cfg.format.clone(),
        })
    }

    /// Queues `rec` for writing. Never blocks: when the queue is full (or the log is
    /// shut down) the record is dropped and [`dropped`](Self::dropped) counts it.
    pub fn log(&self, rec: LogRecord) {
        if self.tx.try_send(Msg::Record(Box::new(rec))).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Asks the writer to reopen the file by its path (after logrotate renamed it).
    /// Records logged before this call go to the old file and records logged after
    /// it to the new one; no line is split. Does not block. When the queue is full,
    /// the reopen happens after the batch being written instead. A failed reopen
    /// keeps the old file and counts in [`reopen_failures`](Self::reopen_failures).
    pub fn reopen(&self) {
        match self.tx.try_send(Msg::Reopen) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.reopen_pending.store(true, Ordering::Release);
            }
        }
    }

    /// Writes out everything queued, flushes, and stops the writer thread. Blocks
    /// until then (as long as the destination takes to accept the data). Later
    /// [`log`](Self::log) calls count as dropped. Idempotent.
    pub fn shutdown(&self) {
        let Some(handle) = self.writer.lock().take() else {
            return;
        };
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        // Blocks while the queue is full; the writer is draining it.
        if self.tx.send(Msg::Shutdown(ack_tx)).is_ok() {
            let _ = ack_rx.recv();
        }
        if handle.join().is_err() {
            log::error!("access log writer thread panicked");
        }
    }

    /// The line format in use (for a status page, or to format a record directly).
    pub fn format(&self) -> &LogFormat {
        &self.format
    }

    /// Records dropped because the queue was full or the log was shut down.
    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Lines handed to the destination.
    pub fn written(&self) -> u64 {
        self.stats.written.load(Ordering::Relaxed)
    }

    /// Failed writes or flushes (their lines are lost).
    pub fn write_errors(&self) -> u64 {
        self.stats.write_errors.load(Ordering::Relaxed)
    }

    /// Successful reopens.
    pub fn reopens(&self) -> u64 {
        self.stats.reopens.load(Ordering::Relaxed)
    }

    /// Reopens that failed (the old file stays in use).
    pub fn reopen_failures(&self) -> u64 {
        self.stats.reopen_failures.load(Ordering::Relaxed)
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn open_append(path: &Path) -> Result<File, AccessLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_owned(),
            source,
        })
}

/// The writer thread's output.
enum Sink {
    Stdout(io::Stdout),
    File { path: PathBuf, file: File },
    Writer(Box<dyn Write + Send>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Stdout(s) => s.write(buf),
            Sink::File { file, .. } => file.write(buf),
            Sink::Writer(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(s) => s.flush(),
            Sink::File { file, .. } => file.flush(),
            Sink::Writer(w) => w.flush(),
        }
    }
}

/// The state of the writer thread.
struct Writer {
    rx: Receiver<Msg>,
    out: BufWriter<Sink>,
    stats: Arc<Stats>,
    format: LogFormat,
    flush_interval: Duration,
    line: String,
    /// When the oldest line not yet flushed was written to the buffer.
    dirty_since: Option<Instant>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let wait = match self.dirty_since {
                // something buffered: wait for the idle period, but not past the
                // flush deadline
                Some(since) => IDLE_FLUSH
                    .min(self.flush_interval)
                    .min((since + self.flush_interval).saturating_duration_since(Instant::now())),
                // nothing buffered: wake up now and then for a pending reopen
                None => self.flush_interval,
            };
            match self.rx.recv_timeout(wait) {
                Ok(msg) => {
                    if let Some(ack) = self.handle(msg) {
                        self.finish(ack);
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.flush(),
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
            // a plain load first: the swap is a locked instruction, paid only when set
            if self.stats.reopen_pending.load(Ordering::Acquire)
                && self.stats.reopen_pending.swap(false, Ordering::AcqRel)
            {
                self.reopen();
            }
            if self
                .dirty_since
                .is_some_and(|since| since.elapsed() >= self.flush_interval)
            {
                self.flush();
            }
        }
    }

    /// Handles one message; returns the acknowledgement channel on shutdown.
    fn handle(&mut self, msg: Msg) -> Option<SyncSender<()>> {
        match msg {
            Msg::Record(rec) => self.write_record(&rec),
            Msg::Reopen => self.reopen(),
            Msg::Shutdown(ack) => return Some(ack),
        }
        None
    }

    /// Shutdown: everything queued before the shutdown message was already handled
    /// (the queue is ordered); write what raced in after it, flush, and answer.
    fn finish(&mut self, ack: SyncSender<()>) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Record(rec) => self.write_record(&rec),
                Msg::Reopen => self.reopen(),
                Msg::Shutdown(other) => {
                    let _ = other.try_send(());
                }
            }
        }
        self.flush();
        let _ = ack.try_send(());
    }

    fn write_record(&mut self, rec: &LogRecord) {
        self.line.clear();
        self.format.format_into(rec, &mut self.line);
        self.line.push('\n');
        // A line goes to the buffer whole: a write error loses lines, never splits
        // one between two files.
        match self.out.write_all(self.line.as_bytes()) {
            Ok(()) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
                self.dirty_since.get_or_insert_with(Instant::now);
            }
            Err(e) => self.write_failed("writing", &e),
        }
    }

    fn flush(&mut self) {
        if self.dirty_since.take().is_none() {
            return;
        }
        if let Err(e) = self.out.flush() {
            self.write_failed("flushing", &e);
        }
    }

    fn write_failed(&self, what: &str, e: &io::Error) {
        let n = self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        // the first error, then one in a thousand: a full disk must not flood the log
        if n % 1000 == 0 {
            log::error!("access log: {what} failed ({} errors so far): {e}", n + 1);
        }
    }

    fn reopen(&mut self) {
        // Lines already buffered belong to the old file.
        self.dirty_since = Some(Instant::now());
        self.flush();
        let Sink::File { path, file } = self.out.get_mut() else {
            return;
        };
        match open_append(path) {
            Ok(new) => {
                *file = new;
                self.stats.reopens.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.reopen_failures.fetch_add(1, Ordering::Relaxed);
                log::error!("access log: {e}; still writing to the old file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn sample() -> LogRecord {
        LogRecord {
            remote_addr: Some("203.0.113.7".parse().expect("ip")),
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            method: "GET".into(),
            uri: "/v1/chat?q=1".into(),
            protocol: "HTTP/1.1".into(),
            status: 200,
            bytes_sent: 5120,
            referer: Some("https://example.com/".into()),
            user_agent: Some("curl/8.5.0".into()),
            request_id: Some("req-42".into()),
            route: Some("chat".into()),
            upstream: Some("10.0.0.5:8080".into()),
            upstream_time_ms: Some(12.3456),
            request_time_ms: 13.5,
            cache_status: Some("MISS".into()),
            compression: Some("br".into()),
            host: Some("chat.example.com".into()),
        }
    }

    /// Undoes nginx escaping (`\xHH`), for checking round trips.
    fn nginx_unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1] == b'x' {
                let hex = std::str::from_utf8(&b[i + 2..i + 4]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).expect("utf-8")
    }

    /// Splits a combined line into its parts. nginx escaping leaves no raw `"` inside
    /// a quoted value, so splitting on `"` is exact: [head, request, " status bytes ",
    /// referer, " ", user_agent, extras...].
    struct Combined {
        addr: String,
        time: String,
        request: String,
        status: u16,
        bytes: u64,
        referer: String,
        user_agent: String,
        extras: Vec<(String, String)>,
    }

    fn parse_combined(line: &str) -> Combined {
        assert!(!line.contains('\n') && line.is_ascii(), "{line:?}");
        let parts: Vec<&str> = line.split('"').collect();
        assert!(parts.len() >= 6, "{line:?}");
        let head = parts[0];
        let (addr, rest) = head.split_once(" - - [").expect("head");
        let time = rest.strip_suffix("] ").expect("time");
        let mut sb = parts[2].split_whitespace();
        let status = sb.next().expect("status").parse().expect("status");
        let bytes = sb.next().expect("bytes").parse().expect("bytes");
        assert_eq!(parts[4], " ");
        // extras: ` key=` then a quoted value, or ` key=value` unquoted
        let mut extras = Vec::new();
        let mut i = 6;
        while i < parts.len() {
            let seg = parts[i];
            if seg.is_empty() && i + 1 == parts.len() {
                break;
            }
            for kv in seg.split_whitespace() {
                let (k, v) = kv.split_once('=').expect("key=value");
                if v.is_empty() {
                    // quoted value follows
                    extras.push((k.to_owned(), nginx_unescape(parts[i + 1])));
                } else {
                    extras.push((k.to_owned(), v.to_owned()));
                }
            }
            i += if seg.ends_with('=') { 2 } else { 1 };
        }
        Combined {
            addr: addr.to_owned(),
            time: time.to_owned(),
            request: nginx_unescape(parts[1]),
            status,
            bytes,
            referer: nginx_unescape(parts[3]),
            user_agent: nginx_unescape(parts[5]),
            extras,
        }
    }

    #[test]
    fn combined_line_matches_nginx_and_parses_back() {
        let rec = sample();
        let fmt = LogFormat::new(Format::Combined, Vec::new());
        let line = fmt.format(&rec);
        let c = parse_combined(&line);
        assert_eq!(c.addr, "203.0.113.7");
        let t = DateTime::parse_from_str(&c.time, "%d/%b/%Y:%H:%M:%S %z").expect(&c.time);
        assert_eq!(t.timestamp(), 1_700_000_000);
        assert_eq!(c.request, "GET /v1/chat?q=1 HTTP/1.1");
        assert_eq!((c.status, c.bytes), (200, 5120));
        assert_eq!(c.referer, "https://example.com/");
        assert_eq!(c.user_agent, "curl/8.5.0");
        assert!(c.extras.is_empty());
        assert!(
            line.ends_with("\"https://example.com/\" \"curl/8.5.0\""),
            "{line}"
        );
    }

    #[test]
    fn combined_appends_configured_extra_fields_as_key_value() {
        let rec = LogRecord {
            upstream_time_ms: None,
            ..sample()
        };
        let fields = parse_fields(&[
            "status",
            "request_id",
            "route",
            "upstream",
            "upstream_time_ms",
            "request_time_ms",
            "cache_status",
            "compression",
            "host",
        ])
        .expect("fields");
        let line = LogFormat::new(Format::Combined, fields).format(&rec);
        let c = parse_combined(&line);
        let extras: Vec<(&str, &str)> = c
            .extras
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            extras,
            [
                ("request_id", "req-42"),
                ("route", "chat"),
                ("upstream", "10.0.0.5:8080"),
                ("upstream_time_ms", "-"),
                ("request_time_ms", "13.500"),
                ("cache_status", "MISS"),
                ("compression", "br"),
                ("host", "chat.example.com"),
            ],
            "{line}"
        );
    }

    #[test]
    fn combined_escapes_quotes_newlines_and_control_characters_like_nginx() {
        let rec = LogRecord {
            uri: "/a\"b\\c\nd".into(),
            user_agent: Some("evil\" \"injected\r\n\t\x01\x7fé".into()),
            referer: Some(String::new()),
            remote_addr: None,
            ..sample()
        };
        let fields = parse_fields(&["request_id"]).expect("fields");
        let rec = LogRecord {
            request_id: Some("id\"x".into()),
            ..rec
        };
        let line = LogFormat::new(Format::Combined, fields).format(&rec);
        assert!(line.contains(r#"/a\x22b\x5Cc\x0Ad"#), "{line}");
        assert!(
            line.contains(r#""evil\x22 \x22injected\x0D\x0A\x09\x01\x7F\xC3\xA9""#),
            "{line}"
        );
        let c = parse_combined(&line);
        assert_eq!(c.addr, "-");
        assert_eq!(c.referer, "-", "empty referer prints as nginx's -");
        assert_eq!(c.request, "GET /a\"b\\c\nd HTTP/1.1");
        assert_eq!(c.user_agent, "evil\" \"injected\r\n\t\x01\x7fé");
        assert_eq!(c.extras, [("request_id".to_owned(), "id\"x".to_owned())]);
    }

    #[test]
    fn json_line_parses_back_with_every_field() {
        let rec = sample();
        let line = LogFormat::new(Format::Json, Format::Json.default_fields()).format(&rec);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
        let obj = v.as_object().expect("object");
        assert_eq!(obj.len(), Field::ALL.len());
        assert_eq!(v["remote_addr"], "203.0.113.7");
        let t = DateTime::parse_from_rfc3339(v["time"].as_str().expect("time")).expect("rfc3339");
        assert_eq!(t.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(v["method"], "GET");
        assert_eq!(v["uri"], "/v1/chat?q=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_sent"], 5120);
        assert_eq!(v["referer"], "https://example.com/");
        assert_eq!(v["user_agent"], "curl/8.5.0");
        assert_eq!(v["request_id"], "req-42");
        assert_eq!(v["route"], "chat");
        assert_eq!(v["upstream"], "10.0.0.5:8080");
        assert_eq!(v["upstream_time_ms"], 12.346);
        assert_eq!(v["request_time_ms"], 13.5);
        assert_eq!(v["cache_status"], "MISS");
        assert_eq!(v["compression"], "br");
        assert_eq!(v["host"], "chat.example.com");
        // keys in the configured order
        assert!(line.starts_with("{\"time\":"), "{line}");
    }

    #[test]
    fn json_has_only_configured_fields_in_order_with_nulls_for_missing() {
        let rec = LogRecord {
            upstream: None,
            upstream_time_ms: Some(f64::NAN),
            remote_addr: None,
            ..sample()
        };
        let fields = parse_fields(&["status", "upstream", "upstream_time_ms", "remote_addr"])
            .expect("fields");
        let line = LogFormat::new(Format::Json, fields).format(&rec);
        assert_eq!(
            line,
            r#"{"status":200,"upstream":null,"upstream_time_ms":null,"remote_addr":null}"#
        );
    }

    #[test]
    fn json_escapes_quotes_newlines_and_control_characters() {
        let ua = "evil\"}\n{\"status\":500\\\u{1}\u{7f}é";
        let rec = LogRecord {
            user_agent: Some(ua.into()),
            uri: "/x\r\ny".into(),
            ..sample()
        };
        let line = LogFormat::new(Format::Json, Format::Json.default_fields()).format(&rec);
        assert!(!line.contains('\n') && !line.contains('\r') && !line.contains('\u{1}'));
        let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
        assert_eq!(v["user_agent"], ua);
        assert_eq!(v["uri"], "/x\r\ny");
        assert_eq!(v["status"], 200);
    }

    #[test]
    fn unknown_field_and_format_names_are_rejected_with_the_known_ones() {
        let e = parse_fields(&["status", "bogus"]).expect_err("bogus");
        let msg = e.to_string();
        assert!(
            msg.contains("\"bogus\"") && msg.contains("user_agent"),
            "{msg}"
        );
        assert!("xml".parse::<Format>().is_err());
        assert_eq!("json".parse::<Format>().expect("json"), Format::Json);
        for f in Field::ALL {
            assert_eq!(f.name().parse::<Field>().expect("round trip"), f);
        }
    }

    fn file_config(path: &Path, flush_interval: Duration) -> AccessLogConfig {
        AccessLogConfig {
            destination: Destination::File(path.to_owned()),
            format: LogFormat::new(Format::Json, parse_fields(&["request_id"]).expect("f")),
            buffer_records: 65_536,
            flush_interval,
        }
    }

    fn numbered(i: usize) -> LogRecord {
        LogRecord {
            request_id: Some(format!("r{i}")),
            ..sample()
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read log")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn expected(range: std::ops::Range<usize>) -> Vec<String> {
        range
            .map(|i| format!(r#"{{"request_id":"r{i}"}}"#))
            .collect()
    }

    #[test]
    fn shutdown_writes_everything_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&file_config(&path, Duration::from_secs(3600))).expect("start");
        for i in 0..10_000 {
            log.log(numbered(i));
        }
        log.shutdown();
        assert_eq!(lines(&path), expected(0..10_000));
        assert_eq!(log.written(), 10_000);
        assert_eq!(log.dropped(), 0);
        log.log(numbered(1));
        assert_eq!(log.dropped(), 1, "logging after shutdown drops");
        log.shutdown(); // idempotent
    }

    #[test]
    fn dropping_the_log_writes_everything_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        {
            let log =
                AccessLog::start(&file_config(&path, Duration::from_secs(3600))).expect("start");
            for i in 0..100 {
                log.log(numbered(i));
            }
        }
        assert_eq!(lines(&path), expected(0..100));
    }

    #[test]
    fn lines_reach_the_file_without_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&file_config(&path, Duration::from_secs(1))).expect("start");
        log.log(numbered(7));
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines(&path).is_empty() {
            assert!(Instant::now() < deadline, "line not flushed within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(lines(&path), expected(7..8));
    }

    #[test]
    fn reopen_after_rename_splits_lines_between_old_and_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let rotated = dir.path().join("access.log.1");
        let log = AccessLog::start(&file_config(&path, Duration::from_secs(3600))).expect("start");
        for i in 0..500 {
            log.log(numbered(i));
        }
        std::fs::rename(&path, &rotated).expect("rename");
        log.reopen();
        for i in 500..1000 {
            log.log(numbered(i));
        }
        log.shutdown();
        assert_eq!(log.reopens(), 1);
        assert_eq!(lines(&rotated), expected(0..500));
        assert_eq!(lines(&path), expected(500..1000));
    }

    #[test]
    fn failed_reopen_keeps_writing_to_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("logs");
        std::fs::create_dir(&sub).expect("mkdir");
        let path = sub.join("access.log");
        let moved = dir.path().join("moved.log");
        let log = AccessLog::start(&file_config(&path, Duration::from_secs(3600))).expect("start");
        log.log(numbered(0));
        std::fs::rename(&path, &moved).expect("rename");
        std::fs::remove_dir(&sub).expect("rmdir"); // the path can no longer be created
        log.reopen();
        log.log(numbered(1));
        log.shutdown();
        assert_eq!(log.reopen_failures(), 1);
        assert_eq!(lines(&moved), expected(0..2));
    }

    #[test]
    fn opening_a_bad_path_fails_with_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("access.log");
        let e = AccessLog::start(&file_config(&path, Duration::from_secs(1))).expect_err("bad");
        assert!(e.to_string().contains("missing-dir"), "{e}");
    }

    /// A writer that blocks in `write` until released, and says when it is blocked.
    struct GateWriter {
        out: Arc<Mutex<Vec<u8>>>,
        entered: mpsc::Sender<()>,
        release: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        writes: Arc<AtomicUsize>,
    }

    impl Write for GateWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            let (lock, cv) = &*self.release;
            let mut open = lock.lock().map_err(|_| io::Error::other("poisoned"))?;
            while !*open {
                open = cv.wait(open).map_err(|_| io::Error::other("poisoned"))?;
            }
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.out.lock().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn full_queue_drops_records_instead_of_blocking() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let (entered_tx, entered_rx) = mpsc::channel();
        let release = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let gate = GateWriter {
            out: Arc::clone(&out),
            entered: entered_tx,
            release: Arc::clone(&release),
            writes: Arc::new(AtomicUsize::new(0)),
        };
        let cfg = AccessLogConfig {
            buffer_records: 2,
            format: LogFormat::new(Format::Json, parse_fields(&["request_id"]).expect("f")),
            ..AccessLogConfig::default()
        };
        let log = Arc::new(AccessLog::start_with_writer(&cfg, Box::new(gate)).expect("start"));
        // the first record is written on the idle flush, where the writer blocks
        log.log(numbered(0));
        entered_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("writer reached the destination");
        // with the writer stuck, 2 records fit in the queue and the rest are dropped
        let (done_tx, done_rx) = mpsc::channel();
        let logger = Arc::clone(&log);
        let t = std::thread::spawn(move || {
            for i in 1..=100 {
                logger.log(numbered(i));
            }
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("log() blocked on a full queue");
        t.join().expect("logger thread");
        assert_eq!(log.dropped(), 98);
        // release the writer: what was queued is written, in order
        {
            let (lock, cv) = &*release;
            *lock.lock().expect("lock") = true;
            cv.notify_all();
        }
        log.shutdown();
        let text = String::from_utf8(out.lock().clone()).expect("utf-8");
        let got: Vec<&str> = text.lines().collect();
        assert_eq!(got, expected(0..3));
    }
}
