# syntax=docker/dockerfile:1
# Images of the operator and the sidecar, from one build:
#   docker build --target operator -t idemq-operator .
#   docker build --target sidecar  -t idemq-sidecar .
# Runtime: distroless (glibc, CA certificates, no shell), user 65532 (nonroot).

FROM rust:1.95-bookworm AS build
# libzmq (ZeroMQ source), built with libsodium so CURVE works.
RUN apt-get update && apt-get install -y --no-install-recommends libzmq3-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p idemq-operator -p idemq-sidecar \
 && install -D -m 0755 target/release/idemq-operator target/release/idemq-sidecar -t /out
# The sidecar's runtime libraries that distroless lacks: Debian's libzmq5 and
# what it links (libsodium, libpgm, libnorm, Kerberos), not glibc's or libstdc++,
# which the runtime image has.
RUN mkdir -p /out/lib \
 && zmq=$(ldd /out/idemq-sidecar | awk '/libzmq/ {print $3}') \
 && { echo "$zmq"; ldd "$zmq" | awk '/=> \// {print $3}'; } \
    | grep -vE '/(libc|libm|libpthread|libresolv|libdl|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*)\.so' \
    | xargs -I{} cp -L {} /out/lib/

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/idemq-operator /usr/local/bin/idemq-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/idemq-operator"]
CMD ["run"]

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /out/idemq-sidecar /usr/local/bin/idemq-sidecar
COPY --from=build /out/lib/ /usr/local/lib/idemq/
ENV LD_LIBRARY_PATH=/usr/local/lib/idemq
USER 65532:65532
# Admin listener: /healthz, /readyz, /metrics. (The gate-mode claim API
# listens on 127.0.0.1 only, for the app in the same pod.)
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/idemq-sidecar"]
