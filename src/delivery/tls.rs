//! HTTPS for the image server: the certificate chain and key of a `kubernetes.io/tls` Secret
//! (`tls.crt`, `tls.key`, PEM) of the operator namespace, as cert-manager writes it. The Secret
//! is watched: a renewed certificate serves new connections at once. An unusable Secret is
//! logged and the previous certificate stays (none at the start: the server waits for one).

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::sync::watch;

/// A server configuration from PEM `tls.crt` and `tls.key`, or what is wrong with them.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt is not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key is not a PEM private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.crt and tls.key do not make a certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server configuration a `kubernetes.io/tls` Secret holds.
pub fn from_secret(secret: &Secret) -> Result<Arc<rustls::ServerConfig>, String> {
    let data = secret.data.as_ref();
    let entry = |name: &str| data.and_then(|d| d.get(name)).map(|b| b.0.as_slice());
    match (entry("tls.crt"), entry("tls.key")) {
        (Some(cert), Some(key)) => server_config(cert, key),
        _ => Err("the Secret needs the entries tls.crt and tls.key (type kubernetes.io/tls)".into()),
    }
}

/// Keeps `current` holding the configuration of Secret `name` until dropped.
pub async fn keep_current(api: Api<Secret>, name: String, current: watch::Sender<Option<Arc<rustls::ServerConfig>>>) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api.clone(), config).default_backoff());
    let namespace = api.namespace().unwrap_or_default().to_string();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => match from_secret(&secret) {
                Ok(config) => {
                    current.send_replace(Some(config));
                    tracing::info!(secret = %format!("{namespace}/{name}"), "the image server's certificate is loaded");
                }
                Err(why) => tracing::error!(
                    secret = %format!("{namespace}/{name}"), %why, "unusable TLS Secret: the previous certificate stays"
                ),
            },
            Ok(watcher::Event::Delete(_)) => {
                tracing::error!(secret = %format!("{namespace}/{name}"), "the TLS Secret is gone: the previous certificate stays");
            }
            _ => {}
        }
    }
}
