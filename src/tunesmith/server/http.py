"""What every route module shares: the OpenAI-shaped error, cursor pages, lookups that 404."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from .store import Store, UnknownCursor


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.extra = status, message, param, code, type_, extra

    def response(self) -> JSONResponse:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code} | (self.extra or {})
        return JSONResponse({"error": err}, status_code=self.status)


def page(items: list[dict], has_more: bool, render) -> dict:
    data = [render(r) for r in items]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def cursor(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except UnknownCursor as e:
        raise ApiError(400, f"Invalid 'after': no item with id {e}", param="after", code="invalid_value") from None


def job_or_404(store: Store, job_id: str) -> dict:
    job = store.get_job(job_id)
    if job is None:
        raise ApiError(404, f"No fine-tuning job found with id {job_id}", param="fine_tuning_job_id",
                       code="fine_tuning_job_not_found")
    return job
