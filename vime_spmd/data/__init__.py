"""The prompt records a run reads (prompts)."""
