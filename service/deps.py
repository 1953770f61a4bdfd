"""Dependencies injected into routes: settings, stores, the queue, and the caller's identity.

Everything lives on `app.state`, put there by `create_app`, so tests and alternative deployments
swap an implementation by passing it to the factory instead of patching modules. None of them
does blocking I/O, so all are `async`: FastAPI runs a sync dependency in the threadpool, a hop
per dependency per request.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jobs.queue import JobQueue
from jobs.records import RecordStore
from jobs.settings import Settings
from jobs.storage import ArtifactStore
from service.errors import ApiError

OPEN_OWNER = "open"

bearer = HTTPBearer(
    auto_error=False,
    description="An API key from FINEPRUNE_API_KEYS. Jobs belong to the key that made them.",
)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def get_records(request: Request) -> RecordStore:
    return request.app.state.records


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
RecordsDep = Annotated[RecordStore, Depends(get_records)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


def owner_of_key(key: str) -> str:
    """Owners are key hashes: records never hold a usable key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


async def get_owner(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The caller's owner id; 401 without a valid key unless the service runs open."""
    if settings.is_open:
        return OPEN_OWNER
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401, "unauthorized", "send an API key: Authorization: Bearer <key>", headers=challenge
        )
    given = credentials.credentials.encode("utf-8")
    # Compare with every key, always, so timing says nothing about which one nearly matched.
    matches = [hmac.compare_digest(given, key.encode("utf-8")) for key in settings.api_keys]
    if not any(matches):
        raise ApiError(401, "unauthorized", "the API key is not valid", headers=challenge)
    return owner_of_key(credentials.credentials)


OwnerDep = Annotated[str, Depends(get_owner)]
