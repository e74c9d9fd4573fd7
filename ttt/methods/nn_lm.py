"""`nn` for causal language models: TTT-NN (Hardt & Sun 2024) with LoRA adapters.

Per query (batch): embed its text with the KB's sentence model, look the query up in the
adapter cache, else retrieve k text neighbours and fine-tune the LoRA weights with the LM
loss on them (one step per neighbour, nearest first, `ttt.steps` epochs), then score the
query. The flow (cache, retrieval, records) is the classifier `nn`'s; what differs is below.

Decisions (why):
- Only the LoRA weights train (`update_filter: adapter_only`) and only they are snapshotted
  and restored: the base weights never change, and copying a whole LM back per query would
  cost more than the adaptation on a real-sized model.
- Every query starts from the base LoRA state (B = 0: the unadapted model) with a fresh
  optimiser, as the paper resets the model per query. Cached adapters are LoRA state dicts
  named relative to the base model, so they load into any replica.
- The retrieval query is the row's `text` only: in multiple-choice rows the choices (and so
  the answer) never reach the embedder or the KB.
- A non-finite loss, gradient or update restores the base LoRA state: the query is then
  scored by the unadapted model, with the reason in `stop_reason`.
- The classifier path's loss-ratio and update-norm guards apply too (`ttt.lm.UpdateGuards`):
  `loss_ratio_stop` stops before a neighbour whose loss exceeds the first neighbour's x ratio;
  `max_update_norm` rolls back a step that moves the LoRA weights further (L2) than the cap;
  `max_cumulative_update_norm` rolls back a step that takes them further than the cap from the
  base LoRA state (the distance the adapter has moved for this query). As on the classifier
  path, the steps kept before a breach stay and the breach names itself in `stop_reason`.
  The class-distribution guards (diversity, entropy early stop, collapse reset) have no class
  distribution to watch on a language model and are refused.
- Optional logit lens (`nn.logit_lens_top_k > 0`): each query's per-layer top tokens before
  and after adaptation, returned under the record's `logit_lens` key for the worker to write
  beside the analysis.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

from ttt import lens, lm
from ttt.config import GuardConfig
from ttt.methods.base import StepResult
from ttt.methods.nn import NN

# the guards the LM fine-tune loop applies; a non-finite loss, gradient or update always restores
LM_GUARDS = ("grad_clip", "loss_ratio_stop", "max_update_norm", "max_cumulative_update_norm")
NONFINITE = ("nonfinite_loss", "nonfinite_grad", "nonfinite_update")


class NNLM(NN):
    required_hooks = ("embed", "lm_loss", "forward")
    model_kinds = ("causal_lm",)
    kb_payload = ("text",)

    def configure(self) -> None:
        if self.cfg.update_filter != "adapter_only":
            raise ValueError("method 'nn' on a causal LM trains LoRA adapters: set ttt.update_filter=adapter_only "
                             f"(got {self.cfg.update_filter})")
        if self.cfg.nn.score_weighted:
            raise ValueError("nn.score_weighted applies to classifiers; on a causal LM neighbours are "
                             "weighted by their order (nearest first)")
        unsupported = [name for name, value in self.cfg.guards if name not in LM_GUARDS
                       and value != GuardConfig.model_fields[name].default]
        if unsupported:
            raise ValueError(f"method 'nn' on a causal LM applies guards {', '.join(LM_GUARDS)}, not "
                             f"guards.{unsupported[0]} (a class-distribution guard: a language model has no classes)")
        super().configure()  # adapter_only: fails if the model carries no LoRA (model.lora unset)

    def snapshot_source(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.param_names, self.params)}

    def reseed(self) -> None:
        # LoRA dropout (when configured) draws from the global generator: same masks per query
        torch.manual_seed(self.cfg.seed)

    def describe(self, inputs: Any) -> str:
        digest = hashlib.sha1("\x00".join(inputs.texts).encode("utf-8")).hexdigest()[:12]
        return f"t:{digest}"

    def fine_tune(self, rows: list[dict], scores: list[float]) -> dict[str, Any] | None:
        texts = [r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"]]
        if not texts:
            return None
        g = self.cfg.guards
        guards = lm.UpdateGuards(g.loss_ratio_stop, g.max_update_norm, g.max_cumulative_update_norm)
        with torch.enable_grad():
            result = lm.finetune_on_texts(self.model, self.adapter.lm_loss, texts, epochs=self.cfg.steps,
                                          grad_clip=g.grad_clip,
                                          one_step_per_neighbour=self.cfg.nn.one_step_per_neighbour,
                                          params=self.params, optimizer=self.optimizer, guards=guards,
                                          reference=self.source_params())
        steps = result.steps
        if result.stop_reason in NONFINITE:
            self.reset()
            steps = 0
        self._updated_count = sum(p.numel() for p in self.params) if steps else 0
        return {"losses": result.losses, "steps": steps, "stop_reason": result.stop_reason,
                "grad_norm": result.grad_norm}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return lm.lora_state(self.model)

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        lm.load_lora_state(self.model, state)

    def predict(self, inputs: Any, rec: dict[str, Any]) -> StepResult:
        t = time.perf_counter()
        with torch.no_grad():
            logits = self.adapter.forward(inputs)
        rec["timing_forward_pass"] = time.perf_counter() - t
        return StepResult(logits.detach(), rec)

    def step(self, inputs: Any) -> StepResult:
        if not self.cfg.nn.logit_lens_top_k:
            return super().step(inputs)
        self.reset()
        before = self.lens(inputs, "before")
        result = super().step(inputs)
        result.record["logit_lens"] = before + self.lens(inputs, "after")
        return result

    def lens(self, inputs: Any, stage: str) -> list[dict[str, Any]]:
        """Logit-lens rows of each text in the batch at the current weights, tagged with `stage`
        and the text's index in the batch (`sample_index`)."""
        rows = []
        for i, text in enumerate(inputs.texts):
            records = self.adapter.logit_lens(text, top_k=self.cfg.nn.logit_lens_top_k,
                                              position=self.cfg.nn.logit_lens_position)
            rows += lens.lens_rows(records, stage=stage, sample_index=i)
        return rows
