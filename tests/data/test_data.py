"""Corpus sources, packing into contexts, and the activation store (streamed and cached on disk)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import featurelens as fl
from featurelens import paths
from featurelens.data import ActivationStore, CacheMismatchError, CorpusError, ShuffleBuffer, corpus, iter_texts
from featurelens.data.tokens import Packer, load_contexts, split_indices, tokenize
from featurelens.engine.hooks import UnknownHookError
from featurelens.models.gguf import CorruptFileError

L3, L4 = "blocks.3.hook_resid_post", "blocks.4.hook_resid_pre"


@pytest.fixture
def home(tmp_path):
    """A fresh data directory for this test (the session's model was loaded before: session fixtures come first)."""
    before = paths._override
    paths.set_data_dir(tmp_path / "home")
    yield tmp_path / "home"
    paths._override = before


@pytest.fixture(scope="module")
def small_corpus(shared_corpus, tmp_path_factory) -> Path:
    """The first 1,500 sentences of the shared corpus copy."""
    out = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with gzip.open(shared_corpus, "rt", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i == 1500:
                break
            g.write(line)
    return out


@pytest.fixture(scope="module")
def contexts(gemma, small_corpus, tmp_path_factory):
    before = paths._override
    paths.set_data_dir(tmp_path_factory.mktemp("home"))
    try:
        return load_contexts(gemma, small_corpus, ctx_len=32, split="train", progress=False)
    finally:
        paths._override = before


# --------------------------------------------------------------------------------------------- sources
def test_txt_skips_blank_lines(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("first document\n\n   \nsecond one\r\nthird\n", encoding="utf-8")
    assert list(iter_texts(p)) == ["first document", "second one", "third"]


def test_jsonl_plain_gz_and_text_field(tmp_path):
    rows = [{"body": "alpha", "id": 1}, {"body": "beta", "id": 2}]
    plain, gz = tmp_path / "a.jsonl", tmp_path / "a.jsonl.gz"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    assert list(iter_texts(plain, text_field="body")) == ["alpha", "beta"]
    assert list(iter_texts(gz, text_field="body")) == ["alpha", "beta"]
    with pytest.raises(CorpusError, match=r"a\.jsonl: line 1 has no 'text' field"):
        list(iter_texts(plain))


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl: line 3 is not JSON"):
        list(iter_texts(p))
    p.write_text('{"text": "fine"}\n["a list"]\n')
    with pytest.raises(CorpusError, match="line 2 is a JSON list"):
        list(iter_texts(p))
    p.write_text('{"text": 5}\n')
    with pytest.raises(CorpusError, match="not a string"):
        list(iter_texts(p))


def test_empty_missing_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match=r"empty\.txt is empty"):
        list(iter_texts(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n \n")
    with pytest.raises(CorpusError, match=r"blank\.jsonl contains no text"):
        list(iter_texts(blank))
    with pytest.raises(FileNotFoundError, match="no such corpus file"):
        list(iter_texts(tmp_path / "nope.txt"))
    with pytest.raises(CorpusError, match="unknown corpus format"):
        (tmp_path / "x.csv").write_text("a,b\n")
        list(iter_texts(tmp_path / "x.csv"))
    bad_gz = tmp_path / "bad.jsonl.gz"
    bad_gz.write_bytes(b"this is not gzip at all")
    with pytest.raises(CorpusError, match=r"bad\.jsonl\.gz is unreadable"):
        list(iter_texts(bad_gz))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.txt: line 2 is not valid UTF-8"):
        list(iter_texts(latin))
    with pytest.raises(CorpusError, match="is a directory"):
        list(iter_texts(tmp_path))


def test_parquet(tmp_path):
    import pyarrow as pa  # a dependency of featurelens: missing, it must fail, not skip
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["one", "", None, "two"], "n": [1, 2, 3, 4]}), p)
    assert list(iter_texts(p, text_field="content")) == ["one", "two"]
    with pytest.raises(CorpusError, match=r"t\.parquet has no column 'text' \(columns: \['content', 'n'\]\)"):
        list(iter_texts(p))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(CorpusError, match=r"bad\.parquet is not a readable parquet file"):
        list(iter_texts(bad))


def test_hf_source_errors():
    with pytest.raises(CorpusError, match="bad Hugging Face source"):
        corpus.open_source("hf:")
    assert corpus.open_source("hf:user/data::test").hf == ("user/data", None, "test")
    assert corpus.open_source("hf:wikitext:wikitext-2-raw-v1").hf == ("wikitext", "wikitext-2-raw-v1", "train")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(CorpusError, match="pip install datasets"):
            list(iter_texts("hf:wikitext:wikitext-2-raw-v1"))


def test_in_memory_texts():
    assert list(iter_texts(["a", " ", "b"])) == ["a", "b"]
    with pytest.raises(CorpusError, match="contains no text"):
        list(iter_texts(["", "  "]))


# --------------------------------------------------------------------------------------------- the default corpus
def test_extract_npm_tarball_in_numeric_order(tmp_path):
    tgz = tmp_path / "nlp-corpus-4.4.0.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for i, sents in ((0, ["zero a", "zero b"]), (10, ["ten"]), (2, ["two", ""])):
            data = json.dumps(sents).encode()
            info = tarfile.TarInfo(f"package/builds/doc-{i}.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out.jsonl.gz"
    corpus._extract_sentences(tgz, out)
    assert [json.loads(line)["text"] for line in gzip.open(out, "rt")] == ["zero a", "zero b", "two", "ten"]
    tgz.write_bytes(b"garbage")
    with pytest.raises(CorpusError, match="is corrupt"):
        corpus._extract_sentences(tgz, out)


def test_default_corpus_comes_from_the_environment_or_npm(home, shared_corpus, monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "NPM", "featurelens-no-such-npm")  # never the network here
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "from the environment"}\n')
    monkeypatch.setenv(corpus.CORPUS_ENV_VAR, str(mine))
    assert list(iter_texts("nlp-corpus")) == ["from the environment"]
    monkeypatch.setenv(corpus.CORPUS_ENV_VAR, str(shared_corpus))  # what the test session points at
    assert next(iter(iter_texts("nlp-corpus"))).startswith("Creakiness and atmosphere")
    monkeypatch.setenv(corpus.CORPUS_ENV_VAR, str(tmp_path / "absent.jsonl.gz"))
    with pytest.raises(CorpusError, match="FEATURELENS_CORPUS = .*absent.jsonl.gz: no such file"):
        corpus.nlp_corpus_path()
    # unset: the npm package, extracted into the data directory; no npm and nothing extracted is a clear error
    monkeypatch.delenv(corpus.CORPUS_ENV_VAR)
    with pytest.raises(CorpusError, match="could not fetch the default corpus.*FEATURELENS_CORPUS"):
        corpus.nlp_corpus_path()
    assert not (home / "corpora" / corpus.NLP_CORPUS_FILE).exists()
    # once extracted (as npm pack + _extract_sentences leave it), the cached copy is used without npm
    (home / "corpora" / corpus.NLP_CORPUS_FILE).write_bytes(shared_corpus.read_bytes())
    assert corpus.nlp_corpus_path() == home / "corpora" / corpus.NLP_CORPUS_FILE


# --------------------------------------------------------------------------------------------- packing
def _docs(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 60, (n,), generator=g).tolist()
    return [torch.randint(10, 1000, (k,), generator=g).tolist() for k in lens]


@pytest.mark.parametrize("sep", [2, 1, None])
def test_packing_loses_only_the_tail(sep):
    docs, ctx = _docs(), 32
    rows = Packer(ctx, bos_id=2, sep_id=sep).add(docs)
    assert rows.shape[1] == ctx and (rows[:, 0] == 2).all()
    body = rows[:, 1:].reshape(-1).tolist()
    stream = [t for t in body if t != sep] if sep is not None else body
    flat = [t for d in docs for t in d]
    assert stream == flat[: len(stream)]
    assert 0 <= len(flat) - len(stream) < ctx - 1
    assert not (rows[:, 1] == sep).any()  # a separator never opens a row: the BOS already does
    # streaming the documents in pieces gives the same rows
    packer = Packer(ctx, bos_id=2, sep_id=sep)
    pieces = [packer.add(docs[i:i + 37]) for i in range(0, len(docs), 37)]
    assert (torch.from_numpy(np.concatenate(pieces)) == torch.from_numpy(rows)).all()


def test_split_is_disjoint_deterministic_and_five_percent():
    train, test = split_indices(1000, "train"), split_indices(1000, "test")
    assert len(test) == 50 and len(train) == 950
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(1000))
    assert torch.equal(test, split_indices(1000, "test"))
    assert torch.equal(split_indices(1000, "all"), torch.arange(1000))
    assert torch.equal(split_indices(400, "test"), test[test < 400])  # more data never moves old test contexts
    with pytest.raises(ValueError, match="split must be one of"):
        split_indices(10, "validation")


