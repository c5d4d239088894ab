//! Response compression through a real edge: negotiation, what is never compressed,
//! byte-exact round trips, header rewriting, event streams.

mod common;

use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{compressible, single_pool, Edge, Origin};
use futures_util::StreamExt;

/// A client that neither asks for nor decodes compression by itself.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn get(edge: &Edge, path: &str, ae: Option<&str>) -> reqwest::Response {
    let mut req = client().get(edge.url(path));
    if let Some(ae) = ae {
        req = req.header("accept-encoding", ae);
    }
    req.send().await.unwrap()
}

fn decode(coding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::stream::decode_all(data).unwrap(),
        other => panic!("unexpected coding {other}"),
    }
    out
}

fn encoding(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("content-encoding")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn every_algorithm_round_trips_byte_exact() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let want = compressible(300_000);
    for coding in ["gzip", "br", "zstd"] {
        let resp = get(&edge, "/bytes/300000", Some(coding)).await;
        assert_eq!(encoding(&resp).as_deref(), Some(coding));
        assert!(resp.headers().get("content-length").is_none());
        assert!(resp.headers()["vary"]
            .to_str()
            .unwrap()
            .contains("Accept-Encoding"));
        let body = resp.bytes().await.unwrap();
        assert!(
            body.len() < want.len() / 4,
            "{coding}: {} bytes",
            body.len()
        );
        assert_eq!(decode(coding, &body), want, "{coding}");
    }
    // identity when not asked
    let resp = get(&edge, "/bytes/300000", None).await;
    assert_eq!(encoding(&resp), None);
    assert_eq!(resp.headers()["content-length"], "300000");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), want.as_slice());
    edge.wait_metric(
        "wingman_edge_compressed_responses_total{algorithm=\"br\"}",
        1.0,
    )
    .await;
    let out = edge
        .metric("wingman_edge_compression_bytes_total{algorithm=\"gzip\",direction=\"in\"}")
        .await;
    assert_eq!(out, Some(300_000.0));
}

#[tokio::test]
async fn accept_encoding_q_values_are_honoured() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    for (ae, want) in [
        ("gzip;q=0.1, br;q=1", Some("br")),
        ("br;q=0.1, gzip;q=0.9", Some("gzip")),
        ("br;q=0, gzip", Some("gzip")),
        ("gzip, br, zstd", Some("br")),
        ("gzip, zstd", Some("zstd")),
        ("*", Some("br")),
        ("*;q=0", None),
        ("identity;q=0, gzip;q=0", None),
        ("deflate", None),
        ("gzip;q=0.5, identity", None),
    ] {
        let resp = get(&edge, "/bytes/5000", Some(ae)).await;
        assert_eq!(encoding(&resp).as_deref(), want, "Accept-Encoding: {ae}");
        let body = resp.bytes().await.unwrap();
        let plain = match want {
            Some(c) => decode(c, &body),
            None => body.to_vec(),
        };
        assert_eq!(plain, compressible(5000), "{ae}");
    }
}

#[tokio::test]
async fn small_unlisted_and_already_encoded_responses_are_left_alone() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let cases = [
        ("/bytes/500", "below min_length"),
        ("/bytes/5000?type=image%2Fpng", "image/png not listed"),
        ("/fixed?ce=gzip", "already encoded"),
        ("/fixed?cc=no-transform", "no-transform"),
    ];
    for (path, why) in cases {
        let resp = get(&edge, path, Some("gzip, br")).await;
        let ce = encoding(&resp);
        assert!(
            ce.is_none() || ce.as_deref() == Some("gzip") && path.contains("ce="),
            "{why}: {ce:?}"
        );
        let body = resp.bytes().await.unwrap();
        if !path.contains("ce=") {
            assert!(
                body.len() == 500 || body.len() == 5000 || body.len() == 4096,
                "{why}: body changed ({} bytes)",
                body.len()
            );
        }
    }
    // a streamed response without Content-Length is compressed (length unknown)
    let resp = get(&edge, "/bytes/5000?cl=0", Some("gzip")).await;
    assert_eq!(encoding(&resp).as_deref(), Some("gzip"));
}

