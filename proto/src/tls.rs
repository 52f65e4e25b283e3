//! Mutual TLS between the coordinator and the workers (rustls through tonic, ring provider).
//!
//! A cluster has one CA (`grokctl certs` makes a development one); with TLS on, the coordinator
//! and every worker hold a certificate signed by it and the matching key:
//!
//! - the coordinator's gRPC server presents its certificate and verifies a client certificate
//!   against the CA when the client offers one. Offering one is optional at the TLS layer
//!   because the same port serves `grokctl` and services (Inference, Admin); `Cluster.Register`
//!   refuses a caller without a verified certificate.
//! - a worker's gRPC server requires a CA-signed client certificate: only the coordinator can
//!   `Load` and `Step`.
//! - clients connect over `https://`, check the server's certificate against the CA and the
//!   host of the address (IP addresses need IP SANs), and present their own certificate when
//!   they have one.
//!
//! Key material is read from files and never printed: [`Tls`]'s `Debug` shows file paths only,
//! and no error quotes a file's content.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The three TLS files as given (flags, environment or config file); any may be missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPaths {
    /// The CA that signs the cluster's certificates.
    pub ca: Option<PathBuf>,
    /// This process's certificate (PEM).
    pub cert: Option<PathBuf>,
    /// This process's private key (PEM).
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Some of the TLS settings are given, not all that are needed.
    #[error("{missing} missing: TLS needs {needs} (or none of them for plaintext)")]
    Partial {
        missing: String,
        needs: &'static str,
    },
    #[error("cannot read the TLS {what} {path}: {why}")]
    Read {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("the TLS {what} {path} is not usable: {why}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{0}")]
    Endpoint(String),
}

impl TlsError {
    /// True when the settings are incomplete (a usage error: exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, TlsError::Partial { .. })
    }
}

const FLAGS: [&str; 3] = ["--tls-ca", "--tls-cert", "--tls-key"];

fn missing_list(names: &[&str]) -> String {
    match names {
        [a] => format!("{a} is"),
        [a, b] => format!("{a} and {b} are"),
        _ => format!("{} are", names.join(", ")),
    }
}

impl TlsPaths {
    pub fn new(ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Self {
        Self { ca, cert, key }
    }

    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    fn given(&self) -> [bool; 3] {
        [self.ca.is_some(), self.cert.is_some(), self.key.is_some()]
    }

    /// A server or cluster member (coordinator, worker): all three or none.
    pub fn check_member(&self) -> Result<bool, TlsError> {
        let g = self.given();
        if g.iter().all(|x| !x) {
            return Ok(false);
        }
        let missing: Vec<&str> = (0..3).filter(|&i| !g[i]).map(|i| FLAGS[i]).collect();
        if missing.is_empty() {
            return Ok(true);
        }
        Err(TlsError::Partial {
            missing: missing_list(&missing),
            needs: "all three of --tls-ca, --tls-cert and --tls-key",
        })
    }

    /// A client of the coordinator (`grokctl status`, `generate --endpoint`, ...): the CA, and
    /// optionally a certificate and its key (both).
    pub fn check_client(&self) -> Result<bool, TlsError> {
        let [ca, cert, key] = self.given();
        if !(ca || cert || key) {
            return Ok(false);
        }
        let mut missing = Vec::new();
        if !ca {
            missing.push(FLAGS[0]);
        }
        if cert != key {
            missing.push(if cert { FLAGS[2] } else { FLAGS[1] });
        }
        if missing.is_empty() {
            return Ok(true);
        }
        Err(TlsError::Partial {
            missing: missing_list(&missing),
            needs: "--tls-ca, and --tls-cert with --tls-key to present a certificate",
        })
    }
}

/// Loaded TLS material: the CA and, for a member, this process's identity.
#[derive(Clone)]
pub struct Tls {
    ca: Certificate,
    identity: Option<Identity>,
    paths: TlsPaths,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths only: the identity holds the private key.
        f.debug_struct("Tls")
            .field("ca", &self.paths.ca)
            .field("cert", &self.paths.cert)
            .field("key", &self.paths.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.into(),
        why: e.to_string(),
    })
}

