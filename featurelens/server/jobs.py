"""Background jobs (attribution graphs) with progress that a page can follow and pick up again after a reload.

Each job is a JSON record in <data dir>/server/jobs/<id>.json, rewritten atomically as it progresses (status,
stage, done/total, message, result, error), so its id stays queryable across page reloads and server restarts. A
job found "running" when the server starts was cut off by the restart and is marked "interrupted".
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import FeaturelensError
from .catalog import UnknownIdError
from ..io import atomic_write_json

logger = logging.getLogger("featurelens.server")

JOB_ID_LEN = 12
FINAL = ("done", "failed", "interrupted", "cancelled")
# The event stream replays every update, not just the latest: a fast stage (34 rows of attribution in a second)
# would otherwise be skipped by a reader that woke up late. Kept per job, for this many recent jobs and updates.
HISTORY_JOBS = 64
HISTORY_UPDATES = 4096
POLL_SECONDS = 0.5  # how often the file of a job another process runs is looked at


class JobCancelled(Exception):
    pass


class Job:
    def __init__(self, manager: "JobManager", record: dict[str, Any]):
        self.manager = manager
        self.record = record
        self.cancel = threading.Event()

    @property
    def id(self) -> str:
        return self.record["id"]

    def progress(self, stage: str, done: float | None = None, total: float | None = None, message: str = "") -> None:
        """Report progress; raises JobCancelled when the user cancelled the job (checked at every report)."""
        if self.cancel.is_set():
            raise JobCancelled()
        self.manager.update(self.id, stage=stage, done=done, total=total, message=message)


class JobManager:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._live: dict[str, Job] = {}
        self._history: dict[str, list[dict[str, Any]]] = {}  # job id -> its records in version order (this process)
        for p in self.root.glob("*.json"):  # jobs cut off by a restart
            rec = self._read(p)
            if rec and rec.get("status") in ("queued", "running"):
                rec.update(status="interrupted", message="the server stopped while this job ran; start it again",
                           finished=time.time())
                atomic_write_json(p, rec)

    @staticmethod
    def _read(p: Path) -> dict[str, Any] | None:
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _path(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or len(job_id) != JOB_ID_LEN or not all(c in "0123456789abcdef" for c in job_id):
            raise UnknownIdError(f"{job_id!r} is not a job id (12 hex digits)")
        return self.root / f"{job_id}.json"

    def get(self, job_id: str) -> dict[str, Any]:
        p = self._path(job_id)
        with self._lock:
            job = self._live.get(job_id)
            if job is not None:
                return dict(job.record)
        rec = self._read(p)
        if rec is None:
            raise UnknownIdError(f"no job {job_id!r}")
        return rec

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        recs = [r for r in (self._read(p) for p in self.root.glob("*.json")) if r]
        recs.sort(key=lambda r: -r.get("created", 0))
        return recs[:limit]

    def update(self, job_id: str, **fields: Any) -> None:
        with self._cond:
            job = self._live[job_id]
            job.record.update(fields, updated=time.time(), version=job.record.get("version", 0) + 1)
            atomic_write_json(self._path(job_id), job.record)
            hist = self._history.setdefault(job_id, [])
            hist.append(dict(job.record))
            del hist[:-HISTORY_UPDATES]
            self._cond.notify_all()

    def submit(self, kind: str, params: dict[str, Any], fn: Callable[[Job], dict[str, Any]]) -> dict[str, Any]:
        job_id = uuid.uuid4().hex[:JOB_ID_LEN]
        rec = {"id": job_id, "kind": kind, "params": params, "status": "queued", "stage": "queued", "done": None,
               "total": None, "message": "", "result": None, "error": None, "created": time.time(), "version": 0}
        job = Job(self, rec)
        with self._lock:
            self._live[job_id] = job
            atomic_write_json(self._path(job_id), rec)
            self._history[job_id] = [dict(rec)]
            for old in list(self._history)[:-HISTORY_JOBS]:
                if old not in self._live:
                    del self._history[old]

        def run() -> None:
            self.update(job_id, status="running", started=time.time())
            try:
                result = fn(job)
                self.update(job_id, status="done", stage="done", result=result, finished=time.time())
            except JobCancelled:
                self.update(job_id, status="cancelled", message="cancelled", finished=time.time())
            except FeaturelensError as e:  # the job's error goes to its record, where the page shows it
                self.update(job_id, status="failed", error=str(e), finished=time.time(), trace=None)
            except Exception as e:  # noqa: BLE001  (a bug: logged, and named in the record)
                logger.exception("job %s (%s) failed", job_id, kind)
                self.update(job_id, status="failed", error=f"internal error ({type(e).__name__}: {e}); this is a bug "
                            f"in featurelens", finished=time.time(), trace=traceback.format_exc(limit=5))
            finally:
                with self._cond:
                    self._live.pop(job_id, None)
                    self._cond.notify_all()

        threading.Thread(target=run, name=f"featurelens-job-{job_id}", daemon=True).start()
        return dict(rec)

    def active(self) -> int:
        """How many jobs of this process are queued or running."""
        with self._lock:
            return len(self._live)

    def cancel(self, job_id: str) -> dict[str, Any]:
        rec = self.get(job_id)
        with self._lock:
            job = self._live.get(job_id)
        if job is not None:
            job.cancel.set()
        return rec

    def changes_since(self, job_id: str, version: int, timeout: float) -> list[dict[str, Any]]:
        """Every record of the job newer than `version`, in order, waiting up to `timeout` seconds for one.

        Empty when nothing changed in time. For a job this process no longer remembers (finished long ago, or run
        by an earlier server), the record on disk stands in for its history.
        """
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                newer = [dict(r) for r in self._history.get(job_id, ()) if r.get("version", 0) > version]
                if newer:
                    return newer
                if job_id not in self._live:
                    break
                left = end - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
        # Not run by this process (another server ran it, or it ended before this one started): nobody will notify
        # us, so look at its file now and then until the timeout, rather than answering "nothing new" at once to a
        # caller that would ask again straight away.
        while True:
            rec = self.get(job_id)
            if rec.get("version", 0) != version:
                return [rec]
            left = end - time.monotonic()
            if left <= 0 or rec.get("status") in FINAL:
                return []
            time.sleep(min(POLL_SECONDS, left))
