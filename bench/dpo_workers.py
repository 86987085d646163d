"""One measured run of bench_dpo_vs_trl.py, in its own process so that peak memory is its own.

    python bench/dpo_workers.py '{"kind": "tunesmith", "steps": 12, ...}'

Prints one line ``RESULT {json}`` at the end. Kinds: ``tunesmith`` (tunesmith.train.train with objective dpo on
bench/data/pairs_train.jsonl), ``trl`` (TRL's DPOTrainer + PEFT on the same pairs and settings; ``"precompute":
true`` sets precompute_ref_log_probs), ``score`` (the held-out DPO loss of each saved adapter, computed by one
function for every tool: ``heldout_dpo``). Each training kind saves its final adapter and returns the folder.

A separate file from train_workers.py (the SFT benchmark's): that one is past 400 lines, and DPO measures other
things (pairs, the reference pass, a scoring process); the small helpers they share are imported from it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from harness import CpuMarks, choose_allocator, cpu_s, unshare_prompts  # noqa: E402  (torch-free; bench/ is sys.path[0])

if __name__ == "__main__":
    choose_allocator(json.loads(sys.argv[1]))

import torch  # noqa: E402

from train_workers import _StepTimer, peak_rss_mb  # noqa: E402  (bench/ is this script's sys.path[0])

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 1024  # no pair comes near it (longest prompt + answer ~600 tokens): neither tool truncates


def rendered_pairs(split: str, tokenizer) -> list:
    """tunesmith's rendering of bench/data/pairs_{split}.jsonl: RenderedPair (prompt, chosen, rejected token ids)."""
    from tunesmith.config import load_config
    from tunesmith.data.preference import load_preference_splits, render_pairs

    path = DATA / f"pairs_{split}.jsonl"
    cfg = load_config(None, [f"data.train={path}", f"data.valid={path}", f"data.max_length={MAX_LENGTH}",
                             "objective.name=dpo"])
    records = load_preference_splits(cfg.data, 0, "dpo").train  # with data.valid given: the whole file, in order
    result = render_pairs(records, tokenizer, cfg.data)
    assert not result.truncated and not result.dropped, "a pair does not fit data.max_length"
    return result.items


def _step_stats(step_secs: list[float], step_cpu: list[float], pairs: list[int], answer_tokens: list[int]) -> dict:
    """Pairs (and scored answer tokens) per wall and per CPU second over steps 2..N (step 1 holds one-time warm-up)
    and over all steps."""
    def rate(idx):
        secs, cpu = sum(step_secs[i] for i in idx), sum(step_cpu[i] for i in idx)
        n, tok = sum(pairs[i] for i in idx), sum(answer_tokens[i] for i in idx)
        return {"steps": len(idx), "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2), "pairs": n,
                "pairs_per_s": n / secs, "pairs_per_cpu_s": n / cpu, "answer_tokens_per_s": tok / secs}
    n = len(step_secs)
    return {"steady": rate(list(range(1, n)) if n > 1 else [0]), "all_steps": rate(list(range(n)))}


class _Timed:
    """Wraps a function: its wall and CPU seconds and calls, summed (the reference pass of either tool)."""

    def __init__(self, fn):
        self.fn, self.wall, self.cpu, self.calls = fn, 0.0, 0.0, 0

    def __call__(self, *a, **kw):
        t, c = time.perf_counter(), cpu_s()
        try:
            return self.fn(*a, **kw)
        finally:
            self.wall, self.cpu = self.wall + time.perf_counter() - t, self.cpu + cpu_s() - c
            self.calls += 1


# ---------------------------------------------------------------- tunesmith


