//! The KMS that wraps data keys. A Region names its provider (`spec.kms`, the local one when
//! unset):
//!
//! - **`Local`**: the Secret `ims-kms-keys` of the operator namespace holds the keys, one data
//!   entry per key id, each 32 random bytes. A data key is wrapped with AES-256-GCM under the
//!   entry named by `encryption.kmsKeyID` (random 12-byte nonce, the key id as additional data).
//!   The Secret is watched: a removed entry makes its images unavailable at once, a restored one
//!   available again. The operator never writes this Secret (`ims-operator local` makes one for
//!   its examples).
//! - **`AWS`**: the AWS KMS API (`GenerateDataKey`, `Decrypt`) at the Region's endpoint. Data
//!   keys it opens are kept in memory for [`AWS_CACHE`], so serving an image costs no KMS call
//!   per request; a key disabled in the KMS stops its images within that time.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::aws::{AwsError, AwsKms};

/// The default name of the local provider's key Secret.
pub const DEFAULT_SECRET: &str = "ims-kms-keys";
/// How long a data key the AWS KMS opened is kept in memory.
pub const AWS_CACHE: Duration = Duration::from_secs(60);

/// Why a data key cannot be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KmsError {
    /// The key is missing, disabled or refused: nothing changes until someone fixes the key.
    #[error("{0}")]
    Unavailable(String),
    /// No answer (yet): retrying may help.
    #[error("{0}")]
    Transient(String),
}

/// A data key: 32 random bytes, wiped when dropped.
pub struct DataKey(pub [u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// The entries of the local provider's key Secret: key id to key bytes.
pub type KeyEntries = Arc<BTreeMap<String, Vec<u8>>>;

/// Data keys the AWS KMS opened lately: by the hash of (key id, wrapped key), when and what.
type Opened = Arc<Mutex<HashMap<[u8; 32], (Instant, [u8; 32])>>>;

/// The local provider's keys, as the watch of their Secret last saw them: `None` until the
/// first list, then the Secret's entries (none when it does not exist).
#[derive(Clone, Debug)]
pub struct LocalKeys {
    /// The Secret's `namespace/name`, for messages.
    pub secret: String,
    /// Its entries.
    pub keys: watch::Receiver<Option<KeyEntries>>,
}

impl LocalKeys {
    /// Keys that never change (tests, and `local` before its watch runs).
    pub fn fixed(secret: &str, keys: BTreeMap<String, Vec<u8>>) -> LocalKeys {
        // A receiver keeps the last value after its sender is gone.
        let (_, rx) = watch::channel(Some(Arc::new(keys)));
        LocalKeys { secret: secret.to_string(), keys: rx }
    }

    fn key(&self, key_id: &str) -> Result<LessSafeKey, KmsError> {
        let keys = self.keys.borrow().clone();
        let Some(keys) = keys else {
            return Err(KmsError::Transient(format!("the KMS keys in Secret {} are not loaded yet", self.secret)));
        };
        let Some(bytes) = keys.get(key_id) else {
            return Err(KmsError::Unavailable(format!(
                "KMS key {key_id:?} is not in Secret {} (provider Local): add an entry {key_id} of 32 random bytes, or restore the one that was removed",
                self.secret
            )));
        };
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| {
            KmsError::Unavailable(format!(
                "entry {key_id} of Secret {} holds {} bytes: a local KMS key is 32 random bytes",
                self.secret,
                bytes.len()
            ))
        })?;
        Ok(LessSafeKey::new(key))
    }
}

/// One Region's KMS.
#[derive(Clone, Debug)]
pub enum Kms {
    /// Keys in a Secret of the operator namespace.
    Local(LocalKeys),
    /// The AWS KMS API, with the data keys it opened lately.
    Aws(AwsKms, Opened),
}

impl Kms {
    /// An AWS KMS provider.
    pub fn aws(client: AwsKms) -> Kms {
        Kms::Aws(client, Arc::default())
    }

    /// The provider's name, as the header of an encrypted object records it.
    pub fn provider(&self) -> &'static str {
        match self {
            Kms::Local(_) => "local",
            Kms::Aws(..) => "aws",
        }
    }

    /// A new data key and its wrapped form, under `key_id`.
    pub async fn generate(&self, key_id: &str) -> Result<(DataKey, Vec<u8>), KmsError> {
        match self {
            Kms::Local(keys) => {
                let kek = keys.key(key_id)?;
                let random = SystemRandom::new();
                let mut data = DataKey([0; 32]);
                let mut nonce = [0u8; 12];
                random
                    .fill(&mut data.0)
                    .map_err(|_| KmsError::Transient("the system's random source failed".into()))?;
                random.fill(&mut nonce).map_err(|_| KmsError::Transient("the system's random source failed".into()))?;
                let mut wrapped = data.0.to_vec();
                kek.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), aad(key_id), &mut wrapped)
                    .map_err(|_| KmsError::Transient("wrapping the data key failed".into()))?;
                let mut out = nonce.to_vec();
                out.extend(wrapped);
                Ok((data, out))
            }
            Kms::Aws(client, _) => {
                let (key, blob) = client.generate_data_key(key_id).await.map_err(aws_error)?;
                Ok((DataKey(key), blob))
            }
        }
    }

    /// The data key `wrapped` holds, under `key_id`. With `cached`, the AWS provider may answer
    /// from the data keys it opened in the last [`AWS_CACHE`]; without, it asks the KMS.
    pub async fn unwrap(&self, key_id: &str, wrapped: &[u8], cached: bool) -> Result<DataKey, KmsError> {
        match self {
            Kms::Local(keys) => {
                let kek = keys.key(key_id)?;
                let refused = || {
                    KmsError::Unavailable(format!(
                        "the data key does not open with KMS key {key_id:?} of Secret {}: the entry was replaced by another key; restore the one the image was encrypted with",
                        keys.secret
                    ))
                };
                if wrapped.len() != 12 + 32 + 16 {
                    return Err(refused());
                }
                let nonce = Nonce::try_assume_unique_for_key(&wrapped[..12]).map_err(|_| refused())?;
                let mut sealed = wrapped[12..].to_vec();
                let plain = kek.open_in_place(nonce, aad(key_id), &mut sealed).map_err(|_| refused())?;
                let mut data = DataKey([0; 32]);
                data.0.copy_from_slice(plain);
                zeroize::Zeroize::zeroize(&mut sealed);
                Ok(data)
            }
            Kms::Aws(client, cache) => {
                let id: [u8; 32] =
                    Sha256::new().chain_update(key_id).chain_update([0]).chain_update(wrapped).finalize().into();
                if let Some((at, key)) = cache.lock().ok().and_then(|c| c.get(&id).copied())
                    && cached
                    && at.elapsed() < AWS_CACHE
                {
                    return Ok(DataKey(key));
                }
                let key = client.decrypt(key_id, wrapped).await.map_err(aws_error)?;
                if let Ok(mut cache) = cache.lock() {
                    cache.retain(|_, (at, _)| at.elapsed() < AWS_CACHE);
                    cache.insert(id, (Instant::now(), key));
                }
                Ok(DataKey(key))
            }
        }
    }
}

