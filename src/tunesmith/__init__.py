"""tunesmith: fine-tune pre-trained generative models and prove the result is better."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft whenever it is installed) warns on every CPU with AVX512-BF16 that an optional 4-bit
# inference kernel package ("kernels") is missing: a line that reads like a failure on every LoRA run, about a path
# tunesmith does not take on CPUs. Its other warnings stay on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
