"""GGUF exports of SmolLM2-135M reload in transformers at the safetensors export's perplexity.

Three variants: the dense model, a SparseGPT 50% ``prune`` output (16 calibration windows) (safetensors checkpoint written by
``autoprune.api.prune``), and that output with two decoder blocks removed. Each is written as GGUF
f16 and q8_0 (:mod:`autoprune.export_gguf`); each GGUF is read back with
``AutoModelForCausalLM.from_pretrained(DIR, gguf_file=FILE)`` and its tokenizer with
``AutoTokenizer.from_pretrained(DIR, gguf_file=FILE)``; perplexity is measured on the first
``--windows`` WikiText-2 test windows (held out: calibration reads the validation split) and
compared with the safetensors model's. The GGUF files and the windows' token ids
(``windows.npy``) stay in ``--work`` for
``experiments/llamacpp_speed.py``. Writes ``results/gguf_roundtrip.json`` and ``.md``.

    python experiments/gguf_roundtrip.py --data ../shared/data/wikitext-2 --work /tmp/gguf-work
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoprune.api import PlanRequest, prune
from autoprune.config import CalibrationConfig
from autoprune.data import evaluation_windows
from autoprune.export import save_checkpoint
from autoprune.export_gguf import export_checkpoint_gguf
from autoprune.measure import perplexity
from autoprune.models import load_model

from _common import add_out, add_threads, column, parse, parser, table, write_results

MODEL = "smollm2-135m"
REMOVED = [20, 25]
#: Calibration windows of SparseGPT (the default is 128): the GGUF round trip does not depend on how
#: well the variant was calibrated, and a shared 2-core machine calibrates 128 windows slowly.
CALIBRATION_SAMPLES = 16
#: Windows also scored on their own, to set against llama.cpp (experiments/llamacpp_speed.py).
HEAD = 4
#: The issue's bar for f16.
TOLERANCE = 0.01


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--data", required=True, help="WikiText-2 folder")
    arguments.add_argument("--work", type=Path, required=True, help="folder for checkpoints and GGUFs")
    arguments.add_argument("--windows", type=int, default=8)
    add_threads(arguments, 2)
    add_out(arguments)
    args = parse(arguments)
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoints = make_checkpoints(args.data, args.work)
    rows = []
    for name, folder in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        windows = evaluation_windows(args.data, tokenizer, 512, args.windows)
        np.save(args.work / "windows.npy", windows.numpy().astype(np.int32))  # for llamacpp_speed.py
        reference = perplexity(model, windows)
        reference_head = perplexity(model, windows[:HEAD])
        for gguf_type in ("f16", "q8_0"):
            path = folder / f"model-{gguf_type}.gguf"
            if not path.exists():
                export_checkpoint_gguf(folder, path, gguf_type)
            reloaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
            gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
            same_ids = torch.equal(evaluation_windows(args.data, gguf_tokenizer, 512, args.windows), windows)
            ppl = perplexity(reloaded.eval(), windows)
            ppl_head = perplexity(reloaded, windows[:HEAD])
            rows.append({
                "variant": name, "gguf_type": gguf_type, "blocks": model.config.num_hidden_layers,
                "safetensors_ppl": round(reference, 4), "gguf_ppl": round(ppl, 4),
                "relative_difference": round(ppl / reference - 1, 6),
                f"safetensors_ppl_first_{HEAD}": round(reference_head, 4),
                f"gguf_ppl_first_{HEAD}": round(ppl_head, 4),
                "tokenizer_same_ids": same_ids,
                "gguf_mb": round(path.stat().st_size / 2**20, 2),
                "safetensors_mb": round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20, 2),
            })
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": MODEL, "windows": args.windows, "seq_len": 512, "tolerance_f16": TOLERANCE,
              "f16_within_tolerance": all(abs(r["relative_difference"]) < TOLERANCE
                                          for r in rows if r["gguf_type"] == "f16"),
              "rows": rows}
    write_results(result, args.out, "gguf_roundtrip", markdown(result))


def make_checkpoints(data: str, work: Path) -> dict[str, Path]:
    """The dense model, SparseGPT 50% and SparseGPT 50% without blocks 20 and 25, as safetensors
    checkpoints with autoprune's metadata (so the GGUF reuses the source GGUF's tokenizer)."""
    calibration = CalibrationConfig(source=data, n_samples=CALIBRATION_SAMPLES)
    folders = {
        "dense": work / "dense",
        "sparsegpt-50": work / "sparsegpt-50",
        "sparsegpt-50-minus-2-blocks": work / "sparsegpt-50-cut",
    }
    if not folders["dense"].exists():
        loaded = load_model(MODEL)
        save_checkpoint(loaded.model, loaded.tokenizer, folders["dense"], {"recipe": {"model": MODEL}},
                        torch.float32)  # as the recorded results were measured
    if not folders["sparsegpt-50"].exists():
        start = time.perf_counter()
        prune(MODEL, calibration, PlanRequest(method="sparsegpt", sparsity=0.5), folders["sparsegpt-50"],
              dtype="float32")
        print(f"pruned in {time.perf_counter() - start:.0f} s", flush=True)
    if not folders["sparsegpt-50-minus-2-blocks"].exists():
        loaded = load_model(str(folders["sparsegpt-50"]))
        loaded.adapter.remove_blocks(loaded.model, REMOVED)
        save_checkpoint(loaded.model, loaded.tokenizer, folders["sparsegpt-50-minus-2-blocks"],
                        {"recipe": {"model": MODEL}, "removed_blocks": REMOVED}, torch.float32)
    return folders


#: The table's columns: a GGUF's perplexity against the safetensors checkpoint's it was written from.
COLUMNS = [
    column("variant", "variant", align="---"), column("type", "gguf_type", align="---"),
    column("blocks", "blocks", align="---"), column("safetensors ppl", "safetensors_ppl", align="---"),
    column("GGUF ppl", "gguf_ppl", align="---"), column("difference", "relative_difference", "+.3%", "---"),
    column("same token ids", "tokenizer_same_ids", align="---"), column("GGUF MB", "gguf_mb", align="---"),
]


def markdown(result: dict) -> str:
    """The results' table, from the JSON alone."""
    return "\n".join([
        f"# GGUF round trip: {result['model']}, {result['windows']} WikiText-2 test windows of "
        f"{result['seq_len']} tokens",
        "",
        "`python experiments/gguf_roundtrip.py --data ../shared/data/wikitext-2 --work WORK --threads 1`",
        "",
        *table(result["rows"], COLUMNS),
    ]) + "\n"


if __name__ == "__main__":
    main()
