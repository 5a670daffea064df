"""Evaluate a MoWE model on the synthetic benchmark (or any dataset with `audio`, `messages`, `task`, `answer`).

    python examples/evaluate_model.py --model outputs/demo/mowe-model \
        --dataset outputs/demo/cache/benchmark/<fingerprint> --split test --output_dir outputs/eval

Prints the per-task table (WER for ASR, accuracy elsewhere) and writes results.json + results.md.
Importable: `evaluate_model` and `generate_answers` live in `modeling_mowe.evaluation`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modeling_mowe.evaluation import evaluate_model, results_table_markdown, write_results
from modeling_mowe.handler import load


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MoWE folder or Hub id")
    parser.add_argument("--dataset", required=True, help="datasets folder (save_to_disk) or Hub id")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)

    import datasets

    path = Path(args.dataset)
    data = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(args.dataset)
    split = data[args.split]
    if args.limit:
        split = split.select(range(min(args.limit, len(split))))
    model, processor = load(args.model)
    results = evaluate_model(model, processor, split, batch_size=args.batch_size)
    name = Path(args.model).name or args.model
    print(results_table_markdown({name: results}))
    if args.output_dir:
        for written in write_results({name: results}, args.output_dir).values():
            print(f"wrote {written}")
    return results


if __name__ == "__main__":
    main()
