"""autotag_folder: writers, keep/overwrite/append, prefix, thresholds, broken images, host interrogators."""
import csv
import io

import pytest
from PIL import Image

from lora_trainer.caption import (HostInterrogatorTagger, TaggerUnavailable, autotag_folder, available_taggers,
                                  make_tagger)
from lora_trainer.caption.taggers import parse_tag_string
from lora_trainer.caption.text import compose, sentence, with_article

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


class ColourTagger:
    """Scores chosen per image colour, so every expected caption is known exactly."""

    name = "colour"

    def __init__(self, table, category_of=None):
        self.table = table
        self.seen = []
        if category_of is not None:
            self.category_of = category_of

    def _colour(self, image):  # nearest table colour (JPEG shifts colours slightly)
        pixel = image.getpixel((0, 0))
        return min(self.table, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, pixel)))

    def tag(self, images):
        colours = [self._colour(im) for im in images]
        self.seen.extend(colours)
        return [sorted(self.table[c], key=lambda ts: -ts[1]) for c in colours]


TABLE = {
    RED: [("cat", 0.9), ("soft lighting", 0.5), ("dog", 0.35), ("blurry", 0.1)],
    BLUE: [("dog", 0.8), ("night", 0.6), ("cat", 0.05)],
    GREEN: [("tree", 0.2)],  # nothing reaches 0.3
}


