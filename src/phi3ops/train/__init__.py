"""Fine-tuning: the SFT trainer, its child processes, checkpoints, LM head, throughput, sizing."""
