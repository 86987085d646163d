"""Files: upload (multipart, purpose fine-tune) with a size cap and the validation `tunesmith check` does
(SFT records, preference pairs, or reinforcement prompts; captioned images in an archive or as base64 rows, see
image_files.py), list, retrieve, content, delete. Stored as DATA/files/<id><extension> (images also unpacked in
DATA/files/<id>.images/); the client's name is only metadata."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from . import jobs as J
from .http import ApiError, cursor, file_or_404, page, principal
from .image_files import FOLDER_SUFFIX, folder_for
from .settings import Settings
from .store import Store, new_id, now


def add_file_routes(app: FastAPI, settings: Settings, store: Store) -> None:
    from ..data import EXTENSIONS
    from .image_files import ARCHIVES, upload_suffix

    @app.post("/v1/files")
    async def upload_file(request: Request):
        project = project_of(request)
        limit, quota_bound = _upload_limit(settings, store, project)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + MULTIPART_SLACK:
            raise _too_large(settings, quota_bound)
        form = await _read_form(request, limit + MULTIPART_SLACK, lambda: _too_large(settings, quota_bound))
        upload, purpose = form.get("file"), form.get("purpose")
        try:
            if purpose != "fine-tune":
                raise ApiError(400, f"Invalid purpose {purpose!r}: this server accepts 'fine-tune' files",
                               param="purpose", code="invalid_value")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "Missing file: send it as the multipart field 'file'", param="file",
                               code="missing_file")
            filename = Path(str(upload.filename or "upload")).name[:255] or "upload"  # metadata only, never a path
            ext = upload_suffix(filename)
            if ext not in EXTENSIONS + ARCHIVES:
                raise ApiError(400, f"{filename}: E017 unsupported file extension {ext or '(none)'!r}: use one of "
                                    f"{', '.join(EXTENSIONS + ARCHIVES)}", param="file", code="E017")
            return await run_in_threadpool(_store_upload, settings, store, upload.file, filename, ext, project,
                                           limit, quota_bound)
        finally:
            await form.close()  # the spooled part, in memory or a temporary file, is released at once

    @app.get("/v1/files")
    def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=10000)] = 10000, order: Literal["asc", "desc"] = "desc"):
        rows, more = cursor(store.list_files, purpose=purpose, after=after, limit=limit, order=order,
                            project=principal(request).scope)
        return page(rows, more, J.file_object)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, request: Request):
        return J.file_object(file_or_404(store, file_id, request))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, request: Request):
        row = file_or_404(store, file_id, request)
        return FileResponse(settings.files_dir / row["stored_name"], media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, request: Request):
        row = file_or_404(store, file_id, request)
        user = store.file_in_use(file_id)
        if user:
            raise ApiError(409, f"File {file_id} is used by fine-tuning job {user}, which has not finished",
                           param="file_id", code="file_in_use")
        store.delete_file(file_id)
        (settings.files_dir / row["stored_name"]).unlink(missing_ok=True)
        shutil.rmtree(folder_for(settings.files_dir / row["stored_name"]), ignore_errors=True)  # an image upload's
        return {"object": "file", "id": file_id, "deleted": True}


MULTIPART_SLACK = 64 * 1024  # the multipart envelope around the file: boundaries, part headers, the purpose field


def project_of(request: Request) -> str:
    """The project of the request's token (auth.py puts it in the request's state)."""
    who = getattr(request.state, "principal", None)
    return who.project if who is not None else "default"


def _upload_limit(settings: Settings, store: Store, project: str) -> tuple[int, bool]:
    """(bytes this upload may have, whether the project's storage quota is what bounds it)."""
    if settings.quota_bytes is None:
        return settings.max_file_bytes, False
    left = max(0, settings.quota_bytes - store.project_usage(project)[0])
    return min(settings.max_file_bytes, left), left < settings.max_file_bytes


async def _read_form(request: Request, limit: int, too_large):
    """The multipart form, parsed as the bytes arrive (Starlette's parser, python-multipart underneath), counting
    them: past ``limit`` the request is answered at once and the rest of the body is never read, whether or not
    it said its Content-Length (a chunked upload does not)."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "Send the file as multipart/form-data (fields 'file' and 'purpose')", param="file",
                       code="invalid_content_type")

    async def counted():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise too_large()
            yield chunk

    try:
        return await MultiPartParser(request.headers, counted(), max_files=1, max_fields=4).parse()
    except MultiPartException as e:
        raise ApiError(400, f"Malformed multipart upload: {e.message}", param="file", code="invalid_multipart") from None


def _too_large(settings: Settings, quota_bound: bool = False) -> ApiError:
    if quota_bound:
        return ApiError(429, f"Storage quota exceeded: a project may store {settings.quota_bytes} bytes of files "
                             "(tunesmith serve --project-max-stored-mb); delete files it no longer needs", param="file",
                        code="storage_quota_exceeded", type_="insufficient_quota")
    return ApiError(413, f"File too large: the limit is {settings.max_file_bytes} bytes (tunesmith serve --max-file-mb)",
                    param="file", code="file_too_large")


def sweep_orphans(settings: Settings, store: Store, min_age_s: float = 600.0) -> list[str]:
    """Remove what an upload interrupted by a crash left in DATA/files: partial ``.name.part`` copies, and files no
    row names. Only files older than ``min_age_s``: on a shared folder another server may be writing one now (a
    file is renamed into place before its row is added). Returns the names removed."""
    import time

    known, cutoff, removed = store.stored_names(), time.time() - min_age_s, []
    folders = {folder_for(settings.files_dir / n).name for n in known}  # image uploads, unpacked
    for p in settings.files_dir.iterdir():
        if p.name in known or p.name in folders or not (p.is_file() or p.name.endswith((FOLDER_SUFFIX, ".part"))):
            continue
        try:
            if p.stat().st_mtime > cutoff:
                continue
            if p.is_dir() and not p.is_symlink():  # an image upload's folder whose row is gone, or a partial one
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        except FileNotFoundError:
            pass
    return removed


def _store_upload(settings: Settings, store: Store, src, filename: str, ext: str, project: str = "default",
                  limit: int | None = None, quota_bound: bool = False) -> dict:
    """Copy under an opaque name with a size cap, validate like `tunesmith check`, record it. Whatever goes wrong,
    no file is left without its row."""
    from .image_files import ARCHIVES, FORMAT, check_image_upload, is_image_rows

    limit = settings.max_file_bytes if limit is None else limit
    file_id = new_id("file-")
    stored = f"{file_id}{ext}"
    dest = settings.files_dir / stored
    tmp = dest.with_name(f".{stored}.part")
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise _too_large(settings, quota_bound)
                h.update(chunk)
                out.write(chunk)
        tmp.replace(dest)
        if ext in ARCHIVES or is_image_rows(dest):  # captioned images: unpacked beside the upload, each one checked
            fmt = FORMAT
            count, issues = check_image_upload(dest, filename, settings.max_file_bytes)
            if issues:
                raise _data_error(issues, filename, "file", keep_paths=True)
        else:
            try:
                fmt, count, issues = validate_file(dest)
            except RecursionError:  # a reader other than JSON's nested too deep: the same answer as E003
                from ..data import Issue

                issues = [Issue("E003", "malformed data: nested too deeply", filename)]
            if issues:
                issues = [dataclasses.replace(i, message=i.message.replace(str(dest), filename)) for i in issues]
                raise _data_error(issues, filename, "file")
        row = store.add_file({"id": file_id, "project": project, "filename": filename, "stored_name": stored,
                              "bytes": size, "created_at": now(), "purpose": "fine-tune", "status": "processed",
                              "format": fmt, "examples": count, "sha256": h.hexdigest()})
    except BaseException:
        tmp.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
        shutil.rmtree(folder_for(dest), ignore_errors=True)
        raise
    return J.file_object(row)


def validate_file(path: Path) -> tuple[str | None, int, list]:
    """(format, records, issues) as `tunesmith check` reads the file: SFT records, preference data, or the prompts
    of reinforcement fine-tuning (stored as format rft_messages / rft_prompt).

    A file is SFT records, preference data or prompts, whichever its first record is (a prompt file is all E010
    to the SFT reader, so its own mistakes are reported only when it is read as prompts). The job that uses it
    checks the kind (check_file_kind), since an upload does not say which method it is for.
    """
    from ..data import read_examples
    from ..data.preference import PREFERENCE_FORMATS, read_preference_file
    from ..data.prompts import read_prompt_rows

    loaded = read_examples(path)
    if loaded.format in PREFERENCE_FORMATS:
        pref = read_preference_file(path)  # the sft reader only said E026 on every line: read it as pairs
        return pref.format, len(pref.items), pref.issues
    if not loaded.issues or not _first_is_prompt(path):
        return loaded.format, len(loaded.examples), loaded.issues
    rows, fmt, issues = read_prompt_rows(path)
    return f"rft_{fmt}", len(rows), issues


def _first_is_prompt(path: Path) -> bool:
    """Whether the first record is shaped as a reinforcement prompt: messages ending with a user turn, or a prompt
    with no answer beside it (TRL's prompt + completion is SFT data; prompt + chosen + rejected, preference data)."""
    from ..data.readers import read_file

    records = read_file(path).records
    rec = records[0][0] if records else None
    if not isinstance(rec, dict):
        return False
    messages = rec.get("messages")
    if isinstance(messages, list):
        return bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "user"
    return "prompt" in rec and not any(k in rec for k in ("completion", "chosen", "rejected", "label"))


def _data_error(issues: list, filename: str, param: str, lead: str = "", keep_paths: bool = False) -> ApiError:
    """Data issues as a 400 naming the client's file name (never the stored path) and each line; ``keep_paths``:
    the issues name the client's file already (image uploads: the member inside the archive)."""
    from ..data import DataError

    if not keep_paths:
        issues = [dataclasses.replace(i, path=filename) for i in issues]
    return ApiError(400, lead + DataError(issues).format(), param=param, code=issues[0].code,
                    extra={"issues": [i.to_dict() for i in issues[:100]]})


def check_file_kind(row: dict, path: Path, param: str, method: str, image: bool = False) -> None:
    """A job's file must hold what its method trains on: SFT records (supervised), pairs (dpo), prompts
    (reinforcement); a text-to-image model's (``image``), captioned images (an image upload).

    The stored format decides; on a mismatch the file is read again with the method's reader, whose
    issues give the line (E026: records for another objective; E035/E036: not prompts). A file that reads
    cleanly as prompts is one for reinforcement whatever it was stored as (TRL's prompt + completion: the
    completion is a field the grader may read).
    """
    from ..data import Issue
    from ..data.prompts import read_prompt_rows
    from .image_files import FORMAT

    if image or row["format"] == FORMAT:
        if image and row["format"] == FORMAT:
            return
        what = (f"holds {row['format']} records, and a text-to-image model trains on captioned images: upload a .zip or "
                ".tar(.gz) of images with captions, or a .jsonl of base64 images" if image else
                "holds captioned images, which a text-to-image model trains on; this model is a language model")
        issue = Issue("E026", "records for another model kind", row["filename"])
        raise _data_error([issue], row["filename"], param, f"invalid {param}: {row['id']} ({row['filename']}) {what}. ")
    if row["format"] in J.METHOD_FORMATS[method]:
        return
    if method == "reinforcement":
        issues = read_prompt_rows(path)[2]
        if not issues:
            return
    else:
        # KTO's unpaired answers read cleanly as preference data: the stored format alone says why not
        issues = _reread(path, method) or [Issue("E026", f"records in format {row['format']}, not for method "
                                                         f"{method}", path.name)]
    wants = {"dpo": "preference pairs: OpenAI's input + preferred_output + non_preferred_output, or TRL's prompt + "
                    "chosen + rejected",
             "reinforcement": "prompts: OpenAI's messages ending with a user turn, or TRL's prompt, with the fields "
                              "the grader reads"}.get(method, "supervised records (messages, prompt + completion, ...)")
    fits = next((m for m, formats in J.METHOD_FORMATS.items() if row["format"] in formats), None)
    lead = (f"invalid {param}: {row['id']} ({row['filename']}) holds {row['format']} records, and a {method} job "
            f"trains on {wants}; upload such a file" + (f", or use method.type {fits!r}. " if fits else ". "))
    raise _data_error(issues, row["filename"], param, lead)


def _reread(path: Path, method: str) -> list:
    from ..data import read_examples
    from ..data.preference import read_preference_file

    return (read_preference_file(path) if method == "dpo" else read_examples(path)).issues
