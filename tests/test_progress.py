"""`on_progress` on the long library calls (train, analyze, attribute): the counts the CLI's bars and the server's
job events show. Oracle: each stage's events count up to its total, the last one says it finished, and a callback
that raises stops the call (how the server cancels a graph job)."""

from __future__ import annotations

import pytest

import featurelens as fl
from featurelens.progress import ProgressBar, ProgressEvent

import builders as web


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data, model = web.shared_data(tmp_path_factory)
    return data, model, web._contexts(model, web.sentences())


def _stages(events: list[ProgressEvent]) -> dict[str, list[ProgressEvent]]:
    out: dict[str, list[ProgressEvent]] = {}
    for e in events:
        out.setdefault(e.stage, []).append(e)
    return out


def _check_stage(evs: list[ProgressEvent], total: float) -> None:
    done = [e.done for e in evs]
    assert done == sorted(done) and done[0] == 0 and len(evs) > 2
    assert evs[-1].finished and not any(e.finished for e in evs[:-1])
    assert evs[-1].done == evs[-1].total == total


def test_progress_bar_reports_each_step_and_ends_once():
    events: list[ProgressEvent] = []
    with ProgressBar("work", 5, unit="item", show=False, on_progress=events.append) as bar:
        bar.update(2)
        bar.update(3)
        bar.close()
    assert [(e.done, e.finished) for e in events] == [(0, False), (2, False), (5, False), (5, True)]
    assert events[0] == ProgressEvent("work", 0, 5, "item", False)


def test_the_terminal_bar_is_one_reader_of_the_events():
    import io

    out = io.StringIO()
    events: list[ProgressEvent] = []
    bar = ProgressBar("work", 4, unit="item", file=out, on_progress=events.append)
    for _ in range(4):
        bar.update()
    bar.close()
    assert "work" in out.getvalue() and "4/4" in out.getvalue()
    assert events[-1] == ProgressEvent("work", 4, 4, "item", True)


def test_train_and_analyze_report_progress(tiny, tmp_path):
    _, model, ctx = tiny
    events: list[ProgressEvent] = []
    sae = fl.train_sae(model, web.HOOK, arch="topk", k=4, width=32, tokens=2048, batch_size=256, contexts=ctx,
                       out=tmp_path / "sae", progress=False, on_progress=events.append)
    (stage, evs), = _stages(events).items()
    assert "SAE" in stage and evs[0].unit == "tok"
    _check_stage(evs, 2048)

    events.clear()
    fl.analyze(model, tmp_path / "sae", ctx[:16], n_tokens=None, batch_size=4, embed=False, progress=False,
               n_top=4, n_sample=8, window=(4, 2), on_progress=events.append)
    by_stage = _stages(events)
    assert list(by_stage) == ["analyzing", "dashboards"]
    _check_stage(by_stage["analyzing"], ctx[:16].numel())
    _check_stage(by_stage["dashboards"], sae.cfg.d_sae)


def test_attribute_reports_rows_and_stops_when_the_callback_raises(tiny):
    data, model, _ = tiny
    tcs = fl.load_dictionary(data / "dictionaries" / web.MODEL / "transcoders")
    events: list[ProgressEvent] = []
    g = fl.attribute(model, tcs, web.PROMPT, max_feature_nodes=16, batch_size=4, progress=False,
                     on_progress=events.append)
    (stage, evs), = _stages(events).items()
    assert stage == "attribution" and evs[0].unit == "row"
    _check_stage(evs, g.n_logits + g.n_features)

    class Stop(Exception):
        pass

    def stop_at_second(e: ProgressEvent) -> None:
        if e.done > 0:
            raise Stop

    with pytest.raises(Stop):
        fl.attribute(model, tcs, web.PROMPT, max_feature_nodes=16, batch_size=4, progress=False,
                     on_progress=stop_at_second)
