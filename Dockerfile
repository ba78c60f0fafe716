# syntax=docker/dockerfile:1
# The operator as a static, non-root image: built for the musl target on Alpine (statically
# linked; TLS is rustls + ring, no OpenSSL), shipped on distroless/static, which holds the CA
# certificates the KMS and IAM endpoints need and nothing else (no shell, no package manager).
#
#   docker build -t ghcr.io/kmsgrant/kmsgrant-operator:0.1.0 .
#
# Multi-arch: docker buildx build --platform linux/amd64,linux/arm64 (each builds natively).
# Keep in step with rust-toolchain.toml and scripts/cargo-auditable (tests/supply_chain.rs checks).
ARG RUST_VERSION=1.95.0
ARG CARGO_AUDITABLE_VERSION=0.7.7

FROM rust:${RUST_VERSION}-alpine AS build
ARG CARGO_AUDITABLE_VERSION
RUN apk add --no-cache musl-dev
# `cargo auditable build` embeds the binary's dependency list (section .dep-v0), which scanners
# read from the image: `docker buildx build --sbom=true` (BuildKit's SBOM), trivy, grype, syft.
# Installed before the sources are copied, so this layer survives source changes.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo install cargo-auditable --version "${CARGO_AUDITABLE_VERSION}" --locked
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY src ./src
# Every workspace member's manifest must be present; only the client crates are compiled (the
# emulator is behind the `dev` feature, which the image does not enable).
COPY crates ./crates
# `kmsgrant-operator dev` embeds the example grant (include_str! in src/dev.rs).
COPY deploy/examples ./deploy/examples
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo auditable build --release --locked --bin kmsgrant-operator \
 && install -D -m 0755 target/release/kmsgrant-operator /out/kmsgrant-operator

# Without a registry or network: the files `scripts/image --dockerfile` collects (the binary, the
# glibc libraries it links, the CA bundle, /etc/passwd, the SBOM in
# /usr/share/doc/kmsgrant-operator/) are the build context, on an empty base.
#   scripts/image --dockerfile    (buildah bud --target local -f Dockerfile <collected root>)
FROM scratch AS local
COPY . /
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kmsgrant-operator"]
CMD ["run"]

# The published image (the default target).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/kmsgrant-operator /usr/local/bin/kmsgrant-operator
# distroless's "nonroot" user; the Deployment and the chart run as the same UID.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kmsgrant-operator"]
CMD ["run"]
