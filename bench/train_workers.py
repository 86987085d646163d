"""One measured run of bench_train_vs_trl.py, in its own process so that peak memory is its own.

    python bench/train_workers.py '{"kind": "tunesmith", "method": "lora", ...}'

Prints one line ``RESULT {json}`` at the end. Kinds: ``tunesmith`` (tunesmith.train.train on the shipped
chat data), ``trl`` (TRL SFTTrainer + PEFT on the same data and settings), ``scaling`` (tunesmith's
training step on random sequences of one length and batch size). Every kind measures the fp32 matmul
rate (2048 x 2048) before and after its run, so model FLOP utilisation has a peak measured in the same
conditions (this machine is shared; the best rate seen is the peak).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from harness import CpuMarks, choose_allocator, cpu_s  # noqa: E402  (torch-free; bench/ is sys.path[0])

if __name__ == "__main__":
    choose_allocator(json.loads(sys.argv[1]))

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MODEL = "smollm2-135m-instruct"


CUDA = False  # --gpu runs (bench_train_vs_trl.py): the spec's "device" is cuda; set in main()


def peak_rss_mb() -> float:
    """Peak memory of the run: resident memory on a CPU, allocated GPU memory on CUDA (the device's, not the host's)."""
    if CUDA:
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_gflops(n: int = 2048, reps: int = 4) -> float:
    """Best (n x n) @ (n x n) rate in GFLOP/s over a few repetitions: fp32 on a CPU; on CUDA bf16 at 8192 (the peak a
    bf16 mixed-precision run is measured against)."""
    if CUDA:
        n = 8192
        a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    else:
        a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if CUDA:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if CUDA:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------- model FLOPs


def lora_params(config, r: int) -> int:
    """Adapter parameters of all-linear LoRA: r * (in + out) per projection of every block."""
    d, hd = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv, ffn = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    per_layer = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ffn) + (ffn + d))
    return per_layer * config.num_hidden_layers


def model_flops(config, lengths: list[int], targets: list[int], method: str, r: int = 16) -> float:
    """FLOPs one optimizer step needs, for examples of ``lengths`` tokens with ``targets`` trained tokens.

    Per token, P = linear weights of the blocks (q, k, v, o, gate, up, down); per example of L tokens the
    causal attention forward is 2 * H * hd * L * (L + 1) per layer (QK^T and AV over the earlier positions);
    the output layer (V x d) is needed only at the t positions that predict a target.
      forward : 2 P L + attn + 2 V d t                      (+ 2 P_lora L for LoRA)
      backward: full: 4 P L + 2 attn + 4 V d t  (input and weight gradients)
                LoRA: 2 P L + 2 attn + 2 V d t + 4 P_lora L (input gradients through frozen weights)
                      less, in the first block, the input gradient of q, k and v (frozen weights and adapters):
                      it would flow only to the frozen embeddings, so autograd never computes it
    Norms, activations and the optimizer are not counted; recomputation (checkpointing) is not counted.
    tests/test_bench_flops.py holds this count to the matrix products a step runs (torch's FlopCounterMode).
    """
    d, L_layers = config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv, ffn = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    P = L_layers * (d * q + 2 * d * kv + q * d + 3 * d * ffn)
    head = 2 * config.vocab_size * d
    pl = lora_params(config, r)
    first_qkv_input_grad = 2 * (d * q + 2 * d * kv) + 3 * 2 * r * d  # per token, LoRA only
    total = 0.0
    for L, t in zip(lengths, targets):
        attn = attention_flops(config, L)
        fwd = 2 * P * L + attn + head * t
        if method == "full":
            total += fwd + 4 * P * L + 2 * attn + 2 * head * t
        else:
            total += fwd + 2 * pl * L + 2 * P * L + 2 * attn + head * t + 4 * pl * L - first_qkv_input_grad * L
    return total


def attention_flops(config, L: int) -> int:
    """The causal attention forward of one example of L tokens, all layers: 2 * H * hd * L * (L + 1) per layer."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_attention_heads * hd * L * (L + 1) * config.num_hidden_layers


# ---------------------------------------------------------------- data shared by both tools


def rendered(split: str, tokenizer):
    from tunesmith.config import load_config
    from tunesmith.data import load_examples, render_examples

    cfg = load_config(None, [f"data.{split}={DATA / f'chat_{split}.jsonl'}"])
    return render_examples(load_examples(DATA / f"chat_{split}.jsonl"), tokenizer, cfg.data).items


@torch.no_grad()
def yardstick_val_loss(model, tokenizer) -> float:
    """Token-weighted validation loss of a trained model, the same function for every tool."""
    from tunesmith.data import collate
    from tunesmith.train.loss import token_loss

    items = sorted(rendered("valid", tokenizer), key=lambda it: len(it.input_ids))
    was = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for s in range(0, len(items), 8):
        batch = {k: v.to(device) for k, v in collate(items[s:s + 8], tokenizer.pad_token_id).items()}
        loss, k, _ = token_loss(model, batch)
        total, n = total + float(loss), n + k
    model.train(was)
    return total / n


def _step_stats(step_targets, step_tokens, step_secs, step_cpu, config, lengths_per_step, targets_per_step, method):
    """Throughput over steps 2..N (step 1 holds one-time warm-up) and over all steps, per wall second and
    per CPU second."""
    def rate(idx):
        secs, cpu = sum(step_secs[i] for i in idx), sum(step_cpu[i] for i in idx)
        trained = sum(step_targets[i] for i in idx)
        flops = sum(model_flops(config, lengths_per_step[i], targets_per_step[i], method) for i in idx)
        return {"steps": len(idx), "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2), "trained_tokens": trained,
                "trained_tokens_per_s": trained / secs, "trained_tokens_per_cpu_s": trained / cpu,
                "tokens_per_s": sum(step_tokens[i] for i in idx) / secs, "model_gflop_per_s": flops / secs / 1e9,
                "model_gflop_per_cpu_s": flops / cpu / 1e9}
    n = len(step_secs)
    return {"steady": rate(list(range(1, n)) if n > 1 else [0]), "all_steps": rate(list(range(n)))}


# ---------------------------------------------------------------- tunesmith


def run_tunesmith(spec: dict) -> dict:
    from tunesmith.config import load_config
    from tunesmith.models import ensure_local, load_tokenizer
    from tunesmith.train import train

    out = Path(tempfile.mkdtemp(prefix="bench-tunesmith-"))
    steps, bs = spec["steps"], spec["batch"]
    # fp32 on a CPU unless the spec asks for another precision (TRL runs fp32 there); auto (bf16-mixed) on a GPU
    overrides = [f"model.name={MODEL}", f"model.dtype={spec.get('dtype', 'auto' if CUDA else 'float32')}",
                 f"train.kernels={spec.get('kernels', 'auto')}",
                 f"data.train={DATA / 'chat_train.jsonl'}", f"data.valid={DATA / 'chat_valid.jsonl'}",
                 f"output_dir={out}", "data.max_length=1024", f"data.shuffle={str(spec.get('shuffle', False)).lower()}",
                 f"method.name={spec['method']}",
                 "method.lora.r=16", "method.lora.alpha=32", "method.lora.dropout=0.0", f"train.max_steps={steps}",
                 f"train.batch_size={bs}", "train.grad_accum=1", f"train.lr={spec['lr']}", "train.schedule=cosine",
                 "train.warmup_steps=1", "train.weight_decay=0.0", "train.max_grad_norm=1.0", f"train.seed={spec['seed']}",
                 f"train.packing={str(spec.get('packing', True)).lower()}",
                 f"train.compile={str(spec.get('compile', False)).lower()}",
                 f"train.group_by_length={str(spec.get('group_by_length', False)).lower()}",
                 f"train.gradient_checkpointing={str(spec.get('gradient_checkpointing', False)).lower()}",
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
    val = [e["val_loss"] for e in events if e["kind"] == "eval"][-1]

    tok = load_tokenizer(ensure_local(MODEL))
    items = rendered("train", tok)
    from tunesmith.train.steps import epoch_order, length_grouped_order  # the order train() used in epoch 0

    shuffle = spec.get("shuffle", False)
    order = (length_grouped_order([len(i.input_ids) for i in items], bs, spec["seed"], 0, shuffle)
             if spec.get("group_by_length") else epoch_order(len(items), spec["seed"], 0, shuffle))
    per_step = [[items[i] for i in order[k * bs:(k + 1) * bs]] for k in range(len(trains))]
    assert [sum(i.n_targets for i in st) for st in per_step] == [e["tokens"] for e in trains], "step order mismatch"
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(ensure_local(MODEL))
    stats = _step_stats([e["tokens"] for e in trains], [sum(len(i.input_ids) for i in s) for s in per_step],
                        [e["tokens"] / e["tokens_per_s"] for e in trains],
                        marks.per_step(), config,
                        [[len(i.input_ids) for i in s] for s in per_step], [[i.n_targets for i in s] for s in per_step],
                        spec["method"])
    return {"peak_rss_mb": rss, "val_loss": val, "train_losses": [e["loss"] for e in trains], "wall_s": wall, **stats}


# ---------------------------------------------------------------- TRL


def run_trl(spec: dict) -> dict:
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models import ensure_local

    folder = ensure_local(MODEL)  # the cached safetensors folder tunesmith converted from the GGUF
    tok = AutoTokenizer.from_pretrained(folder)
    from tunesmith.models.loading import ensure_pad_token
    ensure_pad_token(tok)  # the same pad token tunesmith uses (<|endoftext|>, not eos)
    # bf16 mixed precision (on a GPU always; on a CPU with "dtype": "bf16-mixed"): TRL with bf16=True (autocast), a LoRA
    # base loaded in bf16 as its users load it, full fine-tuning's weights in fp32 (the master weights), as tunesmith's
    # bf16-mixed keeps them
    mixed = CUDA or spec.get("dtype") == "bf16-mixed"
    load = "bfloat16" if mixed and spec["method"] == "lora" else spec.get("dtype", "float32") if not mixed else "float32"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, load))

    def as_prompt_completion(path):  # single-turn chats: the prompt is everything before the reply
        rows = [json.loads(line)["messages"] for line in open(path)]
        return Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])

    steps, bs = spec["steps"], spec["batch"]
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=steps, per_device_train_batch_size=bs,
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=1,
        weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"], bf16=mixed, fp16=False, use_cpu=not CUDA,
        gradient_checkpointing=spec.get("gradient_checkpointing", False), logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", train_sampling_strategy="sequential", dataloader_num_workers=0,
        disable_tqdm=True, max_length=1024, completion_only_loss=True)
    timer = _StepTimer()
    peft_config = (LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
                   if spec["method"] == "lora" else None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=as_prompt_completion(DATA / "chat_train.jsonl"),
                         processing_class=tok, peft_config=peft_config, callbacks=[timer.callback(TrainerCallback)])
    collate = trainer.data_collator
    batches = []

    def counting(features):  # what each step trains: targets after the shift, non-padding tokens, lengths
        b = collate(features)
        lengths = b["attention_mask"].sum(1).tolist()
        batches.append((int((b["labels"][:, 1:] != -100).sum()), sum(lengths), lengths))
        return b

    trainer.data_collator = counting
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    rss = peak_rss_mb()
    batches = batches[:len(timer.secs)]
    from transformers import AutoConfig
    from tunesmith.models import load_tokenizer
    ts_tok = load_tokenizer(folder)
    items = rendered("train", ts_tok)
    per_step = [items[k * bs:(k + 1) * bs] for k in range(len(timer.secs))]  # sequential sampler: file order
    config = AutoConfig.from_pretrained(folder)
    stats = _step_stats([b[0] for b in batches], [b[1] for b in batches], timer.secs, timer.cpu, config,
                        [[len(i.input_ids) for i in s] for s in per_step], [[i.n_targets for i in s] for s in per_step],
                        spec["method"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    val = yardstick_val_loss(trainer.model, ts_tok)
    return {"peak_rss_mb": rss, "val_loss": val, "train_losses": losses, "wall_s": wall,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__}, **stats}


class _StepTimer:
    """Wall time of each optimizer step (forward, backward, clipping, optimizer) from TRL's callbacks."""

    def __init__(self):
        self.secs: list[float] = []
        self.cpu: list[float] = []
        self._t = self._c = 0.0

    def callback(self, base):
        timer = self

        class Cb(base):
            def on_step_begin(self, args, state, control, **kw):
                timer._t, timer._c = time.perf_counter(), cpu_s()

            def on_step_end(self, args, state, control, **kw):
                timer.secs.append(time.perf_counter() - timer._t)
                timer.cpu.append(cpu_s() - timer._c)

        return Cb()


# ---------------------------------------------------------------- scaling: one length x batch size


def run_scaling(spec: dict) -> dict:
    """tunesmith's step (packed row, fused loss and LoRA, AdamW) on ``batch`` random sequences of ``seq_len`` tokens,
    every token trained (plain-text data: the heaviest case for the output layer)."""
    from accelerate import Accelerator

    from tunesmith.config import MethodConfig, TrainConfig
    from tunesmith.data import RenderedExample, collate, collate_packed
    from tunesmith.models import adapt, ensure_local, load_model, load_tokenizer
    from tunesmith.train.optim import build_optimizer
    from tunesmith.train.kernels import apply_kernels
    from tunesmith.train.loss import plain_loss
    from tunesmith.train.packing import enable_packing
    from tunesmith.train.steps import backward_step

    folder = ensure_local(MODEL)
    tok = load_tokenizer(folder)
    model = load_model(folder, dtype=torch.float32, tokenizer=tok)
    model, _ = adapt(model, MethodConfig(name=spec["method"], lora={"r": 16, "alpha": 32, "dropout": 0.0}))
    path = spec.get("path", "tunesmith")
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if path == "tunesmith":  # what train() does to the model (loop.py)
        enable_packing(model)
        apply_kernels(model)
    optimizer = build_optimizer(model, TrainConfig())
    acc = Accelerator(cpu=True)
    model.train()
    base_rss = peak_rss_mb()
    g = torch.Generator().manual_seed(0)
    T, B = spec["seq_len"], spec["batch"]
    exs = [RenderedExample(ids, list(ids), origin=None)
           for ids in torch.randint(10, tok.vocab_size, (B, T), generator=g).tolist()]
    batch = collate_packed(exs) if path == "tunesmith" else collate(exs, tok.pad_token_id)
    targets = sum(e.n_targets for e in exs)
    secs, cpus = [], []
    for _ in range(spec.get("steps", 2) + 1):  # the first is warm-up
        t, c = time.perf_counter(), cpu_s()
        if path == "tunesmith":
            backward_step(model, [batch], targets, acc)
        else:  # the plain reference: padded batch, full (B, T, V) logits
            loss, n, _ = plain_loss(model, batch)
            (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        secs.append(time.perf_counter() - t)
        cpus.append(cpu_s() - c)
    timed, cpu = secs[1:], sum(cpus[1:]) / len(cpus[1:])
    from transformers import AutoConfig
    flops = model_flops(AutoConfig.from_pretrained(folder), [T] * B, [T - 1] * B, spec["method"])
    step = sum(timed) / len(timed)
    return {"peak_rss_mb": peak_rss_mb(), "model_rss_mb": base_rss, "step_s": step, "step_cpu_s": cpu,
            "tokens_per_s": B * T / step, "tokens_per_cpu_s": B * T / cpu, "model_gflop_per_s": flops / step / 1e9}


def main() -> None:
    global CUDA
    spec = json.loads(sys.argv[1])
    CUDA = spec.get("device") == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    before = matmul_gflops()
    result = {"tunesmith": run_tunesmith, "trl": run_trl, "scaling": run_scaling}[spec["kind"]](spec)
    result["matmul_gflops"] = max(before, matmul_gflops())
    result["torch_threads"] = torch.get_num_threads()
    from tunesmith import allocator
    result["allocator"] = allocator.describe()
    print("RESULT " + json.dumps({**spec, **result}), flush=True)


if __name__ == "__main__":
    main()
