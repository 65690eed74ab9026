# deltaclip server/trainer image. CPU by default; for NVIDIA GPUs build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# and reserve a GPU per replica (see docker-compose.yml).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DELTACLIP_HOME=/data DELTACLIP_HOST=0.0.0.0 DELTACLIP_PORT=8000

RUN useradd --create-home --uid 10001 deltaclip && mkdir -p /data && chown deltaclip /data
# A regular (non-editable) install from a throw-away source folder: the migrations travel inside
# the package (adapters_store.migrations, from alembic/), so `deltaclip db upgrade` (the compose
# file's migrate service) needs neither the source tree nor alembic.ini. Every package that
# pyproject.toml lists must be copied: tests/e2e/test_wheel.py builds a wheel from exactly these files.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY alembic ./alembic
COPY adapters_store ./adapters_store
COPY deltaclip_api ./deltaclip_api
COPY deltaclip_client ./deltaclip_client
COPY trainer ./trainer
COPY deltaclip_demo ./deltaclip_demo
COPY server ./server
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-cache-dir . \
 && cd / && rm -rf /src
WORKDIR /data

USER deltaclip
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["deltaclip", "serve"]
