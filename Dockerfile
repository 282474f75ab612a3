# The ktrace agent image: the agent (ktrace_agent) and its two runtime dependencies, grpcio and protobuf,
# on a slim Python base, running as a non-root user. It installs only from wheels in the build context
# (dist/agent/, made by scripts/agent-wheels), so it builds without network access. One command does both:
#
#   ktrace image build [--tag REF] [--push | --load kind|minikube|containerd|docker]   (docs/kubernetes.md)
#
# By hand: scripts/agent-wheels --python-version 3.11 (the base's Python), then
#   docker build --network none [--build-arg BASE=python:3.11-slim] -t REF .
# The test cluster builds it with `ktrace image build --builder buildah --base ktrace.local/base:1`
# (docs/test-cluster.md). ktrace starts it with `--listen 127.0.0.1:PORT --token-sha256 HEX --idle-exit SECONDS`.
ARG BASE=python:3.11-slim

FROM ${BASE} AS install
COPY dist/agent/ /tmp/wheels/
# Debian's python3 has no pip: run pip from its wheel. --target keeps the agent in one directory the final
# stage copies; the laptop half of the ktrace wheel (ktrace/, its console script) is dropped.
RUN set -e; \
    ls /tmp/wheels/ktrace-*.whl /tmp/wheels/pip-*.whl >/dev/null 2>&1 \
        || { echo "dist/agent/ lacks the wheels: run scripts/agent-wheels" >&2; exit 1; }; \
    pip="python3 $(echo /tmp/wheels/pip-*.whl)/pip install --quiet --no-index --no-cache-dir \
        --disable-pip-version-check --root-user-action=ignore --target /opt/ktrace-agent"; \
    $pip --find-links /tmp/wheels grpcio protobuf; \
    $pip --no-deps /tmp/wheels/ktrace-*.whl; \
    rm -rf /opt/ktrace-agent/ktrace /opt/ktrace-agent/bin; \
    PYTHONPATH=/opt/ktrace-agent python3 -m ktrace_agent --version

FROM ${BASE}
COPY --from=install /opt/ktrace-agent /opt/ktrace-agent
# The pod's root filesystem is read-only: nothing is written at run time (bytecode was compiled at install).
ENV PYTHONPATH=/opt/ktrace-agent PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Numeric, so the kubelet can check runAsNonRoot without an /etc/passwd entry.
USER 65532:65532
ENTRYPOINT ["python3", "-m", "ktrace_agent"]
