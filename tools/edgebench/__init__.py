"""tools/bench: every figure beside its peer, measured in the same run."""
