"""Exported trials reload with plain transformers at the quality and size their study recorded.

For each ``--trials`` number of a study made by ``autoprune search``: ``autoprune export`` writes the
checkpoint and recipe; plain ``AutoModelForCausalLM.from_pretrained`` reloads it; its perplexity on
the study's own validation windows and its decoder linear non-zeros are compared with the trial's
record (the healed record where the study healed the trial: what its export writes). Writes ``results/export_check.json`` and ``.md``.

    python experiments/export_check.py --storage sqlite:///runs/search_vs_baselines.db \
        --study search-vs-baselines --trials 57 10
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import Column, parse, study_parser, table, write_results
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoprune.cli import main as autoprune
from autoprune.data import validation_windows
from autoprune.measure import measure_size, perplexity
from autoprune.models import ArchitectureAdapter
from autoprune.study import find_trial, load_existing_study, recorded_heal, study_settings

#: The issue's bar on the reproduced quality.
TOLERANCE = 0.01


def main() -> None:
    arguments = study_parser(__doc__, required=True)
    arguments.add_argument("--trials", nargs="+", type=int, required=True)
    args = parse(arguments)
    study = load_existing_study(args.storage, args.study)
    settings = study_settings(study)
    rows = []
    for number in args.trials:
        trial = find_trial(study, number)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"trial-{number}"
            code = autoprune(["export", "--storage", args.storage, "--study", args.study,
                              "--trial", str(number), "--out", str(out), "--format", "json"])
            if code != 0:
                raise SystemExit(f"export of trial {number} failed")
            model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # per-block widths ship their modelling file
            windows = validation_windows(
                settings.calibration.source, AutoTokenizer.from_pretrained(out),
                settings.eval_seq_len, settings.eval_windows,
            )
            ppl = perplexity(model, windows, progress=False)
            size = measure_size(model, ArchitectureAdapter.for_model(model))
        healed = recorded_heal(study, number)  # a healed trial exports (and recorded) its healed weights
        recorded_ppl = healed["ppl"] if healed else trial.user_attrs["ppl"]
        row = {
            "trial": number,
            "healed": healed is not None,
            "recorded_ppl": recorded_ppl,
            "reloaded_ppl": ppl,
            "relative_difference": ppl / recorded_ppl - 1,
            "recorded_nonzeros": trial.user_attrs["size"]["linear_nonzeros"],
            "reloaded_nonzeros": size.linear_nonzeros,
        }
        row["within_1pct"] = abs(row["relative_difference"]) <= TOLERANCE
        row["nonzeros_equal"] = row["recorded_nonzeros"] == row["reloaded_nonzeros"]
        print(row, flush=True)
        rows.append(row)
    result = {"study": args.study, "rows": rows}
    print(write_results(result, args.out, "export_check", markdown(result)), end="")


def markdown(result: dict) -> str:
    """Each trial's recorded and reloaded perplexity and non-zeros."""
    columns = [
        Column("trial", lambda row: f"{row['trial']}{' (healed)' if row.get('healed') else ''}"),
        Column("recorded ppl", lambda row: f"{row['recorded_ppl']:.3f}"),
        Column("reloaded ppl", lambda row: f"{row['reloaded_ppl']:.3f}"),
        Column("difference", lambda row: f"{row['relative_difference']:+.3%}"),
        Column("recorded non-zeros", lambda row: f"{row['recorded_nonzeros']:,}"),
        Column("reloaded non-zeros", lambda row: f"{row['reloaded_nonzeros']:,}"),
    ]
    return "\n".join([
        f"Trials of study `{result['study']}` exported with `autoprune export`, reloaded with plain "
        "transformers, measured on the study's validation windows.",
        "",
        *table(result["rows"], columns),
    ]) + "\n"

if __name__ == "__main__":
    main()
