"""The dashboard in a real browser: Playwright for Python driving Debian's headless Chromium.

`playwright install` (a browser download) is never used: the browser is the system's /usr/bin/chromium,
which `make setup` installs with apt-get; without it this test is skipped with that reason.
"""

import shutil
from pathlib import Path

import pytest
from server_helpers import TOKEN

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (make setup installs it: apt-get install chromium, as root)",
                allow_module_level=True)

POINTS = "() => +document.getElementById('loss-chart').dataset.trainPoints"


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page()
        pg.set_default_timeout(120_000)
        pg.goto(server.url + "/dashboard")  # no cookie yet: the sign-in page
        pg.fill("#token", TOKEN)
        pg.click("#sign-in")
        pg.wait_for_selector("#jobs")
        yield pg
        browser.close()


def test_sign_in_with_a_wrong_token_is_refused(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page()
        pg.goto(server.url + "/dashboard")
        pg.fill("#token", "not-the-token")
        pg.click("#sign-in")
        assert "That token is not valid" in pg.content()
        assert pg.locator("#loss-chart").count() == 0
        browser.close()


def test_live_loss_curve_of_a_job_created_through_the_api(server, uploaded, page):
    c = server.client
    job = c.fine_tuning.jobs.create(
        model="tiny", training_file=uploaded[0].id, validation_file=uploaded[1].id, hyperparameters={"batch_size": 4},
        extra_body={"tunesmith_config": {"train.max_steps": 100000, "eval.every_steps": 5, "eval.compare_base": False}})
    row = page.locator(f"tr.job[data-job-id='{job.id}']")
    row.wait_for()
    row.click()
    page.wait_for_function(f"{POINTS} >= 1")
    first = page.evaluate(POINTS)
    # the page polls: the same curve grows while the job trains, without a reload
    page.wait_for_function(f"{POINTS} >= {first + 3}")
    assert page.locator("#job-status").inner_text() == "running"
    assert page.locator("#train-line").get_attribute("points").count(",") >= first + 3
    page.wait_for_selector("#loss-chart circle.valid-point")  # validation loss every 5 steps
    page.wait_for_selector("#samples .sample")  # sample generations of the latest evaluation
    assert "training loss" in page.locator("#events").inner_text()
    c.fine_tuning.jobs.cancel(job.id)
    page.wait_for_function("() => document.getElementById('job-status').textContent === 'cancelled'")


def test_finished_job_shows_its_curve_and_report(server, finished_job, page):
    page.evaluate(f"location.hash = '#job={finished_job.id}'")
    page.wait_for_function("() => document.getElementById('job-status').textContent === 'succeeded'")
    page.wait_for_function(f"{POINTS} === 8")
    assert page.locator("#job-ft-model").inner_text() == finished_job.fine_tuned_model
    link = page.locator("#report-link")
    link.wait_for()
    response = page.request.get(server.url + link.get_attribute("href"))  # the sign-in cookie goes along
    assert response.status == 200 and "<html" in response.text().lower()
