//! The secrets of a remote_write output: a bearer token or a basic-auth password, each read
//! from its file (a regular file, size-capped, mode 0600 expected), held in types whose `Debug`
//! shows no secret, and turned into a sensitive `Authorization` header once.
//!
//! No error or warning here ever holds a file's contents.

use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use base64::Engine as _;
use reqwest::header::HeaderValue;

use super::RemoteWriteConfig;
use super::client::RemoteWriteSetupError;

/// The most bytes a token or password file may hold. A JWT from a cloud identity is a few
/// KiB; the secret goes in a header with every request.
pub const MAX_SECRET_FILE_BYTES: u64 = 16 * 1024;

/// A secret read from a file. `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How requests are authenticated. `Debug` shows the user name, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// `Authorization: Basic base64(username:password)`.
    Basic {
        /// Not a secret.
        username: String,
        /// The password.
        password: Secret,
    },
}

impl Credentials {
    /// Read the credentials `config` names, if any. Returns them with the warnings to log
    /// (a file readable by group or others). The error names the output and the field.
    pub fn load(config: &RemoteWriteConfig) -> Result<(Option<Self>, Vec<String>), RemoteWriteSetupError> {
        let mut warnings = Vec::new();
        let output = config.output_name();
        let setup_error =
            |field: &'static str, reason: String| RemoteWriteSetupError { output: output.clone(), field, reason };
        if let Some(path) = &config.bearer_token_file {
            let field = "bearer_token_file";
            let (bytes, warning) = read_secret(path).map_err(|why| setup_error(field, why))?;
            warnings.extend(warning.map(|w| format!("remote_write output {output:?}: {field} {w}")));
            let token = bytes.trim_ascii();
            if token.is_empty() {
                return Err(setup_error(field, format!("{} is empty", path.display())));
            }
            if !token.iter().all(u8::is_ascii_graphic) {
                return Err(setup_error(
                    field,
                    format!("{} must hold one token of printable ASCII without spaces", path.display()),
                ));
            }
            let token = String::from_utf8_lossy(token).into_owned();
            return Ok((Some(Credentials::Bearer(Secret(token))), warnings));
        }
        if let Some(auth) = &config.basic_auth {
            let field = "basic_auth.password_file";
            let path = &auth.password_file;
            let (bytes, warning) = read_secret(path).map_err(|why| setup_error(field, why))?;
            warnings.extend(warning.map(|w| format!("remote_write output {output:?}: {field} {w}")));
            // The newline an editor or `echo` adds is not part of the password; anything else is.
            let password = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            let password = password.strip_suffix(b"\r").unwrap_or(password);
            if password.is_empty() {
                return Err(setup_error(field, format!("{} is empty", path.display())));
            }
            let Ok(password) = std::str::from_utf8(password) else {
                return Err(setup_error(field, format!("{} is not UTF-8 text", path.display())));
            };
            if password.chars().any(char::is_control) {
                return Err(setup_error(field, format!("{} holds control characters", path.display())));
            }
            let credentials =
                Credentials::Basic { username: auth.username.clone(), password: Secret(password.to_owned()) };
            return Ok((Some(credentials), warnings));
        }
        Ok((None, warnings))
    }

    /// The `Authorization` header, marked sensitive (hyper and reqwest never print it).
    pub fn header(&self) -> Result<HeaderValue, String> {
        let text = match self {
            Credentials::Bearer(token) => format!("Bearer {}", token.0),
            Credentials::Basic { username, password } => {
                let pair = format!("{username}:{}", password.0);
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
            }
        };
        let mut value = HeaderValue::try_from(text)
            .map_err(|_| "the credentials hold characters an HTTP header cannot carry".to_owned())?;
        value.set_sensitive(true);
        Ok(value)
    }
}

/// The file's bytes and, when group or others may read it, the warning's text (path, mode,
/// the fix). The error names the path and why, never the contents.
fn read_secret(path: &Path) -> Result<(Vec<u8>, Option<String>), String> {
    let (bytes, metadata) = crate::secure_file::read(path, MAX_SECRET_FILE_BYTES).map_err(|e| {
        if e.is_not_found() { format!("{} does not exist", path.display()) } else { format!("{}: {e}", path.display()) }
    })?;
    let mode = metadata.permissions().mode();
    let warning = (mode & 0o077 != 0).then(|| {
        format!(
            "{} has mode {:04o}, readable by group or others; run: sudo chmod 600 {}",
            path.display(),
            mode & 0o7777,
            path.display()
        )
    });
    Ok((bytes, warning))
}
