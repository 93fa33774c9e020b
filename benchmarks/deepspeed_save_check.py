"""What a plain save writes after ZeRO-3 wrapping: HF PEFT's `save_pretrained` against dpeft's, on 2 gloo CPU ranks.

    python benchmarks/deepspeed_save_check.py

Both libraries get the same tiny Llama (hidden 512, 4 layers), LoRA r=16 on all linear layers, AdamW under
DeepSpeed ZeRO-3, two training steps, then `save_pretrained` called on every rank (rank 0 writes). Each saved
tensor is compared with the shape the adapter config implies (a fresh unwrapped model's adapter state dict) and
with the rank's trained values gathered by DeepSpeed. Prints one line per library.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_backends import _init, _lora, _spawn  # noqa: E402
from bench_sharded import SEQ, SIZES, VOCAB, build_base  # noqa: E402


def _expected(lib: str) -> dict[str, tuple[int, ...]]:
    import peft

    import dpeft

    module = dpeft if lib == "dpeft" else peft
    model = module.get_peft_model(build_base(*SIZES["h512-l4"]), _lora(module))
    state = module.get_peft_model_state_dict(model)
    return {k: tuple(v.shape) for k, v in state.items()}


def _rank(rank: int, world: int, port: int, lib: str, out_dir: str, queue) -> None:
    _init(rank, world, port, 1)
    import peft
    from safetensors.torch import load_file

    import dpeft
    from dpeft.dist.deepspeed import deepspeed_config, import_deepspeed, init_deepspeed_distributed

    init_deepspeed_distributed()
    module = dpeft if lib == "dpeft" else peft
    expected = _expected(lib)
    model = module.get_peft_model(build_base(*SIZES["h512-l4"]), _lora(module))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    config = deepspeed_config(3, micro_batch_size=2, param_persistence_threshold=0)  # partition every tensor
    if lib == "dpeft":
        from dpeft.dist.deepspeed import apply_deepspeed

        engine = apply_deepspeed(model, opt, config=config)
    else:
        engine = import_deepspeed().initialize(model=model, optimizer=opt, config=config)[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=gen).chunk(world)[rank]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    path = os.path.join(out_dir, lib)
    error = None
    try:
        model.save_pretrained(path, is_main_process=rank == 0)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the point is what each library does
        error = f"{type(exc).__name__}: {exc}"[:200]
    torch.distributed.barrier()
    result = {"error": error}
    if rank == 0 and error is None:
        saved = load_file(os.path.join(path, "adapter_model.safetensors"))
        wrong = {k: (tuple(v.shape), expected.get(k)) for k, v in saved.items() if tuple(v.shape) != expected.get(k)}
        zero_b = [k for k, v in saved.items() if "lora_B" in k and v.numel() and not v.any()]
        result.update(keys=len(saved), expected=len(expected), wrong_shape=len(wrong), all_zero_lora_B=len(zero_b))
        result["example"] = next(iter(wrong.items()), None)
    queue.put((rank, json.dumps(result, default=str)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for lib in ("peft", "dpeft"):
            print(lib, _spawn(_rank, lib, tmp)[0])


if __name__ == "__main__":
    main()
