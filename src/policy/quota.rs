//! The quota rules: effective limits, usage from the ledger, who is next in line, and what one
//! batch of ledger requests does to the ledger ([`settle`]). The ledger's I/O (one
//! compare-and-swap write per batch) is `controllers::ledger`.

use std::collections::{HashMap, HashSet};

use crate::{
    api::{ImageQuotaSpec, ImageQuotaStatus, QuotaLimits, RegionUsage, Reservation},
    policy::Policy,
};

/// The limits in force: the ImageQuota's spec over the operator policy.
pub fn limits(spec: &ImageQuotaSpec, policy: &Policy) -> QuotaLimits {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    QuotaLimits {
        private_images_per_region: spec.private_images_per_region.unwrap_or(clamp(policy.private_images_per_region)),
        image_bytes_per_region: spec.image_bytes_per_region.or(policy.image_bytes_per_region.map(clamp)),
        concurrent_imports: spec.concurrent_imports.unwrap_or(clamp(policy.concurrent_imports)),
        concurrent_cross_region_copies: spec
            .concurrent_cross_region_copies
            .unwrap_or(clamp(policy.concurrent_cross_region_copies)),
    }
}

/// Images reserved in a region.
pub fn images_in(status: &ImageQuotaStatus, region: &str) -> i64 {
    status.reservations.iter().filter(|r| r.region == region).count() as i64
}

/// Recomputes `used`, `hard` and `summary` from the reservations (the ledger is the truth).
pub fn recount(status: &mut ImageQuotaStatus, hard: QuotaLimits) {
    let mut regions: Vec<String> = status.reservations.iter().map(|r| r.region.clone()).collect();
    regions.sort();
    regions.dedup();
    status.used = regions
        .iter()
        .map(|region| RegionUsage {
            region: region.clone(),
            images: images_in(status, region),
            bytes: status.reservations.iter().filter(|r| &r.region == region).map(|r| r.bytes).sum(),
        })
        .collect();
    status.summary = Some(if status.used.is_empty() {
        format!("0/{} images per region", hard.private_images_per_region)
    } else {
        status
            .used
            .iter()
            .map(|u| format!("{}: {}/{} images", u.region, u.images, hard.private_images_per_region))
            .collect::<Vec<_>>()
            .join(", ")
    });
    status.hard = Some(hard);
}

/// Whether an image may take a slot: `used` reserved, `ahead` older images waiting, `limit`.
pub fn has_room(used: i64, ahead: i64, limit: i64) -> bool {
    used + ahead < limit
}

/// Most bytes the reservations of one ledger may take as JSON. etcd refuses a write over
/// 1.5 MiB (its default `--max-request-bytes`); the rest of the object (metadata, spec, usage,
/// the managedFields of an atomic list) and the `importing`/`crossRegion` flags of the imports in
/// flight (36 bytes each) stay within the difference.
pub const LEDGER_BYTES: usize = 1_300_000;

/// What one reservation takes in the ledger as JSON, its byte count at 13 digits, not counting
/// its flags: its strings and 55 bytes of field names, punctuation and digits.
pub fn reservation_bytes(r: &Reservation) -> usize {
    r.uid.len() + r.name.len() + r.region.len() + 55
}

/// An image's place in the line for its region: oldest first (creation time, then name).
pub type Line = (Option<jiff::Timestamp>, String);

/// An owned image asking for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applicant {
    /// uid of the Image.
    pub uid: String,
    /// Name of the Image.
    pub name: String,
    /// Region it goes into.
    pub region: String,
    /// Its place in the line.
    pub line: Line,
    /// A copy from another region (takes a cross-region slot as well).
    pub cross_region: bool,
}

/// One change asked of a namespace's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Reserve a slot in the region if there is room and no older image waits before it, then
    /// take an import slot (and a cross-region one for a copy from another region).
    Admit(Applicant),
    /// The import ended: free its slots and record the bytes stored (0 when it failed).
    Finish {
        /// uid of the Image.
        uid: String,
        /// Bytes stored.
        bytes: i64,
    },
    /// The image is gone: drop its reservation (a missing one is fine).
    Release {
        /// uid of the Image.
        uid: String,
    },
    /// Change nothing: bring `hard`, `used` and `summary` up to date (the spec changed).
    Refresh,
}

