//! Status conditions as the API contract (docs/API.md) and kstatus name them: the condition
//! types, every reason (exact strings: users, GitOps tools and tests match on them), and how a
//! condition list is formed from what a controller wants it to say.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition types every kind shows (kstatus).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// Always present: True when the object is usable.
    Ready,
    /// While work is in progress.
    Reconciling,
    /// When nothing changes without a spec change.
    Stalled,
}

impl ConditionType {
    /// The type as written in `status.conditions[].type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Reconciling => "Reconciling",
            ConditionType::Stalled => "Stalled",
        }
    }
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// A condition (or share member) reason: the exact strings of the API contract.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The reason written as `s`, if it is one.
            pub fn parse(s: &str) -> Option<Reason> {
                Reason::ALL.iter().copied().find(|r| r.as_str() == s)
            }

            /// The reason as written in status.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                }
            }
        }
    };
}

reasons! {
    // Image
    /// The image (or region) is ready to use.
    Active,
    /// Waiting for an import or cross-region slot.
    Queued,
    /// Bytes are being imported.
    Importing,
    /// Bytes are being copied from another image.
    Copying,
    /// The tenant's quota has no room for the image (yet).
    QuotaExceeded,
    /// `spec.region` names no Region.
    RegionNotFound,
    /// The region (or its store) is not Ready.
    RegionNotReady,
    /// The spec asks for something the rules forbid.
    InvalidSpec,
    /// `visibility: Public` outside the platform namespace.
    VisibilityNotAllowed,
    /// The source URL could not be read.
    SourceUnreachable,
    /// The bytes do not hash to the declared checksum.
    ChecksumMismatch,
    /// The bytes are not the declared (or any supported) format.
    UnsupportedFormat,
    /// Over a size limit.
    TooLarge,
    /// The source of a reference is not open to the tenant.
    NotShared,
    /// A reference's source is in another region.
    RegionMismatch,
    /// The source image is not Active (yet).
    SourceNotActive,
    /// A reference's source was deleted.
    SourceDeleted,
    /// A reference's source was deleted and created again.
    SourceReplaced,
    /// A reference's grant was withdrawn.
    ShareRevoked,
    /// Deletion is held by `spec.protected`.
    Protected,
    /// The KMS key of an encrypted image is missing, disabled or refused.
    KeyUnavailable,
    /// Bytes are being captured from a volume.
    Capturing,
    /// The claim (or the volume it is bound to) a capture names does not exist (yet).
    VolumeNotFound,
    /// The claim is ReadWriteOnce and mounted by a running pod: the capture waits until it is free.
    VolumeInUse,
    /// The VirtualMachine a capture names is running: the capture waits until it is stopped.
    ServerRunning,
    /// The capture could not read the volume (the message says why).
    CaptureFailed,
    // ImageShare
    /// The shared image does not exist.
    ImageNotFound,
    /// The shared image is not Active.
    ImageNotActive,
    /// An encrypted image cannot be shared or copied across regions.
    EncryptedImage,
    /// A FullServer image not made from a backup cannot be shared.
    FullServerNotFromBackup,
    /// A Marketplace image is shared by the marketplace, not by ImageShares.
    MarketplaceImage,
    /// A Public image is open to everyone already.
    PublicImage,
    /// The shared image is itself a reference.
    NotOwner,
    /// A member namespace does not exist.
    TenantNotFound,
    /// A member is the owner's own namespace.
    SelfShare,
    /// Over the member limit of the image.
    MemberLimitExceeded,
    /// Every member is granted.
    Shared,
    // ImageCopy
    /// Waiting for a cross-region copy slot.
    ConcurrencyLimit,
    /// The copy's source image does not exist.
    SourceNotFound,
    /// A FullServer image cannot be copied within its region.
    FullServerNotCopyable,
    /// An image of the destination's name exists and was not made by this copy.
    DestinationExists,
    /// The copy's destination Image was deleted before it was Active.
    DestinationDeleted,
    /// The copy's destination is Active.
    Succeeded,
    /// The copy waits for its destination to start.
    Pending,
    // Region
    /// The region's store answered the probe.
    StoreReady,
    /// The region's store could not be reached.
    StoreUnreachable,
    /// The credentials Secret of an S3 region does not exist.
    SecretNotFound,
    /// The region's store is, holds, or is inside an older Region's store.
    StoreConflict,
    /// Deletion of the region waits for the images that use it.
    RegionInUse,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Reason> for String {
    fn from(reason: Reason) -> String {
        reason.as_str().to_string()
    }
}

impl PartialEq<Reason> for String {
    fn eq(&self, reason: &Reason) -> bool {
        self == reason.as_str()
    }
}

/// The condition of type `typ`, if present.
pub fn find(conditions: &[Condition], typ: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == typ.as_str())
}

