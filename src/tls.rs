//! TLS termination: certificates chosen by SNI, swapped on reload.
//!
//! A [`CertStore`] is built from a listener's certificate list when the config is
//! loaded (so an unreadable file, a key that does not match its certificate or a
//! certificate without a name is a config error that keeps the running certificates).
//! Each TLS listener has one [`SniResolver`] for the life of the process; a reload
//! stores a new `CertStore` into it, so new handshakes use the new certificates while
//! established connections keep theirs.
//!
//! The server names of a certificate come from its subjectAltName DNS entries (the
//! subject CN when there are none); `*.example.com` entries match one label. The
//! first certificate of a listener is the default for clients without SNI or with
//! an unknown name.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};

/// One certificate as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Certificates of one listener, by server name.
#[derive(Default)]
pub struct CertStore {
    default: Option<Arc<CertifiedKey>>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `.example.com` for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Names of each certificate, for /status and errors.
    pub names: Vec<Vec<String>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("names", &self.names)
            .finish()
    }
}

impl CertStore {
    /// Loads and checks every certificate; on any problem, returns all of them.
    pub fn load(files: &[CertFiles]) -> Result<CertStore, Vec<String>> {
        pingora::tls::install_default_crypto_provider();
        let mut store = CertStore::default();
        let mut errors = Vec::new();
        for f in files {
            match load_one(f) {
                Ok((ck, names)) => {
                    let ck = Arc::new(ck);
                    if store.default.is_none() {
                        store.default = Some(ck.clone());
                    }
                    for n in &names {
                        match n.strip_prefix('*') {
                            Some(suffix) => {
                                store
                                    .wildcard
                                    .entry(suffix.to_owned())
                                    .or_insert(ck.clone());
                            }
                            None => {
                                store.exact.entry(n.clone()).or_insert(ck.clone());
                            }
                        }
                    }
                    store.names.push(names);
                }
                Err(e) => errors.push(e),
            }
        }
        if files.is_empty() {
            errors.push("a TLS listener needs at least one certificate".into());
        }
        if errors.is_empty() {
            Ok(store)
        } else {
            Err(errors)
        }
    }

    /// The certificate for a server name (or the default).
    pub fn find(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(ck) = self.exact.get(&name) {
                return Some(ck.clone());
            }
            if let Some(dot) = name.find('.') {
                if let Some(ck) = self.wildcard.get(&name[dot..]) {
                    return Some(ck.clone());
                }
            }
        }
        self.default.clone()
    }
}

fn load_one(f: &CertFiles) -> Result<(CertifiedKey, Vec<String>), String> {
    let (cert_path, key_path) = (path_str(&f.cert)?, path_str(&f.key)?);
    for p in [&f.cert, &f.key] {
        std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let (chain, key) = pingora::tls::load_certs_and_key_files(cert_path, key_path)
        .map_err(|e| format!("{} / {}: {e}", f.cert.display(), f.key.display()))?
        .ok_or_else(|| {
            format!(
                "{} / {}: no PEM certificate or no private key found",
                f.cert.display(),
                f.key.display()
            )
        })?;
    let provider = pingora::tls::CryptoProvider::get_default()
        .ok_or_else(|| "no TLS crypto provider installed".to_owned())?;
    let ck = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        format!(
            "{} does not go with {}: {e}",
            f.key.display(),
            f.cert.display()
        )
    })?;
    let leaf = ck
        .cert
        .first()
        .ok_or_else(|| format!("{}: empty certificate chain", f.cert.display()))?;
    let names = cert_names(leaf.as_ref())
        .map_err(|e| format!("{}: cannot read the certificate: {e}", f.cert.display()))?;
    if names.is_empty() {
        return Err(format!(
            "{}: the certificate names no host",
            f.cert.display()
        ));
    }
    Ok((ck, names))
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{}: not a UTF-8 path", p.display()))
}

/// DNS names of a certificate: subjectAltName DNS entries, else the subject CN.
fn cert_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// The listener's certificate resolver: the current [`CertStore`], swapped on reload.
pub struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("names", &self.store.load().names)
            .finish()
    }
}

impl SniResolver {
    pub fn new(store: CertStore) -> Arc<SniResolver> {
        Arc::new(SniResolver {
            store: ArcSwap::from_pointee(store),
        })
    }

    /// A resolver over an already shared store (the snapshot keeps it too).
    pub fn new_shared(store: Arc<CertStore>) -> Arc<SniResolver> {
        Arc::new(SniResolver {
            store: ArcSwap::new(store),
        })
    }

    pub fn swap(&self, store: Arc<CertStore>) {
        self.store.store(store);
    }

    pub fn names(&self) -> Vec<Vec<String>> {
        self.store.load().names.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().find(hello.server_name())
    }
}

/// A client-certificate verifier for mTLS from a CA bundle file.
pub fn client_verifier(
    ca_file: &Path,
) -> Result<Arc<dyn pingora::tls::ClientCertVerifier>, String> {
    pingora::tls::install_default_crypto_provider();
    let pem = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    let mut roots = pingora::tls::RootCertStore::empty();
    let mut found = 0;
    for item in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = item.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
        found += 1;
    }
    if found == 0 {
        return Err(format!("{}: no PEM certificate found", ca_file.display()));
    }
    pingora::tls::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| format!("{}: {e}", ca_file.display()))
}
