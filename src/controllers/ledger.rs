//! The quota ledger's I/O: the `default` ImageQuota of each namespace, written by one task per
//! namespace in the leader. Requests (admit, finish, release, refresh) queue up while a write is
//! in flight; the task then applies all that queued ([`crate::policy::quota::settle`]) and
//! writes the result with one compare-and-swap (a status update carrying the resourceVersion it
//! read), so N concurrent admissions cost O(N / batch) writes instead of N writes and O(N²)
//! conflicts. The CAS keeps it exact across restarts and replicas: a write that lost re-reads
//! the ledger and applies the batch again.
//!
//! The task also knows who waits: an image refused for room, or admitted without an import
//! slot, is woken (re-run through the Image controller's triggers) when its turn can have come,
//! not on every ledger change.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::channel::mpsc::UnboundedSender;
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use tokio::sync::{mpsc, oneshot};

use super::Error;
use crate::{
    api::{Image, ImagePhase, ImageQuota, ImageQuotaSpec, ImageQuotaStatus, QUOTA_NAME},
    metrics::Metrics,
    policy::{
        Policy,
        quota::{Answer, InLine, Line, Request, limits, room, settle},
    },
};

/// Field manager of the ledger.
pub const MANAGER: &str = "ims-operator/quota";

/// How many times a batch is re-applied after losing a compare-and-swap before its requests fail
/// (and are retried by their reconciles).
const ATTEMPTS: usize = 20;

/// Most requests applied in one write.
const BATCH: usize = 5000;

/// The ledgers of every namespace.
pub struct Ledger {
    books: Arc<Books>,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Pending>>>,
}

/// What every namespace's task shares.
struct Books {
    client: Client,
    policy: Policy,
    images: Store<Image>,
    wake: UnboundedSender<ObjectRef<Image>>,
    metrics: Arc<Metrics>,
}

struct Pending {
    request: Request,
    reply: oneshot::Sender<Result<Answer, String>>,
}

/// What a waiting image waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Place,
    Import,
    CrossRegion,
}

#[derive(Debug, Clone)]
struct Waiter {
    name: String,
    region: String,
    line: Line,
    what: Wait,
}

impl Ledger {
    /// Ledgers written through `client`; waiting images are woken through `wake`.
    pub fn new(
        client: Client,
        policy: Policy,
        images: Store<Image>,
        wake: UnboundedSender<ObjectRef<Image>>,
        metrics: Arc<Metrics>,
    ) -> Ledger {
        Ledger { books: Arc::new(Books { client, policy, images, wake, metrics }), queues: Mutex::default() }
    }

    /// Applies `request` to the ledger of `namespace` (with whatever else is queued for it) and
    /// answers once it is written. An applicant that has to wait is woken when its turn can
    /// have come.
    pub async fn ask(&self, namespace: &str, request: Request) -> Result<Answer, Error> {
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending { request, reply };
        for _ in 0..2 {
            let queue = {
                let mut queues = self.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                queues
                    .entry(namespace.to_string())
                    .or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        tokio::spawn(serve(self.books.clone(), namespace.to_string(), rx));
                        tx
                    })
                    .clone()
            };
            match queue.send(pending) {
                Ok(()) => {
                    return match answer.await {
                        Ok(Ok(answer)) => Ok(answer),
                        Ok(Err(why)) => Err(Error::Transient(format!("the quota ledger of {namespace}: {why}"))),
                        Err(_) => Err(Error::Transient("the quota ledger stopped; retrying".into())),
                    };
                }
                // Its task ended (a panic, or the runtime shutting down): start another.
                Err(mpsc::error::SendError(back)) => {
                    pending = back;
                    self.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(namespace);
                }
            }
        }
        Err(Error::Transient("the quota ledger is not running; retrying".into()))
    }
}

/// Reads the ledger, creating it when missing.
async fn read(api: &Api<ImageQuota>) -> Result<ImageQuota, kube::Error> {
    if let Some(q) = api.get_opt(QUOTA_NAME).await? {
        return Ok(q);
    }
    let fresh = ImageQuota {
        metadata: ObjectMeta { name: Some(QUOTA_NAME.into()), ..Default::default() },
        spec: ImageQuotaSpec::default(),
        status: None,
    };
    match api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &fresh).await {
        Ok(q) => Ok(q),
        Err(kube::Error::Api(s)) if s.code == 409 => api.get(QUOTA_NAME).await,
        Err(e) => Err(e),
    }
}

