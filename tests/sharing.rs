//! Sharing through the real controllers: ImageShare members, references as acceptance,
//! revocation and deletion that the recipient sees, refusals, and no existence oracle.

mod support;

use ims_operator::api::{Image, ImagePhase, ImageShare, MemberState};
use kube::{
    Api, ResourceExt,
    api::DeleteParams,
    runtime::{conditions::is_deleted, wait::Condition},
};
use serde_json::{Value, json};
use support::{apply, reason_is, region};

fn ready_reason(i: Option<&Image>) -> Option<String> {
    i.and_then(|i| i.status.as_ref())
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.reason.clone())
}

fn share_reason_is(reason: &'static str) -> impl Condition<ImageShare> {
    move |s: Option<&ImageShare>| {
        s.and_then(|s| s.status.as_ref())
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.reason == reason)
    }
}

fn members(share: &ImageShare) -> Vec<(String, MemberState, Option<String>)> {
    let mut m: Vec<_> = share
        .status
        .iter()
        .flat_map(|s| s.members.iter())
        .map(|m| (m.tenant.clone(), m.state, m.reason.clone()))
        .collect();
    m.sort_by(|a, b| a.0.cmp(&b.0));
    m
}

fn owned(name: &str, region: &str, url: &str, extra: Value) -> Value {
    let mut spec = json!({"region": region, "type": "DataDisk", "source": {"url": {"url": url}}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name}, "spec": spec})
}

fn reference(name: &str, region: &str, namespace: &str, source: &str) -> Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "source": {"image": {"namespace": namespace, "name": source}}}})
}

fn share(name: &str, image: &str, tenants: &[&str]) -> Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare", "metadata": {"name": name},
        "spec": {"image": image, "tenants": tenants}})
}

/// Serves `a.raw` and `b.raw` (different bytes) from 127.0.0.1.
async fn files() -> (std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.raw"), vec![1u8; 20_000]).unwrap();
    std::fs::write(dir.path().join("b.raw"), vec![2u8; 30_000]).unwrap();
    (support::serve_files(dir.path().to_path_buf()).await, dir)
}

