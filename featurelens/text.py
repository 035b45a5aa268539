"""Plain-text helpers shared by the labeler (analysis) and search: stopwords, a label's promotes clause."""

from __future__ import annotations

# Words that say nothing about what a feature is about: left out of label context words and of search terms.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before being below between
both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each few for from further
had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself him himself his how how's i i'd
i'll i'm i've if in into is isn't it it's its itself just let's me more most mustn't my myself no nor not now of off on
once only or other ought our ours ourselves out over own same shan't she she'd she'll she's should shouldn't so some such
than that that's the their theirs them themselves then there there's these they they'd they'll they're they've this
those through to too under until up us very was wasn't we we'd we'll we're we've were weren't what what's when when's
where where's which while who who's whom why why's will with won't would wouldn't you you'd you'll you're you've your
yours yourself yourselves s t d ll re ve m o y one two get got like just also would could much many well even still
""".split())


PROMOTES = " → promotes: "  # a built-in label's clause saying what the feature makes the model say


def where_it_fires(label: str) -> str:
    """The part of a label that says where its feature fires: the text before its promotes clause, if any.

    Search matches a concept against this part: a feature *about* films is what a search for films wants, not one
    whose logit lens happens to promote "film" (steering, not the label, measures what a feature does).
    """
    return label.split(PROMOTES, 1)[0]


def promoted_words(label: str) -> list[str]:
    """The words a label says its feature promotes (after "promotes:", so also older labels' "| promotes:"),
    lowercased; [] when it says none."""
    _, sep, tail = label.rpartition("promotes:")
    return [w for w in (x.strip().lower() for x in tail.split(",")) if w] if sep else []
