//! Tests of [`EdgeStorage`] through pingora's `Storage` / `HandleHit` / `HandleMiss` traits,
//! with real files in temporary directories.

use super::*;
use futures_util::FutureExt;
use pingora::cache::trace::Span;
use pingora::http::ResponseHeader;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

const HOST: &str = "https\nexample.com\n";

fn span() -> SpanHandle {
    Span::inactive().handle()
}

fn key(path: &str) -> CacheKey {
    CacheKey::new(format!("{HOST}{path}"), "")
}

fn meta_with(ttl: Duration, tag: &str) -> CacheMeta {
    let mut h = ResponseHeader::build(200, None).expect("header");
    h.insert_header("content-type", "text/plain")
        .expect("header");
    h.insert_header("x-test", tag).expect("header");
    let now = SystemTime::now();
    CacheMeta::new(now + ttl, now, 5, 7, h)
}

fn meta() -> CacheMeta {
    meta_with(Duration::from_secs(300), "1")
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn mem_only(memory_bytes: usize, max_object_bytes: usize) -> &'static EdgeStorage {
    EdgeStorage::open(CacheStorageConfig {
        memory_bytes,
        max_object_bytes,
        disk: None,
    })
    .await
    .expect("open")
}

fn disk_cfg(dir: &Path, max_bytes: u64) -> CacheStorageConfig {
    CacheStorageConfig {
        memory_bytes: 1 << 20,
        max_object_bytes: 64 * 1024,
        disk: Some(DiskConfig {
            dir: dir.to_path_buf(),
            max_bytes,
        }),
    }
}

async fn with_disk(dir: &Path) -> &'static EdgeStorage {
    EdgeStorage::open(disk_cfg(dir, 1 << 20))
        .await
        .expect("open")
}

/// Store `body` under `key` in chunks of `chunk` bytes.
async fn put(
    s: &'static EdgeStorage,
    key: &CacheKey,
    meta: &CacheMeta,
    body: &[u8],
    chunk: usize,
) -> pingora::Result<MissFinishType> {
    let mut miss = s.get_miss_handler(key, meta, &span()).await?;
    for c in body.chunks(chunk.max(1)) {
        miss.write_body(Bytes::copy_from_slice(c), false).await?;
    }
    miss.finish().await
}

async fn read_all(hit: &mut HitHandler) -> pingora::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(b) = hit.read_body().await? {
        out.extend_from_slice(&b);
    }
    Ok(out)
}

async fn get(s: &'static EdgeStorage, key: &CacheKey) -> Option<(CacheMeta, Vec<u8>)> {
    let (meta, mut hit) = s.lookup(key, &span()).await.expect("lookup")?;
    let body = read_all(&mut hit).await.expect("read body");
    Some((meta, body))
}

fn object_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(subs) = fs_read_dir(&dir.join("objects")) else {
        return out;
    };
    for sub in subs {
        if let Ok(files) = fs_read_dir(&sub) {
            out.extend(
                files
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "wmc")),
            );
        }
    }
    out.sort();
    out
}

fn fs_read_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect()
}

/// Poll `cond` for up to ~5 s (deferred unlinks run on blocking threads).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn hexs(h: &HashBinary) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn size(f: MissFinishType) -> usize {
    match f {
        MissFinishType::Created(n) => n,
        MissFinishType::Appended(n, _) => n,
    }
}