/// Whether an image waits in line for a place (owned, not deleting, no outcome yet or Queued).
fn waits_in_line(image: &Image) -> bool {
    image.metadata.deletion_timestamp.is_none()
        && image.spec.source.image.is_none()
        && matches!(image.status.as_ref().and_then(|s| s.phase), None | Some(ImagePhase::Queued))
}

/// An image's place in the line: oldest first.
pub fn line_of(image: &Image) -> Line {
    (image.metadata.creation_timestamp.as_ref().map(|t| t.0), image.name_any())
}

/// The task that owns one namespace's ledger.
async fn serve(books: Arc<Books>, namespace: String, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let api: Api<ImageQuota> = Api::namespaced(books.client.clone(), &namespace);
    // The ledger as last written or read: a stale copy only costs a lost compare-and-swap.
    let mut known: Option<ImageQuota> = None;
    let mut waiting: HashMap<String, Waiter> = HashMap::new();
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let pending = std::mem::take(&mut batch);
        let requests: Vec<Request> = pending.iter().map(|p| p.request.clone()).collect();
        if requests.contains(&Request::Refresh) {
            // The spec changed: decide on the limits the API server has now.
            known = None;
        }
        // The namespace's line, as the cache shows it: read once for the batch and the waking.
        let line = in_line(&books.images, &namespace);
        let outcome = apply(&books, &api, &namespace, &requests, &line, &mut known).await;
        for (p, answer) in pending.into_iter().zip(answers(&outcome, requests.len())) {
            if let Some(uid) = uid_of(&p.request) {
                waiting.remove(uid);
                if let (Ok(answer), Request::Admit(a)) = (&answer, &p.request) {
                    let what = match answer {
                        Answer::OverQuota(_) | Answer::InLine(_) => Some(Wait::Place),
                        Answer::NoImportSlot { .. } => Some(Wait::Import),
                        Answer::NoCrossRegionSlot { .. } => Some(Wait::CrossRegion),
                        _ => None,
                    };
                    if let Some(what) = what {
                        let waiter =
                            Waiter { name: a.name.clone(), region: a.region.clone(), line: a.line.clone(), what };
                        waiting.insert(uid.to_string(), waiter);
                    }
                }
            }
            let _ = p.reply.send(answer);
        }
        if let Some(quota) = &known {
            wake(&books, &namespace, &mut waiting, quota, &line);
        }
    }
}

fn uid_of(request: &Request) -> Option<&str> {
    match request {
        Request::Admit(a) => Some(&a.uid),
        Request::Finish { uid, .. } | Request::Release { uid } => Some(uid),
        Request::Refresh => None,
    }
}

fn answers(outcome: &Result<Vec<Answer>, String>, n: usize) -> Vec<Result<Answer, String>> {
    match outcome {
        Ok(answers) => answers.iter().cloned().map(Ok).collect(),
        Err(why) => vec![Err(why.clone()); n],
    }
}

