//! TLS trust for `https://` servers: the `ca_file` bundle and the reqwest client builder that trusts it.

use std::path::{Path, PathBuf};

use super::error_chain;

/// The most bytes a `ca_file` may hold (a distribution's whole bundle is about 200 KiB).
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The `ca_file` config key: a PEM bundle of CA certificates trusted for `https://` servers
/// in addition to the webpki roots (an internal CA). Deserialized from its path alone;
/// [`CaFile::load`] reads it, so parsing a config touches no other file.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(from = "PathBuf")]
pub struct CaFile {
    path: PathBuf,
    /// The DER of each certificate once read (never empty then); empty before.
    pub(super) certificates: Vec<Vec<u8>>,
}

impl From<PathBuf> for CaFile {
    fn from(path: PathBuf) -> Self {
        Self { path, certificates: Vec::new() }
    }
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFile").field("path", &self.path).field("certificates", &self.certificates.len()).finish()
    }
}

impl CaFile {
    /// The bundle's path, as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and check the bundle: a regular file holding one or more PEM certificates that
    /// rustls can use as trust anchors. The error names the file and what was expected. A
    /// FIFO or device is refused at once; a file on a hung filesystem can still block.
    pub fn load(&mut self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("the path is empty: give a PEM bundle's path, or remove the key".to_owned());
        }
        self.certificates = read_ca_bundle(&self.path).map_err(|why| format!("{}: {why}", self.path.display()))?;
        Ok(())
    }

    /// The certificates for reqwest, reading the file first when [`CaFile::load`] has not.
    fn reqwest_certificates(&self) -> Result<Vec<reqwest::Certificate>, String> {
        let mut loaded = std::borrow::Cow::Borrowed(self);
        if self.certificates.is_empty() {
            loaded.to_mut().load()?;
        }
        loaded
            .certificates
            .iter()
            .map(|der| {
                reqwest::Certificate::from_der(der).map_err(|e| format!("{}: {}", self.path.display(), error_chain(&e)))
            })
            .collect()
    }
}

/// The DER of each certificate in the PEM bundle at `path`, each checked as a trust anchor.
fn read_ca_bundle(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let (bytes, _) = crate::secure_file::read(path, MAX_CA_FILE_BYTES).map_err(|e| e.to_string())?;
    let mut certificates = Vec::new();
    for (n, item) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
        let n = n + 1;
        let der = item.map_err(|e| format!("certificate {n} is not valid PEM: {e}"))?;
        rustls::RootCertStore::empty()
            .add(der.clone())
            .map_err(|e| format!("certificate {n} is not an X.509 certificate usable as a CA: {e}"))?;
        certificates.push(der.to_vec());
    }
    if certificates.is_empty() {
        return Err("holds no certificate: expected a PEM bundle of one or more \
                    -----BEGIN CERTIFICATE----- blocks"
            .to_owned());
    }
    Ok(certificates)
}

/// A reqwest client builder for the dcmon server: rustls with the webpki roots and, with
/// `ca`, its certificates too. Every client that talks to the server starts here.
pub fn client_builder(ca: Option<&CaFile>) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut builder = reqwest::Client::builder();
    for certificate in ca.map(CaFile::reqwest_certificates).transpose().map_err(anyhow::Error::msg)?.unwrap_or_default()
    {
        builder = builder.add_root_certificate(certificate);
    }
    Ok(builder)
}

/// The reason for an unreachable server, with a hint when its certificate was not trusted.
pub(crate) fn with_tls_hint(reason: String) -> String {
    if reason.contains("invalid peer certificate") {
        format!("{reason} (the server's certificate is not signed by a trusted CA: for an internal CA, set ca_file)")
    } else {
        reason
    }
}
