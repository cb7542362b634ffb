# gantry's agent inside your own training image. `command:` jobs placed on such an agent run as
# processes in this image, with its Python, CUDA and libraries: the way to run PyTorch scripts
# on Kubernetes without giving the agent the node's container engine (see the Helm chart's
# agent.containerEngine for that). The base must have glibc (Debian, Ubuntu and the PyTorch
# images do).
#
#   cargo build --release -p gantry-cli
#   docker build -f examples/agent-in-your-image.Dockerfile \
#       --build-arg BASE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime -t team/gantry-agent:1 .
#   helm install gantry charts/gantry \
#       --set agent.image.repository=team/gantry-agent --set agent.image.tag=1
ARG BASE
FROM ${BASE}
COPY target/release/gantry /usr/local/bin/gantry
# The chart runs the agent as 10001; its work directory is its own.
RUN mkdir -p /var/lib/gantry-agent && chown 10001:10001 /var/lib/gantry-agent
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/gantry"]
