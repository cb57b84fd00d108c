"""Regenerate every result's markdown from its JSON with the current scripts and compare.

A change to a script's table code (or to ``_common.py``) must not change the tables of results
already recorded: this rebuilds each ``results/**/<script>.md`` (or, for a script that names its
files after the run's options, each ``results/**/<script>_<options>.md``) from the JSON beside it
with the script's ``markdown`` function and says SAME or DIFF (with the diff). Results written by an older
version of a script whose JSON lacks a field the table now shows are reported as ``older format``;
they were not rewritten since. Exits non-zero when any table differs.

    python experiments/check_markdown.py
"""

from __future__ import annotations

import difflib
import importlib
import json
import sys

from _common import RESULTS, parser

#: The scripts whose ``markdown(result)`` rebuilds their table from their JSON alone.
SCRIPTS = ("baselines", "proxy_check", "search_vs_baselines", "search_speed", "ray_scaling",
           "predictor_efficiency", "export_check", "full_test_split", "refine_front", "gguf_roundtrip",
           "structured_methods", "latency_check", "two_drivers", "predictor_subnet", "refine_subnet",
           "database_build", "subnet_front", "subnet_cuts", "export_speed", "recipe_rebuild")
#: The scripts that name their result files after the run's options too (``--cut ffn``:
#: ``structured_methods_ffn.json``): every ``<script>_*.json`` is theirs as well.
SEVERAL_FILES = ("structured_methods", "latency_check")


def main() -> None:
    parser(__doc__).parse_args()
    differing = 0
    for name in SCRIPTS:
        script = importlib.import_module(name)
        patterns = (f"{name}.json", f"{name}_*.json") if name in SEVERAL_FILES else (f"{name}.json",)
        for path in sorted(path for pattern in patterns for path in RESULTS.rglob(pattern)):
            recorded = path.with_suffix(".md").read_text()
            try:
                rebuilt = script.markdown(json.loads(path.read_text()))
            except KeyError as missing:
                print(f"older format  {path.relative_to(RESULTS)} (no {missing})")
                continue
            same = rebuilt == recorded
            differing += not same
            print(f"{'SAME' if same else 'DIFF':12}  {path.relative_to(RESULTS)}")
            if not same:
                print("".join(difflib.unified_diff(recorded.splitlines(True), rebuilt.splitlines(True))))
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
