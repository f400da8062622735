"""Reading prompt files and image folders with captions (no diffusers)."""

import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from shortcutfm.preparation import list_image_captions, read_prompt_file


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("p.txt", "a cat\n\n# a comment\n  a dog  \n", ["a cat", "a dog"]),
        ("p.jsonl", '"a cat"\n\n{"prompt": "a dog"}\n{"text": "a tree", "id": 3}\n', ["a cat", "a dog", "a tree"]),
    ],
)
def test_prompt_files(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    assert read_prompt_file(tmp_path / name) == expected


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.txt", "\n# only a comment\n", r"p\.txt holds no prompts"),
        ("p.jsonl", '"ok"\n{broken\n', r"p\.jsonl:2 is not valid JSON"),
        ("p.jsonl", '{"file": "x"}\n', r"p\.jsonl:1 needs a JSON string or an object"),
        ("p.csv", "a cat\n", r"p\.csv must be a \.txt"),
    ],
)
def test_bad_prompt_files_name_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompt_file(tmp_path / name)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompt_file(tmp_path / "nope.txt")


def test_folder_captions_from_txt_and_metadata(tmp_path):
    for name in ["b.png", "a.JPG", "c.webp", "d.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.txt").write_text(" a cat \n")
    (tmp_path / "notes.md").write_text("ignored")
    rows = [{"file_name": "b.png", "text": "a dog"}, {"file_name": "a.JPG", "text": "loses to a.txt"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    items = list_image_captions(tmp_path)
    assert [item.relative_name for item in items] == ["a.JPG", "b.png", "c.webp", "d.jpeg"]
    assert [item.caption for item in items] == ["a cat", "a dog", None, None]
    assert "c.txt" in items[2].missing_caption_hint


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "a.txt").write_text("a caption without an image")
    with pytest.raises(ValueError, match="holds no images"):
        list_image_captions(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        list_image_captions(tmp_path / "missing")


def test_two_caption_indexes_are_ambiguous(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "metadata.jsonl").write_text("")
    (tmp_path / "captions.jsonl").write_text("")
    with pytest.raises(ValueError, match="keep one caption index"):
        list_image_captions(tmp_path)
