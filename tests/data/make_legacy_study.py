"""Writes ``legacy_study.journal``: a study as ``autoprune search`` stored it before the settings
were typed (commit 85e2412), for ``tests/test_study_settings.py`` to read with today's code.

Run from an empty folder, with the old code first on ``PYTHONPATH`` and this repository's
``tests`` importable; the model and data are written there under the relative names the study
records (``model``, ``data``), which the test recreates identically (same seeds) to export a trial:

    cd $(mktemp -d) && PYTHONPATH=/path/to/old/checkout:/path/to/repo \
        python /path/to/repo/tests/data/make_legacy_study.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from autoprune.study import SearchConfig, run_search
from tests.conftest import save_tiny_model, synthetic_text, tiny_llama_config

JOURNAL = "legacy_study.journal"


def main() -> None:
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([synthetic_text(0)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    save_tiny_model(tiny_llama_config(len(tokenizer)), tokenizer, Path("model"))
    Path("data").mkdir()
    Path("data/wiki.valid.tokens").write_text(synthetic_text(1))
    Path("data/wiki.test.raw").write_text(synthetic_text(2))
    config = SearchConfig(
        model="model", data="data", storage=f"journal://{JOURNAL}", study="legacy", trials=3,
        population=2, seeded=False, space="layerwise", method="wanda", sparsity_range=(0.4, 0.6),
        eval_windows=2, min_windows=1, seq_len=32, calib_samples=4, objective="ppl", max_ppl=1e6,
        cache_dir="cache", database=False, refine_targets=[],
    )
    run_search(config, progress=False)
    shutil.copy(JOURNAL, Path(__file__).parent / JOURNAL)
    print(f"wrote {Path(__file__).parent / JOURNAL}", file=sys.stderr)


if __name__ == "__main__":
    main()
