//! The `ims-operator` command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use kube::Client;

use crate::{
    admin::{self, Readiness},
    api,
    controllers::{self, Config},
    policy::{Policy, PolicyError},
    signal::{shutdown_signal, signalled},
    store::StoreConfig,
};

/// ims-operator: a Kubernetes-native Image Management Service.
///
/// Tenants (namespaces) import disk images into regions, share them with other tenants, copy
/// them to other regions and stay inside quotas, all declared with `kubectl apply`.
#[derive(Parser, Debug)]
#[command(name = "ims-operator", version, propagate_version = true)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log pipelines. Filter with RUST_LOG
    /// (default `info`).
    #[arg(long, env = "IMS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the CustomResourceDefinitions (YAML), or write them to a directory.
    ///
    /// Install them with `ims-operator crds | kubectl apply --server-side -f -`.
    Crds {
        /// Write one file per CRD (`<plural>.ims.io.yaml`) into this directory instead of
        /// printing them.
        #[arg(long, env = "IMS_CRDS_DIR")]
        output_dir: Option<PathBuf>,
    },
    /// Run the operator against the cluster of KUBECONFIG, or the in-cluster config.
    Run(Box<RunArgs>),
    /// Run everything locally on the embedded API (no cluster needed): apply a directory of
    /// manifests, let the controllers settle them, print the outcome like `kubectl get ims -A`.
    Local(crate::local::LocalArgs),
    /// Stream a volume to the operator (what a capture's mover Job runs): PUT the file or
    /// block device to --url with the token of --token-file. A failure is written to
    /// --termination-log (the pod's termination message) and exits 1.
    Mover(crate::mover::MoverArgs),
    /// Write an image back to a file or block device from its delivery URL (what a restore
    /// Job runs), checking its sha256; a failure goes to --termination-log and exits 1.
    Restore(crate::mover::RestoreArgs),
}

/// Flags of `run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The platform namespace: the only namespace whose images may be `visibility: Public`.
    #[arg(long, env = "IMS_PUBLIC_NAMESPACE", default_value = "ims-public")]
    pub public_namespace: String,
    /// Policy file (YAML) overriding the default limits, e.g. `shareMembersPerImage: 256`.
    /// Keys: privateImagesPerRegion, imageBytesPerRegion, concurrentImports,
    /// concurrentCrossRegionCopies, shareMembersPerImage, fullServerShareMembersPerImage,
    /// maxCrossRegionCopyGiB, maxImageSizeGiB.
    #[arg(long, env = "IMS_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// How long to wait for the API server to answer at start-up, in seconds.
    #[arg(long, env = "IMS_CONNECT_TIMEOUT", default_value_t = 10, value_name = "SECONDS")]
    pub connect_timeout: u64,
    /// The operator's own namespace: Secrets with S3 credentials of Regions live there.
    #[arg(long, env = "IMS_OPERATOR_NAMESPACE", default_value = "ims-system")]
    pub operator_namespace: String,
    /// Directory under which `file://` region stores must live.
    #[arg(long, env = "IMS_FILE_STORE_ROOT", default_value = "/var/lib/ims", value_name = "DIR")]
    pub file_store_root: PathBuf,
    /// Allow `file://` image sources, read only under `--file-import-roots` (required with it).
    #[arg(long, env = "IMS_ALLOW_FILE_IMPORTS")]
    pub allow_file_imports: bool,
    /// Directories `file://` image sources may be read from (comma-separated; implies
    /// `--allow-file-imports`). Never the whole filesystem: it holds the operator's credentials.
    #[arg(long, env = "IMS_FILE_IMPORT_ROOTS", value_delimiter = ',', value_name = "DIR,...")]
    pub file_import_roots: Vec<PathBuf>,
    /// Address ranges imports may reach although they are loopback, private or link-local
    /// (comma-separated CIDRs, e.g. `10.20.0.0/16,fd00::/8`). Everything else non-public is refused.
    #[arg(long, env = "IMS_IMPORT_ALLOW_CIDRS", value_delimiter = ',', value_name = "CIDR,...")]
    pub import_allow_cidrs: Vec<crate::fetch::Cidr>,
    /// How often import progress is written to an Image's status, in seconds.
    #[arg(long, env = "IMS_PROGRESS_INTERVAL", default_value_t = 2, value_name = "SECONDS")]
    pub progress_interval: u64,
    /// Address of the admin endpoint (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "IMS_ADMIN_ADDR", default_value = "0.0.0.0:8080", value_name = "ADDR")]
    pub admin_addr: std::net::SocketAddr,
    /// Take part in leader election on the Lease `ims-operator` of the operator namespace: only
    /// the leader reconciles (run several replicas for HA). `--leader-elect=false` runs alone.
    #[arg(long, env = "IMS_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub leader_elect: bool,
    /// How long the Lease holds without renewal: a standby takes over after this, in seconds.
    #[arg(long, env = "IMS_LEASE_DURATION", default_value_t = 15, value_name = "SECONDS")]
    pub lease_duration: u64,
    /// This replica's identity in leader election (default: the pod name from HOSTNAME).
    #[arg(long, env = "IMS_LEADER_IDENTITY", value_name = "NAME")]
    pub leader_identity: Option<String>,
    /// After SIGTERM/SIGINT, how long in-flight work may take to finish before the operator stops
    /// anyway (exit code 1), in seconds; keep it below the pod's terminationGracePeriodSeconds.
    /// A second signal stops it at once.
    #[arg(long, env = "IMS_GRACEFUL_SHUTDOWN_TIMEOUT", default_value_t = 30, value_name = "SECONDS")]
    pub graceful_shutdown_timeout: u64,
    #[command(flatten)]
    pub images: ImageServerArgs,
    #[command(flatten)]
    pub capture: CaptureArgs,
}

