"""The demo: a scaled-down reproduction of MoWE's first pool, against the base-only ablation, on CPU.

    python -m modeling_mowe.cli                       # or: mowe-demo; README command 1 runs it after set-up
    python -m modeling_mowe.cli --llm gemma-3-270m    # the converted Gemma-3-270M with LoRA instead (hours on CPU)
    python -m modeling_mowe.cli study --seeds 3       # the multi-seed study of every arm (`run_study`, docs/RESULTS.md)

Stages (each prints what it does; artefacts under --output-dir):
1. parts: the real pretrained encoders, converted from their PyPI packages on first use and cached
   (`modeling_mowe.convert`): Whisper-base (multilingual) as the base encoder, 4 x Whisper-tiny.en as the weak
   pool; the LLM is a small Llama trained from scratch (or the converted Gemma-3-270M with `--llm gemma-3-270m`);
2. the benchmark: espeak-ng speech + generated beeps, five tasks, held-out test clips (100 per task by default);
3. alignment, shared by both arms: a base-only model (frozen Whisper-base, fresh projector, the LLM) trained on the
   training split, so that the LLM reads audio tokens at all; cached;
4. two arms, each fine-tuned from the aligned model with TRL's SFTTrainer, with the same steps, seed, data order,
   learning rate and trainable LLM/projector policy; the base encoder stays frozen, as in the paper:
   - MoWE: `router_type="both"`, top-1 per router; the weak pool and routers fresh and trained; its projector
     starts as the aligned one with zero weights on the weak features, so both arms start as the same function;
   - base-only: `router_type="none"`;
5. both evaluated on the held-out clips (WER for ASR, accuracy elsewhere) with paired bootstrap intervals;
6. the MoWE model saved as a Hub-ready folder, reloaded with AutoModel/AutoProcessor(trust_remote_code=True),
   answering one held-out clip per task; plots: loss curves, the routers' choices per task.

The frozen base encoder encodes each clip once for the whole run, not once per step and arm: one
`feature_cache.FrozenFeatureStore` serves the alignment, both arms and their evaluation (`make_sft_trainer`'s
`cache_frozen_base`). In `dynamic_audio_length` mode the processor computes log-mels only as long as each batch's
longest clip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

SCRATCH_TOKENIZER = Path(__file__).resolve().parent.parent / "hub_configs" / "mowe-tiny-random"
LLM_CHOICES = ("scratch", "gemma-3-270m")


@dataclass
class DemoSettings:
    """What the demo builds and how long it trains; the main ones have a command-line flag (see `main`)."""

    output_dir: Path
    seed: int = 0
    llm: str = "scratch"
    base_encoder: str = "whisper-base"
    weak_encoders: tuple[str, ...] = ("whisper-tiny.en",) * 4
    align_steps: int = 1200
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 3e-4
    train_per_task: int = 480
    test_per_task: int = 100
    bootstrap_samples: int = 2000
    benchmark: object | None = None  # a data.BenchmarkConfig overriding train_per_task/test_per_task
    scratch_llm: dict = field(
        default_factory=lambda: {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4}
    )

    def __post_init__(self):
        if self.llm not in LLM_CHOICES:
            raise ValueError(f"llm must be one of {LLM_CHOICES}, got {self.llm!r}.")


def log(message: str) -> None:
    print(f"[mowe-demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ stage 1: parts


def prepare_parts(settings: DemoSettings) -> dict[str, Path | list[Path]]:
    """Folders of the converted encoders and of the LLM (`{"base_encoder", "weak_encoders", "text_model"}`),
    converting or building each one on first use."""
    from .convert import pretrained_folder

    base = pretrained_folder(settings.base_encoder)
    weak = [pretrained_folder(name) for name in settings.weak_encoders]
    text_model = scratch_llm_folder(settings) if settings.llm == "scratch" else pretrained_folder(settings.llm)
    return {"base_encoder": base, "weak_encoders": weak, "text_model": text_model}


def scratch_llm_folder(settings: DemoSettings) -> Path:
    """A small Llama with random weights (seeded) and the demo's 640-token tokenizer, saved once under the cache."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SCRATCH_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer), num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **settings.scratch_llm,
    )
    folder = settings.output_dir / "cache" / f"llm-scratch-{_fingerprint([config.to_dict(), settings.seed])}"
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(settings.seed)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def _fingerprint(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_model(settings: DemoSettings, parts: dict, router_type: str):
    """`(model, processor)` composed from the pretrained parts."""
    from . import MoWEForConditionalGeneration, MoWEProcessor

    torch.manual_seed(settings.seed)
    weak = parts["weak_encoders"] if router_type != "none" else []
    # Whisper would pad every 1-3 s clip to 30 s; encoding only the clip is ~15x cheaper. The frozen base then
    # sees shorter inputs than in its pretraining (its features move, cosine 0.9); both arms see the same ones.
    kwargs = {"router_type": router_type, "dynamic_audio_length": True}
    processor = MoWEProcessor.from_components(parts["base_encoder"], weak, parts["text_model"], **kwargs)
    model = MoWEForConditionalGeneration.from_components(
        parts["base_encoder"], weak, parts["text_model"], processor=processor, **kwargs,
        component_checkpoints=describe_parts(settings, with_weak_pool=bool(weak)),
    )
    return model, processor


def describe_parts(settings: DemoSettings, with_weak_pool: bool) -> dict:
    """`component_checkpoints` for the model card: each part's source packages and licence."""
    from .convert import component_checkpoints

    weak = settings.weak_encoders if with_weak_pool else ()
    if settings.llm != "scratch":
        return component_checkpoints(settings.base_encoder, weak, settings.llm)
    described = component_checkpoints(settings.base_encoder, weak, None)
    described["text_model"] = f"a Llama trained from scratch by the mowe-audio demo ({settings.scratch_llm})"
    described["licenses"]["text_model"] = "Apache-2.0 (this project's own weights)"
    return described


# ------------------------------------------------------------------------------------ stages 3-4: training


def sft_config(settings: DemoSettings, output_dir: Path, steps: int, learning_rate: float):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        # Batches of similar durations: less padding for the encoders (the same order in both arms: same seed).
        train_sampling_strategy="group_by_length",
        length_column_name="duration",
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, steps // 50),
        save_strategy="no",
        report_to="none",
        bf16=False,  # CPU: fp32 (TRL's default bf16 needs a GPU)
        gradient_checkpointing=False,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_pin_memory=False,
        max_length=None,
        use_cpu=not torch.cuda.is_available(),
    )