/// What a [`Request`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The image holds its reservation and an import slot: it may move bytes.
    Started,
    /// No room in the region: the message says how full.
    OverQuota(String),
    /// Room, but older images of the namespace wait for it first (a burst): the message says so.
    InLine(String),
    /// Admitted, but all `concurrentImports` slots (`limit` of them; maybe none) are taken.
    NoImportSlot {
        /// The namespace's `concurrentImports`.
        limit: i64,
    },
    /// Admitted, but all `concurrentCrossRegionCopies` slots (`limit`; maybe none) are taken.
    NoCrossRegionSlot {
        /// The namespace's `concurrentCrossRegionCopies`.
        limit: i64,
    },
    /// The import's end is recorded; `Some(why)` when its bytes would take the region over
    /// `imageBytesPerRegion` (0 bytes are recorded: the caller removes them and fails the image).
    Finished(Option<String>),
    /// Done (release, refresh).
    Done,
}

/// An image waiting in line for a region without a reservation yet (from the cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InLine {
    /// uid of the Image.
    pub uid: String,
    /// Region it waits for.
    pub region: String,
    /// Its place in the line.
    pub line: Line,
}

/// Counts kept while a batch is applied, so each request costs O(1) beyond its lookups.
struct Tally {
    images: HashMap<String, i64>,
    importing: i64,
    cross_region: i64,
}

impl Tally {
    fn of(reservations: &[Reservation]) -> Tally {
        let mut images = HashMap::new();
        for r in reservations {
            *images.entry(r.region.clone()).or_insert(0) += 1;
        }
        Tally {
            images,
            importing: reservations.iter().filter(|r| r.importing).count() as i64,
            cross_region: reservations.iter().filter(|r| r.importing && r.cross_region).count() as i64,
        }
    }
}

