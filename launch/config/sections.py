"""The config sections of a run that `launch/` owns: train, deepspeed, launch, tracking,
generate and export (the data and tokenizer sections belong to `pipeline/`, the model section
to `model/`).

One dataclass per section, a docstring per field, checks in ``__post_init__`` that raise
``ValueError("<field>: what is wrong; what to do")`` (the loader prefixes the section path
and YAML line). Imports nothing heavy: the submit side and the CLI's ``--dry-run`` read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# MLflow's rule for tag keys: a bad key fails here, not at the server.
VALID_MLFLOW_KEY = re.compile(r"^[\w\-. /:]{1,250}$")


@dataclass
class TrainConfig:
    """The optimisation loop: batch sizes, schedule, precision, evaluation, checkpoints."""

    micro_batch_size: int = 8
    """Sequences per process per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int | None = None
    """Sequences per optimizer step; when set it must equal micro × accumulation × world size."""
    max_steps: int = 300
    """Optimizer steps to train for (the run's end; resuming continues up to it)."""
    max_tokens: int | None = None
    """The length in tokens instead: when set, ``max_steps`` becomes
    ceil(max_tokens / (sequences per step x data.seq_len)), i.e. token positions fed to the
    model (padding included), whatever ``max_steps`` says."""
    objective: Literal["causal_lm", "masked_lm", "denoising", "sft", "classify",
                       "seq2seq"] = "causal_lm"
    """Training objective. Pretraining, one per model family: causal_lm (decoder), masked_lm
    (encoder, BERT 80/10/10) or denoising (encoder_decoder, BART text infilling). On task data
    (``data.task``): sft (decoder; loss on response tokens only), classify (encoder; the
    [CLS] head, ``model.num_labels`` from the task's labels) or seq2seq (encoder_decoder;
    teacher forcing, greedy-decoded exact match and BLEU on validation)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` for decaying schedules."""
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Shape after warm-up: cosine or linear decay, constant, or warmup-stable-decay."""
    warmup_steps: int = 20
    """Steps of linear warm-up from 0 to ``lr``."""
    decay_fraction: float = 0.2
    """For ``wsd``: the final fraction of steps spent decaying."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms, biases or embeddings)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Parameter/activation precision; bf16 and fp16 keep fp32 master weights (fp16: GPU only)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: whole blocks (full) or attention only (selective)."""
    loss_chunk_tokens: int = 0
    """Vocabulary losses (causal_lm, masked_lm, denoising, sft, seq2seq) computed from the
    final hidden states this many predicted positions at a time, the output projection
    inside the loop and each chunk recomputed in backward: the step never holds the whole
    (micro batch x seq_len x vocabulary) fp32 logits (16 GB for Llama 3's 128,256-token
    vocabulary at 8 x 4,096), only chunk x vocabulary. Costs one more forward of the output
    projection; worth it for large vocabularies (e.g. 4096). 0: the plain loss."""
    checkpoint_every_n_layers: int = 1
    """With activation checkpointing: apply it to every n-th block only."""
    compile: bool = False
    """``torch.compile`` each transformer block for training (one static graph per block
    shape; evaluation and generation stay eager). Composes with ZeRO 0-2, activation
    checkpointing and LoRA; the first step pays the compile time (tens of seconds on CPU).
    Not with ``deepspeed.zero_stage: 3``, whose parameter-gather hooks break every block's
    graph."""
    eval_every: int = 100
    """Steps between validation passes; 0 means only the one at the end."""
    eval_batches: int = 20
    """Validation micro-batches per pass per process; 0 means the whole validation split."""
    log_every: int = 10
    """Steps between metric logs."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 means only at the end of training."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep; older ones are deleted."""
    bad_loss_policy: Literal["stop", "skip"] = "stop"
    """A non-finite or spiking loss: stop the run with an error after ``max_bad_steps`` bad
    steps in a row (earlier ones are skipped), or skip every bad step (zero gradient)."""
    max_bad_steps: int = 1
    """With ``stop``: bad steps in a row that stop the run."""
    spike_factor: float = 0.0
    """A loss above this factor x the running mean of good steps counts as bad; 0 disables."""
    generate_every: int = 0
    """Steps between generations of ``generate.prompts`` logged as text to MLflow and
    ``generations.jsonl`` (decoder models; not under ZeRO-3); 0 disables."""
    peak_flops_per_device: float | None = None
    """Peak FLOP/s of one device for MFU/HFU (e.g. a CPU's measured matmul peak); None uses
    the known GPU table (A100, H100, H200 dense bf16) and reports no MFU elsewhere."""

    def check_compile(self, zero_stage: int) -> None:
        """Refuses ``compile`` where it does not compose with the ``deepspeed`` section.

        Raises:
            ValueError: ``train.compile`` with ZeRO-3, naming both keys and what to do.
        """
        if self.compile and zero_stage == 3:
            raise ValueError(
                "train.compile: does not compose with deepspeed.zero_stage=3: ZeRO-3 gathers "
                "each layer's parameters in a hook that torch.compile cannot trace, so every "
                "block's graph breaks at each layer and the step runs slower than eager; use "
                "deepspeed.zero_stage 0, 1 or 2 with train.compile=true, or set "
                "train.compile=false"
            )

    def sequences_per_step(self, world_size: int) -> int:
        """Sequences per optimizer step when ``world_size`` processes train."""
        return self.micro_batch_size * self.grad_accum_steps * world_size

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")
        if self.checkpoint_every_n_layers < 1:
            raise ValueError("checkpoint_every_n_layers: must be at least 1")
        for name in ("eval_every", "eval_batches", "checkpoint_every", "generate_every",
                     "loss_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.peak_flops_per_device is not None and self.peak_flops_per_device <= 0:
            raise ValueError(
                f"peak_flops_per_device: must be positive, got {self.peak_flops_per_device}; "
                "give the device's peak FLOP/s (e.g. 989e12 for an H100) or leave it empty"
            )
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: must be at least 1, got {self.max_bad_steps}")
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise ValueError(
                f"spike_factor: {self.spike_factor} would flag ordinary steps; use a value "
                "above 1 (e.g. 3.0) or 0 to disable spike detection"
            )
        if self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("log_every: and keep_checkpoints must be at least 1")


@dataclass
class InitConfig:
    """Where a run's weights start (a warm start) and what else it carries over. Applies only
    while the run has no checkpoint of its own: a resume always wins."""

    source: str | None = None
    """None: random init from ``seed``. A lmforge checkpoint folder
    (``.../checkpoints/step_XXXXXXXX``), or a checkpoints folder (its newest complete
    checkpoint); or a Hugging Face folder (``config.json`` + ``*.safetensors``), including one
    lmforge exported. Weights load strictly, except parts the source cannot have (a new
    classification head, LoRA adapters), which are listed in the log."""
    optimizer: Literal["reset", "keep"] = "reset"
    """keep: load the source checkpoint's optimizer state (AdamW moments, fp32 master
    weights); needs a lmforge checkpoint with the same model and trainable set. The new
    run's lr, betas, eps and weight decay apply from its first step."""
    schedule: Literal["reset", "keep"] = "reset"
    """keep: the LR schedule continues at the source checkpoint's step count (this run's
    ``train`` schedule evaluated there); reset: it starts at step 0."""
    loader: Literal["reset", "keep"] = "reset"
    """keep: continue the source checkpoint's loader position (same data only)."""

    def __post_init__(self) -> None:
        if self.source is not None and not str(self.source).strip():
            raise ValueError("source: is empty; give a checkpoint or Hugging Face folder, or "
                             "leave it unset for a random init")
        kept = [name for name in ("optimizer", "schedule", "loader")
                if getattr(self, name) == "keep"]
        if kept and self.source is None:
            raise ValueError(f"{kept[0]}: keep needs init.source (a lmforge checkpoint to "
                             "keep it from); set init.source or use reset")


@dataclass
class TrainableConfig:
    """Which parameters train. Frozen ones get no gradient and no optimizer state and stay
    bit-identical; ``launch/train/trainable.py`` applies this."""

    mode: Literal["all", "freeze_embeddings", "freeze_blocks", "head_only", "lora"] = "all"
    """all; freeze_embeddings (token/position/type embeddings and their norm: a tied output
    head is the token embedding, so it freezes too); freeze_blocks (the embeddings and the
    first ``freeze_blocks`` blocks); head_only (the classification head of a classify run,
    else the output head and final norms); lora (rank-``lora_rank`` adapters on the
    ``lora_targets`` projections, plus a classification head; merged into the weights on
    export)."""
    freeze_blocks: int = 0
    """Mode freeze_blocks: how many blocks, counted from the input (an encoder-decoder's
    encoder blocks come first)."""
    lora_rank: int = 8
    """Rank r of each adapter (A: r x in, B: out x r)."""
    lora_alpha: float = 16.0
    """Adapter scale: the update is B A x * alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "out"])
    """Names of the nn.Linear projections that get adapters, matched as name suffixes
    (qkv, out, mlp.up, mlp.down, mlp.gate_up, cross_attn.q, cross_attn.kv)."""

    def __post_init__(self) -> None:
        if self.freeze_blocks < 0:
            raise ValueError(f"freeze_blocks: must be >= 0, got {self.freeze_blocks}")
        if self.mode == "freeze_blocks" and self.freeze_blocks == 0:
            raise ValueError("freeze_blocks: mode freeze_blocks needs the number of blocks to "
                             "freeze, e.g. trainable.freeze_blocks=6")
        if self.mode != "freeze_blocks" and self.freeze_blocks:
            raise ValueError(f"freeze_blocks: only used with mode freeze_blocks, not "
                             f"{self.mode!r}; set trainable.mode=freeze_blocks or remove it")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank: must be at least 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.mode == "lora" and not [t for t in self.lora_targets if str(t).strip()]:
            raise ValueError("lora_targets: is empty; name the projections that get adapters, "
                             "e.g. [qkv, out]")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings; the DeepSpeed JSON is generated from these and the train section."""

    zero_stage: int = 2
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer state), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state in CPU memory (ZeRO 1-3); the optimizer becomes DeepSpeed's CPU
    AdamW (same groups and schedule), JIT-compiled on first use and cached."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters in CPU memory (ZeRO 3 only)."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with backward. Default: on with NCCL; off with gloo (CPU),
    where DeepSpeed has no streams to overlap on and the option only adds a copy."""
    reduce_scatter: bool | None = None
    """Reduce gradients with reduce-scatter. Default: on with NCCL; off with gloo, which has
    no native reduce-scatter (DeepSpeed falls back to one reduce per rank)."""
    bucket_size: int = 50_000_000
    """Elements per reduce/all-gather bucket."""
    config_file: str | None = None
    """An existing DeepSpeed JSON; its keys must agree with the typed config (conflicts fail)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed keys added to (or replacing) the generated JSON."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError("offload_params: parameter offload needs zero_stage 3")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer: optimizer offload needs zero_stage 1, 2 or 3")
        if self.config_file is not None and not Path(self.config_file).is_file():
            raise ValueError(f"config_file: no such DeepSpeed JSON '{self.config_file}'")


