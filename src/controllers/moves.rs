//! Byte moves in flight, and how a move hears that its image is being deleted.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use kube::{
    ResourceExt,
    runtime::{reflector::Store, watcher},
};

use crate::api::Image;

/// Byte moves in flight, by image uid. The Image watch tells a move when its image is being
/// deleted or is gone, so a move waits on that instead of polling the cache.
#[derive(Default)]
pub struct Moves(Mutex<HashMap<String, Arc<tokio::sync::Notify>>>);

impl Moves {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Notify>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a move of the image with `uid`, until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, uid: &str) -> Moving {
        let deleted = Arc::new(tokio::sync::Notify::new());
        self.lock().insert(uid.to_string(), deleted.clone());
        Moving { moves: self.clone(), uid: uid.to_string(), deleted }
    }

    /// The image with `uid` is being deleted, or is gone.
    fn image_deleted(&self, uid: &str) {
        if let Some(deleted) = self.lock().get(uid) {
            // Stores a permit when nobody waits yet (between two disks), so it is not lost.
            deleted.notify_one();
        }
    }

    /// The Image watch's part: a deletion timestamp or a delete, and after a re-list (which
    /// reports no deletes) every moving image that is no longer there.
    pub(super) fn on_image_event(&self, event: &watcher::Event<Image>, store: &Store<Image>) {
        match event {
            watcher::Event::Apply(image) | watcher::Event::InitApply(image)
                if image.metadata.deletion_timestamp.is_some() =>
            {
                self.image_deleted(&image.uid().unwrap_or_default());
            }
            watcher::Event::Delete(image) => self.image_deleted(&image.uid().unwrap_or_default()),
            watcher::Event::InitDone => {
                let present: std::collections::HashSet<String> = store.state().iter().filter_map(|i| i.uid()).collect();
                let gone: Vec<String> = self.lock().keys().filter(|uid| !present.contains(*uid)).cloned().collect();
                for uid in gone {
                    self.image_deleted(&uid);
                }
            }
            _ => {}
        }
    }
}

/// One registered byte move (see [`Moves::start`]).
pub struct Moving {
    moves: Arc<Moves>,
    uid: String,
    deleted: Arc<tokio::sync::Notify>,
}

impl Moving {
    /// Resolves when the Image watch reports the image deleted (or gone).
    pub async fn deleted(&self) {
        self.deleted.notified().await;
    }
}

impl Drop for Moving {
    fn drop(&mut self) {
        self.moves.lock().remove(&self.uid);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::runtime::reflector;

    use super::*;

    fn image(uid: &str, deleting: bool) -> Image {
        super::super::test_image(uid, uid, deleting)
    }

    async fn told(moving: &Moving) -> bool {
        tokio::time::timeout(Duration::from_millis(50), moving.deleted()).await.is_ok()
    }

    #[tokio::test]
    async fn a_move_hears_of_its_image_being_deleted_or_gone_after_a_relist() {
        let (store, mut writer) = reflector::store::<Image>();
        let moves = Arc::new(Moves::default());
        let (a, b, c) = (moves.start("a"), moves.start("b"), moves.start("c"));
        for uid in ["a", "b", "c"] {
            writer.apply_watcher_event(&watcher::Event::Apply(image(uid, false)));
        }

        // An update that does not delete tells nobody.
        moves.on_image_event(&watcher::Event::Apply(image("a", false)), &store);
        assert!(!told(&a).await);
        // A deletion timestamp tells that image's move, and only it; told before it waits.
        moves.on_image_event(&watcher::Event::Apply(image("a", true)), &store);
        assert!(!told(&b).await);
        assert!(told(&a).await);
        // A delete event.
        moves.on_image_event(&watcher::Event::Delete(image("b", false)), &store);
        assert!(told(&b).await);
        // A re-list reports no deletes: the moves whose image is not in the new list are told.
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(image("a", true)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        moves.on_image_event(&watcher::Event::InitDone, &store);
        assert!(told(&c).await);

        // A finished move is forgotten.
        drop(c);
        assert!(!moves.lock().contains_key("c"));
        assert_eq!(moves.lock().len(), 2);
    }
}
