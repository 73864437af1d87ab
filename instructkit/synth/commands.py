"""`instructkit synth self-instruct`, `synth distill-data` and `synth constraints`: argument parsing and output.

Both take a generator/teacher that is a local model folder or an OpenAI-compatible base URL
(``--model-name``, key from ``--api-key-env``); see ``generators.py``.
"""

from __future__ import annotations

import sys


def _synth_generator(args, spec: str):
    from instructkit.synth.generators import make_generator

    return make_generator(spec, model_name=args.model_name, api_key_env=args.api_key_env, api=args.api,
                          concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                          adapter=getattr(args, "adapter", None), batch_size=args.batch_size)


def cmd_synth_self_instruct(args) -> int:
    from instructkit.openai_client import OpenAIClientError
    from instructkit.synth.generators import Sampling
    from instructkit.synth.self_instruct import SelfInstructConfig, SelfInstructError, format_summary, run_self_instruct

    try:
        cfg = SelfInstructConfig(num=args.num, variant=args.variant, seed=args.seed,
                                 request_batch_size=args.request_batch_size,
                                 num_prompt_instructions=args.num_prompt_instructions,
                                 max_instances=args.max_instances, similarity_threshold=args.similarity_threshold,
                                 keep_truncated=args.keep_truncated, patience=args.patience,
                                 max_rounds=args.max_rounds)
        if args.max_tokens or args.temperature is not None or args.top_p is not None:
            s = cfg.instruction_sampling
            cfg.instruction_sampling = Sampling(max_tokens=args.max_tokens or s.max_tokens,
                                                temperature=s.temperature if args.temperature is None else args.temperature,
                                                top_p=s.top_p if args.top_p is None else args.top_p, stop=s.stop)
        generator = _synth_generator(args, args.generator)
        try:
            summary = run_self_instruct(args.seeds, generator, args.out, cfg)
        finally:
            generator.close()
    except (SelfInstructError, OpenAIClientError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wrote {summary['records']} records to {args.out} (rejected candidates: {args.out}.rejected.jsonl, "
          f"summary: {args.out}.summary.json); run the same command again to resume or extend")
    return 0


def cmd_synth_distill_data(args) -> int:
    from instructkit.openai_client import OpenAIClientError
    from instructkit.synth.distill_data import DistillDataError, distill_data
    from instructkit.synth.generators import Sampling

    scorer = name = None
    try:
        if args.verifier:
            from instructkit.synth.best_of_n import function_scorer

            scorer, name = function_scorer(args.verifier)
        sampling = Sampling(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
        generator = _synth_generator(args, args.teacher)
        try:
            s = distill_data(generator, args.prompts, args.out, sampling=sampling, limit=args.limit,
                             keep_truncated=args.keep_truncated, scorer=scorer, scorer_name=name)
        finally:
            generator.close()
    except (DistillDataError, OpenAIClientError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = s["rejected"]
    print(f"{s['records_total']} SFT records in {s['out']} ({s['written_now']} new from {s['answered_now']} prompts; "
          f"{s['already_done']} done before). Rejected now: {r['empty']} empty, {r['truncated']} truncated, "
          f"{r['echo']} echoes, {r['verifier']} failed the verifier; {s['request_failed']} requests failed "
          f"(re-run to retry them)")
    print(f"train on it: method: sft with data.train: {s['out']}")
    return 0


def cmd_synth_constraints(args) -> int:
    from instructkit.synth.constraints import write_constraint_prompts

    try:
        s = write_constraint_prompts(args.out, args.n, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = s["constraints_per_prompt"]
    print(f"wrote {s['records']} constraint prompts ({s['tasks']} base tasks; {c[1]}/{c[2]}/{c[3]} with 1/2/3 "
          f"constraints; {len(s['per_instruction'])} instruction ids) to {s['out']}")
    print(f"sample verified replies: instructkit best-of-n --model MODEL --prompts {s['out']} --scorer ifeval "
          f"--min-score 1 --out DIR")
    return 0


def add_parsers(sysub) -> None:
    """Add the subcommands of this module to the `synth` subparsers."""
    def generator_args(q, what: str):
        q.add_argument("--model-name", help=f"model name at the endpoint (required when the {what} is a URL)")
        q.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the endpoint's API key (default OPENAI_API_KEY)")
        q.add_argument("--api", default="chat", choices=["chat", "completions"],
                       help="endpoint API for text prompts (default chat: the prompt as one user message)")
        q.add_argument("--concurrency", type=int, default=8, help="endpoint requests in flight")
        q.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
        q.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts")
        q.add_argument("--batch-size", type=int, default=8, help="local model: prompts per generation batch")
        q.add_argument("--seed", type=int, default=0)

    si = sysub.add_parser("self-instruct", help="Self-Instruct / Alpaca bootstrapping from seed tasks")
    si.add_argument("--seeds", required=True, help="seed tasks JSONL (Self-Instruct format)")
    si.add_argument("--generator", required=True, help="local model folder or http(s)://.../v1 endpoint")
    si.add_argument("--num", type=int, required=True, help="machine-generated instructions to reach")
    si.add_argument("--out", required=True, help="output JSONL (Alpaca fields + provenance); resumable")
    si.add_argument("--variant", default="self-instruct", choices=["self-instruct", "alpaca"])
    si.add_argument("--request-batch-size", type=int, default=5, help="instruction prompts per round")
    si.add_argument("--num-prompt-instructions", type=int, help="examples per prompt (default 8; alpaca 3)")
    si.add_argument("--max-instances", type=int, default=5, help="instances kept per task")
    si.add_argument("--similarity-threshold", type=float, default=0.7, help="ROUGE-L F above which a new "
                    "instruction is dropped as a near duplicate of the pool")
    si.add_argument("--keep-truncated", action="store_true", help="on a reply cut at the token limit drop only "
                    "its last item (default for self-instruct: drop the whole reply)")
    si.add_argument("--patience", type=int, default=10, help="stop after this many rounds without a new instruction")
    si.add_argument("--max-rounds", type=int, help="stop after this many rounds")
    si.add_argument("--max-tokens", type=int, help="token limit of instruction replies (default 1024; alpaca 3072)")
    si.add_argument("--temperature", type=float, help="instruction sampling temperature (default 0.7; alpaca 1.0)")
    si.add_argument("--top-p", type=float, help="instruction sampling top-p (default 0.5; alpaca 1.0)")
    generator_args(si, "generator")
    si.set_defaults(func=cmd_synth_self_instruct)

    dd = sysub.add_parser("distill-data", help="sequence-level distillation: teacher replies to prompts as SFT data")
    dd.add_argument("--teacher", required=True, help="local model folder or http(s)://.../v1 endpoint")
    dd.add_argument("--prompts", required=True, help="JSONL with 'messages' (cut before the last reply) or 'prompt'")
    dd.add_argument("--out", required=True, help="output messages JSONL with provenance; resumable")
    dd.add_argument("--adapter", help="LoRA adapter folder on top of a local teacher")
    dd.add_argument("--max-new-tokens", type=int, default=256)
    dd.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    dd.add_argument("--top-p", type=float, default=1.0)
    dd.add_argument("--limit", type=int, help="the first N prompts only")
    dd.add_argument("--keep-truncated", action="store_true", help="keep replies cut at --max-new-tokens")
    dd.add_argument("--verifier", help="keep only replies this scorer accepts: 'skills' or module:function")
    generator_args(dd, "teacher")
    dd.set_defaults(func=cmd_synth_distill_data)

    co = sysub.add_parser("constraints", help="IFEval-style prompts (task + verifiable constraints) for "
                          "rejection sampling with best-of-n --scorer ifeval")
    co.add_argument("--out", required=True, help="output JSONL: IFEval input fields + messages, task, source")
    co.add_argument("--n", type=int, default=3000, help="number of distinct prompts")
    co.add_argument("--seed", type=int, default=0)
    co.set_defaults(func=cmd_synth_constraints)
