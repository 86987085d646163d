"""Uploads that cannot fill the disk: bytes counted as they arrive (a chunked upload without Content-Length is
stopped at the limit), a too deeply nested JSON line refused with a code and its file removed, orphan files swept
at start, and a per-project quota of bytes stored and unfinished jobs."""

import os
import select
import socket
import time

import openai
import pytest

from server_helpers import TOKEN, Server

LONG = {"tunesmith_config": {"train.max_steps": 100000, "eval.compare_base": False}}


@pytest.fixture(scope="module")
def quota_server(tmp_path_factory, tiny_model_dir):
    srv = Server(tmp_path_factory.mktemp("uploads") / "data", tiny_model_dir, "--max-file-mb", "0.05",
                 "--project-max-stored-mb", "0.06", "--project-max-jobs", "2").start()
    yield srv
    srv.stop()


def _stored(srv) -> set[str]:
    return {p.name for p in (srv.data_dir / "files").iterdir()}


def _chunked_upload(port: int, total: int, chunk: int = 64 * 1024) -> tuple[bytes, int]:
    """A multipart upload sent in chunked encoding (no Content-Length) from a socket, up to ``total`` bytes of file;
    stops sending as soon as the server answers. Returns (the answer, bytes sent)."""
    boundary = "tunesmithboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    line = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    body = (line * (chunk // len(line) + 1))[:chunk]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    sent, answer = 0, b""
    try:
        for part in [head] + [body] * (total // chunk):
            if select.select([sock], [], [], 0)[0]:  # the server answered: stop sending
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            sent += len(part)
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            got = sock.recv(65536)
            if not got:
                break
            answer += got
    except (BrokenPipeError, ConnectionResetError):
        sock.settimeout(5)
        try:
            answer += sock.recv(65536)
        except OSError:
            pass
    finally:
        sock.close()
    return answer, sent


def test_chunked_upload_is_stopped_at_the_limit(quota_server):
    before = _stored(quota_server)
    answer, sent = _chunked_upload(quota_server.port, 200 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 413") and b"file_too_large" in answer, answer[:300]
    assert sent < 16 * 1024 * 1024  # of 200 MB offered: the server stopped reading near its 0.05 MB limit
    assert _stored(quota_server) == before  # nothing spooled into the data folder


def test_deeply_nested_json_is_a_400_with_a_code_and_leaves_no_file(quota_server):
    before = _stored(quota_server)
    with pytest.raises(openai.BadRequestError) as e:
        quota_server.client.files.create(file=("deep.jsonl", b"[" * 40_000 + b"\n"), purpose="fine-tune")
    err = e.value.body
    assert err["code"] == "E003" and "nested too deeply" in err["message"] and err["issues"][0]["line"] == 1
    assert _stored(quota_server) == before
    assert quota_server.client.models.list()  # the server is fine


def test_storage_quota_per_project(quota_server, tiny_data):
    c = quota_server.client
    data = tiny_data[0].read_bytes()  # about 5 KB; the quota is 0.06 MB
    kept = []
    with pytest.raises(openai.RateLimitError) as e:
        for i in range(20):
            kept.append(c.files.create(file=(f"v{i}.jsonl", data), purpose="fine-tune"))
    assert e.value.body["code"] == "storage_quota_exceeded" and e.value.body["type"] == "insufficient_quota"
    assert 0 < len(kept) * len(data) <= 0.06 * 1024 * 1024
    c.files.delete(kept.pop().id)
    kept.append(c.files.create(file=("again.jsonl", data), purpose="fine-tune"))  # room again
    for f in kept:
        c.files.delete(f.id)


def test_job_quota_per_project(quota_server, tiny_data):
    c = quota_server.client
    f = c.files.create(file=("t.jsonl", tiny_data[1].read_bytes()), purpose="fine-tune")
    jobs = [c.fine_tuning.jobs.create(model="tiny", training_file=f.id, extra_body=LONG) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as e:
        c.fine_tuning.jobs.create(model="tiny", training_file=f.id, extra_body=LONG)
    assert e.value.body["code"] == "job_quota_exceeded"
    c.fine_tuning.jobs.cancel(jobs[0].id)
    jobs.append(c.fine_tuning.jobs.create(model="tiny", training_file=f.id, extra_body=LONG))
    for j in jobs[1:]:
        c.fine_tuning.jobs.cancel(j.id)


def test_orphan_files_are_swept_at_start(quota_server, tiny_data):
    c = quota_server.client
    kept = c.files.create(file=("kept.jsonl", tiny_data[1].read_bytes()), purpose="fine-tune")
    quota_server.stop()
    files = quota_server.data_dir / "files"
    old = time.time() - 3600
    for name in ("file-orphanNoRow.jsonl", ".file-crashed.jsonl.part"):  # a crash between write and row
        (files / name).write_bytes(b"x" * 1000)
        os.utime(files / name, (old, old))
    (files / "file-justNow.jsonl").write_bytes(b"x")  # maybe another server's upload in flight: left alone
    quota_server.start()
    names = _stored(quota_server)
    assert "file-orphanNoRow.jsonl" not in names and ".file-crashed.jsonl.part" not in names
    assert "file-justNow.jsonl" in names and f"{kept.id}.jsonl" in names
    assert c.files.content(kept.id).read() == tiny_data[1].read_bytes()
