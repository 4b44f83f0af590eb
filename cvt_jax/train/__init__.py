"""Training: the jitted train and eval steps and their loop, AdamW and its schedule, TensorBoard scalars."""