#[tokio::test]
async fn write_then_read_back_with_meta_round_trip() {
    let s = mem_only(1 << 20, 64 * 1024).await;
    let k = key("/hello?x=1");
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());

    let m = meta();
    let mut miss = s.get_miss_handler(&k, &m, &span()).await.expect("miss");
    miss.write_body(Bytes::from_static(b"hello "), false)
        .await
        .expect("write");
    miss.write_body(Bytes::from_static(b"world"), true)
        .await
        .expect("write");
    assert_eq!(size(miss.finish().await.expect("finish")), 11);

    let (m2, mut hit) = s
        .lookup(&k, &span())
        .await
        .expect("lookup")
        .expect("stored");
    assert_eq!(m2.response_header().status.as_u16(), 200);
    assert_eq!(
        m2.headers().get("x-test").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(secs(m2.fresh_until()), secs(m.fresh_until()));
    assert_eq!(secs(m2.created()), secs(m.created()));
    assert_eq!(m2.stale_while_revalidate_sec(), 5);
    assert_eq!(m2.stale_if_error_sec(), 7);
    assert!(m2.is_fresh(SystemTime::now()));
    assert_eq!(read_all(&mut hit).await.expect("read"), b"hello world");
    assert!(hit.read_body().await.expect("read").is_none());

    // ranges
    assert!(hit.can_seek());
    hit.seek(6, None).expect("seek");
    assert_eq!(read_all(&mut hit).await.expect("read"), b"world");
    hit.seek(4, Some(5)).expect("seek");
    assert_eq!(read_all(&mut hit).await.expect("read"), b"o");
    assert!(hit.seek(11, None).is_err());

    let st = s.stats();
    assert_eq!(st.objects_memory, 1);
    assert!(st.bytes_memory > 11);
    assert_eq!(st.bytes_inflight, 0);
    assert_eq!(st.fills_inflight, 0);
}

#[tokio::test]
async fn large_bodies_are_read_in_slices() {
    let s = mem_only(1 << 20, 512 * 1024).await;
    let k = key("/big");
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    put(s, &k, &meta(), &body, 7_000).await.expect("put");
    let (_, mut hit) = s.lookup(&k, &span()).await.expect("lookup").expect("hit");
    let first = hit.read_body().await.expect("read").expect("chunk");
    assert_eq!(first.len(), READ_CHUNK);
    let mut all = first.to_vec();
    all.extend(read_all(&mut hit).await.expect("read"));
    assert_eq!(all, body);
}

#[tokio::test]
async fn byte_limit_respected_under_many_inserts() {
    const LIMIT: usize = 64 * 1024;
    let s = mem_only(LIMIT, 8 * 1024).await;
    let body = vec![b'x'; 3000];
    for i in 0..200 {
        let k = key(&format!("/obj/{i}"));
        let mut miss = s
            .get_miss_handler(&k, &meta(), &span())
            .await
            .expect("miss");
        for c in body.chunks(1000) {
            miss.write_body(Bytes::copy_from_slice(c), false)
                .await
                .expect("write");
            let st = s.stats();
            assert!(
                st.bytes_memory + st.bytes_inflight <= LIMIT as u64,
                "over the limit mid-fill at {i}: {st:?}"
            );
        }
        miss.finish().await.expect("finish");
        let st = s.stats();
        assert!(
            st.bytes_memory + st.bytes_inflight <= LIMIT as u64,
            "over the limit at {i}: {st:?}"
        );
    }
    let st = s.stats();
    assert!(st.evictions_memory > 0, "{st:?}");
    assert_eq!(st.evictions, st.evictions_memory);
    assert!(st.objects_memory > 5 && st.objects_memory < 200, "{st:?}");
    assert_eq!(st.objects_memory + st.evictions_memory, 200);
    assert!(get(s, &key("/obj/0")).await.is_none(), "oldest evicted");
    assert_eq!(get(s, &key("/obj/199")).await.expect("newest kept").1, body);
}

