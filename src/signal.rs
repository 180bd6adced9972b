//! Shutdown signals (SIGTERM, SIGINT), for `run` and `local`.

/// Resolves on the first SIGTERM or SIGINT, and says so.
pub async fn shutdown_signal() {
    signalled().await;
    tracing::info!("shutdown signal received; finishing in-flight work");
}

/// Resolves on the first SIGTERM or SIGINT from now on.
pub async fn signalled() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the operator");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
