"""Make a specialist encoder for a weak pool: fine-tune an audio encoder on a labelled task, save the encoder alone.

The paper's heterogeneous pool holds an encoder fine-tuned on emotion recognition next to general-purpose ones. This
command makes such a specialist from any encoder the project supports (Whisper, or the HuBERT / wav2vec2 / WavLM /
data2vec-audio family, see `encoders.ENCODER_FAMILIES`): the encoder plus a linear head on its mean+std pooled
features (over each clip's valid frames), trained with the transformers `Trainer` on rows with an audio column and a
label column. The encoder is then saved alone as an ordinary transformers folder (`WhisperEncoder`, `HubertModel`,
...; with its feature extractor), which `MoWEForConditionalGeneration.from_components(weak_encoders=[folder])` loads.

    python -m modeling_mowe.training.specialize --encoder whisper-tiny.en --dataset BENCHMARK_FOLDER --task emotion \\
        --output_dir out/tiny-en-emotion --max_steps 60 --per_device_train_batch_size 16 --learning_rate 1e-4

`--encoder`: a folder, a Hub id, or a convertible part's name (`python -m modeling_mowe.convert`'s list).
`--dataset`: a `datasets` folder (`save_to_disk`, e.g. the demo's cached benchmark) or a Hub dataset. `--task T`
keeps the benchmark's rows of task T and learns their `answer`; otherwise `--label_column` (default `label`) holds the
classes. Every `TrainingArguments` flag works. `--eval_split test` scores the head on that split after training and
records the accuracy in `specialization.json` beside the encoder (with the labels, the source and the settings).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ..encoders import WHISPER_CHUNK_SECONDS, encoder_family
from ..feature_extraction_mowe import MoWEFeatureExtractor, to_mono_waveform
from ..modeling_mowe import load_audio_encoder

HEAD_FILE = "classification_head.safetensors"
RECORD_FILE = "specialization.json"


def resolve_encoder(name_or_path: str | os.PathLike) -> str:
    """A folder or Hub id as given; a convertible part's name (`modeling_mowe.convert.SOURCES`) as its folder."""
    from ..convert import SOURCES, pretrained_folder

    if str(name_or_path) in SOURCES and not Path(name_or_path).exists():
        return str(pretrained_folder(str(name_or_path), progress=False))
    return str(name_or_path)


def encoder_feature_extractor(config, dynamic: bool = True) -> MoWEFeatureExtractor:
    """The front-end an encoder of `config` reads (log-mels or the normalised waveform), as MoWE computes it;
    `dynamic=True`: log-mels only as long as the batch's longest clip."""
    family = encoder_family(config)
    return MoWEFeatureExtractor(
        front_ends=[family.front_end(config)],
        min_samples=family.frame_spec(config).min_samples,
        log_mel_length="longest" if dynamic else "chunk",
    )


def pooled_features(
    encoder: nn.Module,
    config,
    audio_lengths: torch.Tensor,
    input_features: torch.Tensor | None = None,
    input_values: torch.Tensor | None = None,
    dynamic: bool = True,
) -> torch.Tensor:
    """Mean and standard deviation of `encoder`'s last hidden state over each clip's valid frames -> `(batch, 2 d)`.

    The encoder runs as the MoWE tower runs it (`encoder_family(config).encode`); valid frames follow the clip's
    length in samples, so padding never enters a clip's statistics.
    """
    family = encoder_family(config)
    inputs = input_features if family.front_end(config)["kind"] == "log_mel" else input_values
    if inputs is None:
        raise ValueError(f"The {config.model_type} encoder needs its front-end's input; build it with the collator.")
    hidden = family.encode(encoder, inputs, audio_lengths, dynamic=dynamic).last_hidden_state
    valid = family.frame_spec(config).num_frames(audio_lengths).clamp(min=1, max=hidden.shape[1])
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < valid[:, None]).to(hidden.dtype)[..., None]
    count = mask.sum(1)
    mean = (hidden * mask).sum(1) / count
    std = ((((hidden - mean[:, None]) * mask) ** 2).sum(1) / count).clamp(min=0).sqrt()
    return torch.cat([mean, std], dim=-1)


