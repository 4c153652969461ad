"""One prepared GPU check (see ../shared/BENCHMARKS.md): under 6 minutes on one H100/H200.

What it runs, each step independent of the others (a failure is reported and the rest go on):

- ``nccl_collectives``: all-reduce and all-gather of CUDA tensors on NCCL with as many ranks
  as there are GPUs, at most 2 (NCCL refuses two ranks on one GPU, so one GPU gives 1 rank).
- ``tiny_bf16_nccl`` / ``tiny_fp16_nccl``: the real path, ``lmforge train`` (local ranks,
  DeepSpeed ZeRO-2, backend nccl, world size 1) of the tiny decoder on 16 repeated random
  samples: the loss must fall; fp16 runs with DeepSpeed's dynamic loss scaling and its
  losses must stay within 5% of bf16's starting loss, step by step (same data and init).
- ``sdpa_kernel_causal`` / ``sdpa_kernel_document_mask``: the attention op torch picks
  for llama-1b's head shape in bf16 (from the profiler: flash, efficient, cudnn or math),
  and whether flash alone accepts it (``sdpa_kernel(FLASH_ATTENTION)``).
- ``fused_adamw``: lmforge's AdamW uses torch's fused CUDA kernel and matches the for-loop
  implementation after one step.
- ``mfu_gpt2_124m`` / ``mfu_1b``: ``lmforge train`` in bf16, tokens/s from its metrics and
  MFU per PaLM appendix B, computed here: tokens/s x (6N + 12·L·H·Q·T) / 989e12, N the
  parameters that take part in matrix products (the tied or untied output head included,
  embedding lookups not). lmforge's own logged ``train/mfu`` is in the detail. ``mfu_1b``
  is the 1B-parameter decoder (``llama-1b``, TinyLlama's shape) as a 1B pretraining runs:
  ``train.compile`` on (each block compiled) and packed documents masked
  (``data.loader.document_masking``); its detail prints the published figure for a 1B
  model on one H100 beside it (``REFERENCE_1B``) and the first step's compile time.

Each result is a ``BENCH {json}`` line; the last one, ``gpu_check_passed``, is the fraction
of checks that passed.

Run it on a lent GPU machine (torch with CUDA is there; deepspeed and its pure-Python needs
travel as wheels built here). Here, once (``build/`` is ignored by git)::

    DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps --no-build-isolation \\
        -w build/gpu-wheels deepspeed==0.19.8
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d build/gpu-wheels hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \\
        annotated-types==0.8.0 typing-inspection==0.4.5

then on the device (carry ``build/gpu-wheels``; timeout 420 s leaves room for a rerun)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site build/gpu-wheels/*.whl \\
      && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT

Without a GPU, ``--dry-run`` runs every step's logic on the CPU at a tiny size (gloo,
bf16 only: DeepSpeed refuses fp16 on a CPU; the 1b path only, compiled) in about a minute;
tests/test_gpu_check.py runs it without mlflow, ray, webdataset or transformers, which the
GPU machine lacks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM / H200 (BENCHMARKS.md)
# Published figure for a 1B decoder on H100s: OLMo-core's README (ai2-olmo-core 1.2.0 on
# PyPI, "Official training scripts" table, src/scripts/train/OLMo-1B.py): 4K context, bf16,
# 45-47K tokens/s per device, MFU 39-41% (its 7B row: 47-48%, the "about 48%" often quoted).
REFERENCE_1B = {"source": "OLMo-core README (ai2-olmo-core 1.2.0), OLMo-1B.py, H100, 4K",
                "mfu": 0.40, "tokens_per_s": 46_000}
RESULTS: dict[str, bool] = {}


def use_checkout() -> None:
    """Imports ``lmforge`` from this checkout where it is not installed (the GPU machine):
    a folder holding a ``lmforge`` link to the repo root goes on sys.path and PYTHONPATH
    (the training processes inherit it)."""
    try:
        import lmforge  # noqa: F401
        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="lmforge-path-"))
    (shim / "lmforge").symlink_to(ROOT)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim),
                                                             os.environ.get("PYTHONPATH")]))


def bench(metric: str, value: float, goal: str, ok: bool, **detail) -> None:
    RESULTS[metric] = ok
    print("BENCH " + json.dumps({"metric": metric, "value": round(float(value), 4),
                                 "goal": goal, "detail": {"ok": ok, **detail}}), flush=True)


def check(name: str, fn, *args) -> None:
    """Runs one check; an exception is reported as a failed BENCH line, not raised."""
    start = time.perf_counter()
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - every check must get its line
        bench(name, 0.0, "runs", False, error=f"{type(err).__name__}: {err}"[:2000],
              traceback=traceback.format_exc()[-1500:])
    print(f"# {name}: {time.perf_counter() - start:.1f} s", flush=True)


# -- data and the real training path ------------------------------------------------------


def write_dataset(root: Path, vocab: int, seq_len: int, distinct: int, copies: int,
                  documents: int = 1) -> Path:
    """Random rows (``distinct`` of them, each ``copies`` times, so a model can memorise
    them) as shards and a manifest in the contract format, for ``lmforge train``; each row
    packs ``documents`` equal documents (their starts are what document masking reads)."""
    from lmforge.pipeline.contract.dataset_manifest import (
        DatasetInfo,
        DatasetManifest,
        SplitInfo,
        TokenizerInfo,
    )
    from lmforge.pipeline.contract.dataset_tokenizer import file_sha256
    from lmforge.pipeline.contract.shard_format import sample_key, shard_file_name, token_dtype
    from lmforge.pipeline.prepare.shards import write_shard

    rng = np.random.default_rng(0)
    dtype = token_dtype(vocab)
    rows = rng.integers(4, vocab, (distinct, seq_len + 1)).astype(dtype)
    splits = {}
    for split, samples in (("train", np.tile(rows, (copies, 1))), ("val", rows[:4])):
        keys = [sample_key("d", split, 0, i) for i in range(len(samples))]
        starts = [np.arange(0, seq_len, -(-seq_len // documents), dtype=np.int32)] \
            * len(samples)
        shard = write_shard(root / "d" / shard_file_name(split, 0), keys, samples, starts,
                            samples.size, root)
        splits[split] = SplitInfo(len(samples), samples.size, 0, [shard])
    # No text is encoded here, but the loader checks the tokenizer file against its sha256.
    placeholder = root / "tokenizer.model"
    placeholder.write_bytes(b"placeholder: the GPU check trains on random token ids\n")
    tokenizer = TokenizerInfo(
        file="tokenizer.model", sha256=file_sha256(placeholder), vocab_size=vocab, type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, special_tokens={}, extra_special_tokens=[],
        byte_fallback=True)
    DatasetManifest(seq_len=seq_len, token_dtype=dtype, tokenizer=tokenizer,
                    datasets={"d": DatasetInfo(1.0, ["random"], splits)},
                    fingerprint="gpu-check", stats={}).write(DatasetManifest.path_in(root))
    return root


def lmforge_train(work: Path, name: str, data: Path, seq_len: int, model: dict, train: dict,
                  backend: str, timeout: int, document_masking: bool = False) -> list[dict]:
    """``lmforge train`` as a user runs it (1 process); returns metrics.jsonl's step records."""
    config = {
        "name": name, "run_dir": str(work / name),
        "data": {"datasets": [{"name": "d", "paths": ["unused.txt"]}],
                 "output_dir": str(data), "seq_len": seq_len,
                 "loader": {"num_workers": 2, "document_masking": document_masking}},
        "model": model,
        "train": {"log_every": 1, "eval_every": 0, "eval_batches": 1, "warmup_steps": 2,
                  "lr": 3e-3, **train},
        "tracking": {"enabled": False}, "export": {"enabled": False},
        "launch": {"nproc_per_node": 1, "backend": backend, "omp_num_threads": 4},
    }
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "lmforge.launch.cli", "train", str(path)],
                          capture_output=True, text=True, timeout=timeout, cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"lmforge train {name} exited {proc.returncode}: "
                           f"{(proc.stdout + proc.stderr)[-1500:]}")
    lines = (work / name / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "train/loss" in r]
    for r in records:
        r["overflows"] = proc.stdout.count("OVERFLOW")
    return records