def train(
    settings: DemoSettings, name: str, model, processor, train_split, steps: int, learning_rate: float, feature_store,
    fresh_learning_rate: float | None = None,
) -> tuple[nn.Module, dict]:
    """Fine-tune `model` for `steps`; returns it (LoRA merged) and its parameter counts, time and log history.

    The policy, the same for every run: base encoder frozen (its features served from `feature_store`, a
    `FrozenFeatureStore` shared by the runs); weak pool, routers and projector trained; a from-scratch LLM trained
    in full, a pretrained one with LoRA. With `fresh_learning_rate`, the parts that start from scratch in a MoWE arm
    (routers, weak projections) train at that rate (`training.set_fresh_learning_rate`)."""
    from .training import make_sft_trainer, set_fresh_learning_rate

    lora = settings.llm != "scratch"
    trainer = make_sft_trainer(
        model, processor, sft_config(settings, settings.output_dir / "runs" / name, steps, learning_rate), train_split,
        use_lora=lora, train_language_model=not lora, cache_frozen_base=feature_store,
    )
    if fresh_learning_rate is not None:
        set_fresh_learning_rate(trainer, fresh_learning_rate)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    log(f"training {name}: {steps} steps of {settings.batch_size} clips, {trainable:,} of {total:,} parameters")
    start = time.perf_counter()
    trainer.train()
    stats = {
        "trainable": trainable, "total": total, "seconds": round(time.perf_counter() - start, 1),
        "history": trainer.state.log_history,
    }
    return (trainer.model.merge_and_unload() if lora else model), stats


