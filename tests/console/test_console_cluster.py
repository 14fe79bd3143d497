"""The console as the chart installs it, on the local cluster's real node, with real runs.

`helm install` (namespace-scoped RBAC, two watched namespaces) runs the operator and the console
from the operator image. examples/tiny-cpu.yaml trains in namespace A, so the metric history is
the real trainer's; a suspended run sits in namespace B. Users are ServiceAccounts: alice has the
built-in `edit` role in A (the chart aggregates runs and labels into it), bob has nothing. Through
`kubectl port-forward` (as docs/console.md says): bob gets 403 and sees no run, alice never sees
B's run; in headless chromium alice sees plots and samples (a `<script>` a pod wrote into the
history shows as text), labels three pairs with the keyboard, and the labels are
PreferenceLabels that `python -m ftconsole labels export` turns into preference rows.

The human-feedback loop on the toy task of tests/feedback_toy.py (people prefer friendly words; the
original preferences only the two-word format): examples/tiny-feedback.yaml with one round and the
same manifest without spec.humanFeedback train side by side; alice labels the round's first pairs
with the keyboard and the rest through the console's HTTP API (her token, the page's endpoint);
the round's held-out human-label accuracy rises and the policy that continued with the retrained
reward model says more friendly words than the one without the round.
Screenshots go to docs/console-*.png.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

import pytest
import yaml
from browserlib import log_in, press_and_wait_for_count
from chartlib import CHART, REPO

sys.path.insert(0, str(REPO / "hack"))
import demo_assets  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from feedback_toy import format_preferences, friendly_choice, friendly_share  # noqa: E402

# The node lock may be held by other sessions (FINETUNE_NODE_LOCK_WAIT_SECONDS) and the run trains for real.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(3600)]

RELEASE = "ft-console"
SYSTEM = "ft-console-system"
TEAM_A, TEAM_B = "ft-console-a", "ft-console-b"
EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"
STORAGE = REPO / "examples" / "tiny-cpu-storage.yaml"
SERVICE = f"{RELEASE}-finetune-operator-console"
INJECTED = "<script>window.ftOwned = 1</script>"
DOCS = REPO / "docs"


def wait_for(what, check, *, timeout_seconds, diagnose=lambda: ""):
    """Poll check() until truthy; fail naming `what` and diagnose() at the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_seconds:.0f}s waiting for {what}\n{diagnose()}")


def example_run(namespace, *, name=None, suspend=False):
    (run,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d and d.get("kind") == "FineTuneRun"]
    run["metadata"] = {"name": name or run["metadata"]["name"], "namespace": namespace}
    if suspend:
        run["spec"]["suspend"] = True
    return run


def adopt(kube_cluster, crd):
    if kube_cluster.kubectl("get", f"crd/{crd}", check=False).returncode != 0:
        return
    kube_cluster.kubectl("label", "--overwrite", f"crd/{crd}", "app.kubernetes.io/managed-by=Helm")
    kube_cluster.kubectl("annotate", "--overwrite", f"crd/{crd}", f"meta.helm.sh/release-name={RELEASE}",
                         f"meta.helm.sh/release-namespace={SYSTEM}")


def service_account_token(kube_cluster, namespace, name):
    """The token of a ServiceAccount's secret (Kubernetes 1.20 creates one per account)."""
    kube_cluster.kubectl("create", "serviceaccount", name, "-n", namespace, check=False)

    def token():
        account = json.loads(kube_cluster.kubectl("get", "sa", name, "-n", namespace, "-o", "json").stdout)
        secrets = account.get("secrets") or []
        if not secrets:
            return None
        secret = json.loads(kube_cluster.kubectl("get", "secret", secrets[0]["name"], "-n", namespace,
                                                 "-o", "json").stdout)
        return base64.b64decode(secret["data"]["token"]).decode() if "token" in secret.get("data", {}) else None

    return wait_for(f"a token for {namespace}/{name}", token, timeout_seconds=60)


