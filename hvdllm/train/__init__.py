"""`hvdllm train`: the config (config/), run set-up (run_setup.py), the loop both frameworks share
(loop.py, with metrics.py, progress.py, checkpoint.py), and one trainer per framework (trainer_torch.py with
its step runners runner_torch.py, model_parallel_torch.py, pipeline_torch.py; trainer_keras.py), selected by
the CLI (hvdllm/cli.py)."""
