"""Model benchmarks: ratios measured in one run (warm-up, then medians over repeats), printed as a table.

    .venv/bin/python benchmarks/bench_model.py [--repeats 5]

1. MoWE vs base-only (router_type="none") train-step time, base : weak encoder parameters ~78 : 1 as in
   Whisper-large-v3 : Whisper-tiny; 4 weak Whisper encoders, top-1, both routers, base encoder frozen.
2. MoWE forward vs its components called directly (base encoder, the selected weak encoders, projector, LLM).
3. Sparse top-1 of 4 weak encoders vs all 4 run dense (router_top_k=4): weak-pool time and whole forward.
4. Whisper encoder with dynamic_audio_length vs 30 s padding on a 3 s clip.
5. The idle calls in training: a train step where both routers send every clip to one weak encoder, so the other
   three run only their idle call (0.5 s of one clip, weighted zero; what lets DDP and FSDP2 see every encoder on every
   rank, made under a process group), vs the same step without them (one process, no process group).
6. `torch.compile` (Inductor) vs eager: inference forward, after a warm-up that compiles.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from timing import median_seconds, print_ratio_table
from transformers import LlamaConfig, WhisperConfig

from modeling_mowe import MoWEConfig, MoWEFeatureExtractor, MoWEForConditionalGeneration
from modeling_mowe.encoders import SAMPLING_RATE, align_to_frames, encoder_family, num_audio_tokens

SR = SAMPLING_RATE
PROMPT_TOKENS = 24


def whisper_config(d_model: int, layers: int, heads: int, n_mels: int) -> WhisperConfig:
    return WhisperConfig(
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * d_model,
        num_mel_bins=n_mels,
        vocab_size=32,
        max_target_positions=16,
    )


def make_config(router_type="both", top_k=1, dynamic=True) -> MoWEConfig:
    """Base Whisper (d 512, 5 layers) and weak Whisper (d 64, 2 layers): 78x the parameters, as large-v3 : tiny."""
    return MoWEConfig(
        base_encoder_config=whisper_config(512, 5, 8, 128),
        weak_encoder_configs=[whisper_config(64, 2, 2, 80) for _ in range(4)],
        text_config=LlamaConfig(
            vocab_size=640,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
        router_type=router_type,
        router_top_k=top_k,
        weak_hidden_size=128,
        audio_token_id=639,
        dynamic_audio_length=dynamic,
    )


def build(config: MoWEConfig, seed: int = 0) -> MoWEForConditionalGeneration:
    torch.manual_seed(seed)
    return MoWEForConditionalGeneration(config)


def make_inputs(config: MoWEConfig, seconds: list[float], seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Features from MoWEFeatureExtractor; prompts of PROMPT_TOKENS random text tokens around each clip's audio
    tokens."""
    rng = np.random.default_rng(seed)
    clips = [(0.1 * rng.standard_normal(int(s * SR))).astype(np.float32) for s in seconds]
    features = MoWEFeatureExtractor.from_mowe_config(config)(clips, sampling_rate=SR, return_tensors="pt")
    rows = []
    for length in features["audio_lengths"].tolist():
        n = int(num_audio_tokens(length, config.audio_frame_spec, config.stack_factor))
        text = rng.integers(5, 600, PROMPT_TOKENS).tolist()
        rows.append(text[:8] + [config.audio_token_id] * n + text[8:])
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [1] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **features}
    labels = input_ids.clone()
    labels[(attention_mask == 0) | (input_ids == config.audio_token_id)] = -100
    return inputs, labels


