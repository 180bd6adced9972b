//! Watch: a stream of `{"type": .., "object": ..}` lines, resumable from a resourceVersion,
//! with bookmarks, timeouts and 410 Gone for a resourceVersion older than the history kept.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast::error::RecvError, mpsc};

use super::{
    Inner,
    errors::ApiError,
    selector::{FieldSelector, LabelSelector},
    store::{Change, EventType},
    verbs::{Query, Target},
};

fn line(typ: &str, object: &Value) -> Bytes {
    let mut out = serde_json::to_vec(&json!({"type": typ, "object": object})).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let in_namespace = self
            .namespace
            .as_deref()
            .is_none_or(|ns| obj.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str) == Some(ns));
        in_namespace && Inner::selected(obj, &self.labels, &self.fields)
    }

    /// The event a watcher with this filter sees for a change, if any.
    fn view(&self, change: &Change) -> Option<Bytes> {
        let now = self.matches(&change.object);
        match change.typ {
            EventType::Added | EventType::Deleted => now.then(|| line(change.typ.as_str(), &change.object)),
            EventType::Modified => {
                let before = change.old.as_deref().is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => Some(line("MODIFIED", &change.object)),
                    (false, true) => Some(line("ADDED", &change.object)),
                    (true, false) => Some(line("DELETED", &change.object)),
                    (false, false) => None,
                }
            }
        }
    }
}

impl Inner {
    /// Starts a watch; the receiver yields the lines of the response body.
    pub fn watch(self: &Arc<Self>, target: &Target, query: &Query) -> Result<mpsc::Receiver<Bytes>, ApiError> {
        let (labels, fields) = self.selectors(&self.kinds[target.kind], query)?;
        let mut filter = Filter { namespace: target.namespace.clone(), labels, fields };
        if let Some(name) = &target.name {
            filter.fields = FieldSelector::parse(&format!("metadata.name={name}")).map_err(ApiError::bad_request)?;
        }
        let since = match query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(rv) => {
                Some(rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?)
            }
        };
        let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let store = self.store.lock().map_err(|_| ApiError::bad_request("store poisoned"))?;
        let mut initial = Vec::new();
        let feed = match since {
            None => {
                for obj in store.list(target.kind, target.namespace.as_deref()) {
                    if filter.matches(&obj) {
                        initial.push(line("ADDED", &obj));
                    }
                }
                store.subscribe()
            }
            Some(rv) => match store.changes_since(target.kind, rv) {
                Some((backlog, feed)) => {
                    initial.extend(backlog.iter().filter_map(|c| filter.view(c)));
                    feed
                }
                None => {
                    let gone = line("ERROR", &ApiError::gone(rv).to_status());
                    drop(store);
                    let _ = tx.try_send(gone);
                    return Ok(rx);
                }
            },
        };
        let mut last_rv = store.rv();
        drop(store);
        let kind = target.kind;
        let api_version = self.kinds[kind].api_version();
        let kind_name = self.kinds[kind].kind.clone();
        let bookmark_every = self.bookmark_every;
        let mut feed = feed;
        tokio::spawn(async move {
            for l in initial {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut ticker = tokio::time::interval(bookmark_every);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = tx.closed() => return,
                    _ = ticker.tick(), if bookmarks => {
                        let bookmark = json!({"kind": kind_name, "apiVersion": api_version, "metadata": {"resourceVersion": last_rv.to_string()}});
                        if tx.send(line("BOOKMARK", &bookmark)).await.is_err() {
                            return;
                        }
                    }
                    change = feed.recv() => match change {
                        Ok(change) => {
                            last_rv = change.rv;
                            if change.kind != kind {
                                continue;
                            }
                            if let Some(l) = filter.view(&change)
                                && tx.send(l).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(RecvError::Lagged(_)) => {
                            let _ = tx.send(line("ERROR", &ApiError::gone(last_rv).to_status())).await;
                            return;
                        }
                        Err(RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(rx)
    }
}
