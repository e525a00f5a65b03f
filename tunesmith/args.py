"""Argument dataclasses. They are the command line (see cli.py) and the `args.json` of every run.

Names and defaults follow ms-swift 3.x so the guide's commands work verbatim.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError
from .files import write_atomic

# --gguf_type: the 16-bit and 32-bit types export/gguf.py writes itself, then llama-quantize's types that need no
# importance matrix and suit dense models (q3_k/q4_k/q5_k: the _m mixes, as there), made by llama.cpp's quantizer
GGUF_TYPES = ("f16", "bf16", "f32", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_k", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
              "q4_k", "q4_1", "q4_0", "iq4_nl", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "q3_k", "iq3_m", "iq3_s", "q2_k")


def arg(default, help: str, **kw):
    """A dataclass field with a one-line help text (shown by --help)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class BaseArguments:
    """What every command needs: which model, how to talk to it."""

    model: Optional[str] = arg(
        None,
        "model: a local Hugging Face folder, a hub id (Qwen/Qwen2.5-7B-Instruct), a .gguf file, "
        "or an offline alias (qwen2.5-0.5b [default], smollm2-135m)",
    )
    model_type: Optional[str] = arg(
        None, "architecture hint (qwen2_5, llama, ...); read from config.json when not given"
    )
    torch_dtype: str = arg(
        "auto", "compute dtype: auto, float32, bfloat16, float16 (bf16 on a CPU computes in float32)",
        choices=["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
    )
    device: str = arg("auto", "auto, cpu, cuda, cuda:N")
    system: Optional[str] = arg(None, "system prompt (default: the model's own chat template default)")
    enable_thinking: Optional[bool] = arg(
        None, "for chat templates with a thinking switch (Qwen3): false = no reasoning (an empty <think></think> "
        "opens each answer), true = reason; default: the template's own, and in training, thinking off for "
        "records whose answers carry no <think> reasoning")
    max_length: int = arg(2048, "longest sample in tokens (prompt + answer)")
    seed: int = arg(42, "random seed: same seed, same data order and same result")

    def validate(self) -> None:
        if self.max_length < 8:
            raise UserError(f"--max_length {self.max_length} is too small: use at least 8 tokens")


@dataclass
class DataArguments(BaseArguments):
    """Which data, and how it becomes tokens: shared by `sft` and `data inspect`."""

    dataset: list[str] = arg(
        [], "training data: [hf::|ms::]ID_OR_PATH[:SUBSET][#N] — .json/.jsonl/.csv/.parquet files or folders "
        "(alpaca, sharegpt, messages or query/response), self-cognition (built in), or hub ids; #N samples N records"
    )
    val_dataset: list[str] = arg([], "validation data, same forms as --dataset")
    split_dataset_ratio: float = arg(0.0, "share of --dataset held out for validation (0 = none)")
    model_name: list[str] = arg([], "the model's new name: one value, or a Chinese and an English value; fills {{NAME}}")
    model_author: list[str] = arg([], "the model's author: one value, or a Chinese and an English value; fills {{AUTHOR}}")
    columns: Optional[str] = arg(
        None, """rename record fields before reading, as a JSON object: '{"prompt": "instruction", "completion": "output"}'"""
    )
    loss_scale: str = arg(
        "default", "which answers are trained on: default (every assistant turn) or last_round (the last one only)",
        choices=["default", "last_round"],
    )
    truncation_strategy: str = arg(
        "delete", "samples longer than --max_length: delete (drop and count) or right/left (truncate)",
        choices=["delete", "right", "left"],
    )

    def validate(self) -> None:
        super().validate()
        for name in ["model_name", "model_author"]:
            if len(getattr(self, name)) > 2:
                raise UserError(f"--{name} takes one value, or two (Chinese, English); got {len(getattr(self, name))}")
        if not (0 <= self.split_dataset_ratio < 1):
            raise UserError(f"--split_dataset_ratio must be in [0, 1), got {self.split_dataset_ratio}")
        if not self.dataset and not getattr(self, "dry_run", False):
            raise UserError("no training data: pass --dataset FILE (e.g. --dataset self_cognition.json)")
        self.column_map  # a bad --columns stops here, before anything loads

    @property
    def column_map(self) -> dict[str, str]:
        """--columns as old -> new field names (each distinct value parsed once)."""
        return dict(parse_columns(self.columns))


@dataclass
class InspectArguments(DataArguments):
    """`tunesmith data inspect DATASET...`: what training would see, before spending GPU time."""

    samples: int = arg(1, "how many rendered samples to show")

    def validate(self) -> None:
        super().validate()
        if self.samples < 0:
            raise UserError(f"--samples must be 0 or more, got {self.samples}")


@dataclass
class SftArguments(DataArguments):
    """`tunesmith sft`: train a LoRA adapter."""

    train_type: str = arg("lora", "what to train (lora)", choices=["lora"], aliases=["tuner_type"])
    replay_ratio: float = arg(
        0.0, "keep the rest of the model as it was: mix in the base model's own answers to a built-in bank of general "
        "prompts (Chinese and English), this many per training sample (0: off); generated once per base model, cached")
    keep_kl: float = arg(
        0.0, "keep the rest of the model as it was: each step also pulls the model towards the base model's own "
        "next-token distribution (the adapter switched off) on one prompt of that bank, with this weight on the KL "
        "(0: off); adds no optimizer steps")
    num_train_epochs: float = arg(3.0, "passes over the training data")
    max_steps: int = arg(-1, "stop after this many optimizer steps (-1: run all epochs)")
    per_device_train_batch_size: int = arg(1, "samples per micro-batch")
    per_device_eval_batch_size: int = arg(1, "samples per validation batch")
    gradient_accumulation_steps: Optional[int] = arg(
        None, "micro-batches per optimizer step (default: enough for 16 samples per step, as ms-swift)"
    )
    learning_rate: float = arg(1e-4, "peak learning rate")
    lr_scheduler_type: str = arg("cosine", "learning-rate schedule (transformers' get_scheduler, after the warm-up)",
                                 choices=["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                                          "polynomial", "inverse_sqrt"])
    warmup_ratio: float = arg(0.0, "share of steps spent warming the learning rate up from 0")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.95, "AdamW beta2")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon")
    max_grad_norm: float = arg(1.0, "clip gradients to this norm (0: no clipping)")

    lora_rank: int = arg(8, "LoRA rank r")
    lora_alpha: int = arg(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    target_modules: list[str] = arg(["all-linear"], "layers that get LoRA: all-linear, or module names (q_proj v_proj ...)")

    gradient_checkpointing: Optional[float] = arg(
        None, "recompute activations in backward to save memory: true/false, or the share of layers "
        "(0.5 = every other layer); default: true on CUDA, false on CPU", type_hint="bool_or_float",
    )
    use_liger: bool = arg(True, "use Liger's fused kernels on CUDA when liger-kernel is installed")
    lean_lora: bool = arg(
        True, "run LoRA projections as one autograd function each (no stored dropout copies, fewer kernels)"
    )
    cuda_graphs: bool = arg(
        True, "on one CUDA GPU with lean LoRA: capture each packed row length's forward+backward once as a "
        "CUDA graph and replay it (the GPU no longer waits for Python)"
    )
    quant_method: Optional[str] = arg(
        None, "load the base model quantized (QLoRA): bnb (bitsandbytes; needs `pip install tunesmith[qlora]`)",
        choices=["bnb"],
    )
    quant_bits: Optional[int] = arg(None, "bits per base weight with --quant_method bnb: 4 (nf4, double quantization; "
                                          "the default) or 8")
    fsdp: bool = arg(False, "with several GPUs (NPROC_PER_NODE=N or torchrun): shard the base model across them "
                            "(FSDP2) instead of a full copy per GPU, for bases that do not fit one card")
    dry_run: bool = arg(False, "print the estimated peak memory per GPU for these settings and the largest "
                               "batch/length that fits, then exit (reads only config.json)")
    packing_window: bool = arg(
        True, "run each accumulation window as one padding-free packed batch (same update, much faster)"
    )
    logging_steps: int = arg(5, "log loss, lr and speed every N optimizer steps")
    eval_steps: Optional[int] = arg(None, "validate every N optimizer steps (default: --save_steps)")
    save_steps: int = arg(500, "save a checkpoint every N optimizer steps (the last step is always saved)")
    save_total_limit: Optional[int] = arg(None, "keep only the newest N checkpoints")
    output_dir: str = arg("output", "where runs go: OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/")
    resume_from_checkpoint: Optional[str] = arg(
        None, "continue a stopped run from a checkpoint folder (or true: the newest one under --output_dir) "
        "with the same optimizer, schedule, data order and random state"
    )
    max_nonfinite_steps: int = arg(
        5, "a step with a NaN/inf loss or gradient is skipped (no update); stop after this many in a row"
    )
    dataloader_num_workers: int = arg(0, "accepted for compatibility; tokenized data is prepared up front")
    report_to: list[str] = arg(
        ["tensorboard"], "where the training curves go besides logging.jsonl: tensorboard (RUN/runs/; "
        "`tensorboard --logdir output`), wandb (offline unless logged in), none"
    )

    def validate(self) -> None:
        super().validate()
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "lora_rank",
                    "lora_alpha", "logging_steps", "save_steps", "max_nonfinite_steps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive number, got {getattr(self, name)}")
        for name in ["gradient_accumulation_steps", "eval_steps", "save_total_limit"]:
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UserError(f"--{name} must be a positive number, got {v}")
        if not (self.replay_ratio >= 0 and math.isfinite(self.replay_ratio)):
            raise UserError(f"--replay_ratio must be 0 (off) or more replayed answers per training sample, "
                            f"got {self.replay_ratio}")
        if not (self.keep_kl >= 0 and math.isfinite(self.keep_kl)):
            raise UserError(f"--keep_kl must be 0 (off) or a positive weight, got {self.keep_kl}")
        if not (self.num_train_epochs > 0 and math.isfinite(self.num_train_epochs)):
            raise UserError(f"--num_train_epochs must be positive, got {self.num_train_epochs}")
        if not (0 < self.learning_rate < 1):
            raise UserError(f"--learning_rate must be between 0 and 1, got {self.learning_rate}")
        for name in ["lora_dropout", "warmup_ratio"]:
            v = getattr(self, name)
            if not (0 <= v < 1):
                raise UserError(f"--{name} must be in [0, 1), got {v}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise UserError("--max_grad_norm and --weight_decay must not be negative")
        for name in ["adam_beta1", "adam_beta2"]:
            if not (0 <= getattr(self, name) < 1):
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        reporters(self.report_to)
        if not self.target_modules:
            raise UserError("--target_modules needs at least one name, or all-linear")
        if self.quant_bits is not None and self.quant_method is None:
            raise UserError(f"--quant_bits {self.quant_bits} needs --quant_method bnb (QLoRA)")
        if self.quant_method is not None:
            self.quant_bits = 4 if self.quant_bits is None else self.quant_bits
            if self.quant_bits not in (4, 8):
                raise UserError(f"--quant_bits {self.quant_bits}: bitsandbytes loads 4 (nf4) or 8 bits per weight")
            if self.fsdp:
                raise UserError("--fsdp with --quant_method bnb is not supported: a 4-bit 7B base fits one GPU, "
                                "so drop --fsdp (several GPUs then run data parallel)")
        if str(self.resume_from_checkpoint).strip().lower() in ("", "none", "false", "0", "no", "off"):
            self.resume_from_checkpoint = None

    def effective_accumulation(self, world_size: int = 1) -> int:
        """ms-swift's default: enough micro-batches for 16 samples per optimizer step."""
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        return max(1, math.ceil(16 / self.per_device_train_batch_size / world_size))


RLHF_TYPES = ["dpo", "orpo", "simpo", "kto"]
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}  # ms-swift's, which are TRL's and SimPO's


@dataclass
class RlhfArguments(SftArguments):
    """`tunesmith rlhf`: preference tuning of a LoRA adapter (DPO, ORPO, SimPO, KTO), after `sft` or on its own."""

    rlhf_type: str = arg("dpo", "preference method: dpo, orpo, simpo or kto", choices=RLHF_TYPES)
    beta: Optional[float] = arg(None, "strength of the preference (default: 0.1; simpo 2.0)")
    loss_type: Optional[str] = arg(None, "dpo: sigmoid (default), ipo or hinge",
                                   choices=["sigmoid", "ipo", "hinge"])
    rpo_alpha: Optional[float] = arg(None, "dpo: weight of an added NLL loss on the chosen answers (RPO; default none)")
    simpo_gamma: float = arg(1.0, "simpo: target reward margin gamma")
    cpo_alpha: float = arg(1.0, "simpo: weight of the NLL loss on the chosen answers")
    desirable_weight: float = arg(1.0, "kto: weight of the desirable (label true) answers")
    undesirable_weight: float = arg(1.0, "kto: weight of the undesirable (label false) answers")
    adapters: list[str] = arg([], "start from this adapter (a `tunesmith sft` checkpoint); its base model, template "
                                  "and system prompt come from its args.json unless given")
    ref_adapters: list[str] = arg([], "the reference model: the base with this adapter (default: the base without "
                                      "an adapter, or with --adapters' starting adapter)")

    def validate(self) -> None:
        super().validate()
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.rlhf_type]
        if not self.beta > 0:
            raise UserError(f"--beta must be positive, got {self.beta}")
        if self.loss_type is not None and self.rlhf_type != "dpo":
            raise UserError(f"--loss_type {self.loss_type} is for --rlhf_type dpo; {self.rlhf_type} has its own loss")
        self.loss_type = self.loss_type or ("sigmoid" if self.rlhf_type == "dpo" else self.rlhf_type)
        for name in ["adapters", "ref_adapters"]:
            if len(getattr(self, name)) > 1:
                raise UserError(f"--{name} takes one checkpoint folder")
        if self.ref_adapters and self.rlhf_type in ("orpo", "simpo"):
            raise UserError(f"--ref_adapters: {self.rlhf_type} uses no reference model")
        if self.keep_kl:
            raise UserError("--keep_kl is for `tunesmith sft`; preference tuning keeps to its reference model by --beta")
        for name in ["rpo_alpha", "cpo_alpha", "desirable_weight", "undesirable_weight"]:
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UserError(f"--{name} must not be negative, got {v}")


@dataclass
class InferArguments(BaseArguments):
    """`tunesmith infer`: chat with a base model or a tuned adapter."""

    adapters: list[str] = arg([], "a checkpoint folder from `tunesmith sft` (rebuilds model, template and system prompt from its args.json)")
    query: list[str] = arg([], "ask these questions, print the answers and exit (repeatable)")
    stream: bool = arg(True, "print tokens as they are generated")
    temperature: float = arg(0.0, "sampling temperature (0: greedy)")
    top_p: float = arg(1.0, "nucleus sampling probability mass")
    top_k: int = arg(0, "sample among the k most likely tokens (0: all)")
    repetition_penalty: float = arg(1.0, "penalise repeated tokens (1.0: off)")
    max_new_tokens: int = arg(2048, "longest answer in tokens")
    infer_backend: str = arg("pt", "inference engine (pt)", choices=["pt"])
    base_url: Optional[str] = arg(
        None, "chat with a running `tunesmith deploy` (or any OpenAI-compatible server) at this URL, e.g. http://127.0.0.1:8000/v1; --model names the served model"
    )
    api_key: Optional[str] = arg(None, "the server's API key (--base_url; default: $OPENAI_API_KEY)")

    def validate(self) -> None:
        super().validate()
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 or more, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if len(self.adapters) > 1:
            raise UserError("--adapters takes one checkpoint folder for infer")
        if self.base_url and self.adapters:
            raise UserError("--base_url chats with a server, which already holds its adapters: drop --adapters "
                            "and pass the served adapter's name with --model")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"--base_url {self.base_url}: expected an http:// or https:// URL such as http://127.0.0.1:8000/v1")