@pytest.fixture(scope="module")
def release(kube_cluster):
    for namespace in (TEAM_A, TEAM_B):
        kube_cluster.kubectl("create", "namespace", namespace, check=False)
    for crd in ("finetuneruns.finetune.dev", "preferencelabels.finetune.dev"):
        adopt(kube_cluster, crd)
    helm = [kube_cluster.helm_path, "--kubeconfig", kube_cluster.kubeconfig]
    install = subprocess.run(
        [*helm, "install", RELEASE, str(CHART), "-n", SYSTEM, "--create-namespace",
         "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{TEAM_A},{TEAM_B}}}"],
        capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    try:
        yield
    finally:
        for namespace in (TEAM_A, TEAM_B):
            kube_cluster.kubectl("delete", "finetuneruns,preferencelabels", "--all", "-n", namespace,
                                 "--wait=true", "--timeout=120s", check=False)
        subprocess.run([*helm, "uninstall", RELEASE, "-n", SYSTEM, "--wait"], capture_output=True, text=True)
        for namespace in (TEAM_A, TEAM_B):
            kube_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def users(kube_cluster, release):
    alice = service_account_token(kube_cluster, TEAM_A, "alice")
    bob = service_account_token(kube_cluster, TEAM_A, "bob")
    kube_cluster.kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit",
                         f"--serviceaccount={TEAM_A}:alice", "-n", TEAM_A, check=False)

    def aggregated():  # the chart's aggregated rules reach `edit` through the controller manager
        can = kube_cluster.kubectl("auth", "can-i", "create", "preferencelabels.finetune.dev", "-n", TEAM_A,
                                   f"--as=system:serviceaccount:{TEAM_A}:alice", check=False)
        return can.stdout.strip() == "yes"

    wait_for("edit to include preferencelabels", aggregated, timeout_seconds=60)
    return {"alice": alice, "bob": bob}


def run_status(kube_cluster, namespace, name):
    found = kube_cluster.kubectl("get", "finetunerun", name, "-n", namespace, "-o", "json", check=False)
    return (json.loads(found.stdout).get("status") or {}) if found.returncode == 0 else {}


@pytest.fixture(scope="module")
def trained_run(kube_cluster, release):
    run = example_run(TEAM_A)
    claims = [d["metadata"]["name"] for d in yaml.safe_load_all(STORAGE.read_text()) if d]
    pvc_root = [kube_cluster.pvc_dir(TEAM_A, claim) for claim in claims][0].parent
    demo_assets.write_for_run(run["spec"], pvc_root=pvc_root, log=lambda line: None)
    hidden = example_run(TEAM_B, name="hidden", suspend=True)

    def applied():  # the webhook answers once the operator serves it
        return all(kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj), check=False).returncode == 0
                   for obj in (run, hidden))

    wait_for("the runs to be admitted", applied, timeout_seconds=180,
             diagnose=lambda: kube_cluster.kubectl("get", "pods", "-A", "-o", "wide").stdout)
    name = run["metadata"]["name"]
    status = wait_for(f"{name} to finish",
                      lambda: (s := run_status(kube_cluster, TEAM_A, name)).get("state") in ("Succeeded", "Failed") and s,
                      timeout_seconds=1200,
                      diagnose=lambda: yaml.safe_dump(run_status(kube_cluster, TEAM_A, name)))
    assert status["state"] == "Succeeded", yaml.safe_dump(status)
    return name


def history_document(kube_cluster, name):
    data = json.loads(kube_cluster.kubectl("get", "configmap", f"{name}-history", "-n", TEAM_A,
                                           "-o", "json").stdout).get("data") or {}
    return json.loads(data.get("history.json") or "{}")