ALIGNED_PARTS = ("model.language_model.", "lm_head.", "model.multi_modal_projector.")


def align(settings: DemoSettings, parts: dict, train_split, feature_store) -> tuple[dict, dict]:
    """Stage 3: train a base-only model (LLM and fresh projector; base frozen) on the training split. Returns the
    aligned LLM + projector weights and the run's stats; both are cached on disk."""
    from safetensors.torch import load_file, save_file

    arms_only = {"output_dir": None, "steps": None, "finetune_learning_rate": None, "bootstrap_samples": None}
    key = _fingerprint([asdict(settings) | arms_only, len(train_split)])
    cache = settings.output_dir / "cache" / f"aligned-{key}"
    if (cache / "aligned.safetensors").exists():
        log(f"stage 3: reusing the aligned base-only model from {cache}")
        return load_file(str(cache / "aligned.safetensors")), json.loads((cache / "stats.json").read_text())
    log(f"stage 3: alignment: base-only, {settings.align_steps} steps (the LLM learns to read audio tokens)")
    model, processor = build_model(settings, parts, "none")
    model, stats = train(
        settings, "alignment", model, processor, train_split, settings.align_steps, settings.learning_rate,
        feature_store,
    )
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(ALIGNED_PARTS)}  # untied copies
    cache.mkdir(parents=True, exist_ok=True)
    save_file(state, str(cache / "aligned.safetensors"))
    (cache / "stats.json").write_text(json.dumps(stats))
    return state, stats


