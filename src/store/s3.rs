//! `s3://bucket/prefix` stores, over the operator's own HTTP client (hyper + rustls with the
//! system roots) rather than reqwest, to keep the dependency tree lean.

use std::sync::Arc;

use http_body_util::BodyExt;
use object_store::{
    ClientOptions,
    aws::AmazonS3Builder,
    client::{
        HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse,
        HttpResponseBody, HttpService,
    },
    prefix::PrefixStore,
};

use super::{RegionStore, S3Credentials, StoreError};
use crate::api::RegionStorage;

pub(super) fn open(
    url: &str,
    rest: &str,
    spec: &RegionStorage,
    credentials: Option<&S3Credentials>,
) -> Result<RegionStore, StoreError> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(StoreError::InvalidSpec(format!(
            "s3:// URLs need a bucket: {url:?} has none; use s3://bucket/prefix"
        )));
    }
    let Some(credentials) = credentials else {
        return Err(StoreError::InvalidSpec(
            "s3:// stores need storage.secretRef: a Secret in the operator's namespace with keys accessKeyID and secretAccessKey".into(),
        ));
    };
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(spec.s3_region.clone().unwrap_or_else(|| "us-east-1".into()))
        .with_access_key_id(&credentials.access_key_id)
        .with_secret_access_key(&credentials.secret_access_key)
        .with_http_connector(HyperConnector);
    if let Some(endpoint) = &spec.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    let s3 = builder.build().map_err(|e| StoreError::InvalidSpec(format!("cannot use {url}: {e}")))?;
    let store: Arc<dyn object_store::ObjectStore> = if prefix.trim_matches('/').is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(PrefixStore::new(s3, prefix.trim_matches('/')))
    };
    Ok(RegionStore::from_object_store(store, url.trim_end_matches('/')))
}

/// Longest wait for a TCP (and TLS) connection to the store.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest wait for a response's headers (a part upload sends its body first).
const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// object_store's HTTP connector on hyper, with connect and response timeouts (object_store's
/// own timeouts apply only to its reqwest connector).
#[derive(Debug)]
struct HyperConnector;

impl HttpConnector for HyperConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| object_store::Error::Generic { store: "S3", source: Box::new(e) })?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        Ok(HttpClient::new(HyperService { client }))
    }
}

#[derive(Debug)]
struct HyperService {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        HttpRequestBody,
    >,
}

#[async_trait::async_trait]
impl HttpService for HyperService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| {
                let message = format!("the store sent no response within {RESPONSE_TIMEOUT:?}");
                HttpError::new(HttpErrorKind::Timeout, std::io::Error::new(std::io::ErrorKind::TimedOut, message))
            })?
            .map_err(|e| {
                let kind = if e.is_connect() { HttpErrorKind::Connect } else { HttpErrorKind::Request };
                HttpError::new(kind, e)
            })?;
        let (parts, body) = response.into_parts();
        let body = body.map_err(|e| HttpError::new(HttpErrorKind::Decode, e));
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}