#[tokio::test]
async fn eviction_is_least_recently_used() {
    // room for a handful of 3000-byte objects
    let s = mem_only(5 * 3600, 4096).await;
    let body = vec![b'y'; 3000];
    put(s, &key("/hot"), &meta(), &body, 3000)
        .await
        .expect("put");
    for i in 0..20 {
        put(s, &key(&format!("/cold/{i}")), &meta(), &body, 3000)
            .await
            .expect("put");
        assert!(
            get(s, &key("/hot")).await.is_some(),
            "hot object evicted at {i}"
        );
    }
    assert!(get(s, &key("/cold/0")).await.is_none());
    assert!(s.stats().evictions > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fills_stay_within_budget() {
    const LIMIT: usize = 128 * 1024;
    let s = mem_only(LIMIT, 16 * 1024).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let k = key(&format!("/c/{t}/{i}"));
                let body = vec![t as u8; 5000 + i * 100];
                // fills may be refused when the budget is taken by other fills; that is fine
                let _ = put(s, &k, &meta(), &body, 1500).await;
                let st = s.stats();
                assert!(
                    st.bytes_memory + st.bytes_inflight <= LIMIT as u64,
                    "{st:?}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let st = s.stats();
    assert_eq!(st.bytes_inflight, 0);
    assert_eq!(st.fills_inflight, 0);
    assert!(st.bytes_memory <= LIMIT as u64);
}

#[tokio::test]
async fn object_with_large_content_length_is_refused_up_front() {
    let s = mem_only(1 << 20, 1000).await;
    let k = key("/too-big");
    let m = meta_with_length(1001);
    assert!(s.get_miss_handler(&k, &m, &span()).await.is_err());
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());
    assert_eq!(s.stats().bytes_inflight, 0);
}

fn meta_with_length(len: usize) -> CacheMeta {
    let mut h = ResponseHeader::build(200, None).expect("header");
    h.insert_header("content-length", len.to_string())
        .expect("header");
    let now = SystemTime::now();
    CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, h)
}

#[tokio::test]
async fn declared_length_is_reserved_when_the_fill_starts() {
    const LIMIT: usize = 24_000;
    let s = mem_only(LIMIT, 16_000).await;
    let body = vec![b'L'; 15_000];
    let mut a = s
        .get_miss_handler(&key("/a"), &meta_with_length(body.len()), &span())
        .await
        .expect("first fill fits");
    assert!(s.stats().bytes_inflight >= 15_000, "{:?}", s.stats());
    // a second one cannot be guaranteed room, so it is refused before anything is streamed
    assert!(s
        .get_miss_handler(&key("/b"), &meta_with_length(body.len()), &span())
        .await
        .is_err());
    // the first one then never runs out of room mid-stream
    for c in body.chunks(100) {
        a.write_body(Bytes::copy_from_slice(c), false)
            .await
            .expect("write within the reservation");
    }
    a.finish().await.expect("finish");
    let st = s.stats();
    assert!(st.bytes_memory <= LIMIT as u64, "{st:?}");
    assert_eq!((st.bytes_inflight, st.fills_inflight), (0, 0));
    assert_eq!(get(s, &key("/a")).await.expect("stored").1, body);
}

#[tokio::test]
async fn tiny_chunks_are_coalesced_for_readers_and_accounting() {
    let s = mem_only(1 << 20, 64 * 1024).await;
    let k = key("/tiny");
    let mut miss = s
        .get_miss_handler(&k, &meta(), &span())
        .await
        .expect("miss");
    let base = s.stats().bytes_inflight;
    let (_, mut reader) = s.lookup(&k, &span()).await.expect("lookup").expect("fill");
    let mut seen = Vec::new();
    for i in 0..10_000u32 {
        miss.write_body(Bytes::from(vec![(i % 256) as u8]), false)
            .await
            .expect("write");
        if i % 777 == 0 {
            // a reader that keeps up sees every byte exactly once, also from a growing chunk
            while let Some(r) = reader.read_body().now_or_never() {
                let b = r.expect("read").expect("not at the end yet");
                seen.extend_from_slice(&b);
            }
        }
    }
    let charged = s.stats().bytes_inflight - base;
    assert!(charged <= 10_000 + 10_000 / 8 + 64, "charged {charged}");
    miss.finish().await.expect("finish");
    seen.extend(read_all(&mut reader).await.expect("read"));
    let expected: Vec<u8> = (0..10_000u32).map(|i| (i % 256) as u8).collect();
    assert_eq!(seen, expected);
    assert_eq!(get(s, &k).await.expect("stored").1, expected);
}

#[tokio::test]
async fn object_growing_past_the_limit_is_abandoned_not_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = disk_cfg(dir.path(), 1 << 20);
    cfg.max_object_bytes = 1000;
    let s = EdgeStorage::open(cfg).await.expect("open");
    let k = key("/grows");
    let mut miss = s
        .get_miss_handler(&k, &meta(), &span())
        .await
        .expect("miss");
    // a reader streaming the fill
    let (_, mut reader) = s.lookup(&k, &span()).await.expect("lookup").expect("fill");
    miss.write_body(Bytes::from(vec![1u8; 600]), false)
        .await
        .expect("write");
    assert_eq!(
        reader.read_body().await.expect("read").map(|b| b.len()),
        Some(600)
    );
    assert!(miss
        .write_body(Bytes::from(vec![2u8; 600]), false)
        .await
        .is_err());
    // the reader is told, rather than left with a short body that looks complete
    assert!(reader.read_body().await.is_err());
    // gone from lookups at once, and never stored
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());
    assert!(miss
        .write_body(Bytes::from_static(b"z"), true)
        .await
        .is_err());
    assert!(miss.finish().await.is_err());
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());
    let st = s.stats();
    assert_eq!((st.bytes_inflight, st.fills_inflight), (0, 0));
    assert_eq!((st.objects_memory, st.objects_disk), (0, 0));
    assert!(object_files(dir.path()).is_empty());
}