@dataclass
class LaunchConfig:
    """How many processes run training and how they find each other."""

    nnodes: int = 1
    """Machines taking part."""
    nproc_per_node: int = 2
    """Training processes per machine (one per GPU; on a CPU, processes sharing the cores)."""
    master_addr: str = "127.0.0.1"
    """Rendezvous address (rank 0's host) for local runs."""
    master_port: int | None = None
    """Rendezvous port; None picks a free one."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto is nccl with CUDA, gloo without."""
    omp_num_threads: int = 1
    """OMP_NUM_THREADS per process (CPU runs are much faster with 1 per process)."""

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ValueError("nproc_per_node: nnodes and nproc_per_node must be at least 1")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def resolved_backend(self, cuda: bool | None = None) -> str:
        """The torch.distributed backend: ``backend``, or for ``auto`` NCCL when the training
        processes have CUDA GPUs (``cuda``; default: whether this machine has one), else gloo.
        The one statement of the "auto" rule."""
        if self.backend != "auto":
            return self.backend
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        return "nccl" if cuda else "gloo"


@dataclass
class GenerateConfig:
    """The demonstration at the end of a run (logged to MLflow), fitting the family: a
    decoder continues the prompts, an encoder fills their mask tokens (top-k), an
    encoder-decoder turns each prompt into a target with beam search."""

    prompts: list[str] = field(default_factory=lambda: ["The "])
    """Prompts to continue."""
    max_new_tokens: int = 48
    """Tokens generated per prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = 40
    """Sample only from the k most likely tokens; None disables."""
    top_p: float | None = None
    """Nucleus sampling threshold; None disables."""
    num_beams: int = 4
    """Beams of the encoder-decoder demonstration (each prompt is a source, the beam search
    output its target); 1 = greedy."""
    mask_top_k: int = 5
    """Candidates shown per masked position in the encoder's fill-mask demonstration (its
    prompts must contain the tokenizer's mask token)."""

    def __post_init__(self) -> None:
        for name in ("num_beams", "mask_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: must be at least 1, got {self.top_k}")


