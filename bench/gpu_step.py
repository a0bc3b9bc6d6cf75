"""One training step on one GPU at 7B scale: throughput, MFU and peak memory, per variant.

    python bench/gpu_step.py                                   # Qwen2.5-7B shape, bf16, CUDA
    python bench/gpu_step.py --shape tiny --device cpu --steps 2 --warmup 1   # a tiny shape (the test)

The LLM is a random-init model from a Qwen2.5-7B-shaped config (28 layers,
hidden 3584, 28 heads / 4 KV heads, MLP 18944, vocab 152064) in bf16; the
tokenizer is the tiny SentencePiece one (prompt lengths are what matter). On
it: LoRA r=16 on all linear layers and the fusion module (width 512, K=8), on a
DeepSpeed ZeRO-2 engine with one rank. Batches are MOSEI-shaped: audio 74-dim
up to 500 frames, vision 35-dim up to 375 (lengths as in bench/padding.py),
utterances of about 20 words.

Variants: experts' attention flash-attn (varlen) vs SDPA (the LLM uses the same
backend), gradient checkpointing off/on, LLM-side packing off/on.

MFU counts 4 N_frozen + 6 N_trainable FLOPs per LLM token (forward 2N, backward
through the frozen weights 2N, LoRA weight gradients 2N_trainable; the input
embedding table excluded), divided by the GPU's dense bf16 peak. The "+attn"
column adds causal attention: 6 * layers * hidden * s FLOPs per token for a
token at average context s (forward 2 * s * hidden per layer, backward twice
that), with s the sample's own length (each sample attends only to itself,
packed or not). The fusion module is left out of both; its share is measured
("fusion share": its forward + backward alone over the whole step).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np
import torch
from results import add_json_argument, write_results

SHAPES = {
    "7b": {
        "llm": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
        ),
        "fusion": dict(width=512, heads=8, num_pseudo_tokens=8),
        "lora_rank": 16,
    },
    "tiny": {
        "llm": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=2048,
        ),
        "fusion": dict(width=32, heads=4, num_pseudo_tokens=4),
        "lora_rank": 4,
    },
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "the movie was really quite good but i think the ending felt a little rushed and strange".split()


def mosei_batch(rng: np.random.Generator, batch_size: int, max_audio: int, max_vision: int):
    from padding import SHAPES as LENGTHS
    from padding import draw_lengths

    from egmf.data.collate import Batch, collate_features

    shape = LENGTHS["mosei"]
    la = draw_lengths(rng, max_audio, min(shape["audio"][1], max_audio), shape["audio"][2], batch_size)
    lv = draw_lengths(rng, max_vision, min(shape["vision"][1], max_vision), shape["vision"][2], batch_size)
    da, dv = shape["dims"]
    words = np.clip(rng.lognormal(np.log(20), 0.6, batch_size), 3, 60).astype(int)
    labels = np.round(rng.uniform(-3, 3, batch_size), 1).tolist()
    return Batch(
        dataset="mosei",
        split="train",
        lang="en",
        task="regression",
        ids=[f"s{i}" for i in range(batch_size)],
        texts=[" ".join(rng.choice(WORDS, n)) for n in words],
        labels=labels,
        target=torch.tensor(labels),
        valid=torch.ones(batch_size, dtype=torch.bool),
        audio=collate_features([rng.standard_normal((n, da)).astype(np.float16) for n in la], max_audio, "uniform"),
        vision=collate_features([rng.standard_normal((n, dv)).astype(np.float16) for n in lv], max_vision, "uniform"),
    )


def build_model(shape: dict, tokenizer_dir: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from egmf.model.config import FusionConfig, LoraConfig, PromptConfig
    from egmf.model.egmf_model import EGMFModel
    from egmf.model.fusion import FusionModule
    from egmf.model.llm import add_lora
    from egmf.model.prompt import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**shape["llm"], attn_implementation="sdpa")
    with torch.device(device):
        base = Qwen2ForCausalLM(config).to(dtype)
    lora = LoraConfig(rank=shape["lora_rank"], alpha=2 * shape["lora_rank"], dropout=0.0, target_modules=TARGETS)
    llm = add_lora(base, lora, gradient_checkpointing=False)
    fusion_cfg = FusionConfig(**shape["fusion"], dropout=0.0, attention="sdpa")
    fusion = FusionModule(fusion_cfg, {"mosei": (74, 35)}, shape["llm"]["hidden_size"], 0.02).to(device)
    prompts = PromptBuilder(PromptConfig(), tokenizer, fusion_cfg.num_pseudo_tokens)
    return EGMFModel(llm, tokenizer, fusion, prompts)


def set_variant(model, attention: str, checkpointing: bool, pack_tokens: int) -> None:
    from egmf.model.experts import MultiHeadAttention
    from egmf.model.llm import enable_checkpointing

    for module in model.fusion.modules():
        if isinstance(module, MultiHeadAttention):
            module.backend = attention
    model.llm.base_model.model.set_attn_implementation("flash_attention_2" if attention == "flash" else "sdpa")
    base = model.llm.base_model.model
    if checkpointing:
        enable_checkpointing(base)
    elif base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()
    model.prompts.cfg.pack_tokens = pack_tokens


def start(shape: str, device_name: str, tokenizer: str | None = None):
    """(model, device, dtype): the model of `shape` (SHAPES) on `device_name` in a one-rank process group, bf16 on
    CUDA and float32 on a CPU; `tokenizer`: a tokenizer folder (default: the tiny test tokenizer, built here)."""
    import tempfile

    from egmf.distributed import WorldInfo, init_distributed
    from egmf.model.tiny import build_tiny_llm

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_distributed(WorldInfo(0, 0, 1), device)
    with tempfile.TemporaryDirectory() as folder:
        model = build_model(SHAPES[shape], tokenizer or build_tiny_llm(folder), device, dtype)
    return model, device, dtype


def step_figures(seconds: float, tokens: int, batch_size: int, per_token: float, peak, device) -> dict:
    """A timed step's throughput: tokens/s, samples/s, MFU (None without a known peak) and the peak memory since
    the last reset (None off CUDA)."""
    return {
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": batch_size / seconds,
        "mfu": per_token * tokens / seconds / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def engine_for(model, batch_size: int, bf16: bool):
    import deepspeed

    from egmf.train.config import OptimConfig
    from egmf.train.optim import build_optimizer, param_groups

    optim = OptimConfig()
    optimizer = build_optimizer(param_groups(model, optim), optim, offload=False)
    ds_config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "bf16": {"enabled": bf16},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_step(engine):
    """One training step on the engine, as a function of the batch that returns the LLM tokens it processed."""

    def step(batch) -> int:
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        return out.num_tokens

    return step


def time_steps(step, batches, device, warmup: int) -> tuple[float, int]:
    """(seconds per step after warm-up, LLM tokens per step)."""
    tokens = []
    for i, batch in enumerate(batches):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        tokens.append(step(batch))
    synchronize(device)
    return (time.perf_counter() - start) / (len(batches) - warmup), int(np.mean(tokens[warmup:]))


def settle(step, batches, device, steps: int) -> None:
    """Untimed steps before the first timed ones. A fresh process's first steps pay once for the allocator's
    growth, the GEMM heuristics and the optimizer's state: on an H200 the first 7B step ran about 6x and the next
    two about 2x slower than the tenth, which a short per-variant warm-up charged to whichever variant ran first."""
    for batch in itertools.islice(itertools.cycle(batches), steps):
        step(batch)
    synchronize(device)


def profile_steps(step, batches, device, steps: int) -> str:
    """torch.profiler over `steps` steps: the top operators by host time and, on a GPU, by device time (where a
    step's time goes: a host-bound step shows launches and syncs on top, a device-bound one its GEMMs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches[:steps]:
            step(batch)
        synchronize(device)
    averages = prof.key_averages()
    sort_keys = ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else [])
    return "\n".join(averages.table(sort_by=k, row_limit=20, max_name_column_width=60) for k in sort_keys)