def test_load_contexts_from_a_corpus_slice(gemma, home, small_corpus):
    ctx = 32
    train = load_contexts(gemma, small_corpus, ctx_len=ctx, split="train", progress=False)
    test = load_contexts(gemma, small_corpus, ctx_len=ctx, split="test", progress=False)
    every = load_contexts(gemma, small_corpus, ctx_len=ctx, split="all", progress=False)
    bos = gemma.cfg.bos_token_id
    assert train.dtype == torch.long and train.shape[1] == ctx and (every[:, 0] == bos).all()
    assert len(train) + len(test) == len(every) and len(test) == len(every) // 20
    assert torch.equal(every[split_indices(len(every), "test")], test)
    # every document token is there, in order, up to the tail
    texts = list(iter_texts(small_corpus))
    flat = [t for ids in tokenize(gemma.tokenizer, texts) for doc in ids for t in doc]
    stream = [t for t in every[:, 1:].reshape(-1).tolist() if t != bos]
    assert stream == flat[: len(stream)] and len(flat) - len(stream) < ctx - 1
    # cached: one directory with the file and its meta, nothing temporary left, read back identically
    (d,) = (home / "tokens").iterdir()
    assert d.name.startswith("gemma-3-270m-") and d.name.endswith("-32")
    assert sorted(p.name for p in d.iterdir()) == ["contexts.safetensors", "meta.json"]
    meta = json.loads((d / "meta.json").read_text())
    assert meta["n_texts"] == 1500 and meta["n_contexts"] == len(every)
    assert torch.equal(load_contexts(gemma, small_corpus, ctx_len=ctx, split="train", progress=False), train)
    assert len(load_contexts(gemma, small_corpus, ctx_len=ctx, max_tokens=10 * ctx, progress=False)) == 10
    # a damaged cache file is rebuilt
    (d / "contexts.safetensors").write_bytes(b"broken")
    assert torch.equal(load_contexts(gemma, small_corpus, ctx_len=ctx, split="train", progress=False), train)


