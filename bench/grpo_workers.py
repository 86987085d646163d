"""One measured run of bench_grpo_vs_trl.py, in its own process so that peak memory is its own.

    python bench/grpo_workers.py '{"kind": "tunesmith", "steps": 12, "prompts": 4, "generations": 4, ...}'

Prints one line ``RESULT {json}`` at the end. Kinds: ``tunesmith`` (tunesmith.train.train with objective grpo on
bench/data/prompts_train.jsonl, graded by "grpo_workers:reward"), ``trl`` (TRL's GRPOTrainer + PEFT on the same
prompts, settings and reward function), ``score`` (the held-out reward of each saved adapter and of the base,
computed by one function for every tool: ``heldout_reward``). Each training kind saves its final adapter and returns
the folder.

The reward is defined once, here (``reward``), in the form tunesmith calls a "module:function" grader (one answer:
``sample["output_text"]`` and the data row ``item``); ``trl_reward`` calls it in the form TRL calls reward
functions (a step's prompts, completions and dataset columns as lists). Every call records the question it graded
and the score (``SEEN``), so the driver checks from one record, the same way for both tools, which prompts each
step trained on and what its answers scored.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from difflib import SequenceMatcher
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from harness import CpuMarks, choose_allocator, unshare_prompts  # noqa: E402  (torch-free; bench/ is sys.path[0])

if __name__ == "__main__":
    choose_allocator(json.loads(sys.argv[1]))
    # tunesmith imports its grader "grpo_workers:reward" by name: let that be this module, not a second copy with a
    # SEEN of its own (bench/ is this script's sys.path[0], so the import would otherwise load the file again)
    sys.modules.setdefault("grpo_workers", sys.modules["__main__"])

import torch  # noqa: E402

from train_workers import _StepTimer, peak_rss_mb  # noqa: E402  (bench/ is this script's sys.path[0])

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 1024  # prompt + answer; the prompts are ~40 tokens: neither tool truncates one
LENGTH_PENALTY = 0.1  # the most a long answer loses: at 100 characters past the reference's length


# ---------------------------------------------------------------- the reward, one function for both tools

SEEN: list[tuple[str, float]] = []  # (the user's question, the score) of every answer graded here, in order


def reward(sample: dict, item: dict) -> float:
    """1.0 for exactly the reference date; otherwise partial credit, at most 0.5: 0.5 when the reference date appears
    within the answer, else half the answer's character overlap with it (difflib's ratio, 2 * matches / total length:
    a date with one digit wrong scores ~0.45), less up to LENGTH_PENALTY for characters past the reference's length
    (so the terse right answer beats the right date inside a sentence). Range [-0.1, 1]."""
    answer, reference = sample["output_text"].strip(), item["reference_answer"]
    if answer == reference:
        score = 1.0
    else:
        score = 0.5 if reference in answer else 0.5 * SequenceMatcher(None, answer, reference, autojunk=False).ratio()
        score -= LENGTH_PENALTY * min(1.0, max(0, len(answer) - len(reference)) / 100)
    SEEN.append((item["messages"][-1]["content"], score))
    return score


def trl_reward(prompts: list, completions: list, reference_answer: list, **trl_extras) -> list[float]:
    """``reward`` as TRL calls a reward function: the step's conversational prompts and completions, and the dataset's
    other columns as keyword lists (trl_extras: trainer_state, log_extra, log_metric, which this reward ignores)."""
    return [reward({"output_text": c[-1]["content"]}, {"messages": p, "reference_answer": r})
            for p, c, r in zip(prompts, completions, reference_answer, strict=True)]


def _graded_steps(steps: int, prompts: int, generations: int) -> dict:
    """Per training step, from SEEN: its prompts (each group's question) and the mean score of its answers. The first
    steps x prompts x generations grades are the training steps' (tunesmith grades its held-out prompts after)."""
    per_step = prompts * generations
    if len(SEEN) < steps * per_step:
        raise RuntimeError(f"{len(SEEN)} answers graded, fewer than {steps} steps x {per_step}: the reward failed")
    chunks = [SEEN[k * per_step:(k + 1) * per_step] for k in range(steps)]
    for c in chunks:  # each group's answers together, as both tools lay a step out
        assert all(c[j][0] == c[j - j % generations][0] for j in range(per_step)), "a group mixes prompts"
    return {"step_prompts": [[q for q, _ in c[::generations]] for c in chunks],
            "step_rewards": [sum(s for _, s in c) / per_step for c in chunks]}


# ---------------------------------------------------------------- timing


class _PerCall:
    """Wraps a function: the wall seconds of each call (a TRL step's sampling and grading)."""

    def __init__(self, fn):
        self.fn, self.walls = fn, []

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.walls.append(time.perf_counter() - t)


def _step_stats(step_secs: list[float], step_cpu: list[float], gen_secs: list[float]) -> dict:
    """Steps per wall and per CPU second, and the seconds spent sampling + grading versus training (forward, backward,
    optimizer), over steps 2..N (step 1 holds one-time warm-up) and over all steps."""
    def rate(idx):
        secs, cpu, gen = (sum(x[i] for i in idx) for x in (step_secs, step_cpu, gen_secs))
        return {"steps": len(idx), "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
                "steps_per_s": len(idx) / secs, "steps_per_cpu_s": len(idx) / cpu,
                "generation_s_per_step": gen / len(idx), "training_s_per_step": (secs - gen) / len(idx)}
    n = len(step_secs)
    return {"steady": rate(list(range(1, n)) if n > 1 else [0]), "all_steps": rate(list(range(n))),
            "step_s": step_secs, "step_generation_s": gen_secs}


# ---------------------------------------------------------------- tunesmith


def run_tunesmith(spec: dict) -> dict:
    from tunesmith.config import load_config
    from tunesmith.train import train

    if spec.get("layout") == "packed":  # the extra run "unshared": every answer with its own copy of the prompt
        unshare_prompts()

    out = Path(tempfile.mkdtemp(prefix="bench-grpo-tunesmith-"))
    steps, p, g, m = spec["steps"], spec["prompts"], spec["generations"], spec["max_new_tokens"]
    overrides = [f"model.name={MODEL}", "model.dtype=float32", f"train.kernels={spec.get('kernels', 'auto')}",
                 "objective.name=grpo", "objective.grpo.grader=grpo_workers:reward",
                 f"objective.grpo.num_generations={g}", f"objective.grpo.max_completion_length={m}",
                 "objective.grpo.temperature=1.0", "objective.grpo.top_p=1.0", "objective.grpo.top_k=0",
                 "objective.grpo.loss_type=dapo", "objective.grpo.scale_rewards=group", "objective.grpo.beta=0.0",
                 "objective.grpo.epsilon=0.2", "objective.grpo.mask_truncated_completions=true",
                 f"data.train={DATA / 'prompts_train.jsonl'}", f"data.valid={DATA / 'prompts_valid.jsonl'}",
                 f"data.max_length={MAX_LENGTH}", "data.shuffle=false", f"output_dir={out}",
                 "method.name=lora", "method.lora.r=16", "method.lora.alpha=32", "method.lora.dropout=0.0",
                 f"train.max_steps={steps}", f"train.batch_size={p}", "train.grad_accum=1", f"train.lr={spec['lr']}",
                 "train.schedule=cosine", "train.warmup_steps=1", "train.weight_decay=0.0", "train.max_grad_norm=1.0",
                 f"train.seed={spec['seed']}", "train.gradient_checkpointing=false",
                 # a step's p x g answers sampled in one generate call, as TRL's generation batch does
                 f"eval.every_steps={steps}", f"eval.batch_size={p * g}", "eval.samples=0", "eval.metric_examples=0",
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
    assert started["train_examples"] == sum(1 for _ in open(DATA / "prompts_train.jsonl")), "not every prompt kept"
    assert len(trains) == steps, f"{len(trains)} steps logged, {steps} asked"
    # the step's wall time from the loop's own clock (tokens / tokens_per_s: sampling + grading + training, evaluation
    # and checkpoints excluded); generation_s is its sampling + grading share (objectives/grpo.py rollout)
    stats = _step_stats([e["tokens"] / e["tokens_per_s"] for e in trains],
                        marks.per_step(),
                        [e["stats"]["generation_s"] for e in trains])
    graded = _graded_steps(steps, p, g)
    logged = [e["stats"]["reward"] for e in trains]
    assert all(abs(a - b) < 1e-4 for a, b in zip(logged, graded["step_rewards"])), (logged, graded["step_rewards"])
    return {"peak_rss_mb": rss, "wall_s": wall,
            "own_val_reward": -[e["val_loss"] for e in events if e["kind"] == "eval"][-1],
            "train_losses": [e["loss"] for e in trains],
            "completion_lengths": [e["stats"]["completion_length"] for e in trains],
            "adapter": str(out / "best"), "workdir": str(out), **graded, **stats}


# ---------------------------------------------------------------- TRL


def run_trl(spec: dict) -> dict:
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.models import ensure_local
    from tunesmith.models.loading import ensure_pad_token

    # A step's sampling and grading: _generate_and_score_completions samples with model.generate, decodes, calls the
    # reward and computes the advantages (with beta 0 and one update per generation it computes no log-probabilities)
    generation = _PerCall(GRPOTrainer._generate_and_score_completions)
    GRPOTrainer._generate_and_score_completions = lambda self, *a, **kw: generation(self, *a, **kw)  # binds self
    t0 = time.perf_counter()
    folder = ensure_local(MODEL)  # the cached safetensors folder tunesmith converted from the GGUF
    tok = AutoTokenizer.from_pretrained(folder)
    ensure_pad_token(tok)  # the same pad token tunesmith uses (<|endoftext|>, not eos)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = [json.loads(line) for line in open(DATA / "prompts_train.jsonl")]
    data = Dataset.from_list([{"prompt": r["messages"], "reference_answer": r["reference_answer"]} for r in rows])
    steps, p, g, m = spec["steps"], spec["prompts"], spec["generations"], spec["max_new_tokens"]
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-trl-"))
    args = GRPOConfig(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=p * g, gradient_accumulation_steps=1,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0,
        seed=spec["seed"], bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        num_generations=g, max_completion_length=m, temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo",
        beta=0.0, epsilon=0.2, scale_rewards="group", mask_truncated_completions=True, num_iterations=1,
        steps_per_generation=1,  # generation_batch_size follows: p x g (TRL refuses both set)
        shuffle_dataset=False, use_vllm=False, log_completions=False)
    assert args.generation_batch_size == p * g
    timer = _StepTimer()
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=data, processing_class=tok,
                          peft_config=peft_config, callbacks=[timer.callback(TrainerCallback)])
    trainer.train()
    wall = time.perf_counter() - t0
    rss = peak_rss_mb()
    assert len(timer.secs) == steps == len(generation.walls), (len(timer.secs), len(generation.walls))
    adapter = work / "adapter"
    trainer.model.save_pretrained(adapter)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    graded = _graded_steps(steps, p, g)
    assert all(abs(h["reward"] - r) < 1e-4 for h, r in zip(logs, graded["step_rewards"])), "TRL's reward log differs"
    return {"peak_rss_mb": rss, "wall_s": wall, "train_losses": [h["loss"] for h in logs],
            "completion_lengths": [h["completions/mean_length"] for h in logs],
            "adapter": str(adapter), "workdir": str(work),
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__}, **graded,
            **_step_stats(timer.secs, timer.cpu, generation.walls)}


