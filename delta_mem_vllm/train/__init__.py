"""Training Δ-Mem adapters for a frozen backbone: recall data, episodes (write view → read view) and
the training loop. Framework-light: torch + transformers (tokenizer, chat template)."""
