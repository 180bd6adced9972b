//! Prometheus metrics (`/metrics` on the admin endpoint), in the OpenMetrics text format.
//!
//! Families (all prefixed `ims_`):
//! - `reconciles_total{controller}` and `reconcile_errors_total{controller,reason}` (reason: the
//!   error class — `kube`, `transient`, `protected`, `finalizer`);
//! - `reconcile_duration_seconds{controller}` (histogram);
//! - `images{phase}`: Images by phase, from the cache at scrape time;
//! - `bytes_moved_total{kind}`: bytes imported (`import`) and copied (`copy`) into stores;
//! - `quota_used_images`, `quota_hard_images`, `quota_used_bytes` `{namespace,region}`: the
//!   quota ledgers as last written;
//! - `queue_depth{queue}`: work waiting — `quota` (Images Queued for quota, a slot or a region),
//!   `copies` (ImageCopies Pending) — and `reconciles_in_flight{controller}`;
//! - `marketplace_references{image_namespace,image,tenant,publisher,product,plan}`: the usable
//!   references of each tenant to each Marketplace image, from the cache at scrape time, for
//!   billing (docs/OPERATIONS.md, "Metering Marketplace images"). Only the leader reports it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64},
    },
    time::Instant,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// `controller` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// Which controller.
    pub controller: String,
}

/// `controller`, `reason` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Which controller.
    pub controller: String,
    /// The error class.
    pub reason: String,
}

/// `phase` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Image phase.
    pub phase: String,
}

/// `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `import` or `copy`.
    pub kind: String,
}

/// `queue` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// Which queue.
    pub queue: String,
}

/// `namespace`, `region` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    /// Tenant.
    pub namespace: String,
    /// Region.
    pub region: String,
}

/// The labels of `marketplace_references`: one Marketplace image, one tenant using it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct MarketplaceLabels {
    /// Namespace of the Marketplace image: the publisher's tenant. (Not `namespace`, which
    /// Prometheus' Kubernetes discovery gives the operator's own pod.)
    pub image_namespace: String,
    /// Name of the Marketplace image.
    pub image: String,
    /// Namespace of the references.
    pub tenant: String,
    /// `spec.marketplace.publisher`.
    pub publisher: String,
    /// `spec.marketplace.productCode`.
    pub product: String,
    /// `Free` or `Paid`.
    pub plan: String,
}

impl From<&crate::policy::marketplace::Usage> for MarketplaceLabels {
    fn from(u: &crate::policy::marketplace::Usage) -> Self {
        MarketplaceLabels {
            image_namespace: u.image_namespace.clone(),
            image: u.image.clone(),
            tenant: u.tenant.clone(),
            publisher: u.publisher.clone(),
            product: u.product.clone(),
            plan: u.plan.as_str().to_string(),
        }
    }
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<ControllerLabel, Histogram>,
    in_flight: Family<ControllerLabel, Gauge>,
    /// Images by phase (set at scrape time).
    pub images: Family<PhaseLabel, Gauge>,
    bytes: Family<KindLabel, Counter<u64, AtomicU64>>,
    quota_used_images: Family<QuotaLabels, Gauge<i64, AtomicI64>>,
    quota_hard_images: Family<QuotaLabels, Gauge<i64, AtomicI64>>,
    quota_used_bytes: Family<QuotaLabels, Gauge<i64, AtomicI64>>,
    /// Work waiting (set at scrape time).
    pub queue_depth: Family<QueueLabel, Gauge>,
    marketplace_references: Family<MarketplaceLabels, Gauge>,
    /// The series of `marketplace_references` last set (a series with no references goes).
    marketplace_series: Mutex<BTreeSet<MarketplaceLabels>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ims");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        registry.register("reconciles", "Reconciles run, per controller", reconciles.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("reconcile_errors", "Reconciles that failed, per controller and error class", errors.clone());
        let durations = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0])
        });
        registry.register("reconcile_duration_seconds", "Reconcile durations, per controller", durations.clone());
        let in_flight = Family::<ControllerLabel, Gauge>::default();
        registry.register("reconciles_in_flight", "Reconciles running now, per controller", in_flight.clone());
        let images = Family::<PhaseLabel, Gauge>::default();
        registry.register("images", "Images by phase", images.clone());
        let bytes = Family::<KindLabel, Counter<u64, AtomicU64>>::default();
        registry.register("bytes_moved", "Bytes stored by imports (kind=import) and copies (kind=copy)", bytes.clone());
        let quota_used_images = Family::default();
        registry.register("quota_used_images", "Owned images reserved in the quota ledger", quota_used_images.clone());
        let quota_hard_images = Family::default();
        registry.register("quota_hard_images", "privateImagesPerRegion in force", quota_hard_images.clone());
        let quota_used_bytes = Family::default();
        registry.register("quota_used_bytes", "Bytes of owned images in the quota ledger", quota_used_bytes.clone());
        let queue_depth = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "queue_depth",
            "Work waiting: quota (Images Queued), copies (ImageCopies Pending)",
            queue_depth.clone(),
        );
        let marketplace_references = Family::<MarketplaceLabels, Gauge>::default();
        registry.register(
            "marketplace_references",
            "Usable (Active) references of each tenant to each Marketplace image, for billing",
            marketplace_references.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            durations,
            in_flight,
            images,
            bytes,
            quota_used_images,
            quota_hard_images,
            quota_used_bytes,
            queue_depth,
            marketplace_references,
            marketplace_series: Mutex::default(),
        }
    }
}

