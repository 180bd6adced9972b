//! The `ims-operator` binary: see `ims-operator --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ims_operator::cli::main().await
}
