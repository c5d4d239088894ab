//! Header work on the proxy path: request ids, forwarding headers, hop-by-hop
//! stripping, request validation and route header edits. Pure functions over header
//! maps, so they are tested without sockets.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::snapshot::HeaderEdits;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_FORWARDED_HOST: &str = "x-forwarded-host";

/// The client's request id when it is sane (1-128 visible ASCII bytes), else a new one.
pub fn request_id(incoming: Option<&HeaderValue>) -> String {
    if let Some(v) = incoming {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            if let Ok(s) = v.to_str() {
                return s.to_owned();
            }
        }
    }
    new_request_id()
}

/// A fresh 128-bit random id as 32 hex digits, from a thread-local generator (no
/// system call per request, unlike a `getrandom`-backed UUID).
pub fn new_request_id() -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

/// Why a request is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// HTTP/1.1 without Host (RFC 9112 §3.2).
    MissingHost,
    /// Several Content-Length lines or a list value (RFC 9112 §6.3).
    BadContentLength,
    /// Request line plus headers above the limit (RFC 6585 §5).
    HeaderTooLarge,
    /// `chunked` applied more than once (RFC 9112 §6.1: no sender may do that).
    RepeatedChunked,
}

impl Invalid {
    pub fn status(self) -> u16 {
        match self {
            Invalid::MissingHost | Invalid::BadContentLength | Invalid::RepeatedChunked => 400,
            Invalid::HeaderTooLarge => 431,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Invalid::MissingHost => "an HTTP/1.1 request needs a Host header",
            Invalid::BadContentLength => "conflicting or list-valued Content-Length",
            Invalid::HeaderTooLarge => "request header fields too large",
            Invalid::RepeatedChunked => "Transfer-Encoding lists chunked more than once",
        }
    }
}

/// Approximate wire size of a request's head (request line and fields).
pub fn head_size(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.uri.to_string().len() + 12;
    line + req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
}

/// Checks what pingora's parser lets through. `is_h1` is false for HTTP/2 (where
/// `:authority` stands for Host and framing is the stream's).
pub fn check_request(req: &RequestHeader, is_h1: bool, max_head: usize) -> Result<(), Invalid> {
    if is_h1 && req.version == http::Version::HTTP_11 && !req.headers.contains_key(header::HOST) {
        return Err(Invalid::MissingHost);
    }
    let mut cls = req.headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = cls.next() {
        let valid = |v: &HeaderValue| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
        if cls.next().is_some() || !valid(first) {
            return Err(Invalid::BadContentLength);
        }
    }
    if is_h1 {
        let chunked = req
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            .count();
        if chunked > 1 {
            return Err(Invalid::RepeatedChunked);
        }
    }
    if !is_h1 && head_size(req) > max_head {
        return Err(Invalid::HeaderTooLarge);
    }
    Ok(())
}

/// Whether a comma-separated field holds `token` (case-insensitive).
fn lists_token(headers: &HeaderMap, name: header::HeaderName, token: &[u8]) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A WebSocket opening handshake (RFC 6455 §4.1): an HTTP/1.1 GET with
/// `Upgrade: websocket` and `Connection: upgrade`. The only upgrade the edge passes
/// on.
pub fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req.method == http::Method::GET
        && lists_token(&req.headers, header::UPGRADE, b"websocket")
        && lists_token(&req.headers, header::CONNECTION, b"upgrade")
}

/// Removes `Upgrade` from a request that is not a WebSocket handshake, so it is an
/// ordinary request everywhere after (pingora takes any HTTP/1.1 request with an
/// `Upgrade` field for an upgrade: close-delimited body, no body limits). The
/// `upgrade` token goes from `Connection` with it (it names a field that is gone).
/// Returns whether anything was removed.
pub fn drop_non_websocket_upgrade(req: &mut RequestHeader) -> bool {
    if !req.headers.contains_key(header::UPGRADE) || is_websocket_upgrade(req) {
        return false;
    }
    req.remove_header(&header::UPGRADE);
    let kept: Vec<String> = req
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("upgrade"))
        .map(str::to_owned)
        .collect();
    req.remove_header(&header::CONNECTION);
    if !kept.is_empty() {
        let _ = req.insert_header(header::CONNECTION, kept.join(", "));
    }
    true
}

/// The request's host as sent: Host, else the URI's authority (HTTP/2).
pub fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}

static XFF: HeaderName = HeaderName::from_static(X_FORWARDED_FOR);
static XFH: HeaderName = HeaderName::from_static(X_FORWARDED_HOST);

/// Field names as written on the wire. pingora keeps each added field's name twice
/// (the lookup key and the case it is sent in); given as static bytes, the second
/// copy is not allocated per request.
pub const XFF_WIRE: &[u8] = b"X-Forwarded-For";
pub const XFP_WIRE: &[u8] = b"X-Forwarded-Proto";
pub const XFH_WIRE: &[u8] = b"X-Forwarded-Host";
pub const XRID_WIRE: &[u8] = b"X-Request-Id";

fn wire(name: &'static [u8]) -> bytes::Bytes {
    bytes::Bytes::from_static(name)
}

