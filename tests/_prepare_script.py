"""One ``prepare --prompts`` run on a saved tiny pipeline, for tests/test_reliability_prepare.py (which kills it).

    python tests/_prepare_script.py PIPE_DIR PROMPT_FILE OUT_DIR

Prints ``ready`` once the pipeline is loaded (the test starts its kill timer then), ``done`` at the end. Settings
are fixed so that every run, killed or not, encodes the same records: 4 teacher steps, batch 1, 2 records per
shard (many shard and manifest writes to be killed in the middle of).
"""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

SETTINGS = {"num_steps": 4, "batch_size": 1, "records_per_shard": 2, "height": 16, "width": 16,
            "max_sequence_length": 8, "model_id": "tiny-sd3", "show_progress": False}


def main() -> int:
    from diffusers import StableDiffusion3Pipeline

    from shortcutfm.preparation import prepare_from_prompts

    pipe_dir, prompt_file, out_dir = sys.argv[1:4]
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    print("ready", flush=True)
    prepare_from_prompts(pipe, prompt_file, out_dir, **SETTINGS)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
