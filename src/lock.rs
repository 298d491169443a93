//! One active instance per state database.
//!
//! On PostgreSQL: a session advisory lock held on a dedicated connection
//! (not a pooled one, which could be recycled and silently drop the lock);
//! if that connection dies, the lock is gone and the holder must stop. On
//! SQLite: an exclusive lock on a file beside the database
//! (`state.db.lock`), released by the kernel when the process dies.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use sea_orm::sqlx::{self, Connection, PgConnection};
use secrecy::{ExposeSecret, SecretString};

/// The advisory-lock key: "crm-edm" in ASCII, so it is recognisable in
/// `pg_locks`.
pub const ADVISORY_KEY: i64 = 0x63_72_6d_2d_65_64_6d;

/// The advisory-lock key of the state at `url`: [`ADVISORY_KEY`] for the
/// `default` tenant (so an instance of an earlier release, which takes
/// that key, and this one exclude each other), and for another tenant a
/// key made from its schema's name.
pub fn advisory_key(url: &str) -> i64 {
    use sha2::Digest;
    match crate::state::tenant_schema(url) {
        None => ADVISORY_KEY,
        Some(schema) => {
            let digest = sha2::Sha256::digest(format!("crm-edm-sync tenant {schema}"));
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&digest[..8]);
            i64::from_be_bytes(bytes)
        }
    }
}

/// A held instance lock; dropping it releases it.
#[derive(Debug)]
pub enum InstanceLock {
    Postgres(Box<PgConnection>),
    File(std::fs::File, PathBuf),
    /// An in-memory SQLite database belongs to one process anyway.
    Unshared,
}

/// Where the lock of a database lives.
#[derive(Debug, Clone, PartialEq)]
pub enum LockTarget {
    Postgres(String),
    File(PathBuf),
    Unshared,
}

impl LockTarget {
    pub fn of(url: &SecretString) -> LockTarget {
        let url = url.expose_secret();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return LockTarget::Postgres(url.to_string());
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let path = path.split('?').next().unwrap_or(path);
        if path.is_empty() || path.contains(":memory:") {
            return LockTarget::Unshared;
        }
        LockTarget::File(PathBuf::from(format!("{path}.lock")))
    }

    /// Tries once; `Ok(None)` when another instance holds it.
    pub async fn try_acquire(&self) -> anyhow::Result<Option<InstanceLock>> {
        match self {
            LockTarget::Unshared => Ok(Some(InstanceLock::Unshared)),
            LockTarget::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(path)
                    .with_context(|| format!("cannot open the lock file {}", path.display()))?;
                match file.try_lock() {
                    Ok(()) => Ok(Some(InstanceLock::File(file, path.clone()))),
                    Err(std::fs::TryLockError::WouldBlock) => Ok(None),
                    Err(std::fs::TryLockError::Error(e)) => {
                        Err(e).with_context(|| format!("cannot lock {}", path.display()))
                    }
                }
            }
            LockTarget::Postgres(url) => {
                let mut conn = PgConnection::connect(url).await.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open the lock connection to PostgreSQL: {}",
                        crate::state::redact_db_error(&e.to_string(), url)
                    )
                })?;
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(advisory_key(url))
                    .fetch_one(&mut conn)
                    .await
                    .context("cannot take the advisory lock")?;
                Ok(got.then(|| InstanceLock::Postgres(Box::new(conn))))
            }
        }
    }

    /// Waits up to `bound` for the lock, trying every `poll`.
    pub async fn acquire_within(
        &self,
        bound: Duration,
        poll: Duration,
    ) -> anyhow::Result<InstanceLock> {
        let deadline = tokio::time::Instant::now() + bound;
        let mut said = false;
        loop {
            if let Some(lock) = self.try_acquire().await? {
                return Ok(lock);
            }
            if !said {
                tracing::info!(
                    wait_secs = bound.as_secs(),
                    "another instance holds the state database; waiting"
                );
                said = true;
            }
            if tokio::time::Instant::now() + poll > deadline {
                anyhow::bail!(
                    "another crm-edm-sync instance holds the state database (waited {} s, daemon.lock_wait_secs); stop it or try again later",
                    bound.as_secs()
                );
            }
            tokio::time::sleep(poll).await;
        }
    }
}

impl InstanceLock {
    /// Whether the lock is still held: a PostgreSQL lock dies with its
    /// connection; a lock file is lost when the file at its path is no
    /// longer the one this process locked (removed or replaced, so that
    /// another instance could lock a new file there).
    pub async fn still_held(&mut self) -> bool {
        match self {
            InstanceLock::Postgres(conn) => conn.ping().await.is_ok(),
            InstanceLock::File(file, path) => {
                use std::os::unix::fs::MetadataExt;
                match (std::fs::metadata(&*path), file.metadata()) {
                    (Ok(at_path), Ok(ours)) => {
                        at_path.ino() == ours.ino() && at_path.dev() == ours.dev()
                    }
                    _ => false,
                }
            }
            InstanceLock::Unshared => true,
        }
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        if let InstanceLock::File(file, _) = self {
            let _ = file.unlock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_target_follows_the_database_url() {
        let t = |u: &str| LockTarget::of(&SecretString::from(u.to_string()));
        assert_eq!(
            t("sqlite://state.db?mode=rwc"),
            LockTarget::File("state.db.lock".into())
        );
        assert_eq!(
            t("sqlite:///var/lib/x/state.db?mode=rwc"),
            LockTarget::File("/var/lib/x/state.db.lock".into())
        );
        assert_eq!(t("sqlite::memory:"), LockTarget::Unshared);
        assert!(matches!(t("postgres://u:p@h/db"), LockTarget::Postgres(_)));
    }

    #[tokio::test]
    async fn a_file_lock_is_exclusive_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::File(dir.path().join("state.db.lock"));
        let first = target.try_acquire().await.unwrap();
        assert!(first.is_some());
        assert!(target.try_acquire().await.unwrap().is_none());
        let err = target
            .acquire_within(Duration::from_millis(300), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("another crm-edm-sync instance"),
            "{err}"
        );
        drop(first);
        assert!(target.try_acquire().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_lock_file_removed_or_replaced_is_no_longer_held() {
        // Arrange: a held lock file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db.lock");
        let target = LockTarget::File(path.clone());
        let mut held = target.try_acquire().await.unwrap().unwrap();
        assert!(held.still_held().await);

        // Act: someone removes it, and another instance locks a new file
        // at the same path.
        std::fs::remove_file(&path).unwrap();
        let usurper = target.try_acquire().await.unwrap();

        // Assert
        assert!(usurper.is_some(), "the new file can be locked");
        assert!(!held.still_held().await);
    }
}