/// The reason of the `Ready` condition, if present.
pub fn ready_reason(conditions: &[Condition]) -> Option<&str> {
    find(conditions, ConditionType::Ready).map(|c| c.reason.as_str())
}

/// Whether the `Ready` condition is True.
pub fn is_ready(conditions: &[Condition]) -> bool {
    find(conditions, ConditionType::Ready).is_some_and(|c| c.status == "True")
}

/// Desired state of one condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// `Ready`, `Reconciling`, `Stalled`.
    pub typ: ConditionType,
    /// True or False.
    pub status: bool,
    /// Machine-readable reason.
    pub reason: Reason,
    /// Human message.
    pub message: String,
}

impl Want {
    /// A condition.
    pub fn new(typ: ConditionType, status: bool, reason: Reason, message: impl Into<String>) -> Self {
        Want { typ, status, reason, message: message.into() }
    }
}

/// The conditions after applying `wants` to `old`: `lastTransitionTime` moves only when a
/// condition's status flips; conditions not wanted are dropped (a `Reconciling` that ended
/// disappears, as kstatus expects).
pub fn conditions(old: &[Condition], wants: &[Want], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    wants
        .iter()
        .map(|want| {
            let status = if want.status { "True" } else { "False" };
            let previous = find(old, want.typ);
            let last_transition_time = match previous {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: want.typ.as_str().to_string(),
                status: status.to_string(),
                reason: want.reason.as_str().to_string(),
                message: want.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The kstatus conditions of a phase-driven kind: `Ready` (True only when `ready`), plus
/// `Reconciling` while work goes on or `Stalled` when only a spec change helps.
pub fn kstatus(ready: bool, progress: Progressing, reason: Reason, message: &str) -> Vec<Want> {
    let mut wants = vec![Want::new(ConditionType::Ready, ready, reason, message)];
    match progress {
        Progressing::Working => wants.push(Want::new(ConditionType::Reconciling, true, reason, message)),
        Progressing::Stalled => wants.push(Want::new(ConditionType::Stalled, true, reason, message)),
        Progressing::Settled => {}
    }
    wants
}

/// Whether an object's work goes on (kstatus `Reconciling`), cannot go on without a spec change
/// (`Stalled`), or neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progressing {
    /// Work in progress.
    Working,
    /// Only a spec change helps.
    Stalled,
    /// Done, or waiting on nothing this object controls.
    Settled,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn ready(status: bool, reason: Reason, message: &str) -> Want {
        Want::new(ConditionType::Ready, status, reason, message)
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = conditions(&[], &[ready(false, Reason::Importing, "working")], Some(1), &t("2026-01-01T00:00:00Z"));
        assert_eq!(first[0].last_transition_time, t("2026-01-01T00:00:00Z"));
        let same = conditions(&first, &[ready(false, Reason::Importing, "50%")], Some(1), &t("2026-01-01T00:01:00Z"));
        assert_eq!(same[0].last_transition_time, t("2026-01-01T00:00:00Z"), "same status keeps the time");
        assert_eq!(same[0].message, "50%");
        let flipped = conditions(&same, &[ready(true, Reason::Active, "done")], Some(2), &t("2026-01-01T00:02:00Z"));
        assert_eq!(flipped[0].last_transition_time, t("2026-01-01T00:02:00Z"));
        assert_eq!(flipped[0].observed_generation, Some(2));
        assert_eq!((flipped[0].type_.as_str(), flipped[0].reason.as_str()), ("Ready", "Active"));
    }

    #[test]
    fn reasons_are_their_names_and_unique() {
        assert_eq!(Reason::QuotaExceeded.as_str(), "QuotaExceeded");
        assert_eq!(Reason::FullServerNotCopyable.to_string(), "FullServerNotCopyable");
        let names: std::collections::BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        assert!(String::from("Queued") == Reason::Queued && String::from("Queued") != Reason::Active);
    }

    #[test]
    fn kstatus_adds_reconciling_or_stalled() {
        let types = |p| kstatus(false, p, Reason::Queued, "m").iter().map(|w| w.typ).collect::<Vec<_>>();
        assert_eq!(types(Progressing::Working), [ConditionType::Ready, ConditionType::Reconciling]);
        assert_eq!(types(Progressing::Stalled), [ConditionType::Ready, ConditionType::Stalled]);
        assert_eq!(types(Progressing::Settled), [ConditionType::Ready]);
    }
}
