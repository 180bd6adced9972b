//! Delivery: the image bytes served over HTTP to provisioners (curl, `qemu-img`, KubeVirt CDI,
//! Metal3). Every URL is a capability: it names one Image (namespace, name, uid) and one disk,
//! with an HMAC-SHA256 over them keyed by a Secret of the operator namespace, and is checked
//! again on every request and between the chunks of a body.
//!
//! - [`token`]: the capability and its key; [`key`]: the key Secret, created when missing and
//!   watched for rotation; [`range`]: the byte ranges a request asks for.
//! - [`server`]: what a request may read (the authorization, from the controllers' caches);
//!   [`http`]: the HTTP/1.1 server around it (sendfile from file stores); [`tls`]: HTTPS from a
//!   `kubernetes.io/tls` Secret.
//! - [`locations`]: the URLs written to `status.location` (and each disk's) of an Active image.

pub mod http;
pub mod key;
pub mod range;
pub mod server;
pub mod tls;
pub mod token;
pub mod upload;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use tokio::{net::TcpListener, sync::watch};

pub use http::Limits;
pub use range::{Ranged, ranged};
pub use token::{Capability, Key};

use crate::api::{Image, ImagePhase, ImageStatus};

/// How the operator serves images (`run --image-server-addr`, `local`, the test harness).
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// Bound once at the start and served by whichever leadership term runs the controllers.
    pub listener: Arc<TcpListener>,
    /// The URL consumers reach the server at (no trailing `/`): what locations start with.
    pub base_url: String,
    /// The key Secret's name in the operator namespace.
    pub key_secret: String,
    /// A `kubernetes.io/tls` Secret of the operator namespace: HTTPS with its certificate.
    pub tls_secret: Option<String>,
    /// Timeouts and limits for clients.
    pub limits: Limits,
}

/// What the controllers know of delivery while they run: the base URL and the current key.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The URL consumers reach the server at.
    pub base_url: String,
    /// The current key (`None` until it is loaded).
    pub keys: watch::Receiver<Option<Key>>,
}

/// The object of a location in an image's status: `disk` for a single-disk image, the system
/// disk's `disk-<index>` for a FullServer's own location, `disk-<index>` for each of its disks.
fn object_of_location(status: &ImageStatus) -> String {
    match status.disks.iter().find(|d| d.role == "System") {
        Some(system) => format!("disk-{}", system.index),
        None if !status.disks.is_empty() => format!("disk-{}", status.disks[0].index),
        None => "disk".into(),
    }
}

/// `status` with the URLs of its locations on the image server, for `image` (a capability of
/// its own uid, a reference's too): unchanged unless it is Active and a key is loaded.
pub fn locations(delivery: Option<&Delivery>, image: &Image, mut status: ImageStatus) -> ImageStatus {
    let (Some(delivery), Some(namespace), Some(uid)) = (delivery, image.namespace(), image.uid()) else {
        return status;
    };
    let Some(key) = delivery.keys.borrow().clone() else { return status };
    if status.phase != Some(ImagePhase::Active) {
        return status;
    }
    let url = |disk: String| {
        let capability = Capability { namespace: namespace.clone(), name: image.name_any(), uid: uid.clone(), disk };
        format!("{}{}", delivery.base_url, capability.path(&key))
    };
    let own = object_of_location(&status);
    if let Some(location) = status.location.as_mut() {
        location.url = url(own);
    }
    for disk in &mut status.disks {
        if let Some(location) = disk.location.as_mut() {
            location.url = url(format!("disk-{}", disk.index));
        }
    }
    status
}

/// Loads the key of `config` (creating its Secret when missing), retrying every few seconds
/// until it has one or `stop` resolves (`None`).
pub async fn first_key(
    secrets: &Api<Secret>,
    config: &DeliveryConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Option<Key> {
    let mut stop = std::pin::pin!(stop);
    loop {
        match key::load_or_create(secrets, &config.key_secret).await {
            Ok(key) => return Some(key),
            Err(e) => tracing::error!(error = %e, "the image server waits for its key"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(3)) => {}
            _ = &mut stop => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn image(status: serde_json::Value) -> Image {
        serde_json::from_value(json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image",
            "metadata": {"name": "web", "namespace": "t", "uid": "u-1"},
            "spec": {"region": "r", "type": "FullServer", "source": {"url": {"url": "https://x/y"}}},
            "status": status}))
        .unwrap()
    }

    /// An Active FullServer's own location is its system disk's capability, each disk has its
    /// own, and all verify under the key; nothing changes before Active or without a key.
    #[test]
    fn locations_are_capabilities_of_the_image_and_its_disks() {
        let key = Key::from_bytes(&[3u8; 32]).unwrap();
        let (tx, keys) = watch::channel(None);
        let delivery = Delivery { base_url: "https://images.example".into(), keys };
        let loc = json!({"url": "file:///x", "checksum": "sha256:a", "format": "raw"});
        let status = json!({"phase": "Active", "location": loc,
            "disks": [{"index": 0, "role": "Data", "location": loc}, {"index": 1, "role": "System", "location": loc}]});
        let img = image(status.clone());
        let before = img.status.clone().unwrap();
        assert_eq!(locations(Some(&delivery), &img, before.clone()), before, "no key yet");
        tx.send(Some(key.clone())).unwrap();
        let now = locations(Some(&delivery), &img, before.clone());
        assert_ne!(now, before, "the key came: new locations");
        let path = |url: &str| url.strip_prefix("https://images.example").unwrap().to_string();
        let own = Capability::verify(&path(&now.location.as_ref().unwrap().url), &key).unwrap();
        assert_eq!((own.namespace.as_str(), own.name.as_str(), own.uid.as_str()), ("t", "web", "u-1"));
        assert_eq!(own.disk, "disk-1", "the system disk");
        let disks: Vec<String> = now
            .disks
            .iter()
            .map(|d| Capability::verify(&path(&d.location.as_ref().unwrap().url), &key).unwrap().disk)
            .collect();
        assert_eq!(disks, ["disk-0", "disk-1"]);
        assert_eq!(now.location.as_ref().unwrap().checksum, "sha256:a", "only the URL changes");
        let saving = image(json!({"phase": "Saving", "location": loc}));
        assert_eq!(locations(Some(&delivery), &saving, saving.status.clone().unwrap()), saving.status.unwrap());
    }
}
