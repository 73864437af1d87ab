"""Merge a LoRA adapter into its base and write a standalone Hugging Face folder with a model card.

The folder holds safetensors weights in the chosen dtype, the tokenizer with the chat template used
in training, a ``generation_config.json`` whose eos ids include the template's end-of-turn token (so
``transformers`` ``generate`` and any server stop where training taught the model to), and a
``README.md`` model card built from what the training run wrote (``instructkit.json`` in the adapter
folder, ``config.yaml`` and ``summary.json`` in the run folder, ``eval.json`` files).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from instructkit.generate import add_end_of_turn_stops
from instructkit.models import ModelError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ModelError):
    """The export cannot be done as asked; the message says how to fix it."""


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fingerprint(folder: Path) -> list[tuple[str, int, str]]:
    """Weight files by name, size and a hash of their first MiB: equal for copies of one checkpoint."""
    out = []
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        with open(f, "rb") as fh:
            out.append((f.name, f.stat().st_size, hashlib.sha256(fh.read(1 << 20)).hexdigest()))
    return out


def check_adapter(adapter: Path, model_dir: Path, allow_base_mismatch: bool = False) -> dict:
    """The adapter's peft config, after checking it is a LoRA adapter trained on ``model_dir``."""
    cfg_path = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise ExportError(f"--adapter {adapter}: no such folder")
    if not cfg_path.exists():
        hint = (" It looks like a full model folder: pass it as --model without --adapter."
                if (adapter / "config.json").exists() else "")
        raise ExportError(f"--adapter {adapter} is not a LoRA adapter folder (no adapter_config.json).{hint} "
                          "Fix: point --adapter at the final/ folder of a LoRA run (lora.enabled: true)")
    cfg = read_json(cfg_path)
    if cfg is None:
        raise ExportError(f"{cfg_path}: not valid JSON. Fix: re-save the adapter")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ExportError(f"{cfg_path}: field 'peft_type' is {cfg.get('peft_type')!r}; only LoRA adapters can be "
                          "merged into the base weights")
    recorded = cfg.get("base_model_name_or_path")
    if not recorded or allow_base_mismatch:
        return cfg
    rec = Path(recorded)
    if rec.is_dir():
        same = rec.resolve() == model_dir.resolve() or (_fingerprint(rec) and _fingerprint(rec) == _fingerprint(model_dir))
        if not same:
            raise ExportError(f"base mismatch: the adapter {adapter} was trained on '{recorded}', a different model "
                              f"than --model {model_dir} (their weights differ). Fix: pass --model {recorded}, or "
                              "--allow-base-mismatch if you are sure")
    elif rec.name != model_dir.resolve().name:
        raise ExportError(f"base mismatch: the adapter {adapter} was trained on '{recorded}' (field "
                          f"base_model_name_or_path of adapter_config.json), but --model is {model_dir}. Fix: pass "
                          "that model's folder as --model, or --allow-base-mismatch if it is the same model under "
                          "another name")
    return cfg


def _prepare_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; exporting never overwrites. Fix: choose "
                          "a new folder or remove this one")
    tmp = out.with_name(out.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def export_model(model_dir: str | Path, out: str | Path, adapter: str | Path | None = None, dtype: str = "bf16",
                 eval_files: list[str | Path] | None = None, allow_base_mismatch: bool = False) -> Path:
    """Write ``out``: base (+ merged LoRA adapter) in ``dtype``, tokenizer, generation config, model card.

    Args:
        model_dir: The base model folder (or a full model to re-save), or a ``.gguf`` file (its
            converted folder, see :mod:`instructkit.gguf`).
        out: Destination; must not exist or be empty. Written to a sibling temp folder, then renamed.
        adapter: A peft LoRA folder (e.g. ``runs/NAME/final``); its tokenizer carries the training
            chat template.
        dtype: ``bf16``, ``fp16`` or ``fp32``. Merging itself is done in fp32.
        eval_files: Extra ``eval.json`` files for the card (found automatically in the adapter and
            run folders, and their ``eval*/`` subfolders).
        allow_base_mismatch: Merge even if the adapter records another base model.

    Returns:
        The output folder.
    """
    from transformers import AutoModelForCausalLM

    from instructkit.config import ModelConfig
    from instructkit.models import load_tokenizer

    from instructkit.gguf import resolve_model_path

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    model_dir, out = Path(resolve_model_path(model_dir)), Path(out)  # a .gguf file: its converted folder
    if not (model_dir / "config.json").exists():
        raise ExportError(f"--model {model_dir} is not a Hugging Face model folder (no config.json)")
    adapter = Path(adapter) if adapter else None
    adapter_cfg = check_adapter(adapter, model_dir, allow_base_mismatch) if adapter else None
    tmp = _prepare_out(out)
    try:
        tok_src = adapter if adapter and (adapter / "tokenizer_config.json").exists() else model_dir
        if adapter and tok_src != adapter:
            print(f"warning: {adapter} holds no tokenizer, so the training chat template is unknown; using the "
                  f"tokenizer of {model_dir}", file=sys.stderr)
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tok_src)))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter:
            # Training that added template tokens resized the embeddings; the base must match first.
            if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tokenizer))
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, adapter)
            except (RuntimeError, ValueError, KeyError) as e:
                raise ExportError(f"base mismatch: the adapter {adapter} does not fit --model {model_dir}: "
                                  f"{str(e).splitlines()[0][:300]}. Fix: pass the base model it was trained on"
                                  ) from None
            model = model.merge_and_unload()
        stops = add_end_of_turn_stops(model, tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model = model.to(DTYPES[dtype])
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"base_model": (adapter_cfg or {}).get("base_model_name_or_path") or str(model_dir),
                "model_dir": str(model_dir), "adapter": str(adapter) if adapter else None, "dtype": dtype,
                "stop_token_ids": sorted(stops),
                "stop_tokens": [tokenizer.convert_ids_to_tokens(i) for i in sorted(stops)]}
        (tmp / "instructkit_export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(out.name, model_dir, adapter, adapter_cfg, info, model,
                                                  eval_files or []),
                                       encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ model card


