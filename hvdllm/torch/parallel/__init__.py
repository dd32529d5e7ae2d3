"""Model parallelism for PyTorch on Horovod process sets: tensor parallel layers and GPT, pipelines.

    grid = ProcessGrid(dp, tp, pp, world_size=N)
    hvd.init(process_sets=grid.process_sets())
    model = parallelize_gpt(GPT(cfg), grid.group("tp", hvd.rank()))          # tensor parallel
    stage = GPTStage(model, grid.coords(hvd.rank()).pp, grid.pp)              # pipeline stage
    pipeline = PipelineExecutor(stage, grid, hvd.rank(), schedule="1f1b")
    loss = pipeline.step(micro_inputs, micro_targets)                          # grads in .grad
"""
from hvdllm.core.grid import Group, ProcessGrid
from hvdllm.torch.parallel.gpt import TensorParallelGPT, parallelize_gpt
from hvdllm.torch.parallel.pipeline import ActivationMeter, GPTStage, PipelineExecutor, gpt_stage_bounds
from hvdllm.torch.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                          copy_to_group, gather_from_group, gather_shards, reduce_from_group,
                                          scatter_to_group, shard_tensor, vocab_parallel_cross_entropy)

__all__ = [
    "Group", "ProcessGrid", "TensorParallelGPT", "parallelize_gpt", "GPTStage", "PipelineExecutor",
    "gpt_stage_bounds", "ActivationMeter", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy", "copy_to_group", "reduce_from_group", "gather_from_group",
    "scatter_to_group", "shard_tensor", "gather_shards",
]
