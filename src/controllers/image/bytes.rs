//! Moving an owned image's bytes into its region store: one object for `source.url`, one per
//! disk for a FullServer's `source.disks`, or the objects of the image a `source.copy` names,
//! moved one after the other. The image is Active only when every disk is stored and verified;
//! any failure removes everything stored so far. Deleting the image cancels a move in flight.

use std::time::Duration;

use kube::{Api, ResourceExt, runtime::controller::Action};

use super::{MANAGER, write};
use crate::{
    api::{
        DeclaredFormat, DiskRole, DiskStatus, Image, ImageChecksum, ImageLocation, ImagePhase, ImageSource,
        ImageStatus, Progress, conditions::Reason,
    },
    controllers::{Context, Error, quota, status},
    fetch::redact,
    import::{self, Imported, Request},
    policy::{
        GIB,
        image::{ACTIVE_MESSAGE, percent, with_phase},
    },
    store::RegionStore,
};

/// One object to move.
#[derive(Clone, Debug)]
pub struct Part {
    /// The disk's role (`None` for a single-disk image).
    pub role: Option<DiskRole>,
    /// Where the bytes come from.
    pub from: From,
}

/// Where a part's bytes come from.
#[derive(Clone, Debug)]
pub enum From {
    /// An import.
    Url {
        /// Source URL.
        url: String,
        /// Declared checksum.
        checksum: Option<String>,
        /// Declared format.
        format: DeclaredFormat,
    },
    /// A copy of a stored object.
    Object {
        /// The store holding it.
        store: RegionStore,
        /// The object.
        object: object_store::path::Path,
        /// The sha256 it must hash to.
        sha256: String,
        /// Whether it is encrypted (its image has `encryption`).
        sealed: bool,
    },
    /// A captured volume, read in-process (see `capture`).
    Volume {
        /// The claim's name (for messages).
        claim: String,
        /// The file read: the volume's path for a block claim, `disk.img` in it for a filesystem
        /// claim.
        path: std::path::PathBuf,
        /// Whether the claim is a block claim.
        block: bool,
    },
    /// A captured volume, uploaded by a mover Job (see `capture`).
    Upload {
        /// The claim's name.
        claim: String,
        /// Whether the claim is a block claim (the Job maps it as a device).
        block: bool,
        /// The claim's capacity in bytes, when it says: no upload may be larger.
        capacity: Option<u64>,
    },
}

impl Part {
    fn object_name(&self, index: usize) -> String {
        object_name(self.role, index)
    }
}

/// The object of disk `index` under an image's prefix: `disk` for a single-disk image (no role),
/// `disk-<index>` for a FullServer's disks.
pub fn object_name(role: Option<DiskRole>, index: usize) -> String {
    match role {
        None => "disk".into(),
        Some(_) => format!("disk-{index}"),
    }
}

/// What an image's bytes come from: `None` for references and copies (no URL import).
pub fn parts(source: &ImageSource) -> Option<Vec<Part>> {
    let url = |url: &str, checksum: &Option<String>, format| From::Url {
        url: url.to_string(),
        checksum: checksum.clone(),
        format,
    };
    if let Some(u) = &source.url {
        return Some(vec![Part { role: None, from: url(&u.url, &u.checksum, u.format) }]);
    }
    let disks = source.disks.as_ref()?;
    Some(disks.iter().map(|d| Part { role: Some(d.role), from: url(&d.url, &d.checksum, d.format) }).collect())
}

/// What the image shows while its bytes are imported.
pub fn saving_message(parts: &[Part]) -> String {
    match parts {
        [Part { from: From::Url { url, .. }, .. }] => format!("importing {}", redact(url)),
        [Part { from: From::Volume { claim, .. } | From::Upload { claim, .. }, .. }] => {
            format!("capturing PersistentVolumeClaim {claim}")
        }
        many if many.iter().any(|p| matches!(p.from, From::Volume { .. } | From::Upload { .. })) => {
            format!("capturing {} disks", many.len())
        }
        many => format!("importing {} disks", many.len()),
    }
}

