//! Tollgate's own certificate authority for HTTPS_PROXY mode.
//!
//! `tollgate ca init` creates it ([`init`]); the forward proxy loads it ([`Ca::load`]) and, for
//! each intercepted host, mints a leaf certificate signed by it on first use and caches the
//! TLS server configuration ([`Ca::server_config`]). Every leaf shares one key generated at
//! start (minting is then one signature), but has its own random serial number.
//!
//! The CA key is read once, kept in memory, never logged, printed or written anywhere but the
//! 0600 file `init` creates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

/// File names `init` writes in its directory.
pub const CERT_FILE: &str = "ca.pem";
pub const KEY_FILE: &str = "ca-key.pem";

/// Minted configurations kept at most (intercepted hosts come from the config, so this is a
/// guard, not a working limit).
const MAX_CACHED: usize = 1024;
/// A leaf is valid this long and minted again after [`REMINT_AFTER`].
const LEAF_DAYS: i64 = 90;
const REMINT_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// A loaded CA and the leaf configurations minted from it.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    leaf_key: KeyPair,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cache: Mutex<HashMap<String, (Instant, Arc<ServerConfig>)>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA certificate and key (PEM). Errors name the file, never its contents.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Ca> {
        let cert_pem = std::fs::read_to_string(cert)
            .with_context(|| format!("reading forward_proxy.ca_cert {}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key)
            .with_context(|| format!("reading forward_proxy.ca_key {}", key.display()))?;
        warn_if_readable_by_others(key);
        let signing_key = KeyPair::from_pem(&key_pem).map_err(|_| {
            anyhow::anyhow!("forward_proxy.ca_key {}: not a PEM private key", key.display())
        })?;
        drop(key_pem);
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, signing_key).map_err(|e| {
            anyhow::anyhow!("forward_proxy.ca_cert {}: not a CA certificate ({e})", cert.display())
        })?;
        Ca::from_issuer(issuer)
    }

    fn from_issuer(issuer: Issuer<'static, KeyPair>) -> anyhow::Result<Ca> {
        Ok(Ca {
            issuer,
            leaf_key: KeyPair::generate().context("generating the leaf key")?,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The TLS configuration to terminate a client's connection to `host` (ALPN h2 and
    /// http/1.1), minted on first use and cached.
    pub fn server_config(&self, host: &str) -> anyhow::Result<Arc<ServerConfig>> {
        let host = host.to_ascii_lowercase();
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((minted, config)) = cache.get(&host) {
                if minted.elapsed() < REMINT_AFTER {
                    return Ok(config.clone());
                }
            }
        }
        // Minted outside the lock: two connections racing for a new host both mint (cheap),
        // and the second one's result replaces the first.
        let config = Arc::new(self.mint(&host)?);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(host, (Instant::now(), config.clone()));
        Ok(config)
    }

    /// How many hosts have a minted certificate.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn mint(&self, host: &str) -> anyhow::Result<ServerConfig> {
        let mut params = CertificateParams::default();
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        params.subject_alt_names = vec![match literal.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().context("host name for a certificate")?),
        }];
        params.distinguished_name.push(DnType::CommonName, host);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // Strict verifiers (OpenSSL's X509_STRICT, Python 3.13's default) want the AKI.
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(self.serial()?);
        let today = crate::clock::now().date().to_days();
        validity(&mut params, today - 1, today + LEAF_DAYS);
        let cert = params.signed_by(&self.leaf_key, &self.issuer).context("signing a leaf")?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .context("leaf certificate")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    fn serial(&self) -> anyhow::Result<SerialNumber> {
        let mut bytes = [0u8; 16];
        self.provider
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("no randomness for a serial number"))?;
        bytes[0] &= 0x7f; // positive
        Ok(SerialNumber::from_slice(&bytes))
    }
}

/// Sets a certificate's validity: UTC midnights `from` and `to` days after 1970-01-01.
fn validity(params: &mut CertificateParams, from: i64, to: i64) {
    let ymd = |days| {
        let d = tollgate_core::time::Date::from_days(days);
        rcgen::date_time_ymd(d.year, d.month as u8, d.day as u8)
    };
    params.not_before = ymd(from);
    params.not_after = ymd(to);
}

