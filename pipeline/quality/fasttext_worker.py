"""fastText training in a fresh process.

Training in a long-lived process that had already done a lot of work (reading WARCs, books) failed with
"Encountered NaN" on the first attempt and then trained cleanly on the same file with the same settings,
while a fresh process never failed on it: the symptom of fastText reading memory it did not initialise,
whose contents depend on what the heap held before. So the trainer runs here, in a spawned process that
imports nothing but fastText, and saves the model itself.
"""

from __future__ import annotations

from typing import Any


def train_and_save(train_file: str, params: dict[str, Any], seed: int, verbose: int, model_path: str) -> None:
    import fasttext

    model = fasttext.train_supervised(input=train_file, seed=seed, verbose=verbose, **params)
    model.save_model(model_path)
