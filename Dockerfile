# The gantry image: one static-enough binary (it links only glibc, libm and libgcc_s) on an
# empty base, run as a non-root user. Three ways to build it:
#
#   docker build -t gantry:0.1.0 .
#       With a registry: compiles in the official Rust image (stage `build`), then copies the
#       binary and the libraries it links into an empty image (stage `from-source`, the last).
#
#   docker build --target runtime -t gantry:0.1.0 .
#       Offline (no registry, as on gantry's CI): the binary is built on the host first and
#       laid out under target/docker/ with its libraries (`compose/stage-binaries` does it);
#       nothing is pulled. The legacy builder stops at `runtime` and never reaches `build`.
#
# The GPU agent needs nothing more in the image: the NVIDIA container runtime mounts the driver's
# libnvidia-ml.so.1 (NVML) into the container. gantry's own training runtime runs on the CPU.

# S3 over https needs CA certificates: stage-binaries copies the build machine's bundle.

# --- offline: binaries staged on the host -------------------------------------------------
FROM scratch AS staged
COPY target/docker/ /

FROM scratch AS runtime
COPY --from=staged / /
# COPY does not keep the context's owners: the directories gantry writes to are its user's.
COPY --from=staged --chown=10001:10001 /var/lib/ /var/lib/
USER 10001:10001
ENV GANTRY_DATA_DIR=/var/lib/gantry
EXPOSE 7070 7080
ENTRYPOINT ["/usr/local/bin/gantry"]

# --- with a registry: compile here ----------------------------------------------------------
FROM rust:1.92-bookworm AS build
WORKDIR /src
COPY . .
# protoc: etcd-client's build. Both features, so the image serves the Helm chart's HA settings.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev
RUN cargo build --release -p gantry-cli --features etcd,s3 \
    && sh compose/stage-binaries target/release/gantry /out

FROM scratch AS from-source
COPY --from=build /out/ /
COPY --from=build --chown=10001:10001 /out/var/lib/ /var/lib/
USER 10001:10001
ENV GANTRY_DATA_DIR=/var/lib/gantry
EXPOSE 7070 7080
ENTRYPOINT ["/usr/local/bin/gantry"]
