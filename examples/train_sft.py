"""Fine-tune a MoWE audio LLM with TRL's SFTTrainer.

Single process (bf16 where the accelerator supports it, else fp32; `--bf16 True/False` decides otherwise), audio
decoding and feature extraction in 2 DataLoader worker processes:
    python examples/train_sft.py --dataset outputs/demo/cache/benchmark/<fingerprint> --output_dir out/sft \\
        --model hub_configs/mowe-tiny-random --max_steps 4 --per_device_train_batch_size 4 --dataloader_num_workers 2
QLoRA (the LLM in 4-bit NF4 with bitsandbytes, LoRA on it; weak pool, routers and projector trained in full):
    python examples/train_sft.py --dataset outputs/demo/cache/benchmark/<fingerprint> --output_dir out/qlora \\
        --model outputs/demo/mowe-model --load_in_4bit --max_steps 2 --per_device_train_batch_size 2
Two processes (DDP; gloo on CPU, NCCL on GPUs):
    torchrun --standalone --nproc_per_node 2 examples/train_sft.py \\
        --dataset outputs/demo/cache/benchmark/<fingerprint> \\
        --output_dir out/ddp --max_steps 2 --per_device_train_batch_size 2 --ddp_find_unused_parameters False
On GPUs, through accelerate:
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_sft.py \\
        --dataset <folder> --output_dir out  # GPU only, not run by the tests
On your own corpora: a mixture file names them, their layouts, tasks and weights (docs/DATA.md); training streams it,
so give --max_steps:
    python examples/train_sft.py --mixture examples/mixtures/local.yaml --output_dir out/mixture \\
        --max_steps 4 --per_device_train_batch_size 4
Real checkpoints (downloaded from the Hub; an 8B LLM wants a GPU):
    python examples/train_sft.py --base_encoder openai/whisper-large-v3 \\
        --weak_encoders openai/whisper-tiny openai/whisper-tiny openai/whisper-tiny openai/whisper-tiny \\
        --text_model meta-llama/Meta-Llama-3-8B-Instruct --dataset <hub id or folder> \\
        --output_dir out  # GPU + Hub, not run by the tests

Every `SFTConfig` flag works (`--gradient_checkpointing`, `--bf16`, `--report_to tensorboard`, ...). The frozen base
encoder encodes each clip once and later epochs read its features from a cache (`--cache_frozen_base auto`, the
default: on where that is exact; up to `--frozen_base_cache_gb` in memory, the rest in
`<output_dir>/_frozen_base_features`); hits, misses and bytes are logged as `frozen_feature_cache/*`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import BitsAndBytesConfig, HfArgumentParser
from transformers.utils import is_torch_bf16_gpu_available

from modeling_mowe import MoWEConfig, MoWEForConditionalGeneration, MoWEProcessor
from modeling_mowe.training import exit_distributed_process, make_sft_trainer

# TRL and `set_seed` are imported in main(), after modeling_mowe: they import transformers' Trainer, hence PEFT and
# (PEFT < 0.22) bitsandbytes, whose CPU-kernel warning modeling_mowe keeps off the console once it is loaded
# (modeling_mowe/__init__).
if TYPE_CHECKING:
    from trl import SFTConfig


@dataclass
class ScriptArguments:
    dataset: str | None = field(
        default=None, metadata={"help": "A `datasets` folder (save_to_disk) or a Hub dataset id (or give --mixture)."}
    )
    mixture: str | None = field(
        default=None,
        metadata={"help": "A mixture file (YAML/JSON, docs/DATA.md): corpora, layouts, tasks, weights; streamed, so "
                  "give --max_steps. --train_split / --eval_split name the mixture's splits."},
    )
    model: str = field(
        default="hub_configs/mowe-tiny-random",
        metadata={"help": "A MoWE folder / Hub id with weights, or a preset folder (config only: random init)."},
    )
    base_encoder: str | None = field(default=None, metadata={"help": "Compose from parts: base encoder id/folder."})
    weak_encoders: list[str] = field(default_factory=list, metadata={"help": "Weak encoder ids/folders."})
    text_model: str | None = field(default=None, metadata={"help": "Causal LLM id/folder."})
    router_type: str | None = field(default=None, metadata={"help": "Override: both/data_dependent/..., none."})
    router_top_k: int | None = field(default=None, metadata={"help": "Override the routers' top-k."})
    train_split: str = "train"
    eval_split: str | None = None
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the LLM (else the LLM stays frozen)."})
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the LLM in 4-bit NF4 (bitsandbytes) and train LoRA on it (implies --use_lora)."
        },
    )
    lora_r: int = 16
    train_language_model: bool = field(default=False, metadata={"help": "Without LoRA: train the LLM in full."})
    cache_frozen_base: str = field(
        default="auto",
        metadata={
            "help": "Encode each clip once with the frozen base encoder and reuse its features in later epochs: "
            "auto (where exact: frozen base without dropout), true, false.",
            "choices": ["auto", "true", "false"],
        },
    )
    frozen_base_cache_gb: float = field(
        default=2.0,
        metadata={"help": "Memory for cached base features; the rest spills to <output_dir>/_frozen_base_features."},
    )


def quantization_config(args: ScriptArguments, training_args: SFTConfig) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit settings (NF4, double quantization, computing in the training precision) for `--load_in_4bit`."""
    if not args.load_in_4bit:
        return None
    compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model_and_processor(args: ScriptArguments, quantization: BitsAndBytesConfig | None = None):
    """The model in fp32 (with `--bf16`/`--fp16` the Trainer runs it under autocast: fp32 master weights) and its
    processor. With `quantization` (QLoRA) its LLM is quantized and the rest loads in the compute dtype (composed in
    CPU memory in it); `prepare_model_for_kbit_training` then makes the trained parts fp32."""
    overrides = {k: v for k, v in {"router_type": args.router_type, "router_top_k": args.router_top_k}.items() if v}
    quantized = {} if quantization is None else dict(
        quantization_config=quantization, dtype=quantization.bnb_4bit_compute_dtype
    )
    if args.base_encoder:
        processor = MoWEProcessor.from_components(args.base_encoder, args.weak_encoders, args.text_model, **overrides)
        model = MoWEForConditionalGeneration.from_components(
            args.base_encoder, args.weak_encoders, args.text_model, processor=processor, **quantized, **overrides
        )
        return model, processor
    processor = MoWEProcessor.from_pretrained(args.model)
    if (Path(args.model) / "config.json").exists() and not any(Path(args.model).glob("*.safetensors")):
        if quantization is not None:
            raise ValueError(
                f"--load_in_4bit quantizes pretrained weights, and {args.model} is a preset without weights: give a "
                "model folder with weights, or the parts (--base_encoder, --weak_encoders, --text_model)."
            )
        config = MoWEConfig.from_pretrained(args.model, **overrides)  # a preset: random initialisation
        return MoWEForConditionalGeneration(config), processor
    return MoWEForConditionalGeneration.from_pretrained(args.model, **quantized, **overrides), processor


