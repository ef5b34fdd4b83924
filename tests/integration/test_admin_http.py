"""The HTTP admin API and the support console, against a running cluster of 2 workers.

The console is driven in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through Selenium): paste a customer's error text, see
the refusal, suspend the account from the page.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterproc import Cluster, free_port, wait_for
from test_support import (
    AMERICAN,
    ANNA,
    JAN,
    POLICY_VIOLATION,
    as_json,
    cli,
    history,
    mail_code,
    moment,
    refused_sid,
)

from cluster.passwords import hash_password

pytestmark = pytest.mark.integration

PASSWORD = "a long admin passphrase"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class Http:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def __call__(self, method: str, path: str, body: Any = None, user: str | None = "anna",
                 password: str = PASSWORD, content_type: str = "application/json",
                 headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        if data is not None:
            request.add_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                status, raw, kind = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, raw, kind = error.code, error.read(), error.headers
        text = raw.decode()
        if kind.get_content_type() == "application/json":
            return status, json.loads(text)
        return status, text


def start(make_cluster: Callable[..., Cluster], **overrides: Any) -> tuple[Cluster, Http]:
    port = free_port()
    cluster = make_cluster(workers=2, admin={"listen": f"127.0.0.1:{port}",
                                             "users_file": "admins"}, **overrides)
    # Cheap hashes: the tests sign in many times (the cache covers most of them).
    (cluster.folder / "admins").write_text(
        "# support staff\n"
        f"anna:{hash_password(PASSWORD, 'BLF-CRYPT', cost=4)}\n"
        f"bob:{hash_password(PASSWORD, 'ARGON2ID', time_cost=1, memory_cost=1024)}\n")
    cluster.start()
    return cluster, Http(port)


def test_http_api_answers_as_the_cli_and_records_who_changed_what(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster, http = start(make_cluster, limits=[{"window": "1h", "max": 1}])
    assert cluster.send_one()[0] == 250
    sid = refused_sid(cluster.send_one())

    # 401 without credentials, with a wrong password, an unknown name, a malformed header.
    for kind in ({"user": None}, {"password": "wrong"}, {"user": "mallory"},
                 {"user": None, "headers": {"Authorization": "Basic !!!"}}):
        status, text = http("GET", f"/api/sessions/{sid}", **kind)
        assert status == 401, kind
    assert urllib_headers(http, "/")["WWW-Authenticate"].startswith('Basic realm="sendguard')
    status, _ = http("POST", f"/api/accounts/{ANNA}/suspend", body={"reason": "x"}, user=None)
    assert status == 401
    assert mail_code(cluster, "127.0.0.9", ANNA) == 250  # nothing was suspended by that
    # A request aiohttp cannot parse: a 400, and one warning line without a traceback.
    assert http("GET", "/?error=" + "x" * 10000)[0] == 400
    [refused] = wait_for(lambda: [line for line in cluster.log_lines()
                                  if line.get("logger") == "aiohttp.server.admin"], 10,
                         "the bad request logged")
    assert refused["level"] == "warning" and "error" not in refused, refused
    assert refused["message"].endswith(": 400 LineTooLong")

    status, why = http("GET", f"/api/sessions/{sid}")
    assert status == 200
    assert why["decisions"] == as_json(cluster, "why", sid)["decisions"]
    assert http("GET", "/api/sessions/" + "B" * 22)[0] == 404
    assert http("GET", "/api/sessions/nope")[0] == 400
    status, account = http("GET", f"/api/accounts/{JAN}")
    assert status == 200 and account["suspension"] is None
    assert [r["count"] for r in account["rows"]] == [1]
    assert http("GET", "/api/accounts/ghost@kowalski.pl")[0] == 200  # no counts, no error

    # Changes: only JSON, by the signed-in name.
    status, text = http("POST", f"/api/accounts/{JAN}/suspend", body=b"reason=csrf",
                        content_type="application/x-www-form-urlencoded")
    assert status == 415
    assert http("POST", f"/api/accounts/{JAN}/suspend", body={"for": "1h"})[0] == 400
    assert http("POST", "/api/accounts/ghost@kowalski.pl/suspend",
                body={"reason": "x"})[0] == 404
    status, done = http("POST", f"/api/accounts/{ANNA}/suspend",
                        body={"reason": "phished", "for": "2h"}, user="bob")
    assert status == 200 and done["by"] == "bob" and done["until"]
    assert refusing_policy(cluster, "127.0.0.9", ANNA) == "suspension"
    assert http("GET", f"/api/accounts/{ANNA}")[1]["suspension"]["reason"] == "phished"
    assert http("POST", f"/api/accounts/{ANNA}/unsuspend", body=b"",
                content_type="text/plain")[0] == 415
    status, done = http("POST", f"/api/accounts/{ANNA}/unsuspend", body=b"")
    assert status == 200 and done["changed"]

    # A country: from the CLI for a few seconds, and from the API for a week.
    assert mail_code(cluster, AMERICAN, ANNA) == 550
    until = time.time() + 4
    done_cli = cli(cluster, "tenant", "allow-country", "nowak.pl", "US", "--for", "4s",
                   "--reason", "conference", "--by", "carol")
    assert "and US until " in done_cli and "(by carol: conference)" in done_cli
    wait_for(lambda: mail_code(cluster, AMERICAN, ANNA) == 250, 3.5, "US allowed for a while")
    wait_for(lambda: time.time() > until and mail_code(cluster, AMERICAN, ANNA) == 550, 20,
             "the exception lapsed", every=0.2)
    status, done = http("POST", "/api/domains/kowalski.pl/countries",
                        body={"country": "us", "for": "7d", "reason": "holiday"})
    assert status == 200 and [(e["country"], e["by"]) for e in done["exceptions"]] == [
        ("US", "anna")]
    assert 6.9 * 86400 < iso_seconds(done["exceptions"][0]["until"]) - time.time() < 7 * 86400
    assert http("GET", "/api/domains/kowalski.pl")[1]["exceptions"] == done["exceptions"]
    # Past GeoIP now, jan's MAIL meets his full rate limit.
    assert refusing_policy(cluster, AMERICAN, JAN) == "rate_limit"
    status, done = http("POST", "/api/domains/kowalski.pl/countries",
                        body={"country": "US", "allow": False, "reason": "back home"})
    assert status == 200 and done["exceptions"] == [] and done["changed"]
    assert http("POST", "/api/domains/nowhere.pl/countries", body={"country": "US"})[0] == 404

    wait_for(lambda: history(cluster, "nowak.pl")[-1:] and
             history(cluster, "nowak.pl")[-1]["action"] == "exception-lapsed", 10,
             "the lapse recorded")
    status, nowak = http("GET", "/api/domains/nowak.pl/history")
    assert status == 200 and nowak == as_json(cluster, "tenant", "history", "nowak.pl")
    assert [(e["action"], e["by"], e["reason"]) for e in nowak["entries"]] == [
        ("suspend", "bob", "phished"), ("unsuspend", "anna", ""),
        ("allow-country", "carol", "conference"), ("exception-lapsed", "sendguard",
                                                   "conference")]
    assert [(e["action"], e["by"], e["reason"]) for e in history(cluster, "kowalski.pl")] == [
        ("allow-country", "anna", "holiday"), ("disallow-country", "anna", "back home")]
    assert "Traceback" not in cluster.log_path.read_text()


def refusing_policy(cluster: Cluster, source: str, user: str) -> str | None:
    """The policy that refuses a new session's MAIL, from ``why`` (None: accepted; the
    reply itself when it names no session)."""
    client = cluster.login(source, user)
    try:
        code, text = client.mail(user)
    finally:
        client.close()
    if code == 250:
        return None
    found = POLICY_VIOLATION.fullmatch(text.decode())
    if found is None:
        return f"{code} {text.decode()}"  # a refusal without a session id in it
    return str(as_json(cluster, "why", found.group(1))["decisions"][-1]["policy"])


def urllib_headers(http: Http, path: str) -> Any:
    try:
        urllib.request.urlopen(http.base + path, timeout=20)
    except urllib.error.HTTPError as error:
        return error.headers
    raise AssertionError("expected a 401")


def iso_seconds(text: str) -> float:
    return moment(text)


# -- the console in a browser ----------------------------------------------------------

@pytest.fixture
def browser() -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver must be installed under CI "
                        "(.ci/services.sh)")
        pytest.skip("no chromium or chromedriver here")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sg-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def sign_in(driver: Any, user: str) -> None:
    """HTTP Basic credentials on every request the browser makes, as a saved login would."""
    token = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                           {"headers": {"Authorization": f"Basic {token}"}})


def test_the_console_finds_a_refusal_and_suspends_the_account(
        make_cluster: Callable[..., Cluster], browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    cluster, http = start(make_cluster, limits=[{"window": "1h", "max": 1}])
    assert cluster.send_one()[0] == 250
    code, text = cluster.send_one()
    sid = refused_sid((code, text))
    pasted = ("Mail delivery failed: returning message to sender\n"
              f"SMTP error from remote server for MAIL FROM command:\n{code} {text}\n")

    sign_in(browser, "anna")
    browser.get(http.base + "/")
    assert "signed in as anna" in browser.find_element(By.CLASS_NAME, "who").text
    browser.find_element(By.ID, "error-text").send_keys(pasted)
    browser.find_element(By.ID, "why-submit").click()
    table = wait_for(lambda: _found(browser, By.ID, "decisions"), 20, "the session's decisions")
    rows = table.find_elements(By.TAG_NAME, "tr")
    refusal = rows[-1].text
    assert "MAIL" in refusal and "rate_limit" in refusal and "reject" in refusal
    assert f"550 5.1.0 {sid} policy violation" in refusal
    assert "acct:jan@kowalski.pl: 1 of 1 in 1h; room again at" in refusal or \
        "ip:127.0.0.5: 1 of 1 in 1h; room again at" in refusal
    assert browser.find_element(By.ID, "account-input").get_attribute("value") == JAN
    assert browser.find_element(By.ID, "suspension").text == "not suspended"

    browser.find_element(By.ID, "suspend-reason").send_keys("sending spam, password reset")
    browser.find_element(By.ID, "suspend-for").send_keys("2h")
    browser.find_element(By.ID, "suspend-submit").click()
    notice = wait_for(lambda: _found(browser, By.ID, "notice"), 20, "the notice after suspending")
    assert notice.text == f"{JAN} suspended"
    status = browser.find_element(By.ID, "suspension").text
    assert status.startswith("suspended until ") and \
        status.endswith("by anna: sending spam, password reset")
    history_rows = browser.find_element(By.ID, "history").text
    assert "suspend" in history_rows and "anna" in history_rows
    browser.save_screenshot(str(tmp_path / "console.png"))

    inspected = as_json(cluster, "inspect", "account", JAN)
    assert inspected["suspension"]["by"] == "anna"
    assert refusing_policy(cluster, "127.0.0.9", JAN) == "suspension"

    # A form without the page's token, or from another site, changes nothing.
    form = urllib.parse.urlencode({"account": JAN}).encode()
    assert http("POST", "/console/unsuspend", body=form,
                content_type="application/x-www-form-urlencoded")[0] == 403
    page = browser.page_source
    token = page.split('name="token" value="', 1)[1].split('"', 1)[0]
    forged = urllib.parse.urlencode({"account": JAN, "token": token}).encode()
    assert http("POST", "/console/unsuspend", body=forged,
                content_type="application/x-www-form-urlencoded",
                headers={"Origin": "http://evil.example"})[0] == 403
    assert http("POST", "/console/unsuspend", body=forged, user="bob",
                content_type="application/x-www-form-urlencoded")[0] == 403  # anna's token
    assert as_json(cluster, "inspect", "account", JAN)["suspension"] is not None

    browser.find_element(By.ID, "unsuspend-submit").click()
    notice = wait_for(lambda: _found(browser, By.ID, "notice"), 20, "the notice after lifting")
    assert notice.text == f"{JAN} unsuspended"
    assert browser.find_element(By.ID, "suspension").text == "not suspended"
    assert refusing_policy(cluster, "127.0.0.9", JAN) == "rate_limit"
    assert [e["action"] for e in history(cluster, "kowalski.pl")] == ["suspend", "unsuspend"]


def _found(driver: Any, by: str, what: str) -> Any:
    from selenium.common.exceptions import NoSuchElementException

    try:
        return driver.find_element(by, what)
    except NoSuchElementException:
        return None


def test_the_console_gives_a_domain_a_country_for_a_week_and_ends_it(
        make_cluster: Callable[..., Cluster], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    cluster, http = start(make_cluster)
    assert mail_code(cluster, AMERICAN, ANNA) == 550  # nowak.pl: PL only

    sign_in(browser, "bob")
    browser.get(http.base + "/")
    browser.find_element(By.ID, "domain-input").send_keys("nowak.pl")
    browser.find_element(By.CSS_SELECTOR, "#domain-form button").click()
    countries = wait_for(lambda: _found(browser, By.ID, "countries"), 20, "the domain")
    assert countries.text == "countries: PL"

    browser.find_element(By.ID, "allow-country").send_keys("us")
    assert browser.find_element(By.ID, "allow-for").get_attribute("value") == "7d"
    browser.find_element(By.ID, "allow-reason").send_keys("trade fair in Chicago")
    browser.find_element(By.ID, "allow-submit").click()
    _wait_for_notice(browser, "US allowed for nowak.pl for 7d")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "and US until " in page and "(by bob: trade fair in Chicago)" in page
    [exception] = http("GET", "/api/domains/nowak.pl")[1]["exceptions"]
    assert (exception["country"], exception["by"]) == ("US", "bob")
    assert 6.9 * 86400 < moment(exception["until"]) - time.time() <= 7 * 86400
    wait_for(lambda: mail_code(cluster, AMERICAN, ANNA) == 250, 10, "US allowed")
    history_rows = browser.find_element(By.ID, "history").text
    assert "allow-country" in history_rows and "trade fair in Chicago" in history_rows

    # The exception's own button ends it at once.
    browser.find_element(By.CSS_SELECTOR, "form[action='/console/disallow-country'] button"
                         ).click()
    _wait_for_notice(browser, "US no longer allowed for nowak.pl")
    assert http("GET", "/api/domains/nowak.pl")[1]["exceptions"] == []
    wait_for(lambda: mail_code(cluster, AMERICAN, ANNA) == 550, 10, "US refused again")
    assert [(e["action"], e["by"]) for e in history(cluster, "nowak.pl")] == [
        ("allow-country", "bob"), ("disallow-country", "bob")]


def _wait_for_notice(driver: Any, text: str) -> None:
    """The page after a change says ``text`` (the page before it may still be showing)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def shown() -> bool:
        try:
            notice = _found(driver, By.ID, "notice")
            return notice is not None and notice.text == text
        except StaleElementReferenceException:
            return False

    wait_for(shown, 20, f"the notice {text!r}")
