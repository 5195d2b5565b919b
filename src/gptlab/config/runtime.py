"""The runtime section: how a run executes, apart from what it learns (the choices torchtitan
applies from outside the model); gptlab.runtime.device decides each `auto` for the device."""

from __future__ import annotations

from dataclasses import dataclass

from gptlab.config.fields import POSITIVE, check_fields, setting

_ON_OFF = ("auto", "on", "off")


@dataclass
class RuntimeConfig:
    """How a run executes: device, precision, compile, kernels, host memory, processes.

    Moving a run to another machine changes this section only."""

    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps (auto: a GPU if there is one)")
    precision: str = setting(
        "auto",
        "matmul precision, weights stay fp32; auto: bf16 where the device supports it, "
        "fp16 on older CUDA GPUs, else fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    compile: str = setting(
        "auto", "torch.compile the model and loss; auto: on CUDA only", choices=_ON_OFF
    )
    chunked_loss: str = setting(
        "auto",
        "compute the loss from hidden states in row chunks, never holding the full (B, T, V) "
        "logits (gptlab.model.loss); auto: on when training on CPU",
        choices=_ON_OFF,
    )
    fast_dropout: str = setting(
        "auto",
        "draw dropout masks from random integers (gptlab.model.gpt.Dropout; another random stream "
        "than PyTorch's); auto: on when training on CPU",
        choices=_ON_OFF,
    )
    activation_checkpointing: bool = setting(
        False,
        "keep only each block's input for backward and recompute the rest there: the same "
        "loss and gradients, a fraction of the activations' memory, one more forward pass "
        "(GPT-2 124M on CPU: full finetuning 10%, LoRA 24% slower a step; BENCHMARKS.md)",
    )
    host_memory: str = setting(
        "auto",
        "keep: glibc's malloc keeps freed memory for reuse instead of returning it to the OS, "
        "so each step need not fault it in again; auto: keep when training on CPU (Linux)",
        choices=("auto", "keep", "release"),
    )
    parallel: str = setting(
        "ddp",
        "under torchrun: ddp (a replica per process) or fsdp (FSDP2, sharded)",
        choices=("ddp", "fsdp"),
    )
    dist_timeout: float = setting(
        600.0, "seconds any collective may wait before the job fails", bounds=POSITIVE
    )

    def validate(self) -> RuntimeConfig:
        check_fields(self, "runtime")
        return self
