//! Response compression: Accept-Encoding negotiation, the decision whether a response
//! may be compressed, and streaming encoders for gzip, brotli and zstd.
//!
//! pingora's own compression module takes the first Accept-Encoding token and ignores
//! q-values; this module follows RFC 9110 §12.5.3 instead: `q=0` means never,
//! `identity;q=0` and `*` are honoured, and among codings the client finds equally
//! acceptable the server's order (br, zstd, gzip by default) wins. Encoders stream:
//! each body chunk goes in and whatever compressed bytes are ready come out, so
//! memory per response is the encoder's window, not the body.

use std::io::Write;

use bytes::Bytes;
use http::header::{self, HeaderMap};

/// A content coding the edge can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Brotli,
    Zstd,
    Gzip,
}

impl Coding {
    pub fn token(self) -> &'static str {
        match self {
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
            Coding::Gzip => "gzip",
        }
    }

    pub fn from_token(t: &str) -> Option<Coding> {
        match t {
            "br" => Some(Coding::Brotli),
            "zstd" => Some(Coding::Zstd),
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            _ => None,
        }
    }
}

/// One `coding;q=x` element of an Accept-Encoding list.
#[derive(Debug, Clone, PartialEq)]
struct Accepted<'a> {
    coding: &'a str,
    q: f32,
}

fn parse_accept_encoding(value: &str) -> Vec<Accepted<'_>> {
    value
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';');
            let coding = parts.next()?.trim();
            if coding.is_empty() {
                return None;
            }
            let mut q = 1.0f32;
            for p in parts {
                let p = p.trim();
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    // an unparsable weight makes the element unusable (treated as q=0)
                    q = v
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))?;
                }
            }
            Some(Accepted { coding, q })
        })
        .collect()
}

/// Picks the coding for a response from the request's Accept-Encoding values, among
/// `offered` (in server preference order). `None`: send identity.
pub fn negotiate<'a>(
    accept_encoding: impl Iterator<Item = &'a str>,
    offered: &[Coding],
) -> Option<Coding> {
    let joined: Vec<&str> = accept_encoding.collect();
    if joined.is_empty() {
        return None;
    }
    let mut elements = Vec::new();
    for v in &joined {
        elements.extend(parse_accept_encoding(v));
    }
    let q_of = |name: &str| -> Option<f32> {
        elements
            .iter()
            .filter(|a| a.coding.eq_ignore_ascii_case(name))
            .map(|a| a.q)
            .reduce(f32::max)
    };
    let star = q_of("*");
    let identity = q_of("identity");
    let mut best: Option<(Coding, f32)> = None;
    for &c in offered {
        let explicit = match c {
            Coding::Gzip => q_of("gzip").or_else(|| q_of("x-gzip")),
            _ => q_of(c.token()),
        };
        let q = explicit.or(star).unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, bq)| q > bq) {
            best = Some((c, q));
        }
    }
    let (coding, q) = best?;
    // a client that explicitly rates identity above every coding gets identity
    match identity {
        Some(iq) if iq > q => None,
        _ => Some(coding),
    }
}

/// Content types a route compresses, as patterns: `text/*`, `application/json`,
/// `application/*+json`.
#[derive(Debug, Clone)]
pub struct TypeSet(Vec<String>);

impl TypeSet {
    pub fn new(patterns: &[String]) -> TypeSet {
        TypeSet(
            patterns
                .iter()
                .map(|p| p.trim().to_ascii_lowercase())
                .collect(),
        )
    }

    pub fn matches(&self, content_type: &str) -> bool {
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let Some((top, sub)) = mime.split_once('/') else {
            return false;
        };
        self.0.iter().any(|p| {
            let Some((pt, ps)) = p.split_once('/') else {
                return false;
            };
            (pt == "*" || pt == top)
                && (ps == "*"
                    || ps == sub
                    || ps
                        .strip_prefix('*')
                        .is_some_and(|suffix| sub.ends_with(suffix)))
        })
    }
}

/// Checks a pattern as written in the config.
pub fn check_type_pattern(p: &str) -> Result<(), String> {
    match p.split_once('/') {
        Some((t, s)) if !t.is_empty() && !s.is_empty() && !p.contains([' ', ';', ',']) => Ok(()),
        _ => Err(format!(
            "{p:?} is not a media type pattern like \"text/*\" or \"application/json\""
        )),
    }
}

