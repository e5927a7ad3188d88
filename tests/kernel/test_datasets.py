"""The bundled datasets: shared sentiment labels and the drug reviews' own test file."""

from llmos.kernel import datasets


def test_both_domains_share_the_sentiment_labels():
    assert datasets.load("reviews").labels == datasets.load("drugs").labels == [
        "negative", "positive"]


def test_a_source_test_file_is_the_test_split_for_every_seed():
    drugs = datasets.load("drugs")
    assert len(drugs.test_rows) == 343  # drugsComTest.tsv without its neutral reviews
    for seed in (0, 1):
        parts = {name: drugs.split(name, seed)[0] for name in datasets.SPLITS}
        assert parts["test"] == [drugs.texts[i] for i in drugs.test_rows]
        assert len(parts["train"]) + len(parts["validation"]) == len(drugs.texts) - 343
        # the package's two files share one review text; no row is in two splits
        assert len(set(parts["test"]) & set(parts["train"] + parts["validation"])) == 1
    assert drugs.split("train", 0) != drugs.split("train", 1)


def test_all_is_every_row_in_the_sources_order():
    reviews = datasets.load("reviews")
    assert reviews.split(datasets.ALL, 3) == (reviews.texts, reviews.targets)
    assert len(reviews.split("test")[0]) < len(reviews.texts)
