//! The delivery key: [`KEY_BYTES`](super::token::KEY_BYTES) random bytes in the entry `hmac` of a
//! Secret of the operator namespace (`ims-image-key` unless `--image-key-secret` says otherwise),
//! created when missing. Rotating it (a new `hmac`, or deleting the Secret, which the operator
//! then creates anew) invalidates every URL at once and the operator writes the new locations.
//! A Secret whose `hmac` is not 32 bytes is not used: the operator keeps the key it had (none at
//! the start, so it waits) and says so in its log.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

use super::token::{KEY_BYTES, Key};

/// The Secret entry holding the key.
pub const KEY_ENTRY: &str = "hmac";
/// The default name of the key Secret.
pub const DEFAULT_SECRET: &str = "ims-image-key";
/// Field manager of the key Secret the operator creates.
const MANAGER: &str = "ims-operator/delivery";

/// Why the key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The API refused or did not answer.
    #[error("cannot read or create the image key Secret {namespace}/{name}: {source}")]
    Api {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The Secret holds no usable key.
    #[error(
        "the image key Secret {namespace}/{name} has no {KEY_BYTES}-byte entry `{KEY_ENTRY}`: delete it and the operator creates a new key (every image URL changes), or put {KEY_BYTES} random bytes there"
    )]
    Malformed {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// No randomness for a new key.
    #[error("cannot generate an image key: the system's random source failed")]
    Random,
}

/// The key a Secret holds, if it holds a usable one.
pub fn key_of(secret: &Secret) -> Option<Key> {
    let bytes = secret.data.as_ref()?.get(KEY_ENTRY)?;
    Key::from_bytes(&bytes.0)
}

/// A new key Secret `name`.
fn fresh(name: &str) -> Result<Secret, KeyError> {
    let bytes = Key::generate().map_err(|_| KeyError::Random)?;
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "ims-operator".to_string()),
        ("app.kubernetes.io/component".to_string(), "image-key".to_string()),
    ]);
    Ok(Secret {
        metadata: ObjectMeta { name: Some(name.to_string()), labels: Some(labels), ..Default::default() },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(KEY_ENTRY.to_string(), ByteString(bytes))])),
        ..Default::default()
    })
}

/// The key of Secret `name` in `api`'s namespace, creating the Secret with a fresh key when it
/// is missing (two replicas creating it at once agree on the one created first).
pub async fn load_or_create(api: &Api<Secret>, name: &str) -> Result<Key, KeyError> {
    let namespace = api.namespace().unwrap_or_default().to_string();
    let refused = |source| KeyError::Api { namespace: namespace.clone(), name: name.to_string(), source };
    let malformed = || KeyError::Malformed { namespace: namespace.clone(), name: name.to_string() };
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(name).await.map_err(refused)? {
            return key_of(&secret).ok_or_else(malformed);
        }
        let params = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
        match api.create(&params, &fresh(name)?).await {
            Ok(created) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), "created the image key Secret");
                return key_of(&created).ok_or_else(malformed);
            }
            // Another replica created it meanwhile: read that one.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(refused(e)),
        }
    }
    Err(malformed())
}

/// Keeps `current` holding the key of Secret `name` until dropped, from a watch of that Secret
/// alone: a new key replaces the old one (`rotated` is called), a deleted Secret is created anew
/// with a fresh key, and an unusable one is logged and ignored.
pub async fn keep_current(api: Api<Secret>, name: String, current: watch::Sender<Option<Key>>, rotated: impl Fn()) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api.clone(), config).default_backoff());
    let mut seen = false;
    while let Some(event) = events.next().await {
        let secret = match event {
            Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                seen = true;
                Some(secret)
            }
            Ok(watcher::Event::Init) => {
                seen = false;
                continue;
            }
            Ok(watcher::Event::InitDone) if seen => continue,
            // Gone (deleted, or missing after a re-list): a new key.
            Ok(watcher::Event::Delete(_) | watcher::Event::InitDone) => None,
            Err(_) => continue,
        };
        let key = match secret {
            Some(secret) => key_of(&secret).ok_or_else(|| KeyError::Malformed {
                namespace: api.namespace().unwrap_or_default().to_string(),
                name: name.clone(),
            }),
            None => load_or_create(&api, &name).await,
        };
        match key {
            Ok(key) => {
                let changed = current.send_if_modified(|now| {
                    let changed = now.as_ref() != Some(&key);
                    *now = Some(key);
                    changed
                });
                if changed {
                    tracing::info!(secret = %name, "the image key changed: every image URL is issued again");
                    rotated();
                }
            }
            Err(e) => tracing::error!(error = %e, "the image key is unusable; the previous key stays in use"),
        }
    }
}
