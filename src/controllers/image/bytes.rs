//! Moving an owned image's bytes into its region store: one object for `source.url`, one per
//! disk for a FullServer's `source.disks`, imported one after the other. The image is Active
//! only when every disk is stored and verified; any failure removes everything stored so far.

use std::time::Duration;

use kube::{Api, ResourceExt, runtime::controller::Action};

use super::{GIB, MANAGER, redact, write};
use crate::{
    api::{
        DeclaredFormat, DiskRole, DiskStatus, Image, ImageChecksum, ImageLocation, ImagePhase, ImageSource,
        ImageStatus, Progress,
    },
    controllers::{Context, Error, quota, status},
    import::{self, Imported, Request},
    policy::image::{percent, with_phase},
    store::RegionStore,
};

/// One object to import.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    /// The disk's role (`None` for a single-disk `source.url`).
    pub role: Option<DiskRole>,
    /// Source URL.
    pub url: String,
    /// Declared checksum.
    pub checksum: Option<String>,
    /// Declared format.
    pub format: DeclaredFormat,
}

impl Part {
    fn object_name(&self, index: usize) -> String {
        match self.role {
            None => "disk".into(),
            Some(_) => format!("disk-{index}"),
        }
    }
}

/// What an image's bytes come from: `None` for references and copies (no URL import).
pub fn parts(source: &ImageSource) -> Option<Vec<Part>> {
    if let Some(url) = &source.url {
        return Some(vec![Part {
            role: None,
            url: url.url.clone(),
            checksum: url.checksum.clone(),
            format: url.format,
        }]);
    }
    let disks = source.disks.as_ref()?;
    Some(
        disks
            .iter()
            .map(|d| Part { role: Some(d.role), url: d.url.clone(), checksum: d.checksum.clone(), format: d.format })
            .collect(),
    )
}

/// What the image shows while its bytes move.
pub fn saving_message(parts: &[Part]) -> String {
    match parts {
        [one] => format!("importing {}", redact(&one.url)),
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

/// A progress snapshot: bytes done over all disks, the total when known, the disks stored.
type Snapshot = (u64, Option<u64>, Vec<DiskStatus>);

/// Imports every part of `image` (which holds an import slot and shows `saving`) and writes
/// the outcome: Active with the stored disks, Failed with the reason, or — for a failure a
/// retry may cure — an error for the controller's backoff.
pub async fn import_all(
    ctx: &Context,
    api: &Api<Image>,
    image: &Image,
    store: &RegionStore,
    parts: &[Part],
    saving: ImageStatus,
    limit_gib: u64,
) -> Result<Action, Error> {
    let namespace = image.namespace().unwrap_or_default();
    let generation = image.metadata.generation;
    let prefix = store.image_prefix(&namespace, &image.name_any(), &image.uid().unwrap_or_default());

    // Progress goes through a channel; a writer task patches it at most every progress_every.
    let (tx, mut rx) = tokio::sync::watch::channel::<Option<Snapshot>>(None);
    let progress_writer = {
        let api = api.clone();
        let name = image.name_any();
        let base = saving.clone();
        let every = ctx.config.progress_every;
        tokio::spawn(async move {
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
        })
    };

    let single = parts.len() == 1;
    let mut stored: Vec<(Part, Imported)> = Vec::with_capacity(parts.len());
    let mut disks: Vec<DiskStatus> = Vec::new();
    let mut before: u64 = 0;
    let mut failure = None;
    for (index, part) in parts.iter().enumerate() {
        let object = prefix.clone().join(part.object_name(index).as_str());
        let shown = disks.clone();
        let sender = tx.clone();
        let mut report = move |done: u64, total: Option<u64>| {
            // Several disks: the total of the later ones is unknown, so no total (and no percent).
            let total = if single { total } else { None };
            let _ = sender.send(Some((before + done, total, shown.clone())));
        };
        let result = import::import(
            store,
            &object,
            Request {
                url: &part.url,
                checksum: part.checksum.as_deref(),
                declared: part.format,
                limit: limit_gib.saturating_mul(GIB),
            },
            &ctx.config.fetch,
            import::Progress { every: ctx.config.progress_every, report: &mut report },
        )
        .await;
        match result {
            Ok(imported) => {
                before += imported.size;
                if part.role.is_some() {
                    disks.push(disk_status(index, part, store, &imported));
                    let _ = tx.send(Some((before, None, disks.clone())));
                }
                stored.push((part.clone(), imported));
            }
            Err(e) => {
                failure = Some((index, part.clone(), e));
                break;
            }
        }
    }
    drop(tx);
    let _ = progress_writer.await;
    let now = status::now();

    if let Some((index, part, e)) = failure {
        // Nothing stays behind: the disks already stored go with the failed one.
        store.delete_prefix(&prefix).await.map_err(|e| Error::Transient(e.to_string()))?;
        let message = match part.role {
            Some(role) => format!("disk {index} ({}): {e}", role_name(Some(role))),
            None => e.to_string(),
        };
        if e.is_transient() {
            let retrying = ImageStatus {
                disks: Vec::new(),
                ..with_phase(&saving, generation, ImagePhase::Saving, e.reason(), &format!("{message}; retrying"), &now)
            };
            write(ctx, api, image, &retrying).await?;
            return Err(Error::Transient(message));
        }
        let failed = ImageStatus {
            progress: None,
            disks: Vec::new(),
            ..with_phase(&saving, generation, ImagePhase::Failed, e.reason(), &message, &now)
        };
        write(ctx, api, image, &failed).await?;
        quota::finish_import(ctx, image, 0).await?;
        return Ok(Action::await_change());
    }

    let size: u64 = stored.iter().map(|(_, i)| i.size).sum();
    if let Some(message) = quota::finish_import(ctx, image, size as i64).await? {
        store.delete_prefix(&prefix).await.map_err(|e| Error::Transient(e.to_string()))?;
        let failed = ImageStatus {
            progress: None,
            disks: Vec::new(),
            ..with_phase(&saving, generation, ImagePhase::Failed, "QuotaExceeded", &message, &now)
        };
        write(ctx, api, image, &failed).await?;
        return Ok(Action::await_change());
    }
    // The image's own format, checksum and location are its system disk's (the first part for
    // a single-disk image): what a provisioner boots. `disks` lists every disk of a FullServer.
    let Some((_, system)) = stored.iter().find(|(p, _)| p.role != Some(DiskRole::Data)) else {
        return Err(Error::Transient("no system disk was imported".into()));
    };
    let mut active = with_phase(&saving, generation, ImagePhase::Active, "Active", "the image is ready to use", &now);
    active.format = Some(system.detected.format.as_api_str().to_string());
    active.size_bytes = Some(size as i64);
    active.virtual_size_bytes = Some(system.detected.virtual_size as i64);
    active.checksum = Some(ImageChecksum { sha256: system.sha256.clone() });
    active.location = Some(location(store, system));
    active.progress = Some(Progress { bytes_done: size as i64, bytes_total: Some(size as i64), percent: Some(100) });
    active.disks = disks;
    active.r#type = Some(image.spec.r#type);
    active.os = image.spec.os.clone();
    write(ctx, api, image, &active).await?;
    tracing::info!(size, disks = parts.len(), format = %system.detected.format, "image imported");
    Ok(Action::requeue(Duration::from_secs(3600)))
}
