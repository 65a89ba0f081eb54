"""Cross-model transfer of SAEs, steering vectors and gates (`sae-refusal transfer`)."""
