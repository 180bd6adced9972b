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
//!   `copies` (ImageCopies Pending) — and `reconciles_in_flight{controller}`.

use std::{
    sync::{
        Arc,
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
}
