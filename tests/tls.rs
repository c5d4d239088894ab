//! TLS termination through a real edge: SNI, h2 over ALPN, certificate swap on
//! SIGHUP, a bad certificate keeping the old one, redirect and HSTS, mTLS, and TLS to
//! upstreams with verification.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, servers, Edge, Origin};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test certificate authority writing leaf certificates to files.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    dir: tempfile::TempDir,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wingman test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes `<stem>.pem` and `<stem>.key` for `names`; returns their paths.
    fn leaf(&self, stem: &str, names: &[&str], cn: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{stem}.pem")),
            self.dir.path().join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn ca_file(&self) -> PathBuf {
        let p = self.dir.path().join("ca.pem");
        std::fs::write(&p, &self.pem).unwrap();
        p
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut self.pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }
}

fn tls_listener(port: u16, certs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.display(),
                k.display()
            )
        })
        .collect();
    format!(
        "[[listeners]]\naddress = \"127.0.0.1:{port}\"\n[listeners.tls]\ncertificates = [{}]\n{extra}\n",
        list.join(", ")
    )
}

fn pool(origin: &Origin, route_extra: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"app\"\nservers = {}\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n{route_extra}\n",
        servers(&[origin])
    )
}

/// GET https://a.test:PORT/PATH with a client trusting `ca` (h2 when offered).
async fn https_get(ca: &Ca, port: u16, path: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .resolve("a.test", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap()
        .get(format!("https://a.test:{port}{path}"))
        .send()
        .await
        .unwrap()
}

/// Handshakes with `sni` and returns the names (CN) of the certificate the edge
/// presented, plus the open stream.
async fn handshake(
    port: u16,
    sni: &str,
    roots: rustls::RootCertStore,
    client_auth: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> std::io::Result<(
    String,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
)> {
    // the workspace builds rustls with both ring and aws-lc-rs (the app's HTTP
    // client), so the process default must be chosen; the edge itself uses ring
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match client_auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await?;
    // a request completes the handshake on both sides (client certificate checks)
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut buf = [0u8; 12];
    tls.read_exact(&mut buf).await?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((cn, tls))
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_h2_is_offered_over_alpn() {
    let ca = Ca::new();
    let a = ca.leaf("a", &["a.test"], "cert-a");
    let b = ca.leaf("b", &["b.test", "*.b.test"], "cert-b");
    let origin = Origin::start("o").await;
    let port = free_port();
    let edge = Edge::start(&format!(
        "{}\n{}",
        tls_listener(port, &[a, b], ""),
        pool(&origin, "")
    ))
    .await;
    assert_eq!(
        handshake(port, "a.test", ca.roots(), None).await.unwrap().0,
        "cert-a"
    );
    assert_eq!(
        handshake(port, "b.test", ca.roots(), None).await.unwrap().0,
        "cert-b"
    );
    assert_eq!(
        handshake(port, "x.b.test", ca.roots(), None)
            .await
            .unwrap()
            .0,
        "cert-b"
    );
    // h2 over ALPN
    let resp = https_get(&ca, port, "/x").await;
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.text().await.unwrap(), "o");
    assert_eq!(
        origin.last_seen().unwrap().headers["x-forwarded-proto"],
        "https"
    );
    drop(edge);
}

#[tokio::test]
async fn a_certificate_swapped_on_sighup_is_seen_by_new_connections_only() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf("site", &["a.test"], "first");
    let origin = Origin::start("o").await;
    let port = free_port();
    let body = format!(
        "{}\n{}",
        tls_listener(port, &[(cert.clone(), key.clone())], ""),
        pool(&origin, "")
    );
    let edge = Edge::start(&body).await;
    let (cn, mut old) = handshake(port, "a.test", ca.roots(), None).await.unwrap();
    assert_eq!(cn, "first");
    drain_response(&mut old).await;
    // replace the files and reload
    let (c2, k2) = ca.leaf("next", &["a.test"], "second");
    std::fs::copy(&c2, &cert).unwrap();
    std::fs::copy(&k2, &key).unwrap();
    assert_eq!(edge.reload(&body).await, 2);
    assert_eq!(
        handshake(port, "a.test", ca.roots(), None).await.unwrap().0,
        "second"
    );
    // the connection made before the swap goes on
    old.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
}

/// Reads the rest of one small response from the handshake's request.
async fn drain_response(s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\no") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_bad_certificate_on_reload_keeps_the_old_one() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf("site", &["a.test"], "good");
    let origin = Origin::start("o").await;
    let port = free_port();
    let body = format!(
        "{}\n{}",
        tls_listener(port, &[(cert.clone(), key.clone())], ""),
        pool(&origin, "")
    );
    let edge = Edge::start(&body).await;
    // a key that belongs to another certificate
    let (_, other_key) = ca.leaf("other", &["a.test"], "other");
    std::fs::copy(&other_key, &key).unwrap();
    edge.sighup();
    edge.wait_metric("wingman_edge_config_reloads_total{result=\"error\"}", 1.0)
        .await;
    assert!(edge.log().contains("does not go with"), "{}", edge.log());
    assert_eq!(
        handshake(port, "a.test", ca.roots(), None).await.unwrap().0,
        "good"
    );
    // an unreadable file too
    std::fs::write(&cert, "not a certificate").unwrap();
    edge.sighup();
    edge.wait_metric("wingman_edge_config_reloads_total{result=\"error\"}", 2.0)
        .await;
    assert_eq!(
        handshake(port, "a.test", ca.roots(), None).await.unwrap().0,
        "good"
    );
}

#[tokio::test]
async fn check_reports_a_mismatched_key_as_a_config_error() {
    let ca = Ca::new();
    let (cert, _) = ca.leaf("site", &["a.test"], "good");
    let (_, wrong) = ca.leaf("other", &["b.test"], "other");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[[upstreams]]\nname = \"app\"\nservers = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n",
            tls_listener(8443, &[(cert, wrong)], "")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wingman-edge"))
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listeners[0].tls.certificates") && err.contains("does not go with"),
        "{err}"
    );
}

