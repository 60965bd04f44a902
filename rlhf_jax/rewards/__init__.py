"""Rule-based rewards on text: answer verifiers and batched reward functions (RLVR)."""