@dataclass
class ExportConfig:
    """The Hugging Face export written after training."""

    enabled: bool = True
    """Write the export at the end of ``lmforge run``."""
    output_dir: str | None = None
    """Export folder; None means ``<run_dir>/export``."""
    verify_atol: float = 1e-4
    """Largest logit difference accepted between transformers and lmforge (fp32)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the exported weights. bf16 halves the folder; the check then compares
    transformers with lmforge's model on the same bf16-rounded weights."""
    max_shard_size: str | int | None = None
    """Most tensor bytes per weight file, e.g. ``5GB``, ``500MB`` or a number of bytes: the
    weights are split into ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json``, as transformers writes them (a larger tensor gets a file
    of its own). None: one ``model.safetensors``."""

    def __post_init__(self) -> None:
        if not self.verify_atol >= 0:
            raise ValueError(f"verify_atol: must be >= 0, got {self.verify_atol}; e.g. 1e-4")
        if self.max_shard_size is not None:
            self.max_shard_bytes()  # raises on a malformed size

    def max_shard_bytes(self) -> int | None:
        """``max_shard_size`` in bytes (KB, MB, GB are powers of 1000, as in transformers)."""
        if self.max_shard_size is None:
            return None
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(self.max_shard_size),
                             re.IGNORECASE)
        unit = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "K": 10**3,
                "M": 10**6, "G": 10**9}.get(match.group(2).upper()) if match else None
        size = int(float(match.group(1)) * unit) if unit else 0
        if size < 1:
            raise ValueError(f"max_shard_size: {self.max_shard_size!r} is not a size; write "
                             "e.g. 5GB, 500MB or a number of bytes")
        return size



