"""GRPO with verifiable rewards (Shao et al. 2024, "DeepSeekMath", sec. 4), read top to bottom.

setup:    seed, tokenizer and template, prompts (JSONL records of ``data.train``), the reward
          (the skills verifier or a ``module:function``), the policy, the reference (only when
          ``rl.kl_coef`` > 0: adapter-disabled base under LoRA, a frozen copy otherwise)
rollout:  one loop "epoch" = one rollout. The batch source samples ``group_size`` completions for
          each of ``prompts_per_rollout`` prompts with the *current* policy, scores them, turns the
          rewards into group-normalised advantages (losses.group_advantages; negative ones scaled
          by ``rl.negative_weight``) and precomputes the old-policy and reference log-probs of every
          completion token, without gradients. With
          ``rl.sampling_rounds`` > 1 (DAPO dynamic sampling, Yu et al. 2025), groups whose rewards are
          all equal are set aside and more prompts are sampled until the rollout is full of groups
          that carry a learning signal
train:    the shared loop; per micro-batch the clipped token-level ratio loss
          ``-min(rho A, clip(rho) A) + kl_coef * KL_k3(pi || ref)``, aggregated as ``rl.loss_aggregation``
save:     final/ as for SFT

Rollout telemetry (reward mean/std, groups with no reward variance, completion lengths, stop and
truncation fractions, KL to the reference, reward-length correlation) is attached to every
micro-batch of the rollout, so the loop logs it with each step next to the loss-side metrics (clip
fraction, approximate KL to the rollout policy, entropy).

Resume: the loop re-asks for the rollout of the epoch it resumes in; sampling is seeded by
(seed, epoch), so a checkpoint taken at a rollout boundary (``train.save_every`` a multiple of the
optimizer steps per rollout) resumes exactly; from a checkpoint inside a rollout, that rollout is
re-sampled from the checkpoint's weights. The length alarm's history is saved with the checkpoint
(``rollout.CarriedState``).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from instructkit import rollout as ro
from instructkit.config import RunConfig, dump_config
from instructkit.data.pipeline import prepare_template
from instructkit.distributed import is_main_process
from instructkit.generate import add_end_of_turn_stops
from instructkit.loop import LoopResult, StepOutput, start_run, train_loop
from instructkit.losses import (aggregate_token_loss, group_advantages, kl_estimate, ppo_policy_loss, token_logprobs,
                                weight_negative_advantages)
from instructkit.models import count_trainable, load_model, load_tokenizer, save_final, target_logits


class Rollouts(ro.CarriedState):
    """The loop's batch source: ``epoch -> micro-batches`` of a fresh rollout (the last one is kept)."""

    def __init__(self, cfg: RunConfig, model, tokenizer, prompts: ro.Prompts, reward_fn: ro.RewardFn, reference,
                 device: torch.device):
        self.cfg, self.rl = cfg, cfg.rl
        self.model, self.tokenizer, self.reference, self.device = model, tokenizer, reference, device
        self.prompts, self.reward_fn = prompts, reward_fn
        self.mbs = cfg.train.micro_batch_size
        self.micro_per_epoch = self.rl.rollout_epochs * ro.n_micro(self.rl.prompts_per_rollout * self.rl.group_size,
                                                                   self.mbs)
        self._cache: tuple[int, list[dict]] | None = None
        self.trend = ro.LengthTrend(self.rl.alarm_length_growth)

    def __call__(self, epoch: int) -> list[dict]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._build(epoch))
        return self._cache[1]

    def _sample_groups(self, epoch: int) -> tuple[list[tuple], torch.Tensor, list, int]:
        """Groups ``(prompt ids, completions, advantages, rewards)`` of this rollout, every sampled reward and
        completion (for telemetry) and the rounds used. With ``rl.sampling_rounds`` R > 1, round r of rollout e
        takes the prompts of slot e * R + r of the shuffled stream; groups with reward variance come first."""
        rl, G, P, R = self.rl, self.rl.group_size, self.prompts, self.rl.sampling_rounds
        kept, spare, all_rewards, all_gens = [], [], [], []
        for r in range(R):
            slot = epoch * R + r  # R = 1: slot = epoch, plain GRPO
            idx = [i for i in ro.prompt_indices(len(P), rl.prompts_per_rollout, slot, self.cfg.seed) for _ in range(G)]
            ids = [P.ids[i] for i in idx]
            gens = ro.sample(self.model, self.tokenizer, ids, self.cfg, slot, batch_size=max(self.mbs, 16))
            rewards = torch.tensor(self.reward_fn([P.records[i] for i in idx], [P.messages[i] for i in idx],
                                                  [g.text for g in gens]), dtype=torch.float32)
            adv = weight_negative_advantages(group_advantages(rewards, G, scale=rl.scale_rewards), rl.negative_weight)
            all_rewards.append(rewards)
            all_gens += gens
            for s in range(0, len(idx), G):
                group = (ids[s:s + G], gens[s:s + G], adv[s:s + G], rewards[s:s + G])
                informative = R == 1 or bool(rewards[s:s + G].max() > rewards[s:s + G].min())
                (kept if informative else spare).append(group)
            if len(kept) >= rl.prompts_per_rollout:
                break
        return (kept + spare)[:rl.prompts_per_rollout], torch.cat(all_rewards), all_gens, r + 1

    def _build(self, epoch: int) -> list[dict]:
        rl, G = self.rl, self.rl.group_size
        self._begin_rollout(epoch)
        t0 = time.perf_counter()
        groups, sampled_rewards, sampled_gens, rounds = self._sample_groups(epoch)
        ids = [x for g in groups for x in g[0]]
        gens = [x for g in groups for x in g[1]]
        adv = torch.cat([g[2] for g in groups])
        rewards = torch.cat([g[3] for g in groups])
        micro = ro.micro_batches(ids, gens, self.mbs, self.tokenizer.pad_token_id)
        kl_sum, n_tok = 0.0, 0
        was_training = self.model.training
        self.model.eval()  # no dropout while measuring the rollout policy
        for k, b in enumerate(micro):
            b["advantages"] = adv[k * self.mbs:(k + 1) * self.mbs].clone()
            on_dev = {key: v.to(self.device) for key, v in b.items()}
            b["old_logp"] = ro.completion_logps(self.model, on_dev, rl.temperature).cpu()
            if self.reference is not None:
                b["ref_logp"] = self.reference(on_dev).cpu()
                kl = kl_estimate(b["old_logp"], b["ref_logp"], rl.kl_estimator or "k3")
                kl_sum += float((kl * b["completion_mask"]).sum())
            n_tok += int(b["completion_mask"].sum())
        self.model.train(was_training)

        # reward, length and stop telemetry over everything sampled (an unbiased view of the policy);
        # zero_std_groups over the groups trained on
        metrics = ro.completion_stats(sampled_rewards, sampled_gens)
        metrics["zero_std_groups"] = float((rewards.view(-1, G).std(dim=1, unbiased=False) == 0).float().mean())
        if rl.sampling_rounds > 1:
            metrics["sampling_rounds"] = float(rounds)
            metrics["zero_std_groups_sampled"] = float(
                (sampled_rewards.view(-1, G).std(dim=1, unbiased=False) == 0).float().mean())
        if self.reference is not None:
            metrics["kl_ref"] = kl_sum / max(1, n_tok)
        metrics["rollout_s"] = time.perf_counter() - t0
        ro.check_alarms(self.cfg, epoch, metrics, self.trend)
        return [{**b, "_rollout": metrics} for _ in range(rl.rollout_epochs) for b in micro]