@pytest.fixture(scope="module")
def console_url(kube_cluster, release):
    kube_cluster.kubectl("rollout", "status", f"deployment/{SERVICE}", "-n", SYSTEM, "--timeout=300s")
    forward = subprocess.Popen([kube_cluster.kubectl_path, "--kubeconfig", kube_cluster.kubeconfig, "port-forward",
                                "-n", SYSTEM, f"svc/{SERVICE}", ":8090"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = forward.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said {line!r} {forward.stderr.read() if forward.poll() else ''}"
        url = f"http://127.0.0.1:{match.group(1)}"
        wait_for("the console through port-forward", lambda: get(url, "/healthz")[0] == 200, timeout_seconds=60)
        yield url
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def get(url, path, token=None, *, method="GET", body=None, headers=None):
    request = urllib.request.Request(url + path, method=method, data=body, headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def labels_in(kube_cluster, namespace):
    return json.loads(kube_cluster.kubectl("get", "preferencelabels", "-n", namespace, "-o", "json").stdout)["items"]


def test_the_real_trainer_writes_a_bounded_history_the_console_reads(kube_cluster, trained_run):
    history = history_document(kube_cluster, trained_run)
    assert {"sft", "reward", "ppo"} <= set(history["stages"])
    ppo = history["stages"]["ppo"]
    assert [p[0] for p in ppo["series"]["kl"]][-1] == 30, "every PPO step up to the last"
    assert {e["kind"] for e in ppo["events"]} >= {"started", "succeeded"}
    assert len({(s["step"]) for s in history["samples"] if s["stage"] == "ppo"}) >= 2
    # The run owns it: deleting the run deletes its history (garbage collector).
    meta = json.loads(kube_cluster.kubectl("get", "configmap", f"{trained_run}-history", "-n", TEAM_A,
                                           "-o", "json").stdout)["metadata"]
    assert meta["ownerReferences"][0]["kind"] == "FineTuneRun"


def test_a_user_without_rbac_gets_403_and_sees_no_runs(kube_cluster, users, trained_run, console_url):
    bob, alice = users["bob"], users["alice"]
    status, page = get(console_url, "/", bob)
    assert status == 200 and "No runs you may read." in page and trained_run not in page
    assert get(console_url, f"/runs/{TEAM_A}/{trained_run}", bob)[0] == 403
    body = json.dumps({"namespace": TEAM_A, "run": trained_run, "prompt": "p", "choice": "a",
                       "responses": [{"text": "x"}, {"text": "y"}]}).encode()
    headers = {"Content-Type": "application/json", "X-Requested-With": "ftconsole"}
    status, answer = get(console_url, "/api/labels", bob, method="POST", body=body, headers=headers)
    assert status == 403 and "may not" in answer and "SubjectAccessReview" in answer
    assert labels_in(kube_cluster, TEAM_A) == []
    assert get(console_url, "/", "not-a-token")[0] in (200, 303) and get(console_url, "/fragment/runs",
                                                                          "not-a-token")[0] == 401
    status, page = get(console_url, "/", alice)
    assert status == 200 and trained_run in page and "hidden" not in page
    assert get(console_url, f"/runs/{TEAM_B}/hidden", alice)[0] == 403


def screenshot(driver, name, *, height=None):
    """Write docs/<name> (the pictures docs/console.md shows); a failure to write one only warns."""
    from selenium.common.exceptions import WebDriverException

    try:
        if height:
            driver.set_window_size(1400, height)
        if not driver.save_screenshot(str(DOCS / name)):
            warnings.warn(f"no screenshot {name}: chromium returned none")
    except (OSError, WebDriverException) as exc:
        warnings.warn(f"no screenshot {name}: {exc}")


def test_in_a_browser_alice_sees_plots_and_samples_and_labels_with_the_keyboard(
        kube_cluster, users, trained_run, console_url, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # What a compromised or careless pod could write: the console must show it as text.
    document = history_document(kube_cluster, trained_run)
    document["samples"].append({"stage": "ppo", "step": 30, "prompt": "Tell me about cats", "response": INJECTED,
                                "reward": 0.0, "kl": 0.0})
    kube_cluster.kubectl("patch", "configmap", f"{trained_run}-history", "-n", TEAM_A, "--type=merge", "-p",
                         json.dumps({"data": {"history.json": json.dumps(document)}}))
    wait = WebDriverWait(browser, 30)

    log_in(browser, console_url, users["alice"], wait)
    runs_text = browser.find_element(By.ID, "runs").text
    assert trained_run in runs_text and "hidden" not in runs_text

    browser.find_element(By.LINK_TEXT, trained_run).click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "figure.plot")) >= 6)
    metrics = {f.get_attribute("data-metric") for f in browser.find_elements(By.CSS_SELECTOR, "figure.plot")}
    assert {"kl", "score_mean"} <= metrics, metrics
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.sample")
    assert len(rows) >= 10
    assert any(INJECTED in row.text for row in rows), "the injected script shows as text"
    assert browser.execute_script("return window.ftOwned") is None, "and never runs"
    try:
        browser.switch_to.alert
        pytest.fail("an alert opened")
    except NoAlertPresentException:
        pass
    search = browser.find_element(By.ID, "sample-search")
    search.send_keys("window.ftOwned")
    wait.until(lambda d: sum(r.is_displayed() for r in d.find_elements(By.CSS_SELECTOR, "tr.sample")) == 1)
    search.clear()
    search.send_keys(" ")  # back to every row for the screenshot
    screenshot(browser, "console-run.png", height=1800)
    browser.set_window_size(1400, 1000)

    browser.get(f"{console_url}/runs/{TEAM_A}/{trained_run}/label")
    wait.until(lambda d: [s for s in d.find_elements(By.CSS_SELECTOR, "section.pair") if s.is_displayed()])
    screenshot(browser, "console-label.png", height=900)
    press_and_wait_for_count(browser, wait, [("1", 1), ("2", 2), ("t", 3)])

    labels = labels_in(kube_cluster, TEAM_A)
    assert sorted(label["spec"]["choice"] for label in labels) == ["a", "b", "tie"]
    assert {label["spec"]["labeller"] for label in labels} == {f"system:serviceaccount:{TEAM_A}:alice"}
    assert all(label["spec"]["run"] == trained_run for label in labels)

    export = subprocess.run([sys.executable, "-m", "ftconsole", "labels", "export", "-n", TEAM_A, "--run", trained_run],
                            capture_output=True, text=True, env={**os.environ, "KUBECONFIG": kube_cluster.kubeconfig})
    assert export.returncode == 0, export.stderr
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    assert len(rows) == 2 and all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)
    assert "left out 1 tie" in export.stderr



