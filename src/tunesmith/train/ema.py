"""An exponential moving average of the trained weights (train.ema_decay), evaluated, kept as the best and delivered.

After each optimizer step every trained tensor's shadow moves toward it: shadow <- shadow + (1 - d) (w - shadow), with
d = min(ema_decay, (1 + k) / (10 + k)) at the k-th update, the rule of diffusers' EMAModel (without its optional
power warm-up), so early shadows are not stuck at the starting weights. Evaluation, the best-checkpoint snapshot and
the delivered model see the shadows (``applied``); training goes on from the raw weights.

Written here rather than taken from diffusers.training_utils.EMAModel because the shadows must travel in the run's
checkpoints by parameter name, as safetensors like every other tensor there (EMAModel keeps a positional list and its
state_dict is made for torch.save), and only the trained tensors are averaged (a LoRA run's adapters, not its base).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

FILE = "ema.safetensors"  # in each checkpoint folder


class EMA:
    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        names = list(self.params)
        torch._foreach_lerp_([self.shadow[n] for n in names], [self.params[n].detach() for n in names], 1.0 - d)

    @contextmanager
    def applied(self):
        """The shadows in the model's tensors for the block; the trained weights back afterwards."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    @torch.no_grad()
    def apply(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.shadow[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"shadow.{n}": t for n, t in self.shadow.items()}, "updates": torch.tensor(self.updates)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.shadow if f"shadow.{n}" not in sd]
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {missing[:3]}: it belongs to another model or method")
        with torch.no_grad():
            for n in self.shadow:
                self.shadow[n].copy_(sd[f"shadow.{n}"])
        self.updates = int(sd["updates"])