@dataclass
class ExportArguments(BaseArguments):
    """`tunesmith export`: merge an adapter into its base model, and/or write a GGUF file."""

    adapters: list[str] = arg([], "the checkpoint folder to export (its base model comes from its args.json)")
    merge_lora: bool = arg(False, "merge the adapter into the base: a standalone Hugging Face model folder (CKPT-merged/)")
    to_gguf: bool = arg(False, "write a GGUF file for llama.cpp / Ollama (an adapter is merged first)")
    gguf_type: str = arg(
        "f16", "GGUF weight type: f16, bf16, f32, or one of llama.cpp's quantizations (q8_0, q6_k, q5_k_m, q4_k_m, "
        "q4_0, q3_k_m, q2_k, iq4_xs, ...; these need `pip install 'tunesmith[gguf]'`)"
    )
    to_ollama: bool = arg(False, "with --to_gguf: write an Ollama Modelfile beside the GGUF file (`ollama create NAME -f Modelfile`)")
    output_dir: Optional[str] = arg(None, "where to write (default: CKPT-merged/ next to the checkpoint; MODEL-gguf/ for a --model folder)")
    max_shard_size: str = arg("5GB", "largest safetensors shard of the merged model")

    def validate(self) -> None:
        super().validate()
        if self.to_ollama and not self.to_gguf:
            raise UserError("--to_ollama writes a Modelfile for a GGUF file: add --to_gguf true")
        if not (self.merge_lora or self.to_gguf):
            raise UserError("nothing to do: pass --merge_lora true (a merged Hugging Face folder) and/or --to_gguf true")
        if len(self.adapters) > 1:
            raise UserError("--adapters takes one checkpoint folder for export")
        if self.merge_lora and not self.adapters:
            raise UserError("--merge_lora needs --adapters CKPT (the checkpoint to merge into its base model)")
        if self.to_gguf and not self.adapters and not self.model:
            raise UserError("--to_gguf needs --adapters CKPT or --model FOLDER (e.g. a merged model)")
        typed, self.gguf_type = self.gguf_type, self.gguf_type.lower()
        if self.gguf_type not in GGUF_TYPES:
            raise UserError(f"--gguf_type {typed}: expected one of {', '.join(GGUF_TYPES)}")


