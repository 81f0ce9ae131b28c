# One image for every project service (relay, projector, query API, migrations):
# the service is the `cqrs` subcommand given as the container command (see compose.yaml).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies in a layer of their own, from the pinned list checked into the repository:
# a code change rebuilds only the small layer below, and every build gets the same
# versions. No extras: the embedded PostgreSQL/Valkey servers (58 MB) are never used in a
# container (the URLs are set), so the production image leaves them out.
COPY constraints.txt ./
RUN pip install -r constraints.txt

COPY pyproject.toml README.md ./
# Every folder that maps into the one `cqrs` package (pyproject.toml `package-dir`);
# bench/ is not installed.
COPY cqrs ./cqrs
COPY commands ./commands
COPY relay ./relay
COPY projector ./projector
COPY queries ./queries
COPY app ./app
# --no-deps: everything it needs is in the layer above (`pip check` proves it).
RUN pip install --no-deps . && pip check && rm -rf /src

# Never run as root. The embedded servers are not installed in the image; CQRS_HOME must
# still point somewhere this user can write.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin cqrs
USER cqrs
WORKDIR /home/cqrs
ENV CQRS_HOME=/home/cqrs/.cqrs

EXPOSE 8000
# Python is PID 1 and installs its own SIGTERM handler, so `docker stop` stops the relay
# and projector gracefully (the batch in hand is finished and acknowledged).
ENTRYPOINT ["cqrs"]
CMD ["--help"]
