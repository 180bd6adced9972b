//! Behaviours of the embedded API that only it can be asked for: malformed requests, watch
//! bookmarks, discovery, and kubectl over HTTP.

use bytes::Bytes;
use futures::StreamExt;
use ims_operator::api::{self, Image};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, WatchEvent, WatchParams},
};
use kube_embedded::{ApiServer, Options};
use serde_json::{Value, json};

async fn call(server: &ApiServer, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(Bytes::copy_from_slice(body))
        .unwrap();
    let response = server.handle(request).await;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn server_with_namespace() -> ApiServer {
    let server = api::embedded();
    let (code, _) =
        call(&server, "POST", "/api/v1/namespaces", "application/json", br#"{"metadata":{"name":"t"}}"#).await;
    assert_eq!(code, 201);
    server
}

#[tokio::test]
async fn malformed_requests_get_400_or_422_never_a_panic() {
    let server = server_with_namespace().await;
    let images = "/apis/ims.io/v1alpha1/namespaces/t/images";
    // (method, path, content type, body, expected code, expected reason)
    type Case<'a> = (&'a str, String, &'a str, &'a [u8], u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", images.into(), "application/json", b"{not json", 400, "BadRequest"),
        ("POST", images.into(), "application/json", b"[1,2]", 400, "BadRequest"),
        ("POST", images.into(), "application/json", b"", 400, "BadRequest"),
        (
            "POST",
            images.into(),
            "application/json",
            br#"{"apiVersion":"v1","kind":"Image","metadata":{"name":"x"}}"#,
            400,
            "BadRequest",
        ),
        ("POST", images.into(), "application/json", br#"{"metadata":{"name":"Bad_Name"},"spec":{}}"#, 422, "Invalid"),
        (
            "POST",
            images.into(),
            "application/json",
            br#"{"metadata":{"name":"x"},"spec":{"region":7,"source":[]}}"#,
            422,
            "Invalid",
        ),
        ("POST", images.into(), "application/json", br#"{"metadata":{"generateName":""}}"#, 422, "Invalid"),
        ("GET", format!("{images}?labelSelector=a%20in%20(b"), "", b"", 400, "BadRequest"),
        ("GET", format!("{images}?fieldSelector=spec.region%3Deu"), "", b"", 400, "BadRequest"),
        ("GET", format!("{images}?watch=true&resourceVersion=abc"), "", b"", 400, "BadRequest"),
        ("PATCH", format!("{images}/x"), "application/strategic-merge-patch+json", b"{}", 415, "UnsupportedMediaType"),
        ("PATCH", format!("{images}/x"), "text/plain", b"{}", 415, "UnsupportedMediaType"),
        ("PATCH", format!("{images}/x"), "application/apply-patch+yaml", b"metadata: {name: x}", 422, "Invalid"),
        ("PATCH", format!("{images}/x?fieldManager=m"), "application/apply-patch+yaml", b": : :", 400, "BadRequest"),
        ("PUT", format!("{images}/x"), "application/json", br#"{"metadata":{"name":"y"}}"#, 400, "BadRequest"),
        ("GET", "/apis/ims.io/v1alpha1/namespaces/t/images/x/nonsense".into(), "", b"", 404, "NotFound"),
        ("GET", "/apis/nope.io/v1/things".into(), "", b"", 404, "NotFound"),
        ("DELETE", "/apis/ims.io/v1alpha1/namespaces/t/images/missing".into(), "", b"", 404, "NotFound"),
        ("POST", "/apis/ims.io/v1alpha1/images".into(), "application/json", b"{}", 405, "MethodNotAllowed"),
    ];
    for (method, path, content_type, body, code, reason) in cases {
        let (got, status) = call(&server, method, &path, content_type, body).await;
        assert_eq!(
            (got, status["reason"].as_str()),
            (code, Some(reason)),
            "{method} {path} {}: {status}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(status["kind"], "Status");
        assert!(status["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn json_patch_that_cannot_apply_is_refused_and_changes_nothing() {
    let server = server_with_namespace().await;
    let images = "/apis/ims.io/v1alpha1/namespaces/t/images";
    let image = json!({"metadata": {"name": "x"}, "spec": {"region": "r", "type": "DataDisk", "source": {"url": {"url": "https://a/b"}}}});
    let (code, created) = call(&server, "POST", images, "application/json", image.to_string().as_bytes()).await;
    assert_eq!(code, 201);
    let patch = json!([{"op": "replace", "path": "/spec/description", "value": "d"}, {"op": "test", "path": "/spec/region", "value": "other"}]);
    let (code, _) =
        call(&server, "PATCH", &format!("{images}/x"), "application/json-patch+json", patch.to_string().as_bytes())
            .await;
    assert_eq!(code, 422);
    let (_, now) = call(&server, "GET", &format!("{images}/x"), "", b"").await;
    assert_eq!(now["metadata"]["resourceVersion"], created["metadata"]["resourceVersion"]);
    assert!(now["spec"].get("description").is_none());
}

#[tokio::test]
async fn a_no_op_write_changes_no_resource_version() {
    let server = server_with_namespace().await;
    let client = server.client();
    let images: Api<Image> = Api::namespaced(client, "t");
    let config = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "x"},
        "spec": {"region": "r", "type": "DataDisk", "source": {"url": {"url": "https://a/b"}}}});
    let first = images.patch("x", &PatchParams::apply("me"), &Patch::Apply(&config)).await.unwrap();
    let before = server.resource_version();
    let again = images.patch("x", &PatchParams::apply("me"), &Patch::Apply(&config)).await.unwrap();
    assert_eq!(again.resource_version(), first.resource_version());
    assert_eq!(server.resource_version(), before, "a write that changes nothing is not a change");
}

#[tokio::test]
async fn watches_get_bookmarks_when_they_ask() {
    let server = ApiServer::with_options(
        api::crds(),
        Options { bookmark_every: std::time::Duration::from_millis(50), ..Options::default() },
    );
    let images: Api<Image> = Api::all(server.client());
    let rv = server.resource_version().to_string();
    let mut stream =
        images.watch(&WatchParams { bookmarks: true, ..WatchParams::default() }.timeout(5), &rv).await.unwrap().boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Bookmark(b))) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn discovery_lists_the_ims_kinds_with_short_names_and_category() {
    let server = api::embedded();
    let (code, list) = call(&server, "GET", "/apis/ims.io/v1alpha1", "", b"").await;
    assert_eq!(code, 200);
    let resources = list["resources"].as_array().unwrap();
    let image = resources.iter().find(|r| r["name"] == "images").unwrap();
    assert_eq!(image["shortNames"], json!(["img"]));
    assert_eq!(image["categories"], json!(["ims"]));
    assert!(resources.iter().any(|r| r["name"] == "images/status"));
    let (_, groups) = call(&server, "GET", "/apis", "", b"").await;
    let names: Vec<&str> = groups["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    for group in ["ims.io", "events.k8s.io", "coordination.k8s.io"] {
        assert!(names.contains(&group), "{names:?}");
    }
}

/// kubectl, the real one, against the embedded API served over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_against_the_served_api() {
    let server = server_with_namespace().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    ims_operator::local::write_kubeconfig(&kubeconfig, addr).unwrap();
    let manifest = dir.path().join("image.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: ims.io/v1alpha1\nkind: Image\nmetadata: {name: disk, namespace: t}\nspec:\n  region: eu-west\n  type: DataDisk\n  source: {url: {url: 'https://images.example.com/d.raw'}}\n",
    )
    .unwrap();
    let kubectl = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("kubectl")
                    .args(&args)
                    .env("KUBECONFIG", &kubeconfig)
                    .output()
                    .expect("kubectl")
            })
            .await
            .unwrap()
        }
    };
    let out = kubectl(vec!["apply".into(), "--server-side".into(), "-f".into(), manifest.display().to_string()]).await;
    assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "image.ims.io/disk serverside-applied");
    let out = kubectl(vec!["get".into(), "ims".into(), "-A".into()]).await;
    assert!(out.status.success(), "kubectl get: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap_or_default().split_whitespace().collect::<Vec<_>>();
    assert_eq!(header, ["NAMESPACE", "NAME", "REGION", "TYPE", "VISIBILITY", "PHASE", "SIZE", "AGE"], "{text}");
    assert!(text.contains("image.ims.io/disk") && text.contains("DataDisk"), "{text}");
    let out = kubectl(vec![
        "get".into(),
        "img".into(),
        "disk".into(),
        "-n".into(),
        "t".into(),
        "-o".into(),
        "jsonpath={.spec.visibility}".into(),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Private", "defaults applied");
}