/// Flags of captures (`run`): the mover Jobs.
#[derive(clap::Args, Debug, Clone)]
pub struct CaptureArgs {
    /// The container image of capture mover Jobs: the operator's own (deploy/ sets it). Without
    /// it, captures fail with CaptureFailed saying so.
    #[arg(long, env = "IMS_MOVER_IMAGE", value_name = "IMAGE")]
    pub mover_image: Option<String>,
    /// The URL movers upload to: this pod's image server, where the capture waits (deploy/
    /// sets `http://$(POD_IP):8081`). Default: the image base URL.
    #[arg(long, env = "IMS_UPLOAD_BASE_URL", value_name = "URL")]
    pub upload_base_url: Option<String>,
    /// A mover Job's activeDeadlineSeconds.
    #[arg(long, env = "IMS_CAPTURE_DEADLINE", default_value_t = 6 * 3600, value_name = "SECONDS")]
    pub capture_deadline: u64,
}

impl CaptureArgs {
    /// The movers' configuration, uploading to `upload_base_url` or else `image_base_url`.
    pub fn mover(&self, image_base_url: &str) -> Result<Option<crate::controllers::MoverConfig>, CliError> {
        let Some(image) = self.mover_image.clone() else { return Ok(None) };
        let upload_base_url = match &self.upload_base_url {
            Some(url) => base_url(url)?,
            None => image_base_url.to_string(),
        };
        let deadline = Duration::from_secs(self.capture_deadline.max(60));
        Ok(Some(crate::controllers::MoverConfig { image, upload_base_url, deadline }))
    }
}

/// Flags of the image server (`run`).
#[derive(clap::Args, Debug, Clone)]
pub struct ImageServerArgs {
    /// Address the image server listens on: every Active image's `status.location.url` points
    /// here (the leader serves; the Service `ims-images` routes to it).
    #[arg(long, env = "IMS_IMAGE_SERVER_ADDR", default_value = "0.0.0.0:8081", value_name = "ADDR")]
    pub image_server_addr: std::net::SocketAddr,
    /// The URL consumers reach the image server at, which locations start with (default:
    /// the Service, `http://ims-images.<operator namespace>.svc:<port>`, `https://` with TLS).
    #[arg(long, env = "IMS_IMAGE_BASE_URL", value_name = "URL")]
    pub image_base_url: Option<String>,
    /// Serve HTTPS with the certificate of this `kubernetes.io/tls` Secret of the operator
    /// namespace (`tls.crt`, `tls.key`; cert-manager's renewals are picked up).
    #[arg(long, env = "IMS_IMAGE_SERVER_TLS_SECRET", value_name = "NAME")]
    pub image_server_tls_secret: Option<String>,
    /// The Secret of the operator namespace holding the key image URLs are signed with (entry
    /// `hmac`, 32 bytes; created when missing). Deleting it rotates the key: every URL changes.
    #[arg(long, env = "IMS_IMAGE_KEY_SECRET", default_value = crate::delivery::key::DEFAULT_SECRET, value_name = "NAME")]
    pub image_key_secret: String,
}

