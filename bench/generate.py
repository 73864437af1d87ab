"""Generation throughput: `instructkit.generate.generate` (batched, KV cache, left padding) vs a naive
loop calling Hugging Face ``model.generate`` on one prompt at a time.

Same tiny model, same prompts (user turns of the skills curriculum rendered with the model's chat
template), greedy decoding, same ``max_new_tokens``. Greedy outputs are identical (asserted), so both
sides generate the same tokens and tokens/s compares like with like. Median of ``--runs`` runs; the
machine's load average is printed because timings on a shared machine move with it.

    .venv/bin/python bench/generate.py --preset micro --prompts 32 --max-new-tokens 32 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def skills_prompts(tokenizer, n: int) -> list[list[int]]:
    from instructkit.data.encode import encode_prompt
    from instructkit.synth.skills import write_skills

    with tempfile.TemporaryDirectory() as tmp:
        out = write_skills(tmp, seed=0, n_train=max(n, 40), n_val=10, n_heldout_phrasing=10,
                           n_heldout_family=4, n_corpus=10)
        records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()[:n]]
    return [encode_prompt(tokenizer, r["messages"][:-1], template=tokenizer.chat_template) for r in records]


def run_ours(model, tok, prompts, max_new, batch_size):
    from instructkit.generate import SamplingConfig, generate

    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, SamplingConfig(max_new_tokens=max_new), batch_size=batch_size)
    return time.perf_counter() - t0, [g.token_ids for g in gens]


def run_naive(model, tok, prompts, max_new):
    import torch

    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p], device=model.device), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out.append(ids[0, len(p):].tolist())
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="micro", choices=["nano", "micro", "small"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    import torch

    from instructkit.models import load_for_inference
    from instructkit.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_for_inference(build_tiny_model(f"{tmp}/m", preset=args.preset, seed=0))
    prompts = skills_prompts(tok, args.prompts)
    lens = sorted(len(x) for x in prompts)
    print(f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {model.device}; load average before "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{args.preset} model, {len(prompts)} skills prompts ({lens[0]}-{lens[-1]} tokens), greedy, "
          f"max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}; median of {args.runs} runs")
    run_ours(model, tok, prompts[:2], 4, 2)  # warm-up (allocator, kernels)
    ours, naive, loads = [], [], []
    for _ in range(args.runs):
        t_ours, toks_ours = run_ours(model, tok, prompts, args.max_new_tokens, args.batch_size)
        t_naive, toks_naive = run_naive(model, tok, prompts, args.max_new_tokens)
        # HF stops at eos without emitting anything after it; ours includes the stop id too.
        assert all(a == b[:len(a)] or b == a[:len(b)] for a, b in zip(toks_ours, toks_naive)), "greedy outputs differ"
        n_tok = sum(len(t) for t in toks_ours)
        ours.append(n_tok / t_ours)
        naive.append(sum(len(t) for t in toks_naive) / t_naive)
        loads.append(os.getloadavg()[0])
    o, n = statistics.median(ours), statistics.median(naive)
    print(f"generated tokens per run: {n_tok}")
    print(f"instructkit.generate (batched): {o:9.0f} tok/s   runs {[round(x) for x in ours]}")
    print(f"naive model.generate loop     : {n:9.0f} tok/s   runs {[round(x) for x in naive]}")
    print(f"speedup x{o / n:.1f}; 1-min load average during runs {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