/// Measures one reconcile: counts it, its duration and whether it is still running.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    controller: ControllerLabel,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics.in_flight.get_or_create(&self.controller).dec();
        self.metrics.durations.get_or_create(&self.controller).observe(self.started.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Starts measuring a reconcile of `controller`.
    pub fn reconcile(self: &Arc<Self>, controller: &str) -> ReconcileTimer {
        let label = ControllerLabel { controller: controller.to_string() };
        self.reconciles.get_or_create(&label).inc();
        self.in_flight.get_or_create(&label).inc();
        ReconcileTimer { metrics: self.clone(), controller: label, started: Instant::now() }
    }

    /// Counts a failed reconcile.
    pub fn error(&self, controller: &str, reason: &str) {
        self.errors.get_or_create(&ErrorLabels { controller: controller.into(), reason: reason.into() }).inc();
    }

    /// Counts bytes stored (`import` or `copy`).
    pub fn moved(&self, kind: &str, bytes: u64) {
        self.bytes.get_or_create(&KindLabel { kind: kind.into() }).inc_by(bytes);
    }

    /// Records a quota ledger's usage and limit in a region.
    pub fn quota(&self, namespace: &str, region: &str, used_images: i64, hard_images: i64, used_bytes: i64) {
        let labels = QuotaLabels { namespace: namespace.into(), region: region.into() };
        self.quota_used_images.get_or_create(&labels).set(used_images);
        self.quota_hard_images.get_or_create(&labels).set(hard_images);
        self.quota_used_bytes.get_or_create(&labels).set(used_bytes);
    }

    /// Sets `marketplace_references` to `usage`: the series of images or tenants with no
    /// references any more are removed (absent, as for a billing system nothing was used).
    pub fn marketplace_usage(&self, usage: &BTreeMap<crate::policy::marketplace::Usage, i64>) {
        let now: BTreeMap<MarketplaceLabels, i64> = usage.iter().map(|(u, n)| (u.into(), *n)).collect();
        let mut series = self.marketplace_series.lock().unwrap_or_else(|e| e.into_inner());
        for gone in series.iter().filter(|l| !now.contains_key(*l)) {
            self.marketplace_references.remove(gone);
        }
        for (labels, n) in &now {
            self.marketplace_references.get_or_create(labels).set(*n);
        }
        *series = now.into_keys().collect();
    }

    /// Removes every `marketplace_references` series: this process no longer leads, and only the
    /// leader's figures count (a billing system sums over the operator's pods).
    pub fn marketplace_stopped(&self) {
        self.marketplace_usage(&BTreeMap::new());
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_values() {
        let m = Arc::new(Metrics::default());
        drop(m.reconcile("image"));
        m.error("image", "transient");
        m.moved("import", 4096);
        m.quota("tenant-a", "eu-west", 3, 50, 4096);
        m.images.get_or_create(&PhaseLabel { phase: "Active".into() }).set(3);
        let text = m.encode();
        for line in [
            "ims_reconciles_total{controller=\"image\"} 1",
            "ims_reconcile_errors_total{controller=\"image\",reason=\"transient\"} 1",
            "ims_reconcile_duration_seconds_count{controller=\"image\"} 1",
            "ims_reconciles_in_flight{controller=\"image\"} 0",
            "ims_bytes_moved_total{kind=\"import\"} 4096",
            "ims_quota_used_images{namespace=\"tenant-a\",region=\"eu-west\"} 3",
            "ims_quota_hard_images{namespace=\"tenant-a\",region=\"eu-west\"} 50",
            "ims_images{phase=\"Active\"} 3",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }

    /// A series with no references left disappears; the others keep their values.
    #[test]
    fn marketplace_series_follow_the_usage() {
        use crate::{api::Plan, policy::marketplace::Usage};
        let m = Metrics::default();
        let usage = |tenant: &str, plan| Usage {
            image_namespace: "pub".into(),
            image: "m".into(),
            tenant: tenant.into(),
            publisher: "Acme \"Tools\"".into(),
            product: "tool".into(),
            plan,
        };
        m.marketplace_usage(&[(usage("a", Plan::Paid), 2), (usage("b", Plan::Paid), 1)].into_iter().collect());
        let text = m.encode();
        let series = |tenant: &str| {
            format!(
                "ims_marketplace_references{{image_namespace=\"pub\",image=\"m\",tenant=\"{tenant}\",publisher=\"Acme \\\"Tools\\\"\",product=\"tool\",plan=\"Paid\"}}"
            )
        };
        assert!(text.contains(&format!("{} 2", series("a"))), "{text}");
        assert!(text.contains(&format!("{} 1", series("b"))), "{text}");
        m.marketplace_usage(&[(usage("b", Plan::Paid), 3)].into_iter().collect());
        let text = m.encode();
        assert!(!text.contains(&series("a")) && text.contains(&format!("{} 3", series("b"))), "{text}");
        m.marketplace_stopped();
        assert!(!m.encode().contains("ims_marketplace_references{"), "{}", m.encode());
    }
}
