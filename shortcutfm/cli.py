"""The ``shortcutfm`` command line: a thin layer that builds configs and calls library functions.

Options that exist in the config are given as ``section.field=value`` overrides, never as flags.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import RunStopped

# torchao (the quant extra) logs a warning per optional CUDA kernel it cannot load and torch one per enum it
# registers, on every diffusers import; neither concerns a CLI user
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SCFM: few-step samplers from flow-matching models.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"shortcutfm {version('shortcutfm')}")
        except PackageNotFoundError:  # a source tree that was not installed
            from . import __version__

            print(f"shortcutfm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """SCFM: few-step samplers from flow-matching models."""
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
# What a command reports as one line on stderr (exit status 2) instead of a traceback: bad configs and inputs
# (ValueError and its subclasses: ConfigError, DataError, CheckpointError), missing files, failed writes
# (OSError, WriteError), broken caches (CacheError, a ValueError) and stopped runs (RunStopped: non-finite values, a locked folder).
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, KeyError, OSError, RunStopped)
OVERRIDES_HELP = "Config overrides as section.field=value, e.g. train.steps=2000 eval.every=100."


def _fail(exc: Exception) -> None:
    errors.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    raise typer.Exit(code=2)


def _threads(inference: bool = False) -> int | None:
    """Unless OMP_NUM_THREADS says otherwise: one torch thread for training (fastest for the small built-in
    networks, see README.md), every core for large-batch sampling. Returns the sampling thread count."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    import torch

    sampling_threads = os.cpu_count() or 1
    torch.set_num_threads(sampling_threads if inference else 1)
    return sampling_threads


