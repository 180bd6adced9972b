//! `ims-operator mover`: what a capture's Job runs. It streams a file (a filesystem claim's
//! `disk.img`) or a block device to the operator's upload endpoint with `PUT`,
//! `Content-Length` and the one-time token of its Secret, and exits 0 once the operator answers
//! that the bytes are stored and verified. Any failure is written to the termination log, which
//! the operator shows in the image's status (`CaptureFailed`), and exits 1.
//!
//! `ims-operator restore` is the way back: it writes an image's bytes, read from its delivery
//! URL (`status.location.url`), to a file or a block device, checking the sha256 of what it
//! wrote (docs/OPERATIONS.md, "Restore").

use std::{
    io::{self, SeekFrom},
    path::PathBuf,
};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::AsyncSeekExt;

/// Flags of `mover`.
#[derive(clap::Args, Debug, Clone)]
pub struct MoverArgs {
    /// The file to send (a filesystem claim's `disk.img`).
    #[arg(
        long,
        env = "IMS_MOVER_FILE",
        value_name = "PATH",
        required_unless_present = "device",
        conflicts_with = "device"
    )]
    pub file: Option<PathBuf>,
    /// The block device to send (a block claim's `volumeDevices` path).
    #[arg(long, env = "IMS_MOVER_DEVICE", value_name = "PATH")]
    pub device: Option<PathBuf>,
    /// The upload URL (`http(s)://<operator>/v1/uploads/...`).
    #[arg(long, env = "IMS_MOVER_URL", value_name = "URL")]
    pub url: String,
    /// The file holding the one-time token (the Secret's `token`, mounted).
    #[arg(long, env = "IMS_MOVER_TOKEN_FILE", value_name = "FILE")]
    pub token_file: PathBuf,
    /// Where the reason of a failure is written (the pod's termination message).
    #[arg(long, env = "IMS_TERMINATION_LOG", value_name = "FILE", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// Bytes read from the volume at a time.
const CHUNK: usize = 1 << 20;

/// Runs the mover; the error is what was written to the termination log.
pub async fn run(args: MoverArgs) -> Result<(), String> {
    match send(&args).await {
        Ok(()) => Ok(()),
        Err(why) => {
            terminate(&args.termination_log, &why).await;
            Err(why)
        }
    }
}

async fn send(args: &MoverArgs) -> Result<(), String> {
    let path = args.device.as_ref().or(args.file.as_ref()).ok_or("give --file or --device")?;
    let token = tokio::fs::read_to_string(&args.token_file)
        .await
        .map_err(|e| format!("could not read the token file {}: {e}", args.token_file.display()))?;
    let mut file = tokio::fs::File::open(path).await.map_err(|e| format!("could not open {}: {e}", path.display()))?;
    // A block device's metadata says 0 bytes: its end is its size.
    let length = file.seek(SeekFrom::End(0)).await.map_err(|e| format!("could not size {}: {e}", path.display()))?;
    file.seek(SeekFrom::Start(0)).await.map_err(|e| format!("could not read {}: {e}", path.display()))?;
    let shown = path.display().to_string();
    let body = futures::StreamExt::boxed(futures::stream::unfold(Some(file), move |state| {
        let shown = shown.clone();
        async move {
            let mut file = state?;
            match crate::fetch::read_chunk_of(&mut file, CHUNK).await {
                Ok(chunk) if chunk.is_empty() => None,
                Ok(chunk) => Some((Ok(Frame::data(chunk)), Some(file))),
                Err(e) => Some((Err(io::Error::other(format!("reading {shown}: {e}"))), None)),
            }
        }
    }));
    let request = hyper::Request::put(&args.url)
        .header(hyper::header::CONTENT_LENGTH, length)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
        .body(StreamBody::new(body))
        .map_err(|e| format!("bad upload URL {}: {e}", args.url))?;
    let response = request_with(request).await.map_err(|why| format!("the upload to the operator failed: {why}"))?;
    let status = response.status();
    let text = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    if status.is_success() {
        tracing::info!(bytes = length, "uploaded");
        return Ok(());
    }
    Err(match status.as_u16() {
        404 => "the operator refused the upload: its token is wrong or used already, or the capture ended".to_string(),
        _ => format!("the operator refused the upload ({status}): {text}"),
    })
}