/// Applies one batch of requests to a namespace's ledger and answers each (in the order
/// given). Ends free room first (finishes and releases), then applicants are taken oldest
/// first: an applicant is admitted when its region's reservations plus the older images of
/// `line` that hold none stay under the limit. `line` is every image of the namespace waiting
/// for quota, as the cache shows them. The result is the same as applying the requests one at a
/// time in that order, so one compare-and-swap write of the result is exact.
pub fn settle(
    status: &mut ImageQuotaStatus,
    hard: &QuotaLimits,
    namespace: &str,
    requests: &[Request],
    line: &[InLine],
) -> Vec<Answer> {
    let mut answers = vec![Answer::Done; requests.len()];
    let gone: HashSet<&str> = requests
        .iter()
        .filter_map(|r| match r {
            Request::Release { uid } => Some(uid.as_str()),
            _ => None,
        })
        .collect();
    status.reservations.retain(|r| !gone.contains(r.uid.as_str()));
    let mut index: HashMap<String, usize> =
        status.reservations.iter().enumerate().map(|(i, r)| (r.uid.clone(), i)).collect();
    for (n, request) in requests.iter().enumerate() {
        let Request::Finish { uid, bytes } = request else { continue };
        let Some(&i) = index.get(uid) else {
            answers[n] = Answer::Finished(None);
            continue;
        };
        let region = &status.reservations[i].region;
        let others: i64 =
            status.reservations.iter().filter(|r| &r.region == region && &r.uid != uid).map(|r| r.bytes).sum();
        let over = hard.image_bytes_per_region.filter(|limit| others.saturating_add(*bytes) > *limit);
        let r = &mut status.reservations[i];
        r.bytes = if over.is_some() { 0 } else { *bytes };
        r.importing = false;
        r.cross_region = false;
        answers[n] = Answer::Finished(over.map(|limit| {
            format!(
                "the image has {bytes} bytes and the region already holds {others}: more than imageBytesPerRegion {limit}; delete images or raise the limit in ImageQuota default, then re-create this image"
            )
        }));
    }
    let mut tally = Tally::of(&status.reservations);
    let mut ledger_bytes: usize = status.reservations.iter().map(reservation_bytes).sum();
    // Applicants oldest first; the line per region, oldest first, walked once.
    let mut applicants: Vec<(usize, &Applicant)> = requests
        .iter()
        .enumerate()
        .filter_map(|(n, r)| match r {
            Request::Admit(a) => Some((n, a)),
            _ => None,
        })
        .collect();
    applicants.sort_by(|a, b| a.1.line.cmp(&b.1.line));
    let mut queues: HashMap<&str, (Vec<&InLine>, usize, i64)> = HashMap::new();
    for waiting in line {
        queues.entry(waiting.region.as_str()).or_default().0.push(waiting);
    }
    for (queue, _, _) in queues.values_mut() {
        queue.sort_by(|a, b| a.line.cmp(&b.line));
    }
    for (n, applicant) in applicants {
        let i = match index.get(&applicant.uid) {
            Some(&i) => i,
            None => {
                let used = tally.images.get(&applicant.region).copied().unwrap_or(0);
                // Older images in line without a reservation: every one before this applicant
                // was either admitted above (it is older, so it came first) or still waits.
                let ahead = match queues.get_mut(applicant.region.as_str()) {
                    Some((queue, next, unreserved)) => {
                        while *next < queue.len() && queue[*next].line < applicant.line {
                            if !index.contains_key(&queue[*next].uid) {
                                *unreserved += 1;
                            }
                            *next += 1;
                        }
                        *unreserved
                    }
                    None => 0,
                };
                let limit = hard.private_images_per_region;
                if !has_room(used, ahead, limit) {
                    let region = &applicant.region;
                    let waiting = if used < limit { " and older images wait before it" } else { "" };
                    // With a limit of 0 no room ever appears: only raising it ends the wait.
                    let message = if limit <= 0 {
                        format!(
                            "namespace {namespace} may hold no images in region {region}: privateImagesPerRegion is {limit}; raise it in ImageQuota default (spec.privateImagesPerRegion) and the image is admitted"
                        )
                    } else {
                        format!(
                            "namespace {namespace} has {used}/{limit} images in region {region}{waiting}; it is admitted automatically when room appears (oldest first), or raise privateImagesPerRegion in ImageQuota default"
                        )
                    };
                    answers[n] = if used < limit { Answer::InLine(message) } else { Answer::OverQuota(message) };
                    continue;
                }
                let reservation = Reservation {
                    uid: applicant.uid.clone(),
                    name: applicant.name.clone(),
                    region: applicant.region.clone(),
                    bytes: 0,
                    importing: false,
                    cross_region: false,
                };
                let size = reservation_bytes(&reservation);
                if ledger_bytes + size > LEDGER_BYTES {
                    let held = status.reservations.len();
                    answers[n] = Answer::OverQuota(format!(
                        "namespace {namespace} holds {held} owned images, as many as one ImageQuota ledger can record (about {} KB of reservations; shorter image names fit more); it is admitted automatically when images are deleted, or use another namespace",
                        LEDGER_BYTES / 1000
                    ));
                    continue;
                }
                ledger_bytes += size;
                status.reservations.push(reservation);
                *tally.images.entry(applicant.region.clone()).or_insert(0) += 1;
                let i = status.reservations.len() - 1;
                index.insert(applicant.uid.clone(), i);
                i
            }
        };
        let mine = &mut status.reservations[i];
        answers[n] = if mine.importing {
            Answer::Started
        } else if applicant.cross_region && tally.cross_region >= hard.concurrent_cross_region_copies {
            Answer::NoCrossRegionSlot { limit: hard.concurrent_cross_region_copies }
        } else if tally.importing >= hard.concurrent_imports {
            Answer::NoImportSlot { limit: hard.concurrent_imports }
        } else {
            mine.importing = true;
            mine.cross_region = applicant.cross_region;
            tally.importing += 1;
            tally.cross_region += i64::from(applicant.cross_region);
            Answer::Started
        };
    }
    recount(status, hard.clone());
    answers
}