fn role_name(role: Option<DiskRole>) -> &'static str {
    match role {
        Some(DiskRole::Data) => "Data",
        _ => "System",
    }
}

fn location(store: &RegionStore, imported: &Imported) -> ImageLocation {
    ImageLocation {
        url: store.object_url(&imported.object),
        checksum: format!("sha256:{}", imported.sha256),
        format: imported.detected.format.lowercase().to_string(),
    }
}

fn disk_status(index: usize, part: &Part, store: &RegionStore, imported: &Imported) -> DiskStatus {
    DiskStatus {
        index: index as i32,
        role: role_name(part.role).into(),
        format: Some(imported.detected.format.as_api_str().to_string()),
        size_bytes: Some(imported.size as i64),
        virtual_size_bytes: Some(imported.detected.virtual_size as i64),
        sha256: Some(imported.sha256.clone()),
        location: Some(location(store, imported)),
    }
}

/// Whether the cache already shows the image deleting, or replaced by a new one of the same
/// name: a move that registers after the Image watch reported it would wait in vain. An image
/// missing from the cache is not taken for deleted: the controller's own watch can run it before
/// the shared cache has it, and while it moves its finalizer keeps it from being gone.
fn deleted_already(images: &kube::runtime::reflector::Store<Image>, image: &Image) -> bool {
    let now = images.get(&kube::runtime::reflector::ObjectRef::from_obj(image));
    now.is_some_and(|now| now.metadata.uid != image.metadata.uid || now.metadata.deletion_timestamp.is_some())
}

/// Whether the cache shows the image (the same one) with another `spec.source` than `image`,
/// the version whose bytes moved.
fn source_changed(images: &kube::runtime::reflector::Store<Image>, image: &Image) -> bool {
    let now = images.get(&kube::runtime::reflector::ObjectRef::from_obj(image));
    now.is_some_and(|now| now.metadata.uid == image.metadata.uid && now.spec.source != image.spec.source)
}

/// A progress snapshot: bytes done over all disks, the total when known, the disks stored.
type Snapshot = (u64, Option<u64>, Vec<DiskStatus>);

/// What to move, and the status shown meanwhile.
pub struct Job<'a> {
    /// The parts, in order.
    pub parts: &'a [Part],
    /// The status while moving (phase Saving).
    pub saving: ImageStatus,
    /// Largest object accepted, GiB (imports).
    pub limit_gib: u64,
    /// Bytes to move, when known up front (copies).
    pub known_total: Option<u64>,
}

/// How a move ended.
pub enum Moved {
    /// Every part is stored and verified, in order.
    Stored(Vec<(Part, Imported)>),
    /// Part `index` failed; the parts before it are stored.
    Failed(usize, Part, Box<import::ImportError>),
    /// The image was deleted meanwhile.
    Cancelled,
    /// The operator is shutting down.
    Stopped,
}

