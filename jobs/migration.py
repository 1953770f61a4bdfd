"""Upgrading an artifacts folder whose job records are JSON files (before the database).

Records used to be `state/records/<id>.json`, with cancel markers in `state/cancel/` and
idempotency keys in `state/idempotency/<owner>/<key hash>.json`. `import_file_records` copies
them into the record store once: every process that opens the store runs it (it is a no-op
when there is nothing to import), rows already there are kept, and the folder is then renamed
`records.imported` so the files stay on disk but are not read again.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from pydantic import ValidationError

from jobs.records import IdempotencyEntry, JobRecord, RecordStore, is_job_id

log = logging.getLogger(__name__)


def import_file_records(store: RecordStore, state_dir: Path) -> int:
    """Copy `state_dir`'s JSON records into `store`; how many were new."""
    folder = Path(state_dir) / "records"
    if not folder.is_dir():
        return 0
    imported = 0
    for path in sorted(folder.glob("*.json")):
        try:
            record = JobRecord.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            log.warning("migration: %s is not a readable job record; skipped", path.name)
            continue
        try:
            store.insert(record)
            imported += 1
        except FileExistsError:
            pass  # imported already (another process got there first)
        except ValueError:
            log.warning("migration: %s has an invalid owner; skipped", path.name)
            continue
        if (Path(state_dir) / "cancel" / record.id).exists():
            store.request_cancel(record.id)
    for path in sorted((Path(state_dir) / "idempotency").glob("*/*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(path.read_text())
            if is_job_id(data["job_id"]):
                entry = IdempotencyEntry(data["job_id"], data["payload_hash"])
                store.claim_idempotent(path.parent.name, path.stem, entry)
    with contextlib.suppress(OSError):  # another process may have renamed it already
        folder.rename(folder.with_name("records.imported"))
    if imported:
        log.info("migration: imported %d job record(s) from %s", imported, folder)
    return imported
