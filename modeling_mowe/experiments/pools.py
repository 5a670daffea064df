"""Weak pools of the experiments: what an entry of `DemoSettings.weak_encoders` (or of a study arm's pool) names, the
folder it resolves to, and how the model card describes it.

An entry is one of
- a convertible part's name (`modeling_mowe.convert.SOURCES`: `"whisper-tiny.en"`, `"smart-turn-v3"`, ...),
  converted from its PyPI packages on first use;
- a local encoder folder (e.g. the output of `python -m modeling_mowe.training.specialize`);
- a specialist spec `"<part>@<task>"` (`"whisper-tiny.en@emotion"`): the part fine-tuned with a pooled linear head on
  the benchmark's training rows of that task (`training.specialize`), with the run's seed, and cached under the run's
  cache folder, keyed by the part, the task, the benchmark, the recipe and the seed, so a rerun reuses it. The
  specialisation is handed the task's training rows alone, saved apart: it never sees a test or far clip.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..convert import CONVERSION_RECORD, SOURCES, component_checkpoints, pretrained_folder
from ..data import TASK_LABELS, TASKS
from ..training import specialize as specialize_module

if TYPE_CHECKING:
    from .demo import DemoSettings

SPECIALIST_TASKS = tuple(task for task in TASKS if TASK_LABELS.get(task))
"""The benchmark tasks a specialist can learn: those with a closed label set (not asr)."""

SPECIALIST_RECORD = "mowe_specialist.json"
"""Beside a cached specialist: what it was trained from (part, task, benchmark, recipe, seed, the training row ids)."""


def parse_specialist(entry: str) -> tuple[str, str] | None:
    """`(part, task)` of a specialist spec `"<part>@<task>"`; None for anything else (a name, an existing folder).

    Raises:
        ValueError: the part is not a convertible part, or the task not one a specialist can learn.
    """
    if "@" not in entry or Path(entry).exists():
        return None
    part, _, task = entry.rpartition("@")
    if part not in SOURCES:
        raise ValueError(
            f"Weak encoder {entry!r}: a specialist spec is '<part>@<task>' with a convertible part, one of "
            f"{sorted(SOURCES)}; got the part {part!r}."
        )
    if task not in SPECIALIST_TASKS:
        raise ValueError(
            f"Weak encoder {entry!r}: unknown specialist task {task!r}; the valid tasks are {list(SPECIALIST_TASKS)} "
            "(the benchmark's classification tasks)."
        )
    return part, task


def check_weak_encoder(entry: str) -> None:
    """Raise a `ValueError` that lists the three accepted forms unless `entry` is one of them (no conversion, no
    training: a typo fails when the settings are made, not an hour into a run)."""
    if parse_specialist(entry) is not None or entry in SOURCES or Path(entry).is_dir():
        return
    raise ValueError(
        f"Weak encoder {entry!r} is neither a convertible part ({sorted(SOURCES)}), an existing encoder folder, nor "
        f"a specialist spec '<part>@<task>' (a task of {list(SPECIALIST_TASKS)})."
    )


def resolve_weak_encoders(settings: DemoSettings, train_split=None) -> list[Path]:
    """The folder of each entry of `settings.weak_encoders`, in order: converting named parts and training (or
    reusing) specialists on `train_split`, the benchmark's training split (`settings.benchmark_config()`'s), which
    specialist specs need."""
    for entry in settings.weak_encoders:
        check_weak_encoder(entry)
    folders = []
    for entry in settings.weak_encoders:
        spec = parse_specialist(entry)
        if spec is not None:
            if train_split is None:
                raise ValueError(f"Weak encoder {entry!r} is a specialist: it needs the benchmark's training split.")
            folders.append(specialist_folder(settings, *spec, train_split))
        elif entry in SOURCES and not Path(entry).exists():
            folders.append(pretrained_folder(entry))
        else:
            folders.append(Path(entry))
    return folders


def specialist_folder(settings: DemoSettings, part: str, task: str, train_split) -> Path:
    """`part` specialised on the training rows of `task` (`training.specialize`, `settings.specialist_recipe`, seed
    `settings.seed`), trained once and cached in `settings.output_dir/cache/specialist-<part>-<task>-<key>`."""
    from .demo import _fingerprint, log  # demo imports this module

    recipe = settings.specialist_recipe
    benchmark = settings.benchmark_config().fingerprint()
    key = _fingerprint([part, task, benchmark, recipe["steps"], recipe["learning_rate"], recipe["batch_size"],
                        settings.seed])
    folder = settings.output_dir / "cache" / f"specialist-{part}-{task}-{key}"
    if (folder / SPECIALIST_RECORD).exists():
        log(f"reusing the {part}@{task} specialist from {folder}")
        return folder
    rows = train_split.filter(lambda t: t == task, input_columns="task")
    if len(rows) == 0:
        raise ValueError(f"The benchmark's training split has no rows of task {task!r}; its tasks are "
                         f"{sorted(set(train_split['task']))}.")
    log(f"specialising {part} on {task}: {recipe['steps']} steps of {recipe['batch_size']} of its {len(rows)} "
        "training clips")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        import datasets
        from transformers import TrainingArguments

        data = Path(tmp) / "rows"
        datasets.DatasetDict({"train": rows}).save_to_disk(str(data))  # the task's training rows, nothing else
        staging = Path(tmp) / "specialist"
        args = specialize_module.SpecializeArguments(encoder=part, dataset=str(data), task=task)
        training_args = TrainingArguments(
            output_dir=str(staging), max_steps=recipe["steps"], per_device_train_batch_size=recipe["batch_size"],
            learning_rate=recipe["learning_rate"], seed=settings.seed, data_seed=settings.seed, report_to="none",
            save_strategy="no", logging_steps=max(1, recipe["steps"] // 10), disable_tqdm=True,
            dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(),
        )
        torch.manual_seed(settings.seed)  # the head is made before the Trainer seeds anything
        record = specialize_module.specialize(args, training_args)
        (staging / SPECIALIST_RECORD).write_text(json.dumps({
            "part": part, "task": task, "benchmark": benchmark, "recipe": recipe, "seed": settings.seed,
            "train_loss": record["train_loss"], "row_ids": list(rows["id"]),
        }, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    return folder


def describe_weak_encoder(entry: str) -> tuple[str, str | None]:
    """`(checkpoint, licence)` of one pool entry for the model card: a converted part's packages and licence; a
    specialist as "<part> specialised on <task> by mowe-audio" under the part's licence; a folder by its path, with
    the licence its conversion or specialisation record names (None when it names none)."""
    spec = parse_specialist(entry)
    if spec is not None:
        part, task = spec
        return f"{part} specialised on {task} by mowe-audio", _part_licence(part)
    if entry in SOURCES and not Path(entry).exists():
        described = component_checkpoints(entry, (), None)
        return described["base_encoder"], described["licenses"]["base_encoder"]
    folder = Path(entry)
    for record_file, name_key in ((CONVERSION_RECORD, "name"), (specialize_module.RECORD_FILE, "source_encoder")):
        if (folder / record_file).is_file():
            record = json.loads((folder / record_file).read_text())
            source = record.get(name_key)
            if source in SOURCES:
                if name_key == "source_encoder" and record.get("task"):
                    return f"{source} specialised on {record['task']} by mowe-audio ({folder})", _part_licence(source)
                return f"{source} ({folder})", _part_licence(source)
    return str(folder), None


def _part_licence(part: str) -> str:
    return component_checkpoints(part, (), None)["licenses"]["base_encoder"]