def _img(path, colour, size=(24, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "data"
    _img(d / "red.png", RED)
    _img(d / "blue.jpg", BLUE)
    return d


def test_sidecar_tags_by_score_above_threshold_with_prefix_first(folder):
    tagger = ColourTagger(TABLE)
    result = autotag_folder(folder, tagger=tagger, threshold=0.3, prefix="mychar")
    assert (folder / "red.txt").read_text() == "mychar, cat, soft lighting, dog\n"
    assert (folder / "blue.txt").read_text() == "mychar, dog, night\n"
    assert (result.written, result.kept, result.skipped, result.failed) == (2, 0, 0, 0)
    assert result.captions == {str(folder / "blue.jpg"): "mychar, dog, night",
                               str(folder / "red.png"): "mychar, cat, soft lighting, dog"}
    assert result.tagged == 2 and "2 written" in result.summary()


def test_threshold_and_top_k(folder):
    autotag_folder(folder, tagger=ColourTagger(TABLE), threshold=0.4, top_k=1)
    assert (folder / "red.txt").read_text() == "cat\n"
    autotag_folder(folder, tagger=ColourTagger(TABLE), threshold=0.05, policy="overwrite")
    assert (folder / "red.txt").read_text() == "cat, soft lighting, dog, blurry\n"
    assert (folder / "blue.txt").read_text() == "dog, night, cat\n"


def test_nothing_above_threshold_writes_no_file(tmp_path):
    d = tmp_path / "d"
    _img(d / "green.png", GREEN)
    result = autotag_folder(d, tagger=ColourTagger(TABLE), threshold=0.3)
    assert result.skipped == 1 and not (d / "green.txt").exists()
    assert "threshold" in result.files[0].error
    result = autotag_folder(d, tagger=ColourTagger(TABLE), threshold=0.3, prefix="mychar")
    assert (d / "green.txt").read_text() == "mychar\n"


def test_keep_leaves_existing_captions_untouched_and_untagged(folder):
    (folder / "red.txt").write_text("my own words, handwritten\n")
    tagger = ColourTagger(TABLE)
    result = autotag_folder(folder, tagger=tagger, prefix="mychar")
    assert (folder / "red.txt").read_text() == "my own words, handwritten\n"
    assert tagger.seen == [BLUE]  # the kept image is not even tagged
    assert (result.written, result.kept) == (1, 1)
    assert result.captions[str(folder / "red.png")] == "my own words, handwritten"


def test_empty_caption_file_counts_as_no_caption(folder):
    (folder / "red.txt").write_text("  \n")
    result = autotag_folder(folder, tagger=ColourTagger(TABLE))
    assert (folder / "red.txt").read_text() == "cat, soft lighting, dog\n" and result.kept == 0


def test_overwrite_replaces(folder):
    (folder / "red.txt").write_text("old caption")
    autotag_folder(folder, tagger=ColourTagger(TABLE), prefix="mychar", policy="overwrite")
    assert (folder / "red.txt").read_text() == "mychar, cat, soft lighting, dog\n"


def test_append_merges_without_duplicates_and_puts_prefix_first(folder):
    (folder / "red.txt").write_text("Cat, soft_lighting, by the window\n")
    (folder / "blue.txt").write_text("mychar, dog, night")
    result = autotag_folder(folder, tagger=ColourTagger(TABLE), prefix="mychar", policy="append")
    assert (folder / "red.txt").read_text() == "mychar, Cat, soft_lighting, by the window, dog\n"
    # nothing new for blue: the file is left alone and reported as skipped
    assert (folder / "blue.txt").read_text() == "mychar, dog, night"
    assert (result.written, result.skipped) == (1, 1)
    assert result.captions[str(folder / "blue.jpg")] == "mychar, dog, night"


def test_non_utf8_caption_is_never_garbled(folder):
    latin1 = "café, à la plage".encode("latin-1")
    (folder / "red.txt").write_bytes(latin1)
    logged = []
    result = autotag_folder(folder, tagger=ColourTagger(TABLE), policy="append", log=logged.append)
    assert (folder / "red.txt").read_bytes() == latin1
    assert result.failed == 1 and "not UTF-8" in result.failures[0].error and "red.txt" in logged[0]
    result = autotag_folder(folder, tagger=ColourTagger(TABLE), policy="keep")
    assert (folder / "red.txt").read_bytes() == latin1 and result.kept == 2
    autotag_folder(folder, tagger=ColourTagger(TABLE), policy="overwrite")
    assert (folder / "red.txt").read_text() == "cat, soft lighting, dog\n"


def test_compose_rules():
    assert compose(["cat", "dog"], prefix="trig, style x") == "trig, style x, cat, dog"
    assert compose(["cat", "Trig"], prefix="trig") == "trig, cat"
    assert compose(["long hair", "cat"], existing="trig,  long_hair ,,", prefix="trig") == "trig, long_hair, cat"
    assert compose([], prefix="") == ""


def test_csv_output_quotes_commas_and_uses_relative_names(tmp_path):
    d = tmp_path / "data"
    _img(d / "red, one.png", RED)
    _img(d / "10_mychar" / "blue.png", BLUE)
    result = autotag_folder(d, tagger=ColourTagger(TABLE), prefix="mychar", destination="csv")
    text = (d / "metadata.csv").read_text()
    assert text.splitlines()[0] == "file_name,caption"
    assert '"red, one.png","mychar, cat, soft lighting, dog"' in text
    assert '10_mychar/blue.png,"mychar, dog, night"' in text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["file_name", "caption"], ["10_mychar/blue.png", "mychar, dog, night"],
                    ["red, one.png", "mychar, cat, soft lighting, dog"]]
    assert result.destination == str(d / "metadata.csv")
    assert not list(d.rglob("*.txt"))


def test_csv_existing_rows_columns_and_policy(tmp_path):
    d = tmp_path / "data"
    _img(d / "red.png", RED)
    _img(d / "blue.png", BLUE)
    out = tmp_path / "meta" / "captions.csv"
    out.parent.mkdir()
    out.write_text('file_name,text,source\n./red.png,"mine, keep me",hand\ngone.png,an old row,hand\n')
    result = autotag_folder(d, tagger=ColourTagger(TABLE), destination="csv", csv_path=out)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["file_name"] for r in rows] == ["./red.png", "gone.png", "blue.png"]
    assert rows[0] == {"file_name": "./red.png", "text": "mine, keep me", "source": "hand"}
    assert rows[1]["text"] == "an old row"  # images not in this run keep their rows
    assert rows[2] == {"file_name": "blue.png", "text": "dog, night", "source": ""}
    assert (result.kept, result.written) == (1, 1)
    autotag_folder(d, tagger=ColourTagger(TABLE), destination="csv", csv_path=out, policy="append")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows[0]["text"] == "mine, keep me, cat, soft lighting, dog"