@dataclass
class DeployArguments(InferArguments):
    """`tunesmith deploy`: an OpenAI-compatible HTTP server for the base model and/or adapters."""

    adapters: list[str] = arg([], "adapters to serve: NAME=CKPT (chosen by the request's model) or a bare CKPT (named after its folder)")
    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0 serves the network: set --api_key)")
    port: int = arg(8000, "port to listen on (0: any free port, printed at start)")
    served_model_name: Optional[str] = arg(None, "name of the base model in /v1/models (default: its alias or folder name)")
    max_new_tokens: int = arg(512, "longest answer when a request sets no max_tokens")
    log_interval: int = arg(0, "accepted for compatibility")
    allowed_hosts: list[str] = arg([], "more names clients reach it by (Host header), besides loopback and --host; '*' any, '*.example.com' a domain")
    cors_origins: list[str] = arg([], "web pages allowed to call it from a browser (CORS), e.g. http://localhost:3000; other pages get 403")

    def validate(self) -> None:
        BaseArguments.validate(self)
        if self.temperature < 0 or not (0 < self.top_p <= 1) or self.max_new_tokens <= 0:
            raise UserError("--temperature must be >= 0, --top_p in (0, 1], --max_new_tokens positive")
        if not (0 <= self.port < 65536):
            raise UserError(f"--port {self.port}: expected 0-65535")