def test_load_contexts_errors(gemma, home, tmp_path):
    with pytest.raises(CorpusError, match="too few for one context"):
        load_contexts(gemma, ["just a few words"], ctx_len=128, progress=False)
    with pytest.raises(ValueError, match="split must be one of"):
        load_contexts(gemma, ["some text"], ctx_len=4, split="dev", progress=False)
    rows = load_contexts(gemma, ["one two three four five six seven", "eight nine ten"], ctx_len=4, split="all",
                         progress=False)
    assert rows.shape[1] == 4 and (rows[:, 0] == gemma.cfg.bos_token_id).all()


# --------------------------------------------------------------------------------------------- shuffle buffer
def test_shuffle_buffer_emits_every_row_once_with_columns_aligned():
    buf = ShuffleBuffer(capacity=64, batch_size=16, generator=torch.Generator().manual_seed(0))
    out = []
    for start in range(0, 200, 24):
        x = torch.arange(start, min(start + 24, 200))
        out += list(buf.push({"a": x, "b": x * 10}))
    out += list(buf.flush())
    assert all(len(b["a"]) == 16 for b in out[:-1]) and 0 < len(out[-1]["a"]) <= 16
    a = torch.cat([b["a"] for b in out])
    assert sorted(a.tolist()) == list(range(200)) and a.tolist() != list(range(200))
    assert torch.equal(torch.cat([b["b"] for b in out]), a * 10)
    ordered = ShuffleBuffer(capacity=64, batch_size=16, generator=None)
    got = [b for s in range(0, 100, 30) for b in ordered.push({"a": torch.arange(s, min(s + 30, 100))})]
    got += list(ordered.flush())
    assert torch.cat([b["a"] for b in got]).tolist() == list(range(100))


