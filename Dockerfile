# syntax=docker/dockerfile:1
#
# One image for every service of the campaign engine. Each container picks its service by
# command, e.g. `python -m services.sender` (see deploy/compose.yaml and deploy/k8s/).
#
#   docker build -t campaign-engine:0.1.0 .

# --- build: install the project and its dependencies into a virtualenv ----------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /src
# Every dependency (confluent-kafka, faust-streaming, aiokafka, psycopg[binary], lz4) ships
# manylinux wheels for CPython 3.11, so no compiler is needed here.
COPY pyproject.toml ./
COPY schemas ./schemas
COPY services ./services
COPY projections ./projections
# A regular (non-editable) install: the code, SQL migrations and JSON Schemas end up in
# site-packages, so the runtime image needs no source tree.
RUN pip install .

# --- runtime ----------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CAMPAIGN_STATE_DIR=/var/lib/campaign-engine

# Fixed numeric ids, so Kubernetes' runAsNonRoot can verify the user.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app \
    && mkdir -p /var/lib/campaign-engine \
    && chown app:app /var/lib/campaign-engine

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/app

# Every service installs its own SIGTERM handler (faust does so for the hydrator), so running
# as PID 1 stops them cleanly. The default only prints the CLI's help; each service sets its
# command: python -m services.command_handler | hydrator | sender | projector | smtp_sink.
CMD ["campaignctl", "--help"]