@dataclass
class TrackingConfig:
    """The `tracking:` section: where and how rank 0 reports a run to MLflow."""

    enabled: bool = True
    """Log to MLflow at all. Off: every Tracker call is a no-op."""
    uri: str | None = None
    """MLflow tracking URI, e.g. `http://127.0.0.1:5000`. None: a sqlite store inside the run
    directory (`<run_dir>/mlflow.db`, artifacts in `<run_dir>/mlartifacts`), no server needed."""
    experiment: str = "lmforge"
    """MLflow experiment the run is filed under (created if missing)."""
    run_name: str | None = None
    """MLflow run name; None lets the launcher pick one (or MLflow a random one)."""
    tags: dict[str, Any] = field(default_factory=dict)
    """Extra run tags, e.g. `{team: nlp, ticket: ABC-12}`."""
    flush_interval_s: float = 5.0
    """Seconds between background deliveries; values are batched in between."""
    max_queue: int = 100_000
    """Metric values kept while MLflow is unreachable; beyond this the oldest are dropped
    (counted and reported)."""
    timeout_s: float = 10.0
    """Per-request HTTP timeout towards the tracking server. Requests are not retried inside
    MLflow (our thread retries with backoff), so a dead server never stalls for minutes."""
    start_timeout_s: float = 15.0
    """Longest `start()` waits for its first attempt to create the run; if MLflow did not
    answer, it returns a pending handle and the run is created once MLflow answers."""
    close_timeout_s: float = 30.0
    """Longest `close()` waits to deliver what is queued before giving up."""
    retry_max_s: float = 30.0
    """Ceiling of the exponential backoff between attempts while MLflow is unreachable."""
    system_metrics: bool = True
    """Log CPU, memory, disk, network (and NVIDIA GPU when present) as `system/*` metrics."""
    system_metrics_interval_s: float = 10.0
    """Seconds between system metric samples."""
    registered_model: str | None = None
    """MLflow registered model that every stage export is logged to as a new version (tagged
    with the stage and its run); None registers nothing."""

    def __post_init__(self) -> None:
        if self.uri is not None:
            if not self.uri.strip():
                raise ValueError("uri: is empty; leave it unset for a sqlite store in the run "
                                 "directory, or give a URI such as http://host:5000")
            if "://" not in self.uri and not self.uri.startswith(("databricks", "file:")):
                raise ValueError(
                    f"uri: '{self.uri}' is not an MLflow tracking URI; use e.g. "
                    "http://host:5000 or sqlite:////abs/path/mlflow.db"
                )
        if not self.experiment.strip():
            raise ValueError("experiment: is empty; give an MLflow experiment name")
        for key in self.tags:
            if not VALID_MLFLOW_KEY.match(str(key)):
                raise ValueError(f"tags: key '{key}' is not a valid MLflow tag key; use "
                                 "letters, digits, '_', '-', '.', ' ', '/' or ':'")
        if self.registered_model is not None and not self.registered_model.strip():
            raise ValueError("registered_model: is empty; give a model name or leave it unset")
        if self.max_queue < 1:
            raise ValueError(f"max_queue: must be >= 1, got {self.max_queue}")
        positive = ("flush_interval_s", "timeout_s", "retry_max_s", "system_metrics_interval_s")
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}: must be > 0 seconds, got {value}")
        for name in ("start_timeout_s", "close_timeout_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name}: must be >= 0 seconds, got {value}")


