"""`hvdllm train`: the config (config/), shared run machinery (common.py, checkpoint.py, metrics.py)
and one trainer per framework (trainer_torch.py, trainer_keras.py), selected by the CLI (hvdllm/cli.py)."""
