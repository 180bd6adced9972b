//! The binary as a user runs it: exit codes and the messages that say what to do.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::PathBuf,
    process::{Command, Output},
};

fn operator(args: &[&str], kubeconfig: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ims-operator"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("IMS_POLICY")
        .output()
        .unwrap()
}

fn kubeconfig_for(dir: &tempfile::TempDir, server: &str) -> PathBuf {
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\"}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    path
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_without_any_cluster_config_fails_fast_with_a_hint() {
    let out = operator(
        &["run", "--admin-addr", "127.0.0.1:0", "--image-server-addr", "127.0.0.1:0"],
        "/nonexistent/kubeconfig",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("error: no usable Kubernetes configuration"), "{err}");
    assert!(err.contains("/nonexistent/kubeconfig"), "names the file it tried: {err}");
    assert!(err.contains("ims-operator local"), "suggests the embedded mode: {err}");
}

#[test]
fn run_against_an_unreachable_server_fails_fast() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig_for(&dir, &format!("http://127.0.0.1:{port}"));
    let out = operator(
        &["run", "--admin-addr", "127.0.0.1:0", "--image-server-addr", "127.0.0.1:0", "--connect-timeout", "5"],
        config.to_str().unwrap(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot reach the Kubernetes API server at http://127.0.0.1:{port}/")), "{err}");
}

/// A server that answers `/version` and nothing else, like a cluster without the CRDs.
fn serve_cluster_without_crds() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut header = String::new();
                    while reader.read_line(&mut header).unwrap_or(0) > 2 {
                        header.clear();
                    }
                    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let (code, body) = if path == "/version" {
                        ("200 OK", r#"{"major":"1","minor":"36","gitVersion":"v1.36.0","gitCommit":"","gitTreeState":"","buildDate":"","goVersion":"","compiler":"","platform":"linux/amd64"}"#.to_string())
                    } else {
                        (
                            "404 Not Found",
                            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#.to_string(),
                        )
                    };
                    let response = format!(
                        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn run_against_a_cluster_without_the_crds_names_the_install_command() {
    let port = serve_cluster_without_crds();
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig_for(&dir, &format!("http://127.0.0.1:{port}"));
    let out = operator(
        &["run", "--admin-addr", "127.0.0.1:0", "--image-server-addr", "127.0.0.1:0"],
        config.to_str().unwrap(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("error: the ims.io CRDs are not installed in this cluster"), "{err}");
    assert!(err.contains("kubectl apply -k deploy/"), "{err}");
}

#[test]
fn a_bad_policy_file_is_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "concurrentImports: lots\n").unwrap();
    let out = operator(
        &[
            "run",
            "--admin-addr",
            "127.0.0.1:0",
            "--image-server-addr",
            "127.0.0.1:0",
            "--policy",
            policy.to_str().unwrap(),
        ],
        "/nonexistent",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("key `concurrentImports`: must be a non-negative integer"), "{err}");
}

/// file:// imports read only under named directories, never the whole filesystem (where the
/// operator's ServiceAccount token is): asking for them without one, or naming `/` or a file,
/// is refused at start, before connecting.
#[test]
fn file_imports_need_directories_to_read_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--allow-file-imports"], "--allow-file-imports needs --file-import-roots DIR,..."),
        (&["--file-import-roots", "/"], "the filesystem root would allow every file"),
        (&["--file-import-roots", file.to_str().unwrap()], "is not a directory the operator can read: not a directory"),
        (
            &["--file-import-roots", "/nonexistent/images"],
            "/nonexistent/images is not a directory the operator can read",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["run", "--admin-addr", "127.0.0.1:0", "--image-server-addr", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let out = operator(&args, "/nonexistent");
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        let err = stderr(&out);
        assert!(err.contains(want) && !err.contains("Kubernetes configuration"), "{flags:?}: {err}");
    }
}

#[test]
fn help_lists_the_commands_and_env_vars() {
    let out = operator(&["--help"], "/nonexistent");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["crds", "run", "--log-format", "IMS_LOG_FORMAT"] {
        assert!(help.contains(word), "--help mentions {word}: {help}");
    }
    let out = operator(&["run", "--help"], "/nonexistent");
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["--public-namespace", "IMS_PUBLIC_NAMESPACE", "[default: ims-public]", "--policy", "IMS_POLICY"] {
        assert!(help.contains(word), "run --help mentions {word}: {help}");
    }
}

/// `run` against a served embedded API: it connects, starts the controllers, reports ready on
/// /readyz, and exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_becomes_ready_and_stops_cleanly_on_sigterm() {
    let server = ims_operator::api::embedded();
    // The Lease of leader election lives in the operator's namespace.
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(server.client());
    let system = serde_json::from_value(serde_json::json!({"metadata": {"name": "ims-system"}})).unwrap();
    namespaces.create(&Default::default(), &system).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig_for(&dir, &format!("http://{addr}"));
    let admin = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ims-operator"))
        .args(["run", "--admin-addr", &admin.to_string(), "--image-server-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", &config)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            if response.starts_with("HTTP/1.1 200") {
                ready = true;
                break;
            }
        }
    }
    assert!(ready, "/readyz answered 200 within 10s");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let pid = child.id().to_string();
    let waited = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await;
    let Ok(code) = waited else {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("the operator did not stop within 60 s of SIGTERM");
    };
    let code = code.unwrap();
    let stderr = String::from_utf8_lossy(&code.stderr);
    assert_eq!(code.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("shutdown signal received"), "{stderr}");
    assert!(stderr.contains("leading: starting controllers"), "it took the Lease: {stderr}");
    assert!(!stderr.contains("panicked"), "a clean stop panics nowhere: {stderr}");
}

/// The README's first command: `local` on examples/ imports real bytes and prints the table.
#[test]
fn local_settles_the_examples_with_real_bytes() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ims-operator"))
        .args(["local", "--check", "--data-dir", data.path().to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}\n{}", String::from_utf8_lossy(&out.stderr));
    let row =
        table.lines().find(|l| l.starts_with("Image") && l.contains("tenant-a") && l.contains("ubuntu-2404")).unwrap();
    assert!(row.contains("Active"), "{table}");
    // Every example image settles offline, the FullServer and the ISO included.
    let images: Vec<&str> = table.lines().filter(|l| l.starts_with("Image ")).collect();
    assert_eq!(images.len(), 13, "{table}");
    // The backup of a server disk (a claim bound to a local file) is captured too.
    assert!(images.iter().any(|l| l.contains("web-1-backup") && l.contains("Active")), "{table}");
    assert!(images.iter().all(|l| l.contains("Active")), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("Region") && l.contains("eu-west") && l.contains("StoreReady")),
        "{table}"
    );
    let stored = data.path().join("stores/eu-west/tenant-a/ubuntu-2404");
    let uid_dir = std::fs::read_dir(&stored).unwrap().next().unwrap().unwrap().path();
    let bytes = std::fs::read(uid_dir.join("disk")).unwrap();
    let source =
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/images/base-64m.qcow2")).unwrap();
    assert_eq!(bytes, source, "the stored bytes are the example image");
    // The encrypted example, under the key `local` made for it, holds ciphertext.
    let stored = data.path().join("stores/eu-west/tenant-a/datasets-encrypted");
    let uid_dir = std::fs::read_dir(&stored).unwrap().next().unwrap().unwrap().path();
    let sealed = std::fs::read(uid_dir.join("disk")).unwrap();
    let plain =
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/images/data-1m.raw")).unwrap();
    assert_eq!(sealed.len() as u64, ims_operator::crypt::sealed_len(plain.len() as u64));
    assert!(!sealed.windows(4096).any(|w| w == &plain[..4096]), "no plaintext in the store");
    assert!(String::from_utf8_lossy(&out.stderr).contains("KMS keys tenant-a-disks"), "local says which keys it made");
}

