use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// Finalizer that removes an image's bytes from its region store and releases its quota.
pub const CLEANUP_FINALIZER: &str = "ims.io/cleanup";

/// A disk image in a region: imported from a URL, copied from another image, or a reference to
/// an image shared with this namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ims.io",
    version = "v1alpha1",
    kind = "Image",
    namespaced,
    shortname = "img",
    category = "ims",
    status = "ImageStatus",
    doc = "A private, public or marketplace image, or a tenant's reference to one shared with it.",
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Visibility", type_ = "string", json_path = ".spec.visibility"),
    printcolumn(name = "Publisher", type_ = "string", priority = 1, json_path = ".spec.marketplace.publisher"),
    printcolumn(name = "Product", type_ = "string", priority = 1, json_path = ".spec.marketplace.productCode"),
    printcolumn(name = "Plan", type_ = "string", priority = 1, json_path = ".spec.marketplace.pricing.plan"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".status.sizeBytes",
        description = "Stored size in bytes"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The bytes of an Active image are imported and verified: its source cannot change (an edit
    // would mean nothing). Before Active it may (a typo in a URL that never answered).
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase != 'Active' || self.spec.source == oldSelf.spec.source")
        .message("spec.source cannot change once the image is Active: its bytes are imported and verified; create a new Image for other bytes")
        .field_path(".spec.source")
)]
#[x_kube(
    validation = Rule::new("(has(self.type) && self.type in ['DataDisk', 'ISO']) || has(self.os) || has(self.source.image)")
        .message("os is required for SystemDisk and FullServer images: set spec.os (type, distribution, version, architecture)")
        .field_path(".os"),
    validation = Rule::new("!has(self.source.volume) || !has(self.type) || self.type in ['SystemDisk', 'DataDisk']")
        .message("source.volume captures one disk, for a SystemDisk or DataDisk image: set type to one of them (a FullServer needs every disk of a server)")
        .field_path(".source.volume"),
    validation = Rule::new("!has(self.source.volumeSnapshot) || !has(self.type) || self.type in ['SystemDisk', 'DataDisk']")
        .message("source.volumeSnapshot captures one disk, for a SystemDisk or DataDisk image: set type to one of them")
        .field_path(".source.volumeSnapshot"),
    validation = Rule::new("!has(self.source.virtualMachine) || !has(self.type) || self.type != 'ISO'")
        .message("source.virtualMachine captures disks, not an ISO: set type to SystemDisk, DataDisk or FullServer")
        .field_path(".source.virtualMachine"),
    validation = Rule::new("!has(self.source.virtualMachine) || (has(self.type) && self.type == 'DataDisk') == has(self.source.virtualMachine.disk)")
        .message("source.virtualMachine.disk names the disk of a DataDisk image, and only then: set it for type DataDisk, remove it otherwise")
        .field_path(".source.virtualMachine"),
    validation = Rule::new("!has(self.source.disks) || (has(self.type) && self.type == 'FullServer')")
        .message("source.disks is only for FullServer images: use source.url for a single disk, or set type: FullServer")
        .field_path(".source.disks"),
    validation = Rule::new("!has(self.marketplace) || (has(self.visibility) && self.visibility == 'Marketplace')")
        .message("marketplace is only for visibility: Marketplace images: set visibility: Marketplace, or remove marketplace")
        .field_path(".marketplace"),
    validation = Rule::new("!has(self.marketplace) || !has(self.source.image)")
        .message("a reference takes its Marketplace terms from its source: remove marketplace")
        .field_path(".marketplace"),
    validation = Rule::new("!has(self.visibility) || self.visibility != 'Marketplace' || has(self.marketplace) || has(self.source.image)")
        .message("a Marketplace image needs marketplace (publisher, productCode, pricing.plan): say who sells it and at what price")
        .field_path(".marketplace"),
    // The stored bytes are ciphertext under that key (or not): an edit would mean nothing.
    validation = Rule::new("has(self.encryption) == has(oldSelf.encryption) && (!has(self.encryption) || self.encryption == oldSelf.encryption)")
        .message("encryption is immutable: to encrypt, decrypt or change the key, copy the image with an ImageCopy in the same region (spec.destination.encryption)")
        .field_path(".encryption"),
    validation = Rule::new("!has(self.encryption) || !has(self.source.image)")
        .message("a reference holds no bytes of its own: it is encrypted as its source is; remove spec.encryption")
        .field_path(".encryption")
)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Region the image lives in (name of a Region). Immutable: to have the image in another
    /// region, copy it there with an ImageCopy.
    #[schemars(length(min = 1, max = 63), pattern(super::DNS_LABEL))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("region is immutable: use an ImageCopy to put the image in another region"))]
    pub region: String,
    /// What the image holds: `SystemDisk` (default), `DataDisk`, `FullServer` (system disk
    /// and all data disks) or `ISO`. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable: create a new Image"))]
    pub r#type: ImageType,
    /// Who may use the image: `Private` (default; this namespace and those it shares with),
    /// `Public` (all tenants; only in the platform namespace) or `Marketplace` (published by a
    /// tenant for all tenants).
    #[serde(default)]
    pub visibility: Visibility,
    /// The terms of a `Marketplace` image: who sells it and at what price. Required with
    /// `visibility: Marketplace`, not allowed otherwise (and never on a reference, which takes
    /// its source's terms). Copies of a Marketplace image stay bound by them (`status.lineage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketplace: Option<Marketplace>,
    /// Operating system of a SystemDisk or FullServer image. Required for those types,
    /// unless the image is a reference (`source.image`), which takes it from its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OperatingSystem>,
    /// Smallest disk, in GiB, a server made from this image needs.
    #[serde(default, rename = "minDiskGiB", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub min_disk_gib: Option<i64>,
    /// Smallest memory, in MiB, a server made from this image needs.
    #[serde(default, rename = "minMemoryMiB", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub min_memory_mib: Option<i64>,
    /// Free text shown to users of the image (at most 1024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Server models this image may deploy. Private images of bare-metal servers only deploy
    /// servers of the same model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub server_models: Vec<String>,
    /// Free-form tags to find the image by (at most 10, unique, each at most 128 characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub tags: Vec<String>,
    /// Encrypt the stored bytes with a data key of their own, wrapped by this KMS key of the
    /// region's KMS (Region `spec.kms`). Immutable; not on references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// ID of the cloud backup (CBR) a FullServer image was made from. Only FullServer images
    /// made from a backup can be shared.
    #[serde(default, rename = "backupID", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub backup_id: Option<String>,
    /// While true, deleting the image is refused (by admission where installed) and never
    /// completes (the finalizer waits, with reason `Protected`). Set false to allow deletion.
    #[serde(default)]
    pub protected: bool,
    /// Where the image's bytes come from: exactly one of `url`, `disks`, `image`, `copy`,
    /// `volume`, `volumeSnapshot` or `virtualMachine`. The kind of source is immutable.
    pub source: ImageSource,
}