CLOCK = time.process_time


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_train_step(repeats: int, seconds: list[float]) -> tuple[float, str]:
    steps = {}
    for router_type in ("none", "both"):
        config = make_config(router_type)
        model = build(config).train()
        model.model.audio_tower.base_encoder.requires_grad_(False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        inputs, labels = make_inputs(config, seconds)

        def step(model=model, optimizer=optimizer, inputs=inputs, labels=labels):
            optimizer.zero_grad(set_to_none=True)
            model(**inputs, labels=labels).loss.backward()
            optimizer.step()

        steps[router_type] = step
    times = median_seconds(steps, repeats, clock=CLOCK)
    tower = build(make_config("both")).model.audio_tower
    ratio = count(tower.base_encoder) / count(tower.weak_encoders[0])
    note = f"none {times['none'] * 1e3:.0f} ms, MoWE {times['both'] * 1e3:.0f} ms; base/weak params {ratio:.1f}x"
    return times["both"] / times["none"], note


@torch.no_grad()
def run_components(model: MoWEForConditionalGeneration, inputs: dict, choice: torch.Tensor) -> torch.Tensor:
    """The MoWE forward's work called component by component, routing given (`choice` [windows, routers, top_k], the
    model's `router_indices`): the base encoder, each selected weak encoder once on its rows, their projections, the
    projector, the LLM and its head."""
    config, tower = model.config, model.model.audio_tower
    lengths = inputs["audio_lengths"]
    family = encoder_family(config.base_encoder_config)
    base = family.encode(tower.base_encoder, inputs["input_features"][:, :128], lengths, dynamic=True)
    base = base.last_hidden_state
    frames = tower.base_spec.num_frames(lengths)
    blocks = base.new_zeros(choice.shape[1], *base.shape[:2], config.weak_hidden_size)
    for weak_index in choice.unique().tolist():
        rows = (choice == weak_index).any(-1).any(-1).nonzero(as_tuple=True)[0]
        weak = family.encode(
            tower.weak_encoders[weak_index], inputs["input_features"][rows, 128:], lengths[rows], True
        )
        weak = weak.last_hidden_state
        weak = align_to_frames(weak, tower.weak_specs[weak_index], tower.base_spec, frames[rows], base.shape[1])
        weak = tower.weak_projections[weak_index](weak)
        for r in range(choice.shape[1]):
            mine = (choice[rows, r] == weak_index).any(-1)
            blocks[r, rows[mine]] = weak[mine]
    hidden = torch.cat([base, *blocks], dim=-1)
    audio = model.model.multi_modal_projector(hidden, frames)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    embeds = embeds.masked_scatter((inputs["input_ids"] == config.audio_token_id)[..., None], audio)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    return model.lm_head(out.last_hidden_state)


def bench_glue(repeats: int, seconds: list[float]) -> tuple[float, str]:
    config = make_config("both")
    model = build(config).eval()
    inputs, _ = make_inputs(config, seconds)
    with torch.no_grad():
        choice = model(**inputs).router_indices  # [windows, routers, top_k]

    def mowe():
        with torch.no_grad():
            model(**inputs)

    times = median_seconds(
        {"mowe": mowe, "direct": lambda: run_components(model, inputs, choice)}, repeats, clock=CLOCK
    )
    note = f"MoWE {times['mowe'] * 1e3:.0f} ms, components {times['direct'] * 1e3:.0f} ms"
    return times["mowe"] / times["direct"], note + f"; weak encoders {choice.unique().tolist()}"


def bench_sparse_vs_dense(repeats: int, seconds: list[float], router_type: str) -> tuple[float, float, str]:
    models = {"sparse": build(make_config(router_type, top_k=1)).eval()}
    models["dense"] = build(make_config(router_type, top_k=4)).eval()
    models["dense"].load_state_dict(models["sparse"].state_dict())
    inputs, _ = make_inputs(models["sparse"].config, seconds)
    tower_args = (inputs["input_features"], None, inputs["audio_lengths"])
    for model in models.values():  # pool time = the tower with the base features cached (routers, glue, weak pool)
        tower = model.model.audio_tower
        with torch.no_grad():
            cached = tower.run_encoder(
                model.config.base_encoder_config,
                tower.base_encoder,
                inputs["input_features"][:, :128],
                inputs["audio_lengths"],
            )

        def run_encoder(config, encoder, x, lengths, tower=tower, cached=cached, original=tower.run_encoder):
            return cached if encoder is tower.base_encoder else original(config, encoder, x, lengths)

        tower.run_encoder = run_encoder

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    pool = median_seconds(
        {k: no_grad(lambda m=m: m.model.audio_tower(*tower_args)) for k, m in models.items()}, repeats, clock=CLOCK
    )
    for model in models.values():
        del model.model.audio_tower.run_encoder
    whole = median_seconds({k: no_grad(lambda m=m: m(**inputs)) for k, m in models.items()}, repeats, clock=CLOCK)
    note = (
        f"pool {pool['sparse'] * 1e3:.0f} vs {pool['dense'] * 1e3:.0f} ms, "
        f"forward {whole['sparse'] * 1e3:.0f} vs {whole['dense'] * 1e3:.0f} ms"
    )
    return pool["sparse"] / pool["dense"], whole["sparse"] / whole["dense"], note


def bench_dynamic_length(repeats: int) -> tuple[float, str]:
    config = make_config("none", dynamic=False)
    encoder = build(config).eval().model.audio_tower.base_encoder
    inputs, _ = make_inputs(config, [3.0])
    family = encoder_family(config.base_encoder_config)
    # The log-mels each mode reads: 30 s, or the frames of the clip (what a dynamic-length model's processor gives).
    read = {False: 3000, True: family.frame_spec(config.base_encoder_config).mel_frames_read(int(3.0 * SR))}

    def encode(dynamic):
        with torch.no_grad():
            features = inputs["input_features"][:, :128, : read[dynamic]]
            family.encode(encoder, features, inputs["audio_lengths"], dynamic=dynamic)

    times = median_seconds({False: lambda: encode(False), True: lambda: encode(True)}, repeats, clock=CLOCK)
    note = f"30 s {times[False] * 1e3:.0f} ms, dynamic {times[True] * 1e3:.0f} ms"
    return times[False] / times[True], note


def bench_idle_calls(repeats: int, seconds: list[float]) -> tuple[float, str]:
    """Train step (base frozen, SGD) with every clip routed to weak encoder 0 by both routers: the other three run
    only their idle call. Same model, idle calls on (`idle_calls` set to "always", as under a process group) vs off
    (one process's default)."""
    config = make_config("both")
    model = build(config).train()
    model.model.audio_tower.base_encoder.requires_grad_(False)
    tower = model.model.audio_tower
    with torch.no_grad():
        tower.router_independent.logits.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
        tower.router_dependent.classifier.weight.zero_()
        tower.router_dependent.classifier.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs, labels = make_inputs(config, seconds)

    def step(idle_calls: bool):
        tower.idle_calls = "always" if idle_calls else "never"
        optimizer.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()

    times = median_seconds({"idle": lambda: step(True), "sparse": lambda: step(False)}, repeats, clock=CLOCK)
    tower.train()  # decides `idle_calls` again
    note = f"with {times['idle'] * 1e3:.0f} ms, without {times['sparse'] * 1e3:.0f} ms; 3 of 4 weak encoders idle"
    return times["idle"] / times["sparse"], note


def bench_compile(repeats: int, seconds: list[float]) -> tuple[float, str]:
    """Inference forward: `torch.compile(model)` (Inductor, default mode) vs eager, same inputs; the warm-up
    compiles."""
    config = make_config("both")
    model = build(config).eval()
    compiled = torch.compile(model)
    inputs, _ = make_inputs(config, seconds)

    def forward(module):
        with torch.no_grad():
            return module(**inputs).logits

    start = time.perf_counter()
    difference = (forward(compiled) - forward(model)).abs().max().item()
    compile_seconds = time.perf_counter() - start
    times = median_seconds(
        {"compiled": lambda: forward(compiled), "eager": lambda: forward(model)}, repeats, clock=CLOCK
    )
    note = (
        f"compiled {times['compiled'] * 1e3:.0f} ms, eager {times['eager'] * 1e3:.0f} ms; first call "
        f"{compile_seconds:.0f} s (wall); max |logit difference| {difference:.1e}"
    )
    return times["compiled"] / times["eager"], note


ROWS = ("train", "glue", "sparse", "dynamic", "idle", "compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="cpu: less hurt by other processes")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which benchmarks to run")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = [2.0, 3.0, 2.5, 3.5]
    rows = []
    if "train" in args.rows:
        ratio, note = bench_train_step(args.repeats, seconds)
        rows.append(("MoWE / base-only train step", ratio, "<= 1.10", ratio <= 1.10, note))
    if "glue" in args.rows:
        ratio, note = bench_glue(args.repeats, seconds)
        rows.append(("MoWE forward / components alone", ratio, "<= 1.05", ratio <= 1.05, note))
    if "sparse" in args.rows:
        for router_type in ("data_dependent", "both"):
            pool, whole, note = bench_sparse_vs_dense(args.repeats, seconds, router_type)
            label = f"top-1 / dense-4 ({router_type})"
            rows.append((f"{label}: weak pool", pool, "<= 0.35", pool <= 0.35, note))
            rows.append((f"{label}: whole fwd", whole, "(info)", None, ""))
    if "dynamic" in args.rows:
        ratio, note = bench_dynamic_length(max(3, args.repeats // 2))
        rows.append(("Whisper 30 s / dynamic (3 s clip)", ratio, ">= 5", ratio >= 5, note))
    if "idle" in args.rows:
        ratio, note = bench_idle_calls(args.repeats, seconds)
        rows.append(("train step: idle calls / none", ratio, "<= 1.10", ratio <= 1.10, note))
    if "compile" in args.rows:
        ratio, note = bench_compile(args.repeats, seconds)
        rows.append(("forward: compiled / eager", ratio, "(info)", None, note))

    print_ratio_table(
        rows,
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} time, clips {seconds} s, "
        "dynamic length on (except the Whisper 30 s row)",
    )


if __name__ == "__main__":
    main()