#[tokio::test]
async fn abandoned_miss_is_not_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = with_disk(dir.path()).await;
    let k = key("/cut-off");
    {
        let mut miss = s
            .get_miss_handler(&k, &meta(), &span())
            .await
            .expect("miss");
        miss.write_body(Bytes::from_static(b"partial"), false)
            .await
            .expect("write");
        // upstream went away: dropped without finish
    }
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());

    // even a body that reached its end is not stored without finish
    {
        let mut miss = s
            .get_miss_handler(&k, &meta(), &span())
            .await
            .expect("miss");
        miss.write_body(Bytes::from_static(b"whole"), true)
            .await
            .expect("write");
    }
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());

    let st = s.stats();
    assert_eq!((st.objects_memory, st.objects_disk), (0, 0));
    assert_eq!((st.bytes_inflight, st.fills_inflight), (0, 0));
    assert!(object_files(dir.path()).is_empty());
    // and a restart finds nothing either
    let s2 = with_disk(dir.path()).await;
    assert!(s2.lookup(&k, &span()).await.expect("lookup").is_none());
}

#[tokio::test]
async fn readers_stream_a_fill_in_progress() {
    let s = mem_only(1 << 20, 64 * 1024).await;
    let k = key("/stream");
    let mut miss = s
        .get_miss_handler(&k, &meta(), &span())
        .await
        .expect("miss");
    assert!(s.support_streaming_partial_write());

    // what pingora does in set_miss_handler
    let tag = miss.streaming_write_tag().expect("tag").to_vec();
    let (_, mut own) = s
        .lookup_streaming_write(&k, Some(&tag), &span())
        .await
        .expect("lookup")
        .expect("own fill");
    // a cache-lock reader
    let (m, mut other) = s.lookup(&k, &span()).await.expect("lookup").expect("fill");
    assert_eq!(
        m.headers().get("x-test").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(!other.can_seek());

    assert!(
        other.read_body().now_or_never().is_none(),
        "nothing written yet"
    );
    miss.write_body(Bytes::from_static(b"one,"), false)
        .await
        .expect("write");
    assert_eq!(
        other.read_body().await.expect("read").as_deref(),
        Some(&b"one,"[..])
    );
    assert!(other.read_body().now_or_never().is_none(), "waits for more");
    miss.write_body(Bytes::from_static(b"two"), true)
        .await
        .expect("write");
    miss.finish().await.expect("finish");

    assert_eq!(read_all(&mut other).await.expect("read"), b"two");
    assert_eq!(read_all(&mut own).await.expect("read"), b"one,two");
    let (_, body) = get(s, &k).await.expect("committed");
    assert_eq!(body, b"one,two");
    assert!(s
        .lookup_streaming_write(&k, Some(&tag), &span())
        .await
        .is_err());
}

#[tokio::test]
async fn waiting_reader_wakes_with_an_error_when_the_writer_is_dropped() {
    let s = mem_only(1 << 20, 64 * 1024).await;
    let k = key("/dropped");
    let mut miss = s
        .get_miss_handler(&k, &meta(), &span())
        .await
        .expect("miss");
    miss.write_body(Bytes::from_static(b"abc"), false)
        .await
        .expect("write");
    let (_, mut reader) = s.lookup(&k, &span()).await.expect("lookup").expect("fill");
    let task = tokio::spawn(async move { read_all(&mut reader).await });
    tokio::task::yield_now().await;
    drop(miss);
    let res = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("reader must not hang")
        .expect("task");
    assert!(res.is_err(), "a cut-off body must be an error: {res:?}");
}

#[tokio::test]
async fn disk_tier_survives_restart_and_promotes_to_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s1 = with_disk(dir.path()).await;
    let k = key("/persist");
    let m = meta();
    let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
    put(s1, &k, &m, &body, 4096).await.expect("put");
    let st = s1.stats();
    assert_eq!((st.objects_memory, st.objects_disk), (1, 1));
    assert_eq!(st.bytes_disk % 4096, 0);
    assert_eq!(object_files(dir.path()).len(), 1);
    assert!(std::fs::read_dir(dir.path().join("tmp"))
        .expect("tmp dir")
        .next()
        .is_none());

    // "restart": a new storage on the same directory
    let s2 = with_disk(dir.path()).await;
    let st = s2.stats();
    assert_eq!((st.objects_memory, st.objects_disk), (0, 1));
    let (m2, got) = get(s2, &k).await.expect("served from disk");
    assert_eq!(got, body);
    assert_eq!(secs(m2.fresh_until()), secs(m.fresh_until()));
    assert_eq!(
        m2.headers().get("x-test").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(s2.stats().objects_memory, 1, "promoted to memory");
    // and the promoted copy serves the next hit
    std::fs::remove_file(&object_files(dir.path())[0]).expect("rm");
    assert_eq!(get(s2, &k).await.expect("memory hit").1, body);
}

async fn stored_then_restarted(dir: &Path, k: &CacheKey) -> (&'static EdgeStorage, PathBuf) {
    let s1 = with_disk(dir).await;
    put(s1, k, &meta(), &vec![b'q'; 10_000], 4096)
        .await
        .expect("put");
    let s2 = with_disk(dir).await;
    let files = object_files(dir);
    assert_eq!(files.len(), 1);
    (s2, files[0].clone())
}

#[tokio::test]
async fn truncated_file_is_rejected_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = key("/truncated");
    let (s, file) = stored_then_restarted(dir.path(), &k).await;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open");
    let len = f.metadata().expect("meta").len();
    f.set_len(len - 100).expect("truncate");
    drop(f);

    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());
    assert!(!file.exists(), "a truncated file is removed");
    let st = s.stats();
    assert_eq!((st.objects_disk, st.disk_rejected), (0, 1));
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());
}