def load_splits(args: ScriptArguments, training_args: SFTConfig | None = None):
    """The train and eval datasets: the `--dataset`'s splits, or the `--mixture`'s (train: one interleaved stream
    of every corpus; eval: every corpus's held-out rows)."""
    import datasets

    if (args.dataset is None) == (args.mixture is None):
        raise ValueError("Give one of --dataset (a prepared dataset) and --mixture (a mixture file, docs/DATA.md).")
    if args.mixture is not None:
        from modeling_mowe.data import evaluation_dataset, load_mixture, training_stream

        if training_args is not None and training_args.max_steps <= 0:
            raise ValueError("A --mixture is streamed and has no length: give --max_steps (the number of steps).")
        mixture = load_mixture(args.mixture)
        eval_dataset = evaluation_dataset(mixture, args.eval_split) if args.eval_split else None
        return training_stream(mixture, args.train_split), eval_dataset
    path = Path(args.dataset)
    data = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(args.dataset)
    return data[args.train_split], (data[args.eval_split] if args.eval_split else None)


def build_trainer(args: ScriptArguments, training_args: SFTConfig):
    train_dataset, eval_dataset = load_splits(args, training_args)
    model, processor = load_model_and_processor(args, quantization_config(args, training_args))
    return make_sft_trainer(
        model, processor, training_args, train_dataset, eval_dataset,
        use_lora=args.use_lora or args.load_in_4bit, lora_r=args.lora_r,
        train_language_model=args.train_language_model,
        cache_frozen_base={"auto": None, "true": True, "false": False}[args.cache_frozen_base],
        frozen_base_cache_bytes=int(args.frozen_base_cache_gb * 2**30),
    )


def with_default_precision(argv: list[str]) -> list[str]:
    """`argv`, plus `--bf16 False` where no accelerator supports bf16 and the command line chose no precision.

    TRL's `SFTConfig` turns bf16 on by default, which `TrainingArguments` refuses on a CPU-only machine.
    """
    chosen = any(arg.split("=", 1)[0] in ("--bf16", "--fp16") for arg in argv)
    return argv if chosen or is_torch_bf16_gpu_available() else [*argv, "--bf16", "False"]


def main(argv: list[str] | None = None):
    from transformers import set_seed
    from trl import SFTConfig

    parser = HfArgumentParser((ScriptArguments, SFTConfig))
    argv = with_default_precision(sys.argv[1:] if argv is None else list(argv))
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not training_args.use_cpu:
        # Without `use_cpu`, accelerate runs each torchrun rank as its own single process on CPU-only machines.
        training_args = dataclasses.replace(training_args, use_cpu=True)
    set_seed(training_args.seed)
    trainer = build_trainer(args, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
    exit_distributed_process()  # a torchrun rank ends here; one process exits normally