/// What an image holds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ImageType {
    /// A bootable system disk.
    #[default]
    SystemDisk,
    /// A data disk.
    DataDisk,
    /// A whole server: the system disk and all data disks.
    FullServer,
    /// An ISO 9660 installation medium.
    #[serde(rename = "ISO")]
    Iso,
}

/// Who may use an image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Visibility {
    /// This namespace, and the namespaces it shares the image with (ImageShare).
    #[default]
    Private,
    /// Every tenant; only allowed in the platform namespace.
    Public,
    /// Published by a tenant for every tenant.
    Marketplace,
}

/// The terms a Marketplace image is published under.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Marketplace {
    /// The seller's name as buyers see it, e.g. `Acme Software`. Display only: the publisher
    /// that counts (the only tenant that may copy a Paid image) is the image's namespace.
    #[schemars(length(min = 1, max = 128), pattern(super::DISPLAY_NAME))]
    pub publisher: String,
    /// The product's code in the billing system (lower-case letters, digits and `-`), e.g.
    /// `hardened-ubuntu`. The usage metric `ims_marketplace_references` carries it.
    #[schemars(length(min = 1, max = 63), pattern(super::DNS_LABEL))]
    pub product_code: String,
    /// What using the image costs.
    pub pricing: Pricing,
}