def start_from_aligned(model: nn.Module, aligned: dict[str, torch.Tensor], weak_init_scale: float = 0.0) -> None:
    """Load the aligned LLM and projector into `model`. A MoWE projector is wider (its input frames hold the base
    features, then the routed weak blocks): its base columns get the aligned weights and its weak columns zeros,
    so the model starts as exactly the aligned base-only function and the weak pool's share grows from there.

    `weak_init_scale > 0` starts the weak columns at random instead, with `weak_init_scale` times the standard
    deviation of the aligned base columns: the start moves slightly off the aligned function, but the LM loss
    reaches the weak encoders and routers from the first step (through zero columns it does not)."""
    state = dict(aligned)
    key = "model.multi_modal_projector.linear_1.weight"
    projector = model.get_submodule("model.multi_modal_projector")
    base_width = model.get_encoder(modality="audio").base_hidden_size
    frame_width = projector.linear_1.in_features // projector.stack_factor
    weight = torch.zeros_like(projector.linear_1.weight)  # [hidden, stack_factor * frame_width]
    if weak_init_scale > 0 and frame_width > base_width:
        weight.normal_(0.0, weak_init_scale * float(state[key].std()))
    for k in range(projector.stack_factor):
        weight[:, k * frame_width : k * frame_width + base_width] = state[key][:, k * base_width : (k + 1) * base_width]
    state[key] = weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(ALIGNED_PARTS) for k in missing):
        raise RuntimeError(f"aligned weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


# ------------------------------------------------------------------------------------ stage 6: routing and plots


def routing_by_task(model, processor, dataset, per_task: int = 50) -> dict:
    """Fraction of test windows each router sent to each weak encoder, per task (rows sum to `router_top_k`), over
    the first `per_task` clips of each task."""
    from .evaluation import prompt_messages

    tower = model.get_encoder(modality="audio")
    table = {router: {} for router in tower.routers}
    for task in sorted(set(dataset["task"])):
        rows = dataset.filter(lambda t, task=task: t == task, input_columns="task")
        rows = rows.select(range(min(per_task, len(rows))))
        inputs = processor.apply_chat_template(
            [prompt_messages(r) for r in rows], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", padding=True,
        )
        with torch.no_grad():
            selected = model(**inputs).router_indices  # [windows, routers, top_k]
        chosen = torch.nn.functional.one_hot(selected, len(tower.weak_encoders)).sum(-2).float().mean(0)
        for r, router in enumerate(tower.routers):
            table[router][task] = chosen[r].tolist()  # [weak encoders]
    return table


def save_figure(fig, path: Path) -> Path:
    """Lay out `fig`, write it to `path` (PNG, 120 dpi) and close it; returns `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_plots(histories: dict[str, list[dict]], routing: dict, encoder_names: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set(xlabel="step", ylabel="training loss", title="Alignment, then the two arms", yscale="log")
    ax.legend()
    paths = [save_figure(fig, out / "loss_curves.png")]

    fig, axes = plt.subplots(1, len(routing), figsize=(5 * len(routing), 3.6), squeeze=False)
    for ax, (router, per_task) in zip(axes[0], routing.items()):
        tasks = list(per_task)
        grid = [per_task[t] for t in tasks]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(encoder_names)), encoder_names, rotation=30, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_title(f"{router} router: chosen encoder")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    paths.append(save_figure(fig, out / "routing_by_task.png"))
    return paths


# ------------------------------------------------------------------------------------------------------ the demo


def run_demo(settings: DemoSettings) -> dict:
    """All demo stages; returns the summary (results, intervals, timings, artefact paths, reloaded answers)."""
    from .data import BenchmarkConfig, build_benchmark
    from .training.feature_cache import FrozenFeatureStore

    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    log(f"stage 1: pretrained parts: base {settings.base_encoder}, weak pool {list(settings.weak_encoders)}, "
        f"LLM {settings.llm}")
    parts = prepare_parts(settings)
    lap("parts")

    bench_config = settings.benchmark or BenchmarkConfig(
        seed=settings.seed, train_per_task=settings.train_per_task, validation_per_task=0,
        test_per_task=settings.test_per_task,
    )
    log("stage 2: benchmark (espeak-ng speech + generated beeps)")
    splits = build_benchmark(out / "cache" / "benchmark", bench_config)
    log("         " + ", ".join(f"{name}: {len(split)} rows" for name, split in splits.items()))
    lap("benchmark")

    feature_store = FrozenFeatureStore()  # in memory: the demo's clips take ~0.5 GB of Whisper-base features
    aligned, training = align(settings, parts, splits["train"], feature_store)
    training = {"alignment": training}
    lap("alignment")

    arms = {}
    for name, router_type in (("MoWE", "both"), ("base-only", "none")):
        log(f"stage 4: fine-tuning {name} from the aligned model")
        model, processor = build_model(settings, parts, router_type)
        start_from_aligned(model, aligned)
        model, training[name] = train(
            settings, name, model, processor, splits["train"], settings.steps, settings.finetune_learning_rate,
            feature_store,
        )
        arms[name] = (model.eval(), processor)
        lap(f"train {name}")
    (out / "training.json").write_text(json.dumps(training, indent=1))

    results, intervals = evaluate_arms(settings, arms, splits["test"])
    lap("evaluate")

    log("stage 6: save the MoWE model (Hub-ready folder with its card), reload it with AutoModel/AutoProcessor")
    mowe, processor = arms["MoWE"]
    routing = routing_by_task(mowe, processor, splits["test"])
    tower = mowe.get_encoder(modality="audio")
    model_dir = out / "mowe-model"
    examples = publish_and_answer(mowe, processor, splits["test"], out / "results.json", model_dir)
    encoder_names = [f"{i}:{c.model_type}" for i, c in enumerate(tower.config.weak_encoder_configs)]
    # The arms continue from the alignment's last step.
    histories = {
        name: [{**h, "step": h["step"] + (0 if name == "alignment" else settings.align_steps)} for h in t["history"]]
        for name, t in training.items()
    }
    plots = draw_plots(histories, routing, encoder_names, out)
    lap("publish, reload, plots")

    summary = {
        "results": {name: r["summary"] for name, r in results.items()},
        "intervals": intervals,
        "routing": routing,
        "seconds": seconds,
        "files": {"results": [str(out / "results.json"), str(out / "results.md")], "model": str(model_dir),
                  "plots": [str(p) for p in plots]},
        "examples": examples,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\nStage times (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    print("Artefacts:")
    for path in [out / "results.md", model_dir, *plots, out / "training.json", out / "summary.json"]:
        print(f"  {path}")
    return summary


def evaluate_arms(settings: DemoSettings, arms: dict, test) -> tuple[dict, dict]:
    """Score every arm on `test`, print and write the table with paired bootstrap intervals."""
    from .evaluation import bootstrap_intervals, evaluate_model, results_table_markdown, write_results

    log(f"stage 5: evaluating both arms on {len(test)} held-out test clips")
    results = {name: evaluate_model(model, processor, test) for name, (model, processor) in arms.items()}
    intervals = bootstrap_intervals(results, samples=settings.bootstrap_samples, seed=settings.seed)
    print("\n" + results_table_markdown(results, intervals=intervals) + "\n", flush=True)
    print("\n".join(difference_verdicts(intervals, reference=list(results)[-1])) + "\n", flush=True)
    scores = {name: {k: v for k, v in r.items() if k != "predictions"} for name, r in results.items()}
    write_results(scores, settings.output_dir, intervals=intervals)
    predictions = [
        {"task": row["task"], "reference": row["answer"], **{name: r["predictions"][i] for name, r in results.items()}}
        for i, row in enumerate(test.remove_columns("audio"))
    ]
    (settings.output_dir / "predictions.json").write_text(json.dumps(predictions, indent=1, ensure_ascii=False))
    return results, intervals


def publish_and_answer(model, processor, test, results_json: Path, model_dir: Path) -> list[dict[str, str]]:
    """Publish `model` as a Hub folder (a held-out clip as its example), reload it from there as a user would, and
    answer one held-out clip per task."""
    from .data import load_audio
    from .handler import answer, load
    from .publishing import build_hub_folder

    picked = _one_per_task(test)
    example = test[picked[0]]
    wave, rate = load_audio(example["audio"])
    build_hub_folder(
        model, processor, model_dir, results=results_json, example_audio=wave, example_sampling_rate=rate,
        example_question=example["prompt"], model_name="mowe-demo", overwrite=True,
    )
    reloaded, reloaded_processor = load(str(model_dir))
    examples = []
    for index in picked:
        row = test[index]
        wave, rate = load_audio(row["audio"])
        text = answer(reloaded, reloaded_processor, wave, row["prompt"], rate, max_new_tokens=24)
        examples.append({"task": row["task"], "question": row["prompt"], "reference": row["answer"], "answer": text})
        print(f"  [{row['task']}] Q: {row['prompt']}\n      reference: {row['answer']}\n      MoWE:      {text}")
    return examples


def _one_per_task(dataset) -> list[int]:
    first: dict[str, int] = {}
    for index, task in enumerate(dataset["task"]):
        first.setdefault(task, index)
    return list(first.values())


# ------------------------------------------------------------------------------------------------- the study

STUDY_ARMS = (
    ("base-only", "none"),
    ("MoWE", "both"),
    ("MoWE data-dependent", "data_dependent"),
    ("MoWE data-independent", "data_independent"),
)
"""The study's arms (name, router_type): base-only is the reference; the three MoWE arms are the paper's ablation."""

WER_ROWS = ("asr",)
"""Rows whose metric is a word error rate (lower is better)."""


@dataclass
class StudySettings(DemoSettings):
    """The demo's parts, and the study's protocol (docs/RESULTS.md, "Study protocol")."""

    seeds: int = 3
    steps: int = 200
    test_per_task: int = 200
    tasks: tuple[str, ...] = ()  # () = every task of `data.TASKS`, emotion included
    fresh_learning_rate: float | None = 3e-3
    weak_init_scale: float = 0.1
    data_seed: int = 0


def difference_verdicts(intervals: dict, reference: str) -> list[str]:
    """One line per row and difference to `reference`: its 95% interval and whether it says better, worse or
    "within noise" (the interval holds zero). WER differences: lower is better."""
    lines = []
    for row, bounds in intervals.items():
        for key, (low, high) in bounds.items():
            if not key.endswith(f" - {reference}"):
                continue
            if low <= 0 <= high:
                verdict = "within noise"
            else:
                verdict = "better" if (high < 0) == (row in WER_ROWS) else "worse"
            lines.append(f"{row:14s} {key}: [{low:+.3f}, {high:+.3f}] {verdict}")
    return lines


def pool_seeds(per_seed: list[dict]) -> dict:
    """One `score_predictions`-shaped result per arm over every seed's clips (per-example scores concatenated in the
    same order for every arm), for a paired bootstrap over (seed, clip)."""
    from .evaluation import task_score

    pooled = {}
    for arm in per_seed[0]:
        tasks = {}
        for task, first in per_seed[0][arm]["tasks"].items():
            pairs = [pair for seed in per_seed for pair in seed[arm]["tasks"][task]["per_example"]]
            value = sum(a for a, _ in pairs) / max(sum(b for _, b in pairs), 1)
            tasks[task] = {"metric": first["metric"], "value": value, "n": len(pairs), "per_example": pairs}
        accuracies = [t["value"] for t in tasks.values() if t["metric"] == "accuracy"]
        pooled[arm] = {"tasks": tasks, "summary": {
            "asr_wer": tasks["asr"]["value"] if "asr" in tasks else None,
            "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            "average_score": sum(task_score(t) for t in tasks.values()) / len(tasks),
            "n": sum(t["n"] for t in tasks.values()),
        }}
    return pooled


def seed_statistics(per_seed: list[dict], reference: str) -> dict:
    """Per arm and row (each task's metric, and the average score): the values over seeds, their mean and standard
    deviation; for the other arms also the difference to `reference` in each seed and whether it favours the arm in
    every seed (lower WER, higher accuracy)."""
    import numpy as np

    def values(result: dict) -> dict[str, float]:
        return {**{t: r["value"] for t, r in result["tasks"].items()},
                "average_score": result["summary"]["average_score"]}

    table: dict = {}
    for arm in per_seed[0]:
        rows = [values(seed[arm]) for seed in per_seed]
        table[arm] = {}
        for row in rows[0]:
            v = np.array([r[row] for r in rows])
            entry = {"values": v.round(4).tolist(), "mean": round(float(v.mean()), 4),
                     "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)}
            if arm != reference:
                diff = v - np.array([values(seed[reference])[row] for seed in per_seed])
                better = diff < 0 if row in WER_ROWS else diff > 0
                entry |= {"differences": diff.round(4).tolist(), "better_in_every_seed": bool(better.all())}
            table[arm][row] = entry
    return table


def study_markdown(per_seed: list[dict], statistics: dict, pooled: dict, intervals: dict, reference: str) -> str:
    """The study's report: per-seed tables, mean ± sd over seeds, the pooled table with intervals and verdicts."""
    from .evaluation import results_table_markdown

    parts = ["# MoWE study: every arm against base-only, several seeds\n"]
    for seed, results in enumerate(per_seed):
        parts += [f"## Seed {seed}\n", results_table_markdown(results)]
    parts.append(f"## Mean ± sd over seeds (in brackets: the difference to {reference} per seed; ✓ = better in every "
                 "seed)\n")
    arms = list(statistics)
    lines = ["| row | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for row in statistics[reference]:
        cells = []
        for arm in arms:
            entry = statistics[arm][row]
            cell = f"{entry['mean']:.3f} ± {entry['sd']:.3f}"
            if "differences" in entry:
                cell += " (" + ", ".join(f"{d:+.3f}" for d in entry["differences"]) + ")"
                cell += " ✓" if entry["better_in_every_seed"] else ""
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines) + "\n")
    parts += [f"## Pooled over seeds: paired bootstrap over (seed, clip), differences to {reference}\n",
              results_table_markdown(pooled, intervals=intervals),
              "```\n" + "\n".join(difference_verdicts(intervals, reference)) + "\n```\n"]
    return "\n".join(parts)


