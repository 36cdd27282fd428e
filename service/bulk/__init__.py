"""Bulk tokenization of datasets (`atoken tokenize-dataset SRC OUT`): inputs listed in a fixed
order, cut into shards, run through the model in batches formed the same way on every run (so a
resumed run, or the Ray engine, writes byte-identical shards), and written as Parquet with a
manifest and an errors file. `reader` streams the rows back for training."""
