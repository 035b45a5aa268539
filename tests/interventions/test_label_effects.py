"""What a label says its feature promotes, checked by steering it (`fl.score_label_effects`), on the tiny model's
analyzed SAE: a label naming the words steering raises scores above 1 and above one naming words it lowers."""

from __future__ import annotations

import shutil

import pytest
import torch

import featurelens as fl
from featurelens.engine.errors import InputError

import builders as web


@pytest.fixture
def lens(tmp_path, tmp_path_factory):
    data, model = web.shared_data(tmp_path_factory)
    sae = tmp_path / "sae"  # a copy: the test writes labels and scores
    shutil.copytree(data / "dictionaries" / web.MODEL / "sae", sae)
    a = fl.open_analysis(sae)
    a._model = model
    return a


def _words(model, order: torch.Tensor, n: int = 3) -> list[str]:
    """The first n whole words (a leading space, letters, one token with that spelling) in token order `order`."""
    out: list[str] = []
    for i in order.tolist():
        s = model.tokenizer.decode([i])
        w = s.strip().lower()
        if s.startswith(" ") and len(w) >= 3 and w.isalpha() and w not in out \
                and len(model.encode(" " + w, prepend_bos=False)) == 1:
            out.append(w)
            if len(out) == n:
                break
    return out


def test_label_effects_score_what_steering_does(lens):
    from featurelens.interventions import EFFECT_METHOD
    from featurelens.search.steerable import PROBE_PROMPTS, next_token_probs

    model = lens.model
    top = lens.store.column("max_act")
    f = int(top.argmax())
    clean = next_token_probs(model, PROBE_PROMPTS)
    steer = fl.Steer(lens.dictionary, f, 1.0, max_activation=float(top[f]))
    diff = next_token_probs(model, PROBE_PROMPTS, steer.hooks(model)) - clean
    up, down = _words(model, diff.argsort(descending=True)), _words(model, diff.argsort())
    assert up and down, "the tiny vocabulary has no whole-word tokens: the test would measure nothing"
    with lens.store.transaction():
        lens.store.write_labels([(f, "test", f'"x" → promotes: {", ".join(up)}')])
    unclaimed = next(i for i in range(lens.n_features) if i != f and top[i] > 0)
    with lens.store.transaction():  # a label that claims nothing about what its feature promotes
        lens.store.write_labels([(unclaimed, "test", '"x" | context: y')])
    scores = fl.score_label_effects(lens, features=[f, unclaimed], progress=False)
    assert set(scores) == {f} and scores[f] > 1
    stored = lens.store.label_scores(f, effects=True)["test"]
    assert stored["method"] == EFFECT_METHOD and stored["score"] == pytest.approx(scores[f])
    assert stored["n_pos"] == len(PROBE_PROMPTS) and stored["n_neg"] >= len(up)
    assert "test" not in lens.store.label_scores(f)  # not taken for a where-it-fires score
    with lens.store.transaction():  # the same feature, labelled with words steering it lowers
        lens.store.write_labels([(f, "test", f'"x" → promotes: {", ".join(down)}')])
    assert lens.store.label_scores(f, effects=True) == {}  # the old score went with the old text
    assert fl.score_label_effects(lens, features=[f], progress=False)[f] < 1
    with pytest.raises(InputError, match="strength"):
        fl.score_label_effects(lens, features=[f], strength=0)
    with pytest.raises(InputError, match="no feature"):
        fl.score_label_effects(lens, features=[lens.n_features])


def test_explain_effects_on_the_command_line(lens, tmp_path_factory, capsys):
    """`featurelens explain PATH --effects` labels (nothing to do here: already labelled), then scores what the
    labels say their features promote, with the model -m names."""
    from featurelens.cli import main
    from featurelens.interventions import EFFECT_METHOD

    data, _ = web.shared_data(tmp_path_factory)
    claims = [f for f, (label, _) in lens.store.current_labels().items() if "promotes:" in label][:2]
    assert claims, "no label of the tiny SAE names promoted words: the test would measure nothing"
    lens.store.close()
    assert main(["explain", str(lens.dir.parent), "--features", ",".join(map(str, claims)), "--effects",
                 "-m", str(data / "models" / web.MODEL)]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and f"{EFFECT_METHOD}: {len(claims)} labels name words" in out
    reread = fl.open_analysis(lens.dir.parent)
    assert set(reread.store.current_label_scores(effects=True)) == set(claims)