# The human-feedback loop on the toy task of tests/feedback_toy.py: the original preferences only prefer
# two-word answers (random words), the labeller prefers friendly words. Two runs of the same manifest side
# by side: one with a round after PPO step ROUND_STEP of PPO_STEPS, one without spec.humanFeedback.
FEEDBACK_EXAMPLE = REPO / "examples" / "tiny-feedback.yaml"
FORMAT_PREFERENCES = "pvc://datasets/format-preferences.jsonl"
ROUND_STEP, PPO_STEPS = 15, 30   # one round: everySteps at half the steps opens none at the last step
ROUND_PROMPTS, RESPONSES = 64, 3  # every training prompt (96 minus the 32 held out), 3 pairs each: 192 pairs
LABELS_NEEDED = 100               # of ~110 pairs that are not ties (the SFT model says a friendly word ~3 in 10)
BROWSER_LABELS = 4                # pairs alice labels with the keyboard; the rest through the HTTP API


def feedback_manifest(name, *, rounds):
    """examples/tiny-feedback.yaml on the toy task, in namespace A; without spec.humanFeedback unless rounds."""
    (run,) = [d for d in yaml.safe_load_all(FEEDBACK_EXAMPLE.read_text()) if d and d.get("kind") == "FineTuneRun"]
    run["metadata"] = {"name": name, "namespace": TEAM_A}
    spec = run["spec"]
    spec["data"]["preferences"] = FORMAT_PREFERENCES
    del spec["stages"]["reward"]["functions"]  # what the policy learns of the criterion comes from the labels alone
    spec["stages"]["ppo"]["steps"] = PPO_STEPS
    spec["resources"]["cpu"] = "900m"  # both runs' pods fit on the 2-core node beside the operator and console
    if rounds:
        spec["humanFeedback"].update(everySteps=ROUND_STEP, prompts=ROUND_PROMPTS, responsesPerPrompt=RESPONSES,
                                     labelsNeeded=LABELS_NEEDED, heldOutShare=0.3, includeSft=True)
    else:
        del spec["humanFeedback"]
    return run


