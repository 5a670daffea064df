"""Evaluate a MoWE model on the synthetic benchmark (or any dataset with `audio`, `messages`, `task`, `answer`), or
on the held-out splits of a mixture's corpora (docs/DATA.md).

    python examples/evaluate_model.py --model outputs/demo/mowe-model \
        --dataset outputs/demo/cache/benchmark/<fingerprint> --split test --output_dir outputs/eval
    python examples/evaluate_model.py --model out/mixture --mixture examples/mixtures/local.yaml --split test \
        --output_dir out/mixture-eval

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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="datasets folder (save_to_disk) or Hub id")
    source.add_argument("--mixture", help="mixture file (YAML/JSON, docs/DATA.md): evaluate every corpus's split")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate the first N rows only (with --mixture: of each corpus)")
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)

    import datasets

    metrics = None
    if args.mixture:
        from modeling_mowe.data import evaluation_dataset, load_mixture

        mixture = load_mixture(args.mixture)
        split, metrics = evaluation_dataset(mixture, args.split, limit=args.limit), mixture.metrics()
    else:
        path = Path(args.dataset)
        data = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(args.dataset)
        split = data[args.split]
        if args.limit:
            split = split.select(range(min(args.limit, len(split))))
    model, processor = load(args.model)
    results = evaluate_model(model, processor, split, batch_size=args.batch_size, metrics=metrics)
    name = Path(args.model).name or args.model
    print(results_table_markdown({name: results}))
    if args.output_dir:
        title = f"MoWE on {args.mixture} ({args.split} split)" if args.mixture else None
        written_files = write_results({name: results}, args.output_dir, **({"title": title} if title else {}))
        for written in written_files.values():
            print(f"wrote {written}")
    return results


if __name__ == "__main__":
    main()