def fusion_seconds(model, batches, device, warmup: int) -> float:
    """The fusion module's forward + backward alone (its share of a step). autograd.grad leaves .grad and the
    ZeRO gradient hooks alone, so the engine's state is untouched."""
    params = [p for p in model.fusion.parameters() if p.requires_grad]
    times = []
    for i, batch in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        _, _, fused = model.prompt_embeddings(batch, with_answers=True)
        torch.autograd.grad(fused.pseudo_tokens.float().pow(2).mean(), params, allow_unused=True)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.mean(times))


def attention_flops_per_token(model, batches) -> float:
    """6 * layers * hidden * mean sample length / 2 (causal: a token attends to half its sample on average)."""
    cfg = model.llm.base_model.model.config
    lengths = [len(r) for b in batches for r in model.prompts.sample_rows(b, with_answers=True)[0]]
    mean_context = float(np.mean(np.square(lengths)) / np.mean(lengths)) / 2  # token-weighted
    return 6.0 * cfg.num_hidden_layers * cfg.hidden_size * mean_context


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each variant's timed ones")
    parser.add_argument("--settle", type=int, default=5, help="untimed steps once, before the first variant")
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps first (torch.profiler)")
    parser.add_argument("--pack-tokens", type=int, default=2048, help="prompt.pack_tokens of the packed variants")
    parser.add_argument("--max-audio", type=int, default=500)
    parser.add_argument("--max-vision", type=int, default=375)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (0: from the GPU's name)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: build the tiny test tokenizer)")
    add_json_argument(parser)
    args = parser.parse_args(argv)

    from egmf.distributed import close_distributed
    from egmf.model.attention import flash_attn_installed
    from egmf.train.throughput import llm_flops_per_token, peak_flops

    model, device, dtype = start(args.shape, args.device, args.tokenizer)
    on_gpu = device.type == "cuda"
    rng = np.random.default_rng(0)
    batches = [
        mosei_batch(rng, args.batch_size, args.max_audio, args.max_vision).to(device)
        for _ in range(args.warmup + args.steps)
    ]
    engine = engine_for(model, args.batch_size, bf16=on_gpu)
    peak = peak_flops(device, args.peak_tflops)
    per_token = llm_flops_per_token(model)
    attention = attention_flops_per_token(model, batches)
    backends = ["flash", "sdpa"] if on_gpu and flash_attn_installed() else ["sdpa"]
    print(
        f"{args.shape} shape on {torch.cuda.get_device_name(device) if on_gpu else 'CPU'}, {dtype}, ZeRO-2 one rank, "
        f"batch {args.batch_size}, {args.settle} settling steps, then per variant {args.steps} steps after "
        f"{args.warmup}; LLM {per_token:.3g} FLOP/token "
        f"(4N_frozen + 6N_trainable), attention +{attention:.3g} FLOP/token"
    )
    if backends == ["sdpa"]:
        print("(flash-attn variants need CUDA and the flash-attn package: not run here)")
    set_variant(model, backends[0], False, 0)
    step = engine_step(engine)
    settle(step, batches, device, args.settle)
    if args.profile:
        print(f"torch.profiler over {args.profile} steps ({backends[0]}, no checkpointing, no packing):")
        print(profile_steps(step, batches, device, args.profile))
    print(
        "| experts + LLM attention | grad ckpt | packing | tokens/step | tokens/s | samples/s | MFU | MFU +attn "
        "| peak memory | fusion share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for backend, checkpointing, packing in itertools.product(backends, (False, True), (False, True)):
        set_variant(model, backend, checkpointing, args.pack_tokens if packing else 0)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, tokens = time_steps(step, batches, device, args.warmup)
        fusion = fusion_seconds(engine.module, batches[: args.warmup + 2], device, min(args.warmup, 1))
        row = {
            "attention": backend,
            "checkpointing": checkpointing,
            "packing": packing,
            **step_figures(seconds, tokens, args.batch_size, per_token, peak, device),
            "mfu_attention": (per_token + attention) * tokens / seconds / peak if peak else None,
            "fusion_share": fusion / seconds,
        }
        rows.append(row)
        mfu = f"{row['mfu']:.1%} | {row['mfu_attention']:.1%}" if peak else "- | -"
        memory = f"{row['peak_gib']:.1f} GiB" if on_gpu else "-"
        print(
            f"| {backend} | {'on' if checkpointing else 'off'} | {'on' if packing else 'off'} | {tokens} "
            f"| {row['tokens_per_s']:.0f} | {row['samples_per_s']:.1f} | {mfu} | {memory} | {row['fusion_share']:.1%} |"
        )
    close_distributed()
    write_results(args.json, rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
