//! In-memory indexes over the reflector caches, kept current by the same watch events, so a
//! change to one object finds the objects that depend on it in O(dependents) — no LIST, no
//! scan of the whole cache.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use kube::{Resource, ResourceExt, runtime::reflector::ObjectRef};

/// `(namespace, name)` of an indexed target.
pub type Key = (String, String);

/// Objects of kind `K` by the target they point at (e.g. references by their source image).
pub struct Index<K: Resource<DynamicType = ()>> {
    key_of: fn(&K) -> Option<Key>,
    inner: Mutex<Inner<K>>,
}

struct Inner<K: Resource<DynamicType = ()>> {
    by_key: HashMap<Key, HashSet<ObjectRef<K>>>,
    keys: HashMap<ObjectRef<K>, Key>,
}

impl<K: Resource<DynamicType = ()>> Index<K> {
    /// An empty index; `key_of` names what an object points at (`None`: not indexed).
    pub fn new(key_of: fn(&K) -> Option<Key>) -> Self {
        Index { key_of, inner: Mutex::new(Inner { by_key: HashMap::new(), keys: HashMap::new() }) }
    }

    /// Records `obj` (created or changed).
    pub fn upsert(&self, obj: &K) {
        let key = (self.key_of)(obj);
        let Ok(mut inner) = self.inner.lock() else { return };
        let at = ObjectRef::from_obj(obj);
        inner.remove(&at);
        if let Some(key) = key {
            inner.by_key.entry(key.clone()).or_default().insert(at.clone());
            inner.keys.insert(at, key);
        }
    }

    /// Forgets `obj` (deleted).
    pub fn remove(&self, obj: &K) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.remove(&ObjectRef::from_obj(obj));
        }
    }

    /// Rebuilds the index from a full list (after a watch re-list).
    pub fn rebuild<'a>(&self, all: impl Iterator<Item = &'a K>)
    where
        K: 'a,
    {
        if let Ok(mut inner) = self.inner.lock() {
            inner.by_key.clear();
            inner.keys.clear();
        }
        for obj in all {
            self.upsert(obj);
        }
    }

    /// The objects pointing at `key`.
    pub fn get(&self, namespace: &str, name: &str) -> Vec<ObjectRef<K>> {
        let Ok(inner) = self.inner.lock() else { return Vec::new() };
        inner
            .by_key
            .get(&(namespace.to_string(), name.to_string()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl<K: Resource<DynamicType = ()>> Inner<K> {
    fn remove(&mut self, at: &ObjectRef<K>) {
        if let Some(old) = self.keys.remove(at)
            && let Some(set) = self.by_key.get_mut(&old)
        {
            set.remove(at);
            if set.is_empty() {
                self.by_key.remove(&old);
            }
        }
    }
}

/// The key of an ImageShare: the image it shares.
pub fn share_target(share: &crate::api::ImageShare) -> Option<Key> {
    Some((share.namespace()?, share.spec.image.clone()))
}

/// The key of a copying Image: the image of its namespace it copies.
pub fn copy_target(image: &crate::api::Image) -> Option<Key> {
    Some((image.namespace()?, image.spec.source.copy.as_ref()?.name.clone()))
}

/// The key of an ImageCopy: its source image.
pub fn image_copy_target(copy: &crate::api::ImageCopy) -> Option<Key> {
    Some((copy.namespace()?, copy.spec.source.clone()))
}

/// The key of a reference Image: its source.
pub fn reference_target(image: &crate::api::Image) -> Option<Key> {
    image.spec.source.image.as_ref().map(|r| (r.namespace.clone(), r.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Image, ImageSpec};

    fn reference(ns: &str, name: &str, to: Option<&str>) -> Image {
        let source = match to {
            Some(to) => serde_json::json!({"image": {"namespace": "owner", "name": to}}),
            None => serde_json::json!({"url": {"url": "https://x/y"}}),
        };
        let spec: ImageSpec = serde_json::from_value(serde_json::json!({"region": "r", "source": source})).unwrap();
        let mut i = Image::new(name, spec);
        i.metadata.namespace = Some(ns.into());
        i
    }

    #[test]
    fn follows_upserts_removals_and_rebuilds() {
        let index = Index::new(reference_target);
        let a = reference("t1", "a", Some("img"));
        let b = reference("t2", "b", Some("img"));
        index.upsert(&a);
        index.upsert(&b);
        index.upsert(&reference("t3", "owned", None));
        let mut found: Vec<String> = index.get("owner", "img").into_iter().map(|r| r.name).collect();
        found.sort();
        assert_eq!(found, ["a", "b"]);
        index.upsert(&reference("t1", "a", Some("other")));
        assert_eq!(index.get("owner", "img").len(), 1);
        assert_eq!(index.get("owner", "other").len(), 1);
        index.remove(&b);
        assert!(index.get("owner", "img").is_empty());
        index.rebuild([a.clone(), b.clone()].iter());
        assert_eq!(index.get("owner", "img").len(), 2);
        assert!(index.get("owner", "other").is_empty(), "a rebuild drops what is gone");
    }
}
