"""The dashboard in a real browser: Playwright for Python driving Debian's headless Chromium.

`playwright install` (a browser download) is never used: the browser is the system's /usr/bin/chromium,
which `make setup` installs with apt-get; without it this test is skipped with that reason.
"""

import shutil
from pathlib import Path

import pytest
from server_helpers import TOKEN, wait_status

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


def test_report_link_follows_the_selected_job(server, uploaded, finished_job, page):
    c = server.client
    other = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id, validation_file=uploaded[1].id,
                                      hyperparameters={"batch_size": 8},
                                      extra_body={"tunesmith_config": {"train.max_steps": 2, "eval.every_steps": 2}})
    assert wait_status(c, other.id, "succeeded", "failed").status == "succeeded"
    link = page.locator("#report-link")
    for job_id in (finished_job.id, other.id, finished_job.id):
        page.evaluate(f"location.hash = '#job={job_id}'")
        page.wait_for_function(f"() => document.getElementById('report-link')?.getAttribute('href')"
                               f"?.includes('{job_id}')")
        assert link.count() == 1 and job_id in link.get_attribute("href")
    cancelled = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id,
                                          extra_body={"tunesmith_config": {"train.max_steps": 100000}})
    c.fine_tuning.jobs.cancel(cancelled.id)
    page.evaluate(f"location.hash = '#job={cancelled.id}'")  # no report: no link, not the previous job's
    page.wait_for_function(f"() => document.getElementById('job-id').textContent === '{cancelled.id}'")
    page.wait_for_timeout(1500)  # a poll or two
    assert link.count() == 0


def test_long_unbroken_outputs_wrap_inside_the_page(page):
    width = page.evaluate("document.documentElement.clientWidth")
    page.evaluate("showSamples([{prompt: 'p'.repeat(3000), output: 'o'.repeat(5000), reference: 'r'.repeat(3000)}])")
    page.evaluate("showEvents([{created_at: 0, level: 'info', message: 'm'.repeat(5000)}])")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    assert page.evaluate("getComputedStyle(document.querySelector('#samples .sample div')).overflowWrap") == "anywhere"


def test_paging_and_status_filter_beyond_the_newest_100_jobs(server, uploaded, finished_job, page):
    c = server.client
    oldest = None
    for _ in range(110 - len(list(c.fine_tuning.jobs.list(limit=100)))):
        j = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id,
                                      extra_body={"tunesmith_config": {"train.max_steps": 100000}})
        c.fine_tuning.jobs.cancel(j.id)
    everything = []
    for job in c.fine_tuning.jobs.list(limit=100):  # the client pages through all of them
        everything.append(job.id)
    assert len(everything) > 100
    oldest = everything[-1]
    row, shown = page.locator(f"tr.job[data-job-id='{oldest}']"), 1
    page.wait_for_function("() => document.getElementById('page-info').textContent === 'page 1'")
    page.locator(f"#jobs tr.job[data-job-id='{everything[0]}']").wait_for()  # page 1 polled after the last create
    while not row.count():
        page.click("#page-older")
        shown += 1
        page.wait_for_function(f"() => document.getElementById('page-info').textContent === 'page {shown}'")
    assert shown == -(-len(everything) // 50) >= 3  # the last page, past the newest 100
    page.click("#page-newer")
    page.wait_for_function(f"() => document.getElementById('page-info').textContent === 'page {shown - 1}'")
    assert row.count() == 0
    page.select_option("#status-filter", "succeeded")
    page.wait_for_function("() => [...document.querySelectorAll('#jobs tr.job .status')].every("
                           "s => s.textContent === 'succeeded')")
    page.locator(f"tr.job[data-job-id='{finished_job.id}']").wait_for()
    page.select_option("#status-filter", "")


def test_sign_out_revokes_the_session(server, page):
    context = page.context.browser.new_context()  # a second browser session, beside the module's
    pg = context.new_page()
    pg.goto(server.url + "/dashboard")
    pg.fill("#token", TOKEN)
    pg.click("#sign-in")
    pg.wait_for_function("() => document.getElementById('updated').textContent.startsWith('updated')")
    cookie = next(c for c in context.cookies() if c["name"] == "tunesmith_session")
    assert cookie["value"] != TOKEN and cookie["httpOnly"] and cookie["expires"] > 0
    pg.click("#sign-out")
    pg.wait_for_selector("#sign-in")
    assert pg.request.get(server.url + "/v1/models", headers={"Cookie": f"tunesmith_session={cookie['value']}"}
                          ).status == 401
    assert page.evaluate("fetch('/v1/models').then(r => r.status)") == 200  # the other session is still signed in
    context.close()
