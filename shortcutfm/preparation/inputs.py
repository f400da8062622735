"""Reading what the user gives to prepare: a prompt file, or a folder of images with captions.

Prompt files: ``.txt`` with one prompt per line (blank lines and lines starting with ``#`` skipped), or
``.jsonl`` with one JSON string or object with a ``prompt`` / ``text`` / ``caption`` field per line.

Image folders: ``.png .jpg .jpeg .webp`` files; each image's caption is the same-stem ``.txt`` file next to it
(``cat.png`` -> ``cat.txt``), or else its ``text`` (or ``caption``) in a ``metadata.jsonl`` / ``captions.jsonl``
with ``file_name`` entries (the diffusers ImageFolder convention; ``file_name`` relative to the folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_INDEX_NAMES = ("metadata.jsonl", "captions.jsonl")
TEXT_FIELDS = ("prompt", "text", "caption")


@dataclass(frozen=True)
class ImageCaption:
    """One image of a folder and its caption (``None`` when no caption was found for it)."""

    image_path: Path
    relative_name: str  # path relative to the folder, posix style (what reports and records show)
    caption: str | None
    missing_caption_hint: str = ""  # why the caption is missing and how to add it (the report's whole reason)


def read_utf8(path: Path) -> str:
    """The text of ``path``; a one-line ``ValueError`` naming the file and the first bad byte if it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is dropped
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at position {error.start}); "
                         "save it as UTF-8") from None


def _jsonl_rows(path: Path) -> list[tuple[int, object]]:
    rows = []
    for line_number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number} is not valid JSON ({error.msg}); fix or remove that line") from None
    return rows


def _text_field(row: object, path: Path, line_number: int, fields: tuple[str, ...]) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for field in fields:
            if isinstance(row.get(field), str):
                return row[field]
    raise ValueError(f"{path}:{line_number} needs a JSON string or an object with one of the fields {list(fields)}")


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a ``.txt`` or ``.jsonl`` prompt file (stripped, in file order, duplicates kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    if path.suffix.lower() == ".jsonl":
        prompts = [_text_field(row, path, number, TEXT_FIELDS).strip() for number, row in _jsonl_rows(path)]
    elif path.suffix.lower() == ".txt":
        lines = (line.strip() for line in read_utf8(path).splitlines())
        prompts = [line for line in lines if line and not line.startswith("#")]
    else:
        raise ValueError(f"prompt file {path} must be a .txt (one prompt per line) or a .jsonl file")
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (blank and '#' lines are skipped); add some")
    return prompts


def _caption_index(folder: Path) -> dict[str, str]:
    """``relative file name -> caption`` from the folder's metadata.jsonl / captions.jsonl, if there is one."""
    present = [folder / name for name in CAPTION_INDEX_NAMES if (folder / name).is_file()]
    if len(present) > 1:
        raise ValueError(f"{folder} has both {present[0].name} and {present[1].name}; keep one caption index")
    if not present:
        return {}
    index_path = present[0]
    captions = {}
    for line_number, row in _jsonl_rows(index_path):
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f"{index_path}:{line_number} needs an object with a \"file_name\" field")
        name = Path(row["file_name"]).as_posix()
        captions[name] = _text_field(row, index_path, line_number, ("text", "caption")).strip()
    return captions


def list_image_captions(folder: str | Path) -> list[ImageCaption]:
    """Images of ``folder`` (top level, plus any listed in its caption index) with their captions, sorted by
    name. Raises for a missing folder or one without images; a missing caption is reported per image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    indexed = _caption_index(folder)
    names = {  # dotfiles skipped: "._x.png" are macOS resource forks, not images
        path.name for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    }
    names.update(name for name in indexed if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise ValueError(
            f"image folder {folder} holds no images ({' '.join(IMAGE_SUFFIXES)}); add images with a same-stem .txt "
            f"caption each, or a metadata.jsonl with file_name and text"
        )
    items = []
    for name in sorted(names):
        image_path = folder / name
        sidecar = image_path.with_suffix(".txt")
        hint = f'no caption; write it into {sidecar}, or add {{"file_name": "{name}", "text": ...}} to {folder}/metadata.jsonl'
        caption = indexed.get(name)
        if sidecar.is_file():
            try:
                caption = read_utf8(sidecar).strip()
            except ValueError as error:  # reported with the image, so the other images are still prepared
                caption, hint = None, f"its caption {error}"
            else:
                hint = f"its caption file {sidecar} is empty; write the caption into it" if not caption else hint
        elif name in indexed and not caption:
            hint = f"its caption in {folder}/metadata.jsonl is empty; write one"
        items.append(ImageCaption(image_path, name, caption or None, hint))
    return items
