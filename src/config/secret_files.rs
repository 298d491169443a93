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

/// Reads the secret that `key` (e.g. `crm.token_file`) points at: the
/// file's first line, white space at either end trimmed (`echo secret >
/// file` adds a line ending; a credential file may end in a newline or
/// CR/LF).
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
    let secret = text.lines().next().unwrap_or_default().trim();
    if secret.is_empty() {
        return Err(invalid(format!("file {shown} is empty")));
    }
    Ok(SecretString::from(secret.to_string()))
}