def run_tunesmith(spec: dict) -> dict:
    from tunesmith.config import load_config
    from tunesmith.objectives import preference
    from tunesmith.train import train

    # Cold reference every run, as a first run on new data: tunesmith caches reference log-probabilities on disk
    # (keyed by model, token ids, precision), which would make every run after the first skip the pass.
    preference._read_cache = lambda path, n: None
    preference._write_cache = lambda path, values: None
    reference = preference._reference_logps = _Timed(preference._reference_logps)
    if spec.get("layout") == "packed":  # the extra run "unshared": every answer with its own copy of the prompt
        unshare_prompts()

    out = Path(tempfile.mkdtemp(prefix="bench-dpo-tunesmith-"))
    steps, bs = spec["steps"], spec["batch"]
    overrides = [f"model.name={MODEL}", "model.dtype=float32", f"train.kernels={spec.get('kernels', 'auto')}",
                 "objective.name=dpo", "objective.dpo.beta=0.1", "objective.dpo.loss_type=sigmoid",
                 f"data.train={DATA / 'pairs_train.jsonl'}", f"data.valid={DATA / 'pairs_valid.jsonl'}",
                 f"data.max_length={MAX_LENGTH}", "data.shuffle=false", f"output_dir={out}",
                 "method.name=lora", "method.lora.r=16", "method.lora.alpha=32", "method.lora.dropout=0.0",
                 f"train.max_steps={steps}", f"train.batch_size={bs}", "train.grad_accum=1", f"train.lr={spec['lr']}",
                 "train.schedule=cosine", "train.warmup_steps=1", "train.weight_decay=0.0", "train.max_grad_norm=1.0",
                 f"train.seed={spec['seed']}", "train.gradient_checkpointing=false",
                 f"eval.every_steps={steps}", "eval.batch_size=8", "eval.samples=0", "eval.metric_examples=0",
                 "eval.compare_base=false", f"checkpoint.every_steps={steps}"]
    cfg = load_config(None, overrides)
    marks = CpuMarks()  # CPU time at the run start and at each step end

    t0 = time.perf_counter()
    train(cfg, quiet=True, overwrite=True, sinks=[marks])
    wall = time.perf_counter() - t0
    rss = peak_rss_mb()
    events = [json.loads(line) for line in open(out / "metrics.jsonl")]
    trains = [e for e in events if e["kind"] == "train"]
    started = next(e for e in events if e["kind"] == "run_started")
    assert started["train_examples"] == sum(1 for _ in open(DATA / "pairs_train.jsonl")), "not every pair was kept"
    step_cpu = marks.per_step()
    stats = _step_stats([e["tokens"] / e["tokens_per_s"] for e in trains], step_cpu, [bs] * len(trains),
                        [e["tokens"] for e in trains])
    return {"peak_rss_mb": rss, "wall_s": wall, "reference_s": reference.wall, "reference_cpu_s": reference.cpu,
            "reference_pairs": started["train_examples"] + started["valid_examples"],
            "own_val_loss": [e["val_loss"] for e in events if e["kind"] == "eval"][-1],
            "train_losses": [e["loss"] for e in trains], "step_answer_tokens": [e["tokens"] for e in trains],
            "adapter": str(out / "best"), "workdir": str(out), **stats}


# ---------------------------------------------------------------- TRL


