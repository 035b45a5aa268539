"""`ChatExplainer`: feature labels from a language model behind any OpenAI-compatible chat endpoint.

A llama.cpp server (``llama-server -m model.gguf`` serves ``http://127.0.0.1:8080/v1``), vLLM, or a hosted API:

>>> import featurelens as fl
>>> ex = fl.ChatExplainer("http://127.0.0.1:8080/v1", "qwen2.5-7b-instruct")
>>> fl.explain("~/sae-l6", ex, skip_labeled=True)     # provenance "llm:qwen2.5-7b-instruct"; rerun to resume

Each feature is one POST to ``<base_url>/chat/completions`` (up to `concurrency` in flight) with a prompt built
from all of its evidence: its top examples (the max token marked ``<<like this>>``) and their activations,
examples across its activation quantiles, the tokens its logit lens promotes and suppresses, and its density.
The reply's first line is the label. Timeouts, connection errors and 5xx answers are retried (`max_retries`);
anything else, or a reply that is no label, raises `ExplainerError` naming the endpoint and the feature, and the
whole batch fails: `explain_store` then stores nothing of it (earlier batches stay stored). Only the standard
library is used.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Sequence

from ..engine.errors import FeaturelensError, InputError
from .explain import Example, Explainer, FeatureEvidence

MAX_LABEL_CHARS = 200
_EXCERPT_CHARS = 200
_BEFORE, _AFTER = 32, 16  # tokens of an example shown around its marked token
_N_TOKENS = 10  # promoted / suppressed tokens shown

SYSTEM_PROMPT = (
    "You are an interpretability researcher naming the features of a sparse autoencoder trained on a language "
    "model's activations. Each feature is a direction that activates on some tokens. From the evidence (text "
    "examples where it activates, with the most strongly activating token marked <<like this>> and the "
    "activation in brackets, weaker examples from lower activation quantiles, the output tokens it promotes and "
    "suppresses, and how often it fires), say what the feature detects. Reply with one short label of at most 8 "
    "words on a single line: no explanation, no quotes, no preamble.")

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_LABEL_PREFIX = re.compile(r"^(feature\s+)?label\s*[:\-–]\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’*"


class ExplainerError(FeaturelensError, RuntimeError):
    """A remote explainer failed: the message names the endpoint, the feature and what went wrong."""

    def __init__(self, url: str, feature: int, problem: str):
        super().__init__(f"{url}: feature {feature}: {problem}")
        self.url, self.feature, self.problem = url, feature, problem


class _Retryable(Exception):
    """A failure worth another try (timeout, connection, 5xx); carries the problem's description."""


def _excerpt(body: bytes | str) -> str:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return repr(text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…")


def _show(s: str) -> str:
    """A token or text on one line: line breaks and tabs written as escapes."""
    return s.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _marked(ex: Example) -> str:
    """The example's text around its key token, that token marked <<like this>>."""
    i = min(max(ex.index, 0), len(ex.tokens) - 1) if ex.tokens else 0
    lo, hi = max(0, i - _BEFORE), min(len(ex.tokens), i + _AFTER + 1)
    before = "".join(ex.tokens[lo:i])
    after = "".join(ex.tokens[i + 1:hi])
    tok = ex.tokens[i] if ex.tokens else ""
    return ("…" if lo > 0 else "") + _show(before) + "<<" + _show(tok) + ">>" + _show(after) + \
        ("…" if hi < len(ex.tokens) else "")


def _token_list(tokens: Sequence[str]) -> str:
    return ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens[:_N_TOKENS] if t != "")


def clean_label(text: str) -> str:
    """The label in a model's reply: its first non-empty line (after any <think> block), without surrounding
    whitespace, quotes or a leading "Label:". Empty when there is none."""
    text = _THINK.sub("", text)
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    prev = None
    while line != prev:
        prev = line
        line = line.strip()
        line = _LABEL_PREFIX.sub("", line)
        if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
            line = line[1:-1]
        elif line[:2] == "**" or line[-2:] == "**":
            line = line.strip("*")
    return line.strip()


