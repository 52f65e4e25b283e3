//! `grokctl certs`: a development CA and the certificates of mutual TLS between the
//! coordinator and the workers (rcgen, ECDSA P-256).
//!
//! Every certificate names 127.0.0.1, localhost and the given hosts (IP addresses as IP SANs,
//! names as DNS SANs) and may serve and connect (server and client authentication), because a
//! coordinator and a worker each do both. Keys are written with mode 0600; existing files are
//! kept unless `force`.

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub struct CertsArgs {
    pub out: PathBuf,
    /// Extra host names and IP addresses (127.0.0.1 and localhost are always included).
    pub hosts: Vec<String>,
    pub days: u32,
    pub force: bool,
}

/// The files `write` creates, in order: (name, what, secret).
pub const FILES: [(&str, &str, bool); 6] = [
    ("ca.pem", "CA certificate", false),
    ("ca.key", "CA key", true),
    ("coordinator.pem", "coordinator certificate", false),
    ("coordinator.key", "coordinator key", true),
    ("worker.pem", "worker certificate", false),
    ("worker.key", "worker key", true),
];

/// The subject alternative names: 127.0.0.1 and localhost, then `hosts` (trimmed, without
/// duplicates); an entry that is neither an IP address nor a DNS name is an error.
pub fn sans(hosts: &[String]) -> Result<Vec<String>> {
    let mut out = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    for h in hosts {
        let h = h.trim();
        if h.is_empty() {
            continue;
        }
        let ok = h.parse::<IpAddr>().is_ok()
            || (h.len() <= 253
                && h.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                }));
        if !ok {
            bail!("--hosts: `{h}` is neither an IP address nor a DNS name");
        }
        let h = if h.parse::<IpAddr>().is_ok() {
            h.to_string()
        } else {
            h.to_ascii_lowercase()
        };
        if !out.contains(&h) {
            out.push(h);
        }
    }
    Ok(out)
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back for clocks a little behind this one.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days as i64);
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "grok-cluster");
    dn.push(DnType::CommonName, cn);
    dn
}

/// Writes `data` to a new file (or over an existing one with `force`); `secret`: mode 0600.
fn write_file(path: &Path, data: &[u8], secret: bool, force: bool) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mode = if secret { 0o600 } else { 0o644 };
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(mode);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // An existing file keeps its mode when overwritten: set it before writing.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Makes the CA and the coordinator's and workers' certificates; returns the paths written.
pub fn write(a: &CertsArgs) -> Result<Vec<PathBuf>> {
    if a.days == 0 {
        bail!("--days must be at least 1");
    }
    let sans = sans(&a.hosts)?;
    let paths: Vec<PathBuf> = FILES.iter().map(|(n, _, _)| a.out.join(n)).collect();
    if !a.force {
        let existing: Vec<String> = paths
            .iter()
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "{} already exist{}; not overwriting (give --force to replace them)",
                existing.join(", "),
                if existing.len() == 1 { "s" } else { "" }
            );
        }
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("grok-cluster development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, a.days);
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;

    let mut pems = vec![ca_cert.pem(), ca_key.serialize_pem()];
    for role in ["grok-coordinator", "grok-worker"] {
        let key = KeyPair::generate().with_context(|| format!("generating the {role} key"))?;
        let mut p = CertificateParams::new(sans.clone())
            .with_context(|| format!("the names of the {role} certificate"))?;
        p.distinguished_name = name(role);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, a.days);
        let cert = p
            .signed_by(&key, &ca_cert, &ca_key)
            .with_context(|| format!("signing the {role} certificate"))?;
        pems.push(cert.pem());
        pems.push(key.serialize_pem());
    }
    for ((path, pem), (_, _, secret)) in paths.iter().zip(&pems).zip(FILES) {
        write_file(path, pem.as_bytes(), secret, a.force)?;
    }
    Ok(paths)
}

/// `grokctl certs`: writes the files and prints what was written and the flags to use.
pub fn run(a: &CertsArgs) -> Result<()> {
    let paths = write(a)?;
    for (p, (_, what, secret)) in paths.iter().zip(FILES) {
        println!(
            "wrote {:<40} {what}{}",
            p.display(),
            if secret { " (mode 600)" } else { "" }
        );
    }
    let sans = sans(&a.hosts)?;
    println!(
        "\nThe certificates are valid for {} days and name: {}.",
        a.days,
        sans.join(", ")
    );
    let d = a.out.display();
    println!(
        "The CA key signs certificates: keep it off the cluster's hosts.\n\n\
         Use them with:\n  \
         grok-coordinator ... --tls-ca {d}/ca.pem --tls-cert {d}/coordinator.pem --tls-key {d}/coordinator.key\n  \
         grok-worker ...      --tls-ca {d}/ca.pem --tls-cert {d}/worker.pem --tls-key {d}/worker.key\n  \
         grokctl up ...       --tls-ca {d}/ca.pem --tls-cert {d}/coordinator.pem --tls-key {d}/coordinator.key\n  \
         grokctl status --endpoint https://HOST:PORT --tls-ca {d}/ca.pem\n\
         (or GROK_TLS_CA, GROK_TLS_CERT, GROK_TLS_KEY; or the [tls] section of a cluster config)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_always_cover_localhost_and_reject_junk() {
        let s = sans(&["10.0.0.2".into(), " Node1 ".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(s, ["127.0.0.1", "localhost", "10.0.0.2", "node1"]);
        assert!(sans(&["::1".into()]).unwrap().contains(&"::1".to_string()));
        let e = sans(&["bad host!".into()]).unwrap_err().to_string();
        assert!(e.contains("bad host!"), "{e}");
    }

    #[test]
    fn writes_keys_private_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("grok-certs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let a = CertsArgs {
            out: d.clone(),
            hosts: vec!["10.1.2.3".into()],
            days: 2,
            force: false,
        };
        let paths = write(&a).unwrap();
        assert_eq!(paths.len(), 6);
        for (p, (_, _, secret)) in paths.iter().zip(FILES) {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, if secret { 0o600 } else { 0o644 }, "{}", p.display());
        }
        let e = write(&a).unwrap_err().to_string();
        assert!(e.contains("--force") && e.contains("ca.pem"), "{e}");
        let before = std::fs::read(d.join("ca.pem")).unwrap();
        write(&CertsArgs { force: true, ..a }).unwrap();
        assert_ne!(before, std::fs::read(d.join("ca.pem")).unwrap());
        std::fs::remove_dir_all(&d).ok();
    }
}