#[tokio::test]
async fn cleartext_redirects_to_https_and_hsts_is_sent_over_tls_only() {
    let ca = Ca::new();
    let leaf = ca.leaf("a", &["a.test"], "a");
    let origin = Origin::start("o").await;
    let (tls_port, redirect_port) = (free_port(), free_port());
    let edge = Edge::start(&format!(
        "{}\n[[listeners]]\naddress = \"127.0.0.1:{redirect_port}\"\nredirect_to_https = true\nhttps_port = {tls_port}\n{}",
        tls_listener(tls_port, &[leaf], ""),
        pool(&origin, "hsts = \"max-age=63072000; includeSubDomains\"")
    ))
    .await;
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_follow
        .get(format!("http://127.0.0.1:{redirect_port}/path?q=1"))
        .header("host", "a.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://a.test:{tls_port}/path?q=1")
    );
    let plain = reqwest::get(edge.url("/")).await.unwrap();
    assert!(plain.headers().get("strict-transport-security").is_none());
    let secure = https_get(&ca, tls_port, "/").await;
    assert_eq!(
        secure.headers()["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
}

#[tokio::test]
async fn mtls_listener_requires_a_client_certificate_from_its_ca() {
    let ca = Ca::new();
    let leaf = ca.leaf("a", &["a.test"], "a");
    let client_ca = Ca::new();
    let (cc, ck) = client_ca.leaf("client", &["client.test"], "client");
    let origin = Origin::start("o").await;
    let port = free_port();
    let _edge = Edge::start(&format!(
        "{}\n{}",
        tls_listener(
            port,
            &[leaf],
            &format!("client_ca = \"{}\"", client_ca.ca_file().display())
        ),
        pool(&origin, "")
    ))
    .await;
    assert!(handshake(port, "a.test", ca.roots(), None).await.is_err());
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut std::fs::read(&cc).unwrap().as_slice())
            .map(|c| c.unwrap())
            .collect();
    let key = rustls_pemfile::private_key(&mut std::fs::read(&ck).unwrap().as_slice())
        .unwrap()
        .unwrap();
    let (cn, _) = handshake(port, "a.test", ca.roots(), Some((chain, key)))
        .await
        .unwrap();
    assert_eq!(cn, "a");
}