#[test]
fn local_check_fails_on_rejected_manifests() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid/duplicate-tenants.yaml"),
        dir.path().join("share.yaml"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ims-operator"))
        .args([
            "local",
            "--check",
            "-f",
            dir.path().to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("Rejected") && table.contains("Duplicate value: \"tenant-b\""), "{table}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("check failed: 1 object(s)"));
}

/// `--check` fails when an object has not settled by the timeout (a source that never
/// answers keeps its image Saving, retried), not only on Failed or Rejected, and names it.
#[test]
fn local_check_fails_on_objects_that_do_not_settle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/01-regions.yaml"),
        dir.path().join("regions.yaml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("image.yaml"),
        "apiVersion: ims.io/v1alpha1\nkind: Image\nmetadata: {name: unreachable, namespace: tenant-a}\nspec:\n  region: eu-west\n  type: DataDisk\n  source: {url: {url: \"https://images.invalid/never.raw\"}}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ims-operator"))
        .args(["local", "--check", "--timeout", "8", "-f", dir.path().to_str().unwrap()])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("check failed: 0 object(s) Failed, Stalled or Rejected, 1 not settled after 8s:"),
        "{stderr}"
    );
    assert!(stderr.contains("  Image tenant-a/unreachable: Saving SourceUnreachable: "), "names it and why: {stderr}");
}

