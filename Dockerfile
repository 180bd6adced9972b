# syntax=docker/dockerfile:1
# The ims-operator image: `docker build -t ims-operator:0.1.0 .`
#
# Build stage: the release binary. The cache mounts keep the registry and target/ between builds.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace crate the operator depends on (the embedded Kubernetes API).
COPY crates ./crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ims-operator \
    && cp target/release/ims-operator /ims-operator

# Runtime stage: glibc, CA certificates (https imports, S3) and nothing else; no shell, no package
# manager. The operator detects formats and sizes itself: qemu-img is not needed at runtime.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ims-operator /usr/local/bin/ims-operator
# uid/gid 65532 ("nonroot"), as the Deployment's securityContext expects.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/ims-operator"]
CMD ["run"]