# --------------------------------------------------------------------------------------------- activation store
def test_store_rows_bos_and_alignment(gemma, contexts):
    c = contexts[:12]
    store = ActivationStore(gemma, [L3, L4], c, batch_size=64, buffer_tokens=128, model_batch_size=6,
                            shuffle=False, return_tokens=True, progress=False)
    assert store.stop_at_layer == 5 and store.d == {L3: 640, L4: 640}
    batches = list(store)
    assert len(batches) == len(store) and all(len(b[L3]) == 64 for b in batches[:-1])
    a, b = torch.cat([x[L3] for x in batches]), torch.cat([x[L4] for x in batches])
    toks = torch.cat([x["tokens"] for x in batches])
    bos = gemma.cfg.bos_token_id
    assert torch.equal(a, b)  # the same token rows across hooks: resid_post of 3 is resid_pre of 4
    assert len(a) == store.n_tokens == int((c != bos).sum()) and not (toks == bos).any()
    assert not a.is_inference() and a.dtype == torch.float32
    _, cache = gemma.run_with_cache(c, names_filter=[L3], stop_at_layer=4)
    ref = cache[L3].reshape(-1, 640)[c.reshape(-1) != bos]
    # model batches of 6 against one of 12: float32 sums in another order. Gemma's residual stream holds entries in
    # the hundreds, so the tolerance is relative to its scale, not to each (possibly tiny) entry.
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(toks, c.reshape(-1)[c.reshape(-1) != bos])
    # shuffled: the same rows, mixed, still aligned across hooks
    mixed = list(ActivationStore(gemma, [L3, L4], c, batch_size=64, buffer_tokens=128, model_batch_size=6,
                                 return_tokens=True, progress=False))
    ma, mb = torch.cat([x[L3] for x in mixed]), torch.cat([x[L4] for x in mixed])
    assert torch.equal(ma, mb) and len(ma) == len(a) and not torch.equal(ma, a)
    torch.testing.assert_close(ma.sum(0), a.sum(0), rtol=1e-4, atol=1e-2)
    # keep_bos: every position, BOS rows with their huge norms
    kept = torch.cat([x[L3] for x in ActivationStore(gemma, L3, c[:2], keep_bos=True, shuffle=False,
                                                      batch_size=64, buffer_tokens=64, progress=False)])
    assert len(kept) == 2 * c.shape[1]
    norms = kept.norm(dim=-1)
    assert norms[0] > 5 * norms[1:c.shape[1]].median()  # about 7x at layer 3