#[tokio::test]
async fn corrupted_file_is_rejected_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = key("/corrupt");
    let (s, file) = stored_then_restarted(dir.path(), &k).await;
    let mut bytes = std::fs::read(&file).expect("read");
    let at = bytes.len() - 5_000; // inside the body
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).expect("write");

    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());
    assert!(!file.exists(), "a corrupt file is removed");
    let st = s.stats();
    assert_eq!(
        (st.objects_disk, st.objects_memory, st.disk_rejected),
        (0, 0, 1)
    );
}

#[tokio::test]
async fn garbage_and_leftovers_are_removed_at_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s1 = with_disk(dir.path()).await;
    put(s1, &key("/keep"), &meta(), b"keep me", 100)
        .await
        .expect("put");
    put(s1, &key("/cut"), &meta(), &vec![b'c'; 9000], 4096)
        .await
        .expect("put");
    put(s1, &key("/header"), &meta(), b"bad header", 100)
        .await
        .expect("put");
    let find = |p: &str| {
        let hash = key(p).combined_bin();
        object_files(dir.path())
            .into_iter()
            .find(|f| {
                f.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&hexs(&hash)))
            })
            .expect("file")
    };
    let cut = find("/cut");
    let bytes = std::fs::read(&cut).expect("read");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let bad = find("/header");
    let mut bytes = std::fs::read(&bad).expect("read");
    bytes[0] = b'X';
    std::fs::write(&bad, &bytes).expect("write");
    let leftover = dir.path().join("tmp").join("left-over.tmp");
    std::fs::write(&leftover, b"half a write").expect("write");

    let s2 = with_disk(dir.path()).await;
    let st = s2.stats();
    assert_eq!((st.objects_disk, st.disk_rejected), (1, 2), "{st:?}");
    assert!(!cut.exists() && !bad.exists() && !leftover.exists());
    assert_eq!(get(s2, &key("/keep")).await.expect("kept").1, b"keep me");
    assert!(get(s2, &key("/cut")).await.is_none());
}