@pytest.fixture(scope="module")
def feedback_runs(kube_cluster, release):
    """(with the round, without it): both applied at once, so the second trains while the first waits for labels."""
    runs = [feedback_manifest("tiny-feedback", rounds=True), feedback_manifest("tiny-feedback-none", rounds=False)]
    claims = [d["metadata"]["name"] for d in yaml.safe_load_all(STORAGE.read_text()) if d]
    pvc_root = [kube_cluster.pvc_dir(TEAM_A, claim) for claim in claims][0].parent  # each claim's PVC
    example = example_run(TEAM_A)["spec"]  # the demo's model, SFT data and prompts
    demo_assets.write_for_run(example, pvc_root=pvc_root, log=lambda line: None)
    demo_assets.write_jsonl(demo_assets.pvc_path(FORMAT_PREFERENCES, pvc_root), format_preferences(
        words=demo_assets.WORDS, prompts=demo_assets.prompts(), count=demo_assets.PREFERENCE_ROWS))
    for run in runs:
        wait_for(f"{run['metadata']['name']} to be admitted", lambda run=run: kube_cluster.kubectl(
            "apply", "-f", "-", input=yaml.safe_dump(run), check=False).returncode == 0, timeout_seconds=180)
    return tuple(run["metadata"]["name"] for run in runs)


def post_label(url, token, *, run, round_, pair, choice):
    """One label exactly as the labelling page's script sends it (POST /api/labels)."""
    body = json.dumps({"namespace": TEAM_A, "run": run, "round": round_, "prompt": pair["prompt"],
                       "responses": pair["responses"], "choice": choice}).encode()
    status, answer = get(url, "/api/labels", token, method="POST", body=body,
                         headers={"Content-Type": "application/json", "X-Requested-With": "ftconsole"})
    assert status == 201, answer


def final_policy_share(kube_cluster, name):
    """The criterion's score of the run's held-out responses at the last PPO step (from its history)."""
    samples = [s for s in history_document(kube_cluster, name)["samples"] if s["stage"] == "ppo"]
    last = max(s["step"] for s in samples)
    assert last == PPO_STEPS, f"{name}: last samples at step {last}"
    return friendly_share(s["response"] for s in samples if s["step"] == last)


