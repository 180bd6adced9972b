//! Every manifest in examples/ passes the generated schemas, and every manifest in
//! tests/fixtures/invalid/ is refused with exactly the field errors kube-apiserver gives
//! (its `# expect:` lines, in order).

use std::path::{Path, PathBuf};

use ims_operator::{api, schema::CrdSchema};
use serde_json::Value;

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
