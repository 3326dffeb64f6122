# syntax=docker/dockerfile:1
# Leveret worker image: `docker build -t leveret:0.1.0 .`
# Your jobs go on top (docs/deploy.md):  FROM leveret:0.1.0 / COPY app.py /app/
# and the pod runs `leveret worker app:worker`. Settings and secrets come from the environment at
# run time (LEVERET_*); nothing secret is baked in.

ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

# ---- build: a virtualenv with Leveret and its dependencies --------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/leveret
WORKDIR /src
# The project metadata first: a change in the code then reuses the layers above.
COPY pyproject.toml README.md ./
COPY topology/ topology/
COPY producers/ producers/
COPY consumer/ consumer/
COPY leveret/ leveret/
# A regular (non-editable) install: the final image needs no source tree. The dependencies ship as
# wheels; the slim base has no compiler, so one that needs building fails here, not at run time.
RUN /opt/leveret/bin/pip install --no-cache-dir ".[api,status]" \
    && /opt/leveret/bin/leveret --help > /dev/null

# ---- run: the slim base, the virtualenv, an unprivileged user -----------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="leveret" \
      org.opencontainers.image.description="Background jobs for Python on RabbitMQ: the worker" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 leveret \
    && useradd --system --uid 10001 --gid leveret --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin leveret
COPY --from=build /opt/leveret /opt/leveret
ENV PATH=/opt/leveret/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LEVERET_METRICS_PORT=9808
# `leveret worker APP` imports APP from the current directory: put your modules in /app.
WORKDIR /app
# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
EXPOSE 9808
# Exec form: `leveret` is PID 1 and receives SIGTERM itself (graceful shutdown, exit 0).
ENTRYPOINT ["leveret"]
CMD ["--help"]