# ----------------------------------------------------------------------------------------------
# Loss


def make_loss_fn(cfg: RunConfig):
    rl = cfg.rl

    def count_fn(batch: dict) -> int:
        """Units of the aggregation (sequences, tokens, or sequences x max_new_tokens): the loop's normaliser."""
        mask = batch["completion_mask"]
        if rl.loss_aggregation == "bnpo":
            return int(mask.sum())
        return int(mask.shape[0]) * (rl.max_new_tokens if rl.loss_aggregation == "dr_grpo" else 1)

    def loss_fn(model, batch: dict) -> StepOutput:
        logits, targets = target_logits(model, batch)
        logits = ro.tempered(logits, rl.temperature)  # the distribution the rollout sampled from
        mask = batch["completion_mask"].bool()
        logp = ro.scatter_completion(token_logprobs(logits, targets), mask)
        adv = batch["advantages"].float()[:, None].expand_as(logp)
        per_token, clipped = ppo_policy_loss(logp, batch["old_logp"], adv, rl.clip_eps, rl.clip_eps_high)
        m = mask.float()
        n_tok = m.sum().clamp(min=1)
        metrics = {}
        if "ref_logp" in batch:
            kl = kl_estimate(logp, batch["ref_logp"], rl.kl_estimator or "k3")
            per_token = per_token + rl.kl_coef * kl
            metrics["kl"] = float((kl.detach() * m).sum() / n_tok)
        loss_sum, units = aggregate_token_loss(per_token, mask, rl.loss_aggregation, rl.max_new_tokens)
        with torch.no_grad():
            ent = 0.0
            for s in range(0, logits.shape[0], 1024):
                lp = torch.log_softmax(logits[s:s + 1024].float(), dim=-1)
                ent += float(-(lp.exp() * lp).sum())
            # k3 of the current policy against the rollout policy: how far this step has moved
            approx = kl_estimate(batch["old_logp"], logp.detach(), "k3")
        metrics.update({"clip_fraction": float((clipped.float() * m).sum() / n_tok),
                        "approx_kl": float((approx * m).sum() / n_tok),
                        "entropy": ent / float(n_tok)})
        metrics.update(batch.get("_rollout", {}))
        return StepOutput(loss_sum, units, metrics)

    return loss_fn, count_fn