/// Adds X-Forwarded-For (appended), -Proto and -Host, and the request id.
///
/// `X-Forwarded-Host` names the Host the client asked for: a value the request
/// already carries is kept only when `trust_prior` (the peer is a trusted proxy);
/// from anyone else it is replaced, so a client cannot make the app believe it was
/// reached under another name.
pub fn add_forwarding(
    req: &mut RequestHeader,
    client_ip: Option<std::net::IpAddr>,
    tls: bool,
    host: Option<&str>,
    request_id: &str,
    trust_prior: bool,
) {
    use std::fmt::Write;
    if let Some(ip) = client_ip {
        let mut value = String::with_capacity(48);
        for prior in req.headers.get_all(&XFF).iter() {
            if let Ok(p) = prior.to_str() {
                value.push_str(p);
                value.push_str(", ");
            }
        }
        let _ = write!(value, "{ip}");
        let _ = req.insert_header(wire(XFF_WIRE), value);
    }
    let proto = HeaderValue::from_static(if tls { "https" } else { "http" });
    let _ = req.insert_header(wire(XFP_WIRE), proto);
    let keep_prior = trust_prior && req.headers.contains_key(&XFH);
    if !keep_prior {
        match host {
            Some(h) => {
                let _ = req.insert_header(wire(XFH_WIRE), h);
            }
            None => {
                req.remove_header(&XFH);
            }
        }
    }
    let _ = req.insert_header(wire(XRID_WIRE), request_id);
}