fn check_certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<(), TlsError> {
    let n = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Invalid {
            what,
            path: path.into(),
            why: "malformed PEM".into(),
        })?
        .len();
    if n == 0 {
        return Err(TlsError::Invalid {
            what,
            path: path.into(),
            why: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(())
}

impl Tls {
    /// Reads and checks the files of complete settings (`check_member` or `check_client`
    /// passed); `Ok(None)` when none are given.
    pub fn load(paths: &TlsPaths) -> Result<Option<Tls>, TlsError> {
        let Some(ca_path) = &paths.ca else {
            return Ok(None);
        };
        let ca = read("CA", ca_path)?;
        check_certs("CA", ca_path, &ca)?;
        let identity = match (&paths.cert, &paths.key) {
            (Some(c), Some(k)) => {
                let cert = read("certificate", c)?;
                check_certs("certificate", c, &cert)?;
                let key = read("key", k)?;
                // The key's content never goes into an error or a log.
                if PrivateKeyDer::from_pem_slice(&key).is_err() {
                    return Err(TlsError::Invalid {
                        what: "key",
                        path: k.clone(),
                        why: "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".into(),
                    });
                }
                warn_if_readable_by_others(k);
                Some(Identity::from_pem(cert, key))
            }
            _ => None,
        };
        Ok(Some(Tls {
            ca: Certificate::from_pem(ca),
            identity,
            paths: paths.clone(),
        }))
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// The server side: this process's certificate; client certificates verified against the
    /// CA, required or (for the coordinator's shared client/worker port) optional.
    pub fn server_config(&self, require_client_cert: bool) -> Result<ServerTlsConfig, TlsError> {
        let id = self.identity.clone().ok_or_else(|| {
            TlsError::Endpoint("a TLS server needs --tls-cert and --tls-key".into())
        })?;
        Ok(ServerTlsConfig::new()
            .identity(id)
            .client_ca_root(self.ca.clone())
            .client_auth_optional(!require_client_cert)
            .timeout(Duration::from_secs(10)))
    }

    fn client_config(&self, host: &str) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'))
            .timeout(Duration::from_secs(10));
        if let Some(id) = &self.identity {
            c = c.identity(id.clone());
        }
        c
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "the TLS key {} is readable by other users (mode {mode:o}); chmod 600 it",
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// `HOST:PORT` or a URL, without the scheme and path.
fn authority(addr: &str) -> (&str, Option<&str>) {
    let (scheme, rest) = match addr.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, addr),
    };
    (rest.split('/').next().unwrap_or(rest), scheme)
}

/// The endpoint of a gRPC server at `addr` (`HOST:PORT`, `http://...` or `https://...`): over
/// TLS (`https://`, the server's certificate checked against the CA for HOST) when `tls` is
/// given, plaintext otherwise.
pub fn endpoint(addr: &str, tls: Option<&Tls>) -> Result<Endpoint, TlsError> {
    let (auth, scheme) = authority(addr);
    let bad = |e: &dyn fmt::Display| TlsError::Endpoint(format!("bad address `{addr}`: {e}"));
    match (scheme, tls) {
        (Some(s), _) if s != "http" && s != "https" => {
            return Err(bad(&format!("unknown scheme `{s}`")))
        }
        (Some("https"), None) => {
            return Err(TlsError::Endpoint(format!(
                "`{addr}` is an https:// address: give the cluster's CA with --tls-ca FILE (or GROK_TLS_CA)"
            )))
        }
        _ => {}
    }
    match tls {
        None => Endpoint::from_shared(format!("http://{auth}")).map_err(|e| bad(&e)),
        Some(t) => {
            let ep = Endpoint::from_shared(format!("https://{auth}")).map_err(|e| bad(&e))?;
            let host = ep.uri().host().unwrap_or("").to_string();
            ep.tls_config(t.client_config(&host))
                .map_err(|e| bad(&error_chain(&e)))
        }
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// A failed call's message and the errors beneath it (a transport failure's cause), on one line.
pub fn status_chain(s: &tonic::Status) -> String {
    let mut out = s.message().to_string();
    let mut cur = std::error::Error::source(s);
    while let Some(e) = cur {
        let m = e.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = e.source();
    }
    out
}

/// What a failed connection or call most likely means for TLS, as a hint to append to its
/// message (`tls_on`: whether this process used TLS). `None` when nothing points at TLS.
pub fn hint(message: &str, tls_on: bool) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    let has = |s: &str| m.contains(&s.to_ascii_lowercase());
    if tls_on {
        if has("UnknownIssuer") || has("BadSignature") {
            return Some("the server's certificate is not signed by the CA given with --tls-ca");
        }
        if has("NotValidForName") || has("not valid for name") {
            return Some("the server's certificate does not name this host: make certificates with `grokctl certs --hosts` listing it");
        }
        if has("Expired") || has("NotValidYet") {
            return Some("a certificate is expired or not valid yet");
        }
        if has("CertificateRequired") {
            return Some("the server requires a client certificate: give --tls-cert and --tls-key signed by the cluster's CA");
        }
        if has("UnknownCA") || has("BadCertificate") || has("DecryptError") {
            return Some("the server refused this process's certificate: it is not signed by the cluster's CA");
        }
        if has("InvalidContentType") || has("corrupt message") || has("received corrupt") {
            return Some("the server does not speak TLS: is it started without --tls-ca/--tls-cert/--tls-key?");
        }
        if has("connection closed") || has("connection reset") || has("broken pipe") {
            // A server that rejects a client certificate closes the connection after the
            // handshake; its alert does not always arrive first.
            return Some("the server closed the connection: it refuses certificates not signed by the cluster's CA");
        }
    } else if has("connection reset")
        || has("broken pipe")
        || has("frame with invalid size")
        || has("connection closed")
        || has("h2 protocol error")
        || has("unexpected end of file")
        || has("invalid HTTP version")
        // A TLS server answering a plaintext HTTP/2 preface sometimes just drops it: the
        // request fails before the connection was ever ready.
        || has("connection was not ready")
    {
        return Some("does the server use TLS? then give its CA with --tls-ca FILE, and a worker also --tls-cert and --tls-key");
    }
    None
}

/// `message` with a TLS hint appended when one applies.
pub fn explain(message: String, tls_on: bool) -> String {
    match hint(&message, tls_on) {
        Some(h) => format!("{message} ({h})"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ca: bool, cert: bool, key: bool) -> TlsPaths {
        TlsPaths::new(
            ca.then(|| "ca.pem".into()),
            cert.then(|| "c.pem".into()),
            key.then(|| "c.key".into()),
        )
    }

    #[test]
    fn members_need_all_three_or_none() {
        assert!(!p(false, false, false).check_member().unwrap());
        assert!(p(true, true, true).check_member().unwrap());
        let e = p(true, false, false).check_member().unwrap_err();
        assert!(e.is_usage());
        let e = e.to_string();
        assert!(e.starts_with("--tls-cert and --tls-key are missing"), "{e}");
        let e = p(true, true, false).check_member().unwrap_err().to_string();
        assert!(e.starts_with("--tls-key is missing"), "{e}");
        assert!(!e.contains("--tls-cert is"), "{e}");
        let e = p(false, true, true).check_member().unwrap_err().to_string();
        assert!(e.starts_with("--tls-ca is missing"), "{e}");
        let e = p(false, false, true)
            .check_member()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--tls-ca and --tls-cert are missing"), "{e}");
    }

    #[test]
    fn clients_need_the_ca_and_cert_with_key() {
        assert!(!p(false, false, false).check_client().unwrap());
        assert!(p(true, false, false).check_client().unwrap());
        assert!(p(true, true, true).check_client().unwrap());
        let e = p(true, true, false).check_client().unwrap_err().to_string();
        assert!(e.starts_with("--tls-key is missing"), "{e}");
        let e = p(true, false, true).check_client().unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert is missing"), "{e}");
        let e = p(false, true, true).check_client().unwrap_err().to_string();
        assert!(e.starts_with("--tls-ca is missing"), "{e}");
    }

    #[test]
    fn endpoints_follow_tls() {
        let ep = endpoint("127.0.0.1:5", None).unwrap();
        assert_eq!(ep.uri().to_string(), "http://127.0.0.1:5/");
        let ep = endpoint("http://127.0.0.1:5", None).unwrap();
        assert_eq!(ep.uri().scheme_str(), Some("http"));
        let e = endpoint("https://127.0.0.1:5", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-ca"), "{e}");
        assert!(endpoint("ftp://x:1", None).is_err());
    }

    #[test]
    fn unreadable_and_invalid_files_are_named() {
        let d = std::env::temp_dir().join(format!("grok-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let e = Tls::load(&TlsPaths::new(Some(d.join("nope.pem")), None, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.pem") && e.contains("CA"), "{e}");
        let junk = d.join("junk.pem");
        std::fs::write(&junk, "SECRET-NOT-A-CERT").unwrap();
        let e = Tls::load(&TlsPaths::new(Some(junk.clone()), None, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("junk.pem") && !e.contains("SECRET"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn hints() {
        assert!(hint("invalid peer certificate: UnknownIssuer", true)
            .unwrap()
            .contains("--tls-ca"));
        assert!(hint("connection reset by peer", false)
            .unwrap()
            .contains("--tls-ca"));
        assert!(hint(
            "operation was canceled: transport error: connection was not ready",
            false
        )
        .unwrap()
        .contains("--tls-ca"));
        assert!(hint("deadline exceeded", false).is_none());
    }
}
