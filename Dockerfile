# One image for the API and the workers; the command differs (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    KERAS_BACKEND=tensorflow \
    ARTIFACTS_DIR=/var/lib/fineprune/artifacts

RUN useradd --create-home --uid 10001 fineprune
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fineprune ./fineprune
COPY schemas ./schemas
COPY service ./service
COPY workers ./workers
COPY jobs ./jobs
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS}" \
    && mkdir -p /var/lib/fineprune/artifacts \
    && chown -R fineprune /var/lib/fineprune

USER fineprune
EXPOSE 8000
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]