impl ImageServerArgs {
    /// The image server's configuration: its listener bound, its base URL checked.
    pub async fn delivery(&self, operator_namespace: &str) -> Result<crate::delivery::DeliveryConfig, CliError> {
        let addr = self.image_server_addr;
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| CliError::ImageServerBind { addr, source })?;
        let scheme = if self.image_server_tls_secret.is_some() { "https" } else { "http" };
        let base_url = match &self.image_base_url {
            Some(url) => base_url(url)?,
            None => {
                let port = listener.local_addr().map_or(addr.port(), |a| a.port());
                format!("{scheme}://ims-images.{operator_namespace}.svc:{port}")
            }
        };
        Ok(crate::delivery::DeliveryConfig {
            listener: std::sync::Arc::new(listener),
            base_url,
            key_secret: self.image_key_secret.clone(),
            tls_secret: self.image_server_tls_secret.clone(),
            limits: Default::default(),
        })
    }
}

/// A base URL as `--image-base-url` takes it: `http(s)://host[:port][/prefix]`, no query, no
/// fragment, no credentials; returned without its trailing `/`.
pub fn base_url(url: &str) -> Result<String, CliError> {
    let refused = |why: &str| CliError::ImageBaseUrl { url: url.to_string(), why: why.to_string() };
    let uri: http::Uri = url.parse().map_err(|_| refused("not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(refused("it must start with http:// or https://"));
    }
    let authority = uri.authority().ok_or_else(|| refused("it names no host"))?;
    if authority.as_str().contains('@') {
        return Err(refused("it must not carry credentials"));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(refused("it must not have a query or a fragment"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// Why a command failed: each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The policy file is unusable.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No cluster configuration was found or it is unusable.
    #[error(
        "no usable Kubernetes configuration: {0}\nhint: set KUBECONFIG to a kubeconfig file, run inside a cluster, or try `ims-operator local` which needs no cluster"
    )]
    Config(String),
    /// The API server did not answer.
    #[error(
        "cannot reach the Kubernetes API server at {url}: {reason}\nhint: check KUBECONFIG and that the cluster is running"
    )]
    Unreachable {
        /// Server URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The CRDs are not installed.
    #[error(
        "the ims.io CRDs are not installed in this cluster ({missing})\nhint: install them with `kubectl apply -k deploy/` or `ims-operator crds | kubectl apply --server-side -f -`"
    )]
    CrdsMissing {
        /// What is missing.
        missing: String,
    },
    /// The admin endpoint's address could not be bound.
    #[error("cannot listen on {addr} for /healthz and /readyz: {source}\nhint: choose another --admin-addr")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The image server's address could not be bound.
    #[error("cannot listen on {addr} for the image server: {source}\nhint: choose another --image-server-addr")]
    ImageServerBind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `--image-base-url` is unusable.
    #[error("--image-base-url {url}: {why} (for example https://images.example.com)")]
    ImageBaseUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// `--allow-file-imports` without a directory to read from.
    #[error(
        "--allow-file-imports needs --file-import-roots DIR,...: file:// imports are read only under the directories named there, never from the whole filesystem (it holds the operator's ServiceAccount token)"
    )]
    FileImportsWithoutRoots,
    /// A `--file-import-roots` directory is unusable.
    #[error("--file-import-roots: {path} is not a directory the operator can read: {reason}")]
    FileImportRoot {
        /// The directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// Files could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The generated CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> String {
    api::crds().iter().map(crd_yaml).collect::<Vec<_>>().join("---\n")
}

/// One CRD as YAML.
pub fn crd_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    serde_yaml_ng::to_string(crd).expect("a CRD always serializes")
}

