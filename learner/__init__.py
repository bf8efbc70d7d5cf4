"""The DPO learner: consume preference pairs, one step per batch, publish each version with its offsets."""
