"""Retention: artifacts of finished jobs are deleted after `retention_days`.

Records stay (they are small and say what happened); only uploads and results go.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from jobs.records import JobRecord, RecordStore, now
from jobs.storage import ArtifactStore

log = logging.getLogger(__name__)


def purge_expired(
    records: RecordStore, store: ArtifactStore, days: float, at: datetime | None = None
) -> int:
    """Delete the artifacts of jobs finished more than `days` ago; how many jobs were purged."""
    cutoff = (at or now()) - timedelta(days=days)
    purged = 0
    for record in records.expired(cutoff):  # an indexed query: final, old, files still there
        with records.locked(record.id):
            store.delete_job(record.id)

            def mark(r: JobRecord) -> bool:
                r.artifacts = {}
                r.artifacts_deleted_at = now()
                return True

            records.update_locked(record.id, mark)
        purged += 1
    if purged:
        log.info("retention: deleted the artifacts of %d job(s)", purged)
    return purged