/// A "TLS origin": an edge terminating TLS for `origin.test` (a certificate of `ca`)
/// in front of the plain `origin`. Returns it with its port.
async fn tls_origin(ca: &Ca, origin: &Origin) -> (Edge, u16) {
    let leaf = ca.leaf("origin", &["origin.test"], "origin");
    let tls_port = free_port();
    let edge = Edge::start(&format!(
        "{}\n{}",
        tls_listener(tls_port, &[leaf], ""),
        pool(origin, "")
    ))
    .await;
    (edge, tls_port)
}

#[tokio::test]
async fn upstream_tls_is_verified_against_the_configured_ca_and_name() {
    let ca = Ca::new();
    let origin = Origin::start("o").await;
    let (_tls_origin, tls_port) = tls_origin(&ca, &origin).await;
    let ca_file = ca.ca_file();
    let front = |sni: &str| {
        format!(
            "[[upstreams]]\nname = \"secure\"\ntls = true\nsni = \"{sni}\"\nservers = [{{ address = \"127.0.0.1:{tls_port}\" }}]\n[upstreams.passive]\nconsecutive_failures = 0\n[[routes]]\nname = \"all\"\nupstream = \"secure\"\n"
        )
    };
    // the edge in front needs the CA: [server] upstream_ca_file goes in the preamble
    let edge = Edge::start_with_server_extra(
        &format!("upstream_ca_file = \"{}\"", ca_file.display()),
        &front("origin.test"),
    )
    .await;
    let resp = reqwest::get(edge.url("/via-tls")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "o");
    let wrong = Edge::start_with_server_extra(
        &format!("upstream_ca_file = \"{}\"", ca_file.display()),
        &front("wrong.test"),
    )
    .await;
    let resp = reqwest::get(wrong.url("/via-tls")).await.unwrap();
    assert_eq!(resp.status(), 502, "a name mismatch must fail verification");
}

/// Active health checks of a `tls = true` pool go over TLS, with the pool's SNI and
/// verification: a TLS origin is probed healthy, and one whose certificate does not
/// match the pool's name fails its probes (as its traffic would).
#[tokio::test]
async fn health_checks_of_a_tls_pool_probe_over_tls_and_verify() {
    let ca = Ca::new();
    let origin = Origin::start("o").await;
    let (_tls_origin, tls_port) = tls_origin(&ca, &origin).await;
    let ca_file = ca.ca_file();
    let front = |sni: &str| {
        format!(
            "[[upstreams]]\nname = \"secure\"\ntls = true\nsni = \"{sni}\"\nservers = [{{ address = \"127.0.0.1:{tls_port}\" }}]\n[upstreams.health_check]\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n[upstreams.passive]\nconsecutive_failures = 0\n[[routes]]\nname = \"all\"\nupstream = \"secure\"\n"
        )
    };
    let server = format!("127.0.0.1:{tls_port}");
    let edge = Edge::start_with_server_extra(
        &format!("upstream_ca_file = \"{}\"", ca_file.display()),
        &front("origin.test"),
    )
    .await;
    common::wait_until(
        Duration::from_secs(10),
        "probes reach the origin through TLS",
        || async {
            origin
                .state
                .probes
                .load(std::sync::atomic::Ordering::SeqCst)
                >= 3
        },
    )
    .await;
    let st = edge.server_status("secure", &server).await;
    assert_eq!(st["healthy"], true, "{st}");
    let resp = reqwest::get(edge.url("/via-tls")).await.unwrap();
    assert_eq!(resp.status(), 200);

    let wrong = Edge::start_with_server_extra(
        &format!("upstream_ca_file = \"{}\"", ca_file.display()),
        &front("wrong.test"),
    )
    .await;
    common::wait_until(
        Duration::from_secs(10),
        "the mismatching server is probed down",
        || async { wrong.server_status("secure", &server).await["healthy"] == false },
    )
    .await;
}

/// An edge with one TLS listener (a.test) and `client` keys; its TLS port.
async fn tls_edge(ca: &Ca, origin: &Origin, client: &str) -> (Edge, u16) {
    let leaf = ca.leaf("a", &["a.test"], "a");
    let port = free_port();
    let edge = Edge::start(&format!(
        "[client]\n{client}\n{}\n{}",
        tls_listener(port, &[leaf], ""),
        pool(origin, "")
    ))
    .await;
    (edge, port)
}

