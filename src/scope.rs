//! The tenant a piece of work belongs to, as a scope rather than a
//! parameter: [`within`] runs a future inside a tenant, and everything it
//! awaits — every log line (through a `tenant` span), every metric
//! (through [`current`]) — carries the tenant without being told.
//!
//! Work outside any tenant (start-up, the lock, migrations) is reported
//! as `default`, the tenant of a configuration without `tenants.dir`.

use std::future::Future;
use std::sync::Arc;

use tracing::Instrument;

/// The name of the tenant of a configuration without tenant files.
pub const DEFAULT: &str = "default";

tokio::task_local! {
    static TENANT: Arc<str>;
}

/// Runs `work` inside `tenant`: its log lines carry `tenant`, and
/// [`current`] answers `tenant` wherever it is asked within it.
pub fn within<F: Future>(tenant: &str, work: F) -> impl Future<Output = F::Output> + use<F> {
    let span = tracing::info_span!("tenant", tenant = %tenant);
    TENANT.scope(Arc::from(tenant), work.instrument(span))
}

/// `work` inside the tenant of the caller: for a task spawned from a
/// tenant's work (a spawned task starts outside every scope).
pub fn carried<F: Future>(work: F) -> impl Future<Output = F::Output> + use<F> {
    within(&current(), work)
}

/// The tenant of the work asking (`default` outside any).
pub fn current() -> Arc<str> {
    TENANT
        .try_with(Arc::clone)
        .unwrap_or_else(|_| Arc::from(DEFAULT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_within_a_tenant_knows_it_and_work_outside_is_default() {
        let inside = within("acme", async { current() }).await;
        let nested = within("acme", within("beta", async { current() })).await;
        assert_eq!(&*inside, "acme");
        assert_eq!(&*nested, "beta");
        assert_eq!(&*current(), DEFAULT);
    }

    #[tokio::test]
    async fn a_task_spawned_with_its_scope_carried_stays_in_the_tenant() {
        let (lost, kept) = within("acme", async {
            let lost = tokio::spawn(async { current() });
            let kept = tokio::spawn(carried(async { current() }));
            (lost.await.unwrap(), kept.await.unwrap())
        })
        .await;
        assert_eq!((&*lost, &*kept), (DEFAULT, "acme"));
    }
}
