//! The crate on its own: an [`ApiServer`] serving a small fixture CRD (`tests/fixtures/widgets.yaml`)
//! to a kube client: discovery, create with defaults, schema and CEL validation (transition
//! rules included), watch, and server-side apply with managed fields and conflicts.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use kube_embedded::ApiServer;
use serde_json::json;

fn widgets_crd() -> CustomResourceDefinition {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/widgets.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn widgets(server: &ApiServer) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    Api::namespaced_with(server.client(), "t", &ApiResource::from_gvk_with_plural(&gvk, "widgets"))
}

async fn server() -> ApiServer {
    let server = ApiServer::new([widgets_crd()]);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "t"}})).unwrap();
    Api::<Namespace>::all(server.client()).create(&PostParams::default(), &ns).await.unwrap();
    server
}

fn widget(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

fn error(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.message),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn serves_the_crd_it_is_given_next_to_the_built_in_kinds() {
    let server = server().await;
    let kinds: Vec<String> = server.kinds().iter().map(|k| format!("{}/{}", k.api_version(), k.kind)).collect();
    assert!(kinds.contains(&"example.com/v1/Widget".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"v1/Namespace".to_string()), "{kinds:?}");
    let no_crds = ApiServer::default();
    assert!(no_crds.kinds().iter().all(|k| k.kind != "Widget"));
    let resources = server.client().list_api_group_resources("example.com/v1").await.unwrap();
    let names: Vec<&str> = resources.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["widgets", "widgets/status"]);
    assert_eq!(resources.resources[0].short_names, Some(vec!["wdg".to_string()]));
}

#[test]
fn an_invalid_crd_is_refused() {
    let mut crd = widgets_crd();
    crd.spec.versions[0].storage = false;
    let err = ApiServer::try_with_options([crd], kube_embedded::Options::default()).err().unwrap();
    assert!(err.to_string().contains("no storage version"), "{err}");
}

#[tokio::test]
async fn create_defaults_and_validates_with_the_schema_and_cel() {
    let server = server().await;
    let api = widgets(&server);
    let created = api.create(&PostParams::default(), &widget("a", json!({"size": 3, "color": "green"}))).await.unwrap();
    assert_eq!(created.data["spec"]["mode"], "Normal");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());

    let (code, message) = error(
        api.create(&PostParams::default(), &widget("b", json!({"size": -1, "color": "pink"}))).await.unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("spec.size: Invalid value: -1: spec.size in body should be greater than or equal to 0"),
        "{message}"
    );
    assert!(message.contains(r#"spec.color: Unsupported value: "pink""#), "{message}");

    let (code, message) = error(
        api.create(&PostParams::default(), &widget("c", json!({"size": 11, "color": "green"}))).await.unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(message.contains("only red widgets may be bigger than 10"), "{message}");

    let mut changed = created.clone();
    changed.data["spec"]["color"] = json!("blue");
    let (code, message) = error(api.replace("a", &PostParams::default(), &changed).await.unwrap_err());
    assert_eq!(code, 422);
    assert!(message.contains("color is immutable"), "{message}");
}

#[tokio::test]
async fn watch_sees_adds_modifications_and_deletes() {
    let server = server().await;
    let api = widgets(&server);
    let rv = server.resource_version().to_string();
    let mut events = api.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    api.create(&PostParams::default(), &widget("w", json!({"size": 1}))).await.unwrap();
    api.patch("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"size": 2}}))).await.unwrap();
    api.delete("w", &Default::default()).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(o) => seen.push(format!("ADDED {}", o.data["spec"]["size"])),
            WatchEvent::Modified(o) => seen.push(format!("MODIFIED {}", o.data["spec"]["size"])),
            WatchEvent::Deleted(o) => seen.push(format!("DELETED {}", o.data["spec"]["size"])),
            _ => {}
        }
    }
    assert_eq!(seen, ["ADDED 1", "MODIFIED 2", "DELETED 2"]);
}

#[tokio::test]
async fn server_side_apply_merges_by_the_schema_and_reports_conflicts() {
    let server = server().await;
    let api = widgets(&server);
    let apply = |manager: &str| PatchParams::apply(manager);
    let a = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "s"},
        "spec": {"size": 1, "tags": ["x"], "parts": [{"name": "wheel", "count": 4}]}});
    api.patch("s", &apply("alice"), &Patch::Apply(a)).await.unwrap();
    let b = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "s"},
        "spec": {"tags": ["y"], "parts": [{"name": "door", "count": 2}]}});
    let merged = api.patch("s", &apply("bob"), &Patch::Apply(b)).await.unwrap();
    // A set merges per value, a list-map per key.
    assert_eq!(merged.data["spec"]["tags"], json!(["x", "y"]));
    assert_eq!(merged.data["spec"]["parts"], json!([{"name": "wheel", "count": 4}, {"name": "door", "count": 2}]));
    let managers: Vec<String> =
        merged.metadata.managed_fields.iter().flatten().filter_map(|m| m.manager.clone()).collect();
    assert_eq!(managers, ["alice", "bob"]);
    let bob = merged.metadata.managed_fields.iter().flatten().find(|m| m.manager.as_deref() == Some("bob")).unwrap();
    assert_eq!(
        bob.fields_v1.as_ref().unwrap().0,
        json!({"f:spec": {"f:parts": {"k:{\"name\":\"door\"}": {".": {}, "f:count": {}, "f:name": {}}}, "f:tags": {"v:\"y\"": {}}}})
    );

    let c = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "s"}, "spec": {"size": 5}});
    let (code, message) = error(api.patch("s", &apply("carol"), &Patch::Apply(c.clone())).await.unwrap_err());
    assert_eq!(code, 409);
    assert_eq!(message, r#"Apply failed with 1 conflict: conflict with "alice": .spec.size"#);
    let forced = api.patch("s", &apply("carol").force(), &Patch::Apply(c)).await.unwrap();
    assert_eq!(forced.data["spec"]["size"], 5);
}

/// A body above 3 MiB is refused with kube-apiserver's 413, in-process and over TCP, where the
/// server stops reading at the limit; the server keeps serving afterwards.
#[tokio::test]
async fn a_body_above_three_mib_is_refused_with_413() {
    let server = server().await;
    let big = widget("big", json!({"blob": "x".repeat(kube_embedded::MAX_REQUEST_BODY_BYTES)}));
    let err = widgets(&server).create(&PostParams::default(), &big).await.expect_err("too large");
    assert_eq!(error(err), (413, format!("Request entity too large: limit is {}", 3 * 1024 * 1024)));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = server.clone();
    let task = tokio::spawn(async move { serving.serve(listener).await });
    let body = vec![b'{'; 8 * 1024 * 1024];
    let head = format!(
        "POST /apis/example.com/v1/namespaces/t/widgets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer and close before the whole body is sent.
    let _ = stream.write_all(&body).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"reason\":\"RequestEntityTooLarge\""), "{answer}");
    task.abort();

    let small = widget("small", json!({"size": 1}));
    widgets(&server).create(&PostParams::default(), &small).await.expect("a small body is still served");
}
