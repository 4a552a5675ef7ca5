"""Vocabulary files and the score -> probability -> tag selection path, with embeddings we control."""
import math

import pytest
import torch
from PIL import Image

from lora_trainer.caption import ClipTagger, VocabularyError, load_vocabulary
from lora_trainer.caption.scoring import category_probabilities, rank, select
from lora_trainer.caption.vocab import CATEGORY_ORDER, parse_category


# --- the shipped vocabulary ---------------------------------------------------------------------------

def test_shipped_vocabulary_is_large_unique_and_categorised():
    vocab = load_vocabulary()
    names = [c.name for c in vocab.categories]
    assert names == list(CATEGORY_ORDER)
    assert len(vocab) >= 400
    for category in vocab.categories:
        assert len(category.terms) >= 30, category.name
        assert category.template.count("{}") == 1
        assert category.neutral and "{}" not in category.neutral
        for term in category.terms:
            assert term == " ".join(term.split()) and "," not in term and term
    lowered = [t.lower() for t in vocab.terms]
    assert len(lowered) == len(set(lowered))
    assert vocab.category_of["cat"] == "subjects"
    assert vocab.category_of["watercolor painting"] == "mediums"
    assert vocab.category_of["soft lighting"] == "lighting"
    assert vocab.categories[0].prompt("cat") == "a picture of cat"


def test_vocabulary_file_errors_name_file_and_line(tmp_path):
    with pytest.raises(VocabularyError, match=r"x\.txt:3: 'Cat' is listed twice \(first on line 1\)"):
        parse_category("x", "cat\n\nCat\n", source="x.txt")
    with pytest.raises(VocabularyError, match="exactly once"):
        parse_category("x", "# template: a picture\ncat\n", source="x.txt")
    with pytest.raises(VocabularyError, match="comma"):
        parse_category("x", "cat, dog\n", source="x.txt")
    (tmp_path / "a.txt").write_text("cat\n")
    (tmp_path / "b.txt").write_text("dog\ncat\n")
    with pytest.raises(VocabularyError, match="also in a.txt"):
        load_vocabulary(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VocabularyError, match="no .txt files"):
        load_vocabulary(empty)
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary(tmp_path / "missing")


def test_custom_vocabulary_folder(tmp_path):
    (tmp_path / "subjects.txt").write_text("# template: a photo of {}\n# neutral: a photo\n# a comment\ncat\n  big   dog \n")
    (tmp_path / "zeta.txt").write_text("alpha\n")
    vocab = load_vocabulary(tmp_path)
    assert [c.name for c in vocab.categories] == ["subjects", "zeta"]
    assert vocab.terms == ["cat", "big dog", "alpha"]
    assert vocab.categories[0].prompt("cat") == "a photo of cat" and vocab.categories[0].neutral == "a photo"
    assert vocab.categories[1].template == "a picture, {}"  # default template
    assert load_vocabulary(tmp_path, categories=["zeta"]).terms == ["alpha"]


# --- probabilities -------------------------------------------------------------------------------------

def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_category_probabilities_match_the_documented_formula():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    terms = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    neutral = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    cats = [0, 0, 1, 0, 1]
    p = category_probabilities(img, terms, neutral, cats, logit_scale=20.0)
    for n in range(3):
        for c in (0, 1):
            idx = [i for i, k in enumerate(cats) if k == c]
            logits = [20.0 * float(img[n] @ neutral[c])] + [20.0 * float(img[n] @ terms[i]) for i in idx]
            expected = _softmax(logits)[1:]
            assert [float(p[n, i]) for i in idx] == pytest.approx(expected, abs=1e-5)
        assert float(p[n, [0, 1, 3]].sum()) < 1.0 and float(p[n, [2, 4]].sum()) < 1.0


def test_rank_and_select():
    scored = rank(["a", "b", "c", "d"], [0.2, 0.9, 0.5, 0.5])
    assert scored == [("b", 0.9), ("c", 0.5), ("d", 0.5), ("a", 0.2)]  # ties keep vocabulary order
    assert select(scored, 0.5) == [("b", 0.9), ("c", 0.5), ("d", 0.5)]
    assert select(scored, 0.5, top_k=2) == [("b", 0.9), ("c", 0.5)]
    assert select(scored, 0.95) == []


# --- ClipTagger with a backend whose embeddings we choose --------------------------------------------

class VectorBackend:
    """Text prompt -> a fixed vector; image -> the vector registered for its colour."""

    name = "vectors"
    logit_scale = 10.0

    def __init__(self, text_vectors, image_vectors):
        self.text_vectors, self.image_vectors = text_vectors, image_vectors
        self.text_calls = 0

    def encode_texts(self, texts):
        self.text_calls += 1
        return torch.nn.functional.normalize(torch.stack([self.text_vectors[t] for t in texts]), dim=1)

    def encode_images(self, images):
        return torch.nn.functional.normalize(torch.stack([self.image_vectors[im.getpixel((0, 0))] for im in images]),
                                             dim=1)


@pytest.fixture
def vector_tagger(tmp_path):
    (tmp_path / "subjects.txt").write_text("# template: a picture of {}\ncat\ndog\nbird\n")
    (tmp_path / "lighting.txt").write_text("soft lighting\nneon lights\n")
    vocab = load_vocabulary(tmp_path)
    e = torch.eye(7)
    text = {"a picture of cat": e[0], "a picture of dog": e[1], "a picture of bird": e[2],
            "a picture, soft lighting": e[3], "a picture, neon lights": e[4], "a picture": e[5]}
    images = {(255, 0, 0): 3 * e[0] + 2 * e[1] + 1 * e[5] + 2.5 * e[3],  # cat > dog, soft lighting
              (0, 0, 255): 1 * e[2] + 4 * e[5] + 0.2 * e[4]}  # weak bird, "nothing" wins
    backend = VectorBackend(text, images)
    return ClipTagger(backend, vocab), backend


def test_clip_tagger_ranks_by_probability(vector_tagger):
    tagger, backend = vector_tagger
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    out = tagger.tag([red, blue])
    assert len(out) == 2 and len(out[0]) == 5
    red_scores = dict(out[0])
    # By hand: |v| = sqrt(9 + 4 + 1 + 6.25); subjects softmax over [none, cat, dog, bird] * 10 / |v|.
    norm = math.sqrt(9 + 4 + 1 + 6.25)
    p_subj = _softmax([10 * 1 / norm, 10 * 3 / norm, 10 * 2 / norm, 0.0])
    assert red_scores["cat"] == pytest.approx(p_subj[1], rel=1e-5)
    assert red_scores["dog"] == pytest.approx(p_subj[2], rel=1e-5)
    assert [t for t, _ in out[0]][:3] == ["soft lighting", "cat", "dog"]
    assert [s for _, s in out[0]] == sorted((s for _, s in out[0]), reverse=True)
    # the blue image is mostly "a picture": no tag reaches 0.3
    assert select(out[1], 0.3) == []
    assert out[1][0][0] == "bird"
    tagger.tag([red])
    assert backend.text_calls == 1  # prompts are encoded once per tagger


def test_threshold_changes_which_tags_are_kept(vector_tagger):
    tagger, _ = vector_tagger
    scored = tagger.tag([Image.new("RGB", (8, 8), (255, 0, 0))])[0]
    low = [t for t, _ in select(scored, 0.05)]
    high = [t for t, _ in select(scored, 0.5)]
    assert set(high) < set(low)
    assert "cat" in high and "dog" not in high and "dog" in low