def test_store_stream_and_bad_arguments(gemma, contexts):
    store = ActivationStore(gemma, ("resid_post", 1), contexts[:2], batch_size=50, buffer_tokens=100, progress=False)
    assert store.hooks == ["blocks.1.hook_resid_post"]
    sizes = [len(b["blocks.1.hook_resid_post"]) for b in store.stream(store.n_tokens * 2 + 7)]
    assert sum(sizes) == store.n_tokens * 2 + 7  # runs over epochs, cuts the last batch
    with pytest.raises(UnknownHookError, match="did you mean"):
        ActivationStore(gemma, "blocks.3.hook_resid_psot", contexts[:2])
    with pytest.raises(ValueError, match="not one vector per token"):
        ActivationStore(gemma, "blocks.3.attn.hook_pattern", contexts[:2])
    with pytest.raises(ValueError, match="buffer_tokens"):
        ActivationStore(gemma, L3, contexts[:2], batch_size=100, buffer_tokens=10)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ActivationStore(gemma, L3, contexts[:2], dtype="float8")


def test_disk_cache_resumes_after_interruption(gemma, contexts, tmp_path):
    c, d = contexts[:40], tmp_path / "acts"
    kw = dict(batch_size=64, buffer_tokens=128, model_batch_size=8, shard_tokens=8 * c.shape[1], progress=False)
    reference = [torch.cat(x) for x in zip(*[(b[L3], b[L4]) for b in ActivationStore(gemma, [L3, L4], c, **kw)])]

    first = ActivationStore(gemma, [L3, L4], c, cache_dir=d, **kw)
    for _ in first:  # interrupted: stop once two shards are on disk
        if first.stats["shards_written"] == 2:
            break
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["n_shards"] == 5 and len(manifest["shards"]) == 2 and not manifest["complete"]
    assert manifest["tokens_done"] == sum(s["rows"] for s in manifest["shards"].values())
    # debris of a crash: a half-written temporary file and a shard file the manifest does not list; neither is read
    (d / ".shard-00002.safetensors.tmp-99999").write_bytes(b"half a shard")
    (d / "shard-00003.safetensors").write_bytes(b"not listed in the manifest")

    resumed = ActivationStore(gemma, [L3, L4], c, cache_dir=d, **kw)
    got = [torch.cat(x) for x in zip(*[(b[L3], b[L4]) for b in resumed])]
    assert resumed.stats == {"contexts_computed": 24, "contexts_from_cache": 16, "shards_written": 3, "shards_read": 2}
    assert torch.equal(got[0], got[1]) and len(got[0]) == len(reference[0]) == resumed.n_tokens
    torch.testing.assert_close(got[0].sum(0), reference[0].sum(0), rtol=1e-4, atol=1e-2)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokens_done"] == resumed.n_tokens
    assert not list(d.glob(".*tmp*"))

    # finished: a later run needs no model, and may read a subset of the hooks
    again = ActivationStore.from_cache(d, hooks=[L4], batch_size=64, buffer_tokens=128, progress=False)
    rows = torch.cat([b[L4] for b in again])
    assert again.stats["contexts_computed"] == 0 and again.stats["shards_read"] == 5
    torch.testing.assert_close(rows.sum(0), reference[1].sum(0), rtol=1e-4, atol=1e-2)
    with pytest.raises(CacheMismatchError, match="keep_bos"):
        ActivationStore(gemma, [L3], c, cache_dir=d, keep_bos=True, **kw)
    with pytest.raises(CacheMismatchError, match="other contexts"):
        ActivationStore(gemma, [L3], contexts[:30], cache_dir=d, **kw)
    (d / "shard-00001.safetensors").write_bytes(b"damaged after the fact")
    with pytest.raises(CorruptFileError, match="shard-00001.safetensors is unreadable"):
        list(ActivationStore.from_cache(d, shuffle=False, batch_size=64, buffer_tokens=128, progress=False))


def test_top_level_exports():
    for name in ("ActivationStore", "load_contexts", "iter_texts", "CorpusError"):
        assert hasattr(fl, name) and name in fl.__all__
