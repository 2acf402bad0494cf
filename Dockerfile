# syntax=docker/dockerfile:1
#
# Two artifacts from one build (not run on the development machine: Docker is not available
# there, so this file is written carefully but untested):
#
#   docker build --target proxy -t registry.example.com/tollgate/tollgate:0.1.0 .
#       the sidecar: a static-ish binary on distroless, non-root (uid 65532), no shell.
#   docker build --target wasm  -t registry.example.com/tollgate/tollgate-wasm:0.1.0 .
#       the proxy-wasm module as an OCI image for an Istio WasmPlugin `url: oci://...`:
#       a scratch image whose single layer holds `plugin.wasm` (the layout Istio accepts).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip1
COPY . .
# Cache the registry and the target dir between builds; copy the artifacts out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p tollgate \
 && cargo build --locked -p tollgate-wasm --target wasm32-wasip1 --profile wasm \
 && mkdir -p /out \
 && cp target/release/tollgate /out/tollgate \
 && cp target/wasm32-wasip1/wasm/tollgate_wasm.wasm /out/plugin.wasm \
 && mkdir -p /out/data

FROM scratch AS wasm
COPY --from=build /out/plugin.wasm /plugin.wasm

FROM gcr.io/distroless/cc-debian12:nonroot AS proxy
COPY --from=build /out/tollgate /usr/local/bin/tollgate
COPY --from=build --chown=65532:65532 /out/data /var/lib/tollgate
USER 65532:65532
ENV TOLLGATE_DATA_DIR=/var/lib/tollgate \
    TOLLGATE_LISTEN=0.0.0.0:8080 \
    TOLLGATE_ADMIN_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["run"]
