"""The console's pages in headless chromium (Debian's, via Selenium) against the fake cluster:
the script that refreshes, filters and labels works in a real browser, and model text holding
`<script>` shows as text and never runs. The same flow against the real cluster, with screenshots,
is tests/console/test_console_cluster.py."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pytest
from browserlib import log_in, press_and_wait_for_count
from fakes import FakeKube, history_data, run_object

from ftconsole.server import Console, handler_class

INJECTED = "<script>window.ftOwned = 1</script><img src=x onerror=\"window.ftOwned = 2\">"


@pytest.fixture
def console_url():
    kube = FakeKube()
    kube.runs = [run_object("team-a", "demo"), run_object("team-b", "secret")]
    samples = [{"stage": "ppo", "step": step, "prompt": f"prompt {p}", "response": f"answer {p} at {step}",
                "reward": step / 10, "kl": 0.1} for step in (5, 10) for p in range(4)]
    samples.append({"stage": "ppo", "step": 10, "prompt": "prompt 0", "response": INJECTED, "reward": 0, "kl": 0})
    kube.config_maps[("team-a", "demo-history")] = history_data(samples=samples)
    for verb, resource in (("list", "finetuneruns"), ("get", "finetuneruns"), ("list", "preferencelabels"),
                           ("create", "preferencelabels")):
        kube.allow("alice", verb, resource, "team-a")
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class(Console(kube=kube)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", kube
    finally:
        server.shutdown()


def test_log_in_watch_a_run_and_label_with_the_keyboard(console_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, kube = console_url
    wait = WebDriverWait(browser, 20)
    browser.get(url + "/")  # not logged in: the login form
    assert browser.find_elements(By.NAME, "token")
    log_in(browser, url, "alice-token", wait)
    assert "demo" in browser.find_element(By.ID, "runs").text and "secret" not in browser.page_source

    browser.find_element(By.LINK_TEXT, "demo").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "figure.plot"))
    assert {f.get_attribute("data-metric") for f in browser.find_elements(By.CSS_SELECTOR, "figure.plot")} == {
        "kl", "score_mean"}
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.sample")
    assert len(rows) == 9 and any(INJECTED in row.text for row in rows)
    assert browser.execute_script("return window.ftOwned") is None
    browser.find_element(By.ID, "sample-search").send_keys("answer 3")
    wait.until(lambda d: [r.is_displayed() for r in d.find_elements(By.CSS_SELECTOR, "tr.sample")].count(True) == 2)

    browser.get(url + "/runs/team-a/demo/label")
    assert browser.find_element(By.ID, "pair-position").text == "pair 1 of 4"
    body = browser.find_element(By.TAG_NAME, "body")
    for key, count in (("1", 1), ("2", 2), ("s", 2), ("b", 3)):
        body.send_keys(key)
        wait.until(lambda d, n=count: f"{n} labels so far" in d.find_element(By.ID, "label-progress").text
                   and (key != "s" or "pair 4 of 4" in d.find_element(By.ID, "pair-position").text))
    assert [label["spec"]["choice"] for label in kube.labels] == ["a", "b", "bothBad"]
    assert {label["spec"]["labeller"] for label in kube.labels} == {"alice"}
    assert browser.execute_script("return window.ftOwned") is None


def test_label_an_open_feedback_round_with_the_keyboard(console_url, browser):
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, kube = console_url
    run = kube.runs[0]
    run["status"]["state"] = "AwaitingFeedback"
    run["status"]["feedbackRounds"] = [{"round": 1, "state": "AwaitingLabels", "stage": "ppo", "attempt": 1,
                                        "labels": 0, "needed": 3, "since": "2026-12-01T15:00:00Z"}]
    pairs = [{"prompt": f"round prompt {i}", "responses": [{"text": f"policy {i}", "source": "ppo@10"},
                                                           {"text": INJECTED if i == 0 else f"sft {i}", "source": "sft"}]}
             for i in range(3)]
    kube.config_maps[("team-a", "demo-feedback-1")] = {"candidates.json": json.dumps({"round": 1, "pairs": pairs})}
    wait = WebDriverWait(browser, 20)
    log_in(browser, url, "alice-token", wait)
    assert "0/3 labels" in browser.find_element(By.ID, "runs").text

    browser.find_element(By.CSS_SELECTOR, "a.feedback-count").click()
    wait.until(lambda d: d.find_elements(By.ID, "feedback-round"))
    assert browser.find_element(By.ID, "pair-position").text == "pair 1 of 3"
    assert "round prompt 0" in browser.find_element(By.CSS_SELECTOR, "section.pair:not([hidden])").text
    press_and_wait_for_count(browser, wait, [("2", 1), ("1", 2), ("t", 3)])
    assert [(label["spec"]["round"], label["spec"]["choice"]) for label in kube.labels] == [
        (1, "b"), (1, "a"), (1, "tie")]
    assert [label["metadata"]["labels"]["finetune.dev/round"] for label in kube.labels] == ["1", "1", "1"]
    assert kube.labels[0]["spec"]["responses"][1]["text"] == INJECTED  # labelled as the text it is
    assert browser.execute_script("return window.ftOwned") is None