/// Why a response is sent as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// HEAD, 1xx, 204, 304, 206 or any response without a body to transform.
    NoBody,
    /// Already has a Content-Encoding.
    AlreadyEncoded,
    /// `Cache-Control: no-transform`.
    NoTransform,
    /// A Content-Type not in the route's list, or none.
    Type,
    /// Content-Length below the route's minimum.
    TooSmall,
    /// A Range request, or the response is a partial one.
    Range,
    /// text/event-stream, which the route leaves alone.
    EventStream,
}

/// Whether a response may be compressed at all (before looking at the client).
pub fn eligible(
    status: u16,
    is_head: bool,
    request_has_range: bool,
    headers: &HeaderMap,
    types: &TypeSet,
    min_length: u64,
    event_streams: bool,
) -> Result<(), Skip> {
    if is_head || status < 200 || status == 204 || status == 304 {
        return Err(Skip::NoBody);
    }
    if status == 206 || headers.contains_key(header::CONTENT_RANGE) {
        return Err(Skip::Range);
    }
    if request_has_range {
        return Err(Skip::Range);
    }
    if headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity") && !v.trim().is_empty())
    {
        return Err(Skip::AlreadyEncoded);
    }
    if headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
    {
        return Err(Skip::NoTransform);
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if is_event_stream(ct) && !event_streams {
        return Err(Skip::EventStream);
    }
    let streamed_event = event_streams && is_event_stream(ct);
    if !(types.matches(ct) || streamed_event) {
        return Err(Skip::Type);
    }
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        if len < min_length {
            return Err(Skip::TooSmall);
        }
    }
    Ok(())
}

pub fn is_event_stream(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// The Vary value with `Accept-Encoding` added, or `None` when it is already there
/// (or Vary is `*`).
pub fn merged_vary(headers: &HeaderMap) -> Option<http::HeaderValue> {
    let existing: Vec<String> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if existing
        .iter()
        .any(|t| t == "*" || t.eq_ignore_ascii_case("accept-encoding"))
    {
        return None;
    }
    let mut all = existing;
    all.push("Accept-Encoding".into());
    http::HeaderValue::from_str(&all.join(", ")).ok()
}

/// What becomes of a strong ETag when the body is compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtagChange {
    Keep,
    /// `"abc"` becomes `W/"abc"`: the compressed body is not byte-identical to the
    /// one the origin's strong validator names.
    Set(http::HeaderValue),
    Remove,
}

pub fn weakened_etag(headers: &HeaderMap) -> EtagChange {
    let Some(v) = headers.get(header::ETAG) else {
        return EtagChange::Keep;
    };
    let Ok(v) = v.to_str() else {
        return EtagChange::Remove;
    };
    if v.starts_with("W/") {
        return EtagChange::Keep;
    }
    match http::HeaderValue::from_str(&format!("W/{v}")) {
        Ok(weak) => EtagChange::Set(weak),
        Err(_) => EtagChange::Remove,
    }
}

/// Compression levels of a route.
#[derive(Debug, Clone, Copy)]
pub struct Levels {
    pub gzip: u32,
    pub brotli: u32,
    pub zstd: i32,
}

/// Brotli window (log2): 4 MiB is brotli's default and enough for API responses.
const BROTLI_LGWIN: u32 = 22;
/// Brotli's internal buffer size.
const BROTLI_BUFFER: usize = 16 * 1024;

