"""The demo: MoWE vs the base-only ablation on the self-made multi-task speech benchmark, end to end on CPU.

    python -m modeling_mowe.cli                # or: mowe-demo; README command 1 runs it after set-up
    python -m modeling_mowe.cli --scale 3      # more data and steps

Stages (each prints what it does; artefacts under --output-dir):
1. build (or reuse) the benchmark: espeak-ng speech + generated beeps, train / validation / held-out test;
2. pretrain the base: a short ASR-only run of a base-only model (base encoder + projector + LLM all trained),
   cached; its base encoder and LLM stand in for pretrained Whisper + LLM. The base encoder is then FROZEN in both
   arms, as in the paper (a strong encoder with limited capacity for new tasks);
3. fine-tune multi-task with TRL's SFTTrainer, two arms with the same budget, seed, data order and learning rate:
   - MoWE: router_type="both" (4 weak encoders: 2 Whisper-style, 2 HuBERT-style, top-1 per router);
   - base-only: router_type="none";
   both train the projector (fresh) and the LLM (from the pretraining); MoWE also trains its weak pool + routers;
4. evaluate both on the held-out test split (WER for ASR, accuracy elsewhere) and print the side-by-side table;
5. save the MoWE model, reload it with AutoModel/AutoProcessor(trust_remote_code=True) and answer 3 test clips;
6. draw the loss curves of both arms and the router choices per task (PNG).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_PRESET = Path(__file__).resolve().parent.parent / "hub_configs" / "mowe-tiny-random"


@dataclass
class DemoSettings:
    output_dir: Path
    scale: float = 1.0
    seed: int = 0
    pretrain_steps: int = 1500
    finetune_steps: int = 700
    batch_size: int = 16
    learning_rate: float = 2e-3
    eval_limit: int | None = None
    preset: Path = TINY_PRESET
    benchmark: object | None = None  # a data.BenchmarkConfig; default: BenchmarkConfig(seed=seed, scale=scale)

    def steps(self, base: int) -> int:
        return max(1, round(base * self.scale))


def log(message: str) -> None:
    print(f"[mowe-demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sft_config(settings: DemoSettings, output_dir: Path, max_steps: int):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, max_steps // 50),
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_pin_memory=False,
        max_length=None,
    )


def demo_config(settings: DemoSettings, router_type: str):
    from . import MoWEConfig

    # The demo's clips are 0.4-4 s: encoding only their real length (not Whisper's 30 s) is ~7x cheaper.
    return MoWEConfig.from_pretrained(settings.preset, router_type=router_type, dynamic_audio_length=True)


def pretrain_base(settings: DemoSettings, processor, train_split) -> dict[str, dict[str, torch.Tensor]]:
    """ASR-only pretraining of a base-only model; returns (and caches) its base encoder and LLM weights."""
    from safetensors.torch import load_file, save_file

    from . import MoWEForConditionalGeneration
    from .training import make_sft_trainer

    steps = settings.steps(settings.pretrain_steps)
    key = json.dumps(
        {"steps": steps, "bs": settings.batch_size, "lr": settings.learning_rate, "seed": settings.seed,
         "rows": len(train_split), "preset": (settings.preset / "config.json").read_text()},
        sort_keys=True,
    )
    cache = settings.output_dir / "cache" / f"pretrained-base-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    parts = ("base_encoder", "language_model")
    if all((cache / f"{p}.safetensors").exists() for p in parts):
        log(f"stage 2: reusing the pretrained base from {cache}")
        return {p: load_file(str(cache / f"{p}.safetensors")) for p in parts}

    asr = english_speech_as_asr(train_split)
    log(f"stage 2: ASR-only pretraining of the base ({steps} steps on {len(asr)} English training clips)")
    torch.manual_seed(settings.seed)
    model = MoWEForConditionalGeneration(demo_config(settings, "none"))
    trainer = make_sft_trainer(
        model, processor, sft_config(settings, cache / "run", steps), asr,
        train_language_model=True, train_base_encoder=True,
    )
    trainer.train()
    weights = {
        "base_encoder": model.get_encoder(modality="audio").base_encoder.state_dict(),
        "language_model": model.get_decoder().state_dict(),
    }
    cache.mkdir(parents=True, exist_ok=True)
    for part, state in weights.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(cache / f"{part}.safetensors"))
    return weights


def english_speech_as_asr(split):
    """Every English training utterance (the ASR, gender and rate tasks speak the same grammar) as an ASR example:
    what a pretrained Whisper has seen plenty of. Training split only, so the held-out sentences stay unseen."""
    from .data import TASK_PROMPTS, chat_messages

    speech = split.filter(lambda lang, text: lang == "english" and bool(text), input_columns=["language", "sentence"])
    return speech.map(
        lambda text: {"task": "asr", "messages": chat_messages(TASK_PROMPTS["asr"], text), "answer": text},
        input_columns="sentence",
    )


def build_arm(settings: DemoSettings, router_type: str, pretrained: dict):
    from . import MoWEForConditionalGeneration

    torch.manual_seed(settings.seed)
    model = MoWEForConditionalGeneration(demo_config(settings, router_type))
    model.get_encoder(modality="audio").base_encoder.load_state_dict(pretrained["base_encoder"])
    model.get_decoder().load_state_dict(pretrained["language_model"])
    model.tie_weights()
    return model


def routing_by_task(model, processor, dataset) -> dict:
    """Fraction of test windows each router sent to each weak encoder, per task (rows sum to `router_top_k`)."""
    from .evaluation import prompt_messages

    tower = model.model.audio_tower
    table = {router: {} for router in tower.routers}
    for task in sorted(set(dataset["task"])):
        rows = dataset.filter(lambda t, task=task: t == task, input_columns="task")
        inputs = processor.apply_chat_template(
            [prompt_messages(r) for r in rows], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", padding=True,
        )
        with torch.no_grad():
            selected = model(**inputs).router_indices  # [windows, routers, top_k]
        num_weak = len(tower.weak_encoders)
        chosen = torch.nn.functional.one_hot(selected, num_weak).sum(-2).float().mean(0)  # [routers, weak encoders]
        for r, router in enumerate(tower.routers):
            table[router][task] = chosen[r].tolist()
    return table


def draw_plots(histories: dict[str, list[dict]], routing: dict, encoder_names: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Multi-task fine-tuning")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

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
    fig.tight_layout()
    paths.append(out / "routing_by_task.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def run_demo(settings: DemoSettings) -> dict:
    """All demo stages; returns the results and artefact paths."""
    from . import MoWEProcessor
    from .data import BenchmarkConfig, build_benchmark
    from .evaluation import evaluate_model, results_table_markdown, write_results
    from .training import make_sft_trainer

    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)

    bench_config = settings.benchmark or BenchmarkConfig(seed=settings.seed, scale=settings.scale)
    log("stage 1: benchmark (espeak-ng speech + generated beeps)")
    splits = build_benchmark(out / "cache" / "benchmark", bench_config)
    log("         " + ", ".join(f"{name}: {len(split)} rows" for name, split in splits.items()))
    processor = MoWEProcessor.from_pretrained(settings.preset)

    pretrained = pretrain_base(settings, processor, splits["train"])

    steps = settings.steps(settings.finetune_steps)
    arms, histories, params = {}, {}, {}
    for name, router_type in (("MoWE", "both"), ("base-only", "none")):
        model = build_arm(settings, router_type, pretrained)
        trainer = make_sft_trainer(
            model, processor, sft_config(settings, out / "runs" / name, steps), splits["train"],
            train_language_model=True,
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        params[name] = {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}
        log(f"stage 3: fine-tuning {name} ({router_type=}, {steps} steps, {trainable:,} trainable parameters)")
        trainer.train()
        histories[name] = trainer.state.log_history
        arms[name] = model.eval()

    test = splits["test"]
    if settings.eval_limit:
        test = test.select(range(min(settings.eval_limit, len(test))))
    log(f"stage 4: evaluating both arms on {len(test)} held-out test rows")
    results = {name: evaluate_model(model, processor, test) for name, model in arms.items()}
    print("\n" + results_table_markdown(results) + "\n", flush=True)
    written = write_results(
        {name: {k: v for k, v in r.items() if k != "predictions"} for name, r in results.items()}, out
    )
    (out / "training.json").write_text(json.dumps({"parameters": params, "histories": histories}, indent=1))

    log("stage 5: save the MoWE model (Hub-ready folder with its card), reload it with AutoModel/AutoProcessor")
    model_dir = out / "mowe-model"
    examples = publish_and_answer(arms["MoWE"], processor, test, written["json"], model_dir)

    log("stage 6: plots")
    tower = arms["MoWE"].get_encoder(modality="audio")
    encoder_names = [f"{i}:{c.model_type}" for i, c in enumerate(tower.config.weak_encoder_configs)]
    plots = draw_plots(histories, routing_by_task(arms["MoWE"], processor, test), encoder_names, out)
    summary = {
        "results": {name: r["summary"] for name, r in results.items()},
        "files": {"results": [str(p) for p in written.values()], "model": str(model_dir),
                  "plots": [str(p) for p in plots]},
        "examples": examples,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\nArtefacts:")
    for path in [*written.values(), model_dir, *plots, out / "training.json"]:
        print(f"  {path}")
    return summary


def publish_and_answer(model, processor, test, results_json: Path, model_dir: Path) -> list[dict[str, str]]:
    """Publish `model` as a Hub folder (a held-out clip as its example), reload it from there as a user would, and
    answer one held-out clip per task, three at most."""
    from .data import load_audio
    from .handler import answer, load
    from .publishing import build_hub_folder

    example = test[_one_per_task(test, 1)[0]]
    wave, rate = load_audio(example["audio"])
    build_hub_folder(
        model, processor, model_dir, results=results_json, example_audio=wave, example_sampling_rate=rate,
        example_question=example["prompt"], model_name="mowe-tiny-demo", overwrite=True,
    )
    reloaded, reloaded_processor = load(str(model_dir))
    examples = []
    for index in _one_per_task(test, 3):
        row = test[index]
        wave, rate = load_audio(row["audio"])
        text = answer(reloaded, reloaded_processor, wave, row["prompt"], rate, max_new_tokens=24)
        examples.append({"task": row["task"], "question": row["prompt"], "reference": row["answer"], "answer": text})
        print(f"  [{row['task']}] Q: {row['prompt']}\n      reference: {row['answer']}\n      MoWE:      {text}")
    return examples


def _one_per_task(dataset, count: int) -> list[int]:
    seen, picked = set(), []
    for index, task in enumerate(dataset["task"]):
        if task not in seen:
            seen.add(task)
            picked.append(index)
        if len(picked) == count:
            break
    return picked


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the data and the training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=DemoSettings.pretrain_steps)
    parser.add_argument("--finetune-steps", type=int, default=DemoSettings.finetune_steps)
    parser.add_argument("--batch-size", type=int, default=DemoSettings.batch_size)
    parser.add_argument("--learning-rate", type=float, default=DemoSettings.learning_rate)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test rows only")
    args = parser.parse_args(argv)
    settings = DemoSettings(
        output_dir=args.output_dir, scale=args.scale, seed=args.seed, pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        eval_limit=args.eval_limit,
    )
    return run_demo(settings)


if __name__ == "__main__":
    main()