@dataclass
class EvalArguments(InferArguments):
    """`tunesmith eval`: the same questions to the base model and the tuned adapter, side by side."""

    questions: Optional[str] = arg(
        None, "questions: a .txt file (one per line) or .json/.jsonl (strings, or objects with query and optional expect); default: a built-in identity + general-knowledge set"
    )
    expect: list[str] = arg([], "keywords a tuned answer should contain (any of them): reports the share of base and tuned answers that do")
    output_dir: Optional[str] = arg(None, "where eval.md and eval.json go (default: CKPT-eval/ next to the checkpoint)")
    max_new_tokens: int = arg(128, "longest answer in tokens")

    def validate(self) -> None:
        super().validate()
        if not self.adapters:
            raise UserError("eval compares a tuned adapter with its base: pass --adapters CKPT")


@dataclass
class WebUiArguments:
    """`tunesmith web-ui`: train and chat in the browser; the page runs the same `tunesmith sft` commands."""

    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0 serves the network: anyone with the printed token can train)")
    port: int = arg(7860, "port to listen on (0: any free port, printed at start)")
    token: Optional[str] = arg(None, "the page's access token (default: a new random one each launch, printed in the URL); '' for none, on loopback only")
    allowed_hosts: list[str] = arg([], "more names the page is opened by (Host header), besides loopback and --host; '*' any, '*.example.com' a domain")
    output_dir: str = arg("output", "where runs go (OUTPUT_DIR/vN-…, as sft) and the page's own files (OUTPUT_DIR/webui/)")
    model: Optional[str] = arg(None, "the model preselected on the page (default: the offline default, qwen2.5-0.5b)")
    device: str = arg("auto", "where chat runs: auto, cpu, cuda, cuda:N (training takes it from the form)")
    max_new_tokens: int = arg(256, "longest chat answer in tokens")

    def validate(self) -> None:
        if not (0 <= self.port < 65536):
            raise UserError(f"--port {self.port}: expected 0-65535")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")


