//! The jobs layer: what both jobs share — the [`Context`] (settings, both
//! clients, the store, the redactor, the shutdown token), the one run
//! lifecycle ([`lifecycle`]), and the reading of the lists'
//! `unsubscribe-export` ([`exports`]). The contacts job (`sync`) and the
//! write-back job (`writeback`) sit on top of it.

pub mod exports;
pub mod lifecycle;
pub mod observe;

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::config::Settings;
use crate::crm::CrmClient;
use crate::edm::{EdmClient, password_md5};
use crate::redact::Redactor;
use crate::state::Store;

/// What a job needs: settings, both clients, the store.
#[derive(Clone, Debug)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub crm: CrmClient,
    pub edm: EdmClient,
    pub store: Store,
    pub redactor: Arc<Redactor>,
    /// Cancelled when the process is asked to stop: a job finishes its
    /// current batch, records its state and returns.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Every secret the settings hold, for the redactor: the token, the EDM
/// password and its MD5, and the database password.
pub fn secrets_of(settings: &Settings) -> Vec<String> {
    let password = settings.edm.password.expose_secret().to_string();
    let mut secrets = vec![
        settings.crm.token.expose_secret().to_string(),
        password_md5(&password),
        password,
    ];
    if let Ok(url) = url::Url::parse(settings.database.url.expose_secret())
        && let Some(p) = url.password()
    {
        secrets.push(p.to_string());
    }
    secrets
}

impl Context {
    /// Builds the clients and opens (and migrates) the state database.
    pub async fn new(settings: Settings) -> anyhow::Result<Context> {
        let store = Store::connect(&settings.database.url).await?;
        Context::with_store(settings, store)
    }

    /// For `--dry-run`: the same clients, and the state database opened
    /// read-only — nothing is created, migrated or written. A database
    /// that does not exist yet reads as empty (an in-memory one), as a
    /// first run would see it.
    pub async fn new_read_only(settings: Settings) -> anyhow::Result<Context> {
        let store = match Store::open_read_only(&settings.database.url).await? {
            Some(store) => store,
            None => {
                tracing::info!("no state database yet: the dry run plans as a first run would");
                Store::empty_in_memory().await?
            }
        };
        Context::with_store(settings, store)
    }

    /// Both clients built from `settings`, around `store`.
    fn with_store(settings: Settings, store: Store) -> anyhow::Result<Context> {
        let redactor = Arc::new(Redactor::new(secrets_of(&settings)));
        let crm = CrmClient::new(&settings.crm, redactor.clone())?;
        let edm = EdmClient::new(&settings.edm, redactor.clone())?;
        Ok(Context {
            settings: Arc::new(settings),
            crm,
            edm,
            store,
            redactor,
            shutdown: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// The same context stopping on `token`.
    pub fn with_shutdown(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// Shortens the first retry delay of both clients (tests and the demo
    /// use this so that fault scenarios finish quickly).
    pub fn with_min_retry_delay(mut self, delay: Duration) -> Self {
        self.crm = self.crm.with_min_retry_delay(delay);
        self.edm = self.edm.with_min_retry_delay(delay);
        self
    }
}

/// Before a job records its run: runs an earlier process left `running`
/// are marked `abandoned`, each with a warning, so `status` does not show
/// them running for ever.
pub async fn abandon_unfinished_runs(ctx: &Context) -> anyhow::Result<()> {
    for (run_id, job) in ctx.store.abandon_running_runs().await? {
        tracing::warn!(
            run_id = %run_id,
            abandoned_job = %job,
            "a run an earlier process did not finish (killed or crashed) is marked abandoned"
        );
        crate::metrics::run_abandoned();
    }
    Ok(())
}

/// Pending work after a run: EDM operations and contact-history records.
pub async fn refresh_pending(store: &Store) {
    if let Ok((edm, _)) = store.pending_summary(0).await {
        metrics::gauge!(crate::metrics::metric::PENDING, "kind" => "edm").set(edm as f64);
    }
    if let Ok(counts) = store.ledger_counts().await {
        let pending: u64 = counts
            .iter()
            .filter(|(_, s, _)| *s == crate::states::LedgerStatus::Pending)
            .map(|(_, _, n)| n)
            .sum();
        metrics::gauge!(crate::metrics::metric::PENDING, "kind" => "contact_history")
            .set(pending as f64);
    }
}

/// Flags of a contacts run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Compute and print the plan; change nothing.
    pub dry_run: bool,
    /// Apply even past the unsubscribe safety ratio.
    pub force: bool,
    /// Re-read the EDM lists and repair any drift.
    pub full: bool,
}