def draw_study_plots(pooled: dict, intervals: dict, histories: dict, reference: str, out: Path) -> list[Path]:
    """`study_differences.png`: each row's pooled difference to `reference` in score units (accuracy, or -WER) with
    its 95% interval, per arm; `routing_over_steps.png`: per-encoder usage and routing entropy over the training
    steps of each MoWE arm (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*pooled[reference]["tasks"], "average_score"]
    arms = [a for a in pooled if a != reference]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    for k, arm in enumerate(arms):
        x = [i + (k - (len(arms) - 1) / 2) * 0.2 for i in range(len(rows))]
        points, errors = [], [[], []]
        for row in rows:
            sign = -1.0 if row in WER_ROWS else 1.0
            if row == "average_score":
                value = pooled[arm]["summary"][row] - pooled[reference]["summary"][row]
            else:
                value = pooled[arm]["tasks"][row]["value"] - pooled[reference]["tasks"][row]["value"]
            low, high = sorted(sign * b for b in intervals[row][f"{arm} - {reference}"])
            points.append(sign * value)
            errors[0].append(max(sign * value - low, 0.0))
            errors[1].append(max(high - sign * value, 0.0))
        ax.errorbar(x, points, yerr=errors, fmt="o", capsize=3, label=arm)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"{r} (-WER)" if r in WER_ROWS else r for r in rows], rotation=20)
    ax.set(ylabel=f"score difference to {reference}", title="Pooled over seeds, 95% paired bootstrap intervals")
    ax.legend(fontsize=8)
    paths = [save_figure(fig, out / "study_differences.png")]

    fig, axes = plt.subplots(2, max(1, len(histories)), figsize=(4.5 * max(1, len(histories)), 6), squeeze=False)
    for column, (arm, history) in enumerate(histories.items()):
        logged = [h for h in history if any(k.startswith("routing/") for k in h)]
        steps = [h["step"] for h in logged]
        keys = sorted({k for h in logged for k in h if k.startswith("routing/") and k != "routing/aux_loss"})
        for key in keys:
            target = axes[1][column] if key.endswith("/entropy") else axes[0][column]
            target.plot(steps, [h.get(key, float("nan")) for h in logged], label=key.removeprefix("routing/"))
        axes[0][column].set(title=arm, ylabel="fraction of clips per weak encoder", ylim=(0, 1))
        axes[1][column].set(xlabel="step", ylabel="routing entropy (nats)")
        for ax in axes[:, column]:
            ax.legend(fontsize=6)
    paths.append(save_figure(fig, out / "routing_over_steps.png"))
    return paths


def run_study(settings: StudySettings) -> dict:
    """Every arm of `STUDY_ARMS` for `settings.seeds` seeds on one benchmark (the same held-out clips in every seed):
    per seed, a base-only alignment and each arm fine-tuned from it with the same steps, data order and recipe;
    evaluation on the test split; statistics over seeds and a paired bootstrap over clips pooled across seeds."""
    import dataclasses

    from .data import TASKS, BenchmarkConfig, build_benchmark
    from .evaluation import bootstrap_intervals, evaluate_model
    from .training.feature_cache import FrozenFeatureStore

    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench_config = settings.benchmark or BenchmarkConfig(
        seed=settings.data_seed, tasks=settings.tasks or TASKS, train_per_task=settings.train_per_task,
        validation_per_task=0, test_per_task=settings.test_per_task,
    )
    log(f"study: {settings.seeds} seeds x {len(STUDY_ARMS)} arms, tasks {list(bench_config.tasks)}")
    splits = build_benchmark(out / "cache" / "benchmark", bench_config, progress=False)
    feature_store = FrozenFeatureStore()  # the frozen base encoder's frames, shared by every seed and arm
    per_seed, histories, seconds = [], {}, {}
    for seed in range(settings.seeds):
        seed_settings = dataclasses.replace(settings, seed=seed, output_dir=out / f"seed-{seed}")
        parts = prepare_parts(seed_settings)
        aligned, _ = align(seed_settings, parts, splits["train"], feature_store)
        results = {}
        for name, router_type in STUDY_ARMS:
            log(f"study seed {seed}: {name}")
            model, processor = build_model(seed_settings, parts, router_type)
            start_from_aligned(model, aligned, weak_init_scale=settings.weak_init_scale)
            model, stats = train(
                seed_settings, name, model, processor, splits["train"], settings.steps,
                settings.finetune_learning_rate, feature_store, fresh_learning_rate=settings.fresh_learning_rate,
            )
            if seed == 0 and router_type != "none":
                histories[name] = stats["history"]
            results[name] = evaluate_model(model.eval(), processor, splits["test"], progress=False)
            results[name].pop("predictions")
        per_seed.append(results)
        seconds[f"seed {seed}"] = round(time.perf_counter() - started, 1)
        (out / "per_seed.json").write_text(json.dumps(per_seed))

    reference = STUDY_ARMS[0][0]
    pooled = pool_seeds(per_seed)
    intervals = bootstrap_intervals(pooled, reference=reference, samples=settings.bootstrap_samples, seed=0)
    statistics = seed_statistics(per_seed, reference)
    markdown = study_markdown(per_seed, statistics, pooled, intervals, reference)
    (out / "study.md").write_text(markdown)
    plots = draw_study_plots(pooled, intervals, histories, reference, out)
    print("\n" + markdown, flush=True)
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items() if k != "benchmark"},
        "benchmark": bench_config.to_dict(), "statistics": statistics, "intervals": intervals,
        "verdicts": difference_verdicts(intervals, reference), "seconds": seconds,
        "files": [str(out / "study.md"), str(out / "per_seed.json"), *map(str, plots)],
    }
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    log(f"study done in {time.perf_counter() - started:.0f} s: {out / 'study.md'}")
    return summary


def study_main(argv: list[str] | None = None) -> dict:
    """`python -m modeling_mowe.cli study --seeds 3`: the multi-seed study (docs/RESULTS.md, "Study protocol")."""
    defaults = StudySettings(output_dir=Path("outputs/study"))
    parser = argparse.ArgumentParser(prog="python -m modeling_mowe.cli study", description=run_study.__doc__)
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir)
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--align-steps", type=int, default=defaults.align_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning steps of each arm")
    parser.add_argument("--train-per-task", type=int, default=defaults.train_per_task)
    parser.add_argument("--test-per-task", type=int, default=defaults.test_per_task)
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: a standard deviation over seeds needs two")
    return run_study(StudySettings(**vars(args)))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["study"]:
        return study_main(argv[1:])
    defaults = DemoSettings(output_dir=Path("outputs/demo"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--llm", choices=LLM_CHOICES, default=defaults.llm,
                        help="a small Llama trained from scratch, or the converted Gemma-3-270M with LoRA")
    parser.add_argument("--align-steps", type=int, default=defaults.align_steps,
                        help="steps of the shared base-only alignment")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning steps of each arm")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="of the alignment")
    parser.add_argument("--finetune-learning-rate", type=float, default=defaults.finetune_learning_rate,
                        help="of both arms")
    parser.add_argument("--train-per-task", type=int, default=defaults.train_per_task)
    parser.add_argument("--test-per-task", type=int, default=defaults.test_per_task)
    args = parser.parse_args(argv)
    return run_demo(DemoSettings(**vars(args)))


if __name__ == "__main__":
    main()