/// Reads until the edge closes (EOF or reset); false when it was still open after
/// `limit`.
async fn closed_within(s: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut sink))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_that_stall_are_closed_at_the_header_deadline() {
    let ca = Ca::new();
    let origin = Origin::start("o").await;
    // no per-address cap here: every connection waits for its deadline
    let (edge, port) = tls_edge(
        &ca,
        &origin,
        "header_timeout = \"1s\"\nmax_conns_per_ip = 0",
    )
    .await;
    let started = std::time::Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..500 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        // the start of a ClientHello record, and then nothing
        s.write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8]).await.unwrap();
        stalled.push(s);
    }
    let waits = stalled.into_iter().map(|mut s| {
        tokio::spawn(async move { closed_within(&mut s, Duration::from_secs(15)).await })
    });
    let closed = futures_util::future::join_all(waits).await;
    let open = closed.iter().filter(|c| !matches!(c, Ok(true))).count();
    assert_eq!(
        open, 0,
        "{open} of 500 stalled handshakes still open after 15 s"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    // and the edge still serves
    let (cn, _) = handshake(port, "a.test", ca.roots(), None).await.unwrap();
    assert_eq!(cn, "a");
    drop(edge);
}

/// A TLS connection that negotiated h2 over ALPN.
async fn h2_tls(ca: &Ca, port: u16) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = connector
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

const H2_MAGIC: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn an_h2_client_that_never_sends_its_preface_is_closed_at_the_header_deadline() {
    let ca = Ca::new();
    let origin = Origin::start("o").await;
    let (edge, port) = tls_edge(&ca, &origin, "header_timeout = \"1s\"").await;
    // ALPN h2, then silence
    let mut silent = h2_tls(&ca, port).await;
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "an h2 connection without a preface is still open"
    );
    // the magic, but no SETTINGS frame
    let mut half = h2_tls(&ca, port).await;
    half.write_all(H2_MAGIC).await.unwrap();
    assert!(
        closed_within(&mut half, Duration::from_secs(5)).await,
        "an h2 connection without SETTINGS is still open"
    );
    // the same on the cleartext port (h2c with prior knowledge)
    let mut h2c = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
    h2c.write_all(H2_MAGIC).await.unwrap();
    assert!(
        closed_within(&mut h2c, Duration::from_secs(5)).await,
        "an h2c connection without SETTINGS is still open"
    );
    // a real h2 client is served
    let resp = https_get(&ca, port, "/").await;
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn the_per_address_connection_slot_is_taken_before_the_tls_handshake() {
    let ca = Ca::new();
    let origin = Origin::start("o").await;
    // a long deadline: the held connections must outlive a slow (loaded) test
    let (edge, port) = tls_edge(
        &ca,
        &origin,
        "max_conns_per_ip = 2\nheader_timeout = \"60s\"",
    )
    .await;
    // connections that never start their handshake take the slots: of three,
    // one is refused (counted) and closed
    let mut opened = Vec::new();
    for _ in 0..3 {
        opened.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let refused = |n: f64| {
        let edge = &edge;
        common::wait_until(
            Duration::from_secs(20),
            "a refused connection",
            move || async move {
                let series = "wingman_edge_rejected_requests_total{status=\"429\"}";
                edge.metric(series).await.unwrap_or(0.0) >= n
            },
        )
    };
    refused(1.0).await;
    let mut held = Vec::new();
    for mut s in opened {
        if !closed_within(&mut s, Duration::from_millis(500)).await {
            held.push(s);
        }
    }
    assert_eq!(held.len(), 2, "the refused connection was not closed");
    let third = handshake(port, "a.test", ca.roots(), None).await;
    assert!(
        third.is_err(),
        "a third connection from the address got through"
    );
    refused(2.0).await;
    drop(held);
    common::wait_until(Duration::from_secs(20), "slots released", || async {
        handshake(port, "a.test", ca.roots(), None).await.is_ok()
    })
    .await;
}
