"""`tunesmith export`: the command-line face of export_model."""

from __future__ import annotations

import sys


def cmd_export(args) -> int:
    from ..safety.gate import check_release
    from .exporting import ExportCheckFailed, _text_to_image, export_model

    # The release gate: refuses (SafetyGateError, exit 2) a run whose harmful-request refusal rate fell too far.
    # Its refusal probes ask a language model; a text-to-image model has none to measure.
    if _text_to_image(args.model) is None:
        check_release(args.model, getattr(args, "accept_safety_regression", False),
                      emit=lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        result = export_model(args.model, args.format, args.out, dtype=args.dtype, overwrite=args.overwrite,
                              verify=not args.no_verify, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                              style=getattr(args, "style", None))
    except ExportCheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for check in result.checks:
        print(check)
    dtype = f", {result.dtype}" if result.dtype else ""
    size = result.size_bytes / 2**20
    print(f"wrote {result.path} ({result.format}{dtype}, {size:.1f} MiB) in {result.seconds:.1f} s")
    if result.kind == "text-to-image":
        if result.format == "diffusers":
            print(f"use: DiffusionPipeline.from_pretrained({str(result.path)!r})  or  tunesmith generate {result.path} "
                  "--prompt ... --out DIR")
        elif (result.path / "pytorch_lora_weights.safetensors").is_file():
            print(f"use: pipe = DiffusionPipeline.from_pretrained({result.base_model!r}); "
                  f"pipe.load_lora_weights({str(result.path)!r})  or  tunesmith generate {result.path} --prompt ... "
                  "--out DIR")
        for name, where in (("lora_kohya.safetensors", "A1111/Forge models/Lora, kohya-ss, or pipe.load_lora_weights"),
                            ("lora_comfyui.safetensors", "ComfyUI models/loras (LoraLoader)")):
            if (result.path / name).is_file():
                print(f"use: {result.path / name} in {where}")
    elif result.format == "hf":
        print(f"use: AutoModelForCausalLM.from_pretrained({str(result.path)!r})  or  tunesmith chat {result.path}")
    elif result.format == "gguf":
        print(f"use: llama-cli -m {result.path}  or  tunesmith chat {result.path}")
    else:
        print(f"use: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({result.base_model!r}), "
              f"{str(result.path)!r})  or  tunesmith chat {result.path}")
    return 0