/// Sends `request` (http or https, the system's roots), the error with all its causes.
async fn request_with<B>(request: hyper::Request<B>) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no TLS roots: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    client.request(request).await.map_err(|e| {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why.push_str(&format!(": {s}"));
            source = s.source();
        }
        why
    })
}

/// Flags of `restore`.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The image's delivery URL (`status.location.url`, or a disk's).
    #[arg(long, env = "IMS_RESTORE_URL", value_name = "URL")]
    pub url: String,
    /// Write to this file (created or truncated).
    #[arg(
        long,
        env = "IMS_RESTORE_FILE",
        value_name = "PATH",
        required_unless_present = "device",
        conflicts_with = "device"
    )]
    pub file: Option<PathBuf>,
    /// Write to this block device (from its start; it must be at least as large as the image).
    #[arg(long, env = "IMS_RESTORE_DEVICE", value_name = "PATH")]
    pub device: Option<PathBuf>,
    /// `sha256:<hex>` the bytes must hash to (`status.location.checksum`): otherwise exit 1.
    #[arg(long, env = "IMS_RESTORE_CHECKSUM", value_name = "CHECKSUM")]
    pub checksum: Option<String>,
    /// Where the reason of a failure is written (the pod's termination message).
    #[arg(long, env = "IMS_TERMINATION_LOG", value_name = "FILE", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// Runs `restore`; the error is what was written to the termination log.
pub async fn restore(args: RestoreArgs) -> Result<(), String> {
    match fetch_into(&args).await {
        Ok(()) => Ok(()),
        Err(why) => {
            terminate(&args.termination_log, &why).await;
            Err(why)
        }
    }
}

async fn fetch_into(args: &RestoreArgs) -> Result<(), String> {
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let path = args.device.as_ref().or(args.file.as_ref()).ok_or("give --file or --device")?;
    let want = match args.checksum.as_deref() {
        None => None,
        Some(c) => match c.split_once(':') {
            Some(("sha256", hex)) if hex.len() == 64 => Some(hex.to_ascii_lowercase()),
            _ => return Err(format!("--checksum {c}: give sha256:<64 hex digits>")),
        },
    };
    let request = hyper::Request::get(&args.url)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("bad URL {}: {e}", args.url))?;
    let response = request_with(request).await.map_err(|why| format!("could not read {}: {why}", args.url))?;
    if !response.status().is_success() {
        return Err(format!("the image server answered {} for {}", response.status(), args.url));
    }
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true);
    if args.device.is_none() {
        options.create(true).truncate(true);
    }
    let mut out = options.open(path).await.map_err(|e| format!("could not open {}: {e}", path.display()))?;
    let mut body = response.into_body();
    let mut hasher = sha2::Sha256::new();
    let mut written: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading {} broke off after {written} bytes: {e}", args.url))?;
        let Ok(data) = frame.into_data() else { continue };
        hasher.update(&data);
        out.write_all(&data).await.map_err(|e| format!("writing {}: {e}", path.display()))?;
        written += data.len() as u64;
    }
    out.sync_all().await.map_err(|e| format!("flushing {}: {e}", path.display()))?;
    let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(want) = want
        && want != got
    {
        return Err(format!("the {written} bytes written hash to sha256:{got}, not sha256:{want}"));
    }
    tracing::info!(bytes = written, sha256 = %got, "restored");
    Ok(())
}

/// Writes `why` (at most 4000 bytes) to the termination log.
async fn terminate(log: &std::path::Path, why: &str) {
    let mut end = why.len().min(4000);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    if let Err(e) = tokio::fs::write(log, &why[..end]).await {
        tracing::warn!(path = %log.display(), error = %e, "could not write the termination log");
    }
}
