"""Write the n-gram table of a chat dataset's answers into a Medusa adapter directory (`gorgon train` does it
for the adapters it trains): `python -m gorgon.training.ngrams --data_path FILES --output_dir ADAPTER`
(`--keep_vocabulary`: rebuild an adapter's table from more answers without changing what its heads draft from).

The answers are tokenised exactly as training tokenises them (the model's chat template, cut at
`--model_max_length`), so contexts at the start of an answer include the template's assistant prefix, as
they do when serving.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gorgon.speculative.ngram_table import NGRAM_FILE, NgramTable
from gorgon.training.data import TokenizedDataset, load_message_lists_from, tokenize_conversations

log = logging.getLogger(__name__)


def table_of(data: TokenizedDataset, **kwargs) -> NgramTable:
    """The table of a tokenised dataset's assistant tokens (their contexts may reach into the prompt)."""
    return NgramTable.build(
        [c.input_ids for c in data.items], [c.assistant_mask for c in data.items], **kwargs
    )


def build_table(tokenizer, data_path: str, max_length: int, **kwargs) -> NgramTable:
    return table_of(
        tokenize_conversations(tokenizer, load_message_lists_from(data_path), max_length), **kwargs
    )


def main(argv: list[str] | None = None) -> None:
    from gorgon.models.loader import resolve_checkpoint
    from gorgon.train import ModelArguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", default="embedded", help="the base model (its tokenizer)")
    p.add_argument("--data_path", required=True, help="conversations, several files separated by commas")
    p.add_argument("--output_dir", required=True, help="the adapter directory to write the table into")
    p.add_argument("--model_max_length", type=int, default=1024)
    p.add_argument("--min_count", type=int, default=2, help="contexts seen fewer times are left out")
    p.add_argument("--weight", type=float, default=0.75, help="the table's weight against the heads'")
    p.add_argument(
        "--keep_vocabulary",
        action="store_true",
        help="rebuild the adapter's table from these answers but keep its drafting vocabulary, weight and "
        "floor (heads trained over that vocabulary: `gorgon train --medusa_train_vocab ngrams`)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_id = ModelArguments(model_name_or_path=args.model_name_or_path).model_id
    tokenizer = resolve_checkpoint(model_id).tokenizer
    out = Path(args.output_dir) / NGRAM_FILE
    kwargs = {"min_count": args.min_count, "weight": args.weight}
    old = NgramTable.load(out) if args.keep_vocabulary else None
    if old is not None:
        kwargs.update(weight=old.weight, vocab=old.vocabulary())
    table = build_table(tokenizer, args.data_path, args.model_max_length, **kwargs)
    if old is not None:
        table.floor = old.floor
    table.save(out)
    print(f"wrote {out}: {len(table)} contexts")


if __name__ == "__main__":
    main()