def test_a_feedback_round_labelled_in_the_browser_and_through_the_api_teaches_the_reward_model_and_policy(
        kube_cluster, users, feedback_runs, console_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    name, baseline = feedback_runs
    status = wait_for(f"{name} to wait for feedback",
                      lambda: (s := run_status(kube_cluster, TEAM_A, name)).get("state") in (
                          "AwaitingFeedback", "Succeeded", "Failed") and s,
                      timeout_seconds=1200, diagnose=lambda: yaml.safe_dump(run_status(kube_cluster, TEAM_A, name)))
    assert status["state"] == "AwaitingFeedback", yaml.safe_dump(status)
    (opened,) = status["feedbackRounds"]
    assert opened["round"] == 1 and opened["step"] == ROUND_STEP and opened["needed"] == LABELS_NEEDED
    assert opened["candidates"] == ROUND_PROMPTS * RESPONSES * (RESPONSES - 1) // 2
    assert f"round 1: 0/{LABELS_NEEDED} labels" in status["message"]
    waited = time.monotonic() - started
    candidates = json.loads(json.loads(kube_cluster.kubectl(
        "get", "configmap", f"{name}-feedback-1", "-n", TEAM_A, "-o", "json").stdout)["data"]["candidates.json"])
    pairs = candidates["pairs"]
    choices = [friendly_choice(*(r["text"] for r in pair["responses"])) for pair in pairs]

    # alice opens the round from the runs page and labels the first pairs with the keyboard.
    wait = WebDriverWait(browser, 30)
    log_in(browser, console_url, users["alice"], wait)
    assert f"0/{LABELS_NEEDED} labels" in browser.find_element(By.ID, "runs").text
    screenshot(browser, "console-runs.png", height=500)
    browser.find_element(By.CSS_SELECTOR, f"a.feedback-count[href*='/{name}/']").click()
    wait.until(lambda d: d.find_elements(By.ID, "feedback-round"))
    sources = {c.get_attribute("data-source") for c in browser.find_elements(By.CSS_SELECTOR, ".candidate")}
    assert sources == {"sft", f"ppo@{ROUND_STEP}"}, sources  # includeSft: one response of each prompt from SFT
    shown = [[browser.execute_script("return arguments[0].textContent", r)
              for r in pair.find_elements(By.CSS_SELECTOR, ".response")]
             for pair in browser.find_elements(By.CSS_SELECTOR, "section.pair")[:BROWSER_LABELS]]
    assert shown == [[r["text"] for r in pair["responses"]] for pair in pairs[:BROWSER_LABELS]], "the ConfigMap's order"
    screenshot(browser, "console-round.png", height=900)
    # Pairs with an empty response (the model said EOS at once) are labelled like any other: "" is a value.
    empty = sum(not all(r["text"] for r in pair["responses"]) for pair in pairs)
    body = browser.find_element(By.TAG_NAME, "body")
    decisive = posted = 0
    for index in range(BROWSER_LABELS):
        body.send_keys({"a": "1", "b": "2", "tie": "t"}[choices[index]])
        decisive, posted = decisive + (choices[index] != "tie"), posted + 1
        wait.until(lambda d, n=posted: f"{n} labels so far" in d.find_element(By.ID, "label-progress").text)

    # The rest through the same endpoint with alice's token, until the round has what it needs (ties do not count).
    for pair, choice in zip(pairs[BROWSER_LABELS:], choices[BROWSER_LABELS:]):
        if decisive == LABELS_NEEDED:
            break
        post_label(console_url, users["alice"], run=name, round_=1, pair=pair, choice=choice)
        decisive, posted = decisive + (choice != "tie"), posted + 1
    if decisive < LABELS_NEEDED:  # fewer A-or-B pairs than hoped: lower labelsNeeded, as a user may while it waits
        kube_cluster.kubectl("patch", "finetunerun", name, "-n", TEAM_A, "--type=merge", "-p",
                             json.dumps({"spec": {"humanFeedback": {"labelsNeeded": decisive}}}))
    labels = [item["spec"] for item in labels_in(kube_cluster, TEAM_A) if item["spec"]["run"] == name]
    assert len(labels) == posted and {label["round"] for label in labels} == {1}
    assert {label["labeller"] for label in labels} == {f"system:serviceaccount:{TEAM_A}:alice"}

    finished = {}
    for run in (name, baseline):
        finished[run] = wait_for(
            f"{run} to finish", lambda run=run: (s := run_status(kube_cluster, TEAM_A, run)).get("state") in (
                "Succeeded", "Failed") and s,
            timeout_seconds=1200, diagnose=lambda run=run: yaml.safe_dump(run_status(kube_cluster, TEAM_A, run)))
        assert finished[run]["state"] == "Succeeded", yaml.safe_dump(finished[run])
    done = finished[name]
    (closed,) = done["feedbackRounds"]
    before, after = closed["heldOutAccuracyBefore"], closed["heldOutAccuracy"]
    with_round, without = final_policy_share(kube_cluster, name), final_policy_share(kube_cluster, baseline)
    print(f"feedback run: {waited:.0f}s to AwaitingFeedback, {time.monotonic() - started:.0f}s until both runs "
          f"Succeeded; {posted} labels ({decisive} A or B, the first of {BROWSER_LABELS} pairs in the browser, "
          f"{empty} of {len(pairs)} pairs with an empty response); held-out human-label "
          f"accuracy {before:.3f} -> {after:.3f}; friendly-word share of the held-out responses at step {PPO_STEPS}: "
          f"{with_round:.3f} with the round, {without:.3f} without")
    assert closed["state"] == "Done" and closed["labels"] == decisive and closed["rewardAttempt"] == 2
    assert done["stages"]["ppo"]["attempts"] == 2 and done["stages"]["ppo"]["failures"] == 0
    assert not finished[baseline].get("feedbackRounds") and finished[baseline]["stages"]["ppo"]["attempts"] == 1
    reasons = kube_cluster.kubectl("get", "events", "-n", TEAM_A, "--field-selector",
                                   f"involvedObject.name={name}", "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert {"FeedbackRoundOpened", "FeedbackRoundRetraining", "FeedbackRoundClosed"} <= set(reasons)
    assert after >= before + 0.05  # 2 of the 31 held-out pairs; measured +3 and +5 (retraining varies by run)
    assert with_round >= without + 0.2