/// The price of a Marketplace image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.plan != 'Paid' || (has(self.hourlyPrice) && has(self.currency))")
        .message("a Paid plan needs hourlyPrice (a decimal, e.g. \"0.05\") and currency (ISO 4217, e.g. USD)"),
    validation = Rule::new("self.plan != 'Free' || (!has(self.hourlyPrice) && !has(self.currency))")
        .message("a Free plan has no price: remove hourlyPrice and currency, or set plan: Paid")
)]
pub struct Pricing {
    /// `Free`, or `Paid`: then only the publisher's tenant may copy the image (or any copy of
    /// it); other tenants use it through references, metered per hour.
    pub plan: Plan,
    /// For `Paid`: the price of one reference to the image for one hour, in `currency`, as a
    /// decimal string (at most 6 decimals), e.g. `"0.05"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16), pattern(super::DECIMAL))]
    pub hourly_price: Option<String>,
    /// For `Paid`: ISO 4217 code of the currency of `hourlyPrice`, e.g. `USD`, `EUR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 3), pattern(super::CURRENCY))]
    pub currency: Option<String>,
}

/// The pricing plan of a Marketplace image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Plan {
    /// Free of charge.
    Free,
    /// Charged per reference and hour.
    Paid,
}

impl Plan {
    /// The API spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "Free",
            Plan::Paid => "Paid",
        }
    }
}

/// The operating system in an image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OperatingSystem {
    /// `Linux` or `Windows`.
    pub r#type: OsType,
    /// Distribution, e.g. `Ubuntu`, `RHEL`, `Windows Server`.
    #[schemars(length(min = 1, max = 64))]
    pub distribution: String,
    /// Version, e.g. `24.04`, `9.4`, `2022`.
    #[schemars(length(min = 1, max = 64))]
    pub version: String,
    /// CPU architecture: `x86_64` or `aarch64`.
    pub architecture: Architecture,
}

/// Operating system family.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OsType {
    /// Linux.
    Linux,
    /// Windows.
    Windows,
}

/// CPU architecture.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// 64-bit x86.
    #[serde(rename = "x86_64")]
    X86_64,
    /// 64-bit ARM.
    #[serde(rename = "aarch64")]
    Aarch64,
}

/// Encryption of an image's stored bytes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Encryption {
    /// ID of the KMS key the image is encrypted with: an entry of the Secret `ims-kms-keys`
    /// (provider Local), or a key id, ARN or alias of the AWS KMS (provider AWS).
    #[serde(rename = "kmsKeyID")]
    #[schemars(length(min = 1, max = 256))]
    pub kms_key_id: String,
}