@functools.lru_cache(maxsize=None)
def parse_columns(text: str | None) -> dict[str, str]:
    """--columns '{"prompt": "instruction", "completion": "output"}': rename fields before detection."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UserError(f"--columns {text!r}: expected a JSON object of old to new field names, "
                        """e.g. --columns '{"prompt": "instruction", "completion": "output"}'""")
    return data
REPORTERS = ("tensorboard", "wandb", "none")  # --report_to


def reporters(report_to: list[str]) -> list[str]:
    """The --report_to writers asked for ('none' alone means none), refusing unknown names and missing packages."""
    names = [n.strip().lower() for item in report_to for n in str(item).split(",") if n.strip()]
    bad = [n for n in names if n not in REPORTERS + ("all",)]
    if bad:
        raise UserError(f"--report_to {bad[0]}: expected {', '.join(REPORTERS)} (or all)")
    if "none" in names:
        return []
    chosen = list(REPORTERS[:2]) if "all" in names else list(dict.fromkeys(names))
    for name, install in [("tensorboard", "pip install tensorboard"), ("wandb", "pip install 'tunesmith[wandb]'")]:
        if name in chosen and importlib.util.find_spec(name) is None:
            raise UserError(f"--report_to {name} needs the {name} package: {install} (or pass --report_to none)")
    return chosen


def normalize_dtype(name: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def args_dict(args) -> dict:
    """What args.json holds: every field, plus which command's arguments they are."""
    return {**dataclasses.asdict(args), "_command": type(args).__name__}


def save_args(args, path: Path) -> None:
    data = args_dict(args)
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def load_args_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: is this a checkpoint folder written by `tunesmith sft`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); the checkpoint cannot be trusted") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged: expected a JSON object")
    return data
