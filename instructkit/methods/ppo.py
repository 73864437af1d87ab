"""PPO for RLHF (Ouyang et al. 2022; Ziegler et al. 2019), read top to bottom.

setup:    seed, tokenizer and template, prompts, the reward (a reward-model folder, the skills verifier
          or a ``module:function``), the policy, the reference (adapter-disabled base under LoRA, a
          frozen copy otherwise; only when ``rl.kl_coef`` > 0) and a value head: a scalar linear layer
          on the policy's final hidden state, trained jointly with it
rollout:  one loop "epoch" = one rollout: one sampled completion per prompt; its score (minus
          ``missing_stop_penalty`` when it never stopped; optionally whitened) is the reward of the last
          completion token, every token also gets ``-kl_coef * KL(pi || ref)``; GAE gives advantages
          (whitened over the rollout; negative ones then scaled by ``rl.negative_weight``) and value
          targets. Old log-probs and values are computed here, without gradients
train:    the shared loop, ``rl.rollout_epochs`` passes over the rollout's micro-batches; per token
          ``clipped policy loss + vf_coef * clipped value loss``, averaged over the step's tokens
save:     final/ as for SFT, plus ``final/value_head.safetensors``

The adaptive KL controller's coefficient is logged as ``kl_coef``; it is saved in every checkpoint
(``rollout.CarriedState``), so a resumed run continues it. As for GRPO, a checkpoint at a rollout
boundary (``train.save_every`` a multiple of the steps per rollout) resumes exactly; from one inside
a rollout, that rollout is re-sampled from the checkpoint's weights.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext

import torch

from instructkit import rollout as ro
from instructkit.config import RunConfig, dump_config
from instructkit.data.pipeline import prepare_template
from instructkit.distributed import is_main_process
from instructkit.generate import add_end_of_turn_stops
from instructkit.loop import LoopResult, StepOutput, start_run, train_loop
from instructkit.losses import (AdaptiveKLController, gae, kl_estimate, masked_mean, ppo_policy_loss, ppo_value_loss,
                                token_logprobs, weight_negative_advantages)
from instructkit.models import _decoder_and_head, count_trainable, load_model, load_tokenizer, save_final


def attach_value_head(model) -> torch.nn.Linear:
    """A scalar head on the final hidden state, registered on the model so the loop trains and checkpoints it."""
    base, _, head = _decoder_and_head(model)
    vh = torch.nn.Linear(base.config.hidden_size, 1).to(device=head.weight.device, dtype=torch.float32)
    torch.nn.init.zeros_(vh.weight)  # V = 0 at the start: the first advantages are the raw returns
    torch.nn.init.zeros_(vh.bias)
    model.value_head = vh
    return vh


def policy_and_values(model, batch: dict, temperature: float = 1.0,
                      value_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) log-probs (at the sampling ``temperature``) and values at completion positions, and the
    logits at those positions, from one decoder pass. ``value_only``: the policy pass runs without
    gradients (no autograd graph is built through the policy), so only the value head learns.

    The value of token t is read where the policy predicts it (the hidden state just before it),
    and logits are computed only at completion positions, as in ``models.target_logits``.
    """
    base, decoder, head = _decoder_and_head(model)
    with torch.no_grad() if value_only else nullcontext():
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
        select = batch["labels"][:, 1:] != -100
        h = hidden[:, :-1][select]
        logits = head(h)
        softcap = getattr(base.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logits = ro.tempered(logits, temperature)
        mask = batch["completion_mask"]
        logp = ro.scatter_completion(token_logprobs(logits, batch["labels"][:, 1:][select]), mask)
    values = ro.scatter_completion(model.value_head(h.float()).squeeze(-1).float(), mask)
    return logp, values, logits


class Rollouts(ro.CarriedState):
    """The loop's batch source for PPO: ``epoch -> micro-batches`` of a fresh rollout (the last one is kept)."""

    def __init__(self, cfg: RunConfig, model, tokenizer, prompts: ro.Prompts, reward_fn: ro.RewardFn, reference,
                 device: torch.device):
        self.cfg, self.rl = cfg, cfg.rl
        self.model, self.tokenizer, self.reference, self.device = model, tokenizer, reference, device
        self.prompts, self.reward_fn = prompts, reward_fn
        self.mbs = cfg.train.micro_batch_size
        self.micro_per_epoch = self.rl.rollout_epochs * ro.n_micro(self.rl.prompts_per_rollout, self.mbs)
        self.kl_ctl = AdaptiveKLController(self.rl.kl_coef, self.rl.kl_target, self.rl.kl_horizon) \
            if self.rl.kl_target and reference is not None else None
        self.kl_coef = self.rl.kl_coef
        self._cache: tuple[int, list[dict]] | None = None
        self.trend = ro.LengthTrend(self.rl.alarm_length_growth)

    def __call__(self, epoch: int) -> list[dict]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._build(epoch))
        return self._cache[1]

    def carried(self) -> dict:  # the adaptive KL coefficient is checkpointed with the length alarm's history
        return {**super().carried(), "kl_coef": self.kl_coef}

    def restore_carried(self, d: dict) -> None:
        super().restore_carried(d)
        self.kl_coef = d["kl_coef"]
        if self.kl_ctl is not None:
            self.kl_ctl.value = self.kl_coef

    @torch.no_grad()
    def _build(self, epoch: int) -> list[dict]:
        rl, P, mbs = self.rl, self.prompts, self.mbs
        self._begin_rollout(epoch)
        t0 = time.perf_counter()
        idx = ro.prompt_indices(len(P), rl.prompts_per_rollout, epoch, self.cfg.seed)
        ids = [P.ids[i] for i in idx]
        gens = ro.sample(self.model, self.tokenizer, ids, self.cfg, epoch, batch_size=max(mbs, 16))
        scores = torch.tensor(self.reward_fn([P.records[i] for i in idx], [P.messages[i] for i in idx],
                                             [g.text for g in gens]), dtype=torch.float32)
        never_stopped = torch.tensor([g.finish_reason != "stop" for g in gens], dtype=torch.float32)
        reward = scores - rl.missing_stop_penalty * never_stopped
        metrics = ro.completion_stats(scores, gens)  # reward_* here are the raw scores ...
        metrics["score_mean"], metrics["score_std"] = metrics.pop("reward_mean"), metrics.pop("reward_std")
        metrics["reward_mean"] = float(reward.mean())  # ... and this is after the missing-stop penalty
        if rl.whiten_rewards and reward.numel() > 1:
            reward = reward / (reward.std(unbiased=False) + 1e-8)

        micro = ro.micro_batches(ids, gens, mbs, self.tokenizer.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        kl_tok, kl_seq, n_tok = 0.0, [], 0
        for k, b in enumerate(micro):
            on_dev = {key: v.to(self.device) for key, v in b.items()}
            old_logp, old_values, _ = policy_and_values(self.model, on_dev, rl.temperature)
            mask = on_dev["completion_mask"].float()
            rewards = torch.zeros_like(old_logp)
            if self.reference is not None:
                b["ref_logp"] = self.reference(on_dev).cpu()
                kl = kl_estimate(old_logp, b["ref_logp"].to(self.device), rl.kl_estimator or "k1") * mask
                rewards = rewards - self.kl_coef * kl
                kl_tok += float(kl.sum())
                kl_seq.extend(kl.sum(1).tolist())
            last = mask.sum(1).long() - 1  # every completion has >= 1 token
            rows = torch.arange(len(last), device=rewards.device)
            rewards[rows, last] += reward[k * mbs:(k + 1) * mbs].to(rewards.device)
            adv, ret = gae(rewards, old_values, mask, rl.gamma, rl.lam)
            b.update(old_logp=old_logp.cpu(), old_values=old_values.cpu(), advantages=adv.cpu(), returns=ret.cpu(),
                     value_only=epoch < rl.value_warmup_rollouts)
            n_tok += int(mask.sum())
        self.model.train(was_training)

        # Advantage whitening over the whole rollout's tokens, not per micro-batch.
        all_adv = torch.cat([b["advantages"][b["completion_mask"].bool()] for b in micro])
        mean, std = all_adv.mean(), all_adv.std(unbiased=False)
        for b in micro:
            b["advantages"] = weight_negative_advantages((b["advantages"] - mean) / (std + 1e-8) * b["completion_mask"],
                                                         rl.negative_weight)
        all_ret = torch.cat([b["returns"][b["completion_mask"].bool()] for b in micro])
        all_val = torch.cat([b["old_values"][b["completion_mask"].bool()] for b in micro])
        var_ret = float(all_ret.var(unbiased=False))
        metrics.update({"returns_mean": float(all_ret.mean()), "value_mean": float(all_val.mean()),
                        "explained_variance": 1.0 - float((all_ret - all_val).var(unbiased=False)) / var_ret
                        if var_ret > 0 else 0.0, "kl_coef": self.kl_coef})
        if self.reference is not None:
            metrics["kl_ref"] = kl_tok / max(1, n_tok)
            metrics["kl_penalty_mean"] = -self.kl_coef * sum(kl_seq) / len(kl_seq)
            if self.kl_ctl is not None:
                self.kl_coef = self.kl_ctl.update(sum(kl_seq) / len(kl_seq), len(kl_seq))
        metrics["rollout_s"] = time.perf_counter() - t0
        ro.check_alarms(self.cfg, epoch, metrics, self.trend)
        return [{**b, "_rollout": metrics} for _ in range(rl.rollout_epochs) for b in micro]


def make_loss_fn(cfg: RunConfig):
    rl = cfg.rl

    def count_fn(batch: dict) -> int:
        return int(batch["completion_mask"].sum())

    def loss_fn(model, batch: dict) -> StepOutput:
        warmup = bool(batch.get("value_only", False))  # rl.value_warmup_rollouts: only the critic learns
        logp, values, logits = policy_and_values(model, batch, rl.temperature, value_only=warmup)
        mask = batch["completion_mask"].float()
        pg, clipped = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], rl.clip_eps, rl.clip_eps_high)
        vl, v_clipped = ppo_value_loss(values, batch["old_values"], batch["returns"], rl.vf_clip)
        loss_sum = (((0.0 if warmup else pg) + rl.vf_coef * vl) * mask).sum()
        with torch.no_grad():
            ent = 0.0
            for s in range(0, logits.shape[0], 1024):
                lp = torch.log_softmax(logits[s:s + 1024].float(), dim=-1)
                ent += float(-(lp.exp() * lp).sum())
            metrics = {"pg_loss": float(masked_mean(pg, mask)), "value_loss": float(masked_mean(vl, mask)),
                       "clip_fraction": float(masked_mean(clipped.float(), mask)),
                       "vf_clip_fraction": float(masked_mean(v_clipped.float(), mask)),
                       "approx_kl": float(masked_mean(kl_estimate(batch["old_logp"], logp.detach(), "k3"), mask)),
                       "entropy": ent / max(1.0, float(mask.sum())), "value_warmup": float(warmup)}
            if "ref_logp" in batch:
                metrics["kl"] = float(masked_mean(kl_estimate(logp.detach(), batch["ref_logp"],
                                                              rl.kl_estimator or "k1"), mask))
        metrics.update(batch.get("_rollout", {}))
        return StepOutput(loss_sum, int(mask.sum()), metrics)

    return loss_fn, count_fn


