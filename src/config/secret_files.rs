//! Secrets read from files (`crm.token_file`, `edm.password_file`): a
//! systemd credential (`LoadCredential=`, read from
//! `$CREDENTIALS_DIRECTORY`) or a mounted container secret, instead of the
//! config file or an environment variable (which `/proc/PID/environ`,
//! `systemctl show` and `podman inspect` reveal).
//!
//! The file is read when the settings are loaded: at start and on each
//! reload (SIGHUP). Errors name the key and the file, never the content.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use secrecy::SecretString;

use super::ConfigError;

/// Reads the secret that `key` (e.g. `crm.token_file`) points at. One
/// line ending at the end is dropped (`echo secret > file` writes one);
/// anything else is the secret as written.
pub(super) fn read(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let shown = path.display();
    let invalid = |reason: String| ConfigError::Invalid {
        key: key.to_string(),
        reason,
    };
    let io = |e: std::io::Error| {
        invalid(match e.kind() {
            ErrorKind::NotFound => format!("file {shown} does not exist"),
            ErrorKind::PermissionDenied => format!("file {shown}: permission denied"),
            ErrorKind::IsADirectory => format!("{shown} is a directory, not a file"),
            kind => format!("cannot read file {shown}: {kind}"),
        })
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return Err(invalid(format!("{shown} is a directory, not a file")));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o044 != 0 {
        return Err(invalid(format!(
            "file {shown} is readable by its group or by others (mode {mode:04o}); make it readable by the daemon's user alone: chmod 600 {shown}"
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let text =
        String::from_utf8(bytes).map_err(|_| invalid(format!("file {shown} is not UTF-8 text")))?;
    let secret = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if secret.trim().is_empty() {
        return Err(invalid(format!("file {shown} is empty")));
    }
    Ok(SecretString::from(secret.to_string()))
}
