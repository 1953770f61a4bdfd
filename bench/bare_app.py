"""The poll benchmark's floor: a bare FastAPI endpoint that answers a fixed job body.

`uvicorn bench.bare_app:app`, with `BENCH_BODY_FILE` naming the bytes to answer: no
authentication, no record read, no serialization, the same route shape and body as
`GET /v1/jobs/{id}`. What the real route costs beyond this is the service's own overhead.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Response

BODY = Path(os.environ["BENCH_BODY_FILE"]).read_bytes()
app = FastAPI()


@app.get("/v1/jobs/{job_id}")
async def get_job(job_id: str) -> Response:
    return Response(BODY, media_type="application/json")