/// Where an image's bytes come from: exactly one variant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(has(self.url) ? 1 : 0) + (has(self.disks) ? 1 : 0) + (has(self.image) ? 1 : 0) + (has(self.copy) ? 1 : 0) + (has(self.volume) ? 1 : 0) + (has(self.volumeSnapshot) ? 1 : 0) + (has(self.virtualMachine) ? 1 : 0) == 1")
        .message("exactly one of source.url, source.disks, source.image, source.copy, source.volume, source.volumeSnapshot or source.virtualMachine must be set"),
    validation = Rule::new("has(self.url) == has(oldSelf.url) && has(self.disks) == has(oldSelf.disks) && has(self.image) == has(oldSelf.image) && has(self.copy) == has(oldSelf.copy) && has(self.volume) == has(oldSelf.volume) && has(self.volumeSnapshot) == has(oldSelf.volumeSnapshot) && has(self.virtualMachine) == has(oldSelf.virtualMachine)")
        .message("the kind of source (url, disks, image, copy, volume, volumeSnapshot or virtualMachine) is immutable: create a new Image instead")
)]
pub struct ImageSource {
    /// Import one image file from a URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlSource>,
    /// For `FullServer` images: every disk of the server, exactly one with role `System`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 24))]
    #[x_kube(validation = Rule::new("self.filter(d, d.role == 'System').size() == 1").message("a FullServer image needs exactly one disk with role System"))]
    pub disks: Option<Vec<DiskSource>>,
    /// Reference an image shared with this namespace, a public or a marketplace image. No bytes
    /// are copied and no quota is used; this is how a tenant accepts a share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("source.image is immutable: a reference stays bound to the image it names; create another reference for another image"))]
    pub image: Option<ImageReference>,
    /// Copy the bytes of another image of this namespace (written by ImageCopy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopySource>,
    /// Capture a PersistentVolumeClaim of this namespace: a block claim, or a filesystem claim
    /// holding `disk.img` at its root (the KubeVirt convention). For `SystemDisk` and `DataDisk`
    /// images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeSource>,
    /// Capture a CSI VolumeSnapshot (`snapshot.storage.k8s.io/v1`) of this namespace: it is
    /// restored into a temporary claim (owned by the Image, deleted when the capture ends), which
    /// is captured like `volume`. For `SystemDisk` and `DataDisk` images.
    #[serde(default, rename = "volumeSnapshot", skip_serializing_if = "Option::is_none")]
    pub volume_snapshot: Option<VolumeSnapshotSource>,
    /// Capture a stopped KubeVirt VirtualMachine (`kubevirt.io/v1`) of this namespace: for
    /// `FullServer`, every PersistentVolumeClaim and DataVolume disk (the boot disk is the
    /// `System` disk); for `SystemDisk`, the boot disk; for `DataDisk`, the disk named `disk`.
    #[serde(default, rename = "virtualMachine", skip_serializing_if = "Option::is_none")]
    pub virtual_machine: Option<VirtualMachineSource>,
}

/// A VolumeSnapshot to capture.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VolumeSnapshotSource {
    /// Name of the VolumeSnapshot, in the image's namespace (never another's).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A KubeVirt VirtualMachine to capture.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VirtualMachineSource {
    /// Name of the VirtualMachine, in the image's namespace (never another's).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// For a `DataDisk` image: the disk to capture (a name of
    /// `spec.template.spec.domain.devices.disks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub disk: Option<String>,
}

/// A PersistentVolumeClaim to capture.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSource {
    /// Name of the claim, in the image's namespace (never another's).
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
}

/// An image file to import.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct UrlSource {
    /// `https://` or `http://` URL of the image file. `file://` only where the operator allows
    /// it. Loopback, link-local and private addresses are refused unless allow-listed.
    #[schemars(length(min = 1, max = 2048), pattern(super::SOURCE_URL))]
    pub url: String,
    /// Expected digest of the file: `sha256:<64 hex>` or `sha512:<128 hex>`. Verified over the
    /// bytes stored; a mismatch fails the image and keeps no bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 135), pattern(super::CHECKSUM))]
    pub checksum: Option<String>,
    /// Expected format. `Auto` (default) takes what the bytes say; any other value must match
    /// what is detected from the bytes or the import fails with `UnsupportedFormat`.
    #[serde(default)]
    pub format: DeclaredFormat,
}

/// One disk of a FullServer image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DiskSource {
    /// `System` (exactly one) or `Data`.
    pub role: DiskRole,
    /// `https://` or `http://` URL of the disk image file.
    #[schemars(length(min = 1, max = 2048), pattern(super::SOURCE_URL))]
    pub url: String,
    /// Expected digest of the file: `sha256:<64 hex>` or `sha512:<128 hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 135), pattern(super::CHECKSUM))]
    pub checksum: Option<String>,
    /// Expected format (`Auto` by default).
    #[serde(default)]
    pub format: DeclaredFormat,
}

/// Role of a disk in a FullServer image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskRole {
    /// The boot disk.
    System,
    /// A data disk.
    Data,
}

/// Declared image file format.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeclaredFormat {
    /// Detect from the bytes.
    #[default]
    Auto,
    /// Raw disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware (monolithic sparse or stream-optimized).
    Vmdk,
    /// Microsoft VHD (fixed or dynamic).
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
    /// VirtualBox VDI.
    Vdi,
    /// ISO 9660.
    Iso,
}