class ChatExplainer(Explainer):
    """Labels from an OpenAI-compatible chat endpoint (`base_url` ends before /chat/completions, e.g.
    ``http://127.0.0.1:8080/v1``). The key, when given, is sent as ``Authorization: Bearer <key>``."""

    retry_backoff = 0.5  # seconds before the first retry, doubling with each further one

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 concurrency: int = 4, max_retries: int = 1, temperature: float = 0.0, max_tokens: int = 60,
                 n_examples: int = 10):
        if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url.strip()):
            raise InputError(f"base_url must start with http:// or https:// and name a host, got {base_url!r} "
                             f"(e.g. http://127.0.0.1:8080/v1)")
        if not isinstance(model, str) or not model.strip():
            raise InputError(f"model must be a non-empty name, got {model!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise InputError("api_key must be a non-empty string or None")

        for name, value, integer, zero_ok in (("timeout", timeout, False, False),
                                              ("concurrency", concurrency, True, False),
                                              ("max_retries", max_retries, True, True),
                                              ("temperature", temperature, False, True),
                                              ("max_tokens", max_tokens, True, False),
                                              ("n_examples", n_examples, True, False)):
            ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
            if not ok:
                what = f"{'a non-negative' if zero_ok else 'a positive'} {'integer' if integer else 'number'}"
                raise InputError(f"{name} must be {what}, got {value!r}")
        self.base_url = base_url.strip()
        self.url = self.base_url.rstrip("/") + "/chat/completions"
        self.model = model.strip()
        self.api_key = api_key.strip() if api_key else None
        self.timeout = float(timeout)
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.n_examples = int(n_examples)
        self.provenance = f"llm:{self.model}"

    def __repr__(self) -> str:
        return f"ChatExplainer({self.url!r}, model={self.model!r}, concurrency={self.concurrency})"

    # ----------------------------------------------------------------- prompt
    def prompt(self, ev: FeatureEvidence) -> list[dict[str, str]]:
        """The chat messages (system, user) sent for one feature."""
        lines = [f"Feature {ev.index}: fires on {100 * ev.density:.3g}% of tokens; "
                 f"maximum activation {ev.max_act:.3g}.", ""]
        top = ev.top_examples[: self.n_examples]
        if top:
            lines.append("Top activating examples (strongest first):")
            lines += [f"{k}. [{ex.act:.3g}] {_marked(ex)}" for k, ex in enumerate(top, 1)]
        else:
            lines.append("Top activating examples: none (it never fired on the text read).")
        quant = ev.quantile_examples
        if len(quant) > self.n_examples:  # evenly spaced over the bins (stored lowest bin first)
            step = len(quant) / self.n_examples
            quant = [quant[int(k * step)] for k in range(self.n_examples)]
        if quant:
            lines += ["", "Examples across its activation range (sampled where it fires, strongest first):"]
            lines += [f"- [{ex.act:.3g}] {_marked(ex)}"
                      for ex in sorted(quant, key=lambda e: e.act, reverse=True)]
        if ev.promotes:
            lines += ["", f"Output tokens it promotes most (logit lens): {_token_list(ev.promotes)}"]
        if ev.suppresses:
            lines += [f"Output tokens it suppresses most: {_token_list(ev.suppresses)}"]
        lines += ["", "What does this feature detect? Answer with the label only (at most 8 words, one line)."]
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]

    # ----------------------------------------------------------------- requests
    def _request_once(self, body: bytes, feature: int) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                text = e.read()
            except Exception:  # noqa: BLE001 - the body is only for the message
                text = b""
            problem = f"HTTP {e.code} {e.reason}: {_excerpt(text)}"
            if e.code >= 500:
                raise _Retryable(problem) from None
            raise ExplainerError(self.url, feature, problem) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Retryable(f"timed out after {self.timeout:g}s") from None
            raise _Retryable(f"could not connect ({reason})") from None
        except (socket.timeout, TimeoutError):
            raise _Retryable(f"timed out after {self.timeout:g}s") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"connection failed ({type(e).__name__}: {e})") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ExplainerError(self.url, feature, f"response was not JSON: {_excerpt(raw)}") from None

    def _label(self, ev: FeatureEvidence) -> str:
        body = json.dumps({"model": self.model, "messages": self.prompt(ev), "temperature": self.temperature,
                           "max_tokens": self.max_tokens, "stream": False}).encode("utf-8")
        attempt = 0
        while True:
            try:
                data = self._request_once(body, ev.index)
                break
            except _Retryable as e:
                if attempt >= self.max_retries:
                    tries = f" ({attempt + 1} attempts)" if attempt else ""
                    raise ExplainerError(self.url, ev.index, f"{e}{tries}") from None
                time.sleep(self.retry_backoff * (2 ** attempt))
                attempt += 1
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise ExplainerError(self.url, ev.index,
                                 f"response has no choices[0].message.content: {_excerpt(json.dumps(data))}")
        label = clean_label(content)
        if not label:
            raise ExplainerError(self.url, ev.index, f"empty label in the response: {_excerpt(content)}")
        if len(label) > MAX_LABEL_CHARS:
            raise ExplainerError(self.url, ev.index, f"unusable label ({len(label)} characters, at most "
                                                     f"{MAX_LABEL_CHARS}): {_excerpt(label)}")
        return label

    # ----------------------------------------------------------------- the Explainer interface
    def explain(self, ev: FeatureEvidence) -> str | None:
        return self.explain_batch([ev])[0]

    def explain_batch(self, evs: Sequence[FeatureEvidence]) -> list[str | None]:
        """One request per feature, up to `concurrency` at once; every label of the batch, or ExplainerError
        (the first failure; requests not yet sent are dropped)."""
        evs = list(evs)
        if not evs:
            return []
        if self.concurrency == 1 or len(evs) == 1:
            return [self._label(ev) for ev in evs]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(evs)), thread_name_prefix="featurelens-llm")
        try:
            futures = [pool.submit(self._label, ev) for ev in evs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                raise failed[0].exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
