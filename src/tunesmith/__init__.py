"""tunesmith: fine-tune pre-trained generative models and prove the result is better."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft whenever it is installed) warns on every CPU with AVX512-BF16 that an optional 4-bit
# inference kernel package ("kernels") is missing: a line that reads like a failure on every LoRA run, about a path
# tunesmith does not take on CPUs. Its other warnings stay on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)


class _TorchvisionFallbackFilter(_logging.Filter):
    """transformers warns, the first time anything (diffusers' IFPipeline annotation, the built-in image model's
    class) touches CLIPImageProcessor without torchvision, that it falls back to the PIL image processor: the one
    tunesmith wants (it never asks torchvision for images), so the line only reads like a missing dependency."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
