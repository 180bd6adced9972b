//! Capability URLs: `/v1/images/<namespace>/<name>/<uid>/<disk>/<token>`, where the token is
//! the unpadded base64url HMAC-SHA256, under the delivery key, of the other four (each
//! length-prefixed, after a version tag). Whoever holds the URL may read that disk of that
//! Image while the Image allows it; changing any part, or the key, makes it unknown.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::hmac;

/// The prefix of every capability path.
pub const PREFIX: &str = "/v1/images/";
/// Bytes of a delivery key.
pub const KEY_BYTES: usize = 32;
const VERSION: &[u8] = b"ims-delivery-v1";

/// The delivery key (from the Secret's `hmac` entry). Two keys are equal when their bytes are.
#[derive(Clone)]
pub struct Key {
    hmac: hmac::Key,
    /// A digest of the bytes, to tell a rotation from a re-read of the same key.
    id: [u8; 32],
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.id == other.id
    }
}

impl Eq for Key {}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from its bytes; `None` unless there are [`KEY_BYTES`] of them.
    pub fn from_bytes(bytes: &[u8]) -> Option<Key> {
        let id = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = <[u8; 32]>::try_from(id.as_ref()).ok()?;
        (bytes.len() == KEY_BYTES).then(|| Key { hmac: hmac::Key::new(hmac::HMAC_SHA256, bytes), id })
    }

    /// Fresh random key bytes, for a new Secret.
    pub fn generate() -> Result<Vec<u8>, ring::error::Unspecified> {
        let mut bytes = vec![0u8; KEY_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)?;
        Ok(bytes)
    }
}

/// What a capability grants: one disk (`disk`, or `disk-<index>` of a FullServer) of one Image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// The Image's namespace.
    pub namespace: String,
    /// The Image's name.
    pub name: String,
    /// The Image's uid: a re-created Image of the same name is another image.
    pub uid: String,
    /// The object under the image's prefix.
    pub disk: String,
}

impl Capability {
    fn message(&self) -> Vec<u8> {
        let mut m = VERSION.to_vec();
        for part in [&self.namespace, &self.name, &self.uid, &self.disk] {
            m.extend_from_slice(&(part.len() as u32).to_be_bytes());
            m.extend_from_slice(part.as_bytes());
        }
        m
    }

    /// The URL path of this capability under `key`.
    pub fn path(&self, key: &Key) -> String {
        let tag = hmac::sign(&key.hmac, &self.message());
        let token = URL_SAFE_NO_PAD.encode(tag.as_ref());
        format!("{PREFIX}{}/{}/{}/{}/{token}", self.namespace, self.name, self.uid, self.disk)
    }

    /// The capability a request path carries, if its token is right under `key` (checked in
    /// constant time); `None` for any other path, so every wrong URL is the same unknown one.
    pub fn verify(path: &str, key: &Key) -> Option<Capability> {
        let rest = path.strip_prefix(PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [namespace, name, uid, disk, token] = parts.as_slice() else { return None };
        let fine = |s: &str| {
            !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        if ![namespace, name, uid, disk].iter().all(|s| fine(s)) {
            return None;
        }
        let capability = Capability {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
            disk: disk.to_string(),
        };
        let tag = URL_SAFE_NO_PAD.decode(token).ok()?;
        hmac::verify(&key.hmac, &capability.message(), &tag).ok()?;
        Some(capability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capability() -> Capability {
        Capability {
            namespace: "tenant-a".into(),
            name: "ubuntu".into(),
            uid: "0b6f9d3e-8f4c-4d8e-9a51-2f0d5c7e1a22".into(),
            disk: "disk".into(),
        }
    }

    /// A path verifies under its key and names what it was made for; any change to any part,
    /// or another key, and it is unknown.
    #[test]
    fn a_capability_verifies_only_as_issued() {
        let key = Key::from_bytes(&Key::generate().unwrap()).unwrap();
        let path = capability().path(&key);
        assert!(path.starts_with("/v1/images/tenant-a/ubuntu/0b6f9d3e-8f4c-4d8e-9a51-2f0d5c7e1a22/disk/"), "{path}");
        assert_eq!(Capability::verify(&path, &key), Some(capability()));
        let other = Key::from_bytes(&Key::generate().unwrap()).unwrap();
        assert_eq!(Capability::verify(&path, &other), None, "rotated key");
        let token = path.rsplit('/').next().unwrap();
        let tampered = [
            path.replace("tenant-a", "tenant-b"),
            path.replace("/ubuntu/", "/ubuntu2/"),
            path.replace("0b6f9d3e", "0b6f9d3f"),
            path.replace("/disk/", "/disk-1/"),
            path.replace(token, &token[1..]),
            format!("{path}x"),
            format!("{path}/"),
            path.replace("/v1/", "/v2/"),
            String::new(),
            "/v1/images/a/b/c/d/".into(),
        ];
        for bad in tampered {
            assert_eq!(Capability::verify(&bad, &key), None, "{bad}");
        }
        // Length prefixes: moving a boundary between parts changes the message.
        let shifted = Capability { namespace: "tenant-au".into(), name: "buntu".into(), ..capability() };
        assert_ne!(shifted.path(&key).rsplit('/').next(), Some(token));
    }

    #[test]
    fn a_key_has_32_bytes() {
        assert!(Key::from_bytes(&[0u8; 31]).is_none());
        assert!(Key::from_bytes(&[0u8; 32]).is_some());
        assert_ne!(Key::generate().unwrap(), Key::generate().unwrap());
        assert_eq!(Key::from_bytes(&[1u8; 32]), Key::from_bytes(&[1u8; 32]));
        assert_ne!(Key::from_bytes(&[1u8; 32]), Key::from_bytes(&[2u8; 32]));
    }
}