scenarios! {
    async fn accept_revoke_delete_and_replace_reach_the_recipients(env: &Env) {
        let owner = env.namespace("owner").await;
        let (a, b, c) = (env.namespace("a").await, env.namespace("b").await, env.namespace("c").await);
        let r = format!("{owner}-r");
        let (addr, _dir) = files().await;
        region(env, &r).await;
        env.start_operator();
        let owner_images: Api<Image> = Api::namespaced(env.client.clone(), &owner);
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &owner);
        apply(&owner_images, owned("base", &r, &format!("http://{addr}/a.raw"), json!({}))).await;
        let source = env.wait_for(&owner_images, "base", reason_is("Active")).await.unwrap();
        apply(&shares, share("base", "base", &[&a, &b, &c])).await;
        let pending = env.wait_for(&shares, "base", share_reason_is("Shared")).await.unwrap();
        assert!(members(&pending).iter().all(|m| m.1 == MemberState::Pending), "{:?}", members(&pending));

        // Two of three accept by creating a reference.
        for tenant in [&a, &b] {
            let images: Api<Image> = Api::namespaced(env.client.clone(), tenant);
            apply(&images, reference("mine", &r, &owner, "base")).await;
            let active = env.wait_for(&images, "mine", reason_is("Active")).await.unwrap();
            let status = active.status.unwrap();
            let src = source.status.clone().unwrap();
            assert_eq!(status.phase, Some(ImagePhase::Active));
            assert_eq!(status.source.unwrap().uid, source.uid().unwrap(), "bound to the source's uid");
            let (mine, theirs) = (status.location.clone().unwrap(), src.location.clone().unwrap());
            assert_eq!((&mine.checksum, &mine.format), (&theirs.checksum, &theirs.format), "the source's bytes");
            let own = format!("/v1/images/{tenant}/mine/{}/disk/", active.metadata.uid.clone().unwrap());
            assert!(mine.url.contains(&own), "a URL of the reference's own: {}", mine.url);
            let (code, _, served) = support::http_get_active(&mine.url, &[]).await;
            assert_eq!((code, served), (200, vec![1u8; 20_000]), "the reference serves the source's bytes");
            assert_eq!((status.size_bytes, status.format), (src.size_bytes, src.format));
        }
        let accepted = env
            .wait_for(&shares, "base", |s: Option<&ImageShare>| s.and_then(|s| s.status.as_ref()).is_some_and(|s| s.accepted_count == Some(2)))
            .await
            .unwrap();
        let states: Vec<MemberState> = members(&accepted).iter().map(|m| m.1).collect();
        let mut expect = [(a.clone(), MemberState::Accepted), (b.clone(), MemberState::Accepted), (c.clone(), MemberState::Pending)];
        expect.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(states, expect.iter().map(|e| e.1).collect::<Vec<_>>());
        assert_eq!(accepted.status.unwrap().member_count, Some(3));

        // The owner stops sharing with b: b's reference is revoked, and b is told.
        apply(&shares, share("base", "base", &[&a, &c])).await;
        let b_images: Api<Image> = Api::namespaced(env.client.clone(), &b);
        let revoked = env.wait_for(&b_images, "mine", reason_is("ShareRevoked")).await.unwrap();
        let status = revoked.status.unwrap();
        assert_eq!(status.phase, Some(ImagePhase::Unavailable));
        assert!(status.location.is_none(), "no location while not usable");
        assert!(support::warned(env, &b, "ShareRevoked", "mine").await, "an Event in the recipient's namespace");
        let after = env
            .wait_for(&shares, "base", |s: Option<&ImageShare>| s.and_then(|s| s.status.as_ref()).is_some_and(|s| s.members.iter().any(|m| m.state == MemberState::Revoked)))
            .await
            .unwrap();
        assert!(members(&after).contains(&(b.clone(), MemberState::Revoked, Some("ShareRevoked".into()))), "{:?}", members(&after));

        // The owner deletes the source: a's reference learns it; b (no grant any more) does not.
        owner_images.delete("base", &DeleteParams::default()).await.unwrap();
        env.wait_for(&owner_images, "base", is_deleted(&source.uid().unwrap())).await;
        let a_images: Api<Image> = Api::namespaced(env.client.clone(), &a);
        let deleted = env.wait_for(&a_images, "mine", reason_is("SourceDeleted")).await.unwrap();
        assert_eq!(deleted.status.unwrap().phase, Some(ImagePhase::Unavailable));
        assert_eq!(ready_reason(b_images.get("mine").await.ok().as_ref()).as_deref(), Some("ShareRevoked"));

        // Re-created under the same name with other bytes: the reference does not follow.
        apply(&owner_images, owned("base", &r, &format!("http://{addr}/b.raw"), json!({}))).await;
        let replaced = env.wait_for(&a_images, "mine", reason_is("SourceReplaced")).await.unwrap();
        assert_eq!(replaced.status.clone().unwrap().source.unwrap().uid, source.uid().unwrap(), "still bound to the old uid");
        assert!(replaced.status.unwrap().location.is_none());
        // A tenant that never bound gets the new image.
        let c_images: Api<Image> = Api::namespaced(env.client.clone(), &c);
        apply(&c_images, reference("mine", &r, &owner, "base")).await;
        let fresh = env.wait_for(&c_images, "mine", reason_is("Active")).await.unwrap();
        assert_eq!(fresh.status.unwrap().size_bytes, Some(30_000));
    }

    async fn refusals_and_invalid_members_say_why(env: &Env) {
        let owner = env.namespace("own").await;
        let t = env.namespace("t").await;
        let r = format!("{owner}-r");
        let (addr, _dir) = files().await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &owner);
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &owner);
        let url = format!("http://{addr}/a.raw");
        let os = json!({"type": "Linux", "distribution": "Debian", "version": "13", "architecture": "x86_64"});
        apply(&images, owned("plain", &r, &url, json!({}))).await;
        support::kms_keys(env, &[("key-1", [1; 32])]).await;
        apply(&images, owned("secret", &r, &url, json!({"encryption": {"kmsKeyID": "key-1"}}))).await;
        apply(&images, owned("market", &r, &url, json!({"visibility": "Marketplace", "marketplace": {"publisher": "Test", "productCode": "test", "pricing": {"plan": "Free"}}}))).await;
        let mut server = owned("server", &r, &url, json!({"type": "FullServer", "os": os}));
        server["spec"]["source"] = json!({"disks": [{"role": "System", "url": url}]});
        apply(&images, server).await;
        for name in ["plain", "secret", "market", "server"] {
            env.wait_for(&images, name, reason_is("Active")).await;
        }
        let cases = [("secret", "EncryptedImage"), ("market", "MarketplaceImage"), ("server", "FullServerNotFromBackup"), ("nothing", "ImageNotFound")];
        for (image, _) in cases {
            apply(&shares, share(image, image, std::slice::from_ref(&t.as_str()))).await;
        }
        for (image, reason) in cases {
            let refused = env.wait_for(&shares, image, share_reason_is(reason)).await.unwrap();
            let ready = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
            assert_eq!(ready.status, "False");
            assert!(ready.message.contains("nothing is granted"), "{}", ready.message);
        }
        // Nothing granted: t's reference to the encrypted image is not shared.
        let t_images: Api<Image> = Api::namespaced(env.client.clone(), &t);
        apply(&t_images, reference("enc", &r, &owner, "secret")).await;
        env.wait_for(&t_images, "enc", reason_is("NotShared")).await;
        // Marketplace images need no share.
        apply(&t_images, reference("mkt", &r, &owner, "market")).await;
        env.wait_for(&t_images, "mkt", reason_is("Active")).await;
        // A reference is never re-shared.
        let t_shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &t);
        apply(&t_shares, share("again", "mkt", std::slice::from_ref(&owner.as_str()))).await;
        env.wait_for(&t_shares, "again", share_reason_is("NotOwner")).await;

        // Invalid members do not affect the others.
        let missing = format!("{t}-missing");
        apply(&shares, share("mixed", "plain", &[&t, &owner, &missing])).await;
        let mixed = env.wait_for(&shares, "mixed", share_reason_is("SelfShare")).await.unwrap();
        let mut expect = vec![
            (t.clone(), MemberState::Pending, None),
            (owner.clone(), MemberState::Invalid, Some("SelfShare".to_string())),
            (missing.clone(), MemberState::Invalid, Some("TenantNotFound".to_string())),
        ];
        expect.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(members(&mixed), expect);
        let message = mixed.status.unwrap().conditions[0].message.clone();
        assert!(message.contains(&missing) && message.contains("create it or correct spec.tenants"), "{message}");
        apply(&t_images, reference("ok", &r, &owner, "plain")).await;
        env.wait_for(&t_images, "ok", reason_is("Active")).await;
        // The missing tenant appears: it becomes a member by itself.
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
        namespaces.create(&Default::default(), &serde_json::from_value(json!({"metadata": {"name": missing}})).unwrap()).await.unwrap();
        let healed = env
            .wait_for(&shares, "mixed", |s: Option<&ImageShare>| {
                s.is_some_and(|s| members(s).iter().any(|m| m.0.ends_with("-missing") && m.1 == MemberState::Pending))
            })
            .await
            .unwrap();
        assert_eq!(members(&healed).len(), 3);
        let _ = namespaces.delete(&missing, &DeleteParams::default()).await;

        // A reference in another region.
        let other = format!("{owner}-r2");
        region(env, &other).await;
        apply(&t_images, reference("far", &other, &owner, "plain")).await;
        let far = env.wait_for(&t_images, "far", reason_is("RegionMismatch")).await.unwrap();
        assert_eq!(far.status.unwrap().phase, Some(ImagePhase::Failed));
    }

    async fn a_tenant_without_a_grant_cannot_tell_existing_from_missing(env: &Env) {
        let owner = env.namespace("own").await;
        let stranger = env.namespace("x").await;
        let r = format!("{owner}-r");
        let (addr, _dir) = files().await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &owner);
        apply(&images, owned("real", &r, &format!("http://{addr}/a.raw"), json!({}))).await;
        env.wait_for(&images, "real", reason_is("Active")).await;
        let mine: Api<Image> = Api::namespaced(env.client.clone(), &stranger);
        apply(&mine, reference("to-real", &r, &owner, "real")).await;
        apply(&mine, reference("to-fake", &r, &owner, "fake")).await;
        let real = env.wait_for(&mine, "to-real", reason_is("NotShared")).await.unwrap().status.unwrap();
        let fake = env.wait_for(&mine, "to-fake", reason_is("NotShared")).await.unwrap().status.unwrap();
        assert_eq!((real.phase, fake.phase), (fake.phase, Some(ImagePhase::Unavailable)));
        assert_eq!(real.message.unwrap().replace("/real ", "/NAME "), fake.message.unwrap().replace("/fake ", "/NAME "), "the same answer");
        assert!(real.size_bytes.is_none() && real.location.is_none() && real.source.is_none(), "nothing about the image leaks");
        // In its own namespace the tenant is told what is wrong, not to ask for a share: a
        // reference to itself, and one to a reference (references never chain).
        apply(&mine, reference("loop", &r, &stranger, "loop")).await;
        apply(&mine, reference("chain", &r, &stranger, "to-real")).await;
        for name in ["loop", "chain"] {
            let status = env.wait_for(&mine, name, reason_is("InvalidSpec")).await.unwrap().status.unwrap();
            assert_eq!(status.phase, Some(ImagePhase::Failed), "{name}");
            assert!(!status.message.unwrap().contains("ImageShare"), "{name}: impossible advice");
        }
    }

    async fn a_tenant_image_made_public_once_active_stays_private_and_says_so(env: &Env) {
        let owner = env.namespace("pub").await;
        let other = env.namespace("o").await;
        let r = format!("{owner}-r");
        let (addr, _dir) = files().await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &owner);
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &owner);
        let theirs: Api<Image> = Api::namespaced(env.client.clone(), &other);
        let url = format!("http://{addr}/a.raw");
        apply(&images, owned("img", &r, &url, json!({}))).await;
        env.wait_for(&images, "img", reason_is("Active")).await;
        let patch = owned("img", &r, &url, json!({"visibility": "Public"}));
        match images.patch("img", &kube::api::PatchParams::apply("test").force(), &kube::api::Patch::Apply(patch)).await {
            Ok(_) => {}
            // deploy/'s ValidatingAdmissionPolicy, where installed, refuses it up front.
            Err(kube::Error::Api(s)) if env.server().is_none() && s.message.contains("Private or Marketplace") => return,
            Err(e) => panic!("{e}"),
        }
        let stalled = |i: Option<&Image>| {
            i.and_then(|i| i.status.as_ref())
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Stalled"))
                .is_some_and(|c| c.reason == "VisibilityNotAllowed")
        };
        let refused = env.wait_for(&images, "img", stalled).await.unwrap();
        let status = refused.status.unwrap();
        assert_eq!(status.phase, Some(ImagePhase::Active), "the bytes stay usable");
        assert_eq!(ready_reason(images.get("img").await.ok().as_ref()).as_deref(), Some("Active"));
        assert_eq!(status.observed_generation, refused.metadata.generation);
        assert!(status.message.unwrap().contains("stays Private"), "says what happened");
        // It is shared as the Private image it is, never "every tenant may already use it";
        // a tenant without a grant is not let in by the refused visibility.
        apply(&theirs, reference("uninvited", &r, &owner, "img")).await;
        env.wait_for(&theirs, "uninvited", reason_is("NotShared")).await;
        apply(&shares, share("s", "img", &[&other])).await;
        env.wait_for(&shares, "s", share_reason_is("Shared")).await;
        env.wait_for(&theirs, "uninvited", reason_is("Active")).await;
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &owner);
        let warned = || async {
            events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
                e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("VisibilityNotAllowed")
            })
        };
        assert!(warned().await, "the owner is told with an Event");
        // Set back to Private: the refusal goes.
        apply(&images, owned("img", &r, &url, json!({"visibility": "Private"}))).await;
        env.wait_for(&images, "img", |i: Option<&Image>| {
            i.and_then(|i| i.status.as_ref()).is_some_and(|s| !s.conditions.iter().any(|c| c.type_ == "Stalled"))
        })
        .await;
    }

    async fn one_image_shared_with_128_tenants_then_revoked_and_the_129th_refused(env: &Env) {
        let owner = env.namespace("big").await;
        let r = format!("{owner}-r");
        let (addr, _dir) = files().await;
        region(env, &r).await;
        let mut tenants = Vec::new();
        for n in 0..129 {
            tenants.push(env.namespace(&format!("m{n}")).await);
        }
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &owner);
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &owner);
        apply(&images, owned("base", &r, &format!("http://{addr}/a.raw"), json!({}))).await;
        env.wait_for(&images, "base", reason_is("Active")).await;
        let first: Vec<&str> = tenants[..128].iter().map(|t| t.as_str()).collect();
        apply(&shares, share("all", "base", &first)).await;
        env.wait_for(&shares, "all", share_reason_is("Shared")).await;
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        apply(&shares, share("one-more", "base", &[tenants[128].as_str(), tenants[0].as_str()])).await;
        let over = env.wait_for(&shares, "one-more", share_reason_is("MemberLimitExceeded")).await.unwrap();
        assert_eq!(members(&over).iter().filter(|m| m.1 == MemberState::Invalid).count(), 1, "only the new tenant is refused: {:?}", members(&over));
        let message = over.status.unwrap().conditions[0].message.clone();
        assert!(message.contains(&tenants[128]) && message.contains("limit of 128") && message.contains("(0 left)"), "{message}");

        let started = std::time::Instant::now();
        for t in &tenants[..128] {
            let api: Api<Image> = Api::namespaced(env.client.clone(), t);
            apply(&api, reference("base", &r, &owner, "base")).await;
        }
        for t in &tenants[..128] {
            let api: Api<Image> = Api::namespaced(env.client.clone(), t);
            env.wait_for(&api, "base", reason_is("Active")).await;
        }
        let granted = started.elapsed();
        env.wait_for(&shares, "all", |s: Option<&ImageShare>| s.and_then(|s| s.status.as_ref()).is_some_and(|s| s.accepted_count == Some(128))).await;
        let started = std::time::Instant::now();
        shares.delete("all", &DeleteParams::default()).await.unwrap();
        shares.delete("one-more", &DeleteParams::default()).await.unwrap();
        for t in &tenants[..128] {
            let api: Api<Image> = Api::namespaced(env.client.clone(), t);
            env.wait_for(&api, "base", reason_is("ShareRevoked")).await;
        }
        let revoked = started.elapsed();
        // Figures for docs/PERFORMANCE.md (printed, never asserted).
        eprintln!("sharing scale: 128 references Active in {granted:?}; all 128 Unavailable/ShareRevoked {revoked:?} after the shares were deleted");
    }
}