#[tokio::test]
async fn head_304_and_range_requests_are_not_compressed() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let head = client()
        .head(edge.url("/bytes/5000"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(encoding(&head), None);
    assert_eq!(head.headers()["content-length"], "5000");
    let not_modified = get(&edge, "/status/304", Some("gzip")).await;
    assert_eq!(not_modified.status(), 304);
    assert_eq!(encoding(&not_modified), None);
    let ranged = client()
        .get(edge.url("/bytes/5000"))
        .header("accept-encoding", "gzip")
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(encoding(&ranged), None);
}

#[tokio::test]
async fn strong_etags_are_weakened_and_vary_is_merged() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let resp = get(&edge, "/fixed?etag=%22v1%22&vary=Origin", Some("gzip")).await;
    assert_eq!(encoding(&resp).as_deref(), Some("gzip"));
    assert_eq!(resp.headers()["etag"], "W/\"v1\"");
    assert_eq!(resp.headers()["vary"], "Origin, Accept-Encoding");
    // identity answer keeps the strong validator but still says it varies
    let resp = get(&edge, "/fixed?etag=%22v1%22&vary=Origin", None).await;
    assert_eq!(resp.headers()["etag"], "\"v1\"");
    assert_eq!(resp.headers()["vary"], "Origin, Accept-Encoding");
}

#[tokio::test]
async fn compression_can_be_turned_off_per_route() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&format!(
        "{}\n[routes.compression]\nenabled = false\n",
        single_pool(&origin, "")
    ))
    .await;
    let resp = get(&edge, "/bytes/5000", Some("gzip, br")).await;
    assert_eq!(encoding(&resp), None);
    assert!(resp.headers().get("vary").is_none());
}

#[tokio::test]
async fn gzip_only_routes_offer_only_gzip() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&format!(
        "{}\n[routes.compression]\nalgorithms = [\"gzip\"]\ngzip_level = 9\n",
        single_pool(&origin, "")
    ))
    .await;
    let resp = get(&edge, "/bytes/5000", Some("br, zstd, gzip")).await;
    assert_eq!(encoding(&resp).as_deref(), Some("gzip"));
}

/// Decodes a compressed stream chunk by chunk.
type Decoder = Box<dyn FnMut(&[u8]) -> Vec<u8>>;

/// Reads SSE events; returns each event with whether the origin had finished its
/// stream when the event arrived.
async fn read_events(
    resp: reqwest::Response,
    origin: &Origin,
    coding: Option<&str>,
) -> Vec<(String, bool)> {
    let mut stream = resp.bytes_stream();
    let mut raw = Vec::new();
    let mut events = Vec::new();
    let mut decoder: Option<Decoder> = match coding {
        None => None,
        Some("gzip") => {
            let mut dec = flate2::write::GzDecoder::new(Vec::new());
            Some(Box::new(move |chunk: &[u8]| {
                use std::io::Write;
                dec.write_all(chunk).unwrap();
                dec.flush().unwrap();
                std::mem::take(dec.get_mut())
            }))
        }
        Some(other) => panic!("no streaming decoder for {other}"),
    };
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("event within 10 s")
    {
        let chunk = chunk.unwrap();
        let plain = match decoder.as_mut() {
            Some(d) => d(&chunk),
            None => chunk.to_vec(),
        };
        raw.extend_from_slice(&plain);
        while let Some(end) = raw.windows(2).position(|w| w == b"\n\n") {
            let event = String::from_utf8_lossy(&raw[..end]).into_owned();
            raw.drain(..end + 2);
            events.push((event, origin.state.finished_writing.load(Ordering::SeqCst)));
        }
    }
    events
}

#[tokio::test]
async fn event_stream_events_arrive_before_the_stream_ends() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let resp = get(&edge, "/sse/4/300", Some("gzip, br")).await;
    assert_eq!(encoding(&resp), None, "event streams go as is by default");
    assert!(resp.headers().get("content-length").is_none());
    let events = read_events(resp, &origin, None).await;
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "data: token 0",
            "data: token 1",
            "data: token 2",
            "data: token 3"
        ]
    );
    assert!(
        !events[0].1 && !events[2].1,
        "events were held back until the origin finished: {events:?}"
    );
}

#[tokio::test]
async fn compressed_event_streams_flush_every_event() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&format!(
        "{}\n[routes.compression]\nevent_streams = true\n",
        single_pool(&origin, "")
    ))
    .await;
    let resp = get(&edge, "/sse/4/300", Some("gzip")).await;
    assert_eq!(encoding(&resp).as_deref(), Some("gzip"));
    let events = read_events(resp, &origin, Some("gzip")).await;
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(
        !events[0].1 && !events[2].1,
        "compressed events were held back: {events:?}"
    );
}