#[tokio::test]
async fn disk_limit_evicts_least_recently_used_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    // every small file is charged one 4 KiB block
    let s = EdgeStorage::open(disk_cfg(dir.path(), 4 * 4096))
        .await
        .expect("open");
    for i in 0..10 {
        put(s, &key(&format!("/d/{i}")), &meta(), b"small", 100)
            .await
            .expect("put");
        let st = s.stats();
        assert!(st.bytes_disk <= 4 * 4096, "{st:?}");
    }
    let st = s.stats();
    assert_eq!(st.objects_disk, 4);
    assert_eq!(st.evictions_disk, 6);
    assert_eq!(object_files(dir.path()).len(), 4);
    let s2 = EdgeStorage::open(disk_cfg(dir.path(), 4 * 4096))
        .await
        .expect("open");
    assert!(get(s2, &key("/d/9")).await.is_some());
    assert!(get(s2, &key("/d/0")).await.is_none());
}

#[tokio::test]
async fn purge_exact_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = with_disk(dir.path()).await;
    let k = key("/gone");
    let other = key("/stays");
    put(s, &k, &meta(), b"bye", 100).await.expect("put");
    put(s, &other, &meta(), b"hi", 100).await.expect("put");
    assert_eq!(object_files(dir.path()).len(), 2);

    let compact = k.to_compact();
    let out = s
        .purge(
            PurgeTarget::Active(&compact),
            PurgeType::Invalidation,
            &span(),
        )
        .await
        .expect("purge");
    assert_eq!(out, PurgeOutcome::Purged(None));
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());
    assert_eq!(
        object_files(dir.path()).len(),
        1,
        "file unlinked before purge returns"
    );
    let again = s
        .purge(
            PurgeTarget::Active(&compact),
            PurgeType::Invalidation,
            &span(),
        )
        .await
        .expect("purge");
    assert_eq!(again, PurgeOutcome::NotFound);

    // an identified target is never ours
    let entry = CacheEntryKey::identified(other.to_compact(), pingora::cache::CacheEntryId::new(1));
    let out = s
        .purge(PurgeTarget::Exact(&entry), PurgeType::Eviction, &span())
        .await
        .expect("purge");
    assert_eq!(out, PurgeOutcome::NotFound);
    assert!(get(s, &other).await.is_some());

    let s2 = with_disk(dir.path()).await;
    assert!(s2.lookup(&k, &span()).await.expect("lookup").is_none());
    assert!(get(s2, &other).await.is_some());
}