def test_csv_is_read_back_by_the_dataset_scan(tmp_path):
    from lora_trainer.data.images import IMAGE_EXTENSIONS
    from lora_trainer.data.metadata_csv import read_metadata_csv

    d = tmp_path / "data"
    _img(d / "red, one.png", RED)
    _img(d / "5_x" / "blue.png", BLUE)
    out = tmp_path / "elsewhere" / "meta.csv"
    out.parent.mkdir()
    _img(out.parent / "side.png", GREEN)  # a row relative to the CSV's own folder, not to the images' root
    out.write_text("filename,prompt\nside.png,kept row\n")
    autotag_folder(d, tagger=ColourTagger(TABLE), destination="csv", csv_path=out, prefix="trig, style")
    assert out.read_text().splitlines()[0] == "filename,prompt"
    rows, problems = read_metadata_csv(out, [d, out.parent], IMAGE_EXTENSIONS)
    assert problems == []
    assert {r.path.name: r.caption for r in rows.values()} == {
        "side.png": "kept row", "red, one.png": "trig, style, cat, soft lighting, dog",
        "blue.png": "trig, style, dog, night"}
    # a second run matches every row to its image: nothing is duplicated
    autotag_folder(d, tagger=ColourTagger(TABLE), destination="csv", csv_path=out, policy="overwrite")
    assert len(out.read_text().splitlines()) == 4


def test_append_treats_lines_as_tags(folder):
    (folder / "red.txt").write_text("mychar\nby the window, cat\n")
    autotag_folder(folder, tagger=ColourTagger(TABLE), policy="append")
    assert (folder / "red.txt").read_text() == "mychar, by the window, cat, soft lighting, dog\n"


def test_headerless_csv_with_unquoted_commas_is_read(tmp_path):
    d = tmp_path / "data"
    _img(d / "red.png", RED)
    (d / "metadata.csv").write_text("red.png,a cat, by hand\n")
    result = autotag_folder(d, tagger=ColourTagger(TABLE), destination="csv")
    assert result.kept == 1 and result.captions[str(d / "red.png")] == "a cat, by hand"
    assert (d / "metadata.csv").read_text() == "red.png,a cat, by hand\n"  # nothing changed, nothing rewritten


