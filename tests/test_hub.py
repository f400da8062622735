"""Sharing on the Hub: `shortcutfm push` / `train --push-to-hub` through huggingface_hub's create_repo and
upload_folder, tested against a local stand-in of the Hub API that stores what an upload would send."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from shortcutfm.cli import app
from shortcutfm.hub import push_to_hub


class LocalHub:
    """The two HfApi calls push_to_hub makes, answered from a folder: one subfolder per repository."""

    def __init__(self, root: Path, token=None):
        self.root, self.token, self.calls = Path(root), token, []

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message, allow_patterns):
        self.calls.append(("upload_folder", repo_id, commit_message))
        for path in Path(folder_path).iterdir():
            if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy2(path, self.root / repo_id / path.name)
        return SimpleNamespace(commit_url=f"local://{repo_id}/commit/1")


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (folder / "ema_lora_weights.safetensors").write_bytes(b"ema")
    (folder / "README.md").write_text("---\nbase_model: x\n---\n# card\n")
    (folder / "scratch.tmp").write_text("not for upload")
    return folder


def test_push_creates_the_repo_and_uploads_weights_and_card(tmp_path):
    hub = LocalHub(tmp_path / "hub")
    url = push_to_hub(model_folder(tmp_path), "me/scfm-lora", private=True, api=hub)
    assert url == "local://me/scfm-lora/commit/1"
    assert hub.calls[0] == ("create_repo", "me/scfm-lora", "model", True, True)
    uploaded = sorted(p.name for p in (tmp_path / "hub" / "me" / "scfm-lora").iterdir())
    assert uploaded == ["README.md", "ema_lora_weights.safetensors", "pytorch_lora_weights.safetensors"]


def test_push_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        push_to_hub(tmp_path, "me/x", api=LocalHub(tmp_path / "hub"))
    with pytest.raises(ValueError, match="user-or-org/name"):
        push_to_hub(model_folder(tmp_path), "no-slash", api=LocalHub(tmp_path / "hub"))


def test_cli_push_uses_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    hubs = []

    def stand_in(token=None):
        hubs.append(LocalHub(tmp_path / "hub", token))
        return hubs[-1]

    monkeypatch.setattr(huggingface_hub, "HfApi", stand_in)
    model_folder(tmp_path)
    result = CliRunner().invoke(app, ["push", str(tmp_path / "run"), "--repo-id", "me/lora"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hub" / "me" / "lora" / "README.md").is_file()
    bad = CliRunner().invoke(app, ["push", str(tmp_path), "--repo-id", "me/lora"])
    assert bad.exit_code == 2 and "pytorch_lora_weights" in bad.output


def test_train_push_to_hub_is_for_lora_runs(tmp_path):
    result = CliRunner().invoke(app, ["train", "distill", f"train.output_dir={tmp_path / 'run'}", "--push-to-hub", "me/x"])
    assert result.exit_code == 2 and "LoRA runs" in result.output