class PooledAudioClassifier(nn.Module):
    """An audio encoder (its family's module, as MoWE runs it) and a linear head on its mean+std pooled features.

    `forward(audio_lengths, input_features | input_values, labels=None)` returns a `SequenceClassifierOutput`
    (cross-entropy loss when `labels` are given), what the `Trainer` expects.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dynamic: bool = True):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"A classifier needs at least 2 labels, got {num_labels}; check the label column.")
        self.encoder = encoder
        self.config = encoder.config
        self.dynamic = dynamic
        self.head = nn.Linear(2 * encoder_family(encoder.config).hidden_size(encoder.config), num_labels)

    def forward(
        self,
        audio_lengths: torch.Tensor,
        input_features: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        pooled = pooled_features(self.encoder, self.config, audio_lengths, input_features, input_values, self.dynamic)
        logits = self.head(pooled.to(self.head.weight.dtype))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class AudioLabelCollator:
    """Rows with an audio cell (any form `to_mono_waveform` reads) and a label -> the encoder's front-end features,
    `audio_lengths` and `labels` (class indices). Clips longer than one window (30 s) keep their first window."""

    def __init__(self, extractor: MoWEFeatureExtractor, labels: Sequence[str], audio_column: str, label_column: str):
        self.extractor, self.labels = extractor, list(labels)
        self.audio_column, self.label_column = audio_column, label_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        window = self.extractor.chunk_length * self.extractor.sampling_rate
        waves = [to_mono_waveform(row[self.audio_column], None, self.extractor.sampling_rate)[:window] for row in rows]
        batch = dict(self.extractor(waves, sampling_rate=self.extractor.sampling_rate, return_tensors="pt"))
        unknown = sorted({str(row[self.label_column]) for row in rows} - set(self.labels))
        if unknown:
            raise ValueError(f"Labels {unknown} are not among the classes {self.labels} seen in the training split.")
        batch["labels"] = torch.tensor([self.labels.index(str(row[self.label_column])) for row in rows])
        return batch


def stock_class(encoder: nn.Module) -> type:
    """The transformers class an encoder module subclasses (`DynamicLengthWhisperEncoder` -> `WhisperEncoder`,
    `LengthAwareHubertModel` -> `HubertModel`): what its saved folder names as its architecture."""
    return next(c for c in type(encoder).__mro__ if c.__module__.startswith("transformers."))


def save_encoder(encoder: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Save `encoder` alone as an ordinary transformers folder: safetensors weights and config under its stock
    class (`WhisperEncoder`, `HubertModel`, ...), and the feature extractor its family reads."""
    from transformers import WhisperFeatureExtractor

    from ..encoders import _rebuild_as

    output_dir = Path(output_dir)
    stock = _rebuild_as(stock_class(encoder), encoder)
    stock.save_pretrained(output_dir)
    config = encoder.config
    if encoder_family(config).front_end(config)["kind"] == "log_mel":
        seconds = min(WHISPER_CHUNK_SECONDS, 2 * config.max_source_positions // 100)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=seconds).save_pretrained(output_dir)
    else:
        from transformers import Wav2Vec2FeatureExtractor

        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(output_dir)
    return output_dir


@dataclass
class SpecializeArguments:
    """What to fine-tune on which labelled rows (every `TrainingArguments` flag comes with them)."""

    encoder: str = field(metadata={"help": "encoder folder, Hub id, or a convertible part's name (whisper-tiny.en)"})
    dataset: str = field(metadata={"help": "a datasets folder (save_to_disk) or a Hub dataset"})
    task: str | None = field(default=None, metadata={"help": "benchmark rows of this task; labels from `answer`"})
    label_column: str | None = field(default=None, metadata={"help": "the label column (default: answer / label)"})
    audio_column: str = field(default="audio", metadata={"help": "the audio column"})
    train_split: str = field(default="train", metadata={"help": "the split to fine-tune on"})
    eval_split: str | None = field(default=None, metadata={"help": "score the head on this split after training"})
    head_learning_rate: float = field(default=1e-3, metadata={"help": "the new head's learning rate"})
    padded: bool = field(default=False, metadata={"help": "Whisper on 30 s padded log-mels (else the clip's length)"})
    freeze_feature_encoder: bool = field(
        default=True, metadata={"help": "keep a waveform encoder's conv feature encoder frozen (usual for HuBERT)"}
    )


def _load_split(dataset: str, split: str):
    import datasets

    path = Path(dataset)
    data = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(dataset)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{dataset} has no split {split!r}; its splits are {sorted(data)}.")
        return data[split]
    return data


def labelled_rows(args: SpecializeArguments, split: str):
    """The rows of `split` to learn from: the benchmark's rows of `args.task`, or all rows; with the label column."""
    data = _load_split(args.dataset, split)
    label_column = args.label_column or ("answer" if args.task else "label")
    missing = [
        c for c in (args.audio_column, label_column, *(["task"] if args.task else [])) if c not in data.column_names
    ]
    if missing:
        raise ValueError(
            f"{args.dataset} ({split}) has no column(s) {missing}; its columns are {data.column_names}. Name the "
            "audio and label columns with --audio_column / --label_column (--task needs the benchmark's `task`)."
        )
    if args.task:
        data = data.filter(lambda task: task == args.task, input_columns="task")
        if len(data) == 0:
            raise ValueError(f"{args.dataset} ({split}) has no rows of task {args.task!r}.")
    return data, label_column


def class_names(data, label_column: str, task: str | None) -> list[str]:
    """The classes in a fixed order: the benchmark task's own labels, a `ClassLabel`'s names, or sorted values."""
    from ..data import TASK_LABELS

    feature = data.features[label_column]
    if task and TASK_LABELS.get(task):
        return list(TASK_LABELS[task])
    if hasattr(feature, "names"):
        return list(feature.names)
    return sorted({str(v) for v in data[label_column]})


def specialize(args: SpecializeArguments, training_args) -> dict[str, Any]:
    """Fine-tune `args.encoder` with a pooled linear head on the labelled rows and save the encoder alone (plus the
    head and `specialization.json`) in `training_args.output_dir`. Returns the record."""
    from safetensors.torch import save_file
    from transformers import Trainer

    source = resolve_encoder(args.encoder)
    encoder = load_audio_encoder(source)
    if args.freeze_feature_encoder and hasattr(encoder, "freeze_feature_encoder"):
        encoder.freeze_feature_encoder()
    train, label_column = labelled_rows(args, args.train_split)
    labels = class_names(train, label_column, args.task)
    model = PooledAudioClassifier(encoder, len(labels), dynamic=not args.padded)
    collator = AudioLabelCollator(
        encoder_feature_extractor(encoder.config, dynamic=not args.padded), labels, args.audio_column, label_column
    )
    training_args.remove_unused_columns = False  # the audio column reaches the collator
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": training_args.learning_rate},
            {"params": model.head.parameters(), "lr": args.head_learning_rate},
        ],
        weight_decay=training_args.weight_decay,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, data_collator=collator, optimizers=(optimizer, None)
    )
    result = trainer.train()
    record: dict[str, Any] = {
        "source_encoder": str(args.encoder),
        "task": args.task,
        "labels": labels,
        "train_rows": len(train),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seed": training_args.seed,
        "settings": {k: v for k, v in asdict(args).items()},
    }
    if args.eval_split:
        held_out, _ = labelled_rows(args, args.eval_split)
        prediction = trainer.predict(held_out)
        record["eval_split"] = args.eval_split
        record["eval_rows"] = len(held_out)
        record["eval_accuracy"] = float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))
    output_dir = Path(training_args.output_dir)
    save_encoder(model.encoder, output_dir)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, output_dir / HEAD_FILE)
    (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((SpecializeArguments, TrainingArguments), description=__doc__)
    args, training_args = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else sys.argv[1:])
    record = specialize(args, training_args)
    shown = {k: record[k] for k in ("steps", "train_loss", "eval_accuracy") if k in record}
    print(f"{training_args.output_dir} {json.dumps(shown)}")
    return record


__all__ = [
    "AudioLabelCollator",
    "PooledAudioClassifier",
    "SpecializeArguments",
    "encoder_feature_extractor",
    "pooled_features",
    "save_encoder",
    "specialize",
]


if __name__ == "__main__":
    main()
