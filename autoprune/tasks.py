"""Zero-shot tasks through lm-evaluation-harness (the optional ``eval`` extra).

Perplexity alone misleads on compressed models: at high sparsity it can stay tolerable while
knowledge-heavy tasks collapse. This runs lm-eval's tasks (hub tasks such as ``arc_easy`` where a
hub is reachable, or a folder of custom task YAML via ``include_path``) on a model autoprune loads
the way it loads everything (float32, aliases and ``.gguf`` files included), wrapped in lm-eval's
own HF model class, so the scores are lm-eval's. Task names and the include path are checked before
any model is loaded, and nothing is written anywhere.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from autoprune.errors import AutopruneError
from autoprune.models import compute_device, load_model

#: Metrics reported when a task has them, each with its standard error.
METRICS = ("acc", "acc_norm")
EXTRA_HINT = "pip install 'autoprune[eval]'"


def parse_tasks(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; an empty list is a one-line error."""
    tasks = [name.strip() for name in text.split(",") if name.strip()]
    if not tasks:
        raise AutopruneError("--tasks needs at least one task name")
    return tasks


def task_manager(tasks: Sequence[str], include_path: Path | None = None) -> Any:
    """lm-eval's task index with ``include_path`` added, once every task in ``tasks`` is known."""
    if importlib.util.find_spec("lm_eval") is None:
        raise AutopruneError(f"tasks need lm-eval ({EXTRA_HINT})")
    if include_path is not None and not include_path.is_dir():
        raise AutopruneError(f"--include-path {include_path} is not a folder")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        where = f" (nor in {include_path})" if include_path else ""
        raise AutopruneError(f"unknown task {unknown[0]!r}: lm-eval has no such task{where}")
    return manager


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    manager: Any,
    limit: int | None = None,
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """lm-eval's scores of ``model`` on ``tasks``: one row per task with each of :data:`METRICS`
    it reports, its standard error, and the number of documents scored."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
            bootstrap_iters=100_000,
        )
    except (ConnectionError, FileNotFoundError) as error:  # a task's data set, offline or absent
        reason = " ".join(str(error).split())[:200]
        raise AutopruneError(f"lm-eval could not load the data of {', '.join(tasks)}: {reason}") from None
    rows = []
    for name in tasks:
        result = output["results"].get(name, {})
        row: dict[str, Any] = {"task": name}
        for metric in METRICS:
            if f"{metric},none" in result:
                row[metric] = float(result[f"{metric},none"])
                stderr = result.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        row["samples"] = int(output.get("n-samples", {}).get(name, {}).get("effective", 0)) or None
        rows.append(row)
    return rows


def evaluate_tasks(
    model: str,
    tasks: Sequence[str],
    include_path: Path | None = None,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Load ``model`` (a folder, hub id, ``.gguf`` or alias) and score it on ``tasks``."""
    if limit is not None and limit < 1:
        raise AutopruneError(f"--limit must be at least 1, got {limit}")
    manager = task_manager(tasks, include_path)
    compute = compute_device(device)
    loaded = load_model(model)
    loaded.model.to(compute)
    return run_tasks(loaded.model, loaded.tokenizer, tasks, manager, limit, batch_size)


def task_scores(rows: Sequence[dict[str, Any]], limit: int | None) -> dict[str, Any]:
    """Rows as the trial attribute users read: ``{task: {acc, acc_stderr, ..., limit}}``."""
    return {row["task"]: {**{k: v for k, v in row.items() if k != "task"}, "limit": limit} for row in rows}