#[tokio::test]
async fn purge_by_prefix_and_by_primary_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s1 = with_disk(dir.path()).await;
    put(s1, &key("/a/1"), &meta(), b"a1", 100)
        .await
        .expect("put");
    put(s1, &key("/a/2?q"), &meta(), b"a2", 100)
        .await
        .expect("put");
    put(s1, &key("/b/1"), &meta(), b"b1", 100)
        .await
        .expect("put");
    let mut variant = key("/b/1");
    variant.set_variance_key(pingora::cache::key::hash_key("accept-encoding=gzip"));
    put(s1, &variant, &meta(), b"b1-gz", 100)
        .await
        .expect("put");
    put(s1, &key("/ab"), &meta(), b"not under /a/", 100)
        .await
        .expect("put");

    // a new process: the prefix index comes from the files
    let s = with_disk(dir.path()).await;
    // one in memory as well as on disk
    assert!(get(s, &key("/a/1")).await.is_some());

    assert_eq!(s.purge_prefix(&format!("{HOST}/a/")), 2);
    assert!(get(s, &key("/a/1")).await.is_none());
    assert!(get(s, &key("/a/2?q")).await.is_none());
    assert!(get(s, &key("/ab")).await.is_some());
    assert!(get(s, &key("/b/1")).await.is_some());
    assert_eq!(s.purge_prefix(&format!("{HOST}/a/")), 0);

    assert_eq!(
        s.purge_primary(&format!("{HOST}/b")),
        0,
        "exact, not a prefix"
    );
    assert_eq!(s.purge_primary(&format!("{HOST}/b/1")), 2, "both variants");
    assert!(get(s, &key("/b/1")).await.is_none());
    assert!(get(s, &variant).await.is_none());

    let d = dir.path().to_path_buf();
    eventually("purged files unlinked", || object_files(&d).len() == 1).await;
    let st = s.stats();
    assert_eq!((st.objects_disk, st.objects_memory), (1, 1));

    assert_eq!(s.purge_prefix(""), 1, "empty prefix matches everything");
    eventually("all files unlinked", || object_files(&d).is_empty()).await;
}

#[tokio::test]
async fn purge_during_a_fill_keeps_it_from_being_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = with_disk(dir.path()).await;
    let k = key("/racing");
    let mut miss = s
        .get_miss_handler(&k, &meta(), &span())
        .await
        .expect("miss");
    let (_, mut reader) = s.lookup(&k, &span()).await.expect("lookup").expect("fill");
    miss.write_body(Bytes::from_static(b"old "), false)
        .await
        .expect("write");
    assert_eq!(s.purge_prefix(HOST), 0, "nothing stored yet");
    assert!(
        s.lookup(&k, &span()).await.expect("lookup").is_none(),
        "a purged fill is hidden from new lookups"
    );
    miss.write_body(Bytes::from_static(b"content"), true)
        .await
        .expect("write");
    miss.finish().await.expect("finish");
    // a reader already streaming it still gets the whole body
    assert_eq!(read_all(&mut reader).await.expect("read"), b"old content");
    assert!(s.lookup(&k, &span()).await.expect("lookup").is_none());
    assert!(object_files(dir.path()).is_empty());
}

#[tokio::test]
async fn expire_keeps_the_body_but_makes_it_stale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = with_disk(dir.path()).await;
    let k = key("/expire");
    put(s, &k, &meta(), b"still here", 100).await.expect("put");
    let compact = k.to_compact();
    let out = s
        .expire(PurgeTarget::Active(&compact), &span())
        .await
        .expect("expire");
    assert_eq!(out, PurgeOutcome::Expired);
    let (m, body) = get(s, &k).await.expect("kept");
    assert!(!m.is_fresh(SystemTime::now() + Duration::from_secs(1)));
    assert!(m.serve_stale_while_revalidate(SystemTime::now()));
    assert_eq!(body, b"still here");

    // on disk too
    let s2 = with_disk(dir.path()).await;
    let (m, body) = get(s2, &k).await.expect("kept on disk");
    assert!(!m.is_fresh(SystemTime::now() + Duration::from_secs(1)));
    assert_eq!(body, b"still here");
    assert_eq!(object_files(dir.path()).len(), 1, "old generation removed");

    let missing = key("/never").to_compact();
    let out = s2
        .expire(PurgeTarget::Active(&missing), &span())
        .await
        .expect("expire");
    assert_eq!(out, PurgeOutcome::NotFound);
}