enum Inner {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

/// A streaming encoder for one response body.
pub struct Encoder {
    inner: Option<Inner>,
    pub coding: Coding,
    /// Flush after every chunk (event streams: each event goes out at once).
    flush_each: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Encoder {
    pub fn new(coding: Coding, levels: Levels, flush_each: bool) -> std::io::Result<Encoder> {
        let inner = match coding {
            Coding::Gzip => Inner::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(levels.gzip.min(9)),
            )),
            Coding::Brotli => Inner::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                BROTLI_BUFFER,
                levels.brotli.min(11),
                BROTLI_LGWIN,
            ))),
            Coding::Zstd => {
                Inner::Zstd(zstd::stream::write::Encoder::new(Vec::new(), levels.zstd)?)
            }
        };
        Ok(Encoder {
            inner: Some(inner),
            coding,
            flush_each,
            bytes_in: 0,
            bytes_out: 0,
        })
    }

    /// Feeds one chunk; returns the compressed bytes ready so far. At `end` the
    /// stream is finished and everything left comes out.
    pub fn encode(&mut self, chunk: &[u8], end: bool) -> std::io::Result<Bytes> {
        self.bytes_in += chunk.len() as u64;
        let out = match self.inner.as_mut() {
            None => return Ok(Bytes::new()),
            Some(Inner::Gzip(e)) => {
                e.write_all(chunk)?;
                if self.flush_each && !end {
                    e.flush()?;
                }
                std::mem::take(e.get_mut())
            }
            Some(Inner::Brotli(e)) => {
                e.write_all(chunk)?;
                if self.flush_each && !end {
                    e.flush()?;
                }
                std::mem::take(e.get_mut())
            }
            Some(Inner::Zstd(e)) => {
                e.write_all(chunk)?;
                if self.flush_each && !end {
                    e.flush()?;
                }
                std::mem::take(e.get_mut())
            }
        };
        let mut out = out;
        if end {
            let tail = match self.inner.take() {
                Some(Inner::Gzip(e)) => e.finish()?,
                Some(Inner::Brotli(e)) => e.into_inner(),
                Some(Inner::Zstd(e)) => e.finish()?,
                None => Vec::new(),
            };
            out.extend_from_slice(&tail);
        }
        self.bytes_out += out.len() as u64;
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const ALL: [Coding; 3] = [Coding::Brotli, Coding::Zstd, Coding::Gzip];

    fn pick(ae: &str) -> Option<&'static str> {
        negotiate(std::iter::once(ae), &ALL).map(Coding::token)
    }

    #[test]
    fn negotiation_table() {
        let table: &[(&str, Option<&str>)] = &[
            ("gzip", Some("gzip")),
            ("gzip, deflate, br", Some("br")),
            ("gzip, br, zstd", Some("br")),
            ("gzip, zstd", Some("zstd")),
            ("br;q=0, gzip", Some("gzip")),
            ("gzip;q=0.1, br;q=1", Some("br")),
            ("br;q=0.1, gzip;q=0.9", Some("gzip")),
            ("br;q=0.5, gzip;q=0.5, zstd;q=0.5", Some("br")),
            ("*", Some("br")),
            ("*;q=0", None),
            ("*, br;q=0", Some("zstd")),
            ("*;q=0.5, gzip", Some("gzip")),
            ("identity", None),
            ("identity;q=0", None),
            ("identity;q=0, gzip", Some("gzip")),
            ("gzip;q=0.5, identity", None),
            ("gzip, identity;q=0.5", Some("gzip")),
            ("deflate, compress", None),
            ("", None),
            ("GZIP", Some("gzip")),
            ("x-gzip", Some("gzip")),
            ("gzip;q=bogus", None),
            ("gzip;q=2", None),
            ("gzip ; q=0.8 , br ; q=0.9", Some("br")),
            ("gzip;q=0", None),
        ];
        for (ae, want) in table {
            assert_eq!(pick(ae), *want, "Accept-Encoding: {ae:?}");
        }
        assert_eq!(negotiate(std::iter::empty(), &ALL), None);
        assert_eq!(
            negotiate(["gzip", "br"].into_iter(), &ALL),
            Some(Coding::Brotli),
            "several header lines are one list"
        );
        assert_eq!(
            negotiate(std::iter::once("br, gzip"), &[Coding::Gzip]),
            Some(Coding::Gzip),
            "only offered codings"
        );
    }

    #[test]
    fn type_patterns_match_media_types() {
        let t = TypeSet::new(&[
            "text/*".into(),
            "application/json".into(),
            "application/*+json".into(),
            "image/svg+xml".into(),
        ]);
        assert!(t.matches("text/html; charset=utf-8"));
        assert!(t.matches("Application/JSON"));
        assert!(t.matches("application/problem+json"));
        assert!(t.matches("image/svg+xml"));
        assert!(!t.matches("image/png"));
        assert!(!t.matches("application/octet-stream"));
        assert!(!t.matches(""));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn eligibility_rules() {
        let t = TypeSet::new(&["text/*".into(), "application/json".into()]);
        let json = [
            ("content-type", "application/json"),
            ("content-length", "5000"),
        ];
        let ok = |status, head, range, h: &[(&str, &str)]| {
            eligible(status, head, range, &headers(h), &t, 1024, false)
        };
        assert_eq!(ok(200, false, false, &json), Ok(()));
        assert_eq!(ok(200, true, false, &json), Err(Skip::NoBody));
        assert_eq!(ok(204, false, false, &json), Err(Skip::NoBody));
        assert_eq!(ok(304, false, false, &json), Err(Skip::NoBody));
        assert_eq!(ok(206, false, false, &json), Err(Skip::Range));
        assert_eq!(ok(200, false, true, &json), Err(Skip::Range));
        let mut enc = json.to_vec();
        enc.push(("content-encoding", "gzip"));
        assert_eq!(ok(200, false, false, &enc), Err(Skip::AlreadyEncoded));
        let mut nt = json.to_vec();
        nt.push(("cache-control", "public, no-transform"));
        assert_eq!(ok(200, false, false, &nt), Err(Skip::NoTransform));
        assert_eq!(
            ok(
                200,
                false,
                false,
                &[("content-type", "image/png"), ("content-length", "5000")]
            ),
            Err(Skip::Type)
        );
        assert_eq!(
            ok(
                200,
                false,
                false,
                &[("content-type", "text/plain"), ("content-length", "100")]
            ),
            Err(Skip::TooSmall)
        );
        assert_eq!(
            ok(200, false, false, &[("content-type", "text/plain")]),
            Ok(())
        );
        assert_eq!(
            ok(200, false, false, &[("content-type", "text/event-stream")]),
            Err(Skip::EventStream)
        );
    }

    #[test]
    fn vary_is_merged_and_etag_weakened() {
        let h = headers(&[("vary", "Origin"), ("etag", "\"v1\"")]);
        assert_eq!(merged_vary(&h).unwrap(), "Origin, Accept-Encoding");
        assert_eq!(
            weakened_etag(&h),
            EtagChange::Set("W/\"v1\"".parse().unwrap())
        );
        let h = headers(&[("vary", "accept-encoding"), ("etag", "W/\"x\"")]);
        assert_eq!(merged_vary(&h), None);
        assert_eq!(weakened_etag(&h), EtagChange::Keep);
        assert_eq!(merged_vary(&headers(&[("vary", "*")])), None);
        assert_eq!(merged_vary(&HeaderMap::new()).unwrap(), "Accept-Encoding");
    }

    fn decode(coding: Coding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            Coding::Gzip => {
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Brotli => {
                brotli::Decompressor::new(data, 4096)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Zstd => {
                out = zstd::stream::decode_all(data).unwrap();
            }
        }
        out
    }

    #[test]
    fn every_coding_round_trips_byte_exact_in_chunks() {
        let body: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{{\"id\":{i},\"text\":\"message {}\"}},", i % 97).into_bytes())
            .collect();
        let levels = Levels {
            gzip: 5,
            brotli: 5,
            zstd: 3,
        };
        for coding in ALL {
            let mut enc = Encoder::new(coding, levels, false).unwrap();
            let mut out = Vec::new();
            for chunk in body.chunks(16 * 1024) {
                out.extend_from_slice(&enc.encode(chunk, false).unwrap());
            }
            out.extend_from_slice(&enc.encode(&[], true).unwrap());
            assert_eq!(decode(coding, &out), body, "{coding:?}");
            assert!(
                out.len() < body.len() / 4,
                "{coding:?} compressed to {}",
                out.len()
            );
            assert_eq!(enc.bytes_in, body.len() as u64);
            assert_eq!(enc.bytes_out, out.len() as u64);
        }
    }

    #[test]
    fn flushing_encoders_emit_each_event_at_once() {
        let levels = Levels {
            gzip: 5,
            brotli: 5,
            zstd: 3,
        };
        for coding in ALL {
            let mut enc = Encoder::new(coding, levels, true).unwrap();
            let mut sent = Vec::new();
            for i in 0..3 {
                let event = format!("data: token {i}\n\n");
                let out = enc.encode(event.as_bytes(), false).unwrap();
                assert!(!out.is_empty(), "{coding:?}: event {i} held back");
                sent.extend_from_slice(&out);
            }
            sent.extend_from_slice(&enc.encode(&[], true).unwrap());
            assert_eq!(
                decode(coding, &sent),
                b"data: token 0\n\ndata: token 1\n\ndata: token 2\n\n".to_vec()
            );
        }
    }
}
