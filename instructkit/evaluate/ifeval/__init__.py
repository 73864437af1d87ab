"""IFEval-compatible instruction-following evaluation (Zhou et al., 2023, arXiv:2311.07911).

All 25 verifiable instruction types with the reference semantics (:mod:`.checks`), strict and loose
scoring with the four published metrics (:mod:`.scoring`), offline NLTK-identical sentence and word
splitting and seeded language identification (:mod:`.text`), and reading or generating responses
(:mod:`.responses`).

Example::

    from instructkit.evaluate.ifeval import load_prompts, score_responses
    records = load_prompts("input_data.jsonl")
    result = score_responses(records, {r.prompt: my_model(r.prompt) for r in records})
    print(result.metrics()["prompt_level_strict_acc"])
    result.write("out/")  # ifeval.json + ifeval_details.jsonl
"""

from instructkit.evaluate.ifeval.checks import INSTRUCTIONS, Instruction, InstructionType, bind
from instructkit.evaluate.ifeval.responses import (generate_responses, load_responses, match_responses,
                                                   write_responses)
from instructkit.evaluate.ifeval.scoring import (METRICS, IFEvalResult, PromptRecord, PromptResult, load_prompts,
                                                 loose_variants, parse_record, score_prompt, score_responses)

__all__ = ["INSTRUCTIONS", "METRICS", "IFEvalResult", "Instruction", "InstructionType", "PromptRecord",
           "PromptResult", "bind", "generate_responses", "load_prompts", "load_responses", "loose_variants",
           "match_responses", "parse_record", "score_prompt", "score_responses", "write_responses"]