def end_distributed() -> None:
    """End the process group of a multi-process launch (torchrun): the trainer leaves it up for further runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@app.command()
def train(
    config: str = typer.Argument(..., help="A YAML config file, or a preset name: " + ", ".join(
        sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml"))) + "."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in train.output_dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete another run in train.output_dir and start afresh."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub",
        help="LoRA runs: upload model/ to this Hub repository (user-or-org/name) when training ends."),
) -> None:
    """Train: from-scratch flow matching (train.mode=pretrain) or SCFM distillation (train.mode=distill)."""
    from .config import load_config
    from .workflows import resolve_config_path, run_training

    _threads()
    try:
        cfg = load_config(resolve_config_path(config), overrides or [])
        if resume and overwrite:
            raise ValueError("give --resume (continue the run) or --overwrite (replace it), not both")
        if push_to_hub and (cfg.train.mode != "distill" or cfg.model.kind in ("auto", "mlp", "convnet")):
            raise ValueError("--push-to-hub uploads LoRA runs (a diffusers model.kind with train.mode=distill)")
        result = run_training(cfg, resume=resume, overwrite=overwrite)
        if push_to_hub and int(os.environ.get("RANK", "0")) == 0:
            from .hub import push_to_hub as push_folder

            console.print(f"pushed to {push_folder(result.model_dir, push_to_hub)}")
    except USER_ERRORS as exc:
        _fail(exc)
    finally:
        end_distributed()
    console.print(f"model: [bold]{result.model_dir}[/]")


@app.command("eval")
def evaluate(
    arguments: Optional[List[str]] = typer.Argument(
        None, help="RUN (a LoRA training run) and/or config overrides as section.field=value."),
    teacher: Optional[Path] = typer.Option(None, "--teacher",
        help="Built-in models: teacher model directory (a pretrain run or its model/)."),
    student: Optional[Path] = typer.Option(None, "--student", help="Built-in models: student model directory (a distill run)."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Report directory."),
    config: Optional[str] = typer.Option(None, "--config", help="Config file for data and eval settings."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline",
        help="Any diffusers pipeline (local path or hub id) to evaluate with --lora (default: RUN's model.pretrained)."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="An exported SCFM LoRA folder (or a run) to evaluate on --pipeline."),
    prompts: Optional[Path] = typer.Option(None, "--prompts",
        help="Prompt file (.txt one per line, or .jsonl) for FID/CLIP evaluation of a LoRA."),
    steps: Optional[str] = typer.Option(None, "--steps", help="LoRA: student step counts, e.g. 1,2,4,8 (default: eval.sweep_steps)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="LoRA: folder of real images for fid_reference."),
    clip: Optional[str] = typer.Option(None, "--clip",
        help="LoRA: CLIP model folder or hub id for clip_score (e.g. openai/clip-vit-large-patch14)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights",
        help="LoRA: torch-fidelity Inception-v3 weights file (offline FID)."),
    no_fid: bool = typer.Option(False, "--no-fid", help="LoRA: skip FID (no torch-fidelity needed)."),
    num_prompts: int = typer.Option(512, "--num-prompts", help="LoRA: at most this many prompts (proving ground: held-out prompts)."),
    lora_scale: Optional[float] = typer.Option(None, "--lora-scale",
        help="LoRA: adapter scale of every student row (default: each step count's calibrated scale, else 1)."),
) -> None:
    """Step sweep with the same noise for every row. Built-in models (--teacher, --student): teacher Euler and
    Heun, student Euler, 1-32 steps. A LoRA (RUN, or --pipeline with --lora) with --prompts: FID against the
    teacher's 32-step images and a reference folder, CLIP score, seconds per image. A LoRA run on the t2i proving
    ground without --prompts: fd_data, fd_teacher, adherence on held-out prompts. Writes metrics.json, report.md, PNGs."""
    from .config import load_config
    from .workflows import resolve_config_path

    _threads(inference=True)
    arguments = list(arguments or [])
    run_dir = Path(arguments.pop(0)) if arguments and "=" not in arguments[0] else None
    try:
        if run_dir is not None or lora is not None:
            from .evaluation.lora_run import evaluate_lora_model

            report = evaluate_lora_model(run_dir, arguments, out=out, pipeline=pipeline, lora=lora, prompts=prompts,
                                         steps=_step_list(steps) if steps else None, reference=reference, clip=clip,
                                         inception_weights=inception_weights, no_fid=no_fid,
                                         num_prompts=num_prompts, lora_scale=lora_scale)
        else:
            from .models.builtin import load_model
            from .workflows import evaluate_models

            if teacher is None:
                raise ValueError("give RUN (a LoRA run), --pipeline with --lora, or --teacher DIR (built-in models)")
            data = load_model(teacher).info.data  # evaluate on the teacher's data unless an override says otherwise
            source = data.source or data.name
            cfg = load_config(resolve_config_path(config) if config else None, [f"data.source={source}", *arguments])
            report = evaluate_models(cfg, teacher, student, out)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print(report.markdown)
    console.print(f"report: [bold]{out / 'report.md'}[/]")


def _step_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--steps must be comma-separated step counts such as 1,2,4, got {text!r}") from None
    if not values:
        raise ValueError("--steps names no step count")
    return values


@app.command()
def sample(
    model: Path = typer.Argument(..., help="A training run, its model/ folder, or a folder with an exported LoRA."),
    steps: int = typer.Option(3, "--steps", help="Euler steps."),
    num: int = typer.Option(64, "--num", help="Built-in models: number of samples."),
    shift: Optional[float] = typer.Option(None, "--shift", help="Grid shift (default: 1 built-in, the family's for diffusers)."),
    label: Optional[int] = typer.Option(None, "--label", help="Built-in models: class label (default: classes in turn)."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="Diffusers LoRA: prompt(s), one image each."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="Diffusers LoRA: base pipeline (default: the run's model.pretrained)."),
    lora_scale: Optional[float] = typer.Option(None, "--lora-scale",
        help="Diffusers LoRA: adapter scale (default: the calibrated scale for --steps, else 1)."),
    seed: int = typer.Option(0, "--seed"),
    height: Optional[int] = typer.Option(None, "--height",
        help="Diffusers LoRA: pixels (default: the training cache's, else the pipeline's)."),
    width: Optional[int] = typer.Option(None, "--width",
        help="Diffusers LoRA: pixels (default: the training cache's, else the pipeline's)."),
    out: Path = typer.Option(Path("samples.npz"), "--out", help="Built-in: .npz (+ .png beside it); diffusers: image path."),
) -> None:
    """Sample with N Euler steps: a built-in model (samples in data space + a picture) or a stock diffusers
    pipeline with the exported SCFM LoRA loaded."""
    from .sampling import find_lora_dir, sample_builtin, sample_diffusers

    _threads()
    try:
        lora_dir = find_lora_dir(model)
        if lora_dir is not None:
            if not prompt:
                raise ValueError("a LoRA needs at least one --prompt")
            image_out = out if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") else out.with_suffix(".png")
            for name, size in (("--height", height), ("--width", width)):
                if size is not None and size <= 0:
                    raise ValueError(f"{name} must be a positive number of pixels, got {size}")
            written = sample_diffusers(lora_dir, pretrained=pipeline, prompts=list(prompt), steps=steps, shift=shift,
                                       lora_scale=lora_scale, seed=seed, out=image_out, height=height, width=width)
        else:
            if height is not None or width is not None:
                raise ValueError("--height/--width are for diffusers LoRAs; a built-in model samples its data's shape")
            written = sample_builtin(model, steps=steps, num=num, shift=1.0 if shift is None else shift,
                                     label=label, seed=seed, out=out)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print("wrote " + ", ".join(str(p) for p in written))


@app.command()
def prepare(
    pipeline: str = typer.Option(..., "--pipeline", help="The teacher pipeline: local path or hub id (a supported family)."),
    out: Path = typer.Option(..., "--out", help="Cache directory (data.source of the training config)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Teacher-made data: a prompt file (.txt one per line, or .jsonl)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Your images: a folder of images with same-name .txt captions."),
    steps: int = typer.Option(32, "--steps", help="Teacher sampling steps for --prompts."),
    height: Optional[int] = typer.Option(None, "--height", help="Pixels (default: the pipeline's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Pixels (default: the pipeline's)."),
    seed: int = typer.Option(0, "--seed", help="Base seed of the teacher's noise."),
    max_sequence_length: Optional[int] = typer.Option(
        None, "--max-sequence-length", help="Text tokens of the long text encoder (T5/Gemma; default: the pipeline's)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images instead of failing (after caching the good ones)."),
    records_per_shard: int = typer.Option(256, "--records-per-shard",
        help="Records per shard file (a killed run keeps every finished shard)."),
    buckets: bool = typer.Option(False, "--buckets",
        help="--images: aspect-ratio buckets of about --height x --width pixels (one cache per bucket under --out)."),
    num_frames: Optional[int] = typer.Option(None, "--num-frames",
        help="--prompts with a video model (Wan): frames per teacher video, 4k + 1 (default: the pipeline's, 81)."),
) -> None:
    """Encode once: latents and text embeddings (and the empty prompt) cached as safetensors shards."""
    from .preparation import PreparationError, prepare_from_folder, prepare_from_prompts
    from .sampling import load_pipeline

    if (prompts is None) == (images is None):
        _fail(ValueError("give exactly one of --prompts FILE or --images FOLDER"))
    if buckets and images is None:
        _fail(ValueError("--buckets is for --images (teacher-made data is sampled at one --height x --width)"))
    try:
        # the inputs first: a mistyped path must not cost a (possibly 30 GB) pipeline download
        from .preparation.inputs import list_image_captions, read_prompt_file

        read_prompt_file(prompts) if prompts is not None else list_image_captions(images)
        for name, size in (("--height", height), ("--width", width)):
            if size is not None and size <= 0:
                raise ValueError(f"{name} must be a positive number of pixels, got {size}")
        # several processes (torchrun / accelerate launch): each encodes its share into a part, rank 0 merges
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and buckets:
            raise ValueError("--buckets runs in one process (launch prepare without torchrun for a bucketed cache)")
        state = None
        if world > 1:
            from accelerate import PartialState

            import torch

            # as in the trainer: a CPU-only launch gets its gloo process group only with cpu=True
            state = PartialState(cpu=not torch.accelerator.is_available())
        rank = state.process_index if state else 0
        if num_frames is not None and (prompts is None or num_frames < 1 or num_frames % 4 != 1):
            raise ValueError(f"--num-frames {num_frames}: give 4k + 1 frames (e.g. 81), with --prompts "
                             "(a folder of images makes one-frame videos)")
        pipe = load_pipeline(pipeline, device=state.device if state else None)
        share = {"rank": rank, "world_size": world, "records_per_shard": records_per_shard}
        if prompts is not None:
            from .preparation import pipeline_family

            frames = {}
            if num_frames is not None:
                if not getattr(pipeline_family(pipe).latents, "keep_frames", False):
                    raise ValueError(f"--num-frames is for video pipelines (Wan); {pipeline} makes images")
                frames = {"pipeline_kwargs": {"num_frames": num_frames}}
            report = prepare_from_prompts(pipe, prompts, out, num_steps=steps, height=height, width=width, seed=seed,
                                          model_id=pipeline, max_sequence_length=max_sequence_length, **frames, **share)
        else:
            report = prepare_from_folder(pipe, images, out, height=height, width=width, model_id=pipeline,
                                         # several processes: every rank finishes and merges before bad inputs fail it
                                         on_error="skip" if skip_bad or state is not None else "raise",
                                         max_sequence_length=max_sequence_length, buckets=buckets, **share)
        if state is not None:
            from .preparation.parts import merge_parts

            state.wait_for_everyone()
            if state.is_main_process:
                report.num_records = merge_parts(out)
            state.wait_for_everyone()
            if report.failed and not skip_bad:
                raise PreparationError(report)
    except PreparationError as exc:
        _fail(exc)
    except USER_ERRORS as exc:
        _fail(exc)
    finally:
        end_distributed()
    if rank == 0:
        console.print(report.summary() + (f" (merged from {world} processes)" if world > 1 else ""))


@app.command("export-kohya")
def export_kohya_command(
    model: Path = typer.Argument(..., help="A Flux LoRA run, its model/ folder, or a folder with pytorch_lora_weights.safetensors."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: kohya_lora.safetensors beside the LoRA)."),
) -> None:
    """Write the Flux LoRA as a kohya/ComfyUI file (lora_unet_* keys, per-module alpha); diffusers reads it back."""
    from .models.diffusers.kohya import KOHYA_WEIGHTS, export_kohya
    from .sampling import LORA_WEIGHTS, find_lora_dir

    try:
        lora_dir = find_lora_dir(model)
        if lora_dir is None:
            raise FileNotFoundError(f"{model}: no {LORA_WEIGHTS} there or in its model/")
        family = _run_family(lora_dir)
        written = export_kohya(lora_dir / LORA_WEIGHTS, out or lora_dir / KOHYA_WEIGHTS, family=family)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print(f"wrote {written}")


def _run_family(lora_dir: Path) -> str:
    """The model family of an exported LoRA: its run's model.kind, else Flux if it has single blocks."""
    import yaml
    from safetensors import safe_open

    config_path = lora_dir.parent / "config.yaml"
    if config_path.is_file():
        return (yaml.safe_load(config_path.read_text()).get("model") or {}).get("kind", "")
    with safe_open(str(lora_dir / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        return "flux" if any(".single_transformer_blocks." in f".{k}" for k in handle.keys()) else "unknown"


@app.command()
def calibrate(
    run: Path = typer.Argument(..., help="A finished distillation run of a built-in network."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides, e.g. calibration.steps=[1,2,4]."),
) -> None:
    """Choose each step count's teacher-student scale (whose samples are closest to the training data) and store it
    beside the model; `sample` and `eval` then use it. Training runs this at its end already."""
    from .workflows import calibrate_run

    _threads(inference=True)
    try:
        calibration = calibrate_run(run, overrides or [])
    except USER_ERRORS as exc:
        _fail(exc)
    console.print("scales per step count (1 = the student as trained, 0 = the teacher): "
                  + ", ".join(f"{n}: {a:g}" for n, a in calibration.scales.items()))


@app.command()
def push(
    model: Path = typer.Argument(..., help="A LoRA run or its model/ folder."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, user-or-org/name (created if absent)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    kohya: bool = typer.Option(False, "--kohya", help="Flux: add the kohya/ComfyUI file to the upload."),
) -> None:
    """Upload the LoRA, its model card and (with --kohya) the ComfyUI file to the Hugging Face Hub."""
    from .hub import push_to_hub
    from .sampling import find_lora_dir

    try:
        lora_dir = find_lora_dir(model)
        if lora_dir is None:
            raise FileNotFoundError(f"{model}: no pytorch_lora_weights.safetensors there or in its model/")
        if kohya:
            from .models.diffusers.kohya import KOHYA_WEIGHTS, export_kohya

            export_kohya(lora_dir / "pytorch_lora_weights.safetensors", lora_dir / KOHYA_WEIGHTS, family=_run_family(lora_dir))
        url = push_to_hub(lora_dir, repo_id, private=private)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print(f"pushed {lora_dir} to {url}")


@app.command()
def bench(
    data: str = typer.Option(..., "--data", help="checkerboard or digits (data with a bundled teacher)."),
    methods: Optional[List[str]] = typer.Option(None, "--methods",
        help="Repeat to choose: scfm, progressive, consistency, reflow, shortcut, meanflow (default: all)."),
    solvers: Optional[List[str]] = typer.Option(None, "--solvers",
        help="Repeat to choose: euler, heun, midpoint, dpmsolver++, unipc (default: all)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="A named budget: checkerboard, digits or quick (default: the data's)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Output directory (report.md, metrics.json, a plot)."),
    workers: int = typer.Option(2, "--workers", help="Training runs in parallel, one torch thread each."),
) -> None:
    """SCFM against training-free solvers and other few-step methods: same teacher, data, optimizer steps,
    learning-rate search and checkpoint selection; metric against NFE."""
    from .baselines import BUDGETS, METHODS, SOLVERS, run_bench

    _threads()
    try:
        if budget is not None and budget not in BUDGETS:
            raise ValueError(f"--budget {budget!r}: choose one of {', '.join(BUDGETS)}")
        if data not in BUDGETS and budget is None:
            raise ValueError(f"--data {data!r}: the bench has budgets for checkerboard and digits; pass --budget")
        unknown = sorted(set(solvers or ()) - set(SOLVERS))
        if unknown:
            raise ValueError(f"--solvers: unknown {unknown}; choose from {', '.join(SOLVERS)}")
        summary = run_bench(data, out, methods=tuple(methods or METHODS), solvers=tuple(solvers or SOLVERS),
                            budget=BUDGETS[budget or data], workers=workers)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print((out / "report.md").read_text())
    console.print(f"report: [bold]{out / 'report.md'}[/] ({summary['seconds'] / 60:.1f} min)")


@app.command()
def demo(
    data: str = typer.Option("digits", "--data",
        help="digits, t2i (the text-to-image proving ground), a toy (checkerboard, 8gaussians, moons, spirals, rings) or a .npz file."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output directory."),
    teacher_steps: int = typer.Option(8000, "--teacher-steps", help="Flow-matching steps when no bundled teacher exists."),
    teacher: Optional[Path] = typer.Option(None, "--teacher",
        help="A trained teacher's model folder to distil (e.g. RUN/teacher/model of an earlier demo); default: the "
             "bundled teacher, else one trained here."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP + " Applied to the distillation."),
) -> None:
    """The whole story on the CPU: teacher, SCFM student, step sweep, report and figures."""
    from .workflows import run_demo

    sampling_threads = _threads()
    if data == "t2i":
        if teacher is not None:
            _fail(ValueError("--teacher is for built-in and .npz data; the t2i demo distils its bundled pipeline"))
        from .t2i.demo import run_t2i_demo
        from .workflows import cache_dir

        try:
            report = run_t2i_demo(out, overrides or [], cache_dir=cache_dir() / "t2i", sweep_threads=sampling_threads)
        except USER_ERRORS as exc:
            _fail(exc)
        finally:
            end_distributed()
        console.print(report.markdown)
        console.print(f"report: [bold]{report.out_dir / 'report.md'}[/]")
        return
    try:
        result = run_demo(data, out, overrides or [], teacher_steps=teacher_steps, teacher=teacher,
                          sweep_threads=sampling_threads)
    except USER_ERRORS as exc:
        _fail(exc)
    finally:
        end_distributed()
    console.print(result.report.markdown)
    console.print(f"report: [bold]{result.report.out_dir / 'report.md'}[/]")


world_app = typer.Typer(no_args_is_help=True, help="The t2i proving ground's procedural captioned-image world.")
app.add_typer(world_app, name="world")


@world_app.command("images")
def world_images(
    out: Path = typer.Argument(..., help="Folder to write NNNNNN.png images with same-stem .txt captions into."),
    count: int = typer.Option(1000, "--count", help="Number of images."),
    split: str = typer.Option("train", "--split", help="Scenes from: train, heldout or all."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Render captioned world images (what `shortcutfm prepare --images` reads)."""
    from .t2i import world

    try:
        world.write_image_folder(out, world.random_scenes(count, seed, split), seed)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print(f"wrote {count} images with captions to [bold]{out}[/]")


@world_app.command("prompts")
def world_prompts(
    out: Path = typer.Argument(..., help="Prompt file (.txt, one prompt per line) to write."),
    count: int = typer.Option(1000, "--count", help="Number of prompts."),
    split: str = typer.Option("train", "--split", help="Scenes from: train, heldout or all."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write world captions, one per line (what `shortcutfm prepare --prompts` reads)."""
    from .t2i import world

    try:
        texts = world.captions_for(world.random_scenes(count, seed, split), seed + 1)
    except USER_ERRORS as exc:
        _fail(exc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(texts) + "\n")
    console.print(f"wrote {count} prompts to [bold]{out}[/]")


@world_app.command("base")
def world_base(
    out: Path = typer.Argument(..., help="Pipeline folder to write (the VAE trained here, a random transformer)."),
    vae_steps: int = typer.Option(2500, "--vae-steps", help="Autoencoder training steps."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build the world's StableDiffusion3Pipeline: tokenizers, text encoders, a VAE trained on world renders,
    and an untrained transformer (train it with `shortcutfm train t2i-teacher`)."""
    from .t2i.pipeline import build_base_pipeline, save_pipeline, train_vae, vae_reconstruction_error

    _threads()
    vae = train_vae(steps=vae_steps, seed=seed)
    console.print(f"VAE reconstruction MSE on fresh renders: {vae_reconstruction_error(vae):.5f}")
    save_pipeline(build_base_pipeline(vae, seed=seed), out)
    console.print(f"pipeline: [bold]{out}[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