/// Room the ledger has after a batch: per region, how many more images it admits, and how
/// many import and cross-region slots are free (who waiting for them may be woken).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Room {
    /// Free image places per region with any reservation or limit room (regions not listed
    /// have the whole limit free).
    pub images: HashMap<String, i64>,
    /// The limit, for regions not in `images`.
    pub images_limit: i64,
    /// Free import slots.
    pub imports: i64,
    /// Free cross-region copy slots.
    pub cross_region: i64,
    /// The ledger is at its size limit ([`LEDGER_BYTES`]): no place anywhere.
    pub ledger_full: bool,
}

impl Room {
    /// Free places in `region`.
    pub fn in_region(&self, region: &str) -> i64 {
        self.images.get(region).copied().unwrap_or(self.images_limit)
    }
}

/// The room left in a ledger.
pub fn room(status: &ImageQuotaStatus, hard: &QuotaLimits) -> Room {
    let tally = Tally::of(&status.reservations);
    Room {
        images: tally
            .images
            .iter()
            .map(|(region, used)| (region.clone(), (hard.private_images_per_region - used).max(0)))
            .collect(),
        images_limit: hard.private_images_per_region.max(0),
        imports: (hard.concurrent_imports - tally.importing).max(0),
        cross_region: (hard.concurrent_cross_region_copies - tally.cross_region).max(0),
        // Room for one more reservation of a 63-character name and region.
        ledger_full: status.reservations.iter().map(reservation_bytes).sum::<usize>() + 36 + 63 + 63 + 55
            > LEDGER_BYTES,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_overrides_policy() {
        let policy = Policy::default();
        let l = limits(&ImageQuotaSpec { private_images_per_region: Some(3), ..Default::default() }, &policy);
        assert_eq!((l.private_images_per_region, l.concurrent_imports, l.concurrent_cross_region_copies), (3, 40, 5));
        assert_eq!(l.image_bytes_per_region, None);
    }

    #[test]
    fn recount_derives_usage_from_reservations() {
        let r = |uid: &str, region: &str, bytes| Reservation {
            cross_region: false,
            uid: uid.into(),
            name: uid.into(),
            region: region.into(),
            bytes,
            importing: false,
        };
        let mut status = ImageQuotaStatus {
            reservations: vec![r("a", "eu", 10), r("b", "us", 1), r("c", "eu", 5)],
            ..Default::default()
        };
        recount(&mut status, limits(&ImageQuotaSpec::default(), &Policy::default()));
        assert_eq!(
            status.used,
            vec![
                RegionUsage { region: "eu".into(), images: 2, bytes: 15 },
                RegionUsage { region: "us".into(), images: 1, bytes: 1 },
            ]
        );
        assert_eq!(status.summary.as_deref(), Some("eu: 2/50 images, us: 1/50 images"));
    }

    #[test]
    fn room_counts_those_ahead() {
        assert!(has_room(4, 0, 5));
        assert!(!has_room(4, 1, 5));
        assert!(!has_room(5, 0, 5));
        assert!(!has_room(0, 0, 0));
    }

    fn hard(images: i64, imports: i64, copies: i64) -> QuotaLimits {
        QuotaLimits {
            private_images_per_region: images,
            image_bytes_per_region: Some(100),
            concurrent_imports: imports,
            concurrent_cross_region_copies: copies,
        }
    }

    fn applicant(name: &str, second: i64, cross_region: bool) -> Applicant {
        Applicant {
            uid: format!("uid-{name}"),
            name: name.into(),
            region: "eu".into(),
            line: (Some(jiff::Timestamp::from_second(second).unwrap()), name.into()),
            cross_region,
        }
    }

    fn admit(name: &str, second: i64) -> Request {
        Request::Admit(applicant(name, second, false))
    }

    fn in_line(a: &Request) -> InLine {
        let Request::Admit(a) = a else { panic!("an applicant") };
        InLine { uid: a.uid.clone(), region: a.region.clone(), line: a.line.clone() }
    }

    fn names(status: &ImageQuotaStatus) -> Vec<&str> {
        status.reservations.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn a_batch_admits_oldest_first_up_to_the_limit_whatever_order_it_arrives_in() {
        let mut status = ImageQuotaStatus::default();
        let requests = [admit("d", 4), admit("b", 2), admit("a", 1), admit("c", 3)];
        let line: Vec<InLine> = requests.iter().map(in_line).collect();
        let answers = settle(&mut status, &hard(2, 40, 5), "t", &requests, &line);
        assert_eq!(answers[2], Answer::Started);
        assert_eq!(answers[1], Answer::Started);
        assert!(
            matches!(&answers[0], Answer::OverQuota(m) if m.contains("has 2/2 images in region eu;") && m.contains("oldest first")),
            "{answers:?}"
        );
        assert!(matches!(&answers[3], Answer::OverQuota(_)));
        assert_eq!(names(&status), ["a", "b"]);
        assert_eq!(status.summary.as_deref(), Some("eu: 2/2 images"));
    }

    /// With a limit of 0 no room ever appears: the message says that raising it is the way,
    /// not that the image is admitted when room appears.
    #[test]
    fn a_limit_of_zero_says_only_raising_it_helps() {
        let mut status = ImageQuotaStatus::default();
        let requests = [admit("a", 1)];
        let line: Vec<InLine> = requests.iter().map(in_line).collect();
        let answers = settle(&mut status, &hard(0, 40, 5), "t", &requests, &line);
        let Answer::OverQuota(message) = &answers[0] else { panic!("{answers:?}") };
        assert!(message.contains("privateImagesPerRegion is 0") && message.contains("raise it"), "{message}");
        assert!(!message.contains("when room appears"), "{message}");
        assert!(status.reservations.is_empty());
    }

    #[test]
    fn an_applicant_waits_behind_older_images_in_line_that_have_not_asked_yet() {
        let mut status = ImageQuotaStatus::default();
        let older = [admit("a", 1), admit("b", 2)];
        let young = admit("c", 3);
        let line: Vec<InLine> = older.iter().chain([&young]).map(in_line).collect();
        let answers = settle(&mut status, &hard(2, 40, 5), "t", std::slice::from_ref(&young), &line);
        assert!(
            matches!(&answers[0], Answer::InLine(m) if m.contains("0/2") && m.contains("older images wait before it")),
            "{answers:?}"
        );
        assert!(status.reservations.is_empty());
        // With room for three, the two older ones leave a place for it.
        let answers = settle(&mut status, &hard(3, 40, 5), "t", std::slice::from_ref(&young), &line);
        assert_eq!(answers, [Answer::Started]);
    }

    #[test]
    fn releases_and_finishes_free_room_before_applicants_are_taken() {
        let mut status = ImageQuotaStatus::default();
        let first = [admit("a", 1), admit("b", 2)];
        settle(&mut status, &hard(2, 1, 5), "t", &first, &[]);
        assert_eq!(status.reservations.iter().filter(|r| r.importing).count(), 1, "one import slot");
        let c = admit("c", 3);
        let requests = [c.clone(), Request::Release { uid: "uid-a".into() }, admit("b", 2)];
        let answers = settle(&mut status, &hard(2, 1, 5), "t", &requests, &[in_line(&c)]);
        // a's place and import slot went to the oldest applicant that already held a place.
        assert_eq!(answers[2], Answer::Started);
        assert_eq!(answers[0], Answer::NoImportSlot { limit: 1 }, "admitted to the region, waiting for a slot");
        assert_eq!(answers[1], Answer::Done);
        assert_eq!(names(&status), ["b", "c"]);
        // Asking again while holding the slot keeps it.
        assert_eq!(settle(&mut status, &hard(2, 1, 5), "t", &[admit("b", 2)], &[]), [Answer::Started]);
        let answers = settle(
            &mut status,
            &hard(2, 1, 5),
            "t",
            &[Request::Finish { uid: "uid-b".into(), bytes: 60 }, c.clone()],
            &[],
        );
        assert_eq!(answers, [Answer::Finished(None), Answer::Started]);
        let answers =
            settle(&mut status, &hard(2, 1, 5), "t", &[Request::Finish { uid: "uid-c".into(), bytes: 50 }], &[]);
        assert!(
            matches!(&answers[0], Answer::Finished(Some(m)) if m.contains("already holds 60") && m.contains("imageBytesPerRegion 100")),
            "{answers:?}"
        );
        assert!(status.reservations.iter().all(|r| !r.importing));
        assert_eq!(status.used, vec![RegionUsage { region: "eu".into(), images: 2, bytes: 60 }]);
    }

    #[test]
    fn cross_region_copies_take_a_slot_of_their_own() {
        let mut status = ImageQuotaStatus::default();
        let requests = [
            Request::Admit(applicant("a", 1, true)),
            Request::Admit(applicant("b", 2, true)),
            Request::Admit(applicant("c", 3, false)),
        ];
        let answers = settle(&mut status, &hard(5, 40, 1), "t", &requests, &[]);
        assert_eq!(answers, [Answer::Started, Answer::NoCrossRegionSlot { limit: 1 }, Answer::Started]);
        let room = room(&status, &hard(5, 40, 1));
        assert_eq!((room.in_region("eu"), room.in_region("us"), room.imports, room.cross_region), (2, 5, 38, 0));
    }

    #[test]
    fn ten_thousand_images_fit_one_ledger_and_a_full_ledger_refuses_with_a_reason() {
        let mut status = ImageQuotaStatus::default();
        let uid = |n: usize| format!("{n:08}-0000-4000-8000-000000000000");
        status.reservations = (0..10_000)
            .map(|n| Reservation {
                uid: uid(n),
                name: format!("server-image-{n:05}"),
                region: "eu-west-1".into(),
                bytes: 10_737_418_240,
                importing: false,
                cross_region: false,
            })
            .collect();
        recount(&mut status, hard(1_000_000, 40, 5));
        let json = serde_json::to_vec(&status).unwrap();
        assert!(json.len() < LEDGER_BYTES, "10,000 reservations take {} bytes", json.len());
        assert!(!room(&status, &hard(1_000_000, 40, 5)).ledger_full);
        let estimate: usize = status.reservations.iter().map(reservation_bytes).sum();
        assert!(estimate + 1000 >= json.len(), "the estimate ({estimate}) bounds the real size ({})", json.len());
        // Filled up to the budget, the next applicant is refused, saying why.
        let filler = reservation_bytes(&status.reservations[0]);
        while status.reservations.iter().map(reservation_bytes).sum::<usize>() + filler <= LEDGER_BYTES {
            let n = status.reservations.len();
            status.reservations.push(Reservation {
                uid: uid(n),
                name: format!("server-image-{n:05}"),
                region: "eu-west-1".into(),
                ..Default::default()
            });
        }
        let mut next = applicant(&format!("server-image-{:05}", status.reservations.len()), 1, false);
        next.region = "eu-west-1".into();
        next.uid = uid(status.reservations.len());
        let answers = settle(&mut status, &hard(1_000_000, 40, 5), "t", &[Request::Admit(next)], &[]);
        assert!(
            matches!(&answers[0], Answer::OverQuota(m) if m.contains("as many as one ImageQuota ledger can record")),
            "{answers:?}"
        );
        assert!(serde_json::to_vec(&status).unwrap().len() < 1_572_864, "under etcd's limit");
        assert!(room(&status, &hard(1_000_000, 40, 5)).ledger_full, "nobody is woken for a place");
    }

    #[test]
    fn a_batch_gives_what_its_requests_give_one_at_a_time() {
        // Exactness: the batch's outcome equals applying its requests one by one in line order.
        let requests: Vec<Request> = (0..20).rev().map(|n| admit(&format!("i{n:02}"), n)).collect();
        let line: Vec<InLine> = requests.iter().map(in_line).collect();
        let mut batched = ImageQuotaStatus::default();
        let answers = settle(&mut batched, &hard(7, 3, 5), "t", &requests, &line);
        let mut single = ImageQuotaStatus::default();
        let mut one_by_one: Vec<Answer> = Vec::new();
        for r in requests.iter().rev() {
            one_by_one.push(settle(&mut single, &hard(7, 3, 5), "t", std::slice::from_ref(r), &line).remove(0));
        }
        one_by_one.reverse();
        assert_eq!(answers, one_by_one);
        assert_eq!(batched, single);
        assert_eq!(answers.iter().filter(|a| **a == Answer::Started).count(), 3);
        assert_eq!(answers.iter().filter(|a| **a == Answer::NoImportSlot { limit: 3 }).count(), 4);
    }
}