# -- the checks ---------------------------------------------------------------------------


def _collective_rank(rank: int, world: int, port: int, backend: str, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    gathered = [torch.empty(4, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.full((4,), float(rank), device=device))
    ok = x.eq(world * (world + 1) / 2).all().item() and all(
        g.eq(r).all().item() for r, g in enumerate(gathered))
    out.put((rank, bool(ok)))
    dist.destroy_process_group()


def nccl_collectives(backend: str) -> None:
    import socket

    import torch.multiprocessing as mp

    world = min(2, torch.cuda.device_count()) if backend == "nccl" else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_collective_rank, args=(world, port, backend, out), nprocs=world,
                       start_method="spawn")
    results = dict(out.get(timeout=60) for _ in range(world))
    ok = all(results.values())
    note = "" if world == 2 else "one GPU: 1 rank (NCCL refuses two ranks on one device)"
    bench("nccl_collectives" if backend == "nccl" else "gloo_collectives", float(ok),
          "1 (all-reduce and all-gather exact)", ok, backend=backend, world=world, note=note)


def tiny_precisions(work: Path, backend: str, precisions: list[str], steps: int) -> None:
    data = write_dataset(work / "tiny-data", 2048, 128, distinct=16, copies=8)
    model = {"preset": "tiny"}
    if backend == "gloo":
        model.update(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
    losses = {}
    for precision in precisions:
        records = lmforge_train(work, f"tiny-{precision}", data, 128, model,
                                {"precision": precision, "max_steps": steps,
                                 "micro_batch_size": 16}, backend, timeout=240)
        losses[precision] = [r["train/loss"] for r in records]
        curve = losses[precision]
        ok = len(curve) == steps and all(map(math.isfinite, curve)) and curve[-1] < curve[0]
        detail = {"losses": [round(v, 4) for v in curve], "backend": backend,
                  "tokens_per_s": round(statistics.median(
                      r["train/tokens_per_s"] for r in records[1:] or records))}
        if precision == "fp16" and "bf16" in losses:
            # Relative to the starting loss: late losses are small, so a per-step ratio
            # would magnify rounding differences that do not matter.
            reference = losses["bf16"]
            gap = max(abs(a - b) for a, b in zip(curve, reference, strict=True)) / reference[0]
            ok = ok and gap < 0.05
            detail.update(max_gap_vs_bf16=round(gap, 4), overflow_lines=records[0]["overflows"])
        bench(f"tiny_{precision}_{backend}", curve[-1], "loss falls, finite", ok, **detail)


def attention_op(model: torch.nn.Module, inputs: dict) -> list[str]:
    """The aten scaled-dot-product ops one forward runs (names the kernel family)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                           else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        model(**inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    return sorted(n for n in names if n.startswith("aten::_scaled_dot_product")
                  or n.startswith("aten::_flash") or n.startswith("aten::_efficient"))


def sdpa_kernels(device: torch.device, dtype: torch.dtype, small: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.model import ModelConfig

    size = {"d_model": 128, "n_heads": 2, "n_kv_heads": 1, "d_ff": 256} if small else {}
    cfg = ModelConfig.from_preset("llama-1b", n_layers=1, vocab_size=1024, **size)
    model = cfg.build().to(device=device, dtype=dtype).eval()
    seq = 256 if small else 2048
    ids = torch.randint(0, 1024, (2, seq), device=device)
    segments = (torch.arange(seq, device=device) >= seq // 2).long().expand(2, seq)
    positions = torch.arange(seq, device=device) - seq // 2 * segments
    cases = {"causal": {"input_ids": ids},
             "document_mask": {"input_ids": ids, "segment_ids": segments,
                               "position_ids": positions}}
    for case, inputs in cases.items():
        ops = attention_op(model, inputs)
        try:
            with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                model(**inputs)
            flash_alone = "accepted"
        except RuntimeError as err:
            flash_alone = f"refused: {str(err).splitlines()[0][:200]}"
        used_flash = any("flash" in op for op in ops)
        # Causal with no mask must reach flash on a GPU; a document mask cannot (flash
        # takes no arbitrary mask), so there the efficient kernel is the good outcome.
        ok = used_flash if case == "causal" else bool(ops)
        bench(f"sdpa_kernel_{case}", float(used_flash), "flash for causal", ok, ops=ops,
              flash_alone=flash_alone, dtype=str(dtype), head_dim=cfg.head_size,
              gqa=cfg.n_kv_heads != cfg.n_heads)


def fused_adamw(device: torch.device) -> None:
    from lmforge.launch.config.sections import TrainConfig
    from lmforge.launch.train.optim import build_optimizer
    from lmforge.model import ModelConfig

    torch.manual_seed(0)
    model = ModelConfig.from_preset("tiny", vocab_size=1024).build().to(device)
    train = TrainConfig()
    optimizer = build_optimizer(model, train)
    reference = torch.optim.AdamW(
        [{"params": [p.detach().clone() for p in g["params"]], "weight_decay": g["weight_decay"]}
         for g in optimizer.param_groups],
        lr=train.lr, betas=tuple(train.betas), eps=train.eps, foreach=False, fused=False)
    for group, ref in zip(optimizer.param_groups, reference.param_groups, strict=True):
        for p, q in zip(group["params"], ref["params"], strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
    optimizer.step()
    reference.step()
    diff = max((p.detach() - q).abs().max().item()
               for g, r in zip(optimizer.param_groups, reference.param_groups, strict=True)
               for p, q in zip(g["params"], r["params"], strict=True))
    fused = bool(optimizer.defaults.get("fused"))
    bench("fused_adamw", float(fused), "1 (fused kernel)", fused and diff < 1e-6,
          max_abs_diff_vs_for_loop=diff, device=str(device))


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters of the linear layers (the output head once, tied or not): the N of 6N."""
    seen = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for p in module.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


def throughput(work: Path, name: str, preset: str, seq_len: int, micro: int, steps: int,
               backend: str, small: bool, goal: str, compile_blocks: bool = False,
               document_masking: bool = False) -> None:
    from lmforge.model import ModelConfig

    overrides = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128} if small else {}
    if preset == "llama-1b" and small:
        overrides["n_kv_heads"] = 2
    vocab = 50257 if preset == "gpt2-124m" else 32000
    cfg = ModelConfig.from_preset(preset, vocab_size=vocab, **overrides)
    data = write_dataset(work / f"{name}-data", vocab, seq_len, distinct=micro * 2, copies=4,
                         documents=4 if document_masking else 1)
    train = {"precision": "bf16", "max_steps": steps, "micro_batch_size": micro,
             "compile": compile_blocks}
    peak = PEAK
    if small:  # a CPU has no table entry: give one, so the MFU arithmetic runs
        peak = 1e12
        train["peak_flops_per_device"] = peak
    records = lmforge_train(work, name, data, seq_len, {"preset": preset, "vocab_size": vocab,
                                                        **overrides}, train, backend, 420,
                            document_masking)
    steady = records[len(records) // 3:]  # past start-up and allocator warm-up
    tokens_per_s = statistics.median(r["train/tokens_per_s"] for r in steady)
    with torch.device("meta"):
        n = matmul_params(cfg.build())
    per_token = 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
    mfu = tokens_per_s * per_token / peak
    logged = [r.get("train/mfu") for r in steady if r.get("train/mfu") is not None]
    lmforge_mfu = statistics.median(logged) if logged else None
    ok = math.isfinite(mfu) and mfu > 0
    if goal.startswith(">="):
        ok = ok and (small or mfu >= float(goal[2:]))
    later = statistics.median(r["train/step_time_s"] for r in records[1:]) \
        if len(records) > 1 else 0.0
    extra = {}
    if preset == "llama-1b":
        extra = {"reference": REFERENCE_1B, "vs_reference": mfu / REFERENCE_1B["mfu"]}
        print(f"# mfu_1b: {mfu:.1%} (lmforge, compile={compile_blocks}, document_masking="
              f"{document_masking}) vs {REFERENCE_1B['mfu']:.0%} published "
              f"({REFERENCE_1B['source']})", flush=True)
    bench(f"mfu_{name}", mfu, goal, ok, tokens_per_s=round(tokens_per_s), n_matmul=n,
          flops_per_token=per_token, peak=peak, lmforge_mfu=lmforge_mfu,
          lmforge_vs_palm=(lmforge_mfu / mfu if lmforge_mfu else None), seq_len=seq_len,
          micro_batch=micro, steps=len(records), compile=compile_blocks,
          document_masking=document_masking,
          first_step_s=round(records[0]["train/step_time_s"], 2), step_s=round(later, 4),
          **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke run: every step's logic at a tiny size, gloo, bf16")
    parser.add_argument("--out", default=None, help="also write the BENCH lines here")
    args = parser.parse_args()
    use_checkout()
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        parser.error("no CUDA GPU here; use --dry-run for the CPU smoke run")
    backend = "nccl" if gpu else "gloo"
    device = torch.device("cuda" if gpu else "cpu")
    start = time.perf_counter()
    print(f"# torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if gpu else 'CPU (dry run)'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmforge-gpu-") as tmp:
        work = Path(tmp)
        check("collectives", nccl_collectives, backend)
        check("tiny", tiny_precisions, work, backend,
              ["bf16", "fp16"] if gpu else ["bf16"], 30 if gpu else 3)
        check("sdpa", sdpa_kernels, device, torch.bfloat16, not gpu)
        check("fused_adamw", fused_adamw, device)
        if gpu:  # the dry run times only the 1b path: the same function, another preset
            check("mfu_gpt2_124m", throughput, work, "gpt2_124m", "gpt2-124m", 1024, 16, 40,
                  backend, False, "report")
        check("mfu_1b", throughput, work, "1b", "llama-1b", 2048 if gpu else 64,
              8 if gpu else 2, 25 if gpu else 3, backend, not gpu, ">=0.50", True, True)
    passed = sum(RESULTS.values()) / max(1, len(RESULTS))
    bench("gpu_check_passed", passed, "1.0", passed == 1.0,
          failed=[k for k, v in RESULTS.items() if not v],
          seconds=round(time.perf_counter() - start, 1), dry_run=args.dry_run)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu-bench.json").write_text(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