/// A reference to another image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Namespace of the source image (the owner tenant, or the platform namespace).
    #[schemars(length(min = 1, max = 63), pattern(super::DNS_LABEL))]
    pub namespace: String,
    /// Name of the source image.
    #[schemars(length(min = 1, max = 253), pattern(super::DNS_SUBDOMAIN))]
    pub name: String,
}

/// Copy the bytes of another image of the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CopySource {
    /// Name of the image to copy, in this namespace.
    #[schemars(length(min = 1, max = 253), pattern(super::DNS_SUBDOMAIN))]
    pub name: String,
}

/// Lifecycle phase of an image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImagePhase {
    /// Waiting for quota or an import slot.
    Queued,
    /// Bytes are moving into the region store.
    Saving,
    /// Usable.
    Active,
    /// Cannot become usable without a spec change; see the Ready condition.
    Failed,
    /// A reference whose grant or source went away.
    Unavailable,
    /// Being deleted.
    Deleting,
}

/// Observed state of an image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// `Queued`, `Saving`, `Active`, `Failed`, `Unavailable` or `Deleting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ImagePhase>,
    /// `Ready` (always), `Reconciling` (work in progress), `Stalled` (needs a spec change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Format detected from the bytes: `Raw`, `Qcow2`, `Vmdk`, `Vhd`, `Vhdx`, `Vdi` or `Iso`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Bytes stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Size of the virtual disk, from the image header (what `qemu-img info` calls virtual size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size_bytes: Option<i64>,
    /// Digest of the stored bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<ImageChecksum>,
    /// Where a provisioner (e.g. a Metal3 BareMetalHost) fetches the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<ImageLocation>,
    /// Progress of the byte move while `Saving`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The source image a reference is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<BoundSource>,
    /// The image this one was copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
    /// For a reference to a Marketplace image: the terms it is used under (its source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketplace: Option<Marketplace>,
    /// Type of the image; for a reference, taken from its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#type: Option<ImageType>,
    /// Operating system; for a reference, taken from its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OperatingSystem>,
    /// Per-disk state of a FullServer image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 24))]
    pub disks: Vec<DiskStatus>,
    /// Human-readable summary of the current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Digest of stored bytes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ImageChecksum {
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// Where to fetch an image from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ImageLocation {
    /// URL of the stored bytes.
    pub url: String,
    /// `sha256:<hex>` of the bytes at `url`.
    pub checksum: String,
    /// Format of the bytes at `url` (lower case, as provisioners expect: `raw`, `qcow2`, ...).
    pub format: String,
}

/// Progress of a byte move.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Bytes moved so far.
    pub bytes_done: i64,
    /// Bytes to move, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<i64>,
    /// Percent done (0-100), when the total is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i32>,
}

/// The image a reference is bound to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct BoundSource {
    /// uid of the source image. A re-created source (other uid) is never followed.
    pub uid: String,
}

/// The image a copy came from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Lineage {
    /// Namespace of the original.
    pub namespace: String,
    /// Name of the original.
    pub name: String,
    /// Region of the original.
    pub region: String,
    /// The Marketplace image the bytes come from, whose terms bind this image: set on a copy
    /// of a Marketplace image (or of a reference to one) and kept by every copy of a copy.
    /// Such an image cannot be shared or made Public, and if the plan is `Paid` only the
    /// publisher's tenant may copy it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketplace: Option<MarketplaceOrigin>,
}

/// The Marketplace image a copy's bytes come from, and its terms when the copy was made.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MarketplaceOrigin {
    /// Namespace of the Marketplace image: the publisher's tenant.
    pub namespace: String,
    /// Name of the Marketplace image.
    pub name: String,
    /// Its `spec.marketplace.publisher`.
    pub publisher: String,
    /// Its `spec.marketplace.productCode`.
    pub product_code: String,
    /// Its plan (`Free` or `Paid`) when the copy was made.
    pub plan: Plan,
}

/// State of one disk of a FullServer image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    /// Position of the disk in `spec.source.disks`.
    pub index: i32,
    /// `System` or `Data`.
    pub role: String,
    /// Detected format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Bytes stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Virtual disk size from the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size_bytes: Option<i64>,
    /// Lower-case hex sha256 of the stored bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Where a provisioner fetches this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<ImageLocation>,
}
