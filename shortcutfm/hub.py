"""Share a LoRA run's model folder on the Hugging Face Hub (huggingface_hub's ``create_repo`` + ``upload_folder``).

What goes up is the deployable ``model/`` folder: ``pytorch_lora_weights.safetensors`` (+ the EMA file), the model
card ``README.md`` (base model, evaluation, how to sample) and, when asked, the kohya file for ComfyUI. The token
comes from ``huggingface-cli login`` or ``HF_TOKEN``, as everywhere in the Hub's tools.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["push_to_hub"]


def push_to_hub(model_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, api=None) -> str:
    """Create ``repo_id`` (a model repo; kept if it exists) and upload ``model_dir`` into it; returns the commit URL.

    ``api``: an ``huggingface_hub.HfApi`` (default: a new one with ``token``); the tests pass a local stand-in."""
    model_dir = Path(model_dir)
    if not (model_dir / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir} holds no pytorch_lora_weights.safetensors: push a run's model/ folder")
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id {repo_id!r} must look like user-or-org/name")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message or "Upload SCFM LoRA (shortcutfm)",
                             allow_patterns=["*.safetensors", "README.md", "*.json", "*.png"])
    return str(getattr(info, "commit_url", info))