/// File name of a CRD in `crds/`.
pub fn crd_file_name(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// `kustomization.yaml` of the CRD directory, so `deploy/` can use it as a base.
pub fn crds_kustomization() -> String {
    let mut out = String::from(
        "# Generated by `ims-operator crds --output-dir crds`: do not edit.\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n",
    );
    for crd in api::crds() {
        out.push_str(&format!("- {}\n", crd_file_name(&crd)));
    }
    out
}

/// Sets up logging as the flags say.
pub fn init_tracing(format: LogFormat, default_level: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Entry point of the binary.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `local` talks to a person on stderr: only errors are logged unless RUST_LOG says more.
    let default_level = if matches!(cli.command, Command::Local(_)) { "error" } else { "info" };
    init_tracing(cli.log_format, default_level);
    let result: Result<u8, String> = match cli.command {
        Command::Crds { output_dir } => write_crds(output_dir).map(|()| 0).map_err(|e| e.to_string()),
        Command::Run(args) => run(*args).await.map(|()| 0).map_err(|e| e.to_string()),
        Command::Local(args) => crate::local::run(args).await.map_err(|e| e.to_string()),
        Command::Mover(args) => crate::mover::run(args).await.map(|()| 0),
        Command::Restore(args) => crate::mover::restore(args).await.map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn write_crds(dir: Option<PathBuf>) -> Result<(), CliError> {
    let Some(dir) = dir else {
        print!("{}", crds_yaml());
        return Ok(());
    };
    let write_err = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| CliError::Write { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;
    for crd in api::crds() {
        let path = dir.join(crd_file_name(&crd));
        std::fs::write(&path, crd_yaml(&crd)).map_err(write_err(&path))?;
    }
    let path = dir.join("kustomization.yaml");
    std::fs::write(&path, crds_kustomization()).map_err(write_err(&path))?;
    Ok(())
}

/// `ims-operator run`: connect, check the CRDs, run every controller until SIGTERM/SIGINT.
pub async fn run(args: RunArgs) -> Result<(), CliError> {
    let policy = match &args.policy {
        Some(path) => Policy::from_file(path)?,
        None => Policy::default(),
    };
    let file_roots = file_import_roots(args.allow_file_imports, &args.file_import_roots)?;
    let listener =
        admin::bind(args.admin_addr).await.map_err(|source| CliError::Bind { addr: args.admin_addr, source })?;
    let readiness = Readiness::default();
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
    tokio::spawn(admin::serve(listener, readiness.clone(), metrics.clone()));
    let config = kube::Config::infer().await.map_err(|e| CliError::Config(e.to_string()))?;
    let url = config.cluster_url.to_string();
    let lease_config = config.clone();
    let client = Client::try_from(config).map_err(|e| CliError::Config(e.to_string()))?;
    // The Lease gets a client of its own, made on the election's own runtime (see `leader::run`);
    // the same configuration just made `client`. Both retry 429/503/504 with backoff and honour
    // Retry-After (kube's default retry policy).
    let lease_client = {
        let fallback = client.clone();
        move || Client::try_from(lease_config).unwrap_or(fallback)
    };
    let timeout = Duration::from_secs(args.connect_timeout);
    let unreachable = |reason: String| CliError::Unreachable { url: url.clone(), reason };
    let version = tokio::time::timeout(timeout, client.apiserver_version())
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", args.connect_timeout)))?
        .map_err(|e| unreachable(e.to_string()))?;
    tracing::info!(server = %url, version = %version.git_version, "connected");
    check_crds(&client).await?;
    let delivery = args.images.delivery(&args.operator_namespace).await?;
    let mover = args.capture.mover(&delivery.base_url)?;

    let config = Config {
        policy,
        public_namespace: args.public_namespace,
        operator_namespace: args.operator_namespace,
        stores: StoreConfig { file_url_root: args.file_store_root.clone(), file_dir: args.file_store_root },
        fetch: crate::fetch::FetchPolicy {
            allow_file: !file_roots.is_empty(),
            file_roots,
            allow_cidrs: args.import_allow_cidrs,
            ..Default::default()
        },
        progress_every: Duration::from_secs(args.progress_interval.max(1)),
        readiness: readiness.clone(),
        metrics,
        delivery: Some(delivery),
        // A volume's path is on its node, not in this pod: captures need the mover Job.
        capture_in_process: false,
        mover,
    };
    tracing::info!(
        public_namespace = %config.public_namespace,
        leader_elect = args.leader_elect,
        images = %config.delivery.as_ref().map(|d| d.base_url.as_str()).unwrap_or_default(),
        "starting"
    );
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown_signal()));
    let work = async {
        if args.leader_elect {
            let identity = args
                .leader_identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("ims-operator-{}", std::process::id()));
            let lease = crate::leader::LeaseConfig {
                name: "ims-operator".into(),
                namespace: config.operator_namespace.clone(),
                identity,
                duration: Duration::from_secs(args.lease_duration.max(2)),
            };
            crate::leader::run(client, lease_client, lease, config, shutdown.clone()).await;
        } else {
            controllers::run(client, config, shutdown.clone()).await;
        }
    };
    let grace = Duration::from_secs(args.graceful_shutdown_timeout);
    let deadline = async {
        shutdown.clone().await;
        tokio::select! {
            _ = tokio::time::sleep(grace) => tracing::warn!(
                seconds = grace.as_secs(), "in-flight work did not finish in time after the shutdown signal; stopping anyway"
            ),
            _ = signalled() => tracing::warn!("a second shutdown signal: stopping at once"),
        }
    };
    tokio::select! {
        _ = work => {}
        _ = deadline => {
            readiness.set(false);
            // Not waiting for what did not finish: the next leader starts those moves again.
            std::process::exit(1);
        }
    }
    readiness.set(false);
    tracing::info!("stopped");
    Ok(())
}

/// Verifies through discovery (allowed to every authenticated user) that all five kinds are served.
/// The directories `file://` imports may read (resolved), from `--allow-file-imports` and
/// `--file-import-roots`: none unless roots are named; `--allow-file-imports` alone is an error.
fn file_import_roots(allow: bool, roots: &[PathBuf]) -> Result<Vec<PathBuf>, CliError> {
    if allow && roots.is_empty() {
        return Err(CliError::FileImportsWithoutRoots);
    }
    roots
        .iter()
        .map(|root| {
            let refused = |reason: String| CliError::FileImportRoot { path: root.display().to_string(), reason };
            let resolved = std::fs::canonicalize(root).map_err(|e| refused(e.to_string()))?;
            match resolved.is_dir() {
                true if resolved == std::path::Path::new("/") => Err(refused(
                    "the filesystem root would allow every file; name the directories that hold images".into(),
                )),
                true => Ok(resolved),
                false => Err(refused("not a directory".into())),
            }
        })
        .collect()
}

async fn check_crds(client: &Client) -> Result<(), CliError> {
    let served = match client.list_api_group_resources(api::API_VERSION).await {
        Ok(list) => list.resources.into_iter().map(|r| r.kind).collect::<Vec<_>>(),
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(e) => return Err(CliError::Unreachable { url: "discovery".into(), reason: e.to_string() }),
    };
    let missing: Vec<String> =
        api::crds().into_iter().map(|crd| crd.spec.names.kind).filter(|kind| !served.contains(kind)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let what = if served.is_empty() {
        format!("the API group {} is not served", api::API_VERSION)
    } else {
        format!("missing kinds: {}", missing.join(", "))
    };
    Err(CliError::CrdsMissing { missing: what })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn image_base_urls_are_checked() {
        assert_eq!(base_url("https://images.example.com/").unwrap(), "https://images.example.com");
        assert_eq!(base_url("http://10.0.0.5:8081/ims").unwrap(), "http://10.0.0.5:8081/ims");
        for bad in ["images.example.com", "ftp://x", "https://u:p@x", "https://x/?a=1", "https://x/#f", "http://"] {
            let err = base_url(bad).expect_err(bad).to_string();
            assert!(err.starts_with(&format!("--image-base-url {bad}: ")), "{err}");
        }
    }

    #[test]
    fn every_flag_has_an_env_var() {
        fn check(cmd: &clap::Command) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                assert!(
                    builtin || arg.get_env().is_some(),
                    "--{} of `{}` has no IMS_* variable",
                    arg.get_id(),
                    cmd.get_name()
                );
            }
            cmd.get_subcommands().for_each(check);
        }
        check(&Cli::command());
    }
}