#[tokio::test]
async fn update_meta_reaches_memory_and_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = with_disk(dir.path()).await;
    let k = key("/revalidated");
    put(s, &k, &meta(), b"body", 100).await.expect("put");
    let fresh = meta_with(Duration::from_secs(3600), "2");
    assert!(s.update_meta(&k, &fresh, &span()).await.expect("update"));
    let (m, body) = get(s, &k).await.expect("hit");
    assert_eq!(
        m.headers().get("x-test").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    assert_eq!(body, b"body");

    let s2 = with_disk(dir.path()).await;
    let (m, body) = get(s2, &k).await.expect("hit");
    assert_eq!(
        m.headers().get("x-test").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    assert_eq!(secs(m.fresh_until()), secs(fresh.fresh_until()));
    assert_eq!(body, b"body");
    assert!(!s2
        .update_meta(&key("/nope"), &fresh, &span())
        .await
        .expect("update"));
}

#[tokio::test]
async fn invalid_configs_are_refused() {
    let bad = [
        CacheStorageConfig {
            memory_bytes: 1000,
            max_object_bytes: 1001,
            disk: None,
        },
        CacheStorageConfig {
            memory_bytes: 0,
            max_object_bytes: 0,
            disk: None,
        },
        CacheStorageConfig {
            disk: Some(DiskConfig {
                dir: PathBuf::from("/tmp/x"),
                max_bytes: 0,
            }),
            ..CacheStorageConfig::default()
        },
    ];
    for cfg in bad {
        let err = EdgeStorage::open_owned(cfg.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted {cfg:?}"));
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
    let d = CacheStorageConfig::default();
    assert_eq!(d.memory_bytes, 256 * 1024 * 1024);
    assert!(d.validate().is_ok());
    let s = EdgeStorage::open(d).await.expect("open");
    assert!(s.eviction().is_none());
    assert_eq!(s.memory_bytes(), DEFAULT_MEMORY_BYTES);
    assert_eq!(s.max_object_bytes(), DEFAULT_MAX_OBJECT_BYTES);
}

/// The storage driven by pingora's own cache state machine, as the proxy drives it.
#[tokio::test]
async fn pingora_http_cache_miss_stream_hit_and_purge() {
    use pingora::cache::{HitStatus, HttpCache};
    let s = mem_only(1 << 20, 64 * 1024).await;
    let new_cache = || {
        let mut c = HttpCache::new();
        c.enable(s, s.eviction(), None, None, None);
        c.set_cache_key(key("/via-pingora"));
        c
    };

    let mut miss = new_cache();
    assert!(miss.cache_lookup().await.expect("lookup").is_none());
    miss.cache_miss();
    miss.set_cache_meta(meta());
    // with streaming partial writes this also fetches the fill's own body reader
    miss.set_miss_handler().await.expect("miss handler");
    miss.miss_handler()
        .expect("handler")
        .write_body(Bytes::from_static(b"streamed "), false)
        .await
        .expect("write");
    let reader = miss.miss_body_reader().expect("streaming reader");
    assert_eq!(
        reader.read_body().await.expect("read").as_deref(),
        Some(&b"streamed "[..])
    );
    miss.miss_handler()
        .expect("handler")
        .write_body(Bytes::from_static(b"body"), true)
        .await
        .expect("write");
    miss.finish_miss_handler().await.expect("finish");
    let reader = miss.miss_body_reader().expect("streaming reader");
    assert_eq!(read_all(reader).await.expect("read"), b"body");
    drop(miss);

    let mut hit = new_cache();
    let (m, h) = hit.cache_lookup().await.expect("lookup").expect("hit");
    hit.cache_found(m, h, HitStatus::Fresh);
    assert_eq!(hit.phase().as_str(), "hit");
    assert_eq!(
        read_all(hit.hit_handler()).await.expect("read"),
        b"streamed body"
    );
    hit.finish_hit_handler().await.expect("finish hit");

    let purge = new_cache();
    assert!(purge.purge().await.expect("purge"));
    let purge = new_cache();
    assert!(!purge.purge().await.expect("purge"));
    let mut after = new_cache();
    assert!(after.cache_lookup().await.expect("lookup").is_none());
}

#[test]
fn open_blocking_works_without_a_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = EdgeStorage::open_blocking(disk_cfg(dir.path(), 1 << 20)).expect("open");
    assert_eq!(s.stats(), StorageStats::default());
    assert!(dir.path().join("objects").is_dir() && dir.path().join("tmp").is_dir());
    // purge without a runtime unlinks inline
    assert_eq!(s.purge_prefix(""), 0);
    let bad = CacheStorageConfig {
        memory_bytes: 10,
        max_object_bytes: 11,
        disk: None,
    };
    assert!(EdgeStorage::open_blocking(bad).is_err());
}
