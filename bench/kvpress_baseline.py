"""NVIDIA kvpress's presses on the windows of `sinklora bench kv-quality`, the cache held at the
budget throughout: each press compresses the prompt to the budget, then (kvpress's DecodingPress,
every step) the cache back to the budget after each teacher-forced token attends, as our policies
do. Perplexity of the continuation over the full cache's, in the same run.

kvpress pins an older transformers than this package's, so this runs in its own environment
(scripts/install_kvpress_env.sh) on windows the main one exported (`make bench-kvpress`):

    .venv/bin/python -c "...export_windows..."    # the token windows and the model path
    .venv-kvpress/bin/python bench/kvpress_baseline.py --windows W.pt --prompt-tokens 1024 \
        --output bench/results/kv_quality_kvpress_cpu_1024.json

The JSON has the rows of `bench kv-quality` (policy ``kvpress-<press>``), so `make plots` draws it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# snapkv is left out: its decoding mode asserts more buffered queries than its window (64) and
# compression every step buffers one
PRESSES = ("knorm", "streaming_llm", "tova", "expected_attention")


def make_press(name: str, prompt: int, budget: int, sinks: int):
    import kvpress

    classes = dict(knorm=kvpress.KnormPress, streaming_llm=kvpress.StreamingLLMPress, tova=kvpress.TOVAPress,
                   expected_attention=kvpress.ExpectedAttentionPress)
    extra = dict(n_sink=sinks) if name == "streaming_llm" else {}
    decoding = kvpress.DecodingPress(base_press=classes[name](**extra), compression_interval=1, target_size=budget)
    prefill = classes[name](compression_ratio=decoding._find_target_compression_ratio(prompt, budget), **extra)
    return kvpress.PrefillDecodingPress(prefilling_press=prefill, decoding_press=decoding)


@torch.no_grad()
def continuation_nll(model, rows: torch.Tensor, prompt: int, press, budget: int | None) -> torch.Tensor:
    """NLL ``[B, N]`` of tokens ``prompt ..`` of ``rows [B, prompt + N]``: the prompt in one forward
    pass, then one token at a time (positions given: the compressed cache is shorter than them)."""
    from transformers import DynamicCache

    batch, total = rows.shape
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        logits = [model(input_ids=rows[:, :prompt], past_key_values=cache, logits_to_keep=1).logits[:, -1].float()]
        for t in range(prompt, total - 1):
            position = torch.full((batch, 1), t, dtype=torch.long)
            logits.append(model(input_ids=rows[:, t : t + 1], past_key_values=cache,
                                position_ids=position).logits[:, -1].float())
    kept = {layer.keys.shape[2] for layer in cache.layers}
    if press is not None and kept != {budget}:
        raise RuntimeError(f"the cache holds {sorted(kept)} tokens per layer, not the budget {budget}")
    logits = torch.stack(logits, dim=1)
    return F.cross_entropy(logits.flatten(0, 1), rows[:, prompt:].flatten(), reduction="none").view(batch, -1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", required=True, help="the windows file export_windows wrote")
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--presses", default=",".join(PRESSES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = torch.load(args.windows)
    prompt = args.prompt_tokens
    rows, names = spec["rows"][prompt], spec["names"][prompt]
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        parser.error(f"--presses: each must be one of {PRESSES}, got {unknown}")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    cells = [(None, None)] + [(name, share) for share in spec["budgets"] for name in presses]
    out_rows, started, full = [], time.perf_counter(), None
    for name, share in tqdm(cells, desc=f"kvpress P={prompt}", unit="run", file=sys.stderr):
        t0 = time.perf_counter()
        budget = None if share is None else max(int(round(share * prompt)), spec["sinks"] + 2)
        press = None if name is None else make_press(name, prompt, budget, spec["sinks"])
        nll = continuation_nll(model, rows, prompt, press, budget)
        ppl = math.exp(float(nll.double().mean()))
        per_text = {n: math.exp(float(x.double().mean())) for n, x in zip(names, nll)}
        row = dict(policy="full" if name is None else f"kvpress-{name}", prompt_tokens=prompt, budget_share=share,
                   kv_budget=budget, recent=None, ppl=ppl, per_text=per_text, passkey=None,
                   seconds=round(time.perf_counter() - t0, 1))
        full = full or ppl
        row["vs_full"] = ppl / full
        out_rows.append(row)
        write(args.output, dict(config=run_config(spec, prompt, started, complete=False), rows=out_rows))
    config = run_config(spec, prompt, started, complete=True)
    result = dict(config=config, rows=out_rows)
    print(f"kvpress {config['kvpress']} (transformers {config['transformers']}), P = {prompt}: full ppl {full:.3f}")
    for r in out_rows[1:]:
        print(f"{r['policy']:<28}{r['budget_share']:>6.0%}{r['ppl']:>10.3f}{r['vs_full'] - 1:>+9.1%}")
    write(args.output, result)
    return result


def run_config(spec: dict, prompt: int, started: float, complete: bool) -> dict:
    """The run's settings; ``complete`` is false in the file rewritten after each cell."""
    import transformers
    from importlib.metadata import version

    return dict(device="cpu", device_name="cpu", threads=torch.get_num_threads(), dtype="float32",
                torch=torch.__version__, transformers=transformers.__version__, kvpress=version("kvpress"),
                machine=platform.processor() or platform.machine(), cores=os.cpu_count(),
                model=spec["model_name"], texts=spec["texts"], windows=spec["windows"],
                first_window=spec["first_window"], new_tokens=spec["new_tokens"], prompt_tokens=[prompt],
                budgets=spec["budgets"], sinks=spec["sinks"], seconds=round(time.perf_counter() - started, 1),
                complete=complete)


def write(output: str | None, result: dict) -> None:
    if output:
        path = Path(output)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)


if __name__ == "__main__":
    main()