/// Applies a batch and writes it (compare-and-swap, re-read and re-applied when it lost).
async fn apply(
    books: &Books,
    api: &Api<ImageQuota>,
    namespace: &str,
    requests: &[Request],
    line: &[InLine],
    known: &mut Option<ImageQuota>,
) -> Result<Vec<Answer>, String> {
    let admits = requests.iter().any(|r| matches!(r, Request::Admit(_)));
    for _ in 0..ATTEMPTS {
        let quota = match known.take() {
            Some(q) => Some(q),
            // Only an admission needs a ledger made: with none, there is nothing to release or
            // refresh (and a namespace being deleted refuses new objects).
            None if !admits => api.get_opt(QUOTA_NAME).await.map_err(|e| e.to_string())?,
            None => Some(read(api).await.map_err(|e| e.to_string())?),
        };
        let Some(mut quota) = quota else {
            return Ok(requests
                .iter()
                .map(|r| match r {
                    Request::Finish { .. } => Answer::Finished(None),
                    _ => Answer::Done,
                })
                .collect());
        };
        let hard = limits(&quota.spec, &books.policy);
        let before = quota.status.clone().unwrap_or_default();
        let mut status = before.clone();
        let answers = settle(&mut status, &hard, namespace, requests, line);
        status.observed_generation = quota.metadata.generation;
        if status == before {
            *known = Some(quota);
            return Ok(answers);
        }
        quota.status = Some(status);
        let params = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
        match api.replace_status(QUOTA_NAME, &params, &quota).await {
            Ok(written) => {
                let status = written.status.clone().unwrap_or_default();
                let hard = status.hard.as_ref().map(|h| h.private_images_per_region).unwrap_or_default();
                for used in &status.used {
                    books.metrics.quota(namespace, &used.region, used.images, hard, used.bytes);
                }
                *known = Some(written);
                return Ok(answers);
            }
            // Somebody else wrote it (a spec change, a previous leader), or deleted it: read
            // it again.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("the ledger kept changing while it was written; retrying".into())
}

/// The images of `namespace` waiting in line for a place, as the cache shows them.
fn in_line(images: &Store<Image>, namespace: &str) -> Vec<InLine> {
    images
        .state()
        .iter()
        .filter(|i| i.metadata.namespace.as_deref() == Some(namespace) && waits_in_line(i))
        .map(|i| InLine { uid: i.uid().unwrap_or_default(), region: i.spec.region.clone(), line: line_of(i) })
        .collect()
}

/// Re-runs the waiting images whose turn has come: per region, those among the first `room`
/// images of the line without a place; then the oldest waiting for import (and cross-region)
/// slots, as many as are free. Each is woken once; refused again, it waits again.
fn wake(books: &Books, namespace: &str, waiting: &mut HashMap<String, Waiter>, quota: &ImageQuota, line: &[InLine]) {
    if waiting.is_empty() {
        return;
    }
    let empty = ImageQuotaStatus::default();
    let status = quota.status.as_ref().unwrap_or(&empty);
    let room = room(status, &limits(&quota.spec, &books.policy));
    let mut woken = Vec::new();
    // A ledger at its size limit has no place in any region until images are deleted.
    let mut regions: Vec<&str> =
        waiting.values().filter(|w| w.what == Wait::Place && !room.ledger_full).map(|w| w.region.as_str()).collect();
    regions.sort();
    regions.dedup();
    if !regions.is_empty() {
        let reserved: std::collections::HashSet<&str> = status.reservations.iter().map(|r| r.uid.as_str()).collect();
        for region in regions {
            let mut queue: Vec<&InLine> =
                line.iter().filter(|i| i.region == region && !reserved.contains(i.uid.as_str())).collect();
            queue.sort_by(|a, b| a.line.cmp(&b.line));
            let turn = usize::try_from(room.in_region(region)).unwrap_or(0);
            for i in queue.into_iter().take(turn) {
                if waiting.get(&i.uid).is_some_and(|w| w.what == Wait::Place) {
                    woken.push(i.uid.clone());
                }
            }
        }
    }
    let mut slots: Vec<(&String, &Waiter)> = waiting.iter().filter(|(_, w)| w.what != Wait::Place).collect();
    slots.sort_by(|a, b| a.1.line.cmp(&b.1.line));
    let (mut imports, mut cross) = (room.imports, room.cross_region);
    for (uid, w) in slots {
        if imports == 0 {
            break;
        }
        if w.what == Wait::CrossRegion {
            if cross == 0 {
                continue;
            }
            cross -= 1;
        }
        imports -= 1;
        woken.push(uid.clone());
    }
    for uid in woken {
        if let Some(w) = waiting.remove(&uid) {
            let _ = books.wake.unbounded_send(ObjectRef::new(&w.name).within(namespace));
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use kube::runtime::{reflector, watcher};

    use super::*;
    use crate::policy::quota::Applicant;

    fn image(n: usize) -> Image {
        let mut image = crate::controllers::test_image(&format!("i{n:03}"), &format!("uid-{n:03}"), false);
        image.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::from_second(1_000 + n as i64).unwrap(),
        ));
        image
    }

    fn admit(image: &Image) -> Request {
        Request::Admit(Applicant {
            uid: image.uid().unwrap(),
            name: image.name_any(),
            region: image.spec.region.clone(),
            line: line_of(image),
            cross_region: false,
        })
    }

    fn version(quota: &ImageQuota) -> u64 {
        quota.metadata.resource_version.as_deref().unwrap().parse().unwrap()
    }

    /// Releasing (an image deleted) where there is no ledger, e.g. in a namespace being deleted
    /// whose ImageQuota went first, is done at once and makes none.
    #[tokio::test]
    async fn a_release_without_a_ledger_is_done_and_makes_none() {
        let (client, _) = crate::controllers::test_api(&["t"]).await;
        let (wake, _woken) = futures::channel::mpsc::unbounded();
        let ledger = Ledger::new(client.clone(), Policy::default(), reflector::store().0, wake, Arc::default());
        let answer = ledger.ask("t", Request::Release { uid: "gone".into() }).await.unwrap();
        assert_eq!(answer, Answer::Done);
        let finished = ledger.ask("t", Request::Finish { uid: "gone".into(), bytes: 1 }).await.unwrap();
        assert_eq!(finished, Answer::Finished(None));
        let quotas: Api<ImageQuota> = Api::namespaced(client, "t");
        assert!(quotas.get_opt(QUOTA_NAME).await.unwrap().is_none(), "no ledger was made");
    }

    /// 200 images asking at once of a ledger with room for 50 and 10 import slots: exactly the 50
    /// oldest are admitted, 10 of them importing, in one write (not 200 and a conflict storm);
    /// releasing two wakes the two oldest waiting for a place, and finishing one import wakes the
    /// oldest waiting for a slot. (One thread: all 200 are queued before the ledger's task runs.)
    #[tokio::test]
    async fn concurrent_requests_share_writes_and_waiters_are_woken_in_turn() {
        let (client, _) = crate::controllers::test_api(&["t"]).await;
        let quotas: Api<ImageQuota> = Api::namespaced(client.clone(), "t");
        let spec = serde_json::json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageQuota", "metadata": {"name": "default"},
            "spec": {"privateImagesPerRegion": 50, "concurrentImports": 10}});
        let created = quotas.create(&PostParams::default(), &serde_json::from_value(spec).unwrap()).await.unwrap();
        let (store, mut writer) = reflector::store();
        let images: Vec<Image> = (0..200).map(image).collect();
        for i in &images {
            writer.apply_watcher_event(&watcher::Event::Apply(i.clone()));
        }
        let (wake, mut woken) = futures::channel::mpsc::unbounded();
        let ledger = Arc::new(Ledger::new(client, Policy::default(), store, wake, Arc::default()));

        // Asked youngest first: the line, not the order of arrival, decides.
        let asks = images.iter().rev().map(|i| {
            let (ledger, request) = (ledger.clone(), admit(i));
            async move { ledger.ask("t", request).await.unwrap() }
        });
        let answers: Vec<Answer> = futures::future::join_all(asks).await.into_iter().rev().collect();
        let started = answers.iter().filter(|a| **a == Answer::Started).count();
        let slotless = answers.iter().filter(|a| matches!(a, Answer::NoImportSlot { .. })).count();
        assert_eq!((started, slotless), (10, 40), "{answers:?}");
        assert!(
            answers[..50].iter().all(|a| matches!(a, Answer::Started | Answer::NoImportSlot { .. })),
            "the 50 oldest are admitted"
        );
        assert!(answers[50..].iter().all(|a| matches!(a, Answer::OverQuota(m) if m.contains("50/50"))));
        let ledger_now = quotas.get("default").await.unwrap();
        let writes = version(&ledger_now) - version(&created);
        assert_eq!(writes, 1, "ledger writes for 200 requests");
        assert_eq!(ledger_now.status.as_ref().unwrap().summary.as_deref(), Some("r: 50/50 images"));

        // Two places free up: the two oldest waiting for one (i050, i051) are woken.
        let release = |n: usize| Request::Release { uid: format!("uid-{n:03}") };
        for n in [48, 49] {
            // Released images leave the cache as they would.
            writer.apply_watcher_event(&watcher::Event::Delete(images[n].clone()));
            ledger.ask("t", release(n)).await.unwrap();
        }
        let mut names = Vec::new();
        for _ in 0..2 {
            names.push(woken.next().await.unwrap().name);
        }
        names.sort();
        assert_eq!(names, ["i050", "i051"]);
        // An import finishes: the oldest admitted without a slot (i010) is woken.
        let finished = ledger.ask("t", Request::Finish { uid: "uid-000".into(), bytes: 7 }).await.unwrap();
        assert_eq!(finished, Answer::Finished(None));
        assert_eq!(woken.next().await.unwrap().name, "i010");
        assert!(woken.try_recv().is_err(), "nobody else is woken");
    }
}
