//! The admin endpoint: `/healthz` (the process answers), `/readyz` (connected, CRDs present, and
//! standing by or leading with every watch cache synced) and `/metrics` (Prometheus).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Readiness shared between the operator and the admin endpoint.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the operator ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    /// Whether the operator is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Binds the admin endpoint; serve it with [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Answers admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Readiness, metrics: Arc<crate::metrics::Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let readiness = readiness.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, readiness.clone(), metrics.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    readiness: Readiness,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        return Ok(response);
    }
    let (status, body) = match req.uri().path() {
        "/healthz" | "/livez" => (StatusCode::OK, "ok\n"),
        "/readyz" if readiness.get() => (StatusCode::OK, "ok\n"),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    Ok(response)
}