def main(cfg: RunConfig) -> LoopResult:
    out_dir, device = start_run(cfg.output_dir, cfg.seed)
    rl = cfg.rl

    # --- setup: tokenizer, template, prompts and reward. Data problems surface before the policy loads.
    tokenizer = load_tokenizer(cfg.model)
    template, n_added = prepare_template(tokenizer, cfg.data)
    reward_fn, prompts, evals = ro.load_rl_data(cfg, tokenizer, template)

    model = load_model(cfg.model, cfg.lora, device, n_tokens=len(tokenizer) if n_added else None)
    add_end_of_turn_stops(model, tokenizer)
    reference = ro.make_reference(model, cfg)  # before the value head, so a frozen copy has none
    attach_value_head(model)
    trainable, total = count_trainable(model)
    rollouts = Rollouts(cfg, model, tokenizer, prompts, reward_fn, reference, device)
    print(f"model: {cfg.model.name_or_path} on {device}, {trainable:,} of {total:,} parameters trainable"
          f"{' (LoRA)' if cfg.lora.enabled else ''} (value head included); ppo: {rl.prompts_per_rollout} "
          f"completions per rollout x {rl.rollout_epochs} epochs{ro.steps_note(cfg, rollouts.micro_per_epoch)}, "
          f"kl_coef {rl.kl_coef}{f' (adaptive, target {rl.kl_target})' if rl.kl_target else ''}"
          f"{f'; the first {rl.value_warmup_rollouts} rollouts train the value head only' if rl.value_warmup_rollouts else ''}",
          file=sys.stderr)
    dump_config(cfg, out_dir / "config.yaml")
    loss_fn, count_fn = make_loss_fn(cfg)

    evaluate, start = ro.rl_evaluation(model, tokenizer, prompts, evals, reward_fn, cfg, rollouts.micro_per_epoch)

    # --- train: the shared loop; each "epoch" is one rollout
    t0 = time.perf_counter()
    result = train_loop(model=model, batches=rollouts, micro_per_epoch=rollouts.micro_per_epoch, loss_fn=loss_fn,
                        cfg=cfg.train, out_dir=out_dir, eval_fn=evaluate, count_fn=count_fn,
                        device=device, run_config=cfg.model_dump(mode="json"), logging_cfg=cfg.logging, unit="tokens")
    elapsed = time.perf_counter() - t0

    # --- save: the policy as a normal model folder, the value head next to it
    if result.status == "interrupted":  # the loop has saved a checkpoint and printed how to resume
        return result
    value_head = model.value_head
    del model.value_head
    info = {"method": "ppo", "base_model": cfg.model.name_or_path, "lora": cfg.lora.enabled,
            "rl": rl.model_dump(mode="json"), "steps": result.global_step,
            "train_prompts": len(prompts), "eval_prompts": len(evals),
            "skipped": prompts.skipped + evals.skipped, "seconds": round(elapsed, 2), **start,
            "final_metrics": result.final_metrics}
    final = save_final(model, tokenizer, out_dir / "final", cfg.lora, extra_info=info)
    if not is_main_process():
        return result
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
              str(final / "value_head.safetensors"))
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    fm = result.final_metrics
    print(f"done: {result.global_step} steps in {elapsed:.1f}s, last rollout reward {fm.get('reward_mean', float('nan')):.3f}"
          + ro.eval_summary(fm, start) + f"; saved {final}",
          file=sys.stderr)
    return result
