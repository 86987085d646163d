"""One project's data closed to another: tokens belong to projects, every route answers 404 across projects, an
admin token sees all; dashboard sessions (random, bound to the project, read-only, revoked on sign-out and restart),
sign-in throttling, security headers on every page, and no absolute server path in anything served."""

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest

from server_helpers import Server, wait_status

A, B, ADMIN = "token-of-team-a-0123456789", "token-of-team-b-0123456789", "token-of-the-admin-0123456"
SHORT = {"tunesmith_config": {"train.max_steps": 4, "eval.every_steps": 2, "checkpoint.every_steps": 2}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("projects") / "data", tiny_model_dir,
               tokens=[f"{A} team-a", f"{B} team-b", f"{ADMIN} ops admin"]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def team_a(srv, tiny_data):
    """Team A's files and a job run to the end (with checkpoints, a fine-tuned model and a report)."""
    c = srv.client_for(A)
    train = c.files.create(file=open(tiny_data[0], "rb"), purpose="fine-tune")
    valid = c.files.create(file=open(tiny_data[1], "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny", training_file=train.id, validation_file=valid.id, suffix="a",
                                    metadata={"team": "a"}, hyperparameters={"batch_size": 8}, extra_body=SHORT)
    job = wait_status(c, job.id, "succeeded", "failed")
    assert job.status == "succeeded", job.error
    return train, valid, job


def _raw(srv, method, path, token=None, cookie=None, form=None, body=None):
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookie:
        headers["Cookie"] = cookie
    data = None
    if form is not None:
        data, headers["Content-Type"] = urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(srv.url + path, data=data, method=method, headers=headers)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ---------------------------------------------------------------- tokens and projects


def test_token_lines_name_projects_and_admins(tmp_path, monkeypatch):
    from tunesmith.config import ConfigError
    from tunesmith.server.auth import Token
    from tunesmith.server.settings import read_tokens

    f = tmp_path / "tokens"
    f.write_text("# comment\nalpha team-a\nbeta team-b admin\ngamma\n")
    monkeypatch.setenv("TUNESMITH_API_TOKENS", "delta team-c, epsilon ops admin")
    tokens, _ = read_tokens(f, tmp_path)
    assert tokens == [Token("alpha", "team-a"), Token("beta", "team-b", True), Token("gamma", "default"),
                      Token("delta", "team-c"), Token("epsilon", "ops", True)]
    for bad in ("t p extra", "t bad/project", "t p admin more"):
        f.write_text(bad + "\n")
        with pytest.raises(ConfigError):
            read_tokens(f, tmp_path)


def test_every_route_is_closed_to_another_project(srv, team_a):
    train, valid, job = team_a
    b = srv.client_for(B)
    ckpt = srv.client_for(A).fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    assert train.id not in [f.id for f in b.files.list()]
    assert job.id not in [j.id for j in b.fine_tuning.jobs.list(limit=100)]
    assert list(b.fine_tuning.jobs.list(metadata={"team": "a"})) == []
    assert job.fine_tuned_model not in [m.id for m in b.models.list()]
    not_found = [
        lambda: b.files.retrieve(train.id), lambda: b.files.content(train.id), lambda: b.files.delete(train.id),
        lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.fine_tuning.jobs.cancel(job.id),
        lambda: b.fine_tuning.jobs.pause(job.id), lambda: b.fine_tuning.jobs.resume(job.id),
        lambda: b.fine_tuning.jobs.list_events(job.id), lambda: b.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: b.models.retrieve(job.fine_tuned_model), lambda: b.models.delete(job.fine_tuned_model),
        lambda: b.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "x"}]),
        lambda: b.chat.completions.create(model=ckpt, messages=[{"role": "user", "content": "x"}]),
    ]
    for call in not_found:
        with pytest.raises(openai.NotFoundError):
            call()
    for path in (f"/v1/fine_tuning/jobs/{job.id}/metrics", f"/v1/fine_tuning/jobs/{job.id}/report",
                 f"/v1/fine_tuning/jobs/{job.id}/report/report.html"):
        assert _raw(srv, "GET", path, token=B)[0] == 404
        assert _raw(srv, "GET", path, token=A)[0] == 200
    with pytest.raises(openai.BadRequestError) as e:  # another project's file cannot be trained on
        b.fine_tuning.jobs.create(model="tiny", training_file=train.id)
    assert e.value.body["code"] == "file_not_found"
    a = srv.client_for(A)  # untouched, still there for its own project
    assert a.files.retrieve(train.id).id == train.id and a.models.retrieve(job.fine_tuned_model).id


def test_an_admin_token_sees_every_project(srv, team_a, tiny_data):
    train, _, job = team_a
    b_file = srv.client_for(B).files.create(file=open(tiny_data[1], "rb"), purpose="fine-tune")
    admin = srv.client_for(ADMIN)
    ids = [f.id for f in admin.files.list()]
    assert train.id in ids and b_file.id in ids
    assert admin.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.fine_tuned_model in [m.id for m in admin.models.list()]
    assert len(admin.fine_tuning.jobs.list_events(job.id, limit=5).data) == 5
    assert b_file.id not in [f.id for f in srv.client_for(A).files.list()]


# ---------------------------------------------------------------- no server paths


