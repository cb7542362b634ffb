# The GPU flavour of the gantry image: the same FROM scratch layout, with a `gantry` built with
# `--features cuda` and what its CUDA backend loads at run time besides the driver (NVRTC 13
# and the CUDA headers, from NVIDIA's PyPI wheels). The NVIDIA container runtime mounts the
# driver (libcuda.so.1, and libnvidia-ml.so.1 for the agent's NVML). Offline, from the host:
#
#   cargo build --release -p gantry-cli --features cuda
#   sh compose/stage-binaries target/release/gantry target/docker-gpu
#   sh compose/stage-cuda-runtime target/docker-gpu
#   docker build -f compose/gpu.Dockerfile -t gantry:0.1.0-cuda .
FROM scratch AS staged
COPY target/docker-gpu/ /

FROM scratch
COPY --from=staged / /
COPY --from=staged --chown=10001:10001 /var/lib/ /var/lib/
USER 10001:10001
ENV GANTRY_DATA_DIR=/var/lib/gantry \
    CUDA_PATH=/usr/local/cuda \
    LD_LIBRARY_PATH=/usr/local/cuda/lib64
EXPOSE 7070 7080
ENTRYPOINT ["/usr/local/bin/gantry"]