# ---------------------------------------------------------------- the yardstick: held-out reward


@torch.no_grad()
def heldout_reward(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    """The mean ``reward`` of greedy answers to ``rows`` (prompt rows: messages, reference_answer). One prompt at a
    time, no padding, the chat template rendered by plain transformers, model.generate with its KV cache, the answer
    cut at the first eos and special tokens skipped (as both tools decode): independent of either tool's batching."""
    configured = model.generation_config.eos_token_id  # an id, a list of them, or None
    eos = [tokenizer.eos_token_id, *([configured] if isinstance(configured, int) else configured or [])]
    scores, lengths, texts = [], [], []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        prompt = torch.tensor([list(ids)])  # (1, T)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos[0])
        new = out[0, prompt.shape[1]:].tolist()
        end = next((i for i, t in enumerate(new) if t in eos), len(new))
        text = tokenizer.decode(new[:end], skip_special_tokens=True)
        scores.append(reward({"output_text": text}, row))
        lengths.append(min(end + 1, len(new)))
        texts.append(text)
    return {"reward": sum(scores) / len(scores), "exact": sum(s == 1.0 for s in scores) / len(scores),
            "completion_length": sum(lengths) / len(lengths), "prompts": len(rows), "examples": texts[:3]}


def run_score(spec: dict) -> dict:
    """Every adapter of ``spec["adapters"]`` (name -> folder) loaded into the same fp32 base and graded on
    prompts_valid by ``heldout_reward``; the base itself too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models import ensure_local

    folder = ensure_local(MODEL)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in open(DATA / "prompts_valid.jsonl")]

    def base():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    scores = {"base": heldout_reward(base(), tok, rows, spec["max_new_tokens"])}
    for name, path in spec["adapters"].items():
        model = PeftModel.from_pretrained(base(), path).eval()
        b = [p for n, p in model.named_parameters() if "lora_B" in n]
        if len(b) != 30 * 7:  # 30 blocks x 7 projections
            raise RuntimeError(f"{name}: adapter {path} did not load as all-linear LoRA ({len(b)} lora_B tensors)")
        # an adapter can rightly stay at zero (every answer cut at the length limit and masked, or no reward spread)
        scores[name] = {**heldout_reward(model, tok, rows, spec["max_new_tokens"]),
                        "lora_b_nonzero": sum(bool(p.abs().sum() > 0) for p in b) / len(b)}
    return {"scores": scores}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    elif spec["kind"] == "score":  # its figures do not depend on threads, and one thread never waits for a core that
        torch.set_num_threads(1)  # another process holds
    result = {"tunesmith": run_tunesmith, "trl": run_trl, "score": run_score}[spec["kind"]](spec)
    result["torch_threads"] = torch.get_num_threads()
    from tunesmith import allocator
    result["allocator"] = allocator.describe()
    print("RESULT " + json.dumps({**spec, **result}), flush=True)


if __name__ == "__main__":
    main()
