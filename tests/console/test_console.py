"""The console's rules, through Console.handle against a fake cluster (tests/console/fakes.py):
who is let in (TokenReview), what each may see and write (SubjectAccessReview), and that model
text is rendered as text."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer

import pytest
from fakes import FakeKube, history_data, run_object

from ftconsole import authz, pages
from ftconsole.history import Series, candidate_pairs, parse_history
from ftconsole.server import Console, handler_class

ALICE = {"Authorization": "Bearer alice-token"}
SCRIPT = "<script>alert('owned')</script>"
NOW = datetime(2026, 12, 1, 16, 0, 0, tzinfo=timezone.utc)


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def kube():
    kube = FakeKube()
    kube.runs = [run_object("team-a", "demo"), run_object("team-a", "other"), run_object("team-b", "secret")]
    samples = [{"stage": "ppo", "step": 5, "prompt": "Say hi", "response": "hello", "reward": 0.1, "kl": 0.0},
               {"stage": "ppo", "step": 20, "prompt": "Say hi", "response": SCRIPT, "reward": 0.9, "kl": 0.2}]
    kube.config_maps[("team-a", "demo-history")] = history_data(samples=samples)
    return kube


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def console(kube, clock):
    return Console(kube=kube, clock=clock, wall_clock=lambda: NOW)


def label_body(**overrides):
    body = {"namespace": "team-a", "run": "demo", "prompt": "Say hi",
            "responses": [{"text": "hello", "source": "ppo@5"}, {"text": SCRIPT, "source": "ppo@20"}],
            "choice": "a", **overrides}
    return json.dumps(body).encode()


POST_HEADERS = {**ALICE, "Content-Type": "application/json", "X-Requested-With": "ftconsole"}


def test_without_a_token_pages_send_to_login_and_fragments_answer_401(console):
    page = console.handle("GET", "/", {})
    assert page.status == 303 and page.headers["Location"] == "/login"
    assert console.handle("GET", "/fragment/runs", {}).status == 401
    assert console.handle("GET", "/fragment/runs", {"Authorization": "Bearer forged"}).status == 401
    assert console.handle("POST", "/api/labels", {**POST_HEADERS, "Authorization": "Bearer forged"},
                          label_body()).status == 401


def test_runs_page_lists_only_namespaces_the_user_may_list(console, kube):
    kube.allow("alice", "list", "finetuneruns", "team-a")
    page = console.handle("GET", "/", ALICE)
    assert page.status == 200
    assert "demo" in page.text and "other" in page.text
    assert "secret" not in page.text and "team-b" not in page.text
    assert "1 namespace(s) with runs you may not list" in page.text
    bob = console.handle("GET", "/", {"Authorization": "Bearer bob-token"})
    assert "No runs you may read." in bob.text and "demo" not in bob.text


def test_one_cluster_wide_review_suffices_for_a_cluster_reader(console, kube):
    kube.allow("alice", "list", "finetuneruns", "*")
    page = console.handle("GET", "/", ALICE)
    assert "secret" in page.text
    assert [r for r in kube.reviews if r[1] == "list"] == [("alice", "list", "finetuneruns", "", None)]


def test_a_run_in_a_namespace_the_user_may_not_read_is_403(console, kube):
    kube.allow("alice", "get", "finetuneruns", "team-a")
    assert console.handle("GET", "/runs/team-b/secret", ALICE).status == 403
    assert console.handle("GET", "/runs/team-b/secret/fragment", ALICE).status == 403
    assert console.handle("GET", "/runs/team-a/demo", ALICE).status == 200
    assert console.handle("GET", "/runs/team-a/missing", ALICE).status == 404


def test_run_page_shows_timeline_plots_and_samples_with_model_text_escaped(console, kube):
    kube.allow("alice", "get", "finetuneruns", "team-a")
    kube.runs[0]["status"]["stages"]["ppo"]["message"] = f"trainer said {SCRIPT}"
    page = console.handle("GET", "/runs/team-a/demo", ALICE).text
    assert "<script>alert" not in page, "model text must never become markup"
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in page
    assert 'data-metric="kl"' in page and 'data-metric="score_mean"' in page
    assert "PodFailed" in page and "attempts 2" in page and "started at step 0" in page
    assert page.count('class="sample"') == 2


def test_labelling_needs_create_permission_and_records_who_and_when(console, kube, clock):
    kube.allow("alice", "get", "finetuneruns", "team-a")
    denied = console.handle("POST", "/api/labels", POST_HEADERS, label_body())
    assert denied.status == 403 and "create preferencelabels" in json.loads(denied.body)["error"]
    assert kube.labels == [], "no write without the permission"
    kube.allow("alice", "create", "preferencelabels", "team-a")
    clock.now += 11  # past the review cache
    created = console.handle("POST", "/api/labels", POST_HEADERS, label_body(labeller="mallory"))
    assert created.status == 201
    (label,) = kube.labels
    assert label["spec"]["labeller"] == "alice", "who labelled comes from TokenReview, not the request"
    assert label["spec"]["labelledAt"] == "2026-12-01T16:00:00Z" and label["spec"]["choice"] == "a"
    again = console.handle("POST", "/api/labels", POST_HEADERS, label_body(choice="b"))
    assert again.status == 201 and len(kube.labels) == 2, "the same pair labelled twice keeps both"


def test_label_writes_need_the_console_header_and_a_valid_choice(console, kube):
    kube.allow("alice", "get", "finetuneruns", "team-a")
    kube.allow("alice", "create", "preferencelabels", "team-a")
    forged = console.handle("POST", "/api/labels", {**ALICE, "Content-Type": "application/x-www-form-urlencoded"},
                            label_body())
    assert forged.status == 403
    assert console.handle("POST", "/api/labels", POST_HEADERS, label_body(choice="maybe")).status == 400
    assert kube.labels == []


def test_a_label_the_api_server_refuses_comes_back_as_json_with_its_message(console, kube, monkeypatch):
    from kubernetes.client.exceptions import ApiException

    kube.allow("alice", "get", "finetuneruns", "team-a")
    kube.allow("alice", "create", "preferencelabels", "team-a")

    def refuse(obj):
        refusal = ApiException(status=422, reason="Unprocessable Entity")
        refusal.body = json.dumps({"kind": "Status", "message": "PreferenceLabel.finetune.dev is invalid: "
                                   "spec.responses.text: Invalid value"})
        raise refusal

    monkeypatch.setattr(kube, "create_label", refuse)
    answer = console.handle("POST", "/api/labels", POST_HEADERS, label_body())
    assert answer.status == 422 and answer.content_type.startswith("application/json")
    assert json.loads(answer.body)["error"] == ("the API server did not store the label: PreferenceLabel.finetune.dev "
                                                "is invalid: spec.responses.text: Invalid value")


def test_label_page_offers_each_prompts_earliest_and_latest_answers(console, kube, clock):
    kube.allow("alice", "get", "finetuneruns", "team-a")
    assert console.handle("GET", "/runs/team-a/demo/label", ALICE).status == 403, "needs list preferencelabels"
    kube.allow("alice", "list", "preferencelabels", "team-a")
    clock.now += 11  # past the review cache
    page = console.handle("GET", "/runs/team-a/demo/label", ALICE).text
    assert page.count('class="pair"') == 1 and "&lt;script&gt;" in page and "<script>alert" not in page


def test_reviews_are_cached_briefly(console, kube, clock):
    kube.allow("alice", "get", "finetuneruns", "team-a")
    console.handle("GET", "/runs/team-a/demo/fragment", ALICE)
    console.handle("GET", "/runs/team-a/demo/fragment", ALICE)
    assert len(kube.reviews) == 1
    kube.rules.clear()
    clock.now += 11
    assert console.handle("GET", "/runs/team-a/demo/fragment", ALICE).status == 403, "revocation takes effect"


def test_login_sets_an_http_only_same_site_cookie_that_authenticates(console, kube):
    assert console.handle("POST", "/login", {}, b"token=forged").status == 401
    response = console.handle("POST", "/login", {}, b"token=alice-token")
    cookie = response.headers["Set-Cookie"]
    assert response.status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    kube.allow("alice", "list", "finetuneruns", "*")
    assert console.handle("GET", "/", {"Cookie": "ft_token=alice-token"}).status == 200


def test_http_server_sends_a_policy_without_inline_script(console):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class(console))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/login") as response:
            policy = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/static/console.js") as response:
            assert b"keydown" in response.read()
    finally:
        server.shutdown()


def test_bearer_token_from_header_or_cookie():
    assert authz.bearer_token(authorization="Bearer abc", cookie=None, cookie_name="t") == "abc"
    assert authz.bearer_token(authorization=None, cookie="x=1; t=def", cookie_name="t") == "def"
    assert authz.bearer_token(authorization="Basic zzz", cookie="", cookie_name="t") is None


def test_plot_draws_the_envelope_of_downsampled_points():
    svg = pages.svg_plot(Series("kl", [1, 2, 3], [0.1, 0.2, 0.3], [0.1, 0.0, 0.3], [0.1, 0.9, 0.3]))
    assert "<polygon class=\"band\"" in svg and svg.count("<polyline") == 1
    assert "kl = 0.3" in svg


def test_history_from_a_pod_is_not_trusted():
    assert parse_history({"history.json": "{broken"}).stages == {}
    bad = {"history.json": json.dumps({"stages": {"ppo": {"series": {"kl": [[1, "x"], [2, 0.5], "junk"]}}},
                                       "samples": ["junk", {"prompt": 3, "response": "r", "step": 1}]})}
    history = parse_history(bad)
    assert history.stages["ppo"].series[0].steps == [2]
    assert history.samples == [{"stage": "?", "step": 1, "prompt": "", "response": "r", "reward": None, "kl": None}]
    pairs = candidate_pairs([{"stage": "ppo", "step": 1, "prompt": "p", "response": "x"},
                             {"stage": "ppo", "step": 9, "prompt": "p", "response": "y"},
                             {"stage": "ppo", "step": 9, "prompt": "q", "response": "same"},
                             {"stage": "ppo", "step": 12, "prompt": "q", "response": "same"}])
    assert len(pairs) == 1 and {pairs[0].a, pairs[0].b} == {"x", "y"}


def test_an_open_feedback_round_is_labelled_from_its_candidates_and_counted(console, kube):
    kube.allow("alice", "get", "finetuneruns", "team-a")
    kube.allow("alice", "list", "preferencelabels", "team-a")
    kube.allow("alice", "create", "preferencelabels", "team-a")
    kube.allow("alice", "list", "finetuneruns", "team-a")
    run = kube.runs[0]
    run["status"]["state"] = "AwaitingFeedback"
    run["status"]["feedbackRounds"] = [{"round": 2, "state": "AwaitingLabels", "stage": "ppo", "attempt": 3,
                                        "labels": 1, "needed": 4, "since": "2026-12-01T15:00:00Z"}]
    candidates = {"round": 2, "stage": "ppo", "step": 40, "pairs": [
        {"prompt": "Name a pet", "responses": [{"text": "cats", "source": "ppo@40"}, {"text": SCRIPT, "source": "sft"}]},
        {"prompt": "Greet", "responses": [{"text": "hi", "source": "ppo@40"}, {"text": "yo", "source": "ppo@40"}]},
        {"prompt": "broken", "responses": [{"text": "only one"}]}]}
    kube.config_maps[("team-a", "demo-feedback-2")] = {"candidates.json": json.dumps(candidates)}
    console.handle("POST", "/api/labels", POST_HEADERS, label_body(round=2))  # one label of the round already

    page = console.handle("GET", "/runs/team-a/demo/label", ALICE).text
    assert page.count('class="pair"') == 2, "the round's candidates, not the sample history's pairs"
    assert "Name a pet" in page and "Say hi" not in page and "<script>alert" not in page
    assert 'data-round="2"' in page and "Human-feedback round 2" in page and ">1/4<" in page
    created = console.handle("POST", "/api/labels", POST_HEADERS, label_body(round=2, prompt="Name a pet"))
    assert created.status == 201 and kube.labels[-1]["metadata"]["labels"]["finetune.dev/round"] == "2"

    runs = console.handle("GET", "/", ALICE).text
    assert "AwaitingFeedback" in runs and "1/4 labels" in runs and 'href="/runs/team-a/demo/label"' in runs

    run["status"]["feedbackRounds"][0]["state"] = "Retraining"  # closed: back to the sample history's pairs
    page = console.handle("GET", "/runs/team-a/demo/label", ALICE).text
    assert "Say hi" in page and 'data-round="0"' in page