/// Moves every part of `image` (which holds an import slot and shows `job.saving`) one after the
/// other, writing progress at most every `progress_every`, until all are stored, one fails, the
/// image is deleted or the operator stops. Writes no outcome: see [`settle`].
pub async fn move_all(ctx: &Context, api: &Api<Image>, image: &Image, store: &RegionStore, job: &Job<'_>) -> Moved {
    let prefix = prefix(store, image);
    // An earlier attempt (a restart, a leader that died) may have left parts behind: start clean.
    match import::sweep_abandoned(store, &prefix).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "removed what an interrupted move left"),
        Err(e) => tracing::warn!(error = %e, "could not sweep an interrupted move"),
    }
    let (tx, progress_writer) = progress_writer(ctx, api, image, &job.saving);
    let single = job.parts.len() == 1;
    let mut stored: Vec<(Part, Imported)> = Vec::with_capacity(job.parts.len());
    let mut disks: Vec<DiskStatus> = Vec::new();
    let mut before: u64 = 0;
    let moving = ctx.moves.start(&image.uid().unwrap_or_default());
    let mut ended = deleted_already(&ctx.images, image).then_some(Moved::Cancelled);
    for (index, part) in job.parts.iter().enumerate() {
        if ended.is_some() {
            break;
        }
        let object = prefix.clone().join(part.object_name(index).as_str());
        let shown = disks.clone();
        let sender = tx.clone();
        let known_total = job.known_total;
        let mut report = move |done: u64, total: Option<u64>| {
            // Several disks: the total of the later ones is unknown (imports), so no total and
            // no percent, unless the sizes are known up front (copies).
            let total = known_total.or(if single { total } else { None });
            let _ = sender.send(Some((before + done, total, shown.clone())));
        };
        let progress = import::Progress { every: ctx.config.progress_every, report: &mut report };
        let encrypt = image.spec.encryption.as_ref().map(|e| e.kms_key_id.as_str());
        let moved = async {
            match &part.from {
                From::Url { url, checksum, format } => {
                    let request = Request {
                        url,
                        checksum: checksum.as_deref(),
                        declared: *format,
                        limit: job.limit_gib.saturating_mul(GIB),
                        image_type: Some(image.spec.r#type),
                        encrypt,
                    };
                    import::import(store, &object, request, &ctx.config.fetch, progress).await
                }
                From::Object { store: from, object: from_object, sha256, sealed } => {
                    let request = import::CopyRequest {
                        from,
                        from_object,
                        to: store,
                        to_object: &object,
                        sha256,
                        from_sealed: *sealed,
                        encrypt,
                    };
                    import::copy(request, progress).await
                }
                From::Volume { claim, path, block } => {
                    // Only the volume's own path is read (the operator's stores stay denied).
                    let root = if *block { path.as_path() } else { path.parent().unwrap_or(path) };
                    let policy = crate::fetch::FetchPolicy {
                        allow_file: true,
                        file_roots: vec![root.to_path_buf()],
                        ..ctx.config.fetch.clone()
                    };
                    let url = crate::fetch::file_url(path);
                    let request = Request {
                        url: &url,
                        checksum: None,
                        declared: DeclaredFormat::Auto,
                        limit: job.limit_gib.saturating_mul(GIB),
                        image_type: Some(image.spec.r#type),
                        encrypt,
                    };
                    import::import(store, &object, request, &policy, progress).await.map_err(|e| match e {
                        import::ImportError::Source(e) => {
                            import::ImportError::Capture(super::capture::read_failure(claim, path, *block, &e))
                        }
                        other => other,
                    })
                }
                From::Upload { claim, block, capacity } => {
                    let upload = super::capture::Upload {
                        claim,
                        block: *block,
                        capacity: *capacity,
                        index,
                        disk: &part.object_name(index),
                        limit: job.limit_gib.saturating_mul(GIB),
                        encrypt,
                    };
                    super::capture::upload(ctx, image, store, &object, upload, progress).await
                }
            }
        };
        let result = tokio::select! {
            result = moved => result,
            () = moving.deleted() => {
                ended = Some(Moved::Cancelled);
                break;
            }
            () = ctx.stopping.clone() => {
                ended = Some(Moved::Stopped);
                break;
            }
        };
        match result {
            Ok(imported) => {
                before += imported.size;
                if part.role.is_some() {
                    disks.push(disk_status(index, part, store, &imported));
                    let _ = tx.send(Some((before, None, disks.clone())));
                }
                stored.push((part.clone(), imported));
            }
            Err(e) => ended = Some(Moved::Failed(index, part.clone(), Box::new(e))),
        }
    }
    drop(tx);
    let _ = progress_writer.await;
    ended.unwrap_or(Moved::Stored(stored))
}

/// The store prefix of an image's bytes.
fn prefix(store: &RegionStore, image: &Image) -> object_store::path::Path {
    store.image_prefix(&image.namespace().unwrap_or_default(), &image.name_any(), &image.uid().unwrap_or_default())
}

/// A task writing the progress it is sent over `base` (the Saving status), at most every
/// `progress_every`; it ends when the sender is dropped.
fn progress_writer(
    ctx: &Context,
    api: &Api<Image>,
    image: &Image,
    base: &ImageStatus,
) -> (tokio::sync::watch::Sender<Option<Snapshot>>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = tokio::sync::watch::channel::<Option<Snapshot>>(None);
    let api = api.clone();
    let name = image.name_any();
    let base = base.clone();
    let every = ctx.config.progress_every;
    let task = tokio::spawn(async move {
        let mut written = base.clone();
        while rx.changed().await.is_ok() {
            let Some((done, total, disks)) = rx.borrow_and_update().clone() else { continue };
            let next = ImageStatus {
                progress: Some(Progress {
                    bytes_done: done as i64,
                    bytes_total: total.map(|t| t as i64),
                    percent: percent(done, total),
                }),
                disks,
                ..base.clone()
            };
            if status::apply_status(&api, &name, MANAGER, Some(&written), &next).await.is_ok() {
                written = next;
            }
            tokio::time::sleep(every).await;
        }
    });
    (tx, task)
}

/// Ends a move: cleans up what must not stay, settles the quota and writes the outcome once:
/// Active with the stored disks, Failed with the reason, or, for a failure a retry may cure,
/// Saving with the failure and an error for the controller's backoff.
pub async fn settle(
    ctx: &Context,
    api: &Api<Image>,
    image: &Image,
    store: &RegionStore,
    job: &Job<'_>,
    moved: Moved,
) -> Result<Action, Error> {
    let prefix = prefix(store, image);
    let generation = image.metadata.generation;
    let now = status::now();
    let remove = || async { store.delete_prefix(&prefix).await.map_err(|e| Error::Transient(e.to_string())) };
    let stored = match moved {
        Moved::Stopped => {
            // Shutting down: what landed goes; the status stays Saving, so whoever leads next
            // starts the move again.
            if let Err(e) = remove().await {
                tracing::warn!(error = %e, "could not remove a stopped move's bytes");
            }
            tracing::info!("operator stopping: byte move stopped");
            return Ok(Action::await_change());
        }
        Moved::Cancelled => {
            // The finalizer's cleanup (the next reconcile) removes whatever landed.
            tracing::info!("image deleted while its bytes moved: cancelled");
            return Ok(Action::await_change());
        }
        Moved::Failed(index, part, e) => {
            // Nothing stays behind: the disks already stored go with the failed one.
            remove().await?;
            let message = match part.role {
                Some(role) => format!("disk {index} ({}): {e}", role_name(Some(role))),
                None => e.to_string(),
            };
            if e.is_transient() {
                let retrying = with_phase(
                    &job.saving,
                    generation,
                    ImagePhase::Saving,
                    e.reason(),
                    &format!("{message}; retrying"),
                    &now,
                );
                write(ctx, api, image, &ImageStatus { disks: Vec::new(), ..retrying }).await?;
                return Err(Error::Transient(message));
            }
            quota::finish_import(ctx, image, 0).await?;
            let failed = with_phase(&job.saving, generation, ImagePhase::Failed, e.reason(), &message, &now);
            write(ctx, api, image, &moved_nothing(failed)).await?;
            return Ok(Action::await_change());
        }
        Moved::Stored(stored) => stored,
    };
    if source_changed(&ctx.images, image) {
        // What moved is no longer what the spec asks for (edited while the bytes moved; once
        // Active the API server refuses such an edit): never Active with the old bytes.
        remove().await?;
        let message = "spec.source changed while the bytes moved: they are removed, and the import starts again from the new source";
        let again = with_phase(&job.saving, generation, ImagePhase::Saving, Reason::Importing, message, &now);
        write(ctx, api, image, &moved_nothing(again)).await?;
        tracing::info!("source changed during the move: starting again");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let size: u64 = stored.iter().map(|(_, i)| i.size).sum();
    let kind = if job.parts.iter().any(|p| matches!(p.from, From::Object { .. })) { "copy" } else { "import" };
    ctx.config.metrics.moved(kind, size);
    if let Some(message) = quota::finish_import(ctx, image, size as i64).await? {
        remove().await?;
        let failed = with_phase(&job.saving, generation, ImagePhase::Failed, Reason::QuotaExceeded, &message, &now);
        write(ctx, api, image, &moved_nothing(failed)).await?;
        return Ok(Action::await_change());
    }
    let Some(active) = active(image, store, &job.saving, &stored, &now) else {
        return Err(Error::Transient("no system disk was imported".into()));
    };
    write(ctx, api, image, &active).await?;
    tracing::info!(size, disks = job.parts.len(), format = ?active.format, "image imported");
    Ok(Action::requeue(Duration::from_secs(3600)))
}

/// A status that shows no bytes moved (a failure removed them).
fn moved_nothing(status: ImageStatus) -> ImageStatus {
    ImageStatus { progress: None, disks: Vec::new(), ..status }
}

/// The Active status of an image whose parts are `stored`. The image's own format, checksum and
/// location are its system disk's (the first part for a single-disk image): what a provisioner
/// boots; `disks` lists every disk of a FullServer. `None` without a system disk.
fn active(
    image: &Image,
    store: &RegionStore,
    saving: &ImageStatus,
    stored: &[(Part, Imported)],
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Option<ImageStatus> {
    let (_, system) = stored.iter().find(|(p, _)| p.role != Some(DiskRole::Data))?;
    let size: u64 = stored.iter().map(|(_, i)| i.size).sum();
    let disks = stored
        .iter()
        .enumerate()
        .filter(|(_, (part, _))| part.role.is_some())
        .map(|(index, (part, imported))| disk_status(index, part, store, imported))
        .collect();
    Some(ImageStatus {
        format: Some(system.detected.format.as_api_str().to_string()),
        size_bytes: Some(size as i64),
        virtual_size_bytes: Some(system.detected.virtual_size as i64),
        checksum: Some(ImageChecksum { sha256: system.sha256.clone() }),
        location: Some(location(store, system)),
        progress: Some(Progress { bytes_done: size as i64, bytes_total: Some(size as i64), percent: Some(100) }),
        disks,
        r#type: Some(image.spec.r#type),
        os: image.spec.os.clone(),
        ..with_phase(saving, image.metadata.generation, ImagePhase::Active, Reason::Active, ACTIVE_MESSAGE, now)
    })
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector, watcher};

    use super::*;

    fn image(uid: &str, deleting: bool) -> Image {
        crate::controllers::test_image("i", uid, deleting)
    }

    /// The status message and the `Importing` Event (which shows the same text) never carry a
    /// source's credentials or signed query.
    #[test]
    fn what_an_import_shows_hides_the_sources_credentials() {
        let source = serde_json::from_value(serde_json::json!({"url": {"url": "http://user:pass@host/x.img?sig=s"}}));
        let parts = parts(&source.unwrap()).unwrap();
        assert_eq!(saving_message(&parts), "importing http://***@host/x.img?…");
    }

    #[test]
    fn only_a_deleting_or_replaced_image_counts_as_deleted_not_one_the_cache_has_not_seen() {
        let (store, mut writer) = reflector::store::<Image>();
        let mine = image("a", false);
        assert!(!deleted_already(&store, &mine), "not in the cache yet: its own watch ran first");
        writer.apply_watcher_event(&watcher::Event::Apply(mine.clone()));
        assert!(!deleted_already(&store, &mine));
        writer.apply_watcher_event(&watcher::Event::Apply(image("a", true)));
        assert!(deleted_already(&store, &mine), "deleting");
        writer.apply_watcher_event(&watcher::Event::Apply(image("b", false)));
        assert!(deleted_already(&store, &mine), "gone, and another image took its name");
    }
}
