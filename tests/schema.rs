//! Every manifest in examples/ passes the generated schemas, and every manifest in
//! tests/fixtures/invalid/ is refused with exactly the field errors kube-apiserver gives
//! (its `# expect:` lines, in order); the generated CRDs answer like kube-apiserver (exact
//! texts), pass the CEL checks and never panic on arbitrary input. (Schema fragments are tested
//! in `crates/kube-embedded`.)

use std::path::{Path, PathBuf};

use ims_operator::api;
use kube_embedded::schema::{CrdSchema, FieldError};
use serde_json::{Value, json};

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn schema_for(obj: &Value) -> Option<CrdSchema> {
    let kind = obj["kind"].as_str()?;
    let crd = api::crds().into_iter().find(|c| c.spec.names.kind == kind)?;
    Some(CrdSchema::from_crd(&crd).unwrap())
}

#[test]
fn every_example_is_accepted() {
    let mut checked = 0;
    for file in yaml_files("examples") {
        for obj in docs(&file) {
            let Some(schema) = schema_for(&obj) else {
                assert_eq!(obj["apiVersion"], "v1", "{}: only core objects lack a schema", file.display());
                continue;
            };
            if let Err(errors) = schema.admit(&obj, None) {
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                panic!("{} is refused: {text:?}", file.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "examples hold at least one object of each kind ({checked} checked)");
}

#[test]
fn every_invalid_fixture_is_refused_with_the_field_path() {
    let files = yaml_files("tests/fixtures/invalid");
    assert!(files.len() >= 10);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expected.is_empty(), "{} has no `# expect:` line", file.display());
        let objects = docs(&file);
        let (old, new) = match objects.as_slice() {
            [new] => (None, new),
            [old, new] => (Some(old), new),
            _ => panic!("{}: one document, or the stored object and the update", file.display()),
        };
        let schema = schema_for(new).unwrap();
        if let Some(old) = old {
            schema.admit(old, None).unwrap_or_else(|e| panic!("{}: the stored object is valid: {e:?}", file.display()));
        }
        let errors = schema.admit(new, old).expect_err(&format!("{} must be refused", file.display()));
        let got: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(got, expected, "{}", file.display());
    }
}

// The real CRDs of `api::crds()`, asserting the exact kube-apiserver texts (moved here from the
// schema module's unit tests when it became the crate kube-embedded).

const SKIPPED: &str = "<nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";

fn schema(kind: &str) -> CrdSchema {
    let crd = api::crds().into_iter().find(|c| c.spec.names.kind == kind).expect("crd");
    CrdSchema::from_crd(&crd).expect("schema")
}

fn strings(errs: &[FieldError]) -> Vec<String> {
    errs.iter().map(ToString::to_string).collect()
}

/// Sets `value` at the dotted `path` of `obj` (`None` removes it).
fn set(obj: &mut Value, path: &str, value: Option<Value>) {
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = obj;
    for p in &parts[..parts.len() - 1] {
        cur = cur.as_object_mut().unwrap().entry(p.to_string()).or_insert_with(|| json!({}));
    }
    let last = parts[parts.len() - 1];
    let m = cur.as_object_mut().unwrap();
    match value {
        Some(v) => {
            m.insert(last.to_string(), v);
        }
        None => {
            m.remove(last);
        }
    }
}

fn with(mut obj: Value, changes: &[(&str, Option<Value>)]) -> Value {
    for (p, v) in changes {
        set(&mut obj, p, v.clone());
    }
    obj
}

fn image() -> Value {
    json!({
        "apiVersion": "ims.io/v1alpha1",
        "kind": "Image",
        "metadata": {"name": "ubuntu", "namespace": "tenant-a"},
        "spec": {
            "region": "eu-west",
            "os": {"type": "Linux", "distribution": "Ubuntu", "version": "24.04", "architecture": "x86_64"},
            "source": {"url": {"url": "https://example.com/ubuntu.qcow2"}}
        }
    })
}

/// `image()` as a Marketplace image with `pricing`.
fn marketplace(pricing: Value) -> Value {
    with(
        image(),
        &[
            ("spec.visibility", Some(json!("Marketplace"))),
            (
                "spec.marketplace",
                Some(json!({"publisher": "Acme Software", "productCode": "tool", "pricing": pricing})),
            ),
        ],
    )
}

fn share() -> Value {
    json!({
        "apiVersion": "ims.io/v1alpha1",
        "kind": "ImageShare",
        "metadata": {"name": "share", "namespace": "tenant-a"},
        "spec": {"image": "ubuntu", "tenants": ["tenant-b", "tenant-c"]}
    })
}

fn copy() -> Value {
    json!({
        "apiVersion": "ims.io/v1alpha1",
        "kind": "ImageCopy",
        "metadata": {"name": "c1", "namespace": "tenant-a"},
        "spec": {"source": "ubuntu", "destination": {"region": "us-east", "name": "ubuntu-us"}}
    })
}

fn quota(name: &str) -> Value {
    json!({
        "apiVersion": "ims.io/v1alpha1",
        "kind": "ImageQuota",
        "metadata": {"name": name, "namespace": "tenant-a"},
        "spec": {"concurrentImports": 3}
    })
}

fn condition(ty: &str, time: &str) -> Value {
    json!({"type": ty, "status": "True", "reason": "Done", "message": "", "lastTransitionTime": time})
}

struct Case {
    name: &'static str,
    kind: &'static str,
    old: Option<Value>,
    new: Value,
    want: Vec<String>,
}

fn case(name: &'static str, kind: &'static str, old: Option<Value>, new: Value, want: &[&str]) -> Case {
    Case { name, kind, old, new, want: want.iter().map(|s| s.to_string()).collect() }
}

#[test]
fn real_crds_answer_like_kube_apiserver() {
    let sha = format!("sha256:{}", "ab".repeat(32));
    let many: Vec<String> = (0..129).map(|i| format!("t{i}")).collect();
    let two_system_disks = json!([
        {"role": "System", "url": "https://example.com/a.raw"},
        {"role": "System", "url": "https://example.com/b.raw"}
    ]);
    let full_server = with(
        image(),
        &[("spec.type", Some(json!("FullServer"))), ("spec.source", Some(json!({"disks": two_system_disks})))],
    );
    let cases = vec![
        case("valid image", "Image", None, image(), &[]),
        case(
            "region is immutable",
            "Image",
            Some(image()),
            with(image(), &[("spec.region", Some(json!("us-east")))]),
            &[
                r#"spec.region: Invalid value: "us-east": region is immutable: use an ImageCopy to put the image in another region"#,
            ],
        ),
        case(
            "type is immutable",
            "Image",
            Some(image()),
            with(image(), &[("spec.type", Some(json!("DataDisk")))]),
            &[r#"spec.type: Invalid value: "DataDisk": type is immutable: create a new Image"#],
        ),
        case(
            "kind of source is immutable",
            "Image",
            Some(image()),
            with(image(), &[("spec.source", Some(json!({"copy": {"name": "other"}})))]),
            &[
                r#"spec.source: Invalid value: the kind of source (url, disks, image, copy, volume, volumeSnapshot or virtualMachine) is immutable: create a new Image instead"#,
            ],
        ),
        case(
            "two sources",
            "Image",
            None,
            with(image(), &[("spec.source.image", Some(json!({"namespace": "platform", "name": "ubuntu"})))]),
            &[
                r#"spec.source: Invalid value: exactly one of source.url, source.disks, source.image, source.copy, source.volume, source.volumeSnapshot or source.virtualMachine must be set"#,
            ],
        ),
        case(
            "no source at all",
            "Image",
            None,
            with(image(), &[("spec.source", Some(json!({})))]),
            &[
                r#"spec.source: Invalid value: exactly one of source.url, source.disks, source.image, source.copy, source.volume, source.volumeSnapshot or source.virtualMachine must be set"#,
            ],
        ),
        case(
            "system disk needs os",
            "Image",
            None,
            with(image(), &[("spec.os", None)]),
            &[
                r#"spec.os: Invalid value: os is required for SystemDisk and FullServer images: set spec.os (type, distribution, version, architecture)"#,
            ],
        ),
        case(
            "data disk needs no os",
            "Image",
            None,
            with(image(), &[("spec.os", None), ("spec.type", Some(json!("DataDisk")))]),
            &[],
        ),
        case(
            "disks only for full server",
            "Image",
            None,
            with(image(), &[("spec.source", Some(json!({"disks": [{"role": "System", "url": "https://e.com/a"}]})))]),
            &[
                r#"spec.source.disks: Invalid value: source.disks is only for FullServer images: use source.url for a single disk, or set type: FullServer"#,
            ],
        ),
        case(
            "exactly one system disk",
            "Image",
            None,
            full_server.clone(),
            &[r#"spec.source.disks: Invalid value: a FullServer image needs exactly one disk with role System"#],
        ),
        case(
            "unchanged disks ratchet the rule on update",
            "Image",
            Some(full_server.clone()),
            with(full_server.clone(), &[("spec.visibility", Some(json!("Public")))]),
            &[],
        ),
        case(
            "missing required",
            "Image",
            None,
            with(image(), &[("spec.source", None)]),
            &["spec.source: Required value", SKIPPED],
        ),
        case(
            "missing required (two)",
            "Image",
            None,
            with(image(), &[("spec.source", None), ("spec.region", None)]),
            &["spec.region: Required value", "spec.source: Required value", SKIPPED],
        ),
        case(
            "null of a non-nullable field without default is dropped",
            "Image",
            None,
            with(image(), &[("spec.region", Some(Value::Null))]),
            &["spec.region: Required value", SKIPPED],
        ),
        case(
            "wrong type",
            "Image",
            None,
            with(image(), &[("spec.minDiskGiB", Some(json!("10")))]),
            &[
                r#"spec.minDiskGiB: Invalid value: "string": spec.minDiskGiB in body must be of type integer: "string""#,
                SKIPPED,
            ],
        ),
        case(
            "fraction for an int64",
            "Image",
            None,
            with(image(), &[("spec.minDiskGiB", Some(json!(1.5)))]),
            &[
                r#"spec.minDiskGiB: Invalid value: "float64": spec.minDiskGiB in body must be of type int64: "float64""#,
                r#"<nil>: Invalid value: "": Checked value must be of type integer with format int64 in spec.minDiskGiB"#,
                SKIPPED,
            ],
        ),
        case(
            "integral float for an integer",
            "Image",
            None,
            with(image(), &[("spec.minDiskGiB", Some(json!(2.0)))]),
            &[],
        ),
        case(
            "below minimum",
            "Image",
            None,
            with(image(), &[("spec.minDiskGiB", Some(json!(0)))]),
            &["spec.minDiskGiB: Invalid value: 0: spec.minDiskGiB in body should be greater than or equal to 1"],
        ),
        case(
            "above maximum",
            "Image",
            None,
            with(image(), &[("spec.minDiskGiB", Some(json!(70000)))]),
            &["spec.minDiskGiB: Invalid value: 70000: spec.minDiskGiB in body should be less than or equal to 65536"],
        ),
        case(
            "unsupported enum value",
            "Image",
            None,
            with(image(), &[("spec.type", Some(json!("Foo")))]),
            &[
                r#"spec.type: Unsupported value: "Foo": supported values: "SystemDisk", "DataDisk", "FullServer", "ISO""#,
                SKIPPED,
            ],
        ),
        case(
            "too long description",
            "Image",
            None,
            with(image(), &[("spec.description", Some(json!("x".repeat(1025))))]),
            &["spec.description: Too long: may not be more than 1024 bytes", SKIPPED],
        ),
        case(
            "maxLength counts characters",
            "Image",
            None,
            with(image(), &[("spec.description", Some(json!("é".repeat(1024))))]),
            &[],
        ),
        case(
            "too short",
            "Image",
            None,
            with(image(), &[("spec.region", Some(json!("")))]),
            &[r#"spec.region: Invalid value: "": spec.region in body should be at least 1 chars long"#],
        ),
        case(
            "bad checksum",
            "Image",
            None,
            with(image(), &[("spec.source.url.checksum", Some(json!("md5:abc")))]),
            &[
                r#"spec.source.url.checksum: Invalid value: "md5:abc": spec.source.url.checksum in body should match '^(sha256:[0-9a-fA-F]{64}|sha512:[0-9a-fA-F]{128})$'"#,
            ],
        ),
        case("good checksum", "Image", None, with(image(), &[("spec.source.url.checksum", Some(json!(sha)))]), &[]),
        case(
            "bad name",
            "Image",
            None,
            with(image(), &[("metadata.name", Some(json!("Bad_Name")))]),
            &[
                r#"metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"#,
            ],
        ),
        case(
            "no name",
            "Image",
            None,
            with(image(), &[("metadata.name", None)]),
            &["metadata.name: Required value: name or generateName is required", SKIPPED],
        ),
        case(
            "name is immutable",
            "Image",
            Some(image()),
            with(image(), &[("metadata.name", Some(json!("other")))]),
            &[r#"metadata.name: Invalid value: "other": field is immutable"#],
        ),
        case(
            "bad label value",
            "Image",
            None,
            with(image(), &[("metadata.labels", Some(json!({"app": "bad value"})))]),
            &[
                r#"metadata.labels: Invalid value: "bad value": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"#,
            ],
        ),
        case(
            "no namespace",
            "Image",
            None,
            with(image(), &[("metadata.namespace", None)]),
            &["metadata.namespace: Required value", SKIPPED],
        ),
        case(
            "generateName only",
            "Image",
            None,
            with(image(), &[("metadata.name", None), ("metadata.generateName", Some(json!("img-")))]),
            &["metadata.name: Required value: name or generateName is required", SKIPPED],
        ),
        case(
            "wrong kind",
            "Image",
            None,
            with(image(), &[("kind", Some(json!("Foo")))]),
            &[r#"kind: Invalid value: "Foo": must be Image"#],
        ),
        case(
            "duplicate set element",
            "Image",
            None,
            with(image(), &[("spec.tags", Some(json!(["a", "b", "a", "a"])))]),
            &[r#"spec.tags[2]: Duplicate value: "a""#],
        ),
        case(
            "duplicate list-map key",
            "Image",
            None,
            with(
                image(),
                &[(
                    "status.conditions",
                    Some(json!([
                        condition("Ready", "2024-01-02T03:04:05Z"),
                        condition("Ready", "2024-01-02T03:04:06Z")
                    ])),
                )],
            ),
            &[r#"status.conditions[1]: Duplicate value: {"type":"Ready"}"#],
        ),
        case(
            "bad date-time",
            "Image",
            None,
            with(image(), &[("status.conditions", Some(json!([condition("Ready", "yesterday")])))]),
            &[
                r#"status.conditions[0].lastTransitionTime: Invalid value: "yesterday": status.conditions[0].lastTransitionTime in body must be of type date-time: "yesterday""#,
                SKIPPED,
            ],
        ),
        case(
            "enum of a nullable field does not take null",
            "Image",
            None,
            with(image(), &[("status.phase", Some(Value::Null))]),
            &[
                r#"status.phase: Unsupported value: null: supported values: "Queued", "Saving", "Active", "Failed", "Unavailable", "Deleting""#,
                SKIPPED,
            ],
        ),
        case(
            "unchanged invalid field is ratcheted on update",
            "Image",
            Some(with(image(), &[("spec.description", Some(json!("x".repeat(1025))))])),
            with(
                image(),
                &[("spec.description", Some(json!("x".repeat(1025)))), ("spec.visibility", Some(json!("Public")))],
            ),
            &[],
        ),
        case(
            "changed invalid field is not ratcheted",
            "Image",
            Some(with(image(), &[("spec.description", Some(json!("x".repeat(1025))))])),
            with(image(), &[("spec.description", Some(json!("y".repeat(1025))))]),
            &["spec.description: Too long: may not be more than 1024 bytes", SKIPPED],
        ),
        case("valid share", "ImageShare", None, share(), &[]),
        case(
            "too many tenants",
            "ImageShare",
            None,
            with(share(), &[("spec.tenants", Some(json!(many)))]),
            &["spec.tenants: Too many: 129: must have at most 128 items", SKIPPED],
        ),
        case(
            "too few tenants",
            "ImageShare",
            None,
            with(share(), &[("spec.tenants", Some(json!([])))]),
            &["spec.tenants: Invalid value: 0: spec.tenants in body should have at least 1 items"],
        ),
        case(
            "duplicate tenants",
            "ImageShare",
            None,
            with(share(), &[("spec.tenants", Some(json!(["a", "a"])))]),
            &[r#"spec.tenants[1]: Duplicate value: "a""#],
        ),
        case(
            "tenant pattern",
            "ImageShare",
            None,
            with(share(), &[("spec.tenants", Some(json!(["A_B"])))]),
            &[
                r#"spec.tenants[0]: Invalid value: "A_B": spec.tenants[0] in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"#,
            ],
        ),
        case(
            "share image is immutable",
            "ImageShare",
            Some(share()),
            with(share(), &[("spec.image", Some(json!("other")))]),
            &[
                r#"spec.image: Invalid value: "other": image is immutable: create another ImageShare to share another image"#,
            ],
        ),
        case("quota named default", "ImageQuota", None, quota("default"), &[]),
        case(
            "quota not named default",
            "ImageQuota",
            None,
            quota("mine"),
            &[r#"<nil>: Invalid value: an ImageQuota must be named default (one per namespace)"#],
        ),
        case(
            "quota below zero",
            "ImageQuota",
            None,
            with(quota("default"), &[("spec.concurrentImports", Some(json!(-1)))]),
            &[
                "spec.concurrentImports: Invalid value: -1: spec.concurrentImports in body should be greater than or equal to 0",
            ],
        ),
        case("a Marketplace image with its terms", "Image", None, marketplace(json!({"plan": "Free"})), &[]),
        case(
            "a Paid Marketplace image with its price",
            "Image",
            None,
            marketplace(json!({"plan": "Paid", "hourlyPrice": "0.05", "currency": "USD"})),
            &[],
        ),
        case(
            "a Marketplace image needs its terms",
            "Image",
            None,
            with(image(), &[("spec.visibility", Some(json!("Marketplace")))]),
            &[
                "spec.marketplace: Invalid value: a Marketplace image needs marketplace (publisher, productCode, pricing.plan): say who sells it and at what price",
            ],
        ),
        case(
            "terms only on a Marketplace image",
            "Image",
            None,
            with(marketplace(json!({"plan": "Free"})), &[("spec.visibility", Some(json!("Private")))]),
            &[
                "spec.marketplace: Invalid value: marketplace is only for visibility: Marketplace images: set visibility: Marketplace, or remove marketplace",
            ],
        ),
        case(
            "a reference takes its source's terms",
            "Image",
            None,
            with(
                marketplace(json!({"plan": "Free"})),
                &[("spec.source", Some(json!({"image": {"namespace": "pub", "name": "m"}}))), ("spec.os", None)],
            ),
            &[
                "spec.marketplace: Invalid value: a reference takes its Marketplace terms from its source: remove marketplace",
            ],
        ),
        case(
            "a Paid plan needs a price",
            "Image",
            None,
            marketplace(json!({"plan": "Paid", "currency": "USD"})),
            &[
                r#"spec.marketplace.pricing: Invalid value: a Paid plan needs hourlyPrice (a decimal, e.g. "0.05") and currency (ISO 4217, e.g. USD)"#,
            ],
        ),
        case(
            "a Free plan has no price",
            "Image",
            None,
            marketplace(json!({"plan": "Free", "hourlyPrice": "1"})),
            &[
                "spec.marketplace.pricing: Invalid value: a Free plan has no price: remove hourlyPrice and currency, or set plan: Paid",
            ],
        ),
        case(
            "price, currency, product code and publisher are checked",
            "Image",
            None,
            with(
                marketplace(json!({"plan": "Paid", "hourlyPrice": "0.5e3", "currency": "usd"})),
                &[
                    ("spec.marketplace.productCode", Some(json!("Tool_1"))),
                    ("spec.marketplace.publisher", Some(json!(" Acme"))),
                ],
            ),
            &[
                r#"spec.marketplace.pricing.currency: Invalid value: "usd": spec.marketplace.pricing.currency in body should match '^[A-Z]{3}$'"#,
                r#"spec.marketplace.pricing.hourlyPrice: Invalid value: "0.5e3": spec.marketplace.pricing.hourlyPrice in body should match '^(0|[1-9][0-9]{0,8})(\.[0-9]{1,6})?$'"#,
                r#"spec.marketplace.productCode: Invalid value: "Tool_1": spec.marketplace.productCode in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"#,
                r#"spec.marketplace.publisher: Invalid value: " Acme": spec.marketplace.publisher in body should match '^\S(.*\S)?$'"#,
            ],
        ),
        case("valid copy", "ImageCopy", None, copy(), &[]),
        case(
            "copy spec is immutable",
            "ImageCopy",
            Some(copy()),
            with(copy(), &[("spec.destination.region", Some(json!("ap-south")))]),
            &[r#"spec: Invalid value: an ImageCopy is immutable: delete it and create a new one"#],
        ),
        case(
            "copy metadata change is fine",
            "ImageCopy",
            Some(copy()),
            with(copy(), &[("metadata.labels", Some(json!({"a": "b"})))]),
            &[],
        ),
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let s = schema(c.kind);
        let got = match s.admit(&c.new, c.old.as_ref()) {
            Ok(_) => vec![],
            Err(e) => strings(&e),
        };
        if got != c.want {
            failures.push(format!("{}:\n  got  {got:#?}\n  want {:#?}", c.name, c.want));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn prunes_unknown_fields_and_applies_defaults() {
    let s = schema("Image");
    let mut obj = image();
    set(&mut obj, "spec.unknown", Some(json!(1)));
    set(&mut obj, "spec.os.extra", Some(json!("x")));
    set(&mut obj, "extra", Some(json!({"a": 1})));
    set(&mut obj, "metadata.labels", Some(json!({"app": "x"})));
    set(&mut obj, "spec.type", Some(Value::Null));
    let stored = s.admit(&obj, None).expect("valid");
    assert_eq!(
        stored,
        json!({
            "apiVersion": "ims.io/v1alpha1",
            "kind": "Image",
            "metadata": {"name": "ubuntu", "namespace": "tenant-a", "labels": {"app": "x"}},
            "spec": {
                "region": "eu-west",
                "type": "SystemDisk",
                "visibility": "Private",
                "protected": false,
                "os": {"type": "Linux", "distribution": "Ubuntu", "version": "24.04", "architecture": "x86_64"},
                "source": {"url": {"url": "https://example.com/ubuntu.qcow2", "format": "Auto"}}
            }
        })
    );
    // Defaults apply to absent fields of present objects only.
    let stored = s.admit(&with(image(), &[("spec.source", Some(json!({"copy": {"name": "x"}})))]), None).unwrap();
    assert_eq!(stored["spec"]["source"], json!({"copy": {"name": "x"}}));
    // Each disk gets its default format.
    let stored = s
        .admit(
            &with(
                image(),
                &[
                    ("spec.type", Some(json!("FullServer"))),
                    ("spec.source", Some(json!({"disks": [{"role": "System", "url": "https://e.com/a"}]}))),
                ],
            ),
            None,
        )
        .unwrap();
    assert_eq!(stored["spec"]["source"]["disks"][0]["format"], json!("Auto"));
}

#[test]
fn every_crd_passes_the_cel_checks() {
    for crd in api::crds() {
        let s = CrdSchema::from_crd(&crd).unwrap();
        assert_eq!(s.cel_problems(), Vec::<String>::new(), "{}", crd.spec.names.kind);
        assert_eq!(s.group(), "ims.io");
        assert_eq!(s.version(), "v1alpha1");
        assert_eq!(s.namespaced(), crd.spec.names.kind != "Region", "{}", crd.spec.names.kind);
        assert!(s.status_subresource());
    }
}

/// A tiny deterministic generator of arbitrary JSON.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn value(&mut self, depth: usize) -> Value {
        let keys = ["spec", "status", "metadata", "region", "source", "url", "disks", "tenants", "type", "name", "x"];
        match self.next() % if depth > 4 { 6 } else { 8 } {
            0 => Value::Null,
            1 => json!(self.next().is_multiple_of(2)),
            2 => json!(self.next() as i64 - (1 << 30)),
            3 => json!((self.next() as f64) / 7.0),
            4 => json!(["", "a", "Ready", "System", "https://x/y", "é\u{200b}"][(self.next() % 6) as usize]),
            5 => json!(i64::MIN),
            6 => Value::Array((0..self.next() % 4).map(|_| self.value(depth + 1)).collect()),
            _ => {
                let mut m = serde_json::Map::new();
                for _ in 0..self.next() % 5 {
                    m.insert(keys[(self.next() % keys.len() as u64) as usize].to_string(), self.value(depth + 1));
                }
                Value::Object(m)
            }
        }
    }
}

#[test]
fn never_panics_on_arbitrary_input() {
    let schemas: Vec<CrdSchema> = api::crds().iter().map(|c| CrdSchema::from_crd(c).unwrap()).collect();
    let mut g = Lcg(42);
    for i in 0..3000 {
        let s = &schemas[i % schemas.len()];
        let mut obj = g.value(0);
        if i % 3 == 0 {
            // Keep the valid skeleton, scramble one subtree.
            let mut base = image();
            set(&mut base, "spec.source", Some(g.value(1)));
            set(&mut base, "status", Some(g.value(1)));
            obj = base;
        }
        let old = if i % 2 == 0 { Some(g.value(0)) } else { None };
        let _ = s.admit(&obj, old.as_ref());
        let _ = s.admit(&obj, Some(&obj));
    }
    // Deep nesting.
    let mut deep = json!("leaf");
    for _ in 0..5000 {
        deep = json!({"spec": deep, "x": [deep.clone()]});
        if deep.to_string().len() > 1 << 20 {
            break;
        }
    }
    // As deep as serde_json parses (its recursion limit is 128).
    let mut nested = json!(1);
    for _ in 0..127 {
        nested = json!([nested]);
    }
    for s in &schemas {
        let _ = s.admit(&deep, None);
        let _ = s.admit(&json!({"spec": {"source": nested.clone(), "tenants": nested.clone()}}), None);
        let _ = s.admit(&json!([1, 2]), None);
        let _ = s.admit(&json!("string"), Some(&json!(1)));
    }
    // Broken schemas.
    for bad in [json!(1), json!({"properties": {"a": 5}}), json!({"type": "string", "pattern": "("})] {
        if let Ok(s) = CrdSchema::from_schema_json(&bad) {
            let _ = s.admit(&json!({"a": "x", "metadata": {"name": "x"}}), None);
        }
    }
}
