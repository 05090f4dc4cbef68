# syntax=docker/dockerfile:1.7
#
# mtls-agent image: `docker build -t mtls-agent .` from the repository root.
#
# Builder: the toolchain pieces of `cargo xtask setup` (xtask/src/setup.rs) on the same Debian
# release: stable Rust for the agent, nightly with rust-src for the eBPF crate
# (-Z build-std=core), Debian's LLVM 22 and bpf-linker built against it. The eBPF object is
# compiled by agent/build.rs (aya-build) and embedded in the agent binary.
#
# Runtime: distroless cc (glibc + libgcc, no shell) of the same Debian release, so the glibc the
# agent was linked against is the one it runs with. The image runs as UID 0 with every
# capability dropped except those the DaemonSet adds (deploy/base/daemonset.yaml,
# docs/kubernetes.md).

ARG DEBIAN_RELEASE=bookworm

FROM debian:${DEBIAN_RELEASE} AS builder
ARG RUST_VERSION=1.95.0
ARG BPF_LINKER_VERSION=0.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LLVM_PREFIX=/usr/lib/llvm-22
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl build-essential pkg-config \
      llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustup toolchain install nightly --profile minimal --component rust-src
RUN cargo install bpf-linker --locked --version "${BPF_LINKER_VERSION}" \
      --no-default-features --features llvm-22

WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit cache mounts).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mtls-agent \
 && install -D -m 0755 target/release/mtls-agent /out/mtls-agent \
 && /out/mtls-agent --version

FROM gcr.io/distroless/cc-debian12 AS runtime
LABEL org.opencontainers.image.title="mtls-agent" \
      org.opencontainers.image.description="Which connections would break if you set Istio PeerAuthentication to STRICT now?" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=builder /out/mtls-agent /usr/local/bin/mtls-agent
# Root without capabilities: the DaemonSet adds CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON.
USER 0:0
EXPOSE 9477
ENTRYPOINT ["/usr/local/bin/mtls-agent"]
CMD ["run", "--kubernetes"]