def test_broken_image_is_reported_and_skipped(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    logged = []
    result = autotag_folder(folder, tagger=ColourTagger(TABLE), log=logged.append, batch_size=4)
    assert result.failed == 1 and result.written == 2
    failure = result.failures[0]
    assert failure.path == folder / "broken.png" and failure.error
    assert len(logged) == 1 and str(folder / "broken.png") in logged[0]
    assert not (folder / "broken.txt").exists()
    assert (folder / "red.txt").exists() and (folder / "blue.txt").exists()


def test_progress_and_stop(tmp_path):
    d = tmp_path / "d"
    for i in range(5):
        _img(d / f"{i}.png", RED)
    calls = []
    autotag_folder(d, tagger=ColourTagger(TABLE), batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    stop_after = iter([False, True])
    result = autotag_folder(d, tagger=ColourTagger(TABLE), batch_size=2, policy="overwrite",
                            should_stop=lambda: next(stop_after))
    assert result.written == 2


def test_bad_arguments_are_refused(folder):
    with pytest.raises(ValueError, match="policy must be one of keep, overwrite, append"):
        autotag_folder(folder, tagger=ColourTagger(TABLE), policy="replace")
    with pytest.raises(ValueError, match="threshold"):
        autotag_folder(folder, tagger=ColourTagger(TABLE), threshold=3)
    with pytest.raises(FileNotFoundError):
        autotag_folder(folder / "nope", tagger=ColourTagger(TABLE))


# --- caption mode ---------------------------------------------------------------------------------------

CATEGORIES = {"cat": "subjects", "dog": "subjects", "owl": "subjects", "flowers": "subjects",
              "photograph": "mediums", "watercolor painting": "mediums", "anime": "styles",
              "soft lighting": "lighting", "night": "lighting"}


def test_sentence_from_best_tags():
    scored = [("cat", 0.9), ("photograph", 0.6), ("anime", 0.5), ("soft lighting", 0.4), ("dog", 0.35)]
    assert sentence(scored, CATEGORIES, 0.3) == "a photo of a cat, anime style, soft lighting"
    scored = [("owl", 0.2), ("watercolor painting", 0.7), ("anime", 0.1), ("night", 0.5)]
    assert sentence(scored, CATEGORIES, 0.3) == "a picture of an owl, watercolor painting, night"
    assert sentence([("flowers", 0.5)], CATEGORIES, 0.3) == "a picture of flowers"
    assert sentence([("night", 0.5)], CATEGORIES, 0.3) == "a picture, night"
    assert [with_article(w) for w in ("unicorn", "elephant", "horse", "mushrooms")] == \
        ["a unicorn", "an elephant", "a horse", "mushrooms"]


def test_caption_mode_writes_sentences(folder):
    table = {RED: [("cat", 0.9), ("watercolor painting", 0.5), ("soft lighting", 0.4)], BLUE: [("dog", 0.2)]}
    autotag_folder(folder, tagger=ColourTagger(table, CATEGORIES), mode="caption", prefix="mychar")
    assert (folder / "red.txt").read_text() == "mychar, a picture of a cat, watercolor painting, soft lighting\n"
    assert (folder / "blue.txt").read_text() == "mychar, a picture of a dog\n"


# --- host interrogators ---------------------------------------------------------------------------------

def test_host_captioner_and_deepbooru_adapters(folder):
    seen = []

    def blip(image):
        seen.append(image.size)
        return "a red square on a table"

    captioner = HostInterrogatorTagger("blip", blip, kind="caption")
    result = autotag_folder(folder, tagger=captioner, mode="caption", prefix="mychar")
    assert (folder / "red.txt").read_text() == "mychar, a red square on a table\n"
    assert result.written == 2 and seen == [(24, 16), (24, 16)]

    booru = HostInterrogatorTagger("deepbooru", lambda im: "1girl, (smile:0.2), solo, \\(artist\\)", kind="tags")
    assert booru.tag([Image.new("RGB", (4, 4))]) == [[("1girl", 1.0), ("solo", 1.0), ("(artist)", 1.0),
                                                      ("smile", 0.2)]]
    autotag_folder(folder, tagger=booru, threshold=0.3, policy="overwrite")
    assert (folder / "red.txt").read_text() == "1girl, solo, (artist)\n"


@pytest.mark.parametrize("behaviour", ["<error>", "raise"])
def test_a_failing_host_tagger_writes_nothing_and_says_why(folder, behaviour):
    """A1111's CLIP interrogator offline returns "<error>"; DeepBooru raises. Neither becomes a caption."""
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(image):
        if behaviour == "raise":
            raise IndexError("list index out of range")
        return "<error>"

    result = autotag_folder(folder, tagger=HostInterrogatorTagger("interrogator", broken, kind="tags"),
                            policy="overwrite")
    assert result.written == 0 and result.failed == len(result.files) > 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written, nothing replaced
    assert "failed (" in result.summary() and "WebUI console" in result.summary()


def test_parse_tag_string():
    assert parse_tag_string(" a , (b:0.5),, (c d:1.25) ") == [("c d", 1.25), ("a", 1.0), ("b", 0.5)]
    assert parse_tag_string("") == []


def test_available_taggers_and_make_tagger_with_a_host():
    class Host:
        def interrogators(self):
            return {"blip": lambda im: "a thing", "deepbooru": lambda im: "tag_a, tag_b"}

    infos = {i.name: i for i in available_taggers(Host())}
    assert set(infos) == {"clip", "clip-hf", "blip", "deepbooru"}
    assert infos["clip-hf"].available and infos["blip"].available
    if not infos["clip"].available:  # this machine's open_clip cannot import (no matching torchvision)
        assert "open_clip" in infos["clip"].reason and "hf:openai/clip-vit-base-patch32" in infos["clip"].reason
    assert [i.name for i in available_taggers()] == ["clip", "clip-hf"]
    booru = make_tagger("deepbooru", host=Host())
    assert isinstance(booru, HostInterrogatorTagger) and booru.kind == "tags"
    assert make_tagger("blip", host=Host()).kind == "caption"
    assert booru.tag([Image.new("RGB", (2, 2))]) == [[("tag_a", 1.0), ("tag_b", 1.0)]]
    with pytest.raises(TaggerUnavailable, match="unknown tagger 'wd14'; available: clip, clip-hf, blip, deepbooru"):
        make_tagger("wd14", host=Host())