def test_no_absolute_server_path_in_anything_served(srv, team_a):
    train, _, job = team_a
    a = srv.client_for(A)
    secrets = [str(srv.data_dir), str(srv.model_dir), str(Path.home()) + "/", "/tmp/pytest-of"]
    served = [a.fine_tuning.jobs.retrieve(job.id).model_dump_json(),
              json.dumps([e.model_dump() for e in a.fine_tuning.jobs.list_events(job.id, limit=1000)]),
              a.fine_tuning.jobs.checkpoints.list(job.id).model_dump_json(), a.files.list().model_dump_json(),
              a.files.content(job.result_files[0]).read().decode(), a.models.list().model_dump_json(),
              _raw(srv, "GET", f"/v1/fine_tuning/jobs/{job.id}/metrics", token=A)[2].decode()]
    run = srv.data_dir / "runs" / job.id
    report_files = [p.name for p in run.iterdir() if p.suffix in (".html", ".json")]
    assert {"report.html", "run.json", "preflight.json"} <= set(report_files)
    for name in report_files:
        status, _, body = _raw(srv, "GET", f"/v1/fine_tuning/jobs/{job.id}/report/{name}", token=A)
        assert status == 200
        served.append(body.decode())
    started = [e for e in a.fine_tuning.jobs.list_events(job.id, limit=1000) if e.message.startswith("Training started")]
    assert started and started[0].data["output_dir"] == f"runs/{job.id}"
    with pytest.raises(openai.BadRequestError) as e:  # a file pandas cannot read: its error names no stored path
        a.files.create(file=("broken.parquet", b"PAR1 this is not parquet"), purpose="fine-tune")
    served.append(json.dumps(e.value.body))
    assert "broken.parquet" in e.value.body["message"]
    for text in served:
        for secret in secrets:
            assert secret not in text, (secret, text[max(0, text.find(secret) - 200):text.find(secret) + 200])


# ---------------------------------------------------------------- headers


def test_every_page_has_csp_and_frame_ancestors(srv, team_a):
    _, _, job = team_a
    for path, token in (("/dashboard", None), ("/dashboard", A), ("/v1/models", A), ("/v1/models", None)):
        _, headers, body = _raw(srv, "GET", path, token=token)
        csp = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
    _, headers, page = _raw(srv, "GET", "/dashboard", token=A)
    script = re.search(rb"<script>(.*?)</script>", page, re.S).group(1)
    import base64
    import hashlib

    assert f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'" in headers["content-security-policy"]
    assert "'unsafe-inline'" not in headers["content-security-policy"].split("script-src")[1].split(";")[0]
    _, headers, _ = _raw(srv, "GET", f"/v1/fine_tuning/jobs/{job.id}/report", token=A)
    assert headers["content-security-policy"].startswith("sandbox") and "frame-ancestors 'none'" in \
        headers["content-security-policy"]


# ---------------------------------------------------------------- dashboard sessions


def _sign_in(srv, token):
    status, headers, _ = _raw(srv, "POST", "/dashboard/login", form={"token": token})
    assert status == 303, status
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=" in cookie
    return cookie.split(";")[0]


def test_dashboard_session_is_random_bound_to_the_project_and_read_only(srv, team_a):
    _, _, job = team_a
    cookie = _sign_in(srv, B)
    sid = cookie.split("=", 1)[1]
    assert B not in cookie and len(sid) >= 40 and sid != _sign_in(srv, B).split("=", 1)[1]
    status, _, body = _raw(srv, "GET", "/v1/fine_tuning/jobs?limit=100", cookie=cookie)
    assert status == 200 and job.id not in body.decode()  # team B's session: team B's jobs only
    assert _raw(srv, "GET", f"/v1/fine_tuning/jobs/{job.id}", cookie=cookie)[0] == 404
    a_cookie = _sign_in(srv, A)
    assert _raw(srv, "GET", f"/v1/fine_tuning/jobs/{job.id}", cookie=a_cookie)[0] == 200
    # read-only: a session can create, cancel or delete nothing
    assert _raw(srv, "POST", f"/v1/fine_tuning/jobs/{job.id}/cancel", cookie=a_cookie)[0] == 401
    assert _raw(srv, "DELETE", f"/v1/models/{job.fine_tuned_model}", cookie=a_cookie)[0] == 401
    assert _raw(srv, "GET", "/v1/models", cookie=f"tunesmith_session={A}")[0] == 401  # the token is no session
    # sign-out revokes it
    status, headers, _ = _raw(srv, "POST", "/dashboard/logout", cookie=a_cookie)
    assert status == 303 and "tunesmith_session=" in headers["set-cookie"]
    assert _raw(srv, "GET", f"/v1/fine_tuning/jobs/{job.id}", cookie=a_cookie)[0] == 401
    assert _raw(srv, "GET", "/dashboard", cookie=a_cookie)[0] == 401  # the sign-in page again


def test_sessions_expire():
    from tunesmith.server.auth import Principal, Sessions

    s = Sessions(ttl_s=0.2)
    sid = s.create(Principal("fp", "team-a"))
    who = s.get(sid)
    assert who.project == "team-a" and who.read_only
    time.sleep(0.3)
    assert s.get(sid) is None and s.get("made-up") is None


def test_a_restart_revokes_every_session(srv, team_a):
    cookie = _sign_in(srv, A)
    assert _raw(srv, "GET", "/v1/models", cookie=cookie)[0] == 200
    srv.stop()
    srv.start()
    assert _raw(srv, "GET", "/v1/models", cookie=cookie)[0] == 401
    assert _raw(srv, "GET", "/v1/models", token=A)[0] == 200


def test_failed_sign_ins_are_throttled(srv):
    """Last in this module: it blocks sign-ins from this address for a minute."""
    answers = [_raw(srv, "POST", "/dashboard/login", form={"token": f"guess-{i}"})[0] for i in range(30)]
    assert answers[:10] == [401] * 10 and set(answers[10:]) == {429}
    status, headers, _ = _raw(srv, "POST", "/dashboard/login", form={"token": A})
    assert status == 429 and 0 < int(headers["retry-after"]) <= 61  # even the right token waits: nothing is checked
    assert _raw(srv, "GET", "/v1/models", token=A)[0] == 200  # API clients are not affected
