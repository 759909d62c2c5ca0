"""Parameter-efficient fine-tuning through PEFT, and the trainable-parameter report."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config.schema import LoraConfig


@dataclass
class ParameterReport:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.2f}%)"


def parameter_report(model) -> ParameterReport:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParameterReport(trainable, total)


def apply_peft(model, cfg):
    """Wrap `model` for the configured method; full fine-tuning (peft=none) returns it unchanged."""
    if cfg.name == "none":
        return model
    if isinstance(cfg, LoraConfig):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
        peft_config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                     target_modules=targets, bias=cfg.bias, task_type="CAUSAL_LM")
        return get_peft_model(model, peft_config)
    raise NotImplementedError(f"peft method {cfg.name!r}")


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