#[cfg(unix)]
fn warn_if_readable_by_others(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %key.display(),
                mode = format!("{mode:o}"),
                "the CA key is readable by other users; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_key: &Path) {}

/// Creates a new CA in `dir` (`ca.pem`, and `ca-key.pem` with mode 0600); refuses to replace
/// an existing one unless `force`. Returns the two paths.
pub fn init(dir: &Path, force: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if !force {
        for path in [&cert_path, &key_path] {
            if path.exists() {
                bail!("{} already exists; use --force to replace the CA", path.display());
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "Tollgate forward-proxy CA");
    params.distinguished_name.push(DnType::OrganizationName, "Tollgate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let today = crate::clock::now().date().to_days();
    validity(&mut params, today - 1, today + 10 * 365);
    let cert = params.self_signed(&key).context("signing the CA certificate")?;
    // The key first, created 0600 before a byte is written; the certificate only once the key
    // is safely on disk.
    write_secret(&key_path, key.serialize_pem().as_bytes(), force)?;
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

#[cfg(unix)]
fn write_secret(path: &Path, bytes: &[u8], replace: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if replace {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The umask can only remove bits; make the mode exact anyway.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

#[cfg(not(unix))]
fn write_secret(path: &Path, bytes: &[u8], _replace: bool) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// What `tollgate ca init` prints after creating the CA.
pub fn instructions(cert: &Path, key: &Path) -> String {
    let (cert, key) = (cert.display(), key.display());
    format!(
        "Created the Tollgate CA.\n\
         \x20 certificate: {cert}   (public: give it to clients)\n\
         \x20 private key: {key}   (mode 0600: keep it secret, never share it)\n\
         \n\
         Enable HTTPS_PROXY mode in the config:\n\
         \x20 forward_proxy: {{enabled: true, ca_cert: {cert}, ca_key: {key}}}\n\
         \n\
         Make clients trust the CA and use the proxy:\n\
         \x20 export HTTPS_PROXY=http://127.0.0.1:8080 HTTP_PROXY=http://127.0.0.1:8080\n\
         \x20 # Python (openai, anthropic, httpx, requests): SSL_CERT_FILE / REQUESTS_CA_BUNDLE\n\
         \x20 # replace the trusted roots, so give them the system bundle plus this CA:\n\
         \x20 cat /etc/ssl/certs/ca-certificates.crt {cert} > tollgate-bundle.pem\n\
         \x20 export SSL_CERT_FILE=$PWD/tollgate-bundle.pem REQUESTS_CA_BUNDLE=$PWD/tollgate-bundle.pem\n\
         \x20 # Node.js adds to its roots:\n\
         \x20 export NODE_EXTRA_CA_CERTS={cert}\n\
         \x20 # curl:  curl --proxy http://127.0.0.1:8080 --cacert {cert} https://api.openai.com/...\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_private_key_and_refuses_to_overwrite() {
        let dir = std::env::temp_dir().join(format!("tollgate-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cert, key) = init(&dir, false).expect("init");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let first = std::fs::read(&key).unwrap();
        let err = init(&dir, false).expect_err("an existing CA is kept");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read(&key).unwrap(), first, "untouched");
        init(&dir, true).expect("forced");
        assert_ne!(std::fs::read(&key).unwrap(), first, "replaced");

        let ca = Ca::load(&cert, &key).expect("load");
        let a = ca.server_config("api.openai.com").unwrap();
        let b = ca.server_config("API.openai.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "cached per host, case-insensitively");
        ca.server_config("127.0.0.1").unwrap();
        ca.server_config("[::1]").unwrap();
        assert_eq!(ca.cached(), 3);
        assert!(!format!("{ca:?}").contains("PRIVATE"), "the key is never printed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_that_is_not_pem_is_named_without_its_contents() {
        let dir = std::env::temp_dir().join(format!("tollgate-ca-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cert, key) = init(&dir, false).expect("init");
        std::fs::write(&key, "secret-material-not-a-key").unwrap();
        let err = Ca::load(&cert, &key).expect_err("bad key").to_string();
        assert!(err.contains("ca_key") && !err.contains("secret-material"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