# ----------------------------------------------------------------------------------------------


def main(cfg: RunConfig) -> LoopResult:
    out_dir, device = start_run(cfg.output_dir, cfg.seed)
    rl = cfg.rl

    # --- setup: tokenizer, template, prompts and reward. Data problems surface before the model loads.
    tokenizer = load_tokenizer(cfg.model)
    template, n_added = prepare_template(tokenizer, cfg.data)
    reward_fn, prompts, evals = ro.load_rl_data(cfg, tokenizer, template)

    model = load_model(cfg.model, cfg.lora, device, n_tokens=len(tokenizer) if n_added else None)
    add_end_of_turn_stops(model, tokenizer)
    trainable, total = count_trainable(model)
    reference = ro.make_reference(model, cfg)
    rollouts = Rollouts(cfg, model, tokenizer, prompts, reward_fn, reference, device)
    print(f"model: {cfg.model.name_or_path} on {device}, {trainable:,} of {total:,} parameters trainable"
          f"{' (LoRA)' if cfg.lora.enabled else ''}; grpo: {rl.prompts_per_rollout} prompts x {rl.group_size} "
          f"completions per rollout{ro.steps_note(cfg, rollouts.micro_per_epoch)}, {rl.loss_aggregation} "
          f"aggregation, kl_coef {rl.kl_coef}"
          f"{' (reference: adapters off)' if reference and cfg.lora.enabled else ' (reference: frozen copy)' if reference else ''}",
          file=sys.stderr)
    dump_config(cfg, out_dir / "config.yaml")
    loss_fn, count_fn = make_loss_fn(cfg)

    evaluate, start = ro.rl_evaluation(model, tokenizer, prompts, evals, reward_fn, cfg, rollouts.micro_per_epoch)

    # --- train: the shared loop; each "epoch" is one rollout
    t0 = time.perf_counter()
    result = train_loop(model=model, batches=rollouts, micro_per_epoch=rollouts.micro_per_epoch, loss_fn=loss_fn,
                        cfg=cfg.train, out_dir=out_dir, eval_fn=evaluate,
                        count_fn=count_fn, device=device, run_config=cfg.model_dump(mode="json"),
                        logging_cfg=cfg.logging,
                        unit={"grpo": "sequences", "bnpo": "tokens", "dr_grpo": "token_slots"}[rl.loss_aggregation])
    elapsed = time.perf_counter() - t0

    # --- save
    if result.status == "interrupted":  # the loop has saved a checkpoint and printed how to resume
        return result
    info = {"method": "grpo", "base_model": cfg.model.name_or_path, "lora": cfg.lora.enabled,
            "rl": rl.model_dump(mode="json"), "steps": result.global_step,
            "train_prompts": len(prompts), "eval_prompts": len(evals),
            "skipped": prompts.skipped + evals.skipped, "seconds": round(elapsed, 2), **start, "final_metrics": result.final_metrics}
    final = save_final(model, tokenizer, out_dir / "final", cfg.lora, extra_info=info)
    if not is_main_process():
        return result
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    fm = result.final_metrics
    print(f"done: {result.global_step} steps in {elapsed:.1f}s, last rollout reward {fm.get('reward_mean', float('nan')):.3f}"
          + ro.eval_summary(fm, start) + f"; saved {final}",
          file=sys.stderr)
    return result
