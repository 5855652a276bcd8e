"""LoRA experts: reading PEFT adapter folders, validating them against the base, naming rules."""