def _find_evals(adapter: Path | None, run_dir: Path | None, extra: list) -> list[Path]:
    found = [Path(p) for p in extra]
    for d in [x for x in (adapter, run_dir) if x is not None]:
        found += sorted(d.glob("eval*.json")) + sorted(d.glob("eval*/eval*.json"))
    seen, out = set(), []
    for p in found:
        if p.exists() and p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _eval_section(path: Path) -> list[str]:
    """Scalars as a list; a dict of dicts of scalars (e.g. per split) as a table; big tables summarised."""
    data = read_json(path)
    if not isinstance(data, dict):
        return [f"- `{path}`: not a JSON object, skipped"]
    lines = [f"From `{path}`:", ""]
    scalars = {k: v for k, v in data.items() if _scalar(v)}
    for k, v in scalars.items():
        lines.append(f"- {k}: {_fmt(v)}")
    for k, v in data.items():
        if not isinstance(v, dict):
            continue
        if all(_scalar(x) for x in v.values()):
            lines += [f"- {k}: " + ", ".join(f"{a} {_fmt(b)}" for a, b in v.items())]
        elif all(isinstance(x, dict) and all(_scalar(y) for y in x.values()) for x in v.values()) and len(v) <= 30:
            cols = list(dict.fromkeys(c for x in v.values() for c in x))
            lines += ["", f"| {k} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {r} | " + " | ".join(_fmt(x.get(c, "")) for c in cols) + " |" for r, x in v.items()]
            lines.append("")
        else:
            lines.append(f"- {k}: {len(v)} entries (see the file)")
    return lines + [""]


def model_card(title: str, model_dir: Path, adapter: Path | None, adapter_cfg: dict | None, info: dict, model,
               eval_files: list) -> str:
    """Markdown model card with YAML front matter for the Hugging Face Hub."""
    import yaml

    run_info = read_json(adapter / "instructkit.json") if adapter else read_json(model_dir / "instructkit.json")
    run_dir = (adapter or model_dir).parent
    run_cfg = None
    if (run_dir / "config.yaml").exists():
        run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    method = (run_info or {}).get("method") or (run_cfg or {}).get("method")
    tags = ["instructkit"] + ([method] if method else []) + (["lora"] if adapter else [])
    method = method or "not recorded (no instructkit.json or run config.yaml found)"
    base = info["base_model"]
    n_params = sum(p.numel() for p in model.parameters())
    front = {"library_name": "transformers", "tags": tags, "pipeline_tag": "text-generation"}
    if not Path(base).exists():  # a hub id, worth linking; local paths mean nothing elsewhere
        front["base_model"] = base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {title}", "",
             "Exported with `instructkit export`.", "",
             "| | |", "|---|---|",
             f"| base model | `{base}` |",
             f"| method | {method}{' + LoRA merged into the base weights' if adapter else ''} |",
             f"| parameters | {n_params:,} |",
             f"| dtype | {info['dtype']} |",
             f"| stop tokens | {', '.join(f'`{t}`' for t in info['stop_tokens'])} |", ""]
    if adapter_cfg:
        targets = adapter_cfg.get("target_modules")
        targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
        lines += ["## LoRA", "", f"r {adapter_cfg.get('r')}, alpha {adapter_cfg.get('lora_alpha')}, dropout "
                                 f"{adapter_cfg.get('lora_dropout')}, target modules: {targets}.", ""]
    data = (run_cfg or {}).get("data") or {}
    if data or run_info:
        lines += ["## Data", ""]
        if data:
            lines.append(f"- train: {data.get('train')}" + (f"; eval: {data.get('eval')}" if data.get("eval") else ""))
            lines.append(f"- template: {data.get('template')}, train_on: {data.get('train_on')}, max_length: "
                         f"{data.get('max_length')}, packing: {data.get('packing')}")
        if run_info:
            lines.append(f"- {run_info.get('train_examples', '?')} training examples, "
                         f"{run_info.get('skipped', 0)} records skipped")
        lines.append("")
    train = (run_cfg or {}).get("train")
    if train or run_info:
        lines += ["## Training", ""]
        if train:
            keys = ("epochs", "max_steps", "micro_batch_size", "grad_accum", "lr", "schedule", "warmup_ratio",
                    "weight_decay", "max_grad_norm")
            lines.append("- " + ", ".join(f"{k} {train[k]}" for k in keys if train.get(k) is not None))
        if run_info:
            fm = run_info.get("final_metrics") or {}
            lines.append(f"- {run_info.get('steps', '?')} steps in {run_info.get('seconds', '?')} s" +
                         "".join(f", {k} {_fmt(fm[k])}" for k in ("loss", "eval_loss") if k in fm))
        lines += [f"- seed {run_cfg.get('seed')}" if run_cfg else "", ""]
    evals = _find_evals(adapter, run_dir if (run_info or run_cfg) else None, eval_files)
    lines += ["## Evaluation", ""]
    if evals:
        for p in evals:
            lines += _eval_section(p)
    else:
        lines += ["No evaluation results were found (pass `--eval FILE` to include some).", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
              "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello\"}], add_generation_prompt=True,",
              "                              return_tensors=\"pt\", return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=64)  # stops on the end-of-turn token",
              "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
              "Or serve it: `instructkit serve --model PATH`.", ""]
    return "\n".join(lines)
