//! Uploads of captured volumes: the mover Job `PUT`s a claim's bytes to
//! `/v1/uploads/<namespace>/<name>/<uid>/<disk>` with `Authorization: Bearer <token>`, the token
//! of a Secret made for that one capture.
//!
//! A capture that waits for its bytes registers the path with the sha256 of its token
//! ([`Uploads::expect`]); the first request with that path and token takes the registration
//! ([`Uploads::take`]), so a token serves once. Any other request (unknown path, wrong or reused
//! token, a capture that ended) gets the same `404` as an unknown image: no oracle. Only the
//! digests of tokens are kept in memory; they are compared whole, so the time a refusal takes
//! says nothing about the token.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

/// An upload in progress, handed to the capture that waits for it.
pub struct Upload {
    /// The `Content-Length` the mover announced.
    pub length: u64,
    /// The body, chunk by chunk; an `Err` says why it broke off (and ends it).
    pub body: mpsc::Receiver<Result<Bytes, String>>,
    /// The outcome the mover is answered with: `Ok` once the bytes are stored and verified,
    /// `Err` with the reason shown in the image's status.
    pub answer: oneshot::Sender<Result<(), String>>,
}

struct Pending {
    id: u64,
    token: [u8; 32],
    sender: oneshot::Sender<Upload>,
}

/// The uploads the captures in flight wait for.
#[derive(Default)]
pub struct Uploads {
    pending: Mutex<(u64, HashMap<String, Pending>)>,
}

/// A capture's registration; dropping it withdraws the registration (if not taken yet).
pub struct Waiting {
    uploads: Arc<Uploads>,
    path: String,
    id: u64,
    /// Resolves when the upload starts.
    pub upload: oneshot::Receiver<Upload>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut pending = self.uploads.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.1.get(&self.path).is_some_and(|p| p.id == self.id) {
            pending.1.remove(&self.path);
        }
    }
}

impl Uploads {
    /// Registers `path` for one upload authenticated by `token` (replacing an earlier one).
    pub fn expect(self: &Arc<Self>, path: String, token: &str) -> Waiting {
        let (sender, upload) = oneshot::channel();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.0 += 1;
        let id = pending.0;
        pending.1.insert(path.clone(), Pending { id, token: digest(token), sender });
        Waiting { uploads: self.clone(), path, id, upload }
    }

    /// Takes the registration of `path` if `bearer` is its token: the way to hand the capture its
    /// upload. `None` for anything else.
    pub fn take(&self, path: &str, bearer: Option<&str>) -> Option<oneshot::Sender<Upload>> {
        let presented = digest(bearer?);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.1.get(path)?.token != presented {
            return None;
        }
        pending.1.remove(path).map(|p| p.sender)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The upload path of disk `disk` (its object name) of the Image `namespace/name` with `uid`.
pub fn path(namespace: &str, name: &str, uid: &str, disk: &str) -> String {
    format!("{PREFIX}{namespace}/{name}/{uid}/{disk}")
}

/// Where upload paths start.
pub const PREFIX: &str = "/v1/uploads/";

/// A new one-time token: 32 random bytes, hex.
pub fn new_token() -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_serves_once_for_its_path_only() {
        let uploads = Arc::new(Uploads::default());
        let waiting = uploads.expect(path("t", "i", "u", "disk"), "secret");
        assert!(uploads.take(&path("t", "i", "u", "disk"), Some("wrong")).is_none(), "wrong token");
        assert!(uploads.take(&path("t", "j", "u", "disk"), Some("secret")).is_none(), "other path");
        assert!(uploads.take(&path("t", "i", "u", "disk"), None).is_none(), "no token");
        assert!(uploads.take(&path("t", "i", "u", "disk"), Some("secret")).is_some(), "its token");
        assert!(uploads.take(&path("t", "i", "u", "disk"), Some("secret")).is_none(), "reused");
        drop(waiting);
    }

    #[test]
    fn a_withdrawn_registration_takes_nothing_and_spares_its_successor() {
        let uploads = Arc::new(Uploads::default());
        let first = uploads.expect("/p".into(), "a");
        let second = uploads.expect("/p".into(), "b");
        drop(first);
        assert!(uploads.take("/p", Some("a")).is_none(), "replaced");
        drop(second);
        assert!(uploads.take("/p", Some("b")).is_none(), "withdrawn");
        let _third = uploads.expect("/p".into(), "c");
        assert!(uploads.take("/p", Some("c")).is_some());
    }
}