/// `local --serve -o wide` serves the images it shows: the URL in the table answers curl with
/// the example's bytes while it runs, and examples/metal3/image-to-bmh.sh fills a BareMetalHost
/// from that Image through kubectl, of the shape of examples/metal3/baremetalhost.yaml.
#[test]
fn local_serves_the_images_it_lists_and_the_metal3_example_takes_their_locations() {
    use std::io::{BufRead, BufReader};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ims-operator"))
        .args(["local", "-o", "wide", "--serve", "127.0.0.1:0", "--image-server-addr", "127.0.0.1:0"])
        .args(["--data-dir", data.path().to_str().unwrap()])
        .current_dir(root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let lines = std::thread::spawn(move || stdout.lines().map_while(Result::ok).collect::<Vec<String>>());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("serving the API on") {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("local stopped: {said}");
        }
        said.push_str(&line);
    }
    let kubeconfig = data.path().join("kubeconfig");
    let kubectl = |args: &[&str]| {
        let out = Command::new("kubectl").args(args).env("KUBECONFIG", &kubeconfig).output().unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let url = kubectl(&["get", "-n", "tenant-a", "image.ims.io/ubuntu-2404", "-o", "jsonpath={.status.location.url}"]);
    let fetched = data.path().join("fetched");
    let curl = Command::new("curl").args(["-sS", "-f", "-o"]).arg(&fetched).arg(&url).output().unwrap();
    assert!(curl.status.success(), "curl {url}: {}", String::from_utf8_lossy(&curl.stderr));
    let source = std::fs::read(root.join("examples/images/base-64m.qcow2")).unwrap();
    assert!(std::fs::read(&fetched).unwrap() == source, "curl gets the example's bytes");
    let bmh = Command::new(root.join("examples/metal3/image-to-bmh.sh"))
        .args(["tenant-a", "ubuntu-2404", "worker-0"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(bmh.status.success(), "{}", String::from_utf8_lossy(&bmh.stderr));
    let filled: serde_json::Value = serde_yaml_ng::from_slice(&bmh.stdout).unwrap();
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(&source).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        filled["spec"]["image"],
        serde_json::json!({"url": url, "checksum": digest, "checksumType": "sha256", "format": "qcow2"})
    );
    let example: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(root.join("examples/metal3/baremetalhost.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        (example["apiVersion"].as_str(), example["kind"].as_str()),
        (Some("metal3.io/v1alpha1"), Some("BareMetalHost"))
    );
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&example["spec"]["image"]), keys(&filled["spec"]["image"]));
    assert_eq!(example["spec"]["image"]["checksum"], digest, "the example's checksum is the example image's");
    // Stopped, it serves no more.
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(child.wait().unwrap().success());
    let table = lines.join().unwrap().join("\n");
    assert!(table.lines().next().unwrap().ends_with("URL"), "-o wide adds the URL column: {table}");
    assert!(table.contains(&url), "the table shows the URL: {table}");
    let after = Command::new("curl").args(["-sS", "-f", "-o", "/dev/null", &url]).output().unwrap();
    assert!(!after.status.success(), "nothing serves after local stopped");
}