def run_trl(spec: dict) -> dict:
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models import ensure_local
    from tunesmith.models.loading import ensure_pad_token

    precompute = spec.get("precompute", False)
    reference = _Timed(DPOTrainer._precompute_ref_logps)
    DPOTrainer._precompute_ref_logps = lambda self, *a, **kw: reference(self, *a, **kw)  # a method: binds self
    t0 = time.perf_counter()
    folder = ensure_local(MODEL)  # the cached safetensors folder tunesmith converted from the GGUF
    tok = AutoTokenizer.from_pretrained(folder)
    ensure_pad_token(tok)  # the same pad token tunesmith uses (<|endoftext|>, not eos)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = [json.loads(line) for line in open(DATA / "pairs_train.jsonl")]
    data = Dataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                               "rejected": r["non_preferred_output"]} for r in rows])  # conversational pairs
    steps, bs = spec["steps"], spec["batch"]
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-trl-"))
    args = DPOConfig(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=bs, gradient_accumulation_steps=1,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0,
        seed=spec["seed"], bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_tqdm=True, max_length=MAX_LENGTH, beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=8)
    timer = _StepTimer()
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=[timer.callback(TrainerCallback)])
    assert len(trainer.train_dataset) == len(rows), "TRL dropped pairs"
    collate = trainer.data_collator
    batches = []

    def counting(features):  # each step's pairs and scored answer tokens (2P rows: the chosen, then the rejected)
        b = collate(features)
        batches.append((b["input_ids"].shape[0] // 2, int(b["completion_mask"].sum())))
        return b

    trainer.data_collator = counting
    trainer.train()
    wall = time.perf_counter() - t0
    rss = peak_rss_mb()
    batches = batches[:len(timer.secs)]
    adapter = work / "adapter"
    trainer.model.save_pretrained(adapter)
    stats = _step_stats(timer.secs, timer.cpu, [b[0] for b in batches], [b[1] for b in batches])
    return {"peak_rss_mb": rss, "wall_s": wall, "reference_s": reference.wall if precompute else None,
            "reference_cpu_s": reference.cpu if precompute else None,
            "reference_pairs": len(rows) if precompute else None,
            "train_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "step_answer_tokens": [b[1] for b in batches], "adapter": str(adapter), "workdir": str(work),
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__}, **stats}


# ---------------------------------------------------------------- the yardstick: held-out DPO loss


@torch.no_grad()
def answer_logps(model, pairs) -> torch.Tensor:
    """(P, 2) fp64: summed log-probabilities of each pair's chosen and rejected answer given its prompt. One sequence
    at a time, no padding, plain transformers forward: independent of both tools' batching and kernels."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for i, p in enumerate(pairs):
        for j, answer in enumerate((p.chosen_ids, p.rejected_ids)):
            ids = torch.tensor([p.prompt_ids + answer])  # (1, T)
            n = len(p.prompt_ids)
            logits = model(input_ids=ids).logits[0, n - 1:-1].float()  # (A, V): the positions that predict the answer
            target = torch.tensor(answer)[:, None]  # (A, 1)
            out[i, j] = float(torch.log_softmax(logits, -1).gather(-1, target).sum())
    return out


def heldout_dpo(policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1) -> dict:
    """Sigmoid DPO loss (Rafailov et al. 2023), mean over pairs: -log sigmoid(beta * ((pc - rc) - (pr - rr)))."""
    h = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))  # (P,) reward margins
    return {"loss": float(-torch.nn.functional.logsigmoid(h).mean()), "accuracy": float((h > 0).double().mean()),
            "margin": float(h.mean()), "pairs": len(h)}


def run_score(spec: dict) -> dict:
    """Every adapter of ``spec["adapters"]`` (name -> folder) loaded into the same fp32 base, scored on pairs_valid with
    the base as reference; the base itself is scored too (log 2 exactly: a check of the function)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.models import ensure_local, load_tokenizer

    folder = ensure_local(MODEL)
    pairs = rendered_pairs("valid", load_tokenizer(folder))

    def base():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    reference = answer_logps(base(), pairs)
    scores = {"base": heldout_dpo(reference, reference)}
    assert abs(scores["base"]["loss"] - math.log(2)) < 1e-9
    for name, path in spec["adapters"].items():
        model = PeftModel.from_pretrained(base(), path).eval()
        b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
        if len(b) != 30 * 7 or not all(bool(p.abs().sum() > 0) for p in b.values()):  # 30 blocks x 7 projections
            raise RuntimeError(f"{name}: adapter {path} did not load as trained LoRA ({len(b)} lora_B tensors)")
        scores[name] = heldout_dpo(answer_logps(model, pairs), reference)
    return {"scores": scores}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    elif spec["kind"] == "score":  # its figures do not depend on threads, and one thread never waits for a core that
        torch.set_num_threads(1)  # another process holds (two threads on a busy 2-core machine: ~100x slower per op)
    result = {"tunesmith": run_tunesmith, "trl": run_trl, "score": run_score}[spec["kind"]](spec)
    result["torch_threads"] = torch.get_num_threads()
    from tunesmith import allocator
    result["allocator"] = allocator.describe()
    print("RESULT " + json.dumps({**spec, **result}), flush=True)


if __name__ == "__main__":
    main()
