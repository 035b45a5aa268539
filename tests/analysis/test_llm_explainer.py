"""`ChatExplainer` against a local OpenAI-compatible server, and resumable labelling (`skip_labeled`). No model is
loaded: the analysis database is written by hand and the "language model" is a tiny HTTP server in a thread."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from featurelens.analysis import ChatExplainer, ExplainerError
from featurelens.analysis.explain import evidence_from_store, explain_store
from featurelens.cli import main
from featurelens.errors import FeaturelensError, InputError
from featurelens.store import DB_FILE, FeatureStore

WORDS = [" apple", " river", " violin", " comet", " tulip", " granite"]  # what feature i fires on
FILLER = [" the", " of", " and", "."]
N = len(WORDS)


def _vocab() -> dict[str, int]:
    names = FILLER + WORDS + [f" quant{i}" for i in range(N)] + [f" promo{i}" for i in range(N)] + \
        [f" supp{i}" for i in range(N)]
    return {s: k for k, s in enumerate(names)}


VOCAB = _vocab()


def _label_for(i: int) -> str:
    return f"{WORDS[i].strip()} words"


@pytest.fixture
def adir(tmp_path):
    """An analysis directory with N features: 3 top examples each (the max on WORDS[i]), 2 quantile examples
    (on " quant<i>"), a logit lens promoting " promo<i>" and suppressing " supp<i>"."""
    d = tmp_path / "analysis"
    v = VOCAB
    with FeatureStore(d / DB_FILE, create=True) as store, store.transaction():
        store.set("status", "complete")
        store.set("dictionary", {"d_sae": N, "hook_name": "blocks.0.hook_resid_post", "model_name": "tiny"})
        store.write_tokens((k, s) for s, k in v.items())
        store.write_features({"idx": i, "n_fires": 10 + i, "density": 0.001 * (i + 1), "max_act": 5.0 + i,
                              "mean_act": 1.0, "hist": None, "logit_up": [[v[f" promo{i}"], 2.5], [v[" the"], 1.0]],
                              "logit_down": [[v[f" supp{i}"], -2.0]], "similar": [], "cofire": []}
                             for i in range(N))
        rows = []
        for i in range(N):
            for r in range(3):
                toks = [v[" the"], v[" of"], v[WORDS[i]], v["."]]
                acts = [0.0, 0.5, 5.0 + i - r, 0.0]
                rows.append({"feature": i, "kind": "top", "rank": r, "bin": 0, "ctx": 100 * i + r, "pos": 12,
                             "start": 10, "act": acts[2], "tokens": toks, "acts": acts})
            for r in range(2):
                toks = [v[" and"], v[f" quant{i}"], v[" the"]]
                acts = [0.0, 0.5 + r, 0.0]
                rows.append({"feature": i, "kind": "quantile", "rank": r, "bin": r, "ctx": 100 * i + 50 + r,
                             "pos": 21, "start": 20, "act": acts[1], "tokens": toks, "acts": acts})
        store.write_examples(rows)
    return d


def _open(adir) -> FeatureStore:
    return FeatureStore(adir / DB_FILE)


def _llm_labels(store: FeatureStore, provenance: str) -> dict[int, str]:
    return {f: lab for f, lab in store.conn.execute("SELECT feature, label FROM labels WHERE provenance = ?",
                                                    (provenance,))}


# ----------------------------------------------------------------------------------------------- the fake server
class FakeLLM:
    """What the server does (mode, fail_after) and what it saw (requests per feature, headers)."""

    def __init__(self):
        self.mode = "good"
        self.fail_after: int | None = None
        self.lock = threading.Lock()
        self.total = 0
        self.per_feature: Counter[int] = Counter()
        self.auth: list[str | None] = []
        self.prompts: dict[int, str] = {}

    def reset_counts(self):
        with self.lock:
            self.total = 0
            self.per_feature = Counter()


def _make_handler(state: FakeLLM):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json"):
            try:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timed out)
                pass

        def _reply(self, content):
            self._send(200, json.dumps({"id": "x", "object": "chat.completion",
                                        "choices": [{"index": 0, "message": {"role": "assistant",
                                                                             "content": content}}]}).encode())

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self._send(404, b'{"error": "no such route"}')
                return
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = next(m["content"] for m in req["messages"] if m["role"] == "user")
            feature = int(re.search(r"Feature (\d+):", user).group(1))
            with state.lock:
                state.total += 1
                state.per_feature[feature] += 1
                n_total, n_this = state.total, state.per_feature[feature]
                state.auth.append(self.headers.get("Authorization"))
                state.prompts[feature] = user
            mode = state.mode
            if state.fail_after is not None and n_total > state.fail_after:
                mode = "500"
            if mode == "flaky":
                mode = "503" if n_this == 1 else "good"
            if mode == "slow":
                time.sleep(1.0)
                mode = "good"
            if mode in ("500", "503"):
                self._send(int(mode), b"internal boom: the model crashed", "text/plain")
            elif mode == "notjson":
                self._send(200, b"<html>502 gateway sorry</html>", "text/html")
            elif mode == "nochoices":
                self._send(200, json.dumps({"error": {"message": "model not loaded"}}).encode())
            elif mode == "empty":
                self._reply("  \n  ")
            elif mode == "long":
                self._reply("word " * 100)
            else:  # good: the most frequent marked token, as a model would answer, with noise to clean off
                marked = Counter(t.strip() for t in re.findall(r"<<(.*?)>>", user))
                self._reply(f'Label: "{marked.most_common(1)[0][0]} words"\n\nThe feature fires on ...')

    return Handler


@pytest.fixture
def llm():
    state = FakeLLM()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    state.url = state.base_url + "/chat/completions"
    yield state
    server.shutdown()
    server.server_close()


def _explainer(llm, **kw) -> ChatExplainer:
    kw.setdefault("timeout", 2.0)
    ex = ChatExplainer(llm.base_url, "tiny-llm", **kw)
    ex.retry_backoff = 0.01
    return ex


# ----------------------------------------------------------------------------------------------- tests
def test_labels_land_on_the_right_features(adir, llm):
    ex = _explainer(llm, api_key="sekret", concurrency=3)
    assert ex.provenance == "llm:tiny-llm"
    with _open(adir) as store:
        assert explain_store(store, ex, batch=4, progress=False) == N
        assert _llm_labels(store, "llm:tiny-llm") == {i: _label_for(i) for i in range(N)}
        assert store.labels(2)[0] == {**store.labels(2)[0], "provenance": "llm:tiny-llm", "label": "violin words"}
    assert llm.per_feature == Counter({i: 1 for i in range(N)})
    assert set(llm.auth) == {"Bearer sekret"}
    # explain() is explain_batch([ev])[0]
    with _open(adir) as store:
        ev = evidence_from_store(store)[4]
    assert ex.explain(ev) == "tulip words"


def test_prompt_holds_all_the_evidence(adir, llm):
    with _open(adir) as store:
        evs = evidence_from_store(store)
    assert [len(ev.top_examples) for ev in evs] == [3] * N
    assert [len(ev.quantile_examples) for ev in evs] == [2] * N
    ev = evs[2]
    assert ev.quantile_examples[0].token == " quant2" and ev.top_examples[0].token == " violin"
    msgs = _explainer(llm).prompt(ev)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert user.count("<< violin>>") == 3  # every top example, its max token marked
    assert "<< quant2>>" in user and "activation range" in user  # quantile examples
    assert '" promo2"' in user and '" supp2"' in user  # logit lens, both ways
    assert "0.3% of tokens" in user and "[7]" in user  # density, and the top activation
    assert "8 words" in msgs[0]["content"] + user
    assert "Feature 2:" in user


def test_timeout_names_the_endpoint_and_stores_nothing(adir, llm):
    llm.mode = "slow"
    ex = _explainer(llm, timeout=0.3, max_retries=1, concurrency=4)
    t0 = time.perf_counter()
    with _open(adir) as store:
        with pytest.raises(ExplainerError) as info:
            explain_store(store, ex, batch=64, progress=False)
        assert _llm_labels(store, "llm:tiny-llm") == {}
    assert time.perf_counter() - t0 < 3.0
    msg = str(info.value)
    assert "timed out after 0.3s" in msg and llm.url in msg and "(2 attempts)" in msg
    assert isinstance(info.value, FeaturelensError) and info.value.url == llm.url
    assert max(llm.per_feature.values()) == 2  # retried once, no more


@pytest.mark.parametrize("mode, expected, requests", [
    ("notjson", "response was not JSON: '<html>502 gateway sorry</html>'", 1),
    ("nochoices", "response has no choices[0].message.content", 1),
    ("empty", "empty label", 1),
    ("long", "unusable label (499 characters", 1),
    ("500", "HTTP 500", 2),  # a 5xx is retried
])
def test_nonsense_is_an_error_naming_the_problem(adir, llm, mode, expected, requests):
    llm.mode = mode
    ex = _explainer(llm, concurrency=1, max_retries=1)
    with _open(adir) as store:
        with pytest.raises(ExplainerError) as info:
            explain_store(store, ex, batch=3, progress=False)
        assert _llm_labels(store, "llm:tiny-llm") == {}
    msg = str(info.value)
    assert expected in msg and llm.url in msg and "feature 0" in msg
    if mode == "500":
        assert "internal boom" in msg
    # one at a time: the first feature failed, the rest were never asked
    assert llm.per_feature == Counter({0: requests})


def test_a_flaky_server_is_retried(adir, llm):
    llm.mode = "flaky"  # 503 on each feature's first request
    with _open(adir) as store:
        assert explain_store(store, _explainer(llm, max_retries=1), progress=False) == N
        assert _llm_labels(store, "llm:tiny-llm") == {i: _label_for(i) for i in range(N)}
    assert llm.per_feature == Counter({i: 2 for i in range(N)})


def test_failure_midway_keeps_earlier_batches_and_a_rerun_resumes(adir, llm):
    llm.fail_after = 4  # batches of 2: [0, 1] and [2, 3] succeed, [4, 5] fails
    ex = _explainer(llm, concurrency=2, max_retries=0)
    with _open(adir) as store:
        with pytest.raises(ExplainerError, match="HTTP 500"):
            explain_store(store, ex, batch=2, progress=False)
        assert _llm_labels(store, "llm:tiny-llm") == {i: _label_for(i) for i in range(4)}
        llm.fail_after = None
        llm.reset_counts()
        assert explain_store(store, ex, batch=2, progress=False, skip_labeled=True) == 2
        assert llm.per_feature == Counter({4: 1, 5: 1})  # only the rest was asked
        assert _llm_labels(store, "llm:tiny-llm") == {i: _label_for(i) for i in range(N)}
        # a resumed run with nothing left asks nothing; the default still labels everything again
        llm.reset_counts()
        assert explain_store(store, ex, progress=False, skip_labeled=True) == 0 and llm.total == 0
        assert explain_store(store, ex, features=[1, 3], progress=False) == 2
        assert llm.per_feature == Counter({1: 1, 3: 1})


@pytest.mark.parametrize("args, kwargs, match", [
    (("127.0.0.1:8080/v1", "m"), {}, "http:// or https://"),
    (("ftp://host/v1", "m"), {}, "http:// or https://"),
    (("http://", "m"), {}, "http:// or https://"),
    (("http://h/v1", ""), {}, "model"),
    (("http://h/v1", "m"), {"timeout": 0}, "timeout must be a positive number"),
    (("http://h/v1", "m"), {"timeout": -1.0}, "timeout"),
    (("http://h/v1", "m"), {"concurrency": 0}, "concurrency must be a positive integer"),
    (("http://h/v1", "m"), {"concurrency": 2.5}, "concurrency"),
    (("http://h/v1", "m"), {"max_retries": -1}, "max_retries"),
    (("http://h/v1", "m"), {"max_tokens": 0}, "max_tokens"),
    (("http://h/v1", "m"), {"n_examples": 0}, "n_examples"),
    (("http://h/v1", "m"), {"temperature": -0.5}, "temperature"),
    (("http://h/v1", "m"), {"api_key": ""}, "api_key"),
])
def test_bad_arguments_are_input_errors(args, kwargs, match):
    with pytest.raises(InputError, match=re.escape(match)):
        ChatExplainer(*args, **kwargs)


def test_endpoint_url():
    assert ChatExplainer("http://h:8080/v1/", "m").url == "http://h:8080/v1/chat/completions"
    assert ChatExplainer("https://api.example.com/v1", "gpt-x").provenance == "llm:gpt-x"


def test_cli_explain_with_a_language_model(adir, llm, monkeypatch, capsys):
    monkeypatch.setenv("FEATURELENS_NO_EMBEDDINGS", "1")  # scoring the labels stays lexical: no model loads
    monkeypatch.setenv("OPENAI_API_KEY", "k-cli")
    base = ["explain", str(adir), "--llm-url", llm.base_url, "--llm-model", "cli-llm", "--timeout", "2"]
    assert main(base + ["--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "labelled 6 features with llm:cli-llm" in out
    with _open(adir) as store:
        assert _llm_labels(store, "llm:cli-llm") == {i: _label_for(i) for i in range(N)}
        assert store.labels(5)[0]["label"] == "granite words"
    assert set(llm.auth) == {"Bearer k-cli"}
    # again: everything is done, nothing is asked
    llm.reset_counts()
    assert main(base) == 0
    assert "nothing to do" in capsys.readouterr().out and llm.total == 0
    # --overwrite on a subset
    assert main(base + ["--features", "1,2", "--overwrite"]) == 0
    assert "labelled 2 features" in capsys.readouterr().out
    assert llm.per_feature == Counter({1: 1, 2: 1})
    # a subset on resume: one label removed, one asked for
    with _open(adir) as store:
        store.set_label(3, None, "llm:cli-llm")
    llm.reset_counts()
    assert main(base + ["--features", "3,4"]) == 0
    assert "labelled 1 features" in (out := capsys.readouterr().out) and "1 already had a label" in out
    assert llm.per_feature == Counter({3: 1})


def test_cli_explain_reports_a_failing_endpoint(adir, llm, monkeypatch, capsys):
    monkeypatch.setenv("FEATURELENS_NO_EMBEDDINGS", "1")
    llm.mode = "slow"
    argv = ["explain", str(adir), "--llm-url", llm.base_url, "--llm-model", "cli-llm", "--timeout", "0.3",
            "--retries", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "featurelens: error:" in err and "timed out after 0.3s" in err and llm.url in err
    assert "Traceback" not in err and "0 features were labelled before the failure" in err
    with _open(adir) as store:
        assert _llm_labels(store, "llm:cli-llm") == {}


@pytest.mark.parametrize("extra, match", [
    (["--llm-url", "http://127.0.0.1:9/v1"], "--llm-url and --llm-model together"),
    (["--timeout", "3"], "--timeout apply only with --llm-url"),
    (["--llm-url", "localhost:8080", "--llm-model", "m"], "http:// or https://"),
    (["--llm-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--api-key-env", "FL_TEST_NO_SUCH_VAR"],
     "FL_TEST_NO_SUCH_VAR"),
    (["--features", "1,99"], "feature 99 is out of range"),
    (["--batch", "0"], "--batch must be positive"),
])
def test_cli_explain_argument_errors(adir, capsys, monkeypatch, extra, match):
    monkeypatch.delenv("FL_TEST_NO_SUCH_VAR", raising=False)
    assert main(["explain", str(adir)] + extra) == 2
    err = capsys.readouterr().err
    assert "featurelens: error:" in err and match in err


def test_nothing_listening_is_a_connection_error(adir):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ex = ChatExplainer(f"http://127.0.0.1:{port}/v1", "m", timeout=1.0, max_retries=1)
    ex.retry_backoff = 0.01
    with _open(adir) as store, pytest.raises(ExplainerError) as info:
        explain_store(store, ex, progress=False)
    msg = str(info.value)
    assert "could not connect" in msg and f"127.0.0.1:{port}/v1/chat/completions" in msg and "(2 attempts)" in msg