fn aad(key_id: &str) -> Aad<Vec<u8>> {
    Aad::from(format!("ims-operator local kms:{key_id}").into_bytes())
}

fn aws_error(e: AwsError) -> KmsError {
    match e {
        AwsError::Refused(m) => KmsError::Unavailable(m),
        AwsError::Transient(m) => KmsError::Transient(m),
    }
}

/// Keeps `current` holding the entries of Secret `name` (of `api`'s namespace) until dropped;
/// calls `changed` after each change of them, once the first list is in.
pub async fn keep_local_keys(
    api: Api<Secret>,
    name: String,
    current: watch::Sender<Option<KeyEntries>>,
    changed: impl Fn() + Send,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let entries = |s: &Secret| {
        Arc::new(s.data.as_ref().map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()).unwrap_or_default())
    };
    let mut listed: Option<KeyEntries> = None;
    while let Some(event) = events.next().await {
        let next = match event {
            Ok(watcher::Event::Init) => {
                listed = Some(Arc::default());
                continue;
            }
            Ok(watcher::Event::InitApply(secret)) => {
                listed = Some(entries(&secret));
                continue;
            }
            Ok(watcher::Event::InitDone) => listed.take().unwrap_or_default(),
            Ok(watcher::Event::Apply(secret)) => entries(&secret),
            Ok(watcher::Event::Delete(_)) => Arc::default(),
            Err(e) => {
                tracing::warn!(error = %e, secret = %name, "watching the KMS key Secret");
                continue;
            }
        };
        let same = current.borrow().as_ref().is_some_and(|now| **now == *next);
        if !same {
            current.send_replace(Some(next));
            tracing::info!(secret = %name, "the local KMS keys changed");
            changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(keys: &[(&str, Vec<u8>)]) -> Kms {
        Kms::Local(LocalKeys::fixed(
            "ims-system/ims-kms-keys",
            keys.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        ))
    }

    #[tokio::test]
    async fn local_keys_wrap_and_unwrap_and_say_what_is_wrong() {
        let kms = local(&[("k1", vec![1; 32]), ("k2", vec![2; 32]), ("short", vec![3; 16])]);
        let (data, wrapped) = kms.generate("k1").await.unwrap();
        assert_eq!(wrapped.len(), 60);
        assert!(!wrapped.windows(32).any(|w| w == data.0), "the data key is not stored in the clear");
        assert_eq!(kms.unwrap("k1", &wrapped, true).await.unwrap().0, data.0);
        let (other, _) = kms.generate("k1").await.unwrap();
        assert_ne!(other.0, data.0, "every data key is new");

        let missing = kms.generate("nope").await.unwrap_err();
        assert!(
            matches!(&missing, KmsError::Unavailable(m) if m.contains("\"nope\" is not in Secret ims-system/ims-kms-keys")),
            "{missing}"
        );
        let short = kms.generate("short").await.unwrap_err();
        assert!(matches!(&short, KmsError::Unavailable(m) if m.contains("holds 16 bytes")), "{short}");
        // Another key's wrapping, or a tampered one, does not open.
        assert!(matches!(kms.unwrap("k2", &wrapped, true).await, Err(KmsError::Unavailable(_))));
        let mut tampered = wrapped.clone();
        tampered[20] ^= 1;
        assert!(matches!(kms.unwrap("k1", &tampered, true).await, Err(KmsError::Unavailable(_))));
        // The entry replaced: the old wrapping says so.
        let replaced = local(&[("k1", vec![9; 32])]);
        let err = replaced.unwrap("k1", &wrapped, true).await.unwrap_err();
        assert!(err.to_string().contains("was replaced"), "{err}");
    }

    #[tokio::test]
    async fn keys_not_loaded_yet_are_transient() {
        let (_tx, rx) = watch::channel(None);
        let kms = Kms::Local(LocalKeys { secret: "s".into(), keys: rx });
        assert!(matches!(kms.generate("k").await, Err(KmsError::Transient(_))));
    }
}