/// Hop-by-hop fields of RFC 9110 §7.6.1 plus the legacy ones every proxy drops
/// (Transfer-Encoding aside: pingora owns response framing).
fn is_hop_by_hop_response_field(name: &HeaderName) -> bool {
    static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

/// Removes hop-by-hop fields and the fields `Connection` names from a response
/// (pingora re-adds its own framing and keep-alive fields). A 101 keeps its Upgrade
/// and Connection, which the tunnel needs.
///
/// One pass over the names present finds what to drop, and only those are removed:
/// a removal from pingora's two header maps costs two hash lookups, and most
/// responses carry none of these fields or only `Connection: keep-alive`.
pub fn strip_hop_by_hop_response(resp: &mut ResponseHeader) {
    if resp.status.as_u16() == 101 {
        return;
    }
    let mut doomed: Vec<HeaderName> = resp
        .headers
        .keys()
        .filter(|name| is_hop_by_hop_response_field(name))
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    if doomed.contains(&header::CONNECTION) {
        doomed.extend(connection_listed(&resp.headers));
    }
    for name in &doomed {
        resp.remove_header(name);
    }
}

/// The field names listed in `Connection` (lower-cased), minus `close`/`keep-alive`.
pub fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive" && t != "upgrade")
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

pub fn apply_request_edits(req: &mut RequestHeader, edits: &HeaderEdits) {
    for name in &edits.remove {
        req.remove_header(name);
    }
    for (name, value) in &edits.set {
        let _ = req.insert_header(name.clone(), value.clone());
    }
}

pub fn apply_response_edits(resp: &mut ResponseHeader, edits: &HeaderEdits) {
    for name in &edits.remove {
        resp.remove_header(name);
    }
    for (name, value) in &edits.set {
        let _ = resp.insert_header(name.clone(), value.clone());
    }
}

/// The value balancing hashes for `hash_on`.
pub fn hash_key(
    req: &RequestHeader,
    hash_on: &crate::config::HashOn,
    client_ip: Option<std::net::IpAddr>,
) -> Vec<u8> {
    use crate::config::HashOn;
    match hash_on {
        HashOn::ClientIp => client_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default()
            .into_bytes(),
        HashOn::Header(name) => req
            .headers
            .get(name)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        HashOn::Cookie(name) => req
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes().to_vec())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HashOn;

    fn req(lines: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/a", None).unwrap();
        for (k, v) in lines {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn request_id_is_kept_when_sane_and_generated_otherwise() {
        let v = HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(&v)), "abc-123");
        let bad = HeaderValue::from_static("has space");
        let generated = request_id(Some(&bad));
        assert_eq!(generated.len(), 32);
        assert_ne!(request_id(None), request_id(None));
    }

    #[test]
    fn missing_host_and_bad_content_length_are_rejected() {
        let r = req(&[]);
        assert_eq!(check_request(&r, true, 1 << 20), Err(Invalid::MissingHost));
        assert_eq!(check_request(&r, false, 1 << 20), Ok(()));
        let r = req(&[
            ("host", "a"),
            ("content-length", "4"),
            ("content-length", "4"),
        ]);
        assert_eq!(
            check_request(&r, true, 1 << 20),
            Err(Invalid::BadContentLength)
        );
        let r = req(&[("host", "a"), ("content-length", "4, 4")]);
        assert_eq!(
            check_request(&r, true, 1 << 20),
            Err(Invalid::BadContentLength)
        );
        let r = req(&[("host", "a"), ("content-length", "4")]);
        assert_eq!(check_request(&r, true, 1 << 20), Ok(()));
    }

    #[test]
    fn forwarding_headers_append_to_a_prior_chain() {
        let mut r = req(&[("x-forwarded-for", "10.0.0.1")]);
        add_forwarding(
            &mut r,
            Some([127, 0, 0, 1].into()),
            false,
            Some("chat.example"),
            "rid",
            false,
        );
        assert_eq!(r.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(r.headers["x-forwarded-proto"], "http");
        assert_eq!(r.headers["x-forwarded-host"], "chat.example");
        assert_eq!(r.headers["x-request-id"], "rid");
    }

    #[test]
    fn a_client_sent_forwarded_host_is_replaced_unless_a_trusted_proxy_sent_it() {
        for (trusted, expected) in [(false, "chat.example"), (true, "evil.example")] {
            let mut r = req(&[("x-forwarded-host", "evil.example")]);
            add_forwarding(&mut r, None, false, Some("chat.example"), "rid", trusted);
            assert_eq!(
                r.headers["x-forwarded-host"], expected,
                "trusted: {trusted}"
            );
            assert_eq!(r.headers.get_all("x-forwarded-host").iter().count(), 1);
        }
    }

    #[test]
    fn only_a_websocket_get_is_an_upgrade() {
        let ws = [
            ("host", "a"),
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
        ];
        let mut r = req(&ws);
        assert!(is_websocket_upgrade(&r));
        assert!(!drop_non_websocket_upgrade(&mut r));
        assert_eq!(r.headers["upgrade"], "websocket");

        let mut r = req(&[("host", "a"), ("upgrade", "foo"), ("connection", "upgrade")]);
        assert!(!is_websocket_upgrade(&r));
        assert!(drop_non_websocket_upgrade(&mut r));
        assert!(r.headers.get("upgrade").is_none());
        assert!(r.headers.get("connection").is_none());

        let mut r = req(&[("host", "a"), ("upgrade", "websocket")]);
        assert!(drop_non_websocket_upgrade(&mut r), "no Connection: upgrade");

        let mut post = RequestHeader::build("POST", b"/a", None).unwrap();
        post.append_header("upgrade", "websocket").unwrap();
        post.append_header("connection", "upgrade, x-y").unwrap();
        assert!(
            drop_non_websocket_upgrade(&mut post),
            "a POST is no handshake"
        );
        assert_eq!(post.headers["connection"], "x-y");
    }

    #[test]
    fn chunked_twice_is_rejected_in_one_field_or_across_lines() {
        let one = req(&[("host", "a"), ("transfer-encoding", "chunked, Chunked")]);
        assert_eq!(
            check_request(&one, true, 1 << 20),
            Err(Invalid::RepeatedChunked)
        );
        let two = req(&[
            ("host", "a"),
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked"),
        ]);
        assert_eq!(
            check_request(&two, true, 1 << 20),
            Err(Invalid::RepeatedChunked)
        );
        let ok = req(&[("host", "a"), ("transfer-encoding", "chunked")]);
        assert_eq!(check_request(&ok, true, 1 << 20), Ok(()));
    }

    #[test]
    fn response_hop_by_hop_fields_and_connection_listed_ones_are_stripped() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("connection", "x-secret, close").unwrap();
        resp.append_header("x-secret", "1").unwrap();
        resp.append_header("keep-alive", "timeout=5").unwrap();
        resp.append_header("x-kept", "1").unwrap();
        strip_hop_by_hop_response(&mut resp);
        assert!(resp.headers.get("x-secret").is_none());
        assert!(resp.headers.get("keep-alive").is_none());
        assert!(resp.headers.get("connection").is_none());
        assert_eq!(resp.headers["x-kept"], "1");
    }

    #[test]
    fn response_without_hop_by_hop_fields_is_untouched_and_legacy_ones_go() {
        let mut plain = ResponseHeader::build(200, None).unwrap();
        plain.append_header("content-type", "text/plain").unwrap();
        plain.append_header("x-kept", "1").unwrap();
        strip_hop_by_hop_response(&mut plain);
        assert_eq!(plain.headers.len(), 2);

        let mut legacy = ResponseHeader::build(200, None).unwrap();
        legacy
            .append_header("Proxy-Connection", "keep-alive")
            .unwrap();
        legacy.append_header("upgrade", "h2c").unwrap();
        legacy.append_header("trailer", "x-sum").unwrap();
        legacy.append_header("x-kept", "1").unwrap();
        strip_hop_by_hop_response(&mut legacy);
        assert_eq!(legacy.headers.len(), 1);
        assert_eq!(legacy.headers["x-kept"], "1");
    }

    #[test]
    fn hash_keys_come_from_ip_header_or_cookie() {
        let r = req(&[("x-user", "u1"), ("cookie", "a=1; sid=xyz")]);
        let ip = Some([10, 1, 2, 3].into());
        assert_eq!(hash_key(&r, &HashOn::ClientIp, ip), b"10.1.2.3");
        let h = HashOn::Header(HeaderName::from_static("x-user"));
        assert_eq!(hash_key(&r, &h, ip), b"u1");
        assert_eq!(hash_key(&r, &HashOn::Cookie("sid".into()), ip), b"xyz");
        assert_eq!(hash_key(&r, &HashOn::Cookie("nope".into()), ip), b"");
    }
}
