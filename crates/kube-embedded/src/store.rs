//! The objects and their change history: one global resourceVersion counter, as etcd's revision.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use serde_json::Value;
use tokio::sync::broadcast;

/// A subscription to the changes to come.
pub type Feed = broadcast::Receiver<Arc<Change>>;

/// resourceVersion of an empty store.
pub const FIRST_RV: u64 = 1000;

/// Where an object lives: kind index, namespace ("" for cluster-scoped), name.
pub type Key = (usize, String, String);

/// Type of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// As written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change.
#[derive(Debug)]
pub struct Change {
    /// resourceVersion of the change.
    pub rv: u64,
    /// Kind index.
    pub kind: usize,
    /// What happened.
    pub typ: EventType,
    /// The object after the change (for Deleted: the last state, with the deletion's rv).
    pub object: Arc<Value>,
    /// The object before the change (Modified only), to turn selector transitions into
    /// ADDED/DELETED as kube-apiserver does.
    pub old: Option<Arc<Value>>,
}

/// The objects, the history of changes (for watch resume) and the change feed.
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    /// Lowest resourceVersion a watch may resume from.
    compacted: u64,
    feed: broadcast::Sender<Arc<Change>>,
}

impl Store {
    /// An empty store keeping at most `history_limit` changes for watch resume.
    pub fn new(history_limit: usize) -> Self {
        let (feed, _) = broadcast::channel(16 * 1024);
        // Start where a cluster with some history would be, so that resourceVersions from
        // nowhere (such as "1") are older than the history kept and answer 410 Gone.
        Store {
            rv: FIRST_RV,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: FIRST_RV,
            feed,
        }
    }

    /// The current resourceVersion (of the last change).
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The next resourceVersion, reserved for a change.
    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// One object.
    pub fn get(&self, key: &Key) -> Option<Arc<Value>> {
        self.objects.get(key).cloned()
    }

    /// Objects of a kind, in a namespace (None: all), ordered by namespace and name.
    pub fn list(&self, kind: usize, namespace: Option<&str>) -> Vec<Arc<Value>> {
        let start = (kind, namespace.unwrap_or("").to_string(), String::new());
        self.objects
            .range(start..)
            .take_while(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|want| want == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Keys of every object in a namespace, any kind.
    pub fn keys_in_namespace(&self, namespace: &str) -> Vec<Key> {
        self.objects.keys().filter(|(_, ns, _)| ns == namespace).cloned().collect()
    }

    /// Stores `object` (its resourceVersion already set to `rv`) and records the change.
    pub fn put(&mut self, key: Key, object: Value, rv: u64) -> Arc<Value> {
        let object = Arc::new(object);
        let old = self.objects.insert(key.clone(), object.clone());
        let typ = if old.is_some() { EventType::Modified } else { EventType::Added };
        self.record(Change { rv, kind: key.0, typ, object: object.clone(), old });
        object
    }

    /// Removes an object; `last` is its final state (resourceVersion of the deletion).
    pub fn remove(&mut self, key: &Key, last: Value, rv: u64) -> Arc<Value> {
        let last = Arc::new(last);
        if self.objects.remove(key).is_some() {
            self.record(Change { rv, kind: key.0, typ: EventType::Deleted, object: last.clone(), old: None });
        }
        last
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        let _ = self.feed.send(change);
    }

    /// Changes after `rv` of one kind, and a subscription to the ones to come, or None when
    /// `rv` is older than the history kept (410 Gone).
    pub fn changes_since(&self, kind: usize, rv: u64) -> Option<(Vec<Arc<Change>>, Feed)> {
        if rv < self.compacted {
            return None;
        }
        let backlog = self.history.iter().filter(|c| c.kind == kind && c.rv > rv).cloned().collect();
        Some((backlog, self.feed.subscribe()))
    }

    /// A subscription to changes to come.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.feed.subscribe()
    }
}
