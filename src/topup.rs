//! A tenant's EDM sending service, read through the reseller API when a
//! reseller account is configured (`[reseller]`; `customer` = the tenant's
//! `edm.username`), else through the tenant's own account; and the
//! optional top-up (`reseller.top_up_*`).
//!
//! A top-up is due when the tenant's `qty_available` is below
//! `top_up_below`, fewer than `top_up_max_per_day` were asked that
//! calendar day (in `edm.timezone`) and none of them was refused
//! `understock`. Each is recorded before it is asked — a fenced write, so
//! an instance that lost the tenant asks none — and sent once (`add-count`
//! is not idempotent: a lost answer still counts towards the day, and is
//! not sent again). An `understock` answer (the reseller's own pool is
//! empty) is an ERROR naming the reseller account, and nothing is asked
//! again that day.

use crate::edm::{EdmClient, ServiceInfo};
use crate::jobs::Context;
use crate::state::TopUpOutcome;

/// A top-up the rules call for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedTopUp {
    pub count: u64,
    pub qty_available: i64,
}

impl PlannedTopUp {
    /// The `--dry-run --plan` line.
    pub fn json_line(&self, tenant: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": "top_up",
            "tenant": tenant,
            "count": self.count,
            "qty_available": self.qty_available,
        })
    }
}

/// The reseller client of `ctx`'s tenant; `None` without a reseller
/// account.
pub fn reseller(ctx: &Context) -> anyhow::Result<Option<EdmClient>> {
    let Some(settings) = ctx.settings.reseller_edm() else {
        return Ok(None);
    };
    let client = EdmClient::new(&settings, ctx.redactor.clone())?
        .with_user_agent(&ctx.instance.user_agent())
        .with_shutdown(ctx.shutdown.clone());
    Ok(Some(client))
}

/// The tenant's sending service: through the reseller API when there is a
/// reseller account, else its own.
pub async fn service(ctx: &Context) -> anyhow::Result<ServiceInfo> {
    Ok(match reseller(ctx)? {
        Some(reseller) => {
            reseller
                .customer_service_info(&ctx.settings.edm.username)
                .await?
        }
        None => ctx.edm.service_info().await?,
    })
}

/// The calendar day of now in `edm.timezone`, as the top-ups count it.
fn today(ctx: &Context) -> String {
    ctx.now()
        .with_timezone(&ctx.settings.edm_zone())
        .date_naive()
        .to_string()
}

/// The top-up `service` calls for now, if any (see the module).
pub async fn due(ctx: &Context, service: &ServiceInfo) -> anyhow::Result<Option<PlannedTopUp>> {
    let Some(rule) = ctx.settings.reseller.top_up() else {
        return Ok(None);
    };
    let Some(qty) = service.quota_left else {
        return Ok(None);
    };
    if qty >= i64::try_from(rule.below).unwrap_or(i64::MAX) {
        return Ok(None);
    }
    let day = ctx.store.top_ups_on(&today(ctx)).await?;
    if day.understock || day.asked >= rule.max_per_day {
        return Ok(None);
    }
    Ok(Some(PlannedTopUp {
        count: rule.count,
        qty_available: qty,
    }))
}

/// The top-up a dry run would plan now (reading the service, writing
/// nothing).
pub async fn planned(ctx: &Context) -> anyhow::Result<Option<PlannedTopUp>> {
    if ctx.settings.reseller.top_up().is_none() {
        return Ok(None);
    }
    let service = service(ctx).await?;
    due(ctx, &service).await
}

/// Reads the service into the tenant's gauges and, when `holds` (this
/// instance holds the tenant), asks the top-up that is due. Failures are
/// logged here.
pub async fn refresh(ctx: &Context, holds: bool) {
    let service = match service(ctx).await {
        Ok(s) => s,
        Err(e) => {
            let e = ctx.redactor.redact(&format!("{e:#}"));
            tracing::warn!(error = %e, "cannot read EDM's service-info");
            return;
        }
    };
    crate::metrics::edm_service(
        service.enabled,
        service
            .expires
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp()),
        service.quota_left,
    );
    if !holds {
        return;
    }
    match due(ctx, &service).await {
        Ok(Some(planned)) => top_up(ctx, planned).await,
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot read the day's top-ups"),
    }
}

/// Asks the reseller API for `planned`, recorded first.
async fn top_up(ctx: &Context, planned: PlannedTopUp) {
    let reseller_account = ctx.settings.reseller.username.clone().unwrap_or_default();
    let Ok(Some(client)) = reseller(ctx) else {
        return;
    };
    let id = match ctx.store.record_top_up(&today(ctx), planned.count).await {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot record the top-up: none is asked");
            return;
        }
    };
    let remark = format!(
        "crm-edm-sync {} top-up for tenant {}: {} sends left, below {}",
        ctx.instance.id,
        ctx.settings.tenant,
        planned.qty_available,
        ctx.settings.reseller.top_up_below.unwrap_or_default()
    );
    tracing::warn!(
        count = planned.count,
        qty_available = planned.qty_available,
        customer = %ctx.settings.edm.username,
        reseller = %reseller_account,
        "topping up the tenant's EDM sends through the reseller account"
    );
    let asked = client
        .add_count(&ctx.settings.edm.username, planned.count, &remark)
        .await;
    let (outcome, detail) = match &asked {
        Ok(()) => (TopUpOutcome::Added, None),
        Err(e) if matches!(&e.kind, crate::remote::ErrorKind::Rejected { code, .. } if code == "understock") =>
        {
            tracing::error!(
                reseller = %reseller_account,
                "the reseller account {reseller_account} has no sends left to give (understock): no other top-up of this tenant today"
            );
            (TopUpOutcome::Understock, Some(e.to_string()))
        }
        Err(e) => {
            let e = ctx.redactor.redact(&e.to_string());
            tracing::error!(error = %e, "the top-up failed; it counts towards today's top_up_max_per_day");
            (TopUpOutcome::Failed, Some(e))
        }
    };
    crate::metrics::top_up(outcome.as_str());
    if let Err(e) = ctx.store.finish_top_up(id, outcome, detail).await {
        tracing::warn!(error = %format!("{e:#}"), "cannot record the top-up's outcome");
    }
}
