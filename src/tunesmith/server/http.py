"""What every route module shares: the OpenAI-shaped error, cursor pages, lookups that 404 (across projects too),
and the scrubbing of server paths from anything served."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from .store import Store, UnknownCursor


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.extra = status, message, param, code, type_, extra

    def response(self) -> JSONResponse:
        err = {"message": scrub(self.message), "type": self.type, "param": self.param, "code": self.code}
        err |= scrub(self.extra or {})
        return JSONResponse({"error": err}, status_code=self.status)


class Scrubber:
    """Absolute server paths out of text served over the API: the data folder's prefix (a path under it reads
    relative, e.g. runs/ftjob-.../best), each registered model folder (its API name), the server user's home (~)."""

    def __init__(self, data_dir=None, models: dict[str, str] | None = None):
        import os
        from pathlib import Path

        pairs = []
        if data_dir is not None:
            root = str(Path(data_dir).resolve())
            pairs += [(root + os.sep + "files" + os.sep, ""), (root + os.sep, ""), (root, ".")]
        for name, ref in (models or {}).items():
            if os.path.isabs(str(ref)):
                pairs.append((str(Path(ref).resolve()), name))
        pairs.append((str(Path.home()) + os.sep, "~" + os.sep))
        self.pairs = sorted(pairs, key=lambda p: -len(p[0]))  # the longest prefix first

    def __call__(self, value):
        if isinstance(value, str):
            for old, new in self.pairs:
                if old in value:
                    value = value.replace(old, new)
            return value
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


_scrubber = Scrubber()


def set_scrubber(s: Scrubber) -> None:
    global _scrubber
    _scrubber = s


def scrub(value):
    return _scrubber(value)


def page(items: list[dict], has_more: bool, render) -> dict:
    data = [render(r) for r in items]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def cursor(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except UnknownCursor as e:
        raise ApiError(400, f"Invalid 'after': no item with id {e}", param="after", code="invalid_value") from None


def principal(request):
    """The request's principal (auth.py); a request that reached a route always has one."""
    return request.state.principal


def job_or_404(store: Store, job_id: str, request=None) -> dict:
    """The job, when the request's project may see it: another project's job is answered as not existing."""
    job = store.get_job(job_id)
    if job is None or (request is not None and not principal(request).sees(job.get("project"))):
        raise ApiError(404, f"No fine-tuning job found with id {job_id}", param="fine_tuning_job_id",
                       code="fine_tuning_job_not_found")
    return job


def file_or_404(store: Store, file_id: str, request=None) -> dict:
    row = store.get_file(file_id)
    if row is None or (request is not None and not principal(request).sees(row.get("project"))):
        raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return row
