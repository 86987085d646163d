"""Image fine-tuning through the job server with the official openai client: captioned images uploaded as a zip or
as base64 rows (`client.files.create`), an image job on a tiny seeded pipeline (`client.fine_tuning.jobs.create`) with
its events, checkpoints and evaluation grids, and OpenAI's Images API (`client.images.generate`) on the base and the
fine-tuned model; malicious uploads refused with their codes; every error in OpenAI's shape."""

import base64
import io
import json
import zipfile

import numpy as np
import openai
import pytest
from PIL import Image

from server_helpers import Server, wait_status
from tunesmith.images import model as M
from tunesmith.images import synth

TINY = M.ModelShape(resolution=16, channels=(8, 16), heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32)
PROMPT = "two small red crosses on a blue background"
FAST = {"train.max_steps": 4, "eval.every_steps": 2, "checkpoint.every_steps": 2, "train.batch_size": 4,
        "objective.denoise.inference_steps": 2, "objective.denoise.images_per_prompt": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("server-images")
    pipe = root / "pipe"
    M.build_pipeline(TINY, seed=0).save_pretrained(pipe, safe_serialization=True)
    data = synth.write_dataset(root / "data", "cross", n=10, seed=0, resolution=16)
    archive = root / "crosses.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(data.iterdir()):
            if p.suffix in (".png", ".txt"):
                z.write(p, f"crosses/{p.name}")
    srv = Server(root / "data-dir", tiny_model_dir, "--model", f"tinyimg={pipe}", "--max-file-mb", "1").start()
    yield {"server": srv, "pipe": pipe, "data": data, "archive": archive}
    srv.stop()


@pytest.fixture(scope="module")
def uploaded(world):
    return world["server"].client.files.create(file=open(world["archive"], "rb"), purpose="fine-tune")


def _rows(data, names) -> bytes:
    """Captioned images of the folder as .jsonl rows of base64 PNGs (data URLs)."""
    return "".join(json.dumps({"image": "data:image/png;base64," + base64.b64encode((data / f"{n}.png").read_bytes())
                               .decode(), "text": (data / f"{n}.txt").read_text()}) + "\n" for n in names).encode()


@pytest.fixture(scope="module")
def job(world, uploaded):
    """An image job: the zip to train on, base64 rows of 3 other images for validation, 4 steps."""
    c = world["server"].client
    held_out = synth.write_dataset(world["data"].parent / "valid", "cross", n=3, seed=1, resolution=16)
    valid = c.files.create(file=("valid.jsonl", _rows(held_out, ["0000", "0001", "0002"])), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tinyimg", training_file=uploaded.id, validation_file=valid.id,
                                    suffix="cross", seed=3,
                                    hyperparameters={"learning_rate_multiplier": 5},
                                    extra_body={"tunesmith_config": FAST})
    return wait_status(c, job.id, "succeeded", "failed", "cancelled", timeout=300)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """The same images up to a rounding step: the server's process runs torch on more threads than the tests' (its
    sums are ordered differently), which moved one 8-bit value of 1,536 by 1 in a measured run."""
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1 and (a != b).mean() < 0.01


def _error(exc) -> dict:
    return exc.value.body if isinstance(exc.value.body, dict) and "code" in exc.value.body else exc.value.body["error"]


# ---------------------------------------------------------------- uploads


def test_a_zip_of_captioned_images_uploads_as_a_fine_tune_file(world, uploaded):
    assert uploaded.purpose == "fine-tune" and uploaded.filename == "crosses.zip" and uploaded.status == "processed"
    files = world["server"].data_dir / "files"
    assert (files / f"{uploaded.id}.images" / "0000.png").is_file()  # unpacked from inside its one folder
    content = world["server"].client.files.content(uploaded.id).read()
    assert content == world["archive"].read_bytes()  # the upload itself, as sent


def test_base64_rows_upload_and_delete_removes_the_unpacked_folder(world):
    c = world["server"].client
    f = c.files.create(file=("rows.jsonl", _rows(world["data"], ["0000", "0001", "0002"])), purpose="fine-tune")
    folder = world["server"].data_dir / "files" / f"{f.id}.images"
    assert folder.is_dir() and len(list(folder.glob("*.png"))) == 3
    c.files.delete(f.id)
    assert not folder.exists()


def _zip(members: dict, link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("members,link,code,where", [
    ({"../../evil.png": b"x", "a.txt": b"a"}, None, "E050", "'../../evil.png'"),
    ({"a.txt": b"a"}, "a.png", "E051", "'a.png'"),
    ({"a.txt": b"a", "zeros.txt": b"\0" * (8 << 20)}, None, "E052", "unpacks to more than"),
    ({"a.png": b"not an image", "a.txt": b"a"}, None, "E055", "bad.zip/a.png"),
])
def test_malicious_and_broken_archives_are_refused_with_their_code(world, members, link, code, where):
    srv = world["server"]
    before = {p.name for p in (srv.data_dir / "files").iterdir()}
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.files.create(file=("bad.zip", _zip(members, link)), purpose="fine-tune")
    err = _error(e)
    assert (err["code"], err["param"], err["type"]) == (code, "file", "invalid_request_error"), err
    assert where in err["message"] and err["issues"][0]["code"] == code
    assert str(srv.data_dir) not in json.dumps(err)
    assert {p.name for p in (srv.data_dir / "files").iterdir()} == before  # nothing kept, nothing unpacked
    assert not (srv.data_dir / "evil.png").exists() and not (srv.data_dir.parent / "evil.png").exists()


def test_a_tar_with_an_unknown_extension_is_refused_as_before(world):
    with pytest.raises(openai.BadRequestError) as e:
        world["server"].client.files.create(file=("data.rar", b"Rar!"), purpose="fine-tune")
    assert _error(e)["code"] == "E017" and ".tar.gz" in _error(e)["message"]


# ---------------------------------------------------------------- the job


def test_an_image_job_runs_with_events_checkpoints_and_grids(world, job):
    c = world["server"].client
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tinyimg:cross:{job.id}" and job.method.type == "supervised"
    assert job.hyperparameters.learning_rate_multiplier == 5.0 and job.hyperparameters.batch_size == 4
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any("denoise: 10 training images at 16x16" in m for m in messages)  # all ten: validation is its own file
    assert any("10 training and 12 validation examples" in m for m in messages)  # 3 images x 4 fixed timesteps
    assert not any("also in the training data" in m for m in messages)
    assert any(m.startswith("Step 4/4: training loss=") for m in messages)
    assert any(m.startswith("Step 2: validation loss=") for m in messages)
    steps = sorted(ck.step_number for ck in c.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert steps == [2, 4]
    metrics = c.get(f"/fine_tuning/jobs/{job.id}/metrics", cast_to=object)
    grid = metrics["samples"][0]["image"]
    assert grid == "samples/step-000004.png" and all(s["image"] == grid for s in metrics["samples"])
    png = c.get(f"/fine_tuning/jobs/{job.id}/report/{grid}", cast_to=openai._legacy_response.HttpxBinaryResponseContent)
    im = Image.open(io.BytesIO(png.read()))
    tile = 16 * (96 // 16) + 2  # 16 x 16 images shown 6 times larger, 2 pixels apart (evaluate.images.save_grid)
    assert (im.width, im.height) == (2 * tile, len(metrics["samples"]) * tile)  # images_per_prompt a row, a row a prompt


def test_an_image_model_refuses_text_files_and_other_methods(world, uploaded):
    c = world["server"].client
    text = c.files.create(file=("t.jsonl", json.dumps({"messages": [{"role": "user", "content": "a"},
                                                                     {"role": "assistant", "content": "b"}]}).encode()
                                + b"\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="tinyimg", training_file=text.id)
    assert (_error(e)["code"], _error(e)["param"]) == ("E026", "training_file")
    assert "text-to-image model trains on captioned images" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    assert (_error(e)["code"], _error(e)["param"]) == ("E026", "training_file")
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="tinyimg", training_file=uploaded.id, method={"type": "dpo"})
    assert (_error(e)["code"], _error(e)["param"]) == ("unsupported_method", "method.type")


def test_images_smaller_than_the_models_resolution_fail_the_job_before_it_queues(world, tmp_path):
    """The upload cannot know the model; the job's check before queueing can: E040 naming the member."""
    small = synth.write_dataset(tmp_path / "small", "cross", n=4, seed=2, resolution=8)
    c = world["server"].client
    f = c.files.create(file=("small.jsonl", _rows(small, ["0000", "0001", "0002", "0003"])), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tinyimg", training_file=f.id, extra_body={"tunesmith_config": FAST})
    job = wait_status(c, job.id, "failed", "succeeded", timeout=120)
    assert (job.status, job.error.code, job.error.param) == ("failed", "E040", "training_file")
    # each row's image is named by its line (000001.png: line 1), in the file's unpacked folder
    assert f"{f.id}/metadata.jsonl:1: file_name: E040 000001.png is 8x8, smaller than the resolution 16" in \
        job.error.message
    assert str(world["server"].data_dir) not in job.error.message


# ---------------------------------------------------------------- the Images API


def test_images_generate_with_the_fine_tuned_and_the_base_model(world, job):
    """Image i from seed + i: the fine-tuned model's PNGs are what its delivered pipeline draws from those seeds, and
    not what the base draws; without a seed two calls differ."""
    from tunesmith.evaluate.images import generate_images
    from tunesmith.models.diffusion import load_pipeline, load_tuned_pipeline

    c = world["server"].client
    extra = {"seed": 5, "steps": 2}
    tuned = c.images.generate(model=job.fine_tuned_model, prompt=PROMPT, n=2, size="16x16",
                              response_format="b64_json", extra_body=extra)
    assert len(tuned.data) == 2 and tuned.size == "16x16" and tuned.output_format == "png"
    got = np.stack([_pixels(d.b64_json) for d in tuned.data])
    run = world["server"].data_dir / "runs" / job.id / "best"
    want = generate_images(load_tuned_pipeline(run), [PROMPT] * 2, [5, 6], steps=2, guidance=4.0)
    base_want = generate_images(load_pipeline(world["pipe"]), [PROMPT] * 2, [5, 6], steps=2, guidance=4.0)
    assert _same(got, want) and np.abs(got.astype(int) - base_want).max() > 32
    base = c.images.generate(model="tinyimg", prompt=PROMPT, n=2, extra_body=extra)  # size and format left out
    assert _same(np.stack([_pixels(d.b64_json) for d in base.data]), base_want)
    one, two = (c.images.generate(model="tinyimg", prompt=PROMPT, extra_body={"steps": 2}) for _ in range(2))
    assert not _same(_pixels(one.data[0].b64_json), _pixels(two.data[0].b64_json))


@pytest.mark.parametrize("kwargs,status,param,code", [
    ({"model": "no-such-model"}, 404, "model", "model_not_found"),
    ({"model": "tiny"}, 400, "model", "invalid_value"),
    ({"model": "tinyimg", "size": "1024x1024"}, 400, "size", "invalid_value"),
    ({"model": "tinyimg", "n": 0}, 400, "n", "integer_below_min_value"),
    ({"model": "tinyimg", "n": 11}, 400, "n", "integer_above_max_value"),
    ({"model": "tinyimg", "response_format": "url"}, 400, "response_format", "unsupported_value"),
    ({"model": "tinyimg", "style": "vivid"}, 400, "style", "unsupported_value"),
    ({}, 400, "model", "missing_required_parameter"),
])
def test_images_errors_in_openais_shape(world, kwargs, status, param, code):
    with pytest.raises(openai.APIStatusError) as e:
        world["server"].client.images.generate(prompt=PROMPT, **kwargs)
    err = _error(e)
    assert (e.value.status_code, err["param"], err["code"]) == (status, param, code), err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_unknown_images_fields_are_refused_and_chat_refuses_an_image_model(world):
    c = world["server"].client
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model="tinyimg", prompt=PROMPT, extra_body={"colour": "blue"})
    assert (_error(e)["code"], _error(e)["param"]) == ("unknown_parameter", "colour")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tinyimg", messages=[{"role": "user", "content": "hi"}])
    assert (_error(e)["code"], _error(e)["param"]) == ("invalid_value", "model")
    assert "/v1/images/generations" in _error(e)["message"]


def test_images_from_the_jobs_checkpoints(world, job):
    """Each checkpoint id that checkpoints.list reports draws with the run's model at that step: the best step's is
    the fine-tuned model itself, the two steps differ; an unknown step is model_not_found."""
    import re

    c = world["server"].client
    ids = {ck.step_number: ck.fine_tuned_model_checkpoint for ck in c.fine_tuning.jobs.checkpoints.list(job.id).data}

    def draw(model):
        out = c.images.generate(model=model, prompt=PROMPT, n=1, extra_body={"seed": 5, "steps": 2})
        return np.stack([_pixels(d.b64_json) for d in out.data])

    done = next(e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data
                if e.message.startswith("The job has successfully completed"))
    best = int(re.search(r"best step (\d+)", done).group(1))
    at = {step: draw(ids[step]) for step in (2, 4)}
    assert _same(at[best], draw(job.fine_tuned_model)) and not _same(at[2], at[4])
    with pytest.raises(openai.NotFoundError) as e:
        draw(f"{job.fine_tuned_model}:ckpt-step-3")
    assert _error(e)["code"] == "model_not_found"


def test_the_dashboard_shows_the_evaluation_grid(world, job):
    """The job's page in a real browser shows the latest evaluation's grid (loaded through the signed-in session,
    under the dashboard's Content-Security-Policy) with a line per prompt."""
    import shutil
    from pathlib import Path

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (make setup installs it)")
    from server_helpers import TOKEN

    srv = world["server"]
    samples = srv.client.get(f"/fine_tuning/jobs/{job.id}/metrics", cast_to=object)["samples"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            pg = browser.new_page()
            pg.set_default_timeout(60_000)
            pg.goto(srv.url + "/dashboard")
            pg.fill("#token", TOKEN)
            pg.click("#sign-in")
            pg.wait_for_selector("#jobs")
            pg.goto(f"{srv.url}/dashboard#job={job.id}")
            pg.wait_for_function("() => { const i = document.querySelector('#samples img.grid');"
                                 " return i && i.complete && i.naturalWidth > 0; }")
            src = pg.get_attribute("#samples img.grid", "src")
            assert src == f"/v1/fine_tuning/jobs/{job.id}/report/samples/step-000004.png"
            items = pg.locator("#samples .grid-prompts li").all_inner_texts()
            assert len(items) == len(samples) and items[0] == samples[0]["prompt"]
            assert any(t.endswith("(control)") for t in items) == any(s["control"] for s in samples)
        finally:
            browser.close()
